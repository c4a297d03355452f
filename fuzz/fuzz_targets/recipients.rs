//! A recipients document (`recipients/SHA256.json`, unsigned: from a bundle, the
//! repository directory or the server): parsed and checked, re-encoded, checked against a
//! payload's signed commitment, and unwrapped with a fixed recipient secret.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tern_core::keywrap::{self, RecipientSecret, Recipients, KEY_SCHEME};
use tern_core::manifest::Manifest;

/// The signed manifest of the payload: read from JSON as a targets role carries it, so that
/// fields the manifest gains do not break the target.
fn manifest() -> &'static Manifest {
    static M: OnceLock<Manifest> = OnceLock::new();
    M.get_or_init(|| {
        let (_, commitment) = tern_fuzz::recipients_payload();
        let custom = serde_json::json!({"tern": {
            "version": "1.2.0",
            "device_type": "tern-sim",
            "installer": "raw",
            "slot_class": "rootfs",
            "encryption": {
                "scheme": tern_core::manifest::ENCRYPTION_SCHEME,
                "record_size": 1 << 16,
                "key_wrap": KEY_SCHEME,
                "key_commitment": commitment,
                "plaintext_length": 1024,
            },
        }});
        Manifest::from_custom("sim/enc.img", Some(&custom))
            .expect("manifest")
            .expect("manifest")
    })
}

fuzz_target!(|data: &[u8]| {
    let (sha256, _) = tern_fuzz::recipients_payload();
    let _ = tern_bundle::parse_recipients(sha256, data, manifest());

    let Ok(doc) = Recipients::parse(data) else {
        return;
    };
    // What Tern writes of a document it accepted, it accepts again, unchanged.
    let again = Recipients::parse(&doc.to_bytes()).expect("re-encoded recipients document");
    assert_eq!(again, doc);
    let secret = RecipientSecret::from_bytes(&tern_fuzz::RECIPIENT_SECRET).expect("fixed secret");
    if let Ok(Some(key)) = keywrap::unwrap_any(&doc.recipients, std::slice::from_ref(&secret), &doc.key_commitment) {
        assert!(key.matches(&doc.key_commitment));
    }
});
