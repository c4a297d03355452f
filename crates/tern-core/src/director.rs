//! The device–server protocol: signed check-ins and the director's signed orders
//! (DESIGN §3, Uptane's director reduced to one signed document per answer).
//!
//! A device signs every check-in with its own key: who it is, a fresh nonce, the time, what
//! each slot holds and how its current deployment stands. The server answers a pending
//! deployment with an [`Order`] signed by the director's online key: the device, the nonce
//! it answers, the release, the exact target names, lengths and hashes, and an expiry.
//!
//! The director's keys are described by a TUF root (the *director root*), provisioned on the
//! device beside the repository's root. Its `targets` role is the online key that signs
//! orders, as the director's targets role is in Uptane; its `root` role is offline and can
//! rotate the online key with the usual root chain.
//!
//! Both documents use the TUF envelope (`{"signed": …, "signatures": […]}`, canonical JSON
//! signed), so the key types and threshold rules are those of the repository.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::keys::{PublicKey, SigningKey};
use crate::metadata::{Envelope, Root, Signed};
use crate::timefmt::DateTime;
use crate::verify::verify_threshold;

/// `_type` of a check-in.
pub const CHECKIN_TYPE: &str = "tern-checkin";
/// `_type` of an order.
pub const ORDER_TYPE: &str = "tern-order";
/// Largest check-in a server parses.
pub const MAX_CHECKIN_BYTES: usize = 64 * 1024;
/// Largest order a device parses.
pub const MAX_ORDER_BYTES: usize = 64 * 1024;
/// Longest nonce accepted (hex characters).
pub const MAX_NONCE_CHARS: usize = 128;

/// What one slot holds, as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotReport {
    /// Slot name (`rootfs.a`).
    pub name: String,
    /// Whether the device booted from it.
    pub booted: bool,
    /// The agent's record: empty, verified, committed, bad…
    pub status: String,
    /// The release version it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The target it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// SHA-256 of the image in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Where the device stands with a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Fetching the target (see `progress`).
    Downloading,
    /// Writing the inactive slot.
    Installing,
    /// Installed; the device is about to reboot into it.
    Rebooting,
    /// Booted the new slot, not yet committed.
    Trial,
    /// Booted the new slot and committed it.
    Committed,
    /// The bootloader fell back to the old slot.
    RolledBack,
    /// The install failed or was refused (see `reason`).
    Failed,
}

/// Bytes done of a total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// The device's report on one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentReport {
    /// The deployment's id, from the order.
    pub deployment: String,
    /// Where it stands.
    pub stage: Stage,
    /// Download progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Why it failed or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A signed check-in's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckIn {
    /// [`CHECKIN_TYPE`].
    #[serde(rename = "_type")]
    pub kind: String,
    /// The device.
    pub device_id: String,
    /// Fresh random hex; the order answering this check-in must echo it.
    pub nonce: String,
    /// The challenge the server gave for this device's next check-in (in the answer to the
    /// last one, or from `GET /api/v1/devices/ID/challenge`): a recorded check-in answers
    /// a challenge that is no longer current, so it cannot be replayed.
    #[serde(default)]
    pub challenge: String,
    /// The device's clock.
    pub time: String,
    /// The agent's state name (idle, pending-reboot, trial…).
    pub phase: String,
    /// Each slot.
    pub slots: Vec<SlotReport>,
    /// The deployment in progress or last finished, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentReport>,
    /// The last order the device refused, and why (so that the operator sees attacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_order: Option<String>,
}

impl CheckIn {
    /// The slot the device booted from.
    pub fn booted(&self) -> Option<&SlotReport> {
        self.slots.iter().find(|s| s.booted)
    }
}

/// One target an order names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderTarget {
    /// Target path in the repository.
    pub name: String,
    /// Its length.
    pub length: u64,
    /// Its hashes, as the repository lists them.
    pub hashes: BTreeMap<String, String>,
}

