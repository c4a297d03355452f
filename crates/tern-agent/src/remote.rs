//! The update server, from the device's side (DESIGN §3).
//!
//! One poll ([`Remote::poll_once`]):
//!
//! 1. Sign a check-in with the device key: a fresh nonce, the time, the slots, the agent's
//!    state, and the stage of the deployment in hand (derived from the persisted install
//!    state, so a report is repeated until a check-in carrying it is acknowledged).
//! 2. If the answer carries an order, verify it against the director root: the director's
//!    online key, this device's id, this check-in's nonce, not expired. A refused order is
//!    remembered and reported at the next check-in; nothing else happens.
//! 3. Refresh the release repository with the TUF client (from the device's trust anchor)
//!    and compare each ordered target's length and hashes with the repository's signed
//!    ones: a director that disagrees with the release engineer's signatures is refused.
//! 4. Download (resuming a partial file after a dropped connection or a reboot), reporting
//!    progress, then install into the inactive slot (`Agent::install_downloaded`), and
//!    report again. The reboot and commit follow the usual boot-time step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_core::director::{self, CheckIn, DeploymentReport, Order, OrderRefusal, Progress, SlotReport, Stage};
use tern_core::{DateTime, Root, Signed, SigningKey};

use crate::config::{AgentConfig, ServerConfig};
use crate::install::{self, Agent};
use crate::state::Phase;
use crate::{Error, Result};

/// Largest answer to a check-in the agent reads.
const MAX_RESPONSE_BYTES: u64 = 256 * 1024;
/// Seconds between progress reports while downloading.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// The deployment in hand, persisted in `STATE_DIR/remote.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// The deployment.
    pub id: String,
    /// The release.
    pub release: String,
    /// The target.
    pub target: String,
    /// Where it stands.
    pub stage: Stage,
    /// Why it failed or rolled back.
    #[serde(default)]
    pub reason: Option<String>,
}

/// What `remote.json` (0600: it holds the session token) keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteState {
    /// The deployment in hand or last finished.
    pub deployment: Option<Current>,
    /// The last refused order's reason, until a check-in reported it.
    pub refused_order: Option<String>,
    /// The session token from the last signed check-in, and its expiry.
    #[serde(default)]
    pub session: Option<(String, i64)>,
    /// The deployment report the server last acknowledged.
    #[serde(default)]
    pub reported: Option<(String, Stage)>,
    /// The challenge the next check-in answers (from the last answer).
    #[serde(default)]
    pub challenge: Option<String>,
}

impl RemoteState {
    /// Whether the server has heard everything this device knows.
    fn reported_all(&self) -> bool {
        self.refused_order.is_none() && self.deployment.as_ref().map(|d| (d.id.clone(), d.stage)) == self.reported
    }
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum PollOutcome {
    /// Nothing to do.
    Idle {
        /// Seconds until the next poll.
        poll_interval_secs: u64,
    },
    /// An order was refused.
    Refused {
        /// The refusal's kind.
        kind: String,
        /// Why.
        reason: String,
    },
    /// The ordered release was installed.
    Installed {
        /// The deployment.
        deployment: String,
        /// Whether the device must reboot into it.
        reboot_needed: bool,
    },
    /// The ordered release could not be installed.
    Failed {
        /// The deployment.
        deployment: String,
        /// Why.
        reason: String,
    },
}

/// The answer to a check-in.
#[derive(Debug, Deserialize)]
struct CheckinResponse {
    poll_interval_secs: u64,
    #[serde(default)]
    order: Option<serde_json::Value>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    session_expires: Option<i64>,
    #[serde(default)]
    challenge: Option<String>,
}

/// What one check-in got.
enum Sent {
    /// Recorded; its nonce and the answer.
    Answered(String, Box<CheckinResponse>),
    /// Refused as answering a stale challenge, or as malformed: worth one more try with
    /// the current challenge; the error if that fails too.
    Retry(Error),
}

/// The answer to a poll.
#[derive(Debug, Deserialize)]
struct PollResponse {
    poll_interval_secs: u64,
    checkin: bool,
}

/// The device's connection to its server.
pub struct Remote {
    cfg: AgentConfig,
    server: ServerConfig,
    http: tern_client::HttpTransport,
    key: SigningKey,
    director: Signed<Root>,
    state_path: PathBuf,
    /// Called while a download or an install makes progress (a service manager's watchdog).
    alive: fn(),
}

fn server_err(url: &str, reason: impl ToString) -> Error {
    Error::Server {
        url: url.to_owned(),
        reason: reason.to_string(),
    }
}

fn random_nonce() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut buf = [0u8; 16];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The server's error message from an error body, else the raw text; shortened and
/// escaped, since it is the server's word and ends up in logs and on terminals.
fn server_message(body: &[u8]) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    tern_core::text::shown_max(&text, 512)
}

