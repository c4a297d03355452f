//! Item 6: the server remembered 32 nonces but accepted 300 s of clock slack, so a check-in
//! captured a little over 32 check-ins ago (a minute, for an agent reporting every 2 s while
//! downloading) was accepted again, with a fresh session token and any pending order.

use crate::fleet::{challenge, checkin_doc, Fleet};

#[test]
fn a_check_in_replayed_inside_the_clock_slack_is_refused() {
    let f = Fleet::new(None);
    let url = f.server.url.clone();
    let dev = f.device("replayed", &[], &url);
    let key = dev.key();
    let send = |body: Vec<u8>| f.api("POST", "/api/v1/devices/replayed/checkin", None, Some(body));
    // The check-in an attacker records on the way.
    let captured = tern_core::director::sign_document(
        "check-in",
        &checkin_doc("replayed", &challenge(&url, "replayed"), "captured"),
        &key,
    )
    .unwrap();
    let first = send(captured.clone());
    assert_eq!(first.status, 200, "{}", first.body);
    // The device goes on checking in: well over the 32 nonces the landed server kept,
    // well inside its 300 s of slack.
    let mut next = first.body["challenge"].as_str().unwrap().to_owned();
    for _ in 0..40 {
        let body =
            tern_core::director::sign_document("check-in", &checkin_doc("replayed", &next, "idle"), &key).unwrap();
        let a = send(body);
        assert_eq!(a.status, 200, "{}", a.body);
        next = a.body["challenge"].as_str().unwrap().to_owned();
    }
    let replay = send(captured);
    assert_eq!(replay.status, 409, "{}", replay.body);
    assert_eq!(replay.body["error"]["kind"], "StaleChallenge");
    assert!(replay.body.get("session").is_none());
    // Nothing changed: the device's last report stands, and its next check-in still works.
    let d = f.api("GET", "/api/v1/devices/replayed", Some(&f.admin), None).body;
    assert_eq!(d["phase"], "idle", "{d}");
    let body = tern_core::director::sign_document("check-in", &checkin_doc("replayed", &next, "idle"), &key).unwrap();
    assert_eq!(send(body).status, 200);
    // The agent, which keeps its challenge in remote.json, recovers from losing it.
    let remote = dev.dir.join("state/remote.json");
    if remote.exists() {
        std::fs::remove_file(&remote).unwrap();
    }
    let polled = dev.poll();
    assert_eq!(polled["outcome"], "idle", "{polled}");
    assert!(f
        .audit()
        .iter()
        .any(|e| e["action"] == "device.checkin" && e["outcome"] == "refused" && e["subject"] == "device:replayed"));
}