/// A director order's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// [`ORDER_TYPE`].
    #[serde(rename = "_type")]
    pub kind: String,
    /// The device it is for.
    pub device_id: String,
    /// The check-in nonce it answers.
    pub nonce: String,
    /// The deployment.
    pub deployment: String,
    /// The release.
    pub release: String,
    /// Exactly what to install.
    pub targets: Vec<OrderTarget>,
    /// When it stops being valid.
    pub expires: String,
}

/// Why a device refuses an order. Each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderRefusal {
    /// Not parseable, too large, or the wrong type.
    #[error("order is malformed: {0}")]
    Malformed(String),
    /// Not signed by a threshold of the director root's online keys.
    #[error("order is not signed by the director: {0}")]
    Signature(String),
    /// For another device.
    #[error("order is for device `{order}`, this device is `{device}`")]
    WrongDevice {
        /// The order's device.
        order: String,
        /// This device.
        device: String,
    },
    /// It answers an older check-in (a replay).
    #[error("order answers nonce {order}, not this check-in's nonce {expected} (a replayed order)")]
    StaleNonce {
        /// The order's nonce.
        order: String,
        /// The nonce this device sent.
        expected: String,
    },
    /// Past its expiry.
    #[error("order expired at {expires} (now {now})")]
    Expired {
        /// Its expiry.
        expires: String,
        /// The device's time.
        now: String,
    },
    /// It disagrees with the repository's signed targets.
    #[error("order for `{target}` differs from the repository: {reason}")]
    Mismatch {
        /// The target.
        target: String,
        /// What differs.
        reason: String,
    },
}

impl OrderRefusal {
    /// A stable name for reports and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            OrderRefusal::Malformed(_) => "OrderMalformed",
            OrderRefusal::Signature(_) => "OrderSignature",
            OrderRefusal::WrongDevice { .. } => "OrderWrongDevice",
            OrderRefusal::StaleNonce { .. } => "OrderStaleNonce",
            OrderRefusal::Expired { .. } => "OrderExpired",
            OrderRefusal::Mismatch { .. } => "OrderMismatch",
        }
    }
}

fn malformed(e: impl std::fmt::Display) -> Error {
    Error::Malformed {
        role: "check-in".into(),
        reason: e.to_string(),
    }
}

/// Sign a document as a TUF envelope; `what` names it in errors.
pub fn sign_document<T: Serialize>(what: &str, doc: &T, key: &SigningKey) -> Result<Vec<u8>> {
    let mut env = Envelope::new(doc)?;
    env.sign(what, key)?;
    Ok(
        serde_json::to_vec(&serde_json::json!({"signed": env.signed, "signatures": env.signatures}))
            .unwrap_or_default(),
    )
}

fn typed<T: serde::de::DeserializeOwned>(what: &str, kind: &str, env: &Envelope) -> Result<T> {
    match env.signed.get("_type").and_then(Value::as_str) {
        Some(t) if t == kind => {}
        other => {
            return Err(Error::WrongRoleType {
                role: what.to_owned(),
                expected: kind.to_owned(),
                found: other.unwrap_or("none").to_owned(),
            })
        }
    }
    serde_path_to_error::deserialize(&env.signed)
        .map_err(|e| Error::field(what, e.path().to_string(), e.into_inner().to_string()))
}

