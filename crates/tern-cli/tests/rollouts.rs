//! Rollouts against real server processes on SQLite and PostgreSQL, with a fleet of device
//! identities in this process that sign real check-ins over HTTP (registered through the
//! server's bulk path): phases open only on their success thresholds, the error threshold
//! stops a rollout, pause, resume, cancel, approval, windows and timeouts behave, devices
//! joining mid-rollout take their phase, `/metrics` agrees with the status, and a SIGKILL
//! while creating or advancing leaves all or nothing. Every order a device receives is
//! checked against the phases open at that moment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_core::director::{self, CheckIn, DeploymentReport, SlotReport, Stage};
use tern_server::fleet::policy;

mod fleet;
use fleet::{http, Fleet, Pg};

/// A device identity that checks in like an agent would.
struct Light {
    challenge: Option<String>,
    /// The target and version its booted slot holds once it committed one.
    installed: Option<(String, String)>,
    /// The rollout and target of the order it follows, and how far it got.
    order: Option<(String, String, String)>,
    stage: Option<Stage>,
    /// The session token from its last check-in.
    session: Option<String>,
}

/// Many devices sharing one key (the server checks each against its registration).
struct Lights {
    key: tern_core::SigningKey,
    url: String,
    devices: BTreeMap<String, Light>,
    /// Every order received: (device, rollout).
    orders: Vec<(String, String)>,
}

impl Lights {
    fn register(f: &Fleet, prefix: &str, n: usize, tags: &[&str]) -> Lights {
        let (key, _) = tern_core::SigningKey::generate(tern_core::KeyAlgorithm::Ed25519).unwrap();
        let mut l = Lights {
            key,
            url: f.server.url.clone(),
            devices: BTreeMap::new(),
            orders: Vec::new(),
        };
        l.add(f, prefix, n, tags);
        l
    }

    /// Register `n` more devices, approved, through the bulk path.
    fn add(&mut self, f: &Fleet, prefix: &str, n: usize, tags: &[&str]) -> Vec<String> {
        let public = self.key.public().clone();
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        let rows: Vec<tern_server::db::NewDevice> = ids
            .iter()
            .map(|id| tern_server::db::NewDevice {
                id: id.clone(),
                public_key: public.to_value().clone(),
                keyid: public.keyid().as_str().to_owned(),
                device_type: "tern-sim".into(),
                hardware: "bench".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
            })
            .collect();
        let url = f
            .db_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", f.path("srv/tern.db").display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let db = tern_server::db::Db::connect(&url, 2).await.unwrap();
            // SQLite refuses a transaction that read before another process (the running
            // server) wrote: the registration is an upsert, so it is tried again.
            let mut tries = 0;
            while let Err(e) = db.register_devices(&rows).await {
                tries += 1;
                assert!(tries < 50, "registering devices: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            db.pool.close().await;
            db.write.close().await;
        });
        for id in &ids {
            self.devices.insert(
                id.clone(),
                Light {
                    challenge: None,
                    installed: None,
                    order: None,
                    stage: None,
                    session: None,
                },
            );
        }
        ids
    }

