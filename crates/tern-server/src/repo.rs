//! The release repository as published: upload, snapshot and timestamp signing, serving.
//!
//! The database holds every published metadata version and `repo_current` names the ones
//! served. A publication is one transaction whose first statement is a compare-and-swap of
//! the current snapshot (or timestamp) version, so concurrent publishers, in this process
//! or another sharing the database, serialise and none publishes a stale view; a loser
//! retries from a fresh read. Payloads are written to the artifact directory, content
//! addressed, before that transaction: a crash leaves at worst an unreferenced file, never
//! a published release whose files are missing.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use sqlx::Row;
use tern_core::metadata::Common;
use tern_core::trust::Freshness;
use tern_core::{DateTime, Envelope, MetaFile, Root, Signed, SigningKey, Snapshot, Timestamp};

use crate::{random_hex, unix_now, AppState, Error, Result};

/// A target of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReleaseTarget {
    /// Target path.
    pub name: String,
    /// Length in bytes.
    pub length: u64,
    /// Hashes as signed.
    pub hashes: BTreeMap<String, String>,
    /// The manifest's device type (empty: none).
    pub device_type: String,
    /// Hardware revisions (empty: any).
    pub hardware: Vec<String>,
    /// The manifest's version.
    pub version: String,
    /// The manifest's installer (raw, file, archive…; empty: no manifest).
    #[serde(default)]
    pub installer: String,
    /// For an encrypted payload, the key commitment of its signed manifest (the server
    /// holds the ciphertext and wrapped keys only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_commitment: Option<String>,
}

/// A release as stored.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Release {
    /// Its name (the payloads' version unless given).
    pub name: String,
    /// Its targets.
    pub targets: Vec<ReleaseTarget>,
    /// Upload time (Unix seconds).
    pub uploaded_at: i64,
    /// Who uploaded it.
    pub uploaded_by: String,
}

/// Versions of roles as published.
#[derive(Debug, Clone, Default)]
struct Current {
    roles: BTreeMap<String, (i64, i64)>,
}

impl Current {
    fn version(&self, role: &str) -> i64 {
        self.roles.get(role).map_or(0, |r| r.0)
    }
    fn expires(&self, role: &str) -> i64 {
        self.roles.get(role).map_or(0, |r| r.1)
    }
}

async fn current(state: &AppState) -> Result<Current> {
    let rows = sqlx::query("SELECT role, version, expires FROM repo_current")
        .fetch_all(&state.db.pool)
        .await?;
    let mut c = Current::default();
    for r in rows {
        c.roles.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?));
    }
    Ok(c)
}

/// Metadata `role` at `version` (`None`: current).
pub async fn metadata(state: &AppState, role: &str, version: Option<i64>) -> Result<Option<Vec<u8>>> {
    let row = match version {
        Some(v) => {
            sqlx::query("SELECT body FROM repo_metadata WHERE role = $1 AND version = $2")
                .bind(role)
                .bind(v)
                .fetch_optional(&state.db.pool)
                .await?
        }
        None => {
            sqlx::query(
                "SELECT m.body FROM repo_metadata m JOIN repo_current c ON c.role = m.role AND c.version = m.version WHERE m.role = $1",
            )
            .bind(role)
            .fetch_optional(&state.db.pool)
            .await?
        }
    };
    Ok(match row {
        Some(r) => Some(r.try_get::<String, _>(0)?.into_bytes()),
        None => None,
    })
}

/// The root the repository currently trusts.
pub async fn current_root(state: &AppState) -> Result<Option<Vec<u8>>> {
    metadata(state, "root", None).await
}

/// Check that a root lets this server sign snapshot and timestamp with its online keys.
fn check_online_roles(root: &Signed<Root>, state: &AppState) -> Result<()> {
    for (role, key) in [("snapshot", &state.keys.snapshot), ("timestamp", &state.keys.timestamp)] {
        let keys = root
            .signed
            .role(role)
            .ok_or_else(|| Error::Refused(format!("root version {} has no {role} role", root.version())))?;
        let id = key.public().keyid();
        if !keys.keyids.contains(&id) {
            return Err(Error::Refused(format!(
                "root version {}: the {role} role does not list this server's online {role} key {id}",
                root.version()
            )));
        }
        if keys.threshold != 1 {
            return Err(Error::Refused(format!(
                "root version {}: the {role} role needs {} signatures; this server holds one online key",
                root.version(),
                keys.threshold
            )));
        }
    }
    Ok(())
}

