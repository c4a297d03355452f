//! Deployments, kept for the API and CLI that predate rollouts: a deployment is a rollout of
//! one phase holding every selected device, started at once, with no thresholds. Its view
//! lists the devices that have a row (and, for a one-device deployment, that device while it
//! waits), with counts per status and `waiting` for the selected devices not ordered yet.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tern_core::text::shown;

use super::policy::Selector;
use super::rollouts::{self, rollout_row, Action, RolloutRequest, Start};
use super::rows::{self, Move, NewRow, TERMINAL};
use super::{audit, Refusal, R};
use crate::AppState;

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
    /// waiting, queued, downloading, installing, rebooting, trial, succeeded, failed,
    /// rolled-back, timed-out, cancelled.
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
    /// Id (the rollout's).
    pub id: String,
    /// Release.
    pub release: String,
    /// `device`, `tag`, `device_type`, or `rollout` for a rollout made otherwise.
    pub selector_kind: String,
    /// The device id, tag or type (a rollout's selector in words).
    pub selector: String,
    /// active, finished, cancelled (or a rollout's other statuses).
    pub status: String,
    /// Created (Unix seconds).
    pub created_at: i64,
    /// By whom.
    pub created_by: String,
    /// Devices per status, `waiting` for those not ordered yet.
    pub counts: BTreeMap<String, i64>,
    /// Whether the selection has been counted (`waiting` is 0 until it has: the server
    /// counts it within a tick of the creation).
    pub counted: bool,
    /// Every device with a row (at most 10,000).
    pub devices: Vec<DeviceDeployment>,
}

/// Create a deployment: a one-phase rollout, started at once.
pub async fn create_deployment(state: &AppState, req: DeploymentRequest, actor: &str, token: &str) -> R<Deployment> {
    let mut selector = Selector::default();
    match (&req.device, &req.tag, &req.device_type) {
        (Some(d), None, None) => selector.device = Some(d.clone()),
        (None, Some(t), None) => selector.tags = vec![t.clone()],
        (None, None, Some(t)) => selector.device_type = Some(t.clone()),
        _ => {
            return Err(Refusal::BadRequest(
                "name exactly one of `device`, `tag` or `device_type`".into(),
            ))
        }
    }
    let r = rollouts::create_rollout(
        state,
        RolloutRequest {
            release: req.release,
            selector,
            phases: Vec::new(),
            error: None,
            window: None,
            timeout_secs: None,
            start: Start::Auto,
            start_at: None,
            require_approval: false,
        },
        actor,
        token,
    )
    .await?;
    deployment(state, &r.id)
        .await?
        .ok_or_else(|| Refusal::NotFound("deployment vanished".into()))
}

/// A deployment with its devices.
pub async fn deployment(state: &AppState, id: &str) -> R<Option<Deployment>> {
    let Some(r) = rollout_row(state, id).await? else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT device_id, target, status, progress_done, progress_total, reason, updated_at
         FROM rollout_devices WHERE rollout_id = $1 ORDER BY device_id LIMIT 10000",
    )
    .bind(id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut devices = Vec::new();
    for row in &rows {
        devices.push(DeviceDeployment {
            device: row.try_get(0)?,
            target: row.try_get(1)?,
            status: row.try_get(2)?,
            progress_done: row.try_get(3)?,
            progress_total: row.try_get(4)?,
            reason: row.try_get(5)?,
            updated_at: row.try_get(6)?,
        });
    }
    let mut counts = BTreeMap::new();
    let mut waiting = 0i64;
    for (c, by) in rollouts::phase_counts(state, &r).await? {
        waiting += c.waiting() as i64;
        for (status, n) in by {
            *counts.entry(status).or_insert(0) += n;
        }
    }
    if waiting > 0 {
        counts.insert("waiting".into(), waiting);
    }
    let s = &r.spec.selector;
    let (kind, selector) = match (
        &s.device,
        s.tags.as_slice(),
        &s.device_type,
        &s.hardware,
        r.spec.phases.len(),
    ) {
        (Some(d), [], None, None, 1) => ("device", d.clone()),
        (None, [t], None, None, 1) => ("tag", t.clone()),
        (None, [], Some(t), None, 1) => ("device_type", t.clone()),
        _ => ("rollout", s.describe()),
    };
    if let (Some(d), true) = (&s.device, devices.is_empty()) {
        if waiting > 0 {
            devices.push(DeviceDeployment {
                device: d.clone(),
                target: String::new(),
                status: "waiting".into(),
                progress_done: None,
                progress_total: None,
                reason: None,
                updated_at: r.created_at,
            });
        }
    }
    // The engine marks a rollout finished on its next pass; the view says so at once.
    let in_progress: i64 = counts
        .iter()
        .filter(|(k, _)| !TERMINAL.contains(&k.as_str()))
        .map(|(_, n)| *n)
        .sum();
    let all_open = r.opened >= r.spec.phases.len();
    let status = match r.status.as_str() {
        "running" if all_open && in_progress == 0 && !devices.is_empty() => "finished".to_owned(),
        "running" => "active".to_owned(),
        other => other.to_owned(),
    };
    Ok(Some(Deployment {
        counted: r.selected.len() == r.spec.phases.len(),
        id: r.id,
        release: r.release,
        selector_kind: kind.into(),
        selector,
        status,
        created_at: r.created_at,
        created_by: r.created_by,
        counts,
        devices,
    }))
}

