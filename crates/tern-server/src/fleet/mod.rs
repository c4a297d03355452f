//! Devices, rollouts and the check-in: the director's side of DESIGN §3.
//!
//! - [`enroll`]: a device proves possession of its key and waits for approval;
//! - this module: the registry (approve, reject, decommission, reset);
//! - [`history`]: inventory search, tags, and each device's history;
//! - [`policy`] (pure): rollout specifications, phase membership, thresholds, windows;
//! - [`rollouts`]: the operator's side of rollouts, a constant number of writes each;
//! - [`engine`]: the background task that opens phases, stops, finishes and times out;
//! - [`orders`] and [`rows`]: a device's row in a rollout, made at its own check-in;
//! - [`deployments`]: the older one-phase view, kept for its API and CLI;
//! - [`checkin`]: signed check-ins answering a per-device challenge; device status follows
//!   only the device's signed reports, and a device counts as succeeded only when it
//!   reports Committed while booted from a slot holding the deployed target.

mod checkin;
mod deployments;
pub mod engine;
mod enroll;
pub(crate) mod heartbeat;
mod history;
mod orders;
pub mod policy;
mod rollouts;
pub mod rows;

pub use checkin::{challenge, checkin, CheckinResponse};
pub use deployments::{
    abandon_device, cancel_deployment, create_deployment, deployment, deployments, Deployment, DeploymentRequest,
    DeviceDeployment,
};
pub use enroll::{enroll, enrollment_challenge, EnrollmentChallenge};
pub use history::{history, search, set_tags, DevicePage, DeviceSearch, HistoryEntry};
pub use rollouts::{act, create_rollout, rollout, rollouts, Action, PhaseStatus, Rollout, RolloutRequest, Start};
pub(crate) use rollouts::{rollout_from_row, ROLLOUT_COLUMNS};

use serde::Serialize;
use sqlx::Row;
use tern_core::text::shown;

use crate::{unix_now, AppState, Error};

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
    /// 409 with its own kind: a check-in that does not answer the device's current
    /// challenge (a replay, or a device that lost its state and must fetch a new one).
    StaleChallenge(String),
    /// 429: the caller exceeded a rate or count limit.
    TooMany(String),
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

impl From<crate::batch::BatchError> for Refusal {
    fn from(e: crate::batch::BatchError) -> Self {
        Refusal::Internal(Error::DbBatch(e))
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
            | Refusal::Conflict(m)
            | Refusal::StaleChallenge(m)
            | Refusal::TooMany(m) => f.write_str(m),
            Refusal::Internal(e) => write!(f, "{e}"),
        }
    }
}

pub(crate) type R<T> = std::result::Result<T, Refusal>;

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
    /// That key's id (`tern device key export` on the device shows the same), for the
    /// operator to compare before approving.
    pub encryption_kid: Option<String>,
}

pub(crate) fn valid_id(what: &str, id: &str) -> R<()> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(Refusal::BadRequest(format!(
            "{what} `{}` must be 1 to 128 characters of letters, digits, `-_.:`",
            shown(id)
        )));
    }
    // `enroll` names the enrollment endpoints under /api/v1/devices/.
    if what == "device id" && id == "enroll" {
        return Err(Refusal::BadRequest("device id `enroll` is reserved".into()));
    }
    Ok(())
}

/// The audit actor for a device id a request claims: the id when it is well formed.
pub(crate) fn claimed(id: &str) -> String {
    match valid_id("device id", id) {
        Ok(()) => format!("device:{id}"),
        Err(_) => "device:?".to_owned(),
    }
}

pub(crate) async fn audit<T>(state: &AppState, actor: &str, action: &str, subject: &str, outcome: &R<T>) {
    state
        .db
        .audit_result(actor, action, subject, outcome, |_| String::new())
        .await;
}

pub(crate) fn device_from_row(r: &sqlx::any::AnyRow) -> R<Device> {
    let tags: String = r.try_get("tags")?;
    let encryption_key: Option<serde_json::Value> = r
        .try_get::<Option<String>, _>("encryption_key")?
        .and_then(|s| serde_json::from_str(&s).ok());
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
        encryption_kid: encryption_key
            .as_ref()
            .and_then(|v| tern_core::keywrap::RecipientKey::from_value(v).ok())
            .map(|k| k.kid()),
        encryption_key,
        refused_order: r.try_get("refused_order")?,
    })
}

