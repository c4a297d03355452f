//! The agent's persistent state: the update state machine (DESIGN §5), the slots' records and
//! the rollback floor, in one file (`STATE_DIR/state.json`) replaced atomically after every
//! transition, so that a power cut leaves either the old or the new state, never a mix.
//!
//! Each state is its own type holding only what is valid there; transitions consume the
//! state by value. [`Phase`] wraps them for dispatch and is what gets persisted.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What is being installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The payload's target path.
    pub target: String,
    /// Its version (SemVer).
    pub version: String,
    /// SHA-256 of the payload as signed (compressed form, if compressed).
    pub payload_sha256: String,
}

/// No update in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idle;

/// The inactive slot is marked non-bootable and the payload streams into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transferring {
    /// The release.
    pub release: Release,
    /// The slot being written.
    pub slot: String,
}

/// The payload's hashes matched; the slot's record is written; not yet primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// The release.
    pub release: Release,
    /// The slot.
    pub slot: String,
}

/// The slot is primary with N attempts; waiting for the reboot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReboot {
    /// The release.
    pub release: Release,
    /// The new slot.
    pub slot: String,
    /// The slot that was running when it was installed.
    pub previous: String,
    /// The boot id when it was installed: the same id at the boot-time step means the agent
    /// restarted without a reboot, which says nothing about the new slot.
    #[serde(default)]
    pub boot_id: String,
}

/// Booted from the new slot; the health check decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The release.
    pub release: Release,
    /// The new slot.
    pub slot: String,
    /// The slot to fall back to.
    pub previous: String,
}

/// The new slot is good and the rollback floor raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The release.
    pub release: Release,
    /// The slot.
    pub slot: String,
}

/// The bootloader fell back to the previous slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// The release that failed.
    pub release: Release,
    /// The slot it was in.
    pub slot: String,
    /// Why.
    pub reason: String,
}

/// An install failed; nothing was made bootable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The release, if one was known.
    pub release: Option<Release>,
    /// Why.
    pub reason: String,
}

/// One of the states, for dispatch and persistence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Phase {
    /// [`Idle`].
    Idle,
    /// [`Transferring`].
    Transferring(Transferring),
    /// [`Verified`].
    Verified(Verified),
    /// [`PendingReboot`].
    PendingReboot(PendingReboot),
    /// [`Trial`].
    Trial(Trial),
    /// [`Committed`].
    Committed(Committed),
    /// [`RolledBack`].
    RolledBack(RolledBack),
    /// [`Failed`].
    Failed(Failed),
}

impl Phase {
    /// The state's name.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Transferring(_) => "transferring",
            Phase::Verified(_) => "verified",
            Phase::PendingReboot(_) => "pending-reboot",
            Phase::Trial(_) => "trial",
            Phase::Committed(_) => "committed",
            Phase::RolledBack(_) => "rolled-back",
            Phase::Failed(_) => "failed",
        }
    }

    /// Whether a new install may start.
    pub fn accepts_install(&self) -> bool {
        !matches!(self, Phase::PendingReboot(_) | Phase::Trial(_))
    }
}

impl Idle {
    /// Start writing `slot`.
    pub fn transfer(self, release: Release, slot: String) -> Transferring {
        Transferring { release, slot }
    }
}

impl Transferring {
    /// Every byte written and every hash matched.
    pub fn verified(self) -> Verified {
        Verified {
            release: self.release,
            slot: self.slot,
        }
    }

    /// Writing or verification failed.
    pub fn failed(self, reason: String) -> Failed {
        Failed {
            release: Some(self.release),
            reason,
        }
    }
}

impl Verified {
    /// The slot was made primary.
    pub fn applied(self, previous: String, boot_id: String) -> PendingReboot {
        PendingReboot {
            release: self.release,
            slot: self.slot,
            previous,
            boot_id,
        }
    }
}

impl PendingReboot {
    /// Booted from the new slot.
    pub fn booted(self) -> Trial {
        Trial {
            release: self.release,
            slot: self.slot,
            previous: self.previous,
        }
    }

    /// The bootloader did not boot the new slot.
    pub fn rolled_back(self, reason: String) -> RolledBack {
        RolledBack {
            release: self.release,
            slot: self.slot,
            reason,
        }
    }
}

