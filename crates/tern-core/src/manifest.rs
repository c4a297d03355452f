//! Tern's per-payload manifest: what the agent needs to install a target.
//!
//! It lives in the target's `custom` object under the key `tern`, so it is signed with the
//! targets metadata and other TUF clients simply carry it along.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// How the agent installs a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Installer {
    /// A raw image streamed into a slot of `slot_class`.
    Raw,
    /// A tar archive unpacked into a directory (applications).
    Archive,
    /// A single file written to `install_path`.
    File,
    /// A script the agent runs with the payload as its input.
    Script,
}

/// How a payload is compressed inside the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// Stored as is.
    #[default]
    None,
    /// Zstandard; the agent decompresses while writing.
    Zstd,
}

impl std::fmt::Display for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Installer::Raw => "raw",
            Installer::Archive => "archive",
            Installer::File => "file",
            Installer::Script => "script",
        })
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        })
    }
}

/// The payload encryption scheme: [`crate::stream_aead`] records.
pub const ENCRYPTION_SCHEME: &str = "tern-stream-aes256gcm-v1";

/// How an encrypted payload is encrypted (signed, in the manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Always [`ENCRYPTION_SCHEME`].
    pub scheme: String,
    /// Plaintext bytes per record (a power of two, 1 KiB to 16 MiB).
    pub record_size: u32,
    /// How the data key is wrapped per recipient: [`crate::keywrap::KEY_SCHEME`].
    pub key_wrap: String,
    /// HMAC-SHA-256 of a fixed label under the data key, hex: which key opens the payload
    /// ([`crate::keywrap::DataKey::commitment`]).
    pub key_commitment: String,
    /// Length of the plaintext (before decompression, when compressed).
    pub plaintext_length: u64,
    /// The SHA-256 of the image (what lands in the slot, decompressed), sealed under the
    /// data key ([`crate::keywrap::DataKey::seal_digest`]): the device records it without
    /// hashing the image again, and only key holders can read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256_sealed: Option<String>,
}

impl Encryption {
    /// Field rules.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.scheme != ENCRYPTION_SCHEME {
            return Err(format!("scheme `{}` is not `{ENCRYPTION_SCHEME}`", self.scheme));
        }
        if self.key_wrap != crate::keywrap::KEY_SCHEME {
            return Err(format!(
                "key_wrap `{}` is not `{}`",
                self.key_wrap,
                crate::keywrap::KEY_SCHEME
            ));
        }
        let log2 = self.record_size.trailing_zeros();
        if !self.record_size.is_power_of_two() || !crate::stream_aead::LOG2_RECORD_RANGE.contains(&(log2 as u8)) {
            return Err(format!(
                "record_size {} is not a power of two from 1 KiB to 16 MiB",
                self.record_size
            ));
        }
        let hex_of =
            |v: &str, len: usize| v.len() == len && v.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if !hex_of(&self.key_commitment, 64) {
            return Err("key_commitment must be 64 lowercase hex digits".into());
        }
        if self.image_sha256_sealed.as_deref().is_some_and(|v| !hex_of(v, 96)) {
            return Err("image_sha256_sealed must be 96 lowercase hex digits".into());
        }
        Ok(())
    }

    /// The ciphertext length these parameters give.
    pub fn ciphertext_length(&self) -> u64 {
        crate::stream_aead::ciphertext_len(self.plaintext_length, self.record_size.trailing_zeros() as u8)
    }
}

/// The manifest of one payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The release version, SemVer: the rollback floor compares these.
    pub version: String,
    /// Device types this payload is for.
    pub device_type: String,
    /// Compatible hardware revisions; empty means any revision of the device type.
    #[serde(default)]
    pub hardware: Vec<String>,
    /// The installer.
    pub installer: Installer,
    /// Slot class (`rootfs`, `appfs`, …) for slot installers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_class: Option<String>,
    /// Destination path for `file` and directory for `archive` when not a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_path: Option<String>,
    /// Compression of the payload bytes.
    #[serde(default)]
    pub compression: Compression,
    /// How the payload is encrypted, when it is: the bytes the metadata lists are then the
    /// ciphertext, and the plaintext is what compression (if any) applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// SHA-256 of the base image when the payload is a delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_base: Option<String>,
    /// Length of what is installed (the image, file or archive after decompression), for a
    /// compressed payload: the agent stops decompressing past it, before the payload's
    /// hash (known only at its end) could tell a substituted one apart. Required for
    /// compressed file and archive payloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_length: Option<u64>,
}

impl Manifest {
    /// Read the manifest from a target's `custom` object, if it has one.
    pub fn from_custom(target: &str, custom: Option<&Value>) -> Result<Option<Self>> {
        let Some(v) = custom.and_then(|c| c.get("tern")) else {
            return Ok(None);
        };
        let m: Manifest = serde_path_to_error::deserialize(v).map_err(|e| Error::Field {
            role: format!("target {target}"),
            field: format!("custom.tern.{}", e.path()),
            reason: e.into_inner().to_string(),
        })?;
        m.validate(target)?;
        Ok(Some(m))
    }

    /// Field rules: a SemVer version, and a destination that fits the installer.
    pub fn validate(&self, target: &str) -> Result<()> {
        let field = |f: &str, reason: String| Error::Field {
            role: format!("target {target}"),
            field: format!("custom.tern.{f}"),
            reason,
        };
        semver::Version::parse(&self.version)
            .map_err(|e| field("version", format!("`{}` is not SemVer: {e}", self.version)))?;
        if self.device_type.is_empty() {
            return Err(field("device_type", "empty".into()));
        }
        if let Some(e) = &self.encryption {
            e.validate().map_err(|r| field("encryption", r))?;
        }
        if self.compression != Compression::None
            && self.installed_length.is_none()
            && matches!(self.installer, Installer::File | Installer::Archive)
        {
            return Err(field(
                "installed_length",
                "a compressed file or archive payload must give its installed length".into(),
            ));
        }
        match self.installer {
            Installer::Raw if self.slot_class.is_none() => {
                Err(field("slot_class", "a raw image needs a slot class".into()))
            }
            Installer::File if self.install_path.is_none() => {
                Err(field("install_path", "a file installer needs a destination".into()))
            }
            Installer::Archive if self.slot_class.is_none() && self.install_path.is_none() => Err(field(
                "install_path",
                "an archive needs a slot class or a destination directory".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The manifest as a `custom` object.
    pub fn to_custom(&self) -> Value {
        serde_json::json!({ "tern": self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_custom() {
        let m = Manifest {
            version: "1.2.3".into(),
            device_type: "sim-x86".into(),
            hardware: vec!["rev-a".into()],
            installer: Installer::Raw,
            slot_class: Some("rootfs".into()),
            install_path: None,
            compression: Compression::Zstd,
            encryption: None,
            delta_base: None,
            installed_length: Some(4096),
        };
        let back = Manifest::from_custom("t", Some(&m.to_custom())).unwrap().unwrap();
        assert_eq!(back, m);
        let mut bad = m.to_custom();
        bad["tern"]["version"] = "one".into();
        assert!(matches!(
            Manifest::from_custom("t", Some(&bad)),
            Err(Error::Field { .. })
        ));
    }
}
