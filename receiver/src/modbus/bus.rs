//! The task that owns one bus: opens it, serves its devices' commands and
//! probes one request at a time, and rebuilds it when it breaks.

use std::sync::Arc;
use std::time::Duration;

use plumbing::backoff::Backoff;
use plumbing::memory::RecentIds;
use protocol::envelope::{CommandMessage, ReportKind};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::op::{exception_result, Op};
use super::spec::{DeviceSpec, Link};
use super::wire::{connect, Broken, WireHandle};
use super::{BACKOFF_MAX, BACKOFF_MIN, DEFAULT_TIMEOUT, MEMORY};
use crate::bridge::Bridge;
use crate::turns::Turns;
use crate::Counters;

/// The task owning one bus.
pub(super) struct Bus {
    link: Link,
    devices: Vec<Device>,
    /// Whose commands are taken first next time.
    turns: Turns,
    bridge: Bridge,
    counters: Arc<Counters>,
}

/// Results of the last [`MEMORY`] commands a device ran: code and JSON payload.
type Memory = RecentIds<Uuid, (i32, Arc<[u8]>)>;

struct Device {
    spec: DeviceSpec,
    /// Set while attached to the bridge (online).
    attached: Option<(u64, mpsc::Receiver<CommandMessage>)>,
    memory: Memory,
    next_probe: Instant,
    /// Probe delays while the device does not answer.
    backoff: Backoff,
}

impl Device {
    fn queue(&mut self) -> Option<&mut mpsc::Receiver<CommandMessage>> {
        self.attached.as_mut().map(|(_, commands)| commands)
    }
}

/// Why `serve` returned.
enum Ended {
    Shutdown,
    /// The context must be rebuilt; `answered` tells whether anything answered meanwhile.
    Broken {
        answered: bool,
    },
}

/// A request that got no answer: the context is rebuilt.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{}", timeout_text(*.after, *.written, *.partial))]
    Timeout { after: Duration, written: bool, partial: usize },
    /// The line broke; `written` tells whether the request had gone out.
    #[error("{broken} ({})", if *.written { "after the request was written, before its answer" } else { "before the request was written; it was not sent" })]
    Broken { broken: Broken, written: bool },
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] tokio_modbus::ProtocolError),
    #[error("the answer is for another function")]
    Mismatch,
}

fn timeout_text(after: Duration, written: bool, partial: usize) -> String {
    match (written, partial) {
        (false, _) => format!("the request could not be written within {after:?}"),
        (true, 0) => format!("no answer within {after:?}"),
        (true, n) => format!("no complete answer within {after:?} ({n} bytes of one, then silence)"),
    }
}

/// An open bus: the tokio-modbus context and what its wire tells.
struct Conn {
    ctx: Context,
    wire: WireHandle,
}

/// A command whose request is in flight: `delivered` is reported once, when
/// its request is first written.
struct InFlight<'a> {
    cmd: &'a CommandMessage,
    delivered: bool,
}

impl Bus {
    pub(super) fn new(link: Link, specs: Vec<DeviceSpec>, bridge: Bridge, counters: Arc<Counters>) -> Bus {
        let now = Instant::now();
        let devices = specs
            .into_iter()
            .map(|spec| Device {
                spec,
                attached: None,
                memory: Memory::new(MEMORY),
                next_probe: now,
                backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            })
            .collect();
        Bus { link, devices, turns: Turns::default(), bridge, counters }
    }

