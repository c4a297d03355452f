//! `tern server …` (the server process and its local administration) and the management
//! client commands `tern release …`, `tern deployment …` (one-phase rollouts) and
//! `tern device list|approve|…`,
//! which talk to the management API with a bearer token.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use tern_server::ServerConfig;

use crate::output::{json, now, Format};

/// Where the server's state is: a config file, or a data directory (and database URL).
#[derive(Debug, Clone, clap::Args)]
pub struct Location {
    /// The server configuration file (TOML).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The data directory (SQLite database, keys, artifacts).
    #[arg(long, env = "TERN_SERVER_DATA_DIR")]
    pub data: Option<PathBuf>,
    /// `postgres://…` (default: SQLite in the data directory).
    #[arg(long, env = "TERN_SERVER_DATABASE_URL")]
    pub database_url: Option<String>,
}

impl Location {
    fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut cfg = match (&self.config, &self.data) {
            (Some(c), _) => ServerConfig::load(c)?,
            (None, Some(d)) => ServerConfig::for_data_dir(d),
            (None, None) => bail!("give --config FILE or --data DIR"),
        };
        cfg.apply_env(std::env::vars())?;
        if let Some(d) = &self.data {
            cfg.data_dir = d.clone();
        }
        if let Some(u) = &self.database_url {
            cfg.database_url = Some(u.clone());
        }
        Ok(cfg)
    }
}

/// `tern server`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make the online keys (snapshot, timestamp, director) and the director root, once per
    /// fleet: `tern server init --data /var/lib/tern-server`. The director's root key it
    /// prints must then go offline.
    Init(Location),
    /// Serve the fleet: the repository, the device registry, the director and the management
    /// API, on SQLite by default or PostgreSQL (`--database-url`), until stopped.
    #[command(after_help = "Example:\n  tern server run --config /etc/tern/server.toml\n  \
        RUST_LOG=info,tern_server::request=debug tern server run --data srv --listen 0.0.0.0:8080\n\n\
        Logs go to standard error: a line per request (not the polls, unless at debug) and per background job.")]
    Run(RunArgs),
    /// Local administration of tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check a configuration (file, environment and flags) and the files it names (online
    /// keys only their owner may read, TLS certificate and key, directories) without
    /// starting anything; each problem names the line and key at fault, and with none it
    /// prints what would be used.
    CheckConfig(Location),
}

/// `tern server run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub at: Location,
    /// Address to listen on (overrides the configuration).
    #[arg(long)]
    pub listen: Option<String>,
    /// Artifact directory (shared by every server process).
    #[arg(long)]
    pub artifact_dir: Option<PathBuf>,
    /// Key directory.
    #[arg(long)]
    pub key_dir: Option<PathBuf>,
}

/// `tern server token`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make an API token (admin, releaser or viewer) or a fleet enrollment token; printed once.
    Create(TokenArgs),
}

/// `tern server token create`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub at: Location,
    /// admin, releaser, viewer, or enrollment (a fleet enrollment token for devices).
    #[arg(long)]
    pub role: String,
    /// A name to recognise it by.
    #[arg(long, default_value = "")]
    pub name: String,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `tern server …`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Init(at) => {
            let cfg = at.config()?;
            let made = tern_server::keys::init(&cfg.key_dir(), now(), 10)?;
            println!("online keys in {}", cfg.key_dir().display());
            println!("  list these in the repository root (tern repo init --snapshot-key … --timestamp-key …):");
            println!("    snapshot  {}", made.snapshot_pub.display());
            println!("    timestamp {}", made.timestamp_pub.display());
            println!(
                "  provision devices with the director root {}",
                made.director_root.display()
            );
            println!(
                "  WARNING: {} is the director's OFFLINE root key: move it off this server now",
                made.director_root_key.display()
            );
            Ok(())
        }
        Command::CheckConfig(at) => {
            let cfg = at.config()?;
            crate::cmd::check::server(at.config.as_deref(), &cfg)
        }
        Command::Run(a) => {
            let mut cfg = a.at.config()?;
            if let Some(l) = a.listen {
                cfg.listen = l;
            }
            if a.artifact_dir.is_some() {
                cfg.artifact_dir = a.artifact_dir;
            }
            if a.key_dir.is_some() {
                cfg.key_dir = a.key_dir;
            }
            crate::logging::service(cfg.log.as_deref())?;
            runtime()?.block_on(async move {
                let state = tern_server::open(cfg).await?;
                let running = tern_server::start(state.clone()).await?;
                let scheme = if state.cfg.tls.is_some() { "https" } else { "http" };
                println!("tern server listening on {scheme}://{}", running.addr);
                tracing::info!(address = %running.addr, scheme, "listening");
                crate::systemd::ready(&format!("listening on {scheme}://{}", running.addr));
                tokio::spawn(crate::systemd::server_watchdog());
                running.task.await.context("server task")??;
                Ok(())
            })
        }
        Command::Token(TokenCommand::Create(a)) => {
            let kind = match a.role.as_str() {
                "admin" | "releaser" | "viewer" => "api",
                "enrollment" => "enrollment",
                other => bail!("role `{other}`: expected admin, releaser, viewer or enrollment"),
            };
            let cfg = a.at.config()?;
            let token = runtime()?.block_on(async move {
                let db = tern_server::db::Db::connect(&cfg.database_url(), 2).await?;
                let role = if kind == "enrollment" {
                    "device"
                } else {
                    a.role.as_str()
                };
                let token = db.create_token(kind, role, &a.name).await?;
                db.audit("local", "token.create", &format!("token:{kind}"), "ok", role)
                    .await?;
                Ok::<_, tern_server::Error>(token)
            })?;
            println!("{token}");
            Ok(())
        }
    }
}

