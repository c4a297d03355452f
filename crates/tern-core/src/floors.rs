//! The highest version of every role a device has verified, from any source.
//!
//! TUF's rollback rules compare new metadata with the metadata a client trusts. A device
//! that also installs from local media sees metadata from two places: the TUF client's
//! repository refresh, and bundles, whose freshness roles are optional offline. Without a
//! shared floor, a bundle carrying older, still-unexpired targets metadata (one that lists
//! a release since withdrawn) would install whatever that metadata lists. So every verified
//! role's version is kept here, whichever path verified it, and metadata older than what
//! was seen is refused from any source.
//!
//! A floor belongs to the keys that signed the role, and survives any change of them that
//! keeps one of those keys: adding a key, dropping one, changing the threshold. Only a
//! rotation to keys none of which signed before (what recovering from a key compromise or
//! a fast-forward attack takes, TUF §5.3.11) lets the role start its versions again: old
//! metadata still signed by a kept key would otherwise come back through any root that
//! changed the role's keys at all. Root's own floor always applies (roots never restart).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::KeyId;

/// Largest floors document read (and written: the writer makes room before it grows past).
pub const MAX_BYTES: usize = 4 << 20;
/// Most roles kept.
pub const MAX_ROLES: usize = 4096;
/// Most key ids kept per role (a role listing more keeps its first, sorted).
pub const MAX_KEYS: usize = 32;

/// A role's version as just verified, with the keys that verified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleVersion {
    /// `root`, `timestamp`, `snapshot`, `targets`, or `delegated/NAME`.
    pub role: String,
    /// Its version.
    pub version: u64,
    /// [`key_set`] of the keys the role was verified with.
    pub keys: Vec<String>,
}

/// The sorted, distinct ids of `keyids` (at most [`MAX_KEYS`]).
pub fn key_set(keyids: &[KeyId]) -> Vec<String> {
    let mut ids: Vec<String> = keyids.iter().map(|k| k.as_str().to_owned()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(MAX_KEYS);
    ids
}

/// One role's floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    /// The highest version verified.
    pub version: u64,
    /// The keys it was verified with.
    pub keys: Vec<String>,
}

impl Floor {
    /// Whether this floor binds metadata verified with `keys`: it shares one of them (or
    /// it is root's).
    fn binds(&self, role: &str, keys: &[String]) -> bool {
        role == "root" || keys.iter().any(|k| self.keys.binary_search(k).is_ok())
    }
}

/// Every role's floor (`STATE_DIR/tuf/floors.json` on a device).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionFloors {
    /// Role → floor.
    pub roles: BTreeMap<String, Floor>,
}

