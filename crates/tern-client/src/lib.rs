//! Tern's TUF client: the device's half of the repository protocol.
//!
//! What it does: the specification's detailed client workflow (§5), step by step, over a
//! [`Transport`]: HTTP(S) with rustls, a local directory, or a release bundle as an offline
//! source. Trusted metadata is kept on disk as the exact bytes that verified, under
//! non-versioned names, written atomically. Downloads are bounded, streamed, verified while
//! written, and resumed with HTTP Range after an interruption.
//!
//! What it does not do: decide what to install (the agent) or hold any state beyond the
//! metadata directory and the target files it is asked to download.
//!
//! The verification rules themselves are pure and live in `tern_core::trusted_set`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod download;
mod limits;
mod store;
mod transport;
mod updater;

pub use limits::Limits;
pub use store::MetadataDir;
pub use transport::{
    fetch_to, AnyTransport, BundleTransport, Fetched, FileTransport, HttpTransport, Transport, TransportError,
};
pub use updater::{TargetInfo, Updater};

use std::path::PathBuf;

/// Why an update or download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Metadata was refused by the specification's rules.
    #[error("{0}")]
    Metadata(Box<tern_core::Error>),
    /// A fetch failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A local file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Local file handling failed.
    #[error(transparent)]
    Fs(#[from] tern_fs::Error),
    /// The metadata directory has no trusted root.
    #[error("{dir}: no trusted root (run `tern tuf --metadata-dir DIR init ROOT.json`)")]
    NotInitialised {
        /// The directory.
        dir: PathBuf,
    },
    /// A target failed verification.
    #[error("target `{target}`")]
    Target {
        /// The target path.
        target: String,
        /// Why.
        source: Box<tern_core::Error>,
    },
    /// No target base URL was given.
    #[error("no target base URL")]
    NoTargetBase,
}

impl Error {
    /// The core error underneath, if any.
    pub fn core(&self) -> Option<&tern_core::Error> {
        match self {
            Error::Metadata(e) => Some(e),
            Error::Target { source, .. } => Some(source),
            _ => None,
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
