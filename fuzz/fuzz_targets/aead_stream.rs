//! An encrypted payload (STREAM records, AES-256-GCM) read to the end with a fixed key:
//! header checks, record framing, last-record flag, truncation.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use tern_core::stream_aead::{Decryptor, HEADER_LEN, TAG_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(mut d) = Decryptor::new(data, &tern_fuzz::AEAD_KEY) else {
        return;
    };
    let record = d.record_size();
    let mut out = Vec::new();
    if d.read_to_end(&mut out).is_ok() {
        // What decrypts is the input less its header and one tag per record, and every
        // record but the last is full.
        let overhead = data.len() - HEADER_LEN - out.len();
        assert!(
            overhead >= TAG_LEN && overhead % TAG_LEN == 0,
            "{} bytes gave {}",
            data.len(),
            out.len()
        );
        assert!(
            overhead / TAG_LEN <= out.len() / record + 1,
            "{} bytes gave {}",
            data.len(),
            out.len()
        );
    }
});
