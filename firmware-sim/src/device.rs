//! One simulated device: connect (with backoff), say HELLO, then serve frames
//! until the connection drops or the fleet shuts down; again and again.
//!
//! Commands run one at a time, in arrival order, from a small queue. PINGs are
//! answered at once, even while a command is "executing". The command memory
//! and counters belong to the device, not the connection, so they survive
//! reconnects.
//!
//! Faults on demand: `drop_ratio` loses commands with a new id before they
//! are looked at, `churn_ms` makes the device hang up on its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use protocol::frame::EncodeError;
use protocol::{Frame, FrameCodec, FrameError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::execute::{execute, requested_delay};
use crate::memory::{Answer, CommandMemory};
use crate::stats::DeviceCounters;
use crate::FleetConfig;

/// Commands waiting behind the one executing. When full, the device stops
/// reading, so a flooding receiver is held back by TCP rather than by memory.
const MAX_QUEUED_COMMANDS: usize = 64;
/// Give up on a connect attempt after this long and back off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

type Connection = Framed<TcpStream, FrameCodec>;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("shutting down")]
    Shutdown,
    #[error("receiver closed the connection")]
    Closed,
    #[error("churn: the device hung up on purpose")]
    Churn,
    #[error("read failed: {0}")]
    Read(#[from] std::io::Error),
    #[error("write failed: {0}")]
    Write(#[from] EncodeError),
}

/// A command taken off the wire, not yet looked at.
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

/// The knobs a device reads from the fleet config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Behaviour {
    connect: std::net::SocketAddr,
    pub(crate) fail_ratio: f64,
    pub(crate) latency_ms: (u64, u64),
    pub(crate) duplicate_results: bool,
    pub(crate) drop_ratio: f64,
    churn_ms: Option<(u64, u64)>,
}

impl Behaviour {
    /// Takes the config as given, but never panics on it: a NaN or
    /// out-of-range ratio is clamped and a reversed range is reordered.
    pub(crate) fn from_config(config: &FleetConfig) -> Self {
        Self {
            connect: config.connect,
            fail_ratio: probability(config.fail_ratio),
            latency_ms: ordered(config.latency_ms),
            duplicate_results: config.duplicate_results,
            drop_ratio: probability(config.drop_ratio),
            churn_ms: config.churn_ms.map(ordered),
        }
    }
}

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

/// A device and everything it keeps between connections.
pub(crate) struct Device {
    id: String,
    behaviour: Arc<Behaviour>,
    counters: DeviceCounters,
    memory: CommandMemory,
    rng: StdRng,
    queue: VecDeque<Incoming>,
    in_flight: Option<InFlight>,
}

impl Device {
    pub(crate) fn new(id: String, behaviour: Arc<Behaviour>, counters: DeviceCounters) -> Self {
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

    /// Connects, serves, reconnects with backoff, until `shutdown`.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        while !shutdown.is_cancelled() {
            match self.connect(&shutdown).await {
                Ok(Some(conn)) => {
                    backoff.reset();
                    let end = self.serve(conn, &shutdown).await;
                    self.counters.set_connected(false);
                    tracing::info!(reason = %end, "disconnected");
                    self.after_disconnect(&shutdown).await;
                }
                Ok(None) => break,
                Err(error) => tracing::debug!(%error, "connect failed"),
            }
            let delay = backoff.next_delay(&mut self.rng);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tracing::debug!("device stopped");
    }

