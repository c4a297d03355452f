//! Deployments: a release for one device, a tag or a device type, materialised into one
//! row per device holding the exact target chosen for it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tern_core::text::shown;

use super::{audit, device, Refusal, R, TERMINAL};
use crate::repo::{self, ReleaseTarget};
use crate::{random_hex, unix_now, AppState};

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
        .ok_or_else(|| Refusal::NotFound(format!("no release `{}`", shown(&req.release))))?;
    // Every check before anything is written: a refused deployment leaves nothing behind.
    if kind == "device" {
        match device(state, &selector).await? {
            Some(d) if d.status == "approved" => {}
            Some(d) => return Err(Refusal::Conflict(format!("device `{selector}` is {}", d.status))),
            None => return Err(Refusal::NotFound(format!("no device `{}`", shown(&selector)))),
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
pub(crate) async fn join_active_deployments(state: &AppState, device_id: &str) -> R<()> {
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
    crate::session::device_changed(state, device_id).await?;
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
        let mut tx = state.db.write.begin().await?;
        let done = sqlx::query(
            "UPDATE deployment_devices SET status = 'cancelled', reason = $1, updated_at = $2
             WHERE deployment_id = $3 AND device_id = $4 AND status NOT IN ('succeeded', 'failed', 'rolled-back', 'cancelled')",
        )
        .bind(format!("abandoned by {actor}"))
        .bind(unix_now())
        .bind(id)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(Refusal::Conflict(format!(
                "device `{device_id}` has no unfinished place in deployment `{id}`"
            )));
        }
        crate::session::record_in(&mut tx, device_id).await?;
        tx.commit().await?;
        state.fleet.refresh(state, false).await?;
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
        // Checked again in the statement that changes it: one of two cancels racing wins.
        let done = sqlx::query("UPDATE deployments SET status = 'cancelled' WHERE id = $1 AND status = 'active'")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(Refusal::Conflict(format!("deployment `{id}` is no longer active")));
        }
        sqlx::query(
            "UPDATE deployment_devices SET status = 'cancelled', reason = 'deployment cancelled', updated_at = $1
             WHERE deployment_id = $2 AND status IN ('queued', 'downloading')",
        )
        .bind(unix_now())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        crate::session::record_in(&mut tx, "*").await?;
        tx.commit().await?;
        state.fleet.refresh(state, false).await?;
        deployment(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no deployment `{id}`")))
    }
    .await;
    audit(state, actor, "deployment.cancel", &format!("deployment:{id}"), &outcome).await;
    outcome
}
