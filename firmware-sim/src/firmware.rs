//! What a simulated device does with the commands it receives, whatever its
//! link (a TCP connection of its own, or a share of a serial bus): queue them,
//! answer repeats from memory, lose some on purpose, run the rest one at a
//! time, and say what to send back. The links only move frames.
//!
//! Every step of a command is a debug event with its `command_id` and `device_id`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{DeviceId, Frame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use uuid::Uuid;

use crate::execute::{execute, requested_delay};
use crate::memory::{Answer, CommandMemory};
use crate::stats::DeviceCounters;
use crate::FleetConfig;

/// The knobs a device reads from the fleet config.
#[derive(Debug, Clone)]
pub(crate) struct Behaviour {
    /// The receivers a TCP device connects to, in turn (at least one).
    pub(crate) connect: Vec<std::net::SocketAddr>,
    pub(crate) fail_ratio: f64,
    pub(crate) latency_ms: (u64, u64),
    pub(crate) duplicate_results: bool,
    pub(crate) drop_ratio: f64,
    /// When a TCP device hangs up on its own, in ms after connecting.
    pub(crate) churn_ms: Option<(u64, u64)>,
    /// What device keys derive from, if the devices have keys.
    pub(crate) key_secret: Option<protocol::device_auth::FleetSecret>,
    /// A single device's own key (instead of `key_secret`).
    pub(crate) own_key: Option<protocol::device_auth::DeviceKey>,
    /// TLS towards the receivers, if on: the connector and the name to check.
    pub(crate) tls: Option<crate::tls::TlsClient>,
}

impl Behaviour {
    /// Takes the config as given, but never panics on it: a NaN or
    /// out-of-range ratio is clamped and a reversed range is reordered. A
    /// TLS setting that does not load panics ([`FleetConfig::validate`] says why).
    pub(crate) fn from_config(config: &FleetConfig) -> Self {
        let tls = config.tls_ca.as_ref().map(|ca| {
            let connector = crate::tls::connector(ca).unwrap_or_else(|e| panic!("invalid fleet config: {e}"));
            let name = config.tls_server_name.as_ref().map(|name| {
                crate::tls::server_name(name).unwrap_or_else(|e| panic!("invalid fleet config: {e}"))
            });
            crate::tls::TlsClient { connector, name }
        });
        Self {
            connect: config.connect.clone(),
            fail_ratio: probability(config.fail_ratio),
            latency_ms: ordered(config.latency_ms),
            duplicate_results: config.duplicate_results,
            drop_ratio: probability(config.drop_ratio),
            churn_ms: config.churn_ms.map(ordered),
            key_secret: config.device_key_secret.clone(),
            own_key: config.device_key,
            tls,
        }
    }
}

/// `ratio` clamped to `0.0..=1.0`, NaN as 0.
pub(crate) fn probability(ratio: f64) -> f64 {
    if ratio.is_nan() {
        0.0
    } else {
        ratio.clamp(0.0, 1.0)
    }
}

fn ordered((a, b): (u64, u64)) -> (u64, u64) {
    (a.min(b), a.max(b))
}

/// A command taken off the link, not yet looked at.
#[derive(Debug)]
struct Incoming {
    id: Uuid,
    name: String,
    payload: Bytes,
}

/// The command being executed and when it will be done.
#[derive(Debug)]
struct InFlight {
    command: Incoming,
    done_at: Instant,
}

/// One device's command handling and everything it keeps across links:
/// memory, counters, queue, the running command.
pub(crate) struct Firmware {
    id: DeviceId,
    behaviour: Arc<Behaviour>,
    counters: DeviceCounters,
    memory: CommandMemory,
    rng: StdRng,
    queue: VecDeque<Incoming>,
    in_flight: Option<InFlight>,
}

impl Firmware {
    pub(crate) fn new(id: DeviceId, behaviour: Arc<Behaviour>, counters: DeviceCounters) -> Self {
        Self {
            id,
            behaviour,
            counters,
            memory: CommandMemory::default(),
            rng: StdRng::from_entropy(),
            queue: VecDeque::new(),
            in_flight: None,
        }
    }

    pub(crate) fn id(&self) -> &DeviceId {
        &self.id
    }

    pub(crate) fn behaviour(&self) -> &Behaviour {
        &self.behaviour
    }

    pub(crate) fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    /// The device's random source (latency, failures, drops, churn).
    pub(crate) fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// A COMMAND for this device arrived; it waits its turn in the queue.
    pub(crate) fn receive(&mut self, id: Uuid, name: String, payload: Bytes) {
        tracing::debug!(command_id = %id, device_id = %self.id, %name, "command received");
        self.queue.push_back(Incoming { id, name, payload });
    }

    /// Commands waiting behind the running one.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// When the running command is done, if one runs.
    pub(crate) fn done_at(&self) -> Option<Instant> {
        self.in_flight.as_ref().map(|f| f.done_at)
    }

    /// Takes queued commands in order while the device is idle: a repeat is
    /// returned with its remembered answer (to send, then call again), a new id
    /// is lost at `drop_ratio` or else starts executing. Deciding here rather
    /// than on arrival means a repeat of the running command is never "new":
    /// it waits for, and gets, its answer.
    pub(crate) fn take_queued(&mut self) -> Option<(Uuid, Answer)> {
        while self.in_flight.is_none() {
            let command = self.queue.pop_front()?;
            if let Some(answer) = self.memory.answer(&command.id).cloned() {
                tracing::debug!(command_id = %command.id, device_id = %self.id, "repeated command, answering from memory");
                self.counters.update(|s| s.duplicates += 1);
                return Some((command.id, answer));
            }
            if self.rng.gen_bool(self.behaviour.drop_ratio) {
                self.lose(&command);
            } else {
                self.start(command);
            }
        }
        None
    }

