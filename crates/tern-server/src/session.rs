//! The cheap steady state (DESIGN §6): a device proves its identity with a signed check-in
//! once per session and receives a short-lived session token; polls that find nothing new
//! carry only that token and cost about what a static file costs: an HMAC check and two
//! lookups in memory, no database statement and no public-key signature.
//!
//! Whenever an order is at stake the poll says so (`checkin: true`) and the device sends a
//! fresh signed, nonce-bearing check-in; orders are only ever given in answer to those.
//!
//! The token is `v1.DEVICE.EXPIRY.MAC`, MAC = HMAC-SHA256(session key, "tern-session-v1",
//! device, expiry), so any server process holding the key (`KEY_DIR/session.key`, 0600)
//! checks it without shared state. The in-memory fleet view (devices with an order waiting,
//! devices not approved) follows the database's `fleet` counter: every change that matters
//! to polls writes an event numbered by the counter (a device id, or `*` for a change to
//! many), every process checks the counter every 250 ms and looks up only the devices the
//! new events name, so an enrollment or a report costs a few statements, not a reload of
//! the fleet; a process that changes the fleet applies its event at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sqlx::Row;

use crate::fleet::policy::{self, RolloutSpec};
use crate::{unix_now, AppState, Error, Result};

const CONTEXT: &[u8] = b"tern-session-v1";

/// Make a session token for `device` valid until `expiry`.
pub fn issue(key: &aws_lc_rs::hmac::Key, device: &str, expiry: i64) -> String {
    let tag = aws_lc_rs::hmac::sign(key, &message(device, expiry));
    format!("v1.{device}.{expiry}.{}", hex::encode(tag.as_ref()))
}

fn message(device: &str, expiry: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + device.len() + 24);
    m.extend_from_slice(CONTEXT);
    m.push(0);
    m.extend_from_slice(device.as_bytes());
    m.push(0);
    m.extend_from_slice(expiry.to_string().as_bytes());
    m
}

/// Check a token for `device` at `now` (constant-time MAC comparison).
pub fn check(key: &aws_lc_rs::hmac::Key, token: &str, device: &str, now: i64) -> std::result::Result<(), &'static str> {
    if token.len() > 512 {
        return Err("malformed session token");
    }
    let mut parts = token.rsplitn(3, '.');
    let (Some(mac), Some(expiry), Some(head)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("malformed session token");
    };
    if head.strip_prefix("v1.") != Some(device) {
        return Err("the session token is for another device");
    }
    let expiry: i64 = expiry.parse().map_err(|_| "malformed session token")?;
    let mac = hex::decode(mac).map_err(|_| "malformed session token")?;
    aws_lc_rs::hmac::verify(key, &message(device, expiry), &mac).map_err(|_| "the session token is not valid")?;
    if expiry <= now {
        return Err("the session token has expired");
    }
    Ok(())
}

/// The event that tells every process to reload the list of running rollouts.
pub const ROLLOUTS_CHANGED: &str = "#rollouts";

/// A running rollout as polls and check-ins need it.
#[derive(Debug, Clone)]
pub struct ViewRollout {
    /// Id.
    pub id: String,
    /// Created (Unix seconds): newer rollouts are offered first.
    pub created_at: i64,
    /// Release.
    pub release: String,
    /// The release's targets.
    pub targets: Arc<Vec<crate::repo::ReleaseTarget>>,
    /// What it does.
    pub spec: Arc<RolloutSpec>,
    /// Its offset (`policy::offset`).
    pub offset: u32,
    /// The cut-offs of its open phases.
    pub open: Vec<u64>,
    /// Whether its maintenance window is open (refreshed every tick).
    pub window_open: bool,
}

impl ViewRollout {
    /// The open phase holding `device`, if any.
    pub fn phase_of(&self, device_bucket: u32) -> Option<usize> {
        policy::phase_of(policy::position(device_bucket, self.offset), &self.open)
    }
}

