//! `tern tuf`: the TUF client, with the command shape of the reference clients' test CLIs
//! (python-tuf's and go-tuf's), so that Tern can be compared with them directly.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use tern_client::{AnyTransport, Limits, Updater};

use crate::output::now;

/// `tern tuf`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The trusted metadata directory.
    #[arg(long)]
    pub metadata_dir: PathBuf,
    /// Base URL of the repository's metadata (http(s)://, file://, or tern-bundle:FILE#metadata/).
    #[arg(long)]
    pub metadata_url: Option<String>,
    /// Target to download (repeatable; handled in order, stopping at the first failure).
    #[arg(long = "target-name")]
    pub target_names: Vec<String>,
    /// Base URL of the targets.
    #[arg(long)]
    pub target_base_url: Option<String>,
    /// Where downloaded targets go, named by their percent-encoded paths.
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    /// Seconds to wait for any byte before giving up (slow-retrieval defence).
    #[arg(long, default_value_t = 30)]
    pub stall_timeout: u64,
    /// Slowest average download rate accepted, bytes per second, after --grace seconds.
    #[arg(long, default_value_t = 1024)]
    pub min_rate: u64,
    /// Seconds before --min-rate is enforced.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    #[command(subcommand)]
    pub action: Action,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Install the trusted root; makes no network request.
    Init {
        /// The root metadata file trusted out of band.
        trusted_root: PathBuf,
    },
    /// Update root, timestamp, snapshot and targets.
    Refresh,
    /// Refresh, then find and download each --target-name.
    Download,
}

/// Run the client.
pub fn run(a: Args) -> anyhow::Result<()> {
    let limits = Limits {
        stall_timeout: std::time::Duration::from_secs(a.stall_timeout),
        min_bytes_per_sec: a.min_rate,
        grace: std::time::Duration::from_secs(a.grace),
        ..Limits::default()
    };
    match a.action {
        Action::Init { trusted_root } => {
            let root =
                std::fs::read(&trusted_root).with_context(|| format!("trusted root {}", trusted_root.display()))?;
            Updater::init(&a.metadata_dir, &root)
                .with_context(|| format!("trusted root {}", trusted_root.display()))?;
            Ok(())
        }
        Action::Refresh => {
            let url = a.metadata_url.context("--metadata-url is required")?;
            let transport = AnyTransport::new(&limits)?;
            let mut up = Updater::new(&a.metadata_dir, &url, &transport, limits, now())?;
            up.refresh()?;
            Ok(())
        }
        Action::Download => {
            let url = a.metadata_url.context("--metadata-url is required")?;
            let base = a.target_base_url.context("--target-base-url is required")?;
            let dir = a.target_dir.context("--target-dir is required")?;
            let transport = AnyTransport::new(&limits)?;
            let mut up = Updater::new(&a.metadata_dir, &url, &transport, limits, now())?;
            up.refresh()?;
            for name in &a.target_names {
                let info = up.get_target(name)?;
                let path = up.download_target(&info, &dir, &base)?;
                println!("{name} {}", path.display());
            }
            Ok(())
        }
    }
}
