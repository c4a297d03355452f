//! `tern bench server`: device check-ins per second against an in-process `tern server`,
//! printed beside `wrk` against nginx serving a 4 KiB static file, measured in the same run.
//!
//! What runs:
//! 1. A fresh database (SQLite in a temporary directory, a private PostgreSQL cluster with
//!    `--postgres`, or `--database-url`) gets the server's migrations, then `--devices`
//!    approved devices through the server's bulk path (`Db::register_devices`: 500-row
//!    INSERTs, several per transaction, on the server's write pool). The `--concurrency`
//!    active devices have their own Ed25519 keys; the others share one public key, which
//!    the server never reads.
//! 2. The server starts in-process on 127.0.0.1:0. Each active device is one task that signs
//!    a fresh check-in (new random nonce, current time: the server refuses replays) and
//!    POSTs it over a shared keep-alive client, in a loop: 1 s of warm-up, then
//!    `--duration-secs` measured. Every request's latency is kept (signing is not part of
//!    it); non-200 answers are errors and are printed. On the server a check-in is one
//!    signature check against the device's key (cached in memory after its first check-in),
//!    one UPDATE on the write pool (status check, replay guard and heartbeat together) and
//!    one SELECT for a pending deployment on the read pool. On SQLite the write pool is a
//!    single connection that the process's writers queue for.
//! 3. The reference: nginx (`worker_processes auto`) serves a 4096-byte file, measured by
//!    `wrk --latency` with the same connection count and duration (after a 1 s warm-up
//!    run), then by this command's own load generator, so that the generator's ceiling is
//!    visible beside wrk's.
//!
//! Threads. On a small machine the server, the load generator, the database and the
//! reference tools all compete for the same cores. The load generator and the server run
//! on two separate tokio runtimes so that neither's tasks can run on the other's workers:
//! the generator gets `--client-threads` workers (default 1: it mostly signs and waits) and
//! the server gets `--server-threads` (default: the remaining CPUs, at least 1). SQLite
//! work runs on sqlx's own per-connection threads and PostgreSQL in its own processes, so
//! the report gives the CPU each group used during the measured window (percent of one
//! core), for the tern run and for the nginx runs alike (nginx runs one worker per CPU,
//! wrk 2 threads).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_core::director::{self, CheckIn, SlotReport};
use tern_core::{DateTime, KeyAlgorithm, PublicKey, SigningKey};

use crate::output::{json, Format};

/// Warm-up before every measured window.
const WARMUP: Duration = Duration::from_secs(1);
/// The reference's static file.
const STATIC_NAME: &str = "4k.bin";
const STATIC_BYTES: usize = 4096;
/// The goals: at least this fraction of nginx's rate, p99 at most this.
const GOAL_RATIO: f64 = 0.5;
const GOAL_P99_MS: f64 = 50.0;
/// Thread names, by which the CPU report groups this process's threads.
const SERVER_THREAD: &str = "tern-bench-srv";
const CLIENT_THREAD: &str = "tern-bench-cli";

