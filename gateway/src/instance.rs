//! This process as one of several gateway instances on one database and
//! broker: its id (given, or generated), its hold on that id in the store
//! (a heartbeat), and its release at shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::command::now_ms;
use crate::store::instances::ClaimError;
use crate::store::Store;

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

    /// Renews the hold every `HEARTBEAT` until shutdown, then lets go. If
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
        if let Err(e) = store.release_instance(&self.id, &self.nonce).await {
            tracing::warn!(error = %e, "instance id not released; it frees itself in {STALE_AFTER:?}");
        }
    }
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
