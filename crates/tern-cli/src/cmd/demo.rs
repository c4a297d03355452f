//! `tern demo`: the main job on embedded defaults.
//!
//! A release engineer's keys and repository (with a delegated product role), a release
//! bundle verified from the root a device ships with (and a tampered copy refused); then
//! `tern server` on 127.0.0.1 with SQLite in the working directory, holding the online
//! snapshot, timestamp and director keys; two simulated devices that enroll, are approved,
//! and run their agents; a deployment of 1.0.0 to both, installed, rebooted and committed;
//! a deployment of 1.1.0, encrypted for the two devices (their keys from the server's
//! registry), whose health check fails on one device, which rolls back. The deployments'
//! final status is printed as the server reports it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    let product = key(&keys_dir, "product-sim")?;
    let server_dir = dir.join("server");
    let server_keys = tern_server::keys::init(&server_dir.join("keys"), now, 10)?;
    let snapshot = tern_fs::load_public_key(&server_keys.snapshot_pub)?;
    let timestamp = tern_fs::load_public_key(&server_keys.timestamp_pub)?;

    step(
        2,
        "creates a TUF repository: root 2-of-2, targets offline; snapshot and timestamp are the server's online keys",
    );
    let repo_dir = dir.join("repo");
    let mut roles = BTreeMap::new();
    roles.insert(
        "root".to_owned(),
        (vec![root1.public().clone(), root2.public().clone()], 2),
    );
    roles.insert("targets".to_owned(), (vec![targets.public().clone()], 1));
    roles.insert("snapshot".to_owned(), (vec![snapshot], 1));
    roles.insert("timestamp".to_owned(), (vec![timestamp], 1));
    // The release engineer's keys are at hand in the demo; the online ones stay on the server.
    let product_public = product.public().clone();
    let signers = [root1, root2, targets, product];
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
        installed_length: Some(std::fs::metadata(&image)?.len()),
    };
    repo.add_target(
        &AddTarget {
            role: "sim-product".into(),
            name: name.clone(),
            source: image.clone(),
            custom: Some(manifest.to_custom()),
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::Zstd,
            encrypt_for: Vec::new(),
        },
        &signers,
        now,
    )?;

    step(5, "writes the release bundle (metadata first, payload after)");
    let bundle = dir.join("release-1.0.0.tern");
    let contents = repo.release_contents(std::slice::from_ref(&name), false, now)?;
    let size = tern_bundle::write_bundle(&contents, &bundle)?;

    step(6, "a device holding only root v1 verifies the whole bundle, streaming");
    let root_v1 = fs::read(repo_dir.join("metadata/1.root.json"))?;
    let t = Instant::now();
    let report = super::bundle::verify_file(&bundle, &root_v1, Freshness::IfPresent, false)?;
    let verify_time = t.elapsed();

    step(7, "a copy with one payload byte flipped is refused");
    let tampered = dir.join("tampered.tern");
    let mut bytes = fs::read(&bundle)?;
    let last = bytes.len() - 2048;
    bytes[last] ^= 0x01;
    fs::write(&tampered, &bytes)?;
    let refusal = match super::bundle::verify_file(&tampered, &root_v1, Freshness::IfPresent, false) {
        Ok(_) => anyhow::bail!("the tampered bundle verified: this is a bug"),
        Err(e) => format!("{e:#}"),
    };

    step(
        8,
        "starts `tern server` on 127.0.0.1 (SQLite in the working directory) and publishes release 1.0.0",
    );
    let server = DemoServer::start(&server_dir)?;
    let api = server.api();
    super::server::call(
        &api,
        reqwest::Method::POST,
        "/api/v1/repository/root",
        Some(root_v1.clone().into()),
    )?;
    super::server::call(
        &api,
        reqwest::Method::POST,
        "/api/v1/releases",
        Some(fs::read(&bundle)?.into()),
    )?;

    step(
        9,
        "two simulated devices are provisioned with root v1 and the director root, enroll with the fleet token, and are approved",
    );
    let mut devices = Vec::new();
    for id in ["sim-0001", "sim-0002"] {
        let d = dir.join(id);
        super::agent::simulate(super::agent::SimulateArgs {
            dir: d.clone(),
            root: Some(repo_dir.join("metadata/1.root.json")),
            device_type: "tern-sim".into(),
            hardware: "rev-a".into(),
            slot_mib: args.image_mib.max(8) * 2,
            offline_install: "allow".into(),
            server: Some(server.url.clone()),
            device_id: Some(id.into()),
            director_root: Some(server_keys.director_root.clone()),
            tags: vec!["demo".into()],
            poll_interval_secs: 1,
        })?;
        let cfg = tern_agent::config::AgentConfig::load(&d.join("agent.toml"))?;
        tern_agent::remote::enroll(&cfg, Some(&server.enrollment_token))?;
        super::server::call(
            &api,
            reqwest::Method::POST,
            &format!("/api/v1/devices/{id}/approve"),
            None,
        )?;
        devices.push((id, d));
    }
    // The integrator's health check on sim-0002: release 1.1.0 is made to fail it.
    let hook = devices[1].1.join("health-check");
    fs::write(
        &hook,
        "#!/bin/sh
[ \"$TERN_VERSION\" != 1.1.0 ] || { echo 'demo: 1.1.0 fails its health check' >&2; exit 1; }
",
    )?;
    let mut perm = fs::metadata(&hook)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&hook, perm)?;
    let cfg_path = devices[1].1.join("agent.toml");
    let cfg_text =
        fs::read_to_string(&cfg_path)?.replacen("[hooks]\n", "[hooks]\nhealth_check = \"health-check\"\n", 1);
    fs::write(&cfg_path, cfg_text)?;

    step(
        10,
        "deploys 1.0.0 to the tag `demo`; the agents check in, install, reboot and commit",
    );
    let first = deploy_and_run(&api, "1.0.0", &devices)?;

    step(
        11,
        "publishes 1.1.0 encrypted for both devices (keys from the registry; the server gets ciphertext only) and deploys it: sim-0002's health check fails, its bootloader falls back",
    );
    let registry = super::encrypt::Registry {
        server: Some(server.url.clone()),
        token: Some(server.admin_token.clone()),
    };
    let recipients = super::encrypt::resolve(&["device:sim-0001".into(), "device:sim-0002".into()], &registry)?;
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
            encrypt_for: recipients.iter().map(|(_, k)| k.clone()).collect(),
        },
        &signers,
        now,
    )?;
    let bundle2 = dir.join("release-1.1.0.tern");
    tern_bundle::write_bundle(
        &repo.release_contents(std::slice::from_ref(&name2), false, now)?,
        &bundle2,
    )?;
    super::server::call(
        &api,
        reqwest::Method::POST,
        "/api/v1/releases",
        Some(fs::read(&bundle2)?.into()),
    )?;
    let second = deploy_and_run(&api, "1.1.0", &devices)?;

    let image_size = fs::metadata(&image)?.len();
    let p = &report.payloads[0];
    println!();
    println!("Summary");
    println!(
        "  repository     {} (root v{}, targets v{})",
        repo_dir.display(),
        report.root_version,
        report.targets_version,
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
    println!("  sha256         {}", p.hashes["sha256"]);
    println!("  verified       in {:.1} ms", verify_time.as_secs_f64() * 1e3);
    println!("  tampered copy  refused: {refusal}");
    println!("  server         {} (data in {})", server.url, server_dir.display());
    println!(
        "  1.1.0 payload  encrypted (AES-256-GCM records, data key wrapped with HPKE) for {}",
        recipients
            .iter()
            .map(|(label, k)| format!("{label} (key {})", k.kid()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (title, v) in [("release 1.0.0", &first), ("release 1.1.0", &second)] {
        println!(
            "  {title}  deployment {}: {}",
            v["id"].as_str().unwrap_or("?"),
            v["status"].as_str().unwrap_or("?")
        );
        for d in v["devices"].as_array().into_iter().flatten() {
            let reason = d["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
            println!(
                "    {:<12} {}{reason}",
                d["device"].as_str().unwrap_or("?"),
                d["status"].as_str().unwrap_or("?")
            );
        }
    }
    for (id, d) in &devices {
        let cfg = tern_agent::config::AgentConfig::load(&d.join("agent.toml"))?;
        let st = tern_agent::install::status(&cfg)?;
        println!(
            "  {id}       booted {}, state {}, rollback floor {}",
            st.booted.as_deref().unwrap_or("?"),
            st.state.name(),
            st.rollback_floor.as_deref().unwrap_or("none")
        );
    }
    println!("  total          {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `tern server` in this process, on its own runtime.
struct DemoServer {
    url: String,
    admin_token: String,
    enrollment_token: String,
    _runtime: tokio::runtime::Runtime,
}

impl DemoServer {
    fn start(data: &Path) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut cfg = tern_server::ServerConfig::for_data_dir(data);
        cfg.listen = "127.0.0.1:0".into();
        cfg.poll_interval_secs = 1;
        let (url, admin_token, enrollment_token) = runtime.block_on(async move {
            let state = tern_server::open(cfg).await?;
            let admin = state.db.create_token("api", "admin", "demo").await?;
            let enroll = state.db.create_token("enrollment", "device", "demo fleet").await?;
            let running = tern_server::start(state).await?;
            Ok::<_, tern_server::Error>((format!("http://{}", running.addr), admin, enroll))
        })?;
        Ok(DemoServer {
            url,
            admin_token,
            enrollment_token,
            _runtime: runtime,
        })
    }

    fn api(&self) -> super::server::Api {
        super::server::Api {
            server: self.url.clone(),
            token: Some(self.admin_token.clone()),
            output: crate::output::Format::Text,
        }
    }
}

/// Deploy `release` to the tag `demo`, run each device's agent (polls, and the simulated
/// reboots an install asks for) until the server reports the deployment finished.
fn deploy_and_run(
    api: &super::server::Api,
    release: &str,
    devices: &[(&str, PathBuf)],
) -> anyhow::Result<serde_json::Value> {
    use tern_agent::bootloader::SimBootloader;
    use tern_agent::config::{AgentConfig, BootloaderConfig};
    let body = serde_json::json!({"release": release, "tag": "demo"});
    let dep = super::server::call(
        api,
        reqwest::Method::POST,
        "/api/v1/deployments",
        Some(body.to_string().into()),
    )?;
    let id = dep["id"].as_str().context("deployment id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(50);
    loop {
        let handles: Vec<_> = devices
            .iter()
            .map(|(name, d)| {
                let cfg_path = d.join("agent.toml");
                let name = name.to_string();
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let cfg = AgentConfig::load(&cfg_path)?;
                    let outcome = tern_agent::remote::Remote::new(cfg.clone())?.poll_once()?;
                    let reboot = match &outcome {
                        tern_agent::remote::PollOutcome::Installed { reboot_needed, .. } => *reboot_needed,
                        _ => matches!(
                            tern_agent::install::status(&cfg)?.state,
                            tern_agent::state::Phase::Trial(_)
                        ),
                    };
                    if reboot {
                        // The simulated power cycle: the bootloader picks a slot and counts
                        // the attempt; the agent's boot-time step runs.
                        let BootloaderConfig::Sim { state } = &cfg.bootloader else {
                            anyhow::bail!("the demo devices use the sim bootloader")
                        };
                        let booted = SimBootloader::open(state)?.power_on()?.context("no bootable slot")?;
                        let step = tern_agent::install::Agent::open(cfg.clone())?.boot_step(now())?;
                        println!("    {name}: rebooted into {booted}: {}", serde_json::to_string(&step)?);
                    } else if !matches!(outcome, tern_agent::remote::PollOutcome::Idle { .. }) {
                        println!("    {name}: {}", serde_json::to_string(&outcome)?);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("agent thread panicked"))??;
        }
        let status = super::server::call(api, reqwest::Method::GET, &format!("/api/v1/deployments/{id}"), None)?;
        if status["status"] == "finished" {
            return Ok(status);
        }
        if Instant::now() > deadline {
            anyhow::bail!("deployment {id} did not finish: {status}");
        }
    }
}
