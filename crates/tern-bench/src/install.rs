//! `tern-bench install`: install of an image from a local bundle into a file slot of a
//! simulated device, beside `openssl dgst -sha256`, and the agent's peak RSS for a 64 MiB
//! and the full-size image.

use std::fs;
use std::process::Command as Process;
use std::time::Duration;

use crate::fixture::{best_of, make_bundle, parse_size, run_quiet, timed_install, work_dir};
use crate::output::{json, Format};
use crate::verify::Args;

/// Run the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let exe = crate::product::tern()?;
    let (dir, _temp) = work_dir(a.dir.as_ref(), "tern-bench-install-")?;
    // The small image first: peak RSS is a running maximum over the children waited for.
    let small_dir = dir.join("small");
    fs::create_dir_all(&small_dir)?;
    let (small_bundle, small_root, _) = make_bundle(&small_dir, 64 << 20)?;
    timed_install(&exe, &small_dir, &small_root, &small_bundle, 64 << 20, None)?;
    let rss_small = crate::rusage::children_peak_rss();
    fs::remove_dir_all(&small_dir)?;
    eprintln!("preparing a {size}-byte image and its bundle in {}", dir.display());
    let (bundle, root, payload) = make_bundle(&dir, size)?;
    for f in [&payload, &bundle] {
        std::io::copy(&mut fs::File::open(f)?, &mut std::io::sink())?;
    }
    let mut best = Duration::MAX;
    for _ in 0..a.runs.max(1) {
        best = best.min(timed_install(&exe, &dir, &root, &bundle, size, None)?);
    }
    let rss_big = crate::rusage::children_peak_rss();
    let openssl = best_of(a.runs, || {
        run_quiet(Process::new("openssl").args(["dgst", "-sha256"]).arg(&payload))
    })?;
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let ratio = openssl.as_secs_f64() / best.as_secs_f64();
    let report = serde_json::json!({
        "image_bytes": size,
        "tern_install_seconds": best.as_secs_f64(),
        "tern_install_mb_per_s": mbps(best),
        "openssl_dgst_sha256_seconds": openssl.as_secs_f64(),
        "openssl_dgst_sha256_mb_per_s": mbps(openssl),
        "ratio_to_openssl": ratio,
        "peak_rss_64mib_bytes": rss_small,
        "peak_rss_full_bytes": rss_big,
    });
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            println!(
                "image                                {size} bytes, raw, uncompressed, into a file slot (fsynced)"
            );
            println!(
                "tern install        (best of {})      {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                best.as_secs_f64(),
                mbps(best)
            );
            println!(
                "openssl dgst -sha256 (best of {})     {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                openssl.as_secs_f64(),
                mbps(openssl)
            );
            println!("ratio to openssl                     {ratio:.2}x");
            println!(
                "peak RSS, 64 MiB image               {:.1} MiB",
                rss_small as f64 / (1 << 20) as f64
            );
            println!(
                "peak RSS, {size}-byte image   {:.1} MiB",
                rss_big as f64 / (1 << 20) as f64
            );
            Ok(())
        }
    }
}