/// Parse a check-in without checking its signature: the server needs the device id to know
/// which key to check it with. Bounded by [`MAX_CHECKIN_BYTES`].
pub fn parse_checkin(bytes: &[u8]) -> Result<(Envelope, CheckIn)> {
    if bytes.len() > MAX_CHECKIN_BYTES {
        return Err(malformed(format!(
            "{} bytes exceeds the {MAX_CHECKIN_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let env = Envelope::parse("check-in", bytes)?;
    let checkin: CheckIn = typed("check-in", CHECKIN_TYPE, &env)?;
    if checkin.nonce.is_empty()
        || checkin.nonce.len() > MAX_NONCE_CHARS
        || !checkin.nonce.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(Error::field("check-in", "nonce", "must be 1 to 128 hex characters"));
    }
    if checkin.challenge.len() > crate::enrollment::MAX_CHALLENGE_CHARS {
        return Err(Error::field("check-in", "challenge", "too long"));
    }
    DateTime::parse(&checkin.time).map_err(|r| Error::field("check-in", "time", r))?;
    Ok((env, checkin))
}

/// Check a parsed check-in's signature against the device's enrolled key.
pub fn verify_checkin(env: &Envelope, device_key: &PublicKey) -> Result<()> {
    let keyid = device_key.keyid();
    let keys = BTreeMap::from([(keyid.clone(), device_key.clone())]);
    verify_threshold("check-in", env, &keys, &[keyid], 1)
}

/// Verify an order for `device_id` answering `nonce` at time `now`, against the director
/// root (its `targets` role). Whether it matches the repository is the caller's next check.
pub fn verify_order(
    bytes: &[u8],
    director_root: &Signed<Root>,
    device_id: &str,
    nonce: &str,
    now: DateTime,
) -> std::result::Result<Order, OrderRefusal> {
    if bytes.len() > MAX_ORDER_BYTES {
        return Err(OrderRefusal::Malformed(format!(
            "{} bytes exceeds the {MAX_ORDER_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let env = Envelope::parse("order", bytes).map_err(|e| OrderRefusal::Malformed(e.to_string()))?;
    let role = director_root
        .signed
        .role("targets")
        .ok_or_else(|| OrderRefusal::Signature("the director root has no targets role".into()))?;
    verify_threshold("order", &env, &director_root.signed.keys, &role.keyids, role.threshold)
        .map_err(|e| OrderRefusal::Signature(e.to_string()))?;
    let order: Order = typed("order", ORDER_TYPE, &env).map_err(|e| OrderRefusal::Malformed(e.to_string()))?;
    if order.device_id != device_id {
        return Err(OrderRefusal::WrongDevice {
            order: order.device_id,
            device: device_id.to_owned(),
        });
    }
    if !crate::digest::ct_eq(order.nonce.as_bytes(), nonce.as_bytes()) {
        return Err(OrderRefusal::StaleNonce {
            order: order.nonce,
            expected: nonce.to_owned(),
        });
    }
    let expires = DateTime::parse(&order.expires).map_err(|r| OrderRefusal::Malformed(format!("expires: {r}")))?;
    if expires.unix() <= now.unix() {
        return Err(OrderRefusal::Expired {
            expires: order.expires,
            now: now.to_string(),
        });
    }
    if order.targets.is_empty() {
        return Err(OrderRefusal::Malformed("it names no target".into()));
    }
    Ok(order)
}

/// Compare an order's target with what the repository's verified metadata lists: the
/// length and every hash the order names must be equal, and the order must name sha256.
pub fn match_repository(
    ordered: &OrderTarget,
    length: u64,
    hashes: &BTreeMap<String, String>,
) -> std::result::Result<(), OrderRefusal> {
    let mismatch = |reason: String| OrderRefusal::Mismatch {
        target: ordered.name.clone(),
        reason,
    };
    if ordered.length != length {
        return Err(mismatch(format!("length {} ordered, {length} signed", ordered.length)));
    }
    if !ordered.hashes.contains_key("sha256") {
        return Err(mismatch("the order names no sha256".into()));
    }
    for (alg, value) in &ordered.hashes {
        match hashes.get(alg) {
            Some(v) if v.eq_ignore_ascii_case(value) => {}
            Some(v) => return Err(mismatch(format!("{alg} {value} ordered, {v} signed"))),
            None => return Err(mismatch(format!("the repository lists no {alg} hash"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyAlgorithm;
    use crate::metadata::{Common, RoleKeys};

    fn root_for(online: &SigningKey, offline: &SigningKey) -> Signed<Root> {
        let mut keys = BTreeMap::new();
        keys.insert(online.public().keyid(), online.public().clone());
        keys.insert(offline.public().keyid(), offline.public().clone());
        let mut roles = BTreeMap::new();
        for (name, k) in [
            ("root", offline),
            ("targets", online),
            ("snapshot", online),
            ("timestamp", online),
        ] {
            roles.insert(
                name.to_owned(),
                RoleKeys {
                    keyids: vec![k.public().keyid()],
                    threshold: 1,
                    unrecognized: BTreeMap::new(),
                },
            );
        }
        let root = Root {
            common: Common::new("root", 1, DateTime::from_unix(4_000_000_000)),
            consistent_snapshot: true,
            keys,
            roles,
            unrecognized: BTreeMap::new(),
        };
        let mut env = Envelope::new(&root).unwrap();
        env.sign("root", offline).unwrap();
        Signed::<Root>::from_envelope("root", env).unwrap()
    }

    fn order(device: &str, nonce: &str, expires: i64) -> Order {
        Order {
            kind: ORDER_TYPE.into(),
            device_id: device.into(),
            nonce: nonce.into(),
            deployment: "d1".into(),
            release: "1.1.0".into(),
            targets: vec![OrderTarget {
                name: "sim/rootfs.img".into(),
                length: 3,
                hashes: BTreeMap::from([("sha256".into(), "ab".into())]),
            }],
            expires: DateTime::from_unix(expires).to_string(),
        }
    }

    #[test]
    fn orders_are_checked_for_signer_device_nonce_and_expiry() {
        let online = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let offline = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let other = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let root = root_for(&online, &offline);
        let now = DateTime::from_unix(1_000);
        let good = sign_document("order", &order("dev-a", "aa", 2_000), &online).unwrap();
        assert!(verify_order(&good, &root, "dev-a", "aa", now).is_ok());
        let refusal =
            |bytes: &[u8], dev: &str, nonce: &str| verify_order(bytes, &root, dev, nonce, now).unwrap_err().kind();
        assert_eq!(refusal(&good, "dev-b", "aa"), "OrderWrongDevice");
        assert_eq!(refusal(&good, "dev-a", "bb"), "OrderStaleNonce");
        let expired = sign_document("order", &order("dev-a", "aa", 1_000), &online).unwrap();
        assert_eq!(refusal(&expired, "dev-a", "aa"), "OrderExpired");
        // Signed by the offline root key: not the key that signs orders.
        let wrong = sign_document("order", &order("dev-a", "aa", 2_000), &offline).unwrap();
        assert_eq!(refusal(&wrong, "dev-a", "aa"), "OrderSignature");
        let foreign = sign_document("order", &order("dev-a", "aa", 2_000), &other).unwrap();
        assert_eq!(refusal(&foreign, "dev-a", "aa"), "OrderSignature");
        assert_eq!(refusal(b"{", "dev-a", "aa"), "OrderMalformed");
    }

    #[test]
    fn repository_mismatch_is_named() {
        let t = &order("d", "n", 1).targets[0];
        let signed = BTreeMap::from([("sha256".to_owned(), "cd".to_owned())]);
        let e = match_repository(t, 3, &signed).unwrap_err();
        assert!(e.to_string().contains("sha256 ab ordered, cd signed"), "{e}");
        assert!(match_repository(t, 4, &t.hashes).is_err());
        assert!(match_repository(t, 3, &t.hashes).is_ok());
    }

    #[test]
    fn checkins_verify_with_the_device_key_only() {
        let dev = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let other = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let c = CheckIn {
            kind: CHECKIN_TYPE.into(),
            device_id: "dev-a".into(),
            nonce: "00ff".into(),
            challenge: String::new(),
            time: DateTime::from_unix(5).to_string(),
            phase: "idle".into(),
            slots: vec![],
            deployment: None,
            refused_order: None,
        };
        let bytes = sign_document("check-in", &c, &other).unwrap();
        let (env, parsed) = parse_checkin(&bytes).unwrap();
        assert_eq!(parsed, c);
        assert!(verify_checkin(&env, dev.public()).is_err());
        assert!(verify_checkin(&env, other.public()).is_ok());
        let mut bad = c.clone();
        bad.nonce = "not hex".into();
        assert!(parse_checkin(&sign_document("check-in", &bad, &dev).unwrap()).is_err());
    }
}
