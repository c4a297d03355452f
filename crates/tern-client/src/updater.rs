//! The specification's detailed client workflow (§5), one function per step group.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tern_core::delegation::Candidate;
use tern_core::trusted_set::{TimestampUpdate, TrustedSet};
use tern_core::{DateTime, TargetFile, TargetPath};

use crate::store::{encode, MetadataDir};
use crate::transport::fetch_bounded;
use crate::{Error, Limits, Result, Transport};

/// A target the delegation search found.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetInfo {
    /// Its validated path.
    pub path: TargetPath,
    /// What the trusted role lists.
    pub file: TargetFile,
    /// The role that listed it.
    pub role: String,
}

/// One update cycle against one repository.
pub struct Updater<'t> {
    dir: MetadataDir,
    metadata_base: String,
    transport: &'t dyn Transport,
    pub(crate) limits: Limits,
    pub(crate) trusted: TrustedSet,
    refreshed: bool,
}

fn with_slash(url: &str) -> String {
    if url.ends_with('/') || url.ends_with('#') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

impl<'t> Updater<'t> {
    /// Install `root` as the trust anchor of `dir`. No network request is made. The root must
    /// be signed by its own threshold; its expiry does not matter (the next refresh updates it).
    pub fn init(dir: &Path, root: &[u8]) -> Result<()> {
        tern_core::trust::load_trusted_root(root)?;
        MetadataDir::new(dir).write("root", root)
    }

    /// §5.1–5.2: fix the update start time `now` and load the trusted root from `dir`.
    pub fn new(
        dir: &Path,
        metadata_base: &str,
        transport: &'t dyn Transport,
        limits: Limits,
        now: DateTime,
    ) -> Result<Self> {
        let md = MetadataDir::new(dir);
        let root = md
            .read("root", limits.root_max)?
            .ok_or_else(|| Error::NotInitialised { dir: dir.to_owned() })?;
        let trusted = TrustedSet::new(&root, now)?;
        Ok(Updater {
            dir: md,
            metadata_base: with_slash(metadata_base),
            transport,
            limits,
            trusted,
            refreshed: false,
        })
    }

    /// The trusted metadata as it stands.
    pub fn trusted(&self) -> &TrustedSet {
        &self.trusted
    }

    fn url(&self, role: &str, version: Option<u64>) -> String {
        match version {
            Some(v) => format!("{}{v}.{}.json", self.metadata_base, encode(role)),
            None => format!("{}{}.json", self.metadata_base, encode(role)),
        }
    }

    fn fetch(&self, role: &str, version: Option<u64>, limit: u64) -> Result<Vec<u8>> {
        Ok(fetch_bounded(
            self.transport,
            &self.url(role, version),
            limit,
            &self.limits,
        )?)
    }

    /// §5.3.12: versioned file names when the trusted root says so.
    fn consistent(&self) -> bool {
        self.trusted.root().signed.consistent_snapshot
    }

    /// §5.3–5.6.6: update root, timestamp, snapshot and top-level targets.
    pub fn refresh(&mut self) -> Result<()> {
        self.update_root()?;
        self.update_timestamp()?;
        self.update_snapshot()?;
        self.update_targets()?;
        self.refreshed = true;
        Ok(())
    }

    /// §5.3: the root update loop.
    fn update_root(&mut self) -> Result<()> {
        for _ in 0..self.limits.max_root_rotations {
            // 5.3.2–5.3.3: try N+1; only "not found" ends the loop, any other failure aborts.
            let next = self.trusted.root().version() + 1;
            let bytes = match self.fetch("root", Some(next), self.limits.root_max) {
                Ok(b) => b,
                Err(Error::Transport(e)) if e.is_not_found() => break,
                Err(e) => return Err(e),
            };
            let previous = self.trusted.root().signed.clone();
            // 5.3.4–5.3.7: signed by old and new thresholds, version exactly N+1.
            self.trusted.update_root(&bytes)?;
            // 5.3.11, per version and before the new root is persisted: if this update stops
            // here (a failure fetching N+2, a power cut), what is on disk still matches the
            // root on disk, and the recovery from a fast-forward attack is not lost.
            let rotated = self.trusted.rotated_since(&previous);
            if rotated.timestamp_and_snapshot {
                self.dir.remove("timestamp")?;
                self.dir.remove("snapshot")?;
            }
            if rotated.targets {
                self.dir.remove("targets")?;
            }
            // 5.3.8: persist.
            self.dir.write("root", &bytes)?;
        }
        // 5.3.10: freeze attack.
        self.trusted.check_root_expiry()?;
        Ok(())
    }

    /// §5.4: timestamp. The local copy, if it verifies, is the reference for rollback checks.
    fn update_timestamp(&mut self) -> Result<()> {
        if let Some(local) = self.dir.read("timestamp", self.limits.timestamp_max)? {
            // An expired or rotated-away local copy is no error here: at worst it is not a reference.
            let _ = self.trusted.update_timestamp(&local);
        }
        // 5.4.1: download, up to X bytes.
        let bytes = self.fetch("timestamp", None, self.limits.timestamp_max)?;
        // 5.4.2–5.4.4: signatures, rollback, freeze.
        match self.trusted.update_timestamp(&bytes)? {
            // 5.4.3.1: the same version: nothing changed.
            TimestampUpdate::Unchanged => Ok(()),
            // 5.4.5: persist.
            TimestampUpdate::Updated => self.dir.write("timestamp", &bytes),
        }
    }

    /// §5.5: snapshot. A local copy that is the version timestamp names is used as is.
    fn update_snapshot(&mut self) -> Result<()> {
        if let Some(local) = self.dir.read("snapshot", self.limits.snapshot_max)? {
            if self.trusted.update_snapshot(&local, true).is_ok() {
                return Ok(());
            }
        }
        // 5.5.1: download N.snapshot.json, up to the length timestamp lists (or Y).
        let meta = self.trusted.snapshot_meta()?.clone();
        let limit = meta
            .length
            .unwrap_or(self.limits.snapshot_max)
            .min(tern_core::metadata::MAX_METADATA_BYTES as u64);
        let bytes = self.fetch("snapshot", self.consistent().then_some(meta.version), limit)?;
        // 5.5.2–5.5.6: hashes, signatures, version, rollback, freeze.
        self.trusted.update_snapshot(&bytes, false)?;
        // 5.5.7: persist.
        self.dir.write("snapshot", &bytes)
    }

    /// §5.6.1–5.6.6: top-level targets.
    fn update_targets(&mut self) -> Result<()> {
        if let Some(local) = self.dir.read("targets", self.limits.targets_max)? {
            if self.trusted.update_targets(&local).is_ok() {
                return Ok(());
            }
        }
        // 5.6.1: download N.targets.json, up to the length snapshot lists (or Z).
        let meta = self.trusted.role_meta("targets")?.clone();
        let limit = meta
            .length
            .unwrap_or(self.limits.targets_max)
            .min(tern_core::metadata::MAX_METADATA_BYTES as u64);
        let bytes = self.fetch("targets", self.consistent().then_some(meta.version), limit)?;
        // 5.6.2–5.6.5: hashes, signatures, version, freeze.
        self.trusted.update_targets(&bytes)?;
        // 5.6.6: persist.
        self.dir.write("targets", &bytes)
    }

    /// A delegated role, as delegated by the role at `parent` (a delegation chain): the local
    /// copy if it verifies through this chain, else downloaded.
    fn update_delegated(&mut self, parent: &[String], candidate: &Candidate) -> Result<()> {
        let role = candidate.name.as_str();
        let mut chain = parent.to_vec();
        chain.push(role.to_owned());
        if self.trusted.get(&chain).is_some() {
            return Ok(());
        }
        if let Some(local) = self.dir.read(role, self.limits.targets_max)? {
            if self.trusted.update_delegated(&local, candidate, parent).is_ok() {
                return Ok(());
            }
        }
        let meta = self.trusted.role_meta(role)?.clone();
        let limit = meta
            .length
            .unwrap_or(self.limits.targets_max)
            .min(tern_core::metadata::MAX_METADATA_BYTES as u64);
        let bytes = self.fetch(role, self.consistent().then_some(meta.version), limit)?;
        self.trusted.update_delegated(&bytes, candidate, parent)?;
        self.dir.write(role, &bytes)
    }

    /// §5.6.7: pre-order depth-first search of the delegations for `name`; delegated roles
    /// are fetched only when the search reaches them.
    pub fn get_target(&mut self, name: &str) -> Result<TargetInfo> {
        let path = TargetPath::new(name)?;
        if !self.refreshed {
            self.refresh()?;
        }
        struct Visit {
            /// The role's delegation chain, `["targets", …, role]`.
            chain: Vec<String>,
            candidate: Option<Candidate>,
        }
        let mut stack = vec![Visit {
            chain: vec!["targets".into()],
            candidate: None,
        }];
        let mut visited: BTreeSet<Vec<String>> = BTreeSet::new();
        while let Some(v) = stack.pop() {
            // 5.6.7.1: skip roles already visited (cycles); stop at the bound. A cycle through
            // different delegators grows the chain instead, so its length is bounded too.
            if visited.contains(&v.chain) {
                continue;
            }
            if visited.len() >= self.limits.max_delegations || v.chain.len() > self.limits.max_delegations {
                break;
            }
            if let Some(candidate) = &v.candidate {
                self.update_delegated(&v.chain[..v.chain.len() - 1], candidate)?;
            }
            let role_name = v.chain.last().cloned().unwrap_or_default();
            let role = self
                .trusted
                .get(&v.chain)
                .ok_or_else(|| tern_core::Error::MissingRole {
                    role: role_name.clone(),
                })?;
            if let Some(file) = role.signed.targets.get(name) {
                return Ok(TargetInfo {
                    path,
                    file: file.clone(),
                    role: role_name,
                });
            }
            visited.insert(v.chain.clone());
            // 5.6.7.2: the delegations in order; a terminating one ends the search below it.
            let Some(delegations) = &role.signed.delegations else {
                continue;
            };
            let mut children = Vec::new();
            for candidate in delegations.roles_for_target(name) {
                let terminating = candidate.terminating;
                let mut chain = v.chain.clone();
                chain.push(candidate.name.clone());
                children.push(Visit {
                    chain,
                    candidate: Some(candidate),
                });
                if terminating {
                    stack.clear();
                    break;
                }
            }
            children.reverse();
            stack.extend(children);
        }
        Err(tern_core::Error::TargetNotFound {
            target: name.to_owned(),
        }
        .into())
    }

    /// §5.7: download a target into `target_dir` (see [`crate::download`]).
    pub fn download_target(&self, info: &TargetInfo, target_dir: &Path, target_base: &str) -> Result<PathBuf> {
        crate::download::download(self, info, target_dir, &with_slash(target_base), &mut |_, _| {})
    }

    /// As [`Updater::download_target`], calling `progress(bytes_done, length)` as it goes.
    pub fn download_target_progress(
        &self,
        info: &TargetInfo,
        target_dir: &Path,
        target_base: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PathBuf> {
        crate::download::download(self, info, target_dir, &with_slash(target_base), progress)
    }

    /// The file `info` is (or will be) downloaded to: the percent-encoded target path.
    pub fn target_file(info: &TargetInfo, target_dir: &Path) -> PathBuf {
        target_dir.join(encode(info.path.as_str()))
    }

    pub(crate) fn transport(&self) -> &dyn Transport {
        self.transport
    }

    pub(crate) fn consistent_snapshot(&self) -> bool {
        self.consistent()
    }
}
