//! The server under kills and scale-out: SIGKILL mid-upload publishes all or nothing;
//! SIGKILL mid-check-in loses no acknowledged report; two processes on one PostgreSQL
//! database serve one deployment state and re-sign the timestamp one at a time.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod fleet;
use fleet::{http, s, tern_bin, try_http, Fleet, Pg, Server};

/// Every published release is whole: the repository refreshes from the first root and each
/// release's targets download and verify.
fn assert_repository_whole(f: &Fleet, round: usize) -> Vec<String> {
    let releases = f.api("GET", "/api/v1/releases", Some(&f.admin), None).body;
    let mut names = Vec::new();
    for r in releases.as_array().unwrap() {
        names.push(r["name"].as_str().unwrap().to_owned());
        for t in r["targets"].as_array().unwrap() {
            f.tuf_download(&format!("check-{round}"), t["name"].as_str().unwrap());
        }
    }
    names
}

#[test]
fn killing_the_server_mid_upload_publishes_all_or_nothing() {
    let mut f = Fleet::new(None);
    f.publish("1.0.0", 64);
    let mut landed = 0;
    let mut published_after_kill = 0;
    // Kill at each stage of an upload: while the body arrives, while payloads are verified
    // and stored, once a payload file is in place (before the publishing transaction), and
    // at two fixed delays.
    let artifacts = f.path("srv/artifacts");
    let non_empty = |dir: &str| {
        std::fs::read_dir(artifacts.join(dir))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
            })
            .unwrap_or(false)
    };
    let blobs_before = |n: usize| {
        std::fs::read_dir(artifacts.join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
            > n
    };
    for round in 0..5usize {
        let version = format!("2.0.{round}");
        let bundle = f.bundle(&version, 48 * 1024);
        let _ = std::fs::remove_dir_all(artifacts.join("uploads"));
        let _ = std::fs::remove_dir_all(artifacts.join("tmp"));
        let blob_count = std::fs::read_dir(artifacts.join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0);
        let upload = Command::new(tern_bin())
            .args(["release", "upload", &s(&bundle)])
            .env("TERN_SERVER", &f.server.url)
            .env("TERN_TOKEN", &f.admin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            let at_stage = match round {
                0 => non_empty("uploads"),
                1 => non_empty("tmp"),
                2 => blobs_before(blob_count),
                3 => started.elapsed() > Duration::from_millis(150),
                _ => started.elapsed() > Duration::from_millis(400),
            };
            if at_stage || started.elapsed() > Duration::from_secs(20) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        f.server.kill();
        let acknowledged = upload.wait_with_output().unwrap().status.success();
        f.server.restart();
        let names = assert_repository_whole(&f, round);
        let published = names.contains(&version);
        if acknowledged {
            assert!(published, "round {round}: an acknowledged upload is missing");
        } else {
            landed += 1;
            if published {
                // Committed, then killed before the answer: whole, as checked above.
                published_after_kill += 1;
            }
        }
    }
    assert!(landed >= 2, "only {landed} kills landed during an upload");
    eprintln!("{landed} kills landed mid-upload; {published_after_kill} of them after the commit");
    // The server goes on: the next upload is accepted.
    f.publish("3.0.0", 64);
    assert!(assert_repository_whole(&f, 99).contains(&"3.0.0".to_owned()));
}

#[test]
fn killing_the_server_mid_checkin_loses_no_acknowledged_report() {
    let mut f = Fleet::new(None);
    f.publish("1.1.0", 64);
    let url = f.server.url.clone();
    let dev = f.device("ack-a", &[], &url);
    let dep = f.deploy("1.1.0", &["--device", "ack-a"]);
    let key = Arc::new(dev.key());
    let counter = Arc::new(AtomicU64::new(0));
    let mut kills = 0;
    for round in 0..4 {
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (k, c, a, st, u, d) = (
            key.clone(),
            counter.clone(),
            acked.clone(),
            stop.clone(),
            url.clone(),
            dep.clone(),
        );
        let sender = std::thread::spawn(move || {
            let mut challenge = fleet::challenge(&u, "ack-a");
            while !st.load(Ordering::SeqCst) {
                let i = c.fetch_add(1, Ordering::SeqCst) + 1;
                let checkin = tern_core::director::CheckIn {
                    kind: tern_core::director::CHECKIN_TYPE.into(),
                    device_id: "ack-a".into(),
                    nonce: format!("{i:032x}"),
                    challenge: challenge.clone(),
                    time: tern_agent::remote::now().to_string(),
                    phase: "idle".into(),
                    slots: vec![],
                    deployment: Some(tern_core::director::DeploymentReport {
                        deployment: d.clone(),
                        stage: tern_core::director::Stage::Downloading,
                        progress: Some(tern_core::director::Progress {
                            done: i,
                            total: 1 << 40,
                        }),
                        reason: None,
                    }),
                    refused_order: None,
                };
                let body = tern_core::director::sign_document("check-in", &checkin, &k).unwrap();
                match try_http("POST", &format!("{u}/api/v1/devices/ack-a/checkin"), None, Some(body)) {
                    Some(ans) if ans.status == 200 => {
                        a.store(i, Ordering::SeqCst);
                        challenge = ans.body["challenge"].as_str().unwrap().to_owned();
                    }
                    _ => return,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300 + 137 * round));
        f.server.kill();
        stop.store(true, Ordering::SeqCst);
        sender.join().unwrap();
        f.server.restart();
        let last = acked.load(Ordering::SeqCst);
        assert!(last > 0, "round {round}: no check-in was acknowledged before the kill");
        let d = f.deployment(&dep);
        let row = &d["devices"][0];
        assert_eq!(row["status"], "downloading", "{d}");
        let stored = row["progress_done"].as_u64().unwrap();
        assert!(
            stored >= last,
            "round {round}: acknowledged progress {last}, stored {stored}"
        );
        kills += 1;
    }
    assert_eq!(kills, 4);
}

#[test]
fn two_servers_share_one_postgres_database() {
    let pg = Pg::start();
    let env = [
        ("TERN_SERVER_TIMESTAMP_EXPIRY_SECS", "4"),
        ("TERN_SERVER_POLL_INTERVAL_SECS", "1"),
    ];
    let started = Instant::now();
    let f = Fleet::with_env(Some(&pg.url), &env);
    let second = Server::start(&f.path("srv"), Some(&pg.url), &env);
    let servers = [f.server.url.clone(), second.url.clone()];
    f.publish("1.1.0", 256);
    let a = f.device("two-a", &["lab"], &servers[0]);
    let b = f.device("two-b", &["lab"], &servers[1]);
    let dep = f.deploy("1.1.0", &["--tag", "lab"]);

    let view = |i: usize| -> Value {
        let v = http(
            "GET",
            &format!("{}/api/v1/deployments/{dep}", servers[i]),
            Some(&f.admin),
            None,
        );
        assert_eq!(v.status, 200);
        v.body
    };
    // Devices alternate between the two servers at every poll; both always show one state.
    for round in 0..10 {
        for (n, dev) in [&a, &b].into_iter().enumerate() {
            dev.set_url(&servers[(round + n) % 2]);
            let o = dev.poll();
            if o["outcome"] == "installed" && o["reboot_needed"] == true {
                dev.reboot();
            }
            assert_eq!(view(0), view(1), "the two servers disagree after round {round}");
        }
        if view(0)["status"] == "finished" {
            break;
        }
    }
    let d = view(1);
    assert_eq!(d["counts"]["succeeded"], 2, "{d}");

    // Let the timestamp come due a few times (4 s lifetime, re-signed at half of it).
    let run_for = Duration::from_secs(12);
    if let Some(rest) = run_for.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    let mut resigns: Vec<(i64, String, u64)> = f
        .audit()
        .iter()
        .filter(|e| e["action"] == "repository.resign-timestamp")
        .map(|e| {
            let version = e["detail"]
                .as_str()
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (
                e["at_us"].as_i64().unwrap(),
                e["actor"].as_str().unwrap().to_owned(),
                version,
            )
        })
        .collect();
    resigns.sort();
    assert!(resigns.len() >= 3, "too few re-signs: {resigns:?}");
    let mut versions: Vec<u64> = resigns.iter().map(|r| r.2).collect();
    versions.dedup();
    assert_eq!(
        versions.len(),
        resigns.len(),
        "a timestamp version was signed twice: {resigns:?}"
    );
    // One process at a time: the database lease (2 s here) separates consecutive re-signs,
    // whichever process made them.
    for w in resigns.windows(2) {
        let gap_ms = (w[1].0 - w[0].0) / 1000;
        assert!(gap_ms >= 1500, "re-signs {gap_ms} ms apart: {:?} then {:?}", w[0], w[1]);
    }
    // Both processes serve the same, valid timestamp.
    let ts0 = http(
        "GET",
        &format!("{}/repo/metadata/timestamp.json", servers[0]),
        None,
        None,
    );
    let ts1 = http(
        "GET",
        &format!("{}/repo/metadata/timestamp.json", servers[1]),
        None,
        None,
    );
    assert_eq!(ts0.status, 200);
    let v0 = ts0.body["signed"]["version"].as_u64().unwrap();
    let v1 = ts1.body["signed"]["version"].as_u64().unwrap();
    assert!(v0.abs_diff(v1) <= 1, "{v0} vs {v1}");
    drop(second);
}

/// The lease that lets one process at a time re-sign the timestamp, raced on PostgreSQL:
/// of many concurrent takers exactly one holds it; the holder renews it; another takes it
/// only after it lapses.
#[test]
fn the_resign_lease_has_one_holder_at_a_time() {
    let pg = Pg::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = tern_server::db::Db::connect(&pg.url, 32).await.unwrap();
        let mut racers = Vec::new();
        for i in 0..24 {
            let db = db.clone();
            racers.push(tokio::spawn(async move {
                db.try_lease("race", &format!("p{i}"), 1500).await.unwrap()
            }));
        }
        let mut winners = Vec::new();
        for (i, r) in racers.into_iter().enumerate() {
            if r.await.unwrap() {
                winners.push(format!("p{i}"));
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?} hold the lease at once");
        let holder = winners[0].clone();
        assert!(
            db.try_lease("race", &holder, 1500).await.unwrap(),
            "the holder cannot renew"
        );
        let other = if holder == "p0" { "p1" } else { "p0" };
        assert!(!db.try_lease("race", other, 1500).await.unwrap());
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert!(
            db.try_lease("race", other, 1500).await.unwrap(),
            "a lapsed lease cannot be taken"
        );
    });
}
