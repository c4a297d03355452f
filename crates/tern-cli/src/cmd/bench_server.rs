//! `tern bench server`: what a fleet that has nothing new costs an in-process `tern server`,
//! printed beside `wrk` against nginx serving a 4 KiB static file, measured in the same run.
//!
//! What runs:
//! 1. A fresh database (SQLite in a temporary directory, a private PostgreSQL cluster with
//!    `--postgres`, or `--database-url`) gets the server's migrations, then `--devices`
//!    approved devices through the server's bulk path (`Db::register_devices`: 500-row
//!    INSERTs, several per transaction, on the server's write pool). The `--concurrency`
//!    simulated devices have their own Ed25519 keys; the others share one public key, which
//!    the server never reads.
//! 2. The server starts in-process on 127.0.0.1:0. Sessions: every simulated device sends
//!    one signed check-in, all at once, and keeps the session token of the answer (DESIGN
//!    §6, cheap steady state); this phase is timed and printed on its own.
//! 3. The steady state, measured by this command's own load generator: each simulated device
//!    is one task that polls `GET /api/v1/devices/{id}/poll` with its token over a shared
//!    keep-alive client, in a loop, 1 s of warm-up, then `--duration-secs` measured. Every
//!    answer must be 200 with `"checkin":false`; others are errors and are printed. The
//!    server answers a poll from memory: an HMAC check of the token and two hash-set
//!    lookups, no database statement, no signature.
//! 4. The order path, as a secondary figure, by the same generator: each task signs a fresh
//!    check-in (new random nonce, current time: the server refuses replays) and POSTs it.
//!    Signing is not part of the latency. On the server a check-in is one signature check
//!    against the device's key (cached in memory after its first check-in), one UPDATE on
//!    the write pool (status check, replay guard and heartbeat together) and one SELECT for
//!    a pending deployment on the read pool. On SQLite the write pool is a single connection
//!    that the process's writers queue for.
//! 5. The steady state again, measured by `wrk`, the client of the nginx reference: the
//!    server is restarted on the same database with a runtime of `--wrk-server-threads`
//!    workers (default: every CPU; wrk is a separate process, as it is against nginx), and
//!    the tokens of step 2 stay valid (the session key is a file). A generated Lua script
//!    gives each wrk thread its share of the devices; each request polls as the next of
//!    them, and the script counts non-200 answers and 200s without `"checkin":false`.
//! 6. The reference: nginx (`worker_processes auto`) serves a 4096-byte file, measured by
//!    `wrk --latency` with the same connection count and duration (after a 1 s warm-up
//!    run), once with the same kind of Lua script (each answer checked: 200, 4096 bytes)
//!    and once without a script, then by this command's own load generator, so that the
//!    generator's ceiling is visible beside wrk's. The ratio to nginx and the issue's goals
//!    are taken on the wrk-measured poll against nginx under the same script.
//!
//! Threads. On a small machine the server, the load generator, the database and the
//! reference tools all compete for the same cores. While this command's own generator runs,
//! it and the server run on two separate tokio runtimes so that neither's tasks can run on
//! the other's workers: the generator gets `--client-threads` workers (default 1: it mostly
//! waits) and the server gets `--server-threads` (default: the remaining CPUs, at least 1).
//! While wrk runs the server has `--wrk-server-threads`. SQLite work runs on sqlx's own
//! per-connection threads and PostgreSQL in its own processes, so the report gives the CPU
//! each group used during the measured window (percent of one core), for the tern runs and
//! for the nginx runs alike (nginx runs one worker per CPU, wrk 2 threads).

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
/// What the answer to a poll with nothing new contains.
const NOTHING_NEW: &str = "\"checkin\":false";
/// The issue's goals: at least this fraction of nginx's rate, p99 at most this.
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
    /// Simulated devices polling at once, each a task looping polls (or check-ins); also
    /// wrk's connection count.
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
    /// Skip wrk and nginx: the poll is then measured by this command's generator only.
    #[arg(long)]
    pub no_reference: bool,
    /// Worker threads of the server's runtime while this command's load generator runs
    /// (default: the CPUs left by the generator, at least 1).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Worker threads of the server's runtime while wrk polls it (default: every CPU, as
    /// nginx runs one worker per CPU; wrk is a separate process in both cases).
    #[arg(long)]
    pub wrk_server_threads: Option<usize>,
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
    let wrk_server_threads = a.wrk_server_threads.unwrap_or(cpus).max(1);
    let duration = Duration::from_secs(a.duration_secs);
    // Every tool is looked for before minutes of work, so that a missing one fails first.
    let tools = if a.no_reference {
        None
    } else {
        let found = require_tools(&[
            Tool::new("nginx", &["/usr/sbin/nginx", "nginx"], "nginx"),
            Tool::new("wrk", &["wrk"], "wrk"),
        ])?;
        Some((found[0].clone(), found[1].clone()))
    };
    let wrk = tools.as_ref().map(|(_, bin)| Wrk {
        bin: bin.clone(),
        threads: a.concurrency.min(2),
        connections: a.concurrency,
    });

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
    // The tokens of the session phase serve every later poll: a run longer than the
    // server's default lifetime gets a longer one (the cost of a poll does not depend on it).
    // The loads before the last poll: the generator's two, the breakdown's, wrk's poll.
    let loads = 2 + u64::from(a.breakdown) * 2 + u64::from(wrk.is_some());
    let run_secs = loads * (WARMUP.as_secs() + a.duration_secs) + 120;
    let session_ttl_raised = cfg.session_ttl_secs < run_secs;
    cfg.session_ttl_secs = cfg.session_ttl_secs.max(run_secs);
    // Where the SQLite file lives, for the breakdown's fsync measurement.
    let fsync_dir = sqlite_dir(&cfg.database_url()).unwrap_or_else(|| temp.path().to_owned());
    let database = match (&pg, &a.database_url) {
        (Some(pg), _) => format!("private PostgreSQL {} cluster, default settings", pg.version),
        (None, Some(_)) => "--database-url".to_owned(),
        (None, None) => "SQLite in a temporary directory".to_owned(),
    };

    let server_rt = server_runtime(server_threads)?;
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

    eprintln!(
        "sessions: {} simulated devices send one signed check-in each, all at once",
        a.concurrency
    );
    let (tokens, sessions) = client_rt.block_on(open_sessions(&client, &base, &sims.active))?;

    let probe = Probe {
        this_process: true,
        postmaster: pg.as_ref().and_then(PrivatePostgres::postmaster_pid),
        nginx: None,
    };
    eprintln!(
        "tern poll via tern's load generator: {} simulated devices, {} s warm-up + {} s measured",
        a.concurrency,
        WARMUP.as_secs(),
        a.duration_secs
    );
    let poll_ours = load_run(
        &client_rt,
        &client,
        a.concurrency,
        duration,
        poll_requests(&base, &sims.active, &tokens)?,
        Expect::NOTHING_NEW,
        &probe,
    )?;
    eprintln!(
        "tern signed check-in via tern's load generator: {} simulated devices, {} s warm-up + {} s measured",
        a.concurrency,
        WARMUP.as_secs(),
        a.duration_secs
    );
    let checkin_ours = load_run(
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
    running.task.abort();
    server_rt.shutdown_timeout(Duration::from_secs(2));

    // The same database and key directory on a runtime sized for wrk, which is a separate
    // process: the tokens issued above stay valid.
    let poll_wrk = match &wrk {
        None => None,
        Some(wrk) => {
            let server_rt = server_runtime(wrk_server_threads)?;
            let state = server_rt
                .block_on(tern_server::open(cfg.clone()))
                .context("reopening the server's database")?;
            let running = server_rt.block_on(tern_server::start(state))?;
            let base = format!("http://{}", running.addr);
            let polls: Vec<WrkRequest> = sims
                .active
                .iter()
                .zip(&tokens)
                .map(|(d, t)| WrkRequest {
                    path: format!("/api/v1/devices/{}/poll", d.id),
                    authorization: Some(format!("Bearer {t}")),
                })
                .collect();
            let script = temp.path().join("poll.lua");
            fs::write(
                &script,
                wrk_script(&polls, wrk.threads, &WrkCheck::Contains(NOTHING_NEW)),
            )?;
            eprintln!(
                "tern poll via wrk: server restarted with {wrk_server_threads} runtime worker(s); {} connections, \
                 {} threads, 1 s warm-up run + {} s measured",
                wrk.connections, wrk.threads, a.duration_secs
            );
            let figures = wrk.run(&base, Some(&script), duration, &probe)?;
            running.task.abort();
            server_rt.shutdown_timeout(Duration::from_secs(2));
            Some(figures)
        }
    };
    drop(client);
    drop(pg);

    let nginx = match (&tools, &wrk) {
        (Some((nginx_bin, _)), Some(wrk)) => Some(run_reference(
            nginx_bin,
            wrk,
            &client_rt,
            a.concurrency,
            duration,
            cpus,
            temp.path(),
        )?),
        _ => None,
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
        wrk_server_threads,
        client_threads: a.client_threads,
        session_ttl_secs: cfg.session_ttl_secs,
        session_ttl_raised,
        sessions,
        poll_wrk,
        poll_ours,
        checkin_ours,
        wrk_threads: wrk.as_ref().map(|w| w.threads),
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

/// The server's runtime, its workers named for the CPU report.
fn server_runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()?)
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
    /// Text the body must contain.
    contains: Option<&'static str>,
}

