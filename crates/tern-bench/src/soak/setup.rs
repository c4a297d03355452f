//! The soak's fleet, set up as an operator and a release engineer would with the `tern`
//! binary: the server's online keys, a repository whose root lists them, the server process
//! on PostgreSQL, an admin token, the root, one small release, the devices (registered in
//! bulk through `Db::register_devices`) and one deployment to all of them.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_core::{KeyAlgorithm, SigningKey};

use crate::fixture::write_random;

/// The tag every soak device is registered with, and the deployment's selector.
pub const TAG: &str = "soak";
/// The release's version (and, uploaded without `--name`, its name).
pub const VERSION: &str = "1.0.0";
/// The release's one target.
const TARGET: &str = "sim/rootfs-1.0.0.img";

/// `tern ARGS…`, its stdout if it succeeds.
pub fn tern(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = Process::new(exe)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running {} {}", exe.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "tern {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `tern server run` as a child process, its output in `log`; killed on drop.
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl ServerProcess {
    /// Start `tern server run --data DATA --database-url URL --listen 127.0.0.1:0` and wait
    /// for its `tern server listening on URL` line.
    pub fn start(
        exe: &Path,
        data: &Path,
        database_url: &str,
        log: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log_file = fs::File::create(log)?;
        let mut child = Process::new(exe)
            .args(["server", "run", "--data", &s(data), "--database-url", database_url])
            .envs(env.iter().copied())
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(log_file.try_clone()?)
            .spawn()
            .with_context(|| format!("starting {} server run", exe.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = BufReader::new(stdout);
        let mut first = String::new();
        lines.read_line(&mut first)?;
        let Some(url) = first
            .trim()
            .strip_prefix("tern server listening on ")
            .map(str::to_owned)
        else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tern server run did not start: {:?}; its log: {}",
                first.trim(),
                fs::read_to_string(log).unwrap_or_default().trim()
            );
        };
        // Whatever else the server prints goes to the log; a closed pipe would make its next
        // print fail.
        let mut copy = log_file;
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let _ = writeln!(copy, "{line}");
            }
        });
        Ok(ServerProcess {
            child,
            url,
            log: log.to_owned(),
        })
    }

    /// The process id (its memory and CPU are read from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server, its admin token, and the published release.
pub struct Fleet {
    /// The server process.
    pub server: ServerProcess,
    /// An admin API token.
    pub admin: String,
    /// The release's name.
    pub release: String,
}

/// Keys, repository, server, token, root and release, in `dir`.
/// `env` is added to the server's environment (`TERN_SERVER_…` settings).
pub fn publish(exe: &Path, dir: &Path, database_url: &str, env: &[(&str, &str)]) -> anyhow::Result<Fleet> {
    let data = dir.join("srv");
    let data_s = s(&data);
    let p = |x: &str| s(&dir.join(x));
    tern(exe, &["server", "init", "--data", &data_s], &[])?;
    fs::create_dir_all(dir.join("keys"))?;
    for k in ["root", "targets"] {
        tern(exe, &["key", "generate", "--out", &p(&format!("keys/{k}"))], &[])?;
    }
    tern(
        exe,
        &[
            "repo",
            "init",
            "--repo",
            &p("repo"),
            "--root-key",
            &p("keys/root.pem"),
            "--targets-key",
            &p("keys/targets.pem"),
            "--snapshot-key",
            &p("srv/keys/snapshot.pub.json"),
            "--timestamp-key",
            &p("srv/keys/timestamp.pub.json"),
            "--key",
            &p("keys/root.pem"),
            "--key",
            &p("keys/targets.pem"),
        ],
        &[],
    )?;
    let server = ServerProcess::start(exe, &data, database_url, &dir.join("server.log"), env)?;
    let admin = tern(
        exe,
        &[
            "server",
            "token",
            "create",
            "--data",
            &data_s,
            "--database-url",
            database_url,
            "--role",
            "admin",
        ],
        &[],
    )?
    .trim()
    .to_owned();
    let api = [("TERN_SERVER", server.url.as_str()), ("TERN_TOKEN", admin.as_str())];
    tern(exe, &["release", "set-root", &p("repo/metadata/1.root.json")], &api)?;
    let image = dir.join("image.img");
    write_random(&image, 64 << 10)?;
    tern(
        exe,
        &[
            "repo",
            "add-target",
            "--repo",
            &p("repo"),
            &s(&image),
            "--name",
            TARGET,
            "--release-version",
            VERSION,
            "--device-type",
            "tern-sim",
            "--slot-class",
            "rootfs",
            "--key",
            &p("keys/targets.pem"),
        ],
        &[],
    )?;
    let bundle = dir.join("release.tern");
    tern(
        exe,
        &[
            "bundle",
            "create",
            "--repo",
            &p("repo"),
            "--target",
            TARGET,
            "--out",
            &s(&bundle),
        ],
        &[],
    )?;
    let uploaded: serde_json::Value = serde_json::from_str(&tern(
        exe,
        &["release", "upload", &s(&bundle), "--output", "json"],
        &api,
    )?)
    .context("the answer to release upload")?;
    let release = uploaded["name"]
        .as_str()
        .with_context(|| format!("no release name in {uploaded}"))?
        .to_owned();
    Ok(Fleet { server, admin, release })
}

