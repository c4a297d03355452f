//! TUF metadata: the signed envelope and the four top-level role types, with delegations.
//!
//! Parsing keeps the `signed` object exactly as received ([`Envelope::signed`]): signatures are
//! checked over its canonical form, so fields Tern does not know are covered too. The typed
//! views ([`Root`], [`Targets`], [`Snapshot`], [`Timestamp`]) keep unknown fields in
//! `unrecognized`, so that editing and re-signing preserves them.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cjson::to_canonical;
use crate::error::{Error, Result};
use crate::keys::{KeyId, PublicKey, SigningKey};
use crate::timefmt::DateTime;

/// The specification version Tern writes.
pub const SPEC_VERSION: &str = "1.0.31";

/// Upper bound on any metadata document Tern parses. Roles with many targets stay far below it.
pub const MAX_METADATA_BYTES: usize = 64 << 20;

/// Default size limits per role, python-tuf's: whoever reads metadata from an untrusted
/// source (the network client, the bundle reader) refuses larger documents before parsing.
pub mod limits {
    /// A root version.
    pub const ROOT: u64 = 512_000;
    /// Timestamp.
    pub const TIMESTAMP: u64 = 16_384;
    /// Snapshot, when the timestamp lists no length.
    pub const SNAPSHOT: u64 = 2_000_000;
    /// A targets role, when the snapshot lists no length.
    pub const TARGETS: u64 = 5_000_000;

    /// The limit for a role by name.
    pub fn for_role(role: &str) -> u64 {
        match role {
            "root" => ROOT,
            "timestamp" => TIMESTAMP,
            "snapshot" => SNAPSHOT,
            _ => TARGETS,
        }
    }
}

/// One entry of the `signatures` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// The signing key's id.
    pub keyid: KeyId,
    /// The hex signature.
    pub sig: String,
}

/// A metadata document as received: the `signed` object untouched and its signatures.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The signed object exactly as parsed; signatures cover its canonical form.
    pub signed: Value,
    /// The signatures, key ids unique.
    pub signatures: Vec<SignatureEntry>,
}

impl Envelope {
    /// Parse `{"signed": {...}, "signatures": [...]}`. `role` is used in errors only.
    pub fn parse(role: &str, bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(Error::Malformed {
                role: role.to_owned(),
                reason: format!("{} bytes exceeds the {MAX_METADATA_BYTES}-byte limit", bytes.len()),
            });
        }
        let malformed = |reason: String| Error::Malformed {
            role: role.to_owned(),
            reason,
        };
        let mut top: Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        let signed = top
            .remove("signed")
            .ok_or_else(|| malformed("no `signed` object".into()))?;
        if !signed.is_object() {
            return Err(malformed("`signed` is not an object".into()));
        }
        let signatures: Vec<SignatureEntry> = match top.remove("signatures") {
            Some(v) => serde_json::from_value(v).map_err(|e| Error::field(role, "signatures", e.to_string()))?,
            None => return Err(malformed("no `signatures` list".into())),
        };
        let mut seen = BTreeSet::new();
        for s in &signatures {
            if !seen.insert(&s.keyid) {
                return Err(Error::DuplicateSignature {
                    role: role.to_owned(),
                    keyid: s.keyid.clone(),
                });
            }
        }
        Ok(Envelope { signed, signatures })
    }

    /// Wrap a freshly built role, unsigned.
    pub fn new<T: Serialize>(role: &T) -> Result<Self> {
        let signed = serde_json::to_value(role).map_err(|e| Error::Malformed {
            role: "new".into(),
            reason: e.to_string(),
        })?;
        Ok(Envelope {
            signed,
            signatures: Vec::new(),
        })
    }

    /// The bytes signatures are computed over.
    pub fn canonical_signed(&self, role: &str) -> Result<Vec<u8>> {
        to_canonical(&self.signed).map_err(|reason| Error::Malformed {
            role: role.to_owned(),
            reason: format!("`signed` has no canonical form: {reason}"),
        })
    }

    /// Add (or replace) the signature of `key`.
    pub fn sign(&mut self, role: &str, key: &SigningKey) -> Result<()> {
        let msg = self.canonical_signed(role)?;
        let sig = hex::encode(key.sign(&msg)?);
        let keyid = key.public().keyid();
        self.signatures.retain(|s| s.keyid != keyid);
        self.signatures.push(SignatureEntry { keyid, sig });
        self.signatures.sort_by(|a, b| a.keyid.cmp(&b.keyid));
        Ok(())
    }

    /// The document as written to disk: pretty-printed JSON with a trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let doc = serde_json::json!({"signatures": self.signatures, "signed": self.signed});
        let mut out = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The `_type` of the signed object, if it has a string one.
    pub fn role_type(&self) -> Option<&str> {
        self.signed.get("_type").and_then(Value::as_str)
    }
}