/// The fleet as far as polls need it.
#[derive(Debug, Default)]
pub struct FleetView {
    generation: i64,
    /// Devices with a rollout row waiting for them to fetch an order.
    pending: HashSet<String>,
    /// Devices with an unfinished row (rebooting, on trial): they report on their own.
    busy: HashSet<String>,
    /// Devices that are not approved (rejected, decommissioned, pending, reset).
    blocked: HashSet<String>,
    /// Running rollouts, newest first.
    rollouts: Arc<Vec<ViewRollout>>,
    /// Per running rollout, devices known to need nothing from it (not selected, or
    /// finished): learned from check-ins and from finished rows.
    settled: HashMap<String, HashSet<String>>,
}

/// The view, its refresher, and the last-seen times polls leave behind.
#[derive(Default)]
pub struct Fleet {
    view: RwLock<FleetView>,
    reload: tokio::sync::Mutex<()>,
    /// Refreshes begun (under `reload`).
    begun: std::sync::atomic::AtomicU64,
    seen: Mutex<HashMap<String, i64>>,
}

/// What a poll learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollAnswer {
    /// Nothing new.
    Nothing,
    /// An order is waiting: send a signed check-in.
    CheckIn,
    /// The device may not poll (not approved).
    Blocked,
}

/// Events read per refresh; a process further behind reloads the whole view.
const EVENT_BATCH: i64 = 10_000;
/// Device ids per `IN (…)` lookup.
const LOOKUP_CHUNK: usize = 500;
/// Devices per statement of the last-seen flush.
const SEEN_CHUNK: usize = 512;
/// How long events are kept (a process that slept longer reloads everything).
const EVENT_RETENTION_SECS: i64 = 3600;

impl Fleet {
    /// Answer a poll from memory and note the time.
    pub fn poll(&self, device: &str) -> PollAnswer {
        let answer = match self.view.read() {
            Ok(v) if v.blocked.contains(device) => PollAnswer::Blocked,
            Ok(v) if v.pending.contains(device) => PollAnswer::CheckIn,
            Ok(v) if v.busy.contains(device) || v.rollouts.is_empty() => PollAnswer::Nothing,
            Ok(v) => {
                let b = policy::bucket(device);
                // What the poll can tell of the selector without the device's attributes is
                // its device id; the rest a check-in learns once (then `settled`).
                let offered = v.rollouts.iter().any(|r| {
                    r.window_open
                        && r.spec.selector.device.as_deref().is_none_or(|d| d == device)
                        && r.phase_of(b).is_some()
                        && !v.settled.get(&r.id).is_some_and(|s| s.contains(device))
                });
                if offered {
                    PollAnswer::CheckIn
                } else {
                    PollAnswer::Nothing
                }
            }
            // A poisoned view: make the device check in, which reads the database.
            Err(_) => PollAnswer::CheckIn,
        };
        if let Ok(mut seen) = self.seen.lock() {
            let now = unix_now();
            match seen.get_mut(device) {
                Some(at) => *at = now,
                None => {
                    seen.insert(device.to_owned(), now);
                }
            }
        }
        answer
    }

    /// The running rollouts, newest first.
    pub fn running(&self) -> Arc<Vec<ViewRollout>> {
        self.view.read().map(|v| v.rollouts.clone()).unwrap_or_default()
    }

    /// Whether `device` is known to need nothing from rollout `id`.
    pub fn is_settled(&self, id: &str, device: &str) -> bool {
        self.view
            .read()
            .is_ok_and(|v| v.settled.get(id).is_some_and(|s| s.contains(device)))
    }

    /// Note that `device` needs nothing from these running rollouts (what its check-in found).
    pub fn settle(&self, device: &str, rollouts: &[String]) {
        if rollouts.is_empty() {
            return;
        }
        if let Ok(mut v) = self.view.write() {
            for id in rollouts {
                if v.rollouts.iter().any(|r| &r.id == id) {
                    v.settled.entry(id.clone()).or_default().insert(device.to_owned());
                }
            }
        }
    }

    /// Open or close maintenance windows by the clock.
    pub fn tick_windows(&self, now: i64) {
        let Ok(mut v) = self.view.write() else { return };
        let changed: Vec<bool> = v
            .rollouts
            .iter()
            .map(|r| r.spec.window.as_ref().is_none_or(|w| w.is_open(now)))
            .collect();
        if v.rollouts.iter().zip(&changed).any(|(r, open)| r.window_open != *open) {
            let mut list = (*v.rollouts).clone();
            for (r, open) in list.iter_mut().zip(changed) {
                r.window_open = open;
            }
            v.rollouts = Arc::new(list);
        }
    }

