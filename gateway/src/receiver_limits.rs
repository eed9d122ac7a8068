//! Per-receiver rate limits on what receivers send the gateway: reports
//! (`--receiver-report-rate`) and device presence (`--receiver-presence-rate`),
//! each a token bucket per receiver (governor's GCRA) holding one second's
//! worth of burst per `BURST_SECONDS`. One receiver flooding — compromised,
//! or buggy — then costs the others and the callers little.
//!
//! What is over the limit is dropped (acknowledged at the broker, counted in
//! `gateway_receiver_messages_rate_limited_total{message}`, logged at most
//! every 5 s), and nothing is lost for good: a dropped report leaves its
//! command `sent` or `delivered`, so the sweeper sends it again after the ack
//! or result timeout and the device answers the repeat from memory; a dropped
//! presence is corrected by the receiver's next presence or roll-call answer.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use plumbing::metrics::Metrics;
use plumbing::throttle::Throttle;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Seconds of the rate a receiver may send at once (a receiver announcing
/// all its devices after a reconnect, a batch of results after a stall).
pub const BURST_SECONDS: u32 = 5;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    /// `report` or `presence`.
    message: &'static str,
}

/// The per-receiver buckets and their refusal count.
#[derive(Debug)]
pub struct ReceiverLimits {
    reports: DefaultKeyedRateLimiter<String>,
    presence: DefaultKeyedRateLimiter<String>,
    dropped: Family<Labels, Counter>,
    log: Throttle,
}

impl ReceiverLimits {
    /// `reports_per_s` and `presence_per_s` per receiver (at least 1 each).
    pub fn new(metrics: &Metrics, reports_per_s: u32, presence_per_s: u32) -> ReceiverLimits {
        let bucket = |rate: u32| {
            let rate = NonZeroU32::new(rate.max(1)).expect("at least 1");
            let burst = rate.saturating_mul(NonZeroU32::new(BURST_SECONDS).expect("non-zero"));
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        };
        let dropped = metrics.register(
            "gateway_receiver_messages_rate_limited",
            "Reports and presence dropped: their receiver sent more than --receiver-report-rate / --receiver-presence-rate",
            Family::<Labels, Counter>::default(),
        );
        ReceiverLimits {
            reports: bucket(reports_per_s),
            presence: bucket(presence_per_s),
            dropped,
            log: Throttle::default(),
        }
    }

    /// Whether `receiver` may send `n` more reports now (taken from its bucket if so).
    pub fn allow_reports(&self, receiver: &str, n: usize) -> bool {
        let n = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX));
        let allowed =
            n.is_none_or(|n| matches!(self.reports.check_key_n(&receiver.to_owned(), n), Ok(Ok(()))));
        self.count(allowed, "report", receiver, n.map_or(0, NonZeroU32::get))
    }

    /// Whether `receiver` may send one more presence now.
    pub fn allow_presence(&self, receiver: &str) -> bool {
        let allowed = self.presence.check_key(&receiver.to_owned()).is_ok();
        self.count(allowed, "presence", receiver, 1)
    }

    /// Dropped so far of `message` (`report` or `presence`).
    pub fn dropped(&self, message: &'static str) -> u64 {
        self.dropped.get_or_create(&Labels { message }).get()
    }

    /// Forgets the buckets of receivers that have been quiet long enough to
    /// be full again (so made-up receiver ids cannot grow the maps).
    pub fn forget_idle(&self) {
        self.reports.retain_recent();
        self.presence.retain_recent();
    }

    fn count(&self, allowed: bool, message: &'static str, receiver: &str, n: u32) -> bool {
        if !allowed {
            self.dropped.get_or_create(&Labels { message }).inc_by(u64::from(n));
            if self.log.allow() {
                tracing::warn!(receiver = ?receiver, message, n, "receiver over its rate: dropped (counted; re-sent or re-announced later; further drops not logged for 5 s)");
            }
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_receiver_over_its_rate_leaves_the_others_alone() {
        let limits = ReceiverLimits::new(&Metrics::default(), 10, 2);
        assert!(limits.allow_reports("rx-1", 50), "a burst of 5 s worth");
        assert!(!limits.allow_reports("rx-1", 1));
        assert!(!limits.allow_reports("rx-1", 500), "more than a burst is never allowed");
        assert!(limits.allow_reports("rx-2", 50), "another receiver has its own bucket");
        assert!(limits.allow_reports("rx-1", 0), "nothing costs nothing");
        assert_eq!(limits.dropped("report"), 501);
        for _ in 0..10 {
            assert!(limits.allow_presence("rx-1"));
        }
        assert!(!limits.allow_presence("rx-1"));
        assert_eq!(limits.dropped("presence"), 1);
    }
}
