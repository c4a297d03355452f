//! Encrypted payloads: AES-256-GCM in fixed-size records (the STREAM construction of Hoang,
//! Reyhanitabar, Rogaway and Vizár, as age and Tink use it), so that a payload decrypts
//! streaming in constant memory and truncation, reordering and tampering are caught record
//! by record.
//!
//! Layout: a 16-byte header, then records. Every record but the last holds exactly
//! `record_size` bytes of plaintext; the last holds 0 to `record_size` (an empty payload is
//! one empty last record). Each record is its ciphertext followed by the 16-byte tag.
//!
//! ```text
//! header  "TERNAEAD" | version 1 | log2(record_size) | 6 zero bytes
//! nonce   record index, 11 bytes big-endian | 1 if last record else 0
//! aad     the header
//! ```
//!
//! The data key is fresh and random for every payload (it is wrapped per recipient
//! elsewhere), so nonces never repeat under one key. A record opened with the wrong index
//! (reordered, dropped) or the wrong last flag (truncated after a record boundary, or with
//! records appended) fails its tag.
//!
//! This module is the record layer only: pure functions over byte slices and a streaming
//! adapter over any `Read`, no files.

use std::io::{Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// Header magic.
pub const MAGIC: &[u8; 8] = b"TERNAEAD";
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Tag length per record.
pub const TAG_LEN: usize = 16;
/// The default record size: 64 KiB of plaintext.
pub const DEFAULT_LOG2_RECORD: u8 = 16;
/// Smallest and largest record sizes accepted (1 KiB to 16 MiB).
pub const LOG2_RECORD_RANGE: std::ops::RangeInclusive<u8> = 10..=24;

/// Why decryption stopped. Nothing after the failing record was released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The header is not a Tern encrypted payload's.
    #[error("encrypted payload header: {0}")]
    Header(String),
    /// A record's tag did not verify: tampered, reordered, or a record missing or added.
    #[error("encrypted payload record {record}: authentication failed (tampered, reordered, dropped or truncated)")]
    Record {
        /// The record's index.
        record: u64,
    },
    /// The payload ends inside a record or before its last record.
    #[error("encrypted payload truncated in record {record}")]
    Truncated {
        /// The record's index.
        record: u64,
    },
    /// The data key is not 32 bytes.
    #[error("the data key must be 32 bytes")]
    Key,
    /// Reading failed.
    #[error("reading the encrypted payload: {0}")]
    Io(String),
}

/// The header for a record size of 2^`log2_record` bytes.
pub fn header(log2_record: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = 1;
    h[9] = log2_record;
    h
}

/// Parse a header; returns the record size.
pub fn parse_header(h: &[u8]) -> Result<usize, StreamError> {
    if h.len() < HEADER_LEN || &h[..8] != MAGIC {
        return Err(StreamError::Header("not a Tern encrypted payload".into()));
    }
    if h[8] != 1 {
        return Err(StreamError::Header(format!("version {} is not supported", h[8])));
    }
    if !LOG2_RECORD_RANGE.contains(&h[9]) || h[10..HEADER_LEN].iter().any(|b| *b != 0) {
        return Err(StreamError::Header("record size or reserved bytes out of range".into()));
    }
    Ok(1usize << h[9])
}

/// The ciphertext length of a `plain_len`-byte payload.
pub fn ciphertext_len(plain_len: u64, log2_record: u8) -> u64 {
    let record = 1u64 << log2_record;
    let records = if plain_len == 0 { 1 } else { plain_len.div_ceil(record) };
    HEADER_LEN as u64 + plain_len + records * TAG_LEN as u64
}

fn nonce(index: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

fn key(data_key: &[u8]) -> Result<LessSafeKey, StreamError> {
    if data_key.len() != 32 {
        return Err(StreamError::Key);
    }
    let unbound = UnboundKey::new(&AES_256_GCM, data_key).map_err(|_| StreamError::Key)?;
    Ok(LessSafeKey::new(unbound))
}

/// Seals records in order.
pub struct Sealer {
    key: LessSafeKey,
    header: [u8; HEADER_LEN],
    record: usize,
    next: u64,
    done: bool,
}

impl Sealer {
    /// A sealer under `data_key` (32 bytes) with records of 2^`log2_record` bytes.
    pub fn new(data_key: &[u8], log2_record: u8) -> Result<Self, StreamError> {
        if !LOG2_RECORD_RANGE.contains(&log2_record) {
            return Err(StreamError::Header("record size out of range".into()));
        }
        Ok(Sealer {
            key: key(data_key)?,
            header: header(log2_record),
            record: 1 << log2_record,
            next: 0,
            done: false,
        })
    }

    /// The header to write first.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        self.header
    }

    /// The plaintext size of every record but the last.
    pub fn record_size(&self) -> usize {
        self.record
    }

    /// Seal the next record in place (`buf` holds the plaintext, a full record unless
    /// `last`), appending the tag.
    pub fn seal(&mut self, buf: &mut Vec<u8>, last: bool) -> Result<(), StreamError> {
        if self.done || buf.len() > self.record || (!last && buf.len() != self.record) {
            return Err(StreamError::Header("records must be full until the last one".into()));
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.next, last), Aad::from(&self.header[..]), buf)
            .map_err(|_| StreamError::Key)?;
        buf.extend_from_slice(tag.as_ref());
        self.next += 1;
        self.done = last;
        Ok(())
    }
}

