//! The update server end to end, over real HTTP on 127.0.0.1: releases, enrollment,
//! deployments to simulated devices running the real agent, on SQLite and on a real
//! PostgreSQL; the director attacks; management authorisation; upload refusals.

use std::fs;

use serde_json::Value;

mod fleet;
use fleet::{resign, s, Fleet, Mode, Pg, Proxy};

/// Upload → deploy to a tag → two devices install, reboot and commit → succeeded; a third
/// whose health check fails → rolled back, and offered the release again later.
fn end_to_end(db_url: Option<&str>) {
    let f = Fleet::new(db_url);
    f.publish("1.1.0", 512);
    let url = f.server.url.clone();
    let a = f.device("sim-a", &["lab"], &url);
    let b = f.device("sim-b", &["lab"], &url);
    let c = f.device("sim-c", &["lab"], &url);
    let other = f.device("sim-other", &["field"], &url);
    c.fail_health_check_for("1.1.0");
    let dep = f.deploy("1.1.0", &["--tag", "lab"]);
    // Nothing is written per device until each checks in: the three wait.
    let d = f.deployment(&dep);
    assert!(d["devices"].as_array().unwrap().is_empty(), "{d}");
    assert_eq!(d["counts"]["waiting"], 3, "{d}");

    assert_eq!(a.drive(&f, &dep, "sim-a"), "succeeded");
    assert_eq!(b.drive(&f, &dep, "sim-b"), "succeeded");
    assert_eq!(c.drive(&f, &dep, "sim-c"), "rolled-back");
    let d = f.deployment(&dep);
    assert_eq!(d["status"], "finished", "{d}");
    assert_eq!(d["counts"]["succeeded"], 2);
    assert_eq!(d["counts"]["rolled-back"], 1);
    let rb = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["device"] == "sim-c")
        .unwrap();
    assert!(
        rb["reason"].as_str().unwrap().contains("did not become healthy"),
        "{rb}"
    );
    // The devices agree: slot B holds 1.1.0 and is booted on a and b; c is back on A.
    for dev in [&a, &b] {
        let st = dev.status();
        assert_eq!(st["booted"], "B", "{st}");
        assert_eq!(st["rollback_floor"], "1.1.0");
    }
    assert_eq!(c.status()["booted"], "A");
    // The device outside the tag was not touched.
    assert_eq!(other.poll()["outcome"], "idle");
    assert_eq!(other.status()["booted"], "A");

    // The rolled-back device can be offered the release again (its health check now passes).
    std::fs::write(c.dir.join("health-check"), "#!/bin/sh\nexit 0\n").unwrap();
    let again = f.deploy("1.1.0", &["--device", "sim-c"]);
    assert_eq!(c.drive(&f, &again, "sim-c"), "succeeded");

    // The registry shows what the devices reported.
    let devs = f.api("GET", "/api/v1/devices", Some(&f.admin), None);
    let listed = devs.body["devices"].as_array().unwrap();
    assert_eq!(listed.len(), 4);
    let a_row = listed.iter().find(|d| d["id"] == "sim-a").unwrap();
    assert_eq!(a_row["phase"], "committed", "{a_row}");
}

#[test]
fn end_to_end_sqlite() {
    end_to_end(None);
}

#[test]
fn end_to_end_postgres() {
    let pg = Pg::start();
    end_to_end(Some(&pg.url));
}

