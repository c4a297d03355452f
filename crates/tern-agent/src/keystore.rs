//! The device's keys for encrypted payloads: its own X25519 key and the group keys it was
//! provisioned with (`[encryption]` in `agent.toml`), and finding the one a payload's data
//! key is wrapped for.

use tern_bundle::VerifiedPayload;
use tern_core::keywrap::{self, DataKey, RecipientKey, RecipientSecret};

use crate::config::AgentConfig;
use crate::{Error, Result};

/// The device's own encryption key, made (0600) if it has none yet; returns its public half.
pub fn ensure_device_key(cfg: &AgentConfig) -> Result<RecipientKey> {
    let path = cfg.encryption_key_path();
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        }
        let files = tern_fs::KeyFiles {
            private: path.clone(),
            public: path.with_extension("pub.json"),
        };
        // A public half without its private key (a cut between the two writes) is stale.
        let _ = std::fs::remove_file(&files.public);
        return Ok(tern_fs::generate_recipient_files(&files)?);
    }
    Ok(tern_fs::load_recipient_secret(&path)?.public().clone())
}

/// Every key the device holds: its own (when it has one), then its group keys (which must
/// exist once configured).
pub fn keys(cfg: &AgentConfig) -> Result<Vec<RecipientSecret>> {
    let mut keys = Vec::new();
    let own = cfg.encryption_key_path();
    if own.exists() {
        keys.push(tern_fs::load_recipient_secret(&own)?);
    }
    for g in &cfg.encryption.group_keys {
        keys.push(tern_fs::load_recipient_secret(g)?);
    }
    Ok(keys)
}

/// The data key of an encrypted payload (`None` for a payload that is not encrypted),
/// unwrapped from the entries that came with it and checked against the signed manifest's
/// commitment. A device that is not a recipient gets [`Error::NotRecipient`].
pub fn data_key(cfg: &AgentConfig, payload: &VerifiedPayload) -> Result<Option<DataKey>> {
    let Some(enc) = payload.manifest.as_ref().and_then(|m| m.encryption.as_ref()) else {
        return Ok(None);
    };
    // The signed parameters must describe the signed ciphertext.
    if payload.length != enc.ciphertext_length() {
        return Err(Error::Decryption {
            target: payload.target.clone(),
            reason: format!(
                "the signed length {} is not the {} bytes its encryption parameters give",
                payload.length,
                enc.ciphertext_length()
            ),
        });
    }
    let keys = keys(cfg)?;
    let not_recipient = || Error::NotRecipient {
        target: payload.target.clone(),
        kids: if keys.is_empty() {
            "no key: none is configured in [encryption] or made yet".into()
        } else {
            keys.iter().map(|k| k.public().kid()).collect::<Vec<_>>().join(", ")
        },
    };
    let Some(doc) = payload.recipients.as_ref() else {
        return Err(not_recipient());
    };
    match keywrap::unwrap_any(&doc.recipients, &keys, &enc.key_commitment) {
        Ok(Some(k)) => Ok(Some(k)),
        Ok(None) => Err(not_recipient()),
        Err(e) => Err(Error::Decryption {
            target: payload.target.clone(),
            reason: format!("the data key wrapped for this device: {e}"),
        }),
    }
}
