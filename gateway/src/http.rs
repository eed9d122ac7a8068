//! The HTTP front door: routes, JSON in and out, errors as
//! `{"error": {"kind", "message"}}`. Translates to `App` calls and nothing more.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::app::{ApiError, App, CommandRequest, Mode};
use crate::command::{rfc3339, Status};
use crate::config::MAX_WAIT_MS;
use crate::store::{CommandFilter, Device};

const OPENAPI: &str = include_str!("../../docs/openapi.json");
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{device_id}", get(get_device).put(put_device))
        .route("/v1/devices/{device_id}/commands", post(submit))
        .route("/v1/commands", get(list_commands))
        .route("/v1/commands/{id}", get(get_command))
        .route("/v1/commands/{id}/events", get(command_events))
        .route("/v1/commands/{id}/cancel", post(cancel))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("method not allowed on this route".into())
        })
        // Bodies are read by `json_body`, which enforces its own limit with a JSON 413.
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.to_json())).into_response()
    }
}

/// Reads and parses a JSON body; the size cap leaves room for base64 and the
/// other fields. An oversized body is still read (up to `DRAIN_FACTOR` times
/// the cap) so the client, still writing, can read our 413 instead of a reset.
async fn json_body<T: DeserializeOwned>(app: &App, body: Body) -> Result<T, ApiError> {
    const DRAIN_FACTOR: usize = 64;
    let limit = app.config().max_payload_bytes * 2 + 64 * 1024;
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        total += chunk.len();
        if total > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
        if total <= limit {
            bytes.extend_from_slice(&chunk);
        }
    }
    if total > limit {
        return Err(ApiError::TooLarge(format!("request body over {limit} bytes")));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
}

/// `Query` with its rejection turned into our JSON 400.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::BadRequest(e.body_text())),
        }
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::NotFound(format!("no command {id:?}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceBody {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    labels: serde_json::Map<String, Value>,
}

fn yes() -> bool {
    true
}

fn device_json(d: &Device) -> Value {
    json!({
        "id": d.id,
        "enabled": d.enabled,
        "labels": d.labels,
        "online": d.online,
        "receiver_id": d.receiver_id,
        "last_seen_at": d.seen_at.map(rfc3339),
        "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at),
    })
}

async fn put_device(
    State(app): State<App>,
    Path(device_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    if !protocol::topics::is_valid_device_id(&device_id) {
        return Err(ApiError::BadRequest(
            "device id must be 1 to 128 characters of A-Z a-z 0-9 - _ . :".into(),
        ));
    }
    let body: DeviceBody = json_body(&app, req.into_body()).await?;
    let (device, created) =
        app.store().upsert_device(&device_id, body.enabled, &Value::Object(body.labels)).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(device_json(&device))).into_response())
}

async fn get_device(State(app): State<App>, Path(device_id): Path<String>) -> Result<Json<Value>, ApiError> {
    match app.store().get_device(&device_id).await? {
        Some(d) => Ok(Json(device_json(&d))),
        None => Err(ApiError::NotFound(format!("unknown device {device_id:?}"))),
    }
}

#[derive(Debug, Deserialize)]
struct DevicePage {
    after: Option<String>,
    limit: Option<i64>,
}

async fn list_devices(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<DevicePage>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let devices = app.store().list_devices(q.after.as_deref(), limit).await?;
    let next = (devices.len() as i64 == limit).then(|| devices.last().map(|d| d.id.clone())).flatten();
    let items: Vec<Value> = devices.iter().map(device_json).collect();
    Ok(Json(json!({"items": items, "next_after": next})))
}

async fn submit(
    State(app): State<App>,
    Path(device_id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let body: CommandRequest = json_body(&app, req.into_body()).await?;
    let sync = body.mode != Some(Mode::Async);
    let submitted = app.submit(&device_id, &body, None, sync).await?;
    if !sync {
        let command = submitted.command;
        let body = json!({"id": command.id.to_string(), "status": command.status.as_str()});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(app.config().default_wait_ms));
    let command = app.wait_submitted(submitted, wait).await?;
    Ok(command_response(&command))
}

/// 200 with a final command, 202 with one still under way.
fn command_response(command: &crate::command::Command) -> Response {
    let status = if command.status.is_final() { StatusCode::OK } else { StatusCode::ACCEPTED };
    (status, Json(command.to_json())).into_response()
}

#[derive(Debug, Deserialize)]
struct LongPoll {
    wait_ms: Option<u64>,
}

async fn get_command(
    State(app): State<App>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LongPoll>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let wait = q.wait_ms.unwrap_or(0);
    if wait > MAX_WAIT_MS {
        return Err(ApiError::BadRequest(format!("wait_ms must be at most {MAX_WAIT_MS}")));
    }
    let command = app.wait_final(id, Duration::from_millis(wait)).await?;
    let command = command.ok_or_else(|| ApiError::NotFound(format!("no command {id}")))?;
    // A plain GET answers 200 whatever the status; only a long-poll that timed out says 202.
    if wait > 0 && !command.status.is_final() {
        return Ok(command_response(&command));
    }
    Ok(Json(command.to_json()).into_response())
}

#[derive(Debug, Deserialize)]
struct CommandPage {
    device_id: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn list_commands(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<CommandPage>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => {
            Some(Status::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))?)
        }
    };
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse().map_err(|_| ApiError::BadRequest(format!("bad cursor {c:?}")))?),
    };
    let filter = CommandFilter { device_id: q.device_id, status, before, limit: page_limit(q.limit)? };
    let commands = app.store().list_commands(&filter).await?;
    let next =
        (commands.len() as i64 == filter.limit).then(|| commands.last().map(|c| c.id.to_string())).flatten();
    let items: Vec<Value> = commands.iter().map(|c| c.to_json()).collect();
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

async fn command_events(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    if app.store().get_command(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no command {id}")));
    }
    let events = app.store().events(id).await?;
    let items: Vec<Value> = events
        .iter()
        .map(|e| json!({"at": rfc3339(e.at), "from": e.from, "to": e.to, "attempt": e.attempt, "detail": e.detail}))
        .collect();
    Ok(Json(json!({"command_id": id.to_string(), "items": items})))
}

async fn cancel(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let command = app.cancel(parse_id(&id)?).await?;
    Ok(Json(command.to_json()))
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let mut text = app.counters().render();
    let statements = app.store().statements();
    text.push_str(&format!(
        "# TYPE gateway_db_statements_total counter\ngateway_db_statements_total {statements}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        l @ 1..=MAX_PAGE => Ok(l),
        _ => Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_PAGE}"))),
    }
}
