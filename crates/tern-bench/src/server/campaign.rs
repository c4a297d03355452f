//! `tern-bench rollout-run`: a fleet of simulated devices goes through a three-phase rollout
//! on `tern server run` (a child process; SQLite by default, `--postgres` for a private
//! cluster). Each device has its own Ed25519 key and speaks the agent's protocol over real
//! HTTP: it polls with its session token every `--poll-secs`, sends a signed check-in
//! answering its challenge when the poll asks for one, and, given an order, reports
//! downloading, installing, rebooting, trial (booted from the new slot) and committed, one
//! signed check-in each. Printed: the phases' timeline, the server's CPU seconds (and
//! PostgreSQL's) per updated device, and, phase by phase, the poll rate wrk reaches while
//! the rollout runs beside nginx serving a 4 KiB file to the same wrk with the same kind of
//! script, in slices alternated with the poll's for as long as the rollout runs (so both
//! meet the same background load: `alternate`); and nginx alone once the rollout is over.

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tern_core::director::{self, CheckIn, DeploymentReport, SlotReport, Stage};
use tern_core::DateTime;

use super::alternate::{self, Alternation, Rates, Side};
use super::cpu::Probe;
use super::nginx::Nginx;
use super::wrk::{wrk_script, Wrk, WrkCheck, WrkRequest};
use super::STATIC_BYTES;
use crate::output::{json as print_json, Format};
use crate::pg::PrivatePostgres;
use crate::procfs::{process_cpu, process_tree_cpu};
use crate::soak::setup::{self, DeviceKey};
use crate::tools::{require_tools, Tool};

/// The goal: polls while a rollout runs at least this share of nginx's rate, in every phase.
const GOAL_RATIO: f64 = 0.8;
/// wrk's connections (simulated devices polling flat out) and threads.
const WRK_CONNECTIONS: usize = 64;
const WRK_THREADS: usize = 2;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Simulated devices, each with its own key, all selected by the rollout
    #[arg(long, default_value_t = 10_000)]
    pub devices: usize,
    /// Seconds between a device's polls
    #[arg(long, default_value_t = 5)]
    pub poll_secs: u64,
    /// Milliseconds between the reports of one device's install
    #[arg(long, default_value_t = 200)]
    pub stage_ms: u64,
    /// Seconds of each of wrk's slices while the rollout runs (tern's poll and nginx by turns)
    #[arg(long, default_value_t = 1)]
    pub slice_secs: u64,
    /// Measured seconds of nginx alone, once the rollout is over
    #[arg(long, default_value_t = 5)]
    pub wrk_secs: u64,
    /// Give up when the rollout has not finished after this many seconds
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Run the server on a private PostgreSQL cluster (initdb in a temporary directory)
    #[arg(long)]
    pub postgres: bool,
    /// Worker threads of the simulated fleet's runtime
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Report format
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// What every device task shares.
struct Fleet {
    base: String,
    clients: Vec<reqwest::Client>,
    devices: Vec<DeviceKey>,
    /// Each device's session token, once it has one (wrk polls with some of them).
    tokens: Vec<Mutex<Option<String>>>,
    poll: Duration,
    stage: Duration,
    stop: AtomicBool,
    polls: AtomicU64,
    checkins: AtomicU64,
    updated: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Fleet {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.first_error.lock() {
            e.get_or_insert(what);
        }
    }
}

/// A device's order: rollout, target and version (the release's name).
type Order = (String, String, String);

/// What one device remembers.
#[derive(Default)]
struct Device {
    challenge: Option<String>,
    order: Option<Order>,
    /// The target and version its booted slot holds once it has rebooted into the update.
    installed: Option<(String, String)>,
    /// The order it has reported committed.
    finished: Option<Order>,
}

/// The answer to one check-in.
struct Answer {
    order: Option<Order>,
}

