//! Canonical JSON, the OLPC form TUF signs: keys sorted, no insignificant white space,
//! only `"` and `\` escaped in strings, integers only.
//!
//! The formatter is `olpc-cjson`, written for `tough` (awslabs' TUF implementation) and
//! kept there; this module only adapts it to `serde_json::Value` and refuses floats,
//! which the canonical form does not have.

use olpc_cjson::CanonicalFormatter;
use serde::Serialize;
use serde_json::Value;

/// Encode `value` in canonical form.
///
/// Fails when the value holds a number that is not an integer: canonical JSON has no floats.
pub fn to_canonical(value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(1024);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, CanonicalFormatter::new());
    value.serialize(&mut ser).map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_drops_whitespace() {
        let v = json!({"b": 1, "a": [true, null, "x"], "c": {"z": -2, "y": "q\"\\\n"}});
        assert_eq!(
            String::from_utf8(to_canonical(&v).unwrap()).unwrap(),
            "{\"a\":[true,null,\"x\"],\"b\":1,\"c\":{\"y\":\"q\\\"\\\\\n\",\"z\":-2}}"
        );
    }

    #[test]
    fn refuses_floats() {
        assert!(to_canonical(&json!({"a": 1.5})).is_err());
    }
}
