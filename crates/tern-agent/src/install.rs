//! The install procedure and the boot-time step.
//!
//! Install (`Agent::install`), in this order; tests assert it, bootloader calls included:
//!
//! 1. Refuse if the configuration refuses local media, or a reboot is pending.
//! 2. Verify the bundle's metadata from the device's trust anchor (the newest root it has
//!    verified, else the shipped one): root chain, targets and delegations, and snapshot and
//!    timestamp as the offline policy requires.
//! 3. For the payload: check the manifest's device type and hardware revision, and that
//!    its version is not below the rollback floor. An encrypted payload: unwrap its data
//!    key with one of the device's keys and check it against the signed commitment; a
//!    device that is not a recipient stops here, before any slot is touched.
//! 4. Choose the inactive slot of the payload's class (never the booted one); its device
//!    must exist.
//! 5. Run the pre-install hook.
//! 6. Mark the slot non-bootable (`mark_bad`), then record it as being written.
//! 7. Stream the payload into it, hashing the signed (cipher)text as it arrives,
//!    decrypting record by record (each record's tag verified before its plaintext goes
//!    on), decompressing zstd on the fly and hashing the written image; fsync.
//! 8. Compare the payload's full length and hashes (only now is the bundle verified).
//! 9. Record the slot: version, image hash and length, install time.
//! 10. Run the post-install hook.
//! 11. Mark the slot primary with `boot_attempts` attempts (`set_primary`); persist
//!     PendingReboot and the newest verified root.
//! 12. Reboot: the reboot hook if configured (else the operator, or `tern sim reboot`).
//!
//! Boot-time step (`Agent::boot_step`), at every start of the agent:
//!
//! 13. Booted the new slot: Trial; run the health-check hook; on success commit: `mark_good`,
//!     raise the rollback floor, Committed. On failure leave the attempts to run out.
//! 14. Booted another slot while PendingReboot or Trial: the bootloader fell back; mark the
//!     new slot bad, record RolledBack with the reason, run the on-rollback hook.
//! 15. Otherwise, if the booted slot is committed, `mark_good` it (restore its attempts).
//!
//! A power cut at any point leaves the inactive slot non-bootable until step 11, and step 11
//! happens only after its content and record are complete.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tern_core::digest::{Digester, HashAlgorithm};
use tern_core::manifest::{Compression, Installer, Manifest};
use tern_core::trust::Freshness;
use tern_core::DateTime;

use crate::bootloader::Bootloader;
use crate::config::{AgentConfig, OfflineInstall, SlotConfig};
use crate::state::{AgentState, ErrorRecord, Failed, Idle, Phase, Release, RolledBack, SlotRecord, Store, Trial};
use crate::{hooks, Error, Result};

const CHUNK: usize = 1 << 20;
/// Bytes written between two `fdatasync`s of a slot.
const SYNC_EVERY: usize = 64 << 20;

/// Where a bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Local media (USB, an inbox directory): the configured offline policy applies.
    LocalMedia,
    /// Fetched over the network: snapshot and timestamp are always required.
    Network,
}

/// The device's trust anchor: the newest root it verified, else the shipped one.
pub fn trust_anchor(cfg: &AgentConfig) -> Result<Vec<u8>> {
    let newest = cfg.state_dir.join("root.json");
    let path = if newest.exists() {
        newest
    } else {
        cfg.trusted_root.clone()
    };
    std::fs::read(&path).map_err(|e| Error::TrustedRoot {
        path,
        reason: e.to_string(),
    })
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstallReport {
    /// The slot image, if the bundle had one.
    pub slot_image: Option<SlotInstall>,
    /// Files and archives installed in place (no reboot needed for them).
    pub applied: Vec<AppRecord>,
    /// Whether a reboot is needed to try the slot image.
    pub reboot_needed: bool,
}

/// A slot image written by an install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotInstall {
    /// The release.
    pub release: Release,
    /// The slot written.
    pub slot: String,
    /// Its bootname.
    pub bootname: String,
    /// Bytes written to the slot.
    pub written: u64,
}

pub use crate::state::AppRecord;

/// A file or archive payload written beside its destination, put in place only after the
/// whole bundle verified.
enum Staged {
    File {
        tmp: tern_fs::AtomicFile,
        record: AppRecord,
    },
    Archive {
        new_dir: PathBuf,
        record: AppRecord,
    },
}

/// What the boot-time step found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum BootOutcome {
    /// Nothing pending.
    Nothing,
    /// The new slot passed its health check and is committed.
    Committed {
        /// The version committed.
        version: String,
    },
    /// The new slot booted but its health check failed; it stays uncommitted.
    HealthCheckFailed {
        /// Why.
        reason: String,
    },
    /// The bootloader fell back.
    RolledBack {
        /// Why.
        reason: String,
    },
    /// An install was interrupted before the slot was complete; it is not bootable.
    Interrupted,
}

/// The agent with its configuration, bootloader and locked state.
pub struct Agent {
    /// The configuration.
    pub cfg: AgentConfig,
    boot: Box<dyn Bootloader>,
    store: Store,
    state: AgentState,
    /// Persistent writes (state file, bootloader) so far, for crash testing.
    writes: usize,
    crash_at: Option<usize>,
}

