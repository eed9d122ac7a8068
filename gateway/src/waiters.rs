//! Callers waiting for a command to become final (sync HTTP calls, long-polls).
//! A waiter is a guard: when the HTTP client hangs up and the handler future is
//! dropped, its registration goes with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

/// Registry of waiters, keyed by command id. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Waiters {
    /// A std mutex: it is held only to look up or change the map, never across
    /// an `.await`, so an async mutex would only add cost.
    inner: Arc<Mutex<HashMap<Uuid, watch::Sender<bool>>>>,
}

impl Waiters {
    /// Registers interest in `id`. Register *before* reading the command's
    /// state, so a final result landing in between is not missed.
    pub fn register(&self, id: Uuid) -> Waiter {
        let mut map = self.inner.lock().expect("waiters lock poisoned");
        let rx = map.entry(id).or_insert_with(|| watch::channel(false).0).subscribe();
        Waiter { id, rx, waiters: self.clone() }
    }

    /// Wakes everyone waiting on `id` (the command just became final).
    pub fn notify(&self, id: Uuid) {
        let map = self.inner.lock().expect("waiters lock poisoned");
        if let Some(tx) = map.get(&id) {
            tx.send_replace(true);
        }
    }

    /// How many commands have someone waiting (for metrics and tests).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("waiters lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One registration; dropping it unregisters.
#[derive(Debug)]
pub struct Waiter {
    id: Uuid,
    rx: watch::Receiver<bool>,
    waiters: Waiters,
}

impl Waiter {
    /// Resolves once `notify` was called for this command (at once if it already was).
    pub async fn notified(&mut self) {
        // The sender lives in the map as long as this waiter does, so this only
        // returns on a notification.
        let _ = self.rx.wait_for(|done| *done).await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut map = self.waiters.inner.lock().expect("waiters lock poisoned");
        if let Some(tx) = map.get(&self.id) {
            // Our own receiver still counts until this function returns.
            if tx.receiver_count() <= 1 {
                map.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notification_before_wait_is_not_lost() {
        let w = Waiters::default();
        let id = Uuid::now_v7();
        let mut waiter = w.register(id);
        w.notify(id);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter.notified())
            .await
            .expect("already notified");
    }

    #[tokio::test]
    async fn dropping_the_last_waiter_unregisters() {
        let w = Waiters::default();
        let id = Uuid::now_v7();
        let a = w.register(id);
        let b = w.register(id);
        drop(a);
        assert_eq!(w.len(), 1);
        drop(b);
        assert!(w.is_empty());
    }
}
