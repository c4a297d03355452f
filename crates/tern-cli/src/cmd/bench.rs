//! `tern bench`: throughput figures, each printed beside the machine's reference tool
//! measured in the same run.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use clap::Subcommand;
use tern_core::digest::HashAlgorithm;
use tern_core::manifest::Compression;
use tern_core::{KeyAlgorithm, SigningKey, TargetPath};
use tern_repo::{AddTarget, RepoConfig, Repository};

use crate::output::{json, now, Format};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// `tern bundle verify` of one large payload against `openssl dgst -sha256` of the same bytes.
    Verify(VerifyArgs),
    /// Refresh plus one lookup in a 10,000-target hashed-bin repository: Tern against python-tuf.
    Tuf(TufArgs),
    /// Install of an image from a local bundle into a file slot, beside `openssl dgst -sha256`,
    /// and the agent's peak RSS for a 64 MiB and the full-size image.
    Install(VerifyArgs),
    /// Device check-ins per second and p50/p99 against an in-process `tern server`, beside
    /// `wrk` against nginx serving a 4 KiB file.
    Server(super::bench_server::Args),
    /// Install of an encrypted image against the same image unencrypted, decryption
    /// throughput beside `openssl speed -evp aes-256-gcm` at 16 KiB, and the bundle's size
    /// per recipient.
    Encrypted(VerifyArgs),
}

/// `tern bench verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Payload size: bytes, or with KiB, MiB, GiB.
    #[arg(long, default_value = "1GiB")]
    pub size: String,
    /// Runs of each command; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Work directory (default: a temporary one, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

pub(crate) fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s {
        _ if s.ends_with("GiB") => (&s[..s.len() - 3], 1u64 << 30),
        _ if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        _ if s.ends_with("KiB") => (&s[..s.len() - 3], 1 << 10),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size `{s}`: expected e.g. 1GiB, 256MiB or a byte count"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .with_context(|| format!("size `{s}` is out of range"))
}

pub(crate) fn best_of(runs: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

pub(crate) fn run_quiet(cmd: &mut Process) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub(crate) fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    let rng = SystemRandom::new();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n])
            .map_err(|_| anyhow::anyhow!("random source failed"))?;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Build a one-payload bundle of `size` random bytes in `dir`; returns (bundle, root, payload).
pub fn make_bundle(dir: &Path, size: u64) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let payload = dir.join("payload.img");
    write_random(&payload, size)?;
    let (bundle, root) = make_bundle_of(dir, &payload, &[])?;
    Ok((bundle, root, payload))
}

/// Build a one-payload bundle of `payload` in `dir`, encrypted for `recipients` unless
/// there are none; returns (bundle, root).
pub fn make_bundle_of(
    dir: &Path,
    payload: &Path,
    recipients: &[tern_core::keywrap::RecipientKey],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = SigningKey::generate(KeyAlgorithm::Ed25519)?.0;
    let roles: BTreeMap<String, _> = tern_core::TOP_LEVEL_ROLES
        .iter()
        .map(|r| (r.to_string(), (vec![key.public().clone()], 1)))
        .collect();
    let now = now();
    let (repo, _) = Repository::init(
        &dir.join("repo"),
        &roles,
        RepoConfig::default(),
        std::slice::from_ref(&key),
        now,
    )?;
    let name = TargetPath::new("payload.img")?;
    repo.add_target(
        &AddTarget {
            role: "targets".into(),
            name: name.clone(),
            source: payload.to_owned(),
            // A raw rootfs image for the simulated device, so `bench install` can use it too.
            custom: Some(
                tern_core::manifest::Manifest {
                    version: "1.0.0".into(),
                    device_type: "tern-sim".into(),
                    hardware: vec![],
                    installer: tern_core::manifest::Installer::Raw,
                    slot_class: Some("rootfs".into()),
                    install_path: None,
                    compression: Compression::None,
                    encryption: None,
                    delta_base: None,
                }
                .to_custom(),
            ),
            hashes: vec![HashAlgorithm::Sha256],
            compression: Compression::None,
            encrypt_for: recipients.to_vec(),
        },
        std::slice::from_ref(&key),
        now,
    )?;
    repo.refresh(std::slice::from_ref(&key), now, false)?;
    let bundle = dir.join("bench.tern");
    tern_bundle::write_bundle(&repo.release_contents(&[name], true, now)?, &bundle)?;
    Ok((bundle, dir.join("repo/metadata/1.root.json")))
}

