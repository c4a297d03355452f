//! Enrollment: a device proves that it holds its key (DESIGN §6).
//!
//! 1. The device asks for a challenge (`GET /api/v1/devices/enroll/challenge`): a random
//!    value with its expiry, MACed with the session key, so any server process checks it
//!    without storing it.
//! 2. It signs an enrollment document (`tern_core::enrollment`) with its device key,
//!    covering its id, that key, its encryption key, its type, hardware and tags, the
//!    enrollment token's id and the challenge, and sends it with the fleet enrollment token
//!    (`Authorization: Bearer`) or over mutual TLS with its device certificate.
//! 3. The server checks the signature (by the key the document names), the challenge, the
//!    token and that the document names that token, the token's rate and how many devices
//!    it keeps pending, then registers the device: pending until an operator approves it,
//!    or approved at once for a certificate from the device CA.
//!
//! Nothing about a device is taken on the word of whoever holds a fleet token: without the
//! device's private key there is no document, so no encryption key of anyone else's can be
//! bound to its id. An id claimed first by someone else stays pending for the operator, who
//! sees both key ids and can reset the registration (`POST /api/v1/devices/ID/reset`).

use serde::Serialize;
use sqlx::Row;
use tern_core::enrollment::{parse_enrollment, Enrollment};
use tern_core::text::shown;

use super::{audit, claimed, device, valid_id, Device, Refusal, R};
use crate::{random_hex, unix_now, AppState};

/// How long an enrollment challenge is accepted.
const CHALLENGE_TTL_SECS: i64 = 300;
const CHALLENGE_CONTEXT: &[u8] = b"tern-enroll-challenge-v1";

/// A fresh enrollment challenge.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EnrollmentChallenge {
    /// Put this in the enrollment document's `challenge`.
    pub challenge: String,
    /// Until when it is accepted (Unix seconds).
    pub expires: i64,
}

