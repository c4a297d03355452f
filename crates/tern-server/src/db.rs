//! The database: one pool (sqlx's `Any` driver), the same migrations and queries on SQLite
//! and PostgreSQL. Queries use `$N` placeholders, which both backends accept.

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};
use std::str::FromStr;

use crate::{random_hex, unix_now, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Characters of an audit entry's detail kept (the rest is summarised by its length).
pub const MAX_AUDIT_DETAIL: usize = 512;

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite (one server process).
    Sqlite,
    /// PostgreSQL (one or more server processes).
    Postgres,
}

/// The pools.
#[derive(Clone)]
pub struct Db {
    /// Connections for reads.
    pub pool: AnyPool,
    /// Connections for writes. On SQLite this is a single connection, so that writers in
    /// this process queue here instead of colliding on SQLite's lock and sleeping in its
    /// busy handler (which made the tail latency of check-ins 200–400 ms). On PostgreSQL it
    /// is the read pool.
    pub write: AnyPool,
    /// The backend.
    pub backend: Backend,
}

/// An audit entry.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// When (Unix microseconds).
    pub at_us: i64,
    /// Who: `token:ID (role)`, `device:ID`, `server:INSTANCE` or `local`.
    pub actor: String,
    /// What was attempted.
    pub action: String,
    /// On what.
    pub subject: String,
    /// `ok` or `refused`.
    pub outcome: String,
    /// Details or the refusal's reason.
    pub detail: String,
}

