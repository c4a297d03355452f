//! `tern bundle verify` of a 1 GiB payload peaks under 32 MiB of resident memory.
//!
//! The peak is the kernel's own account of the verifying process (wait4's rusage), so the
//! figure cannot be flattered by sampling.

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
