//! `tern-bench verify`: `tern bundle verify` of one large payload beside `openssl dgst
//! -sha256` of the same bytes, and the verifying process's peak RSS.

use std::fs;
use std::path::PathBuf;
use std::process::Command as Process;
use std::time::Duration;

use crate::fixture::{best_of, make_bundle, parse_size, run_quiet, work_dir};
use crate::output::{json, Format};

/// `tern-bench verify`, `install` and `encrypted`.
#[derive(Debug, clap::Args)]
pub struct Args {
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

/// Run the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let exe = crate::product::tern()?;
    let (dir, _temp) = work_dir(a.dir.as_ref(), "tern-bench-")?;
    eprintln!("preparing a {size}-byte payload and its bundle in {}", dir.display());
    let (bundle, root, payload) = make_bundle(&dir, size)?;
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