/// `tern bench server`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Devices registered (approved) before the load starts.
    #[arg(long, default_value_t = 100_000)]
    pub devices: usize,
    /// Simulated devices checking in at once, each a task looping check-ins; also wrk's
    /// connection count.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds of each load (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// `postgres://…` or `sqlite://…` (default: SQLite in a temporary directory). The
    /// benchmark's devices (`bench-NNNNNN`) are written into it.
    #[arg(long, conflicts_with = "postgres")]
    pub database_url: Option<String>,
    /// Start a private PostgreSQL cluster (initdb in a temporary directory, a free loopback
    /// port, default settings) and use it; it is stopped at the end.
    #[arg(long)]
    pub postgres: bool,
    /// Skip the nginx/wrk reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Worker threads of the server's runtime (default: the CPUs left by the client, at least 1).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// The server's database pool size (default: the server's own default).
    #[arg(long)]
    pub max_db_connections: Option<u32>,
    /// Also measure where a check-in's time goes: signing, parsing and verifying alone, the
    /// disk's fsync latency, and under the same load the server's HTTP stack alone
    /// (GET /healthz) and HTTP plus one indexed SELECT (GET of absent repository metadata).
    #[arg(long)]
    pub breakdown: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// Run the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.devices == 0 || a.concurrency == 0 || a.duration_secs == 0 || a.client_threads == 0 {
        bail!("--devices, --concurrency, --duration-secs and --client-threads must be at least 1");
    }
    if a.concurrency > a.devices {
        bail!(
            "--concurrency {} exceeds --devices {}: each simulated device is a registered one",
            a.concurrency,
            a.devices
        );
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let server_threads = a
        .server_threads
        .unwrap_or_else(|| cpus.saturating_sub(a.client_threads).max(1))
        .max(1);
    let duration = Duration::from_secs(a.duration_secs);
    // Every tool is looked for before minutes of work, so that a missing one fails first.
    let reference = if a.no_reference {
        None
    } else {
        let found = require_tools(&[
            Tool::new("nginx", &["/usr/sbin/nginx", "nginx"], "nginx"),
            Tool::new("wrk", &["wrk"], "wrk"),
        ])?;
        Some((found[0].clone(), found[1].clone()))
    };

    let temp = tempfile::Builder::new().prefix("tern-bench-server-").tempdir()?;
    let pg = if a.postgres {
        Some(PrivatePostgres::start()?)
    } else {
        None
    };
    let database_url = match (&pg, &a.database_url) {
        (Some(pg), _) => Some(pg.url()),
        (None, Some(u)) => Some(u.clone()),
        (None, None) => None,
    };
    let mut cfg = tern_server::ServerConfig::for_data_dir(&temp.path().join("server"));
    cfg.listen = "127.0.0.1:0".into();
    cfg.database_url = database_url;
    if let Some(n) = a.max_db_connections {
        cfg.max_db_connections = n;
    }
    // Where the SQLite file lives, for the breakdown's fsync measurement.
    let fsync_dir = sqlite_dir(&cfg.database_url()).unwrap_or_else(|| temp.path().to_owned());
    let database = match (&pg, &a.database_url) {
        (Some(pg), _) => format!("private PostgreSQL {} cluster, default settings", pg.version),
        (None, Some(_)) => "--database-url".to_owned(),
        (None, None) => "SQLite in a temporary directory".to_owned(),
    };

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()?;

    tern_server::keys::init(&cfg.key_dir(), crate::output::now(), 1)?;
    let state = server_rt
        .block_on(tern_server::open(cfg.clone()))
        .context("opening the server's database")?;
    let backend = match state.db.backend {
        tern_server::db::Backend::Sqlite => "SQLite",
        tern_server::db::Backend::Postgres => "PostgreSQL",
    };
    // The pools in effect (the server caps SQLite's read pool and gives it one writer; on
    // PostgreSQL both are one pool).
    let pool_size = state.db.pool.options().get_max_connections();
    let write_pool_size = state.db.write.options().get_max_connections();

    let sims = SimDevices::generate(a.devices, a.concurrency)?;
    eprintln!("registering {} devices ({backend})", a.devices);
    let t = Instant::now();
    server_rt
        .block_on(state.db.register_devices(&sims.registrations()))
        .context("registering the devices")?;
    let registration = t.elapsed();
    eprintln!(
        "registered {} devices in {:.2} s",
        a.devices,
        registration.as_secs_f64()
    );

    let running = server_rt.block_on(tern_server::start(state))?;
    let base = format!("http://{}", running.addr);
    let client = client_rt.block_on(async { http_client() })?;
    client_rt.block_on(sanity_checkin(&client, &base, &sims.active[0]))?;

    let probe = Probe {
        this_process: true,
        postmaster: pg.as_ref().and_then(PrivatePostgres::postmaster_pid),
        nginx: None,
    };
    eprintln!(
        "tern check-in: {} simulated devices, {} s warm-up + {} s measured",
        a.concurrency,
        WARMUP.as_secs(),
        a.duration_secs
    );
    let tern = load_run(
        &client_rt,
        &client,
        a.concurrency,
        duration,
        checkin_requests(&base, sims.active.clone()),
        Expect::OK,
        &probe,
    )?;
    let breakdown = if a.breakdown {
        eprintln!("breakdown: signing, verifying, fsync; GET /healthz and a one-SELECT GET under the same load");
        Some(measure_breakdown(
            &client_rt, &client, &sims, &base, &a, &probe, fsync_dir,
        )?)
    } else {
        None
    };
    drop(client);
    running.task.abort();
    server_rt.shutdown_timeout(Duration::from_secs(2));
    drop(pg);

    let nginx = match reference {
        None => None,
        Some((nginx_bin, wrk_bin)) => Some(run_reference(
            &nginx_bin,
            &wrk_bin,
            &client_rt,
            a.concurrency,
            duration,
            cpus,
        )?),
    };

    let report = Report {
        cpus,
        devices: a.devices,
        registration,
        backend,
        database,
        pool_size,
        write_pool_size,
        concurrency: a.concurrency,
        duration,
        server_threads,
        client_threads: a.client_threads,
        tern,
        nginx,
        breakdown,
    };
    match a.output {
        Format::Json => json(&report.to_json()),
        Format::Text => {
            report.print();
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Simulated devices and their registration

/// One simulated device that checks in.
struct SimDevice {
    id: String,
    key: SigningKey,
}

struct SimDevices {
    count: usize,
    /// The devices that check in, spread over the id range.
    active: Arc<Vec<SimDevice>>,
    /// Their indices in the id range.
    active_at: BTreeMap<usize, usize>,
    /// The key every other device is registered with.
    shared: PublicKey,
}

fn device_id(i: usize) -> String {
    format!("bench-{i:06}")
}

impl SimDevices {
    fn generate(count: usize, active: usize) -> anyhow::Result<Self> {
        let mut devices = Vec::with_capacity(active);
        let mut active_at = BTreeMap::new();
        for n in 0..active {
            let i = n * count / active;
            active_at.insert(i, n);
            devices.push(SimDevice {
                id: device_id(i),
                key: SigningKey::generate(KeyAlgorithm::Ed25519)?.0,
            });
        }
        let shared = SigningKey::generate(KeyAlgorithm::Ed25519)?.0.public().clone();
        Ok(SimDevices {
            count,
            active: Arc::new(devices),
            active_at,
            shared,
        })
    }

    /// Every device, approved. The active devices come with their own keys, the others with
    /// the shared one; re-registering (a reused `--database-url`) replaces the keys, which
    /// clears the server's replay guard for them.
    fn registrations(&self) -> Vec<tern_server::db::NewDevice> {
        let shared = (self.shared.to_value().clone(), self.shared.keyid().as_str().to_owned());
        (0..self.count)
            .map(|i| {
                let (public_key, keyid) = match self.active_at.get(&i) {
                    Some(&n) => {
                        let public = self.active[n].key.public();
                        (public.to_value().clone(), public.keyid().as_str().to_owned())
                    }
                    None => shared.clone(),
                };
                tern_server::db::NewDevice {
                    id: device_id(i),
                    public_key,
                    keyid,
                    device_type: "tern-sim".into(),
                    hardware: "bench".into(),
                    tags: Vec::new(),
                }
            })
            .collect()
    }
}

/// A signed check-in with nothing new: idle, one committed slot, no deployment.
fn checkin_body(dev: &SimDevice) -> anyhow::Result<Vec<u8>> {
    let doc = CheckIn {
        kind: director::CHECKIN_TYPE.into(),
        device_id: dev.id.clone(),
        nonce: tern_server::random_hex(16),
        time: DateTime::from_unix(tern_server::unix_now()).to_string(),
        phase: "idle".into(),
        slots: vec![SlotReport {
            name: "rootfs.a".into(),
            booted: true,
            status: "committed".into(),
            version: Some("1.0.0".into()),
            target: Some("rootfs.img".into()),
            sha256: Some("5a".repeat(32)),
        }],
        deployment: None,
        refused_order: None,
    };
    Ok(director::sign_document("check-in", &doc, &dev.key)?)
}

/// The directory of a `sqlite:` database URL's file.
fn sqlite_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = Path::new(path.split('?').next().unwrap_or(path));
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

// ---------------------------------------------------------------------------------------------
// Load generation

/// The answer every request of a load must get.
#[derive(Debug, Clone, Copy)]
struct Expect {
    status: u16,
    /// The body's length, when it is known.
    len: Option<usize>,
}

impl Expect {
    const OK: Expect = Expect { status: 200, len: None };
}

/// Builds the next request of simulated client `n`.
type MakeRequest = Arc<dyn Fn(&reqwest::Client, usize) -> anyhow::Result<reqwest::Request> + Send + Sync>;

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn checkin_requests(base: &str, devices: Arc<Vec<SimDevice>>) -> MakeRequest {
    let urls: Vec<String> = devices
        .iter()
        .map(|d| format!("{base}/api/v1/devices/{}/checkin", d.id))
        .collect();
    Arc::new(move |client, n| {
        let body = checkin_body(&devices[n])?;
        Ok(client
            .post(&urls[n])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .build()?)
    })
}

fn get_requests(url: String) -> MakeRequest {
    Arc::new(move |client, _| Ok(client.get(&url).build()?))
}

/// One check-in before the load: it must be accepted with nothing to do.
async fn sanity_checkin(client: &reqwest::Client, base: &str, dev: &SimDevice) -> anyhow::Result<()> {
    let url = format!("{base}/api/v1/devices/{}/checkin", dev.id);
    let resp = client.post(&url).body(checkin_body(dev)?).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if status != reqwest::StatusCode::OK {
        bail!("the first check-in got HTTP {status}: {}", snippet(&body));
    }
    let answer: serde_json::Value = serde_json::from_slice(&body).context("the first check-in's answer")?;
    if answer.get("poll_interval_secs").is_none() || answer.get("order").is_some() {
        bail!("the first check-in's answer is not an idle one: {answer}");
    }
    Ok(())
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// What one load produced.
#[derive(Default)]
struct Tally {
    /// Latency of each request completed in the measured window, in microseconds.
    latencies_us: Vec<u32>,
    /// Failed requests over the whole run (warm-up included), by message.
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn error(&mut self, message: String) {
        *self.errors.entry(message).or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (m, n) in other.errors {
            *self.errors.entry(m).or_default() += n;
        }
    }
}

/// `concurrency` tasks, each sending its next request as soon as the previous one is
/// answered, until `until`; latencies are kept for requests completed from `from`.
async fn drive(
    client: reqwest::Client,
    concurrency: usize,
    from: Instant,
    until: Instant,
    make: MakeRequest,
    expect: Expect,
) -> Tally {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..concurrency {
        let client = client.clone();
        let make = make.clone();
        tasks.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < until {
                let req = match make(&client, n) {
                    Ok(r) => r,
                    Err(e) => {
                        tally.error(format!("building the request: {e:#}"));
                        break;
                    }
                };
                let t0 = Instant::now();
                let outcome = match client.execute(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.bytes().await {
                            Ok(body) if status.as_u16() != expect.status => {
                                Err(format!("HTTP {status}: {}", snippet(&body)))
                            }
                            Ok(body) if expect.len.is_some_and(|l| l != body.len()) => {
                                Err(format!("HTTP {status} with {} bytes", body.len()))
                            }
                            Ok(_) => Ok(()),
                            Err(e) => Err(format!("reading the answer: {:#}", anyhow::Error::from(e))),
                        }
                    }
                    Err(e) => Err(format!("{:#}", anyhow::Error::from(e))),
                };
                let t1 = Instant::now();
                match outcome {
                    Err(m) => tally.error(m),
                    Ok(()) if t1 >= from && t1 <= until => {
                        let us = t1.duration_since(t0).as_micros().min(u32::MAX as u128) as u32;
                        tally.latencies_us.push(us);
                    }
                    Ok(()) => {}
                }
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(t) => all.merge(t),
            Err(e) => all.error(format!("load task failed: {e}")),
        }
    }
    all
}

/// Request rate and latency of one load.
#[derive(Debug, Clone)]
struct Figures {
    requests: u64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: u64,
    error_messages: BTreeMap<String, u64>,
    /// CPU used during the measured window, percent of one core, by group.
    cpu: BTreeMap<String, f64>,
}

impl Figures {
    fn from_tally(mut t: Tally, window: Duration, cpu: BTreeMap<String, f64>) -> Self {
        t.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if t.latencies_us.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((p * t.latencies_us.len() as f64).ceil() as usize).clamp(1, t.latencies_us.len());
            f64::from(t.latencies_us[rank - 1]) / 1e3
        };
        Figures {
            requests: t.latencies_us.len() as u64,
            rate: t.latencies_us.len() as f64 / window.as_secs_f64(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: t.latencies_us.last().map_or(0.0, |&us| f64::from(us) / 1e3),
            errors: t.errors.values().sum(),
            error_messages: t.errors,
            cpu,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "requests_per_s": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": self.errors,
            "error_messages": self.error_messages,
            "cpu_percent_of_one_core": self.cpu,
        })
    }
}

/// Run one load on `rt`: warm-up, then the measured window, with CPU sampled at its edges.
fn load_run(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    concurrency: usize,
    duration: Duration,
    make: MakeRequest,
    expect: Expect,
    probe: &Probe,
) -> anyhow::Result<Figures> {
    let from = Instant::now() + WARMUP;
    let until = from + duration;
    let handle = rt.spawn(drive(client.clone(), concurrency, from, until, make, expect));
    sleep_until(from);
    let before = probe.sample();
    sleep_until(until);
    let after = probe.sample();
    let tally = rt.block_on(handle).context("the load generator failed")?;
    Ok(Figures::from_tally(
        tally,
        duration,
        cpu_percent(&before, &after, duration),
    ))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc

/// CPU seconds by group.
type CpuSample = BTreeMap<String, f64>;

/// Which processes and threads a CPU sample covers.
struct Probe {
    /// This process's threads, grouped by name (server runtime, load generator, SQLite).
    this_process: bool,
    /// A PostgreSQL postmaster: it and its children.
    postmaster: Option<u32>,
    /// An nginx master: it and its workers.
    nginx: Option<u32>,
}

impl Probe {
    fn sample(&self) -> CpuSample {
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

/// (name, parent pid, user + system CPU seconds) from a `/proc/…/stat` file.
fn proc_stat(path: &Path) -> Option<(String, u32, f64)> {
    let text = fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the name: state, ppid, …, utime (14th field of the file), stime (15th).
    let ppid = rest.get(1)?.parse().ok()?;
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture's user ABI.
    Some((name, ppid, ticks as f64 / 100.0))
}

/// CPU seconds of `root` and its direct children.
fn process_tree_cpu(root: u32) -> f64 {
    let mut total = proc_stat(Path::new(&format!("/proc/{root}/stat"))).map_or(0.0, |(_, _, s)| s);
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some((_, ppid, secs)) = proc_stat(&p.path().join("stat")) {
                if ppid == root {
                    total += secs;
                }
            }
        }
    }
    total
}

fn cpu_percent(before: &CpuSample, after: &CpuSample, window: Duration) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let used = v - before.get(k).copied().unwrap_or(0.0);
            (k.clone(), (used.max(0.0) / window.as_secs_f64() * 100.0).round())
        })
        .filter(|(_, pct)| *pct > 0.0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Breakdown

struct Breakdown {
    sign_us: f64,
    parse_us: f64,
    key_us: f64,
    verify_us: f64,
    fsync_us: f64,
    fsync_dir: PathBuf,
    healthz: Figures,
    one_select: Figures,
}

fn measure_breakdown(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    sims: &SimDevices,
    base: &str,
    a: &Args,
    probe: &Probe,
    fsync_dir: PathBuf,
) -> anyhow::Result<Breakdown> {
    const N: usize = 2000;
    let dev = &sims.active[0];
    let t = Instant::now();
    let bodies: Vec<Vec<u8>> = (0..N).map(|_| checkin_body(dev)).collect::<anyhow::Result<_>>()?;
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / N as f64;
    // The server's CPU work on a check-in besides the database, step by step as
    // `fleet::checkin_inner` does it: parse, load the stored key text (only on a device's
    // first check-in: the server caches the parsed key), verify the signature.
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / N as f64;
    let t = Instant::now();
    let parsed = bodies
        .iter()
        .map(|b| director::parse_checkin(b))
        .collect::<Result<Vec<_>, _>>()?;
    let parse_us = per(t);
    let stored_key = dev.key.public().to_value().to_string();
    let t = Instant::now();
    let keys = (0..N)
        .map(|_| -> anyhow::Result<PublicKey> {
            let value: serde_json::Value = serde_json::from_str(&stored_key)?;
            Ok(PublicKey::from_value("device key", &value)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key_us = per(t);
    let t = Instant::now();
    for ((env, _), key) in parsed.iter().zip(&keys) {
        director::verify_checkin(env, key)?;
    }
    let verify_us = per(t);
    let fsync_us = fsync_latency_us(&fsync_dir)?;
    let duration = Duration::from_secs(a.duration_secs);
    let healthz = load_run(
        rt,
        client,
        a.concurrency,
        duration,
        get_requests(format!("{base}/healthz")),
        Expect::OK,
        probe,
    )?;
    // One indexed SELECT through the read pool: the benchmark's repository is empty, so the
    // server looks the root up by primary key and answers 404.
    let one_select = load_run(
        rt,
        client,
        a.concurrency,
        duration,
        get_requests(format!("{base}/repo/metadata/1.root.json")),
        Expect { status: 404, len: None },
        probe,
    )?;
    Ok(Breakdown {
        sign_us,
        parse_us,
        key_us,
        verify_us,
        fsync_us,
        fsync_dir,
        healthz,
        one_select,
    })
}

/// Median time of a 4 KiB overwrite plus fdatasync in `dir` (what a WAL commit costs).
fn fsync_latency_us(dir: &Path) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("tern-bench-fsync.tmp");
    let file = fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut times = Vec::with_capacity(200);
    for i in 0..200u64 {
        let t = Instant::now();
        file.write_all_at(&block, (i % 16) * 4096)?;
        file.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    let _ = fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

// ---------------------------------------------------------------------------------------------
// The reference: nginx, wrk, and this generator against nginx

struct Reference {
    nginx_workers: usize,
    wrk_threads: usize,
    wrk: Figures,
    ours: Figures,
}

fn run_reference(
    nginx_bin: &Path,
    wrk_bin: &Path,
    rt: &tokio::runtime::Runtime,
    concurrency: usize,
    duration: Duration,
    cpus: usize,
) -> anyhow::Result<Reference> {
    let nginx = Nginx::start(nginx_bin)?;
    let url = nginx.url();
    let wrk_threads = concurrency.min(2);
    eprintln!(
        "nginx via wrk: {concurrency} connections, {wrk_threads} threads, 1 s warm-up run + {} s measured",
        duration.as_secs()
    );
    let wrk_cmd = |secs: u64| {
        let mut c = Process::new(wrk_bin);
        c.arg(format!("-t{wrk_threads}"))
            .arg(format!("-c{concurrency}"))
            .arg(format!("-d{secs}s"))
            .arg("--latency")
            .arg(&url);
        c
    };
    let warm = wrk_cmd(1)
        .output()
        .with_context(|| format!("running {}", wrk_bin.display()))?;
    if !warm.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&warm.stderr).trim());
    }
    let probe = Probe {
        this_process: false,
        postmaster: None,
        nginx: Some(nginx.pid()),
    };
    let before = probe.sample();
    let (out, wrk_cpu) = run_sampled(wrk_cmd(duration.as_secs()))?;
    let after = probe.sample();
    let mut cpu = cpu_percent(&before, &after, duration);
    cpu.insert("wrk".into(), (wrk_cpu / duration.as_secs_f64() * 100.0).round());
    let wrk = parse_wrk(&out, cpu)?;

    eprintln!(
        "nginx via tern's load generator: {concurrency} connections, {} s warm-up + {} s measured",
        WARMUP.as_secs(),
        duration.as_secs()
    );
    let client = rt.block_on(async { http_client() })?;
    let probe = Probe {
        this_process: true,
        postmaster: None,
        nginx: Some(nginx.pid()),
    };
    let ours = load_run(
        rt,
        &client,
        concurrency,
        duration,
        get_requests(url.clone()),
        Expect {
            status: 200,
            len: Some(STATIC_BYTES),
        },
        &probe,
    )?;
    Ok(Reference {
        nginx_workers: cpus,
        wrk_threads,
        wrk,
        ours,
    })
}

/// Run a command to its end, sampling its CPU time; returns its stdout and CPU seconds.
fn run_sampled(mut cmd: Process) -> anyhow::Result<(String, f64)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stat = PathBuf::from(format!("/proc/{}/stat", child.id()));
    let mut cpu = 0.0;
    // wrk's output is a few hundred bytes: the pipes never fill while it runs.
    while child.try_wait()?.is_none() {
        if let Some((_, _, secs)) = proc_stat(&stat) {
            cpu = secs;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), cpu))
}

/// A wrk duration (`616.03us`, `2.08ms`, `1.20s`, `1.00m`) in milliseconds.
fn wrk_ms(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e3)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600e3)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str, cpu: BTreeMap<String, f64>) -> anyhow::Result<Figures> {
    let mut rate = None;
    let (mut p50, mut p99, mut max, mut requests, mut errors) = (None, None, None, 0u64, 0u64);
    let mut error_messages = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", r] => rate = r.parse::<f64>().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            ["Latency", _avg, _stdev, m, ..] => max = wrk_ms(m),
            [n, "requests", "in", ..] => requests = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] | ["Non-2xx", "or", "3xx", "responses:", rest @ ..] => {
                // `connect 0, read 3, write 0, timeout 1` or `5`.
                let n: u64 = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
                errors += n;
                if n > 0 {
                    error_messages.insert(line.trim().to_owned(), n);
                }
            }
            _ => {}
        }
    }
    let (Some(rate), Some(p50), Some(p99)) = (rate, p50, p99) else {
        bail!("could not read wrk's output:\n{out}");
    };
    Ok(Figures {
        requests,
        rate,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max.unwrap_or(0.0),
        errors,
        error_messages,
        cpu,
    })
}

