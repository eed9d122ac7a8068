//! Devices over TCP. Each connection gets a task that owns its socket: it
//! waits for the HELLO naming the device, then writes the device's commands and
//! forwards its results until either side goes away.
//!
//! A device has at most [`Window::size`] commands written and unanswered (1
//! by default: one at a time, as on a serial bus); the others wait in the
//! task, not in the socket, so a cancel still stops them. A re-sent copy of
//! a command already written is written again at once (the device answers a
//! repeated id from memory); a command unanswered for
//! [`Window::answer_timeout`] gives up its place.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::bridge::Bridge;
use crate::{sleep_until, Counters, Env};
use plumbing::memory::RecentIds;
use protocol::envelope::{CommandMessage, ReportKind};
use protocol::{DeviceId, Frame, FrameCodec};

/// A device must name itself this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed at this many bad frames before its HELLO (not a
/// device); after the HELLO it is never closed for noise alone (the codec resynchronises).
const BAD_FRAMES_BEFORE_HELLO: usize = 4;
/// Answered command ids remembered per connection, to drop duplicate results.
const ANSWERED_MEMORY: usize = 4096;
/// How long a `delivered` report is held back after its frame is written. A
/// result within that time says "delivered" too, so a quick device costs one
/// report (one message, one row update at the gateway) instead of two.
const DELIVERED_HOLD: Duration = Duration::from_millis(20);

type Socket = Framed<TcpStream, FrameCodec>;

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
pub(crate) async fn serve(listener: TcpListener, env: Env, window: Window) {
    let Env { bridge, counters, shutdown, tasks } = env;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let conn = Connection { bridge: bridge.clone(), counters: counters.clone(), window };
                tasks.spawn(conn.run(socket, peer, shutdown.clone()));
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
    window: Window,
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
    async fn run(self, socket: TcpStream, peer: std::net::SocketAddr, shutdown: CancellationToken) {
        let mut framed = Framed::new(socket, FrameCodec::default());
        let device_id = match tokio::time::timeout(HELLO_TIMEOUT, self.hello(&mut framed)).await {
            Ok(Some(id)) => id,
            Ok(None) | Err(_) => {
                self.counters.connections_rejected.inc();
                tracing::info!(%peer, "connection closed: no valid HELLO");
                return;
            }
        };
        // Every event of this connection, each command's included, carries the device id.
        let span = tracing::info_span!("device", %device_id, %peer);
        async {
            tracing::info!("device connected");
            let attached = self.bridge.attach(&device_id).await;
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
        let Window { size: window, answer_timeout } = self.window;
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
            tokio::select! {
                _ = shutdown.cancelled() => return "the receiver is shutting down".into(),
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
            Frame::Hello { .. } | Frame::Command { .. } => {
                self.counters.bad_frames.inc();
                true
            }
        }
    }
}
