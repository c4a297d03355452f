//! `tern-bench soak`: a fleet of simulated devices against `tern server run` on PostgreSQL
//! for minutes, with the database restarted under it.
//!
//! What runs:
//! 1. A private PostgreSQL cluster (initdb into a temporary directory, a free loopback port,
//!    as the `postgres` user when run as root).
//! 2. With the `tern` binary, as an operator and a release engineer would: `server init`, a
//!    repository whose root lists the server's snapshot and timestamp keys, `server run` as
//!    a separate process (its memory and CPU are its own), an admin token, `release
//!    set-root`, and one 64 KiB release (`repo add-target`, `bundle create`, `release
//!    upload`).
//! 3. `--devices` devices with their own Ed25519 keys, registered approved and tagged `soak`
//!    through the server's bulk path (`Db::register_devices`), and one deployment of the
//!    release to the tag (`POST /api/v1/deployments`).
//! 4. The load: every device is a task on `--client-threads` runtime workers. Device `n` of
//!    `N` starts at `n/N` of the first poll interval with a signed check-in (its challenge
//!    fetched first), then polls with its session token every `--poll-secs` and sends a
//!    signed check-in every `--checkin-secs` (at `n/N` of that interval), each reporting the
//!    deployment as `downloading` with a progress counter one higher than the last. A 409
//!    `StaleChallenge` makes it fetch its challenge and send again; a failed check-in is
//!    sent again one poll interval later. The devices share a few HTTP clients, each with
//!    its own connection pool bound to its own loopback address (127.0.1.X), so that the
//!    server's per-address connection limit sees a fleet, not one host.
//! 5. `--restarts` times, evenly spaced, the database is stopped at once (SIGQUIT to the
//!    postmaster), left down for 5 s and started again on the same port.
//! 6. Every 10 s, the server process's VmRSS and CPU time from /proc.
//! 7. At the end: the server's view of the deployment (`GET /api/v1/deployments/ID`).
//!
//! The checks: (1) no device's highest acknowledged progress (HTTP 200 to the check-in that
//! carried it) is above the server's `progress_done` for it; (2) no request fails outside
//! the outages, an outage lasting from SIGQUIT to its recovery point: the first check-in
//! accepted after the database is back, plus 10 s. A request overlapping an outage is
//! counted in it. (3) The server's RSS after warm-up (the first minute), its maximum, the
//! final one and the growth, flagged above 20 MiB; its CPU seconds. (4) Rates and p50/p99 of
//! polls and check-ins. The command fails if (1) or (2) does.

mod device;
pub(crate) mod setup;
mod verdict;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use self::device::{Journal, Load};
use self::verdict::{Inputs, Restart, Sample, Verdict};
use crate::fixture::work_dir;
use crate::output::{json, Format};
use crate::pg::PrivatePostgres;

