//! Which order a device gets at its check-in. The device first follows its unfinished row
//! (an order it already has); otherwise, and while that row has not begun installing, the
//! newest running rollout that selects it, whose open phases hold it and whose window is
//! open, gives it a row and an order. Rows are only ever created here, in answer to the
//! device's own signed check-in, and only while the rollout is running with the device's
//! phase open: the insert checks that in the same statement.

use sqlx::Row;

use super::rows::{self, Move, NewRow};
use super::{policy, R};
use crate::repo::ReleaseTarget;
use crate::session::ViewRollout;
use crate::{unix_now, AppState};

/// A device as its check-in's order depends on it.
pub(crate) struct DeviceAttrs<'a> {
    pub id: &'a str,
    pub device_type: &'a str,
    pub hardware: &'a str,
    pub tags: &'a [String],
}

/// A row the device follows.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub rollout: String,
    pub rollout_status: String,
    pub rollout_created: i64,
    pub release: String,
    pub phase: i64,
    pub target: String,
    pub length: i64,
    pub hashes: String,
    pub status: String,
    /// The target's version.
    pub version: String,
    /// Bytes downloaded, as last reported.
    pub progress_done: Option<i64>,
}

/// The columns [`Pending::decode`] reads, of `rollout_devices rd JOIN rollouts r`.
pub(crate) const PENDING_COLUMNS: &str = "rd.rollout_id, r.status, r.created_at, r.release_name, rd.phase, rd.target, \
     rd.target_length, rd.target_hashes, rd.status, rd.version, rd.progress_done";
/// How many they are (a test checks it against the list).
pub(crate) const PENDING_WIDTH: usize = 11;

impl Pending {
    /// The row read as [`PENDING_COLUMNS`] from column `first` on; `None` when the rollout
    /// id is NULL (an outer join found no row).
    pub fn decode(row: &sqlx::any::AnyRow, first: usize) -> Result<Option<Pending>, sqlx::Error> {
        let Some(rollout) = row.try_get::<Option<String>, _>(first)? else {
            return Ok(None);
        };
        Ok(Some(Pending {
            rollout,
            rollout_status: row.try_get(first + 1)?,
            rollout_created: row.try_get(first + 2)?,
            release: row.try_get(first + 3)?,
            phase: row.try_get(first + 4)?,
            target: row.try_get(first + 5)?,
            length: row.try_get(first + 6)?,
            hashes: row.try_get(first + 7)?,
            status: row.try_get(first + 8)?,
            version: row.try_get(first + 9)?,
            progress_done: row.try_get(first + 10)?,
        }))
    }

    /// Whether the device should be given its order now.
    /// An install under way finishes whatever the rollout's state; a download under way
    /// continues while the rollout is paused; a row not begun waits while it is paused.
    pub fn wants_order(&self) -> bool {
        match self.status.as_str() {
            "installing" => true,
            "downloading" => matches!(self.rollout_status.as_str(), "running" | "paused"),
            "queued" => self.rollout_status == "running",
            _ => false,
        }
    }
}

/// The device's oldest unfinished row.
pub(crate) async fn unfinished(state: &AppState, device: &str) -> R<Option<Pending>> {
    let sql = format!(
        "SELECT {PENDING_COLUMNS}
         FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
         WHERE rd.device_id = $1 AND rd.status IN ('queued', 'downloading', 'installing', 'rebooting', 'trial')
         ORDER BY rd.created_at, rd.rollout_id LIMIT 1"
    );
    let row = sqlx::query(&sql).bind(device).fetch_optional(&state.db.pool).await?;
    match row {
        Some(r) => Ok(Pending::decode(&r, 0)?),
        None => Ok(None),
    }
}

/// Move the device's pending row to `cancelled` with `reason` (compare-and-swap on its
/// status); whether it moved.
async fn cancel_row(tx: &mut sqlx::Transaction<'_, sqlx::Any>, p: &Pending, device: &str, reason: &str) -> R<bool> {
    rows::transition(
        tx,
        &Move {
            rollout: &p.rollout,
            device,
            phase: p.phase,
            from: &p.status,
            to: "cancelled",
            reason: Some(reason),
            progress: None,
        },
    )
    .await
    .map_err(Into::into)
}

fn choose_target<'a>(targets: &'a [ReleaseTarget], device_type: &str, hardware: &str) -> Option<&'a ReleaseTarget> {
    targets
        .iter()
        .find(|t| t.device_type == device_type && (t.hardware.is_empty() || t.hardware.iter().any(|h| h == hardware)))
}

