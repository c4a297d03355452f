//! The device side: `tern device simulate`, `tern sim reboot`, `tern install`,
//! `tern agent status` and `tern agent run`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use tern_agent::bootloader::SimBootloader;
use tern_agent::config::{AgentConfig, BootloaderConfig, DEFAULT_PATH};
use tern_agent::install::{self, Agent};
use tern_agent::source::{InboxSource, UpdateSource};

use crate::output::{json, now, Format};

pub(crate) fn load(config: &Option<PathBuf>) -> anyhow::Result<AgentConfig> {
    let path = config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    Ok(AgentConfig::load(&path)?)
}

/// `tern device`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Create a ready simulated device: file-backed A/B slots, a simulated bootloader, its
    /// configuration at DIR/agent.toml and a state directory.
    Simulate(SimulateArgs),
    /// On the device: make its key pair (if none) and enroll with the server using a fleet
    /// enrollment token; an operator then approves it.
    Enroll(EnrollArgs),
    /// The server's device registry, filtered and paged.
    List(crate::cmd::server::DeviceListArgs),
    /// Replace a device's tags on the server (admin); rollouts select by tags.
    Tag(crate::cmd::rollout::TagArgs),
    /// A device's history on the server: every rollout status change and refused order.
    History(crate::cmd::rollout::HistoryArgs),
    /// Approve a pending device (admin).
    Approve(crate::cmd::server::DeviceIdArgs),
    /// Reject a pending device (admin).
    Reject(crate::cmd::server::DeviceIdArgs),
    /// Decommission a device: it gets no more orders (admin).
    Decommission(crate::cmd::server::DeviceIdArgs),
    /// Forget a pending or rejected registration, so that the id can enroll again (admin):
    /// for an id someone else claimed first, or a device re-flashed with new keys.
    Reset(crate::cmd::server::DeviceIdArgs),
    /// The device's keys.
    #[command(subcommand)]
    Key(DeviceKeyCommand),
}

/// `tern device key`.
#[derive(Debug, Subcommand)]
pub enum DeviceKeyCommand {
    /// On the device: print its public keys as JSON (its encryption key is made first if it
    /// has none); the file is what `--encrypt-for FILE` reads.
    Export(crate::cmd::encrypt::KeyExportArgs),
}

/// `tern device enroll`.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The fleet enrollment token (`tern server token create --role enrollment`); without
    /// one, the device enrolls with its certificate (`client_cert`) over mutual TLS.
    #[arg(long, env = "TERN_ENROLLMENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `tern device simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The device's directory (created).
    #[arg(long)]
    pub dir: PathBuf,
    /// The trusted root metadata to provision (copied to DIR/root.json).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Device type.
    #[arg(long, default_value = "tern-sim")]
    pub device_type: String,
    /// Hardware revision.
    #[arg(long, default_value = "rev-a")]
    pub hardware: String,
    /// Size of each slot file in MiB (sparse).
    #[arg(long, default_value_t = 64)]
    pub slot_mib: u64,
    /// Local media policy written to the configuration.
    #[arg(long, default_value = "allow")]
    pub offline_install: String,
    /// The update server's URL (writes a [server] section).
    #[arg(long, requires_all = ["device_id", "director_root"])]
    pub server: Option<String>,
    /// The device's id in the server's registry.
    #[arg(long)]
    pub device_id: Option<String>,
    /// The director root to provision (copied to DIR/director-root.json).
    #[arg(long)]
    pub director_root: Option<PathBuf>,
    /// Tags sent at enrollment.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Seconds between check-ins until the server says otherwise.
    #[arg(long, default_value_t = 300)]
    pub poll_interval_secs: u64,
}

/// `tern sim`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Power-cycle a simulated device: the bootloader chooses a slot, counts the attempt,
    /// falls back if needed; then the agent's boot-time step runs.
    Reboot(ConfigArgs),
}

/// `--config` and `--output`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The agent configuration (default /etc/tern/agent.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// `tern install`.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// A bundle file, or an http(s):// URL of one.
    pub bundle: String,
    #[command(flatten)]
    pub common: ConfigArgs,
}

/// `tern agent`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// The state, the booted slot, each slot's version, hash and install time, the last error.
    Status(ConfigArgs),
    /// The agent's service: at start, the boot-time step (commit a new slot that booted and
    /// passes its health check, or record the rollback); then, every poll interval, check in
    /// with the server and the inbox, and install what they offer.
    #[command(after_help = "Example:\n  tern agent run --config /etc/tern/agent.toml\n  \
        tern agent run --config dev/agent.toml --once   # one pass, for scripts and tests")]
    Run(RunArgs),
    /// Check a configuration and the files it names (trusted root, slot devices, bootloader
    /// tools, keys only their owner may read, hooks) without starting anything; each
    /// problem names the line and key at fault, and with none it prints what would be used.
    CheckConfig(ConfigArgs),
}

