//! The release bundle: one tar file, metadata first, payloads after (DESIGN §4).
//!
//! Layout, in this order:
//!
//! 1. `tern-bundle.json`: format marker and the list of payloads (unsigned; checked against
//!    the signed metadata and the entries that follow).
//! 2. `metadata/N.root.json` for every root version of the chain, oldest first.
//! 3. `metadata/timestamp.json` and `metadata/snapshot.json` when the bundle carries freshness.
//! 4. `metadata/targets.json` and `metadata/ROLE.json` for the delegated roles the payloads need.
//! 5. `payloads/TARGET-PATH` for every payload, in the order of the list.
//!
//! What it does: write bundles atomically, inspect them, and verify them front to back in
//! memory that does not depend on payload size (metadata entries are bounded; payloads are
//! hashed while streamed to a caller-supplied sink).
//!
//! What it does not do: decide what to install (the agent) or fetch anything (the client).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod format;
mod index;
mod read;
mod write;

pub use format::{
    check_role_name, BundleHeader, FORMAT, FORMAT_VERSION, MAX_METADATA_ENTRIES, MAX_METADATA_ENTRY, MAX_METADATA_TOTAL,
};
pub use index::BundleIndex;
pub use read::{
    feed_payload, inspect, parse_recipients, read_bundle, verify_bundle, Inspection, PayloadInfo, VerifiedPayload,
    VerifyReport,
};
pub use write::{replace_recipients, write_bundle, Payload, ReleaseContents};

use std::path::PathBuf;

/// Why a bundle could not be written, read or trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The bundle ends before all of it was read.
    #[error("bundle is truncated: {entry}")]
    Truncated {
        /// What was being read when it ended.
        entry: String,
    },
    /// The bundle's structure is wrong: unexpected entry, order, size or name.
    #[error("bundle entry `{entry}`: {reason}")]
    Format {
        /// The entry.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// The tar structure is refused (an extension header too large, a bad checksum…).
    #[error("bundle is not a well-formed archive: {0}")]
    Archive(tern_tar::Error),
    /// The root chain inside the bundle does not lead back to the trusted root.
    #[error("root chain does not lead back to the trusted root (at root version {version})")]
    RootChain {
        /// The root version that failed.
        version: u64,
        /// Why.
        source: Box<tern_core::Error>,
    },
    /// Metadata failed verification.
    #[error("{0}")]
    Metadata(Box<tern_core::Error>),
    /// A payload failed verification.
    #[error("payload `{target}`")]
    Payload {
        /// The target path.
        target: String,
        /// Why.
        source: Box<tern_core::Error>,
    },
    /// The payload sink refused data.
    #[error("payload `{target}`: {reason}")]
    Sink {
        /// The target path.
        target: String,
        /// What the sink said.
        reason: String,
    },
    /// Local file handling failed.
    #[error(transparent)]
    Fs(#[from] tern_fs::Error),
}

impl Error {
    /// The core error underneath, if any: tests assert its variant.
    pub fn core(&self) -> Option<&tern_core::Error> {
        match self {
            Error::RootChain { source, .. } | Error::Payload { source, .. } => Some(source),
            Error::Metadata(e) => Some(e),
            _ => None,
        }
    }
}

impl From<tern_tar::Error> for Error {
    fn from(e: tern_tar::Error) -> Self {
        match e {
            tern_tar::Error::Truncated { offset } => Error::Truncated {
                entry: format!("tar header at byte {offset}"),
            },
            other => Error::Archive(other),
        }
    }
}

impl From<tern_core::Error> for Error {
    fn from(e: tern_core::Error) -> Self {
        Error::Metadata(Box::new(e))
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