/// The error kind of an error body (`StaleChallenge`…).
fn server_kind(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .pointer("/error/kind")?
        .as_str()
        .map(str::to_owned)
}

/// Whether a challenge from an (unsigned) answer is one a check-in can carry.
fn valid_challenge(c: &str) -> bool {
    !c.is_empty() && c.len() <= tern_core::enrollment::MAX_CHALLENGE_CHARS && c.bytes().all(|b| b.is_ascii_graphic())
}

/// A challenge from the server (`{"challenge": …}`).
fn fetch_challenge(http: &tern_client::HttpTransport, url: &str) -> Result<String> {
    let (status, body) = http.get(url, MAX_RESPONSE_BYTES).map_err(|e| server_err(url, e))?;
    if status != 200 {
        return Err(server_err(url, format!("HTTP {status}: {}", server_message(&body))));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| server_err(url, format!("answer: {e}")))?;
    v.get("challenge")
        .and_then(|c| c.as_str())
        .filter(|c| valid_challenge(c))
        .map(str::to_owned)
        .ok_or_else(|| server_err(url, "the answer has no challenge"))
}

/// The HTTP client: the server CA and the device certificate (with the device key) if configured.
fn transport(cfg: &AgentConfig, server: &ServerConfig) -> Result<tern_client::HttpTransport> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(Error::io(p));
    let ca = server.ca_cert.as_ref().map(read).transpose()?;
    let identity = match &server.client_cert {
        Some(cert) => {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(&server.device_key_path(&cfg.state_dir))?);
            Some(pem)
        }
        None => None,
    };
    let http =
        tern_client::HttpTransport::with_tls(&tern_client::Limits::default(), ca.as_deref(), identity.as_deref());
    // The PEM copy holding the private key is wiped once the client holds its own.
    if let Some(mut pem) = identity {
        zeroize::Zeroize::zeroize(&mut pem);
    }
    Ok(http?)
}

fn server_config(cfg: &AgentConfig) -> Result<ServerConfig> {
    cfg.server.clone().ok_or_else(|| Error::Config {
        path: cfg.state_dir.clone(),
        reason: "no [server] section: this device has no update server".into(),
    })
}

