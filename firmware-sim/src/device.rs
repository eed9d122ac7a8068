//! One simulated device on TCP: connect (with backoff), say HELLO, then serve
//! frames until the connection drops or the fleet shuts down; again and again.
//! A device given several receivers moves to the next one (round robin)
//! after every failed connect and every lost connection.
//!
//! Commands are handled by the device's [`Firmware`] (one at a time, in
//! arrival order, from a small queue); PINGs are answered at once, even while
//! a command is "executing". The firmware, with its memory and counters,
//! belongs to the device, not the connection, so it survives reconnects.
//!
//! Authentication: a CHALLENGE from the receiver is answered with an AUTH
//! made with the device's key (derived from the fleet secret, at the
//! fleet's current key generation); a device without a key ends the
//! connection, saying so. A new key generation (`Fleet::set_key_generation`)
//! makes every device reconnect with it, as a real one would after a rotation.
//!
//! Faults on demand: `drop_ratio` loses commands with a new id before they
//! are looked at (in the firmware), `churn_ms` makes the device hang up on its own.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use plumbing::backoff::Backoff;
use protocol::frame::EncodeError;
use protocol::{DeviceId, Frame, FrameCodec, FrameError};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::firmware::{sleep_until, Behaviour, Firmware};
use crate::memory::Answer;
use crate::stats::DeviceCounters;

/// Commands waiting behind the one executing. When full, the device stops
/// reading, so a flooding receiver is held back by TCP rather than by memory.
const MAX_QUEUED_COMMANDS: usize = 64;
/// Give up on a connect attempt after this long and back off.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubled per failure up to [`MAX_BACKOFF`], with
/// jitter so a fleet that lost its receiver does not knock on its door in lockstep.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A device's byte stream: plain TCP, or TLS over it.
trait LinkStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LinkStream for S {}

type Connection = Framed<Box<dyn LinkStream>, FrameCodec>;

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
    #[error("the receiver requires device authentication and this device has no key (start firmware-sim with --device-key-secret)")]
    AuthRequired,
    #[error("a new key generation: reconnecting with it")]
    Rekey,
}

/// The delays between reconnects.
fn reconnect_backoff() -> Backoff {
    Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF)
}

/// Which of `count` receivers a device tries after the one at `at` failed
/// or was lost: the next, round robin (with one receiver, the same).
fn next_receiver(at: usize, count: usize) -> usize {
    (at + 1) % count.max(1)
}

/// A device and everything it keeps between connections.
pub(crate) struct Device {
    firmware: Firmware,
    /// Index of the receiver (in `Behaviour::connect`) it connects to next.
    receiver: usize,
    /// The key generation to authenticate with (a change: reconnect with it).
    generation: watch::Receiver<u32>,
}

impl Device {
    pub(crate) fn new(
        id: DeviceId,
        behaviour: Arc<Behaviour>,
        counters: DeviceCounters,
        generation: watch::Receiver<u32>,
    ) -> Self {
        Self { firmware: Firmware::new(id, behaviour, counters), receiver: 0, generation }
    }

    /// The receiver it connects to next.
    fn receiver(&self) -> std::net::SocketAddr {
        self.firmware.behaviour().connect[self.receiver]
    }

    /// Connects, serves, reconnects with backoff — to the next receiver when
    /// it has several — until `shutdown`. The firmware, and so the memory of
    /// answered ids, goes along: a command re-sent through the next receiver
    /// is answered from it.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = reconnect_backoff();
        while !shutdown.is_cancelled() {
            match self.connect(&shutdown).await {
                Ok(Some(conn)) => {
                    backoff.reset();
                    let end = self.serve(conn, &shutdown).await;
                    self.firmware.counters().set_connected(false);
                    tracing::info!(reason = %end, addr = %self.receiver(), "disconnected");
                    self.after_disconnect(&shutdown).await;
                }
                Ok(None) => break,
                Err(error) => tracing::debug!(%error, addr = %self.receiver(), "connect failed"),
            }
            self.receiver = next_receiver(self.receiver, self.firmware.behaviour().connect.len());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        tracing::debug!("device stopped");
    }

