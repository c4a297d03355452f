//! `server.toml`, environment and flags.
//!
//! ```toml
//! listen = "127.0.0.1:8443"
//! data_dir = "/var/lib/tern-server"     # SQLite database, keys and artifacts by default
//! # database_url = "postgres://tern@db/tern"   # instead of SQLite
//! # artifact_dir = "/srv/tern/artifacts"       # shared by every server process
//! # key_dir = "/etc/tern-server/keys"          # the online snapshot, timestamp and director keys
//! poll_interval_secs = 300                # what devices are told
//! order_ttl_secs = 3600                   # how long a director order stays valid
//! session_ttl_secs = 3600                 # how long a device polls on one signed check-in
//! timestamp_expiry_secs = 86400           # timestamp lifetime; re-signed at half of it
//! snapshot_expiry_secs = 604800
//! max_upload_bytes = 17179869184
//! max_db_connections = 16
//! max_connections = 10000                 # open connections, all peers together
//! max_connections_per_peer = 1024         # from one IP address (a NAT may hide a fleet)
//! header_timeout_secs = 10                # to receive a request's headers
//! idle_timeout_secs = 60                  # a connection with no request, or a reader not reading
//! request_timeout_secs = 30               # a request's body and handling (uploads: a minimum rate)
//! min_upload_bytes_per_sec = 16384        # an upload slower than this on average (after 10 s) stops
//! max_pending_per_token = 1000            # devices one enrollment token keeps waiting for approval
//! enrollments_per_minute = 600            # enrollment attempts per token and minute (per process)
//! require_rollout_approval = false        # every rollout waits for a second admin's approval
//! rollout_tick_ms = 1000                  # how often the rollout engine looks at running rollouts
//! log = "info"                            # what is logged: a level or RUST_LOG's directives
//!                                         # (RUST_LOG, when set, wins)
//!
//! [tls]                                   # optional: HTTPS through rustls
//! cert = "server.crt"
//! key = "server.key"
//! client_ca = "device-ca.pem"             # optional: mutual TLS, device certificates enroll
//! ```
//!
//! Every key can also come from the environment (`TERN_SERVER_LISTEN`, `TERN_SERVER_DATA_DIR`,
//! `TERN_SERVER_DATABASE_URL`…, upper-cased) and the main ones from flags; flags win over
//! the environment, which wins over the file. Unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// HTTPS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// The device CA (PEM): devices presenting a certificate it issued, whose common name is
    /// their id and whose key is their device key, are enrolled without operator approval.
    /// Devices without a certificate can still enroll with a fleet token.
    pub client_ca: Option<PathBuf>,
}

/// The server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; default: SQLite in the data directory.
    pub database_url: Option<String>,
    /// Where payloads are stored; default `DATA/artifacts`.
    pub artifact_dir: Option<PathBuf>,
    /// Where the online keys are; default `DATA/keys`.
    pub key_dir: Option<PathBuf>,
    /// Seconds between device check-ins.
    #[serde(default = "default_poll")]
    pub poll_interval_secs: u64,
    /// Lifetime of a director order.
    #[serde(default = "default_order_ttl")]
    pub order_ttl_secs: u64,
    /// Lifetime of a device's session token (polls between signed check-ins).
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// Lifetime of a timestamp.
    #[serde(default = "default_timestamp_expiry")]
    pub timestamp_expiry_secs: u64,
    /// Lifetime of a snapshot.
    #[serde(default = "default_snapshot_expiry")]
    pub snapshot_expiry_secs: u64,
    /// Largest accepted bundle.
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// Database pool size.
    #[serde(default = "default_connections")]
    pub max_db_connections: u32,
    /// Open connections, all peers together; more are closed as they arrive.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Open connections from one IP address.
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: u32,
    /// Seconds to receive a request's headers.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_secs: u64,
    /// Seconds a connection may wait for its next request, or a response wait for its
    /// reader to take more bytes.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds to receive a request's body and answer it (bundle uploads have a minimum
    /// rate instead).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Slowest average rate of a bundle upload after its first 10 seconds, bytes a second.
    #[serde(default = "default_min_upload_rate")]
    pub min_upload_bytes_per_sec: u64,
    /// Devices one enrollment token may keep waiting for approval.
    #[serde(default = "default_max_pending")]
    pub max_pending_per_token: u64,
    /// Enrollment attempts per token and minute, in each server process.
    #[serde(default = "default_enrollments_per_minute")]
    pub enrollments_per_minute: u64,
    /// Whether every rollout must be approved by an admin other than its creator.
    #[serde(default)]
    pub require_rollout_approval: bool,
    /// Milliseconds between passes of the rollout engine (phases, thresholds, timeouts).
    #[serde(default = "default_rollout_tick")]
    pub rollout_tick_ms: u64,
    /// What is logged: a level (`info`) or `RUST_LOG`'s directives
    /// (`info,tern_server::request=debug`); `RUST_LOG`, when set, wins.
    pub log: Option<String>,
    /// HTTPS.
    pub tls: Option<TlsConfig>,
}