/// How long the database stays down at each restart.
const DOWN: Duration = Duration::from_secs(5);
/// How often the server process is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Devices per HTTP client (each client its own pool and source address).
const DEVICES_PER_CLIENT: usize = 250;
/// A request's timeout: the server's own request timeout is 30 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `tern-bench soak`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated devices.
    #[arg(long, default_value_t = 10_000)]
    pub devices: usize,
    /// Minutes of load.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Database restarts, evenly spaced over the load.
    #[arg(long, default_value_t = 2)]
    pub restarts: u32,
    /// Each device's poll interval, in seconds.
    #[arg(long, default_value_t = 10)]
    pub poll_secs: u64,
    /// Each device's signed check-in interval, in seconds.
    #[arg(long, default_value_t = 60)]
    pub checkin_secs: u64,
    /// Worker threads of the simulated devices' runtime.
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Work directory, kept (default: a temporary one, removed afterwards); the server's
    /// log is `server.log` in it.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// Run the soak test.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.devices == 0 || a.minutes == 0 || a.poll_secs == 0 || a.checkin_secs == 0 || a.client_threads == 0 {
        bail!("--devices, --minutes, --poll-secs, --checkin-secs and --client-threads must be at least 1");
    }
    let exe = crate::product::tern()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let loadavg_before = loadavg();
    let (dir, _temp) = work_dir(a.dir.as_ref(), "tern-bench-soak-")?;
    let pg = PrivatePostgres::start()?;
    let pg_version = pg.full_version();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads)
        .thread_name("tern-bench-soak")
        .enable_all()
        .build()?;

    eprintln!("publishing a release with {}", exe.display());
    let mut fleet = setup::publish(&exe, &dir, &pg.url(), &[])?;
    eprintln!("generating {} device keys", a.devices);
    let devices = Arc::new(setup::device_keys(a.devices)?);
    let registration = rt.block_on(setup::register(&pg.url(), &devices))?;
    eprintln!(
        "registered {} devices in {:.2} s",
        a.devices,
        registration.as_secs_f64()
    );
    let admin = reqwest::Client::builder().no_proxy().build()?;
    let (deployment, deploy_took) = rt.block_on(setup::deploy(&admin, &fleet))?;
    eprintln!(
        "deployment {deployment} of release {} to tag {} created in {:.2} s",
        fleet.release,
        setup::TAG,
        deploy_took.as_secs_f64()
    );

    let load_time = Duration::from_secs(a.minutes * 60);
    let t0 = Instant::now() + Duration::from_millis(500);
    let load = Arc::new(Load {
        base: fleet.server.url.clone(),
        deployment: deployment.clone(),
        clients: clients(a.devices)?,
        devices: devices.clone(),
        t0,
        until: t0 + load_time,
        poll: Duration::from_secs(a.poll_secs),
        checkin: Duration::from_secs(a.checkin_secs),
        acked: (0..a.devices).map(|_| AtomicU64::new(0)).collect(),
        journal: Journal::new(64),
    });
    eprintln!(
        "soak: {} devices for {} min, polls every {} s, signed check-ins every {} s, {} database restarts",
        a.devices, a.minutes, a.poll_secs, a.checkin_secs, a.restarts
    );
    let server_pid = fleet.server.pid();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let (restarts, restart_error) = std::thread::scope(|scope| {
        let restarter = scope.spawn(|| restart_database(&pg, t0, load_time, a.restarts));
        rt.block_on(async {
            let sampler = tokio::spawn(sample(server_pid, t0, load_time, samples.clone()));
            let mut tasks = tokio::task::JoinSet::new();
            for n in 0..a.devices {
                tasks.spawn(device::run(load.clone(), n));
            }
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done {
                    eprintln!("a device task failed: {e}");
                }
            }
            let _ = sampler.await;
        });
        let (restarts, error) = restarter
            .join()
            .unwrap_or_else(|_| (Vec::new(), Some("the restart thread panicked".into())));
        (restarts, error)
    });
    let server_alive = fleet.server.running();
    let loadavg_after = loadavg();
    eprintln!("load done; reading deployment {deployment} from the server");
    let server_view = rt.block_on(setup::progress(&admin, &fleet, &deployment))?;

    let load = Arc::try_unwrap(load).map_err(|_| anyhow::anyhow!("a device task outlived the load"))?;
    let acked: Vec<(&str, u64)> = devices
        .iter()
        .zip(&load.acked)
        .map(|(d, a)| (d.id.as_str(), a.load(Ordering::Relaxed)))
        .collect();
    let samples = std::mem::take(&mut *samples.lock().map_err(|_| anyhow::anyhow!("sampler lock"))?);
    let verdict = Verdict::of(Inputs {
        load: load_time,
        restarts,
        restart_error,
        journal: load.journal.take(),
        acked,
        server: server_view,
        samples,
        server_alive,
    });
    let log = server_log_summary(&fleet.server.log);
    let header = Header {
        cpus,
        loadavg: (loadavg_before, loadavg_after),
        pg_version: &pg_version,
        devices: a.devices,
        minutes: a.minutes,
        restarts: a.restarts,
        poll_secs: a.poll_secs,
        checkin_secs: a.checkin_secs,
        client_threads: a.client_threads,
        clients: a.devices.div_ceil(DEVICES_PER_CLIENT),
        registration,
        deployment: &deployment,
        deploy_took,
        release: &fleet.release,
    };
    match a.output {
        Format::Json => {
            let mut v = verdict.to_json();
            v["setup"] = header.to_json();
            v["server_log"] = serde_json::json!({"lines": log.0, "kinds": log.1});
            json(&v)?;
        }
        Format::Text => {
            header.print();
            verdict.print();
            println!("server log: {} lines", log.0);
            for (kind, n) in &log.1 {
                println!("  {n} x {kind}");
            }
        }
    }
    drop(fleet);
    let failures = verdict.failures();
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}

/// One HTTP client per [`DEVICES_PER_CLIENT`] devices, the `k`th bound to 127.0.1.`k`
/// (every 127/8 address is this machine's): its own pool, idle connections dropped before
/// the server's 60 s idle timeout would close them under a request.
pub(crate) fn clients(devices: usize) -> anyhow::Result<Vec<reqwest::Client>> {
    (0..devices.div_ceil(DEVICES_PER_CLIENT))
        .map(|k| {
            let addr = Ipv4Addr::new(127, 0, 1 + (k / 250) as u8, 1 + (k % 250) as u8);
            Ok(reqwest::Client::builder()
                .no_proxy()
                .timeout(REQUEST_TIMEOUT)
                .pool_idle_timeout(Duration::from_secs(30))
                .local_address(IpAddr::V4(addr))
                .build()?)
        })
        .collect()
}

