//! A director order as a device receives it in the answer to its check-in: verified
//! against a fixed director root (its `targets` role signs orders) for one device and
//! nonce, then each ordered target compared with what a repository signed.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use tern_core::director::{match_repository, verify_order};

fuzz_target!(|data: &[u8]| {
    let root = tern_fuzz::director_root();
    let Ok(order) = verify_order(data, root, tern_fuzz::DEVICE_ID, tern_fuzz::NONCE, tern_fuzz::now()) else {
        return;
    };
    assert_eq!(order.device_id, tern_fuzz::DEVICE_ID);
    assert_eq!(order.nonce, tern_fuzz::NONCE);
    assert!(!order.targets.is_empty());
    let signed = BTreeMap::from([("sha256".to_owned(), tern_fuzz::ORDER_SHA256.to_owned())]);
    for t in &order.targets {
        let _ = match_repository(t, tern_fuzz::ORDER_LENGTH, &signed);
        // Against its own length and hashes, an ordered target matches exactly when it
        // names a sha256.
        assert_eq!(
            match_repository(t, t.length, &t.hashes).is_ok(),
            t.hashes.contains_key("sha256"),
            "{t:?}"
        );
    }
});
