//! Callers waiting for a command to become final (sync HTTP calls, long-polls).
//! A waiter is a guard: when the HTTP client hangs up and the handler future is
//! dropped, its registration goes with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;
use crate::command::Command;
use crate::error::ApiError;
use crate::submit::Submitted;

/// While a caller waits, the store is re-read at least this often, so a
/// result applied by another gateway instance is seen too.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// What a waiter is sent: the command as committed once it is final.
type Final = Option<Arc<Command>>;

/// How a waiting caller's nap ended.
enum Nap {
    /// The command is final.
    Final(Arc<Command>),
    /// Time to look in the store again (or the caller's wait is over).
    Over,
    /// The gateway is shutting down: answer with the command as it stands.
    ShuttingDown,
}

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

    /// Whether someone here waits for command `id`.
    pub fn is_waited_for(&self, id: Uuid) -> bool {
        self.inner.lock().expect("waiters lock poisoned").contains_key(&id)
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

impl App {
    /// Another instance made command `id` final: reads it and hands it to
    /// whoever waits here.
    pub async fn wake_waiters(&self, id: Uuid) {
        match self.store().get_command(id).await {
            Ok(Some(command)) if command.status.is_final() => {
                tracing::debug!(command_id = %id, device_id = command.device_id.as_str(), "final at another instance");
                self.waiters().notify(&command);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(command_id = %id, error = %e, "final notice: command not read; the waiter re-checks")
            }
        }
    }

    /// Waits until command `id` is final or `wait` has passed, and returns it
    /// as it stands (`None`: no such command).
    pub async fn wait_final(&self, id: Uuid, wait: Duration) -> Result<Option<Command>, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut waiter = self.waiters().register(id);
        let Some(mut known) = self.store().get_command(id).await? else {
            return Ok(None);
        };
        loop {
            let now = tokio::time::Instant::now();
            if known.status.is_final() || now >= deadline {
                return Ok(Some(known));
            }
            let nap = (deadline - now).min(RECHECK_EVERY);
            match self.nap(&mut waiter, nap).await {
                Nap::Final(done) => return Ok(Some(Arc::unwrap_or_clone(done))),
                Nap::Over => known = self.recheck(known).await,
                Nap::ShuttingDown => return Ok(Some(self.recheck(known).await)),
            }
        }
    }

    /// Waits up to `nap` for the final command; a graceful shutdown whose
    /// grace is over ends the wait early (`crate::shutdown`).
    async fn nap(&self, waiter: &mut Waiter, nap: Duration) -> Nap {
        tokio::select! {
            done = tokio::time::timeout(nap, waiter.notified()) => match done {
                Ok(done) => Nap::Final(done),
                Err(_) => Nap::Over,
            },
            () = self.lifecycle().answer_now() => Nap::ShuttingDown,
        }
    }

    /// The command as the store has it now; as it was known if the store
    /// cannot say (a database failing over): the caller keeps waiting for
    /// the notification, and at worst hears the last known status, not 503.
    async fn recheck(&self, known: Command) -> Command {
        match self.store().get_command(known.id).await {
            Ok(Some(now)) => now,
            Ok(None) => known,
            Err(e) => {
                tracing::warn!(command_id = %known.id, error = %e, "waiting caller: store not read; still waiting");
                known
            }
        }
    }

    /// `wait_final` for a command just submitted with a waiter (see `submit`):
    /// the store is read only if no notification comes within a recheck period.
    pub async fn wait_submitted(&self, submitted: Submitted, wait: Duration) -> Result<Command, ApiError> {
        let Submitted { command, waiter, .. } = submitted;
        let Some(mut waiter) = waiter.filter(|_| !command.status.is_final()) else {
            return Ok(command);
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut known = command;
        loop {
            let now = tokio::time::Instant::now();
            if known.status.is_final() || now >= deadline {
                return Ok(known);
            }
            let nap = (deadline - now).min(RECHECK_EVERY);
            match self.nap(&mut waiter, nap).await {
                Nap::Final(done) => return Ok(Arc::unwrap_or_clone(done)),
                Nap::Over => known = self.recheck(known).await,
                Nap::ShuttingDown => return Ok(self.recheck(known).await),
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
