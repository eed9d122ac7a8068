//! `/v1/devices`: register or update a device, read one, list them, issue
//! its next key (PROTOCOL.md §5.9).

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use protocol::DeviceId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json_body, page_limit, ApiPath, ApiQuery};
use crate::app::App;
use crate::command::rfc3339;
use crate::error::{ApiError, ErrorKind};
use crate::store::{Device, Upserted};

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
        "id": d.id.as_str(),
        "enabled": d.enabled,
        "labels": d.labels,
        "online": d.online,
        "receiver_id": d.receiver_id,
        "last_seen_at": d.seen_at.map(rfc3339),
        "created_at": rfc3339(d.created_at),
        "updated_at": rfc3339(d.updated_at),
    })
}

/// `PUT /v1/devices/{device_id}`: 201 created, 200 updated.
pub(super) async fn put(
    State(app): State<App>,
    ApiPath(device_id): ApiPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let device_id = DeviceId::parse(&device_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let body: DeviceBody = json_body(&app, req.into_body()).await?;
    let Upserted { device, created } =
        app.store().upsert_device(&device_id, body.enabled, &Value::Object(body.labels)).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(device_json(&device))).into_response())
}

/// `GET /v1/devices/{device_id}`.
pub(super) async fn get(
    State(app): State<App>,
    ApiPath(device_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    match app.store().get_device(&device_id).await? {
        Some(d) => Ok(Json(device_json(&d))),
        None => Err(ApiError::not_found(format!("unknown device {device_id:?}"))),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct DevicePage {
    after: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/devices?after=&limit=`: in id order; `next_after` for the next page.
pub(super) async fn list(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<DevicePage>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit)?;
    let devices = app.store().list_devices(q.after.as_deref(), limit).await?;
    let next =
        (devices.len() as i64 == limit).then(|| devices.last().map(|d| d.id.as_str().to_owned())).flatten();
    let items: Vec<Value> = devices.iter().map(device_json).collect();
    Ok(Json(json!({"items": items, "next_after": next})))
}

#[derive(Debug, Deserialize)]
pub(super) struct IssueKey {
    #[serde(default)]
    revoke_previous: bool,
}

/// `POST /v1/devices/{device_id}/key?revoke_previous=`: issues the device's
/// next key generation and answers 201 `{"device_id", "generation", "key"}`
/// (the key in base64, shown this once: it is derived, never stored). The
/// previous generations stay valid until the device first authenticates
/// with the new one, unless `revoke_previous=true`. 404 for an unknown
/// device, 409 when this gateway has no `--device-key-secret`.
pub(super) async fn issue_key(
    State(app): State<App>,
    Path(device_id): Path<String>,
    ApiQuery(q): ApiQuery<IssueKey>,
) -> Result<Response, ApiError> {
    let Some(device) = app.store().get_device(&device_id).await? else {
        return Err(ApiError::not_found(format!("unknown device {device_id:?}")));
    };
    let Some(secret) = app.config().device_key_secret.as_ref() else {
        let why = "this gateway issues no device keys: start it with --device-key-secret (GATEWAY_DEVICE_KEY_SECRET)";
        return Err(ApiError::new(ErrorKind::Conflict, why));
    };
    let generation = app.store().issue_key_generation(&device.id, q.revoke_previous).await?;
    let key = secret.device_key(&device.id, generation);
    tracing::info!(device_id = %device.id, generation, revoke_previous = q.revoke_previous, "device key issued");
    let body = json!({"device_id": device.id.as_str(), "generation": generation, "key": key.to_base64()});
    Ok((StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}
