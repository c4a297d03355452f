//! HTTP: the management API (`/api/v1`, bearer tokens with roles), the device endpoints
//! (enrollment, signed check-ins), the published repository (`/repo`) and the director root.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

mod access;
mod poll;
mod rollouts;

pub use access::TARGET as REQUEST_LOG_TARGET;
pub use poll::{PollFront, PollResponse};

use crate::fleet::{self, Refusal};
use crate::{random_hex, recipients, repo, AppState};

type St = State<Arc<AppState>>;

/// The error body every refusal carries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// See [`ErrorBody`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// BadRequest, Unauthorized, Forbidden, NotFound, Conflict, StaleChallenge, TooMany or Internal.
    pub kind: String,
    /// The reason, naming what was wrong.
    pub message: String,
}

/// Longest error message sent (it may quote what the request said).
const MAX_MESSAGE: usize = 1024;

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            Refusal::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest"),
            Refusal::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "Unauthorized"),
            Refusal::Forbidden(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            Refusal::NotFound(_) => (StatusCode::NOT_FOUND, "NotFound"),
            Refusal::Conflict(_) => (StatusCode::CONFLICT, "Conflict"),
            Refusal::StaleChallenge(_) => (StatusCode::CONFLICT, "StaleChallenge"),
            Refusal::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "TooMany"),
            Refusal::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        };
        // The error boundary: internal detail (a database's message) goes to the log with
        // an id, the client gets the id; everything else is shortened and escaped.
        let message = match &self {
            Refusal::Internal(e) => {
                let id = random_hex(6);
                tracing::error!(
                    error_id = %id,
                    "internal error: {}",
                    tern_core::text::shown_max(&e.to_string(), 4096)
                );
                format!("internal error {id}; the server's log has the details")
            }
            other => tern_core::text::shown_max(&other.to_string(), MAX_MESSAGE),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                kind: kind.into(),
                message,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        }
        resp
    }
}

type R<T> = std::result::Result<T, Refusal>;

/// Management roles, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads everything but the audit log.
    Viewer,
    /// Also uploads releases and manages deployments.
    Releaser,
    /// Everything: devices, tokens, the audit log.
    Admin,
}

impl Role {
    /// Parse a role name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "releaser" => Some(Role::Releaser),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Check the bearer token for at least `need`; refusals are audited.
async fn authorize(state: &AppState, headers: &HeaderMap, need: Role, action: &str) -> R<String> {
    Ok(authorize_token(state, headers, need, action).await?.0)
}

/// [`authorize`], with the token's id beside the audit actor.
async fn authorize_token(state: &AppState, headers: &HeaderMap, need: Role, action: &str) -> R<(String, String)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let refuse = |r: Refusal, actor: String, token: Option<String>| async move {
        let caller = match &token {
            Some(id) => crate::Caller::Token(id),
            None => crate::Caller::Unauthenticated,
        };
        state
            .audit_refusal_of(caller, &actor, action, "api", &r.to_string())
            .await;
        Err(r)
    };
    let Some(token) = presented else {
        return refuse(
            Refusal::Unauthorized("no API token (send `Authorization: Bearer TOKEN`)".into()),
            "anonymous".into(),
            None,
        )
        .await;
    };
    let Some((id, role_name)) = state.db.check_token("api", token).await.map_err(Refusal::Internal)? else {
        return refuse(
            Refusal::Unauthorized("the API token is not valid".into()),
            "anonymous".into(),
            None,
        )
        .await;
    };
    access::token_used(&id);
    let actor = format!("token:{id} ({role_name})");
    let role = Role::parse(&role_name).unwrap_or(Role::Viewer);
    if role < need {
        return refuse(
            Refusal::Forbidden(format!("{action} needs the {need:?} role; this token is {role_name}").to_lowercase()),
            actor,
            Some(id),
        )
        .await;
    }
    Ok((actor, id))
}