/// Run a benchmark.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let a = match cmd {
        Command::Verify(a) => a,
        Command::Tuf(a) => return run_tuf(a),
        Command::Install(a) => return run_install(a),
        Command::Server(a) => return super::bench_server::run(a),
        Command::Encrypted(a) => return super::bench_encrypted::run(a),
    };
    let size = parse_size(&a.size)?;
    let (dir, _temp) = super::work_dir(a.dir.as_ref(), "tern-bench-")?;
    eprintln!("preparing a {size}-byte payload and its bundle in {}", dir.display());
    let (bundle, root, payload) = make_bundle(&dir, size)?;
    let exe = std::env::current_exe()?;
    // Warm the page cache for both files, so that both commands read from memory.
    for f in [&payload, &bundle] {
        std::io::copy(&mut fs::File::open(f)?, &mut std::io::sink())?;
    }
    // Tern runs first: the peak RSS read after it is that of `tern bundle verify` alone.
    let tern = best_of(a.runs, || {
        run_quiet(
            Process::new(&exe)
                .args(["bundle", "verify"])
                .arg(&bundle)
                .arg("--root")
                .arg(&root)
                .args(["--output", "json"]),
        )
    })?;
    let peak_rss = crate::rusage::children_peak_rss();
    let openssl = best_of(a.runs, || {
        run_quiet(Process::new("openssl").args(["dgst", "-sha256"]).arg(&payload))
    })?;
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let ratio = openssl.as_secs_f64() / tern.as_secs_f64();
    let report = serde_json::json!({
        "payload_bytes": size,
        "openssl_dgst_sha256_seconds": openssl.as_secs_f64(),
        "openssl_dgst_sha256_mb_per_s": mbps(openssl),
        "tern_bundle_verify_seconds": tern.as_secs_f64(),
        "tern_bundle_verify_mb_per_s": mbps(tern),
        "ratio_to_openssl": ratio,
        "peak_rss_bytes": peak_rss,
    });
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            println!("payload                          {size} bytes");
            println!(
                "openssl dgst -sha256 (best of {})  {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                openssl.as_secs_f64(),
                mbps(openssl)
            );
            println!(
                "tern bundle verify   (best of {})  {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                tern.as_secs_f64(),
                mbps(tern)
            );
            println!("ratio to openssl                 {ratio:.2}x");
            println!(
                "peak RSS of tern bundle verify   {:.1} MiB",
                peak_rss as f64 / (1 << 20) as f64
            );
            Ok(())
        }
    }
}

/// `tern bench tuf`.
#[derive(Debug, clap::Args)]
pub struct TufArgs {
    /// Targets in the repository.
    #[arg(long, default_value_t = 10_000)]
    pub targets: usize,
    /// Hash bits of the succinct delegation (2^BITS bins).
    #[arg(long, default_value_t = 8)]
    pub bits: u32,
    /// Runs of each client; the best is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// The Python interpreter with python-tuf (interop/setup-venv.sh makes it).
    #[arg(long, default_value = "target/interop-venv/bin/python")]
    pub python: PathBuf,
    /// The python-tuf adapter with Tern's client command line.
    #[arg(long, default_value = "interop/tuf_client.py")]
    pub adapter: PathBuf,
    /// Work directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Report format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
}

