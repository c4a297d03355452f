//! The report: text for people, or one JSON document.

use std::time::Duration;

use super::breakdown::Breakdown;
use super::load::{Figures, Sessions};
use super::nginx::Reference;
use super::{GOAL_P99_MS, GOAL_RATIO, NOTHING_NEW, STATIC_BYTES, WARMUP};

pub(super) struct Report {
    pub(super) cpus: usize,
    pub(super) devices: usize,
    pub(super) registration: Duration,
    pub(super) backend: &'static str,
    pub(super) database: String,
    pub(super) pool_size: u32,
    pub(super) write_pool_size: u32,
    pub(super) concurrency: usize,
    pub(super) duration: Duration,
    pub(super) server_threads: usize,
    pub(super) wrk_server_threads: usize,
    pub(super) client_threads: usize,
    pub(super) session_ttl_secs: u64,
    /// The server's default lifetime was shorter than this run.
    pub(super) session_ttl_raised: bool,
    pub(super) sessions: Sessions,
    /// The steady state measured by wrk (absent with `--no-reference`).
    pub(super) poll_wrk: Option<Figures>,
    /// The steady state measured by this command's generator.
    pub(super) poll_ours: Figures,
    /// Signed check-ins (the order path) measured by this command's generator.
    pub(super) checkin_ours: Figures,
    pub(super) wrk_threads: Option<usize>,
    pub(super) nginx: Option<Reference>,
    pub(super) breakdown: Option<Breakdown>,
}

impl Report {
    /// The row the goals are checked on: the poll as wrk measures it, else as the generator does.
    pub(super) fn primary(&self) -> (&'static str, &Figures) {
        match &self.poll_wrk {
            Some(f) => ("tern_poll_wrk", f),
            None => ("tern_poll_generator", &self.poll_ours),
        }
    }

    /// tern's poll over nginx, both measured by wrk with the same kind of script.
    pub(super) fn ratio(&self) -> Option<f64> {
        let poll = self.poll_wrk.as_ref()?;
        self.nginx
            .as_ref()
            .filter(|r| r.wrk.rate > 0.0)
            .map(|r| poll.rate / r.wrk.rate)
    }

    /// The same against wrk without a script.
    pub(super) fn ratio_plain(&self) -> Option<f64> {
        let poll = self.poll_wrk.as_ref()?;
        self.nginx
            .as_ref()
            .filter(|r| r.wrk_plain.rate > 0.0)
            .map(|r| poll.rate / r.wrk_plain.rate)
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        let ratio = self.ratio();
        let (primary, p) = self.primary();
        let s = &self.sessions;
        serde_json::json!({
            "cpus": self.cpus,
            "devices": self.devices,
            "registration_seconds": self.registration.as_secs_f64(),
            "backend": self.backend,
            "database": self.database,
            "db_pool_size": self.pool_size,
            "db_write_pool_size": self.write_pool_size,
            "concurrency": self.concurrency,
            "warmup_seconds": WARMUP.as_secs_f64(),
            "duration_seconds": self.duration.as_secs_f64(),
            "threads": {
                "server_request_workers": tern_server::lanes::workers(),
                "server_checkin_workers": tern_server::lanes::workers(),
                "server_runtime_workers_with_generator": self.server_threads,
                "server_runtime_workers_with_wrk": self.poll_wrk.as_ref().map(|_| self.wrk_server_threads),
                "load_generator_workers": self.client_threads,
                "nginx_workers": self.nginx.as_ref().map(|r| r.nginx_workers),
                "wrk_threads": self.wrk_threads,
            },
            "sessions": {
                "signed_checkins": s.count,
                "seconds": s.elapsed.as_secs_f64(),
                "per_second": s.figures.rate,
                "p50_ms": s.figures.p50_ms,
                "p99_ms": s.figures.p99_ms,
                "max_ms": s.figures.max_ms,
                "session_ttl_seconds": self.session_ttl_secs,
                "session_ttl_raised_for_this_run": self.session_ttl_raised,
            },
            "tern_poll_wrk": self.poll_wrk.as_ref().map(Figures::to_json),
            "tern_poll_generator": self.poll_ours.to_json(),
            "tern_signed_checkin_generator": self.checkin_ours.to_json(),
            "nginx_wrk": self.nginx.as_ref().map(|r| r.wrk.to_json()),
            "nginx_wrk_no_script": self.nginx.as_ref().map(|r| r.wrk_plain.to_json()),
            "nginx_tern_generator": self.nginx.as_ref().map(|r| r.ours.to_json()),
            "ratio_to_nginx_wrk": ratio,
            "ratio_to_nginx_wrk_no_script": self.ratio_plain(),
            "goals": {
                "measured_on": primary,
                "min_ratio_to_nginx": GOAL_RATIO,
                "max_p99_ms": GOAL_P99_MS,
                "ratio_met": ratio.map(|r| r >= GOAL_RATIO),
                "p99_met": p.p99_ms <= GOAL_P99_MS,
            },
            "breakdown": self.breakdown.as_ref().map(|b| serde_json::json!({
                "sign_checkin_us": b.sign_us,
                "parse_checkin_us": b.parse_us,
                "load_stored_key_us": b.key_us,
                "verify_checkin_us": b.verify_us,
                "fsync_4k_median_us": b.fsync_us,
                "fsync_dir": b.fsync_dir,
                "tern_healthz": b.healthz.to_json(),
                "tern_one_select": b.one_select.to_json(),
            })),
        })
    }

