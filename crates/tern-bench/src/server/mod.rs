//! `tern-bench server`: what a fleet that has nothing new costs an in-process `tern server`,
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
//!    generator's ceiling is visible beside wrk's. The ratio to nginx and the goals
//!    are taken on the wrk-measured poll against nginx under the same script.
//!
//! Threads. On a small machine the server, the load generator, the database and the
//! reference tools all compete for the same cores. While this command's own generator runs,
//! it and the server run on two separate tokio runtimes so that neither's tasks can run on
//! the other's workers: the generator gets `--client-threads` workers (default 1: it mostly
//! waits) and the server gets `--server-threads` (default: the remaining CPUs, at least 1).
//! While wrk runs the server has `--wrk-server-threads`. (These size the runtime that
//! accepts connections and runs the server's background tasks; the connections themselves
//! are served on `tern_server::lanes`' request workers, one per CPU, in every case.)
//! SQLite work runs on sqlx's own
//! per-connection threads and PostgreSQL in its own processes, so the report gives the CPU
//! each group used during the measured window (percent of one core), for the tern runs and
//! for the nginx runs alike (nginx runs one worker per CPU, wrk 2 threads).

mod alternate;
mod breakdown;
pub mod campaign;
mod cpu;
mod load;
mod nginx;
mod report;
mod sim;
mod wrk;

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use self::breakdown::measure_breakdown;
use self::cpu::Probe;
use self::load::{
    checkin_requests, fetch_challenges, http_client, load_run, open_sessions, poll_requests, sanity_checkin, Expect,
    Load,
};
use self::nginx::run_reference;
use self::report::Report;
use self::sim::{sqlite_dir, SimDevices};
use self::wrk::{wrk_script, Wrk, WrkCheck, WrkRequest};
use crate::output::{json, Format};
use crate::pg::PrivatePostgres;
use crate::tools::{require_tools, Tool};

/// Warm-up before every measured window.
pub(super) const WARMUP: Duration = Duration::from_secs(1);
/// The reference's static file.
pub(super) const STATIC_NAME: &str = "4k.bin";
pub(super) const STATIC_BYTES: usize = 4096;
/// What the answer to a poll with nothing new contains.
pub(super) const NOTHING_NEW: &str = "\"checkin\":false";
/// The goals: at least this fraction of nginx's rate, p99 at most this.
pub(super) const GOAL_RATIO: f64 = 0.5;
pub(super) const GOAL_P99_MS: f64 = 50.0;
/// Thread names, by which the CPU report groups this process's threads.
pub(super) const SERVER_THREAD: &str = "tern-bench-srv";
pub(super) const CLIENT_THREAD: &str = "tern-bench-cli";

/// `tern-bench server`.
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
    /// Worker threads of the server's main runtime (its listener and background jobs; its
    /// connections and handlers run on its request and check-in workers, one each per CPU)
    /// while this command's load generator runs (default: the CPUs left by the generator,
    /// at least 1).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Worker threads of the server's main runtime while wrk polls it (default: every CPU;
    /// wrk is a separate process in both cases).
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
    client_rt.block_on(fetch_challenges(&client, &base, &sims.active))?;
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
        Load::new(poll_requests(&base, &sims.active, &tokens)?, Expect::NOTHING_NEW),
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
        Load {
            make: checkin_requests(&base, sims.active.clone()),
            expect: Expect::OK,
            on_answer: {
                let devices = sims.active.clone();
                Some(Arc::new(move |n: usize, body: &[u8]| devices[n].answered(body)))
            },
        },
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

    // The same database and key directory, the main runtime sized for wrk, which is a
    // separate process: the tokens issued above stay valid.
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
                "tern poll via wrk: server restarted ({} request workers, main runtime {wrk_server_threads} \
                 worker(s)); {} connections, {} threads, 1 s warm-up run + {} s measured",
                tern_server::lanes::workers(),
                wrk.connections,
                wrk.threads,
                a.duration_secs
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
