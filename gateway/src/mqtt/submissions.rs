//! Commands submitted over MQTT on `<prefix>/commands`: the HTTP body plus
//! `device_id`, `reply_to` and `correlation_id`. Answered on `reply_to` once
//! when accepted or rejected, once more when final.

use serde_json::Value;

use crate::app::App;
use crate::command::ReplyTo;
use crate::error::ApiError;
use crate::submit::CommandRequest;

/// Handles one submission message.
pub(super) async fn handle(app: &App, payload: &[u8]) {
    let mut fields = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(fields)) => fields,
        _ => return dropped(app, "MQTT submission is not a JSON object; dropped"),
    };
    let Some(Value::String(topic)) = fields.remove("reply_to") else {
        return dropped(app, "MQTT submission without reply_to; dropped");
    };
    let correlation_id = match fields.remove("correlation_id") {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let reply = ReplyTo { topic, correlation_id };
    let device_id = match fields.remove("device_id") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let outcome = match serde_json::from_value::<CommandRequest>(Value::Object(fields)) {
        Ok(req) if !device_id.is_empty() => app.submit(&device_id, &req, Some(&reply), false).await,
        Ok(_) => Err(ApiError::bad_request("device_id is required")),
        Err(e) => Err(ApiError::bad_request(format!("malformed request: {e}"))),
    };
    match outcome {
        Ok(submitted) => {
            let command = submitted.command;
            app.reply(&reply, "accepted", command.to_json()).await;
            // An idempotent repeat of a command that is already final gets its final answer now.
            if command.status.is_final() {
                app.reply(&reply, "final", command.to_json()).await;
            }
        }
        Err(e) => {
            let mut body = e.to_json();
            body["status_code"] = e.kind.http_status().into();
            app.reply(&reply, "rejected", body).await;
        }
    }
}

fn dropped(app: &App, why: &str) {
    app.metrics().mqtt_submissions_dropped.inc();
    tracing::warn!("{why}");
}