/// Enroll with the server, with a fleet enrollment token (then pending until an operator
/// approves) or, without one, with the configured device certificate over mutual TLS
/// (approved at once); makes the device key if there is none. Returns the registry's answer.
pub fn enroll(cfg: &AgentConfig, token: Option<&str>) -> Result<serde_json::Value> {
    let server = server_config(cfg)?;
    let key_path = server.device_key_path(&cfg.state_dir);
    if !key_path.exists() {
        std::fs::create_dir_all(&cfg.state_dir).map_err(Error::io(&cfg.state_dir))?;
        let files = tern_fs::KeyFiles {
            private: key_path.clone(),
            public: key_path.with_extension("pub.json"),
        };
        tern_fs::generate_key_files(tern_core::KeyAlgorithm::Ed25519, &files)?;
    }
    let key = tern_fs::load_signing_key(&key_path)?;
    let encryption_key = crate::keystore::ensure_device_key(cfg)?;
    let http = transport(cfg, &server)?;
    let base = server.url.trim_end_matches('/');
    let challenge = fetch_challenge(&http, &format!("{base}/api/v1/devices/enroll/challenge"))?;
    // The document the device key signs: possession of the key is the proof.
    let doc = tern_core::enrollment::Enrollment {
        kind: tern_core::enrollment::ENROLLMENT_TYPE.into(),
        device_id: server.device_id.clone(),
        public_key: key.public().to_value().clone(),
        encryption_key: Some(encryption_key.to_value()),
        device_type: cfg.device_type.clone(),
        hardware: cfg.hardware_revision.clone(),
        tags: server.tags.clone(),
        // A fleet token is `ternenroll_ID_SECRET`: the document names its id, never the secret.
        token_id: token.and_then(|t| t.split('_').nth(1)).map(str::to_owned),
        challenge,
    };
    let body = director::sign_document("enrollment", &doc, &key).map_err(|e| Error::State {
        path: key_path.clone(),
        reason: format!("signing the enrollment document: {e}"),
    })?;
    let url = format!("{base}/api/v1/devices/enroll");
    let (status, resp) = match token {
        Some(t) => http.post_json_bearer(&url, body, t, MAX_RESPONSE_BYTES),
        None => http.post_json(&url, body, MAX_RESPONSE_BYTES),
    }
    .map_err(|e| server_err(&url, e))?;
    if !(200..300).contains(&status) {
        return Err(server_err(&url, format!("HTTP {status}: {}", server_message(&resp))));
    }
    serde_json::from_slice(&resp).map_err(|e| server_err(&url, format!("answer: {e}")))
}

impl From<tern_client::TransportError> for Error {
    fn from(e: tern_client::TransportError) -> Self {
        Error::Server {
            url: String::new(),
            reason: e.to_string(),
        }
    }
}

impl Remote {
    /// Load the device key and the director root.
    pub fn new(cfg: AgentConfig) -> Result<Self> {
        let server = server_config(&cfg)?;
        let key_path = server.device_key_path(&cfg.state_dir);
        let key = tern_fs::load_signing_key(&key_path)?;
        let root_bytes = std::fs::read(&server.director_root).map_err(|e| Error::TrustedRoot {
            path: server.director_root.clone(),
            reason: e.to_string(),
        })?;
        let director = tern_core::trust::load_trusted_root(&root_bytes).map_err(|e| Error::TrustedRoot {
            path: server.director_root.clone(),
            reason: e.to_string(),
        })?;
        let http = transport(&cfg, &server)?;
        let state_path = cfg.state_dir.join("remote.json");
        Ok(Remote {
            cfg,
            server,
            http,
            key,
            director,
            state_path,
            alive: || {},
        })
    }

    /// Call `alive` whenever a download or an install makes progress, so that a service
    /// manager's watchdog sees a long install as alive (and a stalled one as hung).
    pub fn on_progress(&mut self, alive: fn()) {
        self.alive = alive;
    }

    fn base(&self) -> &str {
        self.server.url.trim_end_matches('/')
    }

    fn load_state(&self) -> Result<RemoteState> {
        match std::fs::read(&self.state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::State {
                path: self.state_path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RemoteState::default()),
            Err(e) => Err(Error::io(&self.state_path)(e)),
        }
    }

    fn save_state(&self, st: &RemoteState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(st).unwrap_or_default();
        Ok(tern_fs::atomic_write(&self.state_path, &bytes, 0o600)?)
    }

    /// The deployment's stage now, from the persisted install state: installs and boots
    /// move it on even when no check-in happened in between (a power cut, a reboot).
    fn settle(&self, current: &mut Current, status: &install::Status) {
        if matches!(current.stage, Stage::Committed | Stage::RolledBack | Stage::Failed) {
            return;
        }
        let booted = status
            .slots
            .iter()
            .find(|s| Some(&s.bootname) == status.booted.as_ref())
            .and_then(|s| s.record.as_ref());
        let holds_target = booted.is_some_and(|r| r.target.as_deref() == Some(current.target.as_str()));
        let after_install = matches!(current.stage, Stage::Installing | Stage::Rebooting | Stage::Trial);
        match &status.state {
            Phase::Transferring(_) | Phase::Verified(_) if current.stage == Stage::Installing => {}
            Phase::PendingReboot(_) if after_install => current.stage = Stage::Rebooting,
            Phase::Trial(_) if after_install => current.stage = Stage::Trial,
            Phase::RolledBack(r) if after_install => {
                current.stage = Stage::RolledBack;
                current.reason = Some(r.reason.clone());
            }
            Phase::Committed(_) | Phase::Idle if after_install && holds_target => current.stage = Stage::Committed,
            Phase::Failed(f) if current.stage == Stage::Installing => {
                current.stage = Stage::Failed;
                current.reason = Some(format!("{f:?}"));
            }
            _ => {}
        }
    }

