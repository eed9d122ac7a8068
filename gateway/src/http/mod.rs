//! The HTTP front door: routes, JSON in and out, errors as
//! `{"error": {"kind", "message"}}`. Translates to `App` calls and nothing
//! more; handlers live beside their resource ([`devices`], [`commands`]).

mod commands;
mod devices;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
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

/// Every route of the API (documented in docs/openapi.json).
pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{device_id}", get(devices::get).put(devices::put))
        .route("/v1/devices/{device_id}/commands", post(commands::submit))
        .route("/v1/commands", get(commands::list))
        .route("/v1/commands/{id}", get(commands::get))
        .route("/v1/commands/{id}/events", get(commands::events))
        .route("/v1/commands/{id}/cancel", post(commands::cancel))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorKind::MethodNotAllowed, "method not allowed on this route")
        })
        // Bodies are read by `json_body`, which enforces its own limit with a JSON 413.
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.to_json())).into_response()
    }
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

/// Prometheus text exposition of this instance's counters.
async fn metrics(State(app): State<App>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, plumbing::metrics::CONTENT_TYPE)], app.metrics().registry.render())
}