/// The row the device follows after this check-in, and the running rollouts it is now known
/// to need nothing from (for polls). `read` is its unfinished row as read with the device's
/// row in this check-in, if nothing moved it since.
pub(crate) async fn choose(
    state: &AppState,
    dev: &DeviceAttrs<'_>,
    read: Option<Option<Pending>>,
) -> R<(Option<Pending>, Vec<String>)> {
    let mut pending = match read {
        Some(p) => p,
        None => unfinished(state, dev.id).await?,
    };
    // A row not yet installing in a rollout that was cancelled or stopped: the device learns
    // of it now, and its row says so.
    for _ in 0..4 {
        let Some(p) = &pending else { break };
        if !matches!(p.status.as_str(), "queued" | "downloading")
            || matches!(p.rollout_status.as_str(), "running" | "paused")
        {
            break;
        }
        let reason = format!("rollout {} is {}", p.rollout, p.rollout_status);
        let mut tx = state.db.write.begin().await?;
        cancel_row(&mut tx, p, dev.id, &reason).await?;
        crate::session::record_in(&mut tx, dev.id).await?;
        tx.commit().await?;
        state.fleet.refresh(state, false).await?;
        pending = unfinished(state, dev.id).await?;
    }
    // Installing or later: the device finishes that first.
    if pending
        .as_ref()
        .is_some_and(|p| !matches!(p.status.as_str(), "queued" | "downloading"))
    {
        return Ok((pending, Vec::new()));
    }
    let mut settled = Vec::new();
    let bucket = policy::bucket(dev.id);
    let now = unix_now();
    for r in state.fleet.running().iter() {
        if let Some(p) = &pending {
            // Only a newer rollout supersedes the order the device has.
            if r.id == p.rollout || r.created_at < p.rollout_created {
                continue;
            }
        }
        if state.fleet.is_settled(&r.id, dev.id) {
            continue;
        }
        if !r.spec.selector.matches(dev.id, dev.device_type, dev.hardware, dev.tags) {
            settled.push(r.id.clone());
            continue;
        }
        let Some(phase) = r.phase_of(bucket) else { continue };
        if !r.spec.window.as_ref().is_none_or(|w| w.is_open(now)) {
            continue;
        }
        let has_row = sqlx::query("SELECT 1 FROM rollout_devices WHERE rollout_id = $1 AND device_id = $2")
            .bind(&r.id)
            .bind(dev.id)
            .fetch_optional(&state.db.pool)
            .await?
            .is_some();
        if has_row {
            settled.push(r.id.clone());
            continue;
        }
        match enter(state, r, dev, phase, pending.as_ref()).await? {
            Entered::Ordered(p) => return Ok((Some(*p), settled)),
            Entered::NoTarget => settled.push(r.id.clone()),
            Entered::NotNow => {}
        }
    }
    Ok((pending, settled))
}

enum Entered {
    Ordered(Box<Pending>),
    NoTarget,
    NotNow,
}

/// Give the device its row in rollout `r` (superseding `pending`, an order it has not begun
/// installing), in one transaction.
async fn enter(
    state: &AppState,
    r: &ViewRollout,
    dev: &DeviceAttrs<'_>,
    phase: usize,
    pending: Option<&Pending>,
) -> R<Entered> {
    let chosen = choose_target(&r.targets, dev.device_type, dev.hardware);
    let hashes = chosen
        .map(|t| serde_json::to_string(&t.hashes).unwrap_or_default())
        .unwrap_or_else(|| "{}".into());
    let reason = format!(
        "release {} has no target for device type {} hardware {}",
        r.release, dev.device_type, dev.hardware
    );
    let row = NewRow {
        rollout: &r.id,
        device: dev.id,
        phase,
        target: chosen.map_or("", |t| t.name.as_str()),
        length: chosen.map_or(0, |t| t.length as i64),
        hashes: &hashes,
        version: chosen.map_or("", |t| t.version.as_str()),
        status: if chosen.is_some() { "queued" } else { "failed" },
        reason: if chosen.is_some() { None } else { Some(&reason) },
        only_if_open: true,
    };
    let mut tx = state.db.write.begin().await?;
    // Only a rollout that has something for this device supersedes an older order. The
    // two rollouts' counters are moved in the order of their ids, as every transaction
    // takes counter rows (`rows::transition_all`); a refusal of either leaves nothing, as
    // the transaction is not committed.
    let superseded = pending.filter(|_| chosen.is_some());
    let cancel_first = superseded.is_some_and(|p| p.rollout < r.id);
    let reason = format!("superseded by rollout {}", r.id);
    if let Some(p) = superseded.filter(|_| cancel_first) {
        if !cancel_row(&mut tx, p, dev.id, &reason).await? {
            // The device's report moved that row meanwhile: nothing is changed.
            return Ok(Entered::NotNow);
        }
    }
    if !rows::insert(&mut tx, &row).await? {
        return Ok(Entered::NotNow);
    }
    if chosen.is_none() {
        tx.commit().await?;
        return Ok(Entered::NoTarget);
    }
    if let Some(p) = superseded.filter(|_| !cancel_first) {
        if !cancel_row(&mut tx, p, dev.id, &reason).await? {
            return Ok(Entered::NotNow);
        }
    }
    crate::session::record_in(&mut tx, dev.id).await?;
    tx.commit().await?;
    state.fleet.refresh(state, false).await?;
    let version = row.version.to_owned();
    Ok(Entered::Ordered(Box::new(Pending {
        rollout: r.id.clone(),
        rollout_status: "running".into(),
        rollout_created: r.created_at,
        release: r.release.clone(),
        phase: phase as i64,
        target: row.target.to_owned(),
        length: row.length,
        hashes,
        status: "queued".into(),
        version,
        progress_done: None,
    })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pending_width_counts_pending_columns() {
        assert_eq!(super::PENDING_COLUMNS.split(',').count(), super::PENDING_WIDTH);
    }
}