/// A repository of `n` targets over 2^bits succinct hash bins, written as static files.
fn hashed_bin_repo(dir: &Path, n: usize, bits: u32) -> anyhow::Result<String> {
    use tern_core::metadata::{
        Common, Delegations, MetaFile, RoleKeys, Root, Snapshot, SuccinctRoles, TargetFile, Targets, Timestamp,
    };
    let key = SigningKey::generate(KeyAlgorithm::Ed25519)?.0;
    let id = key.public().keyid();
    let expires = now().plus_secs(30 * 86_400);
    let meta = dir.join("metadata");
    fs::create_dir_all(&meta)?;
    fs::create_dir_all(dir.join("targets"))?;
    let write = |name: &str, value: &dyn erased::Signable, role: &str| -> anyhow::Result<Vec<u8>> {
        let mut env = value.envelope()?;
        env.sign(role, &key)?;
        let bytes = env.to_bytes();
        fs::write(meta.join(name), &bytes)?;
        Ok(bytes)
    };
    let role_keys = || RoleKeys {
        keyids: vec![id.clone()],
        threshold: 1,
        unrecognized: BTreeMap::new(),
    };
    let root = Root {
        common: Common::new("root", 1, expires),
        consistent_snapshot: true,
        keys: BTreeMap::from([(id.clone(), key.public().clone())]),
        roles: tern_core::TOP_LEVEL_ROLES
            .iter()
            .map(|r| (r.to_string(), role_keys()))
            .collect(),
        unrecognized: BTreeMap::new(),
    };
    write("1.root.json", &root, "root")?;
    let succinct = SuccinctRoles {
        keyids: vec![id.clone()],
        threshold: 1,
        bit_length: bits,
        name_prefix: "bin".into(),
        unrecognized: BTreeMap::new(),
    };
    let mut bins: BTreeMap<String, BTreeMap<String, TargetFile>> = (0..succinct.bins())
        .map(|b| (succinct.bin_name(b as u32), BTreeMap::new()))
        .collect();
    let mut probe = String::new();
    for i in 0..n {
        let name = format!("packages/pkg-{i:05}/pkg-{i:05}-1.0.0.tar.gz");
        let content = name.as_bytes();
        let file = TargetFile {
            length: content.len() as u64,
            hashes: tern_core::digest::hashes_of(content, &[HashAlgorithm::Sha256]),
            custom: None,
            unrecognized: BTreeMap::new(),
        };
        if i == n / 2 {
            // The one target the clients look up and download.
            let t = TargetPath::new(&name)?;
            let path = dir.join("targets").join(t.with_hash_prefix(&file.hashes["sha256"]));
            fs::create_dir_all(path.parent().unwrap_or(dir))?;
            fs::write(path, content)?;
            probe = name.clone();
        }
        bins.get_mut(&succinct.role_for_target(&name))
            .expect("every bin exists")
            .insert(name, file);
    }
    let mut snap_meta = BTreeMap::new();
    let top = Targets {
        common: Common::new("targets", 1, expires),
        targets: BTreeMap::new(),
        delegations: Some(Delegations {
            keys: BTreeMap::from([(id.clone(), key.public().clone())]),
            roles: None,
            succinct_roles: Some(succinct),
            unrecognized: BTreeMap::new(),
        }),
        unrecognized: BTreeMap::new(),
    };
    write("1.targets.json", &top, "targets")?;
    let mf = |v| MetaFile {
        version: v,
        length: None,
        hashes: None,
        unrecognized: BTreeMap::new(),
    };
    snap_meta.insert("targets.json".to_owned(), mf(1));
    for (name, targets) in bins {
        let t = Targets {
            common: Common::new("targets", 1, expires),
            targets,
            delegations: None,
            unrecognized: BTreeMap::new(),
        };
        write(&format!("1.{name}.json"), &t, &name)?;
        snap_meta.insert(format!("{name}.json"), mf(1));
    }
    let snapshot = Snapshot {
        common: Common::new("snapshot", 1, expires),
        meta: snap_meta,
        unrecognized: BTreeMap::new(),
    };
    let snap_bytes = write("1.snapshot.json", &snapshot, "snapshot")?;
    let ts = Timestamp {
        common: Common::new("timestamp", 1, expires),
        meta: BTreeMap::from([(
            "snapshot.json".to_owned(),
            MetaFile {
                version: 1,
                length: Some(snap_bytes.len() as u64),
                hashes: Some(tern_core::digest::hashes_of(&snap_bytes, &[HashAlgorithm::Sha256])),
                unrecognized: BTreeMap::new(),
            },
        )]),
        unrecognized: BTreeMap::new(),
    };
    write("timestamp.json", &ts, "timestamp")?;
    Ok(probe)
}

mod erased {
    //! Lets one closure sign any role type.
    use tern_core::metadata::Envelope;

    pub trait Signable {
        fn envelope(&self) -> tern_core::Result<Envelope>;
    }

    impl<T: serde::Serialize> Signable for T {
        fn envelope(&self) -> tern_core::Result<Envelope> {
            Envelope::new(self)
        }
    }
}

