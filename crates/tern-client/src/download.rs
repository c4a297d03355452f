//! §5.7: fetching a target, streamed and verified while written, resumable.
//!
//! The bytes go to `.NAME.partial` beside the destination; length and every listed hash
//! are checked as they arrive; only a complete, matching file is renamed to NAME. A partial
//! file left by an interrupted download is hashed again from its first byte and the rest is
//! requested with an HTTP Range; a server that ignores the range sends it all again.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tern_core::digest::MultiHasher;

use crate::store::{encode, COMPONENT};
use crate::transport::{map_read_error, Guarded};
use crate::updater::{TargetInfo, Updater};
use crate::{Error, Result, TransportError};

const CHUNK: usize = 1 << 20;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn target_err(info: &TargetInfo) -> impl Fn(tern_core::Error) -> Error + '_ {
    move |e| Error::Target {
        target: info.path.to_string(),
        source: Box::new(e),
    }
}

/// The URL path of a target: consistent snapshots put one of its hashes before the file name,
/// inside the target's own directory. Each component is percent-encoded.
fn target_url(base: &str, info: &TargetInfo, consistent: bool) -> String {
    let (dir, name) = info.path.split();
    let name = match (consistent, info.file.hashes.iter().next()) {
        (true, Some((_, hash))) => format!("{hash}.{name}"),
        _ => name.to_owned(),
    };
    let mut url = base.to_owned();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        url.push_str(&percent_encoding::utf8_percent_encode(part, COMPONENT).to_string());
        url.push('/');
    }
    url.push_str(&percent_encoding::utf8_percent_encode(&name, COMPONENT).to_string());
    url
}

/// Hash a local file against `info`; `Ok(true)` when it is the target.
fn matches(path: &Path, info: &TargetInfo) -> Result<bool> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    };
    if f.metadata().map_err(io(path))?.len() != info.file.length {
        return Ok(false);
    }
    let mut h = MultiHasher::new(info.path.as_str(), &info.file.hashes).map_err(target_err(info))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish().is_ok())
}

pub(crate) fn download(
    up: &Updater<'_>,
    info: &TargetInfo,
    target_dir: &Path,
    base: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PathBuf> {
    let dest = target_dir.join(encode(info.path.as_str()));
    // Already here and intact: nothing to fetch.
    if matches(&dest, info)? {
        return Ok(dest);
    }
    fs::create_dir_all(target_dir).map_err(io(target_dir))?;
    let partial = target_dir.join(format!(".{}.partial", encode(info.path.as_str())));
    let url = target_url(base, info, up.consistent_snapshot());
    let length = info.file.length;

    // Hash what an earlier attempt left, from its first byte.
    let mut hasher = MultiHasher::new(info.path.as_str(), &info.file.hashes).map_err(target_err(info))?;
    let mut have = 0u64;
    let mut buf = vec![0u8; CHUNK];
    if let Ok(mut f) = File::open(&partial) {
        if f.metadata().map_err(io(&partial))?.len() <= length {
            loop {
                let n = f.read(&mut buf).map_err(io(&partial))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                have += n as u64;
            }
        }
    }
    if have == length && length > 0 {
        // Complete already (cut before the rename): check it here, asking nothing of the
        // server, which would answer a range at the end with 416.
        match hasher.finish() {
            Ok(()) => {
                // The bytes may never have reached the disk before the cut: make them durable
                // before the name says the download is complete.
                File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
                fs::rename(&partial, &dest).map_err(io(&dest))?;
                tern_fs::sync_dir(target_dir)?;
                return Ok(dest);
            }
            Err(_) => have = length + 1,
        }
        hasher = MultiHasher::new(info.path.as_str(), &info.file.hashes).map_err(target_err(info))?;
    }
    if have == 0 || have > length {
        have = 0;
        let _ = fs::remove_file(&partial);
        hasher = MultiHasher::new(info.path.as_str(), &info.file.hashes).map_err(target_err(info))?;
    }

    let fetched = up.transport().fetch(&url, have)?;
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&partial)
        .map_err(io(&partial))?;
    if fetched.offset != have {
        // The source sent the whole file: start over.
        have = 0;
        hasher = MultiHasher::new(info.path.as_str(), &info.file.hashes).map_err(target_err(info))?;
    }
    out.set_len(have).map_err(io(&partial))?;
    let mut out = std::io::BufWriter::with_capacity(
        CHUNK,
        std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(have))
            .map(|_| out)
            .map_err(io(&partial))?,
    );
    let mut body = Guarded {
        inner: fetched.body,
        limits: &up.limits,
        started: Instant::now(),
        read: 0,
    };
    loop {
        // Never read past the signed length (endless-data attack).
        let want = (length - have).min(CHUNK as u64) as usize;
        let n = if want == 0 {
            // One more byte would mean the source sends more than the length.
            let mut probe = [0u8; 1];
            match body.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => {
                    drop(out);
                    let _ = fs::remove_file(&partial);
                    return Err(TransportError::TooLarge { url, limit: length }.into());
                }
                // All the signed bytes arrived; a broken connection after them changes
                // nothing: the hashes decide.
                Err(_) => break,
            }
        } else {
            match body.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) => {
                    // Keep what arrived: the next attempt resumes from it.
                    let _ = out.flush();
                    return Err(map_read_error(&url, e, &up.limits).into());
                }
            }
        };
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io(&partial))?;
        hasher.update(&buf[..n]);
        have += n as u64;
        progress(have, length);
    }
    out.flush().map_err(io(&partial))?;
    let file = out.into_inner().map_err(|e| io(&partial)(e.into_error()))?;
    if have != length {
        // Short: keep the partial file for a resume.
        return Err(target_err(info)(tern_core::Error::LengthMismatch {
            what: info.path.to_string(),
            expected: length,
            found: have,
        }));
    }
    if let Err(e) = hasher.finish() {
        // Complete but wrong: never resume from it.
        drop(file);
        let _ = fs::remove_file(&partial);
        return Err(target_err(info)(e));
    }
    file.sync_all().map_err(io(&partial))?;
    drop(file);
    fs::rename(&partial, &dest).map_err(io(&dest))?;
    tern_fs::sync_dir(target_dir)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tern_core::{TargetFile, TargetPath};

    #[test]
    fn consistent_urls_put_the_hash_on_the_file_name() {
        let info = TargetInfo {
            path: TargetPath::new("a b/c?.img").unwrap(),
            file: TargetFile {
                length: 1,
                hashes: BTreeMap::from([("sha256".to_owned(), "ab".to_owned())]),
                custom: None,
                unrecognized: BTreeMap::new(),
            },
            role: "targets".into(),
        };
        assert_eq!(target_url("http://h/t/", &info, true), "http://h/t/a%20b/ab.c%3F.img");
        assert_eq!(target_url("http://h/t/", &info, false), "http://h/t/a%20b/c%3F.img");
    }
}
