//! Local files, done safely.
//!
//! What it does: atomic replacement of files (temp file in the same directory, fsync,
//! rename, fsync the directory), creation of files that must not already exist, private key
//! files (PKCS#8 PEM, mode 0600, refused when group- or world-readable, zeroized buffers)
//! and TUF public key files. The [`KeySource`] trait is the seam where hardware keys
//! (PKCS#11) will plug in.
//!
//! What it does not do: interpret metadata (tern-core) or decide what to write (the callers).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod atomic;
mod keyfile;

pub use atomic::{atomic_write, create_new, sync_dir, AtomicFile};
pub use keyfile::{
    generate_key_files, generate_recipient_files, load_public_key, load_recipient_key, load_recipient_secret,
    load_signing_key, FileKeySource, KeyFiles, KeySource,
};

use std::path::PathBuf;

/// Errors of local file handling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file that must be new exists already.
    #[error("{path}: already exists; refusing to overwrite it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A private key file is readable by group or others.
    #[error("{path}: private key file has mode {mode:04o}; it must not be readable by group or others (chmod 600)")]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file's content was refused.
    #[error("{path}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<tern_core::Error>,
    },
    /// An encryption (X25519) key file's content was refused.
    #[error("{path}")]
    EncryptionKey {
        /// The file.
        path: PathBuf,
        /// Why.
        source: tern_core::keywrap::WrapError,
    },
    /// A file is larger than a key file can be.
    #[error("{path}: {size} bytes is too large for a key file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}
