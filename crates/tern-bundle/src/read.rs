//! Reading bundles: inspection (no trust) and verification (streaming, bounded memory).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

use serde::Serialize;
use tern_core::digest::MultiHasher;
use tern_core::keywrap::Recipients;
use tern_core::manifest::Manifest;
use tern_core::metadata::{Envelope, Root, Signed, Targets};
use tern_core::trust::{self, Freshness, MetadataSource, TrustedRepository};
use tern_core::{DateTime, TargetPath};

use tern_core::text::shown;

use crate::format::{
    classify, BundleHeader, EntryKind, FORMAT, FORMAT_VERSION, MAX_METADATA_ENTRIES, MAX_METADATA_ENTRY,
    MAX_METADATA_TOTAL, MAX_PAYLOADS,
};
use crate::{Error, Result};

/// Size of the buffer payloads are streamed through.
const CHUNK: usize = 1 << 20;

/// A payload whose metadata verified; its bytes are checked as they stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifiedPayload {
    /// Target path.
    pub target: String,
    /// Length in bytes, as signed.
    pub length: u64,
    /// Digests, as signed.
    pub hashes: BTreeMap<String, String>,
    /// The role that listed it.
    pub role: String,
    /// Tern's manifest, if the target carries one.
    pub manifest: Option<Manifest>,
    /// For an encrypted payload, the wrapped data keys that came with it (unsigned: a key is
    /// accepted only if it matches the manifest's signed commitment).
    #[serde(skip)]
    pub recipients: Option<std::sync::Arc<Recipients>>,
    /// The newest root the bundle's chain verified: a device persists it as its trust anchor
    /// as soon as it is verified (spec §5.3.8), whatever then happens to the payload.
    #[serde(skip)]
    pub root: std::sync::Arc<Vec<u8>>,
    /// The version of every role verified up to this payload (`tern_core::floors`): a
    /// device refuses metadata older than what it saw before, from any source.
    #[serde(skip)]
    pub roles: std::sync::Arc<Vec<tern_core::floors::RoleVersion>>,
}

/// What verification established.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    /// The newest root version trusted after the chain.
    pub root_version: u64,
    /// That root's bytes: a device persists them as its new trust anchor (spec §5.3.8), so
    /// that a root rotation revoking old keys takes effect for it.
    #[serde(skip)]
    pub root: Vec<u8>,
    /// Timestamp version, when the bundle carries freshness.
    pub timestamp_version: Option<u64>,
    /// Snapshot version, when the bundle carries freshness.
    pub snapshot_version: Option<u64>,
    /// Top-level targets version.
    pub targets_version: u64,
    /// Delegated roles verified, with their versions.
    pub delegated: Vec<(String, u64)>,
    /// Every payload, verified.
    pub payloads: Vec<VerifiedPayload>,
}

struct BundleSource<'a> {
    roles: &'a BTreeMap<String, Vec<u8>>,
}

impl MetadataSource for BundleSource<'_> {
    fn fetch(&mut self, role: &str, _version: Option<u64>) -> Option<Vec<u8>> {
        // Roots were walked already; a bundle carries one version of every other role,
        // and the verifier checks that version against what refers to it.
        if role == "root" {
            return None;
        }
        self.roles.get(role).cloned()
    }
}