/// Install the repository's first trusted root. Refused if one is set (later roots arrive
/// in bundles, chained from it).
pub async fn set_root(state: &AppState, bytes: &[u8], actor: &str) -> Result<u64> {
    let outcome = async {
        let root = tern_core::trust::load_trusted_root(bytes)?;
        check_online_roles(&root, state)?;
        if current_root(state).await?.is_some() {
            return Err(Error::Refused(
                "the repository has a root already; newer roots arrive in bundles, signed by the current one".into(),
            ));
        }
        let now = unix_now();
        let mut tx = state.db.write.begin().await?;
        let v = root.version() as i64;
        sqlx::query("INSERT INTO repo_current (role, version, expires) VALUES ('root', $1, $2)")
            .bind(v)
            .bind(root.expires().unix())
            .execute(&mut *tx)
            .await?;
        insert_metadata(&mut tx, "root", v, bytes, now, &state.instance).await?;
        for role in ["snapshot", "timestamp"] {
            sqlx::query("INSERT INTO repo_current (role, version, expires) VALUES ($1, 0, 0)")
                .bind(role)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(root.version())
    }
    .await;
    state
        .db
        .audit_result(actor, "repository.set-root", "root", &outcome, |v| {
            format!("root version {v}")
        })
        .await;
    outcome
}

async fn insert_metadata(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    role: &str,
    version: i64,
    body: &[u8],
    now: i64,
    by: &str,
) -> Result<()> {
    let text = std::str::from_utf8(body).map_err(|_| Error::Refused(format!("{role} metadata is not UTF-8")))?;
    sqlx::query(
        "INSERT INTO repo_metadata (role, version, body, sha256, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(role)
    .bind(version)
    .bind(text)
    .bind(tern_core::digest::sha256_hex(body))
    .bind(now)
    .bind(by)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What a verified bundle brings.
struct Verified {
    /// The root version the bundle was verified from.
    verified_from_root: u64,
    /// New roots after the current one, in order.
    roots: Vec<(u64, Vec<u8>)>,
    /// Targets roles (top-level and delegated) with their versions and bytes.
    roles: Vec<(String, u64, Vec<u8>)>,
    targets: Vec<ReleaseTarget>,
    /// Verified payload files, not yet in the store.
    blobs: Vec<Blob>,
    /// The wrapped data keys of encrypted payloads.
    recipients: Vec<tern_core::keywrap::Recipients>,
}

/// A verified payload waiting in `tmp/`.
struct Blob {
    tmp: PathBuf,
    sha256: String,
    sha512: Option<String>,
    length: u64,
}

/// Move verified payloads into the content-addressed store (fsynced, before the database
/// names them). Idempotent: a payload already moved by an earlier attempt is skipped.
fn store_blobs(artifacts: &Path, blobs: &[Blob]) -> Result<()> {
    for b in blobs {
        let dest = blob_path(artifacts, "sha256", &b.sha256);
        let parent = dest.parent().unwrap_or(artifacts);
        std::fs::create_dir_all(parent).map_err(|e| Error::Io(parent.display().to_string(), e))?;
        if b.tmp.exists() {
            std::fs::rename(&b.tmp, &dest).map_err(|e| Error::Io(dest.display().to_string(), e))?;
            tern_fs::sync_dir(parent)?;
        }
        if let Some(h) = &b.sha512 {
            let other = blob_path(artifacts, "sha512", h);
            let dir = other.parent().unwrap_or(artifacts);
            std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.display().to_string(), e))?;
            if !other.exists() {
                std::fs::hard_link(&dest, &other).map_err(|e| Error::Io(other.display().to_string(), e))?;
                tern_fs::sync_dir(dir)?;
            }
        }
    }
    Ok(())
}

/// Remove verified payloads a refused upload leaves in `tmp/`.
fn discard_blobs(blobs: &[Blob]) {
    for b in blobs {
        let _ = std::fs::remove_file(&b.tmp);
    }
}

fn blob_path(artifacts: &Path, alg: &str, hex: &str) -> PathBuf {
    artifacts.join("blobs").join(alg).join(hex)
}

/// Verify the bundle against `root`, leaving its payloads in `tmp/` (blocking work). On any
/// error nothing is left behind.
fn verify_bundle(bundle: &Path, root: &[u8], artifacts: &Path, now: DateTime) -> Result<Verified> {
    let tmp_dir = artifacts.join("tmp");
    std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::Io(tmp_dir.display().to_string(), e))?;
    let file = std::fs::File::open(bundle).map_err(|e| Error::Io(bundle.display().to_string(), e))?;
    let mut written: Vec<(tern_bundle::VerifiedPayload, PathBuf)> = Vec::new();
    let mut sink = |p: &tern_bundle::VerifiedPayload, data: &mut dyn Read| -> std::result::Result<(), String> {
        let tmp = tmp_dir.join(random_hex(12));
        let mut out = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        std::io::copy(data, &mut out).map_err(|e| e.to_string())?;
        out.sync_all().map_err(|e| e.to_string())?;
        written.push((p.clone(), tmp));
        Ok(())
    };
    let report = tern_bundle::read_bundle(
        std::io::BufReader::new(file),
        root,
        now,
        Freshness::IfPresent,
        &mut sink,
    );
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            for (_, tmp) in &written {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(bundle_refusal(e));
        }
    };
    // Every payload verified. They stay in tmp/ until the publication's checks pass
    // (`store_blobs`); only hashes Tern knows, with well-formed hex, ever name a file.
    let mut blobs = Vec::new();
    let mut targets = Vec::new();
    let mut recipients = Vec::new();
    for (p, tmp) in written {
        if let Some(r) = &p.recipients {
            recipients.push(r.as_ref().clone());
        }
        let well_formed = |alg: &str, len: usize| {
            p.hashes
                .get(alg)
                .filter(|h| h.len() == len && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(|h| h.to_ascii_lowercase())
        };
        let Some(sha256) = well_formed("sha256", 64) else {
            let _ = std::fs::remove_file(&tmp);
            discard_blobs(&blobs);
            return Err(Error::Invalid(format!("target `{}` lists no sha256 hash", p.target)));
        };
        let sha512 = well_formed("sha512", 128);
        blobs.push(Blob {
            tmp,
            sha256,
            sha512,
            length: p.length,
        });
        let (device_type, hardware, version, installer) = match &p.manifest {
            Some(m) => (
                m.device_type.clone(),
                m.hardware.clone(),
                m.version.to_string(),
                format!("{:?}", m.installer).to_lowercase(),
            ),
            None => (String::new(), Vec::new(), String::new(), String::new()),
        };
        targets.push(ReleaseTarget {
            name: p.target.clone(),
            length: p.length,
            hashes: p.hashes.clone(),
            device_type,
            hardware,
            version,
            installer,
            key_commitment: p
                .manifest
                .as_ref()
                .and_then(|m| m.encryption.as_ref())
                .map(|e| e.key_commitment.clone()),
        });
    }
    match bundle_metadata(bundle, root, &report) {
        Ok((verified_from_root, roots, roles)) => Ok(Verified {
            verified_from_root,
            roots,
            roles,
            targets,
            blobs,
            recipients,
        }),
        Err(e) => {
            discard_blobs(&blobs);
            Err(e)
        }
    }
}