/// The router: every route but two runs under the request timeout (its body read
/// included). The bundle upload has a minimum rate instead; the poll, the fleet's hot
/// path, needs neither: it reads no body and its handler never waits (a session check and
/// a look at memory), so the timeout's task and timers would be all its cost. It alone is
/// handled on the connection's request worker; every other handler runs on the check-in
/// workers (`lanes`), not beside the polls.
pub fn router(state: Arc<AppState>) -> Router {
    let bounded = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/openapi.json", get(openapi))
        .route("/director/root.json", get(director_root))
        .route("/repo/metadata/{file}", get(repo_metadata))
        .route("/repo/targets/{*path}", get(repo_target))
        .route("/repo/recipients/{sha256}/{kid}", get(repo_recipients))
        .route(
            "/api/v1/recipients",
            post(add_recipients).layer(DefaultBodyLimit::max(recipients::MAX_DOCUMENT)),
        )
        .route("/api/v1/devices/enroll/challenge", get(enrollment_challenge))
        .route("/api/v1/devices/{id}/challenge", get(device_challenge))
        .route("/api/v1/devices", get(rollouts::list_devices))
        .route("/api/v1/devices/{id}", get(get_device))
        .route("/api/v1/devices/{id}/history", get(rollouts::device_history))
        .route("/api/v1/devices/{id}/tags", axum::routing::put(rollouts::set_tags))
        .route("/api/v1/devices/{id}/reset", post(reset_device))
        .route("/api/v1/devices/{id}/{action}", post(device_action))
        .route("/api/v1/releases", get(list_releases))
        .route("/api/v1/releases/{name}", get(get_release))
        .route("/api/v1/repository/root", post(set_root))
        .route("/api/v1/deployments", get(list_deployments).post(create_deployment))
        .route("/api/v1/deployments/{id}", get(get_deployment))
        .route("/api/v1/deployments/{id}/cancel", post(cancel_deployment))
        .route(
            "/api/v1/deployments/{id}/devices/{device}/abandon",
            post(abandon_device),
        )
        .route("/api/v1/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/api/v1/rollouts/{id}", get(rollouts::get_one))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route("/metrics", get(rollouts::metrics))
        .route("/api/v1/enrollment-tokens", post(create_enrollment_token))
        .route("/api/v1/audit", get(audit_log))
        .route(
            "/api/v1/devices/enroll",
            post(enroll).layer(DefaultBodyLimit::max(tern_core::enrollment::MAX_ENROLLMENT_BYTES)),
        )
        .route(
            "/api/v1/devices/{id}/checkin",
            post(checkin).layer(DefaultBodyLimit::max(tern_core::director::MAX_CHECKIN_BYTES)),
        )
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_timeout));
    let upload = Router::new().route(
        "/api/v1/releases",
        post(upload_release)
            .layer(DefaultBodyLimit::disable())
            .layer(axum::middleware::from_fn(off_the_workers)),
    );
    let direct = Router::new().route("/api/v1/devices/{id}/poll", get(poll::poll));
    bounded
        .merge(upload)
        .merge(direct)
        .layer(axum::middleware::from_fn(access::log_request))
        .with_state(state)
}

/// A request body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl axum::body::HttpBody for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        if self.deadline.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(axum::Error::new("the request's body did not arrive in time"))));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request not answered within `request_timeout_secs` (its body read included) gets 408.
/// The handler runs as a task of its own, so that neither the timeout nor a client that
/// goes away can stop it between a change and its audit entry: what it started, it ends;
/// its body, though, fails at the deadline, so a trickling client holds nothing after it.
/// The task runs off the request workers (`lanes`), so that no handler's work holds up the
/// polls of the connections sharing its worker.
async fn request_timeout(State(state): St, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let limit = std::time::Duration::from_secs(state.cfg.request_timeout_secs.clamp(1, 86_400));
    // The body's own deadline comes a moment after the answer's, so that the client gets
    // the 408 and the handler, left reading, stops.
    let req = req.map(|inner| {
        Body::new(DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit + std::time::Duration::from_secs(1))),
        })
    });
    match tokio::time::timeout(limit, crate::lanes::spawn(next.run(req))).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => Refusal::Internal(crate::Error::Refused(format!("request handler failed: {e}"))).into_response(),
        Err(_) => {
            let body = ErrorBody {
                error: ErrorDetail {
                    kind: "Timeout".into(),
                    message: format!("the request was not received and answered within {} s", limit.as_secs()),
                },
            };
            (StatusCode::REQUEST_TIMEOUT, Json(body)).into_response()
        }
    }
}

