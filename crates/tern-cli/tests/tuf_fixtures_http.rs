//! The repositories python-tuf's own Metadata API made (`tests/fixtures/python-tuf/`), served
//! over HTTP on 127.0.0.1 and read by both clients through the same command line.
//!
//! Each scenario's expected outcome is in its `scenario.json`. Both clients must agree on the
//! outcome, the trusted files left on disk and the requests made, except where python-tuf is
//! known to accept what the specification refuses (listed below, with the reason).

mod support;

use std::path::Path;

use serde_json::Value;
use support::*;

/// Scenarios python-tuf 7 accepts though they break the specification.
const PYTHON_ACCEPTS: [(&str, &str); 3] = [
    (
        "key-counted-twice",
        "counts one key listed under two key ids twice towards the threshold",
    ),
    (
        "keyid-mismatch",
        "never checks that a key id is the hash of its key (spec: clients MUST)",
    ),
    (
        "bad-target-name",
        "downloads `../escape.txt`; its URL escapes the targets directory",
    ),
];

#[test]
fn python_tuf_made_repositories_over_http() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/python-tuf");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(raw) = std::fs::read(dir.join("scenario.json")) else {
            continue;
        };
        seen += 1;
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let scenario: Value = serde_json::from_slice(&raw).unwrap();
        let expect_ok = scenario["expect"] == "ok";
        let targets: Vec<&str> = scenario["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let server = Server::start(&dir);
        let mut results = Vec::new();
        for kind in CLIENTS {
            let c = Client::new(kind);
            // Tern checks the trust anchor at init (it must be a valid root signed by its own
            // threshold); python-tuf copies it and finds out at refresh.
            let init = c.init(&dir.join(scenario["trusted_root"].as_str().unwrap()));
            let out = if init.ok { c.download(&server, &targets) } else { init };
            let python_diverges = kind == Kind::Python && PYTHON_ACCEPTS.iter().any(|(n, _)| *n == name);
            let want_ok = expect_ok || python_diverges;
            assert_eq!(out.ok, want_ok, "{name} {kind:?}: {}", out.stderr);
            results.push((out.ok, c.trusted(), c.downloaded(), server.take_requests()));
        }
        if expect_ok {
            let (tern, python) = (&results[0], &results[1]);
            assert_eq!(tern.1, python.1, "{name}: trusted files differ");
            assert_eq!(tern.2, python.2, "{name}: downloads differ");
            assert_eq!(tern.3, python.3, "{name}: requests differ");
            assert_eq!(tern.2.len(), targets.len(), "{name}");
        }
    }
    assert!(seen >= 20, "only {seen} scenarios");
}