    /// Sign and send one check-in; returns its nonce and the server's answer, and notes the
    /// session token and what the server now knows (the caller persists `st`).
    fn checkin(&self, st: &mut RemoteState, progress: Option<Progress>) -> Result<(String, CheckinResponse)> {
        let status = install::status(&self.cfg)?;
        let slots = status
            .slots
            .iter()
            .map(|s| SlotReport {
                name: s.name.clone(),
                booted: Some(&s.bootname) == status.booted.as_ref(),
                status: s.record.as_ref().map_or("empty".into(), |r| r.status.clone()),
                version: s.record.as_ref().and_then(|r| r.version.clone()),
                target: s.record.as_ref().and_then(|r| r.target.clone()),
                sha256: s.record.as_ref().and_then(|r| r.sha256.clone()),
            })
            .collect::<Vec<_>>();
        // A check-in answers the challenge of the last answer; without one (a new device,
        // or one that lost its state or its last answer) it asks for the current one.
        if let Some(c) = st.challenge.clone() {
            if let Sent::Answered(nonce, answer) = self.send_checkin(st, &slots, progress, c)? {
                return Ok((nonce, *answer));
            }
        }
        let url = format!("{}/api/v1/devices/{}/challenge", self.base(), self.server.device_id);
        let c = fetch_challenge(&self.http, &url)?;
        st.challenge = Some(c.clone());
        match self.send_checkin(st, &slots, progress, c)? {
            Sent::Answered(nonce, answer) => Ok((nonce, *answer)),
            Sent::Retry(e) => Err(e),
        }
    }

    fn send_checkin(
        &self,
        st: &mut RemoteState,
        slots: &[SlotReport],
        progress: Option<Progress>,
        challenge: String,
    ) -> Result<Sent> {
        let status = install::status(&self.cfg)?;
        let nonce = random_nonce();
        let doc = CheckIn {
            kind: director::CHECKIN_TYPE.into(),
            device_id: self.server.device_id.clone(),
            nonce: nonce.clone(),
            challenge,
            time: now().to_string(),
            phase: status.state.name().into(),
            slots: slots.to_vec(),
            deployment: st.deployment.as_ref().map(|d| DeploymentReport {
                deployment: d.id.clone(),
                stage: d.stage,
                progress,
                reason: d.reason.clone(),
            }),
            refused_order: st.refused_order.clone(),
        };
        let body = director::sign_document("check-in", &doc, &self.key).map_err(|e| Error::State {
            path: self.state_path.clone(),
            reason: format!("signing the check-in: {e}"),
        })?;
        let url = format!("{}/api/v1/devices/{}/checkin", self.base(), self.server.device_id);
        let (code, resp) = self
            .http
            .post_json(&url, body, MAX_RESPONSE_BYTES)
            .map_err(|e| server_err(&url, e))?;
        // A stale challenge, or a refusal of the check-in itself (the challenge came in an
        // unsigned answer, and a bad one must not stop check-ins for good): ask for the
        // current challenge and try once more.
        if (code == 409 && server_kind(&resp).as_deref() == Some("StaleChallenge")) || code == 400 {
            st.challenge = None;
            return Ok(Sent::Retry(server_err(
                &url,
                format!("HTTP {code}: {}", server_message(&resp)),
            )));
        }
        if !(200..300).contains(&code) {
            return Err(server_err(&url, format!("HTTP {code}: {}", server_message(&resp))));
        }
        let answer: CheckinResponse =
            serde_json::from_slice(&resp).map_err(|e| server_err(&url, format!("answer: {e}")))?;
        if let (Some(token), Some(expires)) = (&answer.session, answer.session_expires) {
            st.session = Some((token.clone(), expires));
        }
        st.challenge = answer.challenge.clone().filter(|c| valid_challenge(c));
        st.reported = st.deployment.as_ref().map(|d| (d.id.clone(), d.stage));
        Ok(Sent::Answered(nonce, Box::new(answer)))
    }