    /// Bring the view up to the database's counter: apply the events since the last
    /// refresh device by device, or reload everything (`force`, a `*` event, a gap, or
    /// more than [`EVENT_BATCH`] events behind).
    ///
    /// Callers that queued behind a refresh which began after they called are served by it
    /// (it read the counter after their change committed): a burst of reports costs one
    /// refresh, not one each behind the lock.
    pub async fn refresh(&self, state: &AppState, force: bool) -> Result<()> {
        let asked = self.begun.load(std::sync::atomic::Ordering::Acquire);
        let _one = self.reload.lock().await;
        if !force && self.begun.load(std::sync::atomic::Ordering::Acquire) > asked {
            return Ok(());
        }
        self.begun.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let generation: i64 = sqlx::query("SELECT value FROM counters WHERE name = 'fleet'")
            .fetch_one(&state.db.pool)
            .await?
            .try_get(0)?;
        let known = self.view.read().map(|v| v.generation).unwrap_or(-1);
        if generation == known && !force {
            return Ok(());
        }
        if !force && known >= 0 && generation > known && generation - known <= EVENT_BATCH {
            let rows = sqlx::query("SELECT seq, device_id FROM fleet_events WHERE seq > $1 AND seq <= $2 ORDER BY seq")
                .bind(known)
                .bind(generation)
                .fetch_all(&state.db.pool)
                .await?;
            let mut ids = Vec::with_capacity(rows.len());
            let mut expected = known + 1;
            let mut whole = false;
            let mut rollouts = false;
            for r in &rows {
                let seq: i64 = r.try_get(0)?;
                let id: String = r.try_get(1)?;
                // A gap: events were pruned while this process slept; only a reload is sure.
                whole |= seq != expected || id == "*";
                expected = seq + 1;
                if id == ROLLOUTS_CHANGED {
                    rollouts = true;
                } else {
                    ids.push(id);
                }
            }
            whole |= expected != generation + 1;
            if !whole {
                ids.sort();
                ids.dedup();
                if rollouts {
                    self.reload_rollouts(state).await?;
                }
                return self.apply_devices(state, generation, &ids).await;
            }
        }
        // The periodic reload with nothing new keeps what check-ins learned of the running
        // rollouts (devices they do not select); any other reload learns it again.
        self.reload_all(state, generation, force && generation == known).await
    }

    /// Read the running rollouts again, and the devices with an order waiting (a pause
    /// holds the orders not begun); the settled sets of rollouts still running stay.
    async fn reload_rollouts(&self, state: &AppState) -> Result<()> {
        let list = load_running(state).await?;
        let pending = pending_devices(state).await?;
        if let Ok(mut v) = self.view.write() {
            v.settled.retain(|id, _| list.iter().any(|r| &r.id == id));
            v.rollouts = Arc::new(list);
            v.pending = pending;
        }
        Ok(())
    }

    async fn reload_all(&self, state: &AppState, generation: i64, keep_settled: bool) -> Result<()> {
        let ids = |rows: Vec<sqlx::any::AnyRow>| {
            rows.iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<std::result::Result<HashSet<_>, _>>()
        };
        let pending = pending_devices(state).await?;
        let busy = ids(sqlx::query(
            "SELECT DISTINCT device_id FROM rollout_devices WHERE status IN ('rebooting', 'trial')",
        )
        .fetch_all(&state.db.pool)
        .await?)?;
        let blocked = ids(sqlx::query("SELECT id FROM devices WHERE status <> 'approved'")
            .fetch_all(&state.db.pool)
            .await?)?;
        let rollouts = load_running(state).await?;
        let mut settled: HashMap<String, HashSet<String>> = HashMap::new();
        for r in &rollouts {
            let done = sqlx::query(
                "SELECT device_id FROM rollout_devices WHERE rollout_id = $1
                 AND status IN ('succeeded', 'failed', 'rolled-back', 'timed-out', 'cancelled')",
            )
            .bind(&r.id)
            .fetch_all(&state.db.pool)
            .await?;
            settled.insert(r.id.clone(), ids(done)?);
        }
        if let Ok(mut keys) = state.device_keys.lock() {
            keys.clear();
        }
        if let Ok(mut v) = self.view.write() {
            if keep_settled {
                for (id, learned) in v.settled.drain() {
                    if let Some(s) = settled.get_mut(&id) {
                        s.extend(learned);
                    }
                }
            }
            *v = FleetView {
                generation,
                pending,
                busy,
                blocked,
                rollouts: Arc::new(rollouts),
                settled,
            };
        }
        Ok(())
    }

