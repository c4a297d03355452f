//! Interoperability with python-tuf's reference client (`tuf.ngclient.Updater`).
//!
//! Each test builds a repository with the real `tern` binary in its own temporary directory, then
//! runs `interop/ngclient_download.py` with the pinned python-tuf from `interop/setup-venv.sh`. The
//! adapter serves the repository over HTTP on 127.0.0.1, refreshes from a trusted root, downloads
//! the named targets and prints one JSON report, which the tests check exactly: the outcome, the
//! root version reached, the bytes of every target, and the requests the client made.
//!
//! The venv is a hard requirement: when it cannot be set up the tests fail (they never skip).
//!
//! `tern` argument lists are `#[rustfmt::skip]`ped to keep each flag next to its value.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::OnceLock;

use assert_cmd::assert::Assert;
use assert_cmd::Command;
use aws_lc_rs::digest;
use serde_json::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's interpreter. `setup-venv.sh` runs once per test process (the tests run on parallel
/// threads); its failure, with its output, fails every test that needs it.
fn python() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let python = PYTHON.get_or_init(|| {
        let root = workspace_root();
        let venv = root.join("target/interop-venv");
        let script = root.join("interop/setup-venv.sh");
        let out = Process::new("bash")
            .arg(&script)
            .arg(&venv)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {} failed ({}):\n--- stdout\n{}--- stderr\n{}",
                script.display(),
                venv.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(venv.join("bin/python"))
    });
    match python {
        Ok(path) => path,
        Err(e) => panic!("python-tuf venv unavailable: {e}"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Run `tern ARGS` and require success.
fn tern(args: &[&str]) -> Assert {
    Command::cargo_bin("tern").unwrap().args(args).assert().success()
}

/// A key pair written by `tern key generate`.
struct Key {
    /// The private key (PKCS#8 PEM), for `--key`.
    pem: String,
    /// The public key (TUF JSON), for the role and delegation key options.
    public: String,
}

fn keygen(dir: &Path, name: &str, key_type: &str) -> Key {
    let prefix = dir.join(name);
    tern(&["key", "generate", "--out", s(&prefix), "--type", key_type]);
    Key {
        pem: format!("{}.pem", s(&prefix)),
        public: format!("{}.pub.json", s(&prefix)),
    }
}

/// Run the ngclient adapter: trust `trusted_root`, refresh from `repo`, download `targets` in
/// order. Each run gets a fresh client directory next to `repo`. Returns (exit status was 0, report).
fn adapter(repo: &Path, trusted_root: &Path, targets: &[&str]) -> (bool, Value) {
    let parent = repo.parent().unwrap();
    let work = (1..)
        .map(|n| parent.join(format!("client-{n}")))
        .find(|p| !p.exists())
        .unwrap();
    let mut cmd = Process::new(python());
    cmd.arg(workspace_root().join("interop/ngclient_download.py"));
    cmd.args(["--repo-dir", s(repo)]);
    cmd.args(["--trusted-root", s(trusted_root)]);
    cmd.args(["--work-dir", s(&work)]);
    for t in targets {
        cmd.args(["--target", t]);
    }
    let out = cmd.output().expect("run ngclient_download.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit 0 (ok) or 1 (refused) only: 2 is a usage error, anything else a crash of the adapter.
    let exit_ok = match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("ngclient_download.py ended with {}:\n{stdout}\n{stderr}", out.status),
    };
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("adapter printed no JSON report ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(
        report["ok"],
        Value::Bool(exit_ok),
        "exit status disagrees with the report: {report:#}\n{stderr}"
    );
    (exit_ok, report)
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// The current metadata versions of the roles snapshot lists, keyed by role name, as ngclient
/// will request them (timestamp.json -> N.snapshot.json -> M.ROLE.json).
fn listed_versions(repo: &Path) -> (u64, serde_json::Map<String, Value>) {
    let timestamp = read_json(&repo.join("metadata/timestamp.json"));
    let snapshot_version = timestamp["signed"]["meta"]["snapshot.json"]["version"]
        .as_u64()
        .unwrap();
    let snapshot = read_json(&repo.join(format!("metadata/{snapshot_version}.snapshot.json")));
    let roles = snapshot["signed"]["meta"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(file, meta)| (file.trim_end_matches(".json").to_owned(), meta["version"].clone()))
        .collect();
    (snapshot_version, roles)
}

fn role_version(versions: &serde_json::Map<String, Value>, role: &str) -> u64 {
    versions
        .get(role)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("snapshot does not list {role}"))
}

/// The request path of a target under consistent snapshots: `/targets/DIR/SHA256.BASENAME`.
fn target_request(name: &str, sha256: &str) -> String {
    match name.rsplit_once('/') {
        Some((dir, base)) => format!("/targets/{dir}/{sha256}.{base}"),
        None => format!("/targets/{sha256}.{name}"),
    }
}

fn requests(report: &Value) -> Vec<&str> {
    report["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect()
}

fn downloaded_names(report: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = report["targets"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names
}

/// The file ngclient downloaded for `name`, after checking the report's length and digest of it.
fn downloaded(report: &Value, name: &str) -> Vec<u8> {
    let info = &report["targets"][name];
    let path = info["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} not downloaded: {report:#}"));
    let bytes = fs::read(path).unwrap();
    assert_eq!(info["length"].as_u64(), Some(bytes.len() as u64), "{name}");
    assert_eq!(info["sha256"].as_str(), Some(sha256_hex(&bytes).as_str()), "{name}");
    bytes
}

/// The bin of a succinct hash-bin delegation responsible for `path`: the first `bits` bits of
/// SHA-256(path), as `PREFIX-HEX` zero-padded to whole hex digits (TUF spec, TAP 15).
fn hash_bin(prefix: &str, bits: u32, path: &str) -> String {
    let h = digest::digest(&digest::SHA256, path.as_bytes());
    let first = u32::from_be_bytes(h.as_ref()[..4].try_into().unwrap());
    let width = bits.div_ceil(4) as usize;
    format!("{prefix}-{:0width$x}", first >> (32 - bits))
}

#[test]
fn ngclient_reads_tern_repo_with_delegation_and_rotated_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let r = s(&repo);
    let [root1, root2, root3, root4, targets, snapshot, timestamp, product1, product2] = [
        "root-1",
        "root-2",
        "root-3",
        "root-4",
        "targets",
        "snapshot",
        "timestamp",
        "product-1",
        "product-2",
    ]
    .map(|name| keygen(d, name, "ed25519"));

    #[rustfmt::skip]
    tern(&[
        "repo", "init", "--repo", r,
        "--root-key", &root1.public, "--root-threshold", "1",
        "--targets-key", &targets.public, "--targets-threshold", "1",
        "--snapshot-key", &snapshot.public,
        "--timestamp-key", &timestamp.public,
        "--key", &root1.pem, "--key", &targets.pem, "--key", &snapshot.pem, "--key", &timestamp.pem,
    ]);

    let hello = d.join("hello.txt");
    fs::write(&hello, b"hello from tern\n").unwrap();
    #[rustfmt::skip]
    tern(&["repo", "add-target", "--repo", r, s(&hello), "--name", "hello.txt", "--key", &targets.pem]);

    #[rustfmt::skip]
    tern(&[
        "repo", "delegate", "--repo", r, "--from", "targets", "--to", "product-a", "--path", "products/a/*",
        "--delegate-key", &product1.public, "--delegate-key", &product2.public, "--threshold", "2",
        "--key", &targets.pem, "--key", &product1.pem, "--key", &product2.pem,
    ]);

    // Binary, not valid UTF-8: the bytes must come back exactly.
    let app = d.join("app.bin");
    let app_bytes: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(&app, &app_bytes).unwrap();
    #[rustfmt::skip]
    tern(&[
        "repo", "add-target", "--repo", r, s(&app), "--name", "products/a/app.bin", "--role", "product-a",
        "--release-version", "1.0.0", "--device-type", "board-a", "--installer", "raw", "--slot-class", "rootfs",
        "--key", &product1.pem, "--key", &product2.pem,
    ]);
    #[rustfmt::skip]
    tern(&["repo", "refresh", "--repo", r, "--key", &snapshot.pem, "--key", &timestamp.pem]);

    // Root v2: {root-2, root-3} threshold 2, signed by the old key and both new ones.
    #[rustfmt::skip]
    tern(&[
        "repo", "rotate", "--repo", r, "--role", "root",
        "--add-key", &root2.public, "--add-key", &root3.public, "--remove-key", &root1.public, "--threshold", "2",
        "--key", &root1.pem, "--key", &root2.pem, "--key", &root3.pem,
    ]);
    // Root v3: {root-2, root-4} threshold 2, signed by v2's keys (2 of 2) and by v3's (2 of 2).
    #[rustfmt::skip]
    tern(&[
        "repo", "rotate", "--repo", r, "--role", "root",
        "--add-key", &root4.public, "--remove-key", &root3.public,
        "--key", &root2.pem, "--key", &root3.pem, "--key", &root4.pem,
    ]);
    #[rustfmt::skip]
    tern(&["repo", "refresh", "--repo", r, "--key", &snapshot.pem, "--key", &timestamp.pem]);
    assert!(repo.join("metadata/3.root.json").is_file());
    assert!(!repo.join("metadata/4.root.json").exists());

    // The app target carries Tern's manifest in `custom`; ngclient must accept it as opaque data.
    let (snapshot_version, versions) = listed_versions(&repo);
    let targets_version = role_version(&versions, "targets");
    let product_version = role_version(&versions, "product-a");
    let product_meta = read_json(&repo.join(format!("metadata/{product_version}.product-a.json")));
    let custom = &product_meta["signed"]["targets"]["products/a/app.bin"]["custom"];
    assert!(
        custom.as_object().is_some_and(|c| !c.is_empty()),
        "no manifest in {custom}"
    );

    let (exit_ok, report) = adapter(
        &repo,
        &repo.join("metadata/1.root.json"),
        &["hello.txt", "products/a/app.bin"],
    );
    assert!(exit_ok, "ngclient failed: {report:#}");
    assert_eq!(report["error"], Value::Null);
    assert_eq!(report["root_version"], 3);
    assert_eq!(downloaded_names(&report), ["hello.txt", "products/a/app.bin"]);
    assert_eq!(downloaded(&report, "hello.txt"), fs::read(&hello).unwrap());
    assert_eq!(downloaded(&report, "products/a/app.bin"), app_bytes);

    // Root chain walked 2, 3, then 4's 404 ended it; the delegated role was fetched only when the
    // search for the app target reached it.
    let expected = [
        "/metadata/2.root.json".to_owned(),
        "/metadata/3.root.json".to_owned(),
        "/metadata/4.root.json".to_owned(),
        "/metadata/timestamp.json".to_owned(),
        format!("/metadata/{snapshot_version}.snapshot.json"),
        format!("/metadata/{targets_version}.targets.json"),
        target_request("hello.txt", &sha256_hex(&fs::read(&hello).unwrap())),
        format!("/metadata/{product_version}.product-a.json"),
        target_request("products/a/app.bin", &sha256_hex(&app_bytes)),
    ];
    assert_eq!(requests(&report), expected, "{report:#}");
}

#[test]
fn ngclient_reads_tern_repo_with_rotated_targets_key_and_hash_bins() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let r = s(&repo);
    let root = keygen(d, "root", "ecdsa-p256");
    let targets1 = keygen(d, "targets-1", "rsa3072");
    let targets2 = keygen(d, "targets-2", "ed25519");
    let snapshot = keygen(d, "snapshot", "ed25519");
    let timestamp = keygen(d, "timestamp", "ed25519");
    let bins = keygen(d, "bins", "ed25519");

    #[rustfmt::skip]
    tern(&[
        "repo", "init", "--repo", r,
        "--root-key", &root.public,
        "--targets-key", &targets1.public,
        "--snapshot-key", &snapshot.public,
        "--timestamp-key", &timestamp.public,
        "--key", &root.pem, "--key", &targets1.pem, "--key", &snapshot.pem, "--key", &timestamp.pem,
    ]);
    // Writes 2.root.json, and re-signs targets with the new key since it is given.
    #[rustfmt::skip]
    tern(&[
        "repo", "rotate", "--repo", r, "--role", "targets",
        "--add-key", &targets2.public, "--remove-key", &targets1.public,
        "--key", &root.pem, "--key", &targets2.pem,
    ]);
    #[rustfmt::skip]
    tern(&[
        "repo", "delegate-bins", "--repo", r, "--bits", "3", "--prefix", "bin",
        "--delegate-key", &bins.public, "--key", &targets2.pem, "--key", &bins.pem,
    ]);

    // Compressible, so the stored (zstd) payload is visibly not the source.
    let image_name = "firmware/rootfs.img.zst";
    let image = d.join("rootfs.img");
    let image_bytes: Vec<u8> = (0..40_000u32)
        .flat_map(|i| format!("rootfs block {i:08}\n").into_bytes())
        .collect();
    fs::write(&image, &image_bytes).unwrap();
    let tool_name = "apps/tool.bin";
    let tool = d.join("tool.bin");
    let tool_bytes: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    fs::write(&tool, &tool_bytes).unwrap();

    let image_bin = hash_bin("bin", 3, image_name);
    let tool_bin = hash_bin("bin", 3, tool_name);
    // Fixture check: the names were chosen so that two different bins are exercised.
    assert_ne!(image_bin, tool_bin);

    #[rustfmt::skip]
    tern(&[
        "repo", "add-target", "--repo", r, s(&image), "--name", image_name, "--role", &image_bin,
        "--sha512", "--compression", "zstd", "--release-version", "1.0.0", "--device-type", "sim",
        "--installer", "raw", "--slot-class", "rootfs", "--key", &bins.pem,
    ]);
    #[rustfmt::skip]
    tern(&["repo", "add-target", "--repo", r, s(&tool), "--name", tool_name, "--role", &tool_bin, "--key", &bins.pem]);
    #[rustfmt::skip]
    tern(&["repo", "refresh", "--repo", r, "--key", &snapshot.pem, "--key", &timestamp.pem]);
    assert!(repo.join("metadata/2.root.json").is_file());
    assert!(!repo.join("metadata/3.root.json").exists());

    let (snapshot_version, versions) = listed_versions(&repo);
    let targets_version = role_version(&versions, "targets");
    let image_bin_version = role_version(&versions, &image_bin);
    let tool_bin_version = role_version(&versions, &tool_bin);
    let image_meta = read_json(&repo.join(format!("metadata/{image_bin_version}.{image_bin}.json")));
    let image_info = &image_meta["signed"]["targets"][image_name];
    let image_sha256 = image_info["hashes"]["sha256"].as_str().unwrap().to_owned();

    let (exit_ok, report) = adapter(&repo, &repo.join("metadata/1.root.json"), &[image_name, tool_name]);
    assert!(exit_ok, "ngclient failed: {report:#}");
    assert_eq!(report["error"], Value::Null);
    assert_eq!(report["root_version"], 2);
    assert_eq!(downloaded_names(&report), [tool_name, image_name]);

    // The compressed payload is what the repository lists: check it against the metadata.
    let got = downloaded(&report, image_name);
    assert_eq!(image_info["length"].as_u64(), Some(got.len() as u64));
    assert_eq!(sha256_hex(&got), image_sha256);
    let sha512 = hex(digest::digest(&digest::SHA512, &got).as_ref());
    assert_eq!(image_info["hashes"]["sha512"].as_str(), Some(sha512.as_str()));
    assert!(got.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), "not a zstd frame");
    assert!(got.len() < image_bytes.len());
    assert_eq!(downloaded(&report, tool_name), tool_bytes);

    // Each bin is fetched when the search for its target gets there; the target file name is
    // prefixed with its SHA-256 (the first hash listed), also for the one with a SHA-512.
    let expected = [
        "/metadata/2.root.json".to_owned(),
        "/metadata/3.root.json".to_owned(),
        "/metadata/timestamp.json".to_owned(),
        format!("/metadata/{snapshot_version}.snapshot.json"),
        format!("/metadata/{targets_version}.targets.json"),
        format!("/metadata/{image_bin_version}.{image_bin}.json"),
        target_request(image_name, &image_sha256),
        format!("/metadata/{tool_bin_version}.{tool_bin}.json"),
        target_request(tool_name, &sha256_hex(&tool_bytes)),
    ];
    assert_eq!(requests(&report), expected, "{report:#}");
}

