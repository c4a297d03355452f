//! Devices, deployments and the check-in: the director's side of DESIGN §3.
//!
//! A deployment is materialised into one row per device when it is created (and for a
//! device approved later that it selects), holding the exact target chosen for that device.
//! Device status follows only the device's signed reports; a device counts as succeeded
//! only when it reports Committed while booted from a slot holding the deployed target.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tern_core::director::{self, CheckIn, Order, OrderTarget, Stage};
use tern_core::{DateTime, PublicKey};

use crate::repo::{self, ReleaseTarget};
use crate::{random_hex, unix_now, AppState, Error};

/// A refusal with an HTTP meaning.
#[derive(Debug)]
pub enum Refusal {
    /// 400: the request is malformed.
    BadRequest(String),
    /// 401: the signature or credential is wrong.
    Unauthorized(String),
    /// 403: not allowed in this state.
    Forbidden(String),
    /// 404: no such thing.
    NotFound(String),
    /// 409: conflicts with what exists.
    Conflict(String),
    /// 500.
    Internal(Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        match e {
            Error::Refused(r) => Refusal::Conflict(r),
            Error::Invalid(r) => Refusal::BadRequest(r),
            Error::Core(e) => Refusal::BadRequest(e.to_string()),
            other => Refusal::Internal(other),
        }
    }
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        Refusal::Internal(e.into())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::BadRequest(m)
            | Refusal::Unauthorized(m)
            | Refusal::Forbidden(m)
            | Refusal::NotFound(m)
            | Refusal::Conflict(m) => f.write_str(m),
            Refusal::Internal(e) => write!(f, "{e}"),
        }
    }
}

type R<T> = std::result::Result<T, Refusal>;

/// An enrollment request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The device's chosen id (serial number, hostname).
    pub device_id: String,
    /// Its public key, TUF key JSON.
    #[schema(value_type = Object)]
    pub public_key: serde_json::Value,
    /// Device type.
    pub device_type: String,
    /// Hardware revision.
    pub hardware: String,
    /// Tags for deployments.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its encryption key (X25519, `tern_core::keywrap` JSON form): releases can be
    /// encrypted for it.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub encryption_key: Option<serde_json::Value>,
    /// The fleet enrollment token; without one, the device must present a certificate from
    /// the device CA over mutual TLS.
    #[serde(default)]
    pub enrollment_token: Option<String>,
}

/// A device as the registry has it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Device {
    /// Id.
    pub id: String,
    /// pending, approved, rejected or decommissioned.
    pub status: String,
    /// Device type.
    pub device_type: String,
    /// Hardware revision.
    pub hardware: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Its key id.
    pub keyid: String,
    /// Last check-in (Unix seconds).
    pub last_seen: Option<i64>,
    /// The agent's state at the last check-in.
    pub phase: Option<String>,
    /// Its slots at the last check-in.
    #[schema(value_type = Option<Vec<Object>>)]
    pub slots: Option<serde_json::Value>,
    /// The last order it refused, and why.
    pub refused_order: Option<String>,
    /// Its encryption public key (X25519), when it sent one at enrollment.
    #[schema(value_type = Option<Object>)]
    pub encryption_key: Option<serde_json::Value>,
}

fn valid_id(what: &str, id: &str) -> R<()> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(Refusal::BadRequest(format!(
            "{what} `{id}` must be 1 to 128 characters of letters, digits, `-_.:`"
        )));
    }
    Ok(())
}

/// Enroll a device: with a fleet token it waits for an operator's approval; with a device
/// certificate (mutual TLS, `peer`) whose common name is its id and whose key is its
/// device key, it is approved at once.
pub async fn enroll(state: &AppState, req: EnrollRequest, peer: Option<std::sync::Arc<Vec<u8>>>) -> R<Device> {
    // An id that is not an id is not copied into the audit log.
    let who = match valid_id("device id", &req.device_id) {
        Ok(()) => format!("device:{}", req.device_id),
        Err(_) => "device:?".to_owned(),
    };
    let outcome = enroll_inner(state, &req, peer).await;
    match &outcome {
        Err(e) => state.audit_refusal(&who, "device.enroll", &who, &e.to_string()).await,
        Ok(_) => audit(state, &who, "device.enroll", &who, &outcome).await,
    }
    outcome
}

