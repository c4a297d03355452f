//! Item 1: enrollment proved nothing. A fleet-token holder enrolled a device's id with its
//! *public* signing key and their own encryption key, so releases encrypted for the device
//! were wrapped for them; and an id claimed first could never be freed.

use serde_json::{json, Value};

use crate::fleet::{enrollment_body, run_ok, s, Fleet};

fn keypair() -> tern_core::SigningKey {
    tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
        .unwrap()
        .0
}

/// A simulated device (not yet enrolled) whose signing key exists, as a real device's does
/// from its first boot: its public half is no secret.
fn device_with_key(f: &Fleet, id: &str) -> (String, tern_core::PublicKey) {
    let dir = f.path(&format!("dev-{id}"));
    run_ok(
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
            id,
            "--director-root",
            &s(&f.path("srv/keys/director-root.json")),
            "--slot-mib",
            "8",
        ],
        &[],
    );
    std::fs::create_dir_all(dir.join("state")).unwrap();
    run_ok(&["key", "generate", "--out", &s(&dir.join("state/device"))], &[]);
    let public: Value = serde_json::from_slice(&std::fs::read(dir.join("state/device.pub.json")).unwrap()).unwrap();
    (
        s(&dir.join("agent.toml")),
        tern_core::PublicKey::from_value("device key", &public).unwrap(),
    )
}

#[test]
fn enrolling_a_device_with_only_its_public_key_is_refused() {
    let f = Fleet::new(None);
    let (cfg, victim_key) = device_with_key(&f, "victim");
    let (attacker_enc, _) = tern_core::keywrap::RecipientSecret::generate().unwrap();

    // As the landed server accepted it: a JSON request naming the victim's public key and
    // the attacker's encryption key, with the fleet token.
    let old_style = json!({
        "device_id": "victim", "public_key": victim_key.to_value(), "device_type": "tern-sim",
        "hardware": "rev-a", "encryption_key": attacker_enc.public().to_value(),
        "enrollment_token": f.enrollment,
    });
    let a = f.api(
        "POST",
        "/api/v1/devices/enroll",
        Some(&f.enrollment),
        Some(old_style.to_string().into_bytes()),
    );
    assert_eq!(a.status, 400, "{}", a.body);
    // A proper document naming the victim's key, but signed by the attacker's own.
    let forged = enrollment_body(
        &f.server.url,
        "victim",
        &victim_key,
        &keypair(),
        Some(attacker_enc.public().to_value()),
        &f.enrollment,
    );
    let a = f.api("POST", "/api/v1/devices/enroll", Some(&f.enrollment), Some(forged));
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body["error"]["message"].as_str().unwrap().contains("enrollment"),
        "{}",
        a.body
    );
    // Nothing was registered.
    assert_eq!(f.api("GET", "/api/v1/devices/victim", Some(&f.admin), None).status, 404);
    assert!(f
        .audit()
        .iter()
        .any(|e| e["action"] == "device.enroll" && e["outcome"] == "refused" && e["subject"] == "device:victim"));

    // The device itself enrolls, and the operator sees the encryption key it really has.
    run_ok(&["device", "enroll", "--config", &cfg, "--token", &f.enrollment], &[]);
    let exported: Value = serde_json::from_str(&run_ok(&["device", "key", "export", "--config", &cfg], &[])).unwrap();
    let kid = exported["kid"].as_str().unwrap().to_owned();
    let d = f.api("GET", "/api/v1/devices/victim", Some(&f.admin), None).body;
    assert_eq!(d["status"], "pending");
    assert_eq!(d["keyid"], victim_key.keyid().as_str());
    assert_eq!(d["encryption_kid"], kid.as_str(), "{d}");
    let approved = f.ok(&["device", "approve", "victim"]);
    assert!(approved.contains(&kid), "{approved}");
    assert!(f.ok(&["device", "list"]).contains(&kid));
}

