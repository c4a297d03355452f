//! A device's row in a rollout: created when the device is first ordered (or found to have
//! no target), moved by its signed reports, a timeout, a cancel it learns of, or an
//! operator. Every move is a compare-and-swap on the status, and in the same transaction
//! the rollout's counters move and the device's history gets its entry, so that progress
//! is never re-counted from the rows and never disagrees with them.

use std::collections::{BTreeMap, HashSet};

use sqlx::{Any, Row, Transaction};

use crate::batch::{bind_nulls, padded, rounds, values, Column, Marks};

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
    Ok(transition_all(tx, std::slice::from_ref(m)).await?.first() == Some(&true))
}

/// Whether polls learn of a move from `from` to `to`: the device enters or leaves the set
/// with an order waiting, or the set that reports on its own (rebooting, on trial).
/// queued → downloading → installing is one state to them.
pub fn polls_care(from: &str, to: &str) -> bool {
    let busy = |st: &str| matches!(st, "rebooting" | "trial");
    wants_order(from) != wants_order(to) || busy(from) != busy(to)
}

/// Move each row that still has its `from`, in a constant number of statements whatever
/// the number of moves (a row moved twice is moved in order, one statement per repeat):
/// which moved. The counters of every move are summed into one upsert, in a fixed order
/// of their keys, so that two such transactions never wait on each other's counter rows
/// in opposite orders.
pub async fn transition_all(tx: &mut Transaction<'_, Any>, moves: &[Move<'_>]) -> sqlx::Result<Vec<bool>> {
    let now = unix_now();
    let mut moved = vec![false; moves.len()];
    for members in rounds(moves.iter().map(|m| (m.rollout, m.device))) {
        let done = update_rows(tx, members.iter().map(|&i| &moves[i]), now).await?;
        for i in members {
            moved[i] = done.contains(&(moves[i].rollout.to_owned(), moves[i].device.to_owned()));
        }
    }
    let changed: Vec<&Move> = moves
        .iter()
        .zip(&moved)
        .filter(|(m, &ok)| ok && m.from != m.to)
        .map(|(m, _)| m)
        .collect();
    let mut deltas: BTreeMap<(&str, i64, &str), i64> = BTreeMap::new();
    for m in &changed {
        *deltas.entry((m.rollout, m.phase, m.from)).or_default() -= 1;
        *deltas.entry((m.rollout, m.phase, m.to)).or_default() += 1;
    }
    deltas.retain(|_, d| *d != 0);
    let deltas: Vec<_> = deltas.into_iter().collect();
    for chunk in deltas.chunks(MAX_ROWS) {
        counts(tx, chunk).await?;
    }
    for chunk in changed.chunks(MAX_ROWS) {
        let entries: Vec<Entry> = chunk
            .iter()
            .map(|m| Entry {
                device: m.device,
                rollout: m.rollout,
                from: m.from,
                to: m.to,
                reason: m.reason.unwrap_or(""),
            })
            .collect();
        histories(tx, &entries).await?;
    }
    Ok(moved)
}

/// Rows of one multi-row statement at most (a move binds 9 values).
const MAX_ROWS: usize = 512;

