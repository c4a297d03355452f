//! The device's version floors document (`STATE_DIR/tuf/floors.json`): parsed (bounded),
//! what Tern writes of it read back the same, and the rollback check and raise run on it
//! with a fixed set of verified roles.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::floors::{RoleVersion, VersionFloors};
use tern_fuzz::FLOOR_KEYS;

fn seen() -> Vec<RoleVersion> {
    let [a, b] = FLOOR_KEYS;
    let rv = |role: &str, version: u64, keys: &[&str]| RoleVersion {
        role: role.into(),
        version,
        keys: keys.iter().map(|k| k.to_string()).collect(),
    };
    vec![
        rv("root", 2, &[a]),
        rv("timestamp", 40, &[b]),
        rv("snapshot", 42, &[b]),
        rv("targets", 7, &[a, b]),
        rv("delegated/apps", 1, &[b]),
        rv("delegated/new", 1, &[a]),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut floors) = VersionFloors::parse(data) else {
        return;
    };
    let bytes = floors.to_bytes();
    let again = VersionFloors::parse(&bytes).expect("re-encoded floors document");
    assert_eq!(again, floors);

    let seen = seen();
    if floors.check(&seen).is_ok() {
        floors.raise(&seen);
        // Raised to what passed the check, the floors let the same roles pass again.
        floors.check(&seen).expect("check after raise");
    }
});
