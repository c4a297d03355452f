//! The device agent on simulated devices, through the real binary: install, reboot, commit;
//! rollback after a failing health check; refusals that change nothing; the order of
//! bootloader calls.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod device;
mod support;

use device::{fails, ok, s, slot_content, Device, Releases};

#[test]
fn install_reboot_commit_with_the_bootloader_calls_in_order() {
    let rel = Releases::new();
    let (bundle, image) = rel.bundle("1.0.0", "tern-sim", &["rev-a"], 300_000, true);
    let dev = Device::new(&rel.root());
    dev.install(&bundle);
    let st = dev.status();
    assert_eq!(st["state"]["state"], "pending-reboot");
    assert_eq!(st["booted"], "A");
    assert_eq!(st["primary"], "B");
    assert_eq!(st["slots"][1]["record"]["status"], "verified");
    assert_eq!(
        slot_content(&dev, "slot-b.img", image.len()),
        image,
        "the decompressed image is in slot B"
    );

    let boot = dev.reboot();
    assert_eq!(boot["booted"], "B");
    assert_eq!(boot["boot_step"]["outcome"], "committed");
    let st = dev.status();
    assert_eq!(st["state"]["state"], "committed");
    assert_eq!(st["rollback_floor"], "1.0.0");
    assert_eq!(st["slots"][1]["record"]["version"], "1.0.0");
    assert_eq!(
        st["slots"][1]["record"]["sha256"],
        tern_core::digest::sha256_hex(&image)
    );
    // The procedure's bootloader calls, in order (the first line is provisioning).
    assert_eq!(
        dev.log(),
        [
            "mark-bad B",
            "mark-bad B",
            "set-primary B 3",
            "power-on -> B",
            "mark-good B 3"
        ]
    );

    // The next release goes to slot A, the now inactive one.
    let (bundle2, image2) = rel.bundle("1.1.0", "tern-sim", &[], 200_000, false);
    dev.install(&bundle2);
    assert_eq!(dev.reboot()["booted"], "A");
    assert_eq!(slot_content(&dev, "slot-a.img", image2.len()), image2);
    assert_eq!(dev.status()["rollback_floor"], "1.1.0");
}

#[test]
fn a_failing_health_check_rolls_back_after_the_attempts_run_out() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("2.0.0", "tern-sim", &[], 100_000, false);
    let dev = Device::new(&rel.root());
    dev.add_hook("health-check", "echo 'service x did not start' >&2; exit 1");
    dev.add_hook(
        "on-rollback",
        "echo \"$TERN_VERSION $TERN_REASON\" > \"$TERN_STATE_DIR/rolled-back\"",
    );
    dev.install(&bundle);
    for left in [2, 1, 0] {
        let b = dev.reboot();
        assert_eq!(b["booted"], "B");
        assert_eq!(b["boot_step"]["outcome"], "health-check-failed", "{b}");
        assert!(b["boot_step"]["reason"]
            .as_str()
            .unwrap()
            .contains("service x did not start"));
        assert_eq!(dev.status()["slots"][1]["attempts"], left);
    }
    let b = dev.reboot();
    assert_eq!(b["booted"], "A", "the bootloader fell back");
    assert_eq!(b["boot_step"]["outcome"], "rolled-back");
    let st = dev.status();
    assert_eq!(st["state"]["state"], "rolled-back");
    assert_eq!(st["last_error"]["kind"], "RolledBack");
    assert_eq!(st["slots"][1]["record"]["status"], "bad");
    assert_eq!(st["slots"][1]["attempts"], 0);
    assert_eq!(st["rollback_floor"], Value::Null, "nothing was committed");
    let hook_saw = fs::read_to_string(dev.path("state/rolled-back")).unwrap();
    assert!(
        hook_saw.starts_with("2.0.0 ") && hook_saw.contains("fell back to A"),
        "{hook_saw}"
    );
    // The device keeps running the old slot, and the release may be offered again.
    assert_eq!(dev.reboot()["booted"], "A");
    dev.install(&bundle);
}

