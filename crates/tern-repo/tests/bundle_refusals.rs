//! Every way a bundle can be wrong, each refused with its exact error variant.
//!
//! A repository is built with the real repository editor; the bad bundles are made by
//! altering what goes into the bundle writer (the tampering harness), or by writing raw tar
//! entries where the writer itself would refuse.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use tern_bundle::{verify_bundle, write_bundle, Error as BundleError, ReleaseContents};
use tern_core::digest::HashAlgorithm;
use tern_core::manifest::Compression;
use tern_core::metadata::{Envelope, RoleType, Root, Signed, Snapshot};
use tern_core::trust::Freshness;
use tern_core::{DateTime, Error as CoreError, KeyAlgorithm, PublicKey, SigningKey, TargetPath};
use tern_repo::{AddTarget, RepoConfig, Repository, Rotation};

const DAY: i64 = 86_400;

fn now() -> DateTime {
    DateTime::parse("2026-11-22T12:00:00Z").unwrap()
}

struct Keys {
    root: SigningKey,
    targets: Vec<SigningKey>,
    snapshot: SigningKey,
    timestamp: SigningKey,
}

/// A repository with one payload, and every key of it (signing keys are not `Clone`: the
/// fixture keeps their PKCS#8 PEM to load fresh copies).
struct Fixture {
    _dir: tempfile::TempDir,
    repo: Repository,
    keys: Keys,
    signers: Vec<SigningKey>,
    pems: Vec<zeroize::Zeroizing<String>>,
    payload: PathBuf,
    name: TargetPath,
}

impl Fixture {
    /// A repository with one payload; targets threshold `threshold` of `n_targets` keys.
    fn new(n_targets: usize, threshold: u32, at: DateTime) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (keys, signers, pems) = keys_and_signers(n_targets);
        let mut roles = BTreeMap::new();
        roles.insert("root".to_owned(), (vec![keys.root.public().clone()], 1));
        roles.insert(
            "targets".to_owned(),
            (keys.targets.iter().map(|k| k.public().clone()).collect(), threshold),
        );
        roles.insert("snapshot".to_owned(), (vec![keys.snapshot.public().clone()], 1));
        roles.insert("timestamp".to_owned(), (vec![keys.timestamp.public().clone()], 1));
        let (repo, _) =
            Repository::init(&dir.path().join("repo"), &roles, RepoConfig::default(), &signers, at).unwrap();
        let payload = dir.path().join("rootfs.img");
        fs::write(&payload, vec![7u8; 300_000]).unwrap();
        let name = TargetPath::new("images/rootfs.img").unwrap();
        let mut f = Fixture {
            _dir: dir,
            repo,
            keys,
            signers,
            pems,
            payload,
            name,
        };
        f.add(&f.name.clone(), at);
        f.repo.refresh(&f.signers, at, false).unwrap();
        f
    }

    fn add(&mut self, name: &TargetPath, at: DateTime) {
        self.repo
            .add_target(
                &AddTarget {
                    role: "targets".into(),
                    name: name.clone(),
                    source: self.payload.clone(),
                    custom: None,
                    hashes: vec![HashAlgorithm::Sha256],
                    compression: Compression::None,
                    encrypt_for: Vec::new(),
                },
                &self.signers,
                at,
            )
            .unwrap();
    }

    fn contents(&self, freshness: bool) -> ReleaseContents {
        self.repo
            .release_contents(std::slice::from_ref(&self.name), freshness, now())
            .unwrap()
    }

    fn root_v1(&self) -> Vec<u8> {
        fs::read(self.repo.metadata_dir().join("1.root.json")).unwrap()
    }

    fn verify(&self, contents: &ReleaseContents) -> Result<tern_bundle::VerifyReport, BundleError> {
        let out = self.repo.dir().join("../test.tern");
        write_bundle(contents, &out).unwrap();
        verify_bundle(
            fs::File::open(&out).unwrap(),
            &self.root_v1(),
            now(),
            Freshness::IfPresent,
        )
    }
}

