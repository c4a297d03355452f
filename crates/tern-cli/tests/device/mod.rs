//! A release engineer's repository and simulated devices, through the real binary: what
//! the device-side tests share.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern")).args(args).output().unwrap()
}

#[track_caller]
pub fn ok(args: &[&str]) -> String {
    let out = tern(args);
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[track_caller]
pub fn fails(args: &[&str], needle: &str) -> String {
    let out = tern(args);
    // Plain progress lines may come first; the error is the last line.
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let err = stderr.lines().last().unwrap_or("").to_owned();
    assert_eq!(out.status.code(), Some(1), "tern {args:?} should fail: {err}");
    assert!(
        err.starts_with("tern: ") && err.contains(needle),
        "expected {needle:?} in {err:?}"
    );
    err
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A repository whose releases the tests bundle.
pub struct Releases {
    pub dir: tempfile::TempDir,
}

impl Releases {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let r = Releases { dir };
        ok(&["key", "generate", "--out", &r.p("k")]);
        let k = r.key();
        ok(&[
            "repo",
            "init",
            "--repo",
            &r.p("repo"),
            "--root-key",
            &k,
            "--targets-key",
            &k,
            "--snapshot-key",
            &k,
            "--timestamp-key",
            &k,
            "--key",
            &k,
        ]);
        r
    }

    pub fn p(&self, rel: &str) -> String {
        s(&self.dir.path().join(rel))
    }

    pub fn key(&self) -> String {
        self.p("k.pem")
    }

    pub fn root(&self) -> String {
        self.p("repo/metadata/1.root.json")
    }

    /// A bundle of one raw rootfs image of `size` bytes, version `version`.
    pub fn bundle(
        &self,
        version: &str,
        device_type: &str,
        hardware: &[&str],
        size: usize,
        zstd: bool,
    ) -> (PathBuf, Vec<u8>) {
        self.bundle_with(version, device_type, hardware, size, zstd, &[])
    }

    /// The same, with more `repo add-target` arguments (`--encrypt-for`…).
    pub fn bundle_with(
        &self,
        version: &str,
        device_type: &str,
        hardware: &[&str],
        size: usize,
        zstd: bool,
        extra: &[&str],
    ) -> (PathBuf, Vec<u8>) {
        let image: Vec<u8> = (0..size).map(|i| ((i * 7 + version.len()) % 251) as u8).collect();
        let img = self.p(&format!("rootfs-{version}-{device_type}.img"));
        fs::write(&img, &image).unwrap();
        let name = format!("rootfs-{version}-{device_type}.img");
        let mut args = vec![
            "repo".to_owned(),
            "add-target".into(),
            "--repo".into(),
            self.p("repo"),
            img,
            "--name".into(),
            name.clone(),
            "--release-version".into(),
            version.into(),
            "--device-type".into(),
            device_type.into(),
            "--installer".into(),
            "raw".into(),
            "--slot-class".into(),
            "rootfs".into(),
            "--key".into(),
            self.key(),
        ];
        for h in hardware {
            args.push("--hardware".into());
            args.push((*h).into());
        }
        if zstd {
            args.extend(["--compression".into(), "zstd".into()]);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        ok(&["repo", "refresh", "--repo", &self.p("repo"), "--key", &self.key()]);
        let out = self.dir.path().join(format!("{name}.tern"));
        ok(&[
            "bundle",
            "create",
            "--repo",
            &self.p("repo"),
            "--target",
            &name,
            "--out",
            &s(&out),
        ]);
        (out, image)
    }
}

impl Releases {
    /// A bundle of one archive payload (the tar file `tar`, listed as `name`, version 1.0.0)
    /// to be unpacked at `dest`; returns its path.
    pub fn archive_bundle(&self, tar: &str, name: &str, dest: &Path) -> String {
        ok(&[
            "repo",
            "add-target",
            "--repo",
            &self.p("repo"),
            tar,
            "--name",
            name,
            "--release-version",
            "1.0.0",
            "--device-type",
            "tern-sim",
            "--installer",
            "archive",
            "--install-path",
            &s(dest),
            "--key",
            &self.key(),
        ]);
        ok(&["repo", "refresh", "--repo", &self.p("repo"), "--key", &self.key()]);
        let bundle = self.p(&format!("{}.tern", name.replace('/', "-")));
        ok(&[
            "bundle",
            "create",
            "--repo",
            &self.p("repo"),
            "--target",
            name,
            "--out",
            &bundle,
        ]);
        bundle
    }
}

/// A simulated device.
pub struct Device {
    pub dir: tempfile::TempDir,
}

impl Device {
    pub fn new(root: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        ok(&[
            "device",
            "simulate",
            "--dir",
            &s(&dir.path().join("d")),
            "--root",
            root,
            "--slot-mib",
            "16",
        ]);
        Device { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join("d").join(rel)
    }

    pub fn config(&self) -> String {
        s(&self.path("agent.toml"))
    }

    pub fn install(&self, bundle: &Path) -> String {
        ok(&["install", &s(bundle), "--config", &self.config()])
    }

    pub fn reboot(&self) -> Value {
        serde_json::from_str(&ok(&["sim", "reboot", "--config", &self.config(), "--output", "json"])).unwrap()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&ok(&[
            "agent",
            "status",
            "--config",
            &self.config(),
            "--output",
            "json",
        ]))
        .unwrap()
    }

    pub fn log(&self) -> Vec<String> {
        fs::read_to_string(self.path("bootloader.log"))
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn add_hook(&self, name: &str, script: &str) {
        let path = self.path(name);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        let mut perm = fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        fs::set_permissions(&path, perm).unwrap();
        let mut cfg = fs::read_to_string(self.path("agent.toml")).unwrap();
        cfg.push_str(&format!("{} = \"{name}\"\n", name.replace('-', "_")));
        fs::write(self.path("agent.toml"), cfg).unwrap();
    }

    /// Everything a refusal must leave as it was.
    pub fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        ["slot-a.img", "slot-b.img", "state/state.json", "bootloader.json"]
            .iter()
            .map(|f| (f.to_string(), fs::read(self.path(f)).unwrap_or_default()))
            .collect()
    }
}

pub fn slot_content(dev: &Device, slot_file: &str, len: usize) -> Vec<u8> {
    fs::read(dev.path(slot_file)).unwrap()[..len].to_vec()
}
