//! What `tern agent status` shows, read without the agent's lock, and the factory record
//! a provisioning step writes.

use std::path::PathBuf;

use serde::Serialize;
use tern_core::DateTime;

use crate::config::AgentConfig;
use crate::state::{AgentState, AppRecord, ErrorRecord, Phase, SlotRecord};
use crate::Result;

/// `agent status`: read without the lock.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The state.
    pub state: Phase,
    /// The booted slot's bootname.
    pub booted: Option<String>,
    /// The bootloader's first choice.
    pub primary: Option<String>,
    /// Per slot: configuration and record.
    pub slots: Vec<SlotStatus>,
    /// The rollback floor.
    pub rollback_floor: Option<String>,
    /// The last error.
    pub last_error: Option<ErrorRecord>,
    /// Files and archives installed in place.
    pub apps: Vec<AppRecord>,
    /// Local-media offers already handled (never installed again).
    pub handled_offers: Vec<crate::state::OfferId>,
}

/// One slot in `agent status`.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// Name.
    pub name: String,
    /// Class.
    pub class: String,
    /// Bootname.
    pub bootname: String,
    /// Device.
    pub device: PathBuf,
    /// Boot attempts left.
    pub attempts: Option<u32>,
    /// The record.
    pub record: Option<SlotRecord>,
}

/// Gather the status.
pub fn status(cfg: &AgentConfig) -> Result<Status> {
    let state = crate::state::read_state(&cfg.state_dir.join("state.json"))?;
    let boot = cfg.bootloader()?;
    Ok(Status {
        booted: boot.booted().ok(),
        primary: boot.primary().ok().flatten(),
        slots: cfg
            .slots
            .iter()
            .map(|s| SlotStatus {
                name: s.name.clone(),
                class: s.class.clone(),
                bootname: s.bootname.clone(),
                device: s.device.clone(),
                attempts: boot.attempts(&s.bootname).ok(),
                record: state.slots.get(&s.name).cloned(),
            })
            .collect(),
        state: state.phase,
        rollback_floor: state.rollback_floor,
        last_error: state.last_error,
        apps: state.apps.into_values().collect(),
        handled_offers: state.handled_offers,
    })
}

/// Record the factory image of a slot (used when a device is provisioned).
pub fn record_factory_slot(
    state: &mut AgentState,
    slot: &str,
    version: &str,
    length: u64,
    sha256: String,
    now: DateTime,
) {
    state.slots.insert(
        slot.to_owned(),
        SlotRecord {
            status: "good".into(),
            version: Some(version.to_owned()),
            target: None,
            sha256: Some(sha256),
            length,
            installed_at: Some(now.unix()),
            payload_sha256: None,
        },
    );
}
