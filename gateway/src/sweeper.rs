//! The sweeper: the one place that finds work in the database. Every non-final
//! command carries `next_attempt_at`, the moment something must happen to it
//! if nothing else has: a scheduled command falls due, an unpublished one is
//! published, a `sent` one without a delivery report (ack timeout) or a
//! `delivered` one without a result (result timeout) is sent again, and one
//! past its deadline expires. Re-sends are safe because devices answer a
//! repeated command id from memory instead of running it again.
//!
//! Several gateways may sweep one database: each claims a batch (a lease on
//! `next_attempt_at`, see `Store::claim_due`), and every move it then makes is
//! a compare-and-set, so no two instances publish the same attempt.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::command::{now_ms, Command, Status};
use crate::store::{Change, Moved, StoreError};

/// Batches claimed per tick at most, so one tick cannot run forever.
const MAX_BATCHES_PER_TICK: usize = 50;

/// What one sweep did (for tests and logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub claimed: usize,
    pub published: usize,
    pub expired: usize,
    pub exhausted: usize,
    /// Left waiting because the device is offline.
    pub waiting: usize,
}

/// Runs until shutdown: a sweep every `sweep_interval_ms`, or sooner when asked.
pub async fn run(app: App, shutdown: CancellationToken) {
    let interval = Duration::from_millis(app.config().sweep_interval_ms.max(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = app.sweep_requested() => {}
        }
        for _ in 0..MAX_BATCHES_PER_TICK {
            match sweep_once(&app).await {
                Ok(s) if (s.claimed as i64) < app.config().sweep_batch => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed; trying again next tick");
                    break;
                }
            }
        }
    }
}

/// Claims one batch of due commands and deals with each.
pub async fn sweep_once(app: &App) -> Result<Swept, StoreError> {
    let now = now_ms();
    let lease = now + app.config().claim_lease_ms as i64;
    let ids = app.store().claim_due(now, app.config().sweep_batch, lease).await?;
    let mut swept = Swept { claimed: ids.len(), ..Swept::default() };
    let mut online = HashMap::new();
    for id in ids {
        let Some(command) = app.store().get_command(id).await? else { continue };
        if command.status.is_final() {
            continue;
        }
        let device_online = match online.get(&command.device_id) {
            Some(o) => *o,
            None => {
                let o = app.store().is_online(&command.device_id).await?;
                online.insert(command.device_id.clone(), o);
                o
            }
        };
        sweep_command(app, command, device_online, &mut swept).await?;
    }
    if swept.claimed > 0 {
        tracing::debug!(?swept, "swept");
    }
    Ok(swept)
}

async fn sweep_command(
    app: &App,
    c: Command,
    device_online: bool,
    swept: &mut Swept,
) -> Result<(), StoreError> {
    let now = now_ms();
    if now >= c.expires_at {
        let message = format!("no final result by the deadline; {} attempt(s) used", c.attempts);
        if finish(app, &c, Status::Expired, "deadline_passed", message).await? {
            swept.expired += 1;
        }
        return Ok(());
    }
    let in_flight = matches!(c.status, Status::Sent | Status::Delivered);
    if in_flight && c.attempts >= c.max_attempts {
        let message = format!("no result after {} attempt(s)", c.attempts);
        if finish(app, &c, Status::Failed, "attempts_exhausted", message).await? {
            swept.exhausted += 1;
        }
        return Ok(());
    }
    if !device_online {
        // Attempts are not burnt on a device no receiver holds: the command
        // waits (until its deadline); the device coming back wakes it early.
        app.store().postpone(&c, now + app.config().ack_timeout_ms as i64).await?;
        swept.waiting += 1;
        return Ok(());
    }
    let why = match c.status {
        Status::Scheduled => "scheduled time reached",
        Status::Pending => "not yet published",
        Status::Sent => "no delivery report within the ack timeout",
        _ => "no result within the result timeout",
    };
    let after = app.publish_attempt(c, why).await;
    if after.status == Status::Sent {
        swept.published += 1;
    }
    Ok(())
}

/// Moves a command to a final status the sweeper decided on; false if another
/// writer moved it first (e.g. its result just arrived).
async fn finish(app: &App, c: &Command, to: Status, kind: &str, message: String) -> Result<bool, StoreError> {
    let change = Change {
        error: Some((kind.to_owned(), message.clone())),
        detail: Some(message),
        ..Change::default()
    };
    match app.store().transition(c.id, to, &change).await? {
        Moved::Yes { command, .. } => {
            app.on_final(&command).await;
            Ok(true)
        }
        Moved::Refused(_) | Moved::NotFound => Ok(false),
    }
}