async fn enroll_inner(state: &AppState, req: &EnrollRequest, peer: Option<std::sync::Arc<Vec<u8>>>) -> R<Device> {
    valid_id("device id", &req.device_id)?;
    for t in &req.tags {
        valid_id("tag", t)?;
    }
    valid_id("device type", &req.device_type)?;
    if req.hardware.len() > 128 || req.tags.len() > 64 {
        return Err(Refusal::BadRequest("hardware or tags too long".into()));
    }
    let key = PublicKey::from_value("device key", &req.public_key)
        .map_err(|e| Refusal::BadRequest(format!("public_key: {e}")))?;
    let keyid = key.keyid();
    let encryption_key = match &req.encryption_key {
        Some(v) => Some(
            tern_core::keywrap::RecipientKey::from_value(v)
                .map_err(|e| Refusal::BadRequest(format!("encryption_key: {e}")))?
                .to_value()
                .to_string(),
        ),
        None => None,
    };
    let (status, via) = match (&req.enrollment_token, peer) {
        (Some(token), _) => {
            if state.db.check_token("enrollment", token).await?.is_none() {
                return Err(Refusal::Unauthorized("the enrollment token is not valid".into()));
            }
            ("pending", "token")
        }
        (None, Some(cert)) => {
            let (cn, cert_key) = crate::tls::device_identity(&cert).map_err(Refusal::BadRequest)?;
            if cn != req.device_id {
                return Err(Refusal::Unauthorized(format!(
                    "the device certificate is for `{cn}`, not `{}`",
                    req.device_id
                )));
            }
            let raw = req
                .public_key
                .pointer("/keyval/public")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if key.keytype() != "ed25519" || hex::decode(raw).ok().as_deref() != Some(cert_key.as_slice()) {
                return Err(Refusal::Unauthorized(
                    "the device certificate's key is not the device key (certificate enrollment needs an ed25519 device key)"
                        .into(),
                ));
            }
            ("approved", "certificate")
        }
        (None, None) => {
            return Err(Refusal::Unauthorized(
                "no enrollment token, and no device certificate over mutual TLS".into(),
            ))
        }
    };
    if let Some(existing) = device(state, &req.device_id).await? {
        if existing.keyid != keyid.as_str() {
            return Err(Refusal::Conflict(format!(
                "device `{}` is enrolled with another key",
                req.device_id
            )));
        }
        let have = existing.encryption_key.as_ref().map(|v| v.to_string());
        return match (have, encryption_key) {
            (Some(h), Some(e)) if h != e => Err(Refusal::Conflict(format!(
                "device `{}` is enrolled with another encryption key",
                req.device_id
            ))),
            // Enrollment proves nothing about the device key: an encryption key arriving for
            // a device an operator already approved could be anyone's.
            (None, Some(_)) if existing.status != "pending" => Err(Refusal::Conflict(format!(
                "device `{}` is {} without an encryption key; one cannot be added by enrolling again",
                req.device_id, existing.status
            ))),
            // A pending device (enrolled before it had an encryption key) sends it now; the
            // operator approves it with it.
            (None, Some(e)) => {
                sqlx::query("UPDATE devices SET encryption_key = $1, updated_at = $2 WHERE id = $3")
                    .bind(e)
                    .bind(unix_now())
                    .bind(&req.device_id)
                    .execute(&state.db.write)
                    .await?;
                device(state, &req.device_id)
                    .await?
                    .ok_or_else(|| Refusal::NotFound("device vanished".into()))
            }
            _ => Ok(existing),
        };
    }
    let now = unix_now();
    let mut tx = state.db.write.begin().await?;
    sqlx::query(
        "INSERT INTO devices (id, public_key, keyid, device_type, hardware, tags, status, enrolled_via, created_at, updated_at, encryption_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)",
    )
    .bind(&req.device_id)
    .bind(req.public_key.to_string())
    .bind(keyid.as_str())
    .bind(&req.device_type)
    .bind(&req.hardware)
    .bind(serde_json::to_string(&req.tags).unwrap_or_default())
    .bind(status)
    .bind(via)
    .bind(now)
    .bind(encryption_key)
    .execute(&mut *tx)
    .await?;
    for t in &req.tags {
        sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(&req.device_id)
            .bind(t)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if status == "approved" {
        join_active_deployments(state, &req.device_id).await?;
    }
    crate::session::changed(state).await?;
    device(state, &req.device_id)
        .await?
        .ok_or_else(|| Refusal::NotFound("device vanished".into()))
}

async fn audit<T>(state: &AppState, actor: &str, action: &str, subject: &str, outcome: &R<T>) {
    state
        .db
        .audit_result(actor, action, subject, outcome, |_| String::new())
        .await;
}

fn device_from_row(r: &sqlx::any::AnyRow) -> R<Device> {
    let tags: String = r.try_get("tags")?;
    let slots: Option<String> = r.try_get("slots")?;
    Ok(Device {
        id: r.try_get("id")?,
        status: r.try_get("status")?,
        device_type: r.try_get("device_type")?,
        hardware: r.try_get("hardware")?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        keyid: r.try_get("keyid")?,
        last_seen: r.try_get("last_seen")?,
        phase: r.try_get("phase")?,
        slots: slots.and_then(|s| serde_json::from_str(&s).ok()),
        encryption_key: r
            .try_get::<Option<String>, _>("encryption_key")?
            .and_then(|s| serde_json::from_str(&s).ok()),
        refused_order: r.try_get("refused_order")?,
    })
}

const DEVICE_COLUMNS: &str =
    "id, status, device_type, hardware, tags, keyid, last_seen, phase, slots, refused_order, encryption_key";

/// One device.
pub async fn device(state: &AppState, id: &str) -> R<Option<Device>> {
    let row = sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?;
    row.as_ref().map(device_from_row).transpose()
}

/// Devices, optionally of one status.
pub async fn devices(state: &AppState, status: Option<&str>) -> R<Vec<Device>> {
    let rows = match status {
        Some(s) => {
            sqlx::query(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE status = $1 ORDER BY id LIMIT 10000"
            ))
            .bind(s)
            .fetch_all(&state.db.pool)
            .await?
        }
        None => {
            sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id LIMIT 10000"))
                .fetch_all(&state.db.pool)
                .await?
        }
    };
    rows.iter().map(device_from_row).collect()
}

