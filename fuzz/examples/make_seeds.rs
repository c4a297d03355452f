//! Writes the fixtures and the seeds that the project's library code can make: director
//! root, device key, recipients payload, and the seeds of `director_order`, `checkin`,
//! `enrollment`, `recipients`, `aead_stream`, `version_floors` and `http_range`.
//!
//! Run from `fuzz/`: `cargo run --example make_seeds` (stable is enough). Keys are fresh on
//! every run, so the fixtures and the signed seeds change together; commit both. The
//! bundle, repository metadata, tar and configuration seeds are made with the `tern`
//! binary and GNU tar instead (README.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;
use tern_core::director::{
    sign_document, CheckIn, DeploymentReport, Order, OrderTarget, Progress, SlotReport, Stage, CHECKIN_TYPE, ORDER_TYPE,
};
use tern_core::enrollment::{Enrollment, ENROLLMENT_TYPE};
use tern_core::keywrap::{self, DataKey, RecipientSecret, Recipients};
use tern_core::metadata::{Common, RoleKeys};
use tern_core::stream_aead::seal_all;
use tern_core::{DateTime, Envelope, KeyAlgorithm, Root, SigningKey};
use tern_fuzz::{AEAD_KEY, DEVICE_ID, FLOOR_KEYS, NONCE, ORDER_LENGTH, ORDER_SHA256, RECIPIENT_SECRET};

/// 2036-11-27: long after the reference time, like the repository fixtures.
const FAR: i64 = 2_111_364_000;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn write(rel: &str, bytes: &[u8]) {
    let p = base().join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    println!("{:6} {rel}", bytes.len());
}

fn key(alg: KeyAlgorithm) -> SigningKey {
    SigningKey::generate(alg).unwrap().0
}

fn director_root(online: &SigningKey, offline: &SigningKey) -> Vec<u8> {
    let mut keys = BTreeMap::new();
    keys.insert(online.public().keyid(), online.public().clone());
    keys.insert(offline.public().keyid(), offline.public().clone());
    let mut roles = BTreeMap::new();
    for (name, k) in [
        ("root", offline),
        ("targets", online),
        ("snapshot", online),
        ("timestamp", online),
    ] {
        roles.insert(
            name.to_owned(),
            RoleKeys {
                keyids: vec![k.public().keyid()],
                threshold: 1,
                unrecognized: BTreeMap::new(),
            },
        );
    }
    let root = Root {
        common: Common::new("root", 1, DateTime::from_unix(FAR)),
        consistent_snapshot: true,
        keys,
        roles,
        unrecognized: BTreeMap::new(),
    };
    let mut env = Envelope::new(&root).unwrap();
    env.sign("root", offline).unwrap();
    env.to_bytes()
}

fn target(name: &str, length: u64, sha256: &str) -> OrderTarget {
    OrderTarget {
        name: name.into(),
        length,
        hashes: BTreeMap::from([("sha256".into(), sha256.into())]),
    }
}

fn order(device: &str, nonce: &str, expires: i64, targets: Vec<OrderTarget>) -> Order {
    Order {
        kind: ORDER_TYPE.into(),
        device_id: device.into(),
        nonce: nonce.into(),
        deployment: "d-0001".into(),
        release: "1.1.0".into(),
        targets,
        expires: DateTime::from_unix(expires).to_string(),
    }
}

fn pretty(signed_doc: &[u8]) -> Vec<u8> {
    // Same signed object, other white space: the signature still holds (canonical form).
    let v: serde_json::Value = serde_json::from_slice(signed_doc).unwrap();
    let mut out = serde_json::to_vec_pretty(&v).unwrap();
    out.push(b'\n');
    out
}

