//! A check-in's two steps, batched ([`crate::batch`]): reading the device's row together
//! with the order it is following, and one transaction that records the check-in (the
//! compare-and-swap on its challenge that sets the next one) and applies the move its
//! report makes of its row in a rollout, with the fleet events polls learn from. A
//! rollout's phase opening brings its devices' reports in a burst (downloading, installing,
//! rebooting, trial, committed, a few seconds apart): each batch is one commit whatever the
//! number of check-ins and reports in it. A device entering a rollout keeps its own
//! transaction (once per device and rollout).

use std::collections::{HashMap, HashSet};

use sqlx::Row;

use super::orders::{Pending, PENDING_COLUMNS, PENDING_WIDTH};
use super::rows::{self, Move};
use std::sync::Arc;

use futures_util::FutureExt;
use sqlx::Connection;

use crate::batch::{bind_nulls, list, padded, rounds, values, BatchError, Batcher, Column, Held, Marks};
use crate::db::Db;

/// Requests answered by one statement at most. A write batch binds 10 values per device.
const MAX_BATCH: usize = 256;
/// Batches of one kind in flight at once.
const PARALLEL: usize = 4;

/// A device's row as its check-in needs it.
#[derive(Debug, Clone)]
pub(crate) struct DeviceRow {
    pub status: String,
    pub keyid: String,
    pub challenge: Option<String>,
    pub refused_order: Option<String>,
    pub device_type: String,
    pub hardware: String,
    pub tags: Vec<String>,
    /// Its oldest unfinished row in a rollout (what [`super::orders::unfinished`] reads).
    pub unfinished: Option<Pending>,
}

/// What an accepted check-in records on the device's row.
#[derive(Debug, Clone)]
pub(crate) struct Beat {
    pub id: String,
    pub now: i64,
    pub time: i64,
    pub nonce: String,
    pub phase: String,
    pub slots: String,
    pub refused_order: Option<String>,
    pub installed: Option<String>,
    /// The challenge the check-in answered: the row is changed only if it is still current.
    pub current: String,
    /// The challenge the device's next check-in must answer.
    pub next: String,
    /// The move the check-in's report makes of the device's row in a rollout, applied only
    /// if the check-in is recorded.
    pub report: Option<Report>,
}

/// A device's report, as the move it makes of its row.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub rollout: String,
    pub phase: i64,
    /// The status the row must still have (compare-and-swap).
    pub from: String,
    pub to: String,
    pub reason: Option<String>,
    pub progress: Option<(i64, i64)>,
}

/// What a write batch did with a beat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The challenge was still the one the check-in answered: the check-in is recorded.
    pub fresh: bool,
    /// Its report's move was applied (the row still had its `from`).
    pub moved: bool,
}

/// The two batchers.
pub(crate) struct Heartbeats {
    reads: Batcher<String, Option<DeviceRow>>,
    /// Write lanes; a device's beats always take the same one.
    writes: Vec<Batcher<Beat, Recorded>>,
}

impl Heartbeats {
    /// Start both batchers' tasks (inside a Tokio runtime).
    pub fn start(db: &Db) -> Heartbeats {
        let (pool, write) = (db.pool.clone(), db.write.clone());
        // SQLite has one writer. PostgreSQL commits batches side by side, each device always
        // in the same lane, so two batches never lock the same device row; they do share
        // the counter rows their reports move, which every transaction takes in one order.
        let lanes = match db.backend {
            crate::db::Backend::Sqlite => 1,
            crate::db::Backend::Postgres => PARALLEL,
        };
        let marks = Marks::from(db.backend);
        // SQLite's writer stays in its pool of one, which queues every writer of the server.
        let hold_writes = db.backend == crate::db::Backend::Postgres;
        let reads = Arc::new(Held::new(pool, true));
        Heartbeats {
            reads: Batcher::start(MAX_BATCH, PARALLEL, move |ids| read_batch(reads.clone(), marks, ids)),
            writes: (0..lanes)
                .map(|_| {
                    let lane = Arc::new(Held::new(write.clone(), hold_writes));
                    Batcher::start(MAX_BATCH, 1, move |beats| write_batch(lane.clone(), beats))
                })
                .collect(),
        }
    }

