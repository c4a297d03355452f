//! `agent.toml`: the device's configuration.
//!
//! ```toml
//! device_type = "tern-sim"
//! hardware_revision = "rev-a"
//! trusted_root = "root.json"          # relative paths are relative to this file
//! state_dir = "state"
//! boot_attempts = 3                   # attempts a new slot gets before the fallback
//! offline_install = "allow"           # "allow", "require-freshness" or "refuse"
//! rollback_floor = "enforce"          # the only policy: releases below the floor are refused
//! inbox = "inbox"                     # optional: bundles dropped here are installed by `agent run`
//! install_roots = ["/opt/apps"]       # where file and archive payloads may go (default: nowhere)
//! log = "info"                        # what is logged: a level or RUST_LOG's directives
//!
//! [bootloader]
//! backend = "sim"                     # "sim", "uboot", "grub" or "custom"
//! state = "bootloader.json"           # sim: the simulated environment
//! # uboot: fw_env_config = "/etc/fw_env.config", cmdline = "/proc/cmdline"
//! # grub:  grubenv = "/boot/efi/EFI/tern/grubenv", cmdline = "/proc/cmdline"
//! # custom: command = "/usr/lib/tern/bootloader", timeout_secs = 30
//!
//! [[slot]]
//! class = "rootfs"
//! name = "rootfs.0"
//! device = "slot-a.img"               # a block device, a character (MTD) device or a file
//! bootname = "A"
//!
//! [hooks]                             # all optional
//! pre_install = "hooks/pre-install"
//! post_install = "hooks/post-install"
//! health_check = "hooks/health-check"
//! on_rollback = "hooks/on-rollback"
//! reboot = "/sbin/reboot"             # run after an install that needs a reboot
//! timeout_secs = 60
//!
//! [server]                            # optional: `agent run` checks in with an update server
//! url = "https://updates.example.com"
//! device_id = "sim-0001"              # this device's id in the server's registry
//! director_root = "director-root.json" # the director's root, provisioned like trusted_root
//! device_key = "state/device.pem"     # default: STATE_DIR/device.pem (made by `tern device enroll`)
//! tags = ["lab"]                      # sent at enrollment
//! ca_cert = "server-ca.pem"           # optional: a private CA for the server's certificate
//! client_cert = "device.crt"          # optional: mutual TLS with a device CA certificate
//! poll_interval_secs = 300            # until the server says otherwise
//!
//! [encryption]                        # optional: keys that open encrypted payloads
//! key = "state/encryption.pem"        # default: STATE_DIR/encryption.pem (X25519, 0600;
//!                                     #   made by `tern device enroll` or `tern device key export`)
//! group_keys = ["/etc/tern/group-sensors.pem"]  # group keys this device was provisioned with
//! ```
//!
//! Unknown keys are errors (a typo must not silently fall back to a default); every error
//! names the key and the line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// Where the agent looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/tern/agent.toml";

/// Whether the device installs bundles from local media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OfflineInstall {
    /// Root chain, targets (with delegations), expiry and the rollback floor are enforced;
    /// snapshot and timestamp are verified when the bundle carries them.
    Allow,
    /// As `allow`, and the bundle must carry snapshot and timestamp.
    RequireFreshness,
    /// Local bundles are refused.
    Refuse,
}

/// The rollback-floor policy. There is deliberately no way to turn the floor off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackFloor {
    /// A release whose version is below the committed one is refused.
    #[default]
    Enforce,
}

/// The bootloader backend and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BootloaderConfig {
    /// The file-backed simulated bootloader.
    Sim {
        /// Its environment file.
        state: PathBuf,
    },
    /// U-Boot's environment through `fw_printenv`/`fw_setenv`.
    Uboot {
        /// The fw_env.config file.
        fw_env_config: PathBuf,
        /// Where the booted slot is read from (`tern.slot=NAME`).
        #[serde(default = "proc_cmdline")]
        cmdline: PathBuf,
    },
    /// GRUB's environment block through `grub-editenv`.
    Grub {
        /// The grubenv file.
        grubenv: PathBuf,
        /// Where the booted slot is read from (`tern.slot=NAME`).
        #[serde(default = "proc_cmdline")]
        cmdline: PathBuf,
    },
    /// An integrator's executable with documented verbs.
    Custom {
        /// The executable.
        command: PathBuf,
        /// Seconds each call may take.
        #[serde(default = "default_timeout")]
        timeout_secs: u64,
    },
}