fn main() {
    let now = tern_fuzz::NOW_UNIX;

    // director_order: the director root and orders.
    let online = key(KeyAlgorithm::Ed25519);
    let offline = key(KeyAlgorithm::Ed25519);
    write("fixtures/director-root.json", &director_root(&online, &offline));
    let one = || vec![target("sim/rootfs.img", ORDER_LENGTH, ORDER_SHA256)];
    let good = sign_document("order", &order(DEVICE_ID, NONCE, FAR, one()), &online).unwrap();
    write("seeds/director_order/valid.json", &good);
    write("seeds/director_order/valid-pretty.json", &pretty(&good));
    let mut two = one();
    let mut t = target("apps/tool.bin", 4096, &"ab".repeat(32));
    t.hashes.insert("sha512".into(), "cd".repeat(64));
    two.push(t);
    let o = order(DEVICE_ID, NONCE, FAR, two);
    write(
        "seeds/director_order/two-targets-sha512.json",
        &sign_document("order", &o, &online).unwrap(),
    );
    let no_sha256 = vec![OrderTarget {
        name: "sim/rootfs.img".into(),
        length: ORDER_LENGTH,
        hashes: BTreeMap::from([("sha512".into(), "ef".repeat(64))]),
    }];
    let o = order(DEVICE_ID, NONCE, FAR, no_sha256);
    write(
        "seeds/director_order/no-sha256.json",
        &sign_document("order", &o, &online).unwrap(),
    );
    let o = order(DEVICE_ID, NONCE, FAR, vec![]);
    write(
        "seeds/director_order/no-targets.json",
        &sign_document("order", &o, &online).unwrap(),
    );
    let o = order("dev-2", NONCE, FAR, one());
    write(
        "seeds/director_order/wrong-device.json",
        &sign_document("order", &o, &online).unwrap(),
    );
    let o = order(DEVICE_ID, "00aa", FAR, one());
    write(
        "seeds/director_order/stale-nonce.json",
        &sign_document("order", &o, &online).unwrap(),
    );
    let o = order(DEVICE_ID, NONCE, now - 60, one());
    write(
        "seeds/director_order/expired.json",
        &sign_document("order", &o, &online).unwrap(),
    );
    let o = order(DEVICE_ID, NONCE, FAR, one());
    write(
        "seeds/director_order/offline-key.json",
        &sign_document("order", &o, &offline).unwrap(),
    );

    // checkin: the device key and check-ins.
    let device = key(KeyAlgorithm::Ed25519);
    let mut pubkey = serde_json::to_vec_pretty(device.public().to_value()).unwrap();
    pubkey.push(b'\n');
    write("fixtures/device-key.pub.json", &pubkey);
    let slots = vec![
        SlotReport {
            name: "rootfs.a".into(),
            booted: true,
            status: "committed".into(),
            version: Some("1.0.0".into()),
            target: Some("sim/rootfs.img".into()),
            sha256: Some(ORDER_SHA256.into()),
        },
        SlotReport {
            name: "rootfs.b".into(),
            booted: false,
            status: "empty".into(),
            version: None,
            target: None,
            sha256: None,
        },
    ];
    let idle = CheckIn {
        kind: CHECKIN_TYPE.into(),
        device_id: DEVICE_ID.into(),
        nonce: NONCE.into(),
        challenge: String::new(),
        time: DateTime::from_unix(now).to_string(),
        phase: "idle".into(),
        slots: slots.clone(),
        deployment: None,
        refused_order: None,
    };
    write(
        "seeds/checkin/idle.json",
        &sign_document("check-in", &idle, &device).unwrap(),
    );
    let busy = CheckIn {
        challenge: "v1.0011223344556677.1764633600".into(),
        phase: "downloading".into(),
        deployment: Some(DeploymentReport {
            deployment: "d-0001".into(),
            stage: Stage::Downloading,
            progress: Some(Progress { done: 512, total: 1024 }),
            reason: None,
        }),
        refused_order: Some("OrderStaleNonce: order answers nonce 00aa".into()),
        ..idle.clone()
    };
    write(
        "seeds/checkin/downloading.json",
        &sign_document("check-in", &busy, &device).unwrap(),
    );
    let failed = CheckIn {
        phase: "idle".into(),
        deployment: Some(DeploymentReport {
            deployment: "d-0001".into(),
            stage: Stage::RolledBack,
            progress: None,
            reason: Some("health check failed".into()),
        }),
        ..idle.clone()
    };
    write(
        "seeds/checkin/rolled-back.json",
        &sign_document("check-in", &failed, &device).unwrap(),
    );
    let other = key(KeyAlgorithm::Ed25519);
    write(
        "seeds/checkin/other-key.json",
        &sign_document("check-in", &idle, &other).unwrap(),
    );
    let bad_nonce = CheckIn {
        nonce: "not hex".into(),
        ..idle.clone()
    };
    write(
        "seeds/checkin/bad-nonce.json",
        &sign_document("check-in", &bad_nonce, &device).unwrap(),
    );

    // enrollment: documents signed by the key they name, for each key type.
    let (enc_secret, _) = RecipientSecret::generate().unwrap();
    for (name, alg) in [
        ("ed25519", KeyAlgorithm::Ed25519),
        ("ecdsa", KeyAlgorithm::EcdsaP256),
        ("rsa", KeyAlgorithm::RsaPssSha256),
    ] {
        let k = key(alg);
        let doc = Enrollment {
            kind: ENROLLMENT_TYPE.into(),
            device_id: format!("dev-{name}"),
            public_key: k.public().to_value().clone(),
            encryption_key: (alg == KeyAlgorithm::Ed25519).then(|| enc_secret.public().to_value()),
            device_type: "tern-sim".into(),
            hardware: "rev-a".into(),
            tags: vec!["lab".into(), "eu".into()],
            token_id: Some("0011aabb".into()),
            challenge: "v1.0011223344556677.1764633600".into(),
        };
        write(
            &format!("seeds/enrollment/{name}.json"),
            &sign_document("enrollment", &doc, &k).unwrap(),
        );
        if alg == KeyAlgorithm::Ed25519 {
            write(
                "seeds/enrollment/forged.json",
                &sign_document("enrollment", &doc, &other).unwrap(),
            );
        }
    }

    // recipients: documents for one payload, one of them to the fixed secret.
    let fixed = RecipientSecret::from_bytes(&RECIPIENT_SECRET).unwrap();
    let data_key = DataKey::generate().unwrap();
    let commitment = data_key.commitment();
    let sha256 = tern_core::digest::sha256_hex(b"the encrypted payload");
    let mut payload = serde_json::to_vec_pretty(&json!({"sha256": sha256, "key_commitment": commitment})).unwrap();
    payload.push(b'\n');
    write("fixtures/recipients-payload.json", &payload);
    let mut doc = Recipients::new(&sha256, &commitment);
    doc.add(keywrap::wrap(&data_key, fixed.public()).unwrap());
    write("seeds/recipients/one.json", &doc.to_bytes());
    for _ in 0..2 {
        let (r, _) = RecipientSecret::generate().unwrap();
        doc.add(keywrap::wrap(&data_key, r.public()).unwrap());
    }
    write("seeds/recipients/three.json", &doc.to_bytes());
    let mut tampered = doc.clone();
    let ct = &mut tampered.recipients[0].ct;
    let flipped = if ct.starts_with('0') { "1" } else { "0" };
    ct.replace_range(0..1, flipped);
    write("seeds/recipients/tampered.json", &tampered.to_bytes());
    let other_key = DataKey::generate().unwrap();
    let mut wrong = Recipients::new(&sha256, &commitment);
    wrong.add(keywrap::wrap(&other_key, fixed.public()).unwrap());
    write("seeds/recipients/other-data-key.json", &wrong.to_bytes());
    write(
        "seeds/recipients/empty.json",
        &Recipients::new(&sha256, &commitment).to_bytes(),
    );

    // aead_stream: ciphertexts under the fixed key.
    let plain = |n: usize| (0..n).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>();
    for (name, log2, len) in [
        ("empty-1k", 10, 0),
        ("one-byte-1k", 10, 1),
        ("one-record-1k", 10, 1024),
        ("three-records-1k", 10, 3 * 1024 + 7),
        ("short-64k", 16, 700),
    ] {
        write(
            &format!("seeds/aead_stream/{name}.bin"),
            &seal_all(&AEAD_KEY, log2, &plain(len)).unwrap(),
        );
    }
    let ct = seal_all(&AEAD_KEY, 10, &plain(2 * 1024 + 100)).unwrap();
    let mut t = ct.clone();
    t[16 + 1024 + 16 + 5] ^= 1;
    write("seeds/aead_stream/tampered-record-1.bin", &t);
    write("seeds/aead_stream/truncated.bin", &ct[..16 + 1024 + 16]);
    let mut swapped = ct[..16].to_vec();
    swapped.extend_from_slice(&ct[16 + 1040..16 + 2 * 1040]);
    swapped.extend_from_slice(&ct[16..16 + 1040]);
    swapped.extend_from_slice(&ct[16 + 2 * 1040..]);
    write("seeds/aead_stream/swapped.bin", &swapped);

    // version_floors: documents as the agent writes them (compact).
    let [a, b] = FLOOR_KEYS;
    let floors = json!({"roles": {
        "root": {"version": 2, "keys": [a]},
        "timestamp": {"version": 41, "keys": [b]},
        "snapshot": {"version": 41, "keys": [b]},
        "targets": {"version": 7, "keys": [a, b]},
        "delegated/apps": {"version": 2, "keys": [b]},
    }});
    write(
        "seeds/version_floors/floors.json",
        &serde_json::to_vec(&floors).unwrap(),
    );
    write("seeds/version_floors/empty.json", b"{\"roles\":{}}");

    // http_range: 8 bytes of big-endian length, then the header.
    for (name, len, header) in [
        ("first-ten", 100u64, "bytes=0-9"),
        ("open-end", 100, "bytes=90-"),
        ("suffix", 100, "bytes=-10"),
        ("suffix-larger", 100, "bytes=-200"),
        ("spaces", 1 << 40, "bytes= 5 - 1099511627775 "),
        ("several", 100, "bytes=0-1,5-6"),
        ("empty-resource", 0, "bytes=0-"),
        ("huge", u64::MAX, "bytes=18446744073709551614-18446744073709551615"),
    ] {
        let mut b = len.to_be_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        write(&format!("seeds/http_range/{name}"), &b);
    }
}