/// The management API's address and token.
#[derive(Debug, Clone, clap::Args)]
pub struct Api {
    /// The server's base URL.
    #[arg(long, env = "TERN_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// An API token.
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// A tiny management client: one request, the JSON answer or the server's refusal.
/// Largest answer the management client reads.
const MAX_ANSWER: usize = 256 << 20;

/// A request body: bytes, or a file streamed as it is sent.
pub enum Upload {
    /// In memory.
    Bytes(Vec<u8>),
    /// Read as it is sent.
    File(std::fs::File),
}

impl From<Vec<u8>> for Upload {
    fn from(v: Vec<u8>) -> Self {
        Upload::Bytes(v)
    }
}

impl From<String> for Upload {
    fn from(v: String) -> Self {
        Upload::Bytes(v.into_bytes())
    }
}

pub fn call(api: &Api, method: reqwest::Method, path: &str, body: Option<Upload>) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", api.server.trim_end_matches('/'));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // A server that does not answer, or stops sending, is given up on.
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(120))
            .build()?;
        let mut req = client.request(method, &url);
        if let Some(t) = &api.token {
            req = req.bearer_auth(t);
        }
        match body {
            Some(Upload::Bytes(b)) => req = req.body(b),
            Some(Upload::File(f)) => req = req.body(reqwest::Body::from(tokio::fs::File::from_std(f))),
            None => {}
        }
        let mut resp = req.send().await.with_context(|| url.clone())?;
        let status = resp.status();
        // The server's answer is bounded like anything read from the network.
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ANSWER {
                bail!("{url}: the answer exceeds {MAX_ANSWER} bytes");
            }
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = value
                .pointer("/error/message")
                .and_then(|m| m.as_str())
                .map_or_else(|| String::from_utf8_lossy(&bytes).into_owned(), str::to_owned);
            bail!("{url}: HTTP {}: {msg}", status.as_u16());
        }
        Ok(value)
    })
}

pub(crate) fn print(api: &Api, v: &serde_json::Value, text: impl FnOnce(&serde_json::Value)) -> anyhow::Result<()> {
    match api.output {
        Format::Json => json(v),
        Format::Text => {
            text(v);
            Ok(())
        }
    }
}

/// `tern release`.
#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Upload a bundle: verified against the repository's root, published with a new
    /// snapshot and timestamp.
    Upload(UploadArgs),
    /// List releases.
    List(Api),
    /// Give the server the repository's first root (later roots arrive in bundles).
    SetRoot(SetRootArgs),
}

/// `tern release upload`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// The release's name (default: the payloads' version).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub api: Api,
}

/// `tern release set-root`.
#[derive(Debug, clap::Args)]
pub struct SetRootArgs {
    /// The root metadata (e.g. REPO/metadata/1.root.json).
    pub root: PathBuf,
    #[command(flatten)]
    pub api: Api,
}