    /// The device's row, or `None` if no device has this id.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, BatchError> {
        self.reads.call(id.to_owned()).await
    }

    /// Record `beat` (of two check-ins answering one challenge, one is recorded) and apply
    /// its report.
    pub async fn record(&self, beat: Beat) -> Result<Recorded, BatchError> {
        let lane = super::policy::bucket(&beat.id) as usize % self.writes.len().max(1);
        self.writes[lane].call(beat).await
    }
}

const UNFINISHED: &str = "('queued', 'downloading', 'installing', 'rebooting', 'trial')";

async fn read_batch(conns: Arc<Held>, marks: Marks, ids: Vec<String>) -> Result<Vec<Option<DeviceRow>>, sqlx::Error> {
    let mut distinct: Vec<&str> = Vec::with_capacity(ids.len());
    let mut seen = HashSet::with_capacity(ids.len());
    for id in &ids {
        if seen.insert(id.as_str()) {
            distinct.push(id);
        }
    }
    // Padded with the last id again: `IN` does not mind, and each size is one statement.
    let size = padded(distinct.len());
    let list = list(marks, size);
    let sql = format!(
        "SELECT d.id, d.status, d.keyid, d.challenge, d.refused_order, d.device_type, d.hardware, d.tags,
                {PENDING_COLUMNS}, rd.created_at
         FROM devices d
         LEFT JOIN rollout_devices rd ON rd.device_id = d.id AND rd.status IN {UNFINISHED}
         LEFT JOIN rollouts r ON r.id = rd.rollout_id
         WHERE d.id IN {list}"
    );
    let bound: Arc<Vec<String>> = Arc::new(
        (0..size)
            .map(|n| distinct[n.min(distinct.len() - 1)].to_owned())
            .collect(),
    );
    let sql = Arc::new(sql);
    let rows = conns
        .run(|conn| {
            let (sql, bound) = (sql.clone(), bound.clone());
            async move {
                let mut q = sqlx::query(&sql);
                for id in bound.iter() {
                    q = q.bind(id.clone());
                }
                q.fetch_all(conn).await
            }
            .boxed()
        })
        .await?;
    // Each device's oldest unfinished row, as `ORDER BY rd.created_at, rd.rollout_id` has it.
    let mut found: HashMap<String, (DeviceRow, Option<(i64, String)>)> = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get(0)?;
        let pending = Pending::decode(&row, 8)?;
        let order = match &pending {
            Some(p) => Some((row.try_get::<i64, _>(8 + PENDING_WIDTH)?, p.rollout.clone())),
            None => None,
        };
        match found.get_mut(&id) {
            Some((dev, best)) => {
                if order.is_some() && (best.is_none() || order < *best) {
                    dev.unfinished = pending;
                    *best = order;
                }
            }
            None => {
                let dev = DeviceRow {
                    status: row.try_get(1)?,
                    keyid: row.try_get(2)?,
                    challenge: row.try_get(3)?,
                    refused_order: row.try_get(4)?,
                    device_type: row.try_get(5)?,
                    hardware: row.try_get(6)?,
                    tags: serde_json::from_str(&row.try_get::<String, _>(7)?).unwrap_or_default(),
                    unfinished: pending,
                };
                found.insert(id, (dev, order));
            }
        }
    }
    Ok(ids.iter().map(|id| found.get(id).map(|(d, _)| d.clone())).collect())
}

/// Columns of a write batch's `VALUES` rows, in order, and their types.
const BEAT_COLUMNS: [(&str, Column); 10] = [
    ("id", Column::Text),
    ("last_seen", Column::Int),
    ("last_time", Column::Int),
    ("last_nonce", Column::Text),
    ("phase", Column::Text),
    ("slots", Column::Text),
    ("refused_order", Column::Text),
    ("installed_version", Column::Text),
    ("current", Column::Text),
    ("next", Column::Text),
];

/// Times a write batch is tried when PostgreSQL ended it to break a deadlock or a
/// serialization conflict.
const WRITE_TRIES: usize = 3;

async fn write_batch(lane: Arc<Held>, beats: Vec<Beat>) -> Result<Vec<Recorded>, sqlx::Error> {
    let beats = Arc::new(beats);
    let mut tries = 0;
    loop {
        tries += 1;
        let outcome = lane
            .run(|conn| {
                let beats = beats.clone();
                async move { write_once(conn, &beats).await }.boxed()
            })
            .await;
        match outcome {
            // Every write of a batch is a compare-and-swap and the transaction was rolled
            // back: the batch runs again as it was.
            Err(e) if tries < WRITE_TRIES && is_conflict(&e) => continue,
            outcome => return outcome,
        }
    }
}

