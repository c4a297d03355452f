//! One simulated device: a task that polls with its session token every poll interval and
//! sends a signed check-in every check-in interval, reporting the soak's deployment as
//! `downloading` with a progress counter that grows with every check-in it sends. Every
//! request's outcome goes to the [`Journal`].
//!
//! The protocol, as the agent (`tern_agent::remote`) speaks it: a check-in carries the
//! challenge of the last accepted answer (the first from `GET /api/v1/devices/ID/challenge`);
//! a 409 `StaleChallenge` means the device's challenge is no longer current, so it fetches
//! it again and sends once more. The answer's `session` token is what polls carry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_core::director::{self, CheckIn, DeploymentReport, Progress, SlotReport, Stage};
use tern_core::DateTime;

use super::setup::DeviceKey;

/// The `total` of every progress report (the counter is what matters, not the ratio).
pub const PROGRESS_TOTAL: u64 = 1 << 40;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `GET /api/v1/devices/ID/poll` with the session token.
    Poll,
    /// `POST /api/v1/devices/ID/checkin`, signed.
    Checkin,
    /// `GET /api/v1/devices/ID/challenge`.
    Challenge,
}

impl Op {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Op::Poll => "poll",
            Op::Checkin => "check-in",
            Op::Challenge => "challenge",
        }
    }
}

/// An answered request: milliseconds from the start of the load, and its latency.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    /// What it was.
    pub op: Op,
    /// When it was sent (ms from the start of the load).
    pub start_ms: u32,
    /// When its answer had been read.
    pub end_ms: u32,
    /// Its latency.
    pub us: u32,
}

/// A failed request.
#[derive(Debug, Clone)]
pub struct Failed {
    /// What it was.
    pub op: Op,
    /// When it was sent (ms from the start of the load).
    pub start_ms: u32,
    /// When it failed.
    pub end_ms: u32,
    /// `HTTP 500 Internal`, `timed out: …`, …
    pub kind: String,
}

/// A 409 `StaleChallenge` answer to a check-in.
#[derive(Debug, Clone, Copy)]
pub struct Stale {
    /// When the check-in was sent (ms from the start of the load).
    pub start_ms: u32,
    /// When the answer came.
    pub end_ms: u32,
    /// Whether the refused challenge was the server's latest word to this device (from the
    /// answer to its last check-in, which was accepted, or fetched just before), so that
    /// the server refused a challenge it had just given. Otherwise the device's last
    /// check-in failed, and the server may have moved the challenge without the device
    /// hearing of it (the device then fetches it again, as the protocol says).
    pub after_accepted: bool,
}

/// Every request's outcome, sharded by device so that tasks rarely wait for each other.
#[derive(Default)]
pub struct Shard {
    /// Accepted requests.
    pub answered: Vec<Answered>,
    /// Failed ones.
    pub failed: Vec<Failed>,
    /// Check-ins refused as answering a stale challenge.
    pub stale: Vec<Stale>,
    /// Polls answered `checkin: true` (an order is waiting: the deployment).
    pub polls_told_to_check_in: u64,
}

/// The journal of the whole load.
pub struct Journal {
    shards: Vec<Mutex<Shard>>,
}

