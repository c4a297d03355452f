//! Item 2 (the memory side is in verify_memory.rs) and item 7's archive entries: untrusted
//! archives are bounded before allocation, the number of metadata entries is capped, every
//! untrusted name is shortened and escaped wherever it is shown, and an archive's entry for
//! its own directory changes nothing.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::device::{ok, s, tern, Device, Releases};
use crate::fleet::Fleet;

fn gnu_header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_entry_type(kind);
    h
}

/// The entries of `bundle` before its first payload, as (name, bytes).
fn front(bundle: &Path) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(fs::File::open(bundle).unwrap());
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        if name.starts_with("payloads/") {
            break;
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((name, data));
    }
    out
}

/// A bundle with `bundle`'s metadata, then `extra` entries.
fn rebuilt(bundle: &Path, out: &Path, extra: &[(String, Vec<u8>)]) -> PathBuf {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    for (name, data) in front(bundle).iter().chain(extra) {
        b.append_data(
            &mut gnu_header(data.len() as u64, 0o644, tar::EntryType::Regular),
            name,
            &data[..],
        )
        .unwrap();
    }
    b.finish().unwrap();
    out.to_owned()
}

const EVIL: &str = "\u{1b}]2;owned\u{7}\u{1b}[2J\u{202e}";

#[track_caller]
fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\u{202e}'),
        "{what} carries raw control characters: {text:?}"
    );
    assert!(text.len() < 8192, "{what} is {} bytes", text.len());
}