fn default_rollout_tick() -> u64 {
    1000
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_poll() -> u64 {
    300
}
fn default_order_ttl() -> u64 {
    3600
}
fn default_session_ttl() -> u64 {
    3600
}
fn default_timestamp_expiry() -> u64 {
    86_400
}
fn default_snapshot_expiry() -> u64 {
    7 * 86_400
}
fn default_max_upload() -> u64 {
    16 << 30
}
fn default_connections() -> u32 {
    16
}
fn default_max_connections() -> u32 {
    10_000
}
fn default_max_connections_per_peer() -> u32 {
    1024
}
fn default_header_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_request_timeout() -> u64 {
    30
}
fn default_min_upload_rate() -> u64 {
    16 << 10
}
fn default_max_pending() -> u64 {
    1000
}
fn default_enrollments_per_minute() -> u64 {
    600
}

impl ServerConfig {
    /// Defaults for a data directory.
    pub fn for_data_dir(data_dir: &Path) -> Self {
        ServerConfig {
            listen: default_listen(),
            data_dir: data_dir.to_owned(),
            database_url: None,
            artifact_dir: None,
            key_dir: None,
            poll_interval_secs: default_poll(),
            order_ttl_secs: default_order_ttl(),
            session_ttl_secs: default_session_ttl(),
            timestamp_expiry_secs: default_timestamp_expiry(),
            snapshot_expiry_secs: default_snapshot_expiry(),
            max_upload_bytes: default_max_upload(),
            max_db_connections: default_connections(),
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_connections_per_peer(),
            header_timeout_secs: default_header_timeout(),
            idle_timeout_secs: default_idle_timeout(),
            request_timeout_secs: default_request_timeout(),
            min_upload_bytes_per_sec: default_min_upload_rate(),
            max_pending_per_token: default_max_pending(),
            enrollments_per_minute: default_enrollments_per_minute(),
            require_rollout_approval: false,
            rollout_tick_ms: default_rollout_tick(),
            log: None,
            tls: None,
        }
    }

    /// Read a TOML file; relative paths are relative to it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut cfg: ServerConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(parent).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.data_dir);
        if let Some(p) = cfg.artifact_dir.as_mut() {
            resolve(p);
        }
        if let Some(p) = cfg.key_dir.as_mut() {
            resolve(p);
        }
        if let Some(t) = cfg.tls.as_mut() {
            resolve(&mut t.cert);
            resolve(&mut t.key);
            if let Some(ca) = t.client_ca.as_mut() {
                resolve(ca);
            }
        }
        Ok(cfg)
    }

    /// Apply `TERN_SERVER_*` variables from `vars`.
    pub fn apply_env(&mut self, vars: impl Iterator<Item = (String, String)>) -> Result<()> {
        for (k, v) in vars {
            let Some(name) = k.strip_prefix("TERN_SERVER_") else {
                continue;
            };
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| Error::Config(format!("{k}: `{v}` is not a number")))
            };
            let num32 = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| Error::Config(format!("{k}: `{v}` is not a number up to {}", u32::MAX)))
            };
            match name {
                "LISTEN" => self.listen = v,
                "DATA_DIR" => self.data_dir = v.into(),
                "DATABASE_URL" => self.database_url = Some(v),
                "ARTIFACT_DIR" => self.artifact_dir = Some(v.into()),
                "KEY_DIR" => self.key_dir = Some(v.into()),
                "POLL_INTERVAL_SECS" => self.poll_interval_secs = num(&v)?,
                "ORDER_TTL_SECS" => self.order_ttl_secs = num(&v)?,
                "SESSION_TTL_SECS" => self.session_ttl_secs = num(&v)?,
                "TIMESTAMP_EXPIRY_SECS" => self.timestamp_expiry_secs = num(&v)?,
                "SNAPSHOT_EXPIRY_SECS" => self.snapshot_expiry_secs = num(&v)?,
                "MAX_UPLOAD_BYTES" => self.max_upload_bytes = num(&v)?,
                "MAX_DB_CONNECTIONS" => self.max_db_connections = num32(&v)?,
                "MAX_CONNECTIONS" => self.max_connections = num32(&v)?,
                "MAX_CONNECTIONS_PER_PEER" => self.max_connections_per_peer = num32(&v)?,
                "HEADER_TIMEOUT_SECS" => self.header_timeout_secs = num(&v)?,
                "IDLE_TIMEOUT_SECS" => self.idle_timeout_secs = num(&v)?,
                "REQUEST_TIMEOUT_SECS" => self.request_timeout_secs = num(&v)?,
                "MIN_UPLOAD_BYTES_PER_SEC" => self.min_upload_bytes_per_sec = num(&v)?,
                "MAX_PENDING_PER_TOKEN" => self.max_pending_per_token = num(&v)?,
                "ENROLLMENTS_PER_MINUTE" => self.enrollments_per_minute = num(&v)?,
                "REQUIRE_ROLLOUT_APPROVAL" => {
                    self.require_rollout_approval = match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(Error::Config(format!("{k}: `{v}` is not true or false"))),
                    }
                }
                "ROLLOUT_TICK_MS" => self.rollout_tick_ms = num(&v)?,
                "LOG" => self.log = Some(v),
                _ => return Err(Error::Config(format!("{k}: unknown setting"))),
            }
        }
        Ok(())
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join("tern.db").display()),
        }
    }

    /// The artifact directory in effect.
    pub fn artifact_dir(&self) -> PathBuf {
        self.artifact_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("artifacts"))
    }

    /// The key directory in effect.
    pub fn key_dir(&self) -> PathBuf {
        self.key_dir.clone().unwrap_or_else(|| self.data_dir.join("keys"))
    }
}