/// An upload's handler (bounded by its own rules, not the request timeout) runs off the
/// request workers too: storing a release's blobs renames, links and syncs files.
async fn off_the_workers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match crate::lanes::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => Refusal::Internal(crate::Error::Refused(format!("request handler failed: {e}"))).into_response(),
    }
}

/// The OpenAPI document, serialised once per process (it is the same for every request).
async fn openapi() -> impl IntoResponse {
    static DOCUMENT: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    let document = DOCUMENT.get_or_init(|| serde_json::to_vec(&openapi_document()).unwrap_or_default().into());
    ([(header::CONTENT_TYPE, "application/json")], document.clone())
}

async fn director_root(State(state): St) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.keys.director_root.clone(),
    )
}

fn etag_of(hash: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{hash}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == etag.as_bytes())
    })
}

/// `/repo/metadata/N.ROLE.json` or `/repo/metadata/timestamp.json` (and `ROLE.json`: current).
#[utoipa::path(get, path = "/repo/metadata/{file}", params(("file" = String, Path)), responses((status = 200), (status = 404)))]
async fn repo_metadata(State(state): St, Path(file): Path<String>, headers: HeaderMap) -> R<Response> {
    let decoded = percent_encoding::percent_decode_str(&file)
        .decode_utf8_lossy()
        .into_owned();
    let stem = decoded
        .strip_suffix(".json")
        .ok_or_else(|| Refusal::NotFound(format!("no metadata `{file}`")))?;
    let (role, version) = match stem.split_once('.') {
        Some((v, role)) if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() => (
            role.to_owned(),
            Some(
                v.parse::<i64>()
                    .map_err(|_| Refusal::NotFound(format!("no metadata `{file}`")))?,
            ),
        ),
        _ => (stem.to_owned(), None),
    };
    let body = repo::metadata(&state, &role, version)
        .await
        .map_err(Refusal::Internal)?
        .ok_or_else(|| Refusal::NotFound(format!("no metadata `{decoded}`")))?;
    let etag = etag_of(&tern_core::digest::sha256_hex(&body));
    if not_modified(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let cache = if version.is_some() {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ],
        body,
    )
        .into_response())
}

/// The wrapped data keys of the encrypted payload `sha256` for the key `kid` (what a
/// device fetches before downloading it); 404 when there are none.
#[utoipa::path(get, path = "/repo/recipients/{sha256}/{kid}", params(("sha256" = String, Path), ("kid" = String, Path)),
    responses((status = 200), (status = 404, body = ErrorBody)))]