#[test]
fn refusals_before_writing_change_nothing() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let (wrong_type, _) = rel.bundle("1.0.0", "other-board", &[], 1000, false);
    let (wrong_hw, _) = rel.bundle("1.0.1", "tern-sim", &["rev-z"], 1000, false);
    let before = dev.snapshot();
    let cfg = dev.config();
    fails(
        &["install", &s(&wrong_type), "--config", &cfg],
        "release is for device type `other-board`, this device is `tern-sim`",
    );
    fails(
        &["install", &s(&wrong_hw), "--config", &cfg],
        "release supports hardware [\"rev-z\"], this device is `rev-a`",
    );

    // A bundle from another repository: its chain does not lead to this device's root.
    let other = Releases::new();
    let (foreign, _) = other.bundle("9.0.0", "tern-sim", &[], 1000, false);
    fails(
        &["install", &s(&foreign), "--config", &cfg],
        "root chain does not lead back to the trusted root",
    );
    assert_eq!(dev.snapshot(), before);

    // Below the rollback floor.
    let (v2, _) = rel.bundle("2.0.0", "tern-sim", &[], 1000, false);
    let (v1, _) = rel.bundle("1.5.0", "tern-sim", &[], 1000, false);
    dev.install(&v2);
    dev.reboot();
    let before = dev.snapshot();
    fails(
        &["install", &s(&v1), "--config", &cfg],
        "release 1.5.0 is below the rollback floor 2.0.0",
    );
    assert_eq!(dev.snapshot(), before);

    // A missing slot device.
    fs::remove_file(dev.path("slot-a.img")).unwrap();
    let (v3, _) = rel.bundle("3.0.0", "tern-sim", &[], 1000, false);
    let before = dev.snapshot();
    fails(&["install", &s(&v3), "--config", &cfg], "slot `rootfs.a`: device");
    assert_eq!(dev.snapshot(), before);
}

#[test]
fn a_tampered_payload_is_caught_before_the_slot_becomes_bootable() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 400_000, false);
    let mut bytes = fs::read(&bundle).unwrap();
    let at = bytes.len() - 1024 - 100_000;
    bytes[at] ^= 0x40;
    fs::write(&bundle, &bytes).unwrap();
    let dev = Device::new(&rel.root());
    let slot_a = fs::read(dev.path("slot-a.img")).unwrap();
    fails(
        &["install", &s(&bundle), "--config", &dev.config()],
        "sha256 hash does not match",
    );
    let st = dev.status();
    // Never made primary, no attempts, recorded bad; slot A and the booted slot untouched.
    assert_eq!(st["primary"], "A");
    assert_eq!(st["slots"][1]["attempts"], 0);
    assert_eq!(st["slots"][1]["record"]["status"], "bad");
    assert_eq!(st["state"]["state"], "failed");
    assert_eq!(fs::read(dev.path("slot-a.img")).unwrap(), slot_a);
    // Provisioning, step 6, and the failure path making sure again.
    assert_eq!(dev.log(), ["mark-bad B", "mark-bad B", "mark-bad B"]);
    assert_eq!(dev.reboot()["booted"], "A");
}

#[test]
fn a_full_disk_while_writing_is_refused() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 300_000, false);
    let dev = Device::new(&rel.root());
    // Slot B on a device that is always full (writes fail with ENOSPC).
    let cfg = fs::read_to_string(dev.path("agent.toml"))
        .unwrap()
        .replace("device = \"slot-b.img\"", "device = \"/dev/full\"");
    fs::write(dev.path("agent.toml"), cfg).unwrap();
    fails(
        &["install", &s(&bundle), "--config", &dev.config()],
        "/dev/full: no space left while writing the slot",
    );
    let st = dev.status();
    assert_eq!(st["primary"], "A");
    assert_eq!(st["last_error"]["kind"], "DiskFull");
    assert_eq!(dev.reboot()["booted"], "A");
}

#[test]
fn a_reboot_pending_refuses_another_install() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 1000, false);
    let dev = Device::new(&rel.root());
    dev.install(&bundle);
    fails(
        &["install", &s(&bundle), "--config", &dev.config()],
        "a reboot is pending",
    );
}

