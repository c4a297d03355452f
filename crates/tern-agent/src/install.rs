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

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tern_core::manifest::{Compression, Installer, Manifest};
use tern_core::trust::Freshness;
use tern_core::DateTime;

use crate::bootloader::Bootloader;
use crate::config::{AgentConfig, OfflineInstall, SlotConfig};
use crate::state::{AgentState, ErrorRecord, Failed, Idle, Phase, Release, RolledBack, SlotRecord, Store, Trial};
use crate::{hooks, Error, Result};

use crate::apps::{self, Staged};
pub use crate::status::{record_factory_slot, status, SlotStatus, Status};
pub use crate::stream::slot_digest;
use crate::stream::{plaintext, stream_into, Decoding};

const CHUNK: usize = 1 << 20;

/// Where a bundle came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Local media (USB, an inbox directory): the configured offline policy applies.
    LocalMedia,
    /// Fetched over the network: snapshot and timestamp are always required.
    Network,
}

/// Open a bundle that must be a regular file. The open does not block (a FIFO with no
/// writer would hold the agent, and its state lock, for ever) and the file's type is
/// checked on the open descriptor, so nothing can be swapped in between.
fn open_regular(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(Error::io(path))?;
    if !f.metadata().map_err(Error::io(path))?.is_file() {
        return Err(Error::NotARegularFile { path: path.to_owned() });
    }
    Ok(f)
}

/// `path` with its longest existing prefix resolved (links followed) and the rest, which
/// does not exist yet, appended as it is.
fn resolve_existing(path: &Path) -> std::io::Result<PathBuf> {
    let mut missing = Vec::new();
    let mut at = path.to_owned();
    loop {
        match std::fs::canonicalize(&at) {
            Ok(real) => {
                let mut out = real;
                for part in missing.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (at.parent(), at.file_name()) else {
                    return Err(e);
                };
                missing.push(name.to_owned());
                at = parent.to_owned();
            }
            Err(e) => return Err(e),
        }
    }
}

/// The version of a root document that verifies against itself.
pub fn root_version(bytes: &[u8]) -> Option<u64> {
    tern_core::trust::load_trusted_root(bytes).ok().map(|r| r.version())
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
    /// The local-media offer being installed: recorded as handled with the state that
    /// precedes the reboot (or that ends an install needing none).
    offer: Option<crate::state::OfferId>,
}

fn now_unix(now: DateTime) -> i64 {
    now.unix()
}