/// A static file server for the reference client's sake: Python's own `http.server`.
struct PyServer {
    child: std::process::Child,
    url: String,
}

impl PyServer {
    fn start(python: &Path, dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Process::new(python)
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} -m http.server", python.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("http.server did not start on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(PyServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `refresh` plus one lookup (and the download of that one small target) with a fresh
/// metadata directory; the best wall time of `runs`.
fn time_client(
    prefix: &[std::ffi::OsString],
    dir: &Path,
    root: &Path,
    url: &str,
    target: &str,
    runs: u32,
) -> anyhow::Result<Duration> {
    let mut n = 0;
    best_of(runs, || {
        n += 1;
        let work = dir.join(format!("client-{n}-{}", prefix.len()));
        let md = work.join("metadata");
        let mut init = Process::new(&prefix[0]);
        init.args(&prefix[1..])
            .arg("--metadata-dir")
            .arg(&md)
            .arg("init")
            .arg(root);
        run_quiet(&mut init)?;
        let mut dl = Process::new(&prefix[0]);
        dl.args(&prefix[1..])
            .arg("--metadata-dir")
            .arg(&md)
            .args(["--metadata-url", &format!("{url}/metadata/"), "--target-name", target])
            .args(["--target-base-url", &format!("{url}/targets/"), "--target-dir"])
            .arg(work.join("targets"))
            .arg("download");
        run_quiet(&mut dl)
    })
}

/// `tern bench tuf`: Tern's client against python-tuf's on the same repository and server.
pub fn run_tuf(a: TufArgs) -> anyhow::Result<()> {
    if !a.python.exists() || !a.adapter.exists() {
        bail!(
            "{} or {} is missing: run `interop/setup-venv.sh target/interop-venv` from the repository root",
            a.python.display(),
            a.adapter.display()
        );
    }
    let (dir, _temp) = super::work_dir(a.dir.as_ref(), "tern-bench-tuf-")?;
    let repo = dir.join("repo");
    eprintln!(
        "building a repository of {} targets over {} hash bins in {}",
        a.targets,
        1u64 << a.bits,
        repo.display()
    );
    let target = hashed_bin_repo(&repo, a.targets, a.bits)?;
    let server = PyServer::start(&a.python, &repo)?;
    let root = repo.join("metadata/1.root.json");
    let tern: Vec<std::ffi::OsString> = vec![std::env::current_exe()?.into(), "tuf".into()];
    let python: Vec<std::ffi::OsString> = vec![a.python.clone().into(), a.adapter.clone().into()];
    let tern_t = time_client(&tern, &dir, &root, &server.url, &target, a.runs)?;
    let py_t = time_client(&python, &dir, &root, &server.url, &target, a.runs)?;
    // What of python-tuf's time is interpreter start-up and imports (twice: init and download).
    let py_start = best_of(a.runs, || {
        run_quiet(Process::new(&a.python).args(["-c", "import tuf.ngclient"]))
    })?;
    let report = serde_json::json!({
        "targets": a.targets,
        "bins": 1u64 << a.bits,
        "tern_seconds": tern_t.as_secs_f64(),
        "python_tuf_seconds": py_t.as_secs_f64(),
        "python_import_seconds": py_start.as_secs_f64(),
        "speedup": py_t.as_secs_f64() / tern_t.as_secs_f64(),
    });
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            println!(
                "repository                  {} targets over {} succinct hash bins, served by python http.server",
                a.targets,
                1u64 << a.bits
            );
            println!("measured                    init, then refresh + one lookup + download of one small target, fresh metadata dir (best of {})", a.runs);
            println!("tern tuf                    {:>8.1} ms", tern_t.as_secs_f64() * 1e3);
            println!("python-tuf ngclient         {:>8.1} ms", py_t.as_secs_f64() * 1e3);
            println!(
                "  of which start-up         {:>8.1} ms per process (python -c 'import tuf.ngclient'), 2 processes",
                py_start.as_secs_f64() * 1e3
            );
            println!(
                "python-tuf / tern           {:.1}x",
                py_t.as_secs_f64() / tern_t.as_secs_f64()
            );
            Ok(())
        }
    }
}

