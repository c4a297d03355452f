//! Polls beside nginx while a rollout runs: wrk alternates short slices against tern's poll
//! and against nginx serving a 4 KiB file, both with the same kind of script, for as long
//! as the rollout runs, so that both meet the same background load (the simulated fleet,
//! the rollout's check-ins, the database, on the same CPUs). Pairs alternate which side goes
//! first, so that a load rising or falling within a pair weighs on both alike. Slices are
//! summed per phase (the phases open when the slice starts).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::bail;

use super::load::Figures;
use super::wrk::{parse_wrk, run_sampled, Wrk, CHECK_LINE};
use crate::procfs::process_cpu;

/// One side: the URL wrk loads and its script.
pub(super) struct Side {
    pub(super) url: String,
    pub(super) script: PathBuf,
}

/// One pair of slices.
pub(super) struct Pair {
    /// Phases open when the pair started.
    pub(super) phase: usize,
    pub(super) tern: Figures,
    pub(super) nginx: Figures,
    /// The server's CPU seconds during the tern slice and during the nginx slice.
    pub(super) server_cpu: (f64, f64),
}

/// The sampler's thread.
pub(super) struct Alternation {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<Pair>>>,
}

impl Alternation {
    /// Start alternating `slice_secs` slices; `opened` is the number of phases open.
    pub(super) fn start(
        wrk: Wrk,
        tern: Side,
        nginx: Side,
        slice_secs: u64,
        opened: Arc<AtomicUsize>,
        server_pid: u32,
    ) -> Alternation {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let slice = |side: &Side| -> anyhow::Result<(Figures, f64)> {
                let c0 = process_cpu(server_pid).unwrap_or(0.0);
                let (out, _) = run_sampled(wrk.command(&side.url, Some(&side.script), slice_secs))?;
                let cpu = process_cpu(server_pid).unwrap_or(0.0) - c0;
                if !out.contains(CHECK_LINE) {
                    bail!("wrk's script did not report its check of the answers:\n{out}");
                }
                Ok((parse_wrk(&out, Default::default())?, cpu))
            };
            // One unrecorded slice each: connections and caches warm.
            slice(&tern)?;
            slice(&nginx)?;
            let mut pairs = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let phase = opened.load(Ordering::Relaxed);
                let ((t, tc), (n, nc)) = if pairs.len() % 2 == 0 {
                    let t = slice(&tern)?;
                    (t, slice(&nginx)?)
                } else {
                    let n = slice(&nginx)?;
                    (slice(&tern)?, n)
                };
                // A pair that ran past the rollout's end is not counted.
                if !stopped.load(Ordering::Relaxed) {
                    pairs.push(Pair {
                        phase,
                        tern: t,
                        nginx: n,
                        server_cpu: (tc, nc),
                    });
                }
            }
            Ok(pairs)
        });
        Alternation { stop, thread }
    }

    /// Stop after the pair running and return the pairs recorded.
    pub(super) fn finish(self) -> anyhow::Result<Vec<Pair>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(pairs) => pairs,
            Err(_) => bail!("the thread alternating wrk's slices panicked"),
        }
    }
}

/// Rates summed over some pairs.
#[derive(Debug, Clone, Default)]
pub(super) struct Rates {
    pub(super) pairs: usize,
    pub(super) tern: f64,
    pub(super) nginx: f64,
    /// The worst slice's p99 of each side.
    pub(super) tern_p99_ms: f64,
    pub(super) nginx_p99_ms: f64,
    pub(super) errors: u64,
    /// One of the errors' messages, with which side and how many.
    pub(super) an_error: Option<String>,
}