/// The restarts, evenly spaced over the load: SIGQUIT, [`DOWN`], start again on the same
/// port. Returns their times and the first error.
fn restart_database(pg: &PrivatePostgres, t0: Instant, load: Duration, count: u32) -> (Vec<Restart>, Option<String>) {
    let ms = |t: Instant| t.saturating_duration_since(t0).as_millis() as u32;
    let mut done = Vec::new();
    for k in 1..=count {
        let at = t0 + load.mul_f64(f64::from(k) / f64::from(count + 1));
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let down = Instant::now();
        eprintln!(
            "restart {k}: SIGQUIT to the postmaster at {:.1} s",
            f64::from(ms(down)) / 1e3
        );
        let outcome = pg.kill_now().and_then(|()| {
            std::thread::sleep(DOWN);
            pg.start_again()
        });
        let back = Instant::now();
        if let Err(e) = outcome {
            let log = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return (
                done,
                Some(format!(
                    "restart {k}: {e:#}; PostgreSQL's log ends: {}",
                    tail.join(" | ")
                )),
            );
        }
        eprintln!(
            "restart {k}: accepting connections at {:.1} s",
            f64::from(ms(back)) / 1e3
        );
        done.push(Restart {
            down_ms: ms(down),
            back_ms: ms(back),
        });
    }
    (done, None)
}

/// Sample the server process every [`SAMPLE_EVERY`] from the start of the load to its end.
async fn sample(pid: u32, t0: Instant, load: Duration, into: Arc<Mutex<Vec<Sample>>>) {
    let mut k = 0u32;
    loop {
        let at = t0 + SAMPLE_EVERY * k;
        if at > t0 + load {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        if let (Some(rss), Some(cpu)) = (crate::procfs::vm_rss(pid), crate::procfs::process_cpu(pid)) {
            if let Ok(mut v) = into.lock() {
                v.push(Sample {
                    t_ms: (SAMPLE_EVERY * k).as_millis() as u32,
                    rss,
                    cpu,
                    threads: crate::procfs::threads(pid).unwrap_or(0),
                });
            }
        }
        k += 1;
    }
}

/// The 1-minute load average (`/proc/loadavg`).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Lines of the server's log, and how many of each kind (the text before the first digit
/// or hex id, so that `internal error 1a2b3c: …` lines group).
fn server_log_summary(path: &std::path::Path) -> (usize, std::collections::BTreeMap<String, u64>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut kinds = std::collections::BTreeMap::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        *kinds.entry(log_kind(line)).or_insert(0) += 1;
    }
    (lines, kinds)
}

/// A log line with its ids and numbers (runs of letters and digits holding a digit, three
/// or more long) replaced by `…`, shortened.
fn log_kind(line: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 3 && run.chars().any(|c| c.is_ascii_digit()) {
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in line.chars() {
        if c.is_ascii_alphanumeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    tern_core::text::shown_max(&out, 200)
}

/// The run's settings and setup, printed before the checks.
struct Header<'a> {
    cpus: usize,
    /// The 1-minute load average before and after the load: other work on the machine.
    loadavg: (String, String),
    pg_version: &'a str,
    devices: usize,
    minutes: u64,
    restarts: u32,
    poll_secs: u64,
    checkin_secs: u64,
    client_threads: usize,
    clients: usize,
    registration: Duration,
    deployment: &'a str,
    deploy_took: Duration,
    release: &'a str,
}

impl Header<'_> {
    fn print(&self) {
        println!(
            "soak                {} devices, {} min, {} database restarts (SIGQUIT, {} s down), polls every {} s, \
             signed check-ins every {} s",
            self.devices,
            self.minutes,
            self.restarts,
            DOWN.as_secs(),
            self.poll_secs,
            self.checkin_secs
        );
        println!(
            "machine             {} cores; load average (1 min) {} before the soak, {} at the end of the load",
            self.cpus, self.loadavg.0, self.loadavg.1
        );
        println!(
            "database            {} (private cluster, default settings)",
            self.pg_version
        );
        println!(
            "server              `tern server run` as its own process, default settings; devices on {} runtime \
             worker(s) in this process, {} HTTP clients",
            self.client_threads, self.clients
        );
        println!(
            "setup               {} devices registered in {:.2} s; deployment {} of release {} to tag {} created in \
             {:.2} s",
            self.devices,
            self.registration.as_secs_f64(),
            self.deployment,
            self.release,
            setup::TAG,
            self.deploy_took.as_secs_f64()
        );
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cpus": self.cpus,
            "loadavg_1min": [self.loadavg.0, self.loadavg.1],
            "postgresql": self.pg_version,
            "devices": self.devices,
            "minutes": self.minutes,
            "restarts": self.restarts,
            "down_seconds": DOWN.as_secs(),
            "poll_secs": self.poll_secs,
            "checkin_secs": self.checkin_secs,
            "client_threads": self.client_threads,
            "http_clients": self.clients,
            "registration_seconds": self.registration.as_secs_f64(),
            "deployment": self.deployment,
            "release": self.release,
            "deployment_create_seconds": self.deploy_took.as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_group_without_their_ids() {
        assert_eq!(
            log_kind("tern server: internal error 1a2b3c4d5e6f: error communicating with database: Connection refused (os error 111)"),
            "tern server: internal error …: error communicating with database: Connection refused (os error …)"
        );
    }
}
