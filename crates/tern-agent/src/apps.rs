//! The file and archive installers: a payload is written beside its destination (an
//! atomic temporary file, or a `.NAME.tern-new` directory the archive is unpacked into) and
//! put in place only after the whole bundle verified.
//!
//! Archives are untrusted even when signed (a release engineer's build can be wrong): they
//! are read with `tern_tar` (every header bounded before it is read), hold only regular
//! files and directories whose names stay inside the new directory, and every file and
//! directory is created private (0600, 0700), written, fsynced, and given its final mode
//! (the header's, without setuid, setgid, sticky or write for group and others) only at the
//! end. The archive's entry for the directory itself (`.`, `./`) sets nothing.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tern_core::manifest::Installer;
use tern_core::text::shown;

use crate::state::AppRecord;
use crate::stream::{copy, read_error};
use crate::{Error, Result};

/// Most entries one archive may hold.
pub const MAX_ARCHIVE_ENTRIES: usize = 100_000;

/// A file or archive payload written beside its destination, not yet in place.
pub(crate) enum Staged {
    File {
        tmp: tern_fs::AtomicFile,
        record: AppRecord,
    },
    Archive {
        new_dir: PathBuf,
        record: AppRecord,
    },
}

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{suffix}"))
}

/// Write `input` beside `record.destination` with `installer`.
pub(crate) fn stage(installer: Installer, input: &mut dyn Read, target: &str, record: AppRecord) -> Result<Staged> {
    let dest = record.destination.clone();
    match installer {
        Installer::File => {
            let mut tmp = tern_fs::AtomicFile::create(&dest, 0o644)?;
            copy(input, tmp.file()).map_err(|e| read_error(target, &dest, e))?;
            Ok(Staged::File { tmp, record })
        }
        Installer::Archive => {
            let new_dir = sibling(&dest, "tern-new");
            let _ = std::fs::remove_dir_all(&new_dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&new_dir)
                .map_err(Error::io(&new_dir))?;
            if let Err(e) = unpack_archive(input, &new_dir, target) {
                let _ = std::fs::remove_dir_all(&new_dir);
                return Err(e);
            }
            Ok(Staged::Archive { new_dir, record })
        }
        other => Err(Error::Unsupported {
            target: target.to_owned(),
            reason: format!("the {other} installer is not supported by this agent"),
        }),
    }
}

/// The path inside the archive's directory an entry names: relative, `.` components
/// dropped, no `..`; `None` for the directory itself.
fn entry_path(name: &str) -> std::result::Result<Option<PathBuf>, &'static str> {
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("a `..` path"),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path"),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// The mode an entry ends with: the header's permission bits without setuid, setgid,
/// sticky or write for group and others, and always readable and writable (files) or
/// searchable (directories) by the owner.
fn final_mode(header_mode: u32, dir: bool) -> u32 {
    (header_mode & 0o755) | if dir { 0o700 } else { 0o600 }
}

