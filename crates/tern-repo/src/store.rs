//! Reading and writing role files, finding who may sign what, and status.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tern_core::metadata::{Envelope, RoleType, Root, Signed, Targets};
use tern_core::verify::count_valid;
use tern_core::{DateTime, KeyId, PublicKey, SigningKey};

use crate::config::RepoConfig;
use crate::{Error, Repository, Result};

/// What one write left behind: a role version and how many of its required signatures it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleWrite {
    /// The role (for a root rotation, also `root (previous keys)`).
    pub role: String,
    /// The version written.
    pub version: u64,
    /// Distinct valid signatures.
    pub valid: u32,
    /// Required.
    pub threshold: u32,
}

impl RoleWrite {
    /// Whether clients will accept it as it stands.
    pub fn complete(&self) -> bool {
        self.valid >= self.threshold
    }
}

/// One role's state, for `tern repo status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleStatus {
    /// The role.
    pub role: String,
    /// Its newest version.
    pub version: u64,
    /// When that version expires.
    pub expires: String,
    /// Whether it has expired at the time of the query.
    pub expired: bool,
    /// Distinct valid signatures.
    pub valid: u32,
    /// Required.
    pub threshold: u32,
    /// Targets it lists (targets roles only).
    pub targets: usize,
}

/// Keys, key ids and threshold that govern a role.
#[derive(Debug, Clone)]
pub(crate) struct Authority {
    pub keys: BTreeMap<KeyId, PublicKey>,
    pub keyids: Vec<KeyId>,
    pub threshold: u32,
}

impl Authority {
    pub(crate) fn count(&self, role: &str, env: &Envelope) -> Result<u32> {
        Ok(count_valid(role, env, &self.keys, &self.keyids)?)
    }
}

/// Where a delegated role was found: its delegator, and the delegator's newest metadata.
pub(crate) struct Delegator {
    pub name: String,
    pub signed: Signed<Targets>,
}

