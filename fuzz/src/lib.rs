//! What the fuzz targets share: the reference time, the fixed keys and the committed
//! fixtures they verify against (compiled in, so no target touches the disk per input).
//!
//! `examples/make_seeds.rs` writes the fixtures and most seeds from these constants; the
//! bundle and repository seeds come from the `tern` binary (see README.md).

use std::sync::OnceLock;

use tern_core::metadata::{Root, Signed};
use tern_core::timefmt::DateTime;
use tern_core::PublicKey;

/// The reference time every target verifies at: 2025-12-02T00:00:00Z. The fixtures and the
/// seeds expire in 2036.
pub const NOW_UNIX: i64 = 1_764_633_600;

/// The reference time.
pub fn now() -> DateTime {
    DateTime::from_unix(NOW_UNIX)
}

/// The device the director orders are for.
pub const DEVICE_ID: &str = "dev-1";
/// The check-in nonce the director orders answer.
pub const NONCE: &str = "9e3779b97f4a7c15";
/// The data key of the `aead_stream` seeds.
pub const AEAD_KEY: [u8; 32] = [0x42; 32];
/// The X25519 secret of the recipient the `recipients` seeds wrap a key for.
pub const RECIPIENT_SECRET: [u8; 32] = [0x11; 32];
/// Key ids the `version_floors` seeds and target name (floors do not check their form).
pub const FLOOR_KEYS: [&str; 2] = [
    "1111111111111111111111111111111111111111111111111111111111111111",
    "2222222222222222222222222222222222222222222222222222222222222222",
];
/// The length `match_repository` compares ordered targets with (the seeds' first target: the bytes `(i * 31) % 251`).
pub const ORDER_LENGTH: u64 = 1024;
/// The SHA-256 `match_repository` compares ordered targets with.
pub const ORDER_SHA256: &str = "566831246a14668f33e86d5501f4fcc66b10d28b0ab3e0727970520da68d9de4";

/// The repository's trusted root (version 1) the bundle seeds chain to.
pub const TRUSTED_ROOT: &[u8] = include_bytes!("../fixtures/trusted-root.json");
/// The director root whose `targets` role signs the order seeds.
pub const DIRECTOR_ROOT: &[u8] = include_bytes!("../fixtures/director-root.json");
/// The device key (TUF key JSON) that signs the check-in seeds.
pub const DEVICE_KEY: &[u8] = include_bytes!("../fixtures/device-key.pub.json");
/// `{"sha256", "key_commitment"}` of the payload the recipients seeds are for.
pub const RECIPIENTS_PAYLOAD: &[u8] = include_bytes!("../fixtures/recipients-payload.json");

/// The trusted root, parsed and self-verified once.
pub fn trusted_root() -> &'static Signed<Root> {
    static R: OnceLock<Signed<Root>> = OnceLock::new();
    R.get_or_init(|| tern_core::trust::load_trusted_root(TRUSTED_ROOT).expect("fixtures/trusted-root.json"))
}

/// The director root, parsed and self-verified once.
pub fn director_root() -> &'static Signed<Root> {
    static R: OnceLock<Signed<Root>> = OnceLock::new();
    R.get_or_init(|| tern_core::trust::load_trusted_root(DIRECTOR_ROOT).expect("fixtures/director-root.json"))
}

/// The device key, parsed once.
pub fn device_key() -> &'static PublicKey {
    static K: OnceLock<PublicKey> = OnceLock::new();
    K.get_or_init(|| {
        let v: serde_json::Value = serde_json::from_slice(DEVICE_KEY).expect("fixtures/device-key.pub.json");
        PublicKey::from_value("device key", &v).expect("fixtures/device-key.pub.json")
    })
}

/// `(sha256, key_commitment)` of the recipients seeds' payload.
pub fn recipients_payload() -> &'static (String, String) {
    static P: OnceLock<(String, String)> = OnceLock::new();
    P.get_or_init(|| {
        let v: serde_json::Value =
            serde_json::from_slice(RECIPIENTS_PAYLOAD).expect("fixtures/recipients-payload.json");
        let field = |k: &str| v[k].as_str().expect("fixtures/recipients-payload.json").to_owned();
        (field("sha256"), field("key_commitment"))
    })
}
