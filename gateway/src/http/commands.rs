//! `/v1/devices/{id}/commands` and `/v1/commands`: submit (sync or async),
//! read with an optional long-poll, list, event log, cancel, and the
//! summary the console charts. Requests that wait count as busy for a
//! graceful shutdown (`crate::shutdown`).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json_body, page_limit, parse_id, ApiPath, ApiQuery};
use crate::app::App;
use crate::command::{now_ms, rfc3339, Command, Status};
use crate::config::MAX_WAIT_MS;
use crate::error::ApiError;
use crate::store::{CommandFilter, Window};
use crate::submit::{CommandRequest, Mode};

/// `POST /v1/devices/{device_id}/commands`: async → 202 with the id; sync →
/// 200 with the final command, or 202 with it as it stands when `wait_ms` ran out.
pub(super) async fn submit(
    State(app): State<App>,
    ApiPath(device_id): ApiPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let _busy = app.lifecycle().busy();
    let body: CommandRequest = json_body(&app, req.into_body()).await?;
    let sync = body.mode != Some(Mode::Async);
    let submitted = app.submit(&device_id, &body, sync).await?;
    if !sync {
        let command = submitted.command;
        let body = json!({"id": command.id.to_string(), "status": command.status.as_str()});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(app.config().default_wait_ms));
    let command = app.wait_submitted(submitted, wait).await?;
    Ok(command_response(&command))
}

