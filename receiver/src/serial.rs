//! Devices on serial lines (RS-485 style buses) speaking the native frame.
//! One task per port owns it: opens it, reopening with backoff when it
//! disappears, attaches its devices, and runs the bus — one request in flight,
//! devices served round-robin. MQTT is left to [`Bridge`].
//!
//! Addressing: the COMMAND frame names no device, so before each COMMAND the
//! receiver writes a HELLO frame carrying the target device id (an "address"
//! frame, receiver → device). A device takes a COMMAND only when the frame
//! decoded just before it was a HELLO naming it; any other frame or any
//! undecodable input in between cancels the selection. RESULTs need no
//! address: they carry the command id and the bus remembers which device it
//! wrote each id for. Devices announce themselves with a HELLO (device →
//! receiver) when they start or when their line comes back.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use plumbing::backoff::Backoff;
use plumbing::memory::RecentIds;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Framed};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::bridge::Bridge;
use crate::line::SerialLine;
use crate::turns::Turns;
use crate::{sleep_until, Counters, Env};
use protocol::envelope::{CommandMessage, ReportKind};
use protocol::frame::{self, EncodeError, DEFAULT_MAX_BODY};
use protocol::{DeviceId, Frame, FrameCodec, FrameError, SerialFormat};

/// How long the bus waits for a RESULT before it moves on, unless the spec says.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
/// First reopen delay after the port failed or disappeared; doubles per failure…
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// …up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Command ids remembered per port: which device each was written for, and
/// which were already answered (to drop duplicate RESULTs).
const ID_MEMORY: usize = 4096;

/// One `--serial` value: a port, its line settings and the devices on it.
///
/// Syntax: `PATH:SETTINGS[:IDS]`, parsed from the right (so a path may itself
/// contain `:`, as `/dev/serial/by-path/…` names do).
///
/// - `SETTINGS` is `BAUD` followed by optional comma-separated items in any
///   order: a frame format `DPS` — data bits `5`–`8`, parity `N`/`E`/`O`,
///   stop bits `1`/`2` (default `8N1`, see [`SerialFormat`]) — and
///   `timeout=MS`, the per-request timeout (default 2000 ms).
/// - `IDS` is a comma-separated list of device ids attached as soon as the
///   port opens. Devices not listed are attached when they announce
///   themselves with a HELLO. Ids containing `:` cannot be listed (they can
///   still announce themselves).
///
/// Examples: `/dev/ttyUSB0:115200:dev-1,dev-2`, `/dev/ttyUSB0:9600,8E1:dev-1`,
/// `/dev/ttyS1:19200,7O2,timeout=500`.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    /// The port and its line settings.
    pub line: SerialLine,
    /// How long the bus waits for each RESULT.
    pub timeout: Duration,
    /// Devices attached as soon as the port opens (others attach with a HELLO).
    pub devices: Vec<DeviceId>,
}

/// A `--serial` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("expected PATH:BAUD[,8N1][,timeout=MS][:ID,ID,...]")]
    Shape,
    #[error("baud rate {0:?} is not a positive number")]
    Baud(String),
    #[error("setting {0:?} is neither a frame format like 8N1 nor timeout=MS")]
    Setting(String),
    #[error("timeout {0:?} is not a positive number of milliseconds")]
    Timeout(String),
    #[error("device id {0:?} is not valid")]
    DeviceId(String),
}

/// Line settings: what the middle field of a spec holds.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    baud: u32,
    format: SerialFormat,
    timeout: Duration,
}

impl FromStr for Settings {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let mut items = text.split(',');
        let baud = items.next().unwrap_or_default();
        let baud = baud.parse::<u32>().ok().filter(|b| *b > 0).ok_or_else(|| SpecError::Baud(baud.into()))?;
        let mut settings =
            Settings { baud, format: SerialFormat::default(), timeout: DEFAULT_REQUEST_TIMEOUT };
        for item in items {
            if let Some(ms) = item.strip_prefix("timeout=") {
                let ms = ms.parse::<u64>().ok().filter(|ms| *ms > 0);
                settings.timeout = Duration::from_millis(ms.ok_or_else(|| SpecError::Timeout(item.into()))?);
            } else {
                settings.format = item.parse().map_err(|_| SpecError::Setting(item.into()))?;
            }
        }
        Ok(settings)
    }
}

