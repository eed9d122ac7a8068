//! The domain: a command as stored and shown, its statuses ([`status`]) and
//! its state machine ([`machine`]). Pure, no I/O.

pub mod machine;
pub mod status;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use protocol::DeviceId;
use serde_json::Value;
use uuid::Uuid;

pub use machine::{Change, EventRecord, Move};
pub use status::Status;

/// A command payload: raw bytes, remembered as JSON when it came as JSON so it
/// goes back out the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub bytes: Vec<u8>,
    pub is_json: bool,
}

impl Payload {
    pub fn json(value: &Value) -> Payload {
        Payload { bytes: serde_json::to_vec(value).expect("a Value always serialises"), is_json: true }
    }

    /// Writes `payload` (if JSON) or `payload_base64` into `obj`.
    fn render_into(bytes: &[u8], as_json: bool, obj: &mut serde_json::Map<String, Value>) {
        match as_json.then(|| serde_json::from_slice::<Value>(bytes).ok()).flatten() {
            Some(v) => obj.insert("payload".into(), v),
            None => obj.insert("payload_base64".into(), Value::String(BASE64.encode(bytes))),
        };
    }
}

/// What a device answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceResult {
    /// 0 for success, otherwise the device's own error code.
    pub code: i64,
    pub payload: Vec<u8>,
    pub message: Option<String>,
}

impl DeviceResult {
    /// As the API shows it: `payload` when the bytes parse as JSON, `payload_base64` otherwise.
    pub fn to_json(&self) -> Value {
        let mut obj = serde_json::Map::new();
        obj.insert("code".into(), self.code.into());
        Payload::render_into(&self.payload, true, &mut obj);
        obj.insert("message".into(), self.message.clone().map_or(Value::Null, Value::String));
        Value::Object(obj)
    }
}

/// Why a command failed, expired or was canceled (`error.kind` of a command).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The device answered with a non-zero code.
    DeviceError,
    /// No final result by `expires_at`.
    DeadlinePassed,
    /// `max_attempts` publications, and still no result.
    AttemptsExhausted,
    Canceled,
}

impl FailureKind {
    pub const ALL: [FailureKind; 4] = [
        FailureKind::DeviceError,
        FailureKind::DeadlinePassed,
        FailureKind::AttemptsExhausted,
        FailureKind::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::DeviceError => "device_error",
            FailureKind::DeadlinePassed => "deadline_passed",
            FailureKind::AttemptsExhausted => "attempts_exhausted",
            FailureKind::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<FailureKind> {
        FailureKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A failure with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// Where an MQTT caller wants its answers: the topic, and the correlation id
/// each answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub topic: String,
    pub correlation_id: String,
}

/// A command as stored and as the API shows it (see `to_json`). Times are
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: Uuid,
    pub device_id: DeviceId,
    pub name: String,
    pub payload: Payload,
    pub status: Status,
    pub attempts: i64,
    pub max_attempts: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub scheduled_at: Option<i64>,
    pub expires_at: i64,
    /// When the sweeper looks at it next (re-send, expiry); `None` once final.
    pub next_attempt_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub result: Option<DeviceResult>,
    pub error: Option<Failure>,
    pub idempotency_key: Option<String>,
    /// MQTT callers: where the final answer goes (not shown in JSON).
    pub reply_to: Option<ReplyTo>,
}

impl Command {
    pub fn to_json(&self) -> Value {
        let mut obj = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            obj.insert(k.to_owned(), v);
        };
        put("id", self.id.to_string().into());
        put("device_id", self.device_id.as_str().into());
        put("name", self.name.clone().into());
        put("status", self.status.as_str().into());
        put("attempts", self.attempts.into());
        put("max_attempts", self.max_attempts.into());
        put("created_at", rfc3339(self.created_at).into());
        put("updated_at", rfc3339(self.updated_at).into());
        put("scheduled_at", opt_time(self.scheduled_at));
        put("expires_at", rfc3339(self.expires_at).into());
        put("next_attempt_at", opt_time(self.next_attempt_at));
        put("delivered_at", opt_time(self.delivered_at));
        put("completed_at", opt_time(self.completed_at));
        put("result", self.result.as_ref().map_or(Value::Null, DeviceResult::to_json));
        let error = match &self.error {
            Some(f) => serde_json::json!({"kind": f.kind.as_str(), "message": f.message}),
            None => Value::Null,
        };
        put("error", error);
        put("idempotency_key", self.idempotency_key.clone().map_or(Value::Null, Value::String));
        Payload::render_into(&self.payload.bytes, self.payload.is_json, &mut obj);
        Value::Object(obj)
    }
}

