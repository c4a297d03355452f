//! The scenario harness: a repository simulator, an HTTP server on 127.0.0.1 that records
//! every request and can misbehave on purpose, and two clients with the same command line
//! (Tern's `tern tuf` and python-tuf's `ngclient` behind `interop/tuf_client.py`).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use tern_core::digest::{hashes_of, HashAlgorithm};
use tern_core::metadata::{
    Common, DelegatedRole, Delegations, Envelope, MetaFile, RoleKeys, Root, Snapshot, SuccinctRoles, TargetFile,
    Targets, Timestamp,
};
use tern_core::{DateTime, KeyAlgorithm, KeyId, SigningKey, TargetPath};

pub const DAY: i64 = 86_400;

pub fn now() -> DateTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    DateTime::from_unix(secs)
}

/// python's `urllib.parse.quote(name, "")`.
pub fn quote(name: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'_')
        .remove(b'.')
        .remove(b'-')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(name, SET).to_string()
}

fn key() -> SigningKey {
    SigningKey::generate(KeyAlgorithm::Ed25519).unwrap().0
}

// ---------------------------------------------------------------------------------------
// Repository simulator

/// A repository built in memory and published to a directory, like python-tuf's
/// RepositorySimulator: every role, key and version is under the test's control.
pub struct Sim {
    pub dir: tempfile::TempDir,
    pub keys: BTreeMap<String, Vec<SigningKey>>,
    /// Root keys of the previous root version (they sign the next one too).
    pub prev_root_keys: Vec<SigningKey>,
    pub root: Root,
    pub targets: BTreeMap<String, Targets>,
    pub snapshot: Snapshot,
    pub timestamp: Timestamp,
    pub hash_algs: Vec<HashAlgorithm>,
    /// List length and hashes of roles in snapshot (and of snapshot in timestamp).
    pub meta_hashes: bool,
}

fn keyids(keys: &[SigningKey]) -> Vec<KeyId> {
    let mut v: Vec<KeyId> = keys.iter().map(|k| k.public().keyid()).collect();
    v.sort();
    v
}

fn far() -> DateTime {
    now().plus_secs(365 * DAY)
}

impl Sim {
    /// One ed25519 key per top-level role, threshold 1, consistent snapshots, all at version 1.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("metadata")).unwrap();
        std::fs::create_dir_all(dir.path().join("targets")).unwrap();
        let mut keys = BTreeMap::new();
        for r in tern_core::TOP_LEVEL_ROLES {
            keys.insert(r.to_owned(), vec![key()]);
        }
        let mut root = Root {
            common: Common::new("root", 1, far()),
            consistent_snapshot: true,
            keys: BTreeMap::new(),
            roles: BTreeMap::new(),
            unrecognized: BTreeMap::new(),
        };
        for (r, ks) in &keys {
            for k in ks {
                root.keys.insert(k.public().keyid(), k.public().clone());
            }
            root.roles.insert(
                r.clone(),
                RoleKeys {
                    keyids: keyids(ks),
                    threshold: 1,
                    unrecognized: BTreeMap::new(),
                },
            );
        }
        let targets = Targets {
            common: Common::new("targets", 1, far()),
            targets: BTreeMap::new(),
            delegations: None,
            unrecognized: BTreeMap::new(),
        };
        let mut sim = Sim {
            dir,
            keys,
            prev_root_keys: Vec::new(),
            root,
            targets: BTreeMap::from([("targets".to_owned(), targets)]),
            snapshot: Snapshot {
                common: Common::new("snapshot", 0, far()),
                meta: BTreeMap::new(),
                unrecognized: BTreeMap::new(),
            },
            timestamp: Timestamp {
                common: Common::new("timestamp", 0, far()),
                meta: BTreeMap::new(),
                unrecognized: BTreeMap::new(),
            },
            hash_algs: vec![HashAlgorithm::Sha256],
            meta_hashes: false,
        };
        sim.publish_root();
        sim.publish_targets("targets");
        sim.commit_snapshot();
        sim
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn root_file(&self, version: u64) -> PathBuf {
        self.path().join(format!("metadata/{version}.root.json"))
    }

