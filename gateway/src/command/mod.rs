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

    /// Writes `payload` (the bytes `parsed` as JSON) or, when they did not
    /// parse, `payload_base64` into `obj`.
    fn render_into(bytes: &[u8], parsed: Option<Value>, obj: &mut serde_json::Map<String, Value>) {
        match parsed {
            Some(v) => obj.insert("payload".into(), v),
            None => obj.insert("payload_base64".into(), Value::String(BASE64.encode(bytes))),
        };
    }
}

/// JSON text as a [`Value`] that serializes back to the same value, written
/// compactly: numbers keep their text (serde_json's `arbitrary_precision`:
/// `18446744073709551616`, `1e400`, `1.0`, `-0` stay as they are) and object
/// keys their order (`preserve_order`). Refused, with the reason, when a
/// `Value` would change it: a `\u` escape of a lone UTF-16 surrogate (not
/// Unicode text, no UTF-8 for it) or a duplicate object key (one value would
/// be dropped). Paths in reasons start at `payload`.
pub fn exact_json(text: &[u8]) -> Result<Value, String> {
    let value = serde_json::from_slice::<Value>(text).map_err(|e| match lone_surrogate(text) {
        Some(escape) => format!(
            "lone UTF-16 surrogate escape {escape} in a string (not Unicode text: \\u escapes \
             of U+D800 to U+DFFF must come as a high-low pair)"
        ),
        None => e.to_string(),
    })?;
    let mut de = serde_json::Deserializer::from_slice(text);
    serde::de::DeserializeSeed::deserialize(Unique(&Step::Root), &mut de).map_err(|e| e.to_string())?;
    Ok(value)
}

/// The first `\uXXXX` escape in `text`'s strings that is a lone surrogate.
fn lone_surrogate(text: &[u8]) -> Option<String> {
    let hex = |at: usize| -> Option<u16> {
        let digits = std::str::from_utf8(text.get(at..at + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    let (mut i, mut in_string) = (0, false);
    while i < text.len() {
        match (in_string, text[i]) {
            (_, b'"') => in_string = !in_string,
            (true, b'\\') if text.get(i + 1) == Some(&b'u') => {
                let unit = hex(i + 2)?;
                let escape = || String::from_utf8_lossy(&text[i..i + 6]).into_owned();
                match unit {
                    0xD800..=0xDBFF => {
                        let low = (text.get(i + 6..i + 8) == Some(b"\\u")).then(|| hex(i + 8)).flatten();
                        if !matches!(low, Some(0xDC00..=0xDFFF)) {
                            return Some(escape());
                        }
                        i += 6;
                    }
                    0xDC00..=0xDFFF => return Some(escape()),
                    _ => {}
                }
                i += 5;
            }
            (true, b'\\') => i += 1,
            _ => {}
        }
        i += 1;
    }
    None
}

/// Where a value sits in a JSON document, for messages: `payload.a[0]`.
#[derive(Clone, Copy)]
enum Step<'a> {
    Root,
    Key(&'a str, &'a Step<'a>),
    Index(usize, &'a Step<'a>),
}

impl std::fmt::Display for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Root => f.write_str("payload"),
            Step::Key(key, up) => write!(f, "{up}.{key}"),
            Step::Index(i, up) => write!(f, "{up}[{i}]"),
        }
    }
}

/// Walks a JSON document and fails at the first object with a key twice.
/// (Numbers come as serde_json's one-entry marker map under
/// `arbitrary_precision`; that map has one key, so it passes.)
struct Unique<'a>(&'a Step<'a>);

impl<'de> serde::de::DeserializeSeed<'de> for Unique<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Unique<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(Unique(&Step::Index(i, self.0)))?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key {key:?} in {}", self.0)));
            }
            map.next_value_seed(Unique(&Step::Key(&key, self.0)))?;
            seen.insert(key);
        }
        Ok(())
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
        // A device's bytes: shown as JSON only if a `Value` keeps them exactly.
        Payload::render_into(&self.payload, exact_json(&self.payload).ok(), &mut obj);
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
    /// The device's answer was larger than its receiver forwards.
    ResultTooLarge,
}