/// Unpack an application archive into `dir` (empty, made by the caller).
fn unpack_archive(input: &mut dyn Read, dir: &Path, target: &str) -> Result<()> {
    let bad = |entry: &str, reason: String| Error::Unsupported {
        target: target.to_owned(),
        reason: format!("archive entry `{}`: {reason}", shown(entry)),
    };
    let mut archive = tern_tar::Archive::new(input);
    // (path, final mode, is a directory) of everything made, for the last pass.
    let mut made: Vec<(PathBuf, u32, bool)> = vec![(dir.to_owned(), 0o755, true)];
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let tar_err = |e: tern_tar::Error| Error::Unsupported {
        target: target.to_owned(),
        reason: format!("archive: {e}"),
    };
    let mut count = 0usize;
    while let Some(entry) = archive.next_entry().map_err(tar_err)? {
        count += 1;
        if count > MAX_ARCHIVE_ENTRIES {
            return Err(bad(
                &entry.shown_name(),
                format!("the archive holds more than {MAX_ARCHIVE_ENTRIES} entries"),
            ));
        }
        let name = entry.name().map_err(tar_err)?.to_owned();
        let is_dir = match entry.kind {
            tern_tar::Kind::File => false,
            tern_tar::Kind::Directory => true,
            other => {
                return Err(bad(
                    &name,
                    format!("only regular files and directories are installed, not a {other}"),
                ))
            }
        };
        let Some(rel) = entry_path(&name).map_err(|r| bad(&name, r.to_owned()))? else {
            // The directory itself: its mode is the installer's, not the archive's.
            if !is_dir {
                return Err(bad(&name, "a file named like the directory itself".into()));
            }
            continue;
        };
        if !seen.insert(rel.clone()) {
            return Err(bad(&name, "appears twice".into()));
        }
        let path = dir.join(&rel);
        // Parents the archive does not list are made private too; its own entries for
        // them, if they come later, give them their mode.
        if let Some(parent) = path.parent() {
            let mut missing = Vec::new();
            let mut p = parent;
            while p != dir && !p.exists() {
                missing.push(p.to_owned());
                p = p.parent().unwrap_or(dir);
            }
            if !missing.is_empty() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(Error::io(parent))?;
                made.extend(missing.into_iter().map(|m| (m, 0o755, true)));
            }
        }
        if is_dir {
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                // Made above as the parent of an earlier entry.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {
                    made.retain(|(p, _, _)| p != &path);
                }
                Err(e) => return Err(Error::io(&path)(e)),
            }
            made.push((path, final_mode(entry.mode, true), true));
            continue;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(Error::io(&path))?;
        copy(&mut archive.data(), &mut f).map_err(|e| read_error(target, &path, e))?;
        f.sync_all().map_err(Error::io(&path))?;
        made.push((path, final_mode(entry.mode, false), false));
    }
    // Directories deepest first: their modes go on after everything inside is written,
    // and each is fsynced after its entries.
    made.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (p, mode, is_dir) in &made {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(*mode)).map_err(Error::io(p))?;
        if *is_dir {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(Error::io(p))?;
        }
    }
    Ok(())
}

/// Finish or undo an archive swap a power cut interrupted (run when the agent starts).
pub(crate) fn recover_archive_swaps(apps: &std::collections::BTreeMap<String, AppRecord>) {
    for a in apps.values() {
        let dest = &a.destination;
        let old = sibling(dest, "tern-old");
        let new = sibling(dest, "tern-new");
        if !dest.exists() && old.exists() {
            // Cut between the two renames: put the previous version back.
            let _ = std::fs::rename(&old, dest);
        }
        let _ = std::fs::remove_dir_all(&new);
        let _ = std::fs::remove_dir_all(&old);
    }
}

/// Drop staged payloads of a failed install.
pub(crate) fn discard(staged: Vec<Staged>) {
    for s in staged {
        if let Staged::Archive { new_dir, .. } = s {
            let _ = std::fs::remove_dir_all(new_dir);
        }
        // A staged file's temp is removed when its AtomicFile drops.
    }
}

/// Put a staged payload in place.
pub(crate) fn apply(s: Staged) -> Result<AppRecord> {
    match s {
        Staged::File { tmp, record } => {
            tmp.commit()?;
            Ok(record)
        }
        Staged::Archive { new_dir, record } => {
            let dest = &record.destination;
            let old = sibling(dest, "tern-old");
            let _ = std::fs::remove_dir_all(&old);
            if dest.exists() {
                std::fs::rename(dest, &old).map_err(Error::io(dest))?;
            }
            std::fs::rename(&new_dir, dest).map_err(Error::io(dest))?;
            if let Some(parent) = dest.parent() {
                tern_fs::sync_dir(parent)?;
            }
            let _ = std::fs::remove_dir_all(&old);
            Ok(record)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_inside() {
        assert_eq!(entry_path("./a/./b").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(entry_path("./").unwrap(), None);
        assert_eq!(entry_path(".").unwrap(), None);
        assert!(entry_path("a/../../b").is_err());
        assert!(entry_path("/etc/passwd").is_err());
    }

    #[test]
    fn modes_lose_special_bits_and_group_write() {
        assert_eq!(final_mode(0o4777, false), 0o755);
        assert_eq!(final_mode(0o000, false), 0o600);
        assert_eq!(final_mode(0o1777, true), 0o755);
        assert_eq!(final_mode(0o500, true), 0o700);
    }
}