    fn signed_bytes<T: serde::Serialize>(value: &T, role: &str, keys: &[&SigningKey]) -> Vec<u8> {
        let mut env = Envelope::new(value).unwrap();
        for k in keys {
            env.sign(role, k).unwrap();
        }
        env.to_bytes()
    }

    pub fn write_meta(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path().join("metadata").join(name), bytes).unwrap();
    }

    /// Publish the current root (signed by its keys and the previous root's keys).
    pub fn publish_root(&mut self) {
        let mut signers: Vec<&SigningKey> = self.keys["root"].iter().collect();
        signers.extend(self.prev_root_keys.iter());
        let bytes = Self::signed_bytes(&self.root, "root", &signers);
        self.write_meta(&format!("{}.root.json", self.root.common.version), &bytes);
    }

    fn role_keys(&self, role: &str) -> Vec<&SigningKey> {
        self.keys[role].iter().collect()
    }

    fn file_name(&self, role: &str, version: u64) -> String {
        match (role, self.root.consistent_snapshot) {
            ("timestamp", _) | (_, false) => format!("{}.json", quote(role)),
            _ => format!("{version}.{}.json", quote(role)),
        }
    }

    /// Publish a targets role at its current version, signed by its keys.
    pub fn publish_targets(&self, role: &str) {
        let t = &self.targets[role];
        let bytes = Self::signed_bytes(t, role, &self.role_keys(role));
        self.write_meta(&self.file_name(role, t.common.version), &bytes);
    }

    /// Bump a targets role's version and publish it.
    pub fn bump(&mut self, role: &str) {
        self.targets.get_mut(role).unwrap().common.version += 1;
        self.publish_targets(role);
    }

    /// A new snapshot listing every targets role, then a new timestamp.
    pub fn commit_snapshot(&mut self) {
        let mut meta = BTreeMap::new();
        for (role, t) in &self.targets {
            let bytes = std::fs::read(
                self.path()
                    .join("metadata")
                    .join(self.file_name(role, t.common.version)),
            )
            .unwrap();
            meta.insert(
                format!("{role}.json"),
                MetaFile {
                    version: t.common.version,
                    length: self.meta_hashes.then_some(bytes.len() as u64),
                    hashes: self.meta_hashes.then(|| hashes_of(&bytes, &[HashAlgorithm::Sha256])),
                    unrecognized: BTreeMap::new(),
                },
            );
        }
        self.snapshot.meta = meta;
        self.snapshot.common.version += 1;
        self.publish_snapshot();
        self.commit_timestamp();
    }

    pub fn publish_snapshot(&self) {
        let bytes = Self::signed_bytes(&self.snapshot, "snapshot", &self.role_keys("snapshot"));
        self.write_meta(&self.file_name("snapshot", self.snapshot.common.version), &bytes);
    }

    /// A new timestamp for the current snapshot.
    pub fn commit_timestamp(&mut self) {
        let snap = std::fs::read(
            self.path()
                .join("metadata")
                .join(self.file_name("snapshot", self.snapshot.common.version)),
        )
        .unwrap();
        self.timestamp.meta = BTreeMap::from([(
            "snapshot.json".to_owned(),
            MetaFile {
                version: self.snapshot.common.version,
                length: self.meta_hashes.then_some(snap.len() as u64),
                hashes: self.meta_hashes.then(|| hashes_of(&snap, &[HashAlgorithm::Sha256])),
                unrecognized: BTreeMap::new(),
            },
        )]);
        self.timestamp.common.version += 1;
        self.publish_timestamp();
    }

    pub fn publish_timestamp(&self) {
        let bytes = Self::signed_bytes(&self.timestamp, "timestamp", &self.role_keys("timestamp"));
        self.write_meta("timestamp.json", &bytes);
    }

    /// Add a target to `role` (not published: call `bump(role)` and `commit_snapshot()`).
    pub fn add_target(&mut self, role: &str, path: &str, data: &[u8]) {
        let hashes = hashes_of(data, &self.hash_algs);
        let t = TargetPath::new(path).unwrap();
        for h in hashes.values() {
            self.write_target(&t.with_hash_prefix(h), data);
        }
        self.write_target(path, data);
        self.targets.get_mut(role).unwrap().targets.insert(
            path.to_owned(),
            TargetFile {
                length: data.len() as u64,
                hashes,
                custom: None,
                unrecognized: BTreeMap::new(),
            },
        );
    }

    /// The URL path a client requests for `path` under consistent snapshots (first hash).
    pub fn target_request(&self, role: &str, path: &str) -> String {
        let f = &self.targets[role].targets[path];
        let (_, h) = f.hashes.iter().next().unwrap();
        let t = TargetPath::new(path).unwrap();
        if self.root.consistent_snapshot {
            format!("/targets/{}", t.with_hash_prefix(h))
        } else {
            format!("/targets/{path}")
        }
    }

    pub fn write_target(&self, rel: &str, data: &[u8]) {
        let p = self.path().join("targets").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    /// Delegate from `from` to a new role with `nkeys` keys and `threshold`.
    #[allow(clippy::too_many_arguments)]
    pub fn delegate(
        &mut self,
        from: &str,
        name: &str,
        paths: Option<Vec<&str>>,
        prefixes: Option<Vec<&str>>,
        terminating: bool,
        nkeys: usize,
        threshold: u32,
    ) {
        let ks: Vec<SigningKey> = (0..nkeys).map(|_| key()).collect();
        let d = self
            .targets
            .get_mut(from)
            .unwrap()
            .delegations
            .get_or_insert_with(|| Delegations {
                keys: BTreeMap::new(),
                roles: Some(Vec::new()),
                succinct_roles: None,
                unrecognized: BTreeMap::new(),
            });
        for k in &ks {
            d.keys.insert(k.public().keyid(), k.public().clone());
        }
        d.roles.get_or_insert_with(Vec::new).push(DelegatedRole {
            name: name.to_owned(),
            keyids: keyids(&ks),
            threshold,
            terminating,
            paths: paths.map(|p| p.into_iter().map(str::to_owned).collect()),
            path_hash_prefixes: prefixes.map(|p| p.into_iter().map(str::to_owned).collect()),
            unrecognized: BTreeMap::new(),
        });
        self.keys.insert(name.to_owned(), ks);
        self.targets.insert(
            name.to_owned(),
            Targets {
                common: Common::new("targets", 1, far()),
                targets: BTreeMap::new(),
                delegations: None,
                unrecognized: BTreeMap::new(),
            },
        );
        self.publish_targets(name);
    }

    /// Succinct hash-bin delegation from `from` (one key for all bins).
    pub fn delegate_bins(&mut self, from: &str, bits: u32, prefix: &str) {
        let k = key();
        let succinct = SuccinctRoles {
            keyids: vec![k.public().keyid()],
            threshold: 1,
            bit_length: bits,
            name_prefix: prefix.to_owned(),
            unrecognized: BTreeMap::new(),
        };
        let names: Vec<String> = (0..succinct.bins()).map(|b| succinct.bin_name(b as u32)).collect();
        self.targets.get_mut(from).unwrap().delegations = Some(Delegations {
            keys: BTreeMap::from([(k.public().keyid(), k.public().clone())]),
            roles: None,
            succinct_roles: Some(succinct),
            unrecognized: BTreeMap::new(),
        });
        for n in &names {
            self.targets.insert(
                n.clone(),
                Targets {
                    common: Common::new("targets", 1, far()),
                    targets: BTreeMap::new(),
                    delegations: None,
                    unrecognized: BTreeMap::new(),
                },
            );
        }
        self.keys.insert("__bins".into(), vec![k]);
        for n in names {
            let bytes = Self::signed_bytes(&self.targets[&n], &n, &[&self.keys["__bins"][0]]);
            self.write_meta(&self.file_name(&n, 1), &bytes);
        }
    }

    /// Publish a bin role (signed with the shared bin key).
    pub fn publish_bin(&mut self, name: &str) {
        self.targets.get_mut(name).unwrap().common.version += 1;
        let t = &self.targets[name];
        let bytes = Self::signed_bytes(t, name, &[&self.keys["__bins"][0]]);
        self.write_meta(&self.file_name(name, t.common.version), &bytes);
    }

    /// Replace a top-level role's keys with `nkeys` new ones and `threshold`, in a new root.
    pub fn rotate(&mut self, role: &str, nkeys: usize, threshold: u32) {
        let ks: Vec<SigningKey> = (0..nkeys).map(|_| key()).collect();
        for k in &ks {
            self.root.keys.insert(k.public().keyid(), k.public().clone());
        }
        self.root.roles.insert(
            role.to_owned(),
            RoleKeys {
                keyids: keyids(&ks),
                threshold,
                unrecognized: BTreeMap::new(),
            },
        );
        let old = self.keys.insert(role.to_owned(), ks).unwrap();
        // The new root is signed by its own root keys and by the previous root's.
        self.prev_root_keys = if role == "root" { old } else { Vec::new() };
        self.root.common.version += 1;
        self.publish_root();
        self.prev_root_keys.clear();
    }

    /// A new root version with no key change.
    pub fn new_root_version(&mut self) {
        self.root.common.version += 1;
        self.publish_root();
    }

    pub fn set_expired(&mut self, role: &str) {
        let past = now().plus_secs(-DAY).to_string();
        match role {
            "root" => self.root.common.expires = past,
            "snapshot" => self.snapshot.common.expires = past,
            "timestamp" => self.timestamp.common.expires = past,
            r => self.targets.get_mut(r).unwrap().common.expires = past,
        }
    }

    /// Sign any value as `role` with the given keys and write it under `name`.
    pub fn write_signed<T: serde::Serialize>(&self, name: &str, value: &T, role: &str, keys: &[&SigningKey]) {
        self.write_meta(name, &Self::signed_bytes(value, role, keys));
    }
}

