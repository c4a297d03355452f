//! HTTPS and mutual TLS: a device with a certificate from the configured device CA enrolls
//! without approval and checks in over TLS; a certificate for another id, or none without a
//! token, is refused; a certificate from another CA fails the handshake.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

mod fleet;
use fleet::{run_ok, s, tern_bin};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

fn device_cert(ca: &Ca, cn: &str, key_pem: &str) -> String {
    let key = KeyPair::from_pem(key_pem).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.signed_by(&key, &ca.issuer).unwrap().pem()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn devices_with_a_device_ca_certificate_enroll_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let p = |x: &str| dir.path().join(x);
    let server_ca = ca("Tern server CA");
    let device_ca = ca("Tern device CA");
    let rogue_ca = ca("Rogue CA");
    let srv_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let srv_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&srv_key, &server_ca.issuer)
        .unwrap();
    write(&p("server.crt"), &srv_cert.pem());
    write(&p("server.key"), &srv_key.serialize_pem());
    write(&p("server-ca.pem"), &server_ca.pem);
    write(&p("device-ca.pem"), &device_ca.pem);
    run_ok(&["server", "init", "--data", &s(&p("srv"))], &[]);
    write(
        &p("server.toml"),
        "data_dir = \"srv\"\npoll_interval_secs = 1\n[tls]\ncert = \"server.crt\"\nkey = \"server.key\"\nclient_ca = \"device-ca.pem\"\n",
    );
    let mut server = Killed(
        Command::new(tern_bin())
            .args([
                "server",
                "run",
                "--config",
                &s(&p("server.toml")),
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("tern server listening on ")
        .unwrap()
        .to_owned();
    assert!(url.starts_with("https://"), "{url}");

    // A simulated device with a key, and a certificate for it from the device CA.
    let device = |id: &str| {
        let d = p(id);
        run_ok(
            &[
                "device",
                "simulate",
                "--dir",
                &s(&d),
                "--server",
                &url,
                "--device-id",
                id,
                "--director-root",
                &s(&p("srv/keys/director-root.json")),
                "--slot-mib",
                "4",
            ],
            &[],
        );
        let keys = tern_fs::KeyFiles {
            private: d.join("state/device.pem"),
            public: d.join("state/device.pub.json"),
        };
        std::fs::create_dir_all(d.join("state")).unwrap();
        tern_fs::generate_key_files(tern_core::KeyAlgorithm::Ed25519, &keys).unwrap();
        let cfg = d.join("agent.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!("ca_cert = \"{}\"\n", s(&p("server-ca.pem"))));
        std::fs::write(&cfg, text).unwrap();
        (d, std::fs::read_to_string(&keys.private).unwrap())
    };
    let with_cert = |d: &Path, pem: &str| {
        write(&d.join("device.crt"), pem);
        let cfg = d.join("agent.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str("client_cert = \"device.crt\"\n");
        std::fs::write(&cfg, text).unwrap();
        s(&cfg)
    };
    let enroll = |cfg: &str| {
        Command::new(tern_bin())
            .args(["device", "enroll", "--config", cfg, "--output", "json"])
            .output()
            .unwrap()
    };

    // The right certificate: approved at once, and the device checks in over TLS.
    let (a, a_key) = device("mtls-a");
    let a_cfg = with_cert(&a, &device_cert(&device_ca, "mtls-a", &a_key));
    let out = enroll(&a_cfg);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "approved", "{v}");
    let polled = run_ok(&["agent", "run", "--once", "--output", "json", "--config", &a_cfg], &[]);
    assert!(polled.contains("\"idle\""), "{polled}");

    // A certificate for another id.
    let (b, b_key) = device("mtls-b");
    let b_cfg = with_cert(&b, &device_cert(&device_ca, "mtls-a", &b_key));
    let err = String::from_utf8_lossy(&enroll(&b_cfg).stderr).into_owned();
    assert!(
        err.contains("HTTP 401") && err.contains("certificate is for `mtls-a`, not `mtls-b`"),
        "{err}"
    );

    // A certificate whose key is not the device key (the agent would not build such a
    // client, so the request is made by hand).
    let (c, _) = device("mtls-c");
    let other = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let identity = format!(
        "{}\n{}",
        device_cert(&device_ca, "mtls-c", &other.serialize_pem()),
        other.serialize_pem()
    );
    // The enrollment document is genuine (signed by the device key), the certificate not.
    let c_key = tern_fs::load_signing_key(&c.join("state/device.pem")).unwrap();
    let (status, text) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let client = reqwest::Client::builder()
                .no_proxy()
                .add_root_certificate(reqwest::Certificate::from_pem(server_ca.pem.as_bytes()).unwrap())
                .identity(reqwest::Identity::from_pem(identity.as_bytes()).unwrap())
                .build()
                .unwrap();
            let challenge: serde_json::Value = serde_json::from_slice(
                &client
                    .get(format!("{url}/api/v1/devices/enroll/challenge"))
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap(),
            )
            .unwrap();
            let doc = tern_core::enrollment::Enrollment {
                kind: tern_core::enrollment::ENROLLMENT_TYPE.into(),
                device_id: "mtls-c".into(),
                public_key: c_key.public().to_value().clone(),
                encryption_key: None,
                device_type: "tern-sim".into(),
                hardware: "rev-a".into(),
                tags: vec![],
                token_id: None,
                challenge: challenge["challenge"].as_str().unwrap().to_owned(),
            };
            let body = tern_core::director::sign_document("enrollment", &doc, &c_key).unwrap();
            let resp = client
                .post(format!("{url}/api/v1/devices/enroll"))
                .body(body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        });
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("not the device key"), "{text}");

    // No certificate and no token.
    let (d, _) = device("mtls-d");
    let err = String::from_utf8_lossy(&enroll(&s(&d.join("agent.toml"))).stderr).into_owned();
    assert!(err.contains("no enrollment token, and no device certificate"), "{err}");

    // A certificate from another CA: the TLS handshake itself fails.
    let (e, e_key) = device("mtls-e");
    let e_cfg = with_cert(&e, &device_cert(&rogue_ca, "mtls-e", &e_key));
    let out = enroll(&e_cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("HTTP "), "the server answered a rogue certificate: {err}");

    drop(server);
}

/// A child process killed when dropped (also when the test fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
