//! A check-in's two statements, batched ([`crate::batch`]): reading the device's row
//! together with the order it is following, and the compare-and-swap on its challenge that
//! records the check-in and sets the next one. The rest of a check-in (a report that moves a
//! row, a device entering a rollout) keeps its own transaction: those are the fleet's
//! changes, the heartbeat is its steady state.

use std::collections::{HashMap, HashSet};

use sqlx::any::AnyRow;
use sqlx::Row;

use super::orders::Pending;
use crate::batch::{padded, placeholders, BatchError, Batcher};
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
}

/// The two batchers.
pub(crate) struct Heartbeats {
    reads: Batcher<String, Option<DeviceRow>>,
    /// Write lanes; a device's beats always take the same one.
    writes: Vec<Batcher<Beat, bool>>,
}

impl Heartbeats {
    /// Start both batchers' tasks (inside a Tokio runtime).
    pub fn start(db: &Db) -> Heartbeats {
        let (pool, write) = (db.pool.clone(), db.write.clone());
        // SQLite has one writer. PostgreSQL commits batches side by side, each device always
        // in the same lane: two batches never wait on each other's row locks, so they cannot
        // deadlock.
        let lanes = match db.backend {
            crate::db::Backend::Sqlite => 1,
            crate::db::Backend::Postgres => PARALLEL,
        };
        Heartbeats {
            reads: Batcher::start(MAX_BATCH, PARALLEL, move |ids| read_batch(pool.clone(), ids)),
            writes: (0..lanes)
                .map(|_| {
                    let write = write.clone();
                    Batcher::start(MAX_BATCH, 1, move |beats| write_batch(write.clone(), beats))
                })
                .collect(),
        }
    }

    /// The device's row, or `None` if no device has this id.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, BatchError> {
        self.reads.call(id.to_owned()).await
    }

    /// Record `beat`: whether the device's challenge was still the one it answered (of two
    /// check-ins answering one challenge, one is recorded).
    pub async fn record(&self, beat: Beat) -> Result<bool, BatchError> {
        let lane = super::policy::bucket(&beat.id) as usize % self.writes.len().max(1);
        self.writes[lane].call(beat).await
    }
}

const UNFINISHED: &str = "('queued', 'downloading', 'installing', 'rebooting', 'trial')";

async fn read_batch(pool: sqlx::AnyPool, ids: Vec<String>) -> Result<Vec<Option<DeviceRow>>, sqlx::Error> {
    let mut distinct: Vec<&str> = Vec::with_capacity(ids.len());
    let mut seen = HashSet::with_capacity(ids.len());
    for id in &ids {
        if seen.insert(id.as_str()) {
            distinct.push(id);
        }
    }
    // Padded with the last id again: `IN` does not mind, and each size is one statement.
    let size = padded(distinct.len());
    let list = placeholders(1, size, |_, n| format!("${n}"));
    let sql = format!(
        "SELECT d.id, d.status, d.keyid, d.challenge, d.refused_order, d.device_type, d.hardware, d.tags,
                rd.rollout_id, r.status, r.created_at, r.release_name, rd.phase, rd.target, rd.target_length,
                rd.target_hashes, rd.status, rd.created_at
         FROM devices d
         LEFT JOIN rollout_devices rd ON rd.device_id = d.id AND rd.status IN {UNFINISHED}
         LEFT JOIN rollouts r ON r.id = rd.rollout_id
         WHERE d.id IN {list}"
    );
    let mut q = sqlx::query(&sql);
    for n in 0..size {
        q = q.bind(distinct[n.min(distinct.len() - 1)].to_owned());
    }
    let rows = q.fetch_all(&pool).await?;
    // Each device's oldest unfinished row, as `ORDER BY rd.created_at, rd.rollout_id` has it.
    let mut found: HashMap<String, (DeviceRow, Option<(i64, String)>)> = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get(0)?;
        let pending = pending_of(&row)?;
        let order = match &pending {
            Some(p) => Some((row.try_get::<i64, _>(17)?, p.rollout.clone())),
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

fn pending_of(row: &AnyRow) -> Result<Option<Pending>, sqlx::Error> {
    let Some(rollout) = row.try_get::<Option<String>, _>(8)? else {
        return Ok(None);
    };
    Ok(Some(Pending {
        rollout,
        rollout_status: row.try_get(9)?,
        rollout_created: row.try_get(10)?,
        release: row.try_get(11)?,
        phase: row.try_get(12)?,
        target: row.try_get(13)?,
        length: row.try_get(14)?,
        hashes: row.try_get(15)?,
        status: row.try_get(16)?,
    }))
}

/// Columns of a write batch's `VALUES` rows, in order, and whether each is a number.
const BEAT_COLUMNS: [(&str, bool); 10] = [
    ("id", false),
    ("last_seen", true),
    ("last_time", true),
    ("last_nonce", false),
    ("phase", false),
    ("slots", false),
    ("refused_order", false),
    ("installed_version", false),
    ("current", false),
    ("next", false),
];

async fn write_batch(write: sqlx::AnyPool, beats: Vec<Beat>) -> Result<Vec<bool>, sqlx::Error> {
    // A device twice in one batch (two check-ins answering one challenge) goes into a later
    // round: an UPDATE … FROM joining one row to two would apply either.
    let mut round_of = Vec::with_capacity(beats.len());
    let mut times: HashMap<&str, usize> = HashMap::with_capacity(beats.len());
    for b in &beats {
        let n = times.entry(b.id.as_str()).or_insert(0);
        round_of.push(*n);
        *n += 1;
    }
    let rounds = times.values().copied().max().unwrap_or(0);
    let mut recorded = vec![false; beats.len()];
    for round in 0..rounds {
        let members: Vec<usize> = (0..beats.len()).filter(|&i| round_of[i] == round).collect();
        let updated = update_round(&write, members.iter().map(|&i| &beats[i])).await?;
        for i in members {
            recorded[i] = updated.contains(beats[i].id.as_str());
        }
    }
    Ok(recorded)
}

/// One `UPDATE … FROM (VALUES …) RETURNING` for beats of distinct devices: the ids updated.
async fn update_round<'a>(
    write: &sqlx::AnyPool,
    beats: impl ExactSizeIterator<Item = &'a Beat>,
) -> Result<HashSet<String>, sqlx::Error> {
    let n = beats.len();
    // Padded with rows of NULLs, which match no device.
    let size = padded(n);
    let values = placeholders(size, BEAT_COLUMNS.len(), |c, k| {
        let ty = if BEAT_COLUMNS[c].1 { "BIGINT" } else { "TEXT" };
        format!("CAST(${k} AS {ty})")
    });
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
    for _ in n..size {
        for (_, number) in BEAT_COLUMNS {
            q = if number {
                q.bind(None::<i64>)
            } else {
                q.bind(None::<String>)
            };
        }
    }
    let rows = q.fetch_all(write).await?;
    rows.iter().map(|r| r.try_get::<String, _>(0)).collect()
}
