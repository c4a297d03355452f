//! Reading untrusted tar archives in bounded memory.
//!
//! What it does: walks a tar stream header by header, with every header block parsed here
//! (field decoding borrows `tar::Header`), and hands the caller one [`Entry`] at a time
//! with a reader over its data. The extension entries that describe the next entry (GNU
//! long names `L` and long link names `K`, PAX local `x` and global `g` headers) are read
//! into memory only after their declared size has been checked against [`Limits`], and
//! only a few of them may precede one entry. A 1 GiB "long name" is refused by its header,
//! before a byte of it is read.
//!
//! Why not `tar::Archive`: it reads every extension entry whole, whatever size its header
//! declares, before its caller sees anything (an 8 KB sparse file with a GNU long-name
//! header declaring 1 GiB drove a verifier to 3.6 GB of memory), and echoes names whole
//! in its errors.
//!
//! What it does not do: write archives (the `tar` crate does that for bundles), interpret
//! GNU sparse maps, links or devices (they are reported as [`Kind::Other`] for the caller
//! to refuse), or touch the file system.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::{self, Read, Seek, SeekFrom};

use tern_core::text::shown_bytes;

/// The tar block size.
pub const BLOCK: u64 = 512;

/// What one archive may declare before the reader refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest entry name, in bytes, however it is stored (header, GNU long name, PAX path).
    pub max_name: usize,
    /// Largest PAX extended header (local or global), in bytes.
    pub max_pax: u64,
    /// Most extension entries before one entry.
    pub max_extensions: usize,
}

impl Default for Limits {
    /// 4,096-byte names (Linux's `PATH_MAX`), 64 KiB PAX headers, 8 extension entries.
    fn default() -> Self {
        Limits {
            max_name: 4096,
            max_pax: 64 << 10,
            max_extensions: 8,
        }
    }
}

/// Why an archive was refused. Names are shown shortened and escaped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the underlying stream failed.
    #[error("reading the archive at byte {offset}: {source}")]
    Io {
        /// Where.
        offset: u64,
        /// The cause.
        source: io::Error,
    },
    /// The stream ends inside a header or an extension entry.
    #[error("the archive ends inside the header at byte {offset}")]
    Truncated {
        /// The header's offset.
        offset: u64,
    },
    /// A header block's checksum is wrong.
    #[error("the header at byte {offset} has a wrong checksum (not a tar archive, or corrupt)")]
    Checksum {
        /// The header's offset.
        offset: u64,
    },
    /// A header field cannot be read.
    #[error("the header at byte {offset}: {reason}")]
    Header {
        /// The header's offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An extension entry declares more bytes than allowed.
    #[error("the {kind} at byte {offset} declares {size} bytes; at most {limit} are accepted")]
    ExtensionTooLarge {
        /// The header's offset.
        offset: u64,
        /// `GNU long name`, `GNU long link name`, `PAX header` or `PAX global header`.
        kind: &'static str,
        /// The declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// More extension entries precede one entry than allowed.
    #[error("more than {limit} extension headers precede the entry at byte {offset}")]
    TooManyExtensions {
        /// The first header's offset.
        offset: u64,
        /// The limit.
        limit: usize,
    },
    /// An extension entry is malformed or not supported.
    #[error("the extension header at byte {offset}: {reason}")]
    Extension {
        /// The header's offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An entry's name is longer than allowed.
    #[error("the entry at byte {offset} has a {len}-byte name; at most {limit} are accepted")]
    NameTooLong {
        /// The entry's offset.
        offset: u64,
        /// The name's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// An entry's name is not UTF-8.
    #[error("the entry name `{name}` is not UTF-8")]
    NotUtf8 {
        /// The name, shown.
        name: String,
    },
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (`0`, NUL, or contiguous `7`).
    File,
    /// A directory (`5`).
    Directory,
    /// Anything else (links, devices, FIFOs, GNU sparse files…), by its type byte.
    Other(u8),
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::File => f.write_str("regular file"),
            Kind::Directory => f.write_str("directory"),
            Kind::Other(b'1') => f.write_str("hard link"),
            Kind::Other(b'2') => f.write_str("symbolic link"),
            Kind::Other(b'3') => f.write_str("character device"),
            Kind::Other(b'4') => f.write_str("block device"),
            Kind::Other(b'6') => f.write_str("FIFO"),
            Kind::Other(b'S') => f.write_str("GNU sparse file"),
            Kind::Other(b) if b.is_ascii_graphic() => write!(f, "entry of type `{}`", *b as char),
            Kind::Other(b) => write!(f, "entry of type {b:#04x}"),
        }
    }
}

/// One entry's header, all extensions applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    name: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Its data's length.
    pub size: u64,
    /// Its permission bits as the header gives them (the caller decides what to apply).
    pub mode: u32,
    /// Where its first header (extension or not) starts.
    pub offset: u64,
    /// Where its data starts.
    pub data_offset: u64,
}

