//! Tells which seeds the real parsers accept: run from `fuzz/` with
//! `cargo run --example check_seeds`. A seed that stopped being accepted after a format
//! change (say, an order or check-in field) no longer leads the fuzzer past the parser's
//! front door: regenerate it (`make_seeds`, README.md).

use std::io::{Cursor, Read};
use std::path::Path;

use tern_core::{Envelope, Freshness};

fn verdict(target: &str, name: &str, bytes: &[u8]) -> Result<String, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    match target {
        "bundle_reader" => {
            let r = tern_bundle::verify_bundle(bytes, tern_fuzz::TRUSTED_ROOT, tern_fuzz::now(), Freshness::IfPresent)
                .map_err(|x| e(&x))?;
            tern_bundle::inspect(Cursor::new(bytes)).map_err(|x| e(&x))?;
            Ok(format!("{} payload(s)", r.payloads.len()))
        }
        "metadata" => {
            let env = Envelope::parse(name, bytes).map_err(|x| e(&x))?;
            let t = env.role_type().unwrap_or("?").to_owned();
            let typed = match t.as_str() {
                "root" => tern_core::Signed::<tern_core::Root>::from_envelope(name, env).map(|_| ()),
                "targets" => tern_core::Signed::<tern_core::Targets>::from_envelope(name, env).map(|_| ()),
                "snapshot" => tern_core::Signed::<tern_core::Snapshot>::from_envelope(name, env).map(|_| ()),
                "timestamp" => tern_core::Signed::<tern_core::Timestamp>::from_envelope(name, env).map(|_| ()),
                _ => Ok(()),
            };
            typed.map_err(|x| e(&x))?;
            Ok(t)
        }
        "director_order" => {
            let root = tern_fuzz::director_root();
            let o = tern_core::director::verify_order(
                bytes,
                root,
                tern_fuzz::DEVICE_ID,
                tern_fuzz::NONCE,
                tern_fuzz::now(),
            )
            .map_err(|x| e(&x))?;
            Ok(format!("{} target(s)", o.targets.len()))
        }
        "checkin" => {
            let (env, c) = tern_core::director::parse_checkin(bytes).map_err(|x| e(&x))?;
            tern_core::director::verify_checkin(&env, tern_fuzz::device_key()).map_err(|x| e(&x))?;
            Ok(c.phase)
        }
        "enrollment" => {
            let (d, _) = tern_core::enrollment::parse_enrollment(bytes).map_err(|x| e(&x))?;
            Ok(d.device_id)
        }
        "recipients" => {
            let d = tern_core::keywrap::Recipients::parse(bytes).map_err(|x| e(&x))?;
            let secret = tern_core::keywrap::RecipientSecret::from_bytes(&tern_fuzz::RECIPIENT_SECRET).unwrap();
            let opened = tern_core::keywrap::unwrap_any(&d.recipients, &[secret], &d.key_commitment);
            Ok(format!(
                "{} recipient(s), fixed secret: {:?}",
                d.recipients.len(),
                opened.map(|k| k.is_some())
            ))
        }
        "aead_stream" => {
            let mut d = tern_core::stream_aead::Decryptor::new(bytes, &tern_fuzz::AEAD_KEY).map_err(|x| e(&x))?;
            let mut out = Vec::new();
            d.read_to_end(&mut out).map_err(|x| e(&x))?;
            Ok(format!("{} plaintext bytes", out.len()))
        }
        "agent_config" => {
            let text = std::str::from_utf8(bytes).map_err(|x| e(&x))?;
            let c =
                tern_agent::config::AgentConfig::parse(Path::new("/etc/tern/agent.toml"), text).map_err(|x| e(&x))?;
            Ok(format!("{} slot(s)", c.slots.len()))
        }
        "tar_archive" => {
            let mut a = tern_tar::Archive::new(bytes);
            let mut n = 0;
            while let Some(_entry) = a.next_entry().map_err(|x| e(&x))? {
                std::io::copy(&mut a.data(), &mut std::io::sink()).map_err(|x| e(&x))?;
                n += 1;
            }
            Ok(format!("{n} entries"))
        }
        "http_range" => {
            let len = u64::from_be_bytes(bytes.get(..8).ok_or("short")?.try_into().unwrap());
            let h = std::str::from_utf8(&bytes[8..]).map_err(|x| e(&x))?;
            tern_core::range::parse_range(h, len)
                .map(|r| format!("{r:?}"))
                .ok_or_else(|| "no range".into())
        }
        "version_floors" => {
            let f = tern_core::floors::VersionFloors::parse(bytes).map_err(|x| e(&x))?;
            Ok(format!("{} role(s)", f.roles.len()))
        }
        other => Err(format!("unknown target {other}")),
    }
}

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let mut dirs: Vec<_> = std::fs::read_dir(&seeds).unwrap().map(|d| d.unwrap().path()).collect();
    dirs.sort();
    for dir in dirs {
        let target = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|d| d.unwrap().path()).collect();
        files.sort();
        let mut ok = 0;
        for f in &files {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(f).unwrap();
            match verdict(&target, &name, &bytes) {
                Ok(v) => {
                    ok += 1;
                    println!("{target:15} {name:50} ok    {v}");
                }
                Err(r) => println!(
                    "{target:15} {name:50} error {}",
                    r.chars().take(100).collect::<String>()
                ),
            }
        }
        println!("{target:15} {ok} of {} accepted", files.len());
    }
}