impl Db {
    /// Connect and run the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let options = AnyConnectOptions::from_str(url)?;
        let open = |n: u32| {
            AnyPoolOptions::new()
                .max_connections(n)
                // Well inside a request's timeout: a database that is down is an error the
                // client gets promptly, and the pool reconnects when it is back.
                .acquire_timeout(std::time::Duration::from_secs(10))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            // WAL lets readers run beside the one writer; FULL syncs every
                            // commit, so an acknowledged report survives a power cut.
                            conn.execute("PRAGMA journal_mode=WAL").await?;
                            conn.execute("PRAGMA synchronous=FULL").await?;
                            conn.execute("PRAGMA busy_timeout=15000").await?;
                            conn.execute("PRAGMA foreign_keys=ON").await?;
                        }
                        Ok(())
                    })
                })
                .connect_with(options.clone())
        };
        let (pool, write) = match backend {
            Backend::Sqlite => {
                let write = open(1).await?;
                (open(max_connections.clamp(1, 8)).await?, write)
            }
            Backend::Postgres => {
                let pool = open(max_connections.max(2)).await?;
                (pool.clone(), pool)
            }
        };
        // Several server processes may start at once against one PostgreSQL database: sqlx
        // takes an advisory lock around the migrations there.
        MIGRATOR.run(&write).await?;
        Ok(Db { pool, write, backend })
    }

    /// Give every device registered before rollouts existed its bucket (a hash of its id,
    /// `fleet::policy::bucket`), in transactions of 500.
    pub async fn fill_buckets(&self) -> Result<()> {
        loop {
            let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM devices WHERE bucket IS NULL LIMIT 500")
                .fetch_all(&self.pool)
                .await?;
            if ids.is_empty() {
                return Ok(());
            }
            let mut tx = self.write.begin().await?;
            for (id,) in &ids {
                sqlx::query("UPDATE devices SET bucket = $1 WHERE id = $2")
                    .bind(i64::from(crate::fleet::policy::bucket(id)))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
    }

    /// Append to the audit log. Every field is shortened and escaped (`tern_core::text`):
    /// callers pass what requests said, and a row stays under about 1 KiB whatever they said.
    pub async fn audit(&self, actor: &str, action: &str, subject: &str, outcome: &str, detail: &str) -> Result<()> {
        use tern_core::text::shown_max;
        let (actor, action, subject, outcome) = (
            shown_max(actor, 160),
            shown_max(action, 64),
            shown_max(subject, 200),
            shown_max(outcome, 16),
        );
        let detail = shown_max(detail, MAX_AUDIT_DETAIL);
        let at_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        sqlx::query(
            "INSERT INTO audit (id, at_us, actor, action, subject, outcome, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(random_hex(12))
        .bind(at_us)
        .bind(&actor)
        .bind(&action)
        .bind(&subject)
        .bind(&outcome)
        .bind(&detail)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Audit an operation's outcome: `ok` with `detail` of the value, or `refused` with the
    /// error. A failed audit write is reported on stderr; the operation's own result stands.
    pub async fn audit_result<T, E: std::fmt::Display>(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        result: &std::result::Result<T, E>,
        detail: impl FnOnce(&T) -> String,
    ) {
        let (outcome, text) = match result {
            Ok(v) => ("ok", detail(v)),
            Err(e) => ("refused", e.to_string()),
        };
        if let Err(e) = self.audit(actor, action, subject, outcome, &text).await {
            tracing::error!("audit write failed: {e}");
        }
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT at_us, actor, action, subject, outcome, detail FROM audit ORDER BY at_us DESC, id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    at_us: r.try_get(0)?,
                    actor: r.try_get(1)?,
                    action: r.try_get(2)?,
                    subject: r.try_get(3)?,
                    outcome: r.try_get(4)?,
                    detail: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Take or renew the lease `name` for `ttl_ms`; true when `holder` has it. One statement:
    /// the row is taken only if free, expired, or already ours, so two processes never
    /// both hold it.
    pub async fn try_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
        let now = crate::unix_now_ms();
        sqlx::query("INSERT INTO leases (name, holder, until_ms) VALUES ($1, '', 0) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .execute(&self.write)
            .await?;
        let done = sqlx::query(
            "UPDATE leases SET holder = $1, until_ms = $2 WHERE name = $3 AND (holder = $1 OR until_ms < $4)",
        )
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(name)
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Make a token; returns the secret string, shown once. Only a hash is stored.
    pub async fn create_token(&self, kind: &str, role: &str, name: &str) -> Result<String> {
        let id = random_hex(8);
        let secret = random_hex(24);
        sqlx::query(
            "INSERT INTO tokens (id, kind, role, name, secret_sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(kind)
        .bind(role)
        .bind(name)
        .bind(tern_core::digest::sha256_hex(secret.as_bytes()))
        .bind(unix_now())
        .execute(&self.write)
        .await?;
        let prefix = if kind == "enrollment" { "ternenroll" } else { "tern" };
        Ok(format!("{prefix}_{id}_{secret}"))
    }

    /// The token's id and role if `presented` is a live token of `kind`.
    pub async fn check_token(&self, kind: &str, presented: &str) -> Result<Option<(String, String)>> {
        let mut parts = presented.splitn(3, '_');
        let (Some(_), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(None);
        };
        if id.len() > 64 || secret.len() > 128 {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT role, secret_sha256 FROM tokens WHERE id = $1 AND kind = $2 AND revoked_at IS NULL")
                .bind(id)
                .bind(kind)
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else { return Ok(None) };
        let role: String = row.try_get(0)?;
        let stored: String = row.try_get(1)?;
        let presented_hash = tern_core::digest::sha256_hex(secret.as_bytes());
        if tern_core::digest::ct_eq(stored.as_bytes(), presented_hash.as_bytes()) {
            Ok(Some((id.to_owned(), role)))
        } else {
            Ok(None)
        }
    }

    /// Register approved devices in bulk: the path for benchmarks and fleet imports, where
    /// devices arrive approved instead of enrolling with a fleet token and waiting for an
    /// operator. Multi-row INSERTs of 500 devices, 20 of them per transaction, on the write
    /// pool; each device's `device_tags` rows are replaced in the same transaction.
    ///
    /// An id already registered is overwritten (key, type, hardware, tags) and approved, so
    /// that a reused database works; its replay guard (last nonce and device time) is kept
    /// when the key is the same and cleared with a new key. A decommissioned id is refused:
    /// decommissioning is final. Transactions committed before a refusal or failure stay.
    ///
    /// The caller vouches that ids and tags are well formed and that each `keyid` is its
    /// key's; ids must be distinct. Each transaction records a whole-fleet event, so running
    /// servers reload their fleet view (and forget cached keys) within a second.
    pub async fn register_devices(&self, devices: &[NewDevice]) -> Result<()> {
        const ROWS: usize = 500;
        const STATEMENTS_PER_TX: usize = 20;
        let mut seen = std::collections::HashSet::with_capacity(devices.len());
        if let Some(d) = devices.iter().find(|d| !seen.insert(d.id.as_str())) {
            return Err(crate::Error::Invalid(format!("device `{}` is listed twice", d.id)));
        }
        // `($first, $first+1, …extra), …`: `rows` rows of `per_row` numbered placeholders.
        let values = |rows: usize, per_row: usize, first: usize, extra: &str| {
            (0..rows)
                .map(|r| {
                    let at = first + r * per_row;
                    let params: Vec<String> = (at..at + per_row).map(|n| format!("${n}")).collect();
                    format!("({}{extra})", params.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let now = unix_now();
        for chunk in devices.chunks(ROWS * STATEMENTS_PER_TX) {
            let mut tx = self.write.begin().await?;
            for batch in chunk.chunks(ROWS) {
                let ids: Vec<String> = (1..=batch.len()).map(|n| format!("${n}")).collect();
                let ids = ids.join(", ");
                let sql = format!("SELECT id FROM devices WHERE status = 'decommissioned' AND id IN ({ids}) LIMIT 1");
                let mut query = sqlx::query(&sql);
                for d in batch {
                    query = query.bind(&d.id);
                }
                if let Some(row) = query.fetch_optional(&mut *tx).await? {
                    let id: String = row.try_get(0)?;
                    return Err(crate::Error::Refused(format!(
                        "device `{id}` is decommissioned: it cannot be registered again"
                    )));
                }
                // $1 is the time; each row's seven columns follow.
                let sql = format!(
                    "INSERT INTO devices (id, public_key, keyid, device_type, hardware, tags, bucket, status, enrolled_via, created_at, updated_at)
                     VALUES {}
                     ON CONFLICT (id) DO UPDATE SET public_key = excluded.public_key, keyid = excluded.keyid,
                       device_type = excluded.device_type, hardware = excluded.hardware, tags = excluded.tags,
                       status = 'approved', updated_at = excluded.updated_at,
                       last_nonce = CASE WHEN devices.keyid = excluded.keyid THEN devices.last_nonce END,
                       last_time = CASE WHEN devices.keyid = excluded.keyid THEN devices.last_time END
                     WHERE devices.status <> 'decommissioned'",
                    values(batch.len(), 7, 2, ", 'approved', 'import', $1, $1"),
                );
                let mut insert = sqlx::query(&sql).bind(now);
                for d in batch {
                    insert = insert
                        .bind(&d.id)
                        .bind(d.public_key.to_string())
                        .bind(&d.keyid)
                        .bind(&d.device_type)
                        .bind(&d.hardware)
                        .bind(serde_json::to_string(&d.tags).unwrap_or_else(|_| "[]".into()))
                        .bind(i64::from(crate::fleet::policy::bucket(&d.id)));
                }
                insert.execute(&mut *tx).await?;

                let sql = format!("DELETE FROM device_tags WHERE device_id IN ({ids})");
                let mut delete = sqlx::query(&sql);
                for d in batch {
                    delete = delete.bind(&d.id);
                }
                delete.execute(&mut *tx).await?;

                let tags: Vec<(&String, &String)> = batch
                    .iter()
                    .flat_map(|d| d.tags.iter().map(move |t| (&d.id, t)))
                    .collect();
                for rows in tags.chunks(ROWS) {
                    let sql = format!(
                        "INSERT INTO device_tags (device_id, tag) VALUES {} ON CONFLICT DO NOTHING",
                        values(rows.len(), 2, 1, "")
                    );
                    let mut insert = sqlx::query(&sql);
                    for (id, tag) in rows {
                        insert = insert.bind(*id).bind(*tag);
                    }
                    insert.execute(&mut *tx).await?;
                }
            }
            // Every server process reloads its fleet view: these devices' tags, types and
            // keys may have changed.
            crate::session::record_in(&mut tx, "*").await?;
            tx.commit().await?;
        }
        if self.backend == Backend::Postgres && !devices.is_empty() {
            // PostgreSQL's planner learns the tables' new size now, not at autovacuum's next
            // pass: until then it takes a table it last saw nearly empty for small, and plans
            // a check-in's batched update as a scan of every approved device.
            sqlx::query("ANALYZE devices, device_tags").execute(&self.write).await?;
        }
        Ok(())
    }
}

/// A device for [`Db::register_devices`].
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its id.
    pub id: String,
    /// Its public key, TUF key JSON.
    pub public_key: serde_json::Value,
    /// The key's id.
    pub keyid: String,
    /// Device type.
    pub device_type: String,
    /// Hardware revision.
    pub hardware: String,
    /// Tags for deployments.
    pub tags: Vec<String>,
}
