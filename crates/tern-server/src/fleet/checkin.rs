//! Signed check-ins (DESIGN §3, §6): verify, record the report, answer with an order.
//!
//! Replays are refused by a per-device challenge: every accepted check-in must carry the
//! challenge the server gave the device in its last answer (or from
//! `GET /api/v1/devices/ID/challenge`), and is recorded by a compare-and-swap on it that
//! sets the next one. A captured check-in answers a challenge that is no longer current,
//! however soon it is replayed, so it gets neither a session token nor an order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use tern_core::director::{self, CheckIn, Order, OrderTarget, Stage};
use tern_core::text::{shown, shown_max};
use tern_core::{DateTime, PublicKey};

use super::heartbeat::Report;
use super::orders::Pending;
use super::rows::{self, TERMINAL};
use super::{claimed, Refusal, R};
use crate::repo::ReleaseTarget;
use crate::{random_hex, unix_now, AppState, Error};

/// How far a device's clock may be ahead of the server's, in seconds.
const CLOCK_SLACK: i64 = 300;
/// Characters kept of what a device says about a failure or a refused order.
const MAX_REASON: usize = 512;

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
    /// The challenge the device's next check-in must carry.
    pub challenge: String,
}

/// The challenge a device's next check-in must answer (`GET /api/v1/devices/ID/challenge`):
/// what a device that lost its last answer (or its state) asks for. Not secret: only the
/// device's key can sign a check-in carrying it.
pub async fn challenge(state: &AppState, id: &str) -> R<String> {
    for _ in 0..2 {
        let row = sqlx::query("SELECT challenge FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.db.pool)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no device `{}`", shown(id))))?;
        if let Some(c) = row.try_get::<Option<String>, _>(0)? {
            return Ok(c);
        }
        // Enrolled before challenges existed: give it its first.
        sqlx::query("UPDATE devices SET challenge = $1 WHERE id = $2 AND challenge IS NULL")
            .bind(random_hex(16))
            .bind(id)
            .execute(&state.db.write)
            .await?;
    }
    Err(Refusal::Conflict("the device's challenge changed; ask again".into()))
}

/// A device check-in: verify, record the report, answer with an order if one is pending.
pub async fn checkin(state: &AppState, path_id: &str, body: &[u8]) -> R<CheckinResponse> {
    let outcome = checkin_inner(state, path_id, body).await;
    if let Err(e) = &outcome {
        // Refusals are audited (within the budget for unauthenticated requests); accepted
        // check-ins are not (they are the fleet's heartbeat; the changes they cause are).
        let who = claimed(path_id);
        state.audit_refusal(&who, "device.checkin", &who, &e.to_string()).await;
    }
    outcome
}