    /// Look up `ids` again (a few statements per [`LOOKUP_CHUNK`] devices) and update them.
    async fn apply_devices(&self, state: &AppState, generation: i64, ids: &[String]) -> Result<()> {
        let mut approved = HashSet::new();
        let mut pending = HashSet::new();
        let mut busy = HashSet::new();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let marks: Vec<String> = (1..=chunk.len()).map(|n| format!("${n}")).collect();
            let marks = marks.join(", ");
            let lookup = |sql: String| async move {
                let mut q = sqlx::query_as::<_, (String,)>(&sql);
                for id in chunk {
                    q = q.bind(id);
                }
                q.fetch_all(&state.db.pool).await
            };
            approved.extend(
                lookup(format!(
                    "SELECT id FROM devices WHERE status = 'approved' AND id IN ({marks})"
                ))
                .await?
                .into_iter()
                .map(|r| r.0),
            );
            pending.extend(
                lookup(format!(
                    "SELECT DISTINCT rd.device_id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
                     WHERE {WANTS_ORDER} AND rd.device_id IN ({marks})"
                ))
                .await?
                .into_iter()
                .map(|r| r.0),
            );
            busy.extend(
                lookup(format!(
                    "SELECT DISTINCT device_id FROM rollout_devices WHERE status IN ('rebooting', 'trial') AND device_id IN ({marks})"
                ))
                .await?
                .into_iter()
                .map(|r| r.0),
            );
        }
        // A device whose registration changed may have a new key (a reset and a new
        // enrollment): the cached one goes.
        if let Ok(mut keys) = state.device_keys.lock() {
            for id in ids {
                keys.remove(id);
            }
        }
        if let Ok(mut v) = self.view.write() {
            for id in ids {
                if approved.contains(id) {
                    v.blocked.remove(id);
                } else {
                    // Not approved, or no longer registered at all.
                    v.blocked.insert(id.clone());
                }
                let v = &mut *v;
                for (set, now) in [(&mut v.pending, pending.contains(id)), (&mut v.busy, busy.contains(id))] {
                    if now {
                        set.insert(id.clone());
                    } else {
                        set.remove(id);
                    }
                }
                // Its tags, type or rows may have changed: what it needs is learned again.
                for s in v.settled.values_mut() {
                    s.remove(id);
                }
            }
            v.generation = v.generation.max(generation);
        }
        Ok(())
    }

    /// Write the last-seen times polls noted: one transaction, one statement per
    /// [`SEEN_CHUNK`] devices.
    async fn flush_seen(&self, state: &AppState) -> Result<()> {
        // The map is taken whole, so polls wait on the lock for no longer than a swap.
        let mut seen: Vec<(String, i64)> = match self.seen.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => return Ok(()),
        }
        .into_iter()
        .collect();
        // In id order, as every transaction that locks several device rows takes them.
        seen.sort_unstable();
        if seen.is_empty() {
            return Ok(());
        }
        use crate::batch::Column::{Int, Text};
        const COLUMNS: [crate::batch::Column; 2] = [Text, Int];
        let mut tx = state.db.write.begin().await?;
        let marks = crate::batch::Marks::of(tx.backend_name());
        for chunk in seen.chunks(SEEN_CHUNK) {
            // Padded with rows of NULLs, which match no device.
            let size = crate::batch::padded(chunk.len());
            let values = crate::batch::values(marks, size, &COLUMNS);
            let sql = format!(
                "UPDATE devices SET last_seen = v.column2 FROM (VALUES {values}) AS v
                 WHERE devices.id = v.column1 AND (devices.last_seen IS NULL OR devices.last_seen < v.column2)"
            );
            let mut q = sqlx::query(&sql);
            for (id, at) in chunk {
                q = q.bind(id.as_str()).bind(*at);
            }
            q = crate::batch::bind_nulls(q, size - chunk.len(), &COLUMNS);
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Rows whose device must check in for its order (as `orders::Pending::wants_order`):
/// installing in any rollout (an install under way finishes), downloading in a running or
/// paused one, ordered and not begun in a running one (a pause holds those).
const WANTS_ORDER: &str =
    "(rd.status = 'installing' OR (rd.status = 'downloading' AND r.status IN ('running', 'paused'))
     OR (rd.status = 'queued' AND r.status = 'running'))";