pub(crate) const DEVICE_COLUMNS: &str =
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

/// The registry transitions an operator may make, by target status.
fn allowed_from(to: &str) -> &'static [&'static str] {
    match to {
        "approved" => &["pending", "rejected"],
        "rejected" => &["pending"],
        "decommissioned" => &["approved", "pending", "rejected"],
        _ => &[],
    }
}

/// Approve, reject or decommission a device. The status changes only from one the
/// transition allows, in the same statement that checks it, so two operators racing
/// cannot both succeed from one state.
pub async fn set_device_status(
    state: &AppState,
    id: &str,
    to: &str,
    expect_keyid: Option<&str>,
    actor: &str,
) -> R<Device> {
    let outcome = async {
        let from = allowed_from(to);
        let mut tx = state.db.write.begin().await?;
        let done = sqlx::query(
            "UPDATE devices SET status = $1, updated_at = $2
             WHERE id = $3 AND status IN ($4, $5, $6) AND ($7 = '' OR keyid = $7)",
        )
        .bind(to)
        .bind(unix_now())
        .bind(id)
        .bind(from.first().copied().unwrap_or(""))
        .bind(from.get(1).copied().unwrap_or(""))
        .bind(from.get(2).copied().unwrap_or(""))
        .bind(expect_keyid.unwrap_or(""))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            drop(tx);
            return Err(match device(state, id).await? {
                None => Refusal::NotFound(format!("no device `{}`", shown(id))),
                Some(d) if expect_keyid.is_some_and(|k| k != d.keyid) => Refusal::Conflict(format!(
                    "device `{id}` is registered with key {}, not {}",
                    d.keyid,
                    shown(expect_keyid.unwrap_or(""))
                )),
                Some(d) => Refusal::Conflict(format!("device `{id}` is {}; it cannot become {to}", d.status)),
            });
        }
        if to == "decommissioned" {
            let open = sqlx::query(
                "SELECT rollout_id, phase, status FROM rollout_devices
                 WHERE device_id = $1 AND status IN ('queued', 'downloading', 'installing', 'rebooting', 'trial')",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let mut open_rows = Vec::with_capacity(open.len());
            for r in open {
                let row: (String, i64, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                open_rows.push(row);
            }
            let moves: Vec<rows::Move> = open_rows
                .iter()
                .map(|(rollout, phase, status)| rows::Move {
                    rollout,
                    device: id,
                    phase: *phase,
                    from: status,
                    to: "cancelled",
                    reason: Some("device decommissioned"),
                    progress: None,
                })
                .collect();
            rows::transition_all(&mut tx, &moves).await?;
        }
        crate::session::record_in(&mut tx, id).await?;
        tx.commit().await?;
        state.fleet.refresh(state, false).await?;
        device(state, id)
            .await?
            .ok_or_else(|| Refusal::NotFound(format!("no device `{id}`")))
    }
    .await;
    audit(
        state,
        actor,
        &format!("device.{to}"),
        &format!("device:{}", shown(id)),
        &outcome,
    )
    .await;
    outcome
}

/// Forget a pending or rejected registration, so that the id can enroll again (a device
/// whose id someone else claimed first, or one re-flashed with new keys). An approved or
/// decommissioned device cannot be reset: decommissioning is final, and an approved device
/// is decommissioned first.
pub async fn reset_device(state: &AppState, id: &str, actor: &str) -> R<()> {
    let outcome = async {
        let mut tx = state.db.write.begin().await?;
        let done = sqlx::query("DELETE FROM devices WHERE id = $1 AND status IN ('pending', 'rejected')")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            drop(tx);
            return Err(match device(state, id).await? {
                None => Refusal::NotFound(format!("no device `{}`", shown(id))),
                Some(d) => Refusal::Conflict(format!(
                    "device `{id}` is {}; only a pending or rejected registration can be reset",
                    d.status
                )),
            });
        }
        sqlx::query("DELETE FROM device_tags WHERE device_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        crate::session::record_in(&mut tx, id).await?;
        tx.commit().await?;
        state.fleet.refresh(state, false).await?;
        Ok(())
    }
    .await;
    audit(state, actor, "device.reset", &format!("device:{}", shown(id)), &outcome).await;
    outcome
}
