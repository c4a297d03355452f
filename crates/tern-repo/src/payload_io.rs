//! The streams a payload passes through on its way into the repository: hashed as read
//! (the image) and as written (the signed bytes), compressed as the target asks.

use std::io::{Read, Write};

use tern_core::digest::Digester;
use tern_core::manifest::Compression;

/// A reader that hashes what passes through it.
pub(crate) struct DigestReader<R: Read> {
    pub(crate) inner: R,
    pub(crate) digester: Digester,
}

impl<R: Read> Read for DigestReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digester.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that hashes what passes through it.
pub(crate) struct DigestWriter<W: Write> {
    pub(crate) inner: W,
    pub(crate) digester: Digester,
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digester.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Copy `input` to `out`, compressed as asked; returns the bytes read (what is installed).
pub(crate) fn compress(input: &mut impl Read, out: &mut impl Write, compression: Compression) -> std::io::Result<u64> {
    match compression {
        Compression::None => copy(input, out),
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(out, 3)?;
            let n = copy(input, &mut enc)?;
            enc.finish()?;
            Ok(n)
        }
    }
}

fn copy(input: &mut impl Read, out: &mut impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
}
