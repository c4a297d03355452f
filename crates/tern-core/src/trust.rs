//! Verifying a repository's metadata from a trusted root, in the specification's order.
//!
//! [`TrustedRepository::load`] runs the root rotation loop and the timestamp → snapshot →
//! targets chain of the specification's client workflow (section 5) over metadata bytes a
//! [`MetadataSource`] hands it; [`TrustedRepository::find_target`] runs the delegation
//! search (5.6.7). The core does no I/O: the source is a directory, a bundle or, later, the
//! network client's cache, implemented above this crate.

use std::collections::BTreeMap;

use crate::digest;
use crate::error::{Error, Result};
use crate::keys::{KeyId, PublicKey};
use crate::metadata::{Envelope, MetaFile, RoleType, Root, Signed, Snapshot, TargetFile, Targets, Timestamp};
use crate::target::TargetPath;
use crate::timefmt::DateTime;
use crate::verify::verify_threshold;

/// Most root versions one update walks through (python-tuf uses 256 too).
pub const MAX_ROOT_ROTATIONS: u64 = 256;
/// Most delegated roles one target search visits (python-tuf's default is 32).
pub const MAX_DELEGATIONS: usize = 32;

/// Metadata bytes by role name and version.
pub trait MetadataSource {
    /// `role` at `version` (`None`: the current, unversioned document). `None` when absent.
    fn fetch(&mut self, role: &str, version: Option<u64>) -> Option<Vec<u8>>;
}

/// Whether snapshot and timestamp metadata must be present.
///
/// On the network path they always must. For an offline bundle they are checked when
/// present; whether a device accepts bundles without them is its configured policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Timestamp and snapshot are required and verified.
    Required,
    /// Timestamp and snapshot are verified when the source has a timestamp.
    IfPresent,
}

/// A target found by the delegation search.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundTarget {
    /// Its validated path.
    pub path: TargetPath,
    /// What the trusted role lists for it.
    pub file: TargetFile,
    /// The role that listed it.
    pub role: String,
}

/// Metadata verified from a trusted root at a fixed reference time.
#[derive(Debug)]
pub struct TrustedRepository {
    now: DateTime,
    root: Signed<Root>,
    timestamp: Option<Signed<Timestamp>>,
    snapshot: Option<Signed<Snapshot>>,
    /// Index 0 is the top-level targets role; the others are delegated roles.
    roles: Vec<(String, Signed<Targets>)>,
    /// (delegator index, role name) → index in `roles`: a role is trusted through the
    /// delegator that verified it, never merely by its name.
    by_delegator: BTreeMap<(usize, String), usize>,
    /// [`crate::floors::key_set`] of the keys each of `roles` was verified with.
    fingerprints: Vec<Vec<String>>,
}

/// Verify `envelope` for `role` with keys and threshold, then parse it as `T` and check its version and expiry.
fn verify_role<T: RoleType>(
    role: &str,
    bytes: &[u8],
    keys: &BTreeMap<KeyId, PublicKey>,
    keyids: &[KeyId],
    threshold: u32,
    expected_version: Option<u64>,
    now: Option<DateTime>,
) -> Result<Signed<T>> {
    let envelope = Envelope::parse(role, bytes)?;
    verify_threshold(role, &envelope, keys, keyids, threshold)?;
    let signed = Signed::<T>::from_envelope(role, envelope)?;
    if let Some(expected) = expected_version {
        if signed.version() != expected {
            return Err(Error::VersionMismatch {
                role: role.to_owned(),
                expected,
                found: signed.version(),
            });
        }
    }
    if let Some(now) = now {
        check_expiry(role, &signed, now)?;
    }
    Ok(signed)
}

pub(crate) fn check_expiry<T: RoleType>(role: &str, signed: &Signed<T>, now: DateTime) -> Result<()> {
    if signed.expires() <= now {
        return Err(Error::Expired {
            role: role.to_owned(),
            expires: signed.signed.common().expires.clone(),
        });
    }
    Ok(())
}

pub(crate) fn check_meta(role: &str, bytes: &[u8], meta: &MetaFile) -> Result<()> {
    digest::check(role, bytes, meta.length, meta.hashes.as_ref())
}

pub(crate) fn top_role<'a>(root: &'a Root, name: &str) -> Result<&'a crate::metadata::RoleKeys> {
    root.role(name)
        .ok_or_else(|| Error::field("root", "roles", format!("role `{name}` is missing")))
}

