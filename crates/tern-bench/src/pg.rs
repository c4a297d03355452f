//! A private PostgreSQL cluster: `initdb` into a temporary directory, started with `pg_ctl`
//! on a free loopback port (as the `postgres` user when this runs as root: PostgreSQL
//! refuses to run as root), stopped when dropped. The soak test also stops it at once and
//! starts it again on the same port.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procfs::{free_port, is_root};
use crate::tools::{install_or_fail, run_checked};

/// A private cluster, stopped on drop.
pub struct PrivatePostgres {
    bin: PathBuf,
    /// The major version (the directory under /usr/lib/postgresql).
    pub version: String,
    data: PathBuf,
    port: u16,
    // Removed after `drop` has stopped the cluster.
    dir: tempfile::TempDir,
}

/// The newest PostgreSQL's binaries under /usr/lib/postgresql.
fn postgres_bin() -> Option<(PathBuf, String)> {
    let mut versions: Vec<(f64, PathBuf, String)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v: f64 = name.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin, name))
        })
        .collect();
    versions.sort_by(|a, b| a.0.total_cmp(&b.0));
    versions.pop().map(|(_, bin, name)| (bin, name))
}

impl PrivatePostgres {
    /// initdb and start, with default settings.
    pub fn start() -> anyhow::Result<Self> {
        let (bin, version) = match postgres_bin() {
            Some(found) => found,
            None => {
                install_or_fail(&["postgresql"], "PostgreSQL (/usr/lib/postgresql/*/bin/initdb)")?;
                postgres_bin().context("PostgreSQL is still missing after apt-get install")?
            }
        };
        let dir = tempfile::Builder::new().prefix("tern-bench-pg-").tempdir()?;
        if is_root() {
            // PostgreSQL refuses to run as root: it runs as `postgres`, which must own its files.
            run_checked(Process::new("chown").arg("postgres:postgres").arg(dir.path()))
                .context("handing the cluster's directory to the `postgres` user")?;
        }
        let data = dir.path().join("data");
        eprintln!(
            "starting a private PostgreSQL {version} cluster in {}",
            dir.path().display()
        );
        run_checked(as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]))?;
        let pg = PrivatePostgres {
            bin,
            version,
            data,
            port: free_port()?,
            dir,
        };
        pg.pg_ctl_start()?;
        Ok(pg)
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        run_checked(
            as_postgres(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.path().join("postgres.log"))
                .args(["-o", &options, "-w", "-t", "60", "start"]),
        )
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The postmaster's pid, from `data/postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// What `postgres --version` says (`postgres (PostgreSQL) 15.18 (Debian …)`).
    pub fn full_version(&self) -> String {
        Process::new(self.bin.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| format!("PostgreSQL {}", self.version))
    }

    /// Stop the cluster at once: SIGQUIT to the postmaster (immediate shutdown: every
    /// connection drops, no checkpoint; the next start recovers from the WAL). Returns when
    /// the postmaster's pid file is gone.
    pub fn kill_now(&self) -> anyhow::Result<()> {
        let pid = self
            .postmaster_pid()
            .context("no postmaster.pid: the cluster is not running")?;
        run_checked(Process::new("kill").args(["-QUIT", &pid.to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.data.join("postmaster.pid").exists() {
            if Instant::now() > deadline {
                bail!("PostgreSQL (pid {pid}) did not stop within 30 s of SIGQUIT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Start it again on the same port (after [`PrivatePostgres::kill_now`]); returns when it
    /// accepts connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        self.pg_ctl_start()
    }

    /// The server's log (`postgres.log`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `bin`, run as `postgres` when this process is root.
fn as_postgres(bin: &Path) -> Process {
    if is_root() {
        let mut c = Process::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Process::new(bin)
    }
}
