//! `tern bundle verify` of a 1 GiB payload peaks under 32 MiB of resident memory, and so do
//! `tern bundle verify`, `inspect`, `tern install` and the server's upload of a hostile
//! bundle whose tar extension headers declare 1 GiB (a sparse file of a few KB on disk).
//!
//! The peak is the kernel's own account of each process (wait4's rusage for the commands,
//! the server's `VmHWM`), so the figure cannot be flattered by sampling.

mod fleet;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

const GIB: u64 = 1 << 30;
const LIMIT: u64 = 32 << 20;

fn tern(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run a child to completion and return its exit status and peak RSS in bytes.
#[allow(unsafe_code)]
fn run_measured(cmd: &mut Command) -> (i32, u64) {
    let child = cmd.spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: both out-parameters are valid, zero-initialised locals; the child is ours and
    // std never waits for it (the `Child` is forgotten, not dropped into a wait).
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::wait4(pid, &mut status, 0, &mut usage), pid);
        usage
    };
    std::mem::forget(child);
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64 * 1024)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn verifying_a_1_gib_bundle_stays_under_32_mib() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for k in ["root", "targets", "snapshot", "timestamp"] {
        tern(&["key", "generate", "--out", s(&d.join(k))]);
    }
    let key = |k: &str| format!("{}.pem", s(&d.join(k)));
    let repo = d.join("repo");
    tern(&[
        "repo",
        "init",
        "--repo",
        s(&repo),
        "--root-key",
        &key("root"),
        "--targets-key",
        &key("targets"),
        "--snapshot-key",
        &key("snapshot"),
        "--timestamp-key",
        &key("timestamp"),
        "--key",
        &key("root"),
        "--key",
        &key("targets"),
        "--key",
        &key("snapshot"),
        "--key",
        &key("timestamp"),
    ]);
    let payload = d.join("big.img");
    let mut f = std::io::BufWriter::new(fs::File::create(&payload).unwrap());
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    for _ in 0..(GIB >> 20) {
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    tern(&[
        "repo",
        "add-target",
        "--repo",
        s(&repo),
        s(&payload),
        "--key",
        &key("targets"),
    ]);
    fs::remove_file(&payload).unwrap();
    tern(&[
        "repo",
        "refresh",
        "--repo",
        s(&repo),
        "--key",
        &key("snapshot"),
        "--key",
        &key("timestamp"),
    ]);
    let bundle = d.join("big.tern");
    tern(&[
        "bundle",
        "create",
        "--repo",
        s(&repo),
        "--target",
        "big.img",
        "--out",
        s(&bundle),
    ]);
    assert!(fs::metadata(&bundle).unwrap().len() > GIB);

    let root = repo.join("metadata/1.root.json");
    let (code, peak) = run_measured(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["bundle", "verify", s(&bundle), "--root", s(&root), "--output", "json"])
            .stdout(std::process::Stdio::null()),
    );
    assert_eq!(code, 0, "verify failed");
    eprintln!(
        "peak RSS of tern bundle verify on a 1 GiB payload: {:.1} MiB",
        peak as f64 / (1 << 20) as f64
    );
    assert!(peak > 0 && peak < LIMIT, "peak RSS {peak} bytes is not under {LIMIT}");
}

