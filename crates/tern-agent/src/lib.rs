//! Tern's device agent.
//!
//! What it does: reads the device's configuration, installs verified releases into the
//! inactive A/B slot following a fixed, numbered procedure (ARCHITECTURE.md), drives the
//! bootloader through one small trait (U-Boot, GRUB, an integrator's script, or a simulated
//! bootloader), runs the integrator's hooks, commits or records the rollback after reboot,
//! and persists its state atomically after every transition so that a power cut at any
//! instant leaves a device that boots a verified slot.
//!
//! It talks to the update server ([`remote`]): signed check-ins, director orders checked
//! against the director root and the repository, downloads through the TUF client.
//!
//! What it does not do: verify metadata itself (tern-bundle, tern-client and tern-core do).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod apps;
pub mod bootloader;
pub mod config;
pub mod floors;
pub mod hooks;
pub mod install;
pub mod keystore;
pub mod remote;
pub mod source;
pub mod state;
mod status;
mod stream;

use std::path::PathBuf;

/// Why the agent refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file is wrong; the message names the key and the line.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, with key and line.
        reason: String,
    },
    /// A file or device operation failed.
    #[error("{path}")]
    Io {
        /// The file or device.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The slot device is full.
    #[error("{path}: no space left while writing the slot")]
    DiskFull {
        /// The slot device.
        path: PathBuf,
    },
    /// A bootloader command failed.
    #[error("bootloader {backend}: {reason}")]
    Bootloader {
        /// The backend.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// The release is for another device type.
    #[error("release is for device type `{release}`, this device is `{device}`")]
    WrongDeviceType {
        /// The release's device type.
        release: String,
        /// This device's.
        device: String,
    },
    /// The release does not list this hardware revision.
    #[error("release supports hardware {supported:?}, this device is `{device}`")]
    WrongHardware {
        /// Revisions the release lists.
        supported: Vec<String>,
        /// This device's.
        device: String,
    },
    /// The release is older than what this device has committed.
    #[error("release {release} is below the rollback floor {floor}")]
    BelowRollbackFloor {
        /// The release's version.
        release: String,
        /// The committed floor.
        floor: String,
    },
    /// No slot of the payload's class exists, or none is inactive.
    #[error("no inactive slot of class `{class}`")]
    NoSlot {
        /// The class.
        class: String,
    },
    /// A configured slot device does not exist.
    #[error("slot `{slot}`: device {path} does not exist")]
    MissingSlotDevice {
        /// The slot.
        slot: String,
        /// Its device path.
        path: PathBuf,
    },
    /// The payload has no manifest, or one the agent cannot install.
    #[error("payload `{target}`: {reason}")]
    Unsupported {
        /// The payload.
        target: String,
        /// Why.
        reason: String,
    },
    /// The bundle failed verification.
    #[error(transparent)]
    Bundle(#[from] tern_bundle::Error),
    /// Persistent state could not be read or written.
    #[error("state {path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A hook failed or timed out.
    #[error("hook {hook} ({path}): {reason}")]
    Hook {
        /// Which hook.
        hook: &'static str,
        /// The executable.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
    /// No trusted root is configured or readable.
    #[error("trusted root {path}: {reason}")]
    TrustedRoot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another agent operation holds the state lock.
    #[error("{path}: another agent operation is running")]
    Busy {
        /// The lock file.
        path: PathBuf,
    },
    /// Local file handling failed.
    #[error(transparent)]
    Fs(#[from] tern_fs::Error),
    /// The update server could not be reached or refused the request.
    #[error("server {url}: {reason}")]
    Server {
        /// What was asked.
        url: String,
        /// What happened (the server's own error message when it gave one).
        reason: String,
    },
    /// The director's order was refused.
    #[error(transparent)]
    Order(#[from] tern_core::director::OrderRefusal),
    /// The TUF client refused the repository or a download.
    #[error(transparent)]
    Client(#[from] tern_client::Error),
    /// Metadata older than what this device verified before, from any source.
    #[error("metadata rollback refused: {0}")]
    MetadataRollback(tern_core::Error),
    /// The booted slot already holds this release: installing it again would overwrite the
    /// other slot, the previous known-good image, with the same one.
    #[error("payload `{target}` is what the booted slot {slot} already holds; not installed again")]
    AlreadyInstalled {
        /// The payload.
        target: String,
        /// The booted slot.
        slot: String,
    },
    /// A bundle that is not a regular file (a FIFO, a device, a directory).
    #[error("{path}: not a regular file")]
    NotARegularFile {
        /// The path.
        path: PathBuf,
    },
    /// An encrypted payload's data key is wrapped for none of this device's keys.
    #[error(
        "payload `{target}` is encrypted, and this device is not one of its recipients (its keys: {kids}); \
         the release engineer can add it with `tern bundle add-recipients`"
    )]
    NotRecipient {
        /// The payload.
        target: String,
        /// Key ids of the device's keys.
        kids: String,
    },
    /// An encrypted payload did not decrypt: a wrapped key for this device that does not
    /// open or does not match the signed commitment, or a record that fails authentication.
    #[error("payload `{target}`: {reason}")]
    Decryption {
        /// The payload.
        target: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// A short, stable name of the variant (status JSON and tests).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config { .. } => "Config",
            Error::Io { .. } => "Io",
            Error::DiskFull { .. } => "DiskFull",
            Error::Bootloader { .. } => "Bootloader",
            Error::WrongDeviceType { .. } => "WrongDeviceType",
            Error::WrongHardware { .. } => "WrongHardware",
            Error::BelowRollbackFloor { .. } => "BelowRollbackFloor",
            Error::NoSlot { .. } => "NoSlot",
            Error::MissingSlotDevice { .. } => "MissingSlotDevice",
            Error::Unsupported { .. } => "Unsupported",
            Error::Bundle(_) => "Bundle",
            Error::State { .. } => "State",
            Error::Hook { .. } => "Hook",
            Error::TrustedRoot { .. } => "TrustedRoot",
            Error::Busy { .. } => "Busy",
            Error::Fs(_) => "Fs",
            Error::Server { .. } => "Server",
            Error::Order(r) => r.kind(),
            Error::Client(_) => "Client",
            Error::NotRecipient { .. } => "NotRecipient",
            Error::Decryption { .. } => "Decryption",
            Error::MetadataRollback(_) => "MetadataRollback",
            Error::AlreadyInstalled { .. } => "AlreadyInstalled",
            Error::NotARegularFile { .. } => "NotARegularFile",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                Error::DiskFull { path }
            } else {
                Error::Io { path, source }
            }
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
