//! `tern-bench rollout`: what an operator's rollout costs at fleet scale. A fresh database
//! (SQLite in a temporary directory, a private PostgreSQL cluster with `--postgres`, or
//! `--database-url`) gets `--devices` approved devices through the server's bulk path, all
//! of one type and tag; then, in-process through the server's library (`fleet::create_rollout`,
//! `fleet::rollout`), a three-phase rollout over all of them (1 %, 10 %, 100 %, with an
//! error threshold and a window) is created `--repeat` times and its status summary read
//! `--repeat` × 4 times; one pass of the rollout engine then counts their selections (what
//! a running server does in the background on its next tick). Printed: each figure's median and worst, beside the goals of
//! issue 12 (creation ≤ 2 s and status ≤ 100 ms at 1,000,000 devices on PostgreSQL) and the
//! figure measured before rollouts (a deployment wrote one transaction per device: 69 s for
//! 100,000 devices on SQLite). The rows each creation wrote are counted from the database.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::pg::PrivatePostgres;

/// `tern-bench rollout`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Registered devices.
    #[arg(long, default_value_t = 1_000_000)]
    pub devices: usize,
    /// Rollouts created (and status reads × 4).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// A private PostgreSQL cluster (`initdb` in a temporary directory).
    #[arg(long)]
    pub postgres: bool,
    /// An existing database instead.
    #[arg(long, conflicts_with = "postgres")]
    pub database_url: Option<String>,
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap_or(&Duration::ZERO))
}

/// Run it.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.devices > 0 && a.repeat > 0,
        "--devices and --repeat must be at least 1"
    );
    let temp = tempfile::Builder::new().prefix("tern-bench-rollout-").tempdir()?;
    let pg = if a.postgres {
        Some(PrivatePostgres::start()?)
    } else {
        None
    };
    let mut cfg = tern_server::ServerConfig::for_data_dir(&temp.path().join("server"));
    cfg.database_url = pg.as_ref().map(PrivatePostgres::url).or(a.database_url.clone());
    let backend = match (&pg, &a.database_url) {
        (Some(pg), _) => format!("private PostgreSQL {} cluster, default settings", pg.version),
        (None, Some(_)) => "--database-url".into(),
        (None, None) => "SQLite in a temporary directory".into(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    tern_server::keys::init(&cfg.key_dir(), crate::output::now(), 1)?;
    let state = rt
        .block_on(tern_server::open(cfg))
        .context("opening the server's database")?;
    let (key, _) = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)?;
    let public = key.public();
    let rows: Vec<tern_server::db::NewDevice> = (0..a.devices)
        .map(|i| tern_server::db::NewDevice {
            id: format!("dev-{i:07}"),
            public_key: public.to_value().clone(),
            keyid: public.keyid().as_str().to_owned(),
            device_type: "tern-sim".into(),
            hardware: "bench".into(),
            tags: vec!["fleet".into()],
        })
        .collect();
    eprintln!("registering {} devices ({backend})", a.devices);
    let t = Instant::now();
    rt.block_on(state.db.register_devices(&rows))?;
    eprintln!("registered in {:.1} s", t.elapsed().as_secs_f64());
    // A release to roll out: its row only (no device is ordered in this benchmark).
    rt.block_on(sqlx_release(&state))?;

    let request = || -> anyhow::Result<tern_server::fleet::RolloutRequest> {
        Ok(serde_json::from_value(serde_json::json!({
            "release": "bench-1.0.0",
            "selector": {"tags": ["fleet"], "device_type": "tern-sim"},
            "phases": [{"percent": 1.0, "success_percent": 100.0}, {"percent": 10.0, "success_percent": 95.0}, {"percent": 100.0}],
            "error": {"percent": 5.0, "min_finished": 20},
            "window": {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "02:00", "end": "04:00", "time_zone": "Europe/Berlin"},
            "timeout_secs": 7200
        }))?)
    };
    let mut creates = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..a.repeat {
        let req = request()?;
        let t = Instant::now();
        let r = rt
            .block_on(tern_server::fleet::create_rollout(&state, req, "bench", "bench"))
            .map_err(|e| anyhow::anyhow!("creating the rollout: {e}"))?;
        creates.push(t.elapsed());
        anyhow::ensure!(!r.counted, "creation counted the selection: it should read no device");
        ids.push(r.id);
    }
    let written: i64 = rt.block_on(count_rows(&state))?;
    // The engine's first pass counts every new rollout's selection, in the background of
    // the server; timed here as one pass over all of them.
    let t = Instant::now();
    rt.block_on(tern_server::fleet::engine::tick(&state, &mut Default::default()))
        .map_err(|e| anyhow::anyhow!("the engine's pass: {e}"))?;
    let counting = t.elapsed() / a.repeat as u32;
    for id in &ids {
        let r = rt
            .block_on(tern_server::fleet::rollout(&state, id))
            .map_err(|e| anyhow::anyhow!("reading the status: {e}"))?
            .context("a rollout vanished")?;
        anyhow::ensure!(
            r.counted && r.totals.selected == a.devices as u64,
            "the rollout selects {} devices, not {}",
            r.totals.selected,
            a.devices
        );
    }
    let mut statuses = Vec::new();
    for i in 0..a.repeat * 4 {
        let t = Instant::now();
        let r = rt
            .block_on(tern_server::fleet::rollout(&state, &ids[i % ids.len()]))
            .map_err(|e| anyhow::anyhow!("reading the status: {e}"))?;
        statuses.push(t.elapsed());
        anyhow::ensure!(r.is_some(), "a rollout vanished");
    }
    let (create_med, create_max) = median(creates);
    let (status_med, status_max) = median(statuses);
    println!("rollout over {} devices, {backend}", a.devices);
    println!(
        "  create     median {:>9.1} ms  worst {:>9.1} ms   goal at 1,000,000 on PostgreSQL: <= 2000 ms",
        create_med.as_secs_f64() * 1e3,
        create_max.as_secs_f64() * 1e3
    );
    println!(
        "  status     median {:>9.2} ms  worst {:>9.2} ms   goal: <= 100 ms",
        status_med.as_secs_f64() * 1e3,
        status_max.as_secs_f64() * 1e3
    );
    println!(
        "  counting the selection (the engine, in the background, once per rollout and every 30 s while it runs): {:.1} ms",
        counting.as_secs_f64() * 1e3
    );
    println!(
        "  rows written per creation: {} (rollout rows + device rows + counters, over {} creations)",
        written as f64 / a.repeat as f64,
        a.repeat
    );
    println!("  before rollouts: one deployment wrote one transaction per device (69 s for 100,000 on SQLite)");
    Ok(())
}

/// The benchmark's release: its row only, written straight into the benchmark's own
/// database (no bundle is verified or served: no device is ordered here).
async fn sqlx_release(state: &tern_server::AppState) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO releases (name, targets, uploaded_at, uploaded_by) VALUES ($1, '[]', 0, 'bench')")
        .bind("bench-1.0.0")
        .execute(&state.db.write)
        .await
        .context("adding the benchmark's release row")?;
    Ok(())
}

/// Rows in the tables a rollout could write per device.
async fn count_rows(state: &tern_server::AppState) -> anyhow::Result<i64> {
    let mut n = 0;
    for t in ["rollouts", "rollout_devices", "rollout_counts", "device_history"] {
        let (c,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {t}"))
            .fetch_one(&state.db.pool)
            .await?;
        n += c;
    }
    Ok(n)
}