#[test]
fn agent_run_installs_from_its_inbox() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 5000, false);
    let dev = Device::new(&rel.root());
    fs::copy(&bundle, dev.path("inbox/r.tern")).unwrap();
    // Logged as JSON lines (RUST_LOG unset: the agent's own level, info): each step of the
    // install procedure, in order.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "--log-format",
            "json",
            "agent",
            "run",
            "--once",
            "--config",
            &dev.config(),
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let steps: Vec<u64> = stderr
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .filter_map(|l| l["fields"]["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>(), "{stderr}");
    assert!(dev.path("inbox/r.tern.done").exists());
    assert_eq!(dev.status()["state"]["state"], "pending-reboot");
    assert_eq!(dev.reboot()["boot_step"]["outcome"], "committed");
}

#[test]
fn configuration_errors_name_the_key_and_line() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let cfg = fs::read_to_string(dev.path("agent.toml"))
        .unwrap()
        .replace("boot_attempts = 3", "boot_atempts = 3");
    fs::write(dev.path("agent.toml"), cfg).unwrap();
    let err = fails(&["agent", "status", "--config", &dev.config()], "boot_atempts");
    assert!(err.contains("line 6"), "{err}");
}

#[test]
fn file_and_archive_payloads_are_installed_in_place_after_verification() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let apps = dev.path("apps");
    // A single file and a tar archive of an application directory.
    fs::write(rel.p("motd"), b"welcome to tern\n").unwrap();
    let src = rel.dir.path().join("app-src");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::write(src.join("config.toml"), b"x = 1\n").unwrap();
    let tar_out = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf", &rel.p("app.tar"), "."])
        .output()
        .unwrap();
    assert!(tar_out.status.success());
    let k = rel.key();
    let repo = rel.p("repo");
    let motd_dest = s(&apps.join("motd"));
    let app_dest = s(&apps.join("app"));
    for (file, name, installer, dest, zstd) in [
        (rel.p("motd"), "etc/motd", "file", motd_dest.as_str(), false),
        (rel.p("app.tar"), "apps/app.tar.zst", "archive", app_dest.as_str(), true),
    ] {
        let mut args = vec![
            "repo",
            "add-target",
            "--repo",
            &repo,
            &file,
            "--name",
            name,
            "--release-version",
            "1.0.0",
            "--device-type",
            "tern-sim",
            "--installer",
            installer,
            "--install-path",
            dest,
            "--key",
            &k,
        ];
        if zstd {
            args.extend(["--compression", "zstd"]);
        }
        ok(&args);
    }
    ok(&["repo", "refresh", "--repo", &repo, "--key", &k]);
    let bundle = rel.p("apps.tern");
    ok(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "etc/motd",
        "--target",
        "apps/app.tar.zst",
        "--out",
        &bundle,
    ]);
    // Tampered: nothing is put in place.
    // The second payload (the archive) is tampered: the first is already staged by then.
    let mut bad = fs::read(&bundle).unwrap();
    let header = bad.windows(24).position(|w| w == b"payloads/apps/app.tar.zs").unwrap();
    bad[header + 512 + 20] ^= 1;
    fs::write(rel.p("bad.tern"), &bad).unwrap();
    // zstd's own checksum or the payload's hash catches it, whichever reads the byte first.
    let err = fails(&["install", &rel.p("bad.tern"), "--config", &dev.config()], "bad.tern");
    assert!(
        err.contains("hash does not match") || err.contains("corruption"),
        "{err}"
    );
    assert!(!apps.join("motd").exists() && !apps.join("app").exists());
    assert_eq!(fs::read_dir(&apps).unwrap().count(), 0, "no staging left behind");
    // Genuine: both in place, no reboot needed, recorded.
    let out = dev.install(Path::new(&bundle));
    assert!(out.contains("installed etc/motd 1.0.0"), "{out}");
    assert_eq!(fs::read(apps.join("motd")).unwrap(), b"welcome to tern\n");
    assert_eq!(fs::read(apps.join("app/bin/app")).unwrap(), b"#!/bin/sh\necho hi\n");
    assert_eq!(fs::read(apps.join("app/config.toml")).unwrap(), b"x = 1\n");
    let st = dev.status();
    assert_eq!(st["state"]["state"], "idle");
    assert_eq!(st["apps"].as_array().unwrap().len(), 2);
    assert_eq!(st["primary"], "A", "no slot was touched");

    // A file payload aimed outside install_roots (here: the agent's own configuration).
    fs::write(rel.p("evil.toml"), b"x").unwrap();
    let cfg_path = dev.config();
    ok(&[
        "repo",
        "add-target",
        "--repo",
        &repo,
        &rel.p("evil.toml"),
        "--name",
        "etc/agent.toml",
        "--release-version",
        "2.0.0",
        "--device-type",
        "tern-sim",
        "--installer",
        "file",
        "--install-path",
        &cfg_path,
        "--key",
        &k,
    ]);
    ok(&["repo", "refresh", "--repo", &repo, "--key", &k]);
    ok(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "etc/agent.toml",
        "--out",
        &rel.p("evil.tern"),
    ]);
    let before = fs::read(&cfg_path).unwrap();
    fails(
        &["install", &rel.p("evil.tern"), "--config", &cfg_path],
        "is not under any of this device's install_roots",
    );
    assert_eq!(fs::read(&cfg_path).unwrap(), before);
}

