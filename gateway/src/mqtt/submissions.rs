//! Commands submitted over MQTT on `<prefix>/commands`: the HTTP body plus
//! `device_id`, `reply_to` and `correlation_id`. Answered on `reply_to` once
//! when accepted or rejected, once more when final.
//!
//! Every gateway instance subscribes to the topic (no shared subscriptions,
//! which not every broker has and which Mosquitto loses messages with), so
//! every instance receives every submission. They agree on one to answer it
//! through the store: the message's key (`submit::MqttOrigin`) is inserted
//! with the command, or alone for a refusal; the instance whose insert takes
//! it answers, the others stay silent. A message delivered twice (QoS 1) is
//! the same message and is answered once.

use std::time::Duration;

use plumbing::backoff::Backoff;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::app::App;
use crate::command::{now_ms, ReplyTo};
use crate::error::{ApiError, ErrorKind};
use crate::store::request_hash;
use crate::submit::{CommandRequest, MqttOrigin, Submitted};

/// Handles one submission message. `retained`: the broker delivered it from
/// its retained store (the RETAIN flag of a PUBLISH sent because a
/// subscription was made, MQTT 3.1.1 §3.3.1.3 / MQTT 5 §3.3.1.3): it is
/// refused, never run, and the retained copy is cleared.
pub(super) async fn handle(app: &App, payload: &[u8], retained: bool) {
    if payload.is_empty() {
        // A zero-byte PUBLISH is how a retained message is cleared (ours, or
        // the submitter's own); it carries no submission.
        return;
    }
    if retained {
        clear_retained(app).await;
    }
    let (origin, routing) = match origin_of(payload) {
        Ok(found) => found,
        Err(why) => return dropped(app, why),
    };
    let reply = &origin.reply_to;
    let device_id = routing
        .device_id
        .as_deref()
        .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        .unwrap_or_default();
    let outcome = match CommandRequest::from_mqtt_message(payload) {
        _ if retained => Err(ApiError::bad_request(RETAINED)),
        Ok(req) if !device_id.is_empty() => submit_while_store_recovers(app, &device_id, &req, &origin).await,
        Ok(_) => Err(ApiError::bad_request("device_id is required")),
        Err(e) => Err(ApiError::bad_request(format!("malformed request: {e}"))),
    };
    match outcome {
        Ok(Some(submitted)) => {
            let command = submitted.command;
            app.reply(reply, "accepted", command.to_json()).await;
            // An idempotent repeat of a command that is already final gets its
            // final answer now — unless that answer went to this same route
            // already (the final move's reply): the same message handled again
            // after a commit whose outcome was lost (a database node failing
            // over), or a repeat that names the same reply_to and correlation_id.
            if command.status.is_final() && command.reply_to.as_ref() != Some(reply) {
                app.reply(reply, "final", command.to_json()).await;
            }
        }
        Ok(None) => {
            app.metrics().mqtt_submissions_elsewhere.inc();
        }
        Err(e) => refuse(app, &origin, &e).await,
    }
}

/// Answers `rejected` with `e` (its `status_code` the HTTP status of its
/// kind), unless another instance took the message meanwhile (then it
/// answers: one answer is enough).
async fn refuse(app: &App, origin: &MqttOrigin, e: &ApiError) {
    match app.store().claim_submission(&origin.key, now_ms()).await {
        Ok(false) => {
            app.metrics().mqtt_submissions_elsewhere.inc();
            return;
        }
        Ok(true) => {}
        // The store stayed down for all of STORE_PATIENCE: every
        // instance says so (each alone cannot know who else could).
        Err(store) => tracing::warn!(error = %store, "MQTT refusal not recorded; replying anyway"),
    }
    let mut body = e.to_json();
    body["status_code"] = e.kind.http_status().into();
    app.reply(&origin.reply_to, "rejected", body).await;
}

/// How long a submitter refused for a full queue is told to wait, in ms.
pub(super) const OVERLOADED_RETRY_MS: u64 = 1_000;