fn targets_line(v: &serde_json::Value) -> String {
    v["targets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| format!("{} ({} bytes)", t["name"].as_str().unwrap_or("?"), t["length"]))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// `tern release …`.
pub fn release(cmd: ReleaseCommand) -> anyhow::Result<()> {
    match cmd {
        ReleaseCommand::Upload(a) => {
            // Streamed from the file: a bundle of several GiB does not pass through memory.
            let file = std::fs::File::open(&a.bundle).with_context(|| a.bundle.display().to_string())?;
            let path = match &a.name {
                Some(n) => format!(
                    "/api/v1/releases?name={}",
                    percent_encoding::utf8_percent_encode(n, percent_encoding::NON_ALPHANUMERIC)
                ),
                None => "/api/v1/releases".into(),
            };
            let v = call(&a.api, reqwest::Method::POST, &path, Some(Upload::File(file)))?;
            print(&a.api, &v, |v| {
                println!(
                    "published release {}: {}",
                    v["name"].as_str().unwrap_or("?"),
                    targets_line(v)
                )
            })
        }
        ReleaseCommand::List(api) => {
            let v = call(&api, reqwest::Method::GET, "/api/v1/releases", None)?;
            print(&api, &v, |v| {
                for r in v.as_array().into_iter().flatten() {
                    println!("{:<16} {}", r["name"].as_str().unwrap_or("?"), targets_line(r));
                }
            })
        }
        ReleaseCommand::SetRoot(a) => {
            let bytes = std::fs::read(&a.root).with_context(|| a.root.display().to_string())?;
            let v = call(
                &a.api,
                reqwest::Method::POST,
                "/api/v1/repository/root",
                Some(bytes.into()),
            )?;
            print(&a.api, &v, |v| {
                println!("repository root version {}", v["root_version"])
            })
        }
    }
}

/// `tern deployment`.
#[derive(Debug, Subcommand)]
pub enum DeploymentCommand {
    /// Deploy a release to one device, the devices with a tag, or a device type: a rollout
    /// of one phase, started at once (`tern rollout` has phases, thresholds and windows).
    Create(CreateDeploymentArgs),
    /// A deployment's status, device by device.
    Status(DeploymentIdArgs),
    /// Stop a deployment for the devices that have not begun installing.
    Cancel(DeploymentIdArgs),
    /// Release one device from a deployment whatever its stage (a device that lost its
    /// state would otherwise block later deployments to it).
    Abandon(AbandonArgs),
    /// List deployments.
    List(Api),
}

/// `tern deployment create`.
#[derive(Debug, clap::Args)]
#[group(id = "selector", required = true, multiple = false, args = ["device", "tag", "device_type"])]
pub struct CreateDeploymentArgs {
    /// The release.
    #[arg(long)]
    pub release: String,
    /// One device.
    #[arg(long)]
    pub device: Option<String>,
    /// Every approved device with this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Every approved device of this type.
    #[arg(long)]
    pub device_type: Option<String>,
    #[command(flatten)]
    pub api: Api,
}

/// A deployment id.
#[derive(Debug, clap::Args)]
pub struct DeploymentIdArgs {
    /// The deployment.
    pub id: String,
    #[command(flatten)]
    pub api: Api,
}

/// `tern deployment abandon`.
#[derive(Debug, clap::Args)]
pub struct AbandonArgs {
    /// The deployment.
    pub id: String,
    /// The device.
    #[arg(long)]
    pub device: String,
    #[command(flatten)]
    pub api: Api,
}

fn print_deployment(v: &serde_json::Value) {
    println!(
        "deployment {} of {} to {} {}: {}",
        v["id"].as_str().unwrap_or("?"),
        v["release"].as_str().unwrap_or("?"),
        v["selector_kind"].as_str().unwrap_or("?"),
        v["selector"].as_str().unwrap_or("?"),
        v["status"].as_str().unwrap_or("?")
    );
    for d in v["devices"].as_array().into_iter().flatten() {
        let progress = match (d["progress_done"].as_i64(), d["progress_total"].as_i64()) {
            (Some(a), Some(b)) if d["status"] == "downloading" && b > 0 => format!(" {}%", a * 100 / b),
            _ => String::new(),
        };
        let reason = d["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default();
        println!(
            "  {:<20} {}{progress}{reason}",
            d["device"].as_str().unwrap_or("?"),
            d["status"].as_str().unwrap_or("?")
        );
    }
}

/// `tern deployment …`.
pub fn deployment(cmd: DeploymentCommand) -> anyhow::Result<()> {
    match cmd {
        DeploymentCommand::Create(a) => {
            let body = serde_json::json!({
                "release": a.release, "device": a.device, "tag": a.tag, "device_type": a.device_type,
            });
            let v = call(
                &a.api,
                reqwest::Method::POST,
                "/api/v1/deployments",
                Some(body.to_string().into()),
            )?;
            print(&a.api, &v, print_deployment)
        }
        DeploymentCommand::Status(a) => {
            let v = call(
                &a.api,
                reqwest::Method::GET,
                &format!("/api/v1/deployments/{}", a.id),
                None,
            )?;
            print(&a.api, &v, print_deployment)
        }
        DeploymentCommand::Cancel(a) => {
            let v = call(
                &a.api,
                reqwest::Method::POST,
                &format!("/api/v1/deployments/{}/cancel", a.id),
                None,
            )?;
            print(&a.api, &v, print_deployment)
        }
        DeploymentCommand::Abandon(a) => {
            let v = call(
                &a.api,
                reqwest::Method::POST,
                &format!("/api/v1/deployments/{}/devices/{}/abandon", a.id, a.device),
                None,
            )?;
            print(&a.api, &v, print_deployment)
        }
        DeploymentCommand::List(api) => {
            let v = call(&api, reqwest::Method::GET, "/api/v1/deployments", None)?;
            print(&api, &v, |v| {
                for d in v.as_array().into_iter().flatten() {
                    print_deployment(d);
                }
            })
        }
    }
}

/// Operator commands on the registry.
#[derive(Debug, clap::Args)]
pub struct DeviceIdArgs {
    /// The device.
    pub id: String,
    /// Only if its registration has this key id (as `tern device key export` shows it on
    /// the device): an id someone else claimed first is not approved by mistake.
    #[arg(long)]
    pub keyid: Option<String>,
    #[command(flatten)]
    pub api: Api,
}

/// `tern device list`.
#[derive(Debug, clap::Args)]
pub struct DeviceListArgs {
    /// Only devices of this status (pending, approved, rejected, decommissioned).
    #[arg(long)]
    pub status: Option<String>,
    /// Only devices carrying this tag.
    #[arg(long)]
    pub tag: Option<String>,
    /// Only devices of this type.
    #[arg(long)]
    pub device_type: Option<String>,
    /// Only devices of this hardware revision.
    #[arg(long)]
    pub hardware: Option<String>,
    /// Only devices whose booted slot holds this version.
    #[arg(long = "installed-version")]
    pub installed_version: Option<String>,
    /// Only devices whose agent last reported this state (idle, trial, committed…).
    #[arg(long)]
    pub state: Option<String>,
    /// Only devices whose id contains this text.
    #[arg(long)]
    pub search: Option<String>,
    /// Devices per page.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Start after this id (the `next` of the previous page).
    #[arg(long)]
    pub after: Option<String>,
    #[command(flatten)]
    pub api: Api,
}

/// `s` percent-encoded for one URL path segment or query value.
pub(crate) fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A string field of a server's answer, shortened and escaped for the terminal.
pub(crate) fn field(v: &serde_json::Value, key: &str) -> String {
    tern_core::text::shown(v[key].as_str().unwrap_or("-"))
}

/// `tern device list`.
pub fn device_list(a: DeviceListArgs) -> anyhow::Result<()> {
    let mut query = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("status", &a.status),
        ("tag", &a.tag),
        ("device_type", &a.device_type),
        ("hardware", &a.hardware),
        ("version", &a.installed_version),
        ("state", &a.state),
        ("q", &a.search),
        ("after", &a.after),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={}", segment(v)));
        }
    }
    let path = format!("/api/v1/devices?{}", query.join("&"));
    let v = call(&a.api, reqwest::Method::GET, &path, None)?;
    print(&a.api, &v, |v| {
        if let Some(next) = v["next"].as_str() {
            eprintln!("more devices follow: --after {}", tern_core::text::shown(next));
        }
        for d in v["devices"].as_array().into_iter().flatten() {
            println!(
                "{:<20} {:<14} {:<12} {:<8} key {:.16} encryption {:<16} phase {}",
                field(d, "id"),
                field(d, "status"),
                field(d, "device_type"),
                field(d, "hardware"),
                field(d, "keyid"),
                field(d, "encryption_kid"),
                field(d, "phase")
            );
        }
    })
}

/// `tern device approve|reject|decommission`: the device's key ids are printed, to be
/// compared with what `tern device key export` shows on the device.
pub fn device_action(action: &str, a: DeviceIdArgs) -> anyhow::Result<()> {
    let mut path = format!("/api/v1/devices/{}/{action}", segment(&a.id));
    if let Some(k) = &a.keyid {
        path.push_str(&format!("?keyid={}", segment(k)));
    }
    let v = call(&a.api, reqwest::Method::POST, &path, None)?;
    print(&a.api, &v, |v| {
        println!(
            "device {}: {} (key {}, encryption key {})",
            field(v, "id"),
            field(v, "status"),
            field(v, "keyid"),
            field(v, "encryption_kid")
        )
    })
}

/// `tern device reset`: forget a pending or rejected registration.
pub fn device_reset(a: DeviceIdArgs) -> anyhow::Result<()> {
    let v = call(
        &a.api,
        reqwest::Method::POST,
        &format!("/api/v1/devices/{}/reset", segment(&a.id)),
        None,
    )?;
    print(&a.api, &v, |_| {
        println!(
            "device {}: registration forgotten; the id can enroll again",
            tern_core::text::shown(&a.id)
        )
    })
}