impl Expect {
    const OK: Expect = Expect {
        status: 200,
        len: None,
        contains: None,
    };
    /// A poll's answer when nothing is new.
    const NOTHING_NEW: Expect = Expect {
        status: 200,
        len: None,
        contains: Some(NOTHING_NEW),
    };
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

/// Device `n` polls with its session token `tokens[n]`.
fn poll_requests(base: &str, devices: &[SimDevice], tokens: &[String]) -> anyhow::Result<MakeRequest> {
    let polls = devices
        .iter()
        .zip(tokens)
        .map(|(d, t)| -> anyhow::Result<_> {
            let auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))?;
            Ok((format!("{base}/api/v1/devices/{}/poll", d.id), auth))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Arc::new(move |client, n| {
        let (url, auth) = &polls[n];
        Ok(client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, auth.clone())
            .build()?)
    }))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The session token and its expiry from the answer to a signed check-in, which must have
/// nothing to do.
fn session_of(status: reqwest::StatusCode, body: &[u8]) -> anyhow::Result<(String, i64)> {
    if status != reqwest::StatusCode::OK {
        bail!("HTTP {status}: {}", snippet(body));
    }
    let answer: serde_json::Value = serde_json::from_slice(body).context("the check-in's answer")?;
    if answer.get("poll_interval_secs").is_none() || answer.get("order").is_some() {
        bail!("not an idle answer: {answer}");
    }
    match (
        answer.get("session").and_then(|v| v.as_str()),
        answer.get("session_expires").and_then(|v| v.as_i64()),
    ) {
        (Some(token), Some(expires)) => Ok((token.to_owned(), expires)),
        _ => bail!("no session token in the answer: {answer}"),
    }
}

