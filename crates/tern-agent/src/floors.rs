//! The device's version floors (`tern_core::floors`): the highest version of every role it
//! verified, from a bundle or from the server's repository, kept beside the TUF client's
//! trusted metadata in `STATE_DIR/tuf/floors.json`. Metadata older than a floor is refused
//! whatever its source, before anything is downloaded or written.

use std::path::PathBuf;

use tern_core::floors::{RoleVersion, VersionFloors};

use crate::config::AgentConfig;
use crate::{Error, Result};

fn path(cfg: &AgentConfig) -> PathBuf {
    cfg.state_dir.join("tuf").join("floors.json")
}

/// The floors (none yet: empty). An unreadable file refuses everything rather than nothing.
pub fn load(cfg: &AgentConfig) -> Result<VersionFloors> {
    let p = path(cfg);
    match std::fs::read(&p) {
        Ok(bytes) => VersionFloors::parse(&bytes).map_err(|e| Error::State {
            path: p,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(VersionFloors::default()),
        Err(e) => Err(Error::io(&p)(e)),
    }
}

/// Refuse `seen` if any role is older than its floor; otherwise raise the floors to it.
/// Under a lock of its own: the network path raises floors without the agent's state lock.
pub fn check_and_raise(cfg: &AgentConfig, seen: &[RoleVersion]) -> Result<()> {
    let dir = cfg.state_dir.join("tuf");
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let lock_path = dir.join("floors.lock");
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io(&lock_path))?;
    lock.lock().map_err(Error::io(&lock_path))?;
    let mut floors = load(cfg)?;
    floors.check(seen).map_err(Error::MetadataRollback)?;
    if floors.raise(seen) {
        tern_fs::atomic_write(&path(cfg), &floors.to_bytes(), 0o644)?;
    }
    drop(lock);
    Ok(())
}