fn now_unix(now: DateTime) -> i64 {
    now.unix()
}

impl Agent {
    /// Lock the state directory and open the bootloader.
    pub fn open(cfg: AgentConfig) -> Result<Self> {
        let store = Store::open(&cfg.state_dir)?;
        let state = store.load()?;
        recover_archive_swaps(&state.apps);
        let boot = cfg.bootloader()?;
        // Tests set TERN_TEST_CRASH_AT=N to abort right after the Nth persistent write, so
        // that every window between two writes is exercised (crates/tern-cli/tests/power_cut.rs).
        let crash_at = std::env::var("TERN_TEST_CRASH_AT").ok().and_then(|v| v.parse().ok());
        Ok(Agent {
            cfg,
            boot,
            store,
            state,
            writes: 0,
            crash_at,
        })
    }

    /// The persisted state.
    pub fn state(&self) -> &AgentState {
        &self.state
    }

    fn save(&mut self) -> Result<()> {
        self.store.save(&self.state)?;
        self.crash_point();
        Ok(())
    }

    /// Abort here if a crash test asked for it (after the Nth persistent write).
    fn crash_point(&mut self) {
        self.writes += 1;
        if self.crash_at == Some(self.writes) {
            std::process::abort();
        }
    }

    fn hook_env(&self, release: Option<&Release>, slot: Option<&SlotConfig>) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("TERN_DEVICE_TYPE", self.cfg.device_type.clone()),
            ("TERN_HARDWARE_REVISION", self.cfg.hardware_revision.clone()),
            ("TERN_STATE_DIR", self.cfg.state_dir.display().to_string()),
        ];
        if let Some(r) = release {
            env.push(("TERN_TARGET", r.target.clone()));
            env.push(("TERN_VERSION", r.version.clone()));
        }
        if let Some(s) = slot {
            env.push(("TERN_SLOT", s.name.clone()));
            env.push(("TERN_SLOT_DEVICE", s.device.display().to_string()));
            env.push(("TERN_BOOTNAME", s.bootname.clone()));
        }
        env
    }

    fn hook(&self, name: &'static str, path: Option<&PathBuf>, env: &[(&'static str, String)]) -> Result<()> {
        match path {
            Some(p) => hooks::run(name, p, env, Duration::from_secs(self.cfg.hooks.timeout_secs)),
            None => Ok(()),
        }
    }

    /// The trust anchor: the newest root this device verified, else the shipped one.
    fn trust_anchor(&self) -> Result<Vec<u8>> {
        trust_anchor(&self.cfg)
    }

    /// Record an error that happened outside an install (a refused order) as the last error.
    pub fn note_error(&mut self, kind: &str, message: &str, now: DateTime) {
        self.state.last_error = Some(ErrorRecord {
            kind: kind.to_owned(),
            message: message.to_owned(),
            at: now_unix(now),
        });
        let _ = self.save();
    }

    fn record_error(&mut self, e: &Error, now: DateTime) {
        self.state.last_error = Some(ErrorRecord {
            kind: e.kind().to_owned(),
            message: error_chain(e),
            at: now_unix(now),
        });
    }

    /// Steps 1–12: install a bundle from local storage.
    pub fn install(&mut self, bundle: &Path, now: DateTime, progress: &mut dyn FnMut(u64)) -> Result<InstallReport> {
        self.install_from(bundle, Origin::LocalMedia, now, progress)
    }

    /// Steps 1–12 for a bundle from `origin`: one fetched over the network must carry
    /// snapshot and timestamp whatever the local-media policy says (DESIGN §3).
    pub fn install_from(
        &mut self,
        bundle: &Path,
        origin: Origin,
        now: DateTime,
        progress: &mut dyn FnMut(u64),
    ) -> Result<InstallReport> {
        // 1.
        if origin == Origin::LocalMedia && self.cfg.offline_install == OfflineInstall::Refuse {
            return Err(Error::Unsupported {
                target: bundle.display().to_string(),
                reason: "this device's configuration refuses local bundles (offline_install = \"refuse\")".into(),
            });
        }
        let freshness = match (origin, self.cfg.offline_install) {
            (Origin::Network, _) | (_, OfflineInstall::RequireFreshness) => Freshness::Required,
            _ => Freshness::IfPresent,
        };
        let root = self.trust_anchor()?;
        let file = std::fs::File::open(bundle).map_err(Error::io(bundle))?;
        let reader = std::io::BufReader::with_capacity(CHUNK, file);
        self.install_payloads(&bundle.display().to_string(), root, now, progress, move |root, sink| {
            tern_bundle::read_bundle(reader, root, now, freshness, sink)
                .map(drop)
                .map_err(Error::Bundle)
        })
    }

    /// Steps 1 and 3–12 for payloads whose metadata a TUF client already verified and
    /// whose files it downloaded and checked (the server path): each file is streamed into
    /// the install as a bundle's payload would be, and the root the client ended with
    /// becomes the trust anchor.
    pub fn install_downloaded(
        &mut self,
        payloads: &[(tern_bundle::VerifiedPayload, PathBuf)],
        now: DateTime,
        progress: &mut dyn FnMut(u64),
    ) -> Result<InstallReport> {
        let root = match payloads.first() {
            Some((p, _)) => p.root.as_ref().clone(),
            None => self.trust_anchor()?,
        };
        let label = payloads
            .iter()
            .map(|(p, _)| p.target.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        self.install_payloads(&label, root, now, progress, |_, sink| {
            for (payload, path) in payloads {
                let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
                sink(payload, &mut file).map_err(|reason| Error::Unsupported {
                    target: payload.target.clone(),
                    reason,
                })?;
            }
            Ok(())
        })
    }

    /// The install proper: `drive` verifies and hands every payload to the sink.
    fn install_payloads(
        &mut self,
        label: &str,
        root: Vec<u8>,
        now: DateTime,
        progress: &mut dyn FnMut(u64),
        drive: impl FnOnce(
            &[u8],
            &mut dyn FnMut(&tern_bundle::VerifiedPayload, &mut dyn Read) -> std::result::Result<(), String>,
        ) -> Result<()>,
    ) -> Result<InstallReport> {
        if !self.state.phase.accepts_install() {
            return Err(Error::State {
                path: self.store.path(),
                reason: format!(
                    "a reboot is pending ({}); reboot before installing again",
                    self.state.phase.name()
                ),
            });
        }
        let booted = self.boot.booted()?;

        // The sink runs once per payload, after its metadata verified (step 2).
        let mut chosen: Option<(Release, SlotConfig, u64, String)> = None;
        let mut staged: Vec<Staged> = Vec::new();
        let mut failure: Option<Error> = None;
        let mut anchor_saved = false;
        let anchor_path = self.cfg.state_dir.join("root.json");
        let mut sink =
            |payload: &tern_bundle::VerifiedPayload, data: &mut dyn Read| -> std::result::Result<(), String> {
                // The root chain verified: persist the newest root before anything else.
                if !anchor_saved && payload.root.as_slice() != root.as_slice() {
                    tern_fs::atomic_write(&anchor_path, &payload.root, 0o644).map_err(|e| {
                        let msg = e.to_string();
                        failure = Some(e.into());
                        msg
                    })?;
                }
                anchor_saved = true;
                let is_raw = payload.manifest.as_ref().is_some_and(|m| m.installer == Installer::Raw);
                let r = if is_raw || payload.manifest.is_none() {
                    self.write_payload(payload, data, &booted, chosen.is_some(), now, progress)
                        .map(|done| chosen = Some(done))
                } else {
                    self.stage_payload(payload, data, now).map(|s| staged.push(s))
                };
                r.map_err(|e| {
                    let msg = e.to_string();
                    failure = Some(e);
                    msg
                })
            };
        let verified = drive(&root, &mut sink);
        // 8: only now are the payloads' lengths and hashes known to match.
        match (verified, failure) {
            (_, Some(e)) => {
                discard(staged);
                return Err(self.fail_install(e, now));
            }
            (Err(e), None) => {
                discard(staged);
                return Err(self.fail_install(e, now));
            }
            (Ok(()), None) => {}
        };
        // Files and archives go in place now that everything verified.
        let mut applied = Vec::new();
        for s in staged {
            let record = apply(s)?;
            self.state.apps.insert(record.target.clone(), record.clone());
            applied.push(record);
        }
        let Some((release, slot, written, image_sha256)) = chosen else {
            if applied.is_empty() {
                return Err(Error::Unsupported {
                    target: label.to_owned(),
                    reason: "the bundle has no payload for this device".into(),
                });
            }
            self.state.last_error = None;
            self.save()?;
            return Ok(InstallReport {
                slot_image: None,
                applied,
                reboot_needed: false,
            });
        };
        // 9.
        let Phase::Transferring(t) = std::mem::replace(&mut self.state.phase, Phase::Idle) else {
            return Err(Error::State {
                path: self.store.path(),
                reason: "not transferring after the write".into(),
            });
        };
        self.state.slots.insert(
            slot.name.clone(),
            SlotRecord {
                status: "verified".into(),
                version: Some(release.version.clone()),
                target: Some(release.target.clone()),
                sha256: Some(image_sha256),
                length: written,
                installed_at: Some(now_unix(now)),
            },
        );
        let verified_state = t.verified();
        self.state.phase = Phase::Verified(verified_state.clone());
        self.save()?;
        // 10.
        let env = self.hook_env(Some(&release), Some(&slot));
        if let Err(e) = self.hook("post-install", self.cfg.hooks.post_install.clone().as_ref(), &env) {
            return Err(self.fail_install(e, now));
        }
        // 11. PendingReboot is persisted first: a cut after it, before `set_primary`, leaves
        // the slot non-bootable (0 attempts) and the next boot records that it did not run.
        let boot_id = self.boot.boot_id()?;
        self.state.phase = Phase::PendingReboot(verified_state.clone().applied(booted, boot_id));
        self.state.last_error = None;
        self.save()?;
        let primary = self.boot.set_primary(&slot.bootname, self.cfg.boot_attempts);
        self.crash_point();
        if let Err(e) = primary {
            // It may have half-happened: make sure the slot cannot boot.
            let _ = self.boot.mark_bad(&slot.bootname);
            self.state.phase = Phase::Verified(verified_state);
            return Err(self.fail_install(e, now));
        }
        // 12.
        self.hook("reboot", self.cfg.hooks.reboot.clone().as_ref(), &env)?;
        Ok(InstallReport {
            slot_image: Some(SlotInstall {
                release,
                bootname: slot.bootname.clone(),
                slot: slot.name,
                written,
            }),
            applied,
            reboot_needed: true,
        })
    }

    /// Checks every payload passes: the manifest's device type and hardware revision.
    fn check_compatible(&self, m: &Manifest) -> Result<()> {
        if m.device_type != self.cfg.device_type {
            return Err(Error::WrongDeviceType {
                release: m.device_type.clone(),
                device: self.cfg.device_type.clone(),
            });
        }
        if !m.hardware.is_empty() && !m.hardware.contains(&self.cfg.hardware_revision) {
            return Err(Error::WrongHardware {
                supported: m.hardware.clone(),
                device: self.cfg.hardware_revision.clone(),
            });
        }
        Ok(())
    }

    /// A file or archive payload: written beside its destination, not yet in place.
    fn stage_payload(
        &mut self,
        payload: &tern_bundle::VerifiedPayload,
        data: &mut dyn Read,
        now: DateTime,
    ) -> Result<Staged> {
        let unsupported = |reason: &str| Error::Unsupported {
            target: payload.target.clone(),
            reason: reason.to_owned(),
        };
        let m = payload
            .manifest
            .as_ref()
            .ok_or_else(|| unsupported("no Tern manifest (custom.tern)"))?;
        self.check_compatible(m)?;
        let dest = PathBuf::from(m.install_path.as_ref().ok_or_else(|| unsupported("no install_path"))?);
        if !dest.is_absolute() || dest.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(unsupported("install_path must be an absolute path without `..`"));
        }
        let inside = |root: &PathBuf| dest.starts_with(root) && dest != *root;
        if !self.cfg.install_roots.iter().any(inside) {
            return Err(unsupported(&format!(
                "install_path {} is not under any of this device's install_roots {:?}",
                dest.display(),
                self.cfg.install_roots
            )));
        }
        // The rollback floor of files and archives: never below what is installed there.
        let version = semver::Version::parse(&m.version).map_err(|e| unsupported(&format!("version: {e}")))?;
        for installed in self
            .state
            .apps
            .values()
            .filter(|a| a.destination == dest || a.target == payload.target)
        {
            let floor = semver::Version::parse(&installed.version).map_err(|e| Error::State {
                path: self.store.path(),
                reason: format!("installed version of {}: {e}", installed.target),
            })?;
            if version < floor {
                return Err(Error::BelowRollbackFloor {
                    release: m.version.clone(),
                    floor: installed.version.clone(),
                });
            }
        }
        let data_key = crate::keystore::data_key(&self.cfg, payload)?;
        let record = AppRecord {
            target: payload.target.clone(),
            version: m.version.clone(),
            destination: dest.clone(),
            installed_at: now_unix(now),
        };
        let mut input = plaintext(
            data,
            &payload.target,
            data_key.as_ref().zip(m.encryption.as_ref()),
            m.compression,
        )?;
        match m.installer {
            Installer::File => {
                let mut tmp = tern_fs::AtomicFile::create(&dest, 0o644)?;
                copy(&mut input, tmp.file()).map_err(|e| read_error(&payload.target, &dest, e))?;
                Ok(Staged::File { tmp, record })
            }
            Installer::Archive => {
                let name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let new_dir = dest.with_file_name(format!(".{name}.tern-new"));
                let _ = std::fs::remove_dir_all(&new_dir);
                std::fs::create_dir_all(&new_dir).map_err(Error::io(&new_dir))?;
                if let Err(e) = unpack_archive(input, &new_dir) {
                    let _ = std::fs::remove_dir_all(&new_dir);
                    return Err(e);
                }
                Ok(Staged::Archive { new_dir, record })
            }
            other => Err(unsupported(&format!(
                "the {other} installer is not supported by this agent"
            ))),
        }
    }

    /// A failed install: if a slot was touched it stays non-bootable and is recorded bad.
    fn fail_install(&mut self, e: Error, now: DateTime) -> Error {
        let phase = std::mem::replace(&mut self.state.phase, Phase::Idle);
        let (release, slot) = match phase {
            Phase::Transferring(t) => (t.release, t.slot),
            Phase::Verified(v) => (v.release, v.slot),
            Phase::PendingReboot(p) => (p.release, p.slot),
            other => {
                // Nothing was touched: the state stays as it was.
                self.state.phase = other;
                return e;
            }
        };
        if let Some(s) = self.cfg.slot(&slot).cloned() {
            let _ = self.boot.mark_bad(&s.bootname);
        }
        if let Some(rec) = self.state.slots.get_mut(&slot) {
            rec.status = "bad".into();
        }
        self.state.phase = Phase::Failed(Failed {
            release: Some(release),
            reason: error_chain(&e),
        });
        self.record_error(&e, now);
        // The original error matters more than a failure to record it.
        let _ = self.save();
        e
    }

    /// Steps 3–7 for one payload.
    fn write_payload(
        &mut self,
        payload: &tern_bundle::VerifiedPayload,
        data: &mut dyn Read,
        booted: &str,
        already: bool,
        now: DateTime,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(Release, SlotConfig, u64, String)> {
        let unsupported = |reason: &str| Error::Unsupported {
            target: payload.target.clone(),
            reason: reason.to_owned(),
        };
        let m: &Manifest = payload
            .manifest
            .as_ref()
            .ok_or_else(|| unsupported("no Tern manifest (custom.tern)"))?;
        if already {
            return Err(unsupported("only one slot payload per bundle is supported"));
        }
        // 3.
        self.check_compatible(m)?;
        let version = semver::Version::parse(&m.version).map_err(|e| unsupported(&format!("version: {e}")))?;
        if let Some(floor) = &self.state.rollback_floor {
            // An unreadable floor refuses everything rather than nothing.
            let f = semver::Version::parse(floor).map_err(|e| Error::State {
                path: self.store.path(),
                reason: format!("rollback floor `{floor}`: {e}"),
            })?;
            if version < f {
                return Err(Error::BelowRollbackFloor {
                    release: m.version.clone(),
                    floor: floor.clone(),
                });
            }
        }
        // 4. Only a class holding the booted slot is A/B here; the booted slot must be known,
        // committed, and is never the one written.
        let data_key = crate::keystore::data_key(&self.cfg, payload)?;
        // The image's hash when it is known without hashing the image: the signed bytes'
        // own for a plain payload, the sealed digest of an encrypted one (its records are
        // authenticated under the committed key, so the image is the one sealed).
        let plain_sha256 = payload
            .hashes
            .get("sha256")
            .filter(|_| m.compression == Compression::None);
        let known = match (
            &data_key,
            m.encryption.as_ref().and_then(|e| e.image_sha256_sealed.as_ref()),
        ) {
            (Some(k), Some(sealed)) => Some(k.open_digest(sealed).map_err(|e| Error::Decryption {
                target: payload.target.clone(),
                reason: e.to_string(),
            })?),
            (None, _) => plain_sha256.cloned(),
            _ => None,
        };
        let class = m.slot_class.clone().ok_or_else(|| unsupported("no slot class"))?;
        let running = self.cfg.slot_by_bootname(booted).cloned().ok_or_else(|| Error::State {
            path: self.store.path(),
            reason: format!("the bootloader says slot `{booted}` booted, which no [[slot]] in the configuration names"),
        })?;
        if running.class != class {
            return Err(Error::NoSlot { class });
        }
        if self.state.slots.get(&running.name).is_none_or(|r| r.status != "good") {
            return Err(Error::State {
                path: self.store.path(),
                reason: format!(
                    "the running slot {} is not committed; reboot into a committed slot before installing",
                    running.name
                ),
            });
        }
        let slot = self
            .cfg
            .slots
            .iter()
            .find(|s| s.class == class && s.bootname != booted)
            .cloned()
            .ok_or_else(|| Error::NoSlot { class: class.clone() })?;
        if !slot.device.exists() {
            return Err(Error::MissingSlotDevice {
                slot: slot.name.clone(),
                path: slot.device.clone(),
            });
        }
        let release = Release {
            target: payload.target.clone(),
            version: m.version.clone(),
            payload_sha256: payload.hashes.get("sha256").cloned().unwrap_or_default(),
        };
        // 5.
        let env = self.hook_env(Some(&release), Some(&slot));
        self.hook("pre-install", self.cfg.hooks.pre_install.clone().as_ref(), &env)?;
        // 6.
        self.boot.mark_bad(&slot.bootname)?;
        self.crash_point();
        self.state.slots.insert(
            slot.name.clone(),
            SlotRecord {
                status: "writing".into(),
                version: None,
                target: None,
                sha256: None,
                length: 0,
                installed_at: None,
            },
        );
        self.state.phase = Phase::Transferring(Idle.transfer(release.clone(), slot.name.clone()));
        let _ = now;
        self.save()?;
        // 7.
        let (written, image_sha256) = stream_into(
            &slot.device,
            data,
            &payload.target,
            data_key.as_ref().zip(m.encryption.as_ref()),
            m.compression,
            known.is_some(),
            progress,
        )?;
        let sha256 = image_sha256.or(known).unwrap_or_default();
        Ok((release, slot, written, sha256))
    }

    /// Steps 13–15.
    pub fn boot_step(&mut self, now: DateTime) -> Result<BootOutcome> {
        let booted = self.boot.booted()?;
        if self.cfg.slot_by_bootname(&booted).is_none() {
            return Err(Error::State {
                path: self.store.path(),
                reason: format!(
                    "the bootloader says slot `{booted}` booted, which no [[slot]] in the configuration names"
                ),
            });
        }
        let phase = std::mem::replace(&mut self.state.phase, Phase::Idle);
        let slot_of = |name: &str| self.cfg.slot(name).cloned();
        let outcome = match phase {
            Phase::PendingReboot(p) if !p.boot_id.is_empty() && self.boot.boot_id()? == p.boot_id => {
                // The agent restarted without a reboot: nothing to conclude yet.
                self.state.phase = Phase::PendingReboot(p);
                BootOutcome::Nothing
            }
            Phase::PendingReboot(p) => {
                let new = slot_of(&p.slot);
                if new.as_ref().is_some_and(|s| s.bootname == booted) {
                    self.state.phase = Phase::Trial(p.booted());
                    self.save()?;
                    return self.boot_step(now);
                }
                let reason = format!("the bootloader booted {booted} instead of the new slot {}", p.slot);
                self.roll_back(p.rolled_back(reason.clone()), now)?;
                BootOutcome::RolledBack { reason }
            }
            Phase::Trial(t) => {
                let new = slot_of(&t.slot).ok_or_else(|| Error::NoSlot { class: t.slot.clone() })?;
                if new.bootname != booted {
                    let reason = format!(
                        "the new slot {} did not become healthy within its boot attempts; the bootloader fell back to {booted}",
                        t.slot
                    );
                    self.roll_back(t.rolled_back(reason.clone()), now)?;
                    BootOutcome::RolledBack { reason }
                } else {
                    self.try_commit(t, &new, now)?
                }
            }
            Phase::Transferring(t) => {
                // A power cut mid-write: the slot was marked non-bootable first; keep it so.
                if let Some(s) = slot_of(&t.slot) {
                    self.boot.mark_bad(&s.bootname)?;
                    self.crash_point();
                }
                if let Some(rec) = self.state.slots.get_mut(&t.slot) {
                    rec.status = "bad".into();
                }
                self.state.phase =
                    Phase::Failed(t.failed("interrupted before the slot was complete; install again".into()));
                self.save()?;
                BootOutcome::Interrupted
            }
            Phase::Verified(v) => {
                // Cut between the record and set_primary: the slot is complete but was never
                // made primary. It did not boot; nothing to commit.
                if slot_of(&v.slot).is_some_and(|s| s.bootname == booted) {
                    let t = Trial {
                        release: v.release,
                        slot: v.slot.clone(),
                        previous: String::new(),
                    };
                    let new = slot_of(&v.slot).ok_or_else(|| Error::NoSlot { class: v.slot.clone() })?;
                    self.try_commit(t, &new, now)?
                } else {
                    // Whatever the bootloader was told, this slot must not boot now.
                    if let Some(s) = slot_of(&v.slot) {
                        self.boot.mark_bad(&s.bootname)?;
                        self.crash_point();
                    }
                    if let Some(rec) = self.state.slots.get_mut(&v.slot) {
                        rec.status = "bad".into();
                    }
                    self.state.phase = Phase::Failed(Failed {
                        release: Some(v.release),
                        reason: "interrupted before the slot was made primary; install again".into(),
                    });
                    self.save()?;
                    BootOutcome::Interrupted
                }
            }
            other => {
                self.state.phase = other;
                // 15.
                if let Some(s) = self.cfg.slot_by_bootname(&booted).cloned() {
                    if self.state.slots.get(&s.name).is_some_and(|r| r.status == "good") {
                        self.boot.mark_good(&s.bootname, self.cfg.boot_attempts)?;
                        self.crash_point();
                    }
                }
                BootOutcome::Nothing
            }
        };
        Ok(outcome)
    }

    fn try_commit(&mut self, t: Trial, slot: &SlotConfig, now: DateTime) -> Result<BootOutcome> {
        let env = self.hook_env(Some(&t.release), Some(slot));
        match self.hook("health-check", self.cfg.hooks.health_check.clone().as_ref(), &env) {
            Ok(()) => {
                // 13: commit.
                self.boot.mark_good(&slot.bootname, self.cfg.boot_attempts)?;
                self.crash_point();
                let version = t.release.version.clone();
                let raise = match &self.state.rollback_floor {
                    Some(f) => match (semver::Version::parse(f), semver::Version::parse(&version)) {
                        (Ok(f), Ok(v)) => v > f,
                        _ => true,
                    },
                    None => true,
                };
                if raise {
                    self.state.rollback_floor = Some(version.clone());
                }
                if let Some(rec) = self.state.slots.get_mut(&t.slot) {
                    rec.status = "good".into();
                }
                self.state.phase = Phase::Committed(t.commit());
                self.state.last_error = None;
                self.save()?;
                Ok(BootOutcome::Committed { version })
            }
            Err(e) => {
                // Leave the attempts to run out: the bootloader falls back by itself.
                let reason = e.to_string();
                self.record_error(&e, now);
                self.state.phase = Phase::Trial(t);
                self.save()?;
                Ok(BootOutcome::HealthCheckFailed { reason })
            }
        }
    }

    fn roll_back(&mut self, r: RolledBack, now: DateTime) -> Result<()> {
        // 14.
        let slot = self.cfg.slot(&r.slot).cloned();
        if let Some(s) = &slot {
            self.boot.mark_bad(&s.bootname)?;
            self.crash_point();
        }
        if let Some(rec) = self.state.slots.get_mut(&r.slot) {
            rec.status = "bad".into();
        }
        self.state.last_error = Some(ErrorRecord {
            kind: "RolledBack".into(),
            message: r.reason.clone(),
            at: now_unix(now),
        });
        let mut env = self.hook_env(Some(&r.release), slot.as_ref());
        env.push(("TERN_REASON", r.reason.clone()));
        self.state.phase = Phase::RolledBack(r);
        self.save()?;
        // The slot that booted instead is the committed one: restore its attempts (15).
        let booted = self.boot.booted()?;
        if let Some(s) = self.cfg.slot_by_bootname(&booted).cloned() {
            if self.state.slots.get(&s.name).is_some_and(|r| r.status == "good") {
                self.boot.mark_good(&s.bootname, self.cfg.boot_attempts)?;
                self.crash_point();
            }
        }
        // The rollback is recorded whatever the hook does.
        let _ = self.hook("on-rollback", self.cfg.hooks.on_rollback.clone().as_ref(), &env);
        Ok(())
    }
}