/// A bundle's refusal: what is wrong with the bundle is the uploader's to read; a local
/// file that failed (the upload's own path) is an internal error, kept in the log.
fn bundle_refusal(e: tern_bundle::Error) -> Error {
    match e {
        tern_bundle::Error::Io { path, source } => Error::Io(path.display().to_string(), source),
        tern_bundle::Error::Fs(f) => Error::Fs(f),
        other => Error::Invalid(format!("bundle refused: {other}")),
    }
}

/// New roots and role versions as the verified bundle carries them.
type BundleMetadata = (u64, Vec<(u64, Vec<u8>)>, Vec<(String, u64, Vec<u8>)>);

/// The verified bundle's metadata: the root version it was verified from, its newer roots,
/// and its targets roles with their bytes.
fn bundle_metadata(bundle: &Path, root: &[u8], report: &tern_bundle::VerifyReport) -> Result<BundleMetadata> {
    // The metadata as the bundle carries it.
    let index = tern_bundle::BundleIndex::open(bundle).map_err(bundle_refusal)?;
    let read_entry = |name: &str| -> Result<Vec<u8>> {
        let (_, r) = index
            .read(name, 0)
            .map_err(bundle_refusal)?
            .ok_or_else(|| Error::Invalid(format!("bundle has no {name}")))?;
        let mut buf = Vec::new();
        r.take(tern_core::metadata::MAX_METADATA_BYTES as u64)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Io(name.to_owned(), e))?;
        Ok(buf)
    };
    let trusted = tern_core::trust::load_trusted_root(root)?;
    let mut roots = Vec::new();
    for v in trusted.version() + 1..=report.root_version {
        roots.push((v, read_entry(&format!("metadata/{v}.root.json"))?));
    }
    let mut roles = vec![(
        "targets".to_owned(),
        report.targets_version,
        read_entry("metadata/targets.json")?,
    )];
    for (name, v) in &report.delegated {
        roles.push((name.clone(), *v, read_entry(&format!("metadata/{name}.json"))?));
    }
    Ok((trusted.version(), roots, roles))
}

