//! The server's `Range` header parser: the first 8 bytes are the resource's length (big
//! endian), the rest the header value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::range::parse_range;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let len = u64::from_be_bytes(data[..8].try_into().unwrap());
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Some((start, end)) = parse_range(header, len) {
        assert!(
            start <= end && end < len,
            "{header:?} on {len} bytes gave {start}-{end}"
        );
    }
});
