//! Every change the release engineer can make, each leaving the repository consistent.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tern_bundle::{Payload, ReleaseContents};
use tern_core::digest::{Digester, HashAlgorithm};
use tern_core::keywrap::{self, DataKey, RecipientKey, Recipients};
use tern_core::manifest::{Compression, Encryption, ENCRYPTION_SCHEME};
use tern_core::metadata::{
    Common, DelegatedRole, Delegations, Envelope, MetaFile, RoleKeys, Root, Signed, Snapshot, SuccinctRoles,
    TargetFile, Targets, Timestamp,
};
use tern_core::stream_aead::{Encryptor, DEFAULT_LOG2_RECORD};
use tern_core::trust::{Freshness, MetadataSource, TrustedRepository};
use tern_core::{DateTime, KeyId, PublicKey, SigningKey, TargetPath};

use crate::config::RepoConfig;
use crate::payload_io::{compress, DigestReader, DigestWriter};
use crate::store::{require_signer, sign_with, Authority};
use crate::{Error, Repository, Result, RoleWrite};

/// `tern repo add-target`.
#[derive(Debug, Clone)]
pub struct AddTarget {
    /// The role that lists it (`targets` or a delegated role).
    pub role: String,
    /// The target path.
    pub name: TargetPath,
    /// The file to publish.
    pub source: PathBuf,
    /// `custom` (Tern's manifest under `tern`).
    pub custom: Option<Value>,
    /// Digests to list; sha256 first.
    pub hashes: Vec<HashAlgorithm>,
    /// Compress the file on its way into the repository.
    pub compression: Compression,
    /// Encrypt it (after compressing) for these recipients; empty: store it as it is.
    pub encrypt_for: Vec<RecipientKey>,
}

/// `tern repo delegate`.
#[derive(Debug, Clone)]
pub struct Delegation {
    /// The delegating role.
    pub from: String,
    /// The new role.
    pub name: String,
    /// Its keys.
    pub keys: Vec<PublicKey>,
    /// Its threshold.
    pub threshold: u32,
    /// Whether the search stops at it.
    pub terminating: bool,
    /// Path patterns it is trusted for.
    pub paths: Vec<String>,
    /// Or hex prefixes of target path hashes.
    pub hash_prefixes: Vec<String>,
}

/// `tern repo delegate --succinct-bits`.
#[derive(Debug, Clone)]
pub struct HashBins {
    /// The delegating role.
    pub from: String,
    /// Bits of the path hash that pick the bin (1..=16).
    pub bit_length: u32,
    /// Bin name prefix.
    pub name_prefix: String,
    /// Keys of every bin.
    pub keys: Vec<PublicKey>,
    /// Their threshold.
    pub threshold: u32,
}

/// `tern repo rotate`.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The role whose keys change.
    pub role: String,
    /// Keys to add.
    pub add: Vec<PublicKey>,
    /// Key ids to remove.
    pub remove: Vec<KeyId>,
    /// A new threshold, if it changes.
    pub threshold: Option<u32>,
}

/// The keys with duplicates removed (the same key given as a public and a private file, say).
fn distinct(keys: &[PublicKey]) -> Vec<PublicKey> {
    let mut out: Vec<PublicKey> = Vec::new();
    for k in keys {
        if !out.iter().any(|o| o.keyid() == k.keyid()) {
            out.push(k.clone());
        }
    }
    out
}

fn check_threshold(what: &str, threshold: u32, keys: usize) -> Result<()> {
    if threshold == 0 || threshold as usize > keys {
        return Err(Error::Invalid {
            what: format!("{what} threshold {threshold}"),
            reason: format!("must be between 1 and the number of keys ({keys})"),
        });
    }
    Ok(())
}

fn check_new_role_name(name: &str) -> Result<()> {
    tern_bundle::check_role_name(name).map_err(|reason| Error::Invalid {
        what: format!("role `{name}`"),
        reason,
    })?;
    if tern_core::TOP_LEVEL_ROLES.contains(&name) {
        return Err(Error::Invalid {
            what: format!("role `{name}`"),
            reason: "is a top-level role name".into(),
        });
    }
    Ok(())
}

