//! The sweeper: the one place that finds work in the database. Every non-final
//! command carries `next_attempt_at`, the moment something must happen to it
//! if nothing else has: a scheduled command falls due, an unpublished one is
//! published, a `sent` one without a delivery report (ack timeout) or a
//! `delivered` one without a result (result timeout) is sent again, and one
//! past its deadline expires. Re-sends are safe because devices answer a
//! repeated command id from memory instead of running it again.
//!
//! What is due for each command is decided by `command::machine::due`.
//!
//! Several gateways may sweep one database: each claims a batch (a lease on
//! `next_attempt_at` or row locks, see `Store::claim_due_batch`), and every
//! move it then makes is a compare-and-set, so no two instances publish the
//! same attempt.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::command::machine::{due, Due};
use crate::command::{now_ms, Move, Status};
use crate::publish::Route;
use crate::store::instances::SUBMISSION_MEMORY_MS;
use crate::store::transitions::REPLY_GRACE_MS;
use crate::store::{Moved, StoreError};

/// How often old MQTT submission keys are deleted and dead instances'
/// broker sessions cleared.
const CLEANUP_EVERY: Duration = Duration::from_secs(10);

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
    let mut last_cleanup = tokio::time::Instant::now();
    // At least twice per retention period (a short one, in tests, is then kept to).
    let retention = Duration::from_millis(app.config().retention_ms);
    let cleanup_every = match retention.is_zero() {
        true => CLEANUP_EVERY,
        false => CLEANUP_EVERY.min(retention / 2).max(Duration::from_millis(100)),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = app.sweep_requested() => {}
        }
        if last_cleanup.elapsed() >= cleanup_every {
            last_cleanup = tokio::time::Instant::now();
            if let Err(e) = app.store().forget_before(now_ms() - SUBMISSION_MEMORY_MS).await {
                tracing::warn!(error = %e, "old submission keys not forgotten; trying again later");
            }
            if let Err(e) = crate::instance::forget_dead(&app).await {
                tracing::warn!(error = %e, "dead instances not forgotten; trying again later");
            }
            app.receiver_limits().forget_idle();
            if let Err(e) = forget_old(&app, &shutdown).await {
                tracing::warn!(error = %e, "old commands not deleted; trying again later");
            }
        }
        if let Err(e) = send_owed_replies(&app).await {
            tracing::warn!(error = %e, "owed final replies not sent; trying again next tick");
        }
        for _ in 0..MAX_BATCHES_PER_TICK {
            match sweep_once(&app).await {
                Ok(s) if (s.claimed as i64) < app.config().sweep_batch => break,
                Ok(_) => {}
                // Another instance committed some of these rows first (a
                // conflict at commit, e.g. on Galera): nothing was written; the
                // next batch no longer finds them due.
                Err(StoreError::Contention(e)) => {
                    tracing::debug!(error = %e, "a sweep lost a conflict with another instance; next batch");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed; trying again next tick");
                    break;
                }
            }
        }
    }
}

/// Retention batches per cleanup at most (so a backlog is worked off over
/// several cleanups, between sweeps, not in one long run).
const RETENTION_BATCHES_PER_CLEANUP: usize = 20;

/// Retention (`--retention-ms`): deletes final commands that became final
/// longer ago than that, with their events, in batches of `--retention-batch`
/// (`Store::delete_final_before`); and the presence of unregistered devices
/// offline that long. Several instances may do it at once: each delete is
/// idempotent.
async fn forget_old(app: &App, shutdown: &CancellationToken) -> Result<(), StoreError> {
    let retention = app.config().retention_ms;
    if retention == 0 {
        return Ok(());
    }
    let before = now_ms().saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
    let batch = app.config().retention_batch;
    let mut deleted = 0;
    for _ in 0..RETENTION_BATCHES_PER_CLEANUP {
        let n = app.store().delete_final_before(before, batch).await?;
        deleted += n;
        if n < batch as u64 || shutdown.is_cancelled() {
            break;
        }
    }
    if deleted > 0 {
        app.metrics().retention_deleted.inc_by(deleted);
        tracing::info!(deleted, retention_ms = retention, "final commands past retention deleted");
    }
    app.store().forget_unregistered_before(before).await?;
    Ok(())
}

/// Longest wait between two looks at a command of an offline device.
const OFFLINE_RECHECK_MAX_MS: u64 = 300_000;

/// How long a command of an offline device waits before the sweeper looks at
/// it again: its age (so the looks double apart), at least `ack_timeout_ms`,
/// at most [`OFFLINE_RECHECK_MAX_MS`].
fn offline_recheck_ms(age_ms: i64, ack_timeout_ms: u64) -> i64 {
    let age = u64::try_from(age_ms).unwrap_or(0);
    age.clamp(ack_timeout_ms, OFFLINE_RECHECK_MAX_MS.max(ack_timeout_ms)) as i64
}

