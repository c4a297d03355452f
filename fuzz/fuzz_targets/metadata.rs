//! TUF metadata from a repository, a bundle or the network: the envelope, the four typed
//! roles with their field rules, canonical JSON of `signed`, the trust anchor check, a root
//! update from the fixed trusted root, and (for timestamps) the network client's first step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::manifest::Manifest;
use tern_core::trusted_set::TrustedSet;
use tern_core::{cjson, trust, Envelope, Root, Signed, Snapshot, TargetPath, Targets, Timestamp};

fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::parse("metadata", data) else {
        return;
    };
    let _ = cjson::to_canonical(&env.signed);
    let _ = env.to_bytes();
    // These parse the bytes again and refuse any other `_type` (update_root after its
    // signature check, which root inputs reach too), so they run on those inputs only:
    // fewer parses per input, more inputs per second.
    match env.role_type() {
        Some("root") => {
            let _ = trust::load_trusted_root(data);
            let _ = trust::update_root(tern_fuzz::trusted_root(), data);
        }
        Some("timestamp") => {
            let mut set = TrustedSet::new(tern_fuzz::TRUSTED_ROOT, tern_fuzz::now()).expect("fixture");
            let _ = set.update_timestamp(data);
        }
        _ => {}
    }

    if let Ok(root) = Signed::<Root>::from_envelope("root", env.clone()) {
        let _ = root.expires();
        for name in tern_core::TOP_LEVEL_ROLES {
            let _ = root.signed.role(name);
        }
    }
    if let Ok(targets) = Signed::<Targets>::from_envelope("targets", env.clone()) {
        let _ = targets.expires();
        for (name, file) in &targets.signed.targets {
            let _ = TargetPath::new(name);
            let _ = Manifest::from_custom(name, file.custom.as_ref());
            if let Some(d) = &targets.signed.delegations {
                let _ = d.roles_for_target(name);
            }
        }
        if let Some(d) = &targets.signed.delegations {
            let _ = d.roles_for_target("sim/rootfs.img");
        }
    }
    if let Ok(snapshot) = Signed::<Snapshot>::from_envelope("snapshot", env.clone()) {
        let _ = snapshot.version();
    }
    if let Ok(ts) = Signed::<Timestamp>::from_envelope("timestamp", env) {
        let _ = ts.signed.snapshot_meta();
    }
});