#[test]
fn the_demo_deploys_through_the_server_and_one_device_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&["demo", "--dir", &s(&dir.path().join("demo")), "--image-mib", "2"]);
    let section = |title: &str| -> String {
        let start = out.find(title).unwrap_or_else(|| panic!("no {title} in {out}"));
        out[start..].lines().take(3).collect::<Vec<_>>().join("\n")
    };
    let first = section("release 1.0.0  deployment");
    assert!(first.contains(": finished"), "{first}");
    assert!(
        first.contains("sim-0001     succeeded") && first.contains("sim-0002     succeeded"),
        "{first}"
    );
    let second = section("release 1.1.0  deployment");
    assert!(second.contains("sim-0001     succeeded"), "{second}");
    assert!(second.contains("sim-0002     rolled-back (the new slot"), "{second}");
    assert!(
        out.contains("sim-0002       booted B, state rolled-back, rollback floor 1.0.0"),
        "{out}"
    );
    assert!(
        out.contains("sim-0001       booted A, state committed, rollback floor 1.1.0"),
        "{out}"
    );
    assert!(out.contains("tampered copy  refused"), "{out}");
}

#[test]
fn an_agent_restart_before_the_reboot_is_not_a_rollback() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 5000, false);
    let dev = Device::new(&rel.root());
    dev.install(&bundle);
    ok(&["agent", "run", "--once", "--config", &dev.config()]);
    assert_eq!(dev.status()["state"]["state"], "pending-reboot");
    assert_eq!(dev.reboot()["boot_step"]["outcome"], "committed");
}

#[test]
fn a_booted_slot_the_configuration_does_not_name_is_refused() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 5000, false);
    let dev = Device::new(&rel.root());
    let env = fs::read_to_string(dev.path("bootloader.json"))
        .unwrap()
        .replace("\"booted\": \"A\"", "\"booted\": \"a\"");
    fs::write(dev.path("bootloader.json"), env).unwrap();
    let before = dev.snapshot();
    fails(
        &["install", &s(&bundle), "--config", &dev.config()],
        "slot `a` booted, which no [[slot]]",
    );
    assert_eq!(dev.snapshot(), before);
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_children() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 5000, false);
    let dev = Device::new(&rel.root());
    let cfg = fs::read_to_string(dev.path("agent.toml"))
        .unwrap()
        .replace("timeout_secs = 30", "timeout_secs = 1");
    fs::write(dev.path("agent.toml"), cfg).unwrap();
    dev.add_hook(
        "pre-install",
        "sleep 30 & echo $! > \"$TERN_STATE_DIR/child.pid\"; sleep 30",
    );
    let started = std::time::Instant::now();
    fails(&["install", &s(&bundle), "--config", &dev.config()], "hook pre-install");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let pid = fs::read_to_string(dev.path("state/child.pid"))
        .unwrap()
        .trim()
        .to_owned();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let alive = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
    assert!(!alive, "the hook's child {pid} outlived it");
    assert_eq!(dev.status()["primary"], "A");
}

