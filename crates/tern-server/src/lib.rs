//! Tern's update server.
//!
//! What it does: publishes the release repository (the release engineer's offline-signed
//! root, targets and delegations, with snapshot and timestamp signed here by online keys),
//! keeps the device registry (enrollment by fleet token and operator approval), answers
//! signed device check-ins with orders signed by the director's online key, tracks
//! deployments device by device from the agents' reports, and offers a management API
//! authenticated by role-scoped tokens, every change and refusal audited.
//!
//! What it does not do: hold any offline key, or trust a device's report without its
//! signature. One database (SQLite by default, PostgreSQL for several processes) is the
//! single source of truth; payload files are content-addressed in the artifact directory.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod db;
pub mod fleet;
pub mod keys;
pub mod recipients;
pub mod repo;
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
    /// Enrolled device keys by device id. A device's key never changes (enrollment refuses
    /// another key for an enrolled id), so the cache cannot go stale.
    pub device_keys: std::sync::Mutex<std::collections::HashMap<String, tern_core::PublicKey>>,
    /// Signs and checks session tokens (`KEY_DIR/session.key`).
    pub session_key: aws_lc_rs::hmac::Key,
    /// What polls need to know about the fleet, in memory.
    pub fleet: session::Fleet,
    /// Refusals of unauthenticated requests audited this second, and those left out.
    refusal_budget: std::sync::Mutex<(i64, u32, u64)>,
}

/// Refusals of unauthenticated requests audited one by one per second and process; beyond
/// that they are counted and summarised, so that a flood cannot fill the database or starve
/// the (single SQLite) writer.
const REFUSALS_PER_SECOND: u32 = 50;

impl AppState {
    /// Audit the refusal of a request whose sender is not authenticated, within the budget.
    pub async fn audit_refusal(&self, actor: &str, action: &str, subject: &str, detail: &str) {
        let now = unix_now();
        let (allowed, summary) = match self.refusal_budget.lock() {
            Ok(mut b) => {
                let mut summary = None;
                if b.0 != now {
                    if b.2 > 0 {
                        summary = Some(b.2);
                    }
                    *b = (now, 0, 0);
                }
                b.1 += 1;
                let allowed = b.1 <= REFUSALS_PER_SECOND;
                if !allowed {
                    b.2 += 1;
                }
                (allowed, summary)
            }
            Err(_) => (true, None),
        };
        if let Some(n) = summary {
            let _ = self
                .db
                .audit(
                    "server",
                    "audit.summary",
                    "refusals",
                    "refused",
                    &format!("{n} further refusals of unauthenticated requests in one second, not logged one by one"),
                )
                .await;
        }
        if allowed {
            if let Err(e) = self.db.audit(actor, action, subject, "refused", detail).await {
                eprintln!("tern server: audit write failed: {e}");
            }
        }
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
    let state = Arc::new(AppState {
        cfg,
        db,
        keys,
        instance,
        device_keys: Default::default(),
        session_key,
        fleet: Default::default(),
        refusal_budget: Default::default(),
    });
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
    let addr: SocketAddr = state
        .cfg
        .listen
        .parse()
        .map_err(|e| Error::Config(format!("listen `{}`: {e}", state.cfg.listen)))?;
    tokio::spawn(repo::resign_loop(state.clone()));
    tokio::spawn(session::run(state.clone()));
    if let Some(tls) = &state.cfg.tls {
        let rustls_cfg = tls::server_config(tls)?;
        let std_listener = std::net::TcpListener::bind(addr).map_err(|e| Error::Io(addr.to_string(), e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::Io(addr.to_string(), e))?;
        let bound = std_listener.local_addr().map_err(|e| Error::Io(addr.to_string(), e))?;
        let acceptor = tls::PeerCertAcceptor::new(axum_server::tls_rustls::RustlsAcceptor::new(rustls_cfg));
        let server = axum_server::from_tcp(std_listener)
            .map_err(|e| Error::Io(addr.to_string(), e))?
            .acceptor(acceptor);
        let task = tokio::spawn(async move {
            server
                .serve(app.into_make_service())
                .await
                .map_err(|e| Error::Io("serve".into(), e))
        });
        return Ok(Running { addr: bound, task });
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io(addr.to_string(), e))?;
    let bound = listener.local_addr().map_err(|e| Error::Io(addr.to_string(), e))?;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| Error::Io("serve".into(), e))
    });
    Ok(Running { addr: bound, task })
}
