//! Tern's update server.
//!
//! What it does: publishes the release repository (the release engineer's offline-signed
//! root, targets and delegations, with snapshot and timestamp signed here by online keys),
//! keeps the device registry (enrollment by fleet token and operator approval), answers
//! signed device check-ins with orders signed by the director's online key, runs phased
//! rollouts (thresholds, windows, timeouts, approval) tracked from the agents' reports, and offers a management API
//! authenticated by role-scoped tokens, every change and refusal audited.
//!
//! What it does not do: hold any offline key, or trust a device's report without its
//! signature. One database (SQLite by default, PostgreSQL for several processes) is the
//! single source of truth; payload files are content-addressed in the artifact directory.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod batch;
pub mod config;
pub mod db;
pub mod fleet;
pub mod keys;
pub mod lanes;
pub mod metrics;
pub mod recipients;
pub mod repo;
pub mod serve;
pub mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::ServerConfig;

/// Why the server could not start or a local command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The database failed a batch statement this request was part of ([`batch`]).
    #[error("database: {0}")]
    DbBatch(batch::BatchError),
    /// A migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A local file failed.
    #[error(transparent)]
    Fs(#[from] tern_fs::Error),
    /// Metadata failed.
    #[error(transparent)]
    Core(#[from] tern_core::Error),
    /// An I/O error.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Refused because of the current state (already present, a rollback…).
    #[error("{0}")]
    Refused(String),
    /// Refused because the input is invalid (a bundle that does not verify…).
    #[error("{0}")]
    Invalid(String),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Random hex of `bytes` bytes from the system's CSPRNG.
pub fn random_hex(bytes: usize) -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    // The system random source does not fail on Linux; if it ever did, an all-zero id
    // would collide on the primary key and the write would fail rather than go unnoticed.
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut buf);
    hex::encode(buf)
}

/// Everything a request handler needs.
pub struct AppState {
    /// The configuration.
    pub cfg: ServerConfig,
    /// The database.
    pub db: db::Db,
    /// The online keys.
    pub keys: keys::OnlineKeys,
    /// This process's name in leases and in `created_by` columns.
    pub instance: String,
    /// Enrolled device keys by device id: a cache, used only when the key id the registry
    /// names for the device now is the cached key's (a reset registration may come back with
    /// another key), and emptied of a device whenever a fleet event names it.
    pub device_keys: std::sync::Mutex<std::collections::HashMap<String, tern_core::PublicKey>>,
    /// Signs and checks session tokens (`KEY_DIR/session.key`).
    pub session_key: aws_lc_rs::hmac::Key,
    /// What polls need to know about the fleet, in memory.
    pub fleet: session::Fleet,
    /// Check-ins' reads and heartbeat writes, batched.
    pub(crate) heartbeats: fleet::heartbeat::Heartbeats,
    /// This process's counters and latencies for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Refusals audited this second, per caller and in all.
    refusals: std::sync::Mutex<RefusalBudget>,
    /// Enrollment attempts per token this minute.
    enrollments: std::sync::Mutex<std::collections::HashMap<String, (i64, u64)>>,
}

/// Refusals audited one by one per second and process, all callers together; beyond that
/// they are counted and summarised, so that a flood can neither fill the database nor
/// starve the (single SQLite) writer.
const REFUSALS_PER_SECOND: u32 = 50;
/// Refusals audited one by one per second for one caller: an API token, or all
/// unauthenticated requests together (their claims of who they are prove nothing), so
/// that one noisy caller cannot crowd the others out of the audit log.
const REFUSALS_PER_CALLER: u32 = 10;
/// Callers tracked in one second; more share the summary.
const MAX_CALLERS: usize = 4096;

/// Who a refusal is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// A request whose sender is not authenticated (what it claims is only a claim).
    Unauthenticated,
    /// An authenticated API token, by id.
    Token(&'a str),
}

#[derive(Debug, Default)]
struct RefusalBudget {
    second: i64,
    total: u32,
    callers: std::collections::HashMap<String, u32>,
    left_out: u64,
}

impl RefusalBudget {
    /// Whether this refusal is audited one by one; and the count left out in the last
    /// second, once, when a new second starts.
    fn charge(&mut self, caller: Caller<'_>, now: i64) -> (bool, Option<u64>) {
        let mut summary = None;
        if self.second != now {
            if self.left_out > 0 {
                summary = Some(self.left_out);
            }
            *self = RefusalBudget {
                second: now,
                ..Default::default()
            };
        }
        let key = match caller {
            Caller::Unauthenticated => "",
            Caller::Token(id) => id,
        };
        if !self.callers.contains_key(key) && self.callers.len() >= MAX_CALLERS {
            self.left_out += 1;
            return (false, summary);
        }
        let mine = self.callers.entry(key.to_owned()).or_default();
        *mine += 1;
        let mine = *mine;
        self.total += 1;
        let allowed = mine <= REFUSALS_PER_CALLER && self.total <= REFUSALS_PER_SECOND;
        if !allowed {
            self.left_out += 1;
        }
        (allowed, summary)
    }
}