#[test]
fn an_id_claimed_first_by_someone_else_can_be_reset_by_an_admin() {
    let f = Fleet::new(None);
    let (cfg, _) = device_with_key(&f, "claimed");
    // Someone with the fleet token claims the id first, with keys of their own.
    assert_eq!(f.enroll_signed("claimed", &keypair(), None).status, 200);
    let out = f.tern(&["device", "enroll", "--config", &cfg, "--token", &f.enrollment]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 409") && err.contains("tern device reset claimed"),
        "{err}"
    );
    // Only an admin resets it.
    let viewer = f.token("viewer");
    assert_eq!(
        f.api("POST", "/api/v1/devices/claimed/reset", Some(&viewer), None)
            .status,
        403
    );
    f.ok(&["device", "reset", "claimed"]);
    assert_eq!(
        f.api("GET", "/api/v1/devices/claimed", Some(&f.admin), None).status,
        404
    );
    run_ok(&["device", "enroll", "--config", &cfg, "--token", &f.enrollment], &[]);
    f.ok(&["device", "approve", "claimed"]);
    // An approved device is not reset (it is decommissioned, for good).
    let a = f.api("POST", "/api/v1/devices/claimed/reset", Some(&f.admin), None);
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(
        f.api("GET", "/api/v1/devices/claimed", Some(&f.admin), None).body["status"],
        "approved"
    );
    // A rejected registration can be reset too.
    assert_eq!(f.enroll_signed("rejected-one", &keypair(), None).status, 200);
    f.ok(&["device", "reject", "rejected-one"]);
    f.ok(&["device", "reset", "rejected-one"]);
    assert_eq!(f.enroll_signed("rejected-one", &keypair(), None).status, 200);
    let audit = f.audit();
    assert!(audit
        .iter()
        .any(|e| e["action"] == "device.reset" && e["outcome"] == "ok" && e["subject"] == "device:claimed"));
}

#[test]
fn an_enrollment_token_is_rate_limited_and_capped_in_pending_devices() {
    let f = Fleet::with_env(
        None,
        &[
            ("TERN_SERVER_MAX_PENDING_PER_TOKEN", "3"),
            ("TERN_SERVER_ENROLLMENTS_PER_MINUTE", "8"),
        ],
    );
    for n in 0..3 {
        assert_eq!(f.enroll_signed(&format!("p{n}"), &keypair(), None).status, 200);
    }
    let over = f.enroll_signed("p3", &keypair(), None);
    assert_eq!(over.status, 429, "{}", over.body);
    assert_eq!(over.body["error"]["kind"], "TooMany");
    assert!(over.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("waiting for approval"));
    assert_eq!(f.api("GET", "/api/v1/devices/p3", Some(&f.admin), None).status, 404);
    // Approving one makes room.
    f.ok(&["device", "approve", "p0"]);
    assert_eq!(f.enroll_signed("p4", &keypair(), None).status, 200);
    // Attempts count against the rate whatever their outcome: 6, 7 and 8 hit the cap, the
    // ninth the rate.
    for n in 5..8 {
        assert_eq!(f.enroll_signed(&format!("p{n}"), &keypair(), None).status, 429);
    }
    let fast = f.enroll_signed("p8", &keypair(), None);
    assert_eq!(fast.status, 429);
    assert!(
        fast.body["error"]["message"].as_str().unwrap().contains("this minute"),
        "{}",
        fast.body
    );
    // Another token has budgets of its own.
    let other = f.api("POST", "/api/v1/enrollment-tokens", Some(&f.admin), None).body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    f.ok(&["device", "reject", "p1"]);
    let signer = keypair();
    let body = enrollment_body(&f.server.url, "q0", signer.public(), &signer, None, &other);
    assert_eq!(
        f.api("POST", "/api/v1/devices/enroll", Some(&other), Some(body)).status,
        200
    );
}

#[test]
fn an_enrollment_document_must_answer_a_server_challenge_and_name_its_token() {
    let f = Fleet::new(None);
    let signer = keypair();
    let sign = |doc: &tern_core::enrollment::Enrollment| {
        tern_core::director::sign_document("enrollment", doc, &signer).unwrap()
    };
    let good = enrollment_body(&f.server.url, "c0", signer.public(), &signer, None, &f.enrollment);
    let (mut doc, _) = tern_core::enrollment::parse_enrollment(&good).unwrap();
    // A challenge the server never issued.
    doc.challenge = format!("v1.{}.00.00", tern_server::unix_now() + 100);
    let a = f.api("POST", "/api/v1/devices/enroll", Some(&f.enrollment), Some(sign(&doc)));
    assert_eq!(a.status, 401, "{}", a.body);
    // A document for another token than the one presented.
    let (mut doc, _) = tern_core::enrollment::parse_enrollment(&good).unwrap();
    doc.token_id = Some("0000000000000000".into());
    let a = f.api("POST", "/api/v1/devices/enroll", Some(&f.enrollment), Some(sign(&doc)));
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(f.api("GET", "/api/v1/devices/c0", Some(&f.admin), None).status, 404);
    // The genuine document is accepted.
    let a = f.api("POST", "/api/v1/devices/enroll", Some(&f.enrollment), Some(good));
    assert_eq!(a.status, 200, "{}", a.body);
}