/// `tern agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// One pass (boot-time step, one poll) instead of running until stopped.
    #[arg(long)]
    pub once: bool,
}

const FACTORY_VERSION: &str = "0.0.0";

/// `tern device simulate`.
pub fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    if a.dir.join("agent.toml").exists() {
        bail!("{}: a simulated device exists here already", a.dir.display());
    }
    std::fs::create_dir_all(&a.dir).with_context(|| a.dir.display().to_string())?;
    let dir = &a.dir;
    // Slot A holds a factory image; slot B is empty and not bootable.
    let factory: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    for (name, content) in [("slot-a.img", Some(&factory)), ("slot-b.img", None)] {
        let f = std::fs::File::create(dir.join(name))?;
        f.set_len(a.slot_mib << 20)?;
        if let Some(c) = content {
            std::io::Write::write_all(&mut &f, c)?;
        }
        f.sync_all()?;
    }
    let root_line = match &a.root {
        Some(r) => {
            std::fs::copy(r, dir.join("root.json")).with_context(|| format!("trusted root {}", r.display()))?;
            "trusted_root = \"root.json\"".to_owned()
        }
        None => "trusted_root = \"root.json\"   # provision the repository's root here".to_owned(),
    };
    let server_section = match (&a.server, &a.device_id, &a.director_root) {
        (Some(url), Some(id), Some(dr)) => {
            std::fs::copy(dr, dir.join("director-root.json"))
                .with_context(|| format!("director root {}", dr.display()))?;
            format!(
                "\n[server]\nurl = {}\ndevice_id = {}\ndirector_root = \"director-root.json\"\ntags = {}\npoll_interval_secs = {}\n",
                toml_str(url),
                toml_str(id),
                serde_json::to_string(&a.tags)?,
                a.poll_interval_secs
            )
        }
        _ => String::new(),
    };
    let config = format!(
        r#"# A simulated Tern device, made by `tern device simulate`.
device_type = "{dt}"
hardware_revision = "{hw}"
{root_line}
state_dir = "state"
boot_attempts = 3
offline_install = "{policy}"
rollback_floor = "enforce"
inbox = "inbox"
install_roots = ["apps"]

[bootloader]
backend = "sim"
state = "bootloader.json"

[[slot]]
class = "rootfs"
name = "rootfs.a"
device = "slot-a.img"
bootname = "A"

[[slot]]
class = "rootfs"
name = "rootfs.b"
device = "slot-b.img"
bootname = "B"

[hooks]
timeout_secs = 30
{server_section}"#,
        dt = a.device_type,
        hw = a.hardware,
        policy = a.offline_install
    );
    let cfg_path = dir.join("agent.toml");
    tern_fs::atomic_write(&cfg_path, config.as_bytes(), 0o644)?;
    let cfg = AgentConfig::load(&cfg_path)?;
    let BootloaderConfig::Sim { state } = &cfg.bootloader else {
        unreachable!("written above")
    };
    let mut boot = SimBootloader::create(state, &["A".into(), "B".into()], cfg.boot_attempts)?;
    tern_agent::bootloader::Bootloader::mark_bad(&mut boot, "B")?;
    std::fs::create_dir_all(dir.join("inbox"))?;
    std::fs::create_dir_all(dir.join("apps"))?;
    let store = tern_agent::state::Store::open(&cfg.state_dir)?;
    let mut st = store.load()?;
    let sha = tern_core::digest::sha256_hex(&factory);
    install::record_factory_slot(&mut st, "rootfs.a", FACTORY_VERSION, factory.len() as u64, sha, now());
    store.save(&st)?;
    println!(
        "simulated device in {} (config {}), booted from slot A",
        dir.display(),
        cfg_path.display()
    );
    Ok(())
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    // JSON string escaping is valid TOML basic-string escaping for these characters.
    serde_json::to_string(s).unwrap_or_default()
}

