//! Shared output helpers: text or JSON, and the reference time.

use clap::ValueEnum;
use serde::Serialize;
use tern_core::DateTime;
use tern_repo::RoleWrite;

/// How a command reports.
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

/// An error and its causes on one line, for a terminal or a log: control and
/// display-altering characters escaped, at most [`MAX_ERROR_LINE`] characters.
pub fn chain(e: &dyn std::error::Error) -> String {
    tern_core::text::error_chain(e, MAX_ERROR_LINE)
}

/// [`chain`] of an `anyhow` error (its own chain, context included).
pub fn anyhow_chain(e: &anyhow::Error) -> String {
    tern_core::text::shown_max(&format!("{e:#}"), MAX_ERROR_LINE)
}

/// Print `value` as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The current time, the reference time of every check a command makes.
pub fn now() -> DateTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    DateTime::from_unix(secs)
}

/// Report role writes; warn about those that still need signatures.
pub fn writes(format: Format, writes: &[RoleWrite]) -> anyhow::Result<()> {
    if format == Format::Json {
        return json(&writes);
    }
    for w in writes {
        let state = if w.complete() { "ok" } else { "NEEDS SIGNATURES" };
        println!(
            "{:<24} version {:<4} signatures {}/{}  {state}",
            w.role, w.version, w.valid, w.threshold
        );
    }
    for w in writes.iter().filter(|w| !w.complete()) {
        let role = w.role.split(' ').next().unwrap_or(&w.role);
        eprintln!(
            "warning: {} v{} has {} of {} signatures; clients will refuse it until `tern repo sign --role {role}` adds more",
            w.role, w.version, w.valid, w.threshold
        );
    }
    Ok(())
}
