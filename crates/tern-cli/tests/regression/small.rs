//! Item 7, the smaller ones: internal errors reached clients and enrollment was
//! check-then-insert; a relative `--config` refused every archive; downloaded files went
//! into a slot without being hashed again; `tern install https://` had no minimum rate;
//! hooks inherited the agent's whole environment; `Range: bytes=-0` got a bogus 206;
//! approve and decommission were check-then-act.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::device::{s, Device, Releases};
use crate::fleet::{Fleet, Pg};

fn keypair() -> tern_core::SigningKey {
    tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519)
        .unwrap()
        .0
}

#[test]
fn internal_errors_are_not_sent_to_clients() {
    let mut pg = Pg::start();
    let f = Fleet::new(Some(&pg.url));
    pg.stop();
    let a = f.api("GET", "/api/v1/releases", Some(&f.admin), None);
    assert_eq!(a.status, 500, "{}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.starts_with("internal error "), "{message}");
    for leak in ["database", "pool", "connection", "postgres", "sqlx", "127.0.0.1"] {
        assert!(!message.to_lowercase().contains(leak), "{message}");
    }
    // The database comes back; so does the server, without a restart.
    pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = f.api("GET", "/api/v1/releases", Some(&f.admin), None);
        if a.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the database returned",
            a.status
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_enrollments_of_one_id_racing_get_one_success_and_one_conflict() {
    let f = Fleet::new(None);
    for round in 0..8 {
        let id = format!("race-{round}");
        let bodies: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let k = keypair();
                crate::fleet::enrollment_body(&f.server.url, &id, k.public(), &k, None, &f.enrollment)
            })
            .collect();
        let url = format!("{}/api/v1/devices/enroll", f.server.url);
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let tasks: Vec<_> = bodies
                .into_iter()
                .map(|b| {
                    let (url, token) = (url.clone(), f.enrollment.clone());
                    scope.spawn(move || crate::fleet::http("POST", &url, Some(&token), Some(b)).status)
                })
                .collect();
            tasks.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut sorted = statuses.clone();
        sorted.sort();
        assert_eq!(sorted, vec![200, 409], "round {round}: {statuses:?}");
    }
}

#[test]
fn approve_racing_decommission_never_leaves_an_approved_device() {
    let f = Fleet::new(None);
    for n in 0..12 {
        assert_eq!(f.enroll_signed(&format!("r{n}"), &keypair(), None).status, 200);
    }
    for n in 0..12 {
        let id = format!("r{n}");
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let tasks: Vec<_> = ["approve", "decommission"]
                .into_iter()
                .map(|action| {
                    let url = format!("{}/api/v1/devices/{id}/{action}", f.server.url);
                    let admin = f.admin.clone();
                    scope.spawn(move || crate::fleet::http("POST", &url, Some(&admin), None).status)
                })
                .collect();
            tasks.into_iter().map(|t| t.join().unwrap()).collect()
        });
        // Decommissioning succeeds from either state; approving succeeds only before it.
        assert_eq!(statuses[1], 200, "{id}: {statuses:?}");
        assert!(matches!(statuses[0], 200 | 409), "{id}: {statuses:?}");
        let d = f
            .api("GET", &format!("/api/v1/devices/{id}"), Some(&f.admin), None)
            .body;
        assert_eq!(d["status"], "decommissioned", "{id}: {statuses:?}");
    }
}

#[test]
fn a_relative_config_path_still_installs_archives() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    let src = rel.dir.path().join("app-src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("run"), b"ok\n").unwrap();
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf", &rel.p("app.tar"), "."])
        .status()
        .unwrap();
    assert!(tar.success());
    let dest = dev.path("apps/app");
    let bundle = rel.archive_bundle(&rel.p("app.tar"), "app.tar", &dest);
    // From the directory above the device's, as an operator would type it.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["install", &bundle, "--config", "d/agent.toml"])
        .current_dir(dev.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(dest.join("run")).unwrap(), b"ok\n");
}