    /// One signed check-in of `id` reporting `stage` on its order; returns the order's
    /// rollout if the answer carried one.
    fn checkin(&mut self, id: &str, stage: Option<Stage>, reason: Option<&str>) -> Option<String> {
        let url = self.url.clone();
        let d = self.devices.get_mut(id).unwrap();
        let challenge = match &d.challenge {
            Some(c) => c.clone(),
            None => fleet::challenge(&url, id),
        };
        if let (Some((_, target, version)), Some(Stage::Committed)) = (&d.order, stage) {
            d.installed = Some((target.clone(), version.clone()));
        }
        let booted = match &d.installed {
            Some((target, version)) => SlotReport {
                name: "rootfs.b".into(),
                booted: true,
                status: "committed".into(),
                version: Some(version.clone()),
                target: Some(target.clone()),
                sha256: None,
            },
            None => SlotReport {
                name: "rootfs.a".into(),
                booted: true,
                status: "committed".into(),
                version: Some("0.9.0".into()),
                target: None,
                sha256: None,
            },
        };
        let doc = CheckIn {
            kind: director::CHECKIN_TYPE.into(),
            device_id: id.into(),
            nonce: tern_server::random_hex(16),
            challenge,
            time: tern_agent::remote::now().to_string(),
            phase: "idle".into(),
            slots: vec![booted],
            deployment: match (&d.order, stage) {
                (Some((rollout, _, _)), Some(stage)) => Some(DeploymentReport {
                    deployment: rollout.clone(),
                    stage,
                    progress: None,
                    reason: reason.map(str::to_owned),
                }),
                _ => None,
            },
            refused_order: None,
        };
        let body = director::sign_document("check-in", &doc, &self.key).unwrap();
        let a = http("POST", &format!("{url}/api/v1/devices/{id}/checkin"), None, Some(body));
        assert_eq!(a.status, 200, "check-in of {id}: {}", a.body);
        d.challenge = Some(a.body["challenge"].as_str().unwrap().to_owned());
        d.session = a.body["session"].as_str().map(str::to_owned);
        if let Some(s) = stage {
            d.stage = Some(s);
        }
        let order = &a.body["order"];
        if order.is_null() {
            return None;
        }
        let signed: Value = order["signed"].clone();
        assert_eq!(signed["nonce"], doc.nonce.as_str());
        let rollout = signed["deployment"].as_str().unwrap().to_owned();
        let target = signed["targets"][0]["name"].as_str().unwrap().to_owned();
        let version = signed["release"].as_str().unwrap().to_owned();
        if d.order.as_ref().map(|o| &o.0) != Some(&rollout) {
            d.stage = None;
        }
        d.order = Some((rollout.clone(), target, version));
        self.orders.push((id.to_owned(), rollout.clone()));
        Some(rollout)
    }

    /// Every device checks in once with nothing to report: who got a new order from `rollout`?
    fn sweep(&mut self, rollout: &str) -> Vec<String> {
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        let mut fresh = Vec::new();
        for id in ids {
            let had = self.devices[&id].order.as_ref().is_some_and(|o| o.0 == rollout);
            if self.checkin(&id, None, None).as_deref() == Some(rollout) && !had {
                fresh.push(id);
            }
        }
        fresh
    }

    /// Take `id` through its order to `last` (Committed: success; Failed; or stop at
    /// Installing).
    fn drive(&mut self, id: &str, last: Stage) {
        let stages: &[Stage] = match last {
            Stage::Committed => &[
                Stage::Downloading,
                Stage::Installing,
                Stage::Rebooting,
                Stage::Trial,
                Stage::Committed,
            ],
            Stage::Failed => &[Stage::Downloading, Stage::Failed],
            Stage::Installing => &[Stage::Downloading, Stage::Installing],
            other => panic!("drive to {other:?}"),
        };
        for s in stages {
            let reason = (*s == Stage::Failed).then_some("the test made it fail");
            self.checkin(id, Some(*s), reason);
        }
    }
}

fn api(f: &Fleet, method: &str, path: &str, token: &str, body: Option<Value>) -> fleet::Answer {
    f.api(method, path, Some(token), body.map(|b| b.to_string().into_bytes()))
}

fn status(f: &Fleet, id: &str) -> Value {
    let a = api(f, "GET", &format!("/api/v1/rollouts/{id}"), &f.admin, None);
    assert_eq!(a.status, 200, "{}", a.body);
    a.body
}