fn read_small(entry: &mut impl Read, name: &str, kind: &EntryKind, size: u64) -> Result<Vec<u8>> {
    let limit = match kind {
        EntryKind::Header => crate::format::MAX_HEADER,
        EntryKind::Root(_) => tern_core::metadata::limits::ROOT,
        EntryKind::Role(r) => tern_core::metadata::limits::for_role(r),
        EntryKind::Payload(_) | EntryKind::Recipients(_) => MAX_METADATA_ENTRY,
    };
    if size > limit {
        return Err(Error::Format {
            entry: shown(name),
            reason: format!("{size} bytes exceeds the {limit}-byte limit for this metadata"),
        });
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry
        .take(MAX_METADATA_ENTRY)
        .read_to_end(&mut buf)
        .map_err(|e| io_error(name, e))?;
    if buf.len() as u64 != size {
        return Err(Error::Truncated { entry: shown(name) });
    }
    Ok(buf)
}

fn io_error(entry: &str, e: io::Error) -> Error {
    // The tar crate reports some short reads as `Other` with a message; they are truncation too.
    let msg = e.to_string();
    if e.kind() == io::ErrorKind::UnexpectedEof || msg.contains("unexpected EOF") || msg.contains("entire block") {
        Error::Truncated { entry: shown(entry) }
    } else {
        Error::Format {
            entry: shown(entry),
            reason: e.to_string(),
        }
    }
}

/// The entry's name, which must be UTF-8, of a regular file.
fn entry_name(entry: &tern_tar::Entry) -> Result<String> {
    let name = entry.name().map_err(|_| Error::Format {
        entry: entry.shown_name(),
        reason: "name is not UTF-8".into(),
    })?;
    if entry.kind != tern_tar::Kind::File {
        return Err(Error::Format {
            entry: shown(name),
            reason: format!("only regular files are allowed, not a {}", entry.kind),
        });
    }
    Ok(name.to_owned())
}

fn parse_header(bytes: &[u8]) -> Result<BundleHeader> {
    let bad = |reason: String| Error::Format {
        entry: crate::format::HEADER.into(),
        reason,
    };
    let h: BundleHeader = serde_json::from_slice(bytes).map_err(|e| bad(shown(&e.to_string())))?;
    if h.format != FORMAT || h.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format `{}` version {} is not `{FORMAT}` version {FORMAT_VERSION}",
            shown(&h.format),
            h.format_version
        )));
    }
    if h.payloads.is_empty() || h.payloads.len() > MAX_PAYLOADS {
        return Err(bad(format!("must list 1 to {MAX_PAYLOADS} payloads")));
    }
    let mut seen = BTreeSet::new();
    for p in &h.payloads {
        TargetPath::new(p).map_err(|e| Error::Payload {
            target: shown(p),
            source: Box::new(e),
        })?;
        if !seen.insert(p) {
            return Err(bad(format!("payload `{}` listed twice", shown(p))));
        }
    }
    Ok(h)
}

/// Metadata gathered from the front of the bundle.
#[derive(Default)]
struct Front {
    header: Option<BundleHeader>,
    roots: BTreeMap<u64, Vec<u8>>,
    roles: BTreeMap<String, Vec<u8>>,
    recipients: BTreeMap<String, Vec<u8>>,
    total: u64,
    entries: usize,
}

impl Front {
    fn add(&mut self, name: &str, kind: EntryKind, bytes: Vec<u8>) -> Result<()> {
        self.entries += 1;
        if self.entries > MAX_METADATA_ENTRIES {
            return Err(Error::Format {
                entry: shown(name),
                reason: format!("more than {MAX_METADATA_ENTRIES} metadata entries"),
            });
        }
        self.total += bytes.len() as u64;
        if self.total > MAX_METADATA_TOTAL {
            return Err(Error::Format {
                entry: shown(name),
                reason: format!("metadata exceeds {MAX_METADATA_TOTAL} bytes in all"),
            });
        }
        let dup = match kind {
            EntryKind::Header => {
                if self.header.is_some() || !self.roots.is_empty() || !self.roles.is_empty() {
                    return Err(Error::Format {
                        entry: shown(name),
                        reason: "the header must be the first entry, once".into(),
                    });
                }
                self.header = Some(parse_header(&bytes)?);
                false
            }
            _ if self.header.is_none() => {
                return Err(Error::Format {
                    entry: shown(name),
                    reason: "the first entry must be tern-bundle.json".into(),
                })
            }
            EntryKind::Root(v) => self.roots.insert(v, bytes).is_some(),
            EntryKind::Role(r) => self.roles.insert(r, bytes).is_some(),
            EntryKind::Recipients(h) => self.recipients.insert(h, bytes).is_some(),
            EntryKind::Payload(_) => false,
        };
        if dup {
            return Err(Error::Format {
                entry: shown(name),
                reason: "appears twice".into(),
            });
        }
        Ok(())
    }
}

