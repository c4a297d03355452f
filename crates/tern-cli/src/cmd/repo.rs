//! `tern repo`: the release engineer's repository tool.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use tern_core::digest::HashAlgorithm;
use tern_core::manifest::{Compression, Installer, Manifest};
use tern_core::{KeyId, TargetPath};
use tern_repo::{AddTarget, Delegation, HashBins, RepoConfig, Repository, Rotation};

use super::{load_public, load_signers};
use crate::output::{json, now, writes, Format};

/// Repository commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository: root with per-role keys and thresholds, empty targets.
    Init(InitArgs),
    /// Publish a file as a target, with Tern's manifest.
    AddTarget(AddTargetArgs),
    /// Stop listing a target.
    RemoveTarget(RemoveTargetArgs),
    /// Delegate path patterns or hash prefixes to a new role with its own keys.
    Delegate(DelegateArgs),
    /// Delegate every path to 2^BITS succinct hash bins.
    DelegateBins(DelegateBinsArgs),
    /// Add signatures to the newest version of a role (for keys held on other machines).
    Sign(SignArgs),
    /// Change a role's keys or threshold (a root rotation writes N+1.root.json).
    Rotate(RotateArgs),
    /// Write a new snapshot and timestamp.
    Refresh(RefreshArgs),
    /// Change the expiry periods used from now on.
    Expires(ExpiresArgs),
    /// Show every role's version, expiry and signatures.
    Status(StatusArgs),
}

/// Options every editing command shares.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// The repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// Private key files to sign with; each role is signed by those it authorises.
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// `tern repo init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub common: Common,
    /// Root keys (public or private key files).
    #[arg(long = "root-key", required = true)]
    pub root_keys: Vec<PathBuf>,
    /// Root signatures required.
    #[arg(long, default_value_t = 1)]
    pub root_threshold: u32,
    /// Targets keys.
    #[arg(long = "targets-key", required = true)]
    pub targets_keys: Vec<PathBuf>,
    /// Targets signatures required.
    #[arg(long, default_value_t = 1)]
    pub targets_threshold: u32,
    /// Snapshot keys.
    #[arg(long = "snapshot-key", required = true)]
    pub snapshot_keys: Vec<PathBuf>,
    /// Snapshot signatures required.
    #[arg(long, default_value_t = 1)]
    pub snapshot_threshold: u32,
    /// Timestamp keys.
    #[arg(long = "timestamp-key", required = true)]
    pub timestamp_keys: Vec<PathBuf>,
    /// Timestamp signatures required.
    #[arg(long, default_value_t = 1)]
    pub timestamp_threshold: u32,
    /// Expiry periods, ROLE=DURATION (root, targets, delegated, snapshot, timestamp; e.g. timestamp=1d).
    #[arg(long = "expires")]
    pub expires: Vec<String>,
}

/// Installer names on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum InstallerArg {
    /// Raw image into a slot.
    Raw,
    /// Tar archive into a directory.
    Archive,
    /// A single file.
    File,
    /// A script hook.
    Script,
}

/// Compression names on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    /// Stored as is.
    None,
    /// Zstandard, compressed on the way into the repository.
    Zstd,
}

