//! Running under systemd (`Type=notify`, `WatchdogSec=`): readiness and the watchdog, through
//! `sd-notify` (the protocol's datagrams on `NOTIFY_SOCKET`; nothing happens without it).
//!
//! - `tern server run` says it is ready once it listens, and is alive while its background
//!   pass (every 250 ms: the fleet view, last-seen times, the refusal summary) keeps
//!   running.
//! - `tern agent run` says it is ready after its boot-time step, and is alive from its main
//!   loop, while it sleeps between polls and whenever a download or an install makes
//!   progress: a hung agent is restarted, and the restart resumes or rolls back as after a
//!   power cut.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Tell systemd the service is ready (and what it is doing).
pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// How often the watchdog wants to hear from us: half its period, if one is set.
pub fn watchdog_every() -> Option<Duration> {
    static EVERY: OnceLock<Option<Duration>> = OnceLock::new();
    // As libsystemd's sd_watchdog_enabled: `WATCHDOG_USEC` set, and `WATCHDOG_PID`, when set,
    // naming this process (sd-notify's own check also requires the PID to be set).
    *EVERY.get_or_init(|| {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|&u| u > 0)?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
    })
}

/// Milliseconds since the first call (the last time the watchdog was told, in `alive`).
fn millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

static LAST: AtomicU64 = AtomicU64::new(0);

/// Tell the watchdog we are alive, at most once a quarter of its period (so that a late
/// timer never stretches the gap past half of it); cheap enough to call per chunk written.
pub fn alive() {
    let Some(every) = watchdog_every() else {
        return;
    };
    let now = millis();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= every.as_millis() as u64 / 2
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
    }
}

/// Sleep for `total`, telling the watchdog we are alive meanwhile.
pub fn sleep(total: Duration) {
    let step = watchdog_every().map_or(total, |e| e.min(total));
    let end = Instant::now() + total;
    loop {
        alive();
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(step));
    }
}

/// The server's watchdog: alive only while its background pass moves.
pub async fn server_watchdog() {
    let Some(every) = watchdog_every() else {
        return;
    };
    let mut seen = tern_server::session::passes();
    loop {
        tokio::time::sleep(every).await;
        let now = tern_server::session::passes();
        if now != seen {
            seen = now;
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        } else {
            tracing::warn!(
                "the background pass has not run for {} ms; not telling the watchdog",
                every.as_millis()
            );
        }
    }
}
