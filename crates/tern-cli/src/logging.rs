//! Logging: `tracing` events to standard error, standard output being each command's
//! answer.
//!
//! - **What**: `RUST_LOG` when set (`info`, `warn,tern_server::request=debug`…); otherwise
//!   the `log` key of the server's or the agent's configuration for `tern server run` and
//!   `tern agent run` (default `info`), and `warn` for every other command.
//! - **How**: `--log-format text` (the default; coloured on a terminal) or `json`, one
//!   object per line with the event's fields and its request's span. Under systemd
//!   (`JOURNAL_STREAM` set: standard error is the journal) text lines carry no timestamp
//!   and no colour, as the journal stamps each line itself.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// For people: a terminal or the journal.
    #[default]
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

/// What commands other than the server and the agent log unless `RUST_LOG` says otherwise.
const QUIET: &str = "warn";

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Start logging in `format`.
pub fn init(format: Format) {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = EnvFilter::new(from_env.as_deref().unwrap_or(QUIET));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let lines: Box<dyn Layer<_> + Send + Sync> = match format {
        Format::Json => fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        Format::Text if journal => fmt::layer()
            .without_time()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
        Format::Text => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .try_init()
        .is_ok()
        && from_env.is_none()
    {
        let _ = FILTER.set(handle);
    }
}

/// Whether `directives` is a level or a filter `RUST_LOG` would take.
pub fn parse(directives: &str) -> Result<(), String> {
    EnvFilter::builder()
        .parse(directives)
        .map(drop)
        .map_err(|e| format!("`{}` is not a level or filter: {e}", tern_core::text::shown(directives)))
}

/// A long-running command's own filter: `configured` (a configuration's `log` key) or
/// `info`, unless `RUST_LOG` set one.
pub fn service(configured: Option<&str>) -> anyhow::Result<()> {
    let Some(handle) = FILTER.get() else {
        return Ok(()); // RUST_LOG decides
    };
    let directives = configured.unwrap_or("info");
    let filter = EnvFilter::builder().parse(directives).map_err(|e| {
        anyhow::anyhow!(
            "log: `{}` is not a level or filter: {e}",
            tern_core::text::shown(directives)
        )
    })?;
    handle
        .reload(filter)
        .map_err(|e| anyhow::anyhow!("log: cannot set the filter: {e}"))
}