    /// A poll with the session token: `Some(interval)` when there is nothing new, `None` when
    /// a signed check-in is due (an order waits, or the token is refused or expired).
    fn poll_session(&self, st: &RemoteState) -> Result<Option<u64>> {
        let Some((token, expires)) = &st.session else {
            return Ok(None);
        };
        if *expires <= now().unix() + 5 {
            return Ok(None);
        }
        let url = format!("{}/api/v1/devices/{}/poll", self.base(), self.server.device_id);
        let (code, resp) = self
            .http
            .get_bearer(&url, token, MAX_RESPONSE_BYTES)
            .map_err(|e| server_err(&url, e))?;
        if code != 200 {
            return Ok(None);
        }
        let answer: PollResponse =
            serde_json::from_slice(&resp).map_err(|e| server_err(&url, format!("answer: {e}")))?;
        Ok((!answer.checkin).then_some(answer.poll_interval_secs))
    }

    /// One poll: check in, and follow an order if one comes.
    pub fn poll_once(&mut self) -> Result<PollOutcome> {
        let mut st = self.load_state()?;
        if let Some(d) = st.deployment.as_mut() {
            let status = install::status(&self.cfg)?;
            self.settle(d, &status);
        }
        self.save_state(&st)?;
        // The cheap path: nothing to report and a live session, so a poll without a signature.
        if st.reported_all() {
            if let Some(poll_interval_secs) = self.poll_session(&st)? {
                tracing::debug!("polled: nothing to do");
                return Ok(PollOutcome::Idle { poll_interval_secs });
            }
        }
        let (nonce, answer) = self.checkin(&mut st, None)?;
        tracing::info!(order = answer.order.is_some(), "checked in (signed)");
        // The server has the refusal now.
        st.refused_order = None;
        self.save_state(&st)?;
        let Some(order_value) = answer.order else {
            return Ok(PollOutcome::Idle {
                poll_interval_secs: answer.poll_interval_secs,
            });
        };
        let order_bytes = serde_json::to_vec(&order_value).unwrap_or_default();
        let order = match director::verify_order(&order_bytes, &self.director, &self.server.device_id, &nonce, now()) {
            Ok(o) => o,
            Err(refusal) => {
                tracing::warn!(
                    "refused the server's order: {}",
                    tern_core::text::shown_max(&refusal.to_string(), 1024)
                );
                return self.refuse(&mut st, refusal);
            }
        };
        tracing::info!(
            deployment = %tern_core::text::shown(&order.deployment),
            release = %tern_core::text::shown(&order.release),
            "order verified"
        );
        if let Some(d) = &st.deployment {
            if d.id == order.deployment && matches!(d.stage, Stage::Committed | Stage::RolledBack | Stage::Failed) {
                // Already finished here; the report above tells the server.
                return Ok(PollOutcome::Idle {
                    poll_interval_secs: answer.poll_interval_secs,
                });
            }
        }
        st.deployment = Some(Current {
            id: order.deployment.clone(),
            release: order.release.clone(),
            target: order.targets[0].name.clone(),
            stage: Stage::Downloading,
            reason: None,
        });
        self.save_state(&st)?;
        match self.follow(&order, &mut st) {
            Ok(reboot_needed) => Ok(PollOutcome::Installed {
                deployment: order.deployment,
                reboot_needed,
            }),
            Err(Error::Order(refusal)) => {
                // Signed by the director but not what the repository says: the director
                // key may be compromised. The deployment fails, loudly.
                if let Some(d) = st.deployment.as_mut() {
                    d.stage = Stage::Failed;
                    d.reason = Some(refusal.to_string());
                }
                self.refuse(&mut st, refusal)
            }
            Err(e @ (Error::Server { .. } | Error::Busy { .. })) => Err(e),
            Err(Error::Client(c)) if is_transient(&c) => Err(Error::Client(c)),
            Err(e) => {
                let reason = error_chain(&e);
                if let Some(d) = st.deployment.as_mut() {
                    d.stage = Stage::Failed;
                    d.reason = Some(reason.clone());
                }
                self.save_state(&st)?;
                if self.checkin(&mut st, None).is_ok() {
                    self.save_state(&st)?;
                }
                Ok(PollOutcome::Failed {
                    deployment: order.deployment,
                    reason,
                })
            }
        }
    }