/// A bundle that starts well (its header entry) and then has an extension header of type
/// `kind` (`L`, `K`, `x`, `g`) declaring 1 GiB: a hole in a sparse file, which reads as
/// zeros. The tar crate read such an entry whole before anyone saw it.
fn hostile(dir: &Path, kind: u8) -> std::path::PathBuf {
    let path = dir.join(format!("hostile-{}.tern", kind as char));
    let mut b = tar::Builder::new(Vec::new());
    let header = br#"{"format":"tern-bundle","format_version":1,"payloads":["x.img"]}"#;
    let mut h = tar::Header::new_gnu();
    h.set_size(header.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "tern-bundle.json", &header[..]).unwrap();
    let mut bytes = b.into_inner().unwrap();
    bytes.truncate(bytes.len() - 1024);
    let mut ext = tar::Header::new_gnu();
    ext.set_entry_type(tar::EntryType::new(kind));
    ext.set_size(GIB);
    ext.set_mode(0o644);
    ext.set_mtime(0);
    ext.set_path("././@LongLink").unwrap();
    ext.set_cksum();
    bytes.extend_from_slice(ext.as_bytes());
    let mut f = fs::File::create(&path).unwrap();
    f.write_all(&bytes).unwrap();
    let end = bytes.len() as u64 + GIB;
    f.set_len(end).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(end)).unwrap();
    let mut tail = tar::Header::new_gnu();
    tail.set_size(0);
    tail.set_mode(0o644);
    tail.set_mtime(0);
    tail.set_entry_type(tar::EntryType::Regular);
    tail.set_path("payloads/x.img").unwrap();
    tail.set_cksum();
    f.write_all(tail.as_bytes()).unwrap();
    f.write_all(&[0u8; 1024]).unwrap();
    path
}

/// A process's peak resident memory so far (`VmHWM`), in bytes.
fn peak_of(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
fn hostile_extension_headers_declaring_1_gib_stay_under_32_mib() {
    let f = fleet::Fleet::new(None);
    let root = f.path("repo/metadata/1.root.json");
    let dev = f.path("device");
    tern(&["device", "simulate", "--dir", s(&dev), "--root", s(&root)]);
    let cfg = dev.join("agent.toml");
    let server = f.server.pid();
    let mut server_before = peak_of(server);
    for (kind, what) in [
        (b'L', "GNU long name"),
        (b'K', "GNU long link name"),
        (b'x', "PAX header"),
        (b'g', "PAX global header"),
    ] {
        let bundle = hostile(f.dir.path(), kind);
        assert!(fs::metadata(&bundle).unwrap().len() > GIB);
        for args in [
            vec!["bundle", "verify", s(&bundle), "--root", s(&root)],
            vec!["bundle", "inspect", s(&bundle)],
            vec!["install", s(&bundle), "--config", s(&cfg)],
            vec!["release", "upload", s(&bundle)],
        ] {
            let err = dir_err(f.dir.path(), args[0]);
            let (code, peak) = run_measured(
                Command::new(env!("CARGO_BIN_EXE_tern"))
                    .args(&args)
                    .env("TERN_SERVER", &f.server.url)
                    .env("TERN_TOKEN", &f.admin)
                    .stdout(std::process::Stdio::null())
                    .stderr(fs::File::create(&err).unwrap()),
            );
            let stderr = fs::read_to_string(&err).unwrap();
            eprintln!(
                "tern {} on a `{}` header of 1 GiB: peak RSS {:.1} MiB",
                args[0],
                kind as char,
                mib(peak)
            );
            assert_eq!(code, 1, "tern {args:?} should refuse: {stderr}");
            assert!(
                stderr.contains(what) && stderr.contains("declares 1073741824 bytes"),
                "{stderr}"
            );
            assert!(stderr.len() < 2048, "a {}-byte error", stderr.len());
            assert!(
                peak > 0 && peak < LIMIT,
                "tern {args:?}: peak RSS {peak} bytes is not under {LIMIT}"
            );
        }
        let server_after = peak_of(server);
        eprintln!(
            "server peak RSS after uploading the `{}` bundle: {:.1} MiB (was {:.1} MiB)",
            kind as char,
            mib(server_after),
            mib(server_before)
        );
        assert!(
            server_after < LIMIT,
            "the server's peak RSS reached {server_after} bytes (from {server_before})"
        );
        server_before = server_after;
        let _ = fs::remove_file(&bundle);
    }
    // Nothing was published, and the audit log holds short rows.
    let releases = f.api("GET", "/api/v1/releases", Some(&f.admin), None);
    assert_eq!(releases.body.as_array().unwrap().len(), 0);
    for e in f.audit() {
        assert!(e["detail"].as_str().unwrap().len() < 2048);
    }
}

fn dir_err(dir: &Path, tag: &str) -> std::path::PathBuf {
    dir.join(format!("stderr-{tag}.txt"))
}
