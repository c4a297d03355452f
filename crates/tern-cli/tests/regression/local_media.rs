//! Item 3: local media installed for ever. When the inbox file could not be renamed (a
//! write-protected stick), or the reboot hook rebooted at once, the same bundle was
//! installed again after every reboot, alternating slots, until the previous known-good
//! image was gone from both; and a FIFO in the inbox hung the agent, state lock held.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::device::{fails, ok, s, Device, Releases};

fn tern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

/// `tern agent run --once`, killed (and the test failed) if it does not end in `limit`.
fn run_once(dev: &Device, limit: Duration) -> std::process::ExitStatus {
    let mut child = Command::new(tern_bin())
        .args(["agent", "run", "--once", "--config", &dev.config()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tern agent run --once` was still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn slot_hash(dev: &Device, slot: &str) -> String {
    tern_core::digest::sha256_hex(&fs::read(dev.path(slot)).unwrap())
}

#[test]
fn a_bundle_that_cannot_be_renamed_is_installed_once_even_when_the_reboot_hook_reboots_at_once() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 200_000, true);
    let dev = Device::new(&rel.root());
    fs::copy(&bundle, dev.path("inbox/release.tern")).unwrap();
    // The rename to release.tern.done fails, as on a write-protected stick.
    fs::create_dir_all(dev.path("inbox/release.tern.done/keep")).unwrap();
    // The reboot hook reboots at once: the agent is gone before it returns.
    dev.add_hook("reboot", "kill -9 $PPID; sleep 5");
    let factory = slot_hash(&dev, "slot-a.img");

    let killed = run_once(&dev, Duration::from_secs(60));
    assert!(!killed.success(), "the reboot hook killed the agent");
    let st = dev.status();
    assert_eq!(st["state"]["state"], "pending-reboot");
    assert_eq!(st["handled_offers"][0]["name"], "release.tern", "{st}");
    let boot = dev.reboot();
    assert_eq!(boot["booted"], "B");
    assert_eq!(boot["boot_step"]["outcome"], "committed");

    // After the reboot the bundle is still in the inbox: it is not installed again, and
    // the previous known-good image in slot A stays.
    for _ in 0..2 {
        let status = run_once(&dev, Duration::from_secs(60));
        assert!(status.success(), "a failed rename must not stop the agent");
    }
    let st = dev.status();
    assert_eq!(st["state"]["state"], "committed", "{st}");
    assert_eq!(st["booted"], "B");
    assert_eq!(slot_hash(&dev, "slot-a.img"), factory, "slot A was overwritten");
    assert_eq!(st["slots"][0]["record"]["status"], "good");
    assert!(dev.path("inbox/release.tern").exists());
}

#[test]
fn a_fifo_in_the_inbox_is_not_an_offer_and_cannot_hang_the_agent() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let fifo = dev.path("inbox/a.tern");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let before = dev.snapshot();
    let status = run_once(&dev, Duration::from_secs(30));
    assert!(status.success());
    assert_eq!(dev.snapshot(), before);
    // Named directly, it is refused at once rather than read.
    let t = Instant::now();
    fails(&["install", &s(&fifo), "--config", &dev.config()], "not a regular file");
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(dev.snapshot(), before);
}

#[test]
fn a_release_the_booted_slot_already_holds_is_not_installed_again() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 200_000, false);
    let dev = Device::new(&rel.root());
    dev.install(&bundle);
    assert_eq!(dev.reboot()["boot_step"]["outcome"], "committed");
    let before = dev.snapshot();
    let err = fails(
        &["install", &s(&bundle), "--config", &dev.config()],
        "is what the booted slot rootfs.b already holds",
    );
    assert!(err.contains("not installed again"), "{err}");
    assert_eq!(dev.snapshot(), before, "slot A, the known-good image, is untouched");
    // A different release still installs.
    let (next, _) = rel.bundle("1.1.0", "tern-sim", &[], 200_000, false);
    ok(&["install", &s(&next), "--config", &dev.config()]);
}