/// A parsed, field-checked role together with the envelope it came from.
#[derive(Debug, Clone)]
pub struct Signed<T> {
    /// The envelope as received.
    pub envelope: Envelope,
    /// The typed view of `envelope.signed`.
    pub signed: T,
}

impl<T: RoleType> Signed<T> {
    /// Parse bytes into a typed role, checking `_type` and the field rules; no signature check.
    pub fn parse(role: &str, bytes: &[u8]) -> Result<Self> {
        Self::from_envelope(role, Envelope::parse(role, bytes)?)
    }

    /// Type and field checks on an already parsed envelope.
    pub fn from_envelope(role: &str, envelope: Envelope) -> Result<Self> {
        match envelope.role_type() {
            Some(t) if t == T::TYPE => {}
            Some(t) => {
                return Err(Error::WrongRoleType {
                    role: role.to_owned(),
                    expected: T::TYPE.to_owned(),
                    found: t.to_owned(),
                })
            }
            None => return Err(Error::field(role, "_type", "missing or not a string")),
        }
        // The common fields first, on their own: inside the role types they are flattened,
        // and serde loses the field path of flattened fields.
        let common: Common = from_value_with_path(role, &envelope.signed)?;
        common.validate(role)?;
        let signed: T = from_value_with_path(role, &envelope.signed)?;
        signed.validate(role)?;
        Ok(Signed { envelope, signed })
    }

    /// When this role expires.
    pub fn expires(&self) -> DateTime {
        // validate() proved it parses.
        DateTime::parse(&self.signed.common().expires).unwrap_or(DateTime::from_unix(i64::MIN))
    }

    /// The role's version.
    pub fn version(&self) -> u64 {
        self.signed.common().version
    }
}

fn from_value_with_path<T: DeserializeOwned>(role: &str, value: &Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        Error::field(
            role,
            if field == "." { String::new() } else { field },
            e.into_inner().to_string(),
        )
    })
}

/// Fields every role carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Common {
    /// `_type`.
    #[serde(rename = "_type")]
    pub role_type: String,
    /// `spec_version`: must be 1.x.y.
    pub spec_version: String,
    /// `version`: an integer of at least 1.
    pub version: u64,
    /// `expires`: `YYYY-MM-DDTHH:MM:SSZ`.
    pub expires: String,
}

impl Common {
    /// New common fields for a role Tern writes.
    pub fn new(role_type: &str, version: u64, expires: DateTime) -> Self {
        Common {
            role_type: role_type.to_owned(),
            spec_version: SPEC_VERSION.to_owned(),
            version,
            expires: expires.to_string(),
        }
    }