    fn refuse(&self, st: &mut RemoteState, refusal: OrderRefusal) -> Result<PollOutcome> {
        st.refused_order = Some(format!("{}: {refusal}", refusal.kind()));
        self.save_state(st)?;
        // Tell the server now; if that fails the next check-in carries it.
        if self.checkin(st, None).is_ok() {
            st.refused_order = None;
            self.save_state(st)?;
        }
        if let Ok(mut agent) = Agent::open(self.cfg.clone()) {
            agent.note_error(refusal.kind(), &refusal.to_string(), now());
        }
        Ok(PollOutcome::Refused {
            kind: refusal.kind().into(),
            reason: refusal.to_string(),
        })
    }

    /// The wrapped data keys the server holds for this device's keys
    /// (`GET /repo/recipients/SHA256/KID`, one request per key; 404: none for that key).
    fn recipients(
        &self,
        target: &str,
        hashes: &std::collections::BTreeMap<String, String>,
        m: &tern_core::manifest::Manifest,
    ) -> Result<Option<Arc<tern_core::keywrap::Recipients>>> {
        let Some(sha256) = hashes.get("sha256") else {
            return Ok(None);
        };
        let mut all: Option<tern_core::keywrap::Recipients> = None;
        for key in crate::keystore::keys(&self.cfg)? {
            let url = format!("{}/repo/recipients/{sha256}/{}", self.base(), key.public().kid());
            let (status, body) = self
                .http
                .get(&url, MAX_RESPONSE_BYTES)
                .map_err(|e| server_err(&url, e))?;
            match status {
                200 => {}
                404 => continue,
                other => return Err(server_err(&url, format!("HTTP {other}: {}", server_message(&body)))),
            }
            let mut doc = tern_bundle::parse_recipients(sha256, &body, m).map_err(|e| Error::Decryption {
                target: target.to_owned(),
                reason: format!("the server's wrapped keys: {e}"),
            })?;
            // Only what was asked for: entries for other keys are not the server's to say.
            let kid = key.public().kid();
            doc.recipients.retain(|e| e.kid == kid);
            match all.as_mut() {
                None => all = Some(doc),
                Some(a) => {
                    for e in doc.recipients {
                        a.add(e);
                    }
                }
            }
        }
        Ok(all.map(Arc::new))
    }

