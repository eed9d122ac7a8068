//! Every size limit along a command's way, in one place (PROTOCOL.md §7 is
//! the same table for people). Each is enforced at the edge that can say
//! why, and the limits further down are derived from those above them, so
//! that nothing legal upstream is refused — or turns into a dropped
//! connection — downstream.
//!
//! | what | limit | enforced by, and the answer |
//! |---|---|---|
//! | command payload | gateway `--max-payload-bytes`, default [`DEFAULT_MAX_PAYLOAD`], at most [`crate::frame::MAX_PAYLOAD`] | gateway: 413 `payload_too_large` / MQTT `rejected` |
//! | HTTP request body | [`http_body_limit`] of the payload limit | gateway: 413 |
//! | device answer (RESULT payload) | receiver `--max-result-bytes`, default [`DEFAULT_MAX_RESULT`], at most [`crate::frame::MAX_PAYLOAD`] | receiver: the command fails at once, `result_too_large` with size and limit |
//! | device frame body | [`crate::frame::DEFAULT_MAX_BODY`] | receiver: a bad frame, counted; the connection stays |
//! | one MQTT message (a command or report batch, a reply) | [`mqtt_message_limit`] of the larger payload limit | senders cut batches to it; a reply too large for it is sent without the payload and result |
//! | embedded broker packet | the same [`mqtt_message_limit`] | (nothing legal exceeds it) |
//! | database columns | MEDIUMBLOB (16 MiB) on MariaDB, unbounded BLOB on SQLite | — |

/// Default largest command payload, in bytes (gateway `--max-payload-bytes`).
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// Default largest device answer a receiver forwards, in bytes (receiver
/// and gateway `--max-result-bytes`; the gateway sizes its embedded broker
/// with it). Larger answers fail their command with `result_too_large`.
pub const DEFAULT_MAX_RESULT: usize = 256 * 1024;

/// Room in one MQTT message for everything but the base64 payload: ids,
/// topics, field names, a command name of up to 255 bytes, a reason text.
pub const ENVELOPE_ALLOWANCE: usize = 4 * 1024;

/// The largest MQTT message needed to carry one command or one report whose
/// payload is at most `max_payload` bytes: the payload as base64 (4 bytes
/// per 3) plus [`ENVELOPE_ALLOWANCE`]. Batches are cut to this size, and the
/// embedded broker's packet limit is at least this.
pub const fn mqtt_message_limit(max_payload: usize) -> usize {
    max_payload.div_ceil(3) * 4 + ENVELOPE_ALLOWANCE
}

/// The largest HTTP request body for a payload limit: a JSON payload may
/// take up to twice its bytes when escaped (`"\n"` for a newline), or 4/3 as
/// base64, plus the other fields.
pub const fn http_body_limit(max_payload: usize) -> usize {
    max_payload * 2 + 64 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn a_report_with_the_largest_result_fits_one_message() {
        let payload = vec![0xffu8; DEFAULT_MAX_RESULT];
        let report = crate::envelope::Report {
            command_id: uuid::Uuid::now_v7(),
            device_id: crate::DeviceId::parse(&"d".repeat(crate::frame::MAX_DEVICE_ID_LEN)).unwrap(),
            receiver_id: "r".repeat(255),
            kind: crate::envelope::ReportKind::Result { code: i32::MIN, payload_base64: payload.clone() },
        };
        let encoded = serde_json::to_vec(&report).unwrap();
        assert!(encoded.len() <= mqtt_message_limit(DEFAULT_MAX_RESULT), "{}", encoded.len());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&payload).len();
        assert!(mqtt_message_limit(DEFAULT_MAX_RESULT) - b64 >= 1024, "room for the envelope");
    }
}