/// One check-in before the load: it must be accepted with nothing to do, and its token must
/// let the device poll.
async fn sanity_checkin(client: &reqwest::Client, base: &str, dev: &SimDevice) -> anyhow::Result<()> {
    let url = format!("{base}/api/v1/devices/{}/checkin", dev.id);
    let resp = client.post(&url).body(checkin_body(dev)?).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    let (token, _) = session_of(status, &body).context("the first check-in")?;
    let resp = client
        .get(format!("{base}/api/v1/devices/{}/poll", dev.id))
        .bearer_auth(token)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if status != reqwest::StatusCode::OK || !contains(&body, NOTHING_NEW) {
        bail!(
            "the first poll got HTTP {status}, not {NOTHING_NEW}: {}",
            snippet(&body)
        );
    }
    Ok(())
}

/// The session phase, timed on its own.
struct Sessions {
    /// Signed check-ins sent, one per simulated device, all at once.
    count: usize,
    /// From the first request to the last answer.
    elapsed: Duration,
    /// Latency figures (rate: check-ins over `elapsed`).
    figures: Figures,
}

/// Every simulated device sends one signed check-in, all at once (the documents are signed
/// before the clock starts); returns each device's session token.
async fn open_sessions(
    client: &reqwest::Client,
    base: &str,
    devices: &[SimDevice],
) -> anyhow::Result<(Vec<String>, Sessions)> {
    let bodies = devices
        .iter()
        .map(|d| Ok((format!("{base}/api/v1/devices/{}/checkin", d.id), checkin_body(d)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (url, body)) in bodies.into_iter().enumerate() {
        let client = client.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let outcome = async {
                let resp = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                session_of(status, &body)
            }
            .await;
            (n, t0.elapsed(), outcome)
        });
    }
    let mut tokens = vec![String::new(); devices.len()];
    let mut tally = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let (n, took, outcome) = done.context("a session task failed")?;
        let (token, _expires) = outcome.with_context(|| format!("the signed check-in of {}", devices[n].id))?;
        tokens[n] = token;
        tally.latencies_us.push(took.as_micros().min(u32::MAX as u128) as u32);
    }
    let elapsed = start.elapsed();
    Ok((
        tokens,
        Sessions {
            count: devices.len(),
            elapsed,
            figures: Figures::from_tally(tally, elapsed, BTreeMap::new()),
        },
    ))
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
                            Ok(body) if expect.contains.is_some_and(|c| !contains(&body, c)) => Err(format!(
                                "HTTP {status} without {}: {}",
                                expect.contains.unwrap_or_default(),
                                snippet(&body)
                            )),
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
        Expect {
            status: 404,
            len: None,
            contains: None,
        },
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
// wrk, and the reference: nginx measured by wrk and by this generator

