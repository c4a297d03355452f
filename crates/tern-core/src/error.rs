//! The core's one error type.
//!
//! Every variant names what was at fault (a role, a field, a key id, a target) so that
//! the binary can print a one-line message an operator can act on, and tests can assert
//! the exact variant.

use crate::keys::KeyId;

/// Why a piece of metadata, a key, a signature or a target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not JSON, or not the envelope `{"signed": …, "signatures": […]}`.
    #[error("{role}: malformed metadata: {reason}")]
    Malformed {
        /// The role the bytes were supposed to hold.
        role: String,
        /// What the parser said.
        reason: String,
    },
    /// A field breaks the specification's rules for its role.
    #[error("{role}: field `{field}`: {reason}")]
    Field {
        /// The role whose metadata is at fault.
        role: String,
        /// The field, as a dotted path inside `signed`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `_type` says another role than the one expected.
    #[error("{role}: wrong role type: expected `{expected}`, found `{found}`")]
    WrongRoleType {
        /// The role that was being loaded.
        role: String,
        /// The `_type` it must have.
        expected: String,
        /// The `_type` it has.
        found: String,
    },
    /// The `signatures` list carries two entries for one key id.
    #[error("{role}: key {keyid} appears more than once in the signatures")]
    DuplicateSignature {
        /// The role whose signatures are at fault.
        role: String,
        /// The repeated key id.
        keyid: KeyId,
    },
    /// A key id is not the SHA-256 of its key's canonical form.
    #[error("{role}: key id {keyid} does not match its key (computed {computed})")]
    KeyIdMismatch {
        /// The role listing the key.
        role: String,
        /// The key id as listed.
        keyid: KeyId,
        /// The key id computed from the key.
        computed: KeyId,
    },
    /// A key is malformed for its declared type.
    #[error("key {keyid}: {reason}")]
    BadKey {
        /// The key's id.
        keyid: KeyId,
        /// What is wrong with it.
        reason: String,
    },
    /// The threshold was not met and at least one authorised key's signature did not verify.
    #[error("{role}: signature by key {keyid} does not verify ({valid} of {threshold} valid signatures)")]
    BadSignature {
        /// The role.
        role: String,
        /// The first authorised key whose signature failed.
        keyid: KeyId,
        /// Distinct keys whose signatures verified.
        valid: u32,
        /// Distinct keys required.
        threshold: u32,
    },
    /// The threshold was not met and an authorised key is of a type Tern cannot verify.
    #[error(
        "{role}: key {keyid} has unsupported type `{keytype}`/`{scheme}` ({valid} of {threshold} valid signatures)"
    )]
    UnsupportedKey {
        /// The role.
        role: String,
        /// The key.
        keyid: KeyId,
        /// Its declared key type.
        keytype: String,
        /// Its declared scheme.
        scheme: String,
        /// Distinct keys whose signatures verified.
        valid: u32,
        /// Distinct keys required.
        threshold: u32,
    },
    /// Fewer distinct authorised keys signed than the threshold requires.
    #[error("{role}: {valid} of {threshold} required signatures")]
    BelowThreshold {
        /// The role.
        role: String,
        /// Distinct keys whose signatures verified.
        valid: u32,
        /// Distinct keys required.
        threshold: u32,
    },
    /// The metadata expired before the reference time.
    #[error("{role}: expired at {expires}")]
    Expired {
        /// The role.
        role: String,
        /// Its `expires` value.
        expires: String,
    },
    /// The version differs from the one its referrer (or the root chain) demands.
    #[error("{role}: version {found} where {expected} was expected")]
    VersionMismatch {
        /// The role.
        role: String,
        /// The version required.
        expected: u64,
        /// The version found.
        found: u64,
    },
    /// The version is lower than the trusted one: a rollback.
    #[error("{role}: version {found} is older than trusted version {trusted}")]
    Rollback {
        /// The role.
        role: String,
        /// The trusted version.
        trusted: u64,
        /// The offered version.
        found: u64,
    },
    /// Content does not have the length its metadata records.
    #[error("{what}: length {found} where {expected} was expected")]
    LengthMismatch {
        /// The file or role checked.
        what: String,
        /// The recorded length.
        expected: u64,
        /// The actual length (or a lower bound when it was too long).
        found: u64,
    },
    /// Content does not have the hash its metadata records.
    #[error("{what}: {algorithm} hash does not match")]
    HashMismatch {
        /// The file or role checked.
        what: String,
        /// The algorithm whose digest differed.
        algorithm: String,
    },
    /// No hash algorithm Tern can compute is listed.
    #[error("{what}: no supported hash algorithm listed")]
    NoSupportedHash {
        /// The file or role.
        what: String,
    },
    /// The target is not listed by any role the search reached.
    #[error("target `{target}` is not listed by any trusted role")]
    TargetNotFound {
        /// The target path.
        target: String,
    },
    /// A target name is not a safe relative path.
    #[error("target name `{name}`: {reason}")]
    BadTargetName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// Metadata the verification needs is not available (a role, or a root version).
    #[error("role `{role}` is not available")]
    MissingRole {
        /// The role.
        role: String,
    },
    /// The delegation search visited more roles than allowed.
    #[error("delegation search exceeded {limit} roles while looking for `{target}`")]
    TooManyDelegations {
        /// The target being searched for.
        target: String,
        /// The limit.
        limit: usize,
    },
    /// A private key could not be used.
    #[error("private key: {reason}")]
    PrivateKey {
        /// Why.
        reason: String,
    },
}

