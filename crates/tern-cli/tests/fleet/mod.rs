//! A fleet for the server tests: a real `tern server` process on 127.0.0.1 (SQLite, or a
//! private PostgreSQL cluster started here), a release engineer's repository whose root
//! lists the server's online keys, simulated devices running the real agent, and an
//! optional man-in-the-middle proxy between devices and server.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn tern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A private PostgreSQL cluster on a free loopback port, stopped on drop. PostgreSQL
/// refuses to run as root, so as root it runs as the `postgres` user.
pub struct Pg {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
    pub url: String,
}

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (/usr/lib/postgresql); scripts/test installs it")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    versions.sort();
    versions
        .last()
        .expect("no PostgreSQL version installed")
        .join("bin")
        .join(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn as_postgres(cmd: &Path) -> Command {
    // SAFETY-free check of the effective user: `id -u` would need a process; libc is a dependency.
    let root = unsafe_free_is_root();
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(cmd);
        c
    } else {
        Command::new(cmd)
    }
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Pg {
    pub fn start() -> Pg {
        let dir = tempfile::tempdir().unwrap();
        if unsafe_free_is_root() {
            let out = Command::new("id").args(["-u", "postgres"]).output().unwrap();
            assert!(
                out.status.success(),
                "no `postgres` user: install PostgreSQL (scripts/test does)"
            );
            let uid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        }
        let data = dir.path().join("data");
        let out = as_postgres(&pg_bin("initdb"))
            .args(["-D", &s(&data), "-A", "trust", "-U", "tern", "--no-sync"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let child = Self::postmaster(dir.path(), port);
        Pg {
            dir,
            child,
            port,
            url: format!("postgres://tern@127.0.0.1:{port}/postgres"),
        }
    }

    fn postmaster(dir: &Path, port: u16) -> Child {
        let child = as_postgres(&pg_bin("postgres"))
            .args(["-D", &s(&dir.join("data")), "-p", &port.to_string(), "-k", &s(dir)])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(pg_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .output()
                .unwrap();
            if ready.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        child
    }

    /// Stop the cluster at once (SIGQUIT to the postmaster, not to `runuser`, which would
    /// not pass it on: connections drop, no checkpoint).
    pub fn stop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned));
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-QUIT", &pid]).status();
        }
        let _ = self.child.wait();
        // The postmaster's pid file goes once its children are gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.dir.path().join("data/postmaster.pid").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start it again on the same port (after [`Pg::stop`]).
    pub fn start_again(&mut self) {
        self.child = Self::postmaster(self.dir.path(), self.port);
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // SIGQUIT to the postmaster (not to `runuser`, which would not pass it on):
        // immediate shutdown of it and its children.
        self.stop();
    }
}

/// A `tern server run` process.
pub struct Server {
    child: Child,
    pub url: String,
    pub data: PathBuf,
    db_url: Option<String>,
    env: Vec<(String, String)>,
    port: u16,
}

impl Server {
    pub fn start(data: &Path, db_url: Option<&str>, env: &[(&str, &str)]) -> Server {
        Self::start_on(data, db_url, env, 0)
    }

    fn start_on(data: &Path, db_url: Option<&str>, env: &[(&str, &str)], port: u16) -> Server {
        let mut cmd = Command::new(tern_bin());
        cmd.args([
            "server",
            "run",
            "--data",
            &s(data),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]);
        if let Some(u) = db_url {
            cmd.args(["--database-url", u]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Its log (a line per request) goes to DATA/server.log, not into the tests' output.
        std::fs::create_dir_all(data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("server.log"))
            .unwrap();
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("tern server listening on ")
            .unwrap_or_else(|| panic!("server did not start: {line:?}"))
            .to_owned();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        Server {
            child,
            url,
            data: data.to_owned(),
            db_url: db_url.map(str::to_owned),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            port,
        }
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start again on the same port with the same settings.
    pub fn restart(&mut self) {
        self.kill();
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The old socket may linger a moment.
            if std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *self = Server::start_on(&self.data.clone(), self.db_url.clone().as_deref(), &env, self.port);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub bytes: Vec<u8>,
    pub content_range: Option<String>,
    pub content_type: Option<String>,
}

/// One request with an optional bearer token.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Answer {
    try_http(method, url, token, body).unwrap_or_else(|| panic!("{method} {url}: no answer"))
}

/// One request; `None` when the connection fails.
pub fn try_http(method: &str, url: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Option<Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut req = client.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp.bytes().await.ok()?.to_vec();
        Some(Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            bytes,
            content_range: None,
            content_type,
        })
    })
}

/// The challenge device `id`'s next check-in must answer.
pub fn challenge(url: &str, id: &str) -> String {
    let a = http("GET", &format!("{url}/api/v1/devices/{id}/challenge"), None, None);
    assert_eq!(a.status, 200, "challenge of {id}: {}", a.body);
    a.body["challenge"].as_str().unwrap().to_owned()
}

/// An idle check-in of `id` answering `challenge`.
pub fn checkin_doc(id: &str, challenge: &str, phase: &str) -> tern_core::director::CheckIn {
    tern_core::director::CheckIn {
        kind: tern_core::director::CHECKIN_TYPE.into(),
        device_id: id.into(),
        nonce: tern_server::random_hex(16),
        challenge: challenge.into(),
        time: tern_agent::remote::now().to_string(),
        phase: phase.into(),
        slots: vec![],
        deployment: None,
        refused_order: None,
    }
}

/// An enrollment document for `id` naming `public_key`, signed by `signer`, for the fleet
/// token `token` (`ternenroll_ID_SECRET`) and a fresh challenge from the server at `url`.
pub fn enrollment_body(
    url: &str,
    id: &str,
    public_key: &tern_core::PublicKey,
    signer: &tern_core::SigningKey,
    encryption_key: Option<Value>,
    token: &str,
) -> Vec<u8> {
    let c = http("GET", &format!("{url}/api/v1/devices/enroll/challenge"), None, None);
    assert_eq!(c.status, 200, "{}", c.body);
    let doc = tern_core::enrollment::Enrollment {
        kind: tern_core::enrollment::ENROLLMENT_TYPE.into(),
        device_id: id.into(),
        public_key: public_key.to_value().clone(),
        encryption_key,
        device_type: "tern-sim".into(),
        hardware: "rev-a".into(),
        tags: vec![],
        token_id: token.split('_').nth(1).map(str::to_owned),
        challenge: c.body["challenge"].as_str().unwrap().to_owned(),
    };
    tern_core::director::sign_document("enrollment", &doc, signer).unwrap()
}

/// The release engineer, the server and its operator.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub server: Server,
    pub admin: String,
    pub enrollment: String,
    pub db_url: Option<String>,
    env: Vec<(String, String)>,
}

