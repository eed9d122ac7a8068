//! Callers waiting for a command to become final (sync HTTP calls, long-polls).
//! A waiter is a guard: when the HTTP client hangs up and the handler future is
//! dropped, its registration goes with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

use crate::command::Command;

/// What a waiter is sent: the command as committed once it is final.
type Final = Option<Arc<Command>>;

/// Registry of waiters, keyed by command id. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Waiters {
    /// A std mutex: it is held only to look up or change the map, never across
    /// an `.await`, so an async mutex would only add cost.
    inner: Arc<Mutex<HashMap<Uuid, watch::Sender<Final>>>>,
}

impl Waiters {
    /// Registers interest in `id`. Register *before* reading the command's
    /// state, so a final result landing in between is not missed.
    pub fn register(&self, id: Uuid) -> Waiter {
        let mut map = self.inner.lock().expect("waiters lock poisoned");
        let rx = map.entry(id).or_insert_with(|| watch::channel(None).0).subscribe();
        Waiter { id, rx, waiters: self.clone() }
    }

    /// Hands `command`, just committed as final, to everyone waiting on it.
    pub fn notify(&self, command: &Command) {
        let map = self.inner.lock().expect("waiters lock poisoned");
        if let Some(tx) = map.get(&command.id) {
            tx.send_replace(Some(Arc::new(command.clone())));
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
    rx: watch::Receiver<Final>,
    waiters: Waiters,
}

impl Waiter {
    /// The final command, once `notify` was called for it (at once if it already was).
    pub async fn notified(&mut self) -> Arc<Command> {
        // The sender lives in the map as long as this waiter does, so this only
        // returns on a notification.
        loop {
            if let Ok(done) = self.rx.wait_for(Option::is_some).await {
                if let Some(command) = done.as_ref() {
                    return command.clone();
                }
            }
        }
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
        let command = crate::command::tests::a_command();
        let mut waiter = w.register(command.id);
        w.notify(&command);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter.notified())
            .await
            .expect("already notified");
        assert_eq!(*got, command, "the waiter gets the command as notified");
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