/// A writer of ciphertext over a writer: plaintext in, the header and sealed records out.
/// A record is sealed once the byte after it arrives (so the last one is known);
/// [`finish`](Self::finish) seals the last record and must be called.
pub struct Encryptor<W: Write> {
    inner: W,
    sealer: Sealer,
    pending: Vec<u8>,
    plain_len: u64,
}

impl<W: Write> Encryptor<W> {
    /// Write the header; records of 2^`log2_record` bytes under `data_key`.
    pub fn new(mut inner: W, data_key: &[u8], log2_record: u8) -> std::io::Result<Self> {
        let sealer = Sealer::new(data_key, log2_record).map_err(std::io::Error::other)?;
        inner.write_all(&sealer.header())?;
        let record = sealer.record_size();
        Ok(Encryptor {
            inner,
            sealer,
            pending: Vec::with_capacity(record + TAG_LEN + 1),
            plain_len: 0,
        })
    }

    fn seal_front(&mut self, last: bool) -> std::io::Result<()> {
        let record = self.sealer.record_size();
        let take = self.pending.len().min(record);
        let rest = self.pending.split_off(take);
        self.sealer
            .seal(&mut self.pending, last)
            .map_err(std::io::Error::other)?;
        self.inner.write_all(&self.pending)?;
        self.pending.clear();
        self.pending.extend_from_slice(&rest);
        Ok(())
    }

