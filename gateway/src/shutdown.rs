//! Graceful shutdown and readiness: what the gateway does between the first
//! SIGTERM/SIGINT and its exit, and what `/readyz` says meanwhile.
//! `server::Running::stopped` runs the steps in this order:
//!
//! 1. **Drain** — at the signal `/readyz` turns 503 (`shutdown`) and new
//!    submissions are refused (`503 shutting_down`, HTTP and MQTT). Sync calls
//!    and long-polls under way keep waiting for a final result, up to
//!    `--shutdown-grace-ms`; then each is answered with its command as it
//!    stands (`202`). When none is under way, this step ends at once.
//! 2. **Stop** — the HTTP server stops accepting and lets requests under way
//!    finish; the MQTT connections say DISCONNECT; the sweeper and the
//!    instance's keep-alive end.
//! 3. **Flush** — the group-commit writer takes no more submissions and
//!    stores those it holds: a command that was answered as accepted is in
//!    the store.
//! 4. **Close** — the instance leaves, the database pool closes.

use std::time::Duration;

use plumbing::health::{Flag, Outcome};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::error::{ApiError, ErrorKind};

/// How long `/readyz` waits for the database before calling it unreachable.
const DATABASE_CHECK: Duration = Duration::from_secs(2);
/// `Retry-After` of a submission refused during shutdown, in ms.
const RETRY_AFTER_MS: u64 = 1_000;

/// Where the gateway is in its life, shared by every part through [`App`].
#[derive(Debug)]
pub struct Lifecycle {
    /// Cancelled at the first signal (a child of `server::start`'s token).
    draining: CancellationToken,
    /// Cancelled when the grace is over: waiting callers are answered now.
    answer_now: CancellationToken,
    /// Requests that wait for a command (sync calls, long-polls, cancels).
    busy: watch::Sender<usize>,
    /// The main MQTT connection is up (submissions, presence).
    pub(crate) broker_main: Flag,
    /// The reports connection is up with its subscriptions.
    pub(crate) broker_reports: Flag,
    /// The group-commit writer: told to flush and end, then awaited.
    writer_close: CancellationToken,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Lifecycle {
    /// A lifecycle that starts draining when `shutdown` is cancelled.
    pub(crate) fn new(shutdown: &CancellationToken) -> Lifecycle {
        Lifecycle {
            draining: shutdown.child_token(),
            answer_now: CancellationToken::new(),
            busy: watch::Sender::new(0),
            broker_main: Flag::default(),
            broker_reports: Flag::default(),
            writer_close: CancellationToken::new(),
            writer: std::sync::Mutex::new(None),
        }
    }

    /// The writer's stop signal, and its task (kept to be awaited at the flush).
    pub(crate) fn writer_close(&self) -> CancellationToken {
        self.writer_close.clone()
    }

    pub(crate) fn set_writer(&self, task: JoinHandle<()>) {
        *self.writer.lock().expect("writer handle lock") = Some(task);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Resolves when waiting callers must be answered with what they have.
    pub async fn answer_now(&self) {
        self.answer_now.cancelled().await;
    }

    /// Counts a request that waits for a command until the guard is dropped.
    pub fn busy(&self) -> Busy<'_> {
        self.busy.send_modify(|n| *n += 1);
        Busy(&self.busy)
    }

    /// Refuses a new submission once the shutdown has begun.
    pub fn admit(&self) -> Result<(), ApiError> {
        if self.is_draining() {
            let message = "the gateway is shutting down; submit to another instance or try again later";
            return Err(ApiError::new(ErrorKind::ShuttingDown, message).retry_after(RETRY_AFTER_MS));
        }
        Ok(())
    }
}

/// A request that waits for a command (see [`Lifecycle::busy`]).
#[derive(Debug)]
pub struct Busy<'a>(&'a watch::Sender<usize>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl App {
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    /// Step 1: once the shutdown began, waits until no request waits for a
    /// command or `grace` has passed, then has the rest answered at once.
    pub(crate) async fn drain(&self, grace: Duration) {
        let life = self.lifecycle();
        life.draining.cancelled().await;
        let mut busy = life.busy.subscribe();
        let under_way = *busy.borrow();
        tracing::info!(under_way, grace_ms = grace.as_millis() as u64, "shutting down: draining");
        if tokio::time::timeout(grace, busy.wait_for(|n| *n == 0)).await.is_err() {
            let left = *busy.borrow();
            tracing::info!(left, "grace over: answering waiting callers with their commands as they stand");
        }
        life.answer_now.cancel();
    }

    /// Step 3: the writer stores what it holds and ends.
    pub(crate) async fn flush_writer(&self) {
        let life = self.lifecycle();
        life.writer_close.cancel();
        let task = life.writer.lock().expect("writer handle lock").take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "the command writer failed");
            }
        }
    }

    /// The `/readyz` checks: `shutdown`, `database` (reachable), `migrations`
    /// (all applied), `broker` (both MQTT connections up).
    pub async fn readiness(&self) -> Vec<(&'static str, Outcome)> {
        let life = self.lifecycle();
        let shutdown = if life.is_draining() { Err("shutting down".to_owned()) } else { Ok(()) };
        let applied = tokio::time::timeout(DATABASE_CHECK, self.store().migrations_applied()).await;
        let (database, migrations) = match applied {
            Ok(Ok(true)) => (Ok(()), Ok(())),
            Ok(Ok(false)) => (Ok(()), Err("not all applied".to_owned())),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "readiness: the database did not answer");
                (Err("not reachable".to_owned()), Err("unknown".to_owned()))
            }
            Err(_) => (Err("no answer within 2 s".to_owned()), Err("unknown".to_owned())),
        };
        let connected = life.broker_main.get() && life.broker_reports.get();
        let broker = if connected { Ok(()) } else { Err("not connected".to_owned()) };
        vec![("shutdown", shutdown), ("database", database), ("migrations", migrations), ("broker", broker)]
    }
}
