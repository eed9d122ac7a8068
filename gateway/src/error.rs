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
            ErrorKind::Internal => "internal",
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
            ErrorKind::Internal => 500,
        }
    }
}

/// A refused request: `{"error": {"kind", "message"}}` in JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into() }
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
        serde_json::json!({"error": {"kind": self.kind, "message": self.message}})
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
    }
}
