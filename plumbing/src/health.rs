//! Liveness and readiness, as the gateway and the receiver answer them:
//! `GET /healthz` is 200 `ok` while the process serves HTTP at all;
//! `GET /readyz` is 200 when every check passes and 503 otherwise, with a
//! JSON body naming each check and what is wrong. Each program decides what
//! it checks; this module only shapes the answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

/// The outcome of one readiness check: `Ok`, or why it is not ready (one
/// short phrase, e.g. `"not connected"`).
pub type Outcome = Result<(), String>;

/// A yes/no condition one task sets and `/readyz` reads (e.g. "connected to
/// the broker"). Cheap to clone; starts false.
#[derive(Debug, Clone, Default)]
pub struct Flag(Arc<AtomicBool>);

impl Flag {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Ok` when set, else `Err(why)`.
    pub fn outcome(&self, why: &str) -> Outcome {
        if self.get() {
            Ok(())
        } else {
            Err(why.to_owned())
        }
    }
}

/// The `/readyz` answer for `checks` (name, outcome), in their order:
/// 200 `{"ready": true, "checks": {"database": "ok", …}, "not_ready": []}`,
/// or 503 with `"ready": false`, each failing check's reason in `checks` and
/// its name in `not_ready`.
pub fn answer(checks: &[(&str, Outcome)]) -> Response {
    let mut by_name = Map::new();
    let mut not_ready = Vec::new();
    for (name, outcome) in checks {
        let text = match outcome {
            Ok(()) => "ok".to_owned(),
            Err(why) => {
                not_ready.push(Value::from(*name));
                why.clone()
            }
        };
        by_name.insert((*name).to_owned(), Value::from(text));
    }
    let ready = not_ready.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready, "checks": by_name, "not_ready": not_ready}))).into_response()
}

/// `GET /healthz` (200 `ok`) and `GET /readyz` (see [`answer`]) for checks
/// that need no I/O: `checks` is called on each request.
pub fn router<F>(checks: F) -> Router
where
    F: Fn() -> Vec<(&'static str, Outcome)> + Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || std::future::ready(answer(&checks()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(response: Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn ready_only_when_every_check_passes() {
        let flag = Flag::default();
        let checks = |flag: &Flag| vec![("database", Ok(())), ("broker", flag.outcome("not connected"))];
        let (status, json) = body(answer(&checks(&flag))).await;
        assert_eq!(status, 503);
        assert_eq!(
            json,
            json!({"ready": false, "checks": {"database": "ok", "broker": "not connected"}, "not_ready": ["broker"]})
        );
        flag.set(true);
        let (status, json) = body(answer(&checks(&flag))).await;
        assert_eq!((status, &json["ready"], &json["not_ready"]), (200, &json!(true), &json!([])));
    }
}