/// Publishes the final replies that the process which made their commands
/// final did not get to (it died between its commit and its publish). A
/// live owner's are left to it; this process's own past their grace were
/// published (or are being) and only their record is deleted.
async fn send_owed_replies(app: &App) -> Result<(), StoreError> {
    let now = now_ms();
    let live_since = now - crate::instance::STALE_AFTER.as_millis() as i64;
    for (id, own) in app.store().claim_due_replies(now, 100, now + REPLY_GRACE_MS, live_since).await? {
        if own {
            app.store().reply_sent(id).await?;
            continue;
        }
        let Some(command) = app.store().get_command(id).await? else { continue };
        if let Some(reply) = command.reply_to.as_ref().filter(|_| command.status.is_final()) {
            tracing::info!(command_id = %id, device_id = command.device_id.as_str(), "final reply its instance did not send");
            app.reply(reply, "final", command.to_json()).await;
        }
        app.store().reply_sent(id).await?;
    }
    Ok(())
}

/// Claims one batch of due commands and deals with them: the moves it decides
/// (attempts, expiries, exhaustion) are committed in one transaction (the
/// claim's own on MySQL/MariaDB, `Store::claim_due_batch`), then the claimed
/// attempts are published and the commands left waiting put off.
pub async fn sweep_once(app: &App) -> Result<Swept, StoreError> {
    let now = now_ms();
    let lease = now + app.config().claim_lease_ms as i64;
    let mut batch = app.store().claim_due_batch(now, app.config().sweep_batch, lease).await?;
    let mut swept = Swept { claimed: batch.ids.len(), ..Swept::default() };
    if batch.ids.is_empty() {
        return Ok(swept);
    }
    let mut devices: Vec<_> = batch.commands.values().map(|c| c.device_id.clone()).collect();
    devices.sort_unstable();
    devices.dedup();
    let devices: Vec<_> = devices.iter().collect();
    let online = app.store().online_devices_for(&mut batch, &devices).await?;
    let mut moves = Vec::new();
    // Put off in the batch's transaction; cancels told again once it is committed.
    let (mut put_off, mut cancel_again) = (Vec::new(), Vec::new());
    // In acceptance order, so one device's commands go out in the order they came.
    for c in batch.ids.iter().filter_map(|id| batch.commands.get(id)).filter(|c| !c.status.is_final()) {
        let (command_id, device_id) = (c.id, c.device_id.as_str());
        match due(c, now, online.contains_key(&c.device_id)) {
            Due::Move(to, change) => {
                tracing::debug!(%command_id, device_id, %to, "due: giving up");
                moves.push(Move { id: c.id, to, change });
            }
            Due::Attempt(why) => {
                tracing::debug!(%command_id, device_id, why, "due: another attempt");
                // Due only when online, so a receiver holds the device.
                if let Some(receiver) = online.get(&c.device_id) {
                    let change = app.attempt_change(c, receiver, why);
                    moves.push(Move { id: c.id, to: Status::Sent, change });
                }
            }
            Due::CancelAgain => {
                tracing::debug!(%command_id, device_id, "due, with its cancel requested: telling the receivers again");
                cancel_again.push(c.clone());
                put_off.push((c.clone(), now + app.config().ack_timeout_ms as i64));
            }
            Due::Wait => {
                // Attempts are not burnt on a device no receiver holds: the command
                // waits (until its deadline); the device coming back wakes it at once
                // (`wake_device`). Meanwhile it is looked at again after an interval
                // that doubles with its age, so a long offline queue costs the
                // sweeper a few looks per command, not one per ack timeout.
                tracing::debug!(%command_id, device_id, "due, but the device is offline: waiting");
                let wait = offline_recheck_ms(now - c.created_at, app.config().ack_timeout_ms);
                put_off.push((c.clone(), now + wait));
                swept.waiting += 1;
            }
        }
    }
    let outcomes = app.store().apply_due(batch, &put_off, &moves).await?;
    for c in &cancel_again {
        app.publish_cancel(c).await;
    }
    let mut claimed = Vec::new();
    for outcome in outcomes {
        let Moved::Yes { command, .. } = outcome else { continue };
        match command.status {
            Status::Sent => {
                claimed.push(command);
                continue;
            }
            Status::Expired => swept.expired += 1,
            Status::Failed => swept.exhausted += 1,
            _ => {}
        }
        if command.status.is_final() {
            app.on_final(&command).await;
        }
    }
    // Online when decided, so each one's receiver is known; several go per message.
    let routes: Vec<Route<'_>> = claimed
        .iter()
        .filter_map(|command| online.get(&command.device_id).map(|receiver| Route { command, receiver }))
        .collect();
    swept.published = routes.len();
    app.send_to_receivers(&routes).await;
    tracing::debug!(?swept, "swept");
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_at_an_offline_devices_commands_ever_less_often() {
        assert_eq!(offline_recheck_ms(0, 5_000), 5_000);
        assert_eq!(offline_recheck_ms(-3, 5_000), 5_000, "a clock step back");
        assert_eq!(offline_recheck_ms(12_000, 5_000), 12_000);
        assert_eq!(offline_recheck_ms(10 * 3_600_000, 5_000), 300_000);
        assert_eq!(offline_recheck_ms(0, 600_000), 600_000, "never below the ack timeout");
    }
}