/// How wrk runs: threads and connections, the same against tern and nginx.
struct Wrk {
    bin: PathBuf,
    threads: usize,
    connections: usize,
}

impl Wrk {
    fn command(&self, url: &str, script: Option<&Path>, secs: u64) -> Process {
        let mut c = Process::new(&self.bin);
        c.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{secs}s"))
            .arg("--latency");
        if let Some(s) = script {
            c.arg("-s").arg(s);
        }
        c.arg(url);
        c
    }

    /// A 1 s warm-up run, then `duration` measured with `probe` and wrk's own CPU sampled.
    /// With a script (see [`wrk_script`]), its check of every answer must be in the output.
    fn run(&self, url: &str, script: Option<&Path>, duration: Duration, probe: &Probe) -> anyhow::Result<Figures> {
        let warm = self
            .command(url, script, 1)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !warm.status.success() {
            bail!("wrk failed: {}", String::from_utf8_lossy(&warm.stderr).trim());
        }
        let before = probe.sample();
        let (out, wrk_cpu) = run_sampled(self.command(url, script, duration.as_secs()))?;
        let after = probe.sample();
        let mut cpu = cpu_percent(&before, &after, duration);
        cpu.insert("wrk".into(), (wrk_cpu / duration.as_secs_f64() * 100.0).round());
        let figures = parse_wrk(&out, cpu)?;
        if script.is_some() && !out.contains(CHECK_LINE) {
            bail!("wrk's script did not report its check of the answers:\n{out}");
        }
        Ok(figures)
    }
}

/// One request of a wrk script.
struct WrkRequest {
    path: String,
    authorization: Option<String>,
}

