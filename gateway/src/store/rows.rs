//! Rows ↔ domain types: the column lists, reading a device or a command from
//! a row, and the values a move writes. A row that does not map is `Corrupt`.

use protocol::DeviceId;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Device, Query, Result, StoreError};
use crate::command::{Command, DeviceResult, Failure, FailureKind, Payload, ReplyTo, Status};

/// A device's columns and the join that gives its presence, as a literal
/// (both device queries below are built from it).
macro_rules! device_select {
    ($extra:literal) => {
        concat!(
            "SELECT d.id, d.enabled, d.labels, d.created_at, d.updated_at, \
             p.online, p.receiver_id, p.seen_at",
            $extra,
            " FROM devices d LEFT JOIN device_presence p ON p.device_id = d.id"
        )
    };
}

pub(super) const DEVICE_SELECT: &str = device_select!("");

/// [`DEVICE_SELECT`] with `queued`: the device's commands not yet final
/// (`next_attempt_at` is set until a command is final; the
/// `commands_device_queue` index covers the count).
pub(super) const DEVICE_SELECT_QUEUED: &str = device_select!(
    ", (SELECT COUNT(*) FROM commands c WHERE c.device_id = d.id AND c.next_attempt_at IS NOT NULL) AS queued"
);

pub(super) const COMMAND_COLUMNS: &str = "id, device_id, name, payload, payload_json, status, attempts, \
    max_attempts, created_at, scheduled_at, expires_at, next_attempt_at, updated_at, delivered_at, cancel_requested_at, \
    completed_at, result_code, result_payload, result_message, error_kind, error_message, idempotency_key, \
    request_hash, reply_to, correlation_id, sent_to";

fn corrupt(what: &str, value: impl std::fmt::Debug) -> StoreError {
    StoreError::Corrupt(format!("bad {what} {value:?}"))
}

fn device_id(row: &AnyRow, column: &str) -> Result<DeviceId> {
    let id: String = row.try_get(column)?;
    DeviceId::try_from(id).map_err(|e| corrupt("device id", e.0))
}

pub(super) fn device_from_row(row: &AnyRow) -> Result<Device> {
    let labels: String = row.try_get("labels")?;
    Ok(Device {
        id: device_id(row, "id")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        online: row.try_get::<Option<i64>, _>("online")?.unwrap_or(0) != 0,
        receiver_id: row.try_get("receiver_id")?,
        seen_at: row.try_get("seen_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(super) fn command_from_row(row: &AnyRow) -> Result<Command> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let result = match row.try_get::<Option<i64>, _>("result_code")? {
        Some(code) => Some(DeviceResult {
            code,
            payload: row.try_get::<Option<Vec<u8>>, _>("result_payload")?.unwrap_or_default(),
            message: row.try_get("result_message")?,
        }),
        None => None,
    };
    let error = match row.try_get::<Option<String>, _>("error_kind")? {
        Some(kind) => Some(Failure {
            kind: FailureKind::parse(&kind).ok_or_else(|| corrupt("error kind", &kind))?,
            message: row.try_get::<Option<String>, _>("error_message")?.unwrap_or_default(),
        }),
        None => None,
    };
    let reply_to = match row.try_get::<Option<String>, _>("reply_to")? {
        Some(topic) => Some(ReplyTo {
            topic,
            correlation_id: row.try_get::<Option<String>, _>("correlation_id")?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Command {
        id: id.parse().map_err(|_| corrupt("command id", &id))?,
        device_id: device_id(row, "device_id")?,
        name: row.try_get("name")?,
        payload: Payload {
            bytes: row.try_get("payload")?,
            is_json: row.try_get::<i64, _>("payload_json")? != 0,
        },
        status: Status::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        scheduled_at: row.try_get("scheduled_at")?,
        expires_at: row.try_get("expires_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        delivered_at: row.try_get("delivered_at")?,
        cancel_requested_at: row.try_get("cancel_requested_at")?,
        completed_at: row.try_get("completed_at")?,
        result,
        error,
        idempotency_key: row.try_get("idempotency_key")?,
        reply_to,
        sent_to: row.try_get("sent_to")?,
    })
}

/// The columns a move may change, and how to read each from a command: the
/// one list both compare-and-set forms (`update_if_unchanged`,
/// `update_all_if_unchanged`) write.
pub(super) type MovedColumn = (&'static str, fn(&Command) -> Bound<'_>);
pub(super) const MOVED_COLUMNS: [MovedColumn; 13] = [
    ("status", |c| Bound::Text(Some(c.status.as_str()))),
    ("attempts", |c| Bound::Int(Some(c.attempts))),
    ("updated_at", |c| Bound::Int(Some(c.updated_at))),
    ("delivered_at", |c| Bound::Int(c.delivered_at)),
    ("cancel_requested_at", |c| Bound::Int(c.cancel_requested_at)),
    ("completed_at", |c| Bound::Int(c.completed_at)),
    ("result_code", |c| Bound::Int(c.result.as_ref().map(|r| r.code))),
    ("result_payload", |c| Bound::Bytes(c.result.as_ref().map(|r| r.payload.as_slice()))),
    ("result_message", |c| Bound::Text(c.result.as_ref().and_then(|r| r.message.as_deref()))),
    ("error_kind", |c| Bound::Text(c.error.as_ref().map(|e| e.kind.as_str()))),
    ("error_message", |c| Bound::Text(c.error.as_ref().map(|e| e.message.as_str()))),
    ("next_attempt_at", |c| Bound::Int(c.next_attempt_at)),
    ("sent_to", |c| Bound::Text(c.sent_to.as_deref())),
];

/// A value to bind whose type is only known at run time, borrowed from the
/// command it was read from (comparing and binding copy nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bound<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
    Bytes(Option<&'a [u8]>),
}

impl<'a> Bound<'a> {
    pub(super) fn bind_to(self, q: Query<'a>) -> Query<'a> {
        match self {
            Bound::Int(v) => q.bind(v),
            Bound::Text(v) => q.bind(v),
            Bound::Bytes(v) => q.bind(v),
        }
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub(super) fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
