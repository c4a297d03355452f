//! `tern bundle`: create, inspect and verify release bundles.

use std::fs::File;
use std::io::{BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use tern_core::trust::Freshness;
use tern_core::TargetPath;
use tern_repo::Repository;

use crate::output::{json, now, Format};

/// Bundle commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a bundle of targets from a repository (metadata first, payloads after).
    Create(Box<CreateArgs>),
    /// Print what a bundle holds, without verifying it.
    Inspect(InspectArgs),
    /// Verify a bundle's whole chain and every payload against a trusted root.
    Verify(VerifyArgs),
    /// Give more devices or groups access to a bundle's encrypted payloads: wraps the data
    /// keys for them, without re-encrypting a payload or re-signing any metadata.
    AddRecipients(crate::cmd::encrypt::AddRecipientsArgs),
}

/// `tern bundle create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The repository.
    #[arg(long)]
    pub repo: PathBuf,
    /// Target to include (repeatable, in install order).
    #[arg(long = "target", required_unless_present = "image")]
    pub targets: Vec<String>,
    /// Add this file to the repository first (with the manifest, compression and
    /// `--encrypt-for` options below, signed with `--key`) and bundle it after the
    /// `--target`s: image to signed, and optionally encrypted, bundle in one step.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Private keys that sign the new target (and, with --include-freshness, the new
    /// snapshot and timestamp).
    #[arg(long = "key", requires = "image")]
    pub keys: Vec<PathBuf>,
    #[command(flatten)]
    pub target: crate::cmd::repo::TargetArgs,
    /// The bundle file to write (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Also carry the repository's current snapshot and timestamp.
    #[arg(long)]
    pub include_freshness: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// `tern bundle inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// `tern bundle verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// The trusted root metadata (any version of the repository's root chain).
    #[arg(long)]
    pub root: PathBuf,
    /// Refuse a bundle that carries no snapshot and timestamp.
    #[arg(long)]
    pub require_freshness: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// Counts bytes read, for progress.
struct Counting<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn progress(len: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("verifying");
    bar
}

/// Verify a bundle file; used by `verify`, the demo and the bench.
pub fn verify_file(
    bundle: &Path,
    root: &[u8],
    freshness: Freshness,
    show_progress: bool,
) -> anyhow::Result<tern_bundle::VerifyReport> {
    let f = File::open(bundle).with_context(|| format!("bundle {}", bundle.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = if show_progress {
        progress(len)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let reader = Counting {
        inner: BufReader::with_capacity(1 << 20, f),
        bar: bar.clone(),
    };
    let report = tern_bundle::verify_bundle(reader, root, now(), freshness);
    bar.finish_and_clear();
    report.with_context(|| format!("bundle {}", bundle.display()))
}

/// Run a bundle command.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Create(a) => {
            let repo = Repository::open(&a.repo)?;
            let mut targets = a
                .targets
                .iter()
                .map(|t| TargetPath::new(t))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(image) = &a.image {
                // Encrypt (if asked), then sign: the image joins the repository first.
                let add = crate::cmd::repo::add_target_request(image, &a.target)?;
                let signers = crate::cmd::load_signers(&a.keys)?;
                repo.add_target(&add, &signers, now())?;
                if a.include_freshness {
                    repo.refresh(&signers, now(), false)?;
                }
                targets.push(add.name);
            } else if a.target.release_version.is_some() || !a.target.encrypt_for.is_empty() {
                bail!("manifest and --encrypt-for options apply to --image; the --target names are already signed");
            }
            let contents = repo
                .release_contents(&targets, a.include_freshness, now())
                .with_context(|| format!("repository {}", a.repo.display()))?;
            let size =
                tern_bundle::write_bundle(&contents, &a.out).with_context(|| format!("bundle {}", a.out.display()))?;
            match a.output {
                Format::Json => json(&serde_json::json!({
                    "bundle": a.out, "bytes": size, "payloads": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                    "root_version": contents.roots.last().map(|r| r.0),
                })),
                Format::Text => {
                    println!("wrote {} ({size} bytes): {} payload(s)", a.out.display(), targets.len());
                    Ok(())
                }
            }
        }
        Command::AddRecipients(a) => crate::cmd::encrypt::add_recipients(a),
        Command::Inspect(a) => {
            let f = File::open(&a.bundle).with_context(|| format!("bundle {}", a.bundle.display()))?;
            let i =
                tern_bundle::inspect(BufReader::new(f)).with_context(|| format!("bundle {}", a.bundle.display()))?;
            match a.output {
                Format::Json => json(&i),
                Format::Text => {
                    // Nothing here is verified: every string is the bundle's word, shown
                    // shortened and escaped so that it cannot rewrite the terminal.
                    use tern_core::text::shown as t;
                    println!(
                        "bundle   {} (format {} v{}; NOT verified: use `tern bundle verify`)",
                        a.bundle.display(),
                        t(&i.header.format),
                        i.header.format_version
                    );
                    println!("roots    {:?}", i.root_versions);
                    for (role, (version, expires)) in &i.roles {
                        println!("role     {:<20} version {version:<5} expires {}", t(role), t(expires));
                    }
                    for p in &i.payloads {
                        println!("payload  {} ({} bytes)", t(&p.target), p.size);
                        if let Some(m) = &p.manifest {
                            println!(
                                "         version {} device-type {} hardware {} installer {} slot {} compression {}",
                                t(&m.version),
                                t(&m.device_type),
                                t(&m.hardware.join(",")),
                                m.installer,
                                t(m.slot_class.as_deref().or(m.install_path.as_deref()).unwrap_or("-")),
                                m.compression
                            );
                            if let Some(e) = &m.encryption {
                                println!(
                                    "         encrypted {} ({} plaintext bytes, {}-byte records), {} recipient(s): {}",
                                    t(&e.scheme),
                                    e.plaintext_length,
                                    e.record_size,
                                    p.recipients.len(),
                                    t(&p.recipients.join(" "))
                                );
                            }
                        }
                        if let Some(l) = &p.listed {
                            for (alg, h) in &l.hashes {
                                println!("         {} {}", t(alg), t(h));
                            }
                        }
                    }
                    Ok(())
                }
            }
        }
        Command::Verify(a) => {
            let root = std::fs::read(&a.root).with_context(|| format!("trusted root {}", a.root.display()))?;
            let freshness = if a.require_freshness {
                Freshness::Required
            } else {
                Freshness::IfPresent
            };
            let report = verify_file(&a.bundle, &root, freshness, a.output == Format::Text)?;
            match a.output {
                Format::Json => json(&report),
                Format::Text => {
                    println!(
                        "verified {} against root version {}",
                        a.bundle.display(),
                        report.root_version
                    );
                    match (report.timestamp_version, report.snapshot_version) {
                        (Some(t), Some(s)) => println!("freshness timestamp v{t}, snapshot v{s}"),
                        _ => println!("freshness none in bundle (offline install policy applies)"),
                    }
                    println!("targets  v{}", report.targets_version);
                    for (role, v) in &report.delegated {
                        println!("role     {role} v{v}");
                    }
                    for p in &report.payloads {
                        println!("payload  {} ({} bytes, listed by {}) ok", p.target, p.length, p.role);
                    }
                    Ok(())
                }
            }
        }
    }
}
