//! Threshold signature verification, counting each key once.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::keys::{KeyId, PublicKey};
use crate::metadata::Envelope;

/// Verify that at least `threshold` distinct authorised keys signed `envelope`.
///
/// A key is counted once however many key ids name it: two key objects with the same
/// algorithm and key bytes are one key. Signatures by keys outside `keyids` are ignored.
/// When the threshold is not met, the error says the most specific reason: an authorised
/// key's signature that failed ([`Error::BadSignature`]), then an authorised key Tern cannot
/// use ([`Error::UnsupportedKey`]), else [`Error::BelowThreshold`].
pub fn verify_threshold(
    role: &str,
    envelope: &Envelope,
    keys: &BTreeMap<KeyId, PublicKey>,
    keyids: &[KeyId],
    threshold: u32,
) -> Result<()> {
    let msg = envelope.canonical_signed(role)?;
    let authorised: BTreeSet<&KeyId> = keyids.iter().collect();
    let mut counted = BTreeSet::new();
    let mut first_bad: Option<&KeyId> = None;
    let mut first_unsupported: Option<&PublicKey> = None;
    let mut first_unsupported_id: Option<&KeyId> = None;
    for entry in &envelope.signatures {
        if !authorised.contains(&entry.keyid) {
            continue;
        }
        let Some(key) = keys.get(&entry.keyid) else { continue };
        let Some(identity) = key.identity() else {
            if first_unsupported.is_none() {
                first_unsupported = Some(key);
                first_unsupported_id = Some(&entry.keyid);
            }
            continue;
        };
        let sig = hex::decode(&entry.sig).unwrap_or_default();
        if key.verify(&msg, &sig) {
            counted.insert(identity);
        } else if first_bad.is_none() {
            first_bad = Some(&entry.keyid);
        }
    }
    let valid = counted.len() as u32;
    if valid >= threshold {
        return Ok(());
    }
    if let Some(keyid) = first_bad {
        return Err(Error::BadSignature {
            role: role.to_owned(),
            keyid: keyid.clone(),
            valid,
            threshold,
        });
    }
    if let (Some(key), Some(keyid)) = (first_unsupported, first_unsupported_id) {
        return Err(Error::UnsupportedKey {
            role: role.to_owned(),
            keyid: keyid.clone(),
            keytype: key.keytype().to_owned(),
            scheme: key.scheme().to_owned(),
            valid,
            threshold,
        });
    }
    Err(Error::BelowThreshold {
        role: role.to_owned(),
        valid,
        threshold,
    })
}

/// How many distinct authorised keys have valid signatures (for status displays).
pub fn count_valid(
    role: &str,
    envelope: &Envelope,
    keys: &BTreeMap<KeyId, PublicKey>,
    keyids: &[KeyId],
) -> Result<u32> {
    let msg = envelope.canonical_signed(role)?;
    let mut counted = BTreeSet::new();
    for entry in &envelope.signatures {
        if !keyids.contains(&entry.keyid) {
            continue;
        }
        if let Some(key) = keys.get(&entry.keyid) {
            let sig = hex::decode(&entry.sig).unwrap_or_default();
            if let (Some(identity), true) = (key.identity(), key.verify(&msg, &sig)) {
                counted.insert(identity);
            }
        }
    }
    Ok(counted.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyAlgorithm, SigningKey};
    use serde_json::json;

    fn setup() -> (SigningKey, SigningKey, Envelope) {
        let a = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let b = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
        let env = Envelope {
            signed: json!({"_type": "targets", "x": 1}),
            signatures: vec![],
        };
        (a, b, env)
    }

    #[test]
    fn threshold_counts_distinct_keys() {
        let (a, b, mut env) = setup();
        let keys: BTreeMap<_, _> = [
            (a.public().keyid(), a.public().clone()),
            (b.public().keyid(), b.public().clone()),
        ]
        .into();
        let ids: Vec<_> = keys.keys().cloned().collect();
        env.sign("t", &a).unwrap();
        assert_eq!(
            verify_threshold("t", &env, &keys, &ids, 2).unwrap_err().kind(),
            "BelowThreshold"
        );
        env.sign("t", &b).unwrap();
        verify_threshold("t", &env, &keys, &ids, 2).unwrap();
        // Change the first byte whatever it was (a fixed "00" left one signature in 256
        // valid, and the test failed that often).
        let sig = &mut env.signatures[0].sig;
        let flipped = if sig.starts_with("00") { "01" } else { "00" };
        sig.replace_range(0..2, flipped);
        assert_eq!(
            verify_threshold("t", &env, &keys, &ids, 2).unwrap_err().kind(),
            "BadSignature"
        );
        // A bad signature does not matter when the others meet the threshold.
        verify_threshold("t", &env, &keys, &ids, 1).unwrap();
    }

    #[test]
    fn one_key_under_two_ids_counts_once() {
        let (a, _, mut env) = setup();
        let mut twin_value = a.public().to_value().clone();
        twin_value["x-dup"] = json!(1);
        let twin = PublicKey::from_value("root", &twin_value).unwrap();
        let keys: BTreeMap<_, _> = [(a.public().keyid(), a.public().clone()), (twin.keyid(), twin.clone())].into();
        let ids: Vec<_> = keys.keys().cloned().collect();
        env.sign("t", &a).unwrap();
        let sig = env.signatures[0].sig.clone();
        env.signatures.push(crate::metadata::SignatureEntry {
            keyid: twin.keyid(),
            sig,
        });
        assert_eq!(count_valid("t", &env, &keys, &ids).unwrap(), 1);
        assert_eq!(
            verify_threshold("t", &env, &keys, &ids, 2).unwrap_err().kind(),
            "BelowThreshold"
        );
    }
}