/// Walk the bundle's root chain from the trusted root; returns the bytes of the newest root.
fn walk_roots(trusted_root: &[u8], roots: &BTreeMap<u64, Vec<u8>>) -> Result<Vec<u8>> {
    let mut trusted: Signed<Root> = trust::load_trusted_root(trusted_root)?;
    let mut trusted_bytes = trusted_root.to_vec();
    // The bundle's copy of the trusted version must be the same document: otherwise the
    // bundle belongs to another repository.
    if let Some(same) = roots.get(&trusted.version()) {
        let theirs = Envelope::parse("root", same).map_err(|e| Error::RootChain {
            version: trusted.version(),
            source: Box::new(e),
        })?;
        if theirs.signed != trusted.envelope.signed {
            return Err(Error::RootChain {
                version: trusted.version(),
                source: Box::new(tern_core::Error::Field {
                    role: "root".into(),
                    field: "signed".into(),
                    reason: format!("differs from the trusted root version {}", trusted.version()),
                }),
            });
        }
    }
    let newest = roots.keys().next_back().copied().unwrap_or(0);
    while trusted.version() < newest {
        let v = trusted.version() + 1;
        let bytes = roots.get(&v).ok_or_else(|| Error::RootChain {
            version: v,
            source: Box::new(tern_core::Error::MissingRole {
                role: format!("{v}.root"),
            }),
        })?;
        trusted = trust::update_root(&trusted, bytes).map_err(|e| Error::RootChain {
            version: v,
            source: Box::new(e),
        })?;
        trusted_bytes = bytes.clone();
    }
    Ok(trusted_bytes)
}

struct Verified {
    root: std::sync::Arc<Vec<u8>>,
    header: BundleHeader,
    repo: TrustedRepository,
    roles: BTreeMap<String, Vec<u8>>,
    recipients: BTreeMap<String, Vec<u8>>,
}

fn establish_trust(front: Front, trusted_root: &[u8], now: DateTime, freshness: Freshness) -> Result<Verified> {
    let header = front.header.ok_or_else(|| Error::Truncated {
        entry: crate::format::HEADER.into(),
    })?;
    let root = walk_roots(trusted_root, &front.roots)?;
    let mut source = BundleSource { roles: &front.roles };
    let repo = TrustedRepository::load(&root, &mut source, now, freshness)?;
    Ok(Verified {
        root: std::sync::Arc::new(root),
        header,
        repo,
        roles: front.roles,
        recipients: front.recipients,
    })
}

/// Parse the recipients document of the encrypted payload with `sha256`: it must name that
/// payload and the key its signed manifest commits to.
pub fn parse_recipients(sha256: &str, bytes: &[u8], m: &Manifest) -> Result<Recipients> {
    let entry = format!("recipients/{}.json", shown(sha256));
    let bad = |reason: String| Error::Format {
        entry: entry.clone(),
        reason,
    };
    let doc = Recipients::parse(bytes).map_err(|e| bad(e.to_string()))?;
    if doc.sha256 != sha256 {
        return Err(bad(format!("names payload {} instead", doc.sha256)));
    }
    let signed = m.encryption.as_ref().map(|e| e.key_commitment.as_str()).unwrap_or("");
    if doc.key_commitment != signed {
        return Err(bad(
            "its key commitment is not the one the signed manifest carries".into()
        ));
    }
    Ok(doc)
}