/// The devices with an order waiting for them.
async fn pending_devices(state: &AppState) -> Result<HashSet<String>> {
    sqlx::query(&format!(
        "SELECT DISTINCT rd.device_id FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id
         WHERE {WANTS_ORDER}"
    ))
    .fetch_all(&state.db.pool)
    .await?
    .iter()
    .map(|r| r.try_get::<String, _>(0).map_err(Into::into))
    .collect()
}

/// The running rollouts with their releases' targets, newest first.
async fn load_running(state: &AppState) -> Result<Vec<ViewRollout>> {
    let rows = sqlx::query(&format!(
        "SELECT {} FROM rollouts WHERE status = 'running' ORDER BY created_at DESC, id",
        crate::fleet::ROLLOUT_COLUMNS
    ))
    .fetch_all(&state.db.pool)
    .await?;
    let now = unix_now();
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let r = crate::fleet::rollout_from_row(row).map_err(|e| Error::Refused(e.to_string()))?;
        let targets = crate::repo::release(state, &r.release)
            .await
            .map_err(|e| Error::Refused(e.to_string()))?
            .map(|rel| rel.targets)
            .unwrap_or_default();
        let open = r.cutoffs.iter().take(r.opened).copied().collect();
        out.push(ViewRollout {
            offset: policy::offset(&r.id),
            window_open: r.spec.window.as_ref().is_none_or(|w| w.is_open(now)),
            id: r.id,
            created_at: r.created_at,
            release: r.release,
            targets: Arc::new(targets),
            spec: Arc::new(r.spec),
            open,
        });
    }
    Ok(out)
}

/// Record, in the caller's transaction (the one making the change, so that the change and
/// its event commit together or not at all), that `device` (`*`: the whole fleet) changed
/// in a way polls must learn: the counter moves and the event gets its number.
pub async fn record_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, device: &str) -> Result<()> {
    record_all_in(tx, &[device]).await?;
    Ok(())
}

