//! The poll: the fleet's hot path, answered from memory.
//!
//! Every device polls every few seconds, so the poll is most of what a server answers.
//! [`PollFront`] answers it before the router: the listener hands it each request first,
//! and it takes a `GET` of `/api/v1/devices/{id}/poll` whose id needs no decoding. It makes
//! the same checks as the router's handler ([`answer`] is shared) and sends one of two
//! answers serialised at start, so a poll costs no routing, no path extraction and no JSON
//! encoding. Anything else (another method, an escaped id) goes to the router, whose
//! handler answers it the same way.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::{ErrorBody, St, R};
use crate::fleet::Refusal;
use crate::AppState;

/// The answer to a poll.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PollResponse {
    /// Seconds until the next poll.
    pub poll_interval_secs: u64,
    /// Whether the device must send a signed check-in now (an order is waiting for it).
    pub checkin: bool,
}

/// Whether `device` must check in now: its session token checked, the poll counted and
/// its time noted.
fn answer(state: &AppState, device: &str, authorization: Option<&HeaderValue>) -> Result<bool, Refusal> {
    let token = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Refusal::Unauthorized("no session token: send a signed check-in".into()))?;
    crate::session::check(&state.session_key, token, device, crate::unix_now())
        .map_err(|e| Refusal::Unauthorized(format!("{e}: send a signed check-in")))?;
    state.metrics.poll();
    match state.fleet.poll(device) {
        crate::session::PollAnswer::Blocked => Err(Refusal::Forbidden(format!("device `{device}` is not approved"))),
        crate::session::PollAnswer::CheckIn => Ok(true),
        crate::session::PollAnswer::Nothing => Ok(false),
    }
}

/// A poll with the session token from the last signed check-in: answered from memory.
#[utoipa::path(get, path = "/api/v1/devices/{id}/poll", params(("id" = String, Path)), security(("session" = [])),
    responses((status = 200, body = PollResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn poll(State(state): St, Path(id): Path<String>, headers: HeaderMap) -> R<Json<PollResponse>> {
    let checkin = answer(&state, &id, headers.get(header::AUTHORIZATION))?;
    Ok(Json(PollResponse {
        poll_interval_secs: state.cfg.poll_interval_secs,
        checkin,
    }))
}

/// Answers polls ahead of the router.
pub struct PollFront {
    state: Arc<AppState>,
    /// The two answers, serialised once.
    nothing: bytes::Bytes,
    check_in: bytes::Bytes,
}

impl PollFront {
    /// The front of `state`'s router.
    pub fn new(state: Arc<AppState>) -> Self {
        let body = |checkin| {
            let answer = PollResponse {
                poll_interval_secs: state.cfg.poll_interval_secs,
                checkin,
            };
            bytes::Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
        };
        let (nothing, check_in) = (body(false), body(true));
        PollFront {
            state,
            nothing,
            check_in,
        }
    }

    /// The answer to `req` if it is a poll this front takes; `None` sends it to the router.
    pub fn answer<B>(&self, req: &Request<B>) -> Option<Response> {
        if req.method() != Method::GET {
            return None;
        }
        let id = poll_device(req.uri().path())?;
        let resp = match answer(&self.state, id, req.headers().get(header::AUTHORIZATION)) {
            Ok(checkin) => {
                let body = if checkin { &self.check_in } else { &self.nothing };
                let mut resp = Response::new(Body::from(body.clone()));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                resp
            }
            Err(refusal) => refusal.into_response(),
        };
        super::access::polled(id, resp.status().as_u16());
        Some(resp)
    }
}

/// The device id of a poll's path, if it is one segment that needs no decoding (the
/// router decodes the others).
fn poll_device(path: &str) -> Option<&str> {
    let id = path.strip_prefix("/api/v1/devices/")?.strip_suffix("/poll")?;
    let plain = !id.is_empty() && !id.bytes().any(|b| b == b'/' || b == b'%');
    plain.then_some(id)
}

#[cfg(test)]
mod tests {
    use super::poll_device;

    #[test]
    fn only_plain_poll_paths_are_taken() {
        assert_eq!(poll_device("/api/v1/devices/dev-1/poll"), Some("dev-1"));
        for path in [
            "/api/v1/devices//poll",
            "/api/v1/devices/a/b/poll",
            "/api/v1/devices/d%2Dx/poll",
            "/api/v1/devices/dev-1/poll/",
            "/api/v1/devices/dev-1/challenge",
            "/api/v1/devices/poll",
        ] {
            assert_eq!(poll_device(path), None, "{path}");
        }
    }
}