impl Fleet {
    /// A server (SQLite when `db_url` is None) with the repository root set.
    pub fn new(db_url: Option<&str>) -> Fleet {
        Self::with_env(db_url, &[])
    }

    pub fn with_env(db_url: Option<&str>, env: &[(&str, &str)]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let p = |x: &str| s(&root.join(x));
        let data = dir.path().join("srv");
        let mut init = vec!["server", "init"];
        let data_s = s(&data);
        init.extend(["--data", &data_s]);
        let db_args: Vec<String> = db_url
            .map(|u| vec!["--database-url".into(), u.to_owned()])
            .unwrap_or_default();
        run_ok(&init, &[]);
        std::fs::create_dir_all(root.join("keys")).unwrap();
        for k in ["root", "targets"] {
            run_ok(&["key", "generate", "--out", &p(&format!("keys/{k}"))], &[]);
        }
        run_ok(
            &[
                "repo",
                "init",
                "--repo",
                &p("repo"),
                "--root-key",
                &p("keys/root.pem"),
                "--targets-key",
                &p("keys/targets.pem"),
                "--snapshot-key",
                &p("srv/keys/snapshot.pub.json"),
                "--timestamp-key",
                &p("srv/keys/timestamp.pub.json"),
                "--key",
                &p("keys/root.pem"),
                "--key",
                &p("keys/targets.pem"),
            ],
            &[],
        );
        let mut env_all: Vec<(&str, &str)> = vec![("TERN_SERVER_POLL_INTERVAL_SECS", "1")];
        env_all.extend_from_slice(env);
        let server = Server::start(&data, db_url, &env_all);
        let mut token_args = vec!["server", "token", "create", "--data", &data_s, "--role", "admin"];
        let db_refs: Vec<&str> = db_args.iter().map(String::as_str).collect();
        token_args.extend(&db_refs);
        let admin = run_ok(&token_args, &[]).trim().to_owned();
        let mut enroll_args = vec!["server", "token", "create", "--data", &data_s, "--role", "enrollment"];
        enroll_args.extend(&db_refs);
        let enrollment = run_ok(&enroll_args, &[]).trim().to_owned();
        let f = Fleet {
            dir,
            server,
            admin,
            enrollment,
            db_url: db_url.map(str::to_owned),
            env: env_all.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        f.ok(&["release", "set-root", &p("repo/metadata/1.root.json")]);
        f
    }

    pub fn path(&self, x: &str) -> PathBuf {
        self.dir.path().join(x)
    }

    /// A token of another role.
    pub fn token(&self, role: &str) -> String {
        let data = s(&self.path("srv"));
        let mut args = vec!["server", "token", "create", "--data", &data, "--role", role];
        let db: Vec<String> = self
            .db_url
            .iter()
            .flat_map(|u| ["--database-url".to_owned(), u.clone()])
            .collect();
        args.extend(db.iter().map(String::as_str));
        run_ok(&args, &[]).trim().to_owned()
    }

    /// `tern …` as the admin, against the server.
    pub fn tern(&self, args: &[&str]) -> Output {
        Command::new(tern_bin())
            .args(args)
            .env("TERN_SERVER", &self.server.url)
            .env("TERN_TOKEN", &self.admin)
            .output()
            .unwrap()
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.tern(args);
        assert!(
            out.status.success(),
            "tern {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The release engineer adds an image of `mib` MiB for `version` and bundles it (not uploaded).
    pub fn bundle(&self, version: &str, kib: usize) -> PathBuf {
        self.bundle_with(version, kib, &[])
    }

    /// The same, with more `repo add-target` arguments (run as the admin, against the server).
    pub fn bundle_with(&self, version: &str, kib: usize, extra: &[&str]) -> PathBuf {
        let img = self.path(&format!("img-{version}"));
        // Content that differs for every version (seeded by a hash of the whole string).
        let seed = tern_core::digest::sha256_hex(version.as_bytes());
        let seed = u32::from_str_radix(&seed[..8], 16).unwrap();
        let mut data = vec![0u8; kib * 1024];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i as u32 ^ seed).wrapping_mul(2654435761) >> 13) as u8;
        }
        std::fs::write(&img, &data).unwrap();
        let name = format!("sim/rootfs-{version}.img");
        let (repo, img, key) = (s(&self.path("repo")), s(&img), s(&self.path("keys/targets.pem")));
        let mut args = vec![
            "repo",
            "add-target",
            "--repo",
            &repo,
            &img,
            "--name",
            &name,
            "--release-version",
            version,
            "--device-type",
            "tern-sim",
            "--slot-class",
            "rootfs",
            "--key",
            &key,
        ];
        args.extend_from_slice(extra);
        self.ok(&args);
        let out = self.path(&format!("r-{version}.tern"));
        run_ok(
            &[
                "bundle",
                "create",
                "--repo",
                &s(&self.path("repo")),
                "--target",
                &name,
                "--out",
                &s(&out),
            ],
            &[],
        );
        out
    }

