//! `tern-repo.json`: the repository's expiry periods.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How long each kind of role stays valid after it is signed, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    /// Root: offline, rarely re-signed. Default 365 days.
    pub root: u64,
    /// Top-level targets. Default 90 days.
    pub targets: u64,
    /// Delegated targets roles. Default 90 days.
    pub delegated: u64,
    /// Snapshot. Default 7 days.
    pub snapshot: u64,
    /// Timestamp: the online freshness signal. Default 1 day.
    pub timestamp: u64,
}

const DAY: u64 = 86_400;

impl Default for Expiry {
    fn default() -> Self {
        Expiry {
            root: 365 * DAY,
            targets: 90 * DAY,
            delegated: 90 * DAY,
            snapshot: 7 * DAY,
            timestamp: DAY,
        }
    }
}

impl Expiry {
    /// The period for `role` (any name other than the four top-level ones is delegated).
    pub fn for_role(&self, role: &str) -> u64 {
        match role {
            "root" => self.root,
            "targets" => self.targets,
            "snapshot" => self.snapshot,
            "timestamp" => self.timestamp,
            _ => self.delegated,
        }
    }

    /// Apply `ROLE=DURATION` (ROLE one of root, targets, delegated, snapshot, timestamp).
    pub fn set(&mut self, spec: &str) -> Result<()> {
        let (role, dur) = spec.split_once('=').ok_or_else(|| Error::Invalid {
            what: format!("--expires {spec}"),
            reason: "expected ROLE=DURATION, e.g. timestamp=1d".into(),
        })?;
        let secs = parse_duration(dur)?;
        let slot = match role {
            "root" => &mut self.root,
            "targets" => &mut self.targets,
            "delegated" => &mut self.delegated,
            "snapshot" => &mut self.snapshot,
            "timestamp" => &mut self.timestamp,
            _ => {
                return Err(Error::Invalid {
                    what: format!("--expires {spec}"),
                    reason: "ROLE is one of root, targets, delegated, snapshot, timestamp".into(),
                })
            }
        };
        *slot = secs;
        Ok(())
    }
}

/// Parse `90d`, `12h`, `30m`, `45s`, `2w` into seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let bad = || Error::Invalid {
        what: format!("duration `{s}`"),
        reason: "expected a positive number followed by s, m, h, d or w".into(),
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => DAY,
        "w" => 7 * DAY,
        _ => return Err(bad()),
    };
    // At most a century: expiry dates must stay printable as YYYY-MM-DDTHH:MM:SSZ.
    match n.checked_mul(mult) {
        Some(v) if v > 0 && v <= 36_500 * DAY => Ok(v),
        _ => Err(Error::Invalid {
            what: format!("duration `{s}`"),
            reason: "must be between 1 second and 100 years".into(),
        }),
    }
}

/// The repository's settings file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Expiry periods.
    pub expiry: Expiry,
    /// Fields a newer Tern wrote.
    #[serde(flatten)]
    pub unrecognized: BTreeMap<String, serde_json::Value>,
}

impl RepoConfig {
    /// The file's name inside the repository directory.
    pub const FILE: &'static str = "tern-repo.json";

    /// Read it, or the defaults when the repository has none.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
                what: path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    /// Write it atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        tern_fs::atomic_write(&dir.join(Self::FILE), &bytes, 0o644)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * DAY);
        assert_eq!(parse_duration("2w").unwrap(), 14 * DAY);
        assert_eq!(parse_duration("45s").unwrap(), 45);
        for bad in ["", "d", "0d", "5", "5y", "-1d", "1000000w", "36501d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
