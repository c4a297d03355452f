//! The TUF client's trusted metadata, updated one document at a time (specification §5).
//!
//! This is the pure half of the network client: it takes metadata bytes and answers whether
//! they become trusted, in the specification's order. The I/O half (tern-client) decides what
//! to fetch, persists what this accepts, and drives the delegation search.
//!
//! Local copies loaded at start-up go through the same checks as downloaded ones, so an
//! expired or rotated-away local file is not trusted; as in python-tuf, an expired local
//! timestamp or snapshot is still kept as the reference for rollback checks (§5.4.3, §5.5.5)
//! and only refused as *final* metadata.

use std::collections::BTreeMap;

use crate::delegation::Candidate;
use crate::error::{Error, Result};
use crate::metadata::{Envelope, MetaFile, RoleType, Root, Signed, Snapshot, Targets, Timestamp};
use crate::timefmt::DateTime;
use crate::trust::{check_expiry as expired, check_meta, top_role as role_keys};
use crate::verify::verify_threshold;

/// Outcome of offering a timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampUpdate {
    /// It is newer and is now trusted.
    Updated,
    /// It has the trusted version: nothing changed (§5.4.3.1: normal, not an error).
    Unchanged,
}

/// Which trusted files a root update invalidates (§5.3.11, fast-forward attack recovery).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotated {
    /// Timestamp or snapshot keys changed: delete the trusted timestamp and snapshot.
    pub timestamp_and_snapshot: bool,
    /// Targets keys changed: delete the trusted top-level targets.
    pub targets: bool,
}

/// The trusted metadata of one update cycle, at one fixed reference time (§5.1).
#[derive(Debug)]
pub struct TrustedSet {
    now: DateTime,
    root: Signed<Root>,
    timestamp: Option<Signed<Timestamp>>,
    snapshot: Option<Signed<Snapshot>>,
    targets: Option<Signed<Targets>>,
    /// Delegated roles by their delegation chain (`["targets", "a", "b"]` is role `b` as
    /// delegated by `a` as delegated by top-level targets): a role is trusted through the
    /// exact chain of documents that verified it, never because a role, or a delegator, of
    /// that name was loaded before through another path.
    delegated: BTreeMap<Vec<String>, Signed<Targets>>,
    /// The keys each delegated role was verified with ([`crate::floors::key_set`]).
    delegated_keys: BTreeMap<Vec<String>, Vec<String>>,
}

fn verify_top<T: RoleType>(role: &str, bytes: &[u8], root: &Root) -> Result<Signed<T>> {
    let envelope = Envelope::parse(role, bytes)?;
    let keys = role_keys(root, role)?;
    verify_threshold(role, &envelope, &root.keys, &keys.keyids, keys.threshold)?;
    Signed::from_envelope(role, envelope)
}

impl TrustedSet {
    /// §5.1–5.2: start from the trusted root (whose expiry does not matter yet). It must be
    /// signed by a threshold of its own root keys.
    pub fn new(root: &[u8], now: DateTime) -> Result<Self> {
        let root = crate::trust::load_trusted_root(root)?;
        Ok(TrustedSet {
            now,
            root,
            timestamp: None,
            snapshot: None,
            targets: None,
            delegated: BTreeMap::new(),
            delegated_keys: BTreeMap::new(),
        })
    }

    /// The reference time.
    pub fn now(&self) -> DateTime {
        self.now
    }

    /// The trusted root.
    pub fn root(&self) -> &Signed<Root> {
        &self.root
    }

    /// The trusted timestamp.
    pub fn timestamp(&self) -> Option<&Signed<Timestamp>> {
        self.timestamp.as_ref()
    }

    /// The trusted snapshot.
    pub fn snapshot(&self) -> Option<&Signed<Snapshot>> {
        self.snapshot.as_ref()
    }

    /// The trusted top-level targets.
    pub fn targets(&self) -> Option<&Signed<Targets>> {
        self.targets.as_ref()
    }

    /// A targets role by its delegation chain (`["targets"]` is the top-level role).
    pub fn get(&self, chain: &[String]) -> Option<&Signed<Targets>> {
        match chain {
            [top] if top == "targets" => self.targets.as_ref(),
            _ => self.delegated.get(chain),
        }
    }

