//! This process as one of several gateway instances on one database and
//! broker: its id (given, or generated), its hold on that id in the store
//! (a heartbeat), and its release at shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use plumbing::mqtt::{Brokers, ClientSpec};
use rumqttc::{Event, Packet};

use crate::app::App;
use crate::command::now_ms;
use crate::store::instances::ClaimError;
use crate::store::{Store, StoreError};

/// How often a live instance renews its hold on its id.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// An id whose heartbeat is this old is free again (its process died).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// Who this process is among the gateway instances.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The name in MQTT client ids, topics and the event log.
    pub id: String,
    /// Tells this process apart from an earlier or concurrent one with the same id.
    pub nonce: String,
    /// Given by the operator (and so kept across restarts), not generated.
    pub stable: bool,
}

impl Instance {
    /// The operator's name, or a fresh `gw-` plus 8 random hex digits.
    pub fn new(name: Option<&str>) -> Instance {
        let nonce = Uuid::now_v7().simple().to_string();
        match name {
            Some(id) => Instance { id: id.to_owned(), nonce, stable: true },
            None => {
                // The tail of a v7 UUID is random (RFC 9562 §5.7).
                let id = format!("gw-{}", &nonce[nonce.len() - 8..]);
                Instance { id, nonce, stable: false }
            }
        }
    }

    /// Takes the id in the store. A stable name still held by a live
    /// process is waited for until its heartbeat would be stale (the same
    /// name restarted at once after a crash), then refused with an error
    /// naming it.
    pub async fn claim(&self, store: &Store) -> Result<(), ClaimError> {
        let give_up = tokio::time::Instant::now() + STALE_AFTER + HEARTBEAT;
        loop {
            let now = now_ms();
            let stale_before = now - STALE_AFTER.as_millis() as i64;
            match store.claim_instance(&self.id, &self.nonce, now, stale_before).await {
                Err(ClaimError::InUse { .. }) if tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(HEARTBEAT).await;
                }
                done => return done,
            }
        }
    }

    /// Renews the hold every `HEARTBEAT` until shutdown (`leave` lets go). If
    /// another process took the id over (this one was paused for longer
    /// than `STALE_AFTER`), it says so loudly: both now use one MQTT client id.
    pub async fn keep_alive(self, store: Store, shutdown: CancellationToken) {
        let mut lost = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            match store.heartbeat(&self.id, &self.nonce, now_ms()).await {
                Ok(true) => lost = false,
                Ok(false) if !lost => {
                    lost = true;
                    tracing::error!(instance = %self.id, "another process took over this instance id; give each instance its own --instance-id");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "instance heartbeat not written"),
            }
        }
    }

    /// Leaves at shutdown (after the MQTT connections closed): a generated id
    /// clears its broker sessions (nothing stays behind), a stable name keeps
    /// them for its next start; then the id is released. If the broker
    /// cannot be reached the row stays, and another instance clears the
    /// sessions once the heartbeat is `DEAD_AFTER` old.
    pub async fn leave(&self, app: &App) {
        let cleared = self.stable || {
            let mut all = true;
            for client_id in [format!("{}-main", self.id), format!("{}-reports", self.id)] {
                all &= clear_session(&app.inner.brokers, client_id).await;
            }
            all
        };
        if !cleared {
            tracing::warn!(instance = %self.id, "broker sessions not cleared; another instance will");
            return;
        }
        if let Err(e) = app.store().release_instance(&self.id, &self.nonce).await {
            tracing::warn!(error = %e, "instance id not released; it frees itself in {STALE_AFTER:?}");
        }
    }
}

/// An instance whose heartbeat is this old is dead for good: its MQTT
/// sessions are cleared and its row forgotten.
pub const DEAD_AFTER: Duration = Duration::from_secs(30);

/// Clears the broker sessions of instances that died (their heartbeat is
/// older than `DEAD_AFTER`): connecting with each of their client ids and a
/// clean session makes the broker drop what it kept for them (MQTT 3.1.1
/// §3.1.2.4), then forgets them. Any live instance may do it; doing it twice
/// is harmless. Returns how many were cleared.
pub async fn forget_dead(app: &App) -> Result<usize, StoreError> {
    let before = now_ms() - DEAD_AFTER.as_millis() as i64;
    let mut cleared = 0;
    for (id, nonce) in app.store().dead_instances(before).await? {
        if id == app.instance_id() {
            continue;
        }
        let sessions = [format!("{id}-main"), format!("{id}-reports")];
        let mut all = true;
        for client_id in sessions {
            all &= clear_session(&app.inner.brokers, client_id).await;
        }
        if all {
            app.store().release_instance(&id, &nonce).await?;
            tracing::info!(instance = %id, "a dead instance's broker sessions cleared");
            cleared += 1;
        }
    }
    Ok(cleared)
}

/// Connects as `client_id` with a clean session and disconnects; false if
/// the broker could not be reached in time (tried again later).
async fn clear_session(brokers: &Brokers, client_id: String) -> bool {
    let spec = ClientSpec { client_id, clean_session: true, manual_acks: false, last_will: None };
    let (client, mut eventloop) = plumbing::mqtt::client(brokers, spec);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if connected {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    connected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_differ_and_given_ones_are_kept() {
        let (a, b) = (Instance::new(None), Instance::new(None));
        assert!(a.id.starts_with("gw-") && a.id.len() == 11 && !a.stable);
        assert_ne!(a.id, b.id);
        let named = Instance::new(Some("edge-1"));
        assert_eq!((named.id.as_str(), named.stable), ("edge-1", true));
        assert_ne!(named.nonce, a.nonce);
    }

    #[tokio::test]
    async fn a_live_id_is_refused_by_name_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite:{}", dir.path().join("gw.db").display())).await.unwrap();
        let first = Instance::new(Some("edge-1"));
        first.claim(&store).await.unwrap();
        let second = Instance::new(Some("edge-1"));
        let now = now_ms();
        let refused = store.claim_instance(&second.id, &second.nonce, now, now - 5_000).await;
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("\"edge-1\"") && message.contains("in use"), "{message}");
        store.release_instance(&first.id, &first.nonce).await.unwrap();
        second.claim(&store).await.unwrap();
        assert!(
            !store.heartbeat(&first.id, &first.nonce, now_ms()).await.unwrap(),
            "the first lost its hold"
        );
        assert!(store.heartbeat(&second.id, &second.nonce, now_ms()).await.unwrap());
    }
}