impl Repository {
    /// Create a repository: root with per-role keys and thresholds, an empty targets role, and
    /// (when their keys are given) snapshot and timestamp.
    pub fn init(
        dir: &Path,
        roles: &BTreeMap<String, (Vec<PublicKey>, u32)>,
        config: RepoConfig,
        signers: &[SigningKey],
        now: DateTime,
    ) -> Result<(Self, Vec<RoleWrite>)> {
        if dir.join("metadata/1.root.json").exists() {
            return Err(Error::AlreadyExists { dir: dir.to_owned() });
        }
        let mut keys = BTreeMap::new();
        let mut role_keys = BTreeMap::new();
        for name in tern_core::TOP_LEVEL_ROLES {
            let (ks, threshold) = roles.get(name).ok_or_else(|| Error::Invalid {
                what: format!("role `{name}`"),
                reason: "no keys given".into(),
            })?;
            let ks = distinct(ks);
            check_threshold(name, *threshold, ks.len())?;
            let mut keyids: Vec<KeyId> = ks.iter().map(PublicKey::keyid).collect();
            keyids.sort();
            keyids.dedup();
            for k in &ks {
                keys.insert(k.keyid(), k.clone());
            }
            role_keys.insert(
                name.to_owned(),
                RoleKeys {
                    keyids,
                    threshold: *threshold,
                    unrecognized: BTreeMap::new(),
                },
            );
        }
        let repo = Repository::new_unchecked(dir, config);
        let root = Root {
            common: Common::new("root", 1, repo.expires("root", now)),
            consistent_snapshot: true,
            keys,
            roles: role_keys,
            unrecognized: BTreeMap::new(),
        };
        let root_auth = repo.top_authority(&root, "root")?;
        require_signer("root", &root_auth, signers)?;
        for d in [repo.metadata_dir(), repo.targets_dir()] {
            fs::create_dir_all(&d).map_err(|source| Error::Io {
                path: d.clone(),
                source,
            })?;
        }
        repo.config.save(dir)?;
        let mut writes = Vec::new();
        let mut env = Envelope::new(&root)?;
        sign_with("root", &mut env, &root_auth, signers)?;
        let report = write_report("root", &env, 1, &root_auth)?;
        repo.write_role("root", &env, 1, report.complete())?;
        writes.push(report);

        let targets = Targets {
            common: Common::new("targets", 1, repo.expires("targets", now)),
            targets: BTreeMap::new(),
            delegations: None,
            unrecognized: BTreeMap::new(),
        };
        let auth = repo.top_authority(&root, "targets")?;
        let mut env = Envelope::new(&targets)?;
        sign_with("targets", &mut env, &auth, signers)?;
        let report = write_report("targets", &env, 1, &auth)?;
        repo.write_role("targets", &env, 1, report.complete())?;
        writes.push(report);

        let can_publish = ["snapshot", "timestamp"].iter().all(|r| {
            repo.top_authority(&root, r)
                .map(|a| require_signer(r, &a, signers).is_ok())
                .unwrap_or(false)
        });
        if can_publish && writes.iter().all(RoleWrite::complete) {
            writes.extend(repo.refresh(signers, now, false)?);
        }
        Ok((repo, writes))
    }

    fn write_targets(
        &self,
        role: &str,
        mut targets: Targets,
        auth: &Authority,
        signers: &[SigningKey],
        now: DateTime,
    ) -> Result<RoleWrite> {
        let version = targets.common.version + 1;
        targets.common.version = version;
        targets.common.expires = self.expires(role, now).to_string();
        let mut env = Envelope::new(&targets)?;
        sign_with(role, &mut env, auth, signers)?;
        let report = write_report(role, &env, version, auth)?;
        self.write_role(role, &env, version, report.complete())?;
        Ok(report)
    }

    /// Refuse to list `name` in `role` unless a client's search (§5.6.7: pre-order,
    /// terminating roles, path patterns) reaches `role` for it before any other role that
    /// already lists it: otherwise clients would never see, or never trust, the new target.
    fn check_delegated_path(&self, role: &str, name: &TargetPath) -> Result<()> {
        let path = name.as_str();
        let mut stack = vec!["targets".to_owned()];
        let mut visited = std::collections::BTreeSet::new();
        while let Some(current) = stack.pop() {
            if current == role {
                return Ok(());
            }
            if !visited.insert(current.clone()) || visited.len() > tern_core::trust::MAX_DELEGATIONS {
                continue;
            }
            let t = self.latest::<Targets>(&current)?.signed;
            if t.targets.contains_key(path) {
                // An earlier role lists it: the search would stop there.
                break;
            }
            let Some(d) = &t.delegations else { continue };
            let mut children = Vec::new();
            for c in d.roles_for_target(path) {
                let terminating = c.terminating;
                children.push(c.name);
                if terminating {
                    stack.clear();
                    break;
                }
            }
            children.reverse();
            stack.extend(children);
        }
        Err(Error::NotDelegated {
            role: role.into(),
            target: name.to_string(),
        })
    }