impl Journal {
    /// `shards` empty shards.
    pub fn new(shards: usize) -> Self {
        Journal {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    fn with(&self, device: usize, f: impl FnOnce(&mut Shard)) {
        if let Ok(mut s) = self.shards[device % self.shards.len()].lock() {
            f(&mut s);
        }
    }

    /// Every shard's contents, merged.
    pub fn take(self) -> Shard {
        let mut all = Shard::default();
        for s in self.shards {
            let s = s.into_inner().unwrap_or_else(|e| e.into_inner());
            all.answered.extend(s.answered);
            all.failed.extend(s.failed);
            all.stale.extend(s.stale);
            all.polls_told_to_check_in += s.polls_told_to_check_in;
        }
        all
    }
}

/// What every device task shares.
pub struct Load {
    /// The server's base URL.
    pub base: String,
    /// The deployment the devices report on.
    pub deployment: String,
    /// HTTP clients (each its own connection pool, bound to its own loopback address);
    /// device `n` uses client `n % len`.
    pub clients: Vec<reqwest::Client>,
    /// The devices.
    pub devices: Arc<Vec<DeviceKey>>,
    /// The start of the load.
    pub t0: Instant,
    /// No request is sent from here on.
    pub until: Instant,
    /// Poll interval.
    pub poll: Duration,
    /// Check-in interval.
    pub checkin: Duration,
    /// Per device: the highest progress the server acknowledged (HTTP 200 to the check-in
    /// that reported it).
    pub acked: Vec<AtomicU64>,
    /// The outcomes.
    pub journal: Journal,
}

impl Load {
    fn ms(&self, t: Instant) -> u32 {
        t.saturating_duration_since(self.t0).as_millis().min(u32::MAX as u128) as u32
    }
}

/// What one device remembers between requests.
struct State {
    challenge: Option<String>,
    session: Option<String>,
    /// Check-ins sent: the progress counter.
    sent: u64,
    /// Whether its last check-in failed (neither accepted nor refused as stale).
    last_failed: bool,
}

/// An outcome: the answer's status and body, or a transport failure's kind.
type Outcome = Result<(reqwest::StatusCode, Vec<u8>), String>;

async fn send(req: reqwest::RequestBuilder) -> Outcome {
    let resp = req.send().await.map_err(|e| transport_kind(&e))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| transport_kind(&e))?;
    Ok((status, body.to_vec()))
}

/// A transport failure's kind: what failed and the innermost cause.
fn transport_kind(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connecting failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    format!("{what}: {}", tern_core::text::shown_max(&cause.to_string(), 120))
}

/// An HTTP refusal's kind: the status and the error body's `kind`.
fn http_kind(status: reqwest::StatusCode, body: &[u8]) -> String {
    let kind = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/kind").and_then(|k| k.as_str()).map(str::to_owned));
    match kind {
        Some(k) => format!("HTTP {} {}", status.as_u16(), tern_core::text::shown_max(&k, 40)),
        None => format!("HTTP {}", status.as_u16()),
    }
}

fn error_kind(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .pointer("/error/kind")?
        .as_str()
        .map(str::to_owned)
}

/// Device `n`: first check-in at its place in the first poll interval, polls every poll
/// interval after that, check-ins every check-in interval at its place in that interval; a
/// failed check-in is tried again one poll interval later.
pub async fn run(load: Arc<Load>, n: usize) {
    let count = load.devices.len().max(1);
    let share = n as f64 / count as f64;
    let start = load.t0 + load.poll.mul_f64(share);
    let grid = start + load.poll + load.checkin.mul_f64(share);
    let mut st = State {
        challenge: None,
        session: None,
        sent: 0,
        last_failed: false,
    };
    let mut next_checkin = start;
    let mut next_poll = start + load.poll;
    loop {
        let checkin_first = st.session.is_none() || next_checkin <= next_poll;
        let due = if checkin_first { next_checkin } else { next_poll };
        if due >= load.until {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        if checkin_first {
            let now = Instant::now();
            next_checkin = if checkin(&load, n, &mut st).await {
                // The next point of this device's check-in grid.
                let periods = now.saturating_duration_since(grid).as_secs_f64() / load.checkin.as_secs_f64();
                grid + load.checkin.mul_f64(periods.floor() + 1.0)
            } else {
                Instant::now() + load.poll
            };
        } else {
            poll(&load, n, &mut st).await;
            while next_poll <= Instant::now() {
                next_poll += load.poll;
            }
        }
    }
}

async fn poll(load: &Load, n: usize, st: &mut State) {
    let Some(token) = &st.session else { return };
    let dev = &load.devices[n];
    let client = &load.clients[n % load.clients.len()];
    let url = format!("{}/api/v1/devices/{}/poll", load.base, dev.id);
    let t = Instant::now();
    let outcome = send(client.get(url).bearer_auth(token)).await;
    let end = Instant::now();
    let (start_ms, end_ms) = (load.ms(t), load.ms(end));
    match outcome {
        Ok((status, body)) if status == reqwest::StatusCode::OK => {
            let told = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("checkin").and_then(|c| c.as_bool()))
                .unwrap_or(false);
            load.journal.with(n, |s| {
                s.answered.push(Answered {
                    op: Op::Poll,
                    start_ms,
                    end_ms,
                    us: micros(end - t),
                });
                s.polls_told_to_check_in += u64::from(told);
            });
        }
        Ok((status, body)) => {
            if status == reqwest::StatusCode::UNAUTHORIZED {
                // The session is gone: the next step is a signed check-in.
                st.session = None;
            }
            fail(load, n, Op::Poll, start_ms, end_ms, http_kind(status, &body));
        }
        Err(kind) => fail(load, n, Op::Poll, start_ms, end_ms, kind),
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

fn fail(load: &Load, n: usize, op: Op, start_ms: u32, end_ms: u32, kind: String) {
    load.journal.with(n, |s| {
        s.failed.push(Failed {
            op,
            start_ms,
            end_ms,
            kind,
        })
    });
}

/// The device's challenge, fetched when it has none; `None` if that failed.
async fn challenge(load: &Load, n: usize, st: &mut State) -> Option<String> {
    if let Some(c) = &st.challenge {
        return Some(c.clone());
    }
    let dev = &load.devices[n];
    let client = &load.clients[n % load.clients.len()];
    let url = format!("{}/api/v1/devices/{}/challenge", load.base, dev.id);
    let t = Instant::now();
    let outcome = send(client.get(url)).await;
    let end = Instant::now();
    let (start_ms, end_ms) = (load.ms(t), load.ms(end));
    let kind = match outcome {
        Ok((status, body)) if status == reqwest::StatusCode::OK => {
            let c = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("challenge").and_then(|c| c.as_str()).map(str::to_owned));
            match c {
                Some(c) => {
                    load.journal.with(n, |s| {
                        s.answered.push(Answered {
                            op: Op::Challenge,
                            start_ms,
                            end_ms,
                            us: micros(end - t),
                        })
                    });
                    st.challenge = Some(c.clone());
                    return Some(c);
                }
                None => "HTTP 200 without a challenge".to_owned(),
            }
        }
        Ok((status, body)) => http_kind(status, &body),
        Err(kind) => kind,
    };
    fail(load, n, Op::Challenge, start_ms, end_ms, kind);
    None
}

/// A signed check-in reporting the next progress value; whether it was accepted.
async fn checkin(load: &Load, n: usize, st: &mut State) -> bool {
    let dev = &load.devices[n];
    let client = &load.clients[n % load.clients.len()];
    let url = format!("{}/api/v1/devices/{}/checkin", load.base, dev.id);
    // Once more after a stale challenge, with a fresh one.
    for _ in 0..2 {
        let Some(challenge) = challenge(load, n, st).await else {
            return false;
        };
        st.sent += 1;
        let done = st.sent;
        let doc = CheckIn {
            kind: director::CHECKIN_TYPE.into(),
            device_id: dev.id.clone(),
            nonce: tern_server::random_hex(16),
            challenge,
            time: DateTime::from_unix(tern_server::unix_now()).to_string(),
            phase: "transferring".into(),
            slots: vec![SlotReport {
                name: "rootfs.a".into(),
                booted: true,
                status: "committed".into(),
                version: Some("0.9.0".into()),
                target: Some("sim/rootfs-0.9.0.img".into()),
                sha256: Some("5a".repeat(32)),
            }],
            deployment: Some(DeploymentReport {
                deployment: load.deployment.clone(),
                stage: Stage::Downloading,
                progress: Some(Progress {
                    done,
                    total: PROGRESS_TOTAL,
                }),
                reason: None,
            }),
            refused_order: None,
        };
        let body = match director::sign_document("check-in", &doc, &dev.key) {
            Ok(b) => b,
            Err(e) => {
                let now = load.ms(Instant::now());
                fail(load, n, Op::Checkin, now, now, format!("signing failed: {e}"));
                return false;
            }
        };
        let t = Instant::now();
        let outcome = send(
            client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
        )
        .await;
        let end = Instant::now();
        let (start_ms, end_ms) = (load.ms(t), load.ms(end));
        let kind = match outcome {
            Ok((status, body)) if status == reqwest::StatusCode::OK => {
                let answer: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
                let field = |k: &str| {
                    answer
                        .as_ref()
                        .and_then(|v| v.get(k))
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                };
                match (field("session"), field("challenge")) {
                    (Some(session), Some(next)) => {
                        load.acked[n].fetch_max(done, Ordering::Relaxed);
                        load.journal.with(n, |s| {
                            s.answered.push(Answered {
                                op: Op::Checkin,
                                start_ms,
                                end_ms,
                                us: micros(end - t),
                            })
                        });
                        st.session = Some(session);
                        st.challenge = Some(next);
                        st.last_failed = false;
                        return true;
                    }
                    _ => "HTTP 200 without a session or challenge".to_owned(),
                }
            }
            Ok((status, body))
                if status == reqwest::StatusCode::CONFLICT
                    && error_kind(&body).as_deref() == Some("StaleChallenge") =>
            {
                let after_accepted = !st.last_failed;
                load.journal.with(n, |s| {
                    s.stale.push(Stale {
                        start_ms,
                        end_ms,
                        after_accepted,
                    })
                });
                st.challenge = None;
                // The retry answers a challenge fetched just now.
                st.last_failed = false;
                continue;
            }
            Ok((status, body)) => http_kind(status, &body),
            Err(kind) => kind,
        };
        st.last_failed = true;
        fail(load, n, Op::Checkin, start_ms, end_ms, kind);
        return false;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_named_by_status_and_kind() {
        let body = br#"{"error":{"kind":"Internal","message":"internal error 0a1b2c"}}"#;
        assert_eq!(
            http_kind(reqwest::StatusCode::INTERNAL_SERVER_ERROR, body),
            "HTTP 500 Internal"
        );
        assert_eq!(http_kind(reqwest::StatusCode::BAD_GATEWAY, b"<html>"), "HTTP 502");
        assert_eq!(
            error_kind(br#"{"error":{"kind":"StaleChallenge","message":"stale"}}"#).as_deref(),
            Some("StaleChallenge")
        );
    }
}
