//! `tern demo`: the main job on embedded defaults.
//!
//! For now: keys, a repository with a delegated product role, a release bundle of a
//! generated sample image, its verification from the root a device would ship with, and the
//! refusal of a tampered copy. Later issues grow this into the server-and-devices flow.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use tern_core::digest::HashAlgorithm;
use tern_core::manifest::{Compression, Installer, Manifest};
use tern_core::trust::Freshness;
use tern_core::{KeyAlgorithm, SigningKey, TargetPath};
use tern_fs::KeyFiles;
use tern_repo::{AddTarget, Delegation, RepoConfig, Repository};

use crate::output::now;

/// `tern demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Work in this directory (kept) instead of a temporary one (removed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the generated sample image in MiB.
    #[arg(long, default_value_t = 16)]
    pub image_mib: u64,
}

fn step(n: u32, what: &str) {
    println!("[{n}] {what}");
}

/// A sample root filesystem image: half random blocks, half text, so compression shows.
fn sample_image(path: &Path, mib: u64) -> anyhow::Result<()> {
    let rng = SystemRandom::new();
    let mut f = std::io::BufWriter::new(fs::File::create(path).with_context(|| path.display().to_string())?);
    let mut block = vec![0u8; 64 * 1024];
    for i in 0..(mib * 16) {
        if i % 2 == 0 {
            rng.fill(&mut block)
                .map_err(|_| anyhow::anyhow!("random source failed"))?;
        } else {
            for (j, b) in block.iter_mut().enumerate() {
                *b = b"tern sample rootfs block "[j % 25];
            }
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

fn key(dir: &Path, name: &str) -> anyhow::Result<SigningKey> {
    let files = KeyFiles::for_prefix(&dir.join(name));
    tern_fs::generate_key_files(KeyAlgorithm::Ed25519, &files)?;
    Ok(tern_fs::load_signing_key(&files.private)?)
}

/// Run the demo.
pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (dir, _temp) = super::work_dir(args.dir.as_ref(), "tern-demo-")?;
    let now = now();
    println!("Tern demo in {}", dir.display());

    step(1, "release engineer generates keys (ed25519, private files mode 0600)");
    let keys_dir = dir.join("keys");
    fs::create_dir_all(&keys_dir)?;
    let root1 = key(&keys_dir, "root-1")?;
    let root2 = key(&keys_dir, "root-2")?;
    let targets = key(&keys_dir, "targets")?;
    let snapshot = key(&keys_dir, "snapshot")?;
    let timestamp = key(&keys_dir, "timestamp")?;
    let product = key(&keys_dir, "product-sim")?;

    step(
        2,
        "creates a TUF repository: root 2-of-2, one key each for targets, snapshot, timestamp",
    );
    let repo_dir = dir.join("repo");
    let mut roles = BTreeMap::new();
    roles.insert(
        "root".to_owned(),
        (vec![root1.public().clone(), root2.public().clone()], 2),
    );
    for (name, k) in [
        ("targets", &targets),
        ("snapshot", &snapshot),
        ("timestamp", &timestamp),
    ] {
        roles.insert(name.to_owned(), (vec![k.public().clone()], 1));
    }
    // Every key is at hand in the demo; each role is signed only by the keys it authorises.
    let product_public = product.public().clone();
    let signers = [root1, root2, targets, snapshot, timestamp, product];
    let (repo, _) = Repository::init(&repo_dir, &roles, RepoConfig::default(), &signers, now)?;

    step(3, "delegates sim/* to the product role `sim-product` with its own key");
    repo.delegate(
        &Delegation {
            from: "targets".into(),
            name: "sim-product".into(),
            keys: vec![product_public.clone()],
            threshold: 1,
            terminating: true,
            paths: vec!["sim/*".into()],
            hash_prefixes: vec![],
        },
        &signers,
        now,
    )?;

    step(
        4,
        &format!(
            "builds a {} MiB sample image and publishes it, zstd-compressed, with its manifest",
            args.image_mib
        ),
    );
    let image = dir.join("rootfs.img");
    sample_image(&image, args.image_mib)?;
    let name = TargetPath::new("sim/rootfs-1.0.0.img.zst")?;
    let manifest = Manifest {
        version: "1.0.0".into(),
        device_type: "tern-sim".into(),
        hardware: vec!["rev-a".into(), "rev-b".into()],
        installer: Installer::Raw,
        slot_class: Some("rootfs".into()),
        install_path: None,
        compression: Compression::Zstd,
        encryption: None,
        delta_base: None,
    };
    repo.add_target(
        &AddTarget {
            role: "sim-product".into(),
            name: name.clone(),
            source: image.clone(),
            custom: Some(manifest.to_custom()),
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::Zstd,
        },
        &signers,
        now,
    )?;
    repo.refresh(&signers, now, false)?;

    step(5, "writes the release bundle (metadata first, payload after)");
    let bundle = dir.join("release-1.0.0.tern");
    let contents = repo.release_contents(std::slice::from_ref(&name), true, now)?;
    let size = tern_bundle::write_bundle(&contents, &bundle)?;

    step(6, "a device holding only root v1 verifies the whole bundle, streaming");
    let root_v1 = fs::read(repo_dir.join("metadata/1.root.json"))?;
    let t = Instant::now();
    let report = super::bundle::verify_file(&bundle, &root_v1, Freshness::Required, false)?;
    let verify_time = t.elapsed();

    step(7, "a copy with one payload byte flipped is refused");
    let tampered = dir.join("tampered.tern");
    let mut bytes = fs::read(&bundle)?;
    let last = bytes.len() - 2048;
    bytes[last] ^= 0x01;
    fs::write(&tampered, &bytes)?;
    let refusal = match super::bundle::verify_file(&tampered, &root_v1, Freshness::Required, false) {
        Ok(_) => anyhow::bail!("the tampered bundle verified: this is a bug"),
        Err(e) => format!("{e:#}"),
    };

    step(
        8,
        "a simulated device (A/B file slots, simulated bootloader) is provisioned with root v1",
    );
    let device = dir.join("device");
    super::agent::simulate(super::agent::SimulateArgs {
        dir: device.clone(),
        root: Some(repo_dir.join("metadata/1.root.json")),
        device_type: "tern-sim".into(),
        hardware: "rev-a".into(),
        slot_mib: 64,
        offline_install: "allow".into(),
        server: None,
        device_id: None,
        director_root: None,
        tags: Vec::new(),
        poll_interval_secs: 300,
    })?;
    // The integrator's health check: release 1.1.0 is made to fail it.
    let hook = device.join("health-check");
    fs::write(
        &hook,
        "#!/bin/sh
[ \"$TERN_VERSION\" != 1.1.0 ] || { echo 'demo: 1.1.0 fails its health check' >&2; exit 1; }
",
    )?;
    let mut perm = fs::metadata(&hook)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&hook, perm)?;
    let cfg_path = device.join("agent.toml");
    let mut cfg_text = fs::read_to_string(&cfg_path)?;
    cfg_text.push_str("health_check = \"health-check\"\n");
    fs::write(&cfg_path, cfg_text)?;

    step(
        9,
        "the device installs release 1.0.0 from the bundle into its inactive slot B, reboots, commits",
    );
    let cfg = tern_agent::config::AgentConfig::load(&cfg_path)?;
    let first = device_install_and_reboot(&cfg, &bundle, 1)?;

    step(
        10,
        "release 1.1.0 fails its health check: the bootloader's attempts run out and it falls back",
    );
    let image2 = dir.join("rootfs-1.1.0.img");
    sample_image(&image2, args.image_mib)?;
    let name2 = TargetPath::new("sim/rootfs-1.1.0.img.zst")?;
    let mut manifest2 = manifest.clone();
    manifest2.version = "1.1.0".into();
    repo.add_target(
        &AddTarget {
            role: "sim-product".into(),
            name: name2.clone(),
            source: image2,
            custom: Some(manifest2.to_custom()),
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::Zstd,
        },
        &signers,
        now,
    )?;
    repo.refresh(&signers, now, false)?;
    let bundle2 = dir.join("release-1.1.0.tern");
    tern_bundle::write_bundle(
        &repo.release_contents(std::slice::from_ref(&name2), true, now)?,
        &bundle2,
    )?;
    let second = device_install_and_reboot(&cfg, &bundle2, 4)?;
    let status = tern_agent::install::status(&cfg)?;

    let image_size = fs::metadata(&image)?.len();
    let p = &report.payloads[0];
    println!();
    println!("Summary");
    println!(
        "  repository     {} (root v{}, targets v{}, snapshot v{}, timestamp v{})",
        repo_dir.display(),
        report.root_version,
        report.targets_version,
        report.snapshot_version.unwrap_or(0),
        report.timestamp_version.unwrap_or(0)
    );
    println!(
        "  delegation     {}",
        report
            .delegated
            .iter()
            .map(|(r, v)| format!("{r} v{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  bundle         {} ({size} bytes)", bundle.display());
    println!(
        "  payload        {} ({} bytes from a {image_size}-byte image), listed by {}",
        p.target, p.length, p.role
    );
    if let Some(m) = &p.manifest {
        println!(
            "  manifest       version {} for {} {:?}, {} into slot class {}, {}",
            m.version,
            m.device_type,
            m.hardware,
            m.installer,
            m.slot_class.as_deref().unwrap_or("-"),
            m.compression
        );
    }
    println!("  sha256         {}", p.hashes["sha256"]);
    println!("  verified       in {:.1} ms", verify_time.as_secs_f64() * 1e3);
    println!("  tampered copy  refused: {refusal}");
    println!("  device         {}", device.display());
    println!("  release 1.0.0  {first}");
    println!("  release 1.1.0  {second}");
    println!(
        "  device status  state {}, booted {}, rollback floor {}, last error: {}",
        status.state.name(),
        status.booted.as_deref().unwrap_or("?"),
        status.rollback_floor.as_deref().unwrap_or("none"),
        status.last_error.as_ref().map_or("none".into(), |e| e.message.clone())
    );
    for s in &status.slots {
        let r = s.record.as_ref();
        println!(
            "  slot {}        {} version {} ({} attempts left)",
            s.bootname,
            r.map_or("empty", |r| r.status.as_str()),
            r.and_then(|r| r.version.as_deref()).unwrap_or("-"),
            s.attempts.unwrap_or(0)
        );
    }
    println!("  total          {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Install a bundle on the simulated device, then power-cycle it `reboots` times (the
/// bootloader's selection, then the agent's boot-time step); a one-line account.
fn device_install_and_reboot(
    cfg: &tern_agent::config::AgentConfig,
    bundle: &Path,
    reboots: u32,
) -> anyhow::Result<String> {
    use tern_agent::bootloader::SimBootloader;
    use tern_agent::config::BootloaderConfig;
    let report = {
        let mut agent = tern_agent::install::Agent::open(cfg.clone())?;
        agent.install(bundle, now(), &mut |_| {})?
    };
    let slot = report.slot_image.as_ref().map_or("-".into(), |s| s.bootname.clone());
    let BootloaderConfig::Sim { state } = &cfg.bootloader else {
        anyhow::bail!("the demo device uses the sim bootloader")
    };
    let mut steps = Vec::new();
    for _ in 0..reboots {
        let booted = SimBootloader::open(state)?.power_on()?.context("no bootable slot")?;
        let outcome = tern_agent::install::Agent::open(cfg.clone())?.boot_step(now())?;
        let what = match outcome {
            tern_agent::install::BootOutcome::Committed { version } => format!("committed {version}"),
            tern_agent::install::BootOutcome::HealthCheckFailed { .. } => "health check failed".into(),
            tern_agent::install::BootOutcome::RolledBack { .. } => "rolled back".into(),
            tern_agent::install::BootOutcome::Interrupted => "interrupted".into(),
            tern_agent::install::BootOutcome::Nothing => "nothing pending".into(),
        };
        steps.push(format!("boot {booted}: {what}"));
    }
    Ok(format!("written to slot {slot}; {}", steps.join(", ")))
}