impl FailureKind {
    pub const ALL: [FailureKind; 5] = [
        FailureKind::DeviceError,
        FailureKind::DeadlinePassed,
        FailureKind::AttemptsExhausted,
        FailureKind::Canceled,
        FailureKind::ResultTooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::DeviceError => "device_error",
            FailureKind::DeadlinePassed => "deadline_passed",
            FailureKind::AttemptsExhausted => "attempts_exhausted",
            FailureKind::Canceled => "canceled",
            FailureKind::ResultTooLarge => "result_too_large",
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
    /// When the caller asked to cancel a command that may already be at a
    /// receiver or its device: from then on it is never sent again, and it
    /// becomes `canceled` only on a receiver's word that it did not write it.
    pub cancel_requested_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub result: Option<DeviceResult>,
    pub error: Option<Failure>,
    pub idempotency_key: Option<String>,
    /// MQTT callers: where the final answer goes (not shown in JSON).
    pub reply_to: Option<ReplyTo>,
    /// The receiver the current attempt was published to (`None` before the
    /// first): only its reports move the command.
    pub sent_to: Option<String>,
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
        put("cancel_requested_at", opt_time(self.cancel_requested_at));
        put("completed_at", opt_time(self.completed_at));
        put("result", self.result.as_ref().map_or(Value::Null, DeviceResult::to_json));
        let error = match &self.error {
            Some(f) => serde_json::json!({"kind": f.kind.as_str(), "message": f.message}),
            None => Value::Null,
        };
        put("error", error);
        put("idempotency_key", self.idempotency_key.clone().map_or(Value::Null, Value::String));
        // Checked by `exact_json` when it was accepted and stored as its
        // compact serialization: a plain parse gives it back, on this hot path
        // (every answer and listing) without checking it again.
        let bytes = &self.payload.bytes;
        let parsed = self.payload.is_json.then(|| serde_json::from_slice(bytes).ok()).flatten();
        Payload::render_into(bytes, parsed, &mut obj);
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
    /// With `Sent`: the receiver the first attempt goes to.
    pub sent_to: Option<String>,
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
            cancel_requested_at: None,
            completed_at: None,
            result: None,
            error: None,
            idempotency_key: self.idempotency_key.clone(),
            reply_to: self.reply_to.clone(),
            sent_to: self.sent_to.clone(),
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
            cancel_requested_at: None,
            completed_at: Some(2),
            result: Some(DeviceResult { code: 0, payload: b"ok".to_vec(), message: None }),
            error: None,
            idempotency_key: None,
            reply_to: None,
            sent_to: Some("receiver-1".into()),
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
    fn exact_json_keeps_numbers_and_key_order() {
        let compact = |t: &str| serde_json::to_string(&exact_json(t.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            compact(r#"{ "b" : 18446744073709551616, "a" : [1.0, -0, 0.1, 1E400, -9223372036854775809] }"#),
            r#"{"b":18446744073709551616,"a":[1.0,-0,0.1,1e+400,-9223372036854775809]}"#
        );
        assert_eq!(compact(r#""\ud83d\ude00 \u00e9 \/ \u0000""#), "\"\u{1F600} \u{e9} / \\u0000\"");
        assert_eq!(compact(r#""\\ud800""#), r#""\\ud800""#, "an escaped backslash, not an escape");
    }

    #[test]
    fn exact_json_refuses_what_a_value_would_change() {
        let why = |t: &str| exact_json(t.as_bytes()).unwrap_err();
        assert!(why(r#"{"a":{"b":[0,{"c":1,"c":1}]}}"#).starts_with(r#"duplicate key "c" in payload.a.b[1]"#));
        assert!(why(r#"{"a":1,"a":2}"#).starts_with(r#"duplicate key "a" in payload "#));
        assert!(why(r#"["\ud83d\ude00", "x\ud800y"]"#).starts_with(r"lone UTF-16 surrogate escape \ud800 "));
        assert!(why(r#""\udc00\ud800""#).starts_with(r"lone UTF-16 surrogate escape \udc00 "));
        assert!(why(r#""\ud800\u0041""#).starts_with(r"lone UTF-16 surrogate escape \ud800 "));
        // A device's answer that `exact_json` refuses is shown as its exact bytes.
        let v = DeviceResult { code: 0, payload: br#"{"a":1,"a":2}"#.to_vec(), message: None }.to_json();
        assert_eq!(v["payload_base64"], "eyJhIjoxLCJhIjoyfQ==");
        assert!(v.get("payload").is_none());
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
