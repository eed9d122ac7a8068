//! Why a request was refused, as callers see it: an [`ErrorKind`] (the JSON
//! `error.kind`, and the HTTP status) and a message. Nothing is stored for a
//! refused submission. Store failures are mapped here so that no database
//! text ever reaches a caller (it goes to the log).

use serde::Serialize;
use serde_json::Value;

use crate::store::StoreError;

/// The `error.kind` of an API error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the request is malformed or a field is out of range.
    BadRequest,
    /// 404: no such device, command or route.
    NotFound,
    /// 409: the request contradicts the state (disabled device, final
    /// command, idempotency key reused with another request).
    Conflict,
    /// 413: body or payload over the limit.
    PayloadTooLarge,
    /// 405.
    MethodNotAllowed,
    /// 503: the store cannot be reached, or kept changing; nothing was changed, try again.
    StoreUnavailable,
    /// 500: a stored row does not make sense (see the log).
    Internal,
    /// 503: the gateway is shutting down and takes no new submissions; with
    /// `Retry-After` (another instance, or this one restarted, will).
    ShuttingDown,
    /// 401: no API key, or one that is malformed, unknown or revoked
    /// (with `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// 403: the API key lacks the scope the route needs (the message names it).
    Forbidden,
    /// 414: the request's URI (path and query) is too long.
    UriTooLong,
    /// 415: a write without `Content-Type: application/json`.
    UnsupportedMediaType,
    /// 429: the API key submitted faster than its rate (`--submit-rate-per-key`);
    /// with `Retry-After`.
    RateLimited,
    /// 429: the device has as many non-final commands as it may
    /// (`--max-device-queue`, the message names the cap); with `Retry-After`.
    DeviceQueueFull,
    /// 503: the gateway's queue for this kind of work is full (MQTT
    /// submissions, `--mqtt-submission-queue`); nothing was accepted, try again
    /// after the hint.
    Overloaded,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::StoreUnavailable => "store_unavailable",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::UnsupportedMediaType => "unsupported_media_type",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::DeviceQueueFull => "device_queue_full",
            ErrorKind::Overloaded => "overloaded",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::StoreUnavailable => 503,
            ErrorKind::ShuttingDown => 503,
            ErrorKind::Internal => 500,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::UriTooLong => 414,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::RateLimited | ErrorKind::DeviceQueueFull => 429,
            ErrorKind::Overloaded => 503,
        }
    }

    /// The kind of an error status some layer other than the handlers
    /// answered with (axum's rejections, fallbacks): the kind of that status,
    /// else `bad_request` for a 4xx and `internal` for the rest.
    pub fn for_status(status: u16) -> ErrorKind {
        const KINDS: [ErrorKind; 15] = [
            ErrorKind::BadRequest,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::PayloadTooLarge,
            ErrorKind::MethodNotAllowed,
            ErrorKind::StoreUnavailable,
            ErrorKind::Internal,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::UriTooLong,
            ErrorKind::UnsupportedMediaType,
            ErrorKind::RateLimited,
            ErrorKind::DeviceQueueFull,
            ErrorKind::Overloaded,
            ErrorKind::ShuttingDown,
        ];
        match KINDS.into_iter().find(|k| k.http_status() == status) {
            Some(kind) => kind,
            None if (400..500).contains(&status) => ErrorKind::BadRequest,
            None => ErrorKind::Internal,
        }
    }
}

/// A refused request: `{"error": {"kind", "message"}}` in JSON, plus
/// `"retry_after_ms"` when the caller should wait before trying again (HTTP
/// also says it in `Retry-After`, in whole seconds rounded up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// How long to wait before trying again, in ms (limits and full queues).
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into(), retry_after_ms: None }
    }

    /// The same error with a retry hint, in ms.
    pub fn retry_after(mut self, ms: u64) -> ApiError {
        self.retry_after_ms = Some(ms);
        self
    }

    /// The retry hint in whole seconds, rounded up, at least 1 (`Retry-After`).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_ms.map(|ms| ms.div_ceil(1000).max(1))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Conflict, message)
    }

    /// The store could not take the request; nothing was accepted.
    pub fn unavailable() -> ApiError {
        ApiError::new(ErrorKind::StoreUnavailable, "store unavailable, nothing was accepted; try again")
    }

    pub fn to_json(&self) -> Value {
        let mut body = serde_json::json!({"error": {"kind": self.kind, "message": self.message}});
        if let Some(ms) = self.retry_after_ms {
            body["error"]["retry_after_ms"] = ms.into();
        }
        body
    }
}

impl From<StoreError> for ApiError {
    /// Logs the store's own words, tells the caller only the kind.
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "store error");
        match e {
            StoreError::Unavailable(_) | StoreError::Contention(_) => ApiError::unavailable(),
            StoreError::Duplicate(_) => ApiError::conflict("the record exists already"),
            StoreError::Corrupt(_) | StoreError::BadUrl(_) | StoreError::Migrate(_) => {
                ApiError::new(ErrorKind::Internal, "internal error (see the gateway's log)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_never_leak_database_text() {
        let e = ApiError::from(StoreError::Unavailable(sqlx::Error::Protocol("secret table t_x".into())));
        assert_eq!((e.kind.http_status(), e.kind.as_str()), (503, "store_unavailable"));
        assert!(!e.to_json().to_string().contains("secret"), "{}", e.to_json());
        let e = ApiError::from(StoreError::Contention("command kept changing".into()));
        assert_eq!(e.kind, ErrorKind::StoreUnavailable);
    }

    #[test]
    fn kinds_serialise_as_their_names() {
        let e = ApiError::new(ErrorKind::PayloadTooLarge, "too big");
        assert_eq!(e.to_json()["error"]["kind"], ErrorKind::PayloadTooLarge.as_str());
        assert_eq!(e.to_json()["error"]["message"], "too big");
        assert!(e.to_json()["error"].get("retry_after_ms").is_none());
    }

    #[test]
    fn a_retry_hint_is_in_the_body_and_in_whole_seconds() {
        let e = ApiError::new(ErrorKind::RateLimited, "slow down").retry_after(1_200);
        assert_eq!(e.to_json()["error"]["retry_after_ms"], 1_200);
        assert_eq!(e.retry_after_secs(), Some(2));
        assert_eq!(ApiError::new(ErrorKind::Overloaded, "x").retry_after(3).retry_after_secs(), Some(1));
        assert_eq!(ErrorKind::for_status(429), ErrorKind::RateLimited);
        assert_eq!(ErrorKind::for_status(503), ErrorKind::StoreUnavailable);
    }
}