impl FromStr for PortSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let parts: Vec<&str> = text.split(':').collect();
        let n = parts.len();
        if n < 2 {
            return Err(SpecError::Shape);
        }
        // From the right: the last field is the ids unless it is the settings
        // and the field before it is not (that one is then part of the path).
        let last_is_settings =
            parts[n - 1].parse::<Settings>().is_ok() && (n == 2 || parts[n - 2].parse::<Settings>().is_err());
        let (path_parts, settings, ids) = if last_is_settings || n == 2 {
            (&parts[..n - 1], parts[n - 1], None)
        } else {
            (&parts[..n - 2], parts[n - 2], Some(parts[n - 1]))
        };
        let path = path_parts.join(":");
        if path.is_empty() {
            return Err(SpecError::Shape);
        }
        let Settings { baud, format, timeout } = settings.parse()?;
        let devices = match ids {
            None => Vec::new(),
            Some(ids) => ids
                .split(',')
                .map(|id| DeviceId::parse(id).map_err(|_| SpecError::DeviceId(id.to_owned())))
                .collect::<Result<_, _>>()?,
        };
        Ok(PortSpec { line: SerialLine { path, baud, format }, timeout, devices })
    }
}

/// Parses every `--serial` spec (before anything connects: a bad spec fails
/// start-up with its own error).
pub(crate) fn plan(specs: &[String]) -> anyhow::Result<Vec<PortSpec>> {
    specs.iter().map(|s| s.parse::<PortSpec>().map_err(|e| anyhow::anyhow!("--serial {s:?}: {e}"))).collect()
}

/// Starts one task per port; a port that cannot be opened is retried with backoff.
pub(crate) fn start(ports: Vec<PortSpec>, env: &Env) {
    for spec in ports {
        let span = tracing::info_span!("serial", port = %spec.line.path);
        let port = Port {
            spec,
            bridge: env.bridge.clone(),
            counters: env.counters.clone(),
            ids: IdMemory::default(),
        };
        env.tasks.spawn(port.run(env.shutdown.clone()).instrument(span));
    }
}

/// What a port remembers across reopens about the command ids it wrote.
#[derive(Debug)]
struct IdMemory {
    /// Command id → the device it was written for (oldest forgotten first).
    written: RecentIds<Uuid, DeviceId>,
    /// Ids whose RESULT was forwarded since their last write.
    answered: RecentIds<Uuid>,
}

impl Default for IdMemory {
    fn default() -> Self {
        IdMemory { written: RecentIds::new(ID_MEMORY), answered: RecentIds::new(ID_MEMORY) }
    }
}

impl IdMemory {
    fn wrote(&mut self, id: Uuid, device: &DeviceId) {
        // A re-sent command's answer must go through again.
        self.answered.forget(&id);
        self.written.insert(id, device.clone());
    }

    /// The device a RESULT belongs to, if it is the first for its write.
    fn answer(&mut self, id: Uuid) -> Result<DeviceId, Unforwarded> {
        let device = self.written.get(&id).ok_or(Unforwarded::Unknown)?.clone();
        if !self.answered.insert(id, ()) {
            return Err(Unforwarded::Duplicate(device));
        }
        Ok(device)
    }
}

/// Why a RESULT is not forwarded.
#[derive(Debug)]
enum Unforwarded {
    /// This port never wrote the id (or forgot it).
    Unknown,
    /// The write of the id, to this device, was answered already.
    Duplicate(DeviceId),
}

/// One configured port, for the life of the receiver.
struct Port {
    spec: PortSpec,
    bridge: Bridge,
    counters: Arc<Counters>,
    ids: IdMemory,
}

