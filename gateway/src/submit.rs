//! Accepting a command: validate what the caller sent, have the group-commit
//! writer record it (durably, before anything is published), publish it when
//! its device is online, and register the caller's waiter first when it
//! wants to wait.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use protocol::DeviceId;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tracing::field;
use uuid::Uuid;

use crate::app::App;
use crate::command::{exact_json, now_ms, parse_rfc3339, Command, NewCommand, Payload, ReplyTo, Status};
use crate::config::{MAX_ATTEMPTS, MAX_TTL_MS, MAX_WAIT_MS};
use crate::error::{ApiError, ErrorKind};
use crate::store::{request_hash, Inserted};
use crate::waiters::Waiter;
use crate::writer::{InsertRequest, Stored};

/// A command submission as callers send it (HTTP body; MQTT adds routing
/// fields). Absent optional fields are `None` (serde's rule for `Option`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// 1 to 255 bytes.
    pub name: String,
    /// The JSON text as the caller wrote it (checked and carried exactly by
    /// `App::payload`); `null` is `None`.
    pub payload: Option<Box<RawValue>>,
    pub payload_base64: Option<String>,
    pub mode: Option<Mode>,
    /// How long a sync call waits, in ms (at most `MAX_WAIT_MS`).
    pub wait_ms: Option<u64>,
    /// The deadline for a final result, in ms from acceptance.
    pub ttl_ms: Option<u64>,
    pub max_attempts: Option<i64>,
    pub idempotency_key: Option<String>,
    /// RFC 3339; async only. Nothing is published before it.
    pub scheduled_at: Option<String>,
}

impl CommandRequest {
    /// The command fields of an MQTT submission, read from the message's own
    /// bytes, its routing fields (`device_id`, `reply_to`, `correlation_id`)
    /// skipped. Read this way, not through a `Value` of the message, the
    /// payload is checked as the caller wrote it (a `Value` has already kept
    /// only the last of duplicate keys).
    pub fn from_mqtt_message(message: &[u8]) -> Result<CommandRequest, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Message {
            name: String,
            payload: Option<Box<RawValue>>,
            payload_base64: Option<String>,
            mode: Option<Mode>,
            wait_ms: Option<u64>,
            ttl_ms: Option<u64>,
            max_attempts: Option<i64>,
            idempotency_key: Option<String>,
            scheduled_at: Option<String>,
            #[serde(rename = "device_id")]
            _device_id: Option<IgnoredAny>,
            #[serde(rename = "reply_to")]
            _reply_to: Option<IgnoredAny>,
            #[serde(rename = "correlation_id")]
            _correlation_id: Option<IgnoredAny>,
        }
        let m: Message = serde_json::from_slice(message)?;
        Ok(CommandRequest {
            name: m.name,
            payload: m.payload,
            payload_base64: m.payload_base64,
            mode: m.mode,
            wait_ms: m.wait_ms,
            ttl_ms: m.ttl_ms,
            max_attempts: m.max_attempts,
            idempotency_key: m.idempotency_key,
            scheduled_at: m.scheduled_at,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Sync,
    Async,
}

/// Where an MQTT submission came from: its caller's reply route, and the
/// key of the message (a digest of its reply route, correlation id and body)
/// by which the instances, which all receive it, agree on who answers it.
#[derive(Debug, Clone)]
pub struct MqttOrigin {
    pub reply_to: ReplyTo,
    pub key: String,
}

/// One submission as a front door hands it over.
#[derive(Debug, Clone, Copy)]
struct Submission<'a> {
    device_id: &'a str,
    req: &'a CommandRequest,
    /// MQTT submissions only.
    origin: Option<&'a MqttOrigin>,
    /// Register a waiter before publishing (sync calls).
    wait: bool,
}

/// How a submission ended for the caller.
#[derive(Debug)]
pub struct Submitted {
    pub command: Command,
    /// False when an idempotency key matched an earlier command.
    pub created: bool,
    /// Registered before the command was published, when the caller asked to wait.
    pub waiter: Option<Waiter>,
}

impl App {
    /// Validates, records (durably, before anything is published) and, when
    /// its device is online and it is not scheduled, publishes a command.
    /// Returns once it is stored and handed to the broker client. With `wait`,
    /// the result carries a waiter for `wait_submitted`.
    ///
    /// Errors: 404 unknown device (or an id no device can have), 409 disabled
    /// device or idempotency key reused with another request, 400/413 invalid
    /// fields, 503 store unavailable or (`shutting_down`) the gateway is shutting down.
    pub async fn submit(
        &self,
        device_id: &str,
        req: &CommandRequest,
        wait: bool,
    ) -> Result<Submitted, ApiError> {
        // Without a submission key no other instance can take it.
        let submission = Submission { device_id, req, origin: None, wait };
        self.submit_from(submission).await?.ok_or_else(ApiError::unavailable)
    }

