//! Devices over TCP. Each connection gets a task that owns its socket: it
//! waits for the HELLO naming the device, then writes the device's commands and
//! forwards its results until either side goes away.

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

/// Accepts device connections until shutdown.
pub(crate) async fn serve(listener: TcpListener, env: Env) {
    let Env { bridge, counters, shutdown, tasks } = env;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let conn = Connection { bridge: bridge.clone(), counters: counters.clone() };
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
    /// The socket is gone.
    Gone,
}

struct Connection {
    bridge: Bridge,
    counters: Arc<Counters>,
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
            self.serve(&device_id, framed, attached.commands, shutdown.clone()).await;
            // At shutdown the bridge says goodbye for every device at once.
            if !shutdown.is_cancelled() {
                self.bridge.detach(&device_id, conn).await;
            }
            tracing::info!("device disconnected");
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

    /// Serves the device until either side goes away; a `delivered` still held
    /// back then is sent (the frame was written).
    async fn serve(
        &self,
        device_id: &DeviceId,
        framed: Socket,
        commands: tokio::sync::mpsc::Receiver<CommandMessage>,
        shutdown: CancellationToken,
    ) {
        let mut held = VecDeque::new();
        self.serve_until_gone(device_id, framed, commands, &mut held, shutdown).await;
        for (id, _) in held {
            self.bridge.report(id, device_id, ReportKind::Delivered).await;
        }
    }

    async fn serve_until_gone(
        &self,
        device_id: &DeviceId,
        mut framed: Socket,
        mut commands: tokio::sync::mpsc::Receiver<CommandMessage>,
        held: &mut VecDeque<(Uuid, Instant)>,
        shutdown: CancellationToken,
    ) {
        let mut answered = RecentIds::new(ANSWERED_MEMORY);
        loop {
            let next_release = held.front().map(|(_, at)| *at + DELIVERED_HOLD);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = sleep_until(next_release) => {
                    let now = Instant::now();
                    while let Some((id, _)) = held.front().filter(|(_, at)| *at + DELIVERED_HOLD <= now) {
                        self.bridge.report(*id, device_id, ReportKind::Delivered).await;
                        held.pop_front();
                    }
                }
                cmd = commands.recv() => {
                    // None: a newer connection of the same device took over.
                    let Some(cmd) = cmd else { return };
                    // A re-sent command's answer must go through again.
                    answered.forget(&cmd.id);
                    match self.write_command(device_id, &mut framed, cmd).await {
                        Written::Yes(id) => held.push_back((id, Instant::now())),
                        Written::Refused => {}
                        Written::Gone => return,
                    }
                }
                item = framed.next() => match item {
                    None | Some(Err(_)) => return,
                    Some(Ok(Ok(frame))) => {
                        if let Frame::Result { id, .. } = &frame {
                            // The result says "delivered" as well.
                            held.retain(|(h, _)| h != id);
                        }
                        if !self.on_frame(device_id, &mut framed, &mut answered, frame).await {
                            return;
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
                Written::Gone
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
