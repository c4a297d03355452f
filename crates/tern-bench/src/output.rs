//! Reports: text or JSON, the reference time, and error lines.

use clap::ValueEnum;
use serde::Serialize;
use tern_core::DateTime;

/// How a benchmark reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Longest error line printed: a cause chain that echoes untrusted input is cut here.
const MAX_ERROR_LINE: usize = 4096;

/// An `anyhow` error and its causes on one line: control and display-altering characters
/// escaped, at most [`MAX_ERROR_LINE`] characters.
pub fn anyhow_chain(e: &anyhow::Error) -> String {
    tern_core::text::shown_max(&format!("{e:#}"), MAX_ERROR_LINE)
}

/// Print `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The current time, the reference time of the repositories the benchmarks build.
pub fn now() -> DateTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    DateTime::from_unix(secs)
}
