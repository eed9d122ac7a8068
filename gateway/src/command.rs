//! The domain: command statuses and their legal transitions, the validated
//! pieces of a submission, and the JSON view of a command. Pure, no I/O.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// Where a command stands. `Succeeded`, `Failed`, `Expired` and `Canceled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted with a future `scheduled_at`: nothing published yet.
    Scheduled,
    /// Stored, not yet handed to the broker.
    Pending,
    /// Published to the receiver that holds the device.
    Sent,
    /// The receiver wrote it to the device.
    Delivered,
    Succeeded,
    Failed,
    Expired,
    Canceled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Scheduled,
        Status::Pending,
        Status::Sent,
        Status::Delivered,
        Status::Succeeded,
        Status::Failed,
        Status::Expired,
        Status::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Expired | Status::Canceled)
    }

    /// Whether `self → to` is a legal move. Statuses only move forward: a late
    /// or duplicate report can never take a command back.
    pub fn can_move_to(self, to: Status) -> bool {
        use Status::*;
        if self.is_final() {
            return false;
        }
        match to {
            Scheduled => false,
            Pending => self == Scheduled,
            // A re-send moves `delivered` back to `sent` only through the sweeper's attempt path.
            Sent => matches!(self, Scheduled | Pending | Delivered | Sent),
            Delivered => matches!(self, Pending | Sent),
            Succeeded | Failed | Expired | Canceled => true,
        }
    }

    /// Statuses from which `to` may be reached.
    pub fn sources_of(to: Status) -> Vec<Status> {
        Status::ALL.into_iter().filter(|from| from.can_move_to(to)).collect()
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// A device's answer as the API shows it: JSON when the bytes parse as JSON,
/// base64 otherwise.
pub fn render_result(code: i64, payload: &[u8], message: Option<&str>) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("code".into(), code.into());
    Payload::render_into(payload, true, &mut obj);
    obj.insert("message".into(), message.map_or(Value::Null, |m| Value::String(m.into())));
    Value::Object(obj)
}

/// A command as stored and as the API shows it (see `to_json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: Uuid,
    pub device_id: String,
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
    pub result_code: Option<i64>,
    pub result_payload: Option<Vec<u8>>,
    pub result_message: Option<String>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub idempotency_key: Option<String>,
    /// MQTT callers: the topic and correlation id of the final answer (not shown in JSON).
    pub reply_to: Option<(String, String)>,
}

impl Command {
    pub fn to_json(&self) -> Value {
        let mut obj = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            obj.insert(k.to_owned(), v);
        };
        put("id", self.id.to_string().into());
        put("device_id", self.device_id.clone().into());
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
        let result = match self.result_code {
            Some(code) => render_result(
                code,
                self.result_payload.as_deref().unwrap_or_default(),
                self.result_message.as_deref(),
            ),
            None => Value::Null,
        };
        put("result", result);
        let error = match &self.error_kind {
            Some(kind) => serde_json::json!({"kind": kind, "message": self.error_message}),
            None => Value::Null,
        };
        put("error", error);
        put("idempotency_key", self.idempotency_key.clone().map_or(Value::Null, Value::String));
        Payload::render_into(&self.payload.bytes, self.payload.is_json, &mut obj);
        Value::Object(obj)
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
            device_id: "dev-1".into(),
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
            result_code: Some(0),
            result_payload: Some(b"ok".to_vec()),
            result_message: None,
            error_kind: None,
            error_message: None,
            idempotency_key: None,
            reply_to: None,
        }
    }

    #[test]
    fn final_statuses_never_move() {
        for from in Status::ALL.into_iter().filter(|s| s.is_final()) {
            for to in Status::ALL {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_late_delivery_report_cannot_undo_a_result() {
        assert!(Status::Sent.can_move_to(Status::Delivered));
        assert!(!Status::Succeeded.can_move_to(Status::Delivered));
        assert_eq!(Status::sources_of(Status::Delivered), vec![Status::Pending, Status::Sent]);
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
    }

    #[test]
    fn result_payload_is_json_or_base64() {
        let v = render_result(0, br#"{"t":21}"#, None);
        assert_eq!(v["payload"]["t"], 21);
        let v = render_result(3, &[0xff, 0x00], Some("bad"));
        assert_eq!(v["payload_base64"], "/wA=");
        assert_eq!(v["message"], "bad");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339(&rfc3339(1_764_000_000_123)), Some(1_764_000_000_123));
    }
}
