//! The server's online keys and the director's root.
//!
//! `tern server init` makes, in the key directory (mode 0600 private files):
//! - `snapshot.pem`, `timestamp.pem`: the release repository's online roles. The release
//!   engineer lists their public halves (`*.pub.json`) in the repository's root.
//! - `director.pem`: signs director orders.
//! - `director-root.pem`: the director's offline root key. It signs `director-root.json`
//!   (a TUF root whose `targets` role is the director key) and should then be moved off
//!   the server; `tern server init` says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tern_core::metadata::Common;
use tern_core::{DateTime, Envelope, KeyAlgorithm, RoleKeys, Root, SigningKey};
use tern_fs::KeyFiles;

use crate::{Error, Result};

/// The keys a running server signs with.
pub struct OnlineKeys {
    /// Signs snapshot metadata.
    pub snapshot: SigningKey,
    /// Signs timestamp metadata.
    pub timestamp: SigningKey,
    /// Signs director orders.
    pub director: SigningKey,
    /// The director's root metadata (devices are provisioned with it).
    pub director_root: Vec<u8>,
}

fn files(dir: &Path, name: &str) -> KeyFiles {
    KeyFiles::for_prefix(&dir.join(name))
}

/// The director root's file.
pub fn director_root_path(dir: &Path) -> PathBuf {
    dir.join("director-root.json")
}

impl OnlineKeys {
    /// Load the keys `init` made.
    pub fn load(dir: &Path) -> Result<Self> {
        let load = |name: &str| -> Result<SigningKey> {
            let f = files(dir, name);
            if !f.private.exists() {
                return Err(Error::Config(format!(
                    "{}: missing; run `tern server init` first",
                    f.private.display()
                )));
            }
            Ok(tern_fs::load_signing_key(&f.private)?)
        };
        let root_path = director_root_path(dir);
        let director_root = std::fs::read(&root_path).map_err(|e| Error::Io(root_path.display().to_string(), e))?;
        Ok(OnlineKeys {
            snapshot: load("snapshot")?,
            timestamp: load("timestamp")?,
            director: load("director")?,
            director_root,
        })
    }
}

/// What `init` made.
#[derive(Debug)]
pub struct Initialised {
    /// Public key files of the online snapshot and timestamp keys, for the repository root.
    pub snapshot_pub: PathBuf,
    /// See `snapshot_pub`.
    pub timestamp_pub: PathBuf,
    /// The director root devices are provisioned with.
    pub director_root: PathBuf,
    /// The offline director root key, to be moved off the server.
    pub director_root_key: PathBuf,
}

/// Generate the online keys and sign the director root (valid `root_years` years).
pub fn init(dir: &Path, now: DateTime, root_years: i64) -> Result<Initialised> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Io(dir.display().to_string(), e))?;
    let mut made = BTreeMap::new();
    for name in ["snapshot", "timestamp", "director", "director-root"] {
        let f = files(dir, name);
        tern_fs::generate_key_files(KeyAlgorithm::Ed25519, &f)?;
        made.insert(name, tern_fs::load_signing_key(&f.private)?);
    }
    let director = &made["director"];
    let offline = &made["director-root"];
    let mut keys = BTreeMap::new();
    keys.insert(director.public().keyid(), director.public().clone());
    keys.insert(offline.public().keyid(), offline.public().clone());
    let role = |k: &SigningKey| RoleKeys {
        keyids: vec![k.public().keyid()],
        threshold: 1,
        unrecognized: BTreeMap::new(),
    };
    let roles = BTreeMap::from([
        ("root".to_owned(), role(offline)),
        ("targets".to_owned(), role(director)),
        ("snapshot".to_owned(), role(director)),
        ("timestamp".to_owned(), role(director)),
    ]);
    let root = Root {
        common: Common::new("root", 1, DateTime::from_unix(now.unix() + root_years * 365 * 86_400)),
        consistent_snapshot: true,
        keys,
        roles,
        unrecognized: BTreeMap::new(),
    };
    let mut env = Envelope::new(&root)?;
    env.sign("root", offline)?;
    let path = director_root_path(dir);
    tern_fs::create_new(&path, &env.to_bytes(), 0o644)?;
    Ok(Initialised {
        snapshot_pub: files(dir, "snapshot").public,
        timestamp_pub: files(dir, "timestamp").public,
        director_root: path,
        director_root_key: files(dir, "director-root").private,
    })
}
