//! Exponential back-off with jitter, the one implementation every retry loop
//! of the system uses (reconnects, store retries, command re-sends).
//!
//! Delay `n` (from 0) is drawn uniformly from `[d/2, d)` where
//! `d = first × 2^n`, capped at `cap`: doubling spreads retries out, the
//! jitter keeps many clients that failed together from retrying in lockstep
//! (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015, the
//! "equal jitter" variant). Built on `backon`, whose jitter adds a random
//! `[0, d')` to a delay `d'`; starting from half the delays gives the range above.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A sequence of delays; `next_delay` after each failure, `reset` after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    cap: Duration,
}

impl Backoff {
    /// Delays from about `first` (the first is in `[first/2, first)`) doubling
    /// up to about `cap`. A `cap` below `first` is taken as `first`.
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        let first = first.max(Duration::from_millis(2));
        let builder = ExponentialBuilder::default()
            .with_min_delay(first / 2)
            .with_max_delay(cap.max(first) / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff { builder, delays: builder.build(), cap: cap.max(first) }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        // Without max_times the iterator never ends; the fallback is for form's sake.
        self.delays.next().unwrap_or(self.cap)
    }

    /// After a success: the next failure starts from `first` again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The delay after `done` earlier failures (0 for the first retry),
    /// without keeping state: for re-sends whose count lives in the database.
    pub fn nth(first: Duration, cap: Duration, done: u32) -> Duration {
        let mut backoff = Backoff::new(first, cap);
        // Past the cap every delay is alike: no need to walk further.
        for _ in 0..done.min(32) {
            backoff.next_delay();
        }
        backoff.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_down_to_half_and_resets() {
        let (first, cap) = (Duration::from_millis(100), Duration::from_millis(2_000));
        let mut backoff = Backoff::new(first, cap);
        let mut full = first;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(delay >= full / 2 && delay <= full, "{delay:?} outside [{:?}, {full:?}]", full / 2);
            full = (full * 2).min(cap);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= first);
    }

    #[test]
    fn nth_follows_the_same_curve() {
        let (first, cap) = (Duration::from_secs(1), Duration::from_secs(30));
        assert!(Backoff::nth(first, cap, 0) <= first);
        let third = Backoff::nth(first, cap, 2);
        assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4), "{third:?}");
        let late = Backoff::nth(first, cap, 1_000);
        assert!(late >= cap / 2 && late <= cap, "{late:?}");
    }
}