/// Why a session (one open of the port) ended.
#[derive(Debug)]
enum End {
    Shutdown,
    Gone(std::io::Error),
}

impl Port {
    /// Opens, serves, reopens with backoff, until shutdown.
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
        let mut reported = false;
        while !shutdown.is_cancelled() {
            match self.spec.line.open() {
                Ok(stream) => {
                    tracing::info!("port open");
                    reported = false;
                    if let End::Shutdown = self.session(stream, &shutdown).await {
                        break;
                    }
                    backoff.reset();
                }
                // Logged once per outage; the retries are quiet.
                Err(error) if !reported => {
                    tracing::warn!(%error, "cannot open the port; retrying");
                    reported = true;
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Serves one open of the port; its devices are detached when it ends
    /// (except at shutdown, when the bridge says goodbye for every device).
    async fn session<T>(&mut self, stream: T, shutdown: &CancellationToken) -> End
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut bus = Bus { port: self, devices: Vec::new(), turns: Turns::default(), in_flight: None };
        for id in bus.port.spec.devices.clone() {
            bus.attach(id).await;
        }
        let end = bus.serve(Framed::new(stream, FrameCodec::default()), shutdown).await;
        if let End::Gone(error) = &end {
            tracing::warn!(%error, "port gone; its devices are offline until it is back");
            for device in bus.devices.drain(..) {
                bus.port.bridge.detach(&device.id, device.conn).await;
            }
        }
        end
    }
}

/// A device attached on this bus.
struct BusDevice {
    id: DeviceId,
    conn: u64,
    commands: tokio::sync::mpsc::Receiver<CommandMessage>,
}

impl BusDevice {
    fn queue(&mut self) -> Option<&mut tokio::sync::mpsc::Receiver<CommandMessage>> {
        Some(&mut self.commands)
    }
}

/// The request the bus waits for.
struct InFlight {
    id: Uuid,
    device: DeviceId,
    deadline: Instant,
}

/// One session's state: the devices on the line and the request in flight.
struct Bus<'a> {
    port: &'a mut Port,
    devices: Vec<BusDevice>,
    turns: Turns,
    in_flight: Option<InFlight>,
}

type Line<T> = Framed<T, FrameCodec>;

impl Bus<'_> {
    async fn serve<T>(&mut self, mut line: Line<T>, shutdown: &CancellationToken) -> End
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            let deadline = self.in_flight.as_ref().map(|f| f.deadline);
            let idle = self.in_flight.is_none();
            // Cancel-safe: `next()` keeps partial frames in the codec buffer,
            // and `Turns::next` only takes a command when it returns it.
            let step = tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                item = line.next() => match item {
                    None => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "port closed")),
                    Some(Err(error)) => Err(error),
                    Some(Ok(item)) => self.on_item(item, &mut line).await,
                },
                _ = sleep_until(deadline) => self.on_timeout(&mut line).await,
                (index, cmd) = self.turns.next(&mut self.devices, BusDevice::queue), if idle => match cmd {
                    Some(cmd) => self.write_command(index, cmd, &mut line).await,
                    // The device's registration was taken over (e.g. it connected over TCP).
                    None => {
                        let gone = self.devices.remove(index);
                        tracing::info!(device_id = %gone.id, "device taken over by another connection");
                        Ok(())
                    }
                },
            };
            if let Err(error) = step {
                return End::Gone(error);
            }
        }
    }

    async fn attach(&mut self, device_id: DeviceId) {
        if self.devices.iter().any(|d| d.id == device_id) {
            return;
        }
        let attached = self.port.bridge.attach(&device_id).await;
        tracing::info!(%device_id, "device attached");
        self.devices.push(BusDevice { id: device_id, conn: attached.conn, commands: attached.commands });
    }

    /// Handles one decoded item; `Err` only when the port failed.
    async fn on_item<T>(&mut self, item: Result<Frame, FrameError>, line: &mut Line<T>) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        match item {
            Ok(Frame::Result { id, code, payload }) => self.on_result(id, code, payload.to_vec()).await,
            Ok(Frame::Hello { device_id }) => self.attach(device_id).await,
            Ok(Frame::Ping) => return line.send(&Frame::Pong).await.map_err(into_io),
            Ok(Frame::Pong) => {}
            // No authentication on a wired bus (PROTOCOL.md §5.9).
            Ok(other @ (Frame::Command { .. } | Frame::Challenge { .. } | Frame::Auth { .. })) => {
                self.port.counters.bad_frames.inc();
                tracing::debug!(frame = ?other, "unexpected frame from the line dropped");
            }
            Err(error) => {
                self.port.counters.bad_frames.inc();
                tracing::debug!(%error, "bad input skipped");
            }
        }
        Ok(())
    }

    /// Forwards the first RESULT per write of a command id this port wrote,
    /// in time or late; drops (and counts) duplicates and unknown ids.
    async fn on_result(&mut self, id: Uuid, code: i32, payload: Vec<u8>) {
        if self.in_flight.as_ref().is_some_and(|f| f.id == id) {
            self.in_flight = None;
        }
        match self.port.ids.answer(id) {
            Ok(device_id) => {
                tracing::debug!(command_id = %id, %device_id, code, "result frame read");
                self.port.bridge.result(id, &device_id, code, payload).await;
            }
            Err(Unforwarded::Duplicate(device_id)) => {
                self.port.counters.duplicate_results.inc();
                tracing::debug!(command_id = %id, %device_id, "duplicate result dropped");
            }
            Err(Unforwarded::Unknown) => {
                // No device to report it for: counted as bad input.
                self.port.counters.bad_frames.inc();
                tracing::warn!(command_id = %id, "result for a command never written on this port dropped");
            }
        }
    }

    /// The device did not answer in time: the command stays delivered (the
    /// gateway re-sends it after its result timeout) and the bus moves on.
    async fn on_timeout<T>(&mut self, line: &mut Line<T>) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(f) = self.in_flight.take() {
            tracing::info!(command_id = %f.id, device_id = %f.device, "no result in time; next request");
        }
        self.drop_stale_partial(line).await
    }

    /// A partial frame still buffered after a whole request timeout is taken
    /// to be a corrupted header (a length the line will never fill): its first
    /// byte is dropped and what follows is decoded again, as a CRC error would.
    /// Without this a bad length field could stall the line until up to 1 MiB
    /// more arrived.
    async fn drop_stale_partial<T>(&mut self, line: &mut Line<T>) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        if line.read_buffer().is_empty() {
            return Ok(());
        }
        line.read_buffer_mut().advance(1);
        self.port.counters.bad_frames.inc();
        let mut codec = FrameCodec::default();
        while let Ok(Some(item)) = codec.decode(line.read_buffer_mut()) {
            self.on_item(item, line).await?;
        }
        Ok(())
    }

    /// Writes the address HELLO and the COMMAND in one go, then reports
    /// `delivered` and waits for the RESULT. `Err` only when the port failed.
    async fn write_command<T>(
        &mut self,
        index: usize,
        cmd: CommandMessage,
        line: &mut Line<T>,
    ) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        if self.port.bridge.refused(&cmd).await {
            return Ok(());
        }
        let device = self.devices[index].id.clone();
        let id = cmd.id;
        let bytes = match addressed_command(&device, cmd.id, cmd.name, cmd.payload_base64) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.port.bridge.undeliverable(id, &device, format!("cannot frame the command: {e}")).await;
                return Ok(());
            }
        };
        // The Framed write buffer is always flushed after a send, so writing
        // beside it keeps frames whole and in order.
        let stream = line.get_mut();
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        self.port.counters.commands_written.inc();
        tracing::debug!(command_id = %id, device_id = %device, "command frame written");
        self.port.ids.wrote(id, &device);
        self.port.bridge.report(id, &device, ReportKind::Delivered).await;
        let deadline = Instant::now() + self.port.spec.timeout;
        self.in_flight = Some(InFlight { id, device, deadline });
        Ok(())
    }
}