    fn validate(&self, role: &str) -> Result<()> {
        let parts: Vec<&str> = self.spec_version.split('.').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
            return Err(Error::field(
                role,
                "spec_version",
                format!("`{}` is not MAJOR.MINOR[.PATCH]", self.spec_version),
            ));
        }
        if parts[0] != "1" {
            return Err(Error::field(
                role,
                "spec_version",
                format!("major version of `{}` is not supported (1.x only)", self.spec_version),
            ));
        }
        if self.version == 0 {
            return Err(Error::field(role, "version", "must be at least 1"));
        }
        DateTime::parse(&self.expires).map_err(|reason| Error::field(role, "expires", reason))?;
        Ok(())
    }
}

/// Implemented by the four role types.
pub trait RoleType: DeserializeOwned + Serialize {
    /// The `_type` value.
    const TYPE: &'static str;
    /// The common fields.
    fn common(&self) -> &Common;
    /// The common fields, mutably (for editing).
    fn common_mut(&mut self) -> &mut Common;
    /// Role-specific field rules.
    fn validate(&self, role: &str) -> Result<()>;
}

/// A role's keys and threshold, as root and delegations list them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Authorised key ids.
    pub keyids: Vec<KeyId>,
    /// Distinct keys that must sign.
    pub threshold: u32,
    /// Fields Tern does not know, kept for re-signing.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

fn validate_role_keys(
    role: &str,
    field: &str,
    keyids: &[KeyId],
    threshold: u32,
    keys: &BTreeMap<KeyId, PublicKey>,
) -> Result<()> {
    if threshold == 0 {
        return Err(Error::field(role, format!("{field}.threshold"), "must be at least 1"));
    }
    let mut seen = BTreeSet::new();
    for id in keyids {
        if !seen.insert(id) {
            return Err(Error::field(
                role,
                format!("{field}.keyids"),
                format!("key {id} listed twice"),
            ));
        }
        if !keys.contains_key(id) {
            return Err(Error::field(
                role,
                format!("{field}.keyids"),
                format!("key {id} is not in `keys`"),
            ));
        }
    }
    Ok(())
}

fn validate_keys(role: &str, keys: &BTreeMap<KeyId, PublicKey>) -> Result<()> {
    for (id, key) in keys {
        let computed = key.keyid();
        if &computed != id {
            return Err(Error::KeyIdMismatch {
                role: role.to_owned(),
                keyid: id.clone(),
                computed,
            });
        }
    }
    Ok(())
}

impl Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        PublicKey::from_value("key", &v).map_err(serde::de::Error::custom)
    }
}

/// Root metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Root {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// Whether files are published under versioned / hash-prefixed names.
    pub consistent_snapshot: bool,
    /// Every key any top-level role uses.
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// `root`, `targets`, `snapshot`, `timestamp` (and optional others).
    pub roles: BTreeMap<String, RoleKeys>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

/// The four roles root must define.
pub const TOP_LEVEL_ROLES: [&str; 4] = ["root", "targets", "snapshot", "timestamp"];

impl RoleType for Root {
    const TYPE: &'static str = "root";
    fn common(&self) -> &Common {
        &self.common
    }
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
    fn validate(&self, role: &str) -> Result<()> {
        validate_keys(role, &self.keys)?;
        for name in TOP_LEVEL_ROLES {
            let r = self
                .roles
                .get(name)
                .ok_or_else(|| Error::field(role, "roles", format!("role `{name}` is missing")))?;
            validate_role_keys(role, &format!("roles.{name}"), &r.keyids, r.threshold, &self.keys)?;
        }
        Ok(())
    }
}

impl Root {
    /// The keys and threshold of a top-level role.
    pub fn role(&self, name: &str) -> Option<&RoleKeys> {
        self.roles.get(name)
    }
}

/// One file a targets role lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetFile {
    /// Length in bytes.
    pub length: u64,
    /// Digests by algorithm name.
    pub hashes: BTreeMap<String, String>,
    /// Application data: Tern's manifest lives under `custom.tern`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