/// `tern device enroll`.
pub fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let cfg = load(&a.common.config)?;
    let v = tern_agent::remote::enroll(&cfg, a.token.as_deref())?;
    match a.common.output {
        Format::Json => json(&v),
        Format::Text => {
            println!(
                "device {} enrolled: {}",
                v["id"].as_str().unwrap_or("?"),
                v["status"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

/// `tern sim reboot`.
pub fn reboot(a: ConfigArgs) -> anyhow::Result<()> {
    let cfg = load(&a.config)?;
    let BootloaderConfig::Sim { state } = &cfg.bootloader else {
        bail!("`tern sim reboot` needs the sim bootloader (this device's backend is another)");
    };
    let mut boot = SimBootloader::open(state)?;
    let Some(booted) = boot.power_on()? else {
        bail!("no slot has boot attempts left: this device would not boot");
    };
    drop(boot);
    let mut agent = Agent::open(cfg)?;
    let outcome = agent.boot_step(now())?;
    match a.output {
        Format::Json => json(&serde_json::json!({"booted": booted, "boot_step": outcome})),
        Format::Text => {
            println!("booted slot {booted}: {}", serde_json::to_string(&outcome)?);
            Ok(())
        }
    }
}

fn fetch(url: &str, state_dir: &Path) -> anyhow::Result<PathBuf> {
    let limits = tern_client::Limits::default();
    let transport = tern_client::HttpTransport::new(&limits)?;
    let dest = state_dir.join("download.tern");
    let mut out = tern_fs::AtomicFile::create(&dest, 0o600)?;
    // The bundle is verified as it is installed; this bounds what is stored, and how slowly.
    let limit: u64 = 64 << 30;
    tern_client::fetch_to(&transport, url, out.file(), limit, &limits)?;
    out.commit()?;
    Ok(dest)
}

/// `tern install`.
pub fn install_cmd(a: InstallArgs) -> anyhow::Result<()> {
    let cfg = load(&a.common.config)?;
    let network = a.bundle.starts_with("http://") || a.bundle.starts_with("https://");
    let bundle = if network {
        fetch(&a.bundle, &cfg.state_dir)?
    } else {
        PathBuf::from(&a.bundle)
    };
    let origin = if network {
        install::Origin::Network
    } else {
        install::Origin::LocalMedia
    };
    let total = std::fs::metadata(&bundle)
        .map(|m| m.len())
        .with_context(|| format!("bundle {}", bundle.display()))?;
    let mut agent = Agent::open(cfg)?;
    let tty = std::io::stderr().is_terminal() && a.common.output == Format::Text;
    let bar = if tty {
        let b = indicatif::ProgressBar::new(total);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("installing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut written = 0u64;
    let mut next_line = 64u64 << 20;
    let plain = !tty && a.common.output == Format::Text;
    let mut progress = |n: u64| {
        written += n;
        bar.set_position(written);
        if plain && written >= next_line {
            eprintln!("installing: {} MiB written", written >> 20);
            next_line = written + (64 << 20);
        }
    };
    let report = agent
        .install_from(&bundle, origin, now(), &mut progress)
        .with_context(|| format!("install {}", bundle.display()));
    bar.finish_and_clear();
    if network {
        // The download was only a carrier; whatever happened, it is not kept.
        let _ = std::fs::remove_file(&bundle);
    }
    let report = report?;
    match a.common.output {
        Format::Json => json(&report),
        Format::Text => {
            for app in &report.applied {
                println!(
                    "installed {} {} at {}",
                    app.target,
                    app.version,
                    app.destination.display()
                );
            }
            if let Some(s) = &report.slot_image {
                println!(
                    "installed {} {} into slot {} ({}); reboot to try it",
                    s.release.target, s.release.version, s.slot, s.bootname
                );
            }
            Ok(())
        }
    }
}

/// `tern agent`.
pub fn agent(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Status(a) => {
            let cfg = load(&a.config)?;
            let st = install::status(&cfg)?;
            match a.output {
                Format::Json => json(&st),
                Format::Text => {
                    println!("state     {}", st.state.name());
                    println!("booted    {}", st.booted.as_deref().unwrap_or("?"));
                    println!("primary   {}", st.primary.as_deref().unwrap_or("?"));
                    println!("floor     {}", st.rollback_floor.as_deref().unwrap_or("none"));
                    for s in &st.slots {
                        let r = s.record.as_ref();
                        println!(
                            "slot      {} ({}) {:<9} version {:<8} attempts {} sha256 {}",
                            s.name,
                            s.bootname,
                            r.map_or("empty", |r| r.status.as_str()),
                            r.and_then(|r| r.version.as_deref()).unwrap_or("-"),
                            s.attempts.map_or("?".into(), |n| n.to_string()),
                            r.and_then(|r| r.sha256.as_deref()).unwrap_or("-"),
                        );
                    }
                    if let Some(e) = &st.last_error {
                        println!("error     {}: {}", e.kind, tern_core::text::escaped(&e.message));
                    }
                    Ok(())
                }
            }
        }
        AgentCommand::CheckConfig(a) => {
            let path = a
                .config
                .unwrap_or_else(|| PathBuf::from(tern_agent::config::DEFAULT_PATH));
            crate::cmd::check::agent(&path)
        }
        AgentCommand::Run(a) => {
            let cfg = load(&a.common.config)?;
            crate::logging::service(cfg.log.as_deref())?;
            let interval = std::time::Duration::from_secs(cfg.server.as_ref().map_or(60, |s| s.poll_interval_secs));
            let inbox = cfg.inbox.clone();
            // The state lock is held only while the agent works, never while it sleeps, so an
            // operator's `tern install` is not refused as busy.
            let outcome = Agent::open(cfg.clone())?.boot_step(now())?;
            tracing::info!(outcome = %serde_json::to_string(&outcome)?, "boot-time step done");
            crate::systemd::ready("boot-time step done");
            let mut sources: Vec<Box<dyn UpdateSource>> = Vec::new();
            if let Some(dir) = inbox {
                sources.push(Box::new(InboxSource::new(&dir)));
            }
            let mut remote = match &cfg.server {
                Some(_) => {
                    let mut remote = tern_agent::remote::Remote::new(cfg.clone())?;
                    remote.on_progress(crate::systemd::alive);
                    Some(remote)
                }
                None => None,
            };
            let mut interval = interval;
            loop {
                if let Some(r) = remote.as_mut() {
                    match r.poll_once() {
                        Ok(outcome) => {
                            if let tern_agent::remote::PollOutcome::Idle { poll_interval_secs } = &outcome {
                                // The interval comes from an unsigned answer: the server may
                                // shorten the configured one, never lengthen it.
                                let configured = cfg.server.as_ref().map_or(60, |s| s.poll_interval_secs).max(1);
                                interval = std::time::Duration::from_secs((*poll_interval_secs).clamp(1, configured));
                            }
                            let line = serde_json::to_string(&outcome)?;
                            if a.common.output == Format::Json {
                                println!("{line}");
                            }
                            tracing::info!(outcome = %line, "checked with the server");
                        }
                        Err(e) if a.once => return Err(e.into()),
                        Err(e) => tracing::warn!("server: {}", crate::output::chain(&e)),
                    }
                }
                for src in &mut sources {
                    let handled = install::status(&cfg).map(|s| s.handled_offers).unwrap_or_default();
                    let Some(offer) = src.poll(&handled)? else {
                        continue;
                    };
                    let shown = tern_core::text::shown(&offer.bundle.display().to_string());
                    tracing::info!(source = src.name(), bundle = %shown, "installing an offered bundle");
                    let result = Agent::open(cfg.clone())
                        .and_then(|mut agent| agent.install_offer(&offer, now(), &mut |_| crate::systemd::alive()));
                    // A refusal that may pass later (busy, a reboot pending, a read error on
                    // a flaky stick, a full disk, a hook saying "not now") keeps the offer.
                    let transient = matches!(
                        &result,
                        Err(tern_agent::Error::Busy { .. }
                            | tern_agent::Error::State { .. }
                            | tern_agent::Error::Io { .. }
                            | tern_agent::Error::DiskFull { .. }
                            | tern_agent::Error::Hook { .. })
                    );
                    match &result {
                        Ok(r) => tracing::info!(
                            result = %serde_json::to_string(r).unwrap_or_default(),
                            "installed {shown}"
                        ),
                        Err(e) => tracing::warn!(transient, "refused {shown}: {}", crate::output::chain(e)),
                    }
                    if transient {
                        continue;
                    }
                    // An install that succeeded recorded the offer itself, before any reboot.
                    if result.is_err() {
                        if let Err(e) = Agent::open(cfg.clone()).and_then(|mut agent| agent.offer_handled(&offer)) {
                            tracing::error!(
                                source = src.name(),
                                "recording {shown} as handled: {}",
                                crate::output::chain(&e)
                            );
                        }
                    }
                    // The rename is a courtesy: a read-only stick keeps the file, and the
                    // recorded offer keeps it from being installed again.
                    if let Err(e) = src.done(&offer) {
                        tracing::warn!(
                            source = src.name(),
                            "{shown} stays where it is: {}",
                            crate::output::chain(&e)
                        );
                    }
                }
                if a.once {
                    return Ok(());
                }
                crate::systemd::sleep(interval);
            }
        }
    }
}