async fn checkin(f: &Fleet, n: usize, d: &mut Device, stage: Option<Stage>) -> anyhow::Result<Answer> {
    let dev = &f.devices[n];
    let client = &f.clients[n % f.clients.len()];
    for attempt in 0..3 {
        let challenge = match d.challenge.take() {
            Some(c) => c,
            None => {
                let url = format!("{}/api/v1/devices/{}/challenge", f.base, dev.id);
                let resp = client.get(&url).send().await?;
                if !resp.status().is_success() {
                    bail!("GET challenge of {}: HTTP {}", dev.id, resp.status());
                }
                let v: Value = serde_json::from_slice(&resp.bytes().await?).context("a challenge")?;
                v["challenge"]
                    .as_str()
                    .context("no challenge in the answer")?
                    .to_owned()
            }
        };
        let booted = match &d.installed {
            Some((target, version)) => SlotReport {
                name: "rootfs.b".into(),
                booted: true,
                status: "committed".into(),
                version: Some(version.clone()),
                target: Some(target.clone()),
                sha256: None,
            },
            None => SlotReport {
                name: "rootfs.a".into(),
                booted: true,
                status: "committed".into(),
                version: Some("0.9.0".into()),
                target: None,
                sha256: None,
            },
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_secs() as i64);
        let doc = CheckIn {
            kind: director::CHECKIN_TYPE.into(),
            device_id: dev.id.clone(),
            nonce: tern_server::random_hex(16),
            challenge,
            time: DateTime::from_unix(now).to_string(),
            phase: if stage.is_some() {
                "installing".into()
            } else {
                "idle".into()
            },
            slots: vec![booted],
            deployment: match (&d.order, stage) {
                (Some((rollout, _, _)), Some(stage)) => Some(DeploymentReport {
                    deployment: rollout.clone(),
                    stage,
                    progress: None,
                    reason: None,
                }),
                _ => None,
            },
            refused_order: None,
        };
        let body = director::sign_document("check-in", &doc, &dev.key)?;
        let resp = client
            .post(format!("{}/api/v1/devices/{}/checkin", f.base, dev.id))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        f.checkins.fetch_add(1, Ordering::Relaxed);
        if status == reqwest::StatusCode::CONFLICT && attempt < 2 {
            // A stale challenge (a lost answer): fetch the current one and send again.
            continue;
        }
        if !status.is_success() {
            bail!(
                "check-in of {}: HTTP {status}: {}",
                dev.id,
                tern_core::text::shown_max(&String::from_utf8_lossy(&bytes), 200)
            );
        }
        let a: Value = serde_json::from_slice(&bytes).context("a check-in's answer")?;
        d.challenge = a["challenge"].as_str().map(str::to_owned);
        if let Some(t) = a["session"].as_str() {
            if let Ok(mut slot) = f.tokens[n].lock() {
                *slot = Some(t.to_owned());
            }
        }
        let order = &a["order"]["signed"];
        let order = match (
            order["deployment"].as_str(),
            order["targets"][0]["name"].as_str(),
            order["release"].as_str(),
        ) {
            (Some(r), Some(t), Some(v)) => Some((r.to_owned(), t.to_owned(), v.to_owned())),
            _ => None,
        };
        return Ok(Answer { order });
    }
    bail!("check-in of {}: the challenge kept changing", dev.id)
}

/// Whether the poll asks for a signed check-in (or cannot be answered with the token).
async fn poll(f: &Fleet, n: usize) -> anyhow::Result<bool> {
    let token = f.tokens[n].lock().ok().and_then(|t| t.clone());
    let Some(token) = token else { return Ok(true) };
    let dev = &f.devices[n];
    let resp = f.clients[n % f.clients.len()]
        .get(format!("{}/api/v1/devices/{}/poll", f.base, dev.id))
        .bearer_auth(token)
        .send()
        .await?;
    f.polls.fetch_add(1, Ordering::Relaxed);
    let status = resp.status();
    let body = resp.bytes().await?;
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return Ok(true);
    }
    if !status.is_success() {
        bail!("poll of {}: HTTP {status}", dev.id);
    }
    Ok(!super::load::contains(&body, super::NOTHING_NEW))
}