    /// `submit` for an MQTT submission, which every instance receives:
    /// `None` when another instance took this message (it answers the caller).
    pub async fn submit_mqtt(
        &self,
        device_id: &str,
        req: &CommandRequest,
        origin: &MqttOrigin,
    ) -> Result<Option<Submitted>, ApiError> {
        self.submit_from(Submission { device_id, req, origin: Some(origin), wait: false }).await
    }

    #[tracing::instrument(name = "submit", level = "debug", skip_all, fields(device_id = submission.device_id, command_id = field::Empty))]
    async fn submit_from(&self, submission: Submission<'_>) -> Result<Option<Submitted>, ApiError> {
        let result = match self.lifecycle().admit() {
            Ok(()) => self.submit_inner(submission).await,
            Err(refused) => Err(refused),
        };
        match &result {
            Ok(Some(s)) => {
                self.metrics().accepted.inc();
                tracing::debug!(command_id = %s.command.id, status = %s.command.status, created = s.created, "accepted");
            }
            Ok(None) => tracing::debug!("taken by another instance"),
            Err(e) => {
                self.metrics().rejected.inc();
                tracing::debug!(kind = e.kind.as_str(), error = %e, "refused");
            }
        }
        result
    }

    async fn submit_inner(&self, submission: Submission<'_>) -> Result<Option<Submitted>, ApiError> {
        let Submission { device_id, req, origin, wait } = submission;
        let device_id = DeviceId::parse(device_id).map_err(|_| {
            ApiError::not_found(format!("unknown device {device_id:?} (not a valid device id)"))
        })?;
        let mut new = self.validate(device_id, req, origin.map(|o| &o.reply_to))?;
        new.submission_key = origin.map(|o| o.key.clone());
        tracing::Span::current().record("command_id", field::display(new.id));
        let Stored { inserted, receiver } = self.insert(new.clone()).await?;
        let submitted = match inserted {
            Inserted::Created(command) => {
                // Before the publish, so a quick result cannot slip past it.
                let waiter = wait.then(|| self.waiters().register(command.id));
                if let Some(receiver) = receiver.filter(|_| command.status == Status::Sent) {
                    self.send_to_receiver(&command, &receiver).await;
                }
                Submitted { command, created: true, waiter }
            }
            Inserted::Existing(command) => {
                let waiter = wait.then(|| self.waiters().register(command.id));
                // It may have become final between the read and the registration.
                let command = match &waiter {
                    Some(_) if !command.status.is_final() => {
                        self.store().get_command(command.id).await?.unwrap_or(command)
                    }
                    _ => command,
                };
                Submitted { command, created: false, waiter }
            }
            Inserted::KeyConflict(existing) => {
                return Err(ApiError::conflict(format!(
                    "idempotency key {:?} was used for command {} with a different request",
                    new.idempotency_key.unwrap_or_default(),
                    existing.id
                )))
            }
            Inserted::TakenElsewhere => return Ok(None),
        };
        Ok(Some(submitted))
    }