    /// A framed connection, `None` on shutdown.
    async fn connect(&self, shutdown: &CancellationToken) -> std::io::Result<Option<Connection>> {
        let addr = self.receiver();
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            result = attempt => result.map_err(|_| std::io::ErrorKind::TimedOut)??,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY");
        }
        let stream: Box<dyn LinkStream> = match &self.firmware.behaviour().tls {
            None => Box::new(stream),
            Some(tls) => {
                let name = tls.name.clone().unwrap_or_else(|| addr.ip().into());
                let handshake = tokio::time::timeout(CONNECT_TIMEOUT, tls.connector.connect(name, stream));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    result = handshake => Box::new(result.map_err(|_| std::io::ErrorKind::TimedOut)??),
                }
            }
        };
        Ok(Some(Framed::new(stream, FrameCodec::default())))
    }

    /// Says HELLO, then serves frames until the connection ends.
    async fn serve(&mut self, mut conn: Connection, shutdown: &CancellationToken) -> SessionEnd {
        // Counted before the HELLO goes out, so whoever reads the HELLO also sees the connect.
        self.firmware.counters().set_connected(true);
        tracing::info!(addr = %self.receiver(), "connected");
        let churn_at = self.churn_deadline();
        // A key generation set before this connect is the one it uses.
        self.generation.mark_unchanged();
        let hello = Frame::Hello { device_id: self.firmware.id().clone() };
        if let Err(end) = send(&mut conn, hello, shutdown).await {
            return end;
        }
        loop {
            if let Err(end) = self.answer_queued_repeats(&mut conn, shutdown).await {
                return end;
            }
            if let Err(end) = self.next_event(&mut conn, churn_at, shutdown).await {
                return end;
            }
        }
    }

    /// When this connection is to be dropped on purpose, if churn is on.
    fn churn_deadline(&mut self) -> Option<Instant> {
        let (min, max) = self.firmware.behaviour().churn_ms?;
        let after = Duration::from_millis(self.firmware.rng().gen_range(min..=max));
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
        let room = self.firmware.queued() < MAX_QUEUED_COMMANDS;
        let done_at = self.firmware.done_at();
        // The waits are cancel-safe: `next()` keeps partial frames in the codec
        // buffer, and the deadlines live in the firmware and the caller, not
        // in the futures. A churn only ends the connection between events, so a
        // finished command is always remembered before its RESULT is sent.
        tokio::select! {
            _ = shutdown.cancelled() => Err(SessionEnd::Shutdown),
            Ok(()) = self.generation.changed() => Err(SessionEnd::Rekey),
            _ = sleep_until(churn_at) => {
                self.firmware.counters().update(|s| s.churns += 1);
                Err(SessionEnd::Churn)
            }
            item = conn.next(), if room => match item {
                None => Err(SessionEnd::Closed),
                Some(Err(error)) => Err(SessionEnd::Read(error)),
                Some(Ok(item)) => self.on_item(item, conn, shutdown).await,
            },
            _ = sleep_until(done_at) => {
                match self.firmware.finish() {
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
            Ok(Frame::Command { id, name, payload }) => self.firmware.receive(id, name, payload),
            Ok(Frame::Ping) => send(conn, Frame::Pong, shutdown).await?,
            Ok(Frame::Challenge { nonce }) => {
                let auth = self.answer_challenge(&nonce)?;
                send(conn, auth, shutdown).await?
            }
            Ok(other) => self.bad_frame(&format!("unexpected {other:?}")),
            Err(error) => self.bad_frame(&error.to_string()),
        }
        Ok(())
    }

    /// The AUTH answering a CHALLENGE, with the key of the current generation.
    fn answer_challenge(&self, nonce: &[u8]) -> Result<Frame, SessionEnd> {
        let generation = *self.generation.borrow();
        let id = self.firmware.id();
        let behaviour = self.firmware.behaviour();
        let key = match (&behaviour.own_key, &behaviour.key_secret) {
            (Some(key), _) => *key,
            (None, Some(secret)) => secret.device_key(id, generation),
            (None, None) => {
                tracing::error!("the receiver asks for authentication and this device has no key (--device-key-secret or --device-key)");
                return Err(SessionEnd::AuthRequired);
            }
        };
        let proof = key.prove(id, nonce);
        tracing::debug!(generation, "answering the receiver's challenge");
        Ok(Frame::Auth { generation, proof })
    }

    fn bad_frame(&self, what: &str) {
        tracing::warn!(what, "bad frame ignored");
        self.firmware.counters().update(|s| s.bad_frames += 1);
    }

    /// Lets the firmware take its queued commands while idle, sending the
    /// answers of repeats as it goes.
    async fn answer_queued_repeats(
        &mut self,
        conn: &mut Connection,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        while let Some((id, answer)) = self.firmware.take_queued() {
            self.send_result(conn, id, answer, shutdown).await?;
        }
        Ok(())
    }

    async fn send_result(
        &self,
        conn: &mut Connection,
        id: Uuid,
        answer: Answer,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        for frame in self.firmware.result_frames(id, answer) {
            send(conn, frame, shutdown).await?;
        }
        Ok(())
    }

    /// A real device does not stop working because the link dropped: the
    /// running command completes (its result is lost, its answer remembered);
    /// queued ones are dropped, the receiver will send them again.
    async fn after_disconnect(&mut self, shutdown: &CancellationToken) {
        self.firmware.link_lost();
        let done_at = self.firmware.done_at();
        if done_at.is_some() {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = sleep_until(done_at) => {
                    if let Some((id, _)) = self.firmware.finish() {
                        tracing::debug!(command_id = %id, device_id = %self.firmware.id(), "executed while disconnected, result not sent");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut backoff = reconnect_backoff();
        let bases = [100, 200, 400, 800, 1600, 2000, 2000];
        for base in bases {
            let delay = backoff.next_delay();
            let base = Duration::from_millis(base);
            assert!(delay >= base / 2 && delay <= base, "{delay:?} outside {base:?}/2..={base:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL_BACKOFF);
    }

    #[test]
    fn receivers_are_tried_round_robin() {
        let order: Vec<usize> =
            std::iter::successors(Some(0), |&at| Some(next_receiver(at, 3))).take(5).collect();
        assert_eq!(order, [0, 1, 2, 0, 1]);
        assert_eq!(next_receiver(0, 1), 0, "one receiver: always the same");
    }
}
