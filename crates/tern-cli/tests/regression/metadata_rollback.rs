//! Item 4: a bundle carrying older, still-unexpired targets metadata that lists a release
//! since withdrawn installed from local media, and raised the rollback floor above every
//! later fix. A device keeps the highest version of every role it verified, from any
//! source, and refuses older metadata.

use crate::device::{fails, ok, Device, Releases};

/// 2.0.0 is published, bundled, then withdrawn (it bricks a board); 1.1.0 replaces it and
/// a device installs and commits 1.1.0. Returns the releases, the withdrawn release's
/// bundle and the device.
fn withdrawn_then_current() -> (Releases, std::path::PathBuf, Device) {
    let rel = Releases::new();
    let (withdrawn, _) = rel.bundle("2.0.0", "tern-sim", &[], 100_000, false);
    ok(&[
        "repo",
        "remove-target",
        "--repo",
        &rel.p("repo"),
        "rootfs-2.0.0-tern-sim.img",
        "--key",
        &rel.key(),
    ]);
    let (current, _) = rel.bundle("1.1.0", "tern-sim", &[], 100_000, false);
    let dev = Device::new(&rel.root());
    dev.install(&current);
    assert_eq!(dev.reboot()["boot_step"]["outcome"], "committed");
    (rel, withdrawn, dev)
}

#[test]
fn a_bundle_with_older_targets_metadata_than_the_device_saw_is_refused() {
    let (_rel, withdrawn, dev) = withdrawn_then_current();
    let floors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dev.path("state/tuf/floors.json")).unwrap()).unwrap();
    let seen = floors["roles"]["targets"]["version"].as_u64().unwrap();
    assert!(seen >= 3, "{floors}");

    // The old bundle still verifies on its own (its metadata has not expired), but this
    // device has seen newer targets metadata.
    let before = dev.snapshot();
    let err = fails(
        &["install", &crate::device::s(&withdrawn), "--config", &dev.config()],
        "metadata rollback refused",
    );
    assert!(
        err.contains(&format!("targets: version 2 is older than trusted version {seen}")),
        "{err}"
    );
    assert_eq!(dev.snapshot(), before, "nothing was written or raised");
    let st = dev.status();
    assert_eq!(st["rollback_floor"], "1.1.0");
}

/// The entries of a bundle as (name, bytes).
fn entries(bundle: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut a = tar::Archive::new(std::fs::File::open(bundle).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

#[test]
fn older_targets_metadata_cannot_come_back_through_a_root_that_added_a_key() {
    let (rel, withdrawn, dev) = withdrawn_then_current();
    // Later, root 2 adds a second targets key (the old one stays).
    ok(&["key", "generate", "--out", &rel.p("k2")]);
    ok(&[
        "repo",
        "rotate",
        "--repo",
        &rel.p("repo"),
        "--role",
        "targets",
        "--add-key",
        &rel.p("k2.pub.json"),
        "--key",
        &rel.key(),
    ]);
    // An attacker pairs that (public) root chain with the withdrawn release's old targets
    // metadata, which the kept key signed and which has not expired.
    let old = entries(&withdrawn);
    let hostile = rel.dir.path().join("hostile.tern");
    let mut b = tar::Builder::new(std::fs::File::create(&hostile).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    for (name, data) in &old {
        if name == "metadata/1.root.json" {
            add(name, data);
            add(
                "metadata/2.root.json",
                &std::fs::read(rel.p("repo/metadata/2.root.json")).unwrap(),
            );
        } else {
            add(name, data);
        }
    }
    b.finish().unwrap();
    drop(b);
    let before = dev.snapshot();
    let err = fails(
        &["install", &crate::device::s(&hostile), "--config", &dev.config()],
        "metadata rollback refused",
    );
    assert!(err.contains("targets: version 2 is older"), "{err}");
    assert_eq!(dev.snapshot(), before);
}