/// One simulated device's identity.
pub struct DeviceKey {
    /// `soak-NNNNNN`.
    pub id: String,
    /// Its Ed25519 key.
    pub key: SigningKey,
}

/// `count` devices, each with its own key.
pub fn device_keys(count: usize) -> anyhow::Result<Vec<DeviceKey>> {
    (0..count)
        .map(|i| {
            Ok(DeviceKey {
                id: format!("soak-{i:06}"),
                key: SigningKey::generate(KeyAlgorithm::Ed25519)?.0,
            })
        })
        .collect()
}

/// Register `devices` (approved, tagged [`TAG`]) in the server's database, through the
/// server's bulk path; returns how long it took.
pub async fn register(database_url: &str, devices: &[DeviceKey]) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let db = tern_server::db::Db::connect(database_url, 4)
        .await
        .context("connecting to the server's database")?;
    let rows: Vec<tern_server::db::NewDevice> = devices
        .iter()
        .map(|d| {
            let public = d.key.public();
            tern_server::db::NewDevice {
                id: d.id.clone(),
                public_key: public.to_value().clone(),
                keyid: public.keyid().as_str().to_owned(),
                device_type: "tern-sim".into(),
                hardware: "soak".into(),
                tags: vec![TAG.into()],
            }
        })
        .collect();
    db.register_devices(&rows).await.context("registering the devices")?;
    db.pool.close().await;
    Ok(t.elapsed())
}

/// `POST /api/v1/deployments` of `release` to every device tagged [`TAG`]; the
/// deployment's id and how long the request took.
pub async fn deploy(client: &reqwest::Client, fleet: &Fleet) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let resp = client
        .post(format!("{}/api/v1/deployments", fleet.server.url))
        .bearer_auth(&fleet.admin)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::json!({"release": fleet.release, "tag": TAG}).to_string())
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .context("creating the deployment")?;
    let status = resp.status();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await?).unwrap_or_default();
    if !status.is_success() {
        bail!("creating the deployment: HTTP {status}: {body}");
    }
    let id = body["id"]
        .as_str()
        .with_context(|| format!("no deployment id in the answer: {body}"))?
        .to_owned();
    Ok((id, t.elapsed()))
}

/// The server's `progress_done` of each device in deployment `id`
/// (`GET /api/v1/deployments/ID` as the admin).
pub async fn progress(
    client: &reqwest::Client,
    fleet: &Fleet,
    id: &str,
) -> anyhow::Result<std::collections::HashMap<String, Option<u64>>> {
    let resp = client
        .get(format!("{}/api/v1/deployments/{id}", fleet.server.url))
        .bearer_auth(&fleet.admin)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .context("reading the deployment")?;
    let status = resp.status();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await?).unwrap_or_default();
    if !status.is_success() {
        bail!("reading deployment {id}: HTTP {status}: {body}");
    }
    body["devices"]
        .as_array()
        .with_context(|| format!("deployment {id} lists no devices"))?
        .iter()
        .map(|d| {
            let device = d["device"].as_str().context("a device row without its id")?;
            Ok((device.to_owned(), d["progress_done"].as_u64()))
        })
        .collect()
}
