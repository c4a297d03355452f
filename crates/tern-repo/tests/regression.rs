//! Regressions found in review, each named after what it reproduces.

use std::collections::BTreeMap;
use std::fs;

use tern_core::digest::HashAlgorithm;
use tern_core::manifest::Compression;
use tern_core::trust::Freshness;
use tern_core::{DateTime, KeyAlgorithm, SigningKey, TargetPath};
use tern_repo::{AddTarget, Delegation, Error, RepoConfig, Repository};

fn now() -> DateTime {
    DateTime::parse("2026-11-22T12:00:00Z").unwrap()
}

fn key() -> SigningKey {
    SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0
}

fn repo(dir: &std::path::Path, signers: &[SigningKey]) -> Repository {
    let roles: BTreeMap<String, _> = tern_core::TOP_LEVEL_ROLES
        .iter()
        .map(|r| (r.to_string(), (vec![signers[0].public().clone()], 1)))
        .collect();
    Repository::init(&dir.join("repo"), &roles, RepoConfig::default(), signers, now())
        .unwrap()
        .0
}

fn delegate(repo: &Repository, name: &str, path: &str, terminating: bool, k: &SigningKey, signers: &[SigningKey]) {
    repo.delegate(
        &Delegation {
            from: "targets".into(),
            name: name.into(),
            keys: vec![k.public().clone()],
            threshold: 1,
            terminating,
            paths: vec![path.into()],
            hash_prefixes: vec![],
        },
        signers,
        now(),
    )
    .unwrap();
}

#[test]
fn a_terminating_role_with_a_double_star_pattern_cannot_be_bypassed() {
    // targets → A (`firmware-**`, terminating), then B (`*`). B lists firmware-1.bin. The
    // search must stop at A, as python-tuf's fnmatch does, and find nothing.
    let d = tempfile::tempdir().unwrap();
    let signers = [key(), key(), key()];
    let repo = repo(d.path(), &signers);
    delegate(&repo, "role-a", "firmware-**", true, &signers[1], &signers);
    delegate(&repo, "role-b", "*", false, &signers[2], &signers);
    let file = d.path().join("fw.bin");
    fs::write(&file, b"firmware").unwrap();
    let name = TargetPath::new("firmware-1.bin").unwrap();
    let add = AddTarget {
        role: "role-b".into(),
        name: name.clone(),
        source: file,
        custom: None,
        hashes: vec![HashAlgorithm::Sha256],
        compression: Compression::None,
        encrypt_for: Vec::new(),
    };
    // The editor runs the clients' search: role-a, terminating, takes firmware-* first, so
    // role-b would never be trusted for it, and the target is refused.
    let err = repo.add_target(&add, &signers, now()).unwrap_err();
    assert!(
        matches!(&err, Error::NotDelegated { role, .. } if role == "role-b"),
        "{err:?}"
    );
    // And nothing a client could reach lists it.
    repo.refresh(&signers, now(), false).unwrap();
    let err = repo.release_contents(&[name], true, now()).unwrap_err();
    assert!(
        matches!(&err, Error::Core(e) if e.kind() == "TargetNotFound"),
        "{err:?}"
    );
}

#[test]
fn the_same_key_given_twice_does_not_satisfy_a_threshold_of_two() {
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let mut roles: BTreeMap<String, _> = tern_core::TOP_LEVEL_ROLES
        .iter()
        .map(|r| (r.to_string(), (vec![k.public().clone()], 1)))
        .collect();
    roles.insert("root".into(), (vec![k.public().clone(), k.public().clone()], 2));
    let err = Repository::init(&d.path().join("repo"), &roles, RepoConfig::default(), &[k], now()).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { reason, .. } if reason.contains("number of keys (1)")),
        "{err:?}"
    );
    assert!(!d.path().join("repo/metadata").exists());
}

#[test]
fn a_snapshot_short_of_its_threshold_gets_no_timestamp() {
    let d = tempfile::tempdir().unwrap();
    let (k, s2) = (key(), key());
    let mut roles: BTreeMap<String, _> = tern_core::TOP_LEVEL_ROLES
        .iter()
        .map(|r| (r.to_string(), (vec![k.public().clone()], 1)))
        .collect();
    roles.insert("snapshot".into(), (vec![k.public().clone(), s2.public().clone()], 2));
    let signers = [k];
    let (repo, writes) =
        Repository::init(&d.path().join("repo"), &roles, RepoConfig::default(), &signers, now()).unwrap();
    let snap = writes.iter().find(|w| w.role == "snapshot").unwrap();
    assert_eq!((snap.valid, snap.threshold), (1, 2));
    assert!(!writes.iter().any(|w| w.role == "timestamp"), "{writes:?}");
    assert!(!repo.metadata_dir().join("timestamp.json").exists());
    // The second key signs; then the timestamp can be issued for the final bytes.
    repo.sign("snapshot", &[s2]).unwrap();
    repo.refresh(&signers, now(), true).unwrap();
    let root = fs::read(repo.metadata_dir().join("1.root.json")).unwrap();
    let ts = fs::read(repo.metadata_dir().join("timestamp.json")).unwrap();
    let mut set = tern_core::trusted_set::TrustedSet::new(&root, now()).unwrap();
    set.update_timestamp(&ts).unwrap();
    let snap = fs::read(repo.metadata_dir().join("1.snapshot.json")).unwrap();
    set.update_snapshot(&snap, false).unwrap();
}

#[test]
fn an_oversized_metadata_entry_is_refused_before_parsing() {
    let d = tempfile::tempdir().unwrap();
    let k = key();
    let signers = [k];
    let repo = repo(d.path(), &signers);
    let file = d.path().join("a.bin");
    fs::write(&file, b"a").unwrap();
    let name = TargetPath::new("a.bin").unwrap();
    repo.add_target(
        &AddTarget {
            role: "targets".into(),
            name: name.clone(),
            source: file,
            custom: None,
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::None,
            encrypt_for: Vec::new(),
        },
        &signers,
        now(),
    )
    .unwrap();
    repo.refresh(&signers, now(), false).unwrap();
    let mut c = repo.release_contents(&[name], false, now()).unwrap();
    // A timestamp entry far over its 16 KiB limit: refused by size, not parsed.
    c.timestamp = Some(vec![b' '; 100_000]);
    let out = d.path().join("big.tern");
    tern_bundle::write_bundle(&c, &out).unwrap();
    let root = fs::read(repo.metadata_dir().join("1.root.json")).unwrap();
    let err =
        tern_bundle::verify_bundle(fs::File::open(&out).unwrap(), &root, now(), Freshness::IfPresent).unwrap_err();
    assert!(
        matches!(&err, tern_bundle::Error::Format { entry, reason } if entry == "metadata/timestamp.json" && reason.contains("16384")),
        "{err:?}"
    );
}