/// An error with its causes, for the persisted record.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Unpack an application archive: regular files and directories only (no links, devices or
/// FIFOs), names that stay inside `dir`, modes without setuid, setgid or world write; every
/// file and directory fsynced, so the swap that follows exposes complete content.
fn unpack_archive(input: impl Read, dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bad = |entry: &str, reason: &str| Error::Unsupported {
        target: entry.to_owned(),
        reason: format!("archive entry: {reason}"),
    };
    let mut archive = tar::Archive::new(input);
    let mut written: Vec<PathBuf> = vec![dir.to_owned()];
    for entry in archive.entries().map_err(Error::io(dir))? {
        let mut entry = entry.map_err(Error::io(dir))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(bad(&name, "only regular files and directories are installed"));
        }
        let rel = Path::new(&name);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(bad(&name, "absolute or `..` path"));
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
        if !entry.unpack_in(dir).map_err(Error::io(dir))? {
            return Err(bad(&name, "would land outside the install directory"));
        }
        let path = dir.join(rel);
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(mode | if kind.is_dir() { 0o700 } else { 0o600 }),
        )
        .map_err(Error::io(&path))?;
        written.push(path);
    }
    // Files first, then directories deepest first: their entries are durable before them.
    written.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in &written {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(Error::io(p))?;
    }
    Ok(())
}

