//! A release bundle from local media or an upload: the verifying reader (DESIGN §4, the
//! procedure `tern bundle verify` and the agent follow) against a fixed trusted root, and
//! the unverified inspection `tern bundle inspect` prints.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::Freshness;

fuzz_target!(|data: &[u8]| {
    let _ = tern_bundle::verify_bundle(data, tern_fuzz::TRUSTED_ROOT, tern_fuzz::now(), Freshness::IfPresent);
    let _ = tern_bundle::inspect(std::io::Cursor::new(data));
});