fn wait_for(f: &Fleet, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = status(f, id);
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "waiting for {what}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The phase (0-based) `device` falls in, by the server's own pure function and the
/// rollout's phases.
fn phase_of(rollout: &Value, device: &str) -> usize {
    let id = rollout["id"].as_str().unwrap();
    let cutoffs: Vec<u64> = rollout["spec"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| policy::percent_cutoff(p["percent"].as_f64().unwrap()))
        .collect();
    let pos = policy::position(policy::bucket(device), policy::offset(id));
    policy::phase_of(pos, &cutoffs).unwrap()
}

/// Create a rollout and wait for the engine to count its selection (creation reads no
/// device).
fn create(f: &Fleet, token: &str, body: Value) -> Value {
    let a = api(f, "POST", "/api/v1/rollouts", token, Some(body));
    assert_eq!(a.status, 200, "{}", a.body);
    let id = a.body["id"].as_str().unwrap().to_owned();
    wait_for(f, &id, "the selection counted", |v| v["counted"] == true)
}

/// Scrape `/metrics` into `name{labels} value` lines.
fn metrics(f: &Fleet) -> HashMap<String, f64> {
    let a = http("GET", &format!("{}/metrics", f.server.url), Some(&f.admin), None);
    assert_eq!(a.status, 200);
    String::from_utf8(a.bytes)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn three_phases(db: Option<&str>) {
    let f = Fleet::with_env(db, &[("TERN_SERVER_ROLLOUT_TICK_MS", "100")]);
    f.publish("1.0.0", 16);
    let mut lights = Lights::register(&f, "ph", 320, &["lab"]);
    let r = create(
        &f,
        &f.admin,
        json!({
            "release": "1.0.0",
            "selector": {"tags": ["lab"], "device_type": "tern-sim", "hardware": "bench"},
            "phases": [{"percent": 10.0, "success_percent": 100.0}, {"percent": 40.0, "success_percent": 90.0}, {"percent": 100.0}],
            "error": {"percent": 20.0, "min_finished": 10},
        }),
    );
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["status"], "running");
    let selected: Vec<u64> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["counts"]["selected"].as_u64().unwrap())
        .collect();
    assert_eq!(selected.iter().sum::<u64>(), 320, "{r}");
    let phase_ids = |k: usize| -> Vec<String> {
        lights
            .devices
            .keys()
            .filter(|d| phase_of(&r, d) == k)
            .cloned()
            .collect()
    };
    let (p0, p1, p2) = (phase_ids(0), phase_ids(1), phase_ids(2));
    assert_eq!(p0.len() as u64, selected[0]);
    assert!(
        p0.len() >= 10 && p1.len() >= 40,
        "phases of {} and {}",
        p0.len(),
        p1.len()
    );

    // Phase 1 only.
    let mut got: HashSet<String> = lights.sweep(&id).into_iter().collect();
    assert_eq!(
        got,
        p0.iter().cloned().collect(),
        "phase 1's devices, and only they, are ordered"
    );
    // All but one succeed: 100 % is needed, so phase 2 stays closed.
    for d in &p0[1..] {
        lights.drive(d, Stage::Committed);
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(status(&f, &id)["opened"], 1);
    assert!(lights.sweep(&id).is_empty(), "no order outside phase 1");
    lights.drive(&p0[0], Stage::Committed);
    wait_for(&f, &id, "phase 2", |v| v["opened"] == 2);
    got = lights.sweep(&id).into_iter().collect();
    assert_eq!(got, p1.iter().cloned().collect(), "phase 2's devices are ordered");

    // Phase 2 needs 90 %: 80 % is not enough.
    let n80 = p1.len() * 8 / 10;
    for d in &p1[..n80] {
        lights.drive(d, Stage::Committed);
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(status(&f, &id)["opened"], 2);
    assert!(lights.sweep(&id).is_empty(), "no order outside phases 1 and 2");
    for d in &p1[n80..] {
        lights.drive(d, Stage::Committed);
    }
    wait_for(&f, &id, "phase 3", |v| v["opened"] == 3);
    got = lights.sweep(&id).into_iter().collect();
    assert_eq!(got, p2.iter().cloned().collect());

    // Failures in phase 3 cross the error threshold: the rollout stops.
    let finished_ok = (p0.len() + p1.len()) as u64;
    // The fewest failures that cross 20 % of the finished devices.
    let failures = finished_ok.div_ceil(4) as usize;
    for d in &p2[..failures] {
        lights.drive(d, Stage::Failed);
    }
    let v = wait_for(&f, &id, "the stop", |v| v["status"] == "stopped");
    assert!(v["reason"].as_str().unwrap().contains("error threshold"), "{v}");
    assert_eq!(v["totals"]["failed"], failures as u64);
    // Devices ordered but not yet downloading learn of the stop; nobody gets a new order.
    let before = lights.orders.len();
    let next = &p2[failures];
    assert!(lights.checkin(next, None, None).is_none());
    assert_eq!(lights.orders.len(), before);
    let v = status(&f, &id);
    assert_eq!(v["phases"][2]["by_status"]["cancelled"], 1, "{v}");

    // Every order went to a device of a phase open at the time (checked above, sweep by
    // sweep); and none to a device of another rollout's phase.
    for (dev, rollout) in &lights.orders {
        assert_eq!(rollout, &id);
        assert!(phase_of(&r, dev) < 3);
    }

    // /metrics agrees with the status.
    let m = metrics(&f);
    assert_eq!(m.get("tern_rollouts{status=\"stopped\"}"), Some(&1.0), "{m:?}");
    assert_eq!(m.get("tern_devices{status=\"approved\"}"), Some(&320.0));
    let polls_or_checkins = m
        .iter()
        .filter(|(k, _)| k.starts_with("tern_checkins_total{outcome=\"accepted\"}"))
        .map(|(_, v)| *v)
        .sum::<f64>();
    assert!(polls_or_checkins >= lights.orders.len() as f64);
    assert_eq!(
        m.get("tern_devices_by_version{version=\"1.0.0\"}").copied(),
        Some(finished_ok as f64),
        "{m:?}"
    );
}

#[test]
fn three_phases_on_sqlite() {
    three_phases(None);
}

#[test]
fn three_phases_on_postgres() {
    let pg = Pg::start();
    three_phases(Some(&pg.url));
}

/// Polls with a session token leave the device's last-seen time behind, written in
/// batches (more devices here than one statement holds).
fn polls_are_seen(db: Option<&str>) {
    let f = Fleet::with_env(db, &[]);
    let mut l = Lights::register(&f, "seen", 600, &["seen"]);
    let ids: Vec<String> = l.devices.keys().cloned().collect();
    for id in &ids {
        l.checkin(id, None, None);
    }
    // Seen by their check-ins at this second at the latest; the polls come a second later.
    let checked_in = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    std::thread::sleep(Duration::from_millis(1100));
    for (id, d) in &l.devices {
        let a = http(
            "GET",
            &format!("{}/api/v1/devices/{id}/poll", f.server.url),
            d.session.as_deref(),
            None,
        );
        assert_eq!(a.status, 200, "poll of {id}: {}", a.body);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stale: Vec<&String> = ids.iter().collect();
    while !stale.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} devices' polls not seen, first {}",
            stale.len(),
            stale[0]
        );
        std::thread::sleep(Duration::from_millis(250));
        stale.retain(|id| {
            let a = api(&f, "GET", &format!("/api/v1/devices/{id}"), &f.admin, None);
            assert_eq!(a.status, 200, "{}", a.body);
            a.body["last_seen"].as_i64().unwrap_or(0) <= checked_in
        });
    }
}