impl AppState {
    /// Audit the refusal of a request whose sender is not authenticated, within the budget.
    pub async fn audit_refusal(&self, actor: &str, action: &str, subject: &str, detail: &str) {
        self.audit_refusal_of(Caller::Unauthenticated, actor, action, subject, detail)
            .await
    }

    /// Audit a refusal charged to `caller`, within the budgets.
    pub async fn audit_refusal_of(&self, caller: Caller<'_>, actor: &str, action: &str, subject: &str, detail: &str) {
        let (allowed, summary) = match self.refusals.lock() {
            Ok(mut b) => b.charge(caller, unix_now()),
            Err(_) => (true, None),
        };
        if let Some(n) = summary {
            self.audit_summary(n).await;
        }
        if allowed {
            if let Err(e) = self.db.audit(actor, action, subject, "refused", detail).await {
                tracing::error!("audit write failed: {e}");
            }
        }
    }

    /// Write the summary of the refusals left out in a second that has ended (called every
    /// second, so that a burst's summary does not wait for the next refusal).
    pub async fn flush_refusals(&self) {
        let left_out = match self.refusals.lock() {
            Ok(mut b) if b.second != unix_now() && b.left_out > 0 => std::mem::take(&mut b.left_out),
            _ => return,
        };
        self.audit_summary(left_out).await;
    }

    async fn audit_summary(&self, left_out: u64) {
        let detail =
            format!("{left_out} further refusals in one second, over the audit budgets, not logged one by one");
        if let Err(e) = self
            .db
            .audit("server", "audit.summary", "refusals", "refused", &detail)
            .await
        {
            tracing::error!("audit write failed: {e}");
        }
    }

    /// Count an enrollment attempt with token `id`; refused beyond the configured rate.
    pub fn enrollment_rate(&self, id: &str) -> std::result::Result<(), fleet::Refusal> {
        let minute = unix_now() / 60;
        let limit = self.cfg.enrollments_per_minute;
        let Ok(mut m) = self.enrollments.lock() else {
            return Ok(());
        };
        if m.len() > MAX_CALLERS {
            m.retain(|_, (at, _)| *at == minute);
        }
        let entry = m.entry(id.to_owned()).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 += 1;
        if entry.1 > limit {
            return Err(fleet::Refusal::TooMany(format!(
                "enrollment token {id} made more than {limit} enrollment attempts this minute; try again later"
            )));
        }
        Ok(())
    }
}

/// A running server.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Completes when the server stops.
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Open the database (running migrations) and load the online keys.
pub async fn open(cfg: ServerConfig) -> Result<Arc<AppState>> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| Error::Io(cfg.data_dir.display().to_string(), e))?;
    let db = db::Db::connect(&cfg.database_url(), cfg.max_db_connections).await?;
    let keys = keys::OnlineKeys::load(&cfg.key_dir())?;
    let instance = format!("{}-{}", std::process::id(), &random_hex(4));
    let session_key = session::load_key(&cfg.key_dir())?;
    sweep_stale(&cfg.artifact_dir());
    let heartbeats = fleet::heartbeat::Heartbeats::start(&db);
    let state = Arc::new(AppState {
        cfg,
        db,
        keys,
        instance,
        device_keys: Default::default(),
        session_key,
        heartbeats,
        fleet: Default::default(),
        metrics: Default::default(),
        refusals: Default::default(),
        enrollments: Default::default(),
    });
    state.db.fill_buckets().await?;
    state.fleet.refresh(&state, true).await?;
    Ok(state)
}

/// Remove what uploads killed mid-way left in `uploads/` and `tmp/`: files untouched for a
/// day (other processes sharing the directory may be uploading right now).
fn sweep_stale(artifacts: &std::path::Path) {
    let day = std::time::Duration::from_secs(86_400);
    for dir in ["uploads", "tmp"] {
        let Ok(entries) = std::fs::read_dir(artifacts.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > day);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Bind, then serve in the background: the timestamp re-signer runs beside the listener.
pub async fn start(state: Arc<AppState>) -> Result<Running> {
    let app = api::router(state.clone());
    let front = Arc::new(api::PollFront::new(state.clone()));
    let addr: SocketAddr = state
        .cfg
        .listen
        .parse()
        .map_err(|e| Error::Config(format!("listen `{}`: {e}", state.cfg.listen)))?;
    let tls = state.cfg.tls.as_ref().map(tls::acceptor).transpose()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io(addr.to_string(), e))?;
    let bound = listener.local_addr().map_err(|e| Error::Io(addr.to_string(), e))?;
    tokio::spawn(repo::resign_loop(state.clone()));
    tokio::spawn(session::run(state.clone()));
    tokio::spawn(fleet::engine::run(state.clone()));
    let limits = serve::Limits::of(&state.cfg);
    let task = tokio::spawn(async move {
        serve::serve(listener, app, front, tls, limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Io("serve".into(), e))
    });
    Ok(Running { addr: bound, task })
}