/// Deployments (every rollout seen as one), newest first.
pub async fn deployments(state: &AppState) -> R<Vec<Deployment>> {
    let ids = sqlx::query("SELECT id FROM rollouts ORDER BY created_at DESC, id LIMIT 1000")
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

/// Release one device from a rollout whatever its stage (a device that lost its state and
/// will never report the outcome would otherwise block later rollouts to it), or keep one
/// not ordered yet out of it. The device is not told: an install it already made still
/// follows the boot-time procedure.
pub async fn abandon_device(state: &AppState, id: &str, device_id: &str, actor: &str) -> R<Deployment> {
    let outcome = async {
        let r = rollout_row(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no deployment `{}`", shown(id))))?;
        let row = sqlx::query("SELECT status, phase FROM rollout_devices WHERE rollout_id = $1 AND device_id = $2")
            .bind(id)
            .bind(device_id)
            .fetch_optional(&state.db.pool)
            .await?;
        let reason = format!("abandoned by {actor}");
        let mut tx = state.db.write.begin().await?;
        let done = match row {
            Some(row) => {
                let status: String = row.try_get(0)?;
                let phase: i64 = row.try_get(1)?;
                !TERMINAL.contains(&status.as_str())
                    && rows::transition(
                        &mut tx,
                        &Move {
                            rollout: id,
                            device: device_id,
                            phase,
                            from: &status,
                            to: "cancelled",
                            reason: Some(&reason),
                            progress: None,
                        },
                    )
                    .await?
            }
            None => {
                super::valid_id("device id", device_id)?;
                // Only a registered device the rollout may still reach: a made-up id would
                // add to the counters (and could make the rollout look finished).
                if !matches!(
                    r.status.as_str(),
                    "running" | "paused" | "ready" | "scheduled" | "waiting-approval"
                ) || super::device(state, device_id).await?.is_none()
                {
                    return Err(Refusal::NotFound(format!(
                        "device `{}` is not registered, or deployment `{id}` is over",
                        shown(device_id)
                    )));
                }
                let phase = policy_phase(&r, device_id);
                rows::insert(
                    &mut tx,
                    &NewRow {
                        rollout: id,
                        device: device_id,
                        phase,
                        target: "",
                        length: 0,
                        hashes: "{}",
                        version: "",
                        status: "cancelled",
                        reason: Some(&reason),
                        only_if_open: false,
                    },
                )
                .await?
            }
        };
        if !done {
            return Err(Refusal::Conflict(format!(
                "device `{}` has no unfinished place in deployment `{id}`",
                shown(device_id)
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
        &format!("deployment:{} device:{}", shown(id), shown(device_id)),
        &outcome,
    )
    .await;
    outcome
}

/// The phase a device falls in (the last phase when its position is past every cut-off).
fn policy_phase(r: &rollouts::RolloutRow, device: &str) -> usize {
    let pos = super::policy::position(super::policy::bucket(device), super::policy::offset(&r.id));
    super::policy::phase_of(pos, &r.cutoffs).unwrap_or(r.cutoffs.len().saturating_sub(1))
}

/// Cancel a deployment: no new orders; devices already installing finish.
pub async fn cancel_deployment(state: &AppState, id: &str, actor: &str, token: &str) -> R<Deployment> {
    rollouts::act(state, id, Action::Cancel, actor, token).await?;
    deployment(state, id)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no deployment `{id}`")))
}