/// A role delegated by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelegatedRole {
    /// The role's name.
    pub name: String,
    /// Authorised key ids.
    pub keyids: Vec<KeyId>,
    /// Distinct keys that must sign.
    pub threshold: u32,
    /// Whether the search stops here when this role is trusted for a path.
    pub terminating: bool,
    /// Shell-style path patterns (`*` does not cross `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// Hex prefixes of the SHA-256 of target paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_hash_prefixes: Option<Vec<String>>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

/// Succinct hash-bin delegation (TAP 15): `2^bit_length` bins named `PREFIX-HEX`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuccinctRoles {
    /// Authorised key ids (shared by every bin).
    pub keyids: Vec<KeyId>,
    /// Distinct keys that must sign.
    pub threshold: u32,
    /// Number of leading hash bits that select the bin (1..=32).
    pub bit_length: u32,
    /// Bin name prefix.
    pub name_prefix: String,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

/// The `delegations` object of a targets role.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delegations {
    /// Keys of the delegated roles.
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// Roles delegated by name, in priority order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<DelegatedRole>>,
    /// Or a succinct hash-bin delegation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succinct_roles: Option<SuccinctRoles>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

/// Targets metadata (top-level or delegated).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Targets {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// Target path → file.
    pub targets: BTreeMap<String, TargetFile>,
    /// Roles this one delegates to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegations: Option<Delegations>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

