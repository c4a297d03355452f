//! Names and limits of the bundle format.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The `format` value of `tern-bundle.json`.
pub const FORMAT: &str = "tern-bundle";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The header entry's name.
pub const HEADER: &str = "tern-bundle.json";
/// Largest single metadata entry; each role also has its own, smaller limit
/// (`tern_core::metadata::limits`).
pub const MAX_METADATA_ENTRY: u64 = tern_core::metadata::limits::TARGETS;
/// Largest sum of all metadata entries.
pub const MAX_METADATA_TOTAL: u64 = 32 << 20;
/// Largest header.
pub const MAX_HEADER: u64 = 1 << 20;
/// Most metadata entries (header, roots, roles, recipients documents) one bundle carries:
/// the 256 root rotations a client walks, the top-level roles, and room for delegated roles
/// and one recipients document per payload.
pub const MAX_METADATA_ENTRIES: usize = 4096;
/// Most payloads one bundle carries.
pub const MAX_PAYLOADS: usize = 1024;

/// `tern-bundle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The payloads' target paths, in entry order.
    pub payloads: Vec<String>,
}

/// What an entry name says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// `tern-bundle.json`.
    Header,
    /// `metadata/N.root.json`.
    Root(u64),
    /// `metadata/ROLE.json`.
    Role(String),
    /// `payloads/PATH`.
    Payload(String),
    /// `recipients/SHA256.json`: the wrapped data keys of the encrypted payload with that
    /// SHA-256 (not signed; `tern_core::keywrap`).
    Recipients(String),
}

/// Delegated role names that are safe as file names everywhere Tern writes them.
pub fn check_role_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
        && name.parse::<u64>().is_err();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "role name `{}` must be 1-128 characters of A-Z a-z 0-9 - _ . and not start with `.`",
            tern_core::text::shown(name)
        ))
    }
}

/// Classify an entry by its name.
pub fn classify(name: &str) -> Result<EntryKind> {
    let bad = |reason: &str| Error::Format {
        entry: tern_core::text::shown(name),
        reason: reason.to_owned(),
    };
    if name == HEADER {
        return Ok(EntryKind::Header);
    }
    if let Some(file) = name.strip_prefix("recipients/") {
        let sha256 = file
            .strip_suffix(".json")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
            .ok_or_else(|| bad("recipients entries are named recipients/SHA256.json"))?;
        return Ok(EntryKind::Recipients(sha256.to_owned()));
    }
    if let Some(rest) = name.strip_prefix("payloads/") {
        return Ok(EntryKind::Payload(rest.to_owned()));
    }
    if let Some(file) = name.strip_prefix("metadata/") {
        let stem = file
            .strip_suffix(".json")
            .ok_or_else(|| bad("metadata entries end in .json"))?;
        if let Some(v) = stem.strip_suffix(".root") {
            let version = v
                .parse::<u64>()
                .map_err(|_| bad("root entries are named N.root.json"))?;
            return Ok(EntryKind::Root(version));
        }
        check_role_name(stem).map_err(|r| bad(&r))?;
        if stem == "root" {
            return Err(bad("root entries are named N.root.json"));
        }
        return Ok(EntryKind::Role(stem.to_owned()));
    }
    Err(bad("not part of the bundle format"))
}
