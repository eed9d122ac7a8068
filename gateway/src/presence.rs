//! Where devices are: receivers report each device's presence and their own
//! status (online, or gone — their last will). After each connection to the
//! broker the gateway holds a roll call (Sparkplug's "rebirth request"):
//! receivers answer with their status and every device they hold; devices
//! of receivers that did not answer within the grace period are marked
//! offline (their receiver died while nobody listened).

use std::collections::HashSet;
use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::command::now_ms;
use crate::store::StoreError;
use protocol::envelope::{Presence, ReceiverStatus};

/// Receivers that answered the current roll call.
#[derive(Debug, Default)]
pub(crate) struct RollCall {
    round: u64,
    answered: HashSet<String>,
}

impl App {
    /// Records a device's presence; a device coming online wakes its waiting commands.
    pub async fn apply_presence(&self, p: &Presence) -> Result<(), StoreError> {
        self.store().set_presence(&p.device_id, &p.receiver_id, p.online).await?;
        tracing::info!(device_id = %p.device_id, receiver = %p.receiver_id, online = p.online, "presence");
        if p.online && self.store().wake_device(&p.device_id, now_ms()).await? > 0 {
            self.inner.sweep_now.notify_one();
        }
        Ok(())
    }

    /// Online: the receiver answered the roll call. Offline (a clean goodbye
    /// or its last will): all its devices are offline.
    pub async fn apply_receiver_status(&self, s: &ReceiverStatus) -> Result<(), StoreError> {
        if s.online {
            self.inner.rollcall.lock().expect("rollcall lock").answered.insert(s.receiver_id.clone());
        } else {
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
