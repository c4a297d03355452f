//! The `tern` binary, run for real: the release engineer's workflow, and the refusals.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

fn tern() -> Command {
    Command::cargo_bin("tern").unwrap()
}

/// Run and require success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = tern().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tern {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run and require failure with exit code 1 and exactly one `tern: ` line on stderr; returns it.
fn fails(args: &[&str]) -> String {
    let out = tern().args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "tern {args:?} should fail with 1");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got {stderr:?}");
    assert!(lines[0].starts_with("tern: "), "{stderr:?}");
    lines[0].to_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let me = Setup { dir };
        for k in ["root", "targets", "snapshot", "timestamp", "product"] {
            me.keygen(k);
        }
        me
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn keygen(&self, name: &str) {
        ok(&["key", "generate", "--out", s(&self.path(name))]);
    }

    fn key(&self, name: &str) -> String {
        format!("{}.pem", s(&self.path(name)))
    }

    fn pubkey(&self, name: &str) -> String {
        format!("{}.pub.json", s(&self.path(name)))
    }

    fn repo(&self) -> String {
        s(&self.path("repo")).to_owned()
    }

    fn init(&self) {
        let repo = self.repo();
        ok(&[
            "repo",
            "init",
            "--repo",
            &repo,
            "--root-key",
            &self.pubkey("root"),
            "--targets-key",
            &self.pubkey("targets"),
            "--snapshot-key",
            &self.pubkey("snapshot"),
            "--timestamp-key",
            &self.pubkey("timestamp"),
            "--key",
            &self.key("root"),
            "--key",
            &self.key("targets"),
            "--key",
            &self.key("snapshot"),
            "--key",
            &self.key("timestamp"),
        ]);
    }

    fn all_keys(&self) -> Vec<String> {
        ["root", "targets", "snapshot", "timestamp", "product"]
            .iter()
            .flat_map(|k| ["--key".to_owned(), self.key(k)])
            .collect()
    }

    fn run_with_keys(&self, args: &[&str]) -> String {
        let keys = self.all_keys();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(keys.iter().map(String::as_str));
        ok(&all)
    }

    fn image(&self, name: &str, size: usize) -> String {
        let p = self.path(name);
        fs::write(&p, (0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        s(&p).to_owned()
    }
}

#[test]
fn key_generate_writes_0600_pkcs8_and_refuses_to_overwrite() {
    let t = Setup::new();
    let pem = t.key("root");
    assert_eq!(fs::metadata(&pem).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(fs::read_to_string(&pem)
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    let public: Value = serde_json::from_slice(&fs::read(t.pubkey("root")).unwrap()).unwrap();
    assert_eq!(public["keytype"], "ed25519");
    let before = fs::read(&pem).unwrap();
    let err = fails(&["key", "generate", "--out", s(&t.path("root"))]);
    assert!(err.contains("root.pem") && err.contains("already exists"), "{err}");
    assert_eq!(fs::read(&pem).unwrap(), before);

    for (ty, keytype) in [("ecdsa-p256", "ecdsa"), ("rsa3072", "rsa")] {
        let out: Value = serde_json::from_str(&ok(&[
            "key",
            "generate",
            "--type",
            ty,
            "--out",
            s(&t.path(ty)),
            "--output",
            "json",
        ]))
        .unwrap();
        assert_eq!(out["keytype"], keytype);
        let shown: Value = serde_json::from_str(&ok(&[
            "key",
            "show",
            &format!("{}.pem", s(&t.path(ty))),
            "--output",
            "json",
        ]))
        .unwrap();
        assert_eq!(shown["keyid"], out["keyid"]);
    }
}

#[test]
fn a_group_readable_private_key_is_refused() {
    let t = Setup::new();
    fs::set_permissions(t.key("root"), fs::Permissions::from_mode(0o640)).unwrap();
    let repo = t.repo();
    let err = fails(&[
        "repo",
        "init",
        "--repo",
        &repo,
        "--root-key",
        &t.pubkey("root"),
        "--targets-key",
        &t.pubkey("targets"),
        "--snapshot-key",
        &t.pubkey("snapshot"),
        "--timestamp-key",
        &t.pubkey("timestamp"),
        "--key",
        &t.key("root"),
    ]);
    assert!(err.contains("root.pem") && err.contains("0640"), "{err}");
    assert!(!t.path("repo/metadata").exists(), "nothing may be written");
}

#[test]
fn release_workflow_from_keys_to_verified_bundle() {
    let t = Setup::new();
    t.init();
    let repo = t.repo();
    t.run_with_keys(&[
        "repo",
        "delegate",
        "--repo",
        &repo,
        "--to",
        "product-x",
        "--path",
        "x/*",
        "--delegate-key",
        &t.pubkey("product"),
        "--terminating",
    ]);
    let image = t.image("rootfs.img", 200_000);
    t.run_with_keys(&[
        "repo",
        "add-target",
        "--repo",
        &repo,
        &image,
        "--name",
        "x/rootfs.img.zst",
        "--role",
        "product-x",
        "--release-version",
        "2.1.0",
        "--device-type",
        "board-a",
        "--hardware",
        "rev-b",
        "--installer",
        "raw",
        "--slot-class",
        "rootfs",
        "--compression",
        "zstd",
        "--sha512",
    ]);
    t.run_with_keys(&["repo", "refresh", "--repo", &repo]);

    let status: Value = serde_json::from_str(&ok(&["repo", "status", "--repo", &repo, "--output", "json"])).unwrap();
    let roles: Vec<&str> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["root", "timestamp", "snapshot", "targets", "product-x"]);
    assert!(status
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["valid"].as_u64() >= r["threshold"].as_u64()));

    let bundle = s(&t.path("release.tern")).to_owned();
    ok(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "x/rootfs.img.zst",
        "--out",
        &bundle,
        "--include-freshness",
    ]);
    // The bundle is a plain tar, metadata first.
    let list = std::process::Command::new("tar")
        .args(["tf", &bundle])
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8(list.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        names,
        [
            "tern-bundle.json",
            "metadata/1.root.json",
            "metadata/timestamp.json",
            "metadata/snapshot.json",
            "metadata/targets.json",
            "metadata/product-x.json",
            "payloads/x/rootfs.img.zst",
        ]
    );

    let inspect: Value = serde_json::from_str(&ok(&["bundle", "inspect", &bundle, "--output", "json"])).unwrap();
    let m = &inspect["payloads"][0]["manifest"];
    assert_eq!(m["version"], "2.1.0");
    assert_eq!(m["device_type"], "board-a");
    assert_eq!(m["hardware"], serde_json::json!(["rev-b"]));
    assert_eq!(m["installer"], "raw");
    assert_eq!(m["slot_class"], "rootfs");
    assert_eq!(m["compression"], "zstd");
    assert!(inspect["payloads"][0]["listed"]["hashes"]["sha512"].is_string());
    let text = ok(&["bundle", "inspect", &bundle]);
    assert!(text.contains("NOT verified"), "{text}");

    let root = format!("{repo}/metadata/1.root.json");
    let report: Value = serde_json::from_str(&ok(&[
        "bundle",
        "verify",
        &bundle,
        "--root",
        &root,
        "--require-freshness",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(report["payloads"][0]["role"], "product-x");
    assert_eq!(report["delegated"][0][0], "product-x");
}

#[test]
fn a_threshold_role_is_signed_on_two_machines() {
    let t = Setup::new();
    t.keygen("targets-2");
    let repo = t.repo();
    ok(&[
        "repo",
        "init",
        "--repo",
        &repo,
        "--root-key",
        &t.pubkey("root"),
        "--targets-key",
        &t.pubkey("targets"),
        "--targets-key",
        &t.pubkey("targets-2"),
        "--targets-threshold",
        "2",
        "--snapshot-key",
        &t.pubkey("snapshot"),
        "--timestamp-key",
        &t.pubkey("timestamp"),
        "--key",
        &t.key("root"),
        "--key",
        &t.key("targets"),
    ]);
    let image = t.image("app.bin", 1000);
    // Machine one: adds the target with its key; the role now lacks a signature.
    let out = tern()
        .args([
            "repo",
            "add-target",
            "--repo",
            &repo,
            &image,
            "--key",
            &t.key("targets"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("NEEDS SIGNATURES"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tern repo sign --role targets"));
    assert!(t.path("repo/staged/2.targets.json").exists() && !t.path("repo/metadata/2.targets.json").exists());
    let snapshots_before = fs::read_dir(t.path("repo/metadata")).unwrap().count();
    let err = fails(&[
        "repo",
        "refresh",
        "--repo",
        &repo,
        "--key",
        &t.key("snapshot"),
        "--key",
        &t.key("timestamp"),
    ]);
    assert!(err.contains("role `targets`") && err.contains("1 of 2"), "{err}");
    assert_eq!(fs::read_dir(t.path("repo/metadata")).unwrap().count(), snapshots_before);
    // Machine two: adds its signature to the same version.
    let signed: Value = serde_json::from_str(&ok(&[
        "repo",
        "sign",
        "--repo",
        &repo,
        "--role",
        "targets",
        "--key",
        &t.key("targets-2"),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(signed[0]["valid"], 2);
    assert_eq!(signed[0]["version"], 2);
    ok(&[
        "repo",
        "refresh",
        "--repo",
        &repo,
        "--key",
        &t.key("snapshot"),
        "--key",
        &t.key("timestamp"),
    ]);
}

#[test]
fn root_rotation_needs_old_and_new_thresholds() {
    let t = Setup::new();
    t.init();
    t.keygen("root-2");
    let repo = t.repo();
    // Signed by the new key only: written, but reported incomplete under the previous keys.
    let w: Value = serde_json::from_str(&ok(&[
        "repo",
        "rotate",
        "--repo",
        &repo,
        "--role",
        "root",
        "--add-key",
        &t.pubkey("root-2"),
        "--remove-key",
        &t.pubkey("root"),
        "--key",
        &t.key("root-2"),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(w[0]["role"], "root");
    assert_eq!(w[0]["valid"], 1);
    assert_eq!(w[1]["role"], "root (previous keys)");
    assert_eq!(w[1]["valid"], 0);
    // Staged, not published: clients never see a root they would refuse.
    assert!(t.path("repo/staged/2.root.json").exists());
    assert!(!t.path("repo/metadata/2.root.json").exists());
    let err = fails(&[
        "repo",
        "refresh",
        "--repo",
        &repo,
        "--key",
        &t.key("snapshot"),
        "--key",
        &t.key("timestamp"),
    ]);
    assert!(err.contains("role `root` version 2"), "{err}");
    // The old key adds its signature: both thresholds met.
    let w: Value = serde_json::from_str(&ok(&[
        "repo",
        "sign",
        "--repo",
        &repo,
        "--role",
        "root",
        "--key",
        &t.key("root"),
        "--output",
        "json",
    ]))
    .unwrap();
    assert!(w.as_array().unwrap().iter().all(|r| r["valid"] == 1), "{w}");
    ok(&[
        "repo",
        "refresh",
        "--repo",
        &repo,
        "--key",
        &t.key("snapshot"),
        "--key",
        &t.key("timestamp"),
    ]);
    assert!(t.path("repo/metadata/2.root.json").exists());
    assert_eq!(
        fs::read(t.path("repo/metadata/2.root.json")).unwrap(),
        fs::read(t.path("repo/metadata/root.json")).unwrap()
    );
}

#[test]
fn refusals_name_what_is_wrong_and_change_nothing() {
    let t = Setup::new();
    t.init();
    let repo = t.repo();
    let targets_before = fs::read(t.path("repo/metadata/1.targets.json")).unwrap();
    let image = t.image("a.img", 100);

    let err = fails(&[
        "repo",
        "add-target",
        "--repo",
        &repo,
        &image,
        "--name",
        "../a.img",
        "--key",
        &t.key("targets"),
    ]);
    assert!(err.contains("target name `../a.img`"), "{err}");
    let err = fails(&[
        "repo",
        "add-target",
        "--repo",
        &repo,
        &image,
        "--key",
        &t.key("snapshot"),
    ]);
    assert!(err.contains("role `targets`: none of the given keys"), "{err}");
    let err = fails(&[
        "repo",
        "add-target",
        "--repo",
        &repo,
        &image,
        "--release-version",
        "one",
        "--device-type",
        "d",
        "--slot-class",
        "rootfs",
        "--key",
        &t.key("targets"),
    ]);
    assert!(err.contains("custom.tern.version"), "{err}");
    assert_eq!(
        fs::read(t.path("repo/metadata/1.targets.json")).unwrap(),
        targets_before
    );
    assert!(!t.path("repo/metadata/2.targets.json").exists());

    let err = fails(&[
        "repo",
        "init",
        "--repo",
        &repo,
        "--root-key",
        &t.pubkey("root"),
        "--targets-key",
        &t.pubkey("targets"),
        "--snapshot-key",
        &t.pubkey("snapshot"),
        "--timestamp-key",
        &t.pubkey("timestamp"),
        "--key",
        &t.key("root"),
    ]);
    assert!(err.contains("a repository exists here already"), "{err}");
    let err = fails(&["repo", "status", "--repo", s(&t.path("nowhere"))]);
    assert!(err.contains("not a Tern repository"), "{err}");

    // A bundle that cannot be made leaves no file behind.
    let out = t.path("never.tern");
    let err = fails(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "missing.img",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("target `missing.img`"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(t.dir.path())
            .unwrap()
            .filter(|e| { e.as_ref().unwrap().file_name().to_string_lossy().contains("never") })
            .count(),
        0
    );
}

#[test]
fn verify_refuses_tampered_and_truncated_bundles_in_one_line() {
    let t = Setup::new();
    t.init();
    let repo = t.repo();
    let image = t.image("fw.bin", 50_000);
    t.run_with_keys(&["repo", "add-target", "--repo", &repo, &image]);
    t.run_with_keys(&["repo", "refresh", "--repo", &repo]);
    let bundle = t.path("fw.tern");
    ok(&[
        "bundle",
        "create",
        "--repo",
        &repo,
        "--target",
        "fw.bin",
        "--out",
        s(&bundle),
    ]);
    let root = format!("{repo}/metadata/1.root.json");
    let good = fs::read(&bundle).unwrap();

    let mut bad = good.clone();
    let at = good.len() - 1024 - 600;
    bad[at] ^= 1;
    fs::write(&bundle, &bad).unwrap();
    let err = fails(&["bundle", "verify", s(&bundle), "--root", &root]);
    assert!(
        err.contains("fw.tern") && err.contains("payload `fw.bin`") && err.contains("sha256 hash does not match"),
        "{err}"
    );

    fs::write(&bundle, &good[..good.len() - 20_000]).unwrap();
    let err = fails(&["bundle", "verify", s(&bundle), "--root", &root]);
    assert!(err.contains("truncated"), "{err}");

    fs::write(&bundle, &good).unwrap();
    let err = fails(&["bundle", "verify", s(&bundle), "--root", &root, "--require-freshness"]);
    assert!(err.contains("timestamp"), "{err}");
    let err = fails(&["bundle", "verify", s(&bundle), "--root", s(&t.path("no-root.json"))]);
    assert!(err.contains("trusted root") && err.contains("no-root.json"), "{err}");
}

/// `--help` is written for the command's users, every command says what it does, and the
/// completions and manual pages come from the same definitions.
#[test]
fn help_completions_and_manual_pages_are_for_users() {
    let help = ok(&["--help"]);
    assert!(!help.contains("argument parsing"), "{help}");
    for who in ["release engineer", "operator", "integrator", "Examples:", "RUST_LOG"] {
        assert!(
            help.to_lowercase().contains(&who.to_lowercase()),
            "no {who:?} in:\n{help}"
        );
    }
    let bash = ok(&["completions", "bash"]);
    assert!(bash.contains("_tern()") && bash.contains("rollout"), "{bash}");
    assert!(ok(&["completions", "zsh"]).contains("#compdef tern"));
    assert!(ok(&["completions", "fish"]).contains("complete -c tern"));

    let dir = tempfile::tempdir().unwrap();
    ok(&["manpages", s(dir.path())]);
    let page = |name: &str| {
        fs::read_to_string(dir.path().join(format!("{name}.1"))).unwrap_or_else(|e| panic!("{name}.1: {e}"))
    };
    assert!(page("tern").starts_with(".ie"), "{}", page("tern"));
    let run = page("tern-server-run");
    assert!(run.contains(".TH tern-server-run 1"), "{run}");
    assert!(run.contains("\\-\\-database\\-url"), "{run}");
    // Every command and subcommand has a page, and each says what it is for.
    let pages = fs::read_dir(dir.path()).unwrap().count();
    assert!(pages > 60, "{pages} pages");
    for entry in fs::read_dir(dir.path()).unwrap() {
        let text = fs::read_to_string(entry.unwrap().path()).unwrap();
        let name = text.lines().find(|l| l.starts_with(".TH")).unwrap().to_owned();
        let after = text.split(".SH NAME").nth(1).unwrap().lines().nth(1).unwrap_or("");
        assert!(
            after.contains("\\-") && after.len() > 12,
            "{name}: no description: {after:?}"
        );
    }
}
