//! Atomic file replacement and exclusive creation.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{io_err, Error, Result};

/// fsync a directory so that a rename inside it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replace `path` with `bytes` atomically: a reader (or a reboot) sees the old content or the
/// new, never a mix. The temp file is created in the same directory with `mode`.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = AtomicFile::create(path, mode)?;
    let tmp = f.temp_path().to_owned();
    f.file().write_all(bytes).map_err(io_err(&tmp))?;
    f.commit()
}

/// Create `path`, which must not exist, with `bytes` and `mode`, and make it durable. The
/// content is written and fsynced under a temporary name first and then hard-linked into
/// place (which fails if `path` exists): a power cut leaves no file or the whole file, never
/// a partial key.
pub fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        return Err(Error::Exists { path: path.to_owned() });
    }
    let mut f = AtomicFile::create(path, mode)?;
    let tmp = f.temp_path().to_owned();
    let written = f.file().write_all(bytes).and_then(|_| f.file().sync_all());
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    // The temporary name goes whatever happened (dropping `f` removes it).
    drop(f);
    match linked {
        Ok(()) => sync_dir(parent_of(path)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Exists { path: path.to_owned() }),
        // A file system without hard links (vfat: EPERM, EOPNOTSUPP): exclusive creation,
        // written in place.
        Err(e) if matches!(e.raw_os_error(), Some(1 | 95)) => create_in_place(path, bytes, mode),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn create_in_place(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = match OpenOptions::new().write(true).create_new(true).mode(mode).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(Error::Exists { path: path.to_owned() }),
        Err(e) => return Err(io_err(path)(e)),
    };
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = written {
        drop(f);
        let _ = fs::remove_file(path);
        return Err(io_err(path)(e));
    }
    sync_dir(parent_of(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        atomic_write(&p, b"one", 0o644).unwrap();
        atomic_write(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_new_refuses_existing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        create_new(&p, b"a", 0o600).unwrap();
        assert!(matches!(create_new(&p, b"b", 0o600), Err(Error::Exists { .. })));
        assert_eq!(fs::read(&p).unwrap(), b"a");
    }
}

/// A file written in place of `path` only when [`AtomicFile::commit`] is called: until then
/// the bytes go to a temp file in the same directory, removed if the value is dropped.
#[derive(Debug)]
pub struct AtomicFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Start writing a replacement for `path` with permission bits `mode`.
    pub fn create(path: &Path, mode: u32) -> Result<Self> {
        let dir = parent_of(path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Unique per process, call and instant, and created exclusively: an existing file or a
        // planted symlink of that name makes the open fail instead of being written through.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(".{name}.tmp-{}-{n}-{nanos:08x}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            tmp,
            file: Some(file),
        })
    }

    /// The temp file to write to.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file is present until commit")
    }

    /// The temp file's path (for error messages).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// fsync, rename over the destination, fsync the directory.
    pub fn commit(self) -> Result<()> {
        let dest = self.path.clone();
        self.commit_to(&dest)
    }

    /// Like [`AtomicFile::commit`], to another name in the same directory (for content-addressed
    /// names known only once the content is written).
    pub fn commit_to(mut self, dest: &Path) -> Result<()> {
        let file = self.file.take().expect("file is present until commit");
        let synced = file.sync_all().map_err(io_err(&self.tmp));
        drop(file);
        if let Err(e) = synced.and_then(|_| fs::rename(&self.tmp, dest).map_err(io_err(dest))) {
            let _ = fs::remove_file(&self.tmp);
            return Err(e);
        }
        sync_dir(parent_of(dest))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