impl Entry {
    /// The name's bytes.
    pub fn name_bytes(&self) -> &[u8] {
        &self.name
    }

    /// The name, which must be UTF-8.
    pub fn name(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.name).map_err(|_| Error::NotUtf8 {
            name: self.shown_name(),
        })
    }

    /// The name shortened and escaped, for messages.
    pub fn shown_name(&self) -> String {
        shown_bytes(&self.name)
    }
}

/// A tar stream read entry by entry.
pub struct Archive<R> {
    inner: R,
    limits: Limits,
    pos: u64,
    left: u64,
    pad: u64,
    done: bool,
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// What the extension entries before an entry said.
#[derive(Default)]
struct Extensions {
    count: usize,
    long_name: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
}

impl<R: Read> Archive<R> {
    /// Read `inner` with the default limits.
    pub fn new(inner: R) -> Self {
        Self::with_limits(inner, Limits::default())
    }

    /// Read `inner` with `limits`.
    pub fn with_limits(inner: R, limits: Limits) -> Self {
        Archive {
            inner,
            limits,
            pos: 0,
            left: 0,
            pad: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next entry (what is left of the current entry's data is read and dropped);
    /// `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        let rest = self.left + self.pad;
        self.discard(rest)?;
        self.next_header()
    }

    /// A reader over the current entry's data (what is left of it).
    pub fn data(&mut self) -> Data<'_, R> {
        Data { archive: self }
    }

    /// The stream underneath.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Io {
            offset: self.pos,
            source,
        }
    }