/// `tern repo add-target`.
#[derive(Debug, clap::Args)]
pub struct AddTargetArgs {
    #[command(flatten)]
    pub common: Common,
    /// The file to publish.
    pub file: PathBuf,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// How a file becomes a target: its name, role and manifest (`repo add-target`, and
/// `bundle create --image`).
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Target path (default: the file's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The role that lists it.
    #[arg(long, default_value = "targets")]
    pub role: String,
    /// Release version (SemVer). With it, Tern's manifest is written.
    #[arg(long)]
    pub release_version: Option<String>,
    /// Device type the payload is for.
    #[arg(long, requires = "release_version")]
    pub device_type: Option<String>,
    /// Compatible hardware revision (repeatable; none means any).
    #[arg(long = "hardware", requires = "release_version")]
    pub hardware: Vec<String>,
    /// How the agent installs it.
    #[arg(long, value_enum, default_value = "raw")]
    pub installer: InstallerArg,
    /// Slot class (rootfs, appfs, …) for slot installers.
    #[arg(long)]
    pub slot_class: Option<String>,
    /// Destination path for file and archive installers.
    #[arg(long)]
    pub install_path: Option<String>,
    /// Compress the payload.
    #[arg(long, value_enum, default_value = "none")]
    pub compression: CompressionArg,
    /// Also list a SHA-512 digest.
    #[arg(long)]
    pub sha512: bool,
    /// Extra custom JSON object merged into the target's `custom`.
    #[arg(long)]
    pub custom: Option<String>,
    /// Encrypt the payload (after compressing it) for this recipient: `device:ID` or
    /// `tag:TAG` through the server's registry, or a public key file (repeatable). The
    /// metadata then lists the ciphertext: encrypt, then sign.
    #[arg(long = "encrypt-for", requires = "release_version")]
    pub encrypt_for: Vec<String>,
    #[command(flatten)]
    pub registry: crate::cmd::encrypt::Registry,
}

/// `tern repo remove-target`.
#[derive(Debug, clap::Args)]
pub struct RemoveTargetArgs {
    #[command(flatten)]
    pub common: Common,
    /// The target path.
    pub name: String,
    /// The role that lists it.
    #[arg(long, default_value = "targets")]
    pub role: String,
}

/// `tern repo delegate`.
#[derive(Debug, clap::Args)]
pub struct DelegateArgs {
    #[command(flatten)]
    pub common: Common,
    /// The delegating role.
    #[arg(long, default_value = "targets")]
    pub from: String,
    /// The new role's name.
    #[arg(long)]
    pub to: String,
    /// Path pattern (repeatable; `*` does not cross `/`).
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Hex prefix of SHA-256(target path) (repeatable).
    #[arg(long = "path-hash-prefix")]
    pub hash_prefixes: Vec<String>,
    /// The new role's keys (public or private key files).
    #[arg(long = "delegate-key", required = true)]
    pub delegate_keys: Vec<PathBuf>,
    /// Signatures it requires.
    #[arg(long, default_value_t = 1)]
    pub threshold: u32,
    /// Stop the search at this role.
    #[arg(long)]
    pub terminating: bool,
}

/// `tern repo delegate-bins`.
#[derive(Debug, clap::Args)]
pub struct DelegateBinsArgs {
    #[command(flatten)]
    pub common: Common,
    /// The delegating role.
    #[arg(long, default_value = "targets")]
    pub from: String,
    /// Number of hash bits selecting the bin (2^BITS bins).
    #[arg(long)]
    pub bits: u32,
    /// Bin name prefix.
    #[arg(long, default_value = "bin")]
    pub prefix: String,
    /// The bins' keys.
    #[arg(long = "delegate-key", required = true)]
    pub delegate_keys: Vec<PathBuf>,
    /// Signatures each bin requires.
    #[arg(long, default_value_t = 1)]
    pub threshold: u32,
}

/// `tern repo sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    #[command(flatten)]
    pub common: Common,
    /// The role to sign.
    #[arg(long)]
    pub role: String,
}

/// `tern repo rotate`.
#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    #[command(flatten)]
    pub common: Common,
    /// The role whose keys change.
    #[arg(long)]
    pub role: String,
    /// Key to add (public or private key file).
    #[arg(long = "add-key")]
    pub add: Vec<PathBuf>,
    /// Key to remove: a key id, or a key file.
    #[arg(long = "remove-key")]
    pub remove: Vec<String>,
    /// New threshold.
    #[arg(long)]
    pub threshold: Option<u32>,
}

/// `tern repo refresh`.
#[derive(Debug, clap::Args)]
pub struct RefreshArgs {
    #[command(flatten)]
    pub common: Common,
    /// Only re-sign the timestamp (the online freshness signal).
    #[arg(long)]
    pub timestamp_only: bool,
}

/// `tern repo expires`.
#[derive(Debug, clap::Args)]
pub struct ExpiresArgs {
    /// The repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// ROLE=DURATION (root, targets, delegated, snapshot, timestamp).
    #[arg(required = true)]
    pub periods: Vec<String>,
}

