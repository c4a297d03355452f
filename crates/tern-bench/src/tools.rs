//! The machine's tools a benchmark runs (nginx, wrk, PostgreSQL): found, or installed with
//! apt-get in CI, or a failure that says what to install.

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use anyhow::{bail, Context};

/// A program a benchmark runs, where to look for it and its Debian package.
pub struct Tool {
    name: &'static str,
    candidates: &'static [&'static str],
    package: &'static str,
}

impl Tool {
    /// `candidates` are paths (with a `/`) or names looked up in `PATH`.
    pub const fn new(name: &'static str, candidates: &'static [&'static str], package: &'static str) -> Self {
        Tool {
            name,
            candidates,
            package,
        }
    }

    fn find(&self) -> Option<PathBuf> {
        self.candidates.iter().find_map(|c| {
            if c.contains('/') {
                Path::new(c).is_file().then(|| PathBuf::from(c))
            } else {
                std::env::var_os("PATH")
                    .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(c)).find(|p| p.is_file()))
            }
        })
    }
}

/// Each tool's path. When some are missing: in CI (`CI` set) they are installed with
/// apt-get; elsewhere this fails and says what to install.
pub fn require_tools(tools: &[Tool]) -> anyhow::Result<Vec<PathBuf>> {
    let missing: Vec<&Tool> = tools.iter().filter(|t| t.find().is_none()).collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        let names: Vec<&str> = missing.iter().map(|t| t.name).collect();
        install_or_fail(&packages, &names.join(" and "))?;
    }
    tools
        .iter()
        .map(|t| {
            t.find()
                .with_context(|| format!("{} is still missing after apt-get install {}", t.name, t.package))
        })
        .collect()
}

/// In CI, `apt-get install -y PACKAGES`; elsewhere a failure naming them.
pub fn install_or_fail(packages: &[&str], what: &str) -> anyhow::Result<()> {
    let list = packages.join(" ");
    if std::env::var_os("CI").is_none() {
        bail!(
            "tern-bench needs {what}: install with `apt-get install -y {list}` (with CI set, this \
             command runs that itself){}",
            if packages.iter().any(|p| *p == "nginx" || *p == "wrk") {
                ", or pass --no-reference to skip the nginx/wrk reference"
            } else {
                ""
            }
        );
    }
    eprintln!("CI is set: apt-get install -y {list}");
    let install = || {
        Process::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // A fresh image has no package lists yet.
        run_checked(Process::new("apt-get").arg("update"))?;
        if !install() {
            bail!("apt-get install -y {list} failed");
        }
    }
    Ok(())
}

/// Run a command to its end; its stderr and stdout are the error if it fails.
pub fn run_checked(cmd: &mut Process) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}
