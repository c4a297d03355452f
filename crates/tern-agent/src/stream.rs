//! Streaming a payload: decryption record by record, decompression, and the write into a
//! slot on its own threads (step 7 of the install procedure), in memory that does not grow
//! with the image.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;

use tern_core::digest::{Digester, HashAlgorithm};
use tern_core::manifest::Compression;

use crate::{Error, Result};

const CHUNK: usize = 1 << 20;
/// Bytes written between two `fdatasync`s of a slot.
const SYNC_EVERY: usize = 64 << 20;

/// The payload's plaintext: `data` decrypted with `key` (each record released only after
/// its tag verified) and decompressed, as the manifest declares.
/// How a payload's signed bytes become what is installed.
pub(crate) struct Decoding<'k> {
    /// The payload, for messages.
    pub target: &'k str,
    /// Its data key and signed encryption parameters, when it is encrypted.
    pub key: Option<(&'k tern_core::keywrap::DataKey, &'k tern_core::manifest::Encryption)>,
    /// Its compression.
    pub compression: Compression,
    /// The most it may decompress to (the manifest's `installed_length`, or the slot's size).
    pub limit: Option<u64>,
}

/// What a payload that decompresses past its limit fails with.
#[derive(Debug)]
struct Oversized {
    limit: u64,
}

impl std::fmt::Display for Oversized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it decompresses to more than {} bytes, its signed installed length (or the slot's size)",
            self.limit
        )
    }
}

impl std::error::Error for Oversized {}

/// At most `left` bytes of `inner`; one more is an [`Oversized`] error.
struct AtMost<'a> {
    inner: Box<dyn Read + 'a>,
    limit: u64,
    left: u64,
}

impl Read for AtMost<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(Oversized { limit: self.limit })),
            };
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

pub(crate) fn plaintext<'a>(data: &'a mut dyn Read, d: &Decoding<'_>) -> Result<Box<dyn Read + 'a>> {
    let (target, key, compression) = (d.target, d.key, d.compression);
    let refuse = |reason: String| Error::Decryption {
        target: target.to_owned(),
        reason,
    };
    let decrypted: Box<dyn Read + 'a> = match key {
        None => Box::new(data),
        Some((k, enc)) => {
            let d =
                tern_core::stream_aead::Decryptor::new(data, &k.record_key()[..]).map_err(|e| refuse(e.to_string()))?;
            if d.record_size() != enc.record_size as usize {
                return Err(refuse(format!(
                    "the payload's records are {} bytes, its signed manifest says {}",
                    d.record_size(),
                    enc.record_size
                )));
            }
            Box::new(d)
        }
    };
    let decoded: Box<dyn Read + 'a> = match compression {
        Compression::None => decrypted,
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(decrypted).map_err(|e| Error::Unsupported {
                target: target.to_owned(),
                reason: format!("zstd: {e}"),
            })?,
        ),
    };
    // Decompression is bounded before the payload's hash, known only at its end, can tell
    // a substituted payload from the signed one: a bomb stops at the signed length.
    Ok(match (compression, d.limit) {
        (Compression::None, _) | (_, None) => decoded,
        (_, Some(limit)) => Box::new(AtMost {
            inner: decoded,
            limit,
            left: limit,
        }),
    })
}

/// An error while reading a payload: a record that failed authentication is a decryption
/// error of the payload, anything else an I/O error at `path`.
pub(crate) fn read_error(target: &str, path: &Path, e: std::io::Error) -> Error {
    let inner = e.get_ref();
    if let Some(s) = inner.and_then(|i| i.downcast_ref::<tern_core::stream_aead::StreamError>()) {
        return Error::Decryption {
            target: target.to_owned(),
            reason: s.to_string(),
        };
    }
    if let Some(o) = inner.and_then(|i| i.downcast_ref::<Oversized>()) {
        return Error::Unsupported {
            target: target.to_owned(),
            reason: o.to_string(),
        };
    }
    Error::io(path)(e)
}