async fn checkin_inner(state: &AppState, path_id: &str, body: &[u8]) -> R<CheckinResponse> {
    let (env, c) = director::parse_checkin(body).map_err(|e| Refusal::BadRequest(format!("check-in: {e}")))?;
    if c.device_id != path_id {
        return Err(Refusal::BadRequest(format!(
            "check-in is for device `{}`, sent to `{}`",
            shown(&c.device_id),
            shown(path_id)
        )));
    }
    let dev = state
        .heartbeats
        .device(path_id)
        .await?
        .ok_or_else(|| Refusal::NotFound(format!("no device `{}`", shown(path_id))))?;
    let super::heartbeat::DeviceRow {
        status,
        keyid,
        challenge: current,
        refused_order: refused_before,
        device_type,
        hardware,
        tags,
        unfinished,
    } = dev;
    let key = device_key(state, path_id, &keyid).await?;
    director::verify_checkin(&env, &key)
        .map_err(|e| Refusal::Unauthorized(format!("check-in is not signed by device `{path_id}`'s key: {e}")))?;
    let time = DateTime::parse(&c.time).map_err(Refusal::BadRequest)?.unix();
    let now = unix_now();
    // One far-future check-in must not be taken as the device's clock.
    if time > now + CLOCK_SLACK {
        return Err(Refusal::BadRequest(format!(
            "check-in time {} is {} s ahead of the server's clock",
            c.time,
            time - now
        )));
    }
    if status != "approved" {
        return Err(Refusal::Forbidden(format!("device `{path_id}` is {status}")));
    }
    let stale = || {
        Refusal::StaleChallenge(format!(
            "check-in from `{path_id}` does not answer its current challenge (a replay, or a device that lost \
             its last answer: GET /api/v1/devices/{path_id}/challenge)"
        ))
    };
    let Some(current) = current else {
        return Err(stale());
    };
    if !tern_core::digest::ct_eq(current.as_bytes(), c.challenge.as_bytes()) {
        return Err(stale());
    }
    let next = random_hex(16);
    let slots = serde_json::to_string(&c.slots).unwrap_or_default();
    let installed = c.booted().and_then(|b| b.version.as_deref()).map(|v| shown_max(v, 64));
    let refused_order = c.refused_order.as_deref().map(|r| shown_max(r, MAX_REASON));
    // The move the report makes of the device's row, applied with the check-in.
    let planned = match &c.deployment {
        Some(report) => plan_report(state, path_id, &c, report, unfinished.as_ref()).await?,
        None => Planned::Unchanged,
    };
    let report = match &planned {
        Planned::Move(planned) => Some(planned.0.clone()),
        _ => None,
    };
    // Compare-and-swap on the challenge: of two check-ins answering it, one is recorded.
    let recorded = state
        .heartbeats
        .record(super::heartbeat::Beat {
            id: path_id.to_owned(),
            now,
            time,
            nonce: c.nonce.clone(),
            phase: shown_max(&c.phase, 32),
            slots,
            refused_order: refused_order.clone(),
            installed,
            current,
            next: next.clone(),
            report,
        })
        .await?;
    if !recorded.fresh {
        return Err(stale());
    }
    // Audited when it changes: a device repeating its last refusal adds no row.
    if let Some(refused) = refused_order.as_ref().filter(|r| refused_before.as_ref() != Some(*r)) {
        super::history::refused_order(
            state,
            path_id,
            c.deployment.as_ref().map(|d| d.deployment.as_str()),
            refused,
        )
        .await?;
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
    // The order the device follows, as read with its row, as its report moved it.
    let unfinished = match planned {
        Planned::Unchanged => Some(unfinished),
        Planned::Move(planned) => {
            let (m, row) = *planned;
            // Polls learn when the device enters or leaves the set with an order waiting,
            // or the set that reports on its own (the batch recorded the event).
            if recorded.moved && rows::polls_care(&m.from, &m.to) {
                state.fleet.refresh(state, false).await?;
            }
            let followed = unfinished.as_ref().is_some_and(|p| p.rollout == row.rollout);
            match recorded.moved && followed && rows::UNFINISHED.contains(&m.to.as_str()) {
                true => Some(Some(Pending {
                    status: m.to.clone(),
                    progress_done: m.progress.map(|(done, _)| done).or(row.progress_done),
                    ..row
                })),
                // Finished, moved by something else first, or another row: read again.
                false => None,
            }
        }
    };
    let attrs = super::orders::DeviceAttrs {
        id: path_id,
        device_type: &device_type,
        hardware: &hardware,
        tags: &tags,
    };
    let (pending, settled) = super::orders::choose(state, &attrs, unfinished).await?;
    state.fleet.settle(path_id, &settled);
    let order = match pending {
        Some(p) if p.wants_order() => {
            let hashes: BTreeMap<String, String> = serde_json::from_str(&p.hashes).unwrap_or_default();
            let order = Order {
                kind: director::ORDER_TYPE.into(),
                device_id: path_id.to_owned(),
                nonce: c.nonce.clone(),
                deployment: p.rollout,
                release: p.release,
                targets: vec![OrderTarget {
                    name: p.target,
                    length: p.length as u64,
                    hashes,
                }],
                expires: DateTime::from_unix(now + state.cfg.order_ttl_secs as i64).to_string(),
            };
            let signing = std::time::Instant::now();
            let bytes = director::sign_document("order", &order, &state.keys.director)
                .map_err(|e| Refusal::Internal(e.into()))?;
            state.metrics.order_signed(signing.elapsed());
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
        challenge: next,
    })
}

/// The enrolled key of a device, whose key id is `keyid` in the row just read. Cached
/// (`AppState::device_keys`), but only ever used when it is the key the registry names now:
/// a registration that was reset and enrolled again with another key is never checked
/// against the old one, in this process or another.
async fn device_key(state: &AppState, id: &str, keyid: &str) -> R<PublicKey> {
    if let Some(k) = state.device_keys.lock().map_err(|_| poisoned())?.get(id) {
        if k.keyid().as_str() == keyid {
            return Ok(k.clone());
        }
    }
    let row = sqlx::query("SELECT public_key FROM devices WHERE id = $1 AND keyid = $2")
        .bind(id)
        .bind(keyid)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| Refusal::Conflict(format!("device `{id}`'s registration changed; check in again")))?;
    let key_json: String = row.try_get(0)?;
    let value: serde_json::Value =
        serde_json::from_str(&key_json).map_err(|e| Refusal::Internal(Error::Refused(e.to_string())))?;
    let key = PublicKey::from_value("device key", &value).map_err(|e| Refusal::Internal(e.into()))?;
    if key.keyid().as_str() != keyid {
        return Err(Refusal::Internal(Error::Refused(format!(
            "device `{id}`: stored key id differs from its key"
        ))));
    }
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

/// Whether a deployment's target is a slot image (raw installer, or no manifest).
async fn installs_into_slot(state: &AppState, deployment: &str, target: &str) -> R<bool> {
    let is_slot = |t: &ReleaseTarget| t.installer.is_empty() || t.installer == "raw";
    if let Some(r) = state.fleet.running().iter().find(|r| r.id == deployment) {
        return Ok(r.targets.iter().find(|t| t.name == target).is_none_or(is_slot));
    }
    let row =
        sqlx::query("SELECT r.targets FROM releases r JOIN rollouts d ON d.release_name = r.name WHERE d.id = $1")
            .bind(deployment)
            .fetch_optional(&state.db.pool)
            .await?;
    let Some(row) = row else { return Ok(true) };
    let targets: Vec<ReleaseTarget> = serde_json::from_str(&row.try_get::<String, _>(0)?).unwrap_or_default();
    Ok(targets.iter().find(|t| t.name == target).is_none_or(is_slot))
}

/// Where a deployment row's status stands in the order stages follow.
fn status_rank(status: &str) -> u8 {
    match status {
        "queued" => 0,
        "downloading" => 1,
        "installing" => 2,
        "rebooting" => 3,
        "trial" => 4,
        _ => 5,
    }
}

fn stage_rank(stage: Stage) -> u8 {
    match stage {
        Stage::Downloading => 1,
        Stage::Installing => 2,
        Stage::Rebooting => 3,
        Stage::Trial => 4,
        Stage::Committed | Stage::RolledBack | Stage::Failed => 5,
    }
}

/// What a report does to the device's row.
enum Planned {
    /// Nothing: no such row, a finished one, an earlier stage, or the same report again.
    Unchanged,
    /// This move of this row (as read).
    Move(Box<(Report, Pending)>),
}

/// The move a device's report makes of its row in a rollout. `read` is the device's
/// unfinished row as its check-in read it.
async fn plan_report(
    state: &AppState,
    device_id: &str,
    c: &CheckIn,
    report: &director::DeploymentReport,
    read: Option<&Pending>,
) -> R<Planned> {
    let row = match read.filter(|p| p.rollout == report.deployment) {
        Some(p) => p.clone(),
        // A report on a row that is not the one the device follows (finished, or of an
        // older rollout): read it.
        None => match report_row(state, device_id, &report.deployment).await? {
            Some(p) => p,
            None => return Ok(Planned::Unchanged),
        },
    };
    let unchanged = || Ok(Planned::Unchanged);
    if TERMINAL.contains(&row.status.as_str()) {
        return unchanged();
    }
    // Stages only move forward: a device repeating an earlier one (a download started
    // again) changes nothing, and cannot make the row flap.
    if stage_rank(report.stage) < status_rank(&row.status) {
        return unchanged();
    }
    let (target, version) = (&row.target, &row.version);
    let (new_status, reason) = match report.stage {
        Stage::Downloading => ("downloading", None),
        Stage::Installing => ("installing", None),
        Stage::Rebooting => ("rebooting", None),
        Stage::Trial => ("trial", None),
        // A file or archive payload is installed in place, not into a slot: its Committed
        // report is the outcome.
        Stage::Committed if !installs_into_slot(state, &report.deployment, target).await? => ("succeeded", None),
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
                    shown(&b.name),
                    shown(b.target.as_deref().unwrap_or("nothing")),
                    shown(b.version.as_deref().unwrap_or(""))
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
    // What the device says is stored shortened and escaped: it is shown to operators.
    let reason = reason.map(|r| shown_max(&r, MAX_REASON));
    let done = report.progress.map(|p| p.done as i64);
    let total = report.progress.map(|p| p.total as i64);
    if new_status == row.status && done == row.progress_done {
        return unchanged();
    }
    // Compare-and-swap on the status read: a cancel, a supersede or a decommission that
    // committed meanwhile stands (the report is about a row that no longer is what it was).
    let m = Report {
        rollout: report.deployment.clone(),
        phase: row.phase,
        from: row.status.clone(),
        to: new_status.to_owned(),
        reason,
        progress: done.zip(total),
    };
    Ok(Planned::Move(Box::new((m, row))))
}

/// A device's row in a rollout, whatever its status.
async fn report_row(state: &AppState, device_id: &str, rollout: &str) -> R<Option<Pending>> {
    let sql = format!(
        "SELECT {} FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
         WHERE rd.rollout_id = $1 AND rd.device_id = $2",
        super::orders::PENDING_COLUMNS
    );
    let row = sqlx::query(&sql)
        .bind(rollout)
        .bind(device_id)
        .fetch_optional(&state.db.pool)
        .await?;
    match row {
        Some(r) => Ok(Pending::decode(&r, 0)?),
        None => Ok(None),
    }
}