    /// The table's rows, in order: (label, CPU label, figures).
    pub(super) fn rows(&self) -> Vec<(String, &'static str, &Figures)> {
        let mut rows = Vec::new();
        if let Some(f) = &self.poll_wrk {
            rows.push((
                format!("tern poll, nothing new ({}), wrk", self.backend),
                "tern poll, wrk",
                f,
            ));
        }
        rows.push((
            format!("tern poll, nothing new ({}), generator", self.backend),
            "tern poll, generator",
            &self.poll_ours,
        ));
        rows.push((
            "tern signed check-in (order path), gen.".to_owned(),
            "tern signed check-in, generator",
            &self.checkin_ours,
        ));
        if let Some(b) = &self.breakdown {
            rows.push((
                "tern GET /healthz (no db, no crypto), gen.".to_owned(),
                "tern GET /healthz",
                &b.healthz,
            ));
            rows.push((
                "tern GET, one indexed SELECT (404), gen.".to_owned(),
                "tern GET, one SELECT",
                &b.one_select,
            ));
        }
        if let Some(r) = &self.nginx {
            rows.push(("nginx 4 KiB file, wrk".to_owned(), "nginx, wrk", &r.wrk));
            rows.push((
                "nginx 4 KiB file, wrk without script".to_owned(),
                "nginx, wrk without script",
                &r.wrk_plain,
            ));
            rows.push(("nginx 4 KiB file, generator".to_owned(), "nginx, generator", &r.ours));
        }
        rows
    }