/// [`record_in`] for several devices, in two statements.
pub async fn record_all_in(tx: &mut sqlx::Transaction<'_, sqlx::Any>, devices: &[&str]) -> sqlx::Result<()> {
    if devices.is_empty() {
        return Ok(());
    }
    let last: i64 = sqlx::query("UPDATE counters SET value = value + $1 WHERE name = 'fleet' RETURNING value")
        .bind(devices.len() as i64)
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    let now = unix_now();
    for (k, chunk) in devices.chunks(1024).enumerate() {
        let first = last - devices.len() as i64 + 1 + (k * 1024) as i64;
        use crate::batch::Column::{Int, Text};
        const COLUMNS: [crate::batch::Column; 3] = [Int, Text, Int];
        let size = crate::batch::padded(chunk.len());
        // Padded with rows of NULLs, which are not inserted.
        let values = crate::batch::values(crate::batch::Marks::of(tx.backend_name()), size, &COLUMNS);
        let sql = format!(
            "INSERT INTO fleet_events (seq, device_id, at)
             SELECT v.column1, v.column2, v.column3 FROM (VALUES {values}) AS v WHERE v.column1 IS NOT NULL"
        );
        let mut q = sqlx::query(&sql);
        for (i, device) in chunk.iter().enumerate() {
            q = q.bind(first + i as i64).bind(device.to_string()).bind(now);
        }
        q = crate::batch::bind_nulls(q, size - chunk.len(), &COLUMNS);
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// [`record_in`] a transaction of its own.
pub async fn record(state: &AppState, device: &str) -> Result<()> {
    let mut tx = state.db.write.begin().await?;
    record_in(&mut tx, device).await?;
    tx.commit().await?;
    Ok(())
}

/// After a local change to one device: record it and update this process's view now.
pub async fn device_changed(state: &AppState, device: &str) -> Result<()> {
    record(state, device).await?;
    state.fleet.refresh(state, false).await
}

/// After a local change to many devices (a deployment created or cancelled): every
/// process reloads its whole view, once.
pub async fn changed(state: &AppState) -> Result<()> {
    record(state, "*").await?;
    state.fleet.refresh(state, false).await
}

/// Passes the background task began, in this process: a service manager's watchdog is
/// told the server is alive only while this moves.
pub fn passes() -> u64 {
    PASSES.load(std::sync::atomic::Ordering::Relaxed)
}

static PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The background task: follow the counter every 250 ms, flush last-seen times every 5 s,
/// prune old events every minute and reload everything every 10 minutes (a safety net for
/// a change made without an event, such as an edit by hand in the database).
pub async fn run(state: Arc<AppState>) {
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ticks += 1;
        PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let force = ticks.is_multiple_of(2400);
        state.fleet.tick_windows(unix_now());
        match state.fleet.refresh(&state, force).await {
            Ok(()) if force => tracing::debug!("fleet view reloaded whole"),
            Ok(()) => {}
            Err(e) => tracing::error!("fleet view refresh failed: {e}"),
        }
        if ticks.is_multiple_of(4) {
            state.flush_refusals().await;
        }
        if ticks.is_multiple_of(20) {
            if let Err(e) = state.fleet.flush_seen(&state).await {
                tracing::error!("last-seen flush failed: {e}");
            }
        }
        if ticks.is_multiple_of(240) {
            let old = unix_now() - EVENT_RETENTION_SECS;
            match sqlx::query("DELETE FROM fleet_events WHERE at < $1")
                .bind(old)
                .execute(&state.db.write)
                .await
            {
                Ok(done) => tracing::debug!(rows = done.rows_affected(), "pruned fleet events"),
                Err(e) => tracing::error!("pruning fleet events failed: {e}"),
            }
        }
    }
}

/// Load or make the session key (32 random bytes, 0600).
pub fn load_key(dir: &std::path::Path) -> Result<aws_lc_rs::hmac::Key> {
    use zeroize::Zeroize;
    let path = dir.join("session.key");
    if let Ok(meta) = std::fs::metadata(&path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::Config(format!(
                "{}: readable or writable by group or others (mode {:o}); it must be 0600",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
    }
    let mut bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use aws_lc_rs::rand::SecureRandom;
            let mut b = vec![0u8; 32];
            aws_lc_rs::rand::SystemRandom::new()
                .fill(&mut b)
                .map_err(|_| Error::Refused("random source failed".into()))?;
            match tern_fs::create_new(&path, &b, 0o600) {
                Ok(()) => b,
                // Another process made it first: use theirs.
                Err(_) => std::fs::read(&path).map_err(|e| Error::Io(path.display().to_string(), e))?,
            }
        }
        Err(e) => return Err(Error::Io(path.display().to_string(), e)),
    };
    if bytes.len() != 32 {
        bytes.zeroize();
        return Err(Error::Config(format!("{}: not a 32-byte session key", path.display())));
    }
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &bytes);
    bytes.zeroize();
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_device_and_expiry() {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[7u8; 32]);
        let other = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[8u8; 32]);
        let t = issue(&key, "dev.a", 1000);
        assert_eq!(check(&key, &t, "dev.a", 999), Ok(()));
        assert_eq!(check(&key, &t, "dev.a", 1000), Err("the session token has expired"));
        assert_eq!(
            check(&key, &t, "dev.b", 999),
            Err("the session token is for another device")
        );
        assert_eq!(check(&other, &t, "dev.a", 999), Err("the session token is not valid"));
        let forged = t.replace(".1000.", ".9000.");
        assert_eq!(
            check(&key, &forged, "dev.a", 999),
            Err("the session token is not valid")
        );
        assert!(check(&key, "garbage", "dev.a", 0).is_err());
    }
}