    /// Loses a command with a new id, as the line would: it is not run, not
    /// remembered and not answered, so a re-send is new again.
    fn lose(&self, command: &Incoming) {
        tracing::debug!(command_id = %command.id, device_id = %self.id, "command dropped (drop ratio)");
        self.counters.update(|s| s.dropped += 1);
    }

    fn start(&mut self, command: Incoming) {
        tracing::debug!(command_id = %command.id, device_id = %self.id, name = %command.name, "executing");
        self.counters.update(|s| s.received += 1);
        let (min, max) = self.behaviour.latency_ms;
        let latency = Duration::from_millis(self.rng.gen_range(min..=max));
        let done_at = Instant::now() + latency + requested_delay(&command.payload);
        self.in_flight = Some(InFlight { command, done_at });
    }

    /// Completes the running command: its answer is decided, remembered and counted.
    pub(crate) fn finish(&mut self) -> Option<(Uuid, Answer)> {
        let InFlight { command, .. } = self.in_flight.take()?;
        let random_failure = self.rng.gen_bool(self.behaviour.fail_ratio);
        let answer = execute(self.id.as_str(), &command.name, &command.payload, random_failure);
        let repeated = self.memory.remember(command.id, answer.clone());
        if repeated {
            tracing::error!(command_id = %command.id, device_id = %self.id, "command id executed a second time");
        }
        tracing::debug!(command_id = %command.id, device_id = %self.id, code = answer.code, "executed");
        self.counters.update(|s| {
            s.executed += 1;
            s.failed += u64::from(answer.code != 0);
            s.executed_ids_repeated += u64::from(repeated);
        });
        Some((command.id, answer))
    }

    /// The RESULT frames answering `id`: one, or two with `duplicate_results`.
    pub(crate) fn result_frames(&self, id: Uuid, answer: Answer) -> Vec<Frame> {
        tracing::debug!(command_id = %id, device_id = %self.id, code = answer.code, "answering");
        let frame = Frame::Result { id, code: answer.code, payload: answer.payload };
        if self.behaviour.duplicate_results {
            vec![frame.clone(), frame]
        } else {
            vec![frame]
        }
    }

    /// The link went away: queued commands are lost with it (the receiver
    /// sends them again); a running one still completes.
    pub(crate) fn link_lost(&mut self) {
        self.queue.clear();
    }
}

/// Sleeps until `deadline`, or forever if there is none. A deadline already
/// reached is ready at once: tokio's timer rounds every deadline up to its next
/// 1 ms tick, which made a zero-latency device take about a millisecond.
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) if deadline <= Instant::now() => {}
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::SharedStats;

    fn firmware(config: FleetConfig) -> (Firmware, Arc<SharedStats>) {
        let stats = SharedStats::new(vec![DeviceId::parse("d").unwrap()]);
        let behaviour = Arc::new(Behaviour::from_config(&config));
        let counters = DeviceCounters::new(stats.clone(), 0);
        (Firmware::new(DeviceId::parse("d").unwrap(), behaviour, counters), stats)
    }

    #[test]
    fn behaviour_never_panics_on_odd_config() {
        let config = FleetConfig { fail_ratio: f64::NAN, latency_ms: (9, 3), ..FleetConfig::default() };
        let behaviour = Behaviour::from_config(&config);
        assert_eq!(behaviour.fail_ratio, 0.0);
        assert_eq!(behaviour.latency_ms, (3, 9));
        let config = FleetConfig {
            fail_ratio: 4.0,
            drop_ratio: f64::NAN,
            churn_ms: Some((80, 50)),
            ..FleetConfig::default()
        };
        let behaviour = Behaviour::from_config(&config);
        assert_eq!(behaviour.fail_ratio, 1.0);
        assert_eq!(behaviour.drop_ratio, 0.0);
        assert_eq!(behaviour.churn_ms, Some((50, 80)));
    }

    #[test]
    fn one_runs_at_a_time_and_a_repeat_is_answered_from_memory() {
        let (mut fw, stats) = firmware(FleetConfig { duplicate_results: true, ..FleetConfig::default() });
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        fw.receive(a, "echo".into(), Bytes::from_static(b"x"));
        fw.receive(b, "echo".into(), Bytes::new());
        fw.receive(a, "echo".into(), Bytes::new());
        assert!(fw.take_queued().is_none(), "a starts");
        assert_eq!(fw.queued(), 2, "b and the repeat wait");
        let (id, answer) = fw.finish().unwrap();
        assert_eq!((id, answer.payload.as_ref()), (a, &b"x"[..]));
        assert_eq!(fw.result_frames(id, answer).len(), 2, "duplicate_results sends it twice");
        assert!(fw.take_queued().is_none(), "b starts");
        fw.finish().unwrap();
        let (id, answer) = fw.take_queued().expect("the repeat of a, from memory");
        assert_eq!((id, answer.payload.as_ref()), (a, &b"x"[..]));
        let stats = &stats.snapshot().devices["d"];
        assert_eq!((stats.received, stats.executed, stats.duplicates), (2, 2, 1));
    }
}