/// Finish or undo an archive swap a power cut interrupted (run when the agent starts).
fn recover_archive_swaps(apps: &std::collections::BTreeMap<String, AppRecord>) {
    for a in apps.values() {
        let dest = &a.destination;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = dest.with_file_name(format!(".{name}.tern-old"));
        let new = dest.with_file_name(format!(".{name}.tern-new"));
        if !dest.exists() && old.exists() {
            // Cut between the two renames: put the previous version back.
            let _ = std::fs::rename(&old, dest);
        }
        let _ = std::fs::remove_dir_all(&new);
        let _ = std::fs::remove_dir_all(&old);
    }
}

/// Drop staged payloads of a failed install.
fn discard(staged: Vec<Staged>) {
    for s in staged {
        if let Staged::Archive { new_dir, .. } = s {
            let _ = std::fs::remove_dir_all(new_dir);
        }
        // A staged file's temp is removed when its AtomicFile drops.
    }
}

/// Put a staged payload in place.
fn apply(s: Staged) -> Result<AppRecord> {
    match s {
        Staged::File { tmp, record } => {
            tmp.commit()?;
            Ok(record)
        }
        Staged::Archive { new_dir, record } => {
            let dest = &record.destination;
            let name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let old = dest.with_file_name(format!(".{name}.tern-old"));
            let _ = std::fs::remove_dir_all(&old);
            if dest.exists() {
                std::fs::rename(dest, &old).map_err(Error::io(dest))?;
            }
            std::fs::rename(&new_dir, dest).map_err(Error::io(dest))?;
            if let Some(parent) = dest.parent() {
                tern_fs::sync_dir(parent)?;
            }
            let _ = std::fs::remove_dir_all(&old);
            Ok(record)
        }
    }
}

