//! Delegation path patterns match exactly as python-tuf's `fnmatch.fnmatch` does.
//!
//! `data/fnmatch_vectors.json` holds 4,000 random (pattern, name) pairs over the characters
//! that are special to fnmatch, with Python's verdict on each (generated once, committed).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

#[test]
fn patterns_agree_with_python_fnmatch() {
    let raw = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fnmatch_vectors.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let mut wrong = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let (p, n, want) = (
            case[0].as_str().unwrap(),
            case[1].as_str().unwrap(),
            case[2].as_bool().unwrap(),
        );
        if tern_core::delegation::path_matches(p, n) != want {
            wrong.push(format!("{p:?} vs {n:?}: python says {want}"));
        }
    }
    assert!(wrong.is_empty(), "{} disagreements:\n{}", wrong.len(), wrong.join("\n"));
}
