//! What "running" a command means for a simulated device: pure functions from
//! the command (and a coin already tossed for random failure) to its answer,
//! and how long the device pretends to work on it.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::memory::Answer;

/// The command name that always fails, with the payload's `"code"` or this.
pub(crate) const FAIL_COMMAND: &str = "fail";
/// The command name whose answer is its own payload.
pub(crate) const ECHO_COMMAND: &str = "echo";
/// Code of a failure requested by a `fail` command without a `"code"`.
pub(crate) const DEFAULT_FAIL_CODE: i32 = 2;
/// Code of a failure drawn by `--fail-ratio`.
pub(crate) const RANDOM_FAIL_CODE: i32 = 1;
/// Cap on a payload's `"delay_ms"`, so a typo cannot park a device for days.
const MAX_REQUESTED_DELAY: Duration = Duration::from_secs(600);

/// The answer to command `name` on device `device_id`. `random_failure` is the
/// outcome of the `--fail-ratio` draw; a `fail` command ignores it.
pub(crate) fn execute(device_id: &str, name: &str, payload: &Bytes, random_failure: bool) -> Answer {
    if name == FAIL_COMMAND {
        let code = json_field(payload, "code")
            .and_then(|v| v.as_i64())
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(DEFAULT_FAIL_CODE);
        return json_answer(code, json!({"error": "requested failure"}));
    }
    if random_failure {
        return json_answer(RANDOM_FAIL_CODE, json!({"error": "simulated failure"}));
    }
    if name == ECHO_COMMAND {
        return Answer { code: 0, payload: payload.clone() };
    }
    json_answer(0, json!({"ok": true, "device": device_id, "command": name}))
}

/// Extra work time asked for by the payload's numeric `"delay_ms"`, if any.
pub(crate) fn requested_delay(payload: &[u8]) -> Duration {
    let millis = json_field(payload, "delay_ms").and_then(|v| v.as_f64());
    match millis {
        Some(ms) if ms.is_finite() && ms > 0.0 => {
            Duration::from_secs_f64(ms / 1000.0).min(MAX_REQUESTED_DELAY)
        }
        _ => Duration::ZERO,
    }
}

/// `payload[field]` if the payload is a JSON object that has it.
fn json_field(payload: &[u8], field: &str) -> Option<Value> {
    match serde_json::from_slice::<Value>(payload).ok()? {
        Value::Object(mut map) => map.remove(field),
        _ => None,
    }
}

fn json_answer(code: i32, body: Value) -> Answer {
    Answer { code, payload: Bytes::from(body.to_string()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(answer: &Answer) -> Value {
        serde_json::from_slice(&answer.payload).unwrap()
    }

    #[test]
    fn fail_uses_the_requested_code_or_two() {
        let answer = execute("d", "fail", &Bytes::new(), false);
        assert_eq!(answer.code, 2);
        assert_eq!(json_of(&answer), json!({"error": "requested failure"}));
        assert_eq!(execute("d", "fail", &Bytes::from(r#"{"code":7}"#), false).code, 7);
        assert_eq!(execute("d", "fail", &Bytes::from(r#"{"code":"7"}"#), false).code, 2);
        assert_eq!(execute("d", "fail", &Bytes::from(r#"{"code":1e20}"#), false).code, 2);
    }

    #[test]
    fn echo_returns_the_payload_bytes_unchanged() {
        let payload = Bytes::from_static(b"\x00\xffnot json");
        let answer = execute("d", "echo", &payload, false);
        assert_eq!(answer, Answer { code: 0, payload });
    }

    #[test]
    fn other_commands_report_ok_with_device_and_name() {
        let answer = execute("dev-0001", "reboot", &Bytes::new(), false);
        assert_eq!(answer.code, 0);
        assert_eq!(json_of(&answer), json!({"ok": true, "device": "dev-0001", "command": "reboot"}));
    }

    #[test]
    fn random_failure_applies_to_everything_but_fail() {
        let answer = execute("d", "echo", &Bytes::from_static(b"x"), true);
        assert_eq!(answer.code, 1);
        assert_eq!(json_of(&answer), json!({"error": "simulated failure"}));
        assert_eq!(execute("d", "fail", &Bytes::new(), true).code, 2);
    }

    #[test]
    fn delay_comes_from_a_numeric_delay_ms_field() {
        assert_eq!(requested_delay(br#"{"delay_ms":250}"#), Duration::from_millis(250));
        assert_eq!(requested_delay(br#"{"delay_ms":"250"}"#), Duration::ZERO);
        assert_eq!(requested_delay(br#"{"delay_ms":-5}"#), Duration::ZERO);
        assert_eq!(requested_delay(b"[1,2]"), Duration::ZERO);
        assert_eq!(requested_delay(b"garbage"), Duration::ZERO);
        assert_eq!(requested_delay(br#"{"delay_ms":1e12}"#), MAX_REQUESTED_DELAY);
    }
}