/// One `UPDATE … FROM (VALUES …)` for moves of distinct rows: the rows moved.
async fn update_rows<'a>(
    tx: &mut Transaction<'_, Any>,
    moves: impl ExactSizeIterator<Item = &'a Move<'a>>,
    now: i64,
) -> sqlx::Result<HashSet<(String, String)>> {
    use Column::{Int, Text};
    const COLUMNS: [Column; 9] = [Text, Text, Text, Text, Text, Int, Int, Int, Int];
    let marks = Marks::of(tx.backend_name());
    let mut moves: Vec<&Move> = moves.collect();
    // In key order: PostgreSQL locks the rows as the join meets them, and transactions that
    // meet them in one order cannot wait on each other in a cycle (a deadlock that still
    // happens, as the planner may join in another order, fails one transaction, which is
    // retried: see `heartbeat::write_batch`).
    moves.sort_unstable_by_key(|m| (m.rollout, m.device));
    let mut out = HashSet::with_capacity(moves.len());
    for chunk in moves.chunks(MAX_ROWS) {
        let size = padded(chunk.len());
        // Padded with rows of NULLs, which match no row.
        let values = values(marks, size, &COLUMNS);
        // v.column1..9: rollout, device, from, to, reason, changed, done, total, now.
        let sql = format!(
            "UPDATE rollout_devices SET status = v.column4, reason = COALESCE(v.column5, rollout_devices.reason),
                    progress_done = COALESCE(v.column7, rollout_devices.progress_done),
                    progress_total = COALESCE(v.column8, rollout_devices.progress_total),
                    updated_at = v.column9,
                    status_since = CASE WHEN v.column6 = 1 THEN v.column9 ELSE rollout_devices.status_since END
             FROM (VALUES {values}) AS v
             WHERE rollout_devices.rollout_id = v.column1 AND rollout_devices.device_id = v.column2
               AND rollout_devices.status = v.column3
             RETURNING rollout_devices.rollout_id, rollout_devices.device_id"
        );
        let mut q = sqlx::query(&sql);
        for m in chunk {
            let (done, total) = m.progress.unzip();
            q = q
                .bind(m.rollout.to_owned())
                .bind(m.device.to_owned())
                .bind(m.from.to_owned())
                .bind(m.to.to_owned())
                .bind(m.reason.map(str::to_owned))
                .bind(i64::from(m.from != m.to))
                .bind(done)
                .bind(total)
                .bind(now);
        }
        q = bind_nulls(q, size - chunk.len(), &COLUMNS);
        for row in q.fetch_all(&mut **tx).await? {
            out.insert((row.try_get(0)?, row.try_get(1)?));
        }
    }
    Ok(out)
}

async fn count(tx: &mut Transaction<'_, Any>, rollout: &str, phase: i64, status: &str, delta: i64) -> Result<()> {
    counts(tx, &[((rollout, phase, status), delta)]).await?;
    Ok(())
}

/// Add each delta to its counter, in one statement.
async fn counts(tx: &mut Transaction<'_, Any>, deltas: &[((&str, i64, &str), i64)]) -> sqlx::Result<()> {
    if deltas.is_empty() {
        return Ok(());
    }
    use Column::{Int, Text};
    const COLUMNS: [Column; 4] = [Text, Int, Text, Int];
    let size = padded(deltas.len());
    let values = values(Marks::of(tx.backend_name()), size, &COLUMNS);
    let sql = format!(
        "INSERT INTO rollout_counts (rollout_id, phase, status, n)
         SELECT v.column1, v.column2, v.column3, v.column4 FROM (VALUES {values}) AS v WHERE v.column1 IS NOT NULL
         ON CONFLICT (rollout_id, phase, status) DO UPDATE SET n = rollout_counts.n + excluded.n"
    );
    let mut q = sqlx::query(&sql);
    for ((rollout, phase, status), delta) in deltas {
        q = q
            .bind(rollout.to_string())
            .bind(*phase)
            .bind(status.to_string())
            .bind(*delta);
    }
    q = bind_nulls(q, size - deltas.len(), &COLUMNS);
    q.execute(&mut **tx).await?;
    Ok(())
}

/// An entry of a device's history.
struct Entry<'a> {
    device: &'a str,
    rollout: &'a str,
    from: &'a str,
    to: &'a str,
    reason: &'a str,
}

/// Add entries to devices' histories, in one statement.
async fn histories(tx: &mut Transaction<'_, Any>, entries: &[Entry<'_>]) -> sqlx::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    use Column::{Int, Text};
    const COLUMNS: [Column; 7] = [Text, Text, Int, Text, Text, Text, Text];
    let at_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let size = padded(entries.len());
    let values = values(Marks::of(tx.backend_name()), size, &COLUMNS);
    let sql = format!(
        "INSERT INTO device_history (id, device_id, at_us, rollout_id, from_status, to_status, reason)
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7
         FROM (VALUES {values}) AS v WHERE v.column1 IS NOT NULL"
    );
    let mut q = sqlx::query(&sql);
    for e in entries {
        q = q
            .bind(random_hex(12))
            .bind(e.device.to_owned())
            .bind(at_us)
            .bind(e.rollout.to_owned())
            .bind(e.from.to_owned())
            .bind(e.to.to_owned())
            .bind(tern_core::text::shown_max(e.reason, 512));
    }
    q = bind_nulls(q, size - entries.len(), &COLUMNS);
    q.execute(&mut **tx).await?;
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
    histories(
        tx,
        &[Entry {
            device,
            rollout,
            from,
            to,
            reason,
        }],
    )
    .await?;
    Ok(())
}
