//! CPU accounting from `/proc`: this process's threads grouped by name (the server's
//! runtime, the load generator, SQLite's threads), a PostgreSQL postmaster and an nginx
//! master with their children.

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use super::{CLIENT_THREAD, SERVER_THREAD};
use crate::procfs::{proc_stat, process_tree_cpu};

/// CPU seconds by group.
pub(super) type CpuSample = BTreeMap<String, f64>;

/// Which processes and threads a CPU sample covers.
pub(super) struct Probe {
    /// This process's threads, grouped by name (server runtime, load generator, SQLite).
    pub(super) this_process: bool,
    /// A PostgreSQL postmaster: it and its children.
    pub(super) postmaster: Option<u32>,
    /// An nginx master: it and its workers.
    pub(super) nginx: Option<u32>,
}

impl Probe {
    pub(super) fn sample(&self) -> CpuSample {
        let mut s = CpuSample::new();
        if self.this_process {
            if let Ok(tasks) = fs::read_dir("/proc/self/task") {
                for t in tasks.flatten() {
                    let Some((name, _, secs)) = proc_stat(&t.path().join("stat")) else {
                        continue;
                    };
                    let group = match name.as_str() {
                        SERVER_THREAD => "tern server runtime",
                        CLIENT_THREAD => "load generator",
                        n if n.starts_with("sqlx-sqlite") => "sqlite threads",
                        _ => "other tern threads",
                    };
                    *s.entry(group.to_owned()).or_default() += secs;
                }
            }
        }
        if let Some(pid) = self.postmaster {
            s.insert("postgres".into(), process_tree_cpu(pid));
        }
        if let Some(pid) = self.nginx {
            s.insert("nginx".into(), process_tree_cpu(pid));
        }
        s
    }
}

pub(super) fn cpu_percent(before: &CpuSample, after: &CpuSample, window: Duration) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let used = v - before.get(k).copied().unwrap_or(0.0);
            (k.clone(), (used.max(0.0) / window.as_secs_f64() * 100.0).round())
        })
        .filter(|(_, pct)| *pct > 0.0)
        .collect()
}