#[test]
fn a_bundle_fetched_over_the_network_must_carry_freshness() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 5000, false);
    let dev = Device::new(&rel.root());
    let served = tempfile::tempdir().unwrap();
    fs::copy(&bundle, served.path().join("plain.tern")).unwrap();
    let name = bundle.file_name().unwrap().to_string_lossy().replace(".tern", "");
    ok(&[
        "bundle",
        "create",
        "--repo",
        &rel.p("repo"),
        "--target",
        &name,
        "--out",
        &s(&served.path().join("fresh.tern")),
        "--include-freshness",
    ]);
    let server = support::Server::start(served.path());
    // Without snapshot and timestamp: fine from local media, refused from the network.
    fails(
        &[
            "install",
            &format!("{}/plain.tern", server.base),
            "--config",
            &dev.config(),
        ],
        "role `timestamp` is not available",
    );
    assert!(!dev.path("state/download.tern").exists(), "the download is not kept");
    let out = dev.install(Path::new(&format!("{}/fresh.tern", server.base)));
    assert!(out.contains("installed"), "{out}");
    assert_eq!(dev.reboot()["boot_step"]["outcome"], "committed");
}

/// An encrypted bundle for `recipients` (key files), with the release engineer's own
/// encryption key `eng.pem` among them.
fn encrypted_bundle(rel: &Releases, version: &str, size: usize, zstd: bool, recipients: &[&str]) -> (PathBuf, Vec<u8>) {
    if !Path::new(&rel.p("eng.pem")).exists() {
        ok(&["key", "generate", "--type", "x25519", "--out", &rel.p("eng")]);
    }
    let eng = rel.p("eng.pub.json");
    let mut extra = vec!["--encrypt-for", eng.as_str()];
    for r in recipients {
        extra.extend(["--encrypt-for", r]);
    }
    rel.bundle_with(version, "tern-sim", &[], size, zstd, &extra)
}

impl Device {
    /// `tern device key export` into a file, for `--encrypt-for`.
    fn export_key(&self) -> String {
        let out = self.path("export.json");
        fs::write(&out, ok(&["device", "key", "export", "--config", &self.config()])).unwrap();
        s(&out)
    }
}

