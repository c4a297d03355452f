//! `tern-bench encrypted`: the cost of encryption, each figure beside its comparison point
//! measured in the same run.
//!
//! 1. Install of a random image from an encrypted bundle against the same image in a plain
//!    bundle, on fresh simulated devices, alternating, best of N each.
//! 2. Decryption throughput of the record layer (`stream_aead::Decryptor`, in memory) at
//!    the default 64 KiB records and at 16 KiB records, beside `openssl speed -evp
//!    aes-256-gcm -bytes 16384` (encryption, and `-decrypt`).
//! 3. The bundle's size per recipient: the same payload bundled for 1 and for 1,001
//!    recipients.

use std::io::Read;
use std::process::Command as Process;
use std::time::Duration;

use anyhow::{bail, Context};
use tern_core::keywrap::{DataKey, RecipientSecret};
use tern_core::stream_aead;

use crate::fixture::{best_of, make_bundle_of, parse_size, timed_install, work_dir, write_random};
use crate::output::{json, Format};
use crate::verify::Args;

/// `openssl speed -evp aes-256-gcm -bytes 16384` in bytes per second (`-decrypt` if asked).
fn openssl_speed(decrypt: bool) -> anyhow::Result<f64> {
    let mut cmd = Process::new("openssl");
    cmd.arg("speed");
    if decrypt {
        cmd.arg("-decrypt");
    }
    cmd.args(["-evp", "aes-256-gcm", "-bytes", "16384", "-seconds", "3"]);
    let out = cmd.output().context("running openssl speed")?;
    if !out.status.success() {
        bail!("openssl speed failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().starts_with("aes-256-gcm"))
        .context("openssl speed printed no AES-256-GCM line")?;
    let k: f64 = line
        .split_whitespace()
        .last()
        .and_then(|v| v.strip_suffix('k'))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("openssl speed line `{line}`"))?;
    Ok(k * 1000.0)
}

/// Decryption throughput (plaintext bytes per second) of `plain` sealed in 2^`log2` records.
fn decrypt_speed(plain: &[u8], log2: u8, runs: u32) -> anyhow::Result<f64> {
    let key = DataKey::generate()?;
    let record_key = key.record_key();
    let ct = stream_aead::seal_all(&record_key[..], log2, plain)?;
    let mut buf = vec![0u8; 1 << 20];
    let best = best_of(runs, || {
        let mut d = stream_aead::Decryptor::new(&ct[..], &record_key[..])?;
        let mut n = 0usize;
        loop {
            let k = d.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n != plain.len() {
            bail!("decrypted {n} bytes of {}", plain.len());
        }
        Ok(())
    })?;
    Ok(plain.len() as f64 / best.as_secs_f64())
}

/// Run the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let exe = crate::product::tern()?;
    let (dir, _temp) = work_dir(a.dir.as_ref(), "tern-bench-encrypted-")?;
    eprintln!(
        "preparing a {size}-byte image, a plain and an encrypted bundle in {}",
        dir.display()
    );
    let payload = dir.join("payload.img");
    write_random(&payload, size)?;
    let (device, device_pem) = RecipientSecret::generate()?;
    let plain_dir = dir.join("plain");
    let enc_dir = dir.join("encrypted");
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::create_dir_all(&enc_dir)?;
    let (plain_bundle, plain_root) = make_bundle_of(&plain_dir, &payload, &[])?;
    let (enc_bundle, enc_root) = make_bundle_of(&enc_dir, &payload, std::slice::from_ref(device.public()))?;
    std::fs::remove_file(&payload)?;
    for f in [&plain_bundle, &enc_bundle] {
        std::io::copy(&mut std::fs::File::open(f)?, &mut std::io::sink())?;
    }
    // Alternating, so that both see the same machine.
    let (mut plain, mut enc) = (Duration::MAX, Duration::MAX);
    // The encrypted install first in each round, so that the children's peak RSS after the
    // first one is its own.
    let mut enc_rss = 0;
    for run in 0..a.runs.max(1) {
        let key = Some(device_pem.as_str());
        enc = enc.min(timed_install(&exe, &enc_dir, &enc_root, &enc_bundle, size, key)?);
        if run == 0 {
            enc_rss = crate::rusage::children_peak_rss();
        }
        plain = plain.min(timed_install(&exe, &plain_dir, &plain_root, &plain_bundle, size, None)?);
    }
    let install_ratio = plain.as_secs_f64() / enc.as_secs_f64();
    let plain_size = std::fs::metadata(&plain_bundle)?.len();
    let enc_size = std::fs::metadata(&enc_bundle)?.len();
    std::fs::remove_dir_all(&plain_dir)?;
    std::fs::remove_dir_all(&enc_dir)?;

    // Decryption, in memory.
    let sample_len = size.min(1 << 30) as usize;
    let mut sample = vec![0u8; sample_len];
    aws_lc_rs::rand::fill(&mut sample).map_err(|_| anyhow::anyhow!("random source failed"))?;
    let dec_64k = decrypt_speed(&sample, stream_aead::DEFAULT_LOG2_RECORD, a.runs)?;
    let dec_16k = decrypt_speed(&sample, 14, a.runs)?;
    drop(sample);
    let openssl_enc = openssl_speed(false)?;
    let openssl_dec = openssl_speed(true).ok();

    // Size per recipient: 1 and 1,001 recipients of one small payload.
    let small = dir.join("small.img");
    write_random(&small, 1 << 20)?;
    let mut sizes = Vec::new();
    for n in [1usize, 1001] {
        let d = dir.join(format!("recipients-{n}"));
        std::fs::create_dir_all(&d)?;
        let keys = (0..n)
            .map(|_| RecipientSecret::generate().map(|(k, _)| k.public().clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let (b, _) = make_bundle_of(&d, &small, &keys)?;
        sizes.push(std::fs::metadata(&b)?.len());
        std::fs::remove_dir_all(&d)?;
    }
    let per_recipient = (sizes[1] - sizes[0]) as f64 / 1000.0;

    let mb = |bps: f64| bps / 1e6;
    let report = serde_json::json!({
        "image_bytes": size,
        "plain_install_seconds": plain.as_secs_f64(),
        "encrypted_install_seconds": enc.as_secs_f64(),
        "encrypted_over_plain_throughput": install_ratio,
        "plain_bundle_bytes": plain_size,
        "encrypted_bundle_bytes": enc_size,
        "decrypt_64k_records_mb_per_s": mb(dec_64k),
        "decrypt_16k_records_mb_per_s": mb(dec_16k),
        "openssl_speed_aes_256_gcm_16k_mb_per_s": mb(openssl_enc),
        "openssl_speed_decrypt_aes_256_gcm_16k_mb_per_s": openssl_dec.map(mb),
        "bundle_bytes_1_recipient": sizes[0],
        "bundle_bytes_1001_recipients": sizes[1],
        "bytes_per_recipient": per_recipient,
        "encrypted_install_peak_rss_bytes": enc_rss,
    });
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            let secs = |d: Duration| d.as_secs_f64();
            let rate = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
            println!("image                                   {size} bytes, random, raw, into a file slot (fsynced)");
            println!(
                "install, plain bundle     (best of {})   {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                secs(plain),
                rate(plain)
            );
            println!(
                "install, encrypted bundle (best of {})   {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                secs(enc),
                rate(enc)
            );
            println!("encrypted / plain throughput            {install_ratio:.2}x (goal >= 0.85x)");
            println!(
                "peak RSS, encrypted install             {:.1} MiB",
                enc_rss as f64 / (1 << 20) as f64
            );
            println!(
                "bundle size, plain / encrypted          {plain_size} / {enc_size} bytes (+{})",
                enc_size as i64 - plain_size as i64
            );
            println!("decrypt, 64 KiB records (in memory)     {:>7.0} MB/s", mb(dec_64k));
            println!("decrypt, 16 KiB records (in memory)     {:>7.0} MB/s", mb(dec_16k));
            println!(
                "openssl speed -evp aes-256-gcm, 16 KiB  {:>7.0} MB/s (encrypt)",
                mb(openssl_enc)
            );
            if let Some(d) = openssl_dec {
                println!("openssl speed -decrypt, 16 KiB          {:>7.0} MB/s", mb(d));
            }
            println!(
                "bundle, 1 / 1,001 recipients            {} / {} bytes: {per_recipient:.0} bytes per recipient",
                sizes[0], sizes[1]
            );
            Ok(())
        }
    }
}