// ---------------------------------------------------------------------------------------
// HTTP server

/// How the server misbehaves for one path.
#[derive(Clone)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Send these bytes instead of the file.
    Body(Vec<u8>),
    /// Send bytes forever.
    Endless,
    /// Send one byte every `Duration`.
    Trickle(Duration),
    /// Send the first `n` bytes, then close the connection.
    Cut(usize),
}

/// A static file server on 127.0.0.1 that records request paths and injects faults.
pub struct Server {
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
    faults: Arc<Mutex<HashMap<String, Fault>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

struct Trickle {
    data: Vec<u8>,
    pos: usize,
    delay: Duration,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.data.len() || buf.is_empty() {
            return Ok(0);
        }
        thread::sleep(self.delay);
        buf[0] = self.data[self.pos];
        self.pos += 1;
        Ok(1)
    }
}

struct Endless;

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        buf.fill(b' ');
        Ok(buf.len())
    }
}

impl Server {
    pub fn start(root: &Path) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let faults: Arc<Mutex<HashMap<String, Fault>>> = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_owned();
        let (l, f, s) = (log.clone(), faults.clone(), stop.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let (root, l, f) = (root.clone(), l.clone(), f.clone());
                thread::spawn(move || serve(req, &root, &l, &f));
            }
        });
        Server {
            base: format!("http://127.0.0.1:{port}"),
            log,
            faults,
            stop,
            handle: Some(handle),
        }
    }

    pub fn metadata_url(&self) -> String {
        format!("{}/metadata/", self.base)
    }

    pub fn targets_url(&self) -> String {
        format!("{}/targets/", self.base)
    }

    /// The requests since the last call, in order.
    pub fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    pub fn fault(&self, path: &str, fault: Fault) {
        self.faults.lock().unwrap().insert(path.to_owned(), fault);
    }

    pub fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(req: tiny_http::Request, root: &Path, log: &Mutex<Vec<String>>, faults: &Mutex<HashMap<String, Fault>>) {
    let path = req.url().split('?').next().unwrap_or("").to_owned();
    let range_start = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .and_then(|h| h.value.as_str().strip_prefix("bytes=").map(str::to_owned))
        .and_then(|v| v.trim_end_matches('-').parse::<usize>().ok());
    // Logged as `PATH` or `PATH range=N-` so that tests see resumed downloads.
    log.lock().unwrap().push(match range_start {
        Some(n) => format!("{path} range={n}-"),
        None => path.clone(),
    });
    let fault = faults.lock().unwrap().get(&path).cloned();
    let resp = match fault {
        Some(Fault::Status(code)) => tiny_http::Response::new(
            tiny_http::StatusCode(code),
            vec![],
            Box::new(Cursor::new(Vec::new())) as Box<dyn Read + Send>,
            Some(0),
            None,
        ),
        Some(Fault::Endless) => tiny_http::Response::new(
            tiny_http::StatusCode(200),
            vec![],
            Box::new(Endless) as Box<dyn Read + Send>,
            None,
            None,
        ),
        Some(Fault::Body(b)) => {
            let n = b.len();
            tiny_http::Response::new(
                tiny_http::StatusCode(200),
                vec![],
                Box::new(Cursor::new(b)) as Box<dyn Read + Send>,
                Some(n),
                None,
            )
        }
        Some(f @ (Fault::Trickle(_) | Fault::Cut(_))) => {
            let data = read_file(root, &path).unwrap_or_default();
            match f {
                Fault::Trickle(delay) => {
                    let n = data.len();
                    tiny_http::Response::new(
                        tiny_http::StatusCode(200),
                        vec![],
                        Box::new(Trickle { data, pos: 0, delay }) as Box<dyn Read + Send>,
                        Some(n),
                        None,
                    )
                }
                Fault::Cut(n) => {
                    // Claim the full length, send part of it: the client sees the connection end early.
                    let full = data.len();
                    let part = data[..n.min(full)].to_vec();
                    tiny_http::Response::new(
                        tiny_http::StatusCode(200),
                        vec![],
                        Box::new(Cursor::new(part)) as Box<dyn Read + Send>,
                        Some(full),
                        None,
                    )
                }
                _ => unreachable!(),
            }
        }
        None => match read_file(root, &path) {
            None => tiny_http::Response::new(
                tiny_http::StatusCode(404),
                vec![],
                Box::new(Cursor::new(Vec::new())) as Box<dyn Read + Send>,
                Some(0),
                None,
            ),
            Some(data) => match range_start {
                // RFC 9110: a range starting at or past the end is not satisfiable.
                Some(start) if start >= data.len() => tiny_http::Response::new(
                    tiny_http::StatusCode(416),
                    vec![],
                    Box::new(Cursor::new(Vec::new())) as Box<dyn Read + Send>,
                    Some(0),
                    None,
                ),
                Some(start) => {
                    let total = data.len();
                    let header = tiny_http::Header::from_bytes(
                        "Content-Range",
                        format!("bytes {start}-{}/{total}", total.saturating_sub(1)),
                    )
                    .unwrap();
                    let part = data[start..].to_vec();
                    let n = part.len();
                    tiny_http::Response::new(
                        tiny_http::StatusCode(206),
                        vec![header],
                        Box::new(Cursor::new(part)) as Box<dyn Read + Send>,
                        Some(n),
                        None,
                    )
                }
                _ => {
                    let n = data.len();
                    tiny_http::Response::new(
                        tiny_http::StatusCode(200),
                        vec![],
                        Box::new(Cursor::new(data)) as Box<dyn Read + Send>,
                        Some(n),
                        None,
                    )
                }
            },
        },
    };
    let _ = req.respond(resp);
}