    /// Publish a file as a target of `role`, with its hashes and custom data.
    pub fn add_target(&self, add: &AddTarget, signers: &[SigningKey], now: DateTime) -> Result<Vec<RoleWrite>> {
        let auth = self.authority(&add.role)?;
        require_signer(&add.role, &auth, signers)?;
        self.check_delegated_path(&add.role, &add.name)?;
        let current: Signed<Targets> = self.latest(&add.role)?;
        let file = self.store_payload(add)?;
        let mut targets = current.signed;
        targets.targets.insert(add.name.to_string(), file);
        Ok(vec![self.write_targets(&add.role, targets, &auth, signers, now)?])
    }

    /// Copy (and compress) a payload into `targets/` under its consistent-snapshot names.
    fn store_payload(&self, add: &AddTarget) -> Result<TargetFile> {
        let (dir, base) = add.name.split();
        let dest_dir = self.targets_dir().join(dir);
        fs::create_dir_all(&dest_dir).map_err(|source| Error::Io {
            path: dest_dir.clone(),
            source,
        })?;
        let mut algs = add.hashes.clone();
        if !algs.contains(&HashAlgorithm::Sha256) {
            algs.insert(0, HashAlgorithm::Sha256);
        }
        let mut input = File::open(&add.source).map_err(|source| Error::Io {
            path: add.source.clone(),
            source,
        })?;
        let key = if add.encrypt_for.is_empty() {
            None
        } else {
            if add.custom.as_ref().and_then(|c| c.get("tern")).is_none() {
                return Err(Error::Invalid {
                    what: format!("target `{}`", add.name),
                    reason: "an encrypted payload needs Tern's manifest (--release-version): it tells the agent how to decrypt".into(),
                });
            }
            Some(DataKey::generate().map_err(|e| Error::Invalid {
                what: "data key".into(),
                reason: e.to_string(),
            })?)
        };
        let mut out = tern_fs::AtomicFile::create(&dest_dir.join(format!("{base}.incoming")), 0o644)?;
        let tmp = out.temp_path().to_owned();
        let io = |source: std::io::Error| Error::Io {
            path: tmp.clone(),
            source,
        };
        let installed: u64;
        let (digester, plaintext_length) = {
            let mut w = DigestWriter {
                inner: BufWriter::with_capacity(1 << 20, out.file()),
                digester: Digester::new(&algs),
            };
            // Compress, then encrypt: ciphertext does not compress.
            let plain = match &key {
                None => {
                    installed = compress(&mut input, &mut w, add.compression).map_err(io)?;
                    None
                }
                Some(k) => {
                    let mut e = Encryptor::new(&mut w, &k.record_key()[..], DEFAULT_LOG2_RECORD).map_err(io)?;
                    // The image's own hash, sealed in the manifest for the device's record.
                    let mut image = DigestReader {
                        inner: &mut input,
                        digester: Digester::new(&[HashAlgorithm::Sha256]),
                    };
                    installed = compress(&mut image, &mut e, add.compression).map_err(io)?;
                    let image_sha256 = image.digester.finish().1.remove("sha256").unwrap_or_default();
                    Some((e.finish().map_err(io)?.1, image_sha256))
                }
            };
            w.inner.flush().map_err(io)?;
            (w.digester, plain)
        };
        let (length, hashes) = digester.finish();
        let names: Vec<PathBuf> = algs
            .iter()
            .map(|a| self.targets_dir().join(add.name.with_hash_prefix(&hashes[a.name()])))
            .collect();
        out.commit_to(&names[0])?;
        for extra in &names[1..] {
            if !extra.exists() {
                fs::hard_link(&names[0], extra).map_err(|source| Error::Io {
                    path: extra.clone(),
                    source,
                })?;
            }
        }
        let mut custom = add.custom.clone();
        // A compressed payload's manifest carries what it decompresses to, as counted here.
        if add.compression != Compression::None {
            if let Some(tern) = custom
                .as_mut()
                .and_then(|c| c.get_mut("tern"))
                .and_then(|t| t.as_object_mut())
            {
                tern.insert("installed_length".into(), installed.into());
            }
        }
        if let (Some(k), Some((plaintext_length, image_sha256))) = (&key, plaintext_length) {
            let invalid = |reason: &str| Error::Invalid {
                what: format!("target `{}`", add.name),
                reason: reason.to_owned(),
            };
            let image: [u8; 32] = hex::decode(&image_sha256)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| invalid("the image's SHA-256 was not computed"))?;
            // Encrypt, then sign: the manifest (signed with the targets) commits to the key,
            // the listed length and hashes are the ciphertext's.
            let encryption = Encryption {
                scheme: ENCRYPTION_SCHEME.into(),
                record_size: 1 << DEFAULT_LOG2_RECORD,
                key_wrap: keywrap::KEY_SCHEME.into(),
                key_commitment: k.commitment(),
                plaintext_length,
                image_sha256_sealed: Some(k.seal_digest(&image).map_err(|e| invalid(&e.to_string()))?),
            };
            let tern = custom
                .as_mut()
                .and_then(|c| c.get_mut("tern"))
                .and_then(|t| t.as_object_mut())
                .ok_or_else(|| invalid("Tern's manifest (`custom.tern`) is not an object"))?;
            tern.insert(
                "encryption".into(),
                serde_json::to_value(&encryption).map_err(|e| invalid(&e.to_string()))?,
            );
            let mut doc = Recipients::new(&hashes["sha256"], &encryption.key_commitment);
            for r in &add.encrypt_for {
                doc.add(keywrap::wrap(k, r).map_err(|e| Error::Invalid {
                    what: format!("recipient {}", r.kid()),
                    reason: e.to_string(),
                })?);
            }
            self.write_recipients(&doc)?;
        }
        Ok(TargetFile {
            length,
            hashes,
            custom,
            unrecognized: BTreeMap::new(),
        })
    }

    /// `recipients/SHA256.json`: the wrapped data keys of the encrypted payload with that hash.
    pub fn recipients_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("recipients").join(format!("{sha256}.json"))
    }

    /// Replace a payload's recipients document (not signed: see `tern_core::keywrap`).
    pub fn write_recipients(&self, doc: &Recipients) -> Result<()> {
        let path = self.recipients_path(&doc.sha256);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        tern_fs::atomic_write(&path, &doc.to_bytes(), 0o644)?;
        Ok(())
    }

    /// Stop listing a target. Its file stays: older snapshots may still name it.
    pub fn remove_target(
        &self,
        role: &str,
        name: &str,
        signers: &[SigningKey],
        now: DateTime,
    ) -> Result<Vec<RoleWrite>> {
        let auth = self.authority(role)?;
        require_signer(role, &auth, signers)?;
        let mut targets = self.latest::<Targets>(role)?.signed;
        if targets.targets.remove(name).is_none() {
            return Err(Error::NoSuchTarget {
                role: role.into(),
                target: name.into(),
            });
        }
        Ok(vec![self.write_targets(role, targets, &auth, signers, now)?])
    }

    fn role_exists(&self, name: &str) -> Result<bool> {
        Ok(!self.versions(name)?.is_empty() || self.targets_roles()?.iter().any(|(n, _)| n == name))
    }

    fn new_empty_role(&self, role: &str, auth: &Authority, signers: &[SigningKey], now: DateTime) -> Result<RoleWrite> {
        let t = Targets {
            common: Common::new("targets", 0, now),
            targets: BTreeMap::new(),
            delegations: None,
            unrecognized: BTreeMap::new(),
        };
        self.write_targets(role, t, auth, signers, now)
    }

    /// Delegate path patterns (or hash prefixes) to a new role with its own keys and threshold.
    pub fn delegate(&self, d: &Delegation, signers: &[SigningKey], now: DateTime) -> Result<Vec<RoleWrite>> {
        check_new_role_name(&d.name)?;
        if self.role_exists(&d.name)? {
            return Err(Error::RoleExists { role: d.name.clone() });
        }
        check_threshold(&d.name, d.threshold, distinct(&d.keys).len())?;
        if d.paths.is_empty() == d.hash_prefixes.is_empty() {
            return Err(Error::Invalid {
                what: format!("delegation to `{}`", d.name),
                reason: "give either path patterns or hash prefixes".into(),
            });
        }
        if let Some(p) = d
            .hash_prefixes
            .iter()
            .find(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(Error::Invalid {
                what: format!("hash prefix `{p}`"),
                reason: "must be lowercase hex".into(),
            });
        }
        let from_auth = self.authority(&d.from)?;
        require_signer(&d.from, &from_auth, signers)?;
        let mut from = self.latest::<Targets>(&d.from)?.signed;
        let delegations = from.delegations.get_or_insert_with(|| Delegations {
            keys: BTreeMap::new(),
            roles: Some(Vec::new()),
            succinct_roles: None,
            unrecognized: BTreeMap::new(),
        });
        if delegations.succinct_roles.is_some() {
            return Err(Error::Invalid {
                what: format!("role `{}`", d.from),
                reason: "delegates to succinct hash bins; it cannot also delegate by name".into(),
            });
        }
        let mut keyids: Vec<KeyId> = d.keys.iter().map(PublicKey::keyid).collect();
        keyids.sort();
        keyids.dedup();
        for k in &d.keys {
            delegations.keys.insert(k.keyid(), k.clone());
        }
        delegations.roles.get_or_insert_with(Vec::new).push(DelegatedRole {
            name: d.name.clone(),
            keyids: keyids.clone(),
            threshold: d.threshold,
            terminating: d.terminating,
            paths: (!d.paths.is_empty()).then(|| d.paths.clone()),
            path_hash_prefixes: (!d.hash_prefixes.is_empty()).then(|| d.hash_prefixes.clone()),
            unrecognized: BTreeMap::new(),
        });
        let auth = Authority {
            keys: delegations.keys.clone(),
            keyids,
            threshold: d.threshold,
        };
        let child = self.new_empty_role(&d.name, &auth, signers, now)?;
        let parent = self.write_targets(&d.from, from, &from_auth, signers, now)?;
        Ok(vec![parent, child])
    }

    /// Delegate every path to `2^bit_length` hash bins (TAP 15 succinct delegation).
    pub fn delegate_bins(&self, b: &HashBins, signers: &[SigningKey], now: DateTime) -> Result<Vec<RoleWrite>> {
        check_new_role_name(&b.name_prefix)?;
        if !(1..=16).contains(&b.bit_length) {
            return Err(Error::Invalid {
                what: format!("--succinct-bits {}", b.bit_length),
                reason: "must be 1 to 16".into(),
            });
        }
        check_threshold(&b.name_prefix, b.threshold, distinct(&b.keys).len())?;
        let from_auth = self.authority(&b.from)?;
        require_signer(&b.from, &from_auth, signers)?;
        let mut from = self.latest::<Targets>(&b.from)?.signed;
        if from.delegations.is_some() {
            return Err(Error::Invalid {
                what: format!("role `{}`", b.from),
                reason: "delegates already; succinct bins must be its only delegation".into(),
            });
        }
        let mut keyids: Vec<KeyId> = b.keys.iter().map(PublicKey::keyid).collect();
        keyids.sort();
        keyids.dedup();
        let succinct = SuccinctRoles {
            keyids: keyids.clone(),
            threshold: b.threshold,
            bit_length: b.bit_length,
            name_prefix: b.name_prefix.clone(),
            unrecognized: BTreeMap::new(),
        };
        let auth = Authority {
            keys: b.keys.iter().map(|k| (k.keyid(), k.clone())).collect(),
            keyids,
            threshold: b.threshold,
        };
        require_signer(&b.name_prefix, &auth, signers)?;
        let mut writes = Vec::new();
        for bin in 0..succinct.bins() {
            let name = succinct.bin_name(bin as u32);
            if self.role_exists(&name)? {
                return Err(Error::RoleExists { role: name });
            }
            writes.push(self.new_empty_role(&name, &auth, signers, now)?);
        }
        from.delegations = Some(Delegations {
            keys: auth.keys.clone(),
            roles: None,
            succinct_roles: Some(succinct),
            unrecognized: BTreeMap::new(),
        });
        writes.insert(0, self.write_targets(&b.from, from, &from_auth, signers, now)?);
        Ok(writes)
    }

    /// Add the given keys' signatures to the newest version of `role`, without changing it.
    pub fn sign(&self, role: &str, signers: &[SigningKey]) -> Result<Vec<RoleWrite>> {
        if role == "root" {
            let root = self.root()?;
            let mut auths = vec![("root".to_owned(), self.top_authority(&root.signed, "root")?)];
            if root.version() > 1 {
                let prev: Signed<Root> = self.parse("root", &self.role_file("root", root.version() - 1))?;
                auths.push(("root (previous keys)".into(), self.top_authority(&prev.signed, "root")?));
            }
            return self.sign_root(root, &auths, signers);
        }
        let auth = self.authority(role)?;
        require_signer(role, &auth, signers)?;
        let (mut env, version) = match role {
            "timestamp" => {
                let t: Signed<Timestamp> = self.latest(role)?;
                let v = t.version();
                (t.envelope, v)
            }
            "snapshot" => {
                let s: Signed<Snapshot> = self.latest(role)?;
                let v = s.version();
                (s.envelope, v)
            }
            _ => {
                let t: Signed<Targets> = self.latest(role)?;
                let v = t.version();
                (t.envelope, v)
            }
        };
        sign_with(role, &mut env, &auth, signers)?;
        let report = write_report(role, &env, version, &auth)?;
        self.write_role(role, &env, version, report.complete())?;
        Ok(vec![report])
    }

    /// Sign a root with every signer any of `auths` accepts, write it, report each threshold.
    fn sign_root(
        &self,
        root: Signed<Root>,
        auths: &[(String, Authority)],
        signers: &[SigningKey],
    ) -> Result<Vec<RoleWrite>> {
        let version = root.version();
        let mut env = root.envelope;
        let mut used = 0;
        for key in signers {
            let id = key.public().keyid();
            if auths.iter().any(|(_, a)| a.keyids.contains(&id)) {
                env.sign("root", key)?;
                used += 1;
            }
        }
        if used == 0 {
            return Err(Error::NoSigner {
                role: "root".into(),
                authorised: auths.iter().flat_map(|(_, a)| a.keyids.clone()).collect(),
            });
        }
        let reports = auths
            .iter()
            .map(|(name, a)| {
                Ok(RoleWrite {
                    role: name.clone(),
                    version,
                    valid: a.count("root", &env)?,
                    threshold: a.threshold,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Published only once both the previous and the new root thresholds are met.
        self.write_role("root", &env, version, reports.iter().all(RoleWrite::complete))?;
        Ok(reports)
    }

    /// Change a role's keys or threshold.
    ///
    /// For a top-level role this writes root N+1, signed by whichever given keys the old or
    /// the new root accepts (clients need both thresholds); a targets rotation also re-signs
    /// targets with the new keys when they are given. For a delegated role it edits the
    /// delegator and re-signs the role with its new keys.
    pub fn rotate(&self, r: &Rotation, signers: &[SigningKey], now: DateTime) -> Result<Vec<RoleWrite>> {
        if tern_core::TOP_LEVEL_ROLES.contains(&r.role.as_str()) {
            return self.rotate_top(r, signers, now);
        }
        let delegator = self.delegator_of(&r.role)?;
        let from_auth = self.authority(&delegator.name)?;
        require_signer(&delegator.name, &from_auth, signers)?;
        let mut from = delegator.signed.signed;
        let d = from
            .delegations
            .as_mut()
            .ok_or_else(|| Error::UnknownRole { role: r.role.clone() })?;
        let entry = d
            .roles
            .iter_mut()
            .flatten()
            .find(|x| x.name == r.role)
            .ok_or_else(|| Error::Invalid {
                what: format!("role `{}`", r.role),
                reason: "is a succinct hash bin; rotate the bins' keys by re-delegating".into(),
            })?;
        apply_rotation(&r.role, &mut entry.keyids, &mut entry.threshold, r)?;
        let auth = Authority {
            keys: BTreeMap::new(),
            keyids: entry.keyids.clone(),
            threshold: entry.threshold,
        };
        for k in &r.add {
            d.keys.insert(k.keyid(), k.clone());
        }
        let referenced: Vec<KeyId> = d.roles.iter().flatten().flat_map(|x| x.keyids.clone()).collect();
        d.keys.retain(|id, _| referenced.contains(id));
        let auth = Authority {
            keys: d.keys.clone(),
            ..auth
        };
        let mut writes = vec![self.write_targets(&delegator.name, from, &from_auth, signers, now)?];
        if require_signer(&r.role, &auth, signers).is_ok() {
            let current = self.latest::<Targets>(&r.role)?.signed;
            writes.push(self.write_targets(&r.role, current, &auth, signers, now)?);
        }
        Ok(writes)
    }

    fn rotate_top(&self, r: &Rotation, signers: &[SigningKey], now: DateTime) -> Result<Vec<RoleWrite>> {
        let old = self.root()?;
        let old_auth = self.top_authority(&old.signed, "root")?;
        let mut root = old.signed.clone();
        let entry = root
            .roles
            .get_mut(&r.role)
            .ok_or_else(|| Error::UnknownRole { role: r.role.clone() })?;
        apply_rotation(&r.role, &mut entry.keyids, &mut entry.threshold, r)?;
        for k in &r.add {
            root.keys.insert(k.keyid(), k.clone());
        }
        let referenced: Vec<KeyId> = root.roles.values().flat_map(|x| x.keyids.clone()).collect();
        root.keys.retain(|id, _| referenced.contains(id));
        let version = old.version() + 1;
        root.common.version = version;
        root.common.expires = self.expires("root", now).to_string();
        let new_auth = self.top_authority(&root, "root")?;
        let env = Envelope::new(&root)?;
        let signed = Signed {
            envelope: env,
            signed: root.clone(),
        };
        let mut writes = self.sign_root(
            signed,
            &[("root".into(), new_auth), ("root (previous keys)".into(), old_auth)],
            signers,
        )?;
        if r.role == "targets" {
            let auth = self.top_authority(&root, "targets")?;
            if require_signer("targets", &auth, signers).is_ok() {
                let current = self.latest::<Targets>("targets")?.signed;
                writes.push(self.write_targets("targets", current, &auth, signers, now)?);
            }
        }
        Ok(writes)
    }

    /// Write a new snapshot (unless `timestamp_only`) and timestamp.
    ///
    /// Refuses when root or any targets role lacks its threshold of signatures: publishing
    /// it would only make clients fail.
    pub fn refresh(&self, signers: &[SigningKey], now: DateTime, timestamp_only: bool) -> Result<Vec<RoleWrite>> {
        let root = self.root()?;
        let ts_auth = self.top_authority(&root.signed, "timestamp")?;
        require_signer("timestamp", &ts_auth, signers)?;
        let mut writes = Vec::new();
        if !timestamp_only {
            let snap_auth = self.top_authority(&root.signed, "snapshot")?;
            require_signer("snapshot", &snap_auth, signers)?;
            self.require_complete_root(&root)?;
            let mut meta = BTreeMap::new();
            let mut parents: BTreeMap<String, Targets> = BTreeMap::new();
            let root_targets = self.top_authority(&root.signed, "targets")?;
            for (role, parent) in self.targets_roles()? {
                let t: Signed<Targets> = self.latest(&role)?;
                let auth = match parent {
                    None => root_targets.clone(),
                    Some(p) => {
                        if !parents.contains_key(&p) {
                            let pt = self.latest::<Targets>(&p)?.signed;
                            parents.insert(p.clone(), pt);
                        }
                        crate::store::delegated_authority(&parents[&p], &role)
                            .ok_or_else(|| Error::UnknownRole { role: role.clone() })?
                    }
                };
                let valid = auth.count(&role, &t.envelope)?;
                if valid < auth.threshold {
                    return Err(Error::Unsigned {
                        role,
                        version: t.version(),
                        valid,
                        threshold: auth.threshold,
                    });
                }
                meta.insert(
                    format!("{role}.json"),
                    MetaFile {
                        version: t.version(),
                        length: None,
                        hashes: None,
                        unrecognized: BTreeMap::new(),
                    },
                );
            }
            let version = self.next_version("snapshot")?;
            let snapshot = Snapshot {
                common: Common::new("snapshot", version, self.expires("snapshot", now)),
                meta,
                unrecognized: BTreeMap::new(),
            };
            let mut env = Envelope::new(&snapshot)?;
            sign_with("snapshot", &mut env, &snap_auth, signers)?;
            let report = write_report("snapshot", &env, version, &snap_auth)?;
            self.write_role("snapshot", &env, version, report.complete())?;
            let complete = report.complete();
            writes.push(report);
            if !complete {
                // A timestamp pointing at it would name bytes that change when the snapshot
                // is signed again; `tern repo sign --role snapshot` then `refresh
                // --timestamp-only` completes the publication.
                return Ok(writes);
            }
        }
        let snap_version = *self.versions("snapshot")?.last().ok_or_else(|| Error::UnknownRole {
            role: "snapshot".into(),
        })?;
        let snap_bytes = self.read_bytes(&self.role_path("snapshot", snap_version))?;
        let snap_env = Envelope::parse("snapshot", &snap_bytes)?;
        let snap_auth = self.top_authority(&root.signed, "snapshot")?;
        let valid = snap_auth.count("snapshot", &snap_env)?;
        if valid < snap_auth.threshold {
            return Err(Error::Unsigned {
                role: "snapshot".into(),
                version: snap_version,
                valid,
                threshold: snap_auth.threshold,
            });
        }
        let previous = match self.latest::<Timestamp>("timestamp") {
            Ok(t) => t.version(),
            Err(Error::UnknownRole { .. }) => 0,
            Err(e) => return Err(e),
        };
        let version = previous + 1;
        let timestamp = Timestamp {
            common: Common::new("timestamp", version, self.expires("timestamp", now)),
            meta: [(
                "snapshot.json".to_owned(),
                MetaFile {
                    version: snap_version,
                    length: Some(snap_bytes.len() as u64),
                    hashes: Some(tern_core::digest::hashes_of(&snap_bytes, &[HashAlgorithm::Sha256])),
                    unrecognized: BTreeMap::new(),
                },
            )]
            .into(),
            unrecognized: BTreeMap::new(),
        };
        let mut env = Envelope::new(&timestamp)?;
        sign_with("timestamp", &mut env, &ts_auth, signers)?;
        let report = write_report("timestamp", &env, version, &ts_auth)?;
        self.write_role("timestamp", &env, version, report.complete())?;
        writes.push(report);
        Ok(writes)
    }

    fn require_complete_root(&self, root: &Signed<Root>) -> Result<()> {
        let mut checks = vec![self.top_authority(&root.signed, "root")?];
        if root.version() > 1 {
            let prev: Signed<Root> = self.parse("root", &self.role_file("root", root.version() - 1))?;
            checks.push(self.top_authority(&prev.signed, "root")?);
        }
        for auth in checks {
            let valid = auth.count("root", &root.envelope)?;
            if valid < auth.threshold {
                return Err(Error::Unsigned {
                    role: "root".into(),
                    version: root.version(),
                    valid,
                    threshold: auth.threshold,
                });
            }
        }
        Ok(())
    }

    /// Verify the repository from its first root and collect what a bundle of `targets` needs.
    pub fn release_contents(
        &self,
        targets: &[TargetPath],
        include_freshness: bool,
        now: DateTime,
    ) -> Result<ReleaseContents> {
        let roots = self.root_chain()?;
        let first = roots
            .first()
            .map(|(_, b)| b.clone())
            .ok_or_else(|| Error::NotARepository { dir: self.dir.clone() })?;
        let mut source = DirSource {
            repo: self,
            freshness: include_freshness,
        };
        let freshness = if include_freshness {
            Freshness::Required
        } else {
            Freshness::IfPresent
        };
        let mut trusted = TrustedRepository::load(&first, &mut source, now, freshness)?;
        let mut payloads = Vec::new();
        let mut recipients = Vec::new();
        for t in targets {
            let found = trusted.find_target(&mut source, t.as_str())?;
            let sha256 = found.file.hashes.get("sha256").ok_or_else(|| Error::Invalid {
                what: format!("target `{t}`"),
                reason: "lists no sha256 hash".into(),
            })?;
            let encrypted = tern_core::manifest::Manifest::from_custom(t.as_str(), found.file.custom.as_ref())?
                .is_some_and(|m| m.encryption.is_some());
            if encrypted {
                let path = self.recipients_path(sha256);
                recipients.push((sha256.clone(), self.read_bytes(&path)?));
            }
            payloads.push(Payload {
                target: t.clone(),
                source: self.targets_dir().join(t.with_hash_prefix(sha256)),
            });
        }
        let mut delegated = Vec::new();
        for (name, signed) in trusted.verified_roles().skip(1) {
            delegated.push((
                name.to_owned(),
                self.read_bytes(&self.role_path(name, signed.version()))?,
            ));
        }
        let read_versioned = |role: &str, v: u64| self.read_bytes(&self.role_path(role, v));
        Ok(ReleaseContents {
            roots,
            timestamp: match trusted.timestamp() {
                Some(t) => Some(read_versioned("timestamp", t.version())?),
                None => None,
            },
            snapshot: match trusted.snapshot() {
                Some(s) => Some(read_versioned("snapshot", s.version())?),
                None => None,
            },
            targets: read_versioned("targets", trusted.targets().version())?,
            delegated,
            payloads,
            recipients,
        })
    }
}

struct DirSource<'a> {
    repo: &'a Repository,
    freshness: bool,
}

impl MetadataSource for DirSource<'_> {
    fn fetch(&mut self, role: &str, version: Option<u64>) -> Option<Vec<u8>> {
        if matches!(role, "timestamp" | "snapshot") && !self.freshness {
            return None;
        }
        let version = match version {
            Some(v) => v,
            None if role == "timestamp" => 0,
            None => *self.repo.versions(role).ok()?.last()?,
        };
        fs::read(self.repo.role_path(role, version)).ok()
    }
}

fn apply_rotation(role: &str, keyids: &mut Vec<KeyId>, threshold: &mut u32, r: &Rotation) -> Result<()> {
    for id in &r.remove {
        if !keyids.contains(id) {
            return Err(Error::Invalid {
                what: format!("--remove-key {id}"),
                reason: format!("is not a key of role `{role}`"),
            });
        }
    }
    keyids.retain(|id| !r.remove.contains(id));
    for k in &r.add {
        let id = k.keyid();
        if !keyids.contains(&id) {
            keyids.push(id);
        }
    }
    keyids.sort();
    if let Some(t) = r.threshold {
        *threshold = t;
    }
    check_threshold(role, *threshold, keyids.len())
}

fn write_report(role: &str, env: &Envelope, version: u64, auth: &Authority) -> Result<RoleWrite> {
    Ok(RoleWrite {
        role: role.to_owned(),
        version,
        valid: auth.count(role, env)?,
        threshold: auth.threshold,
    })
}