/// Approve, reject or decommission a device.
pub async fn set_device_status(state: &AppState, id: &str, to: &str, actor: &str) -> R<Device> {
    let outcome = async {
        let d = device(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no device `{id}`")))?;
        let allowed = matches!(
            (d.status.as_str(), to),
            ("pending", "approved" | "rejected")
                | ("approved" | "pending" | "rejected", "decommissioned")
                | ("rejected", "approved")
        );
        if !allowed {
            return Err(Refusal::Conflict(format!(
                "device `{id}` is {}; it cannot become {to}",
                d.status
            )));
        }
        let mut tx = state.db.write.begin().await?;
        sqlx::query("UPDATE devices SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(to)
            .bind(unix_now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if to == "decommissioned" {
            sqlx::query(
                "UPDATE deployment_devices SET status = 'cancelled', reason = 'device decommissioned', updated_at = $1
                 WHERE device_id = $2 AND status IN ('queued', 'downloading', 'installing')",
            )
            .bind(unix_now())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if to == "approved" {
            join_active_deployments(state, id).await?;
        }
        crate::session::changed(state).await?;
        device(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no device `{id}`")))
    }
    .await;
    audit(state, actor, &format!("device.{to}"), &format!("device:{id}"), &outcome).await;
    outcome
}

/// A deployment request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    /// The release.
    pub release: String,
    /// One device …
    pub device: Option<String>,
    /// … or every device with this tag …
    pub tag: Option<String>,
    /// … or every device of this type.
    pub device_type: Option<String>,
}

/// One device's place in a deployment.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceDeployment {
    /// The device.
    pub device: String,
    /// The target chosen for it.
    pub target: String,
    /// queued, downloading, installing, rebooting, trial, succeeded, failed, rolled-back, cancelled.
    pub status: String,
    /// Bytes downloaded.
    pub progress_done: Option<i64>,
    /// Bytes to download.
    pub progress_total: Option<i64>,
    /// Why it failed, rolled back or was cancelled.
    pub reason: Option<String>,
    /// Last change (Unix seconds).
    pub updated_at: i64,
}

/// A deployment and its devices.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Deployment {
    /// Id.
    pub id: String,
    /// Release.
    pub release: String,
    /// `device`, `tag` or `device_type`.
    pub selector_kind: String,
    /// The device id, tag or type.
    pub selector: String,
    /// active, finished or cancelled.
    pub status: String,
    /// Created (Unix seconds).
    pub created_at: i64,
    /// By whom.
    pub created_by: String,
    /// Devices per status.
    pub counts: BTreeMap<String, i64>,
    /// Every device.
    pub devices: Vec<DeviceDeployment>,
}

/// Nonces remembered per device against replayed check-ins.
const RECENT_NONCES: usize = 32;
/// How far a device's clock may be ahead of the server's, or go back, in seconds.
const CLOCK_SLACK: i64 = 300;

const TERMINAL: [&str; 4] = ["succeeded", "failed", "rolled-back", "cancelled"];

fn choose_target<'a>(targets: &'a [ReleaseTarget], device_type: &str, hardware: &str) -> Option<&'a ReleaseTarget> {
    targets
        .iter()
        .find(|t| t.device_type == device_type && (t.hardware.is_empty() || t.hardware.iter().any(|h| h == hardware)))
}