fn proc_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

fn default_timeout() -> u64 {
    60
}

fn default_attempts() -> u32 {
    3
}

/// One slot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// What it holds (`rootfs`, `appfs`, …): payloads name a class.
    pub class: String,
    /// Its unique name.
    pub name: String,
    /// The block device, character device or file.
    pub device: PathBuf,
    /// The bootloader's name for it.
    pub bootname: String,
}

/// Integrator hooks: executables run with a documented environment (see `hooks`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    /// Before anything is written.
    pub pre_install: Option<PathBuf>,
    /// After the slot verified, before it is made primary.
    pub post_install: Option<PathBuf>,
    /// At the first boot of a new slot: exit 0 commits it.
    pub health_check: Option<PathBuf>,
    /// After a rollback was detected.
    pub on_rollback: Option<PathBuf>,
    /// Run when an install needs a reboot (none: the operator reboots).
    pub reboot: Option<PathBuf>,
    /// Seconds a hook may run before it is killed and counted as failed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

/// The update server `agent run` checks in with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Its base URL.
    pub url: String,
    /// Seconds between polls, until the server answers with its own interval.
    #[serde(default = "default_poll")]
    pub poll_interval_secs: u64,
    /// This device's id in the registry.
    pub device_id: String,
    /// The director's root metadata, provisioned with the device.
    pub director_root: PathBuf,
    /// The device's private key (default `STATE_DIR/device.pem`).
    pub device_key: Option<PathBuf>,
    /// Tags sent at enrollment.
    #[serde(default)]
    pub tags: Vec<String>,
    /// A CA certificate (PEM) to trust for the server's TLS certificate, besides the system's.
    pub ca_cert: Option<PathBuf>,
    /// The device certificate (PEM) from the fleet's device CA, for mutual TLS; its key is
    /// the device key.
    pub client_cert: Option<PathBuf>,
}

impl ServerConfig {
    /// The device key file in effect.
    pub fn device_key_path(&self, state_dir: &Path) -> PathBuf {
        self.device_key.clone().unwrap_or_else(|| state_dir.join("device.pem"))
    }
}

/// The device's key store for encrypted payloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The device's own X25519 key (default `STATE_DIR/encryption.pem`).
    pub key: Option<PathBuf>,
    /// Group keys (X25519, 0600) shared by the devices of a group.
    #[serde(default)]
    pub group_keys: Vec<PathBuf>,
}

fn default_poll() -> u64 {
    300
}

/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole configuration, paths resolved against the file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// What this device is.
    pub device_type: String,
    /// Its hardware revision.
    pub hardware_revision: String,
    /// The root metadata shipped with the device.
    pub trusted_root: PathBuf,
    /// Where the agent keeps its state.
    pub state_dir: PathBuf,
    /// Boot attempts a new slot gets.
    #[serde(default = "default_attempts")]
    pub boot_attempts: u32,
    /// Local media policy (required: it must be a decision, not a default).
    pub offline_install: OfflineInstall,
    /// Rollback floor policy.
    #[serde(default)]
    pub rollback_floor: RollbackFloor,
    /// A directory `agent run` installs bundles from.
    pub inbox: Option<PathBuf>,
    /// Directories file and archive payloads may be installed under (none: such payloads
    /// are refused), so that a signed payload cannot replace the agent's own configuration,
    /// state or trust anchor.
    #[serde(default)]
    pub install_roots: Vec<PathBuf>,
    /// The bootloader.
    pub bootloader: BootloaderConfig,
    /// The slots.
    #[serde(rename = "slot")]
    pub slots: Vec<SlotConfig>,
    /// Hooks.
    #[serde(default)]
    pub hooks: HooksConfig,
    /// The server.
    pub server: Option<ServerConfig>,
    /// Keys for encrypted payloads.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// What is logged: a level (`info`) or `RUST_LOG`'s directives; `RUST_LOG`, when set,
    /// wins.
    pub log: Option<String>,
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map_or(0, |i| i + 1)
}