/// Each attack on an order is refused with its own reason, and nothing is installed.
#[test]
fn director_order_attacks_are_refused() {
    let f = Fleet::new(None);
    f.publish("1.1.0", 256);
    let proxy = Proxy::start(&f.server.url);
    let devs: Vec<_> = ["att-a", "att-b", "att-c", "att-d", "att-e"]
        .iter()
        .map(|id| f.device(id, &["lab"], &proxy.url))
        .collect();
    let dep = f.deploy("1.1.0", &["--tag", "lab"]);
    let director = tern_fs::load_signing_key(&f.path("srv/keys/director.pem")).unwrap();

    let untouched = |dev: &fleet::Device, id: &str, before: &str, kind: &str, outcome: &Value| {
        assert_eq!(outcome["outcome"], "refused", "{id}: {outcome}");
        assert_eq!(outcome["kind"], kind, "{id}: {outcome}");
        assert_eq!(dev.slot_hash("slot-b.img"), before, "{id}: slot B was written");
        let st = dev.status();
        assert_eq!(
            st["state"]["phase"].as_str().or(st["state"].as_str()).unwrap_or("idle"),
            "idle",
            "{st}"
        );
        assert_eq!(st["last_error"]["kind"], kind, "{st}");
        assert!(
            !dev.dir.join("state/downloads").exists(),
            "{id}: something was downloaded"
        );
        // The server heard about the refusal.
        let row = f
            .api("GET", &format!("/api/v1/devices/{id}"), Some(&f.admin), None)
            .body;
        assert!(row["refused_order"].as_str().unwrap_or("").starts_with(kind), "{row}");
        assert_eq!(f.device_status(&dep, id), "queued");
    };

    // 1. A replayed order: captured from an earlier check-in of the same device.
    let a = &devs[0];
    let before = a.slot_hash("slot-b.img");
    proxy.set(Mode::Strip);
    assert_eq!(a.poll()["outcome"], "idle");
    let old = proxy.captured.lock().unwrap()["att-a"].clone();
    proxy.set(Mode::Replace(old));
    let o = a.poll();
    untouched(a, "att-a", &before, "OrderStaleNonce", &o);

    // 2. Device A's order given to device B.
    let b = &devs[1];
    let before = b.slot_hash("slot-b.img");
    proxy.set(Mode::Strip);
    a.poll();
    let for_a = proxy.captured.lock().unwrap()["att-a"].clone();
    proxy.set(Mode::Replace(for_a));
    let o = b.poll();
    untouched(b, "att-b", &before, "OrderWrongDevice", &o);

    // 3. An expired order (signed by the real director key, nonce right).
    let c = &devs[2];
    let before = c.slot_hash("slot-b.img");
    let key = tern_fs::load_signing_key(&f.path("srv/keys/director.pem")).unwrap();
    proxy.set(Mode::Rewrite(Box::new(move |o| {
        resign(o, &key, |s| s["expires"] = "2020-01-01T00:00:00Z".into())
    })));
    let o = c.poll();
    untouched(c, "att-c", &before, "OrderExpired", &o);

    // 4. An order signed by a key outside the director root.
    let d = &devs[3];
    let before = d.slot_hash("slot-b.img");
    let foreign = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
        .unwrap()
        .0;
    proxy.set(Mode::Rewrite(Box::new(move |o| resign(o, &foreign, |_| {}))));
    let o = d.poll();
    untouched(d, "att-d", &before, "OrderSignature", &o);

    // 5. An order whose hashes differ from the repository's, signed by the (stolen)
    // director key: the repository's signatures win; the deployment fails, loudly.
    let e = &devs[4];
    let before = e.slot_hash("slot-b.img");
    let key = director;
    proxy.set(Mode::Rewrite(Box::new(move |o| {
        resign(o, &key, |s| {
            s["targets"][0]["hashes"]["sha256"] = "00".repeat(32).into()
        })
    })));
    let o = e.poll();
    assert_eq!(o["outcome"], "refused", "{o}");
    assert_eq!(o["kind"], "OrderMismatch", "{o}");
    assert!(
        o["reason"].as_str().unwrap().contains("differs from the repository"),
        "{o}"
    );
    assert_eq!(e.slot_hash("slot-b.img"), before);
    assert_eq!(e.status()["last_error"]["kind"], "OrderMismatch");
    assert_eq!(f.device_status(&dep, "att-e"), "failed");

    // With the attacker gone, a device installs normally: the refusals wedged nothing.
    proxy.set(Mode::Pass);
    assert_eq!(a.drive(&f, &dep, "att-a"), "succeeded");

    // The refusals are in the audit log.
    let audit = f.audit();
    for kind in [
        "OrderStaleNonce",
        "OrderWrongDevice",
        "OrderExpired",
        "OrderSignature",
        "OrderMismatch",
    ] {
        assert!(
            audit
                .iter()
                .any(|e| e["action"] == "device.refused-order" && e["detail"].as_str().unwrap().starts_with(kind)),
            "{kind} not audited"
        );
    }
}

