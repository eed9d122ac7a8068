//! The run-time side of `protocol::seal` that the gateway and the receiver
//! share: fresh nonces, the replay guard behind a lock, and the count and
//! rate-limited log of refused messages.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use protocol::seal::{Header, Key, ReplayGuard, SealError};

use crate::metrics::Metrics;

/// How far a message's signing time may be from now (either way) by
/// default, in ms: clock differences plus the time a message may wait at
/// the broker.
pub const DEFAULT_WINDOW_MS: i64 = 300_000;
/// Most nonces remembered (about 50 bytes each); past it the window shrinks.
pub const GUARD_CAPACITY: usize = 200_000;

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Seals `body` for `topic` as `from`, with a fresh nonce and the time now.
pub fn seal_now(key: &Key, gen: u32, from: &str, topic: &str, body: &[u8]) -> Vec<u8> {
    let header = Header { from, gen, ts: now_ms(), nonce: rand::random() };
    protocol::seal::seal(key, topic, &header, body)
}

/// Replay protection for one verifier (`protocol::seal::ReplayGuard`, locked).
#[derive(Debug)]
pub struct Freshness {
    guard: Mutex<ReplayGuard>,
}

impl Freshness {
    pub fn new(window_ms: i64) -> Freshness {
        Freshness { guard: Mutex::new(ReplayGuard::new(window_ms, GUARD_CAPACITY)) }
    }

    /// `ReplayGuard::check` at the time now.
    pub fn check(&self, ts: i64, nonce: [u8; 16], ignore_age: bool) -> Result<(), SealError> {
        self.guard.lock().expect("replay guard lock").check(ts, nonce, now_ms(), ignore_age)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    /// What was refused: `report`, `presence`, `receiver_status`, `command`, `cancel`.
    message: String,
    /// `SealError::reason`, or a provenance rule (`wrong_sender`, `not_sent_there`, …).
    reason: String,
}

/// Refused messages: counted per message kind and reason
/// (`<name>_total{message,reason}`), logged at most every 5 s.
#[derive(Debug, Clone)]
pub struct Refusals {
    family: Family<Labels, Counter>,
    log: crate::throttle::Throttle,
}

impl Refusals {
    pub fn register(metrics: &Metrics, name: &str, help: &str) -> Refusals {
        let family = metrics.register(name, help, Family::<Labels, Counter>::default());
        Refusals { family, log: Default::default() }
    }

    /// Counts one refusal and logs it unless one was logged in the last 5 s.
    /// `why` is shown as is: it must not carry secrets (a `SealError` never does).
    pub fn refuse(&self, message: &str, reason: &str, topic: &str, why: &dyn std::fmt::Display) {
        self.family.get_or_create(&Labels { message: message.into(), reason: reason.into() }).inc();
        if self.log.allow() {
            tracing::warn!(message, reason, topic = %topic.escape_debug(), %why, "message refused (counted; further refusals are not logged for 5 s)");
        }
    }

    /// Refusals so far of `message` for `reason`.
    pub fn get(&self, message: &str, reason: &str) -> u64 {
        self.family.get_or_create(&Labels { message: message.into(), reason: reason.into() }).get()
    }
}

/// A secret given on the command line or in the environment: `Debug` and
/// `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A secret from the flag or environment `value`, else from the file at
/// `file` (its content, trailing newline removed); `None` if neither.
pub fn read_secret(value: Option<&Secret>, file: Option<&std::path::Path>) -> anyhow::Result<Option<Secret>> {
    use anyhow::Context;
    match (value, file) {
        (Some(v), _) => Ok(Some(v.clone())),
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(Some(Secret(text.trim_end_matches(['\n', '\r']).to_owned())))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_per_message_and_reason() {
        let metrics = Metrics::default();
        let refusals = Refusals::register(&metrics, "x_refused", "Refused");
        println!("{}", metrics.render());
        refusals.refuse("report", "unsigned", "t", &"why");
        assert_eq!(refusals.get("report", "unsigned"), 1);
        assert!(metrics.render().contains(r#"x_refused_total{message="report",reason="unsigned"} 1"#));
    }
}