/// The line of the last occurrence: where a duplicate is.
fn last_line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .last()
        .map_or(0, |(i, _)| i + 1)
}

fn valid_bootname(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl AgentConfig {
    /// The device's own encryption key file in effect.
    pub fn encryption_key_path(&self) -> PathBuf {
        self.encryption
            .key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("encryption.pem"))
    }

    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        use std::io::Read;
        let bad = |reason: String| Error::Config {
            path: path.to_owned(),
            reason,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(bad(format!("larger than {MAX_CONFIG_BYTES} bytes")));
        }
        Self::parse(path, &text)
    }

    /// Parse `text` as the file `path` (used for relative paths and messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_owned(),
            reason,
        };
        let mut cfg: AgentConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the key; add the line, which it gives as a byte span.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().trim().to_owned();
            match line {
                Some(l) => bad(format!("line {l}: {msg}")),
                None => bad(msg),
            }
        })?;
        let at = |needle: &str| line_of(text, needle);
        if cfg.slots.is_empty() {
            return Err(bad("`slot`: at least one [[slot]] is required".into()));
        }
        let mut names = BTreeSet::new();
        let mut bootnames = BTreeSet::new();
        for s in &cfg.slots {
            if !names.insert(s.name.clone()) {
                return Err(bad(format!(
                    "line {}: `slot.name` \"{}\" is used twice",
                    last_line_of(text, &format!("name = \"{}\"", s.name)),
                    s.name
                )));
            }
            if !valid_bootname(&s.bootname) {
                return Err(bad(format!(
                    "line {}: `slot.bootname` \"{}\" must be 1-32 of A-Z a-z 0-9 _ -",
                    at(&format!("\"{}\"", s.bootname)),
                    s.bootname
                )));
            }
            if !bootnames.insert(s.bootname.clone()) {
                return Err(bad(format!(
                    "line {}: `slot.bootname` \"{}\" is used twice",
                    last_line_of(text, &format!("bootname = \"{}\"", s.bootname)),
                    s.bootname
                )));
            }
        }
        for class in cfg.slots.iter().map(|s| &s.class).collect::<BTreeSet<_>>() {
            if cfg.slots.iter().filter(|s| &s.class == class).count() < 2 {
                return Err(bad(format!(
                    "line {}: `slot.class` \"{class}\" needs two slots (A and B)",
                    at(&format!("\"{class}\""))
                )));
            }
        }
        if cfg.boot_attempts == 0 {
            return Err(bad(format!(
                "line {}: `boot_attempts` must be at least 1",
                at("boot_attempts")
            )));
        }
        // Absolute, so that paths compare as they should (an install_path must lie under an
        // install root) whatever the agent's working directory and `--config` are.
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(parent).map_err(|e| bad(format!("the configuration's directory: {e}")))?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut cfg.trusted_root);
        resolve(&mut cfg.state_dir);
        if let Some(i) = cfg.inbox.as_mut() {
            resolve(i);
        }
        for r in &mut cfg.install_roots {
            resolve(r);
        }
        for s in &mut cfg.slots {
            resolve(&mut s.device);
        }
        if let Some(k) = cfg.encryption.key.as_mut() {
            resolve(k);
        }
        for k in &mut cfg.encryption.group_keys {
            resolve(k);
        }
        if let Some(server) = cfg.server.as_mut() {
            resolve(&mut server.director_root);
            for p in [&mut server.device_key, &mut server.ca_cert, &mut server.client_cert]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
        }
        match &mut cfg.bootloader {
            BootloaderConfig::Sim { state } => resolve(state),
            BootloaderConfig::Uboot { fw_env_config, cmdline } => {
                resolve(fw_env_config);
                resolve(cmdline);
            }
            BootloaderConfig::Grub { grubenv, cmdline } => {
                resolve(grubenv);
                resolve(cmdline);
            }
            BootloaderConfig::Custom { command, .. } => resolve(command),
        }
        let h = &mut cfg.hooks;
        for hook in [
            &mut h.pre_install,
            &mut h.post_install,
            &mut h.health_check,
            &mut h.on_rollback,
            &mut h.reboot,
        ]
        .into_iter()
        .flatten()
        {
            resolve(hook);
        }
        Ok(cfg)
    }

    /// Open the configured bootloader.
    pub fn bootloader(&self) -> Result<Box<dyn crate::bootloader::Bootloader>> {
        use crate::bootloader::*;
        Ok(match &self.bootloader {
            BootloaderConfig::Sim { state } => Box::new(SimBootloader::open(state)?),
            BootloaderConfig::Uboot { fw_env_config, cmdline } => Box::new(UbootEnv::new(
                fw_env_config.clone(),
                cmdline.clone(),
                "tern.slot".into(),
            )),
            BootloaderConfig::Grub { grubenv, cmdline } => {
                Box::new(GrubEnv::new(grubenv.clone(), cmdline.clone(), "tern.slot".into()))
            }
            BootloaderConfig::Custom { command, timeout_secs } => Box::new(CustomBootloader::new(
                command.clone(),
                std::time::Duration::from_secs(*timeout_secs),
            )),
        })
    }

    /// The slot with this bootname.
    pub fn slot_by_bootname(&self, bootname: &str) -> Option<&SlotConfig> {
        self.slots.iter().find(|s| s.bootname == bootname)
    }

    /// The slot with this name.
    pub fn slot(&self, name: &str) -> Option<&SlotConfig> {
        self.slots.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
device_type = "sim"
hardware_revision = "rev-a"
trusted_root = "root.json"
state_dir = "state"
offline_install = "allow"

[bootloader]
backend = "sim"
state = "bootloader.json"

[[slot]]
class = "rootfs"
name = "rootfs.0"
device = "a.img"
bootname = "A"

[[slot]]
class = "rootfs"
name = "rootfs.1"
device = "b.img"
bootname = "B"
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = AgentConfig::parse(Path::new("/etc/tern/agent.toml"), GOOD).unwrap();
        assert_eq!(c.state_dir, Path::new("/etc/tern/state"));
        assert_eq!(c.slots[1].device, Path::new("/etc/tern/b.img"));
        assert_eq!(c.boot_attempts, 3);
        assert_eq!(
            c.bootloader,
            BootloaderConfig::Sim {
                state: "/etc/tern/bootloader.json".into()
            }
        );
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let typo = GOOD.replace("hardware_revision", "hardware_revison");
        let e = AgentConfig::parse(Path::new("a.toml"), &typo).unwrap_err().to_string();
        assert!(e.contains("hardware_revison") && e.contains("line 3"), "{e}");
        let dup = GOOD.replace("bootname = \"B\"", "bootname = \"A\"");
        let e = AgentConfig::parse(Path::new("a.toml"), &dup).unwrap_err().to_string();
        assert!(
            e.contains("`slot.bootname` \"A\" is used twice") && e.contains("line 22"),
            "{e}"
        );
        let missing = GOOD.replace("offline_install = \"allow\"\n", "");
        let e = AgentConfig::parse(Path::new("a.toml"), &missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("offline_install"), "{e}");
        let wrong = GOOD.replace("\"allow\"", "\"yes\"");
        let e = AgentConfig::parse(Path::new("a.toml"), &wrong).unwrap_err().to_string();
        assert!(e.contains("line 6") && e.contains("yes"), "{e}");
    }
}
