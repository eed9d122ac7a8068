//! At most one log line per period about something that may happen very
//! often (refused messages, logins, connections): every occurrence is
//! counted in a metric, only the first of each period is logged, and that
//! line says how many were not logged since — a flood cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The default period: one line per 5 s.
pub const EVERY: Duration = Duration::from_secs(5);

/// A log throttle; clones share their state.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last: Arc<Mutex<Option<Instant>>>,
    suppressed: Arc<AtomicU64>,
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new(EVERY)
    }
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle { every, last: Arc::default(), suppressed: Arc::default() }
    }

    /// `Some(n)` if nothing was let through in the last period (the period
    /// starts again; `n` were held back since the last one), else `None`
    /// (this one is counted as held back).
    pub fn pass(&self) -> Option<u64> {
        let now = Instant::now();
        let due = {
            let mut last = self.last.lock().expect("log throttle lock");
            let due = last.is_none_or(|at| now.duration_since(at) >= self.every);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Whether this one may be logged ([`Throttle::pass`]).
    pub fn allow(&self) -> bool {
        self.pass().is_some()
    }

    /// Calls `log(held_back_since_the_last)` if this one may be logged.
    pub fn log(&self, log: impl FnOnce(u64)) {
        if let Some(suppressed) = self.pass() {
            log(suppressed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_period() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert!(t.allow());
        assert!(!t.allow());
        assert!(!t.clone().allow(), "clones share the period");
        assert!(Throttle::new(Duration::ZERO).allow());
    }

    #[test]
    fn a_flood_of_warnings_logs_once_per_period() {
        let limit = Throttle::new(Duration::from_secs(1));
        let mut logged = Vec::new();
        for _ in 0..5 {
            limit.log(|suppressed| logged.push(suppressed));
        }
        assert_eq!(logged, [0], "the first one only");
        *limit.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(1));
        limit.log(|suppressed| logged.push(suppressed));
        assert_eq!(logged, [0, 4], "the next one says how many were not logged");
    }
}