impl Rates {
    /// The pairs' requests over their seconds, each side.
    pub(super) fn of<'a>(pairs: impl Iterator<Item = &'a Pair>) -> Rates {
        let (mut r, mut tern, mut nginx) = (Rates::default(), (0.0, 0.0), (0.0, 0.0));
        for p in pairs {
            r.pairs += 1;
            for (side, f) in [(&mut tern, &p.tern), (&mut nginx, &p.nginx)] {
                side.0 += f.requests as f64;
                side.1 += f.requests as f64 / f.rate.max(1.0);
            }
            r.tern_p99_ms = r.tern_p99_ms.max(p.tern.p99_ms);
            r.nginx_p99_ms = r.nginx_p99_ms.max(p.nginx.p99_ms);
            r.errors += p.tern.errors + p.nginx.errors;
            if r.an_error.is_none() {
                let sides = [("tern", &p.tern), ("nginx", &p.nginx)];
                r.an_error = sides.iter().find_map(|(side, f)| {
                    let (message, n) = f.error_messages.iter().next()?;
                    Some(format!("{side}: {message} ({n} in one slice)"))
                });
            }
        }
        r.tern = tern.0 / f64::max(tern.1, 1e-9);
        r.nginx = nginx.0 / f64::max(nginx.1, 1e-9);
        r
    }

    pub(super) fn ratio(&self) -> f64 {
        self.tern / self.nginx.max(1.0)
    }
}

/// Each phase's rates, in phase order (phases without a pair left out).
pub(super) fn by_phase(pairs: &[Pair]) -> Vec<(usize, Rates)> {
    let mut phases: Vec<usize> = pairs.iter().map(|p| p.phase).collect();
    phases.sort_unstable();
    phases.dedup();
    phases
        .into_iter()
        .map(|ph| (ph, Rates::of(pairs.iter().filter(|p| p.phase == ph))))
        .collect()
}

/// The server's CPU seconds answering wrk's polls, estimated: its CPU in the tern slices
/// less what it used in the nginx slices (the rollout's own work), scaled to the same time.
pub(super) fn wrk_poll_cpu(pairs: &[Pair]) -> f64 {
    let secs = |f: &Figures| f.requests as f64 / f.rate.max(1.0);
    let (tern_secs, nginx_secs): (f64, f64) = pairs
        .iter()
        .map(|p| (secs(&p.tern), secs(&p.nginx)))
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (in_tern, in_nginx): (f64, f64) = pairs
        .iter()
        .map(|p| p.server_cpu)
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    (in_tern - in_nginx * tern_secs / nginx_secs.max(1e-9)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(requests: u64, rate: f64, p99_ms: f64) -> Figures {
        Figures {
            requests,
            rate,
            p50_ms: 0.0,
            p99_ms,
            max_ms: 0.0,
            errors: 0,
            error_messages: Default::default(),
            cpu: Default::default(),
        }
    }

    #[test]
    fn rates_are_requests_over_seconds_per_phase() {
        let pairs = vec![
            Pair {
                phase: 1,
                tern: figures(40_000, 40_000.0, 3.0),
                nginx: figures(50_000, 50_000.0, 2.0),
                server_cpu: (1.5, 0.5),
            },
            Pair {
                phase: 2,
                tern: figures(30_000, 30_000.0, 5.0),
                nginx: figures(60_000, 60_000.0, 1.0),
                server_cpu: (1.5, 0.5),
            },
            Pair {
                phase: 2,
                tern: figures(60_000, 60_000.0, 4.0),
                nginx: figures(60_000, 60_000.0, 1.5),
                server_cpu: (1.5, 0.5),
            },
        ];
        let phases = by_phase(&pairs);
        assert_eq!(phases.len(), 2);
        assert_eq!((phases[0].0, phases[0].1.pairs), (1, 1));
        assert!((phases[0].1.ratio() - 0.8).abs() < 1e-9);
        // Phase 2: 90,000 requests in 2 s against 120,000 in 2 s.
        assert!((phases[1].1.tern - 45_000.0).abs() < 1e-6);
        assert!((phases[1].1.ratio() - 0.75).abs() < 1e-9);
        assert_eq!(phases[1].1.tern_p99_ms, 5.0);
        // 4.5 s in tern slices, less 1.5 s in nginx slices over the same 3 s.
        assert!((wrk_poll_cpu(&pairs) - 3.0).abs() < 1e-9);
    }
}