#[test]
fn an_encrypted_release_installs_on_its_recipients_only_and_recipients_can_be_added() {
    let rel = Releases::new();
    let alice = Device::new(&rel.root());
    let bob = Device::new(&rel.root());
    // A group key, provisioned to carol's device.
    ok(&["key", "generate", "--type", "x25519", "--out", &rel.p("group")]);
    let carol = Device::new(&rel.root());
    fs::copy(rel.p("group.pem"), carol.path("group.pem")).unwrap();
    let mut cfg = fs::read_to_string(carol.path("agent.toml")).unwrap();
    cfg.push_str("\n[encryption]\ngroup_keys = [\"group.pem\"]\n");
    fs::write(carol.path("agent.toml"), cfg).unwrap();

    let (bundle, image) = encrypted_bundle(
        &rel,
        "1.0.0",
        300_000,
        true,
        &[&alice.export_key(), &rel.p("group.pub.json")],
    );
    // The bundle holds ciphertext only: no 64-byte run of the image appears in it.
    let bytes = fs::read(&bundle).unwrap();
    assert!(!bytes.windows(64).any(|w| w == &image[1000..1064]));
    let inspect = ok(&["bundle", "inspect", &s(&bundle)]);
    assert!(
        inspect.contains("encrypted tern-stream-aes256gcm-v1") && inspect.contains("3 recipient(s)"),
        "{inspect}"
    );

    // A recipient by its device key, and one by its group key.
    for dev in [&alice, &carol] {
        dev.install(&bundle);
        assert_eq!(dev.reboot()["booted"], "B");
        ok(&["agent", "run", "--config", &dev.config(), "--once"]);
        let st = dev.status();
        assert_eq!(st["state"]["state"], "committed");
        assert_eq!(slot_content(dev, "slot-b.img", image.len()), image);
        // The record holds the image's hash, opened from the sealed digest.
        assert_eq!(
            st["slots"][1]["record"]["sha256"],
            tern_core::digest::sha256_hex(&image).as_str(),
            "{st}"
        );
    }

    // Not a recipient: refused before any slot is touched.
    let before = bob.snapshot();
    let err = fails(
        &["install", &s(&bundle), "--config", &bob.config()],
        "is encrypted, and this device is not one of its recipients",
    );
    assert!(err.contains("add-recipients"), "{err}");
    assert_eq!(bob.snapshot(), before);
    assert_eq!(bob.log(), ["mark-bad B"], "only provisioning touched the bootloader");

    // The release engineer adds bob without re-encrypting or re-signing: the metadata and the
    // payload entry are byte for byte what they were.
    let bob_key = bob.export_key();
    fails(
        &[
            "bundle",
            "add-recipients",
            &s(&bundle),
            "--identity",
            &bob.path("state/encryption.pem").display().to_string(),
            "--encrypt-for",
            &bob_key,
        ],
        "is not one of its recipients",
    );
    let wider = rel.p("wider.tern");
    ok(&[
        "bundle",
        "add-recipients",
        &s(&bundle),
        "--identity",
        &rel.p("eng.pem"),
        "--encrypt-for",
        &bob_key,
        "--out",
        &wider,
    ]);
    let entries = |p: &str| -> Vec<(String, Vec<u8>)> {
        let mut a = tar::Archive::new(fs::File::open(p).unwrap());
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut b).unwrap();
                (name, b)
            })
            .collect()
    };
    let (old, new) = (entries(&s(&bundle)), entries(&wider));
    let keep = |v: &[(String, Vec<u8>)]| {
        v.iter()
            .filter(|(n, _)| !n.starts_with("recipients/"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keep(&old), keep(&new));
    bob.install(Path::new(&wider));
    assert_eq!(bob.reboot()["booted"], "B");
    assert_eq!(slot_content(&bob, "slot-b.img", image.len()), image);

    // Image to encrypted, signed bundle in one step: `bundle create --image --encrypt-for`.
    let next: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(rel.p("next.img"), &next).unwrap();
    let one_step = rel.p("next.tern");
    let alice_key = alice.export_key();
    ok(&[
        "bundle",
        "create",
        "--repo",
        &rel.p("repo"),
        "--image",
        &rel.p("next.img"),
        "--release-version",
        "1.1.0",
        "--device-type",
        "tern-sim",
        "--slot-class",
        "rootfs",
        "--encrypt-for",
        &alice_key,
        "--key",
        &rel.key(),
        "--out",
        &one_step,
    ]);
    fails(
        &["install", &one_step, "--config", &bob.config()],
        "not one of its recipients",
    );
    alice.install(Path::new(&one_step));
    assert_eq!(alice.reboot()["booted"], "A");
    assert_eq!(slot_content(&alice, "slot-a.img", next.len()), next);
}

/// The encrypted payload of `bundle` (its only payload).
fn payload_of(bundle: &Path) -> (String, Vec<u8>) {
    let mut a = tar::Archive::new(fs::File::open(bundle).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if let Some(t) = name.strip_prefix("payloads/") {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut b).unwrap();
            return (t.to_owned(), b);
        }
    }
    panic!("no payload");
}

