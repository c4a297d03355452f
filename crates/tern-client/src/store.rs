//! The trusted metadata directory: `root.json`, `timestamp.json`, `snapshot.json`,
//! `targets.json` and `ROLE.json` for delegated roles (the name percent-encoded, so that a
//! role called `../x` or `a/b` stays a file inside the directory). Each holds the exact
//! bytes that verified, replaced atomically.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::{Error, Result};

/// What python's `urllib.parse.quote(name, "")` leaves alone: letters, digits and `_.-~`.
pub(crate) const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

/// Percent-encode a role name or target path as one URL component / file name.
pub fn encode(name: &str) -> String {
    let s = utf8_percent_encode(name, COMPONENT).to_string();
    // `.` and `..` survive encoding unchanged and are not file names.
    match s.as_str() {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => s,
    }
}

/// The directory of trusted metadata.
#[derive(Debug, Clone)]
pub struct MetadataDir {
    dir: PathBuf,
}

impl MetadataDir {
    /// Use `dir` (created when a root is first written).
    pub fn new(dir: &Path) -> Self {
        MetadataDir { dir: dir.to_owned() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where `role` is kept.
    pub fn file(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{}.json", encode(role)))
    }

    /// The trusted bytes of `role`, if there are any (at most `limit` bytes are read).
    pub fn read(&self, role: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let path = self.file(role);
        let f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let mut buf = Vec::new();
        f.take(limit.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        // An oversized local file is not trusted; the remote copy replaces it.
        Ok((buf.len() as u64 <= limit).then_some(buf))
    }

    /// Persist bytes that verified.
    pub fn write(&self, role: &str, bytes: &[u8]) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|source| Error::Io {
            path: self.dir.clone(),
            source,
        })?;
        tern_fs::atomic_write(&self.file(role), bytes, 0o644)?;
        Ok(())
    }

    /// Forget a role (fast-forward recovery).
    pub fn remove(&self, role: &str) -> Result<()> {
        let path = self.file(role);
        match fs::remove_file(&path) {
            Ok(()) => tern_fs::sync_dir(&self.dir).map_err(Error::from),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_role_names_stay_inside_the_directory() {
        assert_eq!(encode("../x"), "..%2Fx");
        assert_eq!(encode("/x"), "%2Fx");
        assert_eq!(encode("a?b#c"), "a%3Fb%23c");
        assert_eq!(encode(".."), "%2E%2E");
        assert_eq!(encode("bin-0f"), "bin-0f");
    }
}
