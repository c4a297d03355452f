//! A device's row in a rollout: created when the device is first ordered (or found to have
//! no target), moved by its signed reports, a timeout, a cancel it learns of, or an
//! operator. Every move is a compare-and-swap on the status, and in the same transaction
//! the rollout's counters move and the device's history gets its entry, so that progress
//! is never re-counted from the rows and never disagrees with them.

use sqlx::{Any, Transaction};

use crate::{random_hex, unix_now, Result};

/// Statuses of a device's row that it does not leave.
pub const TERMINAL: [&str; 5] = ["succeeded", "failed", "rolled-back", "timed-out", "cancelled"];
/// Statuses in which the device still works on its order.
pub const UNFINISHED: [&str; 5] = ["queued", "downloading", "installing", "rebooting", "trial"];

/// Whether polls must make the device check in for its order in this status.
pub fn wants_order(status: &str) -> bool {
    matches!(status, "queued" | "downloading" | "installing")
}

/// What a new row holds.
pub struct NewRow<'a> {
    /// The rollout.
    pub rollout: &'a str,
    /// The device.
    pub device: &'a str,
    /// Its phase in the rollout.
    pub phase: usize,
    /// The target chosen for it (empty with a `failed` row).
    pub target: &'a str,
    /// Its length.
    pub length: i64,
    /// Its hashes, JSON.
    pub hashes: &'a str,
    /// Its version.
    pub version: &'a str,
    /// `queued`, or `failed` when the release has nothing for the device.
    pub status: &'a str,
    /// Why, for a failed row.
    pub reason: Option<&'a str>,
    /// Whether the row may only appear while the rollout runs with its phase open (every
    /// row a check-in makes); false for an operator's `abandon` of a device not yet ordered.
    pub only_if_open: bool,
}

/// Insert a row; false when the device already has one in this rollout, the device is not
/// approved, or the rollout is not running with the row's phase open (checked in the same
/// statement; on PostgreSQL the rollout's and the device's rows are first locked for share,
/// so a pause, cancel, stop or decommission either committed before, and is seen, or waits
/// for this transaction and reports the row as in flight).
pub async fn insert(tx: &mut Transaction<'_, Any>, row: &NewRow<'_>) -> Result<bool> {
    let now = unix_now();
    if row.only_if_open && tx.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT 1 FROM rollouts WHERE id = $1 FOR SHARE")
            .bind(row.rollout)
            .fetch_optional(&mut **tx)
            .await?;
        sqlx::query("SELECT 1 FROM devices WHERE id = $1 FOR SHARE")
            .bind(row.device)
            .fetch_optional(&mut **tx)
            .await?;
    }
    let done = sqlx::query(
        "INSERT INTO rollout_devices (rollout_id, device_id, phase, target, target_length, target_hashes, version, status,
                                      reason, created_at, updated_at, status_since)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $10
         WHERE $11 = 0 OR (EXISTS (SELECT 1 FROM rollouts WHERE id = $1 AND status = 'running' AND opened > $3)
                           AND EXISTS (SELECT 1 FROM devices WHERE id = $2 AND status = 'approved'))
         ON CONFLICT DO NOTHING",
    )
    .bind(row.rollout)
    .bind(row.device)
    .bind(row.phase as i64)
    .bind(row.target)
    .bind(row.length)
    .bind(row.hashes)
    .bind(row.version)
    .bind(row.status)
    .bind(row.reason)
    .bind(now)
    .bind(i64::from(row.only_if_open))
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    count(tx, row.rollout, row.phase as i64, row.status, 1).await?;
    history(tx, row.device, row.rollout, "", row.status, row.reason.unwrap_or("")).await?;
    Ok(true)
}

/// A move of one row.
pub struct Move<'a> {
    /// The rollout.
    pub rollout: &'a str,
    /// The device.
    pub device: &'a str,
    /// The row's phase.
    pub phase: i64,
    /// The status the row must still have.
    pub from: &'a str,
    /// The new status (may equal `from` for a progress update).
    pub to: &'a str,
    /// Why.
    pub reason: Option<&'a str>,
    /// Download progress, when the device reported it.
    pub progress: Option<(i64, i64)>,
}

/// Move a row if it still has `from`; false when something else moved it first.
pub async fn transition(tx: &mut Transaction<'_, Any>, m: &Move<'_>) -> Result<bool> {
    let now = unix_now();
    let (done, total) = match m.progress {
        Some((d, t)) => (Some(d), Some(t)),
        None => (None, None),
    };
    let changed = m.from != m.to;
    let moved = sqlx::query(
        "UPDATE rollout_devices SET status = $1, reason = COALESCE($2, reason),
                progress_done = COALESCE($3, progress_done), progress_total = COALESCE($4, progress_total),
                updated_at = $5, status_since = CASE WHEN $6 = 1 THEN $5 ELSE status_since END
         WHERE rollout_id = $7 AND device_id = $8 AND status = $9",
    )
    .bind(m.to)
    .bind(m.reason)
    .bind(done)
    .bind(total)
    .bind(now)
    .bind(i64::from(changed))
    .bind(m.rollout)
    .bind(m.device)
    .bind(m.from)
    .execute(&mut **tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Ok(false);
    }
    if changed {
        count(tx, m.rollout, m.phase, m.from, -1).await?;
        count(tx, m.rollout, m.phase, m.to, 1).await?;
        history(tx, m.device, m.rollout, m.from, m.to, m.reason.unwrap_or("")).await?;
    }
    Ok(true)
}

async fn count(tx: &mut Transaction<'_, Any>, rollout: &str, phase: i64, status: &str, delta: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO rollout_counts (rollout_id, phase, status, n) VALUES ($1, $2, $3, $4)
         ON CONFLICT (rollout_id, phase, status) DO UPDATE SET n = rollout_counts.n + excluded.n",
    )
    .bind(rollout)
    .bind(phase)
    .bind(status)
    .bind(delta)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Add an entry to a device's history.
pub async fn history(
    tx: &mut Transaction<'_, Any>,
    device: &str,
    rollout: &str,
    from: &str,
    to: &str,
    reason: &str,
) -> Result<()> {
    let at_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    sqlx::query(
        "INSERT INTO device_history (id, device_id, at_us, rollout_id, from_status, to_status, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(random_hex(12))
    .bind(device)
    .bind(at_us)
    .bind(rollout)
    .bind(from)
    .bind(to)
    .bind(tern_core::text::shown_max(reason, 512))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
