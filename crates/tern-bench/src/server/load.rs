//! This command's own load generator: each simulated client is one task sending its next
//! request as soon as the previous one is answered, over a shared keep-alive client; and the
//! session phase (every simulated device's one signed check-in, all at once).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::cpu::{cpu_percent, Probe};
use super::sim::{checkin_body, SimDevice};
use super::{NOTHING_NEW, WARMUP};

/// The answer every request of a load must get.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expect {
    pub(super) status: u16,
    /// The body's length, when it is known.
    pub(super) len: Option<usize>,
    /// Text the body must contain.
    pub(super) contains: Option<&'static str>,
}

impl Expect {
    pub(super) const OK: Expect = Expect {
        status: 200,
        len: None,
        contains: None,
    };
    /// A poll's answer when nothing is new.
    pub(super) const NOTHING_NEW: Expect = Expect {
        status: 200,
        len: None,
        contains: Some(NOTHING_NEW),
    };
}

/// Builds the next request of simulated client `n`.
pub(super) type MakeRequest = Arc<dyn Fn(&reqwest::Client, usize) -> anyhow::Result<reqwest::Request> + Send + Sync>;
/// Sees the body of each accepted answer to simulated client `n` (a check-in's next challenge).
pub(super) type OnAnswer = Option<Arc<dyn Fn(usize, &[u8]) + Send + Sync>>;

pub(super) fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?)
}

pub(super) fn checkin_requests(base: &str, devices: Arc<Vec<SimDevice>>) -> MakeRequest {
    let urls: Vec<String> = devices
        .iter()
        .map(|d| format!("{base}/api/v1/devices/{}/checkin", d.id))
        .collect();
    Arc::new(move |client, n| {
        let body = checkin_body(&devices[n])?;
        Ok(client
            .post(&urls[n])
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .build()?)
    })
}

pub(super) fn get_requests(url: String) -> MakeRequest {
    Arc::new(move |client, _| Ok(client.get(&url).build()?))
}

/// Device `n` polls with its session token `tokens[n]`.
pub(super) fn poll_requests(base: &str, devices: &[SimDevice], tokens: &[String]) -> anyhow::Result<MakeRequest> {
    let polls = devices
        .iter()
        .zip(tokens)
        .map(|(d, t)| -> anyhow::Result<_> {
            let auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))?;
            Ok((format!("{base}/api/v1/devices/{}/poll", d.id), auth))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Arc::new(move |client, n| {
        let (url, auth) = &polls[n];
        Ok(client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, auth.clone())
            .build()?)
    }))
}

pub(super) fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The session token and its expiry from the answer to a signed check-in, which must have
/// nothing to do.
pub(super) fn session_of(status: reqwest::StatusCode, body: &[u8]) -> anyhow::Result<(String, i64)> {
    if status != reqwest::StatusCode::OK {
        bail!("HTTP {status}: {}", snippet(body));
    }
    let answer: serde_json::Value = serde_json::from_slice(body).context("the check-in's answer")?;
    if answer.get("poll_interval_secs").is_none() || answer.get("order").is_some() {
        bail!("not an idle answer: {answer}");
    }
    match (
        answer.get("session").and_then(|v| v.as_str()),
        answer.get("session_expires").and_then(|v| v.as_i64()),
    ) {
        (Some(token), Some(expires)) => Ok((token.to_owned(), expires)),
        _ => bail!("no session token in the answer: {answer}"),
    }
}