/// Shorthand for the core's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The name of the variant, stable across releases: tests and `--output json` use it.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Malformed { .. } => "Malformed",
            Error::Field { .. } => "Field",
            Error::WrongRoleType { .. } => "WrongRoleType",
            Error::DuplicateSignature { .. } => "DuplicateSignature",
            Error::KeyIdMismatch { .. } => "KeyIdMismatch",
            Error::BadKey { .. } => "BadKey",
            Error::BadSignature { .. } => "BadSignature",
            Error::UnsupportedKey { .. } => "UnsupportedKey",
            Error::BelowThreshold { .. } => "BelowThreshold",
            Error::Expired { .. } => "Expired",
            Error::VersionMismatch { .. } => "VersionMismatch",
            Error::Rollback { .. } => "Rollback",
            Error::LengthMismatch { .. } => "LengthMismatch",
            Error::HashMismatch { .. } => "HashMismatch",
            Error::NoSupportedHash { .. } => "NoSupportedHash",
            Error::TargetNotFound { .. } => "TargetNotFound",
            Error::BadTargetName { .. } => "BadTargetName",
            Error::MissingRole { .. } => "MissingRole",
            Error::TooManyDelegations { .. } => "TooManyDelegations",
            Error::PrivateKey { .. } => "PrivateKey",
        }
    }

    /// The role (or file) the error concerns, when it concerns one.
    pub fn role(&self) -> Option<&str> {
        match self {
            Error::Malformed { role, .. }
            | Error::Field { role, .. }
            | Error::WrongRoleType { role, .. }
            | Error::DuplicateSignature { role, .. }
            | Error::KeyIdMismatch { role, .. }
            | Error::BadSignature { role, .. }
            | Error::UnsupportedKey { role, .. }
            | Error::BelowThreshold { role, .. }
            | Error::Expired { role, .. }
            | Error::VersionMismatch { role, .. }
            | Error::Rollback { role, .. }
            | Error::MissingRole { role } => Some(role),
            Error::LengthMismatch { what, .. } | Error::HashMismatch { what, .. } | Error::NoSupportedHash { what } => {
                Some(what)
            }
            _ => None,
        }
    }

    pub(crate) fn field(role: &str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Field {
            role: role.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
