//! The request log: one line per request when its answer's head is ready, with the method,
//! the route's template (never the path as sent, nor its query), the status, the latency
//! and whom it was for: the device the path names and the API token's id (as the audit log
//! names it), never a token itself.
//!
//! Every request is logged at `info` under the target `tern_server::request`, but the poll:
//! the fleet's hot path (most of what a server answers) is logged at `debug`, as operators
//! of nginx keep health checks out of an access log. `RUST_LOG=tern_server::request=debug`
//! logs it too; with it off, a poll pays one check of a static flag.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The log target of request lines.
pub const TARGET: &str = "tern_server::request";

/// The poll's route template.
const POLL_ROUTE: &str = "/api/v1/devices/{id}/poll";

/// Longest device id logged (a path may be long; the id is shortened and escaped).
const MAX_ID: usize = 128;

/// Log the request `next` answers.
pub(super) async fn log_request(req: Request, next: Next) -> Response {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return next.run(req).await;
    }
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "(no route)".to_owned(), |m| m.as_str().to_owned());
    if route == POLL_ROUTE && !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        return next.run(req).await;
    }
    let device = device_of(&route, req.uri().path());
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        method = %method,
        route = %route,
        device = device.as_deref(),
        token = tracing::field::Empty,
    );
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let latency_us = started.elapsed().as_micros() as u64;
    span.in_scope(|| {
        if route == POLL_ROUTE {
            tracing::debug!(target: TARGET, status, latency_us, "answered");
        } else {
            tracing::info!(target: TARGET, status, latency_us, "answered");
        }
    });
    resp
}

/// A poll answered ahead of the router (`PollFront`), logged as the router would.
pub(super) fn polled(device: &str, status: u16) {
    if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        let device = tern_core::text::shown_max(device, MAX_ID);
        tracing::debug!(target: TARGET, method = "GET", route = POLL_ROUTE, device, status, "answered");
    }
}

/// Note the API token a request authenticated with (its id) on the request's log line.
pub(super) fn token_used(id: &str) {
    tracing::Span::current().record("token", id);
}

/// The device a device route's path names: its `{id}` segment, shortened and escaped.
fn device_of(route: &str, path: &str) -> Option<String> {
    let rest = route.strip_prefix("/api/v1/devices/{id}")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let id = path.strip_prefix("/api/v1/devices/")?.split('/').next()?;
    let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
    Some(tern_core::text::shown_max(&id, MAX_ID))
}

#[cfg(test)]
mod tests {
    use super::device_of;

    #[test]
    fn the_device_is_taken_from_device_routes_only() {
        assert_eq!(
            device_of("/api/v1/devices/{id}/checkin", "/api/v1/devices/dev-1/checkin").as_deref(),
            Some("dev-1")
        );
        assert_eq!(
            device_of("/api/v1/devices/{id}", "/api/v1/devices/a%0Ab").as_deref(),
            Some("a\\nb")
        );
        assert_eq!(device_of("/api/v1/devices/enroll", "/api/v1/devices/enroll"), None);
        assert_eq!(device_of("/api/v1/releases/{name}", "/api/v1/releases/x"), None);
    }
}
