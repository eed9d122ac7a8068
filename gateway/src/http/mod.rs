//! The HTTP front door: routes, JSON in and out, errors as
//! `{"error": {"kind", "message"}}`. Translates to `App` calls and nothing
//! more; handlers live beside their resource ([`devices`], [`commands`]).
//! [`auth`] decides who may call what; [`tls`] is the listener's TLS.
//!
//! Layers, outermost first: every error answered as JSON
//! ([`json_errors`]), the URI length cap (414), routing, then per route
//! the API key and content-type check ([`auth::guard`]) and the handler.
//! [`serve`] is the server loop and its connection limits; [`console`] the
//! web page for operators, a client of this API like any other.
//! No CORS headers are ever sent: a browser on another origin gets no
//! permission from this server, not even for a preflight.

pub mod auth;
mod commands;
pub mod console;
mod devices;
pub mod serve;
pub mod tls;

pub use serve::{serve, Limits};

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::app::App;
use crate::error::{ApiError, ErrorKind};

const OPENAPI: &str = include_str!("../../../docs/openapi.json");
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

/// Longest request URI (path and query) accepted, in bytes; longer: a JSON
/// 414. (hyper itself answers a 431 without a body to a request head over
/// `--http-max-head-bytes`, 32 KiB by default, and a 414 to a URI over
/// 65,534 bytes: those never reach this router.)
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Every route of the API (documented in docs/openapi.json) and the
/// console's files (not API: left out of the document); who may call each
/// is `auth::ACCESS`.
pub fn router(app: App) -> Router {
    let auth = Arc::new(auth::Auth::new(app.config()));
    Router::new()
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{device_id}", get(devices::get).put(devices::put))
        .route("/v1/devices/{device_id}/commands", post(commands::submit))
        .route("/v1/devices/{device_id}/key", post(devices::issue_key))
        .route("/v1/commands", get(commands::list))
        .route("/v1/commands/summary", get(commands::summary))
        .route("/v1/commands/{id}", get(commands::get))
        .route("/v1/commands/{id}/events", get(commands::events))
        .route("/v1/commands/{id}/cancel", post(commands::cancel))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(console::root))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::script))
        .route("/console/console.css", get(console::style))
        .route_layer(middleware::from_fn_with_state((app.clone(), auth), auth::guard))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorKind::MethodNotAllowed, "method not allowed on this route")
        })
        // Bodies are read by `json_body`, which enforces its own limit with a JSON 413.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(limit_uri))
        .layer(middleware::map_response(json_errors))
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.to_json())).into_response();
        if self.kind == ErrorKind::Unauthorized {
            // RFC 6750 §3: how to authenticate.
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after_secs() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A request URI over [`MAX_URI_BYTES`]: 414, before routing.
async fn limit_uri(req: Request, next: Next) -> Response {
    let len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_BYTES {
        let message = format!("request URI of {len} bytes, over {MAX_URI_BYTES}");
        return ApiError::new(ErrorKind::UriTooLong, message).into_response();
    }
    next.run(req).await
}

/// Every error leaves as our JSON body: an error response that is not JSON
/// (a rejection or fallback of axum's own, in text) is rewritten with the
/// kind of its status and its text as the message; its other headers (e.g.
/// `Allow` on a 405) are kept.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        text => text.to_owned(),
    };
    let error = ApiError::new(ErrorKind::for_status(status.as_u16()), message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(error.to_json().to_string()))
}

/// Reads and parses a JSON body; the size cap leaves room for base64 and the
/// other fields. An oversized body is still read (up to `DRAIN_FACTOR` times
/// the cap) so the client, still writing, can read our 413 instead of a reset.
async fn json_body<T: DeserializeOwned>(app: &App, body: Body) -> Result<T, ApiError> {
    const DRAIN_FACTOR: usize = 64;
    let limit = protocol::limits::http_body_limit(app.config().max_payload_bytes);
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        total += chunk.len();
        if total > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
        if total <= limit {
            bytes.extend_from_slice(&chunk);
        }
    }
    if total > limit {
        return Err(ApiError::new(ErrorKind::PayloadTooLarge, format!("request body over {limit} bytes")));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// `Query` with its rejection turned into our JSON 400.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// `Path` with its rejection (e.g. `%FF`, not UTF-8) turned into our JSON 400.
struct ApiPath<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// A command id from the path; anything else is a command that does not exist.
fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::not_found(format!("no command {id:?}")))
}

/// `limit` of a page: 1 to `MAX_PAGE`, `DEFAULT_PAGE` when absent.
fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        l @ 1..=MAX_PAGE => Ok(l),
        _ => Err(ApiError::bad_request(format!("limit must be 1 to {MAX_PAGE}"))),
    }
}

/// `GET /readyz`: 200 when this instance can take commands, 503 naming what
/// is not ready (`crate::shutdown` has the checks).
async fn readyz(State(app): State<App>) -> Response {
    plumbing::health::answer(&app.readiness().await)
}

/// Prometheus text exposition of this instance's counters.
async fn metrics(State(app): State<App>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, plumbing::metrics::CONTENT_TYPE)], app.metrics().registry.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text error from a layer other than ours leaves as our JSON, with its
    /// status and other headers; JSON errors and successes pass untouched.
    #[tokio::test]
    async fn error_responses_become_json() {
        let text = (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, "GET")], "Method Not Allowed");
        let response = json_errors(text.into_response()).await;
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers()[header::ALLOW], "GET");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["kind"], "method_not_allowed");
        assert_eq!(body["error"]["message"], "Method Not Allowed");

        let empty = json_errors(StatusCode::IM_A_TEAPOT.into_response()).await;
        let body = axum::body::to_bytes(empty.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (&body["error"]["kind"], &body["error"]["message"]),
            (&"bad_request".into(), &"I'm a teapot".into())
        );

        let ours = json_errors(ApiError::not_found("no such route").into_response()).await;
        let body = axum::body::to_bytes(ours.into_body(), 1024).await.unwrap();
        assert_eq!(body, ApiError::not_found("no such route").to_json().to_string());
        let ok = json_errors((StatusCode::OK, "ok").into_response()).await;
        assert_eq!(axum::body::to_bytes(ok.into_body(), 16).await.unwrap(), "ok");
    }

    #[test]
    fn every_kind_maps_back_from_its_status() {
        for kind in
            [ErrorKind::Unauthorized, ErrorKind::Forbidden, ErrorKind::UriTooLong, ErrorKind::NotFound]
        {
            assert_eq!(ErrorKind::for_status(kind.http_status()), kind);
        }
        assert_eq!(ErrorKind::for_status(431), ErrorKind::BadRequest);
        assert_eq!(ErrorKind::for_status(502), ErrorKind::Internal);
    }
}