    fn discard(&mut self, mut n: u64) -> Result<(), Error> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            let got = match self.inner.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Error::Truncated { offset: self.pos });
                }
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io(e)),
            };
            self.pos += got as u64;
            n -= got as u64;
        }
        self.left = 0;
        self.pad = 0;
        Ok(())
    }

    /// Fill `buf`; false on a clean end of stream before its first byte.
    fn read_block(&mut self, buf: &mut [u8; BLOCK as usize]) -> Result<bool, Error> {
        let start = self.pos;
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) if n == 0 => return Ok(false),
                Ok(0) => return Err(Error::Truncated { offset: start }),
                Ok(k) => {
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(true)
    }

    /// Read an extension entry's `size` bytes (already checked against its limit) and its padding.
    fn read_extension(&mut self, offset: u64, size: u64) -> Result<Vec<u8>, Error> {
        let mut data = vec![0u8; size as usize];
        let mut n = 0;
        while n < data.len() {
            match self.inner.read(&mut data[n..]) {
                Ok(0) => return Err(Error::Truncated { offset }),
                Ok(k) => {
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        self.discard(padding(size)).map_err(|e| match e {
            Error::Truncated { .. } => Error::Truncated { offset },
            other => other,
        })?;
        Ok(data)
    }

    fn next_header(&mut self) -> Result<Option<Entry>, Error> {
        if self.done {
            return Ok(None);
        }
        let first = self.pos;
        let mut ext = Extensions::default();
        loop {
            let offset = self.pos;
            let mut block = [0u8; BLOCK as usize];
            if !self.read_block(&mut block)? {
                if ext.count > 0 {
                    return Err(Error::Truncated { offset });
                }
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|b| *b == 0) {
                if ext.count > 0 {
                    return Err(Error::Extension {
                        offset,
                        reason: "extension headers are followed by the end of the archive".into(),
                    });
                }
                // The end-of-archive marker; whatever follows is not read.
                self.done = true;
                return Ok(None);
            }
            let header = tar::Header::from_byte_slice(&block);
            check_sum(&block, header, offset)?;
            let size = header.entry_size().map_err(|_| Error::Header {
                offset,
                reason: "the size field is not a number".into(),
            })?;
            let type_byte = header.entry_type().as_byte();
            let (kind, limit) = match type_byte {
                b'L' => ("GNU long name", self.limits.max_name as u64 + 1),
                b'K' => ("GNU long link name", self.limits.max_name as u64 + 1),
                b'x' => ("PAX header", self.limits.max_pax),
                b'g' => ("PAX global header", self.limits.max_pax),
                _ => return self.entry(header, ext, first, offset, size).map(Some),
            };
            ext.count += 1;
            if ext.count > self.limits.max_extensions {
                return Err(Error::TooManyExtensions {
                    offset: first,
                    limit: self.limits.max_extensions,
                });
            }
            if size > limit {
                return Err(Error::ExtensionTooLarge {
                    offset,
                    kind,
                    size,
                    limit,
                });
            }
            let data = self.read_extension(offset, size)?;
            match type_byte {
                b'L' => {
                    if ext.long_name.is_some() {
                        return Err(Error::Extension {
                            offset,
                            reason: "a second GNU long name for the same entry".into(),
                        });
                    }
                    ext.long_name = Some(trim_nuls(data));
                }
                b'x' => {
                    for (key, value) in pax_records(&data).map_err(|reason| Error::Extension { offset, reason })? {
                        match key {
                            b"path" => ext.pax_path = Some(value.to_vec()),
                            b"size" => {
                                let size = std::str::from_utf8(value)
                                    .ok()
                                    .and_then(|v| v.parse::<u64>().ok())
                                    .ok_or_else(|| Error::Extension {
                                        offset,
                                        reason: "the PAX size is not a number".into(),
                                    })?;
                                ext.pax_size = Some(size);
                            }
                            k if k.starts_with(b"GNU.sparse.") => {
                                return Err(Error::Extension {
                                    offset,
                                    reason: "GNU sparse files are not supported".into(),
                                })
                            }
                            _ => {}
                        }
                    }
                }
                // A global header's records are checked for form and otherwise ignored, as
                // the `tar` crate ignores them; a long link name matters only to links,
                // which callers refuse.
                b'g' => {
                    pax_records(&data).map_err(|reason| Error::Extension { offset, reason })?;
                }
                _ => {}
            }
        }
    }

    fn entry(
        &mut self,
        header: &tar::Header,
        ext: Extensions,
        first: u64,
        offset: u64,
        size: u64,
    ) -> Result<Entry, Error> {
        let size = ext.pax_size.unwrap_or(size);
        let name = match (ext.pax_path, ext.long_name) {
            (Some(p), _) => p,
            (None, Some(l)) => l,
            (None, None) => header.path_bytes().into_owned(),
        };
        if name.len() > self.limits.max_name {
            return Err(Error::NameTooLong {
                offset,
                len: name.len(),
                limit: self.limits.max_name,
            });
        }
        let mode = header.mode().map_err(|_| Error::Header {
            offset,
            reason: "the mode field is not a number".into(),
        })?;
        let t = header.entry_type();
        let kind = if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Directory
        } else {
            Kind::Other(t.as_byte())
        };
        let pad = size
            .checked_add(BLOCK - 1)
            .map(|_| padding(size))
            .ok_or(Error::Header {
                offset,
                reason: "the size is too large".into(),
            })?;
        self.left = size;
        self.pad = pad;
        Ok(Entry {
            name,
            kind,
            size,
            mode,
            offset: first,
            data_offset: self.pos,
        })
    }
}

impl<R: Read + Seek> Archive<R> {
    /// [`Archive::next_entry`], seeking over what is left of the current entry's data
    /// instead of reading it.
    pub fn next_entry_seek(&mut self) -> Result<Option<Entry>, Error> {
        let rest = self.left + self.pad;
        if rest > 0 {
            let to = self.pos.checked_add(rest).ok_or(Error::Header {
                offset: self.pos,
                reason: "the size is too large".into(),
            })?;
            self.inner.seek(SeekFrom::Start(to)).map_err(|e| self.io(e))?;
            self.pos = to;
            self.left = 0;
            self.pad = 0;
        }
        self.next_header()
    }
}

/// The current entry's data: at most its declared size, an early end an error.
pub struct Data<'a, R> {
    archive: &'a mut Archive<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let a = &mut *self.archive;
        if a.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(a.left).unwrap_or(usize::MAX));
        let n = a.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the archive ends inside an entry, at byte {}", a.pos),
            ));
        }
        a.pos += n as u64;
        a.left -= n as u64;
        Ok(n)
    }
}

fn check_sum(block: &[u8; BLOCK as usize], header: &tar::Header, offset: u64) -> Result<(), Error> {
    let sum: u32 = block[..148]
        .iter()
        .chain(&block[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * 32;
    match header.cksum() {
        Ok(c) if c == sum => Ok(()),
        _ => Err(Error::Checksum { offset }),
    }
}

fn trim_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// One PAX record: its key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

/// The `LEN key=value\n` records of a PAX header, each checked for form.
fn pax_records(mut data: &[u8]) -> Result<Vec<PaxRecord<'_>>, String> {
    let mut out = Vec::new();
    // Trailing NUL padding some writers leave is not a record.
    while data.last() == Some(&0) {
        data = &data[..data.len() - 1];
    }
    while !data.is_empty() {
        let space = data
            .iter()
            .take(12)
            .position(|b| *b == b' ')
            .ok_or("a PAX record does not start with its length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("a PAX record's length is not a number")?;
        if len <= space + 1 || len > data.len() {
            return Err(format!("a PAX record's length {len} does not fit the header"));
        }
        let record = &data[space + 1..len];
        let record = record
            .strip_suffix(b"\n")
            .ok_or("a PAX record does not end with a newline")?;
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("a PAX record has no `=`")?;
        out.push((&record[..eq], &record[eq + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