async fn repo_recipients(State(state): St, Path((sha256, kid)): Path<(String, String)>) -> R<Response> {
    let body = recipients::for_key(&state, &sha256, &kid)
        .await
        .map_err(Refusal::Internal)?
        .ok_or_else(|| Refusal::NotFound(format!("no wrapped key for key {kid} of payload {sha256}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response())
}

/// Add recipients to a published encrypted payload: a `tern-recipients` document whose
/// key commitment is the one the payload's signed manifest carries. Nothing is re-signed.
#[utoipa::path(post, path = "/api/v1/recipients", security(("token" = [])),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, body = recipients::Added), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn add_recipients(State(state): St, headers: HeaderMap, body: Body) -> R<Json<recipients::Added>> {
    // Authorised before a byte of the body is read.
    let actor = authorize(&state, &headers, Role::Releaser, "recipients.add").await?;
    let body = axum::body::to_bytes(body, recipients::MAX_DOCUMENT)
        .await
        .map_err(|_| {
            Refusal::BadRequest(format!(
                "the recipients document exceeds {} bytes or was cut off",
                recipients::MAX_DOCUMENT
            ))
        })?;
    Ok(Json(
        recipients::add(&state, &body, &actor).await.map_err(Refusal::from)?,
    ))
}

/// A target by its consistent-snapshot name, with Range and ETag.
#[utoipa::path(get, path = "/repo/targets/{path}", params(("path" = String, Path)), responses((status = 200), (status = 206), (status = 404), (status = 416)))]
async fn repo_target(State(state): St, Path(path): Path<String>, headers: HeaderMap) -> R<Response> {
    let not_found = || Refusal::NotFound(format!("no target `{path}`"));
    let (file, hash) = repo::target_blob(&state.cfg.artifact_dir(), &path).ok_or_else(not_found)?;
    let mut f = tokio::fs::File::open(&file).await.map_err(|_| not_found())?;
    let len = f.metadata().await.map_err(|_| not_found())?.len();
    let etag = etag_of(&hash.to_ascii_lowercase());
    if not_modified(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(r) => match tern_core::range::parse_range(r, len) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response())
            }
        },
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    f.seek(std::io::SeekFrom::Start(start)).await.map_err(|_| not_found())?;
    let stream = tokio_util::io::ReaderStream::with_capacity(f.take(count), 256 * 1024);
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, etag);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

/// A challenge for an enrollment document (valid five minutes).
#[utoipa::path(get, path = "/api/v1/devices/enroll/challenge", responses((status = 200, body = fleet::EnrollmentChallenge)))]
async fn enrollment_challenge(State(state): St) -> Json<fleet::EnrollmentChallenge> {
    Json(fleet::enrollment_challenge(&state))
}

/// Enroll a device with its enrollment document (`tern_core::enrollment`, signed by the
/// device key it names): with a fleet enrollment token (`Authorization: Bearer`) it then
/// waits for approval; with a device certificate (mutual TLS) from the configured device CA
/// it is approved at once.
#[utoipa::path(post, path = "/api/v1/devices/enroll", request_body(content = Object, content_type = "application/json"),
    responses((status = 200, body = fleet::Device), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn enroll(
    State(state): St,
    headers: HeaderMap,
    peer: Option<axum::Extension<crate::tls::PeerCert>>,
    body: axum::body::Bytes,
) -> R<Json<fleet::Device>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cert = peer.and_then(|axum::Extension(p)| p.0);
    Ok(Json(fleet::enroll(&state, &body, token, cert).await?))
}

/// What a device's next check-in must answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChallengeResponse {
    /// The challenge.
    pub challenge: String,
}

/// The challenge a device's next check-in must carry (for a device that lost its last
/// answer); not secret, since only the device's key can sign a check-in.
#[utoipa::path(get, path = "/api/v1/devices/{id}/challenge", params(("id" = String, Path)),
    responses((status = 200, body = ChallengeResponse), (status = 404, body = ErrorBody)))]
async fn device_challenge(State(state): St, Path(id): Path<String>) -> R<Json<ChallengeResponse>> {
    Ok(Json(ChallengeResponse {
        challenge: fleet::challenge(&state, &id).await?,
    }))
}

/// A signed check-in (`tern_core::director::CheckIn` in a TUF envelope).
#[utoipa::path(post, path = "/api/v1/devices/{id}/checkin", params(("id" = String, Path)),
    responses((status = 200, body = fleet::CheckinResponse), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn checkin(State(state): St, Path(id): Path<String>, body: axum::body::Bytes) -> R<Json<fleet::CheckinResponse>> {
    let answer = fleet::checkin(&state, &id, &body).await;
    state.metrics.checkin(answer.is_ok());
    Ok(Json(answer?))
}

/// One device.
#[utoipa::path(get, path = "/api/v1/devices/{id}", params(("id" = String, Path)), security(("token" = [])),
    responses((status = 200, body = fleet::Device), (status = 404, body = ErrorBody)))]