impl Repository {
    /// Open an existing repository.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join("metadata/1.root.json").is_file() && !dir.join("staged/1.root.json").is_file() {
            return Err(Error::NotARepository { dir: dir.to_owned() });
        }
        Ok(Repository {
            dir: dir.to_owned(),
            config: RepoConfig::load(dir)?,
        })
    }

    pub(crate) fn new_unchecked(dir: &Path, config: RepoConfig) -> Self {
        Repository {
            dir: dir.to_owned(),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    fn file_name(role: &str, version: u64) -> String {
        if role == "timestamp" {
            "timestamp.json".into()
        } else {
            format!("{version}.{role}.json")
        }
    }

    /// Where a published version of a role is (clients see it).
    pub(crate) fn role_path(&self, role: &str, version: u64) -> PathBuf {
        self.metadata_dir().join(Self::file_name(role, version))
    }

    /// `DIR/staged`: versions still short of their signatures, invisible to clients.
    pub fn staged_dir(&self) -> PathBuf {
        self.dir.join("staged")
    }

    pub(crate) fn staged_path(&self, role: &str, version: u64) -> PathBuf {
        self.staged_dir().join(Self::file_name(role, version))
    }

    /// The file of `role` at `version`: published, else staged.
    pub(crate) fn role_file(&self, role: &str, version: u64) -> PathBuf {
        let published = self.role_path(role, version);
        if published.exists() {
            published
        } else {
            self.staged_path(role, version)
        }
    }

    fn scan(dir: &Path, role: &str) -> Result<Vec<u64>> {
        let suffix = format!(".{role}.json");
        let mut out = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(Error::Io {
                    path: dir.to_owned(),
                    source,
                })
            }
        };
        for e in entries {
            let e = e.map_err(|source| Error::Io {
                path: dir.to_owned(),
                source,
            })?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(v) = name.strip_suffix(suffix.as_str()).and_then(|v| v.parse::<u64>().ok()) {
                out.push(v);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Published versions of `role`, ascending.
    pub fn versions(&self, role: &str) -> Result<Vec<u64>> {
        Self::scan(&self.metadata_dir(), role)
    }

    /// The version after the newest one, published or staged.
    pub(crate) fn next_version(&self, role: &str) -> Result<u64> {
        let published = self.versions(role)?.last().copied().unwrap_or(0);
        let staged = Self::scan(&self.staged_dir(), role)?.last().copied().unwrap_or(0);
        Ok(published.max(staged) + 1)
    }

    pub(crate) fn read_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }

    pub(crate) fn parse<T: RoleType>(&self, role: &str, path: &Path) -> Result<Signed<T>> {
        let bytes = self.read_bytes(path)?;
        Signed::<T>::parse(role, &bytes).map_err(|e| Error::Metadata {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// The newest version of `role`, staged or published, or `UnknownRole`.
    pub(crate) fn latest<T: RoleType>(&self, role: &str) -> Result<Signed<T>> {
        if role == "timestamp" {
            for path in [self.staged_path(role, 0), self.role_path(role, 0)] {
                if path.exists() {
                    return self.parse(role, &path);
                }
            }
            return Err(Error::UnknownRole { role: role.into() });
        }
        let published = self.versions(role)?.last().copied();
        let staged = Self::scan(&self.staged_dir(), role)?.last().copied();
        match (published, staged) {
            (_, Some(s)) if Some(s) > published => self.parse(role, &self.staged_path(role, s)),
            (Some(p), _) => self.parse(role, &self.role_path(role, p)),
            _ => Err(Error::UnknownRole { role: role.into() }),
        }
    }

    /// The newest root.
    pub fn root(&self) -> Result<Signed<Root>> {
        self.latest("root")
    }

    /// Bytes of every root version, oldest first.
    pub fn root_chain(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.versions("root")?
            .into_iter()
            .map(|v| Ok((v, self.read_bytes(&self.role_path("root", v))?)))
            .collect()
    }

    /// Write a role version atomically: published when `complete` (it meets its thresholds;
    /// the root's newest is also copied to `root.json`), else staged, where clients never see
    /// it, until `tern repo sign` completes it.
    pub(crate) fn write_role(&self, role: &str, env: &Envelope, version: u64, complete: bool) -> Result<()> {
        let bytes = env.to_bytes();
        if !complete {
            let dir = self.staged_dir();
            fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir, source })?;
            tern_fs::atomic_write(&self.staged_path(role, version), &bytes, 0o644)?;
            return Ok(());
        }
        tern_fs::atomic_write(&self.role_path(role, version), &bytes, 0o644)?;
        if role == "root" {
            tern_fs::atomic_write(&self.metadata_dir().join("root.json"), &bytes, 0o644)?;
        }
        match fs::remove_file(self.staged_path(role, version)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                path: self.staged_path(role, version),
                source,
            }),
        }
    }

    /// Expiry for a role written now.
    pub(crate) fn expires(&self, role: &str, now: DateTime) -> DateTime {
        now.plus_secs(self.config.expiry.for_role(role) as i64)
    }

    /// Keys and threshold of a top-level role, from the newest root.
    pub(crate) fn top_authority(&self, root: &Root, role: &str) -> Result<Authority> {
        let r = root
            .role(role)
            .ok_or_else(|| Error::UnknownRole { role: role.into() })?;
        Ok(Authority {
            keys: root.keys.clone(),
            keyids: r.keyids.clone(),
            threshold: r.threshold,
        })
    }

    /// Every targets role reachable from top-level targets, breadth first, with its delegator.
    pub(crate) fn targets_roles(&self) -> Result<Vec<(String, Option<String>)>> {
        let mut out = vec![("targets".to_owned(), None)];
        let mut seen = std::collections::HashSet::from(["targets".to_owned()]);
        let mut queue = VecDeque::from(["targets".to_owned()]);
        while let Some(name) = queue.pop_front() {
            let t: Signed<Targets> = self.latest(&name)?;
            let Some(d) = &t.signed.delegations else { continue };
            let children: Vec<String> = match (&d.roles, &d.succinct_roles) {
                (Some(roles), _) => roles.iter().map(|r| r.name.clone()).collect(),
                (None, Some(s)) => (0..s.bins()).map(|b| s.bin_name(b as u32)).collect(),
                (None, None) => Vec::new(),
            };
            for c in children {
                if !seen.insert(c.clone()) {
                    continue;
                }
                out.push((c.clone(), Some(name.clone())));
                queue.push_back(c);
            }
        }
        Ok(out)
    }

    /// The delegator of a delegated role.
    pub(crate) fn delegator_of(&self, role: &str) -> Result<Delegator> {
        let roles = self.targets_roles()?;
        let parent = roles
            .into_iter()
            .find(|(n, _)| n == role)
            .and_then(|(_, p)| p)
            .ok_or_else(|| Error::UnknownRole { role: role.into() })?;
        Ok(Delegator {
            signed: self.latest(&parent)?,
            name: parent,
        })
    }

    /// Keys and threshold governing any role.
    pub(crate) fn authority(&self, role: &str) -> Result<Authority> {
        if tern_core::TOP_LEVEL_ROLES.contains(&role) {
            return self.top_authority(&self.root()?.signed, role);
        }
        let delegator = self.delegator_of(role)?;
        delegated_authority(&delegator.signed.signed, role).ok_or_else(|| Error::UnknownRole { role: role.into() })
    }

    /// The state of every role.
    pub fn status(&self, now: DateTime) -> Result<Vec<RoleStatus>> {
        let root = self.root()?;
        let mut out = Vec::new();
        let mut push = |role: &str,
                        env: &Envelope,
                        version: u64,
                        expires: DateTime,
                        auth: &Authority,
                        targets: usize|
         -> Result<()> {
            out.push(RoleStatus {
                role: role.to_owned(),
                version,
                expires: expires.to_string(),
                expired: expires <= now,
                valid: auth.count(role, env)?,
                threshold: auth.threshold,
                targets,
            });
            Ok(())
        };
        let auth = self.top_authority(&root.signed, "root")?;
        push("root", &root.envelope, root.version(), root.expires(), &auth, 0)?;
        for role in ["timestamp", "snapshot"] {
            let auth = self.top_authority(&root.signed, role)?;
            let loaded = match role {
                "timestamp" => self
                    .latest::<tern_core::Timestamp>(role)
                    .map(|s| (s.envelope, s.signed.common)),
                _ => self
                    .latest::<tern_core::Snapshot>(role)
                    .map(|s| (s.envelope, s.signed.common)),
            };
            let (envelope, common) = match loaded {
                Ok(x) => x,
                Err(Error::UnknownRole { .. }) => continue,
                Err(e) => return Err(e),
            };
            let expires = DateTime::parse(&common.expires).unwrap_or(DateTime::from_unix(0));
            push(role, &envelope, common.version, expires, &auth, 0)?;
        }
        for (role, _) in self.targets_roles()? {
            let t: Signed<Targets> = self.latest(&role)?;
            let auth = self.authority(&role)?;
            push(
                &role,
                &t.envelope,
                t.version(),
                t.expires(),
                &auth,
                t.signed.targets.len(),
            )?;
        }
        Ok(out)
    }
}

