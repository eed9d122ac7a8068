//! Where devices are: receivers report each device's presence and their own
//! status (online, or gone — their last will). After each connection to the
//! broker the gateway holds a roll call (Sparkplug's "rebirth request"):
//! receivers answer with their status and every device they hold; devices
//! of receivers that did not answer within the grace period are marked
//! offline (their receiver died while nobody listened).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::command::now_ms;
use crate::store::{PresenceOutcome, StoreError};
use protocol::envelope::{Presence, ReceiverStatus};

/// How long the store is taken to be full of unregistered devices' presence
/// after a count found it so.
const FULL_RECHECK: Duration = Duration::from_secs(1);

/// Receivers that answered the current roll call, and each receiver's
/// session as its latest `online: true` status gave it.
#[derive(Debug, Default)]
pub(crate) struct RollCall {
    round: u64,
    answered: HashSet<String>,
    sessions: HashMap<String, String>,
}

impl App {
    /// Records a device's presence; a device coming online wakes its waiting commands.
    pub async fn apply_presence(&self, p: &Presence) -> Result<(), StoreError> {
        if let Some(generation) = p.key_generation.filter(|_| p.online) {
            // A revoked or never-issued key: the device is not where this says (PROTOCOL.md §5.9).
            if !self.store().accept_key_generation(&p.device_id, generation).await? {
                self.metrics().presence_key_refused.inc();
                tracing::warn!(device_id = %p.device_id, receiver = %p.receiver_id, generation, "presence refused: the device authenticated with a key generation that is not valid (revoked or never issued)");
                return Ok(());
            }
        }
        let max_unregistered = self.config().max_unregistered_devices;
        // Found full within the last second: not counted again (a count costs
        // a scan of the unregistered rows; a flood of made-up ids would pay it each time).
        let full =
            self.inner.unregistered_full.lock().expect("lock").is_some_and(|at| at.elapsed() < FULL_RECHECK);
        let room = if full { 0 } else { max_unregistered };
        let outcome = self.store().set_presence(&p.device_id, &p.receiver_id, p.online, room).await?;
        if outcome == PresenceOutcome::TooManyUnregistered {
            if !full {
                *self.inner.unregistered_full.lock().expect("lock") = Some(std::time::Instant::now());
            }
            self.metrics().presence_unregistered_refused.inc();
            if self.inner.presence_log.allow() {
                tracing::warn!(device_id = %p.device_id, receiver = %p.receiver_id, max_unregistered, "presence refused: the device is not registered and the most unregistered devices allowed are held (further refusals not logged for 5 s)");
            }
            return Ok(());
        }
        tracing::info!(device_id = %p.device_id, receiver = %p.receiver_id, online = p.online, "presence");
        if p.online && self.store().wake_device(&p.device_id, now_ms()).await? > 0 {
            self.inner.sweep_now.notify_one();
        }
        Ok(())
    }

    /// Online: the receiver answered the roll call. Offline (a clean goodbye
    /// or its last will): all its devices are offline — if it is the goodbye
    /// of the receiver's current session. Signed, a goodbye of an unknown or
    /// older session is refused: a replayed last will changes nothing (a
    /// receiver that died unheard is found by the roll call instead).
    pub async fn apply_receiver_status(&self, s: &ReceiverStatus) -> Result<(), StoreError> {
        if s.online {
            let mut rollcall = self.inner.rollcall.lock().expect("rollcall lock");
            rollcall.answered.insert(s.receiver_id.clone());
            if let Some(session) = &s.session {
                rollcall.sessions.insert(s.receiver_id.clone(), session.clone());
            }
        } else {
            let known =
                self.inner.rollcall.lock().expect("rollcall lock").sessions.get(&s.receiver_id).cloned();
            let current = match (&known, &s.session) {
                (Some(known), Some(session)) => known == session,
                _ => !self.provenance().is_signed(),
            };
            if !current {
                let why = format!(
                    "goodbye of receiver {:?} session {:?}; its current session is {known:?}",
                    s.receiver_id, s.session
                );
                self.provenance().refuse("receiver_status", "not_current_session", "", &why);
                return Ok(());
            }
            let n = self.store().receiver_gone(&s.receiver_id).await?;
            tracing::info!(receiver = %s.receiver_id, devices = n, "receiver gone; its devices are offline");
        }
        Ok(())
    }

    /// A roll call is about to be published: forget who answered the last one.
    pub fn start_rollcall(&self) -> u64 {
        let mut rollcall = self.inner.rollcall.lock().expect("rollcall lock");
        rollcall.round += 1;
        rollcall.answered.clear();
        rollcall.round
    }

    /// The grace period after roll call `round` is over: devices still marked
    /// online by a receiver that did not answer are marked offline — that
    /// receiver died while no gateway listened (its last will went nowhere),
    /// e.g. with an embedded broker that was down with the gateway. A newer
    /// roll call makes this one moot.
    pub async fn finish_rollcall(&self, round: u64) -> Result<(), StoreError> {
        let alive: Vec<String> = {
            let rollcall = self.inner.rollcall.lock().expect("rollcall lock");
            if rollcall.round != round {
                return Ok(());
            }
            rollcall.answered.iter().cloned().collect()
        };
        let n = self.store().receivers_gone_except(&alive).await?;
        if n > 0 {
            tracing::info!(
                devices = n,
                answered = alive.len(),
                "devices of receivers that missed the roll call are offline"
            );
        }
        Ok(())
    }
}

/// After the subscriptions (same connection, so the broker sees them first):
/// publishes the roll call, waits the grace period, then takes the devices of
/// silent receivers offline.
pub(crate) async fn roll_call(app: &App, client: &AsyncClient, shutdown: &CancellationToken) {
    let round = app.start_rollcall();
    if let Err(e) = client.publish(app.topics().rollcall(), QoS::AtLeastOnce, false, &b"{}"[..]).await {
        tracing::warn!(error = %e, "roll call failed");
        return;
    }
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(app.config().rollcall_grace_ms)) => {}
    }
    if let Err(e) = app.finish_rollcall(round).await {
        tracing::warn!(error = %e, "could not mark the devices of silent receivers offline");
    }
}
