//! `tern-bench tuf`: refresh plus one lookup (and the download of that one small target)
//! in a repository of 10,000 targets over succinct hash bins, `tern tuf` beside python-tuf's
//! client on the same repository, served by Python's `http.server`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tern_core::digest::HashAlgorithm;
use tern_core::{KeyAlgorithm, SigningKey, TargetPath};

use crate::fixture::{best_of, run_quiet, work_dir};
use crate::output::{json, now, Format};

/// `tern-bench tuf`.
#[derive(Debug, clap::Args)]
pub struct Args {
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

/// Run the benchmark: Tern's client against python-tuf's on the same repository and server.
pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.python.exists() || !a.adapter.exists() {
        bail!(
            "{} or {} is missing: run `interop/setup-venv.sh target/interop-venv` from the repository root",
            a.python.display(),
            a.adapter.display()
        );
    }
    let exe = crate::product::tern()?;
    let (dir, _temp) = work_dir(a.dir.as_ref(), "tern-bench-tuf-")?;
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
    let tern: Vec<std::ffi::OsString> = vec![exe.into(), "tuf".into()];
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