    /// Opens the bus, serves it, rebuilds it when it breaks; until shutdown.
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut was_down = false;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = connect(&self.link, self.connect_timeout()) => c,
            };
            let answered = match opened {
                Ok((ctx, wire)) => {
                    if was_down {
                        tracing::info!("bus open again");
                        self.probe_all_now();
                        was_down = false;
                    }
                    match self.serve(Conn { ctx, wire }, &shutdown).await {
                        // At shutdown the bridge says goodbye for every device at once.
                        Ended::Shutdown => return,
                        Ended::Broken { answered } => answered,
                    }
                }
                Err(e) => {
                    if !was_down {
                        tracing::warn!(error = %e, "cannot open the bus; retrying with back-off");
                        was_down = true;
                    }
                    self.detach_all().await;
                    false
                }
            };
            // A bus that answered since the last pause starts over from the shortest.
            if answered {
                backoff.reset();
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    fn connect_timeout(&self) -> Duration {
        self.devices.iter().map(|d| d.spec.timeout).max().unwrap_or(DEFAULT_TIMEOUT)
    }

    fn probe_all_now(&mut self) {
        let now = Instant::now();
        for d in self.devices.iter_mut().filter(|d| d.attached.is_none()) {
            d.next_probe = now;
            d.backoff.reset();
        }
    }

    /// One request at a time: the next device's command (round robin) or a due probe.
    async fn serve(&mut self, mut conn: Conn, shutdown: &CancellationToken) -> Ended {
        let mut answered = false;
        loop {
            let (probe_at, probe_index) = self.next_probe();
            // Both branches are cancel-safe: `Turns::next` takes a message only
            // when it returns it, and a sleep loses nothing.
            let step = tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                (i, cmd) = self.turns.next(&mut self.devices, Device::queue) => match cmd {
                    Some(cmd) => self.command(&mut conn, i, cmd).await,
                    None => {
                        // The bridge dropped our queue: another connection took the id.
                        tracing::warn!(device_id = %self.devices[i].spec.device_id, "device taken over elsewhere");
                        self.devices[i].attached = None;
                        Ok(false)
                    }
                },
                _ = tokio::time::sleep_until(probe_at) => self.probe(&mut conn, probe_index).await,
            };
            match step {
                Ok(got_answer) => answered |= got_answer,
                Err(()) => return Ended::Broken { answered },
            }
        }
    }

    /// The device to probe next and when: an online device idle for its probe
    /// period, or an offline one at its back-off.
    fn next_probe(&self) -> (Instant, usize) {
        let far = Instant::now() + Duration::from_secs(3600);
        self.devices.iter().enumerate().map(|(i, d)| (d.next_probe, i)).min().unwrap_or((far, 0))
    }

    /// Sends a request to device `i` and waits for its answer, within its
    /// timeout. When the line turns out broken — the device had closed or
    /// reset the connection — the request is sent once more, at once, on a
    /// fresh connection: it provably never reached the device when it was not
    /// written, and its fate is unknown when the line broke after it was
    /// written (the writes offered here are absolute, so running one twice
    /// leaves the device as running it once).
    async fn call(
        &mut self,
        conn: &mut Conn,
        i: usize,
        request: Request<'static>,
        mut in_flight: Option<InFlight<'_>>,
    ) -> CallResult {
        let mut outcome = self.exchange(conn, i, request.clone(), in_flight.as_mut()).await;
        if let Err(failure @ Failure::Broken { .. }) = &outcome {
            let device_id = &self.devices[i].spec.device_id;
            tracing::info!(%device_id, error = %failure, "sending the request again on a fresh connection");
            outcome = match connect(&self.link, self.connect_timeout()).await {
                Ok((ctx, wire)) => {
                    *conn = Conn { ctx, wire };
                    self.exchange(conn, i, request, in_flight.as_mut()).await
                }
                Err(e) => Err(Failure::Io(e)),
            };
        }
        match &outcome {
            Ok(_) => self.answered(i).await,
            Err(e) => self.unanswered(i, e).await,
        }
        outcome
    }

    /// One request and its answer on `conn`; reports `delivered` for a
    /// command as soon as its request is written.
    async fn exchange(
        &mut self,
        conn: &mut Conn,
        i: usize,
        request: Request<'static>,
        mut in_flight: Option<&mut InFlight<'_>>,
    ) -> CallResult {
        let (unit, timeout) = (self.devices[i].spec.unit, self.devices[i].spec.timeout);
        conn.ctx.set_slave(Slave(unit));
        conn.wire.begin();
        let call = tokio::time::timeout(timeout, conn.ctx.call(request));
        tokio::pin!(call);
        let result = loop {
            let unreported = in_flight.as_ref().is_some_and(|f| !f.delivered);
            tokio::select! {
                biased;
                () = conn.wire.written(), if unreported => {
                    if let Some(f) = in_flight.as_deref_mut() {
                        self.delivered(f).await;
                    }
                }
                result = &mut call => break result,
            }
        };
        let line = conn.wire.outcome();
        if let Some(f) = in_flight.filter(|f| line.written && !f.delivered) {
            // Answered before the report went out: it still goes first.
            self.delivered(f).await;
        }
        match result {
            Err(_) => Err(Failure::Timeout { after: timeout, written: line.written, partial: line.partial }),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(Failure::Protocol(e)),
            Ok(Err(tokio_modbus::Error::Transport(e))) => Err(match line.broken {
                Some(broken) => Failure::Broken { broken, written: line.written },
                None => Failure::Io(e),
            }),
        }
    }

    /// The command's request is written: `delivered`.
    async fn delivered(&mut self, f: &mut InFlight<'_>) {
        f.delivered = true;
        self.counters.commands_written.inc();
        tracing::debug!(command_id = %f.cmd.id, device_id = %f.cmd.device_id, "request written");
        self.bridge.report(f.cmd.id, &f.cmd.device_id, ReportKind::Delivered).await;
    }

    /// The device answered: it is online, and need not be probed for a while.
    async fn answered(&mut self, i: usize) {
        let d = &mut self.devices[i];
        d.next_probe = Instant::now() + d.spec.probe_every;
        d.backoff.reset();
        if d.attached.is_none() {
            let attached = self.bridge.attach(&d.spec.device_id).await;
            tracing::info!(device_id = %d.spec.device_id, unit = d.spec.unit, "device online");
            d.attached = Some((attached.conn, attached.commands));
        }
    }

    /// A timeout takes the device offline; any failure rebuilds the context.
    async fn unanswered(&mut self, i: usize, failure: &Failure) {
        let d = &mut self.devices[i];
        tracing::info!(device_id = %d.spec.device_id, error = %failure, "request failed; rebuilding the context");
        if matches!(failure, Failure::Timeout { .. }) {
            d.next_probe = Instant::now() + d.backoff.next_delay();
            if let Some((conn, _)) = d.attached.take() {
                tracing::info!(device_id = %d.spec.device_id, "device offline: no answer");
                self.bridge.detach(&d.spec.device_id, conn).await;
            }
        }
    }

    async fn detach_all(&mut self) {
        for d in &mut self.devices {
            if let Some((conn, _)) = d.attached.take() {
                tracing::info!(device_id = %d.spec.device_id, "device offline: bus down");
                self.bridge.detach(&d.spec.device_id, conn).await;
            }
        }
    }

    /// Probes device `i` (a read of holding register 0; an exception is an answer too).
    async fn probe(&mut self, conn: &mut Conn, i: usize) -> Result<bool, ()> {
        match self.call(conn, i, Request::ReadHoldingRegisters(0, 1), None).await {
            Ok(_) => Ok(true),
            Err(_) => Err(()),
        }
    }

    /// Runs one command for device `i`. `Err` when the context must be rebuilt;
    /// `Ok(true)` when the device answered.
    async fn command(&mut self, conn: &mut Conn, i: usize, cmd: CommandMessage) -> Result<bool, ()> {
        let device_id = &cmd.device_id;
        if let Some((code, payload)) = self.devices[i].memory.get(&cmd.id) {
            tracing::debug!(command_id = %cmd.id, %device_id, "re-sent command answered from memory");
            self.bridge.result(cmd.id, device_id, *code, payload.to_vec()).await;
            return Ok(false);
        }
        if self.bridge.refused(&cmd).await {
            return Ok(false);
        }
        let op = match Op::parse(&cmd.name, &cmd.payload_base64) {
            Ok(op) => op,
            Err(e) => {
                let payload = serde_json::to_vec(&json!({ "error": e.to_string() })).expect("serialisable");
                self.bridge.result(cmd.id, device_id, e.code(), payload).await;
                return Ok(false);
            }
        };
        tracing::debug!(command_id = %cmd.id, %device_id, ?op, "request");
        let in_flight = InFlight { cmd: &cmd, delivered: false };
        let (code, payload) = match self.call(conn, i, op.request(), Some(in_flight)).await {
            Ok(Ok(response)) => match op.answer(response) {
                Some(payload) => (0, payload),
                None => {
                    self.unanswered(i, &Failure::Mismatch).await;
                    return Err(());
                }
            },
            Ok(Err(exception)) => exception_result(exception),
            // No result: the gateway re-sends after its result timeout (or at
            // once when the device is back online).
            Err(_) => return Err(()),
        };
        tracing::debug!(command_id = %cmd.id, %device_id, code, "answer read");
        let payload = serde_json::to_vec(&payload).expect("serialisable");
        self.devices[i].memory.insert(cmd.id, (code, payload.as_slice().into()));
        self.bridge.result(cmd.id, device_id, code, payload).await;
        Ok(true)
    }
}

type CallResult = Result<Result<Response, ExceptionCode>, Failure>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_forgets_the_oldest() {
        let mut m = Memory::new(MEMORY);
        let first = Uuid::now_v7();
        m.insert(first, (0, b"{}".as_slice().into()));
        for _ in 0..MEMORY {
            m.insert(Uuid::now_v7(), (0, Arc::from([])));
        }
        assert!(m.get(&first).is_none());
        assert_eq!(m.len(), MEMORY);
    }
}
