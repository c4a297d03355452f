//! Where a check-in's time goes (`--breakdown`): signing, parsing and verifying alone, the
//! disk's fsync latency, and under the same load the server's HTTP stack alone and HTTP
//! plus one indexed SELECT.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_core::director;
use tern_core::PublicKey;

use super::cpu::Probe;
use super::load::{get_requests, load_run, Expect, Figures, Load};
use super::sim::{checkin_body, SimDevices};
use super::Args;

pub(super) struct Breakdown {
    pub(super) sign_us: f64,
    pub(super) parse_us: f64,
    pub(super) key_us: f64,
    pub(super) verify_us: f64,
    pub(super) fsync_us: f64,
    pub(super) fsync_dir: PathBuf,
    pub(super) healthz: Figures,
    pub(super) one_select: Figures,
}

pub(super) fn measure_breakdown(
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
        Load::new(get_requests(format!("{base}/healthz")), Expect::OK),
        probe,
    )?;
    // One indexed SELECT through the read pool: the benchmark's repository is empty, so the
    // server looks the root up by primary key and answers 404.
    let one_select = load_run(
        rt,
        client,
        a.concurrency,
        duration,
        Load::new(
            get_requests(format!("{base}/repo/metadata/1.root.json")),
            Expect {
                status: 404,
                len: None,
                contains: None,
            },
        ),
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
pub(super) fn fsync_latency_us(dir: &Path) -> anyhow::Result<f64> {
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