async fn get_device(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> R<Json<fleet::Device>> {
    authorize(&state, &headers, Role::Viewer, "device.get").await?;
    fleet::device(&state, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Refusal::NotFound(format!("no device `{id}`")))
}

/// `approve`, `reject` or `decommission` a device (admin).
#[utoipa::path(post, path = "/api/v1/devices/{id}/{action}", params(("id" = String, Path), ("action" = String, Path), DeviceActionQuery),
    security(("token" = [])), responses((status = 200, body = fleet::Device), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn device_action(
    State(state): St,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<DeviceActionQuery>,
) -> R<Json<fleet::Device>> {
    let to = match action.as_str() {
        "approve" => "approved",
        "reject" => "rejected",
        "decommission" => "decommissioned",
        _ => return Err(Refusal::NotFound(format!("no device action `{action}`"))),
    };
    let actor = authorize(&state, &headers, Role::Admin, &format!("device.{action}")).await?;
    Ok(Json(
        fleet::set_device_status(&state, &id, to, q.keyid.as_deref(), &actor).await?,
    ))
}

/// Device action options.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct DeviceActionQuery {
    /// Act only if the registration has this key id (what the operator compared with the
    /// device's own `tern device key export`).
    keyid: Option<String>,
}

/// Forget a pending or rejected registration so that the id can enroll again (admin).
#[utoipa::path(post, path = "/api/v1/devices/{id}/reset", params(("id" = String, Path)),
    security(("token" = [])), responses((status = 200), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn reset_device(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> R<Json<serde_json::Value>> {
    let actor = authorize(&state, &headers, Role::Admin, "device.reset").await?;
    fleet::reset_device(&state, &id, &actor).await?;
    Ok(Json(serde_json::json!({"id": id, "reset": true})))
}

/// Releases.
#[utoipa::path(get, path = "/api/v1/releases", security(("token" = [])), responses((status = 200, body = Vec<repo::Release>)))]
async fn list_releases(State(state): St, headers: HeaderMap) -> R<Json<Vec<repo::Release>>> {
    authorize(&state, &headers, Role::Viewer, "release.list").await?;
    Ok(Json(repo::releases(&state).await.map_err(Refusal::Internal)?))
}

/// One release.
#[utoipa::path(get, path = "/api/v1/releases/{name}", params(("name" = String, Path)), security(("token" = [])),
    responses((status = 200, body = repo::Release), (status = 404, body = ErrorBody)))]
async fn get_release(State(state): St, headers: HeaderMap, Path(name): Path<String>) -> R<Json<repo::Release>> {
    authorize(&state, &headers, Role::Viewer, "release.get").await?;
    repo::release(&state, &name)
        .await
        .map_err(Refusal::Internal)?
        .map(Json)
        .ok_or_else(|| Refusal::NotFound(format!("no release `{name}`")))
}

/// Upload options.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct UploadQuery {
    /// The release's name (default: the payloads' manifest version).
    name: Option<String>,
}

/// Seconds an upload may run below the minimum rate at its start.
const UPLOAD_GRACE_SECS: f64 = 10.0;