    /// Seal the last record; returns the inner writer and the plaintext length.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.seal_front(true)?;
        self.inner.flush()?;
        Ok((self.inner, self.plain_len))
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let record = self.sealer.record_size();
        // Up to one byte past a full record, so the record is known not to be the last.
        let room = record + 1 - self.pending.len();
        let n = buf.len().min(room);
        self.pending.extend_from_slice(&buf[..n]);
        self.plain_len += n as u64;
        if self.pending.len() > record {
            self.seal_front(false)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Encrypt a whole payload held in memory (tests, small payloads).
pub fn seal_all(data_key: &[u8], log2_record: u8, plain: &[u8]) -> Result<Vec<u8>, StreamError> {
    let mut s = Sealer::new(data_key, log2_record)?;
    let mut out = s.header().to_vec();
    let record = s.record_size();
    let mut chunks: Vec<&[u8]> = plain.chunks(record).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let mut buf = c.to_vec();
        s.seal(&mut buf, i + 1 == n)?;
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// A reader of plaintext over a reader of ciphertext. Each record is released only after
/// its tag verified; memory is two records, whatever the payload's size.
pub struct Decryptor<R: Read> {
    inner: R,
    key: LessSafeKey,
    header: [u8; HEADER_LEN],
    record: usize,
    index: u64,
    /// Ciphertext read ahead (to know whether the current record is the last).
    ahead: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    finished: bool,
}

impl<R: Read> Decryptor<R> {
    /// Read and check the header; `data_key` is the unwrapped 32-byte key.
    pub fn new(mut inner: R, data_key: &[u8]) -> Result<Self, StreamError> {
        let mut h = [0u8; HEADER_LEN];
        read_full(&mut inner, &mut h, 0)?;
        let record = parse_header(&h)?;
        Ok(Decryptor {
            inner,
            key: key(data_key)?,
            header: h,
            record,
            index: 0,
            ahead: Vec::with_capacity(record + TAG_LEN + 1),
            plain: Vec::with_capacity(record + TAG_LEN),
            pos: 0,
            finished: false,
        })
    }

    /// The record size the header declares.
    pub fn record_size(&self) -> usize {
        self.record
    }

    /// Fill `ahead` up to one full record plus one byte (or the end).
    fn fill(&mut self) -> Result<(), StreamError> {
        let want = self.record + TAG_LEN + 1;
        while self.ahead.len() < want {
            let start = self.ahead.len();
            self.ahead.resize(want, 0);
            let n = self
                .inner
                .read(&mut self.ahead[start..])
                .map_err(|e| StreamError::Io(e.to_string()))?;
            self.ahead.truncate(start + n);
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Open the next record into `plain`.
    fn next_record(&mut self) -> Result<(), StreamError> {
        self.fill()?;
        let full = self.record + TAG_LEN;
        let last = self.ahead.len() <= full;
        if self.ahead.len() < TAG_LEN {
            return Err(StreamError::Truncated { record: self.index });
        }
        let take = self.ahead.len().min(full);
        self.plain.clear();
        self.plain.extend_from_slice(&self.ahead[..take]);
        self.ahead.drain(..take);
        let opened = self
            .key
            .open_in_place(nonce(self.index, last), Aad::from(&self.header[..]), &mut self.plain)
            .map_err(|_| StreamError::Record { record: self.index })?
            .len();
        self.plain.truncate(opened);
        self.pos = 0;
        self.index += 1;
        self.finished = last;
        Ok(())
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8], record: u64) -> Result<(), StreamError> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).map_err(|e| StreamError::Io(e.to_string()))?;
        if n == 0 {
            return Err(if record == 0 {
                StreamError::Header("shorter than its header".into())
            } else {
                StreamError::Truncated { record }
            });
        }
        got += n;
    }
    Ok(())
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.plain.len() {
            if self.finished {
                return Ok(0);
            }
            self.next_record()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_encryptor_writes_what_seal_all_does() {
        for len in [0, 1, REC - 1, REC, REC + 1, 3 * REC, 3 * REC + 7] {
            let p = plain(len);
            let mut e = Encryptor::new(Vec::new(), &KEY, LOG2).unwrap();
            for chunk in p.chunks(333) {
                e.write_all(chunk).unwrap();
            }
            let (ct, n) = e.finish().unwrap();
            assert_eq!(n, len as u64);
            assert_eq!(ct, seal_all(&KEY, LOG2, &p).unwrap(), "length {len}");
            assert_eq!(ct.len() as u64, ciphertext_len(len as u64, LOG2));
        }
    }

    const KEY: [u8; 32] = [0x42; 32];
    const LOG2: u8 = 10;
    const REC: usize = 1 << LOG2;

    fn plain(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn decrypt(ct: &[u8], key: &[u8]) -> Result<Vec<u8>, String> {
        let mut d = Decryptor::new(ct, key).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        d.read_to_end(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_record_boundaries() {
        for len in [0, 1, REC - 1, REC, REC + 1, 3 * REC, 3 * REC + 7] {
            let p = plain(len);
            let ct = seal_all(&KEY, LOG2, &p).unwrap();
            assert_eq!(ct.len() as u64, ciphertext_len(len as u64, LOG2), "len {len}");
            assert_eq!(decrypt(&ct, &KEY).unwrap(), p, "len {len}");
        }
    }

    fn record_range(i: usize) -> std::ops::Range<usize> {
        let start = HEADER_LEN + i * (REC + TAG_LEN);
        start..start + REC + TAG_LEN
    }

    #[test]
    fn every_kind_of_tampering_is_caught() {
        let p = plain(3 * REC + 100);
        let ct = seal_all(&KEY, LOG2, &p).unwrap();
        // A flipped bit in any record, and in the header.
        for i in 0..4 {
            let mut t = ct.clone();
            t[record_range(i).start + 5] ^= 1;
            let e = decrypt(&t, &KEY).unwrap_err();
            assert!(e.contains(&format!("record {i}: authentication failed")), "{e}");
        }
        let mut t = ct.clone();
        t[9] ^= 1;
        assert!(decrypt(&t, &KEY).is_err());
        // A dropped record.
        let mut t = ct.clone();
        t.drain(record_range(1));
        assert!(decrypt(&t, &KEY).unwrap_err().contains("record 1"));
        // Two records swapped.
        let mut t = ct[..HEADER_LEN].to_vec();
        t.extend_from_slice(&ct[record_range(1)]);
        t.extend_from_slice(&ct[record_range(0)]);
        t.extend_from_slice(&ct[record_range(2).start..]);
        assert!(decrypt(&t, &KEY).unwrap_err().contains("record 0"));
        // The last record truncated, and dropped entirely (a cut at a record boundary).
        let t = &ct[..ct.len() - 3];
        assert!(decrypt(t, &KEY).unwrap_err().contains("record 3"));
        let t = &ct[..record_range(3).start];
        assert!(decrypt(t, &KEY).unwrap_err().contains("record 2"));
        // Data appended after the last record.
        let mut t = ct.clone();
        t.extend_from_slice(&[0u8; 40]);
        assert!(decrypt(&t, &KEY).is_err());
        // The wrong key.
        assert!(decrypt(&ct, &[0x43; 32]).unwrap_err().contains("record 0"));
    }

    #[test]
    fn nothing_after_a_bad_record_is_released() {
        let p = plain(3 * REC);
        let mut ct = seal_all(&KEY, LOG2, &p).unwrap();
        ct[record_range(1).start] ^= 1;
        let mut d = Decryptor::new(&ct[..], &KEY).unwrap();
        let mut out = vec![0u8; 3 * REC];
        let mut got = 0;
        loop {
            match d.read(&mut out[got..]) {
                Ok(0) => panic!("read to the end past a bad record"),
                Ok(n) => got += n,
                Err(_) => break,
            }
        }
        assert_eq!(got, REC, "only the first, verified record was released");
    }

    #[test]
    fn headers_are_checked() {
        assert!(parse_header(b"short").is_err());
        let mut h = header(16);
        assert_eq!(parse_header(&h).unwrap(), 65536);
        h[9] = 40;
        assert!(parse_header(&h).is_err());
        assert!(Sealer::new(&[0u8; 16], 16).is_err());
    }
}