/// Step 5.3.4–5.3.6: accept `new_bytes` as the next root after `trusted`.
pub fn update_root(trusted: &Signed<Root>, new_bytes: &[u8]) -> Result<Signed<Root>> {
    let envelope = Envelope::parse("root", new_bytes)?;
    // 5.3.4: signed by a threshold of the trusted root's root keys.
    let old = top_role(&trusted.signed, "root")?;
    verify_threshold("root", &envelope, &trusted.signed.keys, &old.keyids, old.threshold)?;
    let new = Signed::<Root>::from_envelope("root", envelope)?;
    // ... and by a threshold of its own root keys.
    let own = top_role(&new.signed, "root")?;
    verify_threshold("root", &new.envelope, &new.signed.keys, &own.keyids, own.threshold)?;
    // 5.3.5: exactly one version newer.
    let expected = trusted.version() + 1;
    if new.version() != expected {
        return Err(Error::VersionMismatch {
            role: "root".into(),
            expected,
            found: new.version(),
        });
    }
    Ok(new)
}

/// Parse a trust anchor and check that it is signed by a threshold of its own root keys.
pub fn load_trusted_root(bytes: &[u8]) -> Result<Signed<Root>> {
    let envelope = Envelope::parse("root", bytes)?;
    let root = Signed::<Root>::from_envelope("root", envelope)?;
    let own = top_role(&root.signed, "root")?;
    verify_threshold("root", &root.envelope, &root.signed.keys, &own.keyids, own.threshold)?;
    Ok(root)
}

impl TrustedRepository {
    /// Verify the root chain, timestamp, snapshot and top-level targets at time `now`.
    pub fn load(
        trusted_root: &[u8],
        source: &mut dyn MetadataSource,
        now: DateTime,
        freshness: Freshness,
    ) -> Result<Self> {
        // 5.2: the trusted root.
        let mut root = load_trusted_root(trusted_root)?;
        // 5.3.2–5.3.7: walk N+1.root.json until there is none.
        for _ in 0..MAX_ROOT_ROTATIONS {
            let next = root.version() + 1;
            match source.fetch("root", Some(next)) {
                Some(bytes) => root = update_root(&root, &bytes)?,
                None => break,
            }
        }
        // 5.3.10: the final root must not have expired.
        check_expiry("root", &root, now)?;

        // 5.4: timestamp.
        let (timestamp, snapshot) = match (source.fetch("timestamp", None), freshness) {
            (None, Freshness::Required) => {
                return Err(Error::MissingRole {
                    role: "timestamp".into(),
                })
            }
            (None, Freshness::IfPresent) => (None, None),
            (Some(bytes), _) => {
                let keys = top_role(&root.signed, "timestamp")?;
                let ts: Signed<Timestamp> = verify_role(
                    "timestamp",
                    &bytes,
                    &root.signed.keys,
                    &keys.keyids,
                    keys.threshold,
                    None,
                    Some(now),
                )?;
                // 5.5: snapshot, at the version timestamp names.
                let meta = ts
                    .signed
                    .snapshot_meta()
                    .cloned()
                    .ok_or_else(|| Error::field("timestamp", "meta", "no `snapshot.json`"))?;
                let bytes = source
                    .fetch("snapshot", Some(meta.version))
                    .ok_or_else(|| Error::MissingRole {
                        role: "snapshot".into(),
                    })?;
                check_meta("snapshot", &bytes, &meta)?;
                let keys = top_role(&root.signed, "snapshot")?;
                let snap: Signed<Snapshot> = verify_role(
                    "snapshot",
                    &bytes,
                    &root.signed.keys,
                    &keys.keyids,
                    keys.threshold,
                    Some(meta.version),
                    Some(now),
                )?;
                (Some(ts), Some(snap))
            }
        };

        // 5.6: top-level targets, at the version snapshot names (if there is a snapshot).
        let meta = match &snapshot {
            Some(s) => Some(
                s.signed
                    .meta
                    .get("targets.json")
                    .cloned()
                    .ok_or_else(|| Error::field("snapshot", "meta", "`targets.json` is not listed"))?,
            ),
            None => None,
        };
        let bytes = source
            .fetch("targets", meta.as_ref().map(|m| m.version))
            .ok_or_else(|| Error::MissingRole { role: "targets".into() })?;
        if let Some(m) = &meta {
            check_meta("targets", &bytes, m)?;
        }
        let keys = top_role(&root.signed, "targets")?;
        let targets: Signed<Targets> = verify_role(
            "targets",
            &bytes,
            &root.signed.keys,
            &keys.keyids,
            keys.threshold,
            meta.as_ref().map(|m| m.version),
            Some(now),
        )?;
        Ok(TrustedRepository {
            now,
            fingerprints: vec![crate::floors::key_set(&keys.keyids)],
            root,
            timestamp,
            snapshot,
            roles: vec![("targets".into(), targets)],
            by_delegator: BTreeMap::new(),
        })
    }

    /// The newest trusted root.
    pub fn root(&self) -> &Signed<Root> {
        &self.root
    }

    /// The verified timestamp, if the source had one.
    pub fn timestamp(&self) -> Option<&Signed<Timestamp>> {
        self.timestamp.as_ref()
    }

    /// The verified snapshot, if the source had one.
    pub fn snapshot(&self) -> Option<&Signed<Snapshot>> {
        self.snapshot.as_ref()
    }