impl Agent {
    /// Lock the state directory and open the bootloader.
    pub fn open(cfg: AgentConfig) -> Result<Self> {
        let store = Store::open(&cfg.state_dir)?;
        let state = store.load()?;
        apps::recover_archive_swaps(&state.apps);
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
            offer: None,
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
            message: tern_core::text::shown_max(message, 2048),
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

    /// [`Agent::install`] of a local-media offer, which is recorded as handled in the same
    /// atomic write as `PendingReboot` (before the reboot hook can reboot), or in the last
    /// write of an install that needs no reboot.
    pub fn install_offer(
        &mut self,
        offer: &crate::source::Offer,
        now: DateTime,
        progress: &mut dyn FnMut(u64),
    ) -> Result<InstallReport> {
        self.offer = Some(offer.id.clone());
        let r = self.install_from(&offer.bundle, Origin::LocalMedia, now, progress);
        self.offer = None;
        r
    }

    /// Record a local-media offer as handled (it was refused, or its file could not be
    /// renamed), so that it is not offered again.
    pub fn offer_handled(&mut self, offer: &crate::source::Offer) -> Result<()> {
        if self.state.handled_offers.contains(&offer.id) {
            return Ok(());
        }
        self.state.handled(offer.id.clone());
        self.save()
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
        tracing::info!(step = 1, bundle = %tern_core::text::shown(&bundle.display().to_string()), "install: a bundle");
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
        let file = open_regular(bundle)?;
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
        // Compared with the root the client ended with, which becomes the anchor if newer.
        let root = self.trust_anchor()?;
        let label = payloads
            .iter()
            .map(|(p, _)| p.target.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        self.install_payloads(&label, root, now, progress, |_, sink| {
            for (payload, path) in payloads {
                // Hashed again as it streams into the slot: the file was checked when it was
                // downloaded, but it sat on disk since, where anything may have changed it.
                let mut file = std::fs::File::open(path).map_err(Error::io(path))?;
                tern_bundle::feed_payload(payload, &mut file, sink).map_err(Error::Bundle)?;
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
        let mut sink = |payload: &tern_bundle::VerifiedPayload,
                        data: &mut dyn Read|
         -> std::result::Result<(), String> {
            // The root chain verified: persist the newest root before anything else.
            if !anchor_saved
                && payload.root.as_slice() != root.as_slice()
                && root_version(&payload.root) > root_version(&root)
            {
                tern_fs::atomic_write(&anchor_path, &payload.root, 0o644).map_err(|e| {
                    let msg = e.to_string();
                    failure = Some(e.into());
                    msg
                })?;
            }
            anchor_saved = true;
            tracing::info!(step = 2, target = %tern_core::text::shown(&payload.target), "install: metadata verified");
            // Older metadata than this device verified before, from any source, stops
            // here; otherwise the floors rise to what just verified.
            if let Err(e) = crate::floors::check_and_raise(&self.cfg, &payload.roles) {
                let msg = e.to_string();
                failure = Some(e);
                return Err(msg);
            }
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
        if verified.is_ok() && failure.is_none() {
            tracing::info!(step = 8, "install: lengths and hashes match the signed ones");
        }
        match (verified, failure) {
            (_, Some(e)) => {
                apps::discard(staged);
                return Err(self.fail_install(e, now));
            }
            (Err(e), None) => {
                apps::discard(staged);
                return Err(self.fail_install(e, now));
            }
            (Ok(()), None) => {}
        };
        // Files and archives go in place now that everything verified.
        let mut applied = Vec::new();
        for s in staged {
            let record = apps::apply(s)?;
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
            if let Some(o) = self.offer.take() {
                self.state.handled(o);
            }
            self.save()?;
            return Ok(InstallReport {
                slot_image: None,
                applied,
                reboot_needed: false,
            });
        };
        // 9.
        tracing::info!(step = 9, slot = %slot.name, version = %tern_core::text::shown(&release.version), "install: slot recorded");
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
                payload_sha256: Some(release.payload_sha256.clone()),
            },
        );
        let verified_state = t.verified();
        self.state.phase = Phase::Verified(verified_state.clone());
        self.save()?;
        // 10.
        tracing::info!(step = 10, "install: post-install hook");
        let env = self.hook_env(Some(&release), Some(&slot));
        if let Err(e) = self.hook("post-install", self.cfg.hooks.post_install.clone().as_ref(), &env) {
            return Err(self.fail_install(e, now));
        }
        // 11. PendingReboot is persisted first: a cut after it, before `set_primary`, leaves
        // the slot non-bootable (0 attempts) and the next boot records that it did not run.
        let boot_id = self.boot.boot_id()?;
        self.state.phase = Phase::PendingReboot(verified_state.clone().applied(booted, boot_id));
        self.state.last_error = None;
        let offer = self.offer.take();
        if let Some(o) = &offer {
            self.state.handled(o.clone());
        }
        self.save()?;
        tracing::info!(step = 11, slot = %slot.name, attempts = self.cfg.boot_attempts, "install: slot made primary");
        let primary = self.boot.set_primary(&slot.bootname, self.cfg.boot_attempts);
        self.crash_point();
        if let Err(e) = primary {
            // The offer was not installed after all: it may be offered again.
            if let Some(o) = &offer {
                self.state.handled_offers.retain(|h| h != o);
            }
            // It may have half-happened: make sure the slot cannot boot.
            let _ = self.boot.mark_bad(&slot.bootname);
            self.state.phase = Phase::Verified(verified_state);
            return Err(self.fail_install(e, now));
        }
        // 12.
        tracing::info!(step = 12, "install: reboot");
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
        // Where the path really leads: a symbolic link on the way must not take it out of
        // the install roots. The nearest part of it that exists is resolved; what is below
        // is made by the installer, as directories.
        let real = resolve_existing(&dest).map_err(Error::io(&dest))?;
        let real_inside = |root: &PathBuf| std::fs::canonicalize(root).is_ok_and(|r| real.starts_with(&r) && real != r);
        if !self.cfg.install_roots.iter().any(real_inside) {
            return Err(unsupported(&format!(
                "install_path {} leads to {}, outside this device's install_roots",
                dest.display(),
                real.display()
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
            &Decoding {
                target: &payload.target,
                key: data_key.as_ref().zip(m.encryption.as_ref()),
                compression: m.compression,
                limit: m.installed_length,
            },
        )?;
        apps::stage(m.installer, &mut input, &payload.target, record)
    }

    /// A failed install: if a slot was touched it stays non-bootable and is recorded bad.
    fn fail_install(&mut self, e: Error, now: DateTime) -> Error {
        // Escaped and bounded: the cause may quote a bundle's or a server's text.
        tracing::warn!("install failed: {}", tern_core::text::error_chain(&e, 1024));
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
        tracing::info!(step = 3, version = %tern_core::text::shown(&m.version), "install: compatibility and rollback floor");
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
        let signed_sha256 = payload.hashes.get("sha256").map(String::as_str).unwrap_or_default();
        if self
            .state
            .slots
            .get(&running.name)
            .is_some_and(|r| r.holds(&payload.target, signed_sha256))
        {
            return Err(Error::AlreadyInstalled {
                target: payload.target.clone(),
                slot: running.name.clone(),
            });
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
        tracing::info!(step = 4, slot = %slot.name, "install: inactive slot chosen");
        // 5.
        tracing::info!(step = 5, "install: pre-install hook");
        let env = self.hook_env(Some(&release), Some(&slot));
        self.hook("pre-install", self.cfg.hooks.pre_install.clone().as_ref(), &env)?;
        // 6.
        tracing::info!(step = 6, slot = %slot.name, "install: slot marked non-bootable");
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
                payload_sha256: None,
            },
        );
        self.state.phase = Phase::Transferring(Idle.transfer(release.clone(), slot.name.clone()));
        let _ = now;
        self.save()?;
        // 7.
        tracing::info!(step = 7, slot = %slot.name, "install: streaming the payload");
        let (written, image_sha256) = stream_into(
            &slot.device,
            data,
            &Decoding {
                target: &payload.target,
                key: data_key.as_ref().zip(m.encryption.as_ref()),
                compression: m.compression,
                limit: m.installed_length,
            },
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
                tracing::info!(step = 13, slot = %slot.name, "boot: health check passed, committing");
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
        tracing::warn!(step = 14, slot = %r.slot, reason = %r.reason, "boot: the bootloader fell back, rolling back");
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

/// An error with its causes, for the persisted record (and the reports made from it):
/// shortened and escaped, since causes may quote a bundle or a server.
fn error_chain(e: &dyn std::error::Error) -> String {
    tern_core::text::error_chain(e, 2048)
}
