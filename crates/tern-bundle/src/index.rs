//! Random access to a bundle's entries, for the TUF client's offline source.
//!
//! Indexing reads only the tar headers (seeking over the data); nothing is trusted here: the
//! client verifies whatever it reads through the ordinary workflow.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tern_core::text::shown;

use crate::format::{classify, MAX_METADATA_ENTRIES, MAX_PAYLOADS};
use crate::{Error, Result};

/// Entry names → (data offset, size) of a bundle file.
#[derive(Debug, Clone)]
pub struct BundleIndex {
    path: PathBuf,
    entries: BTreeMap<String, (u64, u64)>,
}

impl BundleIndex {
    /// Index `path`'s entries.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let f = File::open(path).map_err(io)?;
        let mut archive = tern_tar::Archive::new(BufReader::new(f));
        let mut entries = BTreeMap::new();
        while let Some(entry) = archive.next_entry_seek()? {
            let name = entry.name()?.to_owned();
            classify(&name)?;
            if entry.kind != tern_tar::Kind::File {
                return Err(Error::Format {
                    entry: shown(&name),
                    reason: format!("only regular files are allowed, not a {}", entry.kind),
                });
            }
            if entries.insert(name.clone(), (entry.data_offset, entry.size)).is_some() {
                return Err(Error::Format {
                    entry: shown(&name),
                    reason: "appears twice".into(),
                });
            }
            if entries.len() > MAX_PAYLOADS + MAX_METADATA_ENTRIES {
                return Err(Error::Format {
                    entry: shown(&name),
                    reason: "too many entries".into(),
                });
            }
        }
        Ok(BundleIndex {
            path: path.to_owned(),
            entries,
        })
    }

    /// Whether the bundle has an entry of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The entry names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Read entry `name` from byte `offset` on; `None` when there is no such entry.
    pub fn read(&self, name: &str, offset: u64) -> Result<Option<(u64, Box<dyn Read + Send>)>> {
        let Some(&(start, size)) = self.entries.get(name) else {
            return Ok(None);
        };
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = File::open(&self.path).map_err(io)?;
        let offset = offset.min(size);
        f.seek(SeekFrom::Start(start + offset)).map_err(io)?;
        Ok(Some((size, Box::new(f.take(size - offset)))))
    }
}
