//! Finding the product binary, `tern`, that the benchmarks run as a child process.
//!
//! Cargo builds a package's binaries only: `cargo build -p tern-bench` (and
//! `cargo run -p tern-bench`) does not build `tern`. `cargo build --release` at the
//! workspace root builds every member, both binaries into `target/release`; after it,
//! `cargo run --release -p tern-bench -- …` finds `target/release/tern` beside itself.
//!
//! So that a benchmark never measures an old build without saying so, the `tern` found
//! beside this executable is refused when a source it is built from (a file under `src` or
//! `migrations` of a workspace crate other than this one) is newer than it: cargo relinks
//! `tern` whenever one of them changes, so a `tern` older than them has not been rebuilt
//! since. `TERN_BIN=PATH` names the binary explicitly, and is used as it is.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};

/// The environment variable that names the `tern` binary explicitly.
pub const TERN_BIN: &str = "TERN_BIN";

/// The `tern` binary: `TERN_BIN`, or `tern` beside this executable if it is not older than
/// its sources.
pub fn tern() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(TERN_BIN) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{TERN_BIN}={}: no such file", path.display());
        }
        return Ok(path);
    }
    let me = std::env::current_exe().context("locating this executable")?;
    let mut dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    // A test binary lives in target/PROFILE/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let tern = dir.join("tern");
    let built = match std::fs::metadata(&tern).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(_) => bail!(
            "no `tern` binary beside {}: build the workspace (`cargo build --release`, or \
             `cargo build --release --workspace`; `cargo build -p tern-bench` builds only this \
             benchmark binary), or set {TERN_BIN}=PATH",
            me.display()
        ),
    };
    if let Some((source, _)) = newest_source(&workspace()).filter(|(_, t)| *t > built) {
        bail!(
            "{} is older than {}: rebuild it with `cargo build --release --workspace` (or set \
             {TERN_BIN}={} to measure it anyway)",
            tern.display(),
            source.display(),
            tern.display()
        );
    }
    Ok(tern)
}

/// The workspace this binary was built in: `crates/tern-bench/../..`.
fn workspace() -> PathBuf {
    let me = Path::new(env!("CARGO_MANIFEST_DIR"));
    me.parent().and_then(Path::parent).unwrap_or(me).to_path_buf()
}

/// The most recently modified file `tern` is built from, if the workspace is here.
fn newest_source(workspace: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    let mut consider = |path: PathBuf| {
        if let Ok(t) = std::fs::metadata(&path).and_then(|m| m.modified()) {
            if newest.as_ref().is_none_or(|(_, n)| t > *n) {
                newest = Some((path, t));
            }
        }
    };
    let crates = std::fs::read_dir(workspace.join("crates")).ok()?;
    for krate in crates.flatten() {
        let path = krate.path();
        if krate.file_name() == env!("CARGO_PKG_NAME") {
            continue;
        }
        for sub in ["src", "migrations"] {
            walk(&path.join(sub), &mut consider);
        }
    }
    newest
}

fn walk(dir: &Path, f: &mut impl FnMut(PathBuf)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path(), f),
            Ok(t) if t.is_file() => f(e.path()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_source_is_a_product_source() {
        let (newest, _) = newest_source(&workspace()).unwrap();
        let shown = newest.display().to_string();
        assert!(shown.contains("/crates/tern-"), "{shown}");
        assert!(!shown.contains("/crates/tern-bench/"), "{shown}");
    }
}