/// One device: poll, check in when asked, install what it is ordered.
async fn device(f: Arc<Fleet>, n: usize) {
    // Spread over one poll interval, as a fleet's devices are.
    let spread = f.poll.as_millis() as u64 * n as u64 / f.devices.len().max(1) as u64;
    tokio::time::sleep(Duration::from_millis(spread)).await;
    let mut d = Device::default();
    while !f.stop.load(Ordering::Relaxed) {
        let step = async {
            if poll(&f, n).await? {
                let a = checkin(&f, n, &mut d, None).await?;
                // An install a transport error interrupted is resumed, as an agent does:
                // the server ignores a stage the row has passed.
                if let Some(order) = a.order {
                    if d.finished.as_ref() != Some(&order) {
                        d.order = Some(order.clone());
                        install(&f, n, &mut d).await?;
                        d.finished = Some(order);
                    }
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = step.await {
            f.error(format!("{e:#}"));
        }
        tokio::time::sleep(f.poll).await;
    }
}

/// Report each stage of the install, one signed check-in each; the reboot boots the new slot.
async fn install(f: &Fleet, n: usize, d: &mut Device) -> anyhow::Result<()> {
    for stage in [
        Stage::Downloading,
        Stage::Installing,
        Stage::Rebooting,
        Stage::Trial,
        Stage::Committed,
    ] {
        tokio::time::sleep(f.stage).await;
        if stage == Stage::Trial {
            d.installed = d.order.as_ref().map(|(_, t, v)| (t.clone(), v.clone()));
        }
        checkin(f, n, d, Some(stage)).await?;
    }
    f.updated.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// What the run measured.
struct Outcome {
    devices: usize,
    backend: &'static str,
    registration: Duration,
    elapsed: Duration,
    phases_opened_at: Vec<f64>,
    status: String,
    succeeded: u64,
    updated: u64,
    server_cpu: f64,
    postgres_cpu: Option<f64>,
    wrk_cpu: f64,
    fleet_cpu: f64,
    polls: u64,
    checkins: u64,
    errors: u64,
    first_error: Option<String>,
    /// Each phase's poll and nginx rates while the rollout ran, and all phases'.
    phases: Vec<(usize, Rates)>,
    during: Rates,
    slice_secs: u64,
    nginx_alone: super::load::Figures,
    cpus: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.devices < 100 || a.poll_secs == 0 || a.wrk_secs == 0 || a.slice_secs == 0 || a.client_threads == 0 {
        bail!("--devices must be at least 100; --poll-secs, --slice-secs, --wrk-secs and --client-threads at least 1");
    }
    let found = require_tools(&[
        Tool::new("nginx", &["/usr/sbin/nginx", "nginx"], "nginx"),
        Tool::new("wrk", &["wrk"], "wrk"),
    ])?;
    let (nginx_bin, wrk_bin) = (found[0].clone(), found[1].clone());
    let wrk = Wrk {
        bin: wrk_bin,
        threads: WRK_THREADS,
        connections: WRK_CONNECTIONS,
    };
    let exe = crate::product::tern()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let temp = tempfile::Builder::new().prefix("tern-bench-rollout-run-").tempdir()?;
    let dir = temp.path().to_owned();
    let pg = if a.postgres {
        Some(PrivatePostgres::start()?)
    } else {
        None
    };
    let database_url = match &pg {
        Some(pg) => pg.url(),
        None => format!("sqlite://{}?mode=rwc", dir.join("srv/tern.db").display()),
    };
    let backend = if pg.is_some() { "PostgreSQL" } else { "SQLite" };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads)
        .thread_name(super::CLIENT_THREAD)
        .enable_all()
        .build()?;

    eprintln!("publishing a release with {} ({backend})", exe.display());
    let fleet = setup::publish(&exe, &dir, &database_url, &[("TERN_SERVER_ROLLOUT_TICK_MS", "200")])?;
    eprintln!("generating {} device keys", a.devices);
    let devices = setup::device_keys(a.devices)?;
    let mut tries = 0;
    let registration = loop {
        // SQLite may refuse a transaction that read before the running server wrote.
        match rt.block_on(setup::register(&database_url, &devices)) {
            Ok(t) => break t,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("registering again: {e:#}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    eprintln!(
        "registered {} devices in {:.2} s",
        a.devices,
        registration.as_secs_f64()
    );

    let shared = Arc::new(Fleet {
        base: fleet.server.url.clone(),
        clients: crate::soak::clients(a.devices)?,
        tokens: (0..devices.len()).map(|_| Mutex::new(None)).collect(),
        devices,
        poll: Duration::from_secs(a.poll_secs),
        stage: Duration::from_millis(a.stage_ms),
        stop: AtomicBool::new(false),
        polls: AtomicU64::new(0),
        checkins: AtomicU64::new(0),
        updated: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let admin = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()?;
    let api = |method: reqwest::Method, path: &str, body: Option<Value>| -> anyhow::Result<Value> {
        rt.block_on(async {
            let mut req = admin
                .request(method, format!("{}{path}", fleet.server.url))
                .bearer_auth(&fleet.admin);
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b.to_string());
            }
            let resp = req.send().await?;
            let status = resp.status();
            let v: Value = serde_json::from_slice(&resp.bytes().await?).unwrap_or_default();
            if !status.is_success() {
                bail!("{path}: HTTP {status}: {v}");
            }
            Ok(v)
        })
    };

    // nginx serves beside the server for the whole run: wrk loads each by turns.
    let nginx = Nginx::start(&nginx_bin)?;
    let gets: Vec<WrkRequest> = (0..WRK_CONNECTIONS)
        .map(|_| WrkRequest {
            path: format!("/{}", super::STATIC_NAME),
            authorization: None,
        })
        .collect();
    let nginx_script = dir.join("nginx.lua");
    fs::write(
        &nginx_script,
        wrk_script(&gets, wrk.threads, &WrkCheck::Len(STATIC_BYTES)),
    )?;

    // The fleet starts polling, then the rollout is created.
    let server_pid = fleet.server.pid();
    let postmaster = pg.as_ref().and_then(PrivatePostgres::postmaster_pid);
    let fleet_cpu0 = process_cpu(std::process::id()).unwrap_or(0.0);
    let cpu0 = process_cpu(server_pid).unwrap_or(0.0);
    let pg_cpu0 = postmaster.map(process_tree_cpu);
    let tasks: Vec<_> = (0..a.devices).map(|n| rt.spawn(device(shared.clone(), n))).collect();
    let t0 = Instant::now();
    let created = api(
        reqwest::Method::POST,
        "/api/v1/rollouts",
        Some(json!({
            "release": fleet.release,
            "selector": {"tags": [setup::TAG]},
            "phases": [
                {"percent": 10.0, "success_percent": 95.0},
                {"percent": 50.0, "success_percent": 95.0},
                {"percent": 100.0},
            ],
            "error": {"percent": 5.0, "min_finished": 20},
        })),
    )?;
    let id = created["id"].as_str().context("no rollout id")?.to_owned();
    eprintln!("rollout {id}: 10 %, 50 %, 100 % of {} devices", a.devices);
    let mut opened_at = vec![0.0];
    let phases_open = Arc::new(AtomicUsize::new(1));
    let mut alternation: Option<Alternation> = None;
    let mut last_report = Instant::now();
    let deadline = t0 + Duration::from_secs(a.timeout_secs);
    let status = loop {
        std::thread::sleep(Duration::from_millis(500));
        let v = api(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)?;
        let opened = v["opened"].as_u64().unwrap_or(1) as usize;
        phases_open.store(opened, Ordering::Relaxed);
        while opened_at.len() < opened {
            opened_at.push(t0.elapsed().as_secs_f64());
            eprintln!(
                "phase {} opened at {:.1} s",
                opened_at.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        let status = v["status"].as_str().unwrap_or("").to_owned();
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let counts: Vec<String> = v["phases"]
                .as_array()
                .map(|ps| ps.iter().map(|p| p["counts"].to_string()).collect())
                .unwrap_or_default();
            eprintln!(
                "{:.0} s: {status}, {opened} open; {} polls, {} check-ins, {} updated, {} errors{}; phases {}",
                t0.elapsed().as_secs_f64(),
                shared.polls.load(Ordering::Relaxed),
                shared.checkins.load(Ordering::Relaxed),
                shared.updated.load(Ordering::Relaxed),
                shared.errors.load(Ordering::Relaxed),
                shared
                    .first_error
                    .lock()
                    .ok()
                    .and_then(|e| e.clone())
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default(),
                counts.join(" ")
            );
        }
        if alternation.is_none() && status == "running" {
            // wrk polls as 64 devices that have a session, flat out, by turns with nginx.
            let polls: Vec<WrkRequest> = shared
                .tokens
                .iter()
                .zip(&shared.devices)
                .filter_map(|(t, d)| Some((t.lock().ok()?.clone()?, d)))
                .take(WRK_CONNECTIONS)
                .map(|(t, d)| WrkRequest {
                    path: format!("/api/v1/devices/{}/poll", d.id),
                    authorization: Some(format!("Bearer {t}")),
                })
                .collect();
            if polls.len() == WRK_CONNECTIONS {
                let script = dir.join("poll.lua");
                fs::write(
                    &script,
                    wrk_script(&polls, wrk.threads, &WrkCheck::Contains("\"checkin\":")),
                )?;
                eprintln!(
                    "wrk loads tern's poll and nginx by turns, {} s each, while the rollout runs",
                    a.slice_secs
                );
                alternation = Some(Alternation::start(
                    wrk.clone(),
                    Side {
                        url: fleet.server.url.clone(),
                        script,
                    },
                    Side {
                        url: nginx.url(),
                        script: nginx_script.clone(),
                    },
                    a.slice_secs,
                    phases_open.clone(),
                    server_pid,
                ));
            }
        }
        if !matches!(status.as_str(), "running" | "ready" | "scheduled") || Instant::now() > deadline {
            break v;
        }
    };
    let elapsed = t0.elapsed();
    let pairs = match alternation {
        Some(a) => a.finish()?,
        None => Vec::new(),
    };
    // wrk's polls are not the rollout's work: their CPU is set apart (polls do not reach
    // the database).
    let wrk_cpu = alternate::wrk_poll_cpu(&pairs);
    let server_cpu = process_cpu(server_pid).unwrap_or(0.0) - cpu0 - wrk_cpu;
    let postgres_cpu = postmaster.zip(pg_cpu0).map(|(p, c0)| process_tree_cpu(p) - c0);
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let fleet_cpu = process_cpu(std::process::id()).unwrap_or(0.0) - fleet_cpu0;
    let succeeded: u64 = status["phases"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["counts"]["succeeded"].as_u64()).sum())
        .unwrap_or(0);
    if pairs.is_empty() {
        bail!(
            "the rollout was over after {:.1} s, before wrk could poll during it and load nginx in turn",
            elapsed.as_secs_f64()
        );
    }
    let log = fleet.server.log.clone();
    drop(fleet);
    drop(pg);

    eprintln!("nginx alone via wrk, the same kind of script, {} s", a.wrk_secs);
    let probe = Probe {
        this_process: false,
        postmaster: None,
        nginx: Some(nginx.pid()),
    };
    let nginx_alone = wrk.run(
        &nginx.url(),
        Some(&nginx_script),
        Duration::from_secs(a.wrk_secs),
        &probe,
    )?;

    let out = Outcome {
        devices: a.devices,
        backend,
        registration,
        elapsed,
        phases_opened_at: opened_at,
        status: status["status"].as_str().unwrap_or("").to_owned(),
        succeeded,
        updated: shared.updated.load(Ordering::Relaxed),
        server_cpu,
        postgres_cpu,
        wrk_cpu,
        fleet_cpu,
        polls: shared.polls.load(Ordering::Relaxed),
        checkins: shared.checkins.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: shared.first_error.lock().ok().and_then(|e| e.clone()),
        phases: alternate::by_phase(&pairs),
        during: Rates::of(pairs.iter()),
        slice_secs: a.slice_secs,
        nginx_alone,
        cpus,
    };
    match a.output {
        Format::Json => print_json(&out.to_json())?,
        Format::Text => out.print(),
    }
    if out.status != "finished" || out.first_error.is_some() {
        let log = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("the server's log, last lines:");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    if out.status != "finished" {
        bail!(
            "the rollout is {}, not finished, after {:.0} s",
            out.status,
            elapsed.as_secs_f64()
        );
    }
    if let Some(e) = &out.first_error {
        // A device whose request failed tries again at its next poll, as an agent does: the
        // failures are reported, and the rollout must still have finished.
        eprintln!("{} device requests failed; the first: {e}", out.errors);
    }
    Ok(())
}

impl Outcome {
    /// The lowest phase's ratio of the poll to nginx, both while the rollout ran.
    fn lowest(&self) -> f64 {
        self.phases.iter().map(|(_, r)| r.ratio()).fold(f64::INFINITY, f64::min)
    }

    /// The poll while the rollout ran against nginx alone afterwards.
    fn against_alone(&self) -> f64 {
        self.during.tern / self.nginx_alone.rate.max(1.0)
    }

    fn per_device(&self, cpu: f64) -> f64 {
        cpu / self.succeeded.max(1) as f64
    }

    fn print(&self) {
        let when: Vec<String> = self.phases_opened_at.iter().map(|t| format!("{t:.1} s")).collect();
        println!(
            "devices             {} registered in {:.2} s ({}; each its own Ed25519 key)",
            self.devices,
            self.registration.as_secs_f64(),
            self.backend
        );
        println!(
            "rollout             10 % / 50 % / 100 %, 95 % success to open the next; phases opened at {}; {} after {:.1} s",
            when.join(", "),
            self.status,
            self.elapsed.as_secs_f64()
        );
        println!(
            "devices updated     {} succeeded (server), {} finished their install (fleet)",
            self.succeeded, self.updated
        );
        println!(
            "fleet's requests    {} polls, {} signed check-ins, {} failed",
            self.polls, self.checkins, self.errors
        );
        println!(
            "server CPU          {:.2} s in all, {:.2} ms per updated device (besides {:.2} s answering wrk's polls)",
            self.server_cpu,
            self.per_device(self.server_cpu) * 1e3,
            self.wrk_cpu
        );
        if let Some(pg) = self.postgres_cpu {
            println!(
                "PostgreSQL CPU      {:.2} s in all, {:.2} ms per updated device",
                pg,
                self.per_device(pg) * 1e3
            );
        }
        println!(
            "simulated fleet CPU {:.2} s (signing, HTTP; this process, on the same {} CPUs)",
            self.fleet_cpu, self.cpus
        );
        println!(
            "poll beside nginx while the rollout runs: wrk ({WRK_CONNECTIONS} connections, {WRK_THREADS} threads, the same kind of script) loads each by turns, {} s slices",
            self.slice_secs
        );
        let row = |name: &str, r: &Rates| {
            println!(
                "  {name:<9} tern poll {:>6.0}/s (p99 {:>5.2} ms)  nginx 4 KiB {:>6.0}/s (p99 {:>5.2} ms)  {:.3}x  ({} pairs, {} errors)",
                r.tern, r.tern_p99_ms, r.nginx, r.nginx_p99_ms, r.ratio(), r.pairs, r.errors
            );
            if let Some(e) = &r.an_error {
                println!("            e.g. {e}");
            }
        };
        for (phase, r) in &self.phases {
            row(&format!("phase {phase}"), r);
        }
        row("all", &self.during);
        let lowest = self.lowest();
        println!(
            "tern poll / nginx while the rollout runs, lowest phase  {lowest:.3}x   goal >= {GOAL_RATIO}x: {}",
            if lowest >= GOAL_RATIO { "met" } else { "NOT met" }
        );
        println!(
            "nginx alone after the rollout      {:.0}/s, p99 {:.2} ms; the poll during the rollout / nginx alone {:.3}x (the fleet, its check-ins{} share the {} CPUs)",
            self.nginx_alone.rate,
            self.nginx_alone.p99_ms,
            self.against_alone(),
            if self.postgres_cpu.is_some() { " and PostgreSQL" } else { "" },
            self.cpus
        );
    }

    fn to_json(&self) -> Value {
        json!({
            "devices": self.devices,
            "backend": self.backend,
            "registration_s": self.registration.as_secs_f64(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "phases_opened_at_s": self.phases_opened_at,
            "status": self.status,
            "succeeded": self.succeeded,
            "updated_by_fleet": self.updated,
            "server_cpu_s": self.server_cpu,
            "server_cpu_ms_per_updated_device": self.per_device(self.server_cpu) * 1e3,
            "server_cpu_for_wrk_polls_s": self.wrk_cpu,
            "postgres_cpu_s": self.postgres_cpu,
            "fleet_cpu_s": self.fleet_cpu,
            "polls": self.polls,
            "checkins": self.checkins,
            "errors": self.errors,
            "first_error": self.first_error,
            "slice_s": self.slice_secs,
            "phases": self
                .phases
                .iter()
                .map(|(phase, r)| json!({"phase": phase, "rates": rates_json(r)}))
                .collect::<Vec<_>>(),
            "during_rollout": rates_json(&self.during),
            "lowest_phase_ratio": self.lowest(),
            "goal_ratio": GOAL_RATIO,
            "nginx_alone_per_s": self.nginx_alone.rate,
            "nginx_alone_p99_ms": self.nginx_alone.p99_ms,
            "during_rollout_against_nginx_alone": self.against_alone(),
            "cpus": self.cpus,
        })
    }
}

fn rates_json(r: &Rates) -> Value {
    json!({
        "pairs": r.pairs,
        "tern_poll_per_s": r.tern,
        "tern_poll_p99_ms": r.tern_p99_ms,
        "nginx_per_s": r.nginx,
        "nginx_p99_ms": r.nginx_p99_ms,
        "ratio": r.ratio(),
        "errors": r.errors,
    })
}