/// A check-in signed with another device's key is refused and changes nothing.
#[test]
fn checkin_with_another_devices_key_is_refused() {
    let f = Fleet::new(None);
    let url = f.server.url.clone();
    let a = f.device("key-a", &[], &url);
    let b = f.device("key-b", &[], &url);
    let checkin = fleet::checkin_doc("key-a", &fleet::challenge(&url, "key-a"), "forged");
    let body = tern_core::director::sign_document("check-in", &checkin, &b.key()).unwrap();
    let ans = f.api("POST", "/api/v1/devices/key-a/checkin", None, Some(body));
    assert_eq!(ans.status, 401, "{}", ans.body);
    assert!(
        ans.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not signed by device `key-a`'s key"),
        "{}",
        ans.body
    );
    // Nothing was recorded for key-a: its phase is still what it last reported.
    let row = f.api("GET", "/api/v1/devices/key-a", Some(&f.admin), None).body;
    assert_ne!(row["phase"], "forged");
    // Signed correctly, it is accepted once; the same check-in replayed is refused.
    let good = tern_core::director::sign_document("check-in", &checkin, &a.key()).unwrap();
    assert_eq!(
        f.api("POST", "/api/v1/devices/key-a/checkin", None, Some(good.clone()))
            .status,
        200
    );
    let replay = f.api("POST", "/api/v1/devices/key-a/checkin", None, Some(good));
    assert_eq!(replay.status, 409, "{}", replay.body);
    assert_eq!(replay.body["error"]["kind"], "StaleChallenge");
    assert!(replay.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not answer its current challenge"));
    assert!(f
        .audit()
        .iter()
        .any(|e| e["action"] == "device.checkin" && e["outcome"] == "refused" && e["subject"] == "device:key-a"));
}

/// Management calls without a token, or with a viewer token on a write, are refused and audited.
#[test]
fn management_api_needs_a_token_of_the_right_role() {
    let f = Fleet::new(None);
    f.publish("1.1.0", 64);
    let viewer = f.token("viewer");
    let releaser = f.token("releaser");
    let body = br#"{"release":"1.1.0","tag":"lab"}"#.to_vec();

    let none = f.api("GET", "/api/v1/devices", None, None);
    assert_eq!(none.status, 401);
    assert!(none.body["error"]["message"].as_str().unwrap().contains("no API token"));
    let bad = f.api("GET", "/api/v1/devices", Some("tern_0000_bogus"), None);
    assert_eq!(bad.status, 401);
    let read = f.api("GET", "/api/v1/releases", Some(&viewer), None);
    assert_eq!(read.status, 200);
    let write = f.api("POST", "/api/v1/deployments", Some(&viewer), Some(body.clone()));
    assert_eq!(write.status, 403, "{}", write.body);
    assert!(
        write.body["error"]["message"].as_str().unwrap().contains("releaser"),
        "{}",
        write.body
    );
    // A releaser may deploy but not approve devices or read the audit log.
    assert_eq!(
        f.api("POST", "/api/v1/deployments", Some(&releaser), Some(body)).status,
        200
    );
    assert_eq!(f.api("GET", "/api/v1/audit", Some(&releaser), None).status, 403);
    assert_eq!(
        f.api("POST", "/api/v1/devices/x/approve", Some(&releaser), None).status,
        403
    );
    // Nothing was created by the refused write: one deployment, the releaser's.
    let deps = f.api("GET", "/api/v1/deployments", Some(&viewer), None).body;
    assert_eq!(deps.as_array().unwrap().len(), 1);

    let audit = f.audit();
    let refused: Vec<_> = audit.iter().filter(|e| e["outcome"] == "refused").collect();
    assert!(refused
        .iter()
        .any(|e| e["actor"] == "anonymous" && e["action"] == "device.list"));
    assert!(refused
        .iter()
        .any(|e| e["action"] == "deployment.create" && e["actor"].as_str().unwrap().contains("viewer")));

    // The OpenAPI document describes the API.
    let doc = f.api("GET", "/api/openapi.json", None, None);
    assert_eq!(doc.status, 200);
    for p in [
        "/api/v1/releases",
        "/api/v1/deployments",
        "/api/v1/devices/{id}/checkin",
        "/api/v1/audit",
    ] {
        assert!(
            doc.body["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
}

fn blobs(f: &Fleet) -> Vec<String> {
    let dir = f.path("srv/artifacts/blobs/sha256");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A bundle with a bad signature, a release already present and a rollback are refused
/// with a clear error, and change nothing.
#[test]
fn release_upload_refusals_change_nothing() {
    let f = Fleet::new(None);
    let older = f.bundle("1.0.0", 64);
    f.publish("1.1.0", 64);
    let timestamp = || f.api("GET", "/repo/metadata/timestamp.json", None, None).bytes;
    let releases = || f.api("GET", "/api/v1/releases", Some(&f.admin), None).body;
    let (ts0, rel0, blobs0) = (timestamp(), releases(), blobs(&f));

    // A bad signature: the targets metadata's signature altered in the bundle.
    let repo = tern_repo::Repository::open(&f.path("repo")).unwrap();
    let name = tern_core::TargetPath::new("sim/rootfs-1.1.0.img").unwrap();
    let mut contents = repo
        .release_contents(&[name], false, tern_agent::remote::now())
        .unwrap();
    let mut env: Value = serde_json::from_slice(&contents.targets).unwrap();
    let sig = env["signatures"][0]["sig"].as_str().unwrap().to_owned();
    let first = if sig.starts_with('0') { "1" } else { "0" };
    let flipped = format!("{first}{}", sig.get(1..).unwrap());
    env["signatures"][0]["sig"] = flipped.into();
    contents.targets = serde_json::to_vec(&env).unwrap();
    let forged = f.path("forged.tern");
    tern_bundle::write_bundle(&contents, &forged).unwrap();
    let out = f.tern(&["release", "upload", &s(&forged), "--name", "forged"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 400") && err.contains("targets") && err.contains("signature"),
        "{err}"
    );

    // The same release again.
    let out = f.tern(&["release", "upload", &s(&f.path("r-1.1.0.tern"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 409") && err.contains("release `1.1.0` is already present"),
        "{err}"
    );

    // An older targets version than the published one (a rollback).
    let out = f.tern(&["release", "upload", &s(&older)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 409") && err.contains("a rollback"), "{err}");

    assert_eq!(timestamp(), ts0, "the timestamp changed");
    assert_eq!(releases(), rel0, "the release list changed");
    assert_eq!(blobs(&f), blobs0, "payload files were left behind");
    let refused = f
        .audit()
        .iter()
        .filter(|e| e["action"] == "release.upload" && e["outcome"] == "refused")
        .count();
    assert_eq!(refused, 3);

    // The published repository reads with the reference TUF client's CLI shape.
    let got = f.tuf_download("tuf", "sim/rootfs-1.1.0.img");
    assert_eq!(std::fs::read(got).unwrap(), std::fs::read(f.path("img-1.1.0")).unwrap());
}

/// A download cut off mid-way is resumed from where it stopped at the next poll (HTTP Range),
/// and the deployment completes.
#[test]
fn a_dropped_download_resumes_where_it_stopped() {
    let f = Fleet::new(None);
    f.publish("1.1.0", 3 * 1024);
    let proxy = Proxy::start(&f.server.url);
    let dev = f.device("resume-a", &[], &proxy.url);
    let dep = f.deploy("1.1.0", &["--device", "resume-a"]);
    let half = 3 * 1024 * 1024 / 2;
    *proxy.cut_target.lock().unwrap() = Some(half);
    let o = dev.poll();
    assert_eq!(o["outcome"], "error", "{o}");
    let partial = dev.dir.join("state/downloads/.sim%2Frootfs-1.1.0.img.partial");
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), half as u64);
    assert_eq!(f.device_status(&dep, "resume-a"), "downloading");
    // The next poll resumes from the partial file, then installs.
    let o = dev.poll();
    assert_eq!(o["outcome"], "installed", "{o}");
    assert_eq!(*proxy.ranges.lock().unwrap(), vec![format!("bytes={half}-")]);
    assert_eq!(dev.drive(&f, &dep, "resume-a"), "succeeded");
}

/// Regressions from review: a signed hash entry naming an unknown algorithm cannot name a
/// file on the server; a deployment refused for a device that is not approved leaves
/// nothing that applies later; a release without a target for a device does not supersede
/// its queued deployment.
#[test]
fn review_regressions() {
    let f = Fleet::new(None);
    f.publish("1.0.0", 64);
    // 1. `"../../keys": "session.key"` among a target's signed hashes.
    let session_key = std::fs::read(f.path("srv/keys/session.key")).unwrap();
    f.bundle("1.1.0", 64);
    let repo = tern_repo::Repository::open(&f.path("repo")).unwrap();
    let name = tern_core::TargetPath::new("sim/rootfs-1.1.0.img").unwrap();
    let mut contents = repo
        .release_contents(&[name], false, tern_agent::remote::now())
        .unwrap();
    let mut env: Value = serde_json::from_slice(&contents.targets).unwrap();
    env["signed"]["targets"]["sim/rootfs-1.1.0.img"]["hashes"]["../../keys"] = "session.key".into();
    let mut envelope = tern_core::Envelope::new(&env["signed"]).unwrap();
    envelope
        .sign(
            "targets",
            &tern_fs::load_signing_key(&f.path("keys/targets.pem")).unwrap(),
        )
        .unwrap();
    contents.targets = envelope.to_bytes();
    let evil = f.path("evil.tern");
    tern_bundle::write_bundle(&contents, &evil).unwrap();
    let _ = f.tern(&["release", "upload", &s(&evil)]);
    assert_eq!(std::fs::read(f.path("srv/keys/session.key")).unwrap(), session_key);

    // 2. A deployment refused for a pending device does not apply once it is approved.
    let dir = f.path("dev-pending");
    fleet::run_ok(
        &[
            "device",
            "simulate",
            "--dir",
            &s(&dir),
            "--root",
            &s(&f.path("repo/metadata/1.root.json")),
            "--server",
            &f.server.url,
            "--device-id",
            "pending-a",
            "--director-root",
            &s(&f.path("srv/keys/director-root.json")),
            "--slot-mib",
            "4",
        ],
        &[],
    );
    let cfg = s(&dir.join("agent.toml"));
    fleet::run_ok(&["device", "enroll", "--config", &cfg, "--token", &f.enrollment], &[]);
    let out = f.tern(&["deployment", "create", "--release", "1.0.0", "--device", "pending-a"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 409"), "{:?}", out);
    f.ok(&["device", "approve", "pending-a"]);
    let deps = f.api("GET", "/api/v1/deployments", Some(&f.admin), None).body;
    assert!(deps.as_array().unwrap().is_empty(), "{deps}");

    // 3. A release with nothing for this device type does not cancel its queued deployment.
    let dep = f.deploy("1.0.0", &["--device", "pending-a"]);
    let other = f.path("img-cam");
    std::fs::write(&other, vec![7u8; 4096]).unwrap();
    fleet::run_ok(
        &[
            "repo",
            "add-target",
            "--repo",
            &s(&f.path("repo")),
            &s(&other),
            "--name",
            "cam/fw-9.img",
            "--release-version",
            "9.0.0",
            "--device-type",
            "camera",
            "--slot-class",
            "rootfs",
            "--key",
            &s(&f.path("keys/targets.pem")),
        ],
        &[],
    );
    let cam = f.path("cam.tern");
    fleet::run_ok(
        &[
            "bundle",
            "create",
            "--repo",
            &s(&f.path("repo")),
            "--target",
            "cam/fw-9.img",
            "--out",
            &s(&cam),
        ],
        &[],
    );
    f.ok(&["release", "upload", &s(&cam)]);
    f.deploy("9.0.0", &["--device", "pending-a"]);
    assert_eq!(f.device_status(&dep, "pending-a"), "waiting");

    // 4. An operator can release a device from a deployment it will never finish; a viewer cannot.
    let viewer = f.token("viewer");
    let path = format!("/api/v1/deployments/{dep}/devices/pending-a/abandon");
    assert_eq!(f.api("POST", &path, Some(&viewer), None).status, 403);
    f.ok(&["deployment", "abandon", &dep, "--device", "pending-a"]);
    assert_eq!(f.device_status(&dep, "pending-a"), "cancelled");
    assert_eq!(f.api("POST", &path, Some(&f.admin), None).status, 409);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// An encrypted release through the server: encrypted for a device resolved through the
/// registry, installed by it; refused by a device that is not a recipient, before it
/// downloads or touches a slot; that device added later without re-signing. The server's
/// files and database never hold the plaintext or the data key.
#[test]
fn an_encrypted_release_end_to_end_sqlite() {
    encrypted_end_to_end(None);
}

#[test]
fn an_encrypted_release_end_to_end_postgres() {
    let pg = Pg::start();
    encrypted_end_to_end(Some(&pg.url));
}

fn encrypted_end_to_end(db_url: Option<&str>) {
    let f = Fleet::new(db_url);
    let url = f.server.url.clone();
    let a = f.device("enc-a", &["lab"], &url);
    let b = f.device("enc-b", &["lab"], &url);
    f.ok(&["key", "generate", "--type", "x25519", "--out", &s(&f.path("eng"))]);
    let eng = s(&f.path("eng.pub.json"));
    let bundle = f.bundle_with("2.0.0", 700, &["--encrypt-for", "device:enc-a", "--encrypt-for", &eng]);
    f.ok(&["release", "upload", &s(&bundle)]);
    let image = std::fs::read(f.path("img-2.0.0")).unwrap();

    // The data key, as only a recipient can recover it (here, the release engineer).
    let doc_file = files_under(&f.path("repo/recipients")).pop().unwrap();
    let doc = tern_core::keywrap::Recipients::parse(&std::fs::read(doc_file).unwrap()).unwrap();
    let eng_key = tern_fs::load_recipient_secret(&f.path("eng.pem")).unwrap();
    let data_key = tern_core::keywrap::unwrap_any(&doc.recipients, &[eng_key], &doc.key_commitment)
        .unwrap()
        .unwrap();
    let rel = f.api("GET", "/api/v1/releases/2.0.0", Some(&f.admin), None);
    assert_eq!(rel.body["targets"][0]["key_commitment"], doc.key_commitment.as_str());

    let dep = f.deploy("2.0.0", &["--tag", "lab"]);
    assert_eq!(a.drive(&f, &dep, "enc-a"), "succeeded");
    assert_eq!(
        std::fs::read(a.dir.join("slot-b.img")).unwrap()[..image.len()],
        image[..],
        "the device decrypted the image into its slot"
    );
    // b is not a recipient: refused before the download, the slot untouched.
    let before = b.slot_hash("slot-b.img");
    let o = b.poll();
    assert_eq!(o["outcome"], "failed", "{o}");
    assert!(
        o["reason"].as_str().unwrap().contains("not one of its recipients"),
        "{o}"
    );
    assert_eq!(f.device_status(&dep, "enc-b"), "failed");
    assert_eq!(b.slot_hash("slot-b.img"), before);
    assert!(!b.dir.join("state/downloads").exists() || files_under(&b.dir.join("state/downloads")).is_empty());
    assert_eq!(b.status()["booted"], "A");

    // The release engineer grants b access: new wrapped keys for the server, nothing re-signed.
    let snapshot_before = f.api("GET", "/repo/metadata/timestamp.json", None, None).body;
    f.ok(&[
        "bundle",
        "add-recipients",
        &s(&bundle),
        "--identity",
        &s(&f.path("eng.pem")),
        "--encrypt-for",
        "device:enc-b",
        "--publish",
    ]);
    assert_eq!(
        f.api("GET", "/repo/metadata/timestamp.json", None, None).body,
        snapshot_before
    );
    let again = f.deploy("2.0.0", &["--device", "enc-b"]);
    assert_eq!(b.drive(&f, &again, "enc-b"), "succeeded");
    assert_eq!(
        std::fs::read(b.dir.join("slot-b.img")).unwrap()[..image.len()],
        image[..]
    );

    // An encryption key cannot be slipped in for a device by whoever knows its (public)
    // signing key: enrollment documents are signed by the device key they name. The device
    // itself may add its own later (an agent enrolled before it had one).
    let (signer, _) = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519).unwrap();
    let (intruder_signer, _) = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519).unwrap();
    let (intruder, _) = tern_core::keywrap::RecipientSecret::generate().unwrap();
    let (own, _) = tern_core::keywrap::RecipientSecret::generate().unwrap();
    assert_eq!(f.enroll_signed("old-agent", &signer, None).status, 200);
    f.ok(&["device", "approve", "old-agent"]);
    let forged = fleet::enrollment_body(
        &f.server.url,
        "old-agent",
        signer.public(),
        &intruder_signer,
        Some(intruder.public().to_value()),
        &f.enrollment,
    );
    let again = f.api("POST", "/api/v1/devices/enroll", Some(&f.enrollment), Some(forged));
    assert_eq!(again.status, 400, "{:?}", again.body);
    let dev = f.api("GET", "/api/v1/devices/old-agent", Some(&f.admin), None);
    assert!(dev.body["encryption_key"].is_null(), "{:?}", dev.body);
    assert_eq!(
        f.enroll_signed("old-agent", &signer, Some(own.public().to_value()))
            .status,
        200
    );
    let dev = f.api("GET", "/api/v1/devices/old-agent", Some(&f.admin), None);
    assert_eq!(dev.body["encryption_kid"], own.public().kid(), "{:?}", dev.body);

    // A recipients document with another key commitment is refused.
    let mut forged = doc.clone();
    forged.key_commitment = "0".repeat(64);
    let r = f.api("POST", "/api/v1/recipients", Some(&f.admin), Some(forged.to_bytes()));
    assert_eq!(r.status, 409, "{:?}", r.body);

    // Nothing the server stores holds the plaintext or the data key, raw or in hex.
    let key_hex = hex_of(data_key.as_bytes());
    let record_key = data_key.record_key();
    let window = &image[4096..4096 + 64];
    for file in files_under(&f.path("srv")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(32).any(|w| w == &record_key[..]),
            "{file:?} holds the record key"
        );
        assert!(
            !bytes.windows(32).any(|w| w == data_key.as_bytes()),
            "{file:?} holds the data key"
        );
        assert!(
            !bytes.windows(64).any(|w| w == key_hex.as_bytes()),
            "{file:?} holds the data key in hex"
        );
        assert!(!bytes.windows(64).any(|w| w == window), "{file:?} holds plaintext");
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The request log: a line per API call with its route's template, status and token id,
/// never the token; `--log-format json` (here `TERN_LOG_FORMAT`) writes JSON objects only.
#[test]
fn every_request_is_logged_as_json_with_its_route_and_token_id_but_never_a_secret() {
    let f = Fleet::with_env(None, &[("RUST_LOG", "info"), ("TERN_LOG_FORMAT", "json")]);
    let viewer = f.token("viewer");
    assert_eq!(f.api("GET", "/api/v1/releases", Some(&viewer), None).status, 200);
    assert_eq!(
        f.api("GET", "/api/v1/devices/some-device", Some(&viewer), None).status,
        404
    );
    assert_eq!(
        f.api("POST", "/api/v1/devices/x/approve", Some(&viewer), None).status,
        403
    );
    assert_eq!(f.api("GET", "/api/v1/audit", Some("not-a-token"), None).status, 401);
    let secrets = [viewer.as_str(), f.admin.as_str(), "not-a-token"];
    // A line is written when the answer's head is ready: wait for the last one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut log = f.server.log();
    while !log.contains("/api/v1/audit") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        log = f.server.log();
    }
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    for secret in secrets {
        assert!(!log.contains(secret), "a token reached the log:\n{log}");
    }
    let request = |route: &str| {
        lines
            .iter()
            .find(|l| l["target"] == "tern_server::request" && l["span"]["route"] == route)
            .unwrap_or_else(|| panic!("no request line for {route}:\n{log}"))
    };
    let releases = request("/api/v1/releases");
    assert_eq!(releases["fields"]["status"], 200, "{releases}");
    assert_eq!(releases["span"]["method"], "GET", "{releases}");
    assert!(releases["fields"]["latency_us"].is_u64(), "{releases}");
    let token_id = releases["span"]["token"].as_str().unwrap();
    // The id is the token's public part (`tern_ID_SECRET`); the secret never appears.
    let secret = viewer.rsplit('_').next().unwrap();
    assert_eq!(viewer, format!("tern_{token_id}_{secret}"), "{releases}");
    assert!(!log.contains(secret), "a token's secret reached the log:\n{log}");
    // The same id the audit log names for the token's refused action.
    let forbidden = request("/api/v1/devices/{id}/{action}");
    assert_eq!(forbidden["fields"]["status"], 403, "{forbidden}");
    assert_eq!(forbidden["span"]["token"], token_id, "{forbidden}");
    assert!(
        f.audit()
            .iter()
            .any(|e| e["action"] == "device.approve" && e["actor"] == format!("token:{token_id} (viewer)")),
        "the audit log names the token otherwise"
    );
    let device = request("/api/v1/devices/{id}");
    assert_eq!(device["fields"]["status"], 404, "{device}");
    assert_eq!(device["span"]["device"], "some-device", "{device}");
    let refused = request("/api/v1/audit");
    assert_eq!(refused["fields"]["status"], 401, "{refused}");
    assert!(refused["span"]["token"].is_null(), "{refused}");
    // Polls, the hot path, are logged only at debug.
    assert!(!log.contains("/api/v1/devices/{id}/poll"), "{log}");
}

/// `tern server check-config`: each class of mistake with its line and key; a sound
/// configuration prints what would be used, and never a database password.
#[test]
fn server_check_config_names_each_mistake_with_its_key_and_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    fleet::run_ok(&["server", "init", "--data", &s(&data)], &[]);
    let good = fleet::run_ok(
        &[
            "server",
            "check-config",
            "--data",
            &s(&data),
            "--database-url",
            "postgres://tern:s3cret@db.example.com/tern",
        ],
        &[],
    );
    assert!(good.contains("no problems found"), "{good}");
    assert!(
        good.contains("postgres://tern@db.example.com/tern") && !good.contains("s3cret"),
        "{good}"
    );
    // A password given as a parameter is left out too.
    let query = fleet::run_ok(
        &[
            "server",
            "check-config",
            "--data",
            &s(&data),
            "--database-url",
            "postgres://tern@db.example.com/tern?sslmode=require&password=t0psecret",
        ],
        &[],
    );
    assert!(query.contains("tern?sslmode=require&(password left out)"), "{query}");
    assert!(!query.contains("t0psecret"), "{query}");

    fs::set_permissions(data.join("keys/timestamp.pem"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(dir.path().join("tls.key"), "key").unwrap();
    fs::set_permissions(dir.path().join("tls.key"), fs::Permissions::from_mode(0o644)).unwrap();
    let text = r#"listen = "127.0.0.1:80800"
data_dir = "srv"
log = "warn,tern=shout"

[tls]
cert = "missing.crt"
key = "tls.key"
"#;
    let cfg = dir.path().join("server.toml");
    fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(fleet::tern_bin())
        .args(["server", "check-config", "--config", &s(&cfg)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = |needle: &str| text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
    for (key, needle, why) in [
        ("listen", "listen", "127.0.0.1:80800"),
        ("data_dir", "data_dir", "make it 0600"),
        ("log", "log", "not a level or filter"),
        ("tls.cert", "cert", "No such file"),
        ("tls.key", "key", "make it 0600"),
    ] {
        let at = format!("server.toml:{}: `{key}`: ", line(needle));
        assert!(
            err.lines().any(|l| l.contains(&at) && l.contains(why)),
            "no {at}… {why} in:\n{err}"
        );
    }
    assert!(err.contains("tern: 5 problem(s)"), "{err}");
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): the server says it is ready once it
/// listens, and tells the watchdog it is alive while its background pass runs.
#[test]
fn the_server_tells_systemd_it_is_ready_and_alive() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let f = Fleet::with_env(
        None,
        &[
            ("NOTIFY_SOCKET", &s(&socket_path)),
            // Half a second: the server tells the watchdog every quarter of it.
            ("WATCHDOG_USEC", "500000"),
        ],
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    // Each notification is a datagram of `NAME=VALUE\n` lines.
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.trim() == "WATCHDOG=1").count() >= 2)
    {
        assert!(seen.len() < 100, "no READY=1 and two WATCHDOG=1 among {seen:?}");
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no more notifications ({e}); got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(
        ready.contains(&format!("STATUS=listening on {}", f.server.url)),
        "{ready}"
    );
}
