//! A file-backed bootloader for tests and the demo: it keeps the boot-counting model in a
//! JSON file (replaced atomically, as a redundant U-Boot environment would be), performs the
//! power-on selection for `tern sim reboot`, and appends every verb the agent calls to a log,
//! so that tests can assert the order of bootloader calls.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Bootloader;
use crate::{Error, Result};

/// The simulated firmware environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimState {
    /// `BOOT_ORDER`.
    pub order: Vec<String>,
    /// `BOOT_<name>_LEFT`.
    pub left: BTreeMap<String, u32>,
    /// The slot the last power-on booted.
    pub booted: String,
    /// Power-ons so far.
    pub boots: u64,
}

/// The simulated bootloader.
#[derive(Debug)]
pub struct SimBootloader {
    path: PathBuf,
    log: PathBuf,
    state: SimState,
}

fn err(reason: impl ToString) -> Error {
    Error::Bootloader {
        backend: "sim",
        reason: reason.to_string(),
    }
}

impl SimBootloader {
    /// Create the environment: `order` with `attempts` each, `order[0]` booted.
    pub fn create(path: &Path, order: &[String], attempts: u32) -> Result<Self> {
        let state = SimState {
            order: order.to_vec(),
            left: order.iter().map(|s| (s.clone(), attempts)).collect(),
            booted: order.first().cloned().ok_or_else(|| err("no slots"))?,
            boots: 0,
        };
        let me = SimBootloader {
            path: path.to_owned(),
            log: log_path(path),
            state,
        };
        me.save()?;
        Ok(me)
    }

    /// Open an existing environment.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let state: SimState = serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(SimBootloader {
            path: path.to_owned(),
            log: log_path(path),
            state,
        })
    }

    /// The environment as it stands.
    pub fn state(&self) -> &SimState {
        &self.state
    }

    fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(err)?;
        tern_fs::atomic_write(&self.path, &bytes, 0o644)?;
        Ok(())
    }

    fn record(&self, call: &str) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(Error::io(&self.log))?;
        writeln!(f, "{call}").map_err(Error::io(&self.log))
    }

    /// What the boot script does at power-on: the first slot in `BOOT_ORDER` with attempts
    /// left is chosen and its count decremented. `None` when no slot is bootable (a brick).
    pub fn power_on(&mut self) -> Result<Option<String>> {
        self.state.boots += 1;
        let chosen = self
            .state
            .order
            .iter()
            .find(|s| self.state.left.get(*s).copied().unwrap_or(0) > 0)
            .cloned();
        if let Some(s) = &chosen {
            if let Some(left) = self.state.left.get_mut(s) {
                *left -= 1;
            }
            self.state.booted = s.clone();
        }
        self.save()?;
        self.record(&format!("power-on -> {}", chosen.as_deref().unwrap_or("NONE")))?;
        Ok(chosen)
    }
}

fn log_path(path: &Path) -> PathBuf {
    path.with_extension("log")
}

impl Bootloader for SimBootloader {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn booted(&self) -> Result<String> {
        Ok(self.state.booted.clone())
    }

    fn primary(&self) -> Result<Option<String>> {
        Ok(self.state.order.first().cloned())
    }

    fn set_primary(&mut self, bootname: &str, attempts: u32) -> Result<()> {
        self.record(&format!("set-primary {bootname} {attempts}"))?;
        self.state.order.retain(|s| s != bootname);
        self.state.order.insert(0, bootname.to_owned());
        self.state.left.insert(bootname.to_owned(), attempts);
        self.save()
    }

    fn mark_good(&mut self, bootname: &str, attempts: u32) -> Result<()> {
        self.record(&format!("mark-good {bootname} {attempts}"))?;
        self.state.left.insert(bootname.to_owned(), attempts);
        self.save()
    }

    fn mark_bad(&mut self, bootname: &str) -> Result<()> {
        self.record(&format!("mark-bad {bootname}"))?;
        self.state.left.insert(bootname.to_owned(), 0);
        self.save()
    }

    fn attempts(&self, bootname: &str) -> Result<u32> {
        Ok(self.state.left.get(bootname).copied().unwrap_or(0))
    }

    fn boot_id(&self) -> Result<String> {
        Ok(format!("sim-boot-{}", self.state.boots))
    }
}