/// Upload a release bundle (the request body, `application/octet-stream`). It is verified
/// against the repository's root and delegations, its payloads stored, its metadata
/// published with a new snapshot and timestamp.
#[utoipa::path(post, path = "/api/v1/releases", params(UploadQuery), security(("token" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = repo::Release), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn upload_release(
    State(state): St,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> R<Json<repo::Release>> {
    let actor = authorize(&state, &headers, Role::Releaser, "release.upload").await?;
    let upload_started = std::time::Instant::now();
    let dir = state.cfg.artifact_dir().join("uploads");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| Refusal::Internal(crate::Error::Io(dir.display().to_string(), e)))?;
    let path = dir.join(format!("{}.tern", random_hex(12)));
    let received = async {
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Refusal::Internal(crate::Error::Io(path.display().to_string(), e)))?;
        let mut stream = body.into_data_stream();
        let mut total = 0u64;
        let started = tokio::time::Instant::now();
        let stall = std::time::Duration::from_secs(state.cfg.request_timeout_secs.max(1));
        let min_rate = state.cfg.min_upload_bytes_per_sec;
        loop {
            // No chunk for the request timeout, or slower than the minimum rate on average
            // after a grace period, ends the upload: a trickle cannot hold the connection.
            let next = tokio::time::timeout(stall, stream.next())
                .await
                .map_err(|_| Refusal::BadRequest(format!("upload stalled: no data for {} s", stall.as_secs())))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| Refusal::BadRequest(format!("upload interrupted: {e}")))?;
            total += chunk.len() as u64;
            let elapsed = started.elapsed().as_secs_f64();
            if elapsed > UPLOAD_GRACE_SECS && (total as f64) < elapsed * min_rate as f64 {
                return Err(Refusal::BadRequest(format!(
                    "upload slower than {min_rate} bytes/s (min_upload_bytes_per_sec)"
                )));
            }
            if total > state.cfg.max_upload_bytes {
                return Err(Refusal::BadRequest(format!(
                    "the bundle exceeds the {}-byte upload limit",
                    state.cfg.max_upload_bytes
                )));
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| Refusal::Internal(crate::Error::Io(path.display().to_string(), e)))?;
        }
        out.flush()
            .await
            .map_err(|e| Refusal::Internal(crate::Error::Io(path.display().to_string(), e)))?;
        Ok(())
    }
    .await;
    // Refusals while receiving are audited here; repo::upload audits its own.
    let result = match received {
        Ok(()) => repo::upload(&state, &path, q.name.as_deref(), &actor)
            .await
            .map_err(Refusal::from),
        Err(e) => {
            let _ = state
                .db
                .audit(&actor, "release.upload", "release:?", "refused", &e.to_string())
                .await;
            Err(e)
        }
    };
    let _ = tokio::fs::remove_file(&path).await;
    state.metrics.upload(upload_started.elapsed());
    Ok(Json(result?))
}

/// Install the repository's first root (admin). Newer roots arrive in bundles.
#[utoipa::path(post, path = "/api/v1/repository/root", security(("token" = [])),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200), (status = 409, body = ErrorBody)))]
async fn set_root(State(state): St, headers: HeaderMap, body: axum::body::Bytes) -> R<Json<serde_json::Value>> {
    let actor = authorize(&state, &headers, Role::Admin, "repository.set-root").await?;
    let v = repo::set_root(&state, &body, &actor).await.map_err(|e| match e {
        crate::Error::Core(c) => Refusal::BadRequest(format!("root: {c}")),
        other => Refusal::from(other),
    })?;
    Ok(Json(serde_json::json!({"root_version": v})))
}

/// Deployments, newest first.
#[utoipa::path(get, path = "/api/v1/deployments", security(("token" = [])), responses((status = 200, body = Vec<fleet::Deployment>)))]
async fn list_deployments(State(state): St, headers: HeaderMap) -> R<Json<Vec<fleet::Deployment>>> {
    authorize(&state, &headers, Role::Viewer, "deployment.list").await?;
    Ok(Json(fleet::deployments(&state).await?))
}

/// Deploy a release to one device, a tag or a device type.
#[utoipa::path(post, path = "/api/v1/deployments", request_body = fleet::DeploymentRequest, security(("token" = [])),
    responses((status = 200, body = fleet::Deployment), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn create_deployment(
    State(state): St,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> R<Json<fleet::Deployment>> {
    let (actor, token) = authorize_token(&state, &headers, Role::Releaser, "deployment.create").await?;
    let req: fleet::DeploymentRequest =
        serde_json::from_slice(&body).map_err(|e| Refusal::BadRequest(format!("deployment request: {e}")))?;
    Ok(Json(fleet::create_deployment(&state, req, &actor, &token).await?))
}

/// A deployment with per-device status.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", params(("id" = String, Path)), security(("token" = [])),
    responses((status = 200, body = fleet::Deployment), (status = 404, body = ErrorBody)))]