/// The release name: given, or the one version every payload's manifest carries.
fn release_name(given: Option<&str>, targets: &[ReleaseTarget]) -> Result<String> {
    if let Some(n) = given {
        if n.is_empty() || n.len() > 128 || n.chars().any(|c| c.is_control() || c == '/') {
            return Err(Error::Refused(format!(
                "release name `{n}` is not 1 to 128 printable characters without `/`"
            )));
        }
        return Ok(n.to_owned());
    }
    let versions: std::collections::BTreeSet<&str> = targets.iter().map(|t| t.version.as_str()).collect();
    match versions.into_iter().collect::<Vec<_>>()[..] {
        [v] if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(Error::Refused(
            "the bundle's payloads do not share one manifest version; name the release (`--name`)".into(),
        )),
    }
}

/// Upload a bundle (already on disk): verify, store, publish. Refusals change nothing.
pub async fn upload(state: &Arc<AppState>, bundle: &Path, name: Option<&str>, actor: &str) -> Result<Release> {
    let outcome = upload_inner(state, bundle, name, actor).await;
    let subject = match &outcome {
        Ok(r) => format!("release:{}", r.name),
        Err(_) => format!("release:{}", name.unwrap_or("?")),
    };
    state
        .db
        .audit_result(actor, "release.upload", &subject, &outcome, |r| {
            format!("{} targets", r.targets.len())
        })
        .await;
    outcome
}