/// 200 with a final command, 202 with one still under way.
fn command_response(command: &Command) -> Response {
    let status = if command.status.is_final() { StatusCode::OK } else { StatusCode::ACCEPTED };
    (status, Json(command.to_json())).into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct LongPoll {
    wait_ms: Option<u64>,
}

/// `GET /v1/commands/{id}?wait_ms=`: a plain GET answers 200 whatever the
/// status; only a long-poll that timed out says 202.
pub(super) async fn get(
    State(app): State<App>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LongPoll>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let wait = checked_wait(q.wait_ms.unwrap_or(0))?;
    let _busy = app.lifecycle().busy();
    let command = app.wait_final(id, Duration::from_millis(wait)).await?;
    let command = command.ok_or_else(|| ApiError::not_found(format!("no command {id}")))?;
    if wait > 0 && !command.status.is_final() {
        return Ok(command_response(&command));
    }
    Ok(Json(command.to_json()).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct CommandPage {
    device_id: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/commands?device_id=&status=&limit=&cursor=`: newest first; `next_cursor` for the next page.
pub(super) async fn list(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<CommandPage>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => {
            Some(Status::parse(s).ok_or_else(|| ApiError::bad_request(format!("unknown status {s:?}")))?)
        }
    };
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse().map_err(|_| ApiError::bad_request(format!("bad cursor {c:?}")))?),
    };
    let filter = CommandFilter { device_id: q.device_id, status, before, limit: page_limit(q.limit)? };
    let commands = app.store().list_commands(&filter).await?;
    let next =
        (commands.len() as i64 == filter.limit).then(|| commands.last().map(|c| c.id.to_string())).flatten();
    let items: Vec<Value> = commands.iter().map(Command::to_json).collect();
    Ok(Json(json!({"items": items, "next_cursor": next})))
}

/// `GET /v1/commands/{id}/events`: the command's transition log, oldest first.
pub(super) async fn events(
    State(app): State<App>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    if app.store().get_command(id).await?.is_none() {
        return Err(ApiError::not_found(format!("no command {id}")));
    }
    let events = app.store().events(id).await?;
    let items: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut item =
                json!({"at": rfc3339(e.at), "from": e.from, "to": e.to, "attempt": e.attempt, "detail": e.detail});
            if e.repeats > 1 {
                item["repeats"] = json!(e.repeats);
                item["last_at"] = json!(e.last_at.map(rfc3339));
            }
            item
        })
        .collect();
    Ok(Json(json!({"command_id": id.to_string(), "items": items})))
}

/// `POST /v1/commands/{id}/cancel[?wait_ms=N]`: 200 with the `canceled`
/// command; 202 with the command as it stands when its cancel is requested
/// and the outcome did not come within `wait_ms` (default
/// [`CANCEL_WAIT_MS`]); 409 when it is (or became) final otherwise.
pub(super) async fn cancel(
    State(app): State<App>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LongPoll>,
) -> Result<Response, ApiError> {
    let wait = checked_wait(q.wait_ms.unwrap_or(CANCEL_WAIT_MS))?;
    let _busy = app.lifecycle().busy();
    Ok(match app.cancel(parse_id(&id)?, Duration::from_millis(wait)).await? {
        crate::cancel::Canceled::Yes(command) => (StatusCode::OK, Json(command.to_json())).into_response(),
        crate::cancel::Canceled::Requested(command) => {
            (StatusCode::ACCEPTED, Json(command.to_json())).into_response()
        }
    })
}

/// A `wait_ms` query value, at most [`MAX_WAIT_MS`].
fn checked_wait(wait: u64) -> Result<u64, ApiError> {
    if wait > MAX_WAIT_MS {
        return Err(ApiError::bad_request(format!("wait_ms must be at most {MAX_WAIT_MS}")));
    }
    Ok(wait)
}

/// How long a cancel waits for a receiver's answer unless `wait_ms` says.
pub(super) const CANCEL_WAIT_MS: u64 = 5_000;

#[derive(Debug, Deserialize)]
pub(super) struct SummaryQuery {
    minutes: Option<i64>,
    buckets: Option<usize>,
}

/// Longest summary window, in minutes (a day).
const MAX_SUMMARY_MINUTES: i64 = 24 * 60;
/// Most buckets in a summary.
const MAX_SUMMARY_BUCKETS: usize = 120;

/// `GET /v1/commands/summary?minutes=60&buckets=12`: commands created in the
/// last `minutes` (1 to 1440, default 60), per status, in `buckets` equal
/// buckets (1 to 120, default 12) whose edges are multiples of the bucket
/// length since the epoch (the last one holds now); and the devices
/// registered and online. `{"since", "until", "bucket_ms", "buckets":
/// [{"start", "counts": {status: n}}], "totals": {status: n}, "devices":
/// {"registered", "online"}}`, every status present in each `counts`.
pub(super) async fn summary(
    State(app): State<App>,
    ApiQuery(q): ApiQuery<SummaryQuery>,
) -> Result<Json<Value>, ApiError> {
    let window = summary_window(q.minutes.unwrap_or(60), q.buckets.unwrap_or(12), now_ms())?;
    let summary = app.store().summary(window).await?;
    let by_status = |counts: &[u64]| -> Value {
        Status::ALL.iter().zip(counts).map(|(s, n)| (s.as_str().to_owned(), json!(n))).collect()
    };
    let mut totals = [0u64; Status::ALL.len()];
    let mut buckets = Vec::with_capacity(summary.counts.len());
    for (i, counts) in summary.counts.iter().enumerate() {
        totals.iter_mut().zip(counts).for_each(|(t, n)| *t += n);
        let start = window.since + i as i64 * window.bucket_ms;
        buckets.push(json!({"start": rfc3339(start), "counts": by_status(counts)}));
    }
    let until = window.since + window.bucket_ms * window.buckets as i64;
    Ok(Json(json!({
        "since": rfc3339(window.since),
        "until": rfc3339(until),
        "bucket_ms": window.bucket_ms,
        "buckets": buckets,
        "totals": by_status(&totals),
        "devices": {"registered": summary.devices, "online": summary.online},
    })))
}

/// The window of a summary ending with the bucket that holds `now`.
fn summary_window(minutes: i64, buckets: usize, now: i64) -> Result<Window, ApiError> {
    if !(1..=MAX_SUMMARY_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!("minutes must be 1 to {MAX_SUMMARY_MINUTES}")));
    }
    if !(1..=MAX_SUMMARY_BUCKETS).contains(&buckets) {
        return Err(ApiError::bad_request(format!("buckets must be 1 to {MAX_SUMMARY_BUCKETS}")));
    }
    let buckets_i64 = buckets as i64;
    let bucket_ms = (minutes * 60_000 + buckets_i64 - 1) / buckets_i64;
    let end = (now / bucket_ms + 1) * bucket_ms;
    Ok(Window { since: end - bucket_ms * buckets as i64, bucket_ms, buckets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_window_ends_with_the_bucket_of_now() {
        let w = summary_window(60, 12, 3_600_000 * 100 + 1).unwrap();
        assert_eq!(w.bucket_ms, 300_000);
        assert_eq!(w.since + w.bucket_ms * 12, 3_600_000 * 100 + 300_000);
        let w = summary_window(1, 7, 10_000).unwrap();
        assert!(w.bucket_ms * 7 >= 60_000 && w.since <= 10_000 - 60_000 + w.bucket_ms);
        assert!(summary_window(0, 12, 0).is_err());
        assert!(summary_window(60, 0, 0).is_err());
        assert!(summary_window(60, 121, 0).is_err());
        assert!(summary_window(1441, 12, 0).is_err());
    }
}