/// Verify a bundle front to back and hand every payload's bytes to `sink` as they stream.
///
/// The sink sees each payload only after its metadata verified, and reads it through a
/// reader that hashes as it goes; whatever the sink leaves unread is read and hashed after
/// it returns. A payload's hash is known only at its end: a caller that writes payloads
/// somewhere must treat them as unverified until this function returns `Ok`.
pub fn read_bundle<R: Read>(
    reader: R,
    trusted_root: &[u8],
    now: DateTime,
    freshness: Freshness,
    sink: &mut dyn FnMut(&VerifiedPayload, &mut dyn Read) -> std::result::Result<(), String>,
) -> Result<VerifyReport> {
    let mut archive = tern_tar::Archive::new(reader);
    let mut front = Front::default();
    let mut verified: Option<Verified> = None;
    let mut payloads = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    while let Some(entry) = archive.next_entry()? {
        let name = entry_name(&entry)?;
        let kind = classify(&name)?;
        let size = entry.size;
        let target = match kind {
            EntryKind::Payload(target) => target,
            other => {
                if verified.is_some() {
                    return Err(Error::Format {
                        entry: shown(&name),
                        reason: "metadata after the first payload".into(),
                    });
                }
                let bytes = read_small(&mut archive.data(), &name, &other, size)?;
                front.add(&name, other, bytes)?;
                continue;
            }
        };
        if verified.is_none() {
            verified = Some(establish_trust(
                std::mem::take(&mut front),
                trusted_root,
                now,
                freshness,
            )?);
        }
        let v = verified.as_mut().expect("set above");
        let expected = v.header.payloads.get(payloads.len()).ok_or_else(|| Error::Format {
            entry: shown(&name),
            reason: "not listed in tern-bundle.json".into(),
        })?;
        if *expected != target {
            return Err(Error::Format {
                entry: shown(&name),
                reason: format!("expected payload `{}` here", shown(expected)),
            });
        }
        let payload_err = |e: tern_core::Error| Error::Payload {
            target: target.clone(),
            source: Box::new(e),
        };
        let mut source = BundleSource { roles: &v.roles };
        let found = v.repo.find_target(&mut source, &target).map_err(payload_err)?;
        let manifest = Manifest::from_custom(&target, found.file.custom.as_ref()).map_err(payload_err)?;
        if size != found.file.length {
            return Err(payload_err(tern_core::Error::LengthMismatch {
                what: target.clone(),
                expected: found.file.length,
                found: size,
            }));
        }
        let recipients = match (&manifest, found.file.hashes.get("sha256")) {
            (Some(m), Some(sha256)) if m.encryption.is_some() => match v.recipients.get(sha256) {
                Some(bytes) => Some(std::sync::Arc::new(parse_recipients(sha256, bytes, m)?)),
                None => None,
            },
            _ => None,
        };
        let info = VerifiedPayload {
            target: target.clone(),
            length: found.file.length,
            hashes: found.file.hashes.clone(),
            role: found.role.clone(),
            manifest,
            recipients,
            root: v.root.clone(),
            roles: std::sync::Arc::new(v.repo.role_versions()),
        };
        feed(&info, &name, &mut archive.data(), &mut buf, sink)?;
        payloads.push(info);
    }
    let Some(v) = verified else {
        return Err(Error::Truncated {
            entry: "no payload entries".into(),
        });
    };
    if payloads.len() != v.header.payloads.len() {
        return Err(Error::Truncated {
            entry: format!("payloads/{}", v.header.payloads[payloads.len()]),
        });
    }
    Ok(VerifyReport {
        root_version: v.repo.root().version(),
        root: v.root.to_vec(),
        timestamp_version: v.repo.timestamp().map(|t| t.version()),
        snapshot_version: v.repo.snapshot().map(|s| s.version()),
        targets_version: v.repo.targets().version(),
        delegated: v
            .repo
            .verified_roles()
            .skip(1)
            .map(|(n, s)| (n.to_owned(), s.version()))
            .collect(),
        payloads,
    })
}

/// Hand `input` to `sink` as the bytes of `info`, hashing them as they go, then check their
/// length and every signed hash; `entry` names them in errors.
fn feed(
    info: &VerifiedPayload,
    entry: &str,
    input: &mut dyn Read,
    buf: &mut [u8],
    sink: &mut dyn FnMut(&VerifiedPayload, &mut dyn Read) -> std::result::Result<(), String>,
) -> Result<()> {
    let payload_err = |e: tern_core::Error| Error::Payload {
        target: info.target.clone(),
        source: Box::new(e),
    };
    let mut hashing = HashingReader {
        inner: input,
        hasher: MultiHasher::new(&info.target, &info.hashes).map_err(payload_err)?,
        error: None,
    };
    sink(info, &mut hashing).map_err(|reason| match hashing.error.take() {
        Some(e) => io_error(entry, e),
        None => Error::Sink {
            target: info.target.clone(),
            reason,
        },
    })?;
    loop {
        let n = hashing.read(buf).map_err(|e| io_error(entry, e))?;
        if n == 0 {
            break;
        }
    }
    if hashing.hasher.length() != info.length {
        return Err(payload_err(tern_core::Error::LengthMismatch {
            what: info.target.clone(),
            expected: info.length,
            found: hashing.hasher.length(),
        }));
    }
    hashing.hasher.finish().map_err(payload_err)
}

/// Stream a payload that is not in a bundle (a file the TUF client downloaded) to `sink` as
/// [`read_bundle`] streams a bundle's: the bytes are hashed as the sink reads them, and
/// only when this returns `Ok` have they matched the signed length and hashes. A file that
/// changed on disk since it was downloaded is caught here.
pub fn feed_payload(
    info: &VerifiedPayload,
    input: &mut dyn Read,
    sink: &mut dyn FnMut(&VerifiedPayload, &mut dyn Read) -> std::result::Result<(), String>,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    // One byte past the signed length is enough to tell that it is longer.
    let mut bounded = input.take(info.length.saturating_add(1));
    feed(info, &info.target, &mut bounded, &mut buf, sink)
}

