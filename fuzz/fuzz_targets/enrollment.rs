//! A device's enrollment document as the server receives it: parsed (bounded), its named
//! key checked to have signed it, and the encryption key it names read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::enrollment::parse_enrollment;
use tern_core::keywrap::RecipientKey;

fuzz_target!(|data: &[u8]| {
    let Ok((doc, key)) = parse_enrollment(data) else {
        return;
    };
    let _ = key.keyid();
    if let Some(v) = &doc.encryption_key {
        let _ = RecipientKey::from_value(v);
    }
});
