//! Bootloader backends behind one small trait (RAUC's verbs).
//!
//! Every backend keeps the same model, which the integrator's boot script implements for
//! U-Boot and GRUB (see ARCHITECTURE.md for the scripts):
//!
//! - `BOOT_ORDER`: the slots' bootnames, most preferred first (e.g. `"A B"`);
//! - `BOOT_<name>_LEFT`: boot attempts left for that slot. At power-on the boot script picks
//!   the first slot in `BOOT_ORDER` with attempts left, decrements its count and boots it;
//!   a slot with 0 attempts left is skipped (that is the fallback).
//!
//! "Mark good" restores the slot's attempts to the configured maximum; "mark bad" sets them
//! to 0; "set primary" moves a slot to the front of `BOOT_ORDER` with N attempts.

mod custom;
mod envfile;
mod sim;

pub use custom::CustomBootloader;
pub use envfile::{GrubEnv, UbootEnv};
pub use sim::SimBootloader;

use crate::Result;

/// The verbs the agent needs from a bootloader.
pub trait Bootloader: Send {
    /// The backend's name, for status and errors.
    fn name(&self) -> &'static str;
    /// The bootname of the slot the running system was booted from.
    fn booted(&self) -> Result<String>;
    /// The bootname the next boot will try first.
    fn primary(&self) -> Result<Option<String>>;
    /// Make `bootname` the first choice, with `attempts` boot attempts.
    fn set_primary(&mut self, bootname: &str, attempts: u32) -> Result<()>;
    /// The slot works: restore its attempts to `attempts`.
    fn mark_good(&mut self, bootname: &str, attempts: u32) -> Result<()>;
    /// The slot must not be booted: no attempts left.
    fn mark_bad(&mut self, bootname: &str) -> Result<()>;
    /// Boot attempts left for `bootname`.
    fn attempts(&self, bootname: &str) -> Result<u32>;
    /// Something that changes at every boot, so the agent can tell "restarted" from
    /// "rebooted": the kernel's boot id by default.
    fn boot_id(&self) -> Result<String> {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .map_err(|e| crate::Error::Bootloader {
                backend: "boot id",
                reason: e.to_string(),
            })
    }
}