    /// Bundle and upload.
    pub fn publish(&self, version: &str, kib: usize) -> PathBuf {
        let b = self.bundle(version, kib);
        self.ok(&["release", "upload", &s(&b)]);
        b
    }

    /// A simulated device pointed at `url`, enrolled and approved.
    pub fn device(&self, id: &str, tags: &[&str], url: &str) -> Device {
        let dir = self.path(&format!("dev-{id}"));
        let mut args = vec![
            "device".to_owned(),
            "simulate".into(),
            "--dir".into(),
            s(&dir),
            "--root".into(),
            s(&self.path("repo/metadata/1.root.json")),
            "--server".into(),
            url.into(),
            "--device-id".into(),
            id.into(),
            "--director-root".into(),
            s(&self.path("srv/keys/director-root.json")),
            "--poll-interval-secs".into(),
            "1".into(),
            "--slot-mib".into(),
            "8".into(),
        ];
        for t in tags {
            args.push("--tag".into());
            args.push((*t).into());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ok(&refs, &[]);
        let d = Device {
            cfg: s(&dir.join("agent.toml")),
            dir,
        };
        run_ok(
            &["device", "enroll", "--config", &d.cfg, "--token", &self.enrollment],
            &[],
        );
        self.ok(&["device", "approve", id]);
        d
    }

    pub fn deploy(&self, release: &str, selector: &[&str]) -> String {
        let mut args = vec!["deployment", "create", "--release", release, "--output", "json"];
        args.extend(selector);
        let v: Value = serde_json::from_str(&self.ok(&args)).unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        // Creation reads no device: wait for the server to count the selection.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.deployment(&id)["counted"] != true {
            assert!(std::time::Instant::now() < deadline, "deployment {id} never counted");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        id
    }

    pub fn deployment(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["deployment", "status", id, "--output", "json"])).unwrap()
    }

    pub fn device_status(&self, id: &str, on: &str) -> String {
        self.deployment(id)["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == on)
            .map(|d| d["status"].as_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    pub fn api(&self, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Answer {
        http(method, &format!("{}{path}", self.server.url), token, body)
    }

    /// Download `target` from the published repository with `tern tuf`, from root version 1,
    /// keeping the client's metadata in `work/md` and the file in `work/targets`.
    pub fn tuf_download(&self, work: &str, target: &str) -> PathBuf {
        let md = s(&self.path(&format!("{work}/md")));
        if !self.path(&format!("{work}/md/root.json")).exists() {
            run_ok(
                &[
                    "tuf",
                    "--metadata-dir",
                    &md,
                    "init",
                    &s(&self.path("repo/metadata/1.root.json")),
                ],
                &[],
            );
        }
        let dir = self.path(&format!("{work}/targets"));
        run_ok(
            &[
                "tuf",
                "--metadata-dir",
                &md,
                "--metadata-url",
                &format!("{}/repo/metadata/", self.server.url),
                "--target-base-url",
                &format!("{}/repo/targets/", self.server.url),
                "--target-dir",
                &s(&dir),
                "--target-name",
                target,
                "download",
            ],
            &[],
        );
        dir.join(target.replace('/', "%2F"))
    }

    /// Enroll `id` with a document signed by `signer` naming `signer`'s own key.
    pub fn enroll_signed(&self, id: &str, signer: &tern_core::SigningKey, encryption_key: Option<Value>) -> Answer {
        let body = enrollment_body(
            &self.server.url,
            id,
            signer.public(),
            signer,
            encryption_key,
            &self.enrollment,
        );
        self.api("POST", "/api/v1/devices/enroll", Some(&self.enrollment), Some(body))
    }

    pub fn audit(&self) -> Vec<Value> {
        let a = self.api("GET", "/api/v1/audit?limit=10000", Some(&self.admin), None);
        assert_eq!(a.status, 200);
        a.body.as_array().unwrap().clone()
    }
}

#[track_caller]
pub fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(tern_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A simulated device.
pub struct Device {
    pub dir: PathBuf,
    pub cfg: String,
}

impl Device {
    /// One `agent run --once`: the poll's outcome (JSON), or the error line.
    pub fn poll(&self) -> Value {
        let out = Command::new(tern_bin())
            .args(["agent", "run", "--once", "--output", "json", "--config", &self.cfg])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().last() {
            Some(l) if out.status.success() => serde_json::from_str(l).unwrap(),
            _ => serde_json::json!({"outcome": "error", "stderr": String::from_utf8_lossy(&out.stderr)}),
        }
    }

    pub fn reboot(&self) -> Value {
        serde_json::from_str(&run_ok(
            &["sim", "reboot", "--config", &self.cfg, "--output", "json"],
            &[],
        ))
        .unwrap()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&run_ok(
            &["agent", "status", "--config", &self.cfg, "--output", "json"],
            &[],
        ))
        .unwrap()
    }

    /// Poll, rebooting when an install asks for it, until the server shows a final status.
    pub fn drive(&self, fleet: &Fleet, deployment: &str, id: &str) -> String {
        for _ in 0..12 {
            let o = self.poll();
            if o["outcome"] == "installed" && o["reboot_needed"] == true {
                self.reboot();
                continue;
            }
            let st = fleet.device_status(deployment, id);
            if ["succeeded", "failed", "rolled-back", "cancelled"].contains(&st.as_str()) {
                return st;
            }
            if st == "trial" || st == "rebooting" {
                // Installed and waiting for its reboot; or the health check failed and the
                // slot stays uncommitted: the watchdog reboots until the attempts run out.
                self.reboot();
            }
        }
        fleet.device_status(deployment, id)
    }

    /// A health check that fails for `version`.
    pub fn fail_health_check_for(&self, version: &str) {
        let hook = self.dir.join("health-check");
        std::fs::write(&hook, format!("#!/bin/sh\n[ \"$TERN_VERSION\" != {version} ]\n")).unwrap();
        let mut perm = std::fs::metadata(&hook).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        std::fs::set_permissions(&hook, perm).unwrap();
        let cfg = std::fs::read_to_string(&self.cfg).unwrap();
        std::fs::write(
            &self.cfg,
            cfg.replacen("[hooks]\n", "[hooks]\nhealth_check = \"health-check\"\n", 1),
        )
        .unwrap();
    }

    /// Point the device at another server URL.
    pub fn set_url(&self, url: &str) {
        let cfg = std::fs::read_to_string(&self.cfg).unwrap();
        let out: Vec<String> = cfg
            .lines()
            .map(|l| {
                if l.starts_with("url = ") {
                    format!("url = \"{url}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&self.cfg, out.join("\n") + "\n").unwrap();
    }

    /// SHA-256 of a slot file.
    pub fn slot_hash(&self, slot: &str) -> String {
        tern_core::digest::sha256_hex(&std::fs::read(self.dir.join(slot)).unwrap())
    }

    pub fn key(&self) -> tern_core::SigningKey {
        tern_fs::load_signing_key(&self.dir.join("state/device.pem")).unwrap()
    }
}

/// What the proxy does to a check-in's answer.
pub enum Mode {
    /// Forward unchanged (orders are captured).
    Pass,
    /// Capture the order and remove it from the answer.
    Strip,
    /// Answer with this order instead.
    Replace(Value),
    /// Rewrite the order (given the device id and the check-in's nonce).
    Rewrite(Box<dyn Fn(&Value) -> Value + Send>),
}

/// A man-in-the-middle between devices and the server.
pub struct Proxy {
    pub url: String,
    pub mode: Arc<Mutex<Mode>>,
    /// The last order seen per device.
    pub captured: Arc<Mutex<BTreeMap<String, Value>>>,
    /// Cut the next target download after this many bytes (a dropped connection).
    pub cut_target: Arc<Mutex<Option<usize>>>,
    /// Range headers of target requests.
    pub ranges: Arc<Mutex<Vec<String>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}", server.server_addr().to_ip().unwrap());
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let captured = Arc::new(Mutex::new(BTreeMap::new()));
        let cut_target = Arc::new(Mutex::new(None));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (m, c, up) = (mode.clone(), captured.clone(), upstream.to_owned());
        let (cut, rs) = (cut_target.clone(), ranges.clone());
        let thread = std::thread::spawn(move || {
            for mut req in server.incoming_requests() {
                let mut body = Vec::new();
                let _ = req.as_reader().read_to_end(&mut body);
                let path = req.url().to_owned();
                let method = req.method().as_str().to_owned();
                let mut headers = Vec::new();
                for h in req.headers() {
                    if h.field.equiv("Range") || h.field.equiv("Authorization") {
                        headers.push((h.field.as_str().as_str().to_owned(), h.value.as_str().to_owned()));
                    }
                }
                if path.contains("/repo/targets/") {
                    for (k, v) in &headers {
                        if k.eq_ignore_ascii_case("range") {
                            rs.lock().unwrap().push(v.clone());
                        }
                    }
                }
                let ans = forward(&method, &format!("{up}{path}"), body, headers);
                let mut bytes = ans.bytes;
                let mut extra: Vec<tiny_http::Header> = Vec::new();
                if let Some(cr) = &ans.content_range {
                    extra.push(tiny_http::Header::from_bytes("Content-Range", cr.as_bytes()).unwrap());
                }
                if path.contains("/repo/targets/") {
                    if let Some(n) = cut.lock().unwrap().take() {
                        // Announce the whole body, send part of it, and close: a dropped connection.
                        let full = bytes.len();
                        bytes.truncate(n);
                        let resp = tiny_http::Response::new(
                            tiny_http::StatusCode(ans.status),
                            extra,
                            std::io::Cursor::new(bytes),
                            Some(full),
                            None,
                        );
                        let _ = req.respond(resp);
                        continue;
                    }
                }
                if path.ends_with("/checkin") && ans.status == 200 {
                    let device = path.split('/').nth(4).unwrap_or("").to_owned();
                    let mut v: Value = serde_json::from_slice(&bytes).unwrap();
                    if let Some(order) = v.get("order").cloned() {
                        c.lock().unwrap().insert(device, order);
                    }
                    match &*m.lock().unwrap() {
                        Mode::Pass => {}
                        Mode::Strip => {
                            v.as_object_mut().unwrap().remove("order");
                        }
                        Mode::Replace(o) => v["order"] = o.clone(),
                        Mode::Rewrite(f) => {
                            if let Some(o) = v.get("order").cloned() {
                                v["order"] = f(&o);
                            }
                        }
                    }
                    bytes = serde_json::to_vec(&v).unwrap();
                }
                let mut resp = tiny_http::Response::from_data(bytes).with_status_code(ans.status);
                for h in extra {
                    resp.add_header(h);
                }
                let _ = req.respond(resp);
            }
        });
        Proxy {
            url,
            mode,
            captured,
            cut_target,
            ranges,
            _thread: thread,
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn forward(method: &str, url: &str, body: Vec<u8>, headers: Vec<(String, String)>) -> Answer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut req = client.request(method.parse().unwrap(), url).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let content_range = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                Answer {
                    status,
                    body: Value::Null,
                    bytes,
                    content_range,
                    content_type: None,
                }
            }
            Err(_) => Answer {
                status: 502,
                body: Value::Null,
                bytes: Vec::new(),
                content_range: None,
                content_type: None,
            },
        }
    })
}

/// Re-sign an order's `signed` part with `key` (what a holder of that key could do).
pub fn resign(order: &Value, key: &tern_core::SigningKey, edit: impl FnOnce(&mut Value)) -> Value {
    let mut signed = order["signed"].clone();
    edit(&mut signed);
    let mut env = tern_core::Envelope::new(&signed).unwrap();
    env.sign("order", key).unwrap();
    serde_json::json!({"signed": env.signed, "signatures": env.signatures})
}