/// The payload's plaintext: `data` decrypted with `key` (each record released only after
/// its tag verified) and decompressed, as the manifest declares.
fn plaintext<'a>(
    data: &'a mut dyn Read,
    target: &str,
    key: Option<(&tern_core::keywrap::DataKey, &tern_core::manifest::Encryption)>,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>> {
    let refuse = |reason: String| Error::Decryption {
        target: target.to_owned(),
        reason,
    };
    let decrypted: Box<dyn Read + 'a> = match key {
        None => Box::new(data),
        Some((k, enc)) => {
            let d =
                tern_core::stream_aead::Decryptor::new(data, &k.record_key()[..]).map_err(|e| refuse(e.to_string()))?;
            if d.record_size() != enc.record_size as usize {
                return Err(refuse(format!(
                    "the payload's records are {} bytes, its signed manifest says {}",
                    d.record_size(),
                    enc.record_size
                )));
            }
            Box::new(d)
        }
    };
    Ok(match compression {
        Compression::None => decrypted,
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(decrypted).map_err(|e| Error::Unsupported {
                target: target.to_owned(),
                reason: format!("zstd: {e}"),
            })?,
        ),
    })
}

/// An error while reading a payload: a record that failed authentication is a decryption
/// error of the payload, anything else an I/O error at `path`.
fn read_error(target: &str, path: &Path, e: std::io::Error) -> Error {
    match e
        .get_ref()
        .and_then(|i| i.downcast_ref::<tern_core::stream_aead::StreamError>())
    {
        Some(s) => Error::Decryption {
            target: target.to_owned(),
            reason: s.to_string(),
        },
        None => Error::io(path)(e),
    }
}