/// nginx serving the 4 KiB file from a temporary directory, stopped on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tern-bench-nginx-").tempdir()?;
        let d = dir.path();
        fs::create_dir_all(d.join("www"))?;
        fs::create_dir_all(d.join("tmp"))?;
        let content: Vec<u8> = (0..STATIC_BYTES).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(d.join("www").join(STATIC_NAME), content)?;
        let port = free_port()?;
        // As root, workers would run as `nobody` and could not read the private temporary
        // directory.
        let user = if is_root() { "user root;\n" } else { "" };
        let p = d.display();
        let conf = format!(
            "{user}worker_processes auto;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {p}/www;
    }}
}}
"
        );
        fs::write(d.join("nginx.conf"), conf)?;
        let child = Process::new(bin)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut nginx = Nginx { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = nginx.child.try_wait()?;
            if exited.is_some() || Instant::now() > deadline {
                let log = |f: &str| fs::read_to_string(nginx.dir.path().join(f)).unwrap_or_default();
                bail!(
                    "nginx did not start on 127.0.0.1:{port}: {}{}",
                    log("stderr.log").trim(),
                    log("error.log").trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/{STATIC_NAME}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running).
        let stopped = Process::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A private PostgreSQL cluster

struct PrivatePostgres {
    bin: PathBuf,
    version: String,
    data: PathBuf,
    port: u16,
    // Removed after `drop` has stopped the cluster.
    _dir: tempfile::TempDir,
}

/// The newest PostgreSQL's binaries under /usr/lib/postgresql.
fn postgres_bin() -> Option<(PathBuf, String)> {
    let mut versions: Vec<(f64, PathBuf, String)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v: f64 = name.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin, name))
        })
        .collect();
    versions.sort_by(|a, b| a.0.total_cmp(&b.0));
    versions.pop().map(|(_, bin, name)| (bin, name))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PrivatePostgres {
    fn start() -> anyhow::Result<Self> {
        let (bin, version) = match postgres_bin() {
            Some(found) => found,
            None => {
                install_or_fail(&["postgresql"], "PostgreSQL (/usr/lib/postgresql/*/bin/initdb)")?;
                postgres_bin().context("PostgreSQL is still missing after apt-get install")?
            }
        };
        let dir = tempfile::Builder::new().prefix("tern-bench-pg-").tempdir()?;
        if is_root() {
            // PostgreSQL refuses to run as root: it runs as `postgres`, which must own its files.
            run_checked(Process::new("chown").arg("postgres:postgres").arg(dir.path()))
                .context("handing the cluster's directory to the `postgres` user")?;
        }
        let data = dir.path().join("data");
        eprintln!(
            "starting a private PostgreSQL {version} cluster in {}",
            dir.path().display()
        );
        run_checked(as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]))?;
        let port = free_port()?;
        let options = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.path().display());
        run_checked(
            as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("postgres.log"))
                .args(["-o", &options, "-w", "-t", "60", "start"]),
        )?;
        Ok(PrivatePostgres {
            bin,
            version,
            data,
            port,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn as_postgres(bin: &Path) -> Process {
    if is_root() {
        let mut c = Process::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Process::new(bin)
    }
}

fn run_checked(cmd: &mut Process) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tools

/// A program this command runs, where to look for it and its Debian package.
struct Tool {
    name: &'static str,
    candidates: &'static [&'static str],
    package: &'static str,
}

impl Tool {
    const fn new(name: &'static str, candidates: &'static [&'static str], package: &'static str) -> Self {
        Tool {
            name,
            candidates,
            package,
        }
    }

    fn find(&self) -> Option<PathBuf> {
        self.candidates.iter().find_map(|c| {
            if c.contains('/') {
                Path::new(c).is_file().then(|| PathBuf::from(c))
            } else {
                std::env::var_os("PATH")
                    .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(c)).find(|p| p.is_file()))
            }
        })
    }
}

