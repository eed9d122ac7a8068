//! JSON messages between gateway and receivers. Payload bytes travel as
//! standard base64 (`payload_base64`) so any binary payload survives.
//! Times are milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::DeviceId;

/// Gateway → receiver on `Topics::receiver_commands` (the receiver that holds
/// the device), QoS 1; one message may carry several (see `decode_one_or_many`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMessage {
    pub id: Uuid,
    pub device_id: DeviceId,
    pub name: String,
    #[serde(with = "b64")]
    pub payload_base64: Vec<u8>,
    /// 1 for the first publication, then one more per re-send.
    pub attempt: u32,
    /// The command's deadline; a receiver drops a command past it.
    pub expires_at_ms: i64,
    /// Where this command's reports go: the reports topic of the gateway
    /// instance that published this attempt (`Topics::instance_reports`).
    /// Absent: `Topics::reports`, the shared topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports_to: Option<String>,
}

/// Gateway → the receiver the command's current attempt went to, on
/// `Topics::receiver_cancels`, QoS 1: drop this command if it has not been
/// written to its device yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub command_id: Uuid,
    pub device_id: DeviceId,
}

/// Receiver → gateway on `Topics::reports`, QoS 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub command_id: Uuid,
    pub device_id: DeviceId,
    pub receiver_id: String,
    #[serde(flatten)]
    pub kind: ReportKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReportKind {
    /// The command frame was written to the device.
    Delivered,
    /// The command reached the receiver and waits there for its device
    /// (which has as many commands as it takes at once): not lost, so the
    /// gateway waits the result timeout, not the ack timeout, before re-sending.
    Queued,
    /// The device answered. `code` 0 is success, anything else the device's error code.
    Result {
        code: i32,
        #[serde(with = "b64")]
        payload_base64: Vec<u8>,
    },
    /// The receiver could not write the command (device not connected here,
    /// deadline passed). The gateway records it; re-sending is the sweeper's job.
    Undeliverable { reason: String },
    /// The device answered with `size` bytes, more than the receiver
    /// forwards (`limit`, its `--max-result-bytes`, see [`crate::limits`]):
    /// the command fails at once; re-sending would get the same answer.
    ResultTooLarge { size: u64, limit: u64 },
}

/// One message on `Topics::reports` or `Topics::receiver_commands`: a single
/// JSON object, or an array of them (a sender puts what it has ready into one
/// message), in the order they were sent.
pub fn decode_one_or_many<T: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<Vec<T>, serde_json::Error> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(payload),
        _ => serde_json::from_slice(payload).map(|one| vec![one]),
    }
}

/// Messages already serialised, joined into one body for `decode_one_or_many`:
/// one alone stays an object, several become an array.
pub fn join_messages(encoded: &[Vec<u8>]) -> Vec<u8> {
    if let [one] = encoded {
        return one.clone();
    }
    let mut body = Vec::with_capacity(encoded.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, e) in encoded.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.push(b']');
    body
}

/// Gateway → gateways on `Topics::finals`, QoS 0: command `command_id` is
/// final (read it from the store). Sent by the instance that committed the
/// final move; the others wake their waiters on it. A lost notice costs a
/// waiter its store re-check period, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalNotice {
    pub command_id: Uuid,
    /// The instance that sent it (it ignores its own notices).
    pub instance_id: String,
}

/// Receiver → gateway on `Topics::presence`, QoS 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub device_id: DeviceId,
    pub receiver_id: String,
    pub online: bool,
    /// The key generation the device authenticated with (PROTOCOL.md §5.9);
    /// absent when it did not authenticate (a serial or Modbus device, or a
    /// receiver that admits unauthenticated devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_generation: Option<u32>,
}

/// Receiver → gateway on `Topics::receiver_status`; the `online: false` form is
/// the receiver's MQTT last will, so a crashed receiver's devices go offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverStatus {
    pub receiver_id: String,
    pub online: bool,
    /// The receiver process's incarnation (random at each start; the same
    /// in its online statuses and its last will). A gateway takes an
    /// `online: false` only with the session of the receiver's latest
    /// `online: true`, so an old will or goodbye replayed later changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_shape() {
        let r = Report {
            command_id: Uuid::nil(),
            device_id: DeviceId::parse("d").unwrap(),
            receiver_id: "r".into(),
            kind: ReportKind::Result { code: 3, payload_base64: b"hi".to_vec() },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "result");
        assert_eq!(v["code"], 3);
        assert_eq!(v["payload_base64"], "aGk=");
        assert_eq!(serde_json::from_value::<Report>(v).unwrap(), r);
    }

    #[test]
    fn a_reports_message_is_one_report_or_an_array() {
        let report = |code| Report {
            command_id: Uuid::now_v7(),
            device_id: DeviceId::parse("d").unwrap(),
            receiver_id: "r".into(),
            kind: ReportKind::Result { code, payload_base64: vec![code as u8] },
        };
        let (a, b) = (report(1), report(2));
        let enc = |r: &Report| serde_json::to_vec(r).unwrap();
        let one = join_messages(&[enc(&a)]);
        assert_eq!(one, enc(&a), "a single report travels as an object");
        assert_eq!(decode_one_or_many::<Report>(&one).unwrap(), vec![a.clone()]);
        let two = join_messages(&[enc(&a), enc(&b)]);
        assert_eq!(two[0], b'[');
        assert_eq!(decode_one_or_many::<Report>(&two).unwrap(), vec![a, b], "order kept");
        let bad = decode_one_or_many::<Report>(b"[{\"kind\":\"delivered\"}]");
        assert!(bad.is_err(), "a bad element fails the message");
        assert!(decode_one_or_many::<Report>(b"  ").is_err());
    }

    #[test]
    fn bad_base64_is_an_error_not_a_panic() {
        let v = serde_json::json!({"command_id": Uuid::nil(), "device_id": "d", "receiver_id": "r",
            "kind": "result", "code": 0, "payload_base64": "@@@"});
        assert!(serde_json::from_value::<Report>(v).is_err());
    }
}
