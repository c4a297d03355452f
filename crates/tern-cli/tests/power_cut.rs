//! Power cuts: SIGKILL the agent at random instants during install and during the boot-time
//! step (commit), then power-cycle the simulated device and run the agent again.
//!
//! After every kill: the device boots a slot, that slot's content hash matches its recorded
//! metadata, the state file parses, and re-running finishes (committed) or rolls back. The
//! tally is printed and written to `target/power-cut-report.json`.
//!
//! SIGKILL at random instants rarely lands in the narrow windows between two persistent
//! writes, so a second test aborts the agent right after each of its persistent writes in
//! turn (`TERN_TEST_CRASH_AT=N`), during install and during the boot-time step, including a
//! restart of the agent without a reboot.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const RUNS: u64 = 200;

/// The tests of this file run one at a time: the random-kill test spreads its kills over
/// durations it measures first, and a neighbour loading the CPU during that measurement and
/// not after it would push the kills past the end.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let out = tern().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A small deterministic PRNG (xorshift), so a failing run can be reproduced.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Start `args`, SIGKILL it after `delay` (if still running); true if it was killed.
fn kill_after(args: &[&str], delay: Duration) -> bool {
    let mut child = tern()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + delay;
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            return false;
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn sha256_prefix(path: &Path, len: u64) -> String {
    let bytes = fs::read(path).unwrap();
    tern_core::digest::sha256_hex(&bytes[..len as usize])
}

/// The invariants that must hold after any kill and a power cycle.
fn check_boots_a_verified_slot(dev: &Path, run: u64) -> String {
    let state: Value = serde_json::from_slice(&fs::read(dev.join("state/state.json")).unwrap())
        .unwrap_or_else(|e| panic!("run {run}: state file does not parse: {e}"));
    let boot: Value = serde_json::from_slice(&fs::read(dev.join("bootloader.json")).unwrap()).unwrap();
    let booted = boot["booted"].as_str().unwrap();
    let (slot, file) = match booted {
        "A" => ("rootfs.a", "slot-a.img"),
        _ => ("rootfs.b", "slot-b.img"),
    };
    let rec = &state["slots"][slot];
    let status = rec["status"].as_str().unwrap_or("none");
    assert!(
        status == "good" || status == "verified",
        "run {run}: booted slot {booted} is `{status}`: {state}"
    );
    let len = rec["length"].as_u64().unwrap();
    assert_eq!(
        sha256_prefix(&dev.join(file), len),
        rec["sha256"].as_str().unwrap(),
        "run {run}: slot {booted} content does not match its record"
    );
    booted.to_owned()
}

#[test]
fn power_cuts_during_install_and_commit_never_brick() {
    let _serial = serial();
    let image: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (work, bundle, root) = release(&image, true);
    let p = |n: &str| work.path().join(n);
    let new_device = |n: u64| -> PathBuf {
        let d = p(&format!("dev-{n}"));
        ok(&[
            "device",
            "simulate",
            "--dir",
            &s(&d),
            "--root",
            &root,
            "--slot-mib",
            "8",
        ]);
        d
    };
    // How long the two operations take here (the fastest of three, so that a busy moment
    // during calibration does not push the kills past the end), to spread the kills over them.
    let mut install_time = std::time::Duration::MAX;
    let mut reboot_time = std::time::Duration::MAX;
    for n in 0..3 {
        let d = new_device(9990 + n);
        let cfg = s(&d.join("agent.toml"));
        let t = Instant::now();
        ok(&["install", &bundle, "--config", &cfg]);
        install_time = install_time.min(t.elapsed());
        let t = Instant::now();
        ok(&["sim", "reboot", "--config", &cfg]);
        reboot_time = reboot_time.min(t.elapsed());
    }

    let mut rng = Rng(0x7e57_c0de_1234_5678);
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    let mut killed = 0;
    for run in 0..RUNS {
        let dev = new_device(run);
        let cfg = s(&dev.join("agent.toml"));
        let during_install = run % 2 == 0;
        let was_killed = if during_install {
            let delay = install_time.mul_f64((rng.next() % 1000) as f64 / 1000.0);
            kill_after(&["install", &bundle, "--config", &cfg], delay)
        } else {
            ok(&["install", &bundle, "--config", &cfg]);
            let delay = reboot_time.mul_f64((rng.next() % 1000) as f64 / 1000.0);
            kill_after(&["sim", "reboot", "--config", &cfg], delay)
        };
        killed += u64::from(was_killed);
        // Power on again: the bootloader must find a slot, and that slot must be verified.
        ok(&["sim", "reboot", "--config", &cfg]);
        check_boots_a_verified_slot(&dev, run);
        // Run the agent again until the update settles.
        let outcome = settle(&dev, &cfg, &bundle, run);
        let phase = if during_install { "install" } else { "commit" };
        let key = format!(
            "{phase}/{}/{outcome}",
            if was_killed { "killed" } else { "finished-first" }
        );
        *tally.entry(key).or_default() += 1;
        fs::remove_dir_all(&dev).unwrap();
    }
    let report = serde_json::json!({
        "runs": RUNS,
        "killed": killed,
        "install_ms": install_time.as_millis() as u64,
        "reboot_ms": reboot_time.as_millis() as u64,
        "outcomes": tally,
    });
    eprintln!("power-cut test: {report}");
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/power-cut-report.json");
    let _ = fs::write(target, serde_json::to_vec_pretty(&report).unwrap());
    assert!(
        killed >= RUNS / 2,
        "too few kills landed ({killed}); the timing spread is off"
    );
}

/// A repository with one release of `image` (raw rootfs 1.0.0); returns (workdir, bundle, root).
fn release(image: &[u8], zstd: bool) -> (tempfile::TempDir, String, String) {
    release_with(image, zstd, false)
}

/// The same, encrypted for the group key `WORK/group.pem` when `encrypted`.
fn release_with(image: &[u8], zstd: bool, encrypted: bool) -> (tempfile::TempDir, String, String) {
    let work = tempfile::tempdir().unwrap();
    let p = |n: &str| s(&work.path().join(n));
    ok(&["key", "generate", "--out", &p("k")]);
    let k = p("k.pem");
    let repo = p("repo");
    #[rustfmt::skip]
    ok(&[
        "repo", "init", "--repo", &repo, "--root-key", &k, "--targets-key", &k, "--snapshot-key", &k,
        "--timestamp-key", &k, "--key", &k,
    ]);
    let img = p("rootfs.img");
    fs::write(&img, image).unwrap();
    #[rustfmt::skip]
    let mut add = vec![
        "repo", "add-target", "--repo", &repo, &img, "--name", "rootfs.img", "--release-version", "1.0.0",
        "--device-type", "tern-sim", "--installer", "raw", "--slot-class", "rootfs", "--key", &k,
    ];
    if zstd {
        add.extend(["--compression", "zstd"]);
    }
    let group = p("group");
    let group_pub = p("group.pub.json");
    if encrypted {
        ok(&["key", "generate", "--type", "x25519", "--out", &group]);
        add.extend(["--encrypt-for", &group_pub]);
    }
    ok(&add);
    ok(&["repo", "refresh", "--repo", &repo, "--key", &k]);
    ok(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "rootfs.img",
        "--out",
        &p("r.tern"),
    ]);
    let root = format!("{repo}/metadata/1.root.json");
    let bundle = p("r.tern");
    (work, bundle, root)
}