/// Verify a whole bundle, discarding payload bytes after hashing them.
pub fn verify_bundle<R: Read>(
    reader: R,
    trusted_root: &[u8],
    now: DateTime,
    freshness: Freshness,
) -> Result<VerifyReport> {
    read_bundle(reader, trusted_root, now, freshness, &mut |_, _| Ok(()))
}

struct HashingReader<'a, R: Read + ?Sized> {
    inner: &'a mut R,
    hasher: MultiHasher,
    error: Option<io::Error>,
}

impl<R: Read + ?Sized> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                let msg = e.to_string();
                self.error = Some(e);
                Err(io::Error::new(kind, msg))
            }
        }
    }
}

/// A payload as listed, without any trust established.
#[derive(Debug, Clone, Serialize)]
pub struct PayloadInfo {
    /// Target path.
    pub target: String,
    /// Size of the entry in the bundle.
    pub size: u64,
    /// What the (unverified) targets metadata lists for it.
    pub listed: Option<tern_core::TargetFile>,
    /// Tern's manifest from that listing.
    pub manifest: Option<Manifest>,
    /// Key ids of the recipients an encrypted payload's wrapped keys name.
    pub recipients: Vec<String>,
}

/// The result of [`inspect`]: what a bundle says it holds. Nothing here is verified.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The header.
    pub header: BundleHeader,
    /// Root versions carried.
    pub root_versions: Vec<u64>,
    /// Other metadata carried: role → (version, expires).
    pub roles: BTreeMap<String, (u64, String)>,
    /// Payloads in entry order.
    pub payloads: Vec<PayloadInfo>,
    /// The recipients documents carried, by payload SHA-256 (unparsed).
    #[serde(skip)]
    pub recipient_docs: BTreeMap<String, Vec<u8>>,
}

/// List a bundle's contents without verifying anything (`tern bundle inspect`).
pub fn inspect<R: Read + io::Seek>(reader: R) -> Result<Inspection> {
    let mut archive = tern_tar::Archive::new(reader);
    let mut front = Front::default();
    let mut sizes = Vec::new();
    while let Some(entry) = archive.next_entry_seek()? {
        let name = entry_name(&entry)?;
        let size = entry.size;
        match classify(&name)? {
            EntryKind::Payload(target) => {
                if sizes.len() >= MAX_PAYLOADS {
                    return Err(Error::Format {
                        entry: shown(&name),
                        reason: format!("more than {MAX_PAYLOADS} payloads"),
                    });
                }
                sizes.push((target, size))
            }
            other => {
                let bytes = read_small(&mut archive.data(), &name, &other, size)?;
                front.add(&name, other, bytes)?;
            }
        }
    }
    let header = front.header.ok_or_else(|| Error::Truncated {
        entry: crate::format::HEADER.into(),
    })?;
    let mut roles = BTreeMap::new();
    let mut listed: BTreeMap<String, tern_core::TargetFile> = BTreeMap::new();
    for (name, bytes) in &front.roles {
        let Ok(env) = Envelope::parse(name, bytes) else {
            continue;
        };
        let version = env.signed.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        let expires = env
            .signed
            .get("expires")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        roles.insert(name.clone(), (version, expires));
        if let Ok(t) = Signed::<Targets>::from_envelope(name, env) {
            listed.extend(t.signed.targets);
        }
    }
    let payloads = sizes
        .into_iter()
        .map(|(target, size)| {
            let l = listed.get(&target).cloned();
            let manifest = l
                .as_ref()
                .and_then(|f| Manifest::from_custom(&target, f.custom.as_ref()).ok().flatten());
            let recipients = l
                .as_ref()
                .and_then(|f| f.hashes.get("sha256"))
                .and_then(|h| front.recipients.get(h))
                .and_then(|b| Recipients::parse(b).ok())
                .map(|d| d.recipients.into_iter().map(|e| e.kid).collect())
                .unwrap_or_default();
            PayloadInfo {
                target,
                size,
                listed: l,
                manifest,
                recipients,
            }
        })
        .collect();
    Ok(Inspection {
        header,
        root_versions: front.roots.keys().copied().collect(),
        roles,
        payloads,
        recipient_docs: front.recipients,
    })
}
