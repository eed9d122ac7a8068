//! Devices over TCP. Each connection gets a task that owns its socket: it
//! waits for the HELLO naming the device, then writes the device's commands and
//! forwards its results until either side goes away.
//!
//! With a fleet secret (`auth`), the HELLO is answered with a CHALLENGE and
//! the device is registered — and may take over its own older connection —
//! only after a valid AUTH; a refused connection is closed and the device's
//! current one is kept. A RESULT is forwarded only for a command written to
//! that same device here (`Bridge::written_to`). The listener may speak TLS.
//!
//! Limits (issue 13; PROTOCOL.md §5.5): at most
//! [`Limits::max_connections`] connections at once (more are closed at once
//! and counted); at most [`Limits::max_handshakes`] of them still in their
//! opening (TLS, HELLO, AUTH) — a new one over that closes the oldest opening,
//! so idle connections cannot keep devices out, a real device's opening
//! taking milliseconds; an opening has [`Limits::handshake_timeout`]; a
//! device silent for half [`Limits::idle_timeout`] gets a PING, and is
//! closed when silent for all of it. Until a connection has named (and
//! proved) its device its codec takes bodies of at most
//! [`protocol::frame::HANDSHAKE_MAX_BODY`] bytes, so an opening never holds
//! more than a small read buffer; after it, the buffer grows to a declared
//! frame's size only while that frame is being read (the codec gives it back).
//!
//! A device has at most [`Window::size`] commands written and unanswered (1
//! by default: one at a time, as on a serial bus); the others wait in the
//! task, not in the socket, so a cancel still stops them. A re-sent copy of
//! a command already written is written again at once (the device answers a
//! repeated id from memory); a command unanswered for
//! [`Window::answer_timeout`] gives up its place.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{log_refusal, DeviceAuth, RateLimited, Refusal, LOG_PERIOD};
use crate::bridge::Bridge;
use crate::{sleep_until, Counters, Env};
use plumbing::memory::RecentIds;
use protocol::envelope::{CommandMessage, ReportKind};
use protocol::{DeviceId, Frame, FrameCodec};

/// A write buffer grown past this (a large COMMAND) is given back once written.
const WRITE_BUFFER_KEEP: usize = 64 * 1024;
/// A connection is closed at this many bad frames before its HELLO (not a
/// device); after the HELLO it is never closed for noise alone (the codec resynchronises).
const BAD_FRAMES_BEFORE_HELLO: usize = 4;
/// Answered command ids remembered per connection, to drop duplicate results.
const ANSWERED_MEMORY: usize = 4096;
/// How long a `delivered` report is held back after its frame is written. A
/// result within that time says "delivered" too, so a quick device costs one
/// report (one message, one row update at the gateway) instead of two.
const DELIVERED_HOLD: Duration = Duration::from_millis(20);

/// A device's byte stream: plain TCP, or TLS over it.
trait DeviceStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> DeviceStream for S {}

type Socket = Framed<Box<dyn DeviceStream>, FrameCodec>;

/// How device connections are taken: their window, authentication and TLS.
pub(crate) struct Devices {
    pub(crate) window: Window,
    pub(crate) auth: DeviceAuth,
    /// TLS on the listener (`--tls-cert`/`--tls-key`), if on.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(crate) limits: Limits,
}

/// What a device connection may cost (flags in `Config`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections at once, openings included (`--max-device-connections`).
    pub(crate) max_connections: usize,
    /// Connections still in their opening (`--max-device-handshakes`).
    pub(crate) max_handshakes: usize,
    /// TLS handshake, HELLO and AUTH within this (`--device-handshake-timeout-ms`).
    pub(crate) handshake_timeout: Duration,
    /// A device silent this long is closed; it gets a PING at half of it
    /// (`--device-idle-timeout-ms`).
    pub(crate) idle_timeout: Duration,
}

/// The connections still in their opening, oldest first: each can be told to give up.
#[derive(Default)]
struct Handshakes {
    next: u64,
    open: BTreeMap<u64, CancellationToken>,
}

impl Handshakes {
    /// Registers a new opening; when `max` are open already, the oldest is
    /// returned to be closed.
    fn begin(&mut self, max: usize) -> (u64, CancellationToken, Option<CancellationToken>) {
        let evicted = if self.open.len() >= max { self.open.pop_first().map(|(_, t)| t) } else { None };
        let id = self.next;
        self.next += 1;
        let token = CancellationToken::new();
        self.open.insert(id, token.clone());
        (id, token, evicted)
    }