/// The bytes for one request: HELLO naming `device`, then the COMMAND.
fn addressed_command(
    device: &DeviceId,
    id: Uuid,
    name: String,
    payload: Vec<u8>,
) -> Result<BytesMut, EncodeError> {
    let mut bytes = BytesMut::new();
    frame::encode(&Frame::Hello { device_id: device.clone() }, &mut bytes, DEFAULT_MAX_BODY)?;
    frame::encode(&Frame::Command { id, name, payload: payload.into() }, &mut bytes, DEFAULT_MAX_BODY)?;
    Ok(bytes)
}

fn into_io(error: EncodeError) -> std::io::Error {
    match error {
        EncodeError::Io(e) => e,
        other => std::io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parsed;
    use protocol::serial_line::Parity;

    #[test]
    fn path_baud_and_ids() {
        let s: PortSpec = parsed("/dev/ttyUSB0:115200:dev-1,dev-2");
        assert_eq!((s.line.path.as_str(), s.line.baud), ("/dev/ttyUSB0", 115200));
        assert_eq!(s.devices, ["dev-1", "dev-2"]);
        assert_eq!(s.line.format.to_string(), "8N1");
        assert_eq!(s.timeout, DEFAULT_REQUEST_TIMEOUT);
    }

    #[test]
    fn frame_format_and_timeout() {
        let s: PortSpec = parsed("/dev/ttyUSB0:9600,7e2,timeout=500:dev-1");
        assert_eq!(s.line.format.to_string(), "7E2");
        assert_eq!(s.timeout, Duration::from_millis(500));
        let s: PortSpec = parsed("/dev/ttyS1:19200,timeout=50,8O1");
        assert_eq!((s.line.format.parity(), s.timeout), (Parity::Odd, Duration::from_millis(50)));
        assert!(s.devices.is_empty());
    }

    #[test]
    fn paths_may_contain_colons_and_ids_may_look_like_numbers() {
        let s: PortSpec = parsed("/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.0-port0:115200");
        assert_eq!(s.line.path, "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1.0-port0");
        let s: PortSpec = parsed("/dev/ttyS0:9600:1234");
        assert_eq!(
            (s.line.baud, s.devices.as_slice()),
            (9600, [DeviceId::parse("1234").unwrap()].as_slice())
        );
    }

    #[test]
    fn bad_specs_say_why() {
        assert_eq!("/dev/ttyS0".parse::<PortSpec>(), Err(SpecError::Shape));
        assert_eq!("/dev/ttyS0:fast:d".parse::<PortSpec>(), Err(SpecError::Baud("fast".into())));
        assert_eq!("/dev/ttyS0:9600,9N1".parse::<PortSpec>(), Err(SpecError::Setting("9N1".into())));
        assert_eq!(
            "/dev/ttyS0:9600,timeout=0".parse::<PortSpec>(),
            Err(SpecError::Timeout("timeout=0".into()))
        );
        assert_eq!("/dev/ttyS0:9600:a b".parse::<PortSpec>(), Err(SpecError::DeviceId("a b".into())));
        assert_eq!(":9600".parse::<PortSpec>(), Err(SpecError::Shape));
    }

    #[test]
    fn results_are_forwarded_once_per_write_and_only_for_known_ids() {
        let mut ids = IdMemory::default();
        let id = Uuid::from_u128(1);
        let d = DeviceId::parse("d").unwrap();
        let answer = |ids: &mut IdMemory| ids.answer(id).map(String::from);
        assert!(matches!(ids.answer(id), Err(Unforwarded::Unknown)));
        ids.wrote(id, &d);
        assert_eq!(answer(&mut ids).ok().as_deref(), Some("d"));
        assert!(matches!(ids.answer(id), Err(Unforwarded::Duplicate(_))));
        ids.wrote(id, &d);
        assert_eq!(answer(&mut ids).ok().as_deref(), Some("d"), "a re-send's answer goes through");
    }
}