/// The same keys twice: by role for re-signing in tests, and as one list for the repository.
fn keys_and_signers(n_targets: usize) -> (Keys, Vec<SigningKey>, Vec<zeroize::Zeroizing<String>>) {
    let pems: Vec<_> = (0..3 + n_targets)
        .map(|_| SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().1)
        .collect();
    let load = |i: usize| SigningKey::from_pkcs8_pem(pems[i].as_bytes()).unwrap();
    let keys = Keys {
        root: load(0),
        snapshot: load(1),
        timestamp: load(2),
        targets: (3..3 + n_targets).map(load).collect(),
    };
    let signers = (0..3 + n_targets).map(load).collect();
    (keys, signers, pems)
}

fn resign<T: RoleType>(role: &str, value: &T, keys: &[&SigningKey]) -> Vec<u8> {
    let mut env = Envelope::new(value).unwrap();
    for k in keys {
        env.sign(role, k).unwrap();
    }
    env.to_bytes()
}

fn core(e: &BundleError) -> &CoreError {
    e.core().unwrap_or_else(|| panic!("expected a core error, got {e:?}"))
}

#[test]
fn a_good_bundle_verifies_with_and_without_freshness() {
    let f = Fixture::new(1, 1, now());
    for freshness in [true, false] {
        let report = f.verify(&f.contents(freshness)).unwrap();
        assert_eq!(report.payloads.len(), 1);
        assert_eq!(report.payloads[0].length, 300_000);
        assert_eq!(report.timestamp_version.is_some(), freshness);
    }
}

#[test]
fn a_bad_signature_is_refused() {
    let f = Fixture::new(1, 1, now());
    let mut c = f.contents(false);
    let mut env = Envelope::parse("targets", &c.targets).unwrap();
    let sig = &mut env.signatures[0].sig;
    let flipped = if sig.starts_with('0') { "1" } else { "0" };
    sig.replace_range(0..1, flipped);
    c.targets = env.to_bytes();
    let e = f.verify(&c).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::BadSignature { role, .. } if role == "targets"),
        "{e:?}"
    );
}

#[test]
fn signatures_below_threshold_are_refused() {
    let f = Fixture::new(2, 2, now());
    let mut c = f.contents(false);
    let mut env = Envelope::parse("targets", &c.targets).unwrap();
    env.signatures.truncate(1);
    c.targets = env.to_bytes();
    let e = f.verify(&c).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::BelowThreshold { role, valid: 1, threshold: 2 } if role == "targets"),
        "{e:?}"
    );
}

#[test]
fn one_key_listed_twice_counts_once() {
    let f = Fixture::new(1, 1, now());
    let mut c = f.contents(false);
    // Root lists the targets key a second time under another (correct) key id: the same key
    // object plus an unknown field. Threshold 2, both ids sign: still one key.
    let mut root: Signed<Root> = Signed::parse("root", &c.roots[0].1).unwrap();
    let k = f.keys.targets[0].public();
    let mut twin = k.to_value().clone();
    twin["x-twin"] = serde_json::json!(true);
    let twin = PublicKey::from_value("root", &twin).unwrap();
    root.signed.keys.insert(twin.keyid(), twin.clone());
    let role = root.signed.roles.get_mut("targets").unwrap();
    role.keyids.push(twin.keyid());
    role.threshold = 2;
    root.signed.common.version = 2;
    c.roots.push((2, resign("root", &root.signed, &[&f.keys.root])));
    let mut env = Envelope::parse("targets", &c.targets).unwrap();
    let sig = env.signatures[0].sig.clone();
    env.signatures.push(tern_core::metadata::SignatureEntry {
        keyid: twin.keyid(),
        sig,
    });
    c.targets = env.to_bytes();
    let e = f.verify(&c).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::BelowThreshold { role, valid: 1, threshold: 2 } if role == "targets"),
        "{e:?}"
    );
}

