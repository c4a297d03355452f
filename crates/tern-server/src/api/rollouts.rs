//! HTTP for rollouts, the inventory (search, tags, history) and `/metrics`.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::{authorize, authorize_token, ErrorBody, Role, St, R};
use crate::fleet::{self, Refusal};

/// Rollout filter.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct RolloutQuery {
    /// Only rollouts of this status.
    status: Option<String>,
}

/// Rollouts, newest first, each with its per-phase counts.
#[utoipa::path(get, path = "/api/v1/rollouts", params(RolloutQuery), security(("token" = [])),
    responses((status = 200, body = Vec<fleet::Rollout>), (status = 401, body = ErrorBody)))]
pub(super) async fn list(
    State(state): St,
    headers: HeaderMap,
    Query(q): Query<RolloutQuery>,
) -> R<Json<Vec<fleet::Rollout>>> {
    authorize(&state, &headers, Role::Viewer, "rollout.list").await?;
    Ok(Json(fleet::rollouts(&state, q.status.as_deref()).await?))
}

/// Create a rollout (releaser): a release, a selector, phases, thresholds, a window, a
/// timeout, how it starts and whether it needs approval.
#[utoipa::path(post, path = "/api/v1/rollouts", request_body = fleet::RolloutRequest, security(("token" = [])),
    responses((status = 200, body = fleet::Rollout), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn create(State(state): St, headers: HeaderMap, body: axum::body::Bytes) -> R<Json<fleet::Rollout>> {
    let (actor, token) = authorize_token(&state, &headers, Role::Releaser, "rollout.create").await?;
    let req: fleet::RolloutRequest =
        serde_json::from_slice(&body).map_err(|e| Refusal::BadRequest(format!("rollout request: {e}")))?;
    Ok(Json(fleet::create_rollout(&state, req, &actor, &token).await?))
}

/// A rollout's status summary: each phase with its counts (no per-device read).
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", params(("id" = String, Path)), security(("token" = [])),
    responses((status = 200, body = fleet::Rollout), (status = 404, body = ErrorBody)))]
pub(super) async fn get_one(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> R<Json<fleet::Rollout>> {
    authorize(&state, &headers, Role::Viewer, "rollout.get").await?;
    fleet::rollout(&state, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Refusal::NotFound(format!("no rollout `{}`", tern_core::text::shown(&id))))
}

/// `start`, `pause`, `resume`, `cancel` (releaser) or `approve` (an admin other than the
/// creator) a rollout.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", params(("id" = String, Path), ("action" = String, Path)),
    security(("token" = [])),
    responses((status = 200, body = fleet::Rollout), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn act(
    State(state): St,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> R<Json<fleet::Rollout>> {
    let Some(a) = fleet::Action::parse(&action) else {
        return Err(Refusal::NotFound(format!(
            "no rollout action `{}` (start, pause, resume, cancel, approve)",
            tern_core::text::shown_max(&action, 32)
        )));
    };
    let need = if a == fleet::Action::Approve {
        Role::Admin
    } else {
        Role::Releaser
    };
    let (actor, token) = authorize_token(&state, &headers, need, &format!("rollout.{action}")).await?;
    Ok(Json(fleet::act(&state, &id, a, &actor, &token).await?))
}

/// The inventory: filtered by status, tag, type, hardware, installed version, agent state
/// and id text; paged by id (`after` = the previous page's `next`).
#[utoipa::path(get, path = "/api/v1/devices", params(fleet::DeviceSearch), security(("token" = [])),
    responses((status = 200, body = fleet::DevicePage), (status = 401, body = ErrorBody)))]
pub(super) async fn list_devices(
    State(state): St,
    headers: HeaderMap,
    Query(q): Query<fleet::DeviceSearch>,
) -> R<Json<fleet::DevicePage>> {
    authorize(&state, &headers, Role::Viewer, "device.list").await?;
    Ok(Json(fleet::search(&state, &q).await?))
}

/// History options.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct HistoryQuery {
    /// Most entries (default 500).
    limit: Option<i64>,
}

/// A device's history, newest first: every rollout status transition and refused order.
#[utoipa::path(get, path = "/api/v1/devices/{id}/history", params(("id" = String, Path), HistoryQuery),
    security(("token" = [])), responses((status = 200, body = Vec<fleet::HistoryEntry>)))]
pub(super) async fn device_history(
    State(state): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> R<Json<Vec<fleet::HistoryEntry>>> {
    authorize(&state, &headers, Role::Viewer, "device.history").await?;
    Ok(Json(fleet::history(&state, &id, q.limit.unwrap_or(500)).await?))
}

/// New tags for a device.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TagsRequest {
    /// Every tag the device carries from now on.
    tags: Vec<String>,
}

/// Replace a device's tags (admin).
#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", params(("id" = String, Path)), request_body = TagsRequest,
    security(("token" = [])), responses((status = 200, body = fleet::Device), (status = 404, body = ErrorBody)))]
pub(super) async fn set_tags(
    State(state): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> R<Json<fleet::Device>> {
    let actor = authorize(&state, &headers, Role::Admin, "device.tags").await?;
    let req: TagsRequest =
        serde_json::from_slice(&body).map_err(|e| Refusal::BadRequest(format!("tags request: {e}")))?;
    Ok(Json(fleet::set_tags(&state, &id, &req.tags, &actor).await?))
}

/// Prometheus metrics (viewer token: `authorization` in the scrape configuration).
#[utoipa::path(get, path = "/metrics", security(("token" = [])), responses((status = 200, content_type = "text/plain")))]
pub(super) async fn metrics(State(state): St, headers: HeaderMap) -> R<impl IntoResponse> {
    authorize(&state, &headers, Role::Viewer, "metrics.read").await?;
    let text = crate::metrics::render(&state).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}