/// Step 7: write `data` into `device` from offset 0, decrypting and decompressing as
/// declared; returns the image length and its SHA-256 (`None` when the caller knows it
/// already, `image_known`: a plain payload is the signed bytes, whose hashes the bundle
/// reader checks; an encrypted one carries its image digest sealed).
///
/// Reading (the bundle reader's hashing, decryption, decompression) happens on this
/// thread; writing, and hashing the image when it differs from the signed bytes, on
/// another, with a few 1 MiB buffers between them: the work overlaps, memory stays flat.
fn stream_into(
    device: &Path,
    data: &mut dyn Read,
    target: &str,
    key: Option<(&tern_core::keywrap::DataKey, &tern_core::manifest::Encryption)>,
    compression: Compression,
    image_known: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, Option<String>)> {
    let f = OpenOptions::new().write(true).open(device).map_err(Error::io(device))?;
    let need = !image_known;
    let mut source = plaintext(data, target, key, compression)?;
    let (written, result) = std::thread::scope(|scope| {
        type Buf = std::sync::Arc<Vec<u8>>;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Buf>(4);
        let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        // Whichever of writer and hasher is done with a buffer last hands it back.
        let give_back = |back: &std::sync::mpsc::SyncSender<Vec<u8>>, buf: Buf| {
            if let Some(v) = std::sync::Arc::into_inner(buf) {
                let _ = back.try_send(v);
            }
        };
        // The image's hash, when it is not the signed bytes' (decrypted or decompressed),
        // on a thread of its own: hashing, reading and writing overlap.
        let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<Buf>(4);
        let hash_back = back_tx.clone();
        let hasher = scope.spawn(move || -> Option<String> {
            let mut digest = Digester::new(&[HashAlgorithm::Sha256]);
            for buf in hash_rx {
                digest.update(&buf);
                give_back(&hash_back, buf);
            }
            Some(digest.finish().1.get("sha256").cloned().unwrap_or_default())
        });
        // A third thread flushes what was written so far while the writer goes on, so the
        // final fsync does not wait for the whole image and writing never stops to flush.
        let syncer_file = f.try_clone();
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let syncer = scope.spawn(move || -> std::io::Result<()> {
            let f = syncer_file?;
            for () in sync_rx {
                f.sync_data()?;
            }
            Ok(())
        });
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut f = f;
            let mut unsynced = 0usize;
            for buf in rx {
                f.write_all(&buf)?;
                unsynced += buf.len();
                if unsynced >= SYNC_EVERY {
                    // A flush request; if one is still running, the next covers this too.
                    let _ = sync_tx.try_send(());
                    unsynced = 0;
                }
                give_back(&back_tx, buf);
            }
            drop(sync_tx);
            f.sync_all()
        });
        let mut total = 0u64;
        let hash_tx = need.then_some(hash_tx);
        let read = (|| -> std::io::Result<()> {
            loop {
                let mut buf = back_rx.try_recv().unwrap_or_default();
                buf.resize(CHUNK, 0);
                let n = read_full(&mut source, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                progress(n as u64);
                total += n as u64;
                let buf = std::sync::Arc::new(buf);
                if let Some(h) = &hash_tx {
                    let _ = h.send(buf.clone());
                }
                if tx.send(buf).is_err() {
                    // The writer stopped: its error is the one to report.
                    return Ok(());
                }
            }
        })();
        drop(tx);
        let hashed = hash_tx.is_some();
        drop(hash_tx);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")));
        let synced = syncer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")));
        let digest = hasher.join();
        (
            total,
            read.map_err(|e| read_error(target, device, e)).and_then(|()| {
                synced.map_err(Error::io(device))?;
                wrote.map_err(Error::io(device))?;
                match (hashed, digest) {
                    (false, _) => Ok(None),
                    (true, Ok(Some(d))) => Ok(Some(d)),
                    (true, _) => Err(Error::io(device)(std::io::Error::other(
                        "the image hashing thread failed",
                    ))),
                }
            }),
        )
    });
    let image_sha256 = result?;
    Ok((written, image_sha256))
}

/// Fill `buf` as far as the source allows (short only at the end).
fn read_full(from: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn copy(from: &mut dyn Read, to: &mut dyn Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// SHA-256 of the first `length` bytes of a slot (what the power-cut test and `agent
/// status --verify` compare with the record).
pub fn slot_digest(device: &Path, length: u64) -> Result<String> {
    let f = std::fs::File::open(device).map_err(Error::io(device))?;
    let mut d = Digester::new(&[HashAlgorithm::Sha256]);
    let mut r = f.take(length);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).map_err(Error::io(device))?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    let (n, h) = d.finish();
    if n != length {
        return Err(Error::State {
            path: device.to_owned(),
            reason: format!("slot holds {n} bytes, record says {length}"),
        });
    }
    Ok(h.get("sha256").cloned().unwrap_or_default())
}

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
            installed_at: Some(now_unix(now)),
        },
    );
}
