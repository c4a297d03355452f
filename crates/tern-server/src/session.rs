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
//! devices no longer approved) is reloaded whenever the database's `fleet` counter moves;
//! every process checks the counter every 250 ms, and a process that changes the fleet
//! reloads at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sqlx::Row;

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

/// The fleet as far as polls need it.
#[derive(Debug, Default)]
pub struct FleetView {
    generation: i64,
    /// Devices with a deployment row waiting for them to fetch an order.
    pending: HashSet<String>,
    /// Devices that are not approved (rejected, decommissioned, pending).
    blocked: HashSet<String>,
}

/// The view, its refresher, and the last-seen times polls leave behind.
#[derive(Default)]
pub struct Fleet {
    view: RwLock<FleetView>,
    reload: tokio::sync::Mutex<()>,
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

impl Fleet {
    /// Answer a poll from memory and note the time.
    pub fn poll(&self, device: &str) -> PollAnswer {
        let answer = match self.view.read() {
            Ok(v) if v.blocked.contains(device) => PollAnswer::Blocked,
            Ok(v) if v.pending.contains(device) => PollAnswer::CheckIn,
            Ok(_) => PollAnswer::Nothing,
            // A poisoned view: make the device check in, which reads the database.
            Err(_) => PollAnswer::CheckIn,
        };
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(device.to_owned(), unix_now());
        }
        answer
    }

    /// Reload the view if the database's counter moved (or `force`).
    pub async fn refresh(&self, state: &AppState, force: bool) -> Result<()> {
        let _one = self.reload.lock().await;
        let generation: i64 = sqlx::query("SELECT value FROM counters WHERE name = 'fleet'")
            .fetch_one(&state.db.pool)
            .await?
            .try_get(0)?;
        let known = self.view.read().map(|v| v.generation).unwrap_or(-1);
        if generation == known && !force {
            return Ok(());
        }
        let pending = sqlx::query(
            "SELECT DISTINCT dd.device_id FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id
             WHERE dd.status IN ('queued', 'downloading', 'installing') AND d.status = 'active'",
        )
        .fetch_all(&state.db.pool)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<std::result::Result<HashSet<_>, _>>()?;
        let blocked = sqlx::query("SELECT id FROM devices WHERE status <> 'approved'")
            .fetch_all(&state.db.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<std::result::Result<HashSet<_>, _>>()?;
        if let Ok(mut v) = self.view.write() {
            *v = FleetView {
                generation,
                pending,
                blocked,
            };
        }
        Ok(())
    }

    /// Write the last-seen times polls noted (one transaction).
    async fn flush_seen(&self, state: &AppState) -> Result<()> {
        let seen: Vec<(String, i64)> = match self.seen.lock() {
            Ok(mut s) => s.drain().collect(),
            Err(_) => return Ok(()),
        };
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = state.db.write.begin().await?;
        for (id, at) in seen {
            sqlx::query("UPDATE devices SET last_seen = $1 WHERE id = $2 AND (last_seen IS NULL OR last_seen < $1)")
                .bind(at)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Record a fleet change (in the caller's transaction or alone): every process reloads.
pub async fn bump<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(executor: E) -> Result<()> {
    sqlx::query("UPDATE counters SET value = value + 1 WHERE name = 'fleet'")
        .execute(executor)
        .await?;
    Ok(())
}

/// After a local change: bump and reload now.
pub async fn changed(state: &AppState) -> Result<()> {
    bump(&state.db.write).await?;
    state.fleet.refresh(state, false).await
}

/// The background task: reload on change every 250 ms, flush last-seen times every 5 s.
pub async fn run(state: Arc<AppState>) {
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Err(e) = state.fleet.refresh(&state, false).await {
            eprintln!("tern server: fleet view refresh failed: {e}");
        }
        ticks += 1;
        if ticks.is_multiple_of(20) {
            if let Err(e) = state.fleet.flush_seen(&state).await {
                eprintln!("tern server: last-seen flush failed: {e}");
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
