//! What the benchmarks share: work directories, sizes, timing, random payloads, one-payload
//! bundles signed by a throw-away repository, and timed installs on simulated devices.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use tern_core::digest::HashAlgorithm;
use tern_core::manifest::Compression;
use tern_core::{KeyAlgorithm, SigningKey, TargetPath};
use tern_repo::{AddTarget, RepoConfig, Repository};

use crate::output::now;

/// A working directory: the one given (created, kept), or a temporary one removed when the
/// returned guard drops.
pub fn work_dir(given: Option<&PathBuf>, prefix: &str) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(d) => {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Ok((d.clone(), None))
        }
        None => {
            let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

/// A size: bytes, or with KiB, MiB, GiB.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
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

/// The best wall time of `runs` runs of `f`.
pub fn best_of(runs: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

/// Run a command to its end, its output kept; its stderr is the error if it fails.
pub fn run_quiet(cmd: &mut Process) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `size` random bytes into `path`.
pub fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
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
    let payload = dir.join("payload.img");
    write_random(&payload, size)?;
    let (bundle, root) = make_bundle_of(dir, &payload, &[])?;
    Ok((bundle, root, payload))
}

/// Build a one-payload bundle of `payload` in `dir`, encrypted for `recipients` unless
/// there are none; returns (bundle, root).
pub fn make_bundle_of(
    dir: &Path,
    payload: &Path,
    recipients: &[tern_core::keywrap::RecipientKey],
) -> anyhow::Result<(PathBuf, PathBuf)> {
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
    let name = TargetPath::new("payload.img")?;
    repo.add_target(
        &AddTarget {
            role: "targets".into(),
            name: name.clone(),
            source: payload.to_owned(),
            // A raw rootfs image for the simulated device, so `install` can use it too.
            custom: Some(
                tern_core::manifest::Manifest {
                    version: "1.0.0".into(),
                    device_type: "tern-sim".into(),
                    hardware: vec![],
                    installer: tern_core::manifest::Installer::Raw,
                    slot_class: Some("rootfs".into()),
                    install_path: None,
                    compression: Compression::None,
                    encryption: None,
                    delta_base: None,
                    installed_length: None,
                }
                .to_custom(),
            ),
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::None,
            encrypt_for: recipients.to_vec(),
        },
        std::slice::from_ref(&key),
        now,
    )?;
    repo.refresh(std::slice::from_ref(&key), now, false)?;
    let bundle = dir.join("bench.tern");
    tern_bundle::write_bundle(&repo.release_contents(&[name], true, now)?, &bundle)?;
    Ok((bundle, dir.join("repo/metadata/1.root.json")))
}

/// Install `bundle` on a fresh simulated device in `dir` with the `tern` binary `exe`,
/// the device holding the encryption key `key_pem` (PKCS#8 PEM) if given; the wall time of
/// the install alone.
pub fn timed_install(
    exe: &Path,
    dir: &Path,
    root: &Path,
    bundle: &Path,
    size: u64,
    key_pem: Option<&str>,
) -> anyhow::Result<Duration> {
    let dev = dir.join("device");
    let _ = fs::remove_dir_all(&dev);
    let slot_mib = (size >> 20) + 2;
    run_quiet(
        Process::new(exe)
            .args(["device", "simulate", "--dir"])
            .arg(&dev)
            .arg("--root")
            .arg(root)
            .args(["--slot-mib", &slot_mib.to_string()]),
    )?;
    if let Some(pem) = key_pem {
        tern_fs::create_new(&dev.join("state/encryption.pem"), pem.as_bytes(), 0o600)?;
    }
    let t = Instant::now();
    run_quiet(
        Process::new(exe)
            .arg("install")
            .arg(bundle)
            .arg("--config")
            .arg(dev.join("agent.toml"))
            .args(["--output", "json"]),
    )?;
    let took = t.elapsed();
    fs::remove_dir_all(&dev)?;
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("0").is_err());
        assert!(parse_size("1TiB").is_err());
    }
}