async fn upload_inner(state: &Arc<AppState>, bundle: &Path, name: Option<&str>, actor: &str) -> Result<Release> {
    let root = current_root(state)
        .await?
        .ok_or_else(|| Error::Refused("the repository has no root yet (`tern server set-root`)".into()))?;
    let artifacts = state.cfg.artifact_dir();
    let path = bundle.to_owned();
    let now = DateTime::from_unix(unix_now());
    let verified = tokio::task::spawn_blocking(move || verify_bundle(&path, &root, &artifacts, now))
        .await
        .map_err(|e| Error::Refused(format!("verification task: {e}")))??;
    let outcome = async {
        if let Some((_, bytes)) = verified.roots.last() {
            let newest = tern_core::trust::load_trusted_root(bytes)?;
            check_online_roles(&newest, state)?;
        }
        let release = release_name(name, &verified.targets)?;
        for attempt in 0.. {
            match publish(state, &verified, &release, actor).await {
                Err(Error::Refused(r)) if r == RETRY && attempt < 20 => continue,
                Err(Error::Refused(r)) if r == RETRY => {
                    return Err(Error::Refused(
                        "the repository kept changing during the upload; try again".into(),
                    ))
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }
    .await;
    // Whatever was refused leaves nothing behind in the store.
    discard_blobs(&verified.blobs);
    outcome
}

const RETRY: &str = "retry: the repository changed";

async fn publish(state: &AppState, v: &Verified, release: &str, actor: &str) -> Result<Release> {
    let cur = current(state).await?;
    let exists = sqlx::query("SELECT name FROM releases WHERE name = $1")
        .bind(release)
        .fetch_optional(&state.db.pool)
        .await?;
    if exists.is_some() {
        return Err(Error::Refused(format!("release `{release}` is already present")));
    }
    // Which roles change: newer versions replace, equal versions must be identical, older
    // ones are a rollback.
    let mut changed = Vec::new();
    for (role, version, body) in &v.roles {
        let have = cur.version(role);
        let version = *version as i64;
        if version > have {
            changed.push((role.clone(), version, body.clone()));
        } else if version == have {
            let stored = metadata(state, role, Some(version)).await?.unwrap_or_default();
            if tern_core::digest::sha256_hex(&stored) != tern_core::digest::sha256_hex(body) {
                return Err(Error::Refused(format!(
                    "{role} version {version} is already published with different content"
                )));
            }
        } else {
            return Err(Error::Refused(format!(
                "{role} version {version} is older than the published version {have} (a rollback)"
            )));
        }
    }
    if changed.is_empty() && v.roots.is_empty() {
        return Err(Error::Refused(
            "every role in the bundle is already published at that version: nothing new".into(),
        ));
    }
    // The checks passed: the payloads go into the store before the database names them.
    store_blobs(&state.cfg.artifact_dir(), &v.blobs)?;
    let now = unix_now();
    let mut tx = state.db.write.begin().await?;
    // The compare-and-swap first: it takes the write lock and detects a concurrent publisher.
    let snap_version = cur.version("snapshot") + 1;
    let snap_expires = now + state.cfg.snapshot_expiry_secs as i64;
    let swapped =
        sqlx::query("UPDATE repo_current SET version = $1, expires = $2 WHERE role = 'snapshot' AND version = $3")
            .bind(snap_version)
            .bind(snap_expires)
            .bind(snap_version - 1)
            .execute(&mut *tx)
            .await?;
    if swapped.rows_affected() != 1 {
        return Err(Error::Refused(RETRY.into()));
    }
    // The bundle was verified from the root current when the upload began; if another
    // upload rotated it since, this one must be verified again from the new root.
    let root_now: i64 = sqlx::query("SELECT version FROM repo_current WHERE role = 'root'")
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    if root_now != v.verified_from_root as i64 {
        return Err(Error::Refused(format!(
            "the repository's root moved to version {root_now} during the upload; upload the bundle again"
        )));
    }
    for (version, bytes) in &v.roots {
        let root = Signed::<Root>::parse("root", bytes)?;
        insert_metadata(&mut tx, "root", *version as i64, bytes, now, actor).await?;
        sqlx::query("UPDATE repo_current SET version = $1, expires = $2 WHERE role = 'root'")
            .bind(*version as i64)
            .bind(root.expires().unix())
            .execute(&mut *tx)
            .await?;
    }
    let mut versions: BTreeMap<String, i64> = cur
        .roles
        .iter()
        .filter(|(r, _)| !matches!(r.as_str(), "root" | "snapshot" | "timestamp"))
        .map(|(r, (v, _))| (r.clone(), *v))
        .collect();
    for (role, version, body) in &changed {
        insert_metadata(&mut tx, role, *version, body, now, actor).await?;
        sqlx::query(
            "INSERT INTO repo_current (role, version, expires) VALUES ($1, $2, 0) ON CONFLICT (role) DO UPDATE SET version = excluded.version",
        )
        .bind(role)
        .bind(*version)
        .execute(&mut *tx)
        .await?;
        versions.insert(role.clone(), *version);
    }
    let snapshot_bytes = sign_snapshot(&versions, snap_version, snap_expires, &state.keys.snapshot)?;
    insert_metadata(&mut tx, "snapshot", snap_version, &snapshot_bytes, now, &state.instance).await?;
    write_timestamp(
        &mut tx,
        state,
        cur.version("timestamp"),
        snap_version,
        &snapshot_bytes,
        now,
    )
    .await?;
    for b in &v.blobs {
        sqlx::query(
            "INSERT INTO blobs (sha256, length, created_at) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(&b.sha256)
        .bind(b.length as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    for doc in &v.recipients {
        crate::recipients::insert(&mut tx, doc, now).await?;
    }
    let targets_json = serde_json::to_string(&v.targets).unwrap_or_default();
    sqlx::query("INSERT INTO releases (name, targets, uploaded_at, uploaded_by) VALUES ($1, $2, $3, $4)")
        .bind(release)
        .bind(&targets_json)
        .bind(now)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Release {
        name: release.to_owned(),
        targets: v.targets.clone(),
        uploaded_at: now,
        uploaded_by: actor.to_owned(),
    })
}

fn sign_snapshot(versions: &BTreeMap<String, i64>, version: i64, expires: i64, key: &SigningKey) -> Result<Vec<u8>> {
    let meta = versions
        .iter()
        .map(|(role, v)| {
            (
                format!("{role}.json"),
                MetaFile {
                    version: *v as u64,
                    length: None,
                    hashes: None,
                    unrecognized: BTreeMap::new(),
                },
            )
        })
        .collect();
    let snap = Snapshot {
        common: Common::new("snapshot", version as u64, DateTime::from_unix(expires)),
        meta,
        unrecognized: BTreeMap::new(),
    };
    let mut env = Envelope::new(&snap)?;
    env.sign("snapshot", key)?;
    Ok(env.to_bytes())
}

/// Sign and store timestamp `old + 1` for `snapshot`, compare-and-swapping the current one.
async fn write_timestamp(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    state: &AppState,
    old: i64,
    snap_version: i64,
    snapshot: &[u8],
    now: i64,
) -> Result<()> {
    let version = old + 1;
    let expires = now + state.cfg.timestamp_expiry_secs as i64;
    let swapped =
        sqlx::query("UPDATE repo_current SET version = $1, expires = $2 WHERE role = 'timestamp' AND version = $3")
            .bind(version)
            .bind(expires)
            .bind(old)
            .execute(&mut **tx)
            .await?;
    if swapped.rows_affected() != 1 {
        return Err(Error::Refused(RETRY.into()));
    }
    let ts = Timestamp {
        common: Common::new("timestamp", version as u64, DateTime::from_unix(expires)),
        meta: BTreeMap::from([(
            "snapshot.json".to_owned(),
            MetaFile {
                version: snap_version as u64,
                length: Some(snapshot.len() as u64),
                hashes: Some(BTreeMap::from([(
                    "sha256".to_owned(),
                    tern_core::digest::sha256_hex(snapshot),
                )])),
                unrecognized: BTreeMap::new(),
            },
        )]),
        unrecognized: BTreeMap::new(),
    };
    let mut env = Envelope::new(&ts)?;
    env.sign("timestamp", &state.keys.timestamp)?;
    insert_metadata(tx, "timestamp", version, &env.to_bytes(), now, &state.instance).await
}

/// Name of the lease the re-signer holds.
pub const RESIGN_LEASE: &str = "timestamp-resign";

/// Re-sign the timestamp (and the snapshot, if it is due too) when past half its lifetime.
/// Only the holder of the database lease does it; returns the new timestamp version.
pub async fn resign_if_due(state: &AppState) -> Result<Option<i64>> {
    let cur = current(state).await?;
    let now = unix_now();
    let ts_version = cur.version("timestamp");
    if ts_version == 0 {
        return Ok(None);
    }
    let ts_due = cur.expires("timestamp") - now < state.cfg.timestamp_expiry_secs as i64 / 2;
    let snap_due = cur.expires("snapshot") - now < state.cfg.snapshot_expiry_secs as i64 / 2;
    if !ts_due && !snap_due {
        return Ok(None);
    }
    let ttl_ms = (state.cfg.timestamp_expiry_secs as i64 * 1000 / 4).clamp(2_000, 60_000);
    if !state.db.try_lease(RESIGN_LEASE, &state.instance, ttl_ms).await? {
        return Ok(None);
    }
    let mut tx = state.db.write.begin().await?;
    let mut snap_version = cur.version("snapshot");
    let snapshot = if snap_due {
        // A new snapshot version with the same role versions.
        let new_version = snap_version + 1;
        let expires = now + state.cfg.snapshot_expiry_secs as i64;
        let swapped =
            sqlx::query("UPDATE repo_current SET version = $1, expires = $2 WHERE role = 'snapshot' AND version = $3")
                .bind(new_version)
                .bind(expires)
                .bind(snap_version)
                .execute(&mut *tx)
                .await?;
        if swapped.rows_affected() != 1 {
            return Ok(None);
        }
        let versions: BTreeMap<String, i64> = cur
            .roles
            .iter()
            .filter(|(r, _)| !matches!(r.as_str(), "root" | "snapshot" | "timestamp"))
            .map(|(r, (v, _))| (r.clone(), *v))
            .collect();
        let bytes = sign_snapshot(&versions, new_version, expires, &state.keys.snapshot)?;
        insert_metadata(&mut tx, "snapshot", new_version, &bytes, now, &state.instance).await?;
        snap_version = new_version;
        bytes
    } else {
        metadata(state, "snapshot", Some(snap_version))
            .await?
            .unwrap_or_default()
    };
    match write_timestamp(&mut tx, state, ts_version, snap_version, &snapshot, now).await {
        Ok(()) => {}
        Err(Error::Refused(r)) if r == RETRY => return Ok(None),
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    state
        .db
        .audit(
            &format!("server:{}", state.instance),
            "repository.resign-timestamp",
            "timestamp",
            "ok",
            &format!("timestamp version {}", ts_version + 1),
        )
        .await?;
    Ok(Some(ts_version + 1))
}

/// The background re-signer.
pub async fn resign_loop(state: Arc<AppState>) {
    let period = (state.cfg.timestamp_expiry_secs / 10).clamp(1, 60);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(period)).await;
        match resign_if_due(&state).await {
            Ok(Some(version)) => tracing::info!(version, "timestamp re-signed"),
            Ok(None) => tracing::debug!("timestamp not due for re-signing"),
            Err(e) => tracing::error!("timestamp re-sign failed: {e}"),
        }
    }
}

/// The file a consistent-snapshot target name (`DIR/HASH.NAME`) is served from.
pub fn target_blob(artifacts: &Path, path: &str) -> Option<(PathBuf, String)> {
    let base = path.rsplit('/').next()?;
    let (hash, _) = base.split_once('.')?;
    let alg = match hash.len() {
        64 => "sha256",
        128 => "sha512",
        _ => return None,
    };
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((blob_path(artifacts, alg, &hash.to_ascii_lowercase()), hash.to_owned()))
}

/// All releases, newest first.
pub async fn releases(state: &AppState) -> Result<Vec<Release>> {
    let rows =
        sqlx::query("SELECT name, targets, uploaded_at, uploaded_by FROM releases ORDER BY uploaded_at DESC, name")
            .fetch_all(&state.db.pool)
            .await?;
    rows.iter().map(release_from_row).collect()
}

/// One release.
pub async fn release(state: &AppState, name: &str) -> Result<Option<Release>> {
    let row = sqlx::query("SELECT name, targets, uploaded_at, uploaded_by FROM releases WHERE name = $1")
        .bind(name)
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(release_from_row).transpose()
}

fn release_from_row(r: &sqlx::any::AnyRow) -> Result<Release> {
    let targets: String = r.try_get(1)?;
    Ok(Release {
        name: r.try_get(0)?,
        targets: serde_json::from_str(&targets).map_err(|e| Error::Refused(format!("stored release: {e}")))?,
        uploaded_at: r.try_get(2)?,
        uploaded_by: r.try_get(3)?,
    })
}