#[test]
fn entry_names_are_shortened_and_escaped_in_errors_terminals_http_and_audit() {
    let f = Fleet::new(None);
    let b = f.bundle("1.0.0", 16);
    let name = format!("payloads/{EVIL}{}", "x".repeat(3000));
    let hostile = rebuilt(&b, &f.path("hostile.tern"), &[(name, b"payload".to_vec())]);
    let root = s(&f.path("repo/metadata/1.root.json"));
    for args in [
        vec!["bundle", "verify", &s(&hostile), "--root", &root],
        vec!["bundle", "inspect", &s(&hostile)],
    ] {
        let out = tern(&args);
        assert_clean(&format!("{args:?} stdout"), &String::from_utf8_lossy(&out.stdout));
        assert_clean(&format!("{args:?} stderr"), &String::from_utf8_lossy(&out.stderr));
    }
    let out = tern(&["bundle", "verify", &s(&hostile), "--root", &root]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\\u{1b}]2;owned"));
    // The server's answer and its audit log.
    let upload = f.api(
        "POST",
        "/api/v1/releases",
        Some(&f.admin),
        Some(fs::read(&hostile).unwrap()),
    );
    assert_eq!(upload.status, 400, "{}", upload.body);
    assert_clean("the upload's answer", &String::from_utf8_lossy(&upload.bytes));
    for e in f.audit() {
        for field in ["actor", "action", "subject", "detail"] {
            assert_clean("an audit entry", e[field].as_str().unwrap_or(""));
        }
    }
    // The device.
    let dev = f.path("plain-device");
    ok(&["device", "simulate", "--dir", &s(&dev), "--root", &root]);
    let out = tern(&["install", &s(&hostile), "--config", &s(&dev.join("agent.toml"))]);
    assert_eq!(out.status.code(), Some(1));
    assert_clean("tern install", &String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_bundle_of_thousands_of_metadata_entries_is_refused() {
    let rel = Releases::new();
    let (b, _) = rel.bundle("1.0.0", "tern-sim", &[], 1000, false);
    let many: Vec<(String, Vec<u8>)> = (2..6000)
        .map(|v| (format!("metadata/{v}.root.json"), b"{}".to_vec()))
        .collect();
    let hostile = rebuilt(&b, &rel.dir.path().join("many.tern"), &many);
    let out = tern(&["bundle", "verify", &s(&hostile), "--root", &rel.root()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than 4096 metadata entries"), "{err}");
    let out = tern(&["bundle", "inspect", &s(&hostile)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than 4096 metadata entries"));
}

#[test]
fn an_archive_entry_for_its_own_directory_changes_nothing_and_modes_are_tightened() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    // `tar -C dir -cf app.tar .` writes `./` first; this one asks for 0700 on it, and for a
    // setuid, world-writable program.
    let mut b = tar::Builder::new(Vec::new());
    for (name, mode, kind, data) in [
        ("./", 0o700, tar::EntryType::Directory, &b""[..]),
        ("./bin/", 0o777, tar::EntryType::Directory, b""),
        ("./bin/app", 0o4777, tar::EntryType::Regular, b"#!/bin/sh\necho hi\n"),
        ("./README", 0o600, tar::EntryType::Regular, b"read me\n"),
    ] {
        b.append_data(&mut gnu_header(data.len() as u64, mode, kind), name, data)
            .unwrap();
    }
    fs::write(rel.p("app.tar"), b.into_inner().unwrap()).unwrap();
    let dest = dev.path("apps/app");
    let bundle = rel.archive_bundle(&rel.p("app.tar"), "apps/app.tar", &dest);
    dev.install(Path::new(&bundle));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&dest), 0o755, "the `./` entry set the app directory's mode");
    assert_eq!(mode(&dest.join("bin")), 0o755);
    assert_eq!(mode(&dest.join("bin/app")), 0o755, "setuid and world write are dropped");
    assert_eq!(mode(&dest.join("README")), 0o600);
    assert_eq!(fs::read(dest.join("bin/app")).unwrap(), b"#!/bin/sh\necho hi\n");
}

/// 32 bytes that do not compress.
fn hex_digest(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

#[test]
fn a_substituted_payload_that_decompresses_without_end_stops_at_its_signed_length() {
    let rel = Releases::new();
    let dev = Device::new(&rel.root());
    // A 64 KiB file that does not compress, installed zstd-compressed.
    let plain: Vec<u8> = (0..2048u32).flat_map(|i| hex_digest(&i.to_le_bytes())).collect();
    fs::write(rel.p("motd"), &plain).unwrap();
    let dest = dev.path("apps/motd");
    ok(&[
        "repo",
        "add-target",
        "--repo",
        &rel.p("repo"),
        &rel.p("motd"),
        "--name",
        "etc/motd",
        "--release-version",
        "1.0.0",
        "--device-type",
        "tern-sim",
        "--installer",
        "file",
        "--install-path",
        &s(&dest),
        "--compression",
        "zstd",
        "--key",
        &rel.key(),
    ]);
    ok(&["repo", "refresh", "--repo", &rel.p("repo"), "--key", &rel.key()]);
    let bundle = rel.dir.path().join("motd.tern");
    ok(&[
        "bundle",
        "create",
        "--repo",
        &rel.p("repo"),
        "--target",
        "etc/motd",
        "--out",
        &s(&bundle),
    ]);
    // On the way (a stick passed around), the payload is swapped for one of the same
    // length that decompresses to 256 MiB; its hash is known to differ only at its end.
    let mut b = fs::read(&bundle).unwrap();
    let at = b.windows(16).position(|w| w == b"payloads/etc/mot").unwrap() + 512;
    let len = {
        let h = tar::Header::from_byte_slice(&b[at - 512..at]);
        h.size().unwrap() as usize
    };
    let mut bomb = zstd::stream::encode_all(std::io::repeat(0).take(256 << 20), 19).unwrap();
    assert!(bomb.len() + 8 <= len, "{} {}", bomb.len(), len);
    // A skippable frame fills it up to the signed length.
    let pad = len - bomb.len() - 8;
    bomb.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    bomb.extend_from_slice(&(pad as u32).to_le_bytes());
    bomb.resize(len, 0);
    b[at..at + len].copy_from_slice(&bomb);
    fs::write(&bundle, &b).unwrap();
    let out = tern(&["install", &s(&bundle), "--config", &dev.config()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("decompresses to more than 65536 bytes"), "{err}");
    // Nothing was left, and nothing grew past the signed length on the way.
    let left: Vec<_> = fs::read_dir(dev.path("apps")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    let st = dev.status();
    assert_eq!(st["apps"].as_array().unwrap().len(), 0);
}