/// Answers a submission that found the queue full (`--mqtt-submission-queue`):
/// `rejected`, 503 `overloaded` with `retry_after_ms`; nothing is run.
pub(super) async fn refuse_overloaded(app: &App, payload: &[u8], queue: u64) {
    if payload.is_empty() {
        return;
    }
    let Ok((origin, _)) = origin_of(payload) else {
        app.metrics().mqtt_submissions_dropped.inc();
        return;
    };
    let message = format!(
        "the gateway's MQTT submission queue is full (--mqtt-submission-queue {queue}); nothing was run, try again"
    );
    let e = ApiError::new(ErrorKind::Overloaded, message).retry_after(OVERLOADED_RETRY_MS);
    refuse(app, &origin, &e).await;
}

/// A submission's reply route and key, from its routing fields only: the
/// rest is read from the message's own bytes later, so a payload is judged
/// as the caller wrote it (duplicate keys, lone surrogate escapes: refused
/// with a reply, as over HTTP). Errors: why it cannot be answered at all.
fn origin_of(payload: &[u8]) -> Result<(MqttOrigin, Routing), &'static str> {
    let Ok(routing) = serde_json::from_slice::<Routing>(payload) else {
        return Err("MQTT submission is not a JSON object; dropped");
    };
    let Some(topic) =
        routing.reply_to.as_deref().and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    else {
        return Err("MQTT submission without reply_to; dropped");
    };
    let correlation_id = match routing.correlation_id.as_deref().map(RawValue::get) {
        None => String::new(),
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(Value::String(s)) => s,
            Ok(other) => other.to_string(),
            Err(_) => raw.to_owned(),
        },
    };
    let key = request_hash(&[topic.as_bytes(), correlation_id.as_bytes(), payload]);
    Ok((MqttOrigin { reply_to: ReplyTo { topic, correlation_id }, key }, routing))
}

/// How long an MQTT submission waits for the store to come back (a database
/// node failing over) before it is refused with 503. Meanwhile another
/// instance, whose store connection still works, may take it; refusing at
/// once would answer `rejected` for a submission that another instance runs.
const STORE_PATIENCE: Duration = Duration::from_secs(10);

async fn submit_while_store_recovers(
    app: &App,
    device_id: &str,
    req: &CommandRequest,
    origin: &MqttOrigin,
) -> Result<Option<Submitted>, ApiError> {
    let give_up = tokio::time::Instant::now() + STORE_PATIENCE;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        match app.submit_mqtt(device_id, req, origin).await {
            Err(e) if e.kind == ErrorKind::StoreUnavailable && tokio::time::Instant::now() < give_up => {
                tracing::debug!(error = %e, "store unavailable for an MQTT submission; trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            done => return done,
        }
    }
}

/// The routing fields of a submission; the others are read by
/// `CommandRequest::from_mqtt_message`.
#[derive(Deserialize)]
struct Routing {
    reply_to: Option<Box<RawValue>>,
    correlation_id: Option<Box<RawValue>>,
    device_id: Option<Box<RawValue>>,
}

/// Why a retained submission is refused.
const RETAINED: &str = "retained submissions are not run: the broker delivers a retained message again \
     to every new subscription (each gateway restart), so it would run again each time; \
     publish submissions with retain=false";

/// Deletes the retained submission at the broker (a zero-byte retained
/// PUBLISH, MQTT 3.1.1 §3.3.1.3), so it is not delivered again; every
/// instance that receives it does so, which is idempotent.
async fn clear_retained(app: &App) {
    app.metrics().mqtt_submissions_retained.inc();
    let topic = app.topics().submit();
    if let Err(e) = app.mqtt().publish(topic, rumqttc::QoS::AtLeastOnce, true, Vec::new()).await {
        tracing::warn!(error = %e, "could not clear a retained submission");
    }
}

fn dropped(app: &App, why: &str) {
    app.metrics().mqtt_submissions_dropped.inc();
    tracing::warn!("{why}");
}
