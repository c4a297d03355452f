//! The release engineer's repository editor.
//!
//! What it does: keeps a static TUF repository in a directory that any web server can serve
//! (`metadata/` and `targets/`, consistent snapshots always on), and edits it: init with
//! per-role keys and thresholds, add and remove targets with Tern's manifest, delegate path
//! patterns, hash prefixes or succinct hash bins to product roles, add signatures from keys
//! held on other machines, rotate keys (a root rotation writes N+1.root.json to be signed by
//! both the old and the new root keys), refresh snapshot and timestamp, and collect what a
//! release bundle needs.
//!
//! What it does not do: hold keys (every command is handed the private keys it may use), or
//! serve anything.
//!
//! Layout of a repository directory:
//!
//! ```text
//! tern-repo.json            expiry periods (not published)
//! metadata/N.root.json      every root version; root.json is a copy of the newest
//! metadata/N.targets.json   every targets version, and N.ROLE.json for delegated roles
//! metadata/N.snapshot.json
//! metadata/timestamp.json
//! targets/DIR/HASH.NAME     payloads under their consistent-snapshot names
//! staged/N.ROLE.json        versions still short of their signatures (not published)
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod edit;
mod payload_io;
mod store;

pub use config::{parse_duration, Expiry, RepoConfig};
pub use edit::{AddTarget, Delegation, HashBins, Rotation};
pub use store::{RoleStatus, RoleWrite};

use std::path::{Path, PathBuf};

use tern_core::KeyId;

/// The repository directory being edited.
#[derive(Debug)]
pub struct Repository {
    dir: PathBuf,
    config: RepoConfig,
}

impl Repository {
    /// The repository's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/metadata`.
    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    /// `DIR/targets`.
    pub fn targets_dir(&self) -> PathBuf {
        self.dir.join("targets")
    }
}

/// Why a repository operation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error(transparent)]
    Fs(#[from] tern_fs::Error),
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Metadata in the repository is invalid.
    #[error("{path}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<tern_core::Error>,
    },
    /// A rule of the core was broken by the requested change.
    #[error(transparent)]
    Core(Box<tern_core::Error>),
    /// The directory holds no repository.
    #[error("{dir}: not a Tern repository (no metadata/1.root.json); run `tern repo init`")]
    NotARepository {
        /// The directory.
        dir: PathBuf,
    },
    /// `init` on a directory that holds one already.
    #[error("{dir}: a repository exists here already")]
    AlreadyExists {
        /// The directory.
        dir: PathBuf,
    },
    /// None of the given keys may sign this role.
    #[error(
        "role `{role}`: none of the given keys is authorised to sign it (authorised: {})",
        join(authorised)
    )]
    NoSigner {
        /// The role.
        role: String,
        /// Its authorised key ids.
        authorised: Vec<KeyId>,
    },
    /// No such role.
    #[error("role `{role}` does not exist")]
    UnknownRole {
        /// The role.
        role: String,
    },
    /// Clients' search would not reach the role for that target path.
    #[error("role `{role}` is not delegated the path `{target}` (or an earlier or terminating role takes it)")]
    NotDelegated {
        /// The role.
        role: String,
        /// The target.
        target: String,
    },
    /// The target is not listed by the role.
    #[error("role `{role}` does not list target `{target}`")]
    NoSuchTarget {
        /// The role.
        role: String,
        /// The target.
        target: String,
    },
    /// A role of that name exists already.
    #[error("role `{role}` exists already")]
    RoleExists {
        /// The role.
        role: String,
    },
    /// A role's newest metadata lacks signatures, so it cannot be published.
    #[error("role `{role}` version {version} has {valid} of {threshold} required signatures; sign it with `tern repo sign --role {role}`")]
    Unsigned {
        /// The role.
        role: String,
        /// Its version.
        version: u64,
        /// Valid signatures.
        valid: u32,
        /// Required.
        threshold: u32,
    },
    /// An argument is not acceptable.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was given.
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// Writing a bundle failed.
    #[error(transparent)]
    Bundle(#[from] tern_bundle::Error),
}

fn join(ids: &[KeyId]) -> String {
    ids.iter()
        .map(|k| k.as_str().get(..12).unwrap_or(k.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<tern_core::Error> for Error {
    fn from(e: tern_core::Error) -> Self {
        Error::Core(Box::new(e))
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