#[test]
fn polls_are_seen_on_sqlite() {
    polls_are_seen(None);
}

#[test]
fn polls_are_seen_on_postgres() {
    let pg = Pg::start();
    polls_are_seen(Some(&pg.url));
}

/// The server answers a plain poll ahead of its router (`api::PollFront`); an escaped
/// device id goes through the router's handler. Both must give the same answer to the same
/// poll: with the device's session, with none, with another device's, waiting for an
/// order, and once the device is decommissioned.
#[test]
fn the_poll_front_answers_as_the_router_does() {
    let f = Fleet::with_env(None, &[("TERN_SERVER_ROLLOUT_TICK_MS", "100")]);
    let mut l = Lights::register(&f, "front", 2, &["front"]);
    for id in ["front-0000", "front-0001"] {
        l.checkin(id, None, None);
    }
    let token = |id: &str| l.devices[id].session.clone().unwrap();
    let both = |id: &str, token: Option<&str>| {
        let front = http(
            "GET",
            &format!("{}/api/v1/devices/{id}/poll", f.server.url),
            token,
            None,
        );
        let escaped = id.replace('-', "%2D");
        let router = http(
            "GET",
            &format!("{}/api/v1/devices/{escaped}/poll", f.server.url),
            token,
            None,
        );
        assert_eq!(
            (front.status, &front.content_type, &front.body),
            (router.status, &router.content_type, &router.body),
            "poll of {id}: the front and the router differ"
        );
        front
    };
    let a = both("front-0000", Some(&token("front-0000")));
    assert_eq!(
        (a.status, &a.body),
        (
            200,
            &json!({"poll_interval_secs": a.body["poll_interval_secs"], "checkin": false})
        )
    );
    assert!(
        a.body["poll_interval_secs"].as_u64().is_some_and(|s| s > 0),
        "{}",
        a.body
    );
    assert_eq!(a.content_type.as_deref(), Some("application/json"));
    assert_eq!(both("front-0000", None).status, 401);
    assert_eq!(both("front-0000", Some(&token("front-0001"))).status, 401);
    assert_eq!(both("front-0000", Some("not-a-token")).status, 401);
    // An order waiting for both devices: every poll says to check in.
    f.publish("1.0.0", 16);
    create(
        &f,
        &f.admin,
        json!({"release": "1.0.0", "selector": {"tags": ["front"]}, "phases": [{"percent": 100.0}]}),
    );
    // Each change is waited for through the front alone, then both are asked (the device
    // does not check in, so what it is told stays the same meanwhile).
    let front = |id: &str| {
        http(
            "GET",
            &format!("{}/api/v1/devices/{id}/poll", f.server.url),
            Some(&token(id)),
            None,
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while front("front-0001").body["checkin"] != true {
        assert!(Instant::now() < deadline, "no poll asked for a check-in");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(both("front-0001", Some(&token("front-0001"))).body["checkin"], true);
    let a = api(&f, "POST", "/api/v1/devices/front-0001/decommission", &f.admin, None);
    assert_eq!(a.status, 200, "{}", a.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while front("front-0001").status != 403 {
        assert!(Instant::now() < deadline, "the decommissioned device may still poll");
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = both("front-0001", Some(&token("front-0001")));
    assert_eq!(a.body["error"]["kind"], "Forbidden", "{}", a.body);
}

/// A count phase is fixed when it opens, not at creation: a canary of 5 created before its
/// devices are registered still holds 5 devices, and the rest wait for the next phase.
#[test]
fn a_count_phase_holds_its_count_of_devices_selected_later() {
    let f = Fleet::with_env(None, &[("TERN_SERVER_ROLLOUT_TICK_MS", "100")]);
    f.publish("1.0.0", 16);
    let r = create(
        &f,
        &f.admin,
        json!({
            "release": "1.0.0",
            "selector": {"tags": ["late"]},
            "phases": [{"count": 5, "success_percent": 100.0}, {"percent": 100.0}],
        }),
    );
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["status"], "running");
    let mut lights = Lights::register(&f, "late", 40, &["late"]);
    wait_for(&f, &id, "the canary's cut-off fixed", |v| {
        v["phases"][0]["counts"]["selected"] == 5
    });
    let ordered = lights.sweep(&id);
    assert_eq!(
        ordered.len(),
        5,
        "the canary phase orders 5 devices, not the fleet: {ordered:?}"
    );
}

fn controls(db: Option<&str>) {
    let f = Fleet::with_env(db, &[("TERN_SERVER_ROLLOUT_TICK_MS", "100")]);
    f.publish("1.0.0", 16);
    let mut lights = Lights::register(&f, "ctl", 24, &["lab"]);

    // Approval: nothing is ordered before it; the creator cannot approve.
    let r = create(
        &f,
        &f.admin,
        json!({"release": "1.0.0", "selector": {"tags": ["lab"]}, "require_approval": true, "timeout_secs": 2}),
    );
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["status"], "waiting-approval");
    assert!(lights.sweep(&id).is_empty());
    let own = api(&f, "POST", &format!("/api/v1/rollouts/{id}/approve"), &f.admin, None);
    assert_eq!(own.status, 403, "{}", own.body);
    let releaser = f.token("releaser");
    assert_eq!(
        api(&f, "POST", &format!("/api/v1/rollouts/{id}/approve"), &releaser, None).status,
        403
    );
    let second = f.token("admin");
    let v = api(&f, "POST", &format!("/api/v1/rollouts/{id}/approve"), &second, None).body;
    assert_eq!(v["status"], "running", "{v}");
    assert!(v["approved_by"].as_str().unwrap().contains("admin"));

    // Pause before anyone checked in: no order; resume: orders.
    let ids: Vec<String> = lights.devices.keys().cloned().collect();
    assert_eq!(
        api(&f, "POST", &format!("/api/v1/rollouts/{id}/pause"), &f.admin, None).body["status"],
        "paused"
    );
    assert!(lights.sweep(&id).is_empty(), "a paused rollout orders nobody");
    api(&f, "POST", &format!("/api/v1/rollouts/{id}/resume"), &f.admin, None);
    let half: Vec<String> = ids[..12].to_vec();
    for d in &half {
        assert_eq!(lights.checkin(d, None, None).as_deref(), Some(id.as_str()));
    }

    // A device stuck installing times out and counts as failed, with the reason.
    lights.drive(&ids[0], Stage::Installing);
    let v = wait_for(&f, &id, "the timeout", |v| v["totals"]["failed"] == 1);
    assert_eq!(v["phases"][0]["by_status"]["timed-out"], 1, "{v}");
    let hist = api(
        &f,
        "GET",
        &format!("/api/v1/devices/{}/history", ids[0]),
        &f.admin,
        None,
    )
    .body;
    assert!(
        hist[0]["to"] == "timed-out" && hist[0]["reason"].as_str().unwrap().contains("installing"),
        "{hist}"
    );

    // Cancel while one device installs and others are only ordered: no new orders; the
    // installing one keeps its order and reports; the ordered ones learn of the cancel.
    lights.drive(&ids[1], Stage::Installing);
    let v = api(&f, "POST", &format!("/api/v1/rollouts/{id}/cancel"), &f.admin, None).body;
    assert_eq!(v["status"], "cancelled");
    assert!(
        lights.checkin(&ids[20], None, None).is_none(),
        "no new order after cancel"
    );
    assert_eq!(
        lights.checkin(&ids[1], Some(Stage::Installing), None).as_deref(),
        Some(id.as_str())
    );
    assert!(lights.checkin(&ids[2], None, None).is_none());
    let v = status(&f, &id);
    assert_eq!(v["phases"][0]["by_status"]["installing"], 1, "{v}");
    assert_eq!(v["phases"][0]["by_status"]["cancelled"], 1, "{v}");
    lights.drive(&ids[1], Stage::Committed);
    assert_eq!(status(&f, &id)["totals"]["succeeded"], 1);

    // A window that is closed now withholds orders; polls are told nothing.
    let now = tern_agent::remote::now().unix();
    let hh = |t: i64| format!("{:02}:{:02}", (t / 3600) % 24, (t / 60) % 60);
    let r = create(
        &f,
        &f.admin,
        json!({"release": "1.0.0", "selector": {"tags": ["lab"]},
               "window": {"start": hh(now + 7200), "end": hh(now + 10800), "time_zone": "UTC"}}),
    );
    let closed = r["id"].as_str().unwrap().to_owned();
    assert!(lights.sweep(&closed).is_empty(), "no order outside the window");
    api(&f, "POST", &format!("/api/v1/rollouts/{closed}/cancel"), &f.admin, None);

    // A device enrolled mid-rollout, and one re-tagged into it, join their phase.
    let r = create(
        &f,
        &f.admin,
        json!({"release": "1.0.0", "selector": {"tags": ["late"]}}),
    );
    let late = r["id"].as_str().unwrap().to_owned();
    let new = lights.add(&f, "late", 2, &["late"]);
    assert_eq!(lights.checkin(&new[0], None, None).as_deref(), Some(late.as_str()));
    let tagged = api(
        &f,
        "PUT",
        &format!("/api/v1/devices/{}/tags", ids[23]),
        &f.admin,
        Some(json!({"tags": ["lab", "late"]})),
    );
    assert_eq!(tagged.status, 200, "{}", tagged.body);
    assert_eq!(lights.checkin(&ids[23], None, None).as_deref(), Some(late.as_str()));
    let page = api(&f, "GET", "/api/v1/devices?tag=late&limit=2", &f.admin, None).body;
    assert_eq!(page["devices"].as_array().unwrap().len(), 2, "{page}");
    let listed = api(&f, "GET", "/api/v1/devices?tag=late&limit=1", &f.admin, None).body;
    assert!(listed["next"].is_string(), "{listed}");
}

#[test]
fn controls_on_sqlite() {
    controls(None);
}

#[test]
fn controls_on_postgres() {
    let pg = Pg::start();
    controls(Some(&pg.url));
}

/// SIGKILL of the server while rollouts are created and while the engine opens phases:
/// after each restart every rollout is whole (its phases, counts and status agree), and no
/// device is ordered outside the open phases.
#[test]
fn killing_the_server_while_creating_and_advancing_leaves_all_or_nothing() {
    let mut f = Fleet::with_env(None, &[("TERN_SERVER_ROLLOUT_TICK_MS", "20")]);
    f.publish("1.0.0", 16);
    let mut lights = Lights::register(&f, "kill", 60, &["lab"]);
    for round in 0..6u64 {
        let create = std::process::Command::new(fleet::tern_bin())
            .args([
                "rollout",
                "create",
                "--release",
                "1.0.0",
                "--tag",
                "lab",
                "--phase",
                "50%@0",
                "--phase",
                "100%",
            ])
            .env("TERN_SERVER", &f.server.url)
            .env("TERN_TOKEN", &f.admin)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A success threshold of 0 % opens phase 2 on the engine's next tick: the kill
        // lands before, during or after the creation and the advance.
        std::thread::sleep(Duration::from_millis(5 + 13 * round));
        f.server.kill();
        let _ = create.wait_with_output();
        f.server.restart();
        let all = api(&f, "GET", "/api/v1/rollouts", &f.admin, None).body;
        for v in all.as_array().unwrap() {
            let v = &wait_for(&f, v["id"].as_str().unwrap(), "the selection counted", |v| {
                v["counted"] == true
            });
            let opened = v["opened"].as_u64().unwrap();
            assert!((1..=2).contains(&opened), "{v}");
            assert_eq!(v["phases"].as_array().unwrap().len(), 2, "{v}");
            assert_eq!(v["totals"]["selected"], 60, "{v}");
        }
        lights.url = f.server.url.clone();
        for id in lights.devices.keys().cloned().collect::<Vec<_>>() {
            if let Some(rollout) = lights.checkin(&id, None, None) {
                let v = status(&f, &rollout);
                assert!(
                    phase_of(&v, &id) < v["opened"].as_u64().unwrap() as usize,
                    "{id} in {v}"
                );
            }
        }
    }
}
