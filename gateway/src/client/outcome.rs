//! Exit codes scripts can rely on (the table is `super::EXIT_CODES`): how the
//! client's call went, and for a command it waited on, how that command
//! ended, read from the API's `status`, `error.kind` and `delivered_at`.

use serde_json::Value;

/// The process's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The call worked; a command waited on succeeded.
    Ok = 0,
    /// Anything else (e.g. stdout closed).
    Error = 1,
    /// Bad flags, payload or key file (clap's own usage errors are 2 too).
    Usage = 2,
    /// No HTTP answer from the gateway.
    Unreachable = 3,
    /// An HTTP error status (or an answer the API does not document).
    HttpError = 4,
    /// `failed` with the device's error (`device_error`, `result_too_large`).
    Failed = 10,
    /// `failed`, `attempts_exhausted` after it was delivered: the device
    /// never answered.
    TimedOut = 11,
    /// `expired`: the deadline passed first.
    Expired = 12,
    /// `canceled`.
    Canceled = 13,
    /// `failed`, `attempts_exhausted` and never delivered: no receiver
    /// wrote it to the device.
    Undeliverable = 14,
    /// Not final when the wait ended.
    NotFinal = 15,
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit as u8)
    }
}

impl Exit {
    /// How a command (the API's `Command` JSON) stands, as an exit code.
    pub fn of_command(command: &Value) -> Exit {
        match command["status"].as_str() {
            Some("succeeded") => Exit::Ok,
            Some("failed") if command["error"]["kind"] == "attempts_exhausted" => {
                match command["delivered_at"].is_null() {
                    true => Exit::Undeliverable,
                    false => Exit::TimedOut,
                }
            }
            Some("failed") => Exit::Failed,
            Some("expired") => Exit::Expired,
            Some("canceled") => Exit::Canceled,
            _ => Exit::NotFinal,
        }
    }

    /// Whether a command with this status string is final.
    pub fn is_final(status: &str) -> bool {
        matches!(status, "succeeded" | "failed" | "expired" | "canceled")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command(status: &str, error: Option<&str>, delivered: bool) -> Value {
        json!({
            "status": status,
            "error": error.map(|kind| json!({"kind": kind, "message": null})),
            "delivered_at": delivered.then_some("2026-11-30T08:00:00.000Z"),
        })
    }

    #[test]
    fn every_ending_has_its_own_code() {
        let cases = [
            (command("succeeded", None, true), Exit::Ok),
            (command("failed", Some("device_error"), true), Exit::Failed),
            (command("failed", Some("result_too_large"), true), Exit::Failed),
            (command("failed", Some("attempts_exhausted"), true), Exit::TimedOut),
            (command("failed", Some("attempts_exhausted"), false), Exit::Undeliverable),
            (command("expired", Some("deadline_passed"), false), Exit::Expired),
            (command("canceled", Some("canceled"), false), Exit::Canceled),
        ];
        for (c, exit) in &cases {
            assert_eq!(Exit::of_command(c), *exit, "{c}");
            assert!(Exit::is_final(c["status"].as_str().unwrap()));
        }
        for status in ["scheduled", "pending", "sent", "delivered"] {
            assert_eq!(Exit::of_command(&command(status, None, false)), Exit::NotFinal);
            assert!(!Exit::is_final(status));
        }
    }

    #[test]
    fn the_help_table_lists_every_code() {
        let all = [
            Exit::Ok,
            Exit::Error,
            Exit::Usage,
            Exit::Unreachable,
            Exit::HttpError,
            Exit::Failed,
            Exit::TimedOut,
            Exit::Expired,
            Exit::Canceled,
            Exit::Undeliverable,
            Exit::NotFinal,
        ];
        let listed: Vec<u8> = super::super::EXIT_CODES
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(listed, all.map(|e| e as u8));
    }
}