#[test]
fn a_downloaded_file_changed_before_it_is_installed_is_refused() {
    let f = Fleet::new(None);
    let url = f.server.url.clone();
    let dev = f.device("changed", &[], &url);
    f.publish("1.1.0", 256);
    // Between the download and the write into the slot, something alters the file.
    let hook = dev.dir.join("pre-install");
    fs::write(
        &hook,
        "#!/bin/sh\nfor f in \"$TERN_STATE_DIR\"/downloads/*; do printf 'X' | dd of=\"$f\" bs=1 seek=100 conv=notrunc 2>/dev/null; done\n",
    )
    .unwrap();
    let mut perm = fs::metadata(&hook).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&hook, perm).unwrap();
    let cfg = fs::read_to_string(&dev.cfg).unwrap();
    fs::write(
        &dev.cfg,
        cfg.replacen("[hooks]\n", "[hooks]\npre_install = \"pre-install\"\n", 1),
    )
    .unwrap();
    let dep = f.deploy("1.1.0", &["--device", "changed"]);
    let status = dev.drive(&f, &dep, "changed");
    assert_eq!(status, "failed");
    let st = dev.status();
    assert_eq!(st["primary"], "A", "the altered image was made bootable: {st}");
    assert_eq!(st["slots"][1]["record"]["status"], "bad");
    let reason = f.deployment(&dep)["devices"][0]["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("hash does not match"), "{reason}");
}

/// A server that answers one request with its headers at once, then the body one byte
/// every 100 ms: never stalled, but 10 bytes a second.
fn trickling_server(body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let body = body.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut req = [0u8; 4096];
                let _ = c.read(&mut req);
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                if c.write_all(head.as_bytes()).is_err() {
                    return;
                }
                for b in body {
                    if c.write_all(&[b]).and_then(|()| c.flush()).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    format!("http://{addr}/r.tern")
}

#[test]
fn tern_install_over_http_gives_up_on_a_trickling_server() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 100_000, false);
    let url = trickling_server(fs::read(&bundle).unwrap());
    let dev = Device::new(&rel.root());
    let before = dev.snapshot();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["install", &url, "--config", &dev.config()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`tern install` of a trickled download was still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("slower than 1024 bytes/s"), "{err}");
    // The minimum rate applies after its 10 s grace, not at the 40 s of a stalled answer.
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert_eq!(dev.snapshot(), before);
}

#[test]
fn hooks_do_not_inherit_the_agents_environment() {
    let rel = Releases::new();
    let (bundle, _) = rel.bundle("1.0.0", "tern-sim", &[], 50_000, false);
    let dev = Device::new(&rel.root());
    let seen = dev.path("hook-env");
    dev.add_hook("pre-install", &format!("env > '{}'", s(&seen)));
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["install", &s(&bundle), "--config", &dev.config()])
        .env("TERN_ENROLLMENT_TOKEN", "ternenroll_secret")
        .env("AWS_SECRET_ACCESS_KEY", "hunter2")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env = fs::read_to_string(&seen).unwrap();
    assert!(!env.contains("hunter2") && !env.contains("ternenroll_secret"), "{env}");
    assert!(env.contains("TERN_HOOK=pre-install") && env.contains("PATH="), "{env}");
    assert!(env.contains(&format!("TERN_SLOT_DEVICE={}", s(&dev.path("slot-b.img")))));
}

#[test]
fn a_zero_length_suffix_range_is_unsatisfiable() {
    let f = Fleet::new(None);
    f.publish("1.0.0", 16);
    let release = f.api("GET", "/api/v1/releases/1.0.0", Some(&f.admin), None).body;
    let t = &release["targets"][0];
    let url = format!(
        "{}/repo/targets/sim/{}.rootfs-1.0.0.img",
        f.server.url,
        t["hashes"]["sha256"].as_str().unwrap()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, range, len) = rt.block_on(async {
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(&url)
            .header("Range", "bytes=-0")
            .send()
            .await
            .unwrap();
        let range = resp
            .headers()
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_owned());
        (resp.status().as_u16(), range, resp.bytes().await.unwrap().len())
    });
    assert_eq!(status, 416);
    assert_eq!(range.as_deref(), Some(format!("bytes */{}", 16 * 1024).as_str()));
    assert_eq!(len, 0);
}