/// The file for a raw (still percent-encoded) URL path. Files are stored under their
/// encoded names, so nothing is decoded and nothing can climb out of `root`.
fn read_file(root: &Path, url_path: &str) -> Option<Vec<u8>> {
    let rel = url_path.trim_start_matches('/');
    if rel.split('/').any(|c| c == ".." || c == ".") {
        return None;
    }
    std::fs::read(root.join(rel)).ok()
}

// ---------------------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tern,
    Python,
}

pub const CLIENTS: [Kind; 2] = [Kind::Tern, Kind::Python];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv_python() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let venv = workspace().join("target/interop-venv");
            let out = Command::new("bash")
                .arg(workspace().join("interop/setup-venv.sh"))
                .arg(&venv)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "interop/setup-venv.sh failed (python-tuf is required, never skipped):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            venv.join("bin/python")
        })
        .clone()
}

/// One client with its own metadata and target directories.
pub struct Client {
    pub kind: Kind,
    pub work: tempfile::TempDir,
    pub extra: Vec<String>,
}

#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub stderr: String,
}

impl Client {
    pub fn new(kind: Kind) -> Self {
        Client {
            kind,
            work: tempfile::tempdir().unwrap(),
            extra: Vec::new(),
        }
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.work.path().join("metadata")
    }