#[test]
fn ngclient_refuses_tern_repo_signed_below_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let r = s(&repo);
    let [root, targets, snapshot, timestamp] =
        ["root", "targets", "snapshot", "timestamp"].map(|name| keygen(d, name, "ed25519"));
    #[rustfmt::skip]
    tern(&[
        "repo", "init", "--repo", r,
        "--root-key", &root.public,
        "--targets-key", &targets.public,
        "--snapshot-key", &snapshot.public,
        "--timestamp-key", &timestamp.public,
        "--key", &root.pem, "--key", &targets.pem, "--key", &snapshot.pem, "--key", &timestamp.pem,
    ]);
    let hello = d.join("hello.txt");
    fs::write(&hello, b"hello from tern\n").unwrap();
    #[rustfmt::skip]
    tern(&["repo", "add-target", "--repo", r, s(&hello), "--name", "hello.txt", "--key", &targets.pem]);
    #[rustfmt::skip]
    tern(&["repo", "refresh", "--repo", r, "--key", &snapshot.pem, "--key", &timestamp.pem]);
    let trusted_root = repo.join("metadata/1.root.json");

    // Control: the untouched repository is accepted, so the refusal below is the signature's doing.
    let (exit_ok, report) = adapter(&repo, &trusted_root, &["hello.txt"]);
    assert!(exit_ok, "ngclient failed on the valid repository: {report:#}");

    // Flip one hex digit of timestamp's only signature, in place, leaving the rest byte for byte.
    let ts_path = repo.join("metadata/timestamp.json");
    let text = fs::read_to_string(&ts_path).unwrap();
    let ts: Value = serde_json::from_str(&text).unwrap();
    let sigs = ts["signatures"].as_array().unwrap();
    assert_eq!(sigs.len(), 1);
    let sig = sigs[0]["sig"].as_str().unwrap();
    let flipped = format!("{}{}", if sig.starts_with('0') { '1' } else { '0' }, &sig[1..]);
    assert_eq!(text.matches(sig).count(), 1);
    fs::write(&ts_path, text.replace(sig, &flipped)).unwrap();

    let (exit_ok, report) = adapter(&repo, &trusted_root, &["hello.txt"]);
    assert!(!exit_ok);
    assert_eq!(report["ok"], false);
    assert_eq!(report["error_type"], "UnsignedMetadataError", "{report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("timestamp"), "{error}");
    assert_eq!(report["root_version"], 1);
    assert_eq!(report["targets"], serde_json::json!({}));
    // Refresh stopped at the timestamp: nothing after it was fetched, no target in particular.
    assert_eq!(
        requests(&report),
        ["/metadata/2.root.json", "/metadata/timestamp.json"],
        "{report:#}"
    );
    let client_targets = d.join("client-2/targets");
    assert_eq!(
        fs::read_dir(&client_targets).unwrap().count(),
        0,
        "{}",
        client_targets.display()
    );
}