impl Trial {
    /// The health check passed.
    pub fn commit(self) -> Committed {
        Committed {
            release: self.release,
            slot: self.slot,
        }
    }

    /// The attempts ran out and the previous slot booted.
    pub fn rolled_back(self, reason: String) -> RolledBack {
        RolledBack {
            release: self.release,
            slot: self.slot,
            reason,
        }
    }
}

/// What a slot holds, as far as the agent has verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// `verified` (content matches the record), `writing` (being written, not bootable),
    /// `bad` (failed or rolled back), `good` (committed).
    pub status: String,
    /// Release version.
    pub version: Option<String>,
    /// Payload target path.
    pub target: Option<String>,
    /// SHA-256 of the first `length` bytes of the slot (the image as written).
    pub sha256: Option<String>,
    /// Length of the image in the slot.
    pub length: u64,
    /// When it was written (seconds since the Unix epoch).
    pub installed_at: Option<i64>,
    /// SHA-256 of the payload as signed (what a bundle or an order names), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_sha256: Option<String>,
}

impl SlotRecord {
    /// Whether the slot holds `target` with the signed payload hash `sha256`.
    pub fn holds(&self, target: &str, sha256: &str) -> bool {
        !sha256.is_empty()
            && self.target.as_deref() == Some(target)
            && (self.payload_sha256.as_deref() == Some(sha256) || self.sha256.as_deref() == Some(sha256))
    }
}

/// A bundle offered on local media, as recognised again: its file name, size,
/// modification time and the SHA-256 of its first MiB (which holds its header and
/// metadata). An offer handled once (installed, refused, or failed for good) is not offered
/// again, even when its file cannot be renamed (a write-protected stick); another file of
/// the same name and size, made to look alike, is another offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferId {
    /// The file's name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// SHA-256 of its first MiB.
    #[serde(default)]
    pub head_sha256: String,
}

/// How many handled offers are remembered.
pub const HANDLED_OFFERS: usize = 1024;

/// A file or archive installed in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The payload's target path.
    pub target: String,
    /// Its version.
    pub version: String,
    /// Where it was installed.
    pub destination: PathBuf,
    /// When (seconds since the Unix epoch).
    pub installed_at: i64,
}

/// A recorded error, for `agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// The error's kind.
    pub kind: String,
    /// Its message.
    pub message: String,
    /// When (seconds since the Unix epoch).
    pub at: i64,
}

/// Everything persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The state machine.
    pub phase: Phase,
    /// Slot name → record.
    pub slots: BTreeMap<String, SlotRecord>,
    /// The highest committed version: nothing below it installs.
    pub rollback_floor: Option<String>,
    /// The last error.
    pub last_error: Option<ErrorRecord>,
    /// Files and archives installed in place, by target.
    #[serde(default)]
    pub apps: BTreeMap<String, AppRecord>,
    /// Local-media offers handled, newest last (at most [`HANDLED_OFFERS`]).
    #[serde(default)]
    pub handled_offers: Vec<OfferId>,
}

impl AgentState {
    /// Remember `offer` as handled.
    pub fn handled(&mut self, offer: OfferId) {
        self.handled_offers.retain(|o| o != &offer);
        self.handled_offers.push(offer);
        let excess = self.handled_offers.len().saturating_sub(HANDLED_OFFERS);
        self.handled_offers.drain(..excess);
    }
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            phase: Phase::Idle,
            slots: BTreeMap::new(),
            rollback_floor: None,
            last_error: None,
            apps: BTreeMap::new(),
            handled_offers: Vec::new(),
        }
    }
}

/// The state file and the lock that serialises agent operations.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Open the state directory and take its lock (refusing if another operation holds it).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Error::io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(Error::Busy { path: lock_path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path)(e)),
        }
        Ok(Store {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The state file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read the state (the default when there is none yet).
    pub fn load(&self) -> Result<AgentState> {
        read_state(&self.path())
    }

    /// Replace the state atomically.
    pub fn save(&self, state: &AgentState) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::State {
            path: self.path(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        tern_fs::atomic_write(&self.path(), &bytes, 0o644)?;
        Ok(())
    }
}

/// Read a state file without taking the lock (for `agent status`).
pub fn read_state(path: &Path) -> Result<AgentState> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState::default()),
        Err(e) => Err(Error::io(path)(e)),
    }
}