async fn get_deployment(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> R<Json<fleet::Deployment>> {
    authorize(&state, &headers, Role::Viewer, "deployment.get").await?;
    fleet::deployment(&state, &id)
        .await?
        .map(Json)
        .ok_or_else(|| Refusal::NotFound(format!("no deployment `{id}`")))
}

/// Cancel a deployment.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/cancel", params(("id" = String, Path)), security(("token" = [])),
    responses((status = 200, body = fleet::Deployment), (status = 409, body = ErrorBody)))]
async fn cancel_deployment(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> R<Json<fleet::Deployment>> {
    let (actor, token) = authorize_token(&state, &headers, Role::Releaser, "deployment.cancel").await?;
    Ok(Json(fleet::cancel_deployment(&state, &id, &actor, &token).await?))
}

/// Release one device from a deployment whatever its stage (releaser).
#[utoipa::path(post, path = "/api/v1/deployments/{id}/devices/{device}/abandon",
    params(("id" = String, Path), ("device" = String, Path)), security(("token" = [])),
    responses((status = 200, body = fleet::Deployment), (status = 409, body = ErrorBody)))]
async fn abandon_device(
    State(state): St,
    headers: HeaderMap,
    Path((id, device)): Path<(String, String)>,
) -> R<Json<fleet::Deployment>> {
    let actor = authorize(&state, &headers, Role::Releaser, "deployment.abandon-device").await?;
    Ok(Json(fleet::abandon_device(&state, &id, &device, &actor).await?))
}

/// A new fleet enrollment token.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// The token, shown once.
    pub token: String,
}

/// Make a fleet enrollment token (admin).
#[utoipa::path(post, path = "/api/v1/enrollment-tokens", security(("token" = [])), responses((status = 200, body = TokenResponse)))]
async fn create_enrollment_token(State(state): St, headers: HeaderMap) -> R<Json<TokenResponse>> {
    let actor = authorize(&state, &headers, Role::Admin, "enrollment-token.create").await?;
    let token = state
        .db
        .create_token("enrollment", "device", "fleet")
        .await
        .map_err(Refusal::Internal)?;
    let _ = state
        .db
        .audit(&actor, "enrollment-token.create", "token", "ok", "")
        .await;
    Ok(Json(TokenResponse { token }))
}

/// Audit options.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct AuditQuery {
    /// Most entries (default 500).
    limit: Option<i64>,
}

/// The audit log, newest first (admin).
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery), security(("token" = [])),
    responses((status = 200, body = Vec<crate::db::AuditEntry>)))]
async fn audit_log(
    State(state): St,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> R<Json<Vec<crate::db::AuditEntry>>> {
    authorize(&state, &headers, Role::Admin, "audit.read").await?;
    Ok(Json(
        state
            .db
            .audit_log(q.limit.unwrap_or(500).clamp(1, 100_000))
            .await
            .map_err(Refusal::Internal)?,
    ))
}

/// The OpenAPI document of everything above.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Tern update server", description = "Release repository, device registry, director, rollouts and deployments (one-phase rollouts). Management endpoints take `Authorization: Bearer TOKEN` (roles admin, releaser, viewer); devices sign their check-ins."),
    paths(
        repo_metadata, repo_target, repo_recipients, add_recipients, enrollment_challenge, enroll, device_challenge, checkin, poll::poll,
        rollouts::list_devices, get_device, rollouts::device_history, rollouts::set_tags, reset_device, device_action,
        list_releases, get_release, upload_release, set_root, list_deployments, create_deployment, get_deployment,
        cancel_deployment, abandon_device, rollouts::list, rollouts::create, rollouts::get_one, rollouts::act,
        rollouts::metrics, create_enrollment_token, audit_log
    ),
    components(schemas(ErrorBody, ErrorDetail, TokenResponse, PollResponse, ChallengeResponse)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document served at `/api/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    <ApiDoc as utoipa::OpenApi>::openapi()
}