/// Create a deployment.
pub async fn create_deployment(state: &AppState, req: DeploymentRequest, actor: &str) -> R<Deployment> {
    let outcome = create_deployment_inner(state, &req, actor).await;
    let subject = match &outcome {
        Ok(d) => format!("deployment:{}", d.id),
        Err(_) => format!("release:{}", req.release),
    };
    audit(state, actor, "deployment.create", &subject, &outcome).await;
    outcome
}

async fn create_deployment_inner(state: &AppState, req: &DeploymentRequest, actor: &str) -> R<Deployment> {
    let (kind, selector) = match (&req.device, &req.tag, &req.device_type) {
        (Some(d), None, None) => ("device", d.clone()),
        (None, Some(t), None) => ("tag", t.clone()),
        (None, None, Some(t)) => ("device_type", t.clone()),
        _ => {
            return Err(Refusal::BadRequest(
                "name exactly one of `device`, `tag` or `device_type`".into(),
            ))
        }
    };
    let release = repo::release(state, &req.release)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no release `{}`", req.release)))?;
    // Every check before anything is written: a refused deployment leaves nothing behind.
    if kind == "device" {
        match device(state, &selector).await? {
            Some(d) if d.status == "approved" => {}
            Some(d) => return Err(Refusal::Conflict(format!("device `{selector}` is {}", d.status))),
            None => return Err(Refusal::NotFound(format!("no device `{selector}`"))),
        }
    }
    let id = format!("d-{}", random_hex(6));
    let now = unix_now();
    sqlx::query(
        "INSERT INTO deployments (id, release_name, selector_kind, selector, status, created_at, created_by)
         VALUES ($1, $2, $3, $4, 'active', $5, $6)",
    )
    .bind(&id)
    .bind(&release.name)
    .bind(kind)
    .bind(&selector)
    .bind(now)
    .bind(actor)
    .execute(&state.db.write)
    .await?;
    let ids: Vec<String> = match kind {
        "device" => vec![selector.clone()],
        "tag" => sqlx::query("SELECT t.device_id FROM device_tags t JOIN devices d ON d.id = t.device_id WHERE t.tag = $1 AND d.status = 'approved'")
            .bind(&selector)
            .fetch_all(&state.db.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?,
        _ => sqlx::query("SELECT id FROM devices WHERE device_type = $1 AND status = 'approved'")
            .bind(&selector)
            .fetch_all(&state.db.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<std::result::Result<_, _>>()?,
    };
    for dev in ids {
        add_device(state, &id, &release, &dev).await?;
    }
    crate::session::changed(state).await?;
    deployment(state, &id)
        .await?
        .ok_or_else(|| Refusal::NotFound("deployment vanished".into()))
}

/// Queue `device` in deployment `id`; a queued or downloading row of an older deployment
/// for the same device is superseded.
async fn add_device(state: &AppState, id: &str, release: &repo::Release, device_id: &str) -> R<()> {
    let Some(dev) = device(state, device_id).await? else {
        return Ok(());
    };
    let now = unix_now();
    let chosen = choose_target(&release.targets, &dev.device_type, &dev.hardware);
    let mut tx = state.db.write.begin().await?;
    if chosen.is_some() {
        // Only a deployment that has something for this device supersedes an older one.
        sqlx::query(
            "UPDATE deployment_devices SET status = 'cancelled', reason = $1, updated_at = $2
             WHERE device_id = $3 AND deployment_id <> $4 AND status IN ('queued', 'downloading')",
        )
        .bind(format!("superseded by deployment {id}"))
        .bind(now)
        .bind(device_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    let (target, length, hashes, version, status, reason) = match chosen {
        Some(t) => (
            t.name.clone(),
            t.length as i64,
            serde_json::to_string(&t.hashes).unwrap_or_default(),
            t.version.clone(),
            "queued",
            None,
        ),
        None => (
            String::new(),
            0,
            "{}".into(),
            String::new(),
            "failed",
            Some(format!(
                "release {} has no target for device type {} hardware {}",
                release.name, dev.device_type, dev.hardware
            )),
        ),
    };
    sqlx::query(
        "INSERT INTO deployment_devices (deployment_id, device_id, target, target_length, target_hashes, version, status, reason, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT DO NOTHING",
    )
    .bind(id)
    .bind(device_id)
    .bind(target)
    .bind(length)
    .bind(hashes)
    .bind(version)
    .bind(status)
    .bind(reason)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A newly approved device joins the active deployments that select it.
async fn join_active_deployments(state: &AppState, device_id: &str) -> R<()> {
    let rows = sqlx::query(
        "SELECT id, release_name FROM deployments WHERE status = 'active' AND (
            (selector_kind = 'device' AND selector = $1)
         OR (selector_kind = 'device_type' AND selector = (SELECT device_type FROM devices WHERE id = $1))
         OR (selector_kind = 'tag' AND selector IN (SELECT tag FROM device_tags WHERE device_id = $1)))
         ORDER BY created_at",
    )
    .bind(device_id)
    .fetch_all(&state.db.pool)
    .await?;
    for r in rows {
        let id: String = r.try_get(0)?;
        let name: String = r.try_get(1)?;
        if let Some(release) = repo::release(state, &name).await? {
            add_device(state, &id, &release, device_id).await?;
        }
    }
    crate::session::changed(state).await?;
    Ok(())
}

/// A deployment with its devices.
pub async fn deployment(state: &AppState, id: &str) -> R<Option<Deployment>> {
    let Some(row) = sqlx::query(
        "SELECT id, release_name, selector_kind, selector, status, created_at, created_by FROM deployments WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.db.pool)
    .await?
    else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT device_id, target, status, progress_done, progress_total, reason, updated_at
         FROM deployment_devices WHERE deployment_id = $1 ORDER BY device_id",
    )
    .bind(id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut devices = Vec::new();
    let mut counts = BTreeMap::new();
    for r in &rows {
        let d = DeviceDeployment {
            device: r.try_get(0)?,
            target: r.try_get(1)?,
            status: r.try_get(2)?,
            progress_done: r.try_get(3)?,
            progress_total: r.try_get(4)?,
            reason: r.try_get(5)?,
            updated_at: r.try_get(6)?,
        };
        *counts.entry(d.status.clone()).or_insert(0) += 1;
        devices.push(d);
    }
    let mut status: String = row.try_get(4)?;
    if status == "active" && !devices.is_empty() && devices.iter().all(|d| TERMINAL.contains(&d.status.as_str())) {
        status = "finished".into();
    }
    Ok(Some(Deployment {
        id: row.try_get(0)?,
        release: row.try_get(1)?,
        selector_kind: row.try_get(2)?,
        selector: row.try_get(3)?,
        status,
        created_at: row.try_get(5)?,
        created_by: row.try_get(6)?,
        counts,
        devices,
    }))
}

/// All deployments, newest first.
pub async fn deployments(state: &AppState) -> R<Vec<Deployment>> {
    let ids = sqlx::query("SELECT id FROM deployments ORDER BY created_at DESC LIMIT 1000")
        .fetch_all(&state.db.pool)
        .await?;
    let mut out = Vec::new();
    for r in ids {
        let id: String = r.try_get(0)?;
        if let Some(d) = deployment(state, &id).await? {
            out.push(d);
        }
    }
    Ok(out)
}

/// Release one device from a deployment whatever its stage (a device that lost its state
/// and will never report the outcome would otherwise block later deployments to it). The
/// device is not told: an install it already made still follows the boot-time procedure.
pub async fn abandon_device(state: &AppState, id: &str, device_id: &str, actor: &str) -> R<Deployment> {
    let outcome = async {
        let done = sqlx::query(
            "UPDATE deployment_devices SET status = 'cancelled', reason = $1, updated_at = $2
             WHERE deployment_id = $3 AND device_id = $4 AND status NOT IN ('succeeded', 'failed', 'rolled-back', 'cancelled')",
        )
        .bind(format!("abandoned by {actor}"))
        .bind(unix_now())
        .bind(id)
        .bind(device_id)
        .execute(&state.db.write)
        .await?;
        if done.rows_affected() != 1 {
            return Err(Refusal::Conflict(format!(
                "device `{device_id}` has no unfinished place in deployment `{id}`"
            )));
        }
        crate::session::changed(state).await?;
        deployment(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no deployment `{id}`")))
    }
    .await;
    audit(
        state,
        actor,
        "deployment.abandon-device",
        &format!("deployment:{id} device:{device_id}"),
        &outcome,
    )
    .await;
    outcome
}

/// Cancel a deployment: devices that have not begun installing stop; the others finish.
pub async fn cancel_deployment(state: &AppState, id: &str, actor: &str) -> R<Deployment> {
    let outcome = async {
        let d = deployment(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no deployment `{id}`")))?;
        if d.status != "active" {
            return Err(Refusal::Conflict(format!("deployment `{id}` is {}", d.status)));
        }
        let mut tx = state.db.write.begin().await?;
        sqlx::query("UPDATE deployments SET status = 'cancelled' WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE deployment_devices SET status = 'cancelled', reason = 'deployment cancelled', updated_at = $1
             WHERE deployment_id = $2 AND status IN ('queued', 'downloading')",
        )
        .bind(unix_now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        crate::session::changed(state).await?;
        deployment(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no deployment `{id}`")))
    }
    .await;
    audit(state, actor, "deployment.cancel", &format!("deployment:{id}"), &outcome).await;
    outcome
}

/// The server's answer to a check-in.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckinResponse {
    /// Seconds until the next check-in.
    pub poll_interval_secs: u64,
    /// A session token for polls (`GET /api/v1/devices/{id}/poll`) until `session_expires`.
    pub session: String,
    /// When the session token expires (Unix seconds).
    pub session_expires: i64,
    /// A signed director order, when a deployment is pending for this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub order: Option<serde_json::Value>,
}

/// A device check-in: verify, record the report, answer with an order if one is pending.
pub async fn checkin(state: &AppState, path_id: &str, body: &[u8]) -> R<CheckinResponse> {
    let outcome = checkin_inner(state, path_id, body).await;
    if let Err(e) = &outcome {
        // Refusals are audited (within the budget for unauthenticated requests); accepted
        // check-ins are not (they are the fleet's heartbeat; the changes they cause are).
        let who = match valid_id("device id", path_id) {
            Ok(()) => format!("device:{path_id}"),
            Err(_) => "device:?".to_owned(),
        };
        state.audit_refusal(&who, "device.checkin", &who, &e.to_string()).await;
    }
    outcome
}

struct PendingRow {
    deployment: String,
    release: String,
    target: String,
    length: i64,
    hashes: String,
    version: String,
    status: String,
}

async fn checkin_inner(state: &AppState, path_id: &str, body: &[u8]) -> R<CheckinResponse> {
    let (env, c) = director::parse_checkin(body).map_err(|e| Refusal::BadRequest(format!("check-in: {e}")))?;
    if c.device_id != path_id {
        return Err(Refusal::BadRequest(format!(
            "check-in is for device `{}`, sent to `{path_id}`",
            c.device_id
        )));
    }
    let key = device_key(state, path_id).await?;
    director::verify_checkin(&env, &key)
        .map_err(|e| Refusal::Unauthorized(format!("check-in is not signed by device `{path_id}`'s key: {e}")))?;
    let time = DateTime::parse(&c.time).map_err(Refusal::BadRequest)?.unix();
    let now = unix_now();
    // The replay guard: the nonce must not be among the device's last RECENT_NONCES ones, the
    // device's clock may not run more than CLOCK_SLACK ahead of the server's (one far-future
    // check-in would otherwise lock the device out), nor go back more than CLOCK_SLACK.
    if time > now + CLOCK_SLACK {
        return Err(Refusal::BadRequest(format!(
            "check-in time {} is {} s ahead of the server's clock",
            c.time,
            time - now
        )));
    }
    let row = sqlx::query("SELECT status, last_nonce, last_time FROM devices WHERE id = $1")
        .bind(path_id)
        .fetch_one(&state.db.pool)
        .await?;
    let status: String = row.try_get(0)?;
    let recent: String = row.try_get::<Option<String>, _>(1)?.unwrap_or_default();
    let last_time: Option<i64> = row.try_get(2)?;
    if status != "approved" {
        return Err(Refusal::Forbidden(format!("device `{path_id}` is {status}")));
    }
    if recent.split(' ').any(|n| n == c.nonce) {
        return Err(Refusal::Unauthorized(format!(
            "check-in from `{path_id}` replays a nonce it used before"
        )));
    }
    if last_time.is_some_and(|t| time < t - CLOCK_SLACK) {
        return Err(Refusal::Unauthorized(format!(
            "check-in from `{path_id}` goes back in time (a replay, or a clock set back)"
        )));
    }
    let mut window: Vec<&str> = recent.split(' ').filter(|n| !n.is_empty()).collect();
    window.push(&c.nonce);
    let skip = window.len().saturating_sub(RECENT_NONCES);
    let updated = window[skip..].join(" ");
    let slots = serde_json::to_string(&c.slots).unwrap_or_default();
    // Compare-and-swap on the nonce window: two check-ins racing see each other.
    let fresh = sqlx::query(
        "UPDATE devices SET last_seen = $1, last_time = $2, last_nonce = $3, phase = $4, slots = $5, refused_order = $6
         WHERE id = $7 AND status = 'approved' AND COALESCE(last_nonce, '') = $8",
    )
    .bind(now)
    .bind(time.max(last_time.unwrap_or(i64::MIN)))
    .bind(&updated)
    .bind(&c.phase)
    .bind(&slots)
    .bind(&c.refused_order)
    .bind(path_id)
    .bind(&recent)
    .execute(&state.db.write)
    .await?;
    if fresh.rows_affected() != 1 {
        return Err(Refusal::Conflict(format!(
            "another check-in from `{path_id}` was recorded at the same moment; check in again"
        )));
    }
    if let Some(refused) = &c.refused_order {
        let _ = state
            .db
            .audit(
                &format!("device:{path_id}"),
                "device.refused-order",
                &format!("device:{path_id}"),
                "refused",
                refused,
            )
            .await;
    }
    let pending = pending_row(state, path_id).await?;
    if let Some(report) = &c.deployment {
        record_report(state, path_id, &c, report).await?;
    }
    // Re-read after the report: it may have finished the deployment.
    let pending = match (&c.deployment, pending) {
        (Some(_), _) => pending_row(state, path_id).await?,
        (None, p) => p,
    };
    let order = match pending {
        Some(p) if matches!(p.status.as_str(), "queued" | "downloading" | "installing") => {
            let hashes: BTreeMap<String, String> = serde_json::from_str(&p.hashes).unwrap_or_default();
            let order = Order {
                kind: director::ORDER_TYPE.into(),
                device_id: path_id.to_owned(),
                nonce: c.nonce.clone(),
                deployment: p.deployment,
                release: p.release,
                targets: vec![OrderTarget {
                    name: p.target,
                    length: p.length as u64,
                    hashes,
                }],
                expires: DateTime::from_unix(now + state.cfg.order_ttl_secs as i64).to_string(),
            };
            let _ = p.version;
            let bytes = director::sign_document("order", &order, &state.keys.director)
                .map_err(|e| Refusal::Internal(e.into()))?;
            Some(serde_json::from_slice(&bytes).map_err(|e| Refusal::Internal(Error::Refused(e.to_string())))?)
        }
        _ => None,
    };
    let session_expires = now + state.cfg.session_ttl_secs as i64;
    Ok(CheckinResponse {
        poll_interval_secs: state.cfg.poll_interval_secs,
        session: crate::session::issue(&state.session_key, path_id, session_expires),
        session_expires,
        order,
    })
}

/// The enrolled key of a device (cached; see `AppState::device_keys`).
async fn device_key(state: &AppState, id: &str) -> R<PublicKey> {
    if let Some(k) = state.device_keys.lock().map_err(|_| poisoned())?.get(id) {
        return Ok(k.clone());
    }
    let row = sqlx::query("SELECT public_key FROM devices WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no device `{id}`")))?;
    let key_json: String = row.try_get(0)?;
    let value: serde_json::Value =
        serde_json::from_str(&key_json).map_err(|e| Refusal::Internal(Error::Refused(e.to_string())))?;
    let key = PublicKey::from_value("device key", &value).map_err(|e| Refusal::Internal(e.into()))?;
    let mut cache = state.device_keys.lock().map_err(|_| poisoned())?;
    if cache.len() >= 1_000_000 {
        cache.clear();
    }
    cache.insert(id.to_owned(), key.clone());
    Ok(key)
}

fn poisoned() -> Refusal {
    Refusal::Internal(Error::Refused("device key cache lock poisoned".into()))
}

async fn pending_row(state: &AppState, device_id: &str) -> R<Option<PendingRow>> {
    let row = sqlx::query(
        "SELECT dd.deployment_id, d.release_name, dd.target, dd.target_length, dd.target_hashes, dd.version, dd.status
         FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
         WHERE dd.device_id = $1 AND dd.status IN ('queued', 'downloading', 'installing', 'rebooting', 'trial')
         ORDER BY dd.created_at LIMIT 1",
    )
    .bind(device_id)
    .fetch_optional(&state.db.pool)
    .await?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(PendingRow {
        deployment: r.try_get(0)?,
        release: r.try_get(1)?,
        target: r.try_get(2)?,
        length: r.try_get(3)?,
        hashes: r.try_get(4)?,
        version: r.try_get(5)?,
        status: r.try_get(6)?,
    }))
}

/// Whether a deployment's target is a slot image (raw installer, or no manifest).
async fn installs_into_slot(state: &AppState, deployment: &str, target: &str) -> R<bool> {
    let row =
        sqlx::query("SELECT r.targets FROM releases r JOIN deployments d ON d.release_name = r.name WHERE d.id = $1")
            .bind(deployment)
            .fetch_optional(&state.db.pool)
            .await?;
    let Some(row) = row else { return Ok(true) };
    let targets: Vec<ReleaseTarget> = serde_json::from_str(&row.try_get::<String, _>(0)?).unwrap_or_default();
    Ok(targets
        .iter()
        .find(|t| t.name == target)
        .is_none_or(|t| t.installer.is_empty() || t.installer == "raw"))
}

/// Apply a device's report on a deployment to its row.
async fn record_report(state: &AppState, device_id: &str, c: &CheckIn, report: &director::DeploymentReport) -> R<()> {
    let row = sqlx::query(
        "SELECT target, version, status, progress_done, reason FROM deployment_devices WHERE deployment_id = $1 AND device_id = $2",
    )
    .bind(&report.deployment)
    .bind(device_id)
    .fetch_optional(&state.db.pool)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let target: String = row.try_get(0)?;
    let version: String = row.try_get(1)?;
    let status: String = row.try_get(2)?;
    let old_done: Option<i64> = row.try_get(3)?;
    if TERMINAL.contains(&status.as_str()) {
        return Ok(());
    }
    let (new_status, reason) = match report.stage {
        Stage::Downloading => ("downloading", None),
        Stage::Installing => ("installing", None),
        Stage::Rebooting => ("rebooting", None),
        Stage::Trial => ("trial", None),
        // A file or archive payload is installed in place, not into a slot: its Committed
        // report is the outcome.
        Stage::Committed if !installs_into_slot(state, &report.deployment, &target).await? => ("succeeded", None),
        Stage::Committed => match c.booted() {
            Some(b)
                if b.target.as_deref() == Some(target.as_str()) && b.version.as_deref() == Some(version.as_str()) =>
            {
                ("succeeded", None)
            }
            Some(b) => (
                "failed",
                Some(format!(
                    "reported committed while booted from {} holding {} {}, not {target} {version}",
                    b.name,
                    b.target.as_deref().unwrap_or("nothing"),
                    b.version.as_deref().unwrap_or("")
                )),
            ),
            None => ("failed", Some("reported committed but no booted slot".to_owned())),
        },
        Stage::RolledBack => (
            "rolled-back",
            Some(
                report
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the bootloader fell back".into()),
            ),
        ),
        Stage::Failed => (
            "failed",
            Some(report.reason.clone().unwrap_or_else(|| "unknown".into())),
        ),
    };
    let done = report.progress.map(|p| p.done as i64);
    let total = report.progress.map(|p| p.total as i64);
    if new_status == status && done == old_done {
        return Ok(());
    }
    sqlx::query(
        "UPDATE deployment_devices SET status = $1, progress_done = $2, progress_total = $3, reason = $4, updated_at = $5
         WHERE deployment_id = $6 AND device_id = $7",
    )
    .bind(new_status)
    .bind(done)
    .bind(total)
    .bind(&reason)
    .bind(unix_now())
    .bind(&report.deployment)
    .bind(device_id)
    .execute(&state.db.write)
    .await?;
    if new_status != status {
        crate::session::changed(state).await?;
        state
            .db
            .audit(
                &format!("device:{device_id}"),
                "deployment.device-status",
                &format!("deployment:{}", report.deployment),
                "ok",
                &format!(
                    "{status} -> {new_status}{}",
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            )
            .await?;
    }
    Ok(())
}