/// `tern repo status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The repository directory.
    #[arg(long)]
    pub repo: PathBuf,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

fn open(c: &Common) -> anyhow::Result<Repository> {
    Ok(Repository::open(&c.repo)?)
}

fn manifest(a: &TargetArgs, file: &std::path::Path) -> anyhow::Result<Option<serde_json::Value>> {
    let mut custom = match &a.custom {
        Some(s) => {
            let v: serde_json::Value = serde_json::from_str(s).context("--custom is not JSON")?;
            if !v.is_object() {
                bail!("--custom must be a JSON object");
            }
            Some(v)
        }
        None => None,
    };
    if let Some(tern) = custom.as_ref().and_then(|c| c.get("tern")) {
        if a.release_version.is_some() {
            bail!("--custom may not carry a `tern` manifest together with --release-version");
        }
        let m: Manifest = serde_json::from_value(tern.clone()).context("--custom's `tern` manifest")?;
        m.validate(a.name.as_deref().unwrap_or("new target"))?;
    }
    if a.release_version.is_none() && !matches!(a.compression, CompressionArg::None) {
        bail!("--compression needs --release-version: the manifest is what tells the agent the payload is compressed");
    }
    if let Some(version) = &a.release_version {
        let m = Manifest {
            version: version.clone(),
            device_type: a
                .device_type
                .clone()
                .context("--device-type is required with --release-version")?,
            hardware: a.hardware.clone(),
            installer: match a.installer {
                InstallerArg::Raw => Installer::Raw,
                InstallerArg::Archive => Installer::Archive,
                InstallerArg::File => Installer::File,
                InstallerArg::Script => Installer::Script,
            },
            slot_class: a.slot_class.clone(),
            install_path: a.install_path.clone(),
            compression: match a.compression {
                CompressionArg::None => Compression::None,
                CompressionArg::Zstd => Compression::Zstd,
            },
            encryption: None,
            delta_base: None,
            // What decompression may produce; the repository sets it to what it counts.
            installed_length: match a.compression {
                CompressionArg::None => None,
                CompressionArg::Zstd => Some(
                    std::fs::metadata(file)
                        .with_context(|| file.display().to_string())?
                        .len(),
                ),
            },
        };
        m.validate(a.name.as_deref().unwrap_or("new target"))?;
        let obj = custom.get_or_insert_with(|| serde_json::json!({}));
        obj["tern"] = serde_json::to_value(&m)?;
    }
    Ok(custom)
}

/// What `tern repo add-target FILE` (or `bundle create --image FILE`) asks of the repository;
/// recipients named through the registry are resolved here.
pub fn add_target_request(file: &std::path::Path, a: &TargetArgs) -> anyhow::Result<AddTarget> {
    let name = match &a.name {
        Some(n) => n.clone(),
        None => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the file has no name; give --name")?,
    };
    let mut hashes = vec![HashAlgorithm::Sha256];
    if a.sha512 {
        hashes.push(HashAlgorithm::Sha512);
    }
    if !a.encrypt_for.is_empty()
        && a.encrypt_for
            .iter()
            .all(|r| r.starts_with("device:") || r.starts_with("tag:"))
    {
        eprintln!(
            "warning: no key file among the recipients; to add recipients later (`tern bundle add-recipients`) \
             you will need one of these devices' private keys; consider adding your own (`tern key generate --type x25519`)"
        );
    }
    Ok(AddTarget {
        role: a.role.clone(),
        name: TargetPath::new(&name)?,
        source: file.to_owned(),
        custom: manifest(a, file)?,
        hashes,
        compression: match a.compression {
            CompressionArg::None => Compression::None,
            CompressionArg::Zstd => Compression::Zstd,
        },
        encrypt_for: crate::cmd::encrypt::resolve(&a.encrypt_for, &a.registry)?
            .into_iter()
            .map(|(_, k)| k)
            .collect(),
    })
}