    /// Steps 3 and 4 for a verified order; true when a reboot is needed.
    fn follow(&self, order: &Order, st: &mut RemoteState) -> Result<bool> {
        let tuf_dir = self.cfg.state_dir.join("tuf");
        let anchor = install::trust_anchor(&self.cfg)?;
        let anchor_version = install::root_version(&anchor).unwrap_or(0);
        // The client starts from the newest root this device verified, whichever path
        // verified it: a server that hides newer roots cannot bring an older one back.
        let client_root = tern_client::MetadataDir::new(&tuf_dir).read("root", tern_core::metadata::limits::ROOT)?;
        if client_root
            .as_deref()
            .and_then(install::root_version)
            .is_none_or(|v| v < anchor_version)
        {
            std::fs::create_dir_all(&tuf_dir).map_err(Error::io(&tuf_dir))?;
            tern_client::Updater::init(&tuf_dir, &anchor)?;
        }
        let metadata_base = format!("{}/repo/metadata/", self.base());
        let targets_base = format!("{}/repo/targets/", self.base());
        let mut updater = tern_client::Updater::new(
            &tuf_dir,
            &metadata_base,
            &self.http,
            tern_client::Limits::default(),
            now(),
        )?;
        updater.refresh()?;
        // A root the client walked to is this device's trust anchor from now on, for local
        // media too (a rotation that revoked a key applies to bundles as well).
        let newest = updater.trusted().root();
        if newest.version() > anchor_version {
            tern_fs::atomic_write(
                &self.cfg.state_dir.join("root.json"),
                &newest.envelope.to_bytes(),
                0o644,
            )?;
        }
        let mut infos = Vec::new();
        for t in &order.targets {
            let info = updater.get_target(&t.name)?;
            director::match_repository(t, info.file.length, &info.file.hashes)?;
            infos.push(info);
        }
        let root = Arc::new(updater.trusted().root().envelope.to_bytes());
        let roles = Arc::new(updater.trusted().role_versions());
        // Older than what a bundle showed this device before: refused before downloading.
        crate::floors::check_and_raise(&self.cfg, &roles)?;
        // What is to be installed, with the wrapped data keys of encrypted payloads: a
        // device that is not a recipient stops here, before downloading or touching a slot.
        let mut verified = Vec::new();
        for info in &infos {
            let target = info.path.to_string();
            let manifest =
                tern_core::manifest::Manifest::from_custom(&target, info.file.custom.as_ref()).map_err(|e| {
                    Error::Unsupported {
                        target: target.clone(),
                        reason: e.to_string(),
                    }
                })?;
            let recipients = match &manifest {
                Some(m) if m.encryption.is_some() => self.recipients(&target, &info.file.hashes, m)?,
                _ => None,
            };
            let payload = tern_bundle::VerifiedPayload {
                target,
                length: info.file.length,
                hashes: info.file.hashes.clone(),
                role: info.role.clone(),
                manifest,
                recipients,
                root: root.clone(),
                roles: roles.clone(),
            };
            crate::keystore::data_key(&self.cfg, &payload)?;
            verified.push(payload);
        }
        // The order checks out: the server hears at once that the download began.
        let total = infos.iter().map(|i| i.file.length).sum();
        if self.checkin(st, Some(Progress { done: 0, total })).is_ok() {
            self.save_state(st)?;
        }
        let downloads = self.cfg.state_dir.join("downloads");
        let mut payloads = Vec::new();
        let mut last = Instant::now();
        for (info, payload) in infos.iter().zip(verified) {
            let alive = self.alive;
            let mut progress = |done: u64, total: u64| {
                alive();
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    let _ = self.checkin(st, Some(Progress { done, total }));
                }
            };
            let path = updater.download_target_progress(info, &downloads, &targets_base, &mut progress)?;
            payloads.push((payload, path));
        }
        if let Some(d) = st.deployment.as_mut() {
            d.stage = Stage::Installing;
        }
        self.save_state(st)?;
        if self.checkin(st, None).is_ok() {
            self.save_state(st)?;
        }
        let mut agent = Agent::open(self.cfg.clone())?;
        let alive = self.alive;
        let installed = agent.install_downloaded(&payloads, now(), &mut |_| alive());
        drop(agent);
        for (_, path) in &payloads {
            let _ = std::fs::remove_file(path);
        }
        let reboot_needed = match installed {
            Ok(report) => report.reboot_needed,
            // Ordered what the booted slot already holds: that is the outcome asked for.
            Err(Error::AlreadyInstalled { .. }) => false,
            Err(e) => return Err(e),
        };
        if let Some(d) = st.deployment.as_mut() {
            d.stage = if reboot_needed {
                Stage::Rebooting
            } else {
                Stage::Committed
            };
        }
        self.save_state(st)?;
        if self.checkin(st, None).is_ok() {
            self.save_state(st)?;
        }
        Ok(reboot_needed)
    }
}

/// A dropped connection or a short download: the next poll resumes from the partial file.
fn is_transient(e: &tern_client::Error) -> bool {
    match e {
        tern_client::Error::Transport(_) => true,
        tern_client::Error::Target { source, .. } => matches!(**source, tern_core::Error::LengthMismatch { .. }),
        _ => false,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    tern_core::text::error_chain(e, 2048)
}

/// The device clock.
pub fn now() -> DateTime {
    DateTime::from_unix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    )
}