#[test]
fn tampered_records_are_caught_before_the_slot_becomes_bootable() {
    // Each tampered ciphertext is re-signed by the targets key, so the signed hashes match
    // and only record authentication stands between it and the slot: what a thief of the
    // targets key (but not of the data key) could publish.
    const HEADER: usize = 16;
    const RECORD: usize = 65536 + 16;
    let rel = Releases::new();
    let dev0 = Device::new(&rel.root());
    let key = dev0.export_key();
    let (bundle, _) = encrypted_bundle(&rel, "1.0.0", 400_000, false, &[&key]);
    let (target, ct) = payload_of(&bundle);
    assert!(ct.len() > HEADER + 6 * RECORD, "at least 7 records");
    let repo = rel.p("repo");
    let targets: Value = serde_json::from_str(
        &fs::read_to_string(format!("{repo}/metadata/targets.json"))
            .unwrap_or_else(|_| fs::read_to_string(format!("{repo}/metadata/2.targets.json")).unwrap()),
    )
    .unwrap();
    let listed = &targets["signed"]["targets"][&target];
    let signed_custom = listed["custom"].clone();
    let doc_path = format!(
        "{repo}/recipients/{}.json",
        listed["hashes"]["sha256"].as_str().unwrap()
    );
    let doc: Value = serde_json::from_str(&fs::read_to_string(doc_path).unwrap()).unwrap();
    let record = |i: usize| HEADER + i * RECORD..HEADER + (i + 1) * RECORD;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bit flipped in the first record",
            {
                let mut c = ct.clone();
                c[HEADER + 5] ^= 1;
                c
            },
            "record 0: authentication failed",
        ),
        (
            "bit flipped in a middle record",
            {
                let mut c = ct.clone();
                c[record(3).start + 100] ^= 0x80;
                c
            },
            "record 3: authentication failed",
        ),
        (
            "bit flipped in the last record's tag",
            {
                let mut c = ct.clone();
                let n = c.len();
                c[n - 1] ^= 1;
                c
            },
            "authentication failed",
        ),
        (
            "bit flipped in the header",
            {
                let mut c = ct.clone();
                c[12] ^= 1;
                c
            },
            "header",
        ),
        (
            "a record dropped",
            {
                let mut c = ct.clone();
                c.drain(record(2));
                c
            },
            "record 2: authentication failed",
        ),
        (
            "two records swapped",
            {
                let mut c = ct.clone();
                let (a, b) = (c[record(1)].to_vec(), c[record(2)].to_vec());
                c[record(1)].copy_from_slice(&b);
                c[record(2)].copy_from_slice(&a);
                c
            },
            "record 1: authentication failed",
        ),
        (
            "the last record truncated",
            {
                let mut c = ct.clone();
                c.truncate(c.len() - 10);
                c
            },
            "authentication failed",
        ),
        (
            "cut at a record boundary",
            {
                let mut c = ct.clone();
                c.truncate(record(4).start);
                c
            },
            "record 3: authentication failed",
        ),
    ];
    // `bytes` published as target NAME.img with the original manifest but `plaintext_length`,
    // signed by the targets key, with the original wrapped key filed under its hash.
    let sign_and_bundle = |name: &str, bytes: &[u8], plaintext_length: u64| -> String {
        let file = rel.p(&format!("{name}.bin"));
        fs::write(&file, bytes).unwrap();
        let mut signed = signed_custom.clone();
        signed["tern"]["encryption"]["plaintext_length"] = plaintext_length.into();
        let target = format!("{name}.img");
        #[rustfmt::skip]
        ok(&[
            "repo", "add-target", "--repo", &repo, &file, "--name", &target, "--custom", &signed.to_string(),
            "--key", &rel.key(),
        ]);
        let sha = tern_core::digest::sha256_hex(bytes);
        let mut d = doc.clone();
        d["sha256"] = sha.clone().into();
        fs::write(format!("{repo}/recipients/{sha}.json"), d.to_string()).unwrap();
        ok(&["repo", "refresh", "--repo", &repo, "--key", &rel.key()]);
        let b = rel.p(&format!("{name}.tern"));
        ok(&["bundle", "create", "--repo", &repo, "--target", &target, "--out", &b]);
        b
    };
    let device_with_key = || {
        let dev = Device::new(&rel.root());
        fs::copy(dev0.path("state/encryption.pem"), dev.path("state/encryption.pem")).unwrap();
        dev
    };
    for (i, (what, bad, expect)) in cases.into_iter().enumerate() {
        // The signed plaintext length made consistent with the tampered ciphertext's length,
        // so that the records themselves are what is tested.
        let body = bad.len() - HEADER;
        let records = body.div_ceil(RECORD).max(1);
        let b = sign_and_bundle(&format!("bad-{i}"), &bad, (body - 16 * records) as u64);
        let dev = device_with_key();
        let slot_a = fs::read(dev.path("slot-a.img")).unwrap();
        let err = fails(&["install", &b, "--config", &dev.config()], "");
        assert!(err.contains(expect), "{what}: {err}");
        let st = dev.status();
        assert_eq!(st["primary"], "A", "{what}");
        assert_eq!(st["slots"][1]["attempts"], 0, "{what}");
        assert_eq!(st["slots"][1]["record"]["status"], "bad", "{what}");
        assert_eq!(fs::read(dev.path("slot-a.img")).unwrap(), slot_a, "{what}");
        assert!(
            !dev.log().iter().any(|l| l.starts_with("set-primary")),
            "{what}: {:?}",
            dev.log()
        );
        assert_eq!(dev.reboot()["booted"], "A", "{what}");
    }

    // Signed encryption parameters that do not describe the signed ciphertext (here its
    // plaintext length) are refused before any slot is touched.
    let listed_length = signed_custom["tern"]["encryption"]["plaintext_length"]
        .as_u64()
        .unwrap();
    let b = sign_and_bundle("wrong-length", &ct, listed_length + 65536);
    let dev = device_with_key();
    let before = dev.snapshot();
    fails(&["install", &b, "--config", &dev.config()], "is not the");
    assert_eq!(dev.snapshot(), before);
}