/// Each device asks for the challenge its first check-in answers, as a device without one
/// does (`GET /api/v1/devices/ID/challenge`).
pub(super) async fn fetch_challenges(
    client: &reqwest::Client,
    base: &str,
    devices: &Arc<Vec<SimDevice>>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..devices.len() {
        let (client, devices) = (client.clone(), devices.clone());
        let url = format!("{base}/api/v1/devices/{}/challenge", devices[n].id);
        tasks.spawn(async move {
            let resp = client.get(&url).send().await?;
            let status = resp.status();
            let body = resp.bytes().await?;
            if status != reqwest::StatusCode::OK {
                bail!("{url}: HTTP {status}: {}", snippet(&body));
            }
            devices[n].answered(&body);
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a challenge task failed")??;
    }
    Ok(())
}

/// One check-in before the load: it must be accepted with nothing to do, and its token must
/// let the device poll.
pub(super) async fn sanity_checkin(client: &reqwest::Client, base: &str, dev: &SimDevice) -> anyhow::Result<()> {
    let url = format!("{base}/api/v1/devices/{}/checkin", dev.id);
    let resp = client.post(&url).body(checkin_body(dev)?).send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    let (token, _) = session_of(status, &body).context("the first check-in")?;
    dev.answered(&body);
    let resp = client
        .get(format!("{base}/api/v1/devices/{}/poll", dev.id))
        .bearer_auth(token)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if status != reqwest::StatusCode::OK || !contains(&body, NOTHING_NEW) {
        bail!(
            "the first poll got HTTP {status}, not {NOTHING_NEW}: {}",
            snippet(&body)
        );
    }
    Ok(())
}

/// The session phase, timed on its own.
pub(super) struct Sessions {
    /// Signed check-ins sent, one per simulated device, all at once.
    pub(super) count: usize,
    /// From the first request to the last answer.
    pub(super) elapsed: Duration,
    /// Latency figures (rate: check-ins over `elapsed`).
    pub(super) figures: Figures,
}

/// Every simulated device sends one signed check-in, all at once (the documents are signed
/// before the clock starts); returns each device's session token.
pub(super) async fn open_sessions(
    client: &reqwest::Client,
    base: &str,
    devices: &[SimDevice],
) -> anyhow::Result<(Vec<String>, Sessions)> {
    let bodies = devices
        .iter()
        .map(|d| Ok((format!("{base}/api/v1/devices/{}/checkin", d.id), checkin_body(d)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (url, body)) in bodies.into_iter().enumerate() {
        let client = client.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let outcome = async {
                let resp = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                let body = resp.bytes().await?;
                anyhow::Ok((session_of(status, &body)?, body))
            }
            .await;
            (n, t0.elapsed(), outcome)
        });
    }
    let mut tokens = vec![String::new(); devices.len()];
    let mut tally = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let (n, took, outcome) = done.context("a session task failed")?;
        let ((token, _expires), body) = outcome.with_context(|| format!("the signed check-in of {}", devices[n].id))?;
        devices[n].answered(&body);
        tokens[n] = token;
        tally.latencies_us.push(took.as_micros().min(u32::MAX as u128) as u32);
    }
    let elapsed = start.elapsed();
    Ok((
        tokens,
        Sessions {
            count: devices.len(),
            elapsed,
            figures: Figures::from_tally(tally, elapsed, BTreeMap::new()),
        },
    ))
}

pub(super) fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// What one load produced.
#[derive(Default)]
pub(super) struct Tally {
    /// Latency of each request completed in the measured window, in microseconds.
    pub(super) latencies_us: Vec<u32>,
    /// Failed requests over the whole run (warm-up included), by message.
    pub(super) errors: BTreeMap<String, u64>,
}

impl Tally {
    pub(super) fn error(&mut self, message: String) {
        *self.errors.entry(message).or_default() += 1;
    }

    pub(super) fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (m, n) in other.errors {
            *self.errors.entry(m).or_default() += n;
        }
    }
}

