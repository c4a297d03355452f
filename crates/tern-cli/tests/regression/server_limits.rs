//! Item 5: the server could be held and filled. No header, idle or body timeouts (a
//! connection sending a byte every 5 s stayed open for ever), no connection limits,
//! refusal audit rows limited in count but not in size (megabytes a second, unauthenticated)
//! and refusals of authenticated tokens not limited at all.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::fleet::Fleet;

fn connect(f: &Fleet) -> TcpStream {
    let addr = f.server.url.strip_prefix("http://").unwrap().to_owned();
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    c
}

/// Whether the server closed `c` (a read sees the end, or the connection was reset).
fn closed(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Wait up to `limit` for the server to close `c`.
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if closed(c) {
            return true;
        }
    }
    false
}

#[test]
fn a_client_trickling_its_headers_is_cut_off() {
    // The default header timeout, 10 s.
    let f = Fleet::new(None);
    let mut c = connect(&f);
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    let mut cut = false;
    // A byte every 300 ms: each one well inside any per-read timeout.
    while started.elapsed() < Duration::from_secs(25) {
        if c.write_all(b"X").is_err() || closed(&mut c) {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(cut, "the connection was still open after 25 s of trickled headers");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    // The server still serves everyone else.
    assert_eq!(f.api("GET", "/healthz", None, None).status, 200);
}

/// A keep-alive connection waits for its next request as long as the idle timeout allows
/// (hyper's own header timeout closed it after the header timeout, racing a client that
/// reused it), and each later request's head is still held to the header timeout.
#[test]
fn a_keep_alive_connection_outlives_the_header_timeout_but_not_a_trickled_head() {
    let f = Fleet::with_env(
        None,
        &[
            ("TERN_SERVER_HEADER_TIMEOUT_SECS", "1"),
            ("TERN_SERVER_IDLE_TIMEOUT_SECS", "6"),
        ],
    );
    let mut c = connect(&f);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let get = |c: &mut TcpStream| {
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(get(&mut c).starts_with("HTTP/1.1 200"));
    // Three header timeouts of waiting, well inside the idle timeout.
    std::thread::sleep(Duration::from_secs(3));
    let again = get(&mut c);
    assert!(
        again.starts_with("HTTP/1.1 200"),
        "the kept-alive connection was closed: {again:?}"
    );
    // The next head, trickled a byte every 200 ms, is cut off at the header timeout.
    c.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(5) {
        if c.write_all(b"X").is_err() || closed(&mut c) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a trickled head on a kept-alive connection was still open after 5 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn idle_connections_are_closed_and_connections_are_limited_per_peer() {
    let f = Fleet::with_env(
        None,
        &[
            ("TERN_SERVER_IDLE_TIMEOUT_SECS", "2"),
            ("TERN_SERVER_MAX_CONNECTIONS_PER_PEER", "4"),
        ],
    );
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect(&f)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fifth = connect(&f);
    assert!(
        closed_within(&mut fifth, Duration::from_secs(1)),
        "a fifth connection from one address was accepted"
    );
    for c in &mut held {
        assert!(
            closed_within(c, Duration::from_secs(5)),
            "an idle connection stayed open past the idle timeout"
        );
    }
    assert_eq!(f.api("GET", "/healthz", None, None).status, 200);
}

#[test]
fn a_client_that_stops_reading_its_download_is_dropped() {
    let f = Fleet::with_env(None, &[("TERN_SERVER_IDLE_TIMEOUT_SECS", "2")]);
    // 32 MiB: far more than the socket buffers hold.
    f.publish("1.0.0", 32 * 1024);
    let path = target_path(&f, "1.0.0");
    let mut c = connect(&f);
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut first = [0u8; 1024];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = c.read(&mut first).unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    // Stop reading for longer than the idle timeout, then take what is left.
    std::thread::sleep(Duration::from_secs(6));
    let mut total = n;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => total += k,
        }
    }
    assert!(
        total < 32 << 20,
        "the whole file came through after the client stalled ({total} bytes)"
    );
}

/// Where the repository serves the target `f` published as `version`.
fn target_path(f: &Fleet, version: &str) -> String {
    let release = f
        .api("GET", &format!("/api/v1/releases/{version}"), Some(&f.admin), None)
        .body;
    let t = &release["targets"][0];
    format!(
        "/repo/targets/sim/{}.rootfs-{version}.img",
        t["hashes"]["sha256"].as_str().unwrap()
    )
}

/// A download streams after its handler has returned: a byte the client sends meanwhile
/// (the start of its next request) must not start the header clock under the download, and
/// the next head's clock starts once the download has ended.
#[test]
fn a_byte_sent_during_a_download_neither_cuts_it_nor_escapes_the_header_timeout() {
    let f = Fleet::with_env(
        None,
        &[
            ("TERN_SERVER_HEADER_TIMEOUT_SECS", "1"),
            ("TERN_SERVER_IDLE_TIMEOUT_SECS", "8"),
        ],
    );
    // 32 MiB: far more than the socket buffers hold, so it is still streaming.
    f.publish("1.0.0", 32 * 1024);
    let path = target_path(&f, "1.0.0");
    let mut c = connect(&f);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut head = vec![0u8; 64 * 1024];
    let mut total = c.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..total]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{:?}", &text[..text.len().min(200)]);
    let header_len = text.find("\r\n\r\n").unwrap() + 4;
    // The first byte of the next request, then three header timeouts of not reading.
    c.write_all(b"G").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let mut buf = vec![0u8; 1 << 20];
    while total < header_len + (32 << 20) {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => total += k,
        }
    }
    assert_eq!(
        total - header_len,
        32 << 20,
        "the download was cut off by a byte of the next request"
    );
    // That next request's head, never finished, is held to the header timeout from here.
    let started = Instant::now();
    assert!(
        closed_within(&mut c, Duration::from_secs(5)),
        "an unfinished head after a download stayed open"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}

#[test]
fn a_trickled_upload_is_stopped() {
    let f = Fleet::new(None);
    let mut c = connect(&f);
    c.write_all(
        format!(
            "POST /api/v1/releases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 10000000\r\n\r\n",
            f.admin
        )
        .as_bytes(),
    )
    .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // 1 KiB a second, below the 16 KiB/s minimum.
    while started.elapsed() < Duration::from_secs(25) {
        if c.write_all(&[0u8; 1024]).is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(800)),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert!(text.contains("400") && text.contains("upload slower than"), "{text:?}");
    assert!(f.audit().iter().any(|e| e["action"] == "release.upload"
        && e["outcome"] == "refused"
        && e["detail"].as_str().unwrap().contains("slower")));
}

#[test]
fn refusal_audits_are_bounded_in_size_and_budgeted_per_caller() {
    let f = Fleet::new(None);
    // Unauthenticated: enrollment documents whose "device id" is 60 KB each, as fast as
    // they can be sent.
    let huge = "x".repeat(60_000);
    let body =
        format!(r#"{{"signed":{{"_type":"tern-enrollment","device_id":"{huge}"}},"signatures":[]}}"#).into_bytes();
    for _ in 0..60 {
        let a = f.api("POST", "/api/v1/devices/enroll", None, Some(body.clone()));
        assert_eq!(a.status, 400);
        assert!(a.bytes.len() < 2048, "a {}-byte answer", a.bytes.len());
    }
    // Authenticated: a viewer token trying an admin action over and over.
    let viewer = f.token("viewer");
    for _ in 0..60 {
        assert_eq!(
            f.api("POST", "/api/v1/devices/x/approve", Some(&viewer), None).status,
            403
        );
    }
    // The summary of what was left out is written without waiting for another refusal:
    // by the background task's next pass once the second has ended (a pass every second,
    // after its fleet view refresh, so within about two seconds; five allowed under load).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut audit = f.audit();
    while !audit.iter().any(|e| e["action"] == "audit.summary") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        audit = f.audit();
    }
    let size: usize = audit.iter().map(|e| e.to_string().len()).sum();
    assert!(size < 200_000, "the audit log grew by {size} bytes");
    for e in &audit {
        assert!(e["detail"].as_str().unwrap().chars().count() <= 600, "{e}");
    }
    let enrolls = audit.iter().filter(|e| e["action"] == "device.enroll").count();
    let approves = audit
        .iter()
        .filter(|e| e["action"] == "device.approve" && e["actor"].as_str().unwrap().contains("viewer"))
        .count();
    assert!(
        enrolls < 60 && approves < 60,
        "{enrolls} and {approves} refusals were logged one by one"
    );
    assert!(audit.iter().any(|e| e["action"] == "audit.summary"));
}

#[test]
fn a_client_trickling_a_request_body_is_answered_and_cut_off() {
    let f = Fleet::with_env(None, &[("TERN_SERVER_REQUEST_TIMEOUT_SECS", "3")]);
    let mut c = connect(&f);
    c.write_all(b"POST /api/v1/devices/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(20) {
        if c.write_all(b"{").is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 4096];
        match c.read(&mut buf) {
            Ok(0) => {
                cut = true;
                break;
            }
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(cut, "the connection stayed open after its request timed out");
    assert!(started.elapsed() < Duration::from_secs(12), "{:?}", started.elapsed());
}