/// Whether PostgreSQL refused a transaction to break a deadlock (40P01) or a serialization
/// conflict (40001).
fn is_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

async fn write_once(conn: &mut sqlx::AnyConnection, beats: &[Beat]) -> Result<Vec<Recorded>, sqlx::Error> {
    // A device twice in one batch (two check-ins answering one challenge) goes into a later
    // round.
    let rounds = rounds(beats.iter().map(|b| b.id.as_str()));
    let mut recorded = vec![Recorded::default(); beats.len()];
    if rounds.len() == 1 && beats.iter().all(|b| b.report.is_none()) {
        // One statement, atomic by itself: no transaction's BEGIN and COMMIT round trips.
        let mut members = rounds.into_iter().next().unwrap_or_default();
        members.sort_unstable_by_key(|&i| beats[i].id.as_str());
        let updated = update_round(conn, members.iter().map(|&i| &beats[i])).await?;
        for i in members {
            recorded[i].fresh = updated.contains(beats[i].id.as_str());
        }
        return Ok(recorded);
    }
    let mut tx = conn.begin().await?;
    for mut members in rounds {
        // In id order, as every transaction that locks several device rows takes them.
        members.sort_unstable_by_key(|&i| beats[i].id.as_str());
        let updated = update_round(&mut tx, members.iter().map(|&i| &beats[i])).await?;
        for i in members {
            recorded[i].fresh = updated.contains(beats[i].id.as_str());
        }
    }
    // The reports of the check-ins recorded, as one set of moves.
    let (with_moves, moves): (Vec<usize>, Vec<Move>) = beats
        .iter()
        .enumerate()
        .filter(|(i, _)| recorded[*i].fresh)
        .filter_map(|(i, b)| {
            let r = b.report.as_ref()?;
            let m = Move {
                rollout: &r.rollout,
                device: &b.id,
                phase: r.phase,
                from: &r.from,
                to: &r.to,
                reason: r.reason.as_deref(),
                progress: r.progress,
            };
            Some((i, m))
        })
        .unzip();
    let moved = rows::transition_all(&mut tx, &moves).await?;
    let mut events = Vec::new();
    for ((&i, m), ok) in with_moves.iter().zip(&moves).zip(moved) {
        recorded[i].moved = ok;
        if ok && rows::polls_care(m.from, m.to) {
            events.push(m.device);
        }
    }
    crate::session::record_all_in(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(recorded)
}

/// One `UPDATE … FROM (VALUES …) RETURNING` for beats of distinct devices: the ids updated.
async fn update_round<'a>(
    conn: &mut sqlx::AnyConnection,
    beats: impl ExactSizeIterator<Item = &'a Beat>,
) -> Result<HashSet<String>, sqlx::Error> {
    let n = beats.len();
    // Padded with rows of NULLs, which match no device.
    let size = padded(n);
    let types = BEAT_COLUMNS.map(|(_, ty)| ty);
    let values = values(Marks::of(conn.backend_name()), size, &types);
    // VALUES columns are column1, column2, … on both engines.
    let col = |name: &str| {
        let i = BEAT_COLUMNS.iter().position(|(c, _)| *c == name).unwrap_or(0);
        format!("v.column{}", i + 1)
    };
    let sql = format!(
        "UPDATE devices SET last_seen = {}, last_time = {}, last_nonce = {}, phase = {}, slots = {},
                            refused_order = {}, installed_version = {}, challenge = {}
         FROM (VALUES {values}) AS v
         WHERE devices.id = {} AND devices.status = 'approved' AND devices.challenge = {}
         RETURNING devices.id",
        col("last_seen"),
        col("last_time"),
        col("last_nonce"),
        col("phase"),
        col("slots"),
        col("refused_order"),
        col("installed_version"),
        col("next"),
        col("id"),
        col("current"),
    );
    let mut q = sqlx::query(&sql);
    for b in beats {
        q = q
            .bind(b.id.clone())
            .bind(b.now)
            .bind(b.time)
            .bind(b.nonce.clone())
            .bind(b.phase.clone())
            .bind(b.slots.clone())
            .bind(b.refused_order.clone())
            .bind(b.installed.clone())
            .bind(b.current.clone())
            .bind(b.next.clone());
    }
    q = bind_nulls(q, size - n, &types);
    let rows = q.fetch_all(conn).await?;
    rows.iter().map(|r| r.try_get::<String, _>(0)).collect()
}