    /// Checks every field and builds the command to store.
    fn validate(
        &self,
        device_id: DeviceId,
        req: &CommandRequest,
        reply_to: Option<&ReplyTo>,
    ) -> Result<NewCommand, ApiError> {
        let bad = |m: &str| Err(ApiError::bad_request(m));
        if req.name.is_empty() || req.name.len() > 255 {
            return bad("name must be 1 to 255 bytes");
        }
        let payload = self.payload(req)?;
        if req.wait_ms.is_some_and(|w| w > MAX_WAIT_MS) {
            return Err(ApiError::bad_request(format!("wait_ms must be at most {MAX_WAIT_MS}")));
        }
        let ttl = req.ttl_ms.unwrap_or(self.config().default_ttl_ms);
        if ttl == 0 || ttl > MAX_TTL_MS {
            return Err(ApiError::bad_request(format!("ttl_ms must be 1 to {MAX_TTL_MS}")));
        }
        let max_attempts = req.max_attempts.unwrap_or(self.config().default_max_attempts);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(ApiError::bad_request(format!("max_attempts must be 1 to {MAX_ATTEMPTS}")));
        }
        if req.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 255) {
            return bad("idempotency_key must be 1 to 255 bytes");
        }
        let now = now_ms();
        let expires_at = now + ttl as i64;
        let scheduled_at = scheduled_at(req, expires_at)?;
        // A time in the past runs at once.
        let status =
            if scheduled_at.is_some_and(|at| at > now) { Status::Scheduled } else { Status::Pending };
        // Until published, the sweeper looks at it when scheduled, or after the
        // ack timeout (the immediate publish failed, or the device is offline)
        // — never after the deadline, so it expires on time.
        let next_attempt_at = match status {
            Status::Scheduled => scheduled_at.unwrap_or(now),
            _ => now + self.config().ack_timeout_ms as i64,
        }
        .min(expires_at);
        let hash = request_hash(&[
            req.name.as_bytes(),
            &payload.bytes,
            &[u8::from(payload.is_json)],
            &ttl.to_be_bytes(),
            &max_attempts.to_be_bytes(),
            req.scheduled_at.as_deref().unwrap_or_default().as_bytes(),
        ]);
        Ok(NewCommand {
            id: Uuid::now_v7(),
            device_id,
            name: req.name.clone(),
            payload,
            max_attempts,
            status,
            first_attempt_detail: None,
            created_at: now,
            scheduled_at,
            expires_at,
            next_attempt_at,
            idempotency_key: req.idempotency_key.clone(),
            request_hash: hash,
            reply_to: reply_to.cloned(),
            submission_key: None,
            sent_to: None,
        })
    }

    /// `payload` (JSON) or `payload_base64` (bytes), within the size limit.
    fn payload(&self, req: &CommandRequest) -> Result<Payload, ApiError> {
        let payload = match (&req.payload, &req.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("give payload or payload_base64, not both"))
            }
            (Some(text), None) => match exact_json(text.get().as_bytes()) {
                Ok(value) => Payload::json(&value),
                Err(why) => return Err(ApiError::bad_request(format!("payload refused: {why}"))),
            },
            (None, Some(b)) => match BASE64.decode(b.as_bytes()) {
                Ok(bytes) => Payload { bytes, is_json: false },
                Err(e) => return Err(ApiError::bad_request(format!("payload_base64 is not base64: {e}"))),
            },
            (None, None) => Payload::json(&serde_json::Value::Null),
        };
        let max = self.config().max_payload_bytes;
        if payload.bytes.len() > max {
            let message = format!("payload is {} bytes, the limit is {max}", payload.bytes.len());
            return Err(ApiError::new(ErrorKind::PayloadTooLarge, message));
        }
        Ok(payload)
    }

    /// Stores a new command through the group-commit writer.
    async fn insert(&self, new: NewCommand) -> Result<Stored, ApiError> {
        let (done, answer) = oneshot::channel();
        let gone = || ApiError::new(ErrorKind::StoreUnavailable, "the command writer stopped");
        self.inner.inserts.send(InsertRequest { new, done }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// `scheduled_at` in ms: async only, RFC 3339, before the deadline.
fn scheduled_at(req: &CommandRequest, expires_at: i64) -> Result<Option<i64>, ApiError> {
    let Some(text) = &req.scheduled_at else { return Ok(None) };
    if req.mode != Some(Mode::Async) {
        return Err(ApiError::bad_request("scheduled_at needs \"mode\": \"async\""));
    }
    match parse_rfc3339(text) {
        None => Err(ApiError::bad_request(format!("scheduled_at {text:?} is not an RFC 3339 time"))),
        Some(at) if at >= expires_at => Err(ApiError::bad_request(
            "scheduled_at is at or after the command's deadline (acceptance + ttl_ms)",
        )),
        Some(at) => Ok(Some(at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mqtt_message_gives_its_command_fields_with_the_payload_as_written() {
        let message = br#"{"device_id":"d","reply_to":"r","correlation_id":7,"name":"echo",
            "payload":{"z":18446744073709551616,"a":{"k":1,"k":2}},"ttl_ms":5}"#;
        let req = CommandRequest::from_mqtt_message(message).unwrap();
        assert_eq!((req.name.as_str(), req.ttl_ms), ("echo", Some(5)));
        assert_eq!(req.payload.unwrap().get(), r#"{"z":18446744073709551616,"a":{"k":1,"k":2}}"#);
        let unknown = CommandRequest::from_mqtt_message(br#"{"name":"x","colour":1}"#);
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }
}