    /// A framed connection, `None` on shutdown.
    async fn connect(&self, shutdown: &CancellationToken) -> std::io::Result<Option<Connection>> {
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.behaviour.connect));
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            result = attempt => result.map_err(|_| std::io::ErrorKind::TimedOut)??,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY");
        }
        Ok(Some(Framed::new(stream, FrameCodec::default())))
    }

    /// Says HELLO, then serves frames until the connection ends.
    async fn serve(&mut self, mut conn: Connection, shutdown: &CancellationToken) -> SessionEnd {
        // Counted before the HELLO goes out, so whoever reads the HELLO also sees the connect.
        self.counters.set_connected(true);
        tracing::info!(addr = %self.behaviour.connect, "connected");
        let churn_at = self.churn_deadline();
        let hello = Frame::Hello { device_id: self.id.clone() };
        if let Err(end) = send(&mut conn, hello, shutdown).await {
            return end;
        }
        loop {
            if let Err(end) = self.answer_queued_duplicates(&mut conn, shutdown).await {
                return end;
            }
            if let Err(end) = self.next_event(&mut conn, churn_at, shutdown).await {
                return end;
            }
        }
    }

    /// When this connection is to be dropped on purpose, if churn is on.
    fn churn_deadline(&mut self) -> Option<Instant> {
        let (min, max) = self.behaviour.churn_ms?;
        let after = Duration::from_millis(self.rng.gen_range(min..=max));
        Some(Instant::now() + after)
    }

    /// Waits for one thing to happen: a frame, the running command finishing,
    /// the churn deadline, or shutdown.
    async fn next_event(
        &mut self,
        conn: &mut Connection,
        churn_at: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let room = self.queue.len() < MAX_QUEUED_COMMANDS;
        let done_at = self.in_flight.as_ref().map(|f| f.done_at);
        // The waits are cancel-safe: `next()` keeps partial frames in the codec
        // buffer, and the deadlines live in `self.in_flight` and the caller, not
        // in the futures. A churn only ends the connection between events, so a
        // finished command is always remembered before its RESULT is sent.
        tokio::select! {
            _ = shutdown.cancelled() => Err(SessionEnd::Shutdown),
            _ = sleep_until(churn_at) => {
                self.counters.update(|s| s.churns += 1);
                Err(SessionEnd::Churn)
            }
            item = conn.next(), if room => match item {
                None => Err(SessionEnd::Closed),
                Some(Err(error)) => Err(SessionEnd::Read(error)),
                Some(Ok(item)) => self.on_item(item, conn, shutdown).await,
            },
            _ = sleep_until(done_at) => {
                match self.finish_in_flight() {
                    Some((id, answer)) => self.send_result(conn, id, answer, shutdown).await,
                    None => Ok(()),
                }
            }
        }
    }

    async fn on_item(
        &mut self,
        item: Result<Frame, FrameError>,
        conn: &mut Connection,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        match item {
            Ok(Frame::Command { id, name, payload }) => self.queue.push_back(Incoming { id, name, payload }),
            Ok(Frame::Ping) => send(conn, Frame::Pong, shutdown).await?,
            Ok(other) => self.bad_frame(&format!("unexpected {other:?}")),
            Err(error) => self.bad_frame(&error.to_string()),
        }
        Ok(())
    }

    fn bad_frame(&self, what: &str) {
        tracing::warn!(what, "bad frame ignored");
        self.counters.update(|s| s.bad_frames += 1);
    }

    /// Takes queued commands in order while the device is idle: repeats are
    /// answered from memory, a new id is lost at `drop_ratio` or else starts
    /// executing. Deciding here rather than on arrival means a repeat of the
    /// running command is never "new": it waits for, and gets, its answer.
    async fn answer_queued_duplicates(
        &mut self,
        conn: &mut Connection,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        while self.in_flight.is_none() {
            let Some(command) = self.queue.pop_front() else {
                break;
            };
            match self.memory.answer(&command.id).cloned() {
                Some(answer) => {
                    tracing::info!(command_id = %command.id, "duplicate command, answering from memory");
                    self.counters.update(|s| s.duplicates += 1);
                    self.send_result(conn, command.id, answer, shutdown).await?;
                }
                None if self.rng.gen_bool(self.behaviour.drop_ratio) => self.lose(&command),
                None => self.start(command),
            }
        }
        Ok(())
    }

    /// Loses a command with a new id, as the line would: it is not run, not
    /// remembered and not answered, so a re-send is new again.
    fn lose(&self, command: &Incoming) {
        tracing::info!(command_id = %command.id, "command dropped (drop ratio)");
        self.counters.update(|s| s.dropped += 1);
    }

    fn start(&mut self, command: Incoming) {
        tracing::debug!(command_id = %command.id, name = %command.name, "executing");
        self.counters.update(|s| s.received += 1);
        let (min, max) = self.behaviour.latency_ms;
        let latency = Duration::from_millis(self.rng.gen_range(min..=max));
        let done_at = Instant::now() + latency + requested_delay(&command.payload);
        self.in_flight = Some(InFlight { command, done_at });
    }

    /// Completes the running command: its answer is decided, remembered and counted.
    fn finish_in_flight(&mut self) -> Option<(Uuid, Answer)> {
        let InFlight { command, .. } = self.in_flight.take()?;
        let random_failure = self.rng.gen_bool(self.behaviour.fail_ratio);
        let answer = execute(&self.id, &command.name, &command.payload, random_failure);
        let repeated = self.memory.remember(command.id, answer.clone());
        if repeated {
            tracing::error!(command_id = %command.id, "command id executed a second time");
        }
        self.counters.update(|s| {
            s.executed += 1;
            s.failed += u64::from(answer.code != 0);
            s.executed_ids_repeated += u64::from(repeated);
        });
        Some((command.id, answer))
    }

    async fn send_result(
        &self,
        conn: &mut Connection,
        id: Uuid,
        answer: Answer,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let frame = Frame::Result { id, code: answer.code, payload: answer.payload };
        if self.behaviour.duplicate_results {
            send(conn, frame.clone(), shutdown).await?;
        }
        send(conn, frame, shutdown).await
    }

    /// A real device does not stop working because the link dropped: the
    /// running command completes (its result is lost, its answer remembered);
    /// queued ones are dropped, the receiver will send them again.
    async fn after_disconnect(&mut self, shutdown: &CancellationToken) {
        self.queue.clear();
        let done_at = self.in_flight.as_ref().map(|f| f.done_at);
        if done_at.is_some() {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = sleep_until(done_at) => {
                    if let Some((id, _)) = self.finish_in_flight() {
                        tracing::info!(command_id = %id, "executed while disconnected, result not sent");
                    }
                }
            }
        }
    }
}

/// Sends one frame, giving up on shutdown (a receiver that stopped reading
/// must not keep the fleet from stopping).
async fn send(conn: &mut Connection, frame: Frame, shutdown: &CancellationToken) -> Result<(), SessionEnd> {
    tokio::select! {
        _ = shutdown.cancelled() => Err(SessionEnd::Shutdown),
        result = conn.send(frame) => Ok(result?),
    }
}

/// Sleeps until `deadline`, or forever if there is none. A deadline already
/// reached is ready at once: tokio's timer rounds every deadline up to its next
/// 1 ms tick, which made a zero-latency device take about a millisecond.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) if deadline <= Instant::now() => {}
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reconnect delays: 100 ms doubling to 2 s, each scaled by a random 50–100 %
/// so a fleet that lost its receiver does not knock on its door in lockstep.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: INITIAL_BACKOFF }
    }
}

impl Backoff {
    fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        base.mul_f64(rng.gen_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.next = INITIAL_BACKOFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut backoff = Backoff::default();
        let bases = [100, 200, 400, 800, 1600, 2000, 2000];
        for base in bases {
            let delay = backoff.next_delay(&mut rng);
            let base = Duration::from_millis(base);
            assert!(delay >= base / 2 && delay <= base, "{delay:?} outside {base:?}/2..={base:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= INITIAL_BACKOFF);
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
}
