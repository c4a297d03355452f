use super::*;

fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h
}

/// An archive of `(name, data)` regular files written by the `tar` crate (GNU long names
/// for names over 100 bytes).
fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        b.append_data(&mut header(tar::EntryType::Regular, data.len() as u64), name, *data)
            .unwrap();
    }
    b.into_inner().unwrap()
}

/// A raw header block of `kind` named `name` declaring `size`, with its checksum.
fn raw(kind: u8, name: &str, size: u64) -> Vec<u8> {
    let mut h = header(tar::EntryType::new(kind), size);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn pad(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(512) {
        v.push(0);
    }
}

fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = format!(" {k}={v}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        out.extend(format!("{len}{body}").into_bytes());
    }
    out
}

/// Counts the bytes read from it.
struct Counting<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// An endless stream of zeros after `head`: what a sparse file declaring a huge entry reads as.
fn endless_after(head: Vec<u8>) -> impl Read {
    std::io::Cursor::new(head).chain(std::io::repeat(0))
}

fn entries(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let mut a = Archive::new(bytes);
    let mut out = Vec::new();
    while let Some(e) = a.next_entry()? {
        let mut data = Vec::new();
        a.data().read_to_end(&mut data).unwrap();
        out.push((e.name()?.to_owned(), data));
    }
    Ok(out)
}

#[test]
fn reads_what_the_tar_crate_writes_with_long_names() {
    let long = format!("payloads/{}/image.img", "d".repeat(150));
    let bytes = archive(&[("tern-bundle.json", b"{}"), (&long, b"abc"), ("empty", b"")]);
    let got = entries(&bytes).unwrap();
    assert_eq!(
        got,
        vec![
            ("tern-bundle.json".to_owned(), b"{}".to_vec()),
            (long, b"abc".to_vec()),
            ("empty".to_owned(), vec![])
        ]
    );
}

#[test]
fn data_left_unread_is_skipped_and_offsets_are_reported() {
    let bytes = archive(&[("a", &[1u8; 1000]), ("b", b"xy")]);
    let mut a = Archive::new(&bytes[..]);
    let first = a.next_entry().unwrap().unwrap();
    assert_eq!((first.offset, first.data_offset, first.size), (0, 512, 1000));
    let mut two = [0u8; 2];
    a.data().read_exact(&mut two).unwrap();
    let second = a.next_entry().unwrap().unwrap();
    assert_eq!((second.offset, second.data_offset), (1536, 2048));
    assert!(a.next_entry().unwrap().is_none());
    assert!(a.next_entry().unwrap().is_none());
}

#[test]
fn seeking_skips_data() {
    let bytes = archive(&[("a", &[7u8; 5000]), ("b", b"z")]);
    let mut a = Archive::new(std::io::Cursor::new(&bytes));
    assert_eq!(a.next_entry_seek().unwrap().unwrap().name().unwrap(), "a");
    let b = a.next_entry_seek().unwrap().unwrap();
    assert_eq!(b.name().unwrap(), "b");
    let mut d = Vec::new();
    a.data().read_to_end(&mut d).unwrap();
    assert_eq!(d, b"z");
}

#[test]
fn pax_path_and_size_apply_to_the_next_entry() {
    let records = pax(&[("path", "from/pax.txt"), ("size", "3"), ("mtime", "1.5")]);
    let mut v = raw(b'x', "PaxHeaders/x", records.len() as u64);
    v.extend(&records);
    pad(&mut v);
    // The ustar size field says 0; the PAX size wins, as in the tar crate.
    v.extend(raw(b'0', "short", 0));
    v.extend(b"abc");
    pad(&mut v);
    v.extend([0u8; 1024]);
    assert_eq!(entries(&v).unwrap(), vec![("from/pax.txt".to_owned(), b"abc".to_vec())]);
}

#[test]
fn huge_extension_headers_are_refused_before_they_are_read() {
    for (kind, what) in [
        (b'L', "GNU long name"),
        (b'K', "GNU long link name"),
        (b'x', "PAX header"),
        (b'g', "PAX global header"),
    ] {
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let stream = Counting {
            inner: endless_after(raw(kind, "././@LongLink", 1 << 30)),
            read: read.clone(),
        };
        let mut a = Archive::new(stream);
        match a.next_entry() {
            Err(Error::ExtensionTooLarge {
                offset: 0,
                kind: k,
                size,
                ..
            }) => {
                assert_eq!((k, size), (what, 1 << 30));
            }
            other => panic!("{}: {other:?}", kind as char),
        }
        assert!(read.get() <= 1024, "read {} bytes", read.get());
    }
}

