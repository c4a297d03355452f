//! One module per subcommand, each with its arguments and a `run`.

pub mod agent;
pub mod bundle;
pub mod check;
pub mod demo;
pub mod docs;
pub mod encrypt;
pub mod key;
pub mod repo;
pub mod rollout;
pub mod server;
pub mod tuf;

use std::path::PathBuf;

use anyhow::Context;
use tern_core::SigningKey;

/// Load every `--key` file (private keys, mode 0600).
pub fn load_signers(paths: &[PathBuf]) -> anyhow::Result<Vec<SigningKey>> {
    paths
        .iter()
        .map(|p| tern_fs::load_signing_key(p).with_context(|| format!("loading signing key {}", p.display())))
        .collect()
}

/// Load public keys (TUF JSON, or the public half of a private key file).
pub fn load_public(paths: &[PathBuf]) -> anyhow::Result<Vec<tern_core::PublicKey>> {
    paths
        .iter()
        .map(|p| tern_fs::load_public_key(p).with_context(|| format!("loading public key {}", p.display())))
        .collect()
}

/// A working directory: the one given (created, kept), or a temporary one removed when the
/// returned guard drops.
pub fn work_dir(given: Option<&PathBuf>, prefix: &str) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            Ok((d.clone(), None))
        }
        None => {
            let temp = tempfile::Builder::new().prefix(prefix).tempdir()?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}