/// Run the agent (install, reboot) until the update settles; the final state.
fn settle(dev: &Path, cfg: &str, bundle: &str, run: u64) -> String {
    for _ in 0..6 {
        let st: Value = serde_json::from_str(&ok(&["agent", "status", "--config", cfg, "--output", "json"])).unwrap();
        match st["state"]["state"].as_str().unwrap() {
            done @ ("committed" | "rolled-back") => return done.to_owned(),
            "pending-reboot" | "trial" => {
                ok(&["sim", "reboot", "--config", cfg]);
            }
            _ => {
                ok(&["install", bundle, "--config", cfg]);
            }
        }
        check_boots_a_verified_slot(dev, run);
    }
    panic!("run {run}: the update did not settle");
}

/// Run `args` with the agent set to abort after its `n`th persistent write; true if it did.
fn crash_at(args: &[&str], n: usize) -> bool {
    let status = tern()
        .args(args)
        .env("TERN_TEST_CRASH_AT", n.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    !status.success() && status.code().is_none()
}

#[test]
fn a_crash_after_every_persistent_write_never_bricks() {
    crash_after_every_write(false);
}

/// The same with an encrypted release (records decrypted into the slot, the image digest
/// taken from the sealed manifest): the slot the device boots always matches its record.
#[test]
fn a_crash_after_every_persistent_write_of_an_encrypted_install_never_bricks() {
    crash_after_every_write(true);
}

fn crash_after_every_write(encrypted: bool) {
    let _serial = serial();
    let image: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 17) as u8)
        .collect();
    let (work, bundle, root) = release_with(&image, false, encrypted);
    let mut crashes = 0;
    for phase in ["install", "agent-run-then-reboot", "boot-step"] {
        for n in 1..=12 {
            let dev = work.path().join(format!("{phase}-{n}"));
            ok(&[
                "device",
                "simulate",
                "--dir",
                &s(&dev),
                "--root",
                &root,
                "--slot-mib",
                "2",
            ]);
            let cfg = s(&dev.join("agent.toml"));
            if encrypted {
                fs::copy(work.path().join("group.pem"), dev.join("group.pem")).unwrap();
                let mut text = fs::read_to_string(&cfg).unwrap();
                text.push_str("\n[encryption]\ngroup_keys = [\"group.pem\"]\n");
                fs::write(&cfg, text).unwrap();
            }
            let crashed = match phase {
                "boot-step" => {
                    ok(&["install", &bundle, "--config", &cfg]);
                    crash_at(&["sim", "reboot", "--config", &cfg], n)
                }
                _ => crash_at(&["install", &bundle, "--config", &cfg], n),
            };
            crashes += usize::from(crashed);
            if phase == "agent-run-then-reboot" {
                // The agent restarts without a reboot first: it must conclude nothing wrong.
                ok(&["agent", "run", "--once", "--config", &cfg]);
            }
            ok(&["sim", "reboot", "--config", &cfg]);
            check_boots_a_verified_slot(&dev, n as u64);
            // Settled: committed with the image in slot B, or rolled back (a crash in the
            // boot-time step can use up the new slot's attempts).
            if settle(&dev, &cfg, &bundle, n as u64) == "committed" {
                assert_eq!(fs::read(dev.join("slot-b.img")).unwrap()[..image.len()], image[..]);
            }
        }
    }
    eprintln!("crash points: {crashes} crashes landed");
    // Install makes at least 5 persistent writes, the boot-time step at least 2.
    assert!(crashes >= 2 * 5 + 2, "only {crashes} crash points were reached");
}