/// Each tool's path. When some are missing: in CI (`CI` set) they are installed with
/// apt-get; elsewhere this fails and says what to install.
fn require_tools(tools: &[Tool]) -> anyhow::Result<Vec<PathBuf>> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| t.find().is_none()).collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        let names: Vec<&str> = missing.iter().map(|t| t.name).collect();
        install_or_fail(&packages, &names.join(" and "))?;
    }
    tools
        .iter()
        .map(|t| {
            t.find()
                .with_context(|| format!("{} is still missing after apt-get install {}", t.name, t.package))
        })
        .collect()
}

fn install_or_fail(packages: &[&str], what: &str) -> anyhow::Result<()> {
    let list = packages.join(" ");
    if std::env::var_os("CI").is_none() {
        bail!(
            "tern bench server needs {what}: install with `apt-get install -y {list}` (with CI set, this \
             command runs that itself){}",
            if packages.iter().any(|p| *p == "nginx" || *p == "wrk") {
                ", or pass --no-reference to skip the nginx/wrk reference"
            } else {
                ""
            }
        );
    }
    eprintln!("CI is set: apt-get install -y {list}");
    let install = || {
        Process::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // A fresh image has no package lists yet.
        run_checked(Process::new("apt-get").arg("update"))?;
        if !install() {
            bail!("apt-get install -y {list} failed");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report

struct Report {
    cpus: usize,
    devices: usize,
    registration: Duration,
    backend: &'static str,
    database: String,
    pool_size: u32,
    write_pool_size: u32,
    concurrency: usize,
    duration: Duration,
    server_threads: usize,
    client_threads: usize,
    tern: Figures,
    nginx: Option<Reference>,
    breakdown: Option<Breakdown>,
}

impl Report {
    fn ratio(&self) -> Option<f64> {
        self.nginx
            .as_ref()
            .filter(|r| r.wrk.rate > 0.0)
            .map(|r| self.tern.rate / r.wrk.rate)
    }

    fn to_json(&self) -> serde_json::Value {
        let ratio = self.ratio();
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
                "server_runtime_workers": self.server_threads,
                "load_generator_workers": self.client_threads,
                "nginx_workers": self.nginx.as_ref().map(|r| r.nginx_workers),
                "wrk_threads": self.nginx.as_ref().map(|r| r.wrk_threads),
            },
            "tern_checkin": self.tern.to_json(),
            "nginx_wrk": self.nginx.as_ref().map(|r| r.wrk.to_json()),
            "nginx_tern_generator": self.nginx.as_ref().map(|r| r.ours.to_json()),
            "ratio_to_nginx_wrk": ratio,
            "goals": {
                "min_ratio_to_nginx": GOAL_RATIO,
                "max_p99_ms": GOAL_P99_MS,
                "ratio_met": ratio.map(|r| r >= GOAL_RATIO),
                "p99_met": self.tern.p99_ms <= GOAL_P99_MS,
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

    fn print(&self) {
        println!(
            "devices             {} registered in {:.2} s ({}; {})",
            self.devices,
            self.registration.as_secs_f64(),
            self.backend,
            self.database
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
        let mut threads = format!(
            "threads             {} CPUs; tern server runtime {} worker(s), {pools}; load generator {} worker(s)",
            self.cpus, self.server_threads, self.client_threads
        );
        if let Some(r) = &self.nginx {
            threads.push_str(&format!(
                "; nginx {} workers; wrk {} threads",
                r.nginx_workers, r.wrk_threads
            ));
        }
        println!("{threads}");
        println!();
        println!(
            "{:<34} {:>10} {:>9} {:>9} {:>9} {:>7}",
            "", "req/s", "p50 ms", "p99 ms", "max ms", "errors"
        );
        let row = |label: &str, f: &Figures| {
            println!(
                "{:<34} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                label, f.rate, f.p50_ms, f.p99_ms, f.max_ms, f.errors
            );
        };
        row(&format!("tern check-in ({})", self.backend), &self.tern);
        if let Some(b) = &self.breakdown {
            row("tern GET /healthz (no db, no crypto)", &b.healthz);
            row("tern GET, one indexed SELECT (404)", &b.one_select);
        }
        if let Some(r) = &self.nginx {
            row("nginx 4 KiB file, wrk", &r.wrk);
            row("nginx 4 KiB file, tern's generator", &r.ours);
        }
        println!();
        let met = |ok: bool| if ok { "met" } else { "NOT MET" };
        match self.ratio() {
            Some(ratio) => println!(
                "tern / nginx (wrk)  {ratio:.3}x   goal >= {GOAL_RATIO}x: {}",
                met(ratio >= GOAL_RATIO)
            ),
            None => println!("tern / nginx (wrk)  not measured (--no-reference)"),
        }
        println!(
            "tern p99            {:.2} ms   goal <= {GOAL_P99_MS} ms: {}",
            self.tern.p99_ms,
            met(self.tern.p99_ms <= GOAL_P99_MS)
        );
        println!();
        println!("CPU in the measured window, % of one core:");
        let cpu = |label: &str, f: &Figures| {
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
        };
        cpu("tern check-in", &self.tern);
        if let Some(b) = &self.breakdown {
            cpu("tern GET /healthz", &b.healthz);
            cpu("tern GET, one SELECT", &b.one_select);
        }
        if let Some(r) = &self.nginx {
            cpu("nginx, wrk", &r.wrk);
            cpu("nginx, tern's generator", &r.ours);
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
        let mut errors: Vec<(&str, &Figures)> = vec![("tern check-in", &self.tern)];
        if let Some(b) = &self.breakdown {
            errors.push(("tern GET /healthz", &b.healthz));
            errors.push(("tern GET, one SELECT", &b.one_select));
        }
        if let Some(r) = &self.nginx {
            errors.push(("nginx, wrk", &r.wrk));
            errors.push(("nginx, tern's generator", &r.ours));
        }
        for (label, f) in errors {
            for (m, n) in f.error_messages.iter().take(10) {
                println!("error ({label}): {n} x {m}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:8080/4k.bin
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   616.03us  389.74us  14.80ms   91.41%
    Req/Sec    52.44k     3.31k   59.86k    71.00%
  Latency Distribution
     50%  543.00us
     75%  695.00us
     90%    0.90ms
     99%    2.08ms
  1043512 requests in 10.00s, 4.24GB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec: 104339.40
Transfer/sec:    434.37MB
";

    #[test]
    fn reads_wrk_output() {
        let f = parse_wrk(WRK, BTreeMap::new()).unwrap();
        assert_eq!(f.rate, 104339.40);
        assert!((f.p50_ms - 0.543).abs() < 1e-9);
        assert!((f.p99_ms - 2.08).abs() < 1e-9);
        assert!((f.max_ms - 14.80).abs() < 1e-9);
        assert_eq!(f.requests, 1043512);
        assert_eq!(f.errors, 4);
    }

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_ms("1.50s"), Some(1500.0));
        assert_eq!(wrk_ms("2.00m"), Some(120_000.0));
        assert_eq!(wrk_ms("10"), None);
    }

    #[test]
    fn registrations_give_active_devices_their_keys() {
        let sims = SimDevices::generate(1200, 3).unwrap();
        let regs = sims.registrations();
        assert_eq!(regs.len(), 1200);
        let shared = sims.shared.keyid();
        assert_eq!(regs.iter().filter(|r| r.keyid != shared.as_str()).count(), 3);
        for d in sims.active.iter() {
            let r = regs.iter().find(|r| r.id == d.id).unwrap();
            assert_eq!(r.keyid, d.key.public().keyid().as_str());
            assert_eq!(&r.public_key, d.key.public().to_value());
        }
    }

    /// A reused `--database-url`: the second run's keys replace the first's, and the bulk
    /// path leaves a decommissioned device alone.
    #[tokio::test(flavor = "multi_thread")]
    async fn registering_again_replaces_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tern_server::ServerConfig::for_data_dir(dir.path());
        tern_server::keys::init(&cfg.key_dir(), crate::output::now(), 1).unwrap();
        let state = tern_server::open(cfg).await.unwrap();
        let first = SimDevices::generate(1200, 3).unwrap();
        state.db.register_devices(&first.registrations()).await.unwrap();
        let second = SimDevices::generate(1200, 3).unwrap();
        state.db.register_devices(&second.registrations()).await.unwrap();
        let d = &second.active[1];
        let stored = tern_server::fleet::device(&state, &d.id).await.unwrap().unwrap();
        assert_eq!(stored.keyid, d.key.public().keyid().as_str());
        assert_eq!(stored.status, "approved");
        assert_eq!(tern_server::fleet::devices(&state, None).await.unwrap().len(), 1200);

        tern_server::fleet::set_device_status(&state, &d.id, "decommissioned", "test")
            .await
            .unwrap();
        let refused = state.db.register_devices(&second.registrations()).await.unwrap_err();
        assert!(refused.to_string().contains("decommissioned"), "{refused}");
        let stored = tern_server::fleet::device(&state, &d.id).await.unwrap().unwrap();
        assert_eq!(stored.status, "decommissioned");
    }

    #[test]
    fn sqlite_dirs() {
        assert_eq!(
            sqlite_dir("sqlite:///tmp/x/tern.db?mode=rwc"),
            Some(PathBuf::from("/tmp/x"))
        );
        assert_eq!(sqlite_dir("sqlite:tern.db"), None);
        assert_eq!(sqlite_dir("postgres://h/db"), None);
    }

    #[test]
    fn checkin_is_accepted_by_the_parser() {
        let sims = SimDevices::generate(10, 1).unwrap();
        let body = checkin_body(&sims.active[0]).unwrap();
        let (env, c) = director::parse_checkin(&body).unwrap();
        director::verify_checkin(&env, sims.active[0].key.public()).unwrap();
        assert_eq!(c.phase, "idle");
        assert!(c.deployment.is_none());
    }
}
