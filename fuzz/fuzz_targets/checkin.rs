//! A device's signed check-in as the server receives it: parsed (bounded) before the
//! server knows which key to check it with, then verified with a fixed device key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::director::{parse_checkin, verify_checkin};

fuzz_target!(|data: &[u8]| {
    let Ok((env, checkin)) = parse_checkin(data) else {
        return;
    };
    let _ = checkin.booted();
    let _ = verify_checkin(&env, tern_fuzz::device_key());
});