impl RoleType for Targets {
    const TYPE: &'static str = "targets";
    fn common(&self) -> &Common {
        &self.common
    }
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
    fn validate(&self, role: &str) -> Result<()> {
        for (name, t) in &self.targets {
            if t.hashes.is_empty() {
                return Err(Error::field(role, format!("targets.{name}.hashes"), "no hashes listed"));
            }
        }
        let Some(d) = &self.delegations else { return Ok(()) };
        validate_keys(role, &d.keys)?;
        match (&d.roles, &d.succinct_roles) {
            (Some(_), Some(_)) => {
                return Err(Error::field(
                    role,
                    "delegations",
                    "both `roles` and `succinct_roles` are set",
                ))
            }
            (None, None) => {
                return Err(Error::field(
                    role,
                    "delegations",
                    "neither `roles` nor `succinct_roles` is set",
                ))
            }
            (None, Some(s)) => {
                validate_role_keys(role, "delegations.succinct_roles", &s.keyids, s.threshold, &d.keys)?;
                if !(1..=32).contains(&s.bit_length) {
                    return Err(Error::field(
                        role,
                        "delegations.succinct_roles.bit_length",
                        "must be 1 to 32",
                    ));
                }
            }
            (Some(roles), None) => {
                let mut names = BTreeSet::new();
                for (i, r) in roles.iter().enumerate() {
                    let field = format!("delegations.roles[{i}]");
                    if !names.insert(r.name.as_str()) {
                        return Err(Error::field(
                            role,
                            format!("{field}.name"),
                            format!("role `{}` delegated twice", r.name),
                        ));
                    }
                    if crate::TOP_LEVEL_ROLES.contains(&r.name.as_str()) {
                        return Err(Error::field(
                            role,
                            format!("{field}.name"),
                            format!("`{}` is a top-level role name", r.name),
                        ));
                    }
                    validate_role_keys(role, &field, &r.keyids, r.threshold, &d.keys)?;
                    // Both optional; a role with neither is trusted for nothing (as in python-tuf).
                    if r.paths.is_some() && r.path_hash_prefixes.is_some() {
                        return Err(Error::field(
                            role,
                            field,
                            "`paths` and `path_hash_prefixes` are both set",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A role file listed in snapshot or timestamp metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaFile {
    /// The role's version.
    pub version: u64,
    /// Its length in bytes, when listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Its digests, when listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<BTreeMap<String, String>>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

fn validate_meta(role: &str, meta: &BTreeMap<String, MetaFile>) -> Result<()> {
    for (name, m) in meta {
        if m.version == 0 {
            return Err(Error::field(role, format!("meta.{name}.version"), "must be at least 1"));
        }
        if matches!(&m.hashes, Some(h) if h.is_empty()) {
            return Err(Error::field(role, format!("meta.{name}.hashes"), "empty"));
        }
    }
    Ok(())
}

/// Snapshot metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// `ROLE.json` → version (and optionally length and hashes) of every targets role.
    pub meta: BTreeMap<String, MetaFile>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

impl RoleType for Snapshot {
    const TYPE: &'static str = "snapshot";
    fn common(&self) -> &Common {
        &self.common
    }
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
    fn validate(&self, role: &str) -> Result<()> {
        if !self.meta.contains_key("targets.json") {
            return Err(Error::field(role, "meta", "`targets.json` is not listed"));
        }
        validate_meta(role, &self.meta)
    }
}

/// Timestamp metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timestamp {
    /// Common fields.
    #[serde(flatten)]
    pub common: Common,
    /// Exactly `snapshot.json`.
    pub meta: BTreeMap<String, MetaFile>,
    /// Fields Tern does not know.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, Value>,
}

impl RoleType for Timestamp {
    const TYPE: &'static str = "timestamp";
    fn common(&self) -> &Common {
        &self.common
    }
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
    fn validate(&self, role: &str) -> Result<()> {
        if self.meta.len() != 1 || !self.meta.contains_key("snapshot.json") {
            return Err(Error::field(role, "meta", "must list exactly `snapshot.json`"));
        }
        validate_meta(role, &self.meta)
    }
}

impl Timestamp {
    /// The snapshot entry (validation guarantees it exists).
    pub fn snapshot_meta(&self) -> Option<&MetaFile> {
        self.meta.get("snapshot.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets_json(extra: &str) -> String {
        format!(
            r#"{{"signed": {{"_type": "targets", "spec_version": "1.0.31", "version": 1,
                "expires": "2100-01-01T00:00:00Z", "targets": {{}} {extra}}}, "signatures": []}}"#
        )
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let s = Signed::<Targets>::parse("targets", targets_json(r#", "x-vendor": [1, "a"]"#).as_bytes()).unwrap();
        assert_eq!(s.signed.unrecognized["x-vendor"], serde_json::json!([1, "a"]));
        assert_eq!(serde_json::to_value(&s.signed).unwrap(), s.envelope.signed);
    }

    #[test]
    fn field_errors_name_the_field() {
        let bad = targets_json("").replace(r#""version": 1"#, r#""version": "one""#);
        match Signed::<Targets>::parse("targets", bad.as_bytes()).unwrap_err() {
            Error::Field { role, field, .. } => {
                assert_eq!(role, "targets");
                assert_eq!(field, "version");
            }
            e => panic!("{e:?}"),
        }
        let bad = targets_json("").replace("2100-01-01T00:00:00Z", "tomorrow");
        let e = Signed::<Targets>::parse("targets", bad.as_bytes()).unwrap_err();
        assert!(
            matches!(e, Error::Field { ref field, .. } if field == "expires"),
            "{e:?}"
        );
        let bad = targets_json("").replace("1.0.31", "2.0.0");
        let e = Signed::<Targets>::parse("targets", bad.as_bytes()).unwrap_err();
        assert!(
            matches!(e, Error::Field { ref field, .. } if field == "spec_version"),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_type_is_its_own_error() {
        let e = Signed::<Snapshot>::parse("snapshot", targets_json("").as_bytes()).unwrap_err();
        assert_eq!(e.kind(), "WrongRoleType");
    }

    #[test]
    fn duplicate_signature_keyids_are_refused() {
        let doc = targets_json("").replace(
            r#""signatures": []"#,
            r#""signatures": [{"keyid": "ab", "sig": "00"}, {"keyid": "ab", "sig": "01"}]"#,
        );
        assert_eq!(
            Envelope::parse("targets", doc.as_bytes()).unwrap_err().kind(),
            "DuplicateSignature"
        );
    }
}