    /// The top-level targets role.
    pub fn targets(&self) -> &Signed<Targets> {
        &self.roles[0].1
    }

    /// The version of every role verified so far, with the keys that verified it, for the
    /// device's version floors (`crate::floors`): root, timestamp and snapshot when
    /// present, targets, and `delegated/NAME` for each delegated role.
    pub fn role_versions(&self) -> Vec<crate::floors::RoleVersion> {
        use crate::floors::{key_set, RoleVersion};
        let top = |name: &str, version: u64| {
            top_role(&self.root.signed, name).ok().map(|k| RoleVersion {
                role: name.to_owned(),
                version,
                keys: key_set(&k.keyids),
            })
        };
        let mut out: Vec<RoleVersion> = [
            top("root", self.root.version()),
            self.timestamp.as_ref().and_then(|t| top("timestamp", t.version())),
            self.snapshot.as_ref().and_then(|s| top("snapshot", s.version())),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (i, (name, role)) in self.roles.iter().enumerate() {
            out.push(RoleVersion {
                role: if i == 0 {
                    "targets".into()
                } else {
                    format!("delegated/{name}")
                },
                version: role.version(),
                keys: self.fingerprints.get(i).cloned().unwrap_or_default(),
            });
        }
        out
    }

    /// Every targets role verified so far, top-level first, with its name.
    pub fn verified_roles(&self) -> impl Iterator<Item = (&str, &Signed<Targets>)> {
        self.roles.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// 5.6.7: pre-order depth-first search of the delegation graph for `name`.
    pub fn find_target(&mut self, source: &mut dyn MetadataSource, name: &str) -> Result<FoundTarget> {
        let path = TargetPath::new(name)?;
        // Stack of (role index already verified) or (delegator index, candidate) to verify.
        enum Visit {
            Verified(usize),
            Delegated(usize, crate::delegation::Candidate),
        }
        let mut stack = vec![Visit::Verified(0)];
        let mut visited: Vec<usize> = Vec::new();
        while let Some(visit) = stack.pop() {
            if visited.len() >= MAX_DELEGATIONS {
                return Err(Error::TooManyDelegations {
                    target: name.to_owned(),
                    limit: MAX_DELEGATIONS,
                });
            }
            let index = match visit {
                Visit::Verified(i) => i,
                Visit::Delegated(parent, candidate) => self.load_delegated(source, parent, &candidate)?,
            };
            // A cycle in the delegation graph leads back to a role already searched: skip it.
            if visited.contains(&index) {
                continue;
            }
            visited.push(index);
            let (role_name, role) = &self.roles[index];
            if let Some(file) = role.signed.targets.get(name) {
                return Ok(FoundTarget {
                    path,
                    file: file.clone(),
                    role: role_name.clone(),
                });
            }
            let Some(delegations) = &role.signed.delegations else {
                continue;
            };
            let mut children = Vec::new();
            for candidate in delegations.roles_for_target(name) {
                let terminating = candidate.terminating;
                children.push(Visit::Delegated(index, candidate));
                if terminating {
                    // A terminating role ends the search below it: nothing else is tried.
                    stack.clear();
                    break;
                }
            }
            // Pre-order: the first child listed is searched first.
            children.reverse();
            stack.extend(children);
        }
        Err(Error::TargetNotFound {
            target: name.to_owned(),
        })
    }

    fn load_delegated(
        &mut self,
        source: &mut dyn MetadataSource,
        parent: usize,
        candidate: &crate::delegation::Candidate,
    ) -> Result<usize> {
        let key = (parent, candidate.name.clone());
        if let Some(&i) = self.by_delegator.get(&key) {
            return Ok(i);
        }
        let role = candidate.name.as_str();
        let meta = match &self.snapshot {
            Some(s) => Some(
                s.signed
                    .meta
                    .get(&format!("{role}.json"))
                    .cloned()
                    .ok_or_else(|| Error::field("snapshot", "meta", format!("`{role}.json` is not listed")))?,
            ),
            None => None,
        };
        let bytes = source
            .fetch(role, meta.as_ref().map(|m| m.version))
            .ok_or_else(|| Error::MissingRole { role: role.to_owned() })?;
        if let Some(m) = &meta {
            check_meta(role, &bytes, m)?;
        }
        let delegator = &self.roles[parent].1;
        let keys = &delegator
            .signed
            .delegations
            .as_ref()
            .ok_or_else(|| Error::MissingRole { role: role.to_owned() })?
            .keys;
        let signed: Signed<Targets> = verify_role(
            role,
            &bytes,
            keys,
            &candidate.keyids,
            candidate.threshold,
            meta.as_ref().map(|m| m.version),
            Some(self.now),
        )?;
        self.roles.push((role.to_owned(), signed));
        self.fingerprints.push(crate::floors::key_set(&candidate.keyids));
        let i = self.roles.len() - 1;
        self.by_delegator.insert(key, i);
        Ok(i)
    }
}
