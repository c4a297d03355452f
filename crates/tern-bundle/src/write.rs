//! Writing bundles.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use tern_core::TargetPath;
use tern_fs::AtomicFile;

use crate::format::{classify, BundleHeader, EntryKind, FORMAT, FORMAT_VERSION, HEADER};
use crate::{Error, Result};

/// One payload: the target path it is listed under and the file holding its bytes.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The target path.
    pub target: TargetPath,
    /// Where the bytes are.
    pub source: PathBuf,
}

/// Everything a bundle carries; the caller (the repository tool) has verified it.
#[derive(Debug, Clone, Default)]
pub struct ReleaseContents {
    /// `(version, bytes)` of every root, oldest first.
    pub roots: Vec<(u64, Vec<u8>)>,
    /// Timestamp metadata, if freshness is included.
    pub timestamp: Option<Vec<u8>>,
    /// Snapshot metadata, if freshness is included.
    pub snapshot: Option<Vec<u8>>,
    /// Top-level targets metadata.
    pub targets: Vec<u8>,
    /// `(role, bytes)` of the delegated roles the payloads need.
    pub delegated: Vec<(String, Vec<u8>)>,
    /// The payloads.
    pub payloads: Vec<Payload>,
    /// `(sha256, recipients document)` of each encrypted payload: the wrapped data keys,
    /// not signed (`tern_core::keywrap`).
    pub recipients: Vec<(String, Vec<u8>)>,
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// Write `contents` to `out` atomically: either the whole bundle appears, or nothing does.
pub fn write_bundle(contents: &ReleaseContents, out: &Path) -> Result<u64> {
    write_tar(out, |builder, io| {
        let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
            builder
                .append_data(&mut header(bytes.len() as u64), name, bytes)
                .map_err(io)
        };
        let head = BundleHeader {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            payloads: contents.payloads.iter().map(|p| p.target.to_string()).collect(),
        };
        let head = serde_json::to_vec_pretty(&head).unwrap_or_default();
        add(HEADER, &head)?;
        for (version, bytes) in &contents.roots {
            add(&format!("metadata/{version}.root.json"), bytes)?;
        }
        if let Some(ts) = &contents.timestamp {
            add("metadata/timestamp.json", ts)?;
        }
        if let Some(snap) = &contents.snapshot {
            add("metadata/snapshot.json", snap)?;
        }
        add("metadata/targets.json", &contents.targets)?;
        for (role, bytes) in &contents.delegated {
            add(&format!("metadata/{role}.json"), bytes)?;
        }
        for (sha256, bytes) in &contents.recipients {
            add(&format!("recipients/{sha256}.json"), bytes)?;
        }
        for p in &contents.payloads {
            let f = File::open(&p.source).map_err(|source| Error::Io {
                path: p.source.clone(),
                source,
            })?;
            let len = f
                .metadata()
                .map_err(|source| Error::Io {
                    path: p.source.clone(),
                    source,
                })?
                .len();
            builder
                .append_data(&mut header(len), format!("payloads/{}", p.target), f.take(len))
                .map_err(io)?;
        }
        Ok(())
    })
}

type Builder<'a> = tar::Builder<BufWriter<&'a mut File>>;

/// Write a tar to `out` atomically through `fill`; returns its size.
fn write_tar(
    out: &Path,
    fill: impl FnOnce(&mut Builder<'_>, &dyn Fn(std::io::Error) -> Error) -> Result<()>,
) -> Result<u64> {
    let mut atomic = AtomicFile::create(out, 0o644)?;
    let tmp = atomic.temp_path().to_owned();
    let io = |source: std::io::Error| Error::Io {
        path: tmp.clone(),
        source,
    };
    {
        let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, atomic.file()));
        fill(&mut builder, &io)?;
        let mut w = builder.into_inner().map_err(io)?;
        w.flush().map_err(io)?;
    }
    let size = atomic.file().metadata().map_err(io)?.len();
    atomic.commit()?;
    Ok(size)
}

/// Rewrite the bundle `input` as `out` (atomically) with `docs` (payload SHA-256 →
/// recipients document) in place of the recipients entries it carries: every other entry
/// is copied as it is, so nothing signed changes and no payload is re-encrypted
/// (`tern bundle add-recipients`).
pub fn replace_recipients(input: &Path, out: &Path, docs: &BTreeMap<String, Vec<u8>>) -> Result<u64> {
    let f = File::open(input).map_err(|source| Error::Io {
        path: input.to_owned(),
        source,
    })?;
    let mut archive = tern_tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    write_tar(out, |builder, io| {
        let mut docs_written = false;
        while let Some(entry) = archive.next_entry()? {
            let name = entry.name()?.to_owned();
            let kind = classify(&name)?;
            if entry.kind != tern_tar::Kind::File {
                return Err(Error::Format {
                    entry: tern_core::text::shown(&name),
                    reason: format!("only regular files are allowed, not a {}", entry.kind),
                });
            }
            if matches!(&kind, EntryKind::Recipients(h) if docs.contains_key(h)) {
                continue;
            }
            if matches!(kind, EntryKind::Payload(_)) && !docs_written {
                for (sha256, bytes) in docs {
                    builder
                        .append_data(
                            &mut header(bytes.len() as u64),
                            format!("recipients/{sha256}.json"),
                            &bytes[..],
                        )
                        .map_err(io)?;
                }
                docs_written = true;
            }
            let size = entry.size;
            builder
                .append_data(&mut header(size), &name, archive.data())
                .map_err(io)?;
        }
        if !docs_written {
            return Err(Error::Format {
                entry: input.display().to_string(),
                reason: "the bundle has no payload".into(),
            });
        }
        Ok(())
    })
}
