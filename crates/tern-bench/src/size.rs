//! `tern-bench size`: what the agent costs a device's storage. The `tern` binary of the
//! `device` profile and the shared libraries it loads beyond the C runtime, beside
//! Debian's builds of RAUC and SWUpdate (`/usr/bin/rauc`, `/usr/bin/swupdate`) and theirs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use anyhow::{bail, Context};

use crate::tools::{require_tools, Tool};

/// `tern-bench size`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The binary to measure (build it with `cargo build --locked --profile device -p
    /// tern-cli`).
    #[arg(long, default_value = "target/device/tern")]
    binary: PathBuf,
}

/// Libraries every Linux program has (the C runtime): not counted against anyone.
const C_RUNTIME: &[&str] = &[
    "linux-vdso",
    "ld-linux",
    "libc.so",
    "libm.so",
    "libdl.so",
    "librt.so",
    "libpthread.so",
    "libgcc_s.so",
];

struct Footprint {
    binary: u64,
    /// Each library beyond the C runtime, by path, with its size.
    libraries: BTreeMap<PathBuf, u64>,
}

impl Footprint {
    fn total(&self) -> u64 {
        self.binary + self.libraries.values().sum::<u64>()
    }
}

fn footprint(path: &Path) -> anyhow::Result<Footprint> {
    let binary = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    let out = Process::new("ldd").arg(path).output().context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libraries = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        if C_RUNTIME
            .iter()
            .any(|c| line.starts_with(c) || line.contains(&format!("/{c}")))
        {
            continue;
        }
        let Some(lib) = line
            .split("=>")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .filter(|p| p.starts_with('/'))
        else {
            if line.contains("not found") {
                bail!("{}: {line}", path.display());
            }
            continue;
        };
        let real = std::fs::canonicalize(lib).with_context(|| lib.to_owned())?;
        let size = std::fs::metadata(&real)?.len();
        libraries.insert(real, size);
    }
    Ok(Footprint { binary, libraries })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Measure and print.
pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.binary.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build --locked --profile device -p tern-cli`",
            a.binary.display()
        );
    }
    let peers = require_tools(&[
        Tool::new("rauc", &["/usr/bin/rauc"], "rauc"),
        Tool::new("swupdate", &["/usr/bin/swupdate"], "swupdate"),
    ])?;
    let tern = footprint(&a.binary)?;
    let rows = [
        ("tern (device profile)", &a.binary, &tern),
        ("rauc (Debian)", &peers[0], &footprint(&peers[0])?),
        ("swupdate (Debian)", &peers[1], &footprint(&peers[1])?),
    ]
    .map(|(name, path, f)| {
        (
            name,
            path.display().to_string(),
            f.binary,
            f.libraries.len(),
            f.libraries.values().sum::<u64>(),
            f.total(),
        )
    });
    println!("what a device stores for its update agent (shared libraries beyond the C runtime counted)");
    println!(
        "{:<22} {:>10} {:>10} {:>12} {:>10}  path",
        "program", "binary", "libraries", "their size", "total"
    );
    for (name, path, binary, count, libs, total) in &rows {
        println!(
            "{name:<22} {:>10} {count:>10} {:>12} {:>10}  {path}",
            mib(*binary),
            mib(*libs),
            mib(*total)
        );
    }
    println!(
        "tern's total beside rauc's: {:.2}x; beside swupdate's: {:.2}x",
        rows[0].5 as f64 / rows[1].5 as f64,
        rows[0].5 as f64 / rows[2].5 as f64
    );
    println!("tern's libraries beyond the C runtime:");
    for lib in tern.libraries.keys() {
        println!("  {}", lib.display());
    }
    if tern.libraries.is_empty() {
        println!("  none (TLS, crypto, SQLite, zstd are linked in)");
    }
    println!("the tern binary holds the server and the release tools too: the agent alone is a part of it");
    Ok(())
}