/// Run a repository command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let now = now();
    match cmd {
        Command::Init(a) => {
            let mut config = RepoConfig::default();
            for e in &a.expires {
                config.expiry.set(e)?;
            }
            let mut roles = BTreeMap::new();
            for (name, files, threshold) in [
                ("root", &a.root_keys, a.root_threshold),
                ("targets", &a.targets_keys, a.targets_threshold),
                ("snapshot", &a.snapshot_keys, a.snapshot_threshold),
                ("timestamp", &a.timestamp_keys, a.timestamp_threshold),
            ] {
                roles.insert(name.to_owned(), (load_public(files)?, threshold));
            }
            let signers = load_signers(&a.common.keys)?;
            let (_, w) = Repository::init(&a.common.repo, &roles, config, &signers, now)?;
            writes(a.common.output, &w)
        }
        Command::AddTarget(a) => {
            let repo = open(&a.common)?;
            let add = add_target_request(&a.file, &a.target)?;
            let w = repo.add_target(&add, &load_signers(&a.common.keys)?, now)?;
            writes(a.common.output, &w)
        }
        Command::RemoveTarget(a) => {
            let repo = open(&a.common)?;
            let w = repo.remove_target(&a.role, &a.name, &load_signers(&a.common.keys)?, now)?;
            writes(a.common.output, &w)
        }
        Command::Delegate(a) => {
            let repo = open(&a.common)?;
            let d = Delegation {
                from: a.from.clone(),
                name: a.to.clone(),
                keys: load_public(&a.delegate_keys)?,
                threshold: a.threshold,
                terminating: a.terminating,
                paths: a.paths.clone(),
                hash_prefixes: a.hash_prefixes.clone(),
            };
            let w = repo.delegate(&d, &load_signers(&a.common.keys)?, now)?;
            writes(a.common.output, &w)
        }
        Command::DelegateBins(a) => {
            let repo = open(&a.common)?;
            let b = HashBins {
                from: a.from.clone(),
                bit_length: a.bits,
                name_prefix: a.prefix.clone(),
                keys: load_public(&a.delegate_keys)?,
                threshold: a.threshold,
            };
            let w = repo.delegate_bins(&b, &load_signers(&a.common.keys)?, now)?;
            writes(a.common.output, &w)
        }
        Command::Sign(a) => {
            let repo = open(&a.common)?;
            let w = repo.sign(&a.role, &load_signers(&a.common.keys)?)?;
            writes(a.common.output, &w)
        }
        Command::Rotate(a) => {
            let repo = open(&a.common)?;
            let mut remove = Vec::new();
            for r in &a.remove {
                let path = PathBuf::from(r);
                if path.exists() {
                    remove.push(tern_fs::load_public_key(&path)?.keyid());
                } else {
                    remove.push(KeyId::new(r.clone()));
                }
            }
            let rot = Rotation {
                role: a.role.clone(),
                add: load_public(&a.add)?,
                remove,
                threshold: a.threshold,
            };
            let w = repo.rotate(&rot, &load_signers(&a.common.keys)?, now)?;
            writes(a.common.output, &w)
        }
        Command::Refresh(a) => {
            let repo = open(&a.common)?;
            let w = repo.refresh(&load_signers(&a.common.keys)?, now, a.timestamp_only)?;
            writes(a.common.output, &w)
        }
        Command::Expires(a) => {
            let mut config = RepoConfig::load(&a.repo)?;
            Repository::open(&a.repo)?;
            for p in &a.periods {
                config.expiry.set(p)?;
            }
            config.save(&a.repo)?;
            Ok(())
        }
        Command::Status(a) => {
            let repo = Repository::open(&a.repo)?;
            let status = repo.status(now)?;
            match a.output {
                Format::Json => json(&status),
                Format::Text => {
                    println!(
                        "{:<20} {:>7}  {:<21} {:>10}  {:>7}",
                        "role", "version", "expires", "signatures", "targets"
                    );
                    for s in &status {
                        let flag = match (s.expired, s.valid >= s.threshold) {
                            (true, _) => "  EXPIRED",
                            (_, false) => "  NEEDS SIGNATURES",
                            _ => "",
                        };
                        println!(
                            "{:<20} {:>7}  {:<21} {:>6}/{:<3}  {:>7}{flag}",
                            s.role, s.version, s.expires, s.valid, s.threshold, s.targets
                        );
                    }
                    Ok(())
                }
            }
        }
    }
}