    fn end(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// Counts a live connection in `receiver_device_connections` until dropped.
struct Live(Arc<Counters>);

impl Live {
    fn new(counters: &Arc<Counters>) -> Live {
        counters.device_connections.inc();
        Live(counters.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.device_connections.dec();
    }
}

/// What every connection task shares besides the bridge.
struct Shared {
    devices: Devices,
    /// Warnings about refused connections and foreign results, rate-limited.
    refusals: RateLimited,
    foreign: RateLimited,
    /// Notes about connections closed by a limit, rate-limited.
    limited: RateLimited,
    handshakes: Mutex<Handshakes>,
}

/// How many commands a device has at once, and for how long each holds its place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Written and unanswered commands per device, at most (≥ 1).
    pub(crate) size: usize,
    pub(crate) answer_timeout: Duration,
}

/// Commands a device's task holds, not yet written (besides the bridge's queue).
const WAITING: usize = crate::bridge::DEVICE_QUEUE;

/// Accepts device connections until shutdown.
pub(crate) async fn serve(listener: TcpListener, env: Env, devices: Devices) {
    let Env { bridge, counters, shutdown, tasks } = env;
    let limits = devices.limits;
    let shared = Arc::new(Shared {
        devices,
        refusals: RateLimited::new(LOG_PERIOD),
        foreign: RateLimited::new(LOG_PERIOD),
        limited: RateLimited::new(LOG_PERIOD),
        handshakes: Mutex::new(Handshakes::default()),
    });
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                // Only this loop adds connections: the check cannot race past the limit.
                if counters.device_connections.get() >= limits.max_connections as i64 {
                    counters.device_connections_refused.inc();
                    shared.limited.log(|suppressed| {
                        tracing::warn!(%peer, suppressed, limit = limits.max_connections, "device connection refused: --max-device-connections reached");
                    });
                    drop(socket);
                    continue;
                }
                let live = Live::new(&counters);
                let (ticket, give_up, evicted) =
                    shared.handshakes.lock().expect("handshakes lock").begin(limits.max_handshakes);
                if let Some(oldest) = evicted {
                    oldest.cancel();
                    counters.device_handshakes_evicted.inc();
                }
                let _ = socket.set_nodelay(true);
                let conn =
                    Connection { bridge: bridge.clone(), counters: counters.clone(), shared: shared.clone() };
                let opening = Ticket { id: ticket, give_up };
                let shutdown = shutdown.clone();
                tasks.spawn(async move {
                    conn.run(socket, peer, opening, shutdown).await;
                    drop(live);
                });
            }
            Err(e) => {
                // e.g. out of file descriptors: pause rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What became of a command handed to `write_command`.
enum Written {
    /// The frame went out.
    Yes(Uuid),
    /// Not written, and reported undeliverable.
    Refused,
    /// The socket is gone: why.
    Gone(std::io::Error),
}

struct Connection {
    bridge: Bridge,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
}

/// A connection's place among the openings.
struct Ticket {
    id: u64,
    /// Cancelled when a newer opening needs the place.
    give_up: CancellationToken,
}

/// How a connection's opening (TLS, HELLO, AUTH) ended.
enum Opening {
    /// A device that proved its id (with its key generation, when it did).
    Device(DeviceId, Option<u32>, Socket),
    /// Not a device (no TLS handshake, no valid HELLO).
    NotADevice(&'static str),
    /// No valid HELLO (and AUTH) within the handshake timeout.
    TimedOut,
    /// Closed to make room for a newer opening (`--max-device-handshakes`).
    Evicted,
    /// A device id, but its authentication failed.
    Refused(DeviceId, Refusal),
}

/// A device's commands on this connection: taken from the bridge's queue,
/// waiting for a place in the window; and written, awaiting their answer.
#[derive(Default)]
struct Flow {
    waiting: VecDeque<CommandMessage>,
    /// Waiting commands already reported `queued`.
    reported: std::collections::HashSet<Uuid>,
    /// Written and unanswered: id and when it was (last) written.
    in_flight: Vec<(Uuid, Instant)>,
}

impl Flow {
    /// The next command to write now, if any: a re-sent copy of one in flight
    /// first, else the oldest waiting while the window has room.
    fn next_to_write(&mut self, window: usize) -> Option<CommandMessage> {
        let resent = self.waiting.iter().position(|c| self.in_flight.iter().any(|(id, _)| *id == c.id));
        match resent {
            Some(i) => self.waiting.remove(i),
            None if self.in_flight.len() < window => self.waiting.pop_front(),
            None => None,
        }
    }

    fn written(&mut self, id: Uuid, now: Instant) {
        self.reported.remove(&id);
        self.in_flight.retain(|(i, _)| *i != id);
        self.in_flight.push((id, now));
    }

    /// The waiting commands not reported `queued` yet, now counted as
    /// reported; nothing to do (and no allocation) while none waits.
    fn newly_waiting(&mut self) -> Vec<Uuid> {
        if self.waiting.is_empty() {
            self.reported.clear();
            return Vec::new();
        }
        let waiting: std::collections::HashSet<Uuid> = self.waiting.iter().map(|c| c.id).collect();
        self.reported.retain(|id| waiting.contains(id));
        waiting.into_iter().filter(|id| self.reported.insert(*id)).collect()
    }

    fn answered(&mut self, id: Uuid) {
        self.in_flight.retain(|(i, _)| *i != id);
    }

    /// When the oldest unanswered command gives up its place.
    fn next_timeout(&self, timeout: Duration) -> Option<Instant> {
        self.in_flight.iter().map(|(_, at)| *at + timeout).min()
    }

    fn drop_timed_out(&mut self, timeout: Duration, now: Instant) {
        self.in_flight.retain(|(id, at)| {
            let keep = *at + timeout > now;
            if !keep {
                tracing::debug!(command_id = %id, "no answer within the device answer timeout; its place in the window is freed");
            }
            keep
        });
    }
}

impl Connection {
    async fn run(
        self,
        socket: TcpStream,
        peer: std::net::SocketAddr,
        ticket: Ticket,
        shutdown: CancellationToken,
    ) {
        let limits = self.shared.devices.limits;
        let deadline = Instant::now() + limits.handshake_timeout;
        // The margin lets the AUTH's own deadline (a refusal naming the device) fire first.
        let opening = tokio::select! {
            opened = tokio::time::timeout_at(deadline + Duration::from_millis(500), self.open(socket, deadline)) => {
                opened.unwrap_or(Opening::TimedOut)
            }
            () = ticket.give_up.cancelled() => Opening::Evicted,
        };
        self.shared.handshakes.lock().expect("handshakes lock").end(ticket.id);
        let (device_id, generation, framed) = match opening {
            Opening::Device(device_id, generation, framed) => (device_id, generation, framed),
            Opening::NotADevice(why) => {
                self.counters.connections_rejected.inc();
                self.shared
                    .limited
                    .log(|suppressed| tracing::info!(%peer, suppressed, "connection closed: {why}"));
                return;
            }
            Opening::TimedOut => {
                self.counters.connections_rejected.inc();
                self.counters.device_handshake_timeouts.inc();
                self.shared.limited.log(|suppressed| {
                    tracing::info!(%peer, suppressed, "connection closed: no valid HELLO (and AUTH) within --device-handshake-timeout-ms");
                });
                return;
            }
            Opening::Evicted => {
                self.shared.limited.log(|suppressed| {
                    tracing::info!(%peer, suppressed, "connection closed in its opening: --max-device-handshakes reached, a newer connection took its place");
                });
                return;
            }
            Opening::Refused(device_id, why) => {
                self.counters.device_auth_refused.inc();
                log_refusal(&self.shared.refusals, &device_id, peer, &why);
                return;
            }
        };
        let Some(attached) = self.bridge.attach_with_key(&device_id, generation).await else {
            let current = self.bridge.key_generation(&device_id).unwrap_or_default();
            let why = Refusal::OlderGeneration { offered: generation.unwrap_or_default(), current };
            self.counters.device_auth_refused.inc();
            log_refusal(&self.shared.refusals, &device_id, peer, &why);
            return;
        };
        // Every event of this connection, each command's included, carries the device id.
        let span = tracing::info_span!("device", %device_id, %peer);
        async {
            tracing::info!("device connected");
            let conn = attached.conn;
            let reason = self.serve(&device_id, framed, attached.commands, shutdown.clone()).await;
            // At shutdown the bridge says goodbye for every device at once.
            if !shutdown.is_cancelled() {
                self.bridge.detach(&device_id, conn).await;
            }
            tracing::info!(%reason, "device disconnected");
        }
        .instrument(span)
        .await
    }

    /// The TLS handshake (if on), the HELLO, the challenge–response (if
    /// devices authenticate); nothing is registered yet, so the caller's
    /// timeout may drop it anywhere.
    async fn open(&self, socket: TcpStream, deadline: Instant) -> Opening {
        let stream: Box<dyn DeviceStream> = match &self.shared.devices.tls {
            Some(tls) => match tls.accept(socket).await {
                Ok(stream) => Box::new(stream),
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return Opening::NotADevice("TLS handshake failed");
                }
            },
            None => Box::new(socket),
        };
        // Only HELLO and AUTH are expected: small bodies, a small buffer.
        let mut framed = Framed::new(stream, FrameCodec::new(protocol::frame::HANDSHAKE_MAX_BODY));
        let Some(device_id) = self.hello(&mut framed).await else {
            return Opening::NotADevice("no valid HELLO");
        };
        let generation = match &self.shared.devices.auth {
            DeviceAuth::Open => None,
            DeviceAuth::Required(secret) => {
                match challenge(&mut framed, &device_id, secret, deadline).await {
                    Ok(generation) => Some(generation),
                    Err(why) => return Opening::Refused(device_id, why),
                }
            }
        };
        framed.codec_mut().set_max_body(protocol::frame::DEFAULT_MAX_BODY);
        Opening::Device(device_id, generation, framed)
    }

    /// Reads up to the first HELLO; `None` if the peer is not a device.
    async fn hello(&self, framed: &mut Socket) -> Option<DeviceId> {
        let mut bad = 0;
        while let Some(item) = framed.next().await {
            match item.ok()? {
                Ok(Frame::Hello { device_id }) => return Some(device_id),
                _ => {
                    self.counters.bad_frames.inc();
                    bad += 1;
                    if bad >= BAD_FRAMES_BEFORE_HELLO {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Serves the device until either side goes away, and says why; a
    /// `delivered` still held back then is sent (the frame was written).
    async fn serve(
        &self,
        device_id: &DeviceId,
        framed: Socket,
        commands: tokio::sync::mpsc::Receiver<CommandMessage>,
        shutdown: CancellationToken,
    ) -> String {
        let mut held = VecDeque::new();
        let reason = self.serve_until_gone(device_id, framed, commands, &mut held, shutdown).await;
        for (id, _) in held {
            self.bridge.report(id, device_id, ReportKind::Delivered).await;
        }
        reason
    }

    async fn serve_until_gone(
        &self,
        device_id: &DeviceId,
        mut framed: Socket,
        mut commands: tokio::sync::mpsc::Receiver<CommandMessage>,
        held: &mut VecDeque<(Uuid, Instant)>,
        shutdown: CancellationToken,
    ) -> String {
        let mut answered = RecentIds::new(ANSWERED_MEMORY);
        let mut flow = Flow::default();
        let Window { size: window, answer_timeout } = self.shared.devices.window;
        let idle = self.shared.devices.limits.idle_timeout;
        // When the device was last heard from, and whether it has been pinged since.
        let (mut heard, mut pinged) = (Instant::now(), false);
        loop {
            while let Some(cmd) = flow.next_to_write(window) {
                match self.write_command(device_id, &mut framed, cmd).await {
                    Written::Yes(id) => {
                        let now = Instant::now();
                        flow.written(id, now);
                        held.push_back((id, now));
                    }
                    Written::Refused => {}
                    Written::Gone(e) => return format!("writing to the device failed: {e}"),
                }
            }
            // Those left waiting are not lost: the gateway should not re-send them at its ack timeout.
            for id in flow.newly_waiting() {
                self.bridge.report(id, device_id, ReportKind::Queued).await;
            }
            let next_release = held.front().map(|(_, at)| *at + DELIVERED_HOLD);
            let room = flow.waiting.len() < WAITING;
            let quiet_until = if pinged { heard + idle } else { heard + idle / 2 };
            tokio::select! {
                _ = shutdown.cancelled() => return "the receiver is shutting down".into(),
                () = tokio::time::sleep_until(quiet_until) => {
                    if pinged {
                        self.counters.device_idle_closed.inc();
                        return format!("silent for {} ms (--device-idle-timeout-ms), not even a PONG", idle.as_millis());
                    }
                    // A healthy device answers with a PONG (PROTOCOL.md §5.6).
                    if framed.send(&Frame::Ping).await.is_err() {
                        return "writing a PING to the device failed".into();
                    }
                    pinged = true;
                }
                () = sleep_until(next_release) => {
                    let now = Instant::now();
                    while let Some((id, _)) = held.front().filter(|(_, at)| *at + DELIVERED_HOLD <= now) {
                        self.bridge.report(*id, device_id, ReportKind::Delivered).await;
                        held.pop_front();
                    }
                }
                () = sleep_until(flow.next_timeout(answer_timeout)) => {
                    flow.drop_timed_out(answer_timeout, Instant::now());
                }
                cmd = commands.recv(), if room => {
                    // None: a newer connection of the same device took over.
                    let Some(cmd) = cmd else { return "a newer connection of the same device took over".into() };
                    // A re-sent command's answer must go through again.
                    answered.forget(&cmd.id);
                    flow.waiting.push_back(cmd);
                }
                item = framed.next() => match item {
                    None => return "the device closed the connection".into(),
                    Some(Err(e)) => return format!("reading from the device failed: {e}"),
                    Some(Ok(Ok(frame))) => {
                        (heard, pinged) = (Instant::now(), false);
                        if let Frame::Result { id, .. } = &frame {
                            // The result says "delivered" as well.
                            held.retain(|(h, _)| h != id);
                            flow.answered(*id);
                        }
                        if !self.on_frame(device_id, &mut framed, &mut answered, frame).await {
                            return "writing a PONG to the device failed".into();
                        }
                    }
                    Some(Ok(Err(e))) => {
                        (heard, pinged) = (Instant::now(), false);
                        self.counters.bad_frames.inc();
                        tracing::debug!(error = %e, "bad frame dropped");
                    }
                },
            }
        }
    }

    /// Writes one command frame; the caller then owes its `delivered` report.
    async fn write_command(&self, device_id: &DeviceId, framed: &mut Socket, cmd: CommandMessage) -> Written {
        if self.bridge.refused(&cmd).await {
            return Written::Refused;
        }
        let id = cmd.id;
        let frame = Frame::Command { id, name: cmd.name, payload: cmd.payload_base64.into() };
        match framed.send(&frame).await {
            Ok(()) => {
                if framed.write_buffer().capacity() > WRITE_BUFFER_KEEP {
                    // A large COMMAND went out: its buffer is not kept for the connection's life.
                    *framed.write_buffer_mut() = bytes::BytesMut::new();
                }
                self.counters.commands_written.inc();
                tracing::debug!(command_id = %id, "command frame written");
                Written::Yes(id)
            }
            Err(protocol::frame::EncodeError::Io(e)) => {
                tracing::info!(command_id = %id, error = %e, "write failed; not delivered");
                Written::Gone(e)
            }
            Err(e) => {
                self.bridge.undeliverable(id, device_id, format!("cannot frame the command: {e}")).await;
                Written::Refused
            }
        }
    }

    /// Handles one frame from the device. False if the socket is gone.
    async fn on_frame(
        &self,
        device_id: &DeviceId,
        framed: &mut Socket,
        answered: &mut RecentIds<Uuid>,
        frame: Frame,
    ) -> bool {
        match frame {
            Frame::Result { id, code, payload } => {
                tracing::debug!(command_id = %id, code, "result frame read");
                if !self.bridge.written_to(id, device_id) {
                    // C5: a device answers only what was sent to it.
                    self.counters.foreign_results.inc();
                    self.shared.foreign.log(|suppressed| {
                        tracing::warn!(command_id = %id, suppressed, "RESULT for a command not written to this device here dropped");
                    });
                    return true;
                }
                if !answered.insert(id, ()) {
                    self.counters.duplicate_results.inc();
                    tracing::debug!(command_id = %id, "duplicate result dropped");
                    return true;
                }
                self.bridge.result(id, device_id, code, payload.to_vec()).await;
                true
            }
            Frame::Ping => framed.send(&Frame::Pong).await.is_ok(),
            Frame::Pong => true,
            Frame::Hello { .. } | Frame::Command { .. } | Frame::Challenge { .. } | Frame::Auth { .. } => {
                self.counters.bad_frames.inc();
                true
            }
        }
    }
}

/// Sends a CHALLENGE and checks the AUTH that must come next: the key
/// generation it proved, or why not.
async fn challenge(
    framed: &mut Socket,
    device_id: &DeviceId,
    secret: &protocol::device_auth::FleetSecret,
    deadline: Instant,
) -> Result<u32, Refusal> {
    let nonce = DeviceAuth::nonce();
    framed.send(&Frame::Challenge { nonce }).await.map_err(|_| Refusal::NoAuth)?;
    let answer = tokio::time::timeout_at(deadline, framed.next()).await;
    let Ok(Some(Ok(Ok(Frame::Auth { generation, proof })))) = answer else {
        return Err(Refusal::NoAuth);
    };
    if generation == 0 {
        return Err(Refusal::GenerationZero);
    }
    if !secret.verify(device_id, generation, &nonce, &proof) {
        return Err(Refusal::BadProof(generation));
    }
    Ok(generation)
}