#[test]
fn too_many_extensions_are_refused() {
    let mut v = Vec::new();
    for _ in 0..9 {
        let r = pax(&[("comment", "x")]);
        v.extend(raw(b'g', "g", r.len() as u64));
        v.extend(&r);
        pad(&mut v);
    }
    v.extend(raw(b'0', "file", 0));
    assert!(matches!(
        entries(&v),
        Err(Error::TooManyExtensions { offset: 0, limit: 8 })
    ));
}

#[test]
fn a_second_long_name_and_malformed_pax_are_refused() {
    let mut v = Vec::new();
    for _ in 0..2 {
        v.extend(raw(b'L', "././@LongLink", 4));
        v.extend(b"abc\0");
        pad(&mut v);
    }
    v.extend(raw(b'0', "file", 0));
    assert!(
        matches!(entries(&v), Err(Error::Extension { offset: 1024, .. })),
        "{:?}",
        entries(&v)
    );
    for bad in [&b"x path=a\n"[..], b"99 path=a\n", b"11 patha\n\n", b"10 path=ab"] {
        let mut v = raw(b'x', "x", bad.len() as u64);
        v.extend(bad);
        pad(&mut v);
        v.extend(raw(b'0', "file", 0));
        assert!(matches!(entries(&v), Err(Error::Extension { .. })), "{bad:?}");
    }
    let sparse = pax(&[("GNU.sparse.map", "0,1")]);
    let mut v = raw(b'x', "x", sparse.len() as u64);
    v.extend(&sparse);
    pad(&mut v);
    v.extend(raw(b'0', "file", 0));
    assert!(matches!(entries(&v), Err(Error::Extension { .. })));
}

#[test]
fn names_longer_than_the_limit_are_refused() {
    let name = "n".repeat(5000);
    let bytes = archive(&[(&name, b"")]);
    // The long-name entry itself (5,001 bytes) is over its limit already.
    assert!(matches!(entries(&bytes), Err(Error::ExtensionTooLarge { .. })));
    let records = pax(&[("path", &name)]);
    let mut v = raw(b'x', "x", records.len() as u64);
    v.extend(&records);
    pad(&mut v);
    v.extend(raw(b'0', "file", 0));
    assert!(matches!(
        entries(&v),
        Err(Error::NameTooLong {
            len: 5000,
            limit: 4096,
            ..
        })
    ));
}

#[test]
fn truncation_and_corruption_are_named() {
    let bytes = archive(&[("a", &[1u8; 700])]);
    assert!(matches!(entries(&bytes[..100]), Err(Error::Truncated { offset: 0 })));
    let mut a = Archive::new(&bytes[..800]);
    a.next_entry().unwrap().unwrap();
    let mut d = Vec::new();
    assert_eq!(
        a.data().read_to_end(&mut d).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
    let mut bad = bytes.clone();
    bad[10] ^= 1;
    assert!(matches!(entries(&bad), Err(Error::Checksum { offset: 0 })));
    let mut v = raw(b'L', "././@LongLink", 300);
    v.extend([b'a'; 100]);
    assert!(matches!(entries(&v), Err(Error::Truncated { offset: 0 })));
}

#[test]
fn kinds_are_reported_for_the_caller_to_refuse() {
    let mut v = raw(b'2', "link", 0);
    v.extend(raw(b'5', "dir/", 0));
    v.extend(raw(b'6', "fifo", 0));
    let mut a = Archive::new(&v[..]);
    let kinds: Vec<Kind> = std::iter::from_fn(|| a.next_entry().unwrap()).map(|e| e.kind).collect();
    assert_eq!(kinds, vec![Kind::Other(b'2'), Kind::Directory, Kind::Other(b'6')]);
    assert_eq!(Kind::Other(b'2').to_string(), "symbolic link");
}

#[test]
fn names_that_are_not_utf8_are_shown_escaped() {
    let mut v = raw(b'0', "x", 0);
    v[0] = 0xff;
    v[1] = 0x1b;
    let h = tar::Header::from_byte_slice(&v[..512]);
    let mut fixed = h.clone();
    fixed.set_cksum();
    let mut a = Archive::new(&fixed.as_bytes()[..]);
    let e = a.next_entry().unwrap().unwrap();
    assert_eq!(
        e.name().unwrap_err().to_string(),
        "the entry name `\\xff\\u{1b}` is not UTF-8"
    );
}
