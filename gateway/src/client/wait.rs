//! Waiting on a command: long-polls `GET /v1/commands/{id}?wait_ms=` until
//! it is final or the caller's timeout passes, with a progress line on
//! stderr ("waiting for command … (delivered, 2.1 s)") when stderr is a
//! terminal, redrawn in place and erased at the end.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::api::{Answer, Api, ClientError};
use super::outcome::Exit;

/// The longest single long-poll: short enough that the status shown stays fresh.
const POLL: Duration = Duration::from_secs(5);
/// How often the progress line is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

/// The progress line's state: what is waited for, and the status last seen
/// (behind a std mutex: locked only to read or swap a short string, never
/// across an `.await`).
#[derive(Debug)]
struct Progress {
    label: String,
    status: Mutex<Option<String>>,
    started: Instant,
}

impl Progress {
    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        match self.status.lock().unwrap().as_deref() {
            Some(status) => format!("{} ({status}, {elapsed:.1} s)", self.label),
            None => format!("{} ({elapsed:.1} s)", self.label),
        }
    }
}

/// Runs `work`, redrawing `progress` on stderr meanwhile if it is a terminal.
async fn drawn<T>(progress: &Progress, work: impl Future<Output = T>) -> T {
    let mut stderr = std::io::stderr();
    if !stderr.is_terminal() {
        return work.await;
    }
    let mut work = std::pin::pin!(work);
    let mut redraw = tokio::time::interval(REDRAW);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = redraw.tick() => {
                // `\r` and "erase line": the line is rewritten in place.
                let _ = write!(stderr, "\r\x1b[2K{}", progress.line());
                let _ = stderr.flush();
            }
        }
    };
    let _ = write!(stderr, "\r\x1b[2K");
    out
}

/// `work` with a progress line reading `label (1.2 s)`.
pub(super) async fn with_progress<T>(label: &str, work: impl Future<Output = T>) -> T {
    let progress = Progress { label: label.to_owned(), status: Mutex::new(None), started: Instant::now() };
    drawn(&progress, work).await
}

/// The command `id` once final, or as it stands when `timeout` (none: no
/// limit) has passed.
pub(super) async fn until_final(
    api: &Api,
    id: &str,
    timeout: Option<Duration>,
) -> Result<Answer, ClientError> {
    let progress = Progress {
        label: format!("waiting for command {id}"),
        status: Mutex::new(None),
        started: Instant::now(),
    };
    let deadline = timeout.map(|t| progress.started + t);
    drawn(&progress, async {
        // A plain read first, so that the progress line shows the status at once.
        let mut poll = Duration::ZERO;
        loop {
            let query = [("wait_ms", poll.as_millis().to_string())];
            let answer = api.get(&["v1", "commands", id], &query).await?;
            let status = answer.json["status"].as_str().unwrap_or_default().to_owned();
            let left = deadline.map_or(POLL, |d| d.saturating_duration_since(Instant::now()));
            if Exit::is_final(&status) || left.is_zero() {
                return Ok(answer);
            }
            *progress.status.lock().unwrap() = Some(status);
            poll = left.min(POLL);
        }
    })
    .await
}
