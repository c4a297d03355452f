//! `tern bench`: throughput figures, each printed beside the machine's reference tool
//! measured in the same run.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use clap::Subcommand;
use tern_core::digest::HashAlgorithm;
use tern_core::manifest::Compression;
use tern_core::{KeyAlgorithm, SigningKey, TargetPath};
use tern_repo::{AddTarget, RepoConfig, Repository};

use crate::output::{json, now, Format};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// `tern bundle verify` of one large payload against `openssl dgst -sha256` of the same bytes.
    Verify(VerifyArgs),
}

/// `tern bench verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Payload size: bytes, or with KiB, MiB, GiB.
    #[arg(long, default_value = "1GiB")]
    pub size: String,
    /// Runs of each command; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s {
        _ if s.ends_with("GiB") => (&s[..s.len() - 3], 1u64 << 30),
        _ if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        _ if s.ends_with("KiB") => (&s[..s.len() - 3], 1 << 10),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size `{s}`: expected e.g. 1GiB, 256MiB or a byte count"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .with_context(|| format!("size `{s}` is out of range"))
}

fn best_of(runs: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn run_quiet(cmd: &mut Process) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    let rng = SystemRandom::new();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n])
            .map_err(|_| anyhow::anyhow!("random source failed"))?;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Build a one-payload bundle of `size` random bytes in `dir`; returns (bundle, root, payload).
pub fn make_bundle(dir: &Path, size: u64) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let key = SigningKey::generate(KeyAlgorithm::Ed25519)?.0;
    let roles: BTreeMap<String, _> = tern_core::TOP_LEVEL_ROLES
        .iter()
        .map(|r| (r.to_string(), (vec![key.public().clone()], 1)))
        .collect();
    let now = now();
    let (repo, _) = Repository::init(
        &dir.join("repo"),
        &roles,
        RepoConfig::default(),
        std::slice::from_ref(&key),
        now,
    )?;
    let payload = dir.join("payload.img");
    write_random(&payload, size)?;
    let name = TargetPath::new("payload.img")?;
    repo.add_target(
        &AddTarget {
            role: "targets".into(),
            name: name.clone(),
            source: payload.clone(),
            custom: None,
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::None,
        },
        std::slice::from_ref(&key),
        now,
    )?;
    repo.refresh(std::slice::from_ref(&key), now, false)?;
    let bundle = dir.join("bench.tern");
    tern_bundle::write_bundle(&repo.release_contents(&[name], true, now)?, &bundle)?;
    Ok((bundle, dir.join("repo/metadata/1.root.json"), payload))
}

/// Run a benchmark.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Verify(a) = cmd;
    let size = parse_size(&a.size)?;
    let (dir, _temp) = super::work_dir(a.dir.as_ref(), "tern-bench-")?;
    eprintln!("preparing a {size}-byte payload and its bundle in {}", dir.display());
    let (bundle, root, payload) = make_bundle(&dir, size)?;
    let exe = std::env::current_exe()?;
    // Warm the page cache for both files, so that both commands read from memory.
    for f in [&payload, &bundle] {
        std::io::copy(&mut fs::File::open(f)?, &mut std::io::sink())?;
    }
    // Tern runs first: the peak RSS read after it is that of `tern bundle verify` alone.
    let tern = best_of(a.runs, || {
        run_quiet(
            Process::new(&exe)
                .args(["bundle", "verify"])
                .arg(&bundle)
                .arg("--root")
                .arg(&root)
                .args(["--output", "json"]),
        )
    })?;
    let peak_rss = crate::rusage::children_peak_rss();
    let openssl = best_of(a.runs, || {
        run_quiet(Process::new("openssl").args(["dgst", "-sha256"]).arg(&payload))
    })?;
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let ratio = openssl.as_secs_f64() / tern.as_secs_f64();
    let report = serde_json::json!({
        "payload_bytes": size,
        "openssl_dgst_sha256_seconds": openssl.as_secs_f64(),
        "openssl_dgst_sha256_mb_per_s": mbps(openssl),
        "tern_bundle_verify_seconds": tern.as_secs_f64(),
        "tern_bundle_verify_mb_per_s": mbps(tern),
        "ratio_to_openssl": ratio,
        "peak_rss_bytes": peak_rss,
    });
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            println!("payload                          {size} bytes");
            println!(
                "openssl dgst -sha256 (best of {})  {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                openssl.as_secs_f64(),
                mbps(openssl)
            );
            println!(
                "tern bundle verify   (best of {})  {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                tern.as_secs_f64(),
                mbps(tern)
            );
            println!("ratio to openssl                 {ratio:.2}x");
            println!(
                "peak RSS of tern bundle verify   {:.1} MiB",
                peak_rss as f64 / (1 << 20) as f64
            );
            Ok(())
        }
    }
}