/// What every answer of a scripted wrk run must be, besides status 200.
enum WrkCheck {
    Contains(&'static str),
    Len(usize),
}

/// The line a wrk script ends its output with: `tern-check: ok N non-200 N body N`.
const CHECK_LINE: &str = "tern-check:";

/// A wrk Lua script: thread `t` of `threads` takes requests `t`, `t + threads`, … and
/// sends them in turn, one per request (each prepared once, in `init`); every answer is
/// checked, and `done` prints the counts of good and bad answers and an example of each
/// kind of bad one.
fn wrk_script(requests: &[WrkRequest], threads: usize, check: &WrkCheck) -> String {
    let list: Vec<String> = requests
        .iter()
        .map(|r| match &r.authorization {
            Some(a) => format!("  {{ {}, {} }},", lua_str(&r.path), lua_str(a)),
            None => format!("  {{ {} }},", lua_str(&r.path)),
        })
        .collect();
    let body_ok = match check {
        WrkCheck::Contains(text) => format!("string.find(body, {}, 1, true) ~= nil", lua_str(text)),
        WrkCheck::Len(n) => format!("#body == {n}"),
    };
    let body_wanted = match check {
        WrkCheck::Contains(text) => format!("without {text}"),
        WrkCheck::Len(n) => format!("not {n} bytes"),
    };
    format!(
        r#"-- Generated by `tern bench server`.
local requests = {{
{list}
}}
local threads_count = {threads}
local threads = {{}}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  prepared = {{}}
  for k, r in ipairs(requests) do
    if (k - 1) % threads_count == thread_index then
      local headers = {{}}
      if r[2] then headers["Authorization"] = r[2] end
      table.insert(prepared, wrk.format("GET", r[1], headers))
    end
  end
  next_request = 0
  ok, bad_status, bad_body = 0, 0, 0
  status_example, body_example = "", ""
end

function request()
  next_request = next_request % #prepared + 1
  return prepared[next_request]
end

function response(status, headers, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    if status_example == "" then
      status_example = "HTTP " .. status .. ": " .. string.sub(body, 1, 200)
    end
  elseif not ({body_ok}) then
    bad_body = bad_body + 1
    if body_example == "" then
      body_example = {body_wanted_lua} .. string.sub(body, 1, 200)
    end
  else
    ok = ok + 1
  end
end

function done(summary, latency, requests)
  local good, status, body = 0, 0, 0
  for _, t in ipairs(threads) do
    good = good + t:get("ok")
    status = status + t:get("bad_status")
    body = body + t:get("bad_body")
    for _, kind in ipairs({{ "status", "body" }}) do
      local example = t:get(kind .. "_example")
      if example ~= "" then
        io.write("tern-check " .. kind .. " example: " .. string.gsub(example, "%s+", " ") .. "\n")
      end
    end
  end
  io.write(string.format("{CHECK_LINE} ok %d non-200 %d body %d\n", good, status, body))
end
"#,
        list = list.join("\n"),
        body_wanted_lua = lua_str(&format!("HTTP 200 {body_wanted}: ")),
    )
}

/// A Lua string literal.
fn lua_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

struct Reference {
    nginx_workers: usize,
    /// wrk with the same kind of script as the poll's: every answer checked.
    wrk: Figures,
    /// wrk without a script.
    wrk_plain: Figures,
    ours: Figures,
}

fn run_reference(
    nginx_bin: &Path,
    wrk: &Wrk,
    rt: &tokio::runtime::Runtime,
    concurrency: usize,
    duration: Duration,
    cpus: usize,
    temp: &Path,
) -> anyhow::Result<Reference> {
    let nginx = Nginx::start(nginx_bin)?;
    let url = nginx.url();
    let probe = Probe {
        this_process: false,
        postmaster: None,
        nginx: Some(nginx.pid()),
    };
    // As many entries as the poll's script has devices, so that each thread cycles through
    // a list of the same length.
    let gets: Vec<WrkRequest> = (0..concurrency)
        .map(|_| WrkRequest {
            path: format!("/{STATIC_NAME}"),
            authorization: None,
        })
        .collect();
    let script = temp.join("nginx.lua");
    fs::write(&script, wrk_script(&gets, wrk.threads, &WrkCheck::Len(STATIC_BYTES)))?;
    eprintln!(
        "nginx via wrk, the poll's kind of script: {} connections, {} threads, 1 s warm-up run + {} s measured",
        wrk.connections,
        wrk.threads,
        duration.as_secs()
    );
    let scripted = wrk.run(&url, Some(&script), duration, &probe)?;
    eprintln!(
        "nginx via wrk, no script: {} connections, {} threads, 1 s warm-up run + {} s measured",
        wrk.connections,
        wrk.threads,
        duration.as_secs()
    );
    let plain = wrk.run(&url, None, duration, &probe)?;

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
            contains: None,
        },
        &probe,
    )?;
    Ok(Reference {
        nginx_workers: cpus,
        wrk: scripted,
        wrk_plain: plain,
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

/// wrk's figures. Errors: socket errors, plus the answers a script's check refused when
/// the output has its line (see [`wrk_script`]), else wrk's own count of statuses >= 400.
fn parse_wrk(out: &str, cpu: BTreeMap<String, f64>) -> anyhow::Result<Figures> {
    let mut rate = None;
    let (mut p50, mut p99, mut max, mut requests) = (None, None, None, 0u64);
    let (mut socket, mut non_2xx, mut checked) = (0u64, 0u64, None);
    let mut error_messages = BTreeMap::new();
    let mut examples = Vec::new();
    let count = |words: &[&str]| -> u64 {
        // `connect 0, read 3, write 0, timeout 1` or `5`.
        words
            .iter()
            .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
            .sum()
    };
    for line in out.lines() {
        if let Some(example) = line.strip_prefix("tern-check ").filter(|l| l.contains(" example: ")) {
            examples.push(example.trim().to_owned());
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", r] => rate = r.parse::<f64>().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            ["Latency", _avg, _stdev, m, ..] => max = wrk_ms(m),
            [n, "requests", "in", ..] => requests = n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                socket = count(rest);
                if socket > 0 {
                    error_messages.insert(line.trim().to_owned(), socket);
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", rest @ ..] => non_2xx = count(rest),
            [CHECK_LINE, "ok", _, "non-200", s, "body", b] => {
                checked = Some((s.parse::<u64>().unwrap_or(0), b.parse::<u64>().unwrap_or(0)));
            }
            _ => {}
        }
    }
    let (Some(rate), Some(p50), Some(p99)) = (rate, p50, p99) else {
        bail!("could not read wrk's output:\n{out}");
    };
    let refused = match checked {
        Some((status, body)) => {
            // `status example: HTTP 401: …`, `body example: HTTP 200 without …`.
            let example = |kind: &str| {
                examples
                    .iter()
                    .find_map(|e| e.strip_prefix(kind)?.strip_prefix(" example: "))
                    .map_or(String::new(), |e| format!(", e.g. {e}"))
            };
            if status > 0 {
                error_messages.insert(format!("non-200 answer{}", example("status")), status);
            }
            if body > 0 {
                error_messages.insert(format!("unexpected body{}", example("body")), body);
            }
            status + body
        }
        None => {
            if non_2xx > 0 {
                error_messages.insert("Non-2xx or 3xx responses".to_owned(), non_2xx);
            }
            non_2xx
        }
    };
    Ok(Figures {
        requests,
        rate,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max.unwrap_or(0.0),
        errors: socket + refused,
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
    wrk_server_threads: usize,
    client_threads: usize,
    session_ttl_secs: u64,
    /// The server's default lifetime was shorter than this run.
    session_ttl_raised: bool,
    sessions: Sessions,
    /// The steady state measured by wrk (absent with `--no-reference`).
    poll_wrk: Option<Figures>,
    /// The steady state measured by this command's generator.
    poll_ours: Figures,
    /// Signed check-ins (the order path) measured by this command's generator.
    checkin_ours: Figures,
    wrk_threads: Option<usize>,
    nginx: Option<Reference>,
    breakdown: Option<Breakdown>,
}

impl Report {
    /// The row the goals are checked on: the poll as wrk measures it, else as the generator does.
    fn primary(&self) -> (&'static str, &Figures) {
        match &self.poll_wrk {
            Some(f) => ("tern_poll_wrk", f),
            None => ("tern_poll_generator", &self.poll_ours),
        }
    }

    /// tern's poll over nginx, both measured by wrk with the same kind of script.
    fn ratio(&self) -> Option<f64> {
        let poll = self.poll_wrk.as_ref()?;
        self.nginx
            .as_ref()
            .filter(|r| r.wrk.rate > 0.0)
            .map(|r| poll.rate / r.wrk.rate)
    }

    /// The same against wrk without a script.
    fn ratio_plain(&self) -> Option<f64> {
        let poll = self.poll_wrk.as_ref()?;
        self.nginx
            .as_ref()
            .filter(|r| r.wrk_plain.rate > 0.0)
            .map(|r| poll.rate / r.wrk_plain.rate)
    }

    fn to_json(&self) -> serde_json::Value {
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
    fn rows(&self) -> Vec<(String, &'static str, &Figures)> {
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

    fn print(&self) {
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
            "  with the generator  tern server runtime {} worker(s), load generator (in-process) {} worker(s)",
            self.server_threads, self.client_threads
        );
        if let (Some(_), Some(t)) = (&self.poll_wrk, self.wrk_threads) {
            println!(
                "  with wrk            tern server runtime {} worker(s) (restarted on the same database), wrk {t} \
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

    /// A scripted run: the script's counts replace wrk's own count of statuses >= 400.
    #[test]
    fn reads_the_scripts_check() {
        let out = WRK.replace("Requests/sec:", "  Non-2xx or 3xx responses: 7\nRequests/sec:")
            + "tern-check status example: HTTP 401: {\"error\":\"the session token has expired\"}\n\
             tern-check body example: HTTP 200 without \"checkin\":false: {\"checkin\":true}\n\
             tern-check: ok 1043500 non-200 7 body 2\n";
        let f = parse_wrk(&out, BTreeMap::new()).unwrap();
        assert_eq!(f.errors, 4 + 7 + 2);
        assert_eq!(
            f.error_messages
                .get("non-200 answer, e.g. HTTP 401: {\"error\":\"the session token has expired\"}"),
            Some(&7)
        );
        assert_eq!(
            f.error_messages
                .get("unexpected body, e.g. HTTP 200 without \"checkin\":false: {\"checkin\":true}"),
            Some(&2)
        );
        assert!(!f.error_messages.keys().any(|m| m.starts_with("Non-2xx")));
    }

    #[test]
    fn wrk_script_spreads_devices_over_threads() {
        let reqs = vec![
            WrkRequest {
                path: "/api/v1/devices/bench-000000/poll".into(),
                authorization: Some("Bearer v1.bench-000000.99.ab".into()),
            },
            WrkRequest {
                path: "/4k.bin".into(),
                authorization: None,
            },
        ];
        let script = wrk_script(&reqs, 2, &WrkCheck::Contains(NOTHING_NEW));
        assert!(script.contains(r#"  { "/api/v1/devices/bench-000000/poll", "Bearer v1.bench-000000.99.ab" },"#));
        assert!(script.contains(r#"  { "/4k.bin" },"#));
        assert!(script.contains("local threads_count = 2"));
        assert!(script.contains(r#"string.find(body, "\"checkin\":false", 1, true)"#));
        assert!(script.contains(&format!("io.write(string.format(\"{CHECK_LINE} ok %d")));
        let by_len = wrk_script(&reqs, 1, &WrkCheck::Len(4096));
        assert!(by_len.contains("#body == 4096"));
        assert_eq!(lua_str("a\"b\\c\n\u{e9}"), r#""a\"b\\c\010\195\169""#);
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