    pub fn target_dir(&self) -> PathBuf {
        self.work.path().join("targets")
    }

    fn command(&self) -> Command {
        match self.kind {
            Kind::Tern => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
                c.arg("tuf");
                c.args(&self.extra);
                c
            }
            Kind::Python => {
                let mut c = Command::new(venv_python());
                c.arg(workspace().join("interop/tuf_client.py"));
                c
            }
        }
    }

    fn run(&self, args: &[String]) -> Outcome {
        let mut c = self.command();
        c.arg("--metadata-dir").arg(self.metadata_dir()).args(args);
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if !out.status.success() {
            assert_eq!(
                out.status.code(),
                Some(1),
                "{:?} exit code; stderr: {stderr}",
                self.kind
            );
            assert_eq!(
                stderr.lines().count(),
                1,
                "{:?}: one error line expected: {stderr}",
                self.kind
            );
        }
        Outcome {
            ok: out.status.success(),
            stderr,
        }
    }

    pub fn init(&self, root: &Path) -> Outcome {
        self.run(&["init".into(), root.display().to_string()])
    }

    pub fn refresh(&self, server: &Server) -> Outcome {
        self.run(&["--metadata-url".into(), server.metadata_url(), "refresh".into()])
    }

    pub fn download(&self, server: &Server, targets: &[&str]) -> Outcome {
        let mut args = vec!["--metadata-url".into(), server.metadata_url()];
        for t in targets {
            args.push("--target-name".into());
            args.push((*t).to_owned());
        }
        args.extend([
            "--target-base-url".into(),
            server.targets_url(),
            "--target-dir".into(),
            self.target_dir().display().to_string(),
            "download".into(),
        ]);
        self.run(&args)
    }

    /// Trusted metadata files and the version inside each (directories, such as python-tuf's
    /// `root_history/`, are not metadata files and are left out).
    pub fn trusted(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(self.metadata_dir()) else {
            return out;
        };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp-") {
                continue;
            }
            let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap_or(Value::Null);
            out.insert(name, v["signed"]["version"].as_u64().unwrap_or(0));
        }
        out
    }

    /// Names of the downloaded target files.
    pub fn downloaded(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.target_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }
}

/// `[("root.json", 1), …]` as a map.
pub fn files(list: &[(&str, u64)]) -> BTreeMap<String, u64> {
    list.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
}

/// Request paths as a Vec<String>.
pub fn reqs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}
