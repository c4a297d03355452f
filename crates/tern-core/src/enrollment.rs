//! The enrollment document: a device proves that it holds its key.
//!
//! A device enrolls with a document signed by the device key it names (a TUF envelope, as
//! check-ins are), covering everything the registry will believe about it: its id, that
//! key, its encryption key, its type, hardware and tags, the id of the fleet enrollment
//! token it presents (so the document serves with that token only), and a challenge the
//! server issued moments before (so it is fresh). Whoever knows a device's *public* key,
//! even with a fleet token, cannot sign this document, so cannot enroll the device with an
//! encryption key of their own: a release encrypted for the device stays the device's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::keys::PublicKey;
use crate::metadata::Envelope;
use crate::verify::verify_threshold;

/// `_type` of an enrollment document.
pub const ENROLLMENT_TYPE: &str = "tern-enrollment";
/// Largest enrollment document a server parses.
pub const MAX_ENROLLMENT_BYTES: usize = 64 * 1024;
/// Longest challenge accepted.
pub const MAX_CHALLENGE_CHARS: usize = 256;

/// An enrollment document's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// [`ENROLLMENT_TYPE`].
    #[serde(rename = "_type")]
    pub kind: String,
    /// The device's chosen id (serial number, hostname).
    pub device_id: String,
    /// Its signing key (TUF key JSON); the document is signed by it.
    pub public_key: Value,
    /// Its encryption key (X25519, `crate::keywrap` JSON form), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<Value>,
    /// Device type.
    pub device_type: String,
    /// Hardware revision.
    pub hardware: String,
    /// Tags for deployments.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The id of the fleet enrollment token presented with it (`None` when the device
    /// enrolls with a certificate over mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The challenge the server issued (`GET /api/v1/devices/enroll/challenge`).
    pub challenge: String,
}

fn malformed(reason: impl std::fmt::Display) -> Error {
    Error::Malformed {
        role: "enrollment".into(),
        reason: reason.to_string(),
    }
}

/// Parse an enrollment document and check that the key it names signed it. Returns the
/// content and that key. Bounded by [`MAX_ENROLLMENT_BYTES`]; what the fields may hold
/// (id syntax, tags) is the server's to check.
pub fn parse_enrollment(bytes: &[u8]) -> Result<(Enrollment, PublicKey)> {
    if bytes.len() > MAX_ENROLLMENT_BYTES {
        return Err(malformed(format!(
            "{} bytes exceeds the {MAX_ENROLLMENT_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let env = Envelope::parse("enrollment", bytes)?;
    match env.signed.get("_type").and_then(Value::as_str) {
        Some(ENROLLMENT_TYPE) => {}
        other => {
            return Err(Error::WrongRoleType {
                role: "enrollment".into(),
                expected: ENROLLMENT_TYPE.into(),
                found: crate::text::shown(other.unwrap_or("none")),
            })
        }
    }
    let doc: Enrollment = serde_path_to_error::deserialize(&env.signed).map_err(|e| {
        Error::field(
            "enrollment",
            e.path().to_string(),
            crate::text::shown(&e.inner().to_string()),
        )
    })?;
    if doc.challenge.is_empty() || doc.challenge.len() > MAX_CHALLENGE_CHARS {
        return Err(Error::field(
            "enrollment",
            "challenge",
            format!("must be 1 to {MAX_CHALLENGE_CHARS} characters"),
        ));
    }
    let key = PublicKey::from_value("device key", &doc.public_key)
        .map_err(|e| Error::field("enrollment", "public_key", e.to_string()))?;
    // Proof of possession: the key the document names signed it.
    let keyid = key.keyid();
    let keys = BTreeMap::from([(keyid.clone(), key.clone())]);
    verify_threshold("enrollment", &env, &keys, &[keyid], 1)?;
    Ok((doc, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::director::sign_document;
    use crate::keys::{KeyAlgorithm, SigningKey};

    fn doc(key: &SigningKey) -> Enrollment {
        Enrollment {
            kind: ENROLLMENT_TYPE.into(),
            device_id: "dev-1".into(),
            public_key: key.public().to_value().clone(),
            encryption_key: None,
            device_type: "board".into(),
            hardware: "rev-a".into(),
            tags: vec!["lab".into()],
            token_id: Some("0011".into()),
            challenge: "v1.1.2.3".into(),
        }
    }

    #[test]
    fn only_the_named_key_can_sign_it() {
        let dev = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let other = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let d = doc(&dev);
        let good = sign_document("enrollment", &d, &dev).unwrap();
        let (parsed, key) = parse_enrollment(&good).unwrap();
        assert_eq!(parsed, d);
        assert_eq!(key.keyid(), dev.public().keyid());
        // Someone who knows the device's public key signs with their own.
        let forged = sign_document("enrollment", &d, &other).unwrap();
        assert_eq!(parse_enrollment(&forged).unwrap_err().kind(), "BelowThreshold");
        let mut no_challenge = d.clone();
        no_challenge.challenge.clear();
        let e = parse_enrollment(&sign_document("enrollment", &no_challenge, &dev).unwrap()).unwrap_err();
        assert_eq!(e.kind(), "Field");
        assert!(parse_enrollment(&vec![b' '; MAX_ENROLLMENT_BYTES + 1]).is_err());
    }
}