/// Install `bundle` on a fresh simulated device in `dir`; the wall time of the install alone.
fn timed_install(exe: &Path, dir: &Path, root: &Path, bundle: &Path, size: u64) -> anyhow::Result<Duration> {
    timed_install_with_key(exe, dir, root, bundle, size, None)
}

/// The same, the device holding the encryption key `key_pem` (PKCS#8 PEM).
pub fn timed_install_with_key(
    exe: &Path,
    dir: &Path,
    root: &Path,
    bundle: &Path,
    size: u64,
    key_pem: Option<&str>,
) -> anyhow::Result<Duration> {
    let dev = dir.join("device");
    let _ = fs::remove_dir_all(&dev);
    let slot_mib = (size >> 20) + 2;
    run_quiet(
        Process::new(exe)
            .args(["device", "simulate", "--dir"])
            .arg(&dev)
            .arg("--root")
            .arg(root)
            .args(["--slot-mib", &slot_mib.to_string()]),
    )?;
    if let Some(pem) = key_pem {
        tern_fs::create_new(&dev.join("state/encryption.pem"), pem.as_bytes(), 0o600)?;
    }
    let t = Instant::now();
    run_quiet(
        Process::new(exe)
            .arg("install")
            .arg(bundle)
            .arg("--config")
            .arg(dev.join("agent.toml"))
            .args(["--output", "json"]),
    )?;
    let took = t.elapsed();
    fs::remove_dir_all(&dev)?;
    Ok(took)
}

/// `tern bench install`.
pub fn run_install(a: VerifyArgs) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let (dir, _temp) = super::work_dir(a.dir.as_ref(), "tern-bench-install-")?;
    let exe = std::env::current_exe()?;
    // The small image first: peak RSS is a running maximum over the children waited for.
    let small_dir = dir.join("small");
    fs::create_dir_all(&small_dir)?;
    let (small_bundle, small_root, _) = make_bundle(&small_dir, 64 << 20)?;
    timed_install(&exe, &small_dir, &small_root, &small_bundle, 64 << 20)?;
    let rss_small = crate::rusage::children_peak_rss();
    fs::remove_dir_all(&small_dir)?;
    eprintln!("preparing a {size}-byte image and its bundle in {}", dir.display());
    let (bundle, root, payload) = make_bundle(&dir, size)?;
    for f in [&payload, &bundle] {
        std::io::copy(&mut fs::File::open(f)?, &mut std::io::sink())?;
    }
    let mut best = Duration::MAX;
    for _ in 0..a.runs.max(1) {
        best = best.min(timed_install(&exe, &dir, &root, &bundle, size)?);
    }
    let rss_big = crate::rusage::children_peak_rss();
    let openssl = best_of(a.runs, || {
        run_quiet(Process::new("openssl").args(["dgst", "-sha256"]).arg(&payload))
    })?;
    let mbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let ratio = openssl.as_secs_f64() / best.as_secs_f64();
    let report = serde_json::json!({
        "image_bytes": size,
        "tern_install_seconds": best.as_secs_f64(),
        "tern_install_mb_per_s": mbps(best),
        "openssl_dgst_sha256_seconds": openssl.as_secs_f64(),
        "openssl_dgst_sha256_mb_per_s": mbps(openssl),
        "ratio_to_openssl": ratio,
        "peak_rss_64mib_bytes": rss_small,
        "peak_rss_full_bytes": rss_big,
    });
    match a.output {
        Format::Json => json(&report),
        Format::Text => {
            println!(
                "image                                {size} bytes, raw, uncompressed, into a file slot (fsynced)"
            );
            println!(
                "tern install        (best of {})      {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                best.as_secs_f64(),
                mbps(best)
            );
            println!(
                "openssl dgst -sha256 (best of {})     {:>8.3} s  {:>7.0} MB/s",
                a.runs,
                openssl.as_secs_f64(),
                mbps(openssl)
            );
            println!("ratio to openssl                     {ratio:.2}x");
            println!(
                "peak RSS, 64 MiB image               {:.1} MiB",
                rss_small as f64 / (1 << 20) as f64
            );
            println!(
                "peak RSS, {size}-byte image   {:.1} MiB",
                rss_big as f64 / (1 << 20) as f64
            );
            Ok(())
        }
    }
}