/// `concurrency` tasks, each sending its next request as soon as the previous one is
/// answered, until `until`; latencies are kept for requests completed from `from`.
pub(super) async fn drive(
    client: reqwest::Client,
    concurrency: usize,
    from: Instant,
    until: Instant,
    load: Load,
) -> Tally {
    let Load {
        make,
        expect,
        on_answer,
    } = load;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..concurrency {
        let client = client.clone();
        let make = make.clone();
        let on_answer = on_answer.clone();
        tasks.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < until {
                let req = match make(&client, n) {
                    Ok(r) => r,
                    Err(e) => {
                        tally.error(format!("building the request: {e:#}"));
                        break;
                    }
                };
                let t0 = Instant::now();
                let outcome = match client.execute(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.bytes().await {
                            Ok(body) if status.as_u16() != expect.status => {
                                Err(format!("HTTP {status}: {}", snippet(&body)))
                            }
                            Ok(body) if expect.len.is_some_and(|l| l != body.len()) => {
                                Err(format!("HTTP {status} with {} bytes", body.len()))
                            }
                            Ok(body) if expect.contains.is_some_and(|c| !contains(&body, c)) => Err(format!(
                                "HTTP {status} without {}: {}",
                                expect.contains.unwrap_or_default(),
                                snippet(&body)
                            )),
                            Ok(body) => {
                                if let Some(hook) = &on_answer {
                                    hook(n, &body);
                                }
                                Ok(())
                            }
                            Err(e) => Err(format!("reading the answer: {:#}", anyhow::Error::from(e))),
                        }
                    }
                    Err(e) => Err(format!("{:#}", anyhow::Error::from(e))),
                };
                let t1 = Instant::now();
                match outcome {
                    Err(m) => tally.error(m),
                    Ok(()) if t1 >= from && t1 <= until => {
                        let us = t1.duration_since(t0).as_micros().min(u32::MAX as u128) as u32;
                        tally.latencies_us.push(us);
                    }
                    Ok(()) => {}
                }
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(t) => all.merge(t),
            Err(e) => all.error(format!("load task failed: {e}")),
        }
    }
    all
}

/// Request rate and latency of one load.
#[derive(Debug, Clone)]
pub(super) struct Figures {
    pub(super) requests: u64,
    pub(super) rate: f64,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) errors: u64,
    pub(super) error_messages: BTreeMap<String, u64>,
    /// CPU used during the measured window, percent of one core, by group.
    pub(super) cpu: BTreeMap<String, f64>,
}

impl Figures {
    pub(super) fn from_tally(mut t: Tally, window: Duration, cpu: BTreeMap<String, f64>) -> Self {
        t.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            if t.latencies_us.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((p * t.latencies_us.len() as f64).ceil() as usize).clamp(1, t.latencies_us.len());
            f64::from(t.latencies_us[rank - 1]) / 1e3
        };
        Figures {
            requests: t.latencies_us.len() as u64,
            rate: t.latencies_us.len() as f64 / window.as_secs_f64(),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: t.latencies_us.last().map_or(0.0, |&us| f64::from(us) / 1e3),
            errors: t.errors.values().sum(),
            error_messages: t.errors,
            cpu,
        }
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "requests_per_s": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "errors": self.errors,
            "error_messages": self.error_messages,
            "cpu_percent_of_one_core": self.cpu,
        })
    }
}

/// What one load sends and what it expects back.
pub(super) struct Load {
    pub(super) make: MakeRequest,
    pub(super) expect: Expect,
    pub(super) on_answer: OnAnswer,
}

impl Load {
    pub(super) fn new(make: MakeRequest, expect: Expect) -> Self {
        Load {
            make,
            expect,
            on_answer: None,
        }
    }
}

/// Run one load on `rt`: warm-up, then the measured window, with CPU sampled at its edges.
pub(super) fn load_run(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    concurrency: usize,
    duration: Duration,
    load: Load,
    probe: &Probe,
) -> anyhow::Result<Figures> {
    let from = Instant::now() + WARMUP;
    let until = from + duration;
    let handle = rt.spawn(drive(client.clone(), concurrency, from, until, load));
    sleep_until(from);
    let before = probe.sample();
    sleep_until(until);
    let after = probe.sample();
    let tally = rt.block_on(handle).context("the load generator failed")?;
    Ok(Figures::from_tally(
        tally,
        duration,
        cpu_percent(&before, &after, duration),
    ))
}

pub(super) fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}