    pub(super) fn print(&self) {
        println!(
            "devices             {} registered in {:.2} s ({}; {})",
            self.devices,
            self.registration.as_secs_f64(),
            self.backend,
            self.database
        );
        let s = &self.sessions;
        println!(
            "sessions            {} signed check-ins at once, one per simulated device: {:.3} s ({:.0}/s), \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; tokens valid {} s{}",
            s.count,
            s.elapsed.as_secs_f64(),
            s.figures.rate,
            s.figures.p50_ms,
            s.figures.p99_ms,
            s.figures.max_ms,
            self.session_ttl_secs,
            if self.session_ttl_raised {
                " (raised from the server's default to outlast this run)"
            } else {
                ""
            }
        );
        println!(
            "load                {} concurrent keep-alive connections, {} s warm-up + {} s measured each",
            self.concurrency,
            WARMUP.as_secs(),
            self.duration.as_secs()
        );
        // On PostgreSQL the server reads and writes through one pool.
        let pools = if self.backend == "SQLite" {
            format!("db read pool {}, write pool {}", self.pool_size, self.write_pool_size)
        } else {
            format!("db pool {}", self.pool_size)
        };
        println!("threads             {} CPUs; {pools}", self.cpus);
        println!(
            "  tern server         {} request workers and {} check-in workers (one each per CPU)",
            tern_server::lanes::workers(),
            tern_server::lanes::workers()
        );
        println!(
            "  with the generator  tern server main runtime {} worker(s), load generator (in-process) {} worker(s)",
            self.server_threads, self.client_threads
        );
        if let (Some(_), Some(t)) = (&self.poll_wrk, self.wrk_threads) {
            println!(
                "  with wrk            tern server main runtime {} worker(s) (restarted on the same database), wrk {t} \
                 threads (a separate process) on the same {} CPUs",
                self.wrk_server_threads, self.cpus
            );
        }
        if let (Some(r), Some(t)) = (&self.nginx, self.wrk_threads) {
            println!(
                "  nginx               {} workers; wrk {t} threads; the generator {} worker(s)",
                r.nginx_workers, self.client_threads
            );
        }
        if self.poll_wrk.is_some() {
            println!(
                "wrk script          each thread polls as its share of the devices in turn, and checks every \
                 answer (200, {NOTHING_NEW}); nginx's \"wrk\" row runs the same kind of script (200, {STATIC_BYTES} bytes)"
            );
        }
        println!();
        println!(
            "{:<46} {:>10} {:>9} {:>9} {:>9} {:>7}",
            "", "req/s", "p50 ms", "p99 ms", "max ms", "errors"
        );
        let rows = self.rows();
        for (label, _, f) in &rows {
            println!(
                "{:<46} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                label, f.rate, f.p50_ms, f.p99_ms, f.max_ms, f.errors
            );
        }
        println!();
        let met = |ok: bool| if ok { "met" } else { "NOT MET" };
        let (primary, p) = self.primary();
        let on = if primary == "tern_poll_wrk" { "wrk" } else { "generator" };
        match self.ratio() {
            Some(ratio) => {
                println!(
                    "tern poll / nginx, both via wrk (same kind of script)  {ratio:.3}x   goal >= {GOAL_RATIO}x: {}",
                    met(ratio >= GOAL_RATIO)
                );
                if let Some(plain) = self.ratio_plain() {
                    println!("tern poll / nginx via wrk without script            {plain:.3}x");
                }
            }
            None => println!("tern poll / nginx  not measured (--no-reference)"),
        }
        println!(
            "tern poll p99 ({on})  {:.2} ms   goal <= {GOAL_P99_MS} ms: {}",
            p.p99_ms,
            met(p.p99_ms <= GOAL_P99_MS)
        );
        println!();
        println!("CPU in the measured window, % of one core:");
        for (_, label, f) in &rows {
            let parts: Vec<String> = f.cpu.iter().map(|(k, v)| format!("{k} {v:.0}%")).collect();
            let per_req = if f.rate > 0.0 {
                format!(
                    "  ({:.0} us CPU per request)",
                    f.cpu.values().sum::<f64>() / 100.0 / f.rate * 1e6
                )
            } else {
                String::new()
            };
            println!("  {label:<34} {}{per_req}", parts.join(", "));
        }
        if let Some(b) = &self.breakdown {
            println!();
            println!("breakdown (one thread, no contention):");
            println!("  sign a check-in (device side)      {:>8.1} us", b.sign_us);
            println!("  parse the check-in (server)        {:>8.1} us", b.parse_us);
            println!("  load the stored key (server, once) {:>8.1} us", b.key_us);
            println!("  verify the signature (server)      {:>8.1} us", b.verify_us);
            println!(
                "  4 KiB write + fdatasync            {:>8.1} us  (median, in {})",
                b.fsync_us,
                b.fsync_dir.display()
            );
        }
        for (_, label, f) in &rows {
            for (m, n) in f.error_messages.iter().take(10) {
                println!("error ({label}): {n} x {m}");
            }
        }
    }
}
