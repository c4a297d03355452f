//! An untrusted tar stream (bundles are tars; so are `archive` payloads): every entry's
//! header and data read through `Archive::next_entry`, and the headers again with
//! `next_entry_seek` over a seekable reader.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use tern_tar::Archive;

fuzz_target!(|data: &[u8]| {
    let mut a = Archive::new(data);
    let mut streamed = Vec::new();
    loop {
        match a.next_entry() {
            Ok(Some(e)) => {
                let _ = e.name();
                let _ = e.shown_name();
                let read = std::io::copy(&mut a.data(), &mut std::io::sink());
                if let Ok(n) = read {
                    assert_eq!(n, e.size, "data() of {:?}", e.shown_name());
                }
                streamed.push(e);
                if read.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => break,
        }
        assert!(a.position() <= data.len() as u64);
    }

    let mut s = Archive::new(Cursor::new(data));
    let mut i = 0;
    while let Ok(Some(e)) = s.next_entry_seek() {
        // Seeking over data finds the same headers as reading it, as far as the data was there.
        if let Some(prev) = streamed.get(i) {
            assert_eq!(&e, prev);
        }
        i += 1;
    }
});