/// The authority a delegator's metadata grants `role`.
pub(crate) fn delegated_authority(delegator: &Targets, role: &str) -> Option<Authority> {
    let d = delegator.delegations.as_ref()?;
    if let Some(r) = d.roles.iter().flatten().find(|r| r.name == role) {
        return Some(Authority {
            keys: d.keys.clone(),
            keyids: r.keyids.clone(),
            threshold: r.threshold,
        });
    }
    let s = d.succinct_roles.as_ref()?;
    (0..s.bins()).any(|b| s.bin_name(b as u32) == role).then(|| Authority {
        keys: d.keys.clone(),
        keyids: s.keyids.clone(),
        threshold: s.threshold,
    })
}

/// Sign `env` with every signer `auth` authorises; the number of signers used.
pub(crate) fn sign_with(role: &str, env: &mut Envelope, auth: &Authority, signers: &[SigningKey]) -> Result<usize> {
    let mut used = 0;
    for key in signers {
        if auth.keyids.contains(&key.public().keyid()) {
            env.sign(role, key)?;
            used += 1;
        }
    }
    Ok(used)
}

/// Refuse early when no signer is authorised for `role`.
pub(crate) fn require_signer(role: &str, auth: &Authority, signers: &[SigningKey]) -> Result<()> {
    if signers.iter().any(|k| auth.keyids.contains(&k.public().keyid())) {
        Ok(())
    } else {
        Err(Error::NoSigner {
            role: role.into(),
            authorised: auth.keyids.clone(),
        })
    }
}