#[test]
fn the_wrong_role_type_is_refused() {
    let f = Fixture::new(1, 1, now());
    let mut c = f.contents(true);
    // A snapshot document, validly signed by the timestamp key, offered as the timestamp.
    let snap: Signed<Snapshot> = Signed::parse("snapshot", c.snapshot.as_ref().unwrap()).unwrap();
    c.timestamp = Some(resign("timestamp", &snap.signed, &[&f.keys.timestamp]));
    let e = f.verify(&c).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::WrongRoleType { role, found, .. } if role == "timestamp" && found == "snapshot"),
        "{e:?}"
    );
}

#[test]
fn expired_metadata_is_refused() {
    // Built 100 days ago: targets (90 days) has expired, root (365 days) has not.
    let f = Fixture::new(1, 1, now().plus_secs(-100 * DAY));
    let e = f
        .verify(
            &f.repo
                .release_contents(std::slice::from_ref(&f.name), false, now().plus_secs(-100 * DAY))
                .unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(core(&e), CoreError::Expired { role, .. } if role == "targets"),
        "{e:?}"
    );
}

#[test]
fn a_version_other_than_snapshot_names_is_refused() {
    let mut f = Fixture::new(1, 1, now());
    let old_targets = f.contents(true).targets;
    f.add(&TargetPath::new("images/other.img").unwrap(), now());
    f.repo.refresh(&f.signers, now(), false).unwrap();
    let mut c = f.contents(true);
    c.targets = old_targets;
    let e = f.verify(&c).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::VersionMismatch { role, expected: 3, found: 2 } if role == "targets"),
        "{e:?}"
    );
}

#[test]
fn an_unknown_key_type_is_refused() {
    let f = Fixture::new(1, 1, now());
    let mut c = f.contents(false);
    let mut root: Signed<Root> = Signed::parse("root", &c.roots[0].1).unwrap();
    let future = PublicKey::from_value(
        "root",
        &serde_json::json!({"keytype": "x-future", "scheme": "x-future", "keyval": {"public": "00"}}),
    )
    .unwrap();
    root.signed.keys.insert(future.keyid(), future.clone());
    root.signed.roles.get_mut("targets").unwrap().keyids = vec![future.keyid()];
    root.signed.common.version = 2;
    c.roots.push((2, resign("root", &root.signed, &[&f.keys.root])));
    let mut env = Envelope::parse("targets", &c.targets).unwrap();
    env.signatures = vec![tern_core::metadata::SignatureEntry {
        keyid: future.keyid(),
        sig: "00".repeat(64),
    }];
    c.targets = env.to_bytes();
    let e = f.verify(&c).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::UnsupportedKey { role, keytype, .. } if role == "targets" && keytype == "x-future"),
        "{e:?}"
    );
}

fn bundle_bytes(f: &Fixture) -> (PathBuf, Vec<u8>) {
    let out = f.repo.dir().join("../good.tern");
    write_bundle(&f.contents(true), &out).unwrap();
    let bytes = fs::read(&out).unwrap();
    (out, bytes)
}

fn verify_bytes(f: &Fixture, bytes: &[u8]) -> Result<tern_bundle::VerifyReport, BundleError> {
    verify_bundle(bytes, &f.root_v1(), now(), Freshness::IfPresent)
}

#[test]
fn one_tampered_payload_byte_is_refused() {
    let f = Fixture::new(1, 1, now());
    let (_, mut bytes) = bundle_bytes(&f);
    // The payload is the last entry: 300,000 bytes of 7 before the tar trailer.
    let at = bytes.len() - 1024 - 512 - 1000;
    assert_eq!(bytes[at], 7);
    bytes[at] ^= 0x80;
    let e = verify_bytes(&f, &bytes).unwrap_err();
    assert!(
        matches!(&e, BundleError::Payload { target, .. } if target == "images/rootfs.img"),
        "{e:?}"
    );
    assert!(
        matches!(core(&e), CoreError::HashMismatch { algorithm, .. } if algorithm == "sha256"),
        "{e:?}"
    );
}