/// Step 7: write `data` into `device` from offset 0, decrypting and decompressing as
/// declared; returns the image length and its SHA-256 (`None` when the caller knows it
/// already, `image_known`: a plain payload is the signed bytes, whose hashes the bundle
/// reader checks; an encrypted one carries its image digest sealed).
///
/// Reading (the bundle reader's hashing, decryption, decompression) happens on this
/// thread; writing, and hashing the image when it differs from the signed bytes, on
/// another, with a few 1 MiB buffers between them: the work overlaps, memory stays flat.
pub(crate) fn stream_into(
    device: &Path,
    data: &mut dyn Read,
    decoding: &Decoding<'_>,
    image_known: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, Option<String>)> {
    let target = decoding.target;
    let f = OpenOptions::new().write(true).open(device).map_err(Error::io(device))?;
    // Nothing larger than the slot is written into it (a file-backed slot would grow).
    let size = {
        use std::io::Seek;
        std::fs::File::open(device)
            .and_then(|mut r| r.seek(std::io::SeekFrom::End(0)))
            .map_err(Error::io(device))?
    };
    let need = !image_known;
    let limited = Decoding {
        limit: Some(decoding.limit.map_or(size, |l| l.min(size))),
        ..*decoding
    };
    let mut source = plaintext(data, &limited)?;
    let (written, result) = std::thread::scope(|scope| {
        type Buf = std::sync::Arc<Vec<u8>>;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Buf>(4);
        let (back_tx, back_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
        // Whichever of writer and hasher is done with a buffer last hands it back.
        let give_back = |back: &std::sync::mpsc::SyncSender<Vec<u8>>, buf: Buf| {
            if let Some(v) = std::sync::Arc::into_inner(buf) {
                let _ = back.try_send(v);
            }
        };
        // The image's hash, when it is not the signed bytes' (decrypted or decompressed),
        // on a thread of its own: hashing, reading and writing overlap.
        let (hash_tx, hash_rx) = std::sync::mpsc::sync_channel::<Buf>(4);
        let hash_back = back_tx.clone();
        let hasher = scope.spawn(move || -> Option<String> {
            let mut digest = Digester::new(&[HashAlgorithm::Sha256]);
            for buf in hash_rx {
                digest.update(&buf);
                give_back(&hash_back, buf);
            }
            Some(digest.finish().1.get("sha256").cloned().unwrap_or_default())
        });
        // A third thread flushes what was written so far while the writer goes on, so the
        // final fsync does not wait for the whole image and writing never stops to flush.
        let syncer_file = f.try_clone();
        let (sync_tx, sync_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let syncer = scope.spawn(move || -> std::io::Result<()> {
            let f = syncer_file?;
            for () in sync_rx {
                f.sync_data()?;
            }
            Ok(())
        });
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut f = f;
            let mut unsynced = 0usize;
            for buf in rx {
                f.write_all(&buf)?;
                unsynced += buf.len();
                if unsynced >= SYNC_EVERY {
                    // A flush request; if one is still running, the next covers this too.
                    let _ = sync_tx.try_send(());
                    unsynced = 0;
                }
                give_back(&back_tx, buf);
            }
            drop(sync_tx);
            f.sync_all()
        });
        let mut total = 0u64;
        let hash_tx = need.then_some(hash_tx);
        let read = (|| -> std::io::Result<()> {
            loop {
                let mut buf = back_rx.try_recv().unwrap_or_default();
                buf.resize(CHUNK, 0);
                let n = read_full(&mut source, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                progress(n as u64);
                total += n as u64;
                let buf = std::sync::Arc::new(buf);
                if let Some(h) = &hash_tx {
                    let _ = h.send(buf.clone());
                }
                if tx.send(buf).is_err() {
                    // The writer stopped: its error is the one to report.
                    return Ok(());
                }
            }
        })();
        drop(tx);
        let hashed = hash_tx.is_some();
        drop(hash_tx);
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")));
        let synced = syncer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")));
        let digest = hasher.join();
        (
            total,
            read.map_err(|e| read_error(target, device, e)).and_then(|()| {
                synced.map_err(Error::io(device))?;
                wrote.map_err(Error::io(device))?;
                match (hashed, digest) {
                    (false, _) => Ok(None),
                    (true, Ok(Some(d))) => Ok(Some(d)),
                    (true, _) => Err(Error::io(device)(std::io::Error::other(
                        "the image hashing thread failed",
                    ))),
                }
            }),
        )
    });
    let image_sha256 = result?;
    Ok((written, image_sha256))
}

/// Fill `buf` as far as the source allows (short only at the end).
fn read_full(from: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match from.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn copy(from: &mut dyn Read, to: &mut dyn Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// SHA-256 of the first `length` bytes of a slot (what the power-cut test and `agent
/// status --verify` compare with the record).
pub fn slot_digest(device: &Path, length: u64) -> Result<String> {
    let f = std::fs::File::open(device).map_err(Error::io(device))?;
    let mut d = Digester::new(&[HashAlgorithm::Sha256]);
    let mut r = f.take(length);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).map_err(Error::io(device))?;
        if n == 0 {
            break;
        }
        d.update(&buf[..n]);
    }
    let (n, h) = d.finish();
    if n != length {
        return Err(Error::State {
            path: device.to_owned(),
            reason: format!("slot holds {n} bytes, record says {length}"),
        });
    }
    Ok(h.get("sha256").cloned().unwrap_or_default())
}