/// A command about to be stored, as `submit` validated it.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: Uuid,
    pub device_id: DeviceId,
    pub name: String,
    pub payload: Payload,
    pub max_attempts: i64,
    /// `Pending`; `Scheduled` with `scheduled_at` in the future; or `Sent`:
    /// the first attempt is claimed with the insert (device online, publish next).
    pub status: Status,
    /// The event detail of that first attempt.
    pub first_attempt_detail: Option<String>,
    pub created_at: i64,
    pub scheduled_at: Option<i64>,
    pub expires_at: i64,
    /// When the sweeper first looks at it: the scheduled time, or a grace
    /// period after which an unpublished command is published by the sweeper.
    pub next_attempt_at: i64,
    pub idempotency_key: Option<String>,
    /// Digest of everything the caller asked for, to tell a retry from a different request.
    pub request_hash: String,
    /// MQTT callers: where and under which correlation id the final answer goes.
    pub reply_to: Option<ReplyTo>,
    /// MQTT submissions: the message's key (every instance receives every
    /// submission; the one whose insert takes the key answers it).
    pub submission_key: Option<String>,
}

impl NewCommand {
    /// 1 when the first attempt is claimed with the insert.
    pub fn first_attempts(&self) -> i64 {
        i64::from(self.status == Status::Sent)
    }

    /// The command as stored.
    pub fn to_command(&self) -> Command {
        Command {
            id: self.id,
            device_id: self.device_id.clone(),
            name: self.name.clone(),
            payload: self.payload.clone(),
            status: self.status,
            attempts: self.first_attempts(),
            max_attempts: self.max_attempts,
            created_at: self.created_at,
            updated_at: self.created_at,
            scheduled_at: self.scheduled_at,
            expires_at: self.expires_at,
            next_attempt_at: Some(self.next_attempt_at),
            delivered_at: None,
            completed_at: None,
            result: None,
            error: None,
            idempotency_key: self.idempotency_key.clone(),
            reply_to: self.reply_to.clone(),
        }
    }
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |ms| rfc3339(ms).into())
}

/// Milliseconds since the epoch as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).expect("formatting a valid date cannot fail")
}

/// Parses an RFC 3339 time into milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_millis() as i64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A final command, for tests that need one.
    pub(crate) fn a_command() -> Command {
        Command {
            id: Uuid::now_v7(),
            device_id: DeviceId::parse("dev-1").unwrap(),
            name: "reboot".into(),
            payload: Payload { bytes: b"{}".to_vec(), is_json: true },
            status: Status::Succeeded,
            attempts: 1,
            max_attempts: 5,
            created_at: 1,
            updated_at: 2,
            scheduled_at: None,
            expires_at: 60_000,
            next_attempt_at: None,
            delivered_at: Some(2),
            completed_at: Some(2),
            result: Some(DeviceResult { code: 0, payload: b"ok".to_vec(), message: None }),
            error: None,
            idempotency_key: None,
            reply_to: None,
        }
    }

    #[test]
    fn result_payload_is_json_or_base64() {
        let v = DeviceResult { code: 0, payload: br#"{"t":21}"#.to_vec(), message: None }.to_json();
        assert_eq!(v["payload"]["t"], 21);
        let v = DeviceResult { code: 3, payload: vec![0xff, 0x00], message: Some("bad".into()) }.to_json();
        assert_eq!(v["payload_base64"], "/wA=");
        assert_eq!(v["message"], "bad");
    }

    #[test]
    fn failure_kinds_round_trip() {
        for k in FailureKind::ALL {
            assert_eq!(FailureKind::parse(k.as_str()), Some(k));
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339(&rfc3339(1_764_000_000_123)), Some(1_764_000_000_123));
    }
}