    /// The version of every role trusted so far with the keys that verified it, for the
    /// device's version floors (`crate::floors`), named as
    /// `crate::TrustedRepository::role_versions` names them.
    pub fn role_versions(&self) -> Vec<crate::floors::RoleVersion> {
        use crate::floors::{key_set, RoleVersion};
        let top = |name: &str, version: Option<u64>| {
            let keys = role_keys(&self.root.signed, name).ok()?;
            Some(RoleVersion {
                role: name.to_owned(),
                version: version?,
                keys: key_set(&keys.keyids),
            })
        };
        let mut out: Vec<RoleVersion> = [
            top("root", Some(self.root.version())),
            top("timestamp", self.timestamp.as_ref().map(|t| t.version())),
            top("snapshot", self.snapshot.as_ref().map(|t| t.version())),
            top("targets", self.targets.as_ref().map(|t| t.version())),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (chain, role) in &self.delegated {
            out.push(RoleVersion {
                role: format!("delegated/{}", chain.last().map(String::as_str).unwrap_or("")),
                version: role.version(),
                keys: self.delegated_keys.get(chain).cloned().unwrap_or_default(),
            });
        }
        out
    }

    /// §5.3.4–5.3.7: accept the next root version.
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<()> {
        if self.timestamp.is_some() {
            return Err(Error::field("root", "", "cannot update root after timestamp"));
        }
        self.root = crate::trust::update_root(&self.root, bytes)?;
        Ok(())
    }

    /// §5.3.11: which trusted files the key changes since `initial` invalidate.
    pub fn rotated_since(&self, initial: &Root) -> Rotated {
        let keys = |root: &Root, role: &str| {
            root.role(role).map(|r| {
                let mut ids = r.keyids.clone();
                ids.sort();
                (ids, r.threshold)
            })
        };
        let changed = |role: &str| keys(initial, role) != keys(&self.root.signed, role);
        Rotated {
            timestamp_and_snapshot: changed("timestamp") || changed("snapshot"),
            targets: changed("targets"),
        }
    }

    /// §5.3.10: the final root must not have expired.
    pub fn check_root_expiry(&self) -> Result<()> {
        expired("root", &self.root, self.now)
    }

    /// §5.4: offer a timestamp (local copy first, then the downloaded one).
    pub fn update_timestamp(&mut self, bytes: &[u8]) -> Result<TimestampUpdate> {
        if self.snapshot.is_some() {
            return Err(Error::field("timestamp", "", "cannot update timestamp after snapshot"));
        }
        // 5.3.10 again: nothing is trusted under an expired root.
        expired("root", &self.root, self.now)?;
        // 5.4.2: signatures.
        let new: Signed<Timestamp> = verify_top("timestamp", bytes, &self.root.signed)?;
        // 5.4.3: rollback.
        if let Some(trusted) = &self.timestamp {
            if new.version() < trusted.version() {
                return Err(Error::Rollback {
                    role: "timestamp".into(),
                    trusted: trusted.version(),
                    found: new.version(),
                });
            }
            if new.version() == trusted.version() {
                return Ok(TimestampUpdate::Unchanged);
            }
            let (old_snap, new_snap) = (
                trusted.signed.snapshot_meta().map_or(0, |m| m.version),
                new.signed.snapshot_meta().map_or(0, |m| m.version),
            );
            if new_snap < old_snap {
                return Err(Error::Rollback {
                    role: "snapshot".into(),
                    trusted: old_snap,
                    found: new_snap,
                });
            }
        }
        // Kept even when expired, as the reference for the next rollback check; 5.4.4 refuses
        // it as final.
        self.timestamp = Some(new);
        self.check_final_timestamp()?;
        Ok(TimestampUpdate::Updated)
    }

    fn check_final_timestamp(&self) -> Result<&Signed<Timestamp>> {
        let ts = self.timestamp.as_ref().ok_or_else(|| Error::MissingRole {
            role: "timestamp".into(),
        })?;
        expired("timestamp", ts, self.now)?;
        Ok(ts)
    }

    /// The snapshot entry of the trusted timestamp.
    pub fn snapshot_meta(&self) -> Result<&MetaFile> {
        self.check_final_timestamp()?
            .signed
            .snapshot_meta()
            .ok_or_else(|| Error::field("timestamp", "meta", "no `snapshot.json`"))
    }

    /// §5.5: offer a snapshot. `local` copies were hash-checked when first downloaded and are
    /// not checked against the timestamp's hashes again (they may predate it).
    pub fn update_snapshot(&mut self, bytes: &[u8], local: bool) -> Result<()> {
        if self.targets.is_some() {
            return Err(Error::field("snapshot", "", "cannot update snapshot after targets"));
        }
        let meta = self.snapshot_meta()?.clone();
        // 5.5.2: hashes from timestamp.
        if !local {
            check_meta("snapshot", bytes, &meta)?;
        }
        // 5.5.3: signatures.
        let new: Signed<Snapshot> = verify_top("snapshot", bytes, &self.root.signed)?;
        // 5.5.5: no role version rolls back, no role disappears.
        if let Some(trusted) = &self.snapshot {
            for (name, old) in &trusted.signed.meta {
                let Some(now) = new.signed.meta.get(name) else {
                    return Err(Error::field(
                        "snapshot",
                        format!("meta.{name}"),
                        "listed by the trusted snapshot but missing",
                    ));
                };
                if now.version < old.version {
                    return Err(Error::Rollback {
                        role: name.trim_end_matches(".json").to_owned(),
                        trusted: old.version,
                        found: now.version,
                    });
                }
            }
        }
        self.snapshot = Some(new);
        self.check_final_snapshot()?;
        Ok(())
    }

    fn check_final_snapshot(&self) -> Result<&Signed<Snapshot>> {
        let snap = self.snapshot.as_ref().ok_or_else(|| Error::MissingRole {
            role: "snapshot".into(),
        })?;
        // 5.5.6: expiry; 5.5.4: the version the timestamp names.
        expired("snapshot", snap, self.now)?;
        let expected = self.snapshot_meta()?.version;
        if snap.version() != expected {
            return Err(Error::VersionMismatch {
                role: "snapshot".into(),
                expected,
                found: snap.version(),
            });
        }
        Ok(snap)
    }

    /// The snapshot's entry for a targets role.
    pub fn role_meta(&self, role: &str) -> Result<&MetaFile> {
        self.check_final_snapshot()?
            .signed
            .meta
            .get(&format!("{role}.json"))
            .ok_or_else(|| Error::field("snapshot", "meta", format!("`{role}.json` is not listed")))
    }

    /// §5.6.1–5.6.5: offer the top-level targets.
    pub fn update_targets(&mut self, bytes: &[u8]) -> Result<()> {
        let meta = self.role_meta("targets")?.clone();
        // 5.6.2: hashes and length from snapshot.
        check_meta("targets", bytes, &meta)?;
        // 5.6.3: signatures.
        let new: Signed<Targets> = verify_top("targets", bytes, &self.root.signed)?;
        // 5.6.4: the version snapshot names.
        if new.version() != meta.version {
            return Err(Error::VersionMismatch {
                role: "targets".into(),
                expected: meta.version,
                found: new.version(),
            });
        }
        // 5.6.5: expiry.
        expired("targets", &new, self.now)?;
        self.targets = Some(new);
        Ok(())
    }

    /// §5.6 for a delegated role: offer `candidate`'s metadata as delegated by the role at
    /// `parent` (a chain starting with `"targets"`).
    pub fn update_delegated(&mut self, bytes: &[u8], candidate: &Candidate, parent: &[String]) -> Result<()> {
        let role = candidate.name.as_str();
        let meta = self.role_meta(role)?.clone();
        check_meta(role, bytes, &meta)?;
        let delegator = parent.last().map(String::as_str).unwrap_or("targets");
        let parent_role = self.get(parent).ok_or_else(|| Error::MissingRole {
            role: delegator.to_owned(),
        })?;
        let keys = &parent_role
            .signed
            .delegations
            .as_ref()
            .ok_or_else(|| Error::MissingRole { role: role.to_owned() })?
            .keys;
        let envelope = Envelope::parse(role, bytes)?;
        verify_threshold(role, &envelope, keys, &candidate.keyids, candidate.threshold)?;
        let new: Signed<Targets> = Signed::from_envelope(role, envelope)?;
        if new.version() != meta.version {
            return Err(Error::VersionMismatch {
                role: role.to_owned(),
                expected: meta.version,
                found: new.version(),
            });
        }
        expired(role, &new, self.now)?;
        let mut chain = parent.to_vec();
        chain.push(role.to_owned());
        self.delegated_keys
            .insert(chain.clone(), crate::floors::key_set(&candidate.keyids));
        self.delegated.insert(chain, new);
        Ok(())
    }
}