fn challenge_message(expiry: i64, random: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(CHALLENGE_CONTEXT);
    m.push(0);
    m.extend_from_slice(expiry.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(random.as_bytes());
    m
}

/// Issue a challenge (no state is kept: the MAC is the record).
pub fn enrollment_challenge(state: &AppState) -> EnrollmentChallenge {
    let expires = unix_now() + CHALLENGE_TTL_SECS;
    let random = random_hex(16);
    let mac = aws_lc_rs::hmac::sign(&state.session_key, &challenge_message(expires, &random));
    EnrollmentChallenge {
        challenge: format!("v1.{expires}.{random}.{}", hex::encode(mac.as_ref())),
        expires,
    }
}

fn check_challenge(state: &AppState, challenge: &str) -> R<()> {
    let bad = || Refusal::Unauthorized("the enrollment challenge is not one this server issued".into());
    let mut parts = challenge.split('.');
    let (Some("v1"), Some(expiry), Some(random), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let expiry: i64 = expiry.parse().map_err(|_| bad())?;
    let mac = hex::decode(mac).map_err(|_| bad())?;
    aws_lc_rs::hmac::verify(&state.session_key, &challenge_message(expiry, random), &mac).map_err(|_| bad())?;
    if expiry <= unix_now() {
        return Err(Refusal::Unauthorized(
            "the enrollment challenge has expired; ask for a new one".into(),
        ));
    }
    Ok(())
}

/// Enroll a device from its signed enrollment document, presented with a fleet enrollment
/// token (`token`) or over mutual TLS with a device certificate (`peer`).
pub async fn enroll(
    state: &AppState,
    body: &[u8],
    token: Option<&str>,
    peer: Option<std::sync::Arc<Vec<u8>>>,
) -> R<Device> {
    // Audited under the id the document claims, verified or not: an operator looking at
    // refusals wants to see which id someone tried to take.
    let mut who = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/signed/device_id").and_then(|d| d.as_str()).map(claimed))
        .unwrap_or_else(|| "device:?".to_owned());
    let outcome = enroll_inner(state, body, token, peer, &mut who).await;
    match &outcome {
        Err(e) => state.audit_refusal(&who, "device.enroll", &who, &e.to_string()).await,
        Ok(_) => audit(state, &who, "device.enroll", &who, &outcome).await,
    }
    outcome
}

/// How a device is vouched for.
enum Voucher {
    /// A fleet enrollment token (its id): pending until approved.
    Token(String),
    /// A device certificate from the device CA: approved at once.
    Certificate,
}

async fn enroll_inner(
    state: &AppState,
    body: &[u8],
    token: Option<&str>,
    peer: Option<std::sync::Arc<Vec<u8>>>,
    who: &mut String,
) -> R<Device> {
    let (doc, key) = parse_enrollment(body).map_err(|e| Refusal::BadRequest(format!("enrollment document: {e}")))?;
    *who = claimed(&doc.device_id);
    check_fields(&doc)?;
    check_challenge(state, &doc.challenge)?;
    let voucher = vouch(state, &doc, &key, token, peer).await?;
    let encryption_key = match &doc.encryption_key {
        Some(v) => Some(
            tern_core::keywrap::RecipientKey::from_value(v)
                .map_err(|e| Refusal::BadRequest(format!("encryption_key: {e}")))?
                .to_value()
                .to_string(),
        ),
        None => None,
    };
    // Twice at most: an insert that loses a race to another enrollment of the same id
    // compares with what won.
    for _ in 0..2 {
        if let Some(existing) = device(state, &doc.device_id).await? {
            // A certificate from the device CA outranks a claim made with a fleet token
            // that no operator approved yet: the claim goes.
            let claimed_by_another = existing.keyid != key.keyid().as_str() && existing.status == "pending";
            if matches!(voucher, Voucher::Certificate) && claimed_by_another {
                sqlx::query("DELETE FROM devices WHERE id = $1 AND keyid = $2 AND status = 'pending'")
                    .bind(&doc.device_id)
                    .bind(&existing.keyid)
                    .execute(&state.db.write)
                    .await?;
                sqlx::query(
                    "DELETE FROM device_tags WHERE device_id = $1 AND NOT EXISTS (SELECT 1 FROM devices WHERE id = $1)",
                )
                .bind(&doc.device_id)
                .execute(&state.db.write)
                .await?;
                continue;
            }
            return again(state, &doc, &key, existing, encryption_key).await;
        }
        if let Voucher::Token(token_id) = &voucher {
            let pending: i64 =
                sqlx::query("SELECT COUNT(*) FROM devices WHERE enrollment_token = $1 AND status = 'pending'")
                    .bind(token_id)
                    .fetch_one(&state.db.pool)
                    .await?
                    .try_get(0)?;
            if pending >= state.cfg.max_pending_per_token as i64 {
                return Err(Refusal::TooMany(format!(
                    "enrollment token {token_id} already has {pending} devices waiting for approval \
                     (max_pending_per_token); approve, reject or reset some first"
                )));
            }
        }
        if insert(state, &doc, &key, &voucher, encryption_key.as_deref()).await? {
            if matches!(voucher, Voucher::Certificate) {
                crate::session::device_changed(state, &doc.device_id).await?;
            }
            // A pending device is not the polls' concern: it has no session to poll with.
            return device(state, &doc.device_id)
                .await?
                .ok_or_else(|| Refusal::NotFound("device vanished".into()));
        }
    }
    Err(Refusal::Conflict(format!(
        "device `{}` is being enrolled by another request; try again",
        doc.device_id
    )))
}

fn check_fields(doc: &Enrollment) -> R<()> {
    valid_id("device id", &doc.device_id)?;
    for t in &doc.tags {
        valid_id("tag", t)?;
    }
    valid_id("device type", &doc.device_type)?;
    if doc.hardware.len() > 128 || doc.hardware.chars().any(char::is_control) || doc.tags.len() > 64 {
        return Err(Refusal::BadRequest(
            "hardware must be at most 128 printable characters, and tags at most 64".into(),
        ));
    }
    Ok(())
}

/// Who vouches for the device: the token the document names, or its certificate.
async fn vouch(
    state: &AppState,
    doc: &Enrollment,
    key: &tern_core::PublicKey,
    token: Option<&str>,
    peer: Option<std::sync::Arc<Vec<u8>>>,
) -> R<Voucher> {
    match (token, peer) {
        (Some(token), _) => {
            let Some((token_id, _)) = state.db.check_token("enrollment", token).await? else {
                return Err(Refusal::Unauthorized("the enrollment token is not valid".into()));
            };
            if doc.token_id.as_deref() != Some(token_id.as_str()) {
                return Err(Refusal::Unauthorized(format!(
                    "the enrollment document names token {}, not the token presented ({token_id})",
                    shown(doc.token_id.as_deref().unwrap_or("none"))
                )));
            }
            state.enrollment_rate(&token_id)?;
            Ok(Voucher::Token(token_id))
        }
        (None, Some(cert)) => {
            let (cn, cert_key) = crate::tls::device_identity(&cert).map_err(Refusal::BadRequest)?;
            if cn != doc.device_id {
                return Err(Refusal::Unauthorized(format!(
                    "the device certificate is for `{}`, not `{}`",
                    shown(&cn),
                    doc.device_id
                )));
            }
            let raw = doc
                .public_key
                .pointer("/keyval/public")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if key.keytype() != "ed25519" || hex::decode(raw).ok().as_deref() != Some(cert_key.as_slice()) {
                return Err(Refusal::Unauthorized(
                    "the device certificate's key is not the device key (certificate enrollment needs an ed25519 device key)"
                        .into(),
                ));
            }
            Ok(Voucher::Certificate)
        }
        (None, None) => Err(Refusal::Unauthorized(
            "no enrollment token, and no device certificate over mutual TLS".into(),
        )),
    }
}

/// Insert the registration; false when the id exists already (a race).
async fn insert(
    state: &AppState,
    doc: &Enrollment,
    key: &tern_core::PublicKey,
    voucher: &Voucher,
    encryption_key: Option<&str>,
) -> R<bool> {
    let (status, via, token_id) = match voucher {
        Voucher::Token(id) => ("pending", "token", Some(id.as_str())),
        Voucher::Certificate => ("approved", "certificate", None),
    };
    let now = unix_now();
    let mut tx = state.db.write.begin().await?;
    let done = sqlx::query(
        "INSERT INTO devices (id, public_key, keyid, device_type, hardware, tags, status, enrolled_via, created_at, updated_at,
                              encryption_key, enrollment_token, challenge, bucket)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12, $13) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&doc.device_id)
    .bind(doc.public_key.to_string())
    .bind(key.keyid().as_str())
    .bind(&doc.device_type)
    .bind(&doc.hardware)
    .bind(serde_json::to_string(&doc.tags).unwrap_or_default())
    .bind(status)
    .bind(via)
    .bind(now)
    .bind(encryption_key)
    .bind(token_id)
    .bind(random_hex(16))
    .bind(i64::from(super::policy::bucket(&doc.device_id)))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    for t in &doc.tags {
        sqlx::query("INSERT INTO device_tags (device_id, tag) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(&doc.device_id)
            .bind(t)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// A device enrolling again: the same key is the same device (its encryption key may be
/// added now, since the document proves it is the device's); another key is refused.
async fn again(
    state: &AppState,
    doc: &Enrollment,
    key: &tern_core::PublicKey,
    existing: Device,
    encryption_key: Option<String>,
) -> R<Device> {
    let id = &doc.device_id;
    if existing.keyid != key.keyid().as_str() {
        return Err(Refusal::Conflict(format!(
            "device `{id}` is enrolled with another key ({}, {}); if that registration is not this \
             device's, an administrator can reset it while it is pending or rejected (`tern device reset {id}`)",
            existing.keyid, existing.status
        )));
    }
    let have = existing.encryption_key.as_ref().map(|v| v.to_string());
    match (have, encryption_key) {
        (Some(h), Some(e)) if h != e => Err(Refusal::Conflict(format!(
            "device `{id}` is enrolled with another encryption key"
        ))),
        (None, Some(e)) if existing.status != "decommissioned" => {
            // Signed by the enrolled device key: the device's own encryption key.
            let done = sqlx::query(
                "UPDATE devices SET encryption_key = $1, updated_at = $2
                 WHERE id = $3 AND keyid = $4 AND encryption_key IS NULL AND status <> 'decommissioned'",
            )
            .bind(e)
            .bind(unix_now())
            .bind(id)
            .bind(&existing.keyid)
            .execute(&state.db.write)
            .await?;
            if done.rows_affected() != 1 {
                return Err(Refusal::Conflict(format!(
                    "device `{id}` changed while enrolling; try again"
                )));
            }
            device(state, id)
                .await?
                .ok_or_else(|| Refusal::NotFound("device vanished".into()))
        }
        _ => Ok(existing),
    }
}