/// `tern agent check-config`: each class of mistake is named with its line and key, all of
/// them at once; a sound configuration prints what would be used.
#[test]
fn check_config_reports_each_class_of_mistake_with_its_key_and_line() {
    use std::os::unix::fs::PermissionsExt;
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let good = ok(&["agent", "check-config", "--config", &dev.config()]);
    assert!(
        good.contains("no problems found") && good.contains("slot rootfs.a"),
        "{good}"
    );

    fs::write(dev.path("garbage.json"), "{\"signed\": 1}").unwrap();
    fs::write(dev.path("not-executable.sh"), "#!/bin/sh\n").unwrap();
    fs::write(dev.path("group.pem"), "key").unwrap();
    fs::set_permissions(dev.path("group.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    let text = r#"device_type = "tern-sim"
hardware_revision = "rev-a"
trusted_root = "garbage.json"
state_dir = "state"
offline_install = "allow"
install_roots = ["no-such-dir"]
log = "debug=loud"

[bootloader]
backend = "uboot"
fw_env_config = "fw_env.config"

[[slot]]
class = "rootfs"
name = "rootfs.a"
device = "slot-a.img"
bootname = "A"

[[slot]]
class = "rootfs"
name = "rootfs.b"
device = "missing-b.img"
bootname = "B"

[hooks]
health_check = "not-executable.sh"

[encryption]
group_keys = ["group.pem"]
"#;
    let cfg = dev.path("bad.toml");
    fs::write(&cfg, text).unwrap();
    let line = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    // No bootloader tools on an empty PATH.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["agent", "check-config", "--config", &s(&cfg)])
        .env("PATH", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for (key, needle, why) in [
        ("trusted_root", "trusted_root", "not a usable root"),
        ("install_roots", "install_roots", "not a directory"),
        ("log", "log", "not a level or filter"),
        ("bootloader.backend", "backend", "`fw_printenv` is not on PATH"),
        ("bootloader.backend", "backend", "`fw_setenv` is not on PATH"),
        ("bootloader.fw_env_config", "fw_env_config", "No such file"),
        ("slot.1.device", "device = \"missing-b.img\"", "No such file"),
        ("hooks.health_check", "health_check", "not an executable file"),
        ("encryption.group_keys", "group_keys", "make it 0600"),
    ] {
        let at = format!("bad.toml:{}: `{key}`: ", line(needle));
        assert!(
            err.lines().any(|l| l.contains(&at) && l.contains(why)),
            "no {at}… {why} in:\n{err}"
        );
    }
    assert!(err.contains("tern: 9 problem(s)"), "{err}");
    // What cannot be parsed is named by the loader, with its key and line.
    fs::write(
        &cfg,
        text.replace("boot_attempts", "x").replace("state_dir", "state_dri"),
    )
    .unwrap();
    let err = fails(&["agent", "check-config", "--config", &s(&cfg)], "state_dri");
    assert!(err.contains("line 4"), "{err}");
}

/// Under systemd: the agent says it is ready after its boot-time step, and tells the
/// watchdog it is alive while it waits between polls.
#[test]
fn the_agent_tells_systemd_it_is_ready_and_alive() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let socket_path = dev.path("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["agent", "run", "--config", &dev.config()])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m| m.contains("READY=1")) && seen.iter().filter(|m| m.trim() == "WATCHDOG=1").count() >= 2)
    {
        assert!(seen.len() < 100, "no READY=1 and two WATCHDOG=1 among {seen:?}");
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => {
                let _ = agent.kill();
                panic!("no more notifications ({e}); got {seen:?}");
            }
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(seen[0].contains("READY=1"), "{seen:?}");
}