#[test]
fn a_truncated_bundle_is_refused() {
    let f = Fixture::new(1, 1, now());
    let (_, bytes) = bundle_bytes(&f);
    // Cut inside the payload, at the end of the payload, and inside the metadata.
    for cut in [bytes.len() - 100_000, bytes.len() - 1024 - 512, 700] {
        let e = verify_bytes(&f, &bytes[..cut]).unwrap_err();
        assert!(matches!(e, BundleError::Truncated { .. }), "cut at {cut}: {e:?}");
    }
}

/// Write a tar by hand, since the tar crate refuses names with `..`.
fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn a_target_name_that_escapes_is_refused() {
    let f = Fixture::new(1, 1, now());
    let c = f.contents(false);
    let header = br#"{"format": "tern-bundle", "format_version": 1, "payloads": ["../escape"]}"#;
    let bytes = raw_tar(&[
        ("tern-bundle.json", header),
        ("metadata/1.root.json", &c.roots[0].1),
        ("metadata/targets.json", &c.targets),
        ("payloads/../escape", b"x"),
    ]);
    let e = verify_bytes(&f, &bytes).unwrap_err();
    assert!(
        matches!(core(&e), CoreError::BadTargetName { name, .. } if name == "../escape"),
        "{e:?}"
    );
}

#[test]
fn a_root_chain_that_does_not_lead_back_is_refused() {
    let a = Fixture::new(1, 1, now());
    let b = Fixture::new(1, 1, now());
    // Repository B's bundle checked with repository A's root.
    let (_, bytes) = bundle_bytes(&b);
    let e = verify_bytes(&a, &bytes).unwrap_err();
    assert!(matches!(e, BundleError::RootChain { version: 1, .. }), "{e:?}");

    // A's own chain, where 2.root.json is signed by the new root key only.
    let new_root = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0;
    let mut c = a.contents(false);
    let mut root: Signed<Root> = Signed::parse("root", &c.roots[0].1).unwrap();
    root.signed
        .keys
        .insert(new_root.public().keyid(), new_root.public().clone());
    root.signed.roles.get_mut("root").unwrap().keyids = vec![new_root.public().keyid()];
    root.signed.common.version = 2;
    c.roots.push((2, resign("root", &root.signed, &[&new_root])));
    let e = a.verify(&c).unwrap_err();
    assert!(matches!(e, BundleError::RootChain { version: 2, .. }), "{e:?}");
    assert!(
        matches!(core(&e), CoreError::BelowThreshold { role, .. } if role == "root"),
        "{e:?}"
    );
}

#[test]
fn a_rotated_root_is_followed_from_version_one() {
    let f = Fixture::new(1, 1, now());
    let new_root = SigningKey::generate(KeyAlgorithm::Ed25519).unwrap();
    let rot = Rotation {
        role: "root".into(),
        add: vec![new_root.0.public().clone()],
        remove: vec![f.keys.root.public().keyid()],
        threshold: None,
    };
    let mut signers: Vec<SigningKey> = f
        .pems
        .iter()
        .map(|p| SigningKey::from_pkcs8_pem(p.as_bytes()).unwrap())
        .collect();
    signers.push(new_root.0);
    let writes = f.repo.rotate(&rot, &signers, now()).unwrap();
    assert!(writes.iter().all(|w| w.complete()), "{writes:?}");
    f.repo.refresh(&signers, now(), false).unwrap();
    let report = f.verify(&f.contents(true)).unwrap();
    assert_eq!(report.root_version, 2);
    // A device that already trusts root 2 verifies the same bundle.
    let root2 = fs::read(f.repo.metadata_dir().join("2.root.json")).unwrap();
    let out = f.repo.dir().join("../rotated.tern");
    write_bundle(&f.contents(true), &out).unwrap();
    verify_bundle(fs::File::open(&out).unwrap(), &root2, now(), Freshness::Required).unwrap();
}
