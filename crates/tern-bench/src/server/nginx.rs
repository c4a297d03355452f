//! The reference: nginx serving a 4096-byte file, measured by wrk (with the poll's kind of
//! script, and without a script) and by this command's own load generator.

use std::fs;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::cpu::Probe;
use super::load::{get_requests, http_client, load_run, Expect, Figures, Load};
use super::wrk::{wrk_script, Wrk, WrkCheck, WrkRequest};
use super::{STATIC_BYTES, STATIC_NAME, WARMUP};
use crate::procfs::{free_port, is_root};

pub(super) struct Reference {
    pub(super) nginx_workers: usize,
    /// wrk with the same kind of script as the poll's: every answer checked.
    pub(super) wrk: Figures,
    /// wrk without a script.
    pub(super) wrk_plain: Figures,
    pub(super) ours: Figures,
}

pub(super) fn run_reference(
    nginx_bin: &Path,
    wrk: &Wrk,
    rt: &tokio::runtime::Runtime,
    concurrency: usize,
    duration: Duration,
    cpus: usize,
    temp: &Path,
) -> anyhow::Result<Reference> {
    let nginx = Nginx::start(nginx_bin)?;
    let url = nginx.url();
    let probe = Probe {
        this_process: false,
        postmaster: None,
        nginx: Some(nginx.pid()),
    };
    // As many entries as the poll's script has devices, so that each thread cycles through
    // a list of the same length.
    let gets: Vec<WrkRequest> = (0..concurrency)
        .map(|_| WrkRequest {
            path: format!("/{STATIC_NAME}"),
            authorization: None,
        })
        .collect();
    let script = temp.join("nginx.lua");
    fs::write(&script, wrk_script(&gets, wrk.threads, &WrkCheck::Len(STATIC_BYTES)))?;
    eprintln!(
        "nginx via wrk, the poll's kind of script: {} connections, {} threads, 1 s warm-up run + {} s measured",
        wrk.connections,
        wrk.threads,
        duration.as_secs()
    );
    let scripted = wrk.run(&url, Some(&script), duration, &probe)?;
    eprintln!(
        "nginx via wrk, no script: {} connections, {} threads, 1 s warm-up run + {} s measured",
        wrk.connections,
        wrk.threads,
        duration.as_secs()
    );
    let plain = wrk.run(&url, None, duration, &probe)?;

    eprintln!(
        "nginx via tern's load generator: {concurrency} connections, {} s warm-up + {} s measured",
        WARMUP.as_secs(),
        duration.as_secs()
    );
    let client = rt.block_on(async { http_client() })?;
    let probe = Probe {
        this_process: true,
        postmaster: None,
        nginx: Some(nginx.pid()),
    };
    let ours = load_run(
        rt,
        &client,
        concurrency,
        duration,
        Load::new(
            get_requests(url.clone()),
            Expect {
                status: 200,
                len: Some(STATIC_BYTES),
                contains: None,
            },
        ),
        &probe,
    )?;
    Ok(Reference {
        nginx_workers: cpus,
        wrk: scripted,
        wrk_plain: plain,
        ours,
    })
}

/// nginx serving the 4 KiB file from a temporary directory, stopped on drop.
pub(super) struct Nginx {
    pub(super) child: Child,
    pub(super) port: u16,
    pub(super) dir: tempfile::TempDir,
}

impl Nginx {
    pub(super) fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tern-bench-nginx-").tempdir()?;
        let d = dir.path();
        fs::create_dir_all(d.join("www"))?;
        fs::create_dir_all(d.join("tmp"))?;
        let content: Vec<u8> = (0..STATIC_BYTES).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(d.join("www").join(STATIC_NAME), content)?;
        let port = free_port()?;
        // As root, workers would run as `nobody` and could not read the private temporary
        // directory.
        let user = if is_root() { "user root;\n" } else { "" };
        let p = d.display();
        let conf = format!(
            "{user}worker_processes auto;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {p}/www;
    }}
}}
"
        );
        fs::write(d.join("nginx.conf"), conf)?;
        let child = Process::new(bin)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-e")
            .arg(d.join("error.log"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut nginx = Nginx { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = nginx.child.try_wait()?;
            if exited.is_some() || Instant::now() > deadline {
                let log = |f: &str| fs::read_to_string(nginx.dir.path().join(f)).unwrap_or_default();
                bail!(
                    "nginx did not start on 127.0.0.1:{port}: {}{}",
                    log("stderr.log").trim(),
                    log("error.log").trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(nginx)
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/{STATIC_NAME}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running).
        let stopped = Process::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