impl VersionFloors {
    /// Parse a floors document (bounded).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::Malformed {
            role: "version floors".into(),
            reason,
        };
        if bytes.len() > MAX_BYTES {
            return Err(bad(format!("{} bytes exceeds the {MAX_BYTES}-byte limit", bytes.len())));
        }
        let mut floors: VersionFloors =
            serde_json::from_slice(bytes).map_err(|e| bad(crate::text::shown(&e.to_string())))?;
        if floors.roles.len() > MAX_ROLES {
            return Err(bad(format!("more than {MAX_ROLES} roles")));
        }
        for f in floors.roles.values_mut() {
            f.keys.sort_unstable();
            f.keys.dedup();
        }
        Ok(floors)
    }

    /// The document's bytes (compact, and never more than [`MAX_BYTES`]: delegated roles'
    /// floors make room, the top-level roles' always stay).
    pub fn to_bytes(&mut self) -> Vec<u8> {
        loop {
            let bytes = serde_json::to_vec(self).unwrap_or_default();
            if bytes.len() <= MAX_BYTES {
                return bytes;
            }
            // Drop the share of delegated floors the excess asks for (and an eighth more),
            // in one go rather than one at a time.
            let delegated: Vec<String> = self
                .roles
                .keys()
                .filter(|k| k.starts_with("delegated/"))
                .cloned()
                .collect();
            if delegated.is_empty() {
                return bytes;
            }
            let excess = (bytes.len() - MAX_BYTES) as f64 / bytes.len() as f64;
            let drop = ((delegated.len() as f64 * (excess + 0.125)).ceil() as usize).clamp(1, delegated.len());
            for k in &delegated[..drop] {
                self.roles.remove(k);
            }
        }
    }

    /// Refuse any of `seen` that is older than a floor that binds it.
    pub fn check(&self, seen: &[RoleVersion]) -> Result<()> {
        for r in seen {
            if let Some(f) = self.roles.get(&r.role) {
                if f.binds(&r.role, &r.keys) && r.version < f.version {
                    return Err(Error::Rollback {
                        role: r.role.clone(),
                        trusted: f.version,
                        found: r.version,
                    });
                }
            }
        }
        Ok(())
    }

    /// Raise the floors to `seen` (which [`VersionFloors::check`] passed); true if any
    /// moved. A floor follows the role's newest keys; one whose keys were all rotated out
    /// starts again from what was seen.
    pub fn raise(&mut self, seen: &[RoleVersion]) -> bool {
        let mut changed = false;
        for r in seen {
            let keep = self
                .roles
                .get(&r.role)
                .is_some_and(|f| f.binds(&r.role, &r.keys) && f.version >= r.version && f.keys == r.keys);
            if keep {
                continue;
            }
            let version = match self.roles.get(&r.role) {
                Some(f) if f.binds(&r.role, &r.keys) => f.version.max(r.version),
                _ => r.version,
            };
            if !self.roles.contains_key(&r.role) && self.roles.len() >= MAX_ROLES {
                if let Some(k) = self.roles.keys().find(|k| k.starts_with("delegated/")).cloned() {
                    self.roles.remove(&k);
                }
            }
            self.roles.insert(
                r.role.clone(),
                Floor {
                    version,
                    keys: r.keys.clone(),
                },
            );
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(role: &str, version: u64, keys: &[&str]) -> RoleVersion {
        RoleVersion {
            role: role.into(),
            version,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn older_versions_are_refused_while_a_signing_key_is_kept() {
        let mut f = VersionFloors::default();
        assert!(f.raise(&[seen("targets", 4, &["k1"]), seen("delegated/board-a", 2, &["k2"])]));
        assert!(f.check(&[seen("targets", 4, &["k1"])]).is_ok());
        assert!(f.check(&[seen("targets", 5, &["k1"])]).is_ok());
        let e = f.check(&[seen("targets", 3, &["k1"])]).unwrap_err();
        assert_eq!(e.kind(), "Rollback");
        assert!(
            e.to_string()
                .contains("targets: version 3 is older than trusted version 4"),
            "{e}"
        );
        assert!(f.check(&[seen("delegated/board-a", 1, &["k2"])]).is_err());
        // A root that adds a key (or changes the threshold) keeps the floor: old metadata
        // still signed by k1 does not come back through it.
        assert!(f.check(&[seen("targets", 3, &["k1", "k9"])]).is_err());
        assert!(f.raise(&[seen("targets", 4, &["k1", "k9"])]));
        assert_eq!(f.roles["targets"].version, 4);
        // Keys all rotated out: the role may start again.
        assert!(f.check(&[seen("targets", 1, &["k7"])]).is_ok());
        assert!(f.raise(&[seen("targets", 1, &["k7"])]));
        assert!(!f.raise(&[seen("targets", 1, &["k7"])]));
        assert_eq!(f.roles["targets"].version, 1);
        // Root's floor binds whatever its keys.
        assert!(f.raise(&[seen("root", 3, &["r1"])]));
        assert!(f.check(&[seen("root", 2, &["r9"])]).is_err());
        let back = VersionFloors::parse(&f.to_bytes()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn key_sets_ignore_order_and_repeats() {
        let a = KeyId::new("aa".repeat(32));
        let b = KeyId::new("bb".repeat(32));
        assert_eq!(key_set(&[a.clone(), b.clone()]), key_set(&[b.clone(), a.clone(), a]));
    }

    #[test]
    fn documents_are_bounded_both_ways() {
        assert!(VersionFloors::parse(&vec![b' '; MAX_BYTES + 1]).is_err());
        assert!(VersionFloors::parse(b"{\"roles\": 5}").is_err());
        // The writer never produces what the parser refuses.
        let mut f = VersionFloors::default();
        let keys: Vec<String> = (0..MAX_KEYS).map(|k| format!("{k:064x}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        for n in 0..MAX_ROLES {
            f.raise(&[seen(&format!("delegated/{}{n}", "r".repeat(120)), 1, &keys)]);
        }
        f.raise(&[seen("targets", 9, &["k1"])]);
        let bytes = f.to_bytes();
        assert!(bytes.len() <= MAX_BYTES);
        assert_eq!(VersionFloors::parse(&bytes).unwrap().roles["targets"].version, 9);
    }
}
