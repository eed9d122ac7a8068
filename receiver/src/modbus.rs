//! Modbus devices: RTU on a serial line, or Modbus TCP. One task per bus — a
//! serial port or a TCP endpoint — owns the tokio-modbus context and has one
//! request in flight at a time, taking its devices' commands in turn. Command
//! names map to Modbus functions ([`Op`]); answers go back as JSON results.
//!
//! A device is online (attached to the [`Bridge`]) from its first answer — to a
//! command or to the idle probe, a read of holding register 0 where any answer,
//! an exception too, counts — until a request to it times out or its bus
//! cannot be (re)opened. tokio-modbus has no timeout of its own: every call is
//! wrapped in one, and after a timeout or an I/O error the context is rebuilt
//! (reconnect / reopen), with back-off while that fails.
//!
//! Modbus devices do not know command ids, so the bus task remembers the last
//! [`MEMORY`] ids per device with their results (a `plumbing::memory::RecentIds`)
//! and answers a re-sent id from that memory. The memory dies with the receiver: a command re-sent after a
//! receiver restart runs again (harmless for the absolute writes offered here).

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use plumbing::backoff::Backoff;
use plumbing::memory::RecentIds;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_serial::{ClearBuffer, SerialPort};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::bridge::Bridge;
use crate::line::SerialLine;
use crate::turns::Turns;
use crate::{Counters, Env};
use protocol::envelope::{CommandMessage, ReportKind};
use protocol::{DeviceId, SerialFormat};

/// How long a request may take unless the spec says `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);
/// An idle online device is probed this often unless the spec says `probe_ms`.
pub const DEFAULT_PROBE: Duration = Duration::from_millis(1000);
/// Command ids remembered per device with their results, oldest forgotten first.
pub const MEMORY: usize = 4096;
/// Result code of a command whose payload does not fit its name (see [`Op::parse`]).
pub const CODE_BAD_PAYLOAD: i32 = 400;
/// Result code of a command name that is not one of [`Op`]'s.
pub const CODE_UNKNOWN_COMMAND: i32 = 404;
/// Back-off between failed attempts to open a bus or to reach a silent device:
/// from this…
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// …doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One `--modbus` device:
///
/// ```text
/// DEVICE_ID=tcp://HOST:PORT/UNIT[?OPTIONS]
/// DEVICE_ID=rtu://PATH[:BAUD[,FRAMING]]/UNIT[?OPTIONS]
/// ```
///
/// - `meter-1=tcp://127.0.0.1:5020/1`: Modbus TCP at 127.0.0.1:5020, unit id 1 (0–255).
/// - `pump-2=rtu:///dev/ttyUSB0:19200,8E1/3`: RTU on `/dev/ttyUSB0`, 19200 baud,
///   8 data bits, even parity, 1 stop bit, unit (slave) id 3 (1–247). BAUD
///   defaults to 19200 and FRAMING to `8E1` (the Modbus serial-line defaults);
///   FRAMING is data bits (5–8), parity (`N`, `E`, `O`), stop bits (1, 2).
/// - OPTIONS, `&`-separated: `timeout_ms=N` (per request, default 1000),
///   `probe_ms=N` (idle probe period, default 1000, at least 100).
///
/// Devices with the same `HOST:PORT`, or the same serial `PATH` (which must
/// then have the same line settings), share one bus: one connection, one
/// request in flight at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub device_id: DeviceId,
    /// The bus the device is on.
    pub link: Link,
    /// Modbus unit (slave) id: 0–255 on TCP, 1–247 on RTU.
    pub unit: u8,
    /// How long one request may take.
    pub timeout: Duration,
    /// How often an idle online device is probed.
    pub probe_every: Duration,
}

/// Where a bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// `HOST:PORT`, resolved at each connect.
    Tcp(String),
    /// A serial line (Modbus RTU).
    Rtu(SerialLine),
}

impl Link {
    /// Devices with the same key share a bus.
    fn key(&self) -> &str {
        match self {
            Link::Tcp(addr) => addr,
            Link::Rtu(line) => &line.path,
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Tcp(addr) => write!(f, "tcp://{addr}"),
            Link::Rtu(line) => write!(f, "rtu://{}", line.path),
        }
    }
}

/// A `--modbus` value that cannot be used: the value, and why.
#[derive(Debug, thiserror::Error)]
#[error("bad --modbus spec {spec:?}: {reason}")]
pub struct SpecError {
    spec: String,
    reason: String,
}

impl FromStr for DeviceSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<DeviceSpec, SpecError> {
        parse_spec(spec).map_err(|reason| SpecError { spec: spec.to_owned(), reason })
    }
}

fn parse_spec(spec: &str) -> Result<DeviceSpec, String> {
    let (device_id, rest) = spec.split_once('=').ok_or("expected DEVICE_ID=tcp://… or DEVICE_ID=rtu://…")?;
    let device_id =
        DeviceId::parse(device_id).map_err(|_| format!("{device_id:?} is not a valid device id"))?;
    let (rest, options) = rest.split_once('?').unwrap_or((rest, ""));
    let (link, unit) = if let Some(r) = rest.strip_prefix("tcp://") {
        let (addr, unit) = r.rsplit_once('/').ok_or("missing /UNIT")?;
        let port = addr.rsplit_once(':').map(|(_, p)| p).ok_or("expected HOST:PORT")?;
        port.parse::<u16>().map_err(|_| format!("bad port {port:?}"))?;
        (Link::Tcp(addr.to_owned()), unit.parse::<u8>().map_err(|_| format!("bad unit id {unit:?} (0-255)"))?)
    } else if let Some(r) = rest.strip_prefix("rtu://") {
        let (line, unit) = r.rsplit_once('/').ok_or("missing /UNIT")?;
        let unit = unit.parse::<u8>().ok().filter(|u| (1..=247).contains(u));
        (Link::Rtu(parse_line(line)?), unit.ok_or("the unit id of an RTU device is 1-247")?)
    } else {
        return Err("the address starts with tcp:// or rtu://".into());
    };
    let mut parsed =
        DeviceSpec { device_id, link, unit, timeout: DEFAULT_TIMEOUT, probe_every: DEFAULT_PROBE };
    for option in options.split('&').filter(|o| !o.is_empty()) {
        let (key, value) =
            option.split_once('=').ok_or_else(|| format!("option {option:?} is not KEY=VALUE"))?;
        let ms = value.parse::<u64>().map_err(|_| format!("{key}: {value:?} is not a number of ms"))?;
        match key {
            "timeout_ms" if ms > 0 => parsed.timeout = Duration::from_millis(ms),
            "probe_ms" if ms >= 100 => parsed.probe_every = Duration::from_millis(ms),
            "timeout_ms" | "probe_ms" => return Err(format!("{key}={ms} is too small")),
            _ => return Err(format!("unknown option {key:?} (timeout_ms, probe_ms)")),
        }
    }
    Ok(parsed)
}

/// `PATH[:BAUD[,FRAMING]]`.
fn parse_line(line: &str) -> Result<SerialLine, String> {
    let (path, settings) = match line.rsplit_once(':') {
        Some((path, settings)) if !settings.contains('/') => (path, settings),
        _ => (line, ""),
    };
    if path.is_empty() {
        return Err("missing serial port path".into());
    }
    let (baud, format) = match settings.split_once(',') {
        None => (settings, SerialFormat::EIGHT_E_ONE),
        Some((baud, framing)) => {
            (baud, framing.parse().map_err(|_| format!("bad framing {framing:?} (e.g. 8N1, 8E1, 7O2)"))?)
        }
    };
    let baud =
        if baud.is_empty() { 19200 } else { baud.parse().map_err(|_| format!("bad baud rate {baud:?}"))? };
    Ok(SerialLine { path: path.to_owned(), baud, format })
}

/// A command, parsed from its name and JSON payload: one Modbus function.
/// Addresses are the PDU's 0-based addresses; counts are in items (coils,
/// inputs or registers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    ReadCoils { address: u16, count: u16 },
    ReadDiscreteInputs { address: u16, count: u16 },
    ReadHoldingRegisters { address: u16, count: u16 },
    ReadInputRegisters { address: u16, count: u16 },
    WriteSingleCoil { address: u16, value: bool },
    WriteSingleRegister { address: u16, value: u16 },
    WriteMultipleCoils { address: u16, values: Vec<bool> },
    WriteMultipleRegisters { address: u16, values: Vec<u16> },
}

/// The command names [`Op::parse`] knows.
pub const COMMANDS: [&str; 8] = [
    "read_coils",
    "read_discrete_inputs",
    "read_holding_registers",
    "read_input_registers",
    "write_single_coil",
    "write_single_register",
    "write_multiple_coils",
    "write_multiple_registers",
];

/// Why a command cannot become a Modbus request; answered with a result, never sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCommand {
    #[error("unknown command {0:?}; a Modbus device knows {list}", list = COMMANDS.join(", "))]
    UnknownName(String),
    #[error("bad payload for {name}: {reason}")]
    Payload { name: String, reason: String },
}

impl BadCommand {
    /// The result code it is answered with: [`CODE_UNKNOWN_COMMAND`] or [`CODE_BAD_PAYLOAD`].
    pub fn code(&self) -> i32 {
        match self {
            BadCommand::UnknownName(_) => CODE_UNKNOWN_COMMAND,
            BadCommand::Payload { .. } => CODE_BAD_PAYLOAD,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Range {
    address: u16,
    count: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct One<T> {
    address: u16,
    value: T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Many<T> {
    address: u16,
    values: Vec<T>,
}

impl Op {
    /// Parses a command. The quantity limits are the Modbus specification's
    /// (what fits one PDU), and a range must not run past address 65535.
    pub fn parse(name: &str, payload: &[u8]) -> Result<Op, BadCommand> {
        let bad = |reason: String| BadCommand::Payload { name: name.to_owned(), reason };
        let range = |max: u16| -> Result<(u16, u16), BadCommand> {
            let r: Range = from_json(payload).map_err(bad)?;
            check_span(r.address, r.count, max).map_err(bad)?;
            Ok((r.address, r.count))
        };
        Ok(match name {
            "read_coils" => range(2000).map(|(address, count)| Op::ReadCoils { address, count })?,
            "read_discrete_inputs" => {
                range(2000).map(|(address, count)| Op::ReadDiscreteInputs { address, count })?
            }
            "read_holding_registers" => {
                range(125).map(|(address, count)| Op::ReadHoldingRegisters { address, count })?
            }
            "read_input_registers" => {
                range(125).map(|(address, count)| Op::ReadInputRegisters { address, count })?
            }
            "write_single_coil" => {
                let One { address, value } = from_json(payload).map_err(bad)?;
                Op::WriteSingleCoil { address, value }
            }
            "write_single_register" => {
                let One { address, value } = from_json(payload).map_err(bad)?;
                Op::WriteSingleRegister { address, value }
            }
            "write_multiple_coils" => {
                let Many { address, values } = from_json(payload).map_err(bad)?;
                check_span(address, values.len().try_into().unwrap_or(u16::MAX), 1968).map_err(bad)?;
                Op::WriteMultipleCoils { address, values }
            }
            "write_multiple_registers" => {
                let Many { address, values } = from_json(payload).map_err(bad)?;
                check_span(address, values.len().try_into().unwrap_or(u16::MAX), 123).map_err(bad)?;
                Op::WriteMultipleRegisters { address, values }
            }
            _ => return Err(BadCommand::UnknownName(name.to_owned())),
        })
    }

    fn request(&self) -> Request<'static> {
        match self {
            Op::ReadCoils { address, count } => Request::ReadCoils(*address, *count),
            Op::ReadDiscreteInputs { address, count } => Request::ReadDiscreteInputs(*address, *count),
            Op::ReadHoldingRegisters { address, count } => Request::ReadHoldingRegisters(*address, *count),
            Op::ReadInputRegisters { address, count } => Request::ReadInputRegisters(*address, *count),
            Op::WriteSingleCoil { address, value } => Request::WriteSingleCoil(*address, *value),
            Op::WriteSingleRegister { address, value } => Request::WriteSingleRegister(*address, *value),
            Op::WriteMultipleCoils { address, values } => {
                Request::WriteMultipleCoils(*address, values.clone().into())
            }
            Op::WriteMultipleRegisters { address, values } => {
                Request::WriteMultipleRegisters(*address, values.clone().into())
            }
        }
    }

    /// The result payload for the device's answer (`None` if it answered another function).
    fn answer(&self, response: Response) -> Option<serde_json::Value> {
        let values = |mut bits: Vec<bool>, count: &u16| {
            // Coils come in whole bytes: drop the padding bits.
            bits.truncate(usize::from(*count));
            json!({ "values": bits })
        };
        Some(match (self, response) {
            (Op::ReadCoils { count, .. }, Response::ReadCoils(bits)) => values(bits, count),
            (Op::ReadDiscreteInputs { count, .. }, Response::ReadDiscreteInputs(bits)) => values(bits, count),
            (Op::ReadHoldingRegisters { .. }, Response::ReadHoldingRegisters(words))
            | (Op::ReadInputRegisters { .. }, Response::ReadInputRegisters(words)) => {
                json!({ "values": words })
            }
            (Op::WriteSingleCoil { .. }, Response::WriteSingleCoil(..))
            | (Op::WriteSingleRegister { .. }, Response::WriteSingleRegister(..))
            | (Op::WriteMultipleCoils { .. }, Response::WriteMultipleCoils(..))
            | (Op::WriteMultipleRegisters { .. }, Response::WriteMultipleRegisters(..)) => {
                json!({ "ok": true })
            }
            _ => return None,
        })
    }
}

fn from_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| e.to_string())
}

fn check_span(address: u16, count: u16, max: u16) -> Result<(), String> {
    if count == 0 || count > max {
        return Err(format!("count must be 1 to {max}, not {count}"));
    }
    if u32::from(address) + u32::from(count) > 0x1_0000 {
        return Err(format!("{count} items from address {address} run past 65535"));
    }
    Ok(())
}

/// The result code and payload for a Modbus exception: the exception code, and its name.
fn exception_result(e: ExceptionCode) -> (i32, serde_json::Value) {
    let name = match e {
        ExceptionCode::Custom(_) => "Unknown".to_owned(),
        known => format!("{known:?}"),
    };
    (i32::from(u8::from(e)), json!({ "exception": name }))
}

/// Starts one task per bus; fails on a bad spec or a device id given twice.
pub(crate) fn start(specs: &[String], env: &Env) -> anyhow::Result<()> {
    let parsed = specs.iter().map(|s| s.parse()).collect::<Result<Vec<DeviceSpec>, _>>()?;
    for bus in group(parsed)? {
        let span = tracing::info_span!("modbus", bus = %bus.link);
        let bus = Bus::new(bus.link, bus.devices, env.bridge.clone(), env.counters.clone());
        env.tasks.spawn(bus.run(env.shutdown.clone()).instrument(span));
    }
    Ok(())
}

/// Devices of one bus, before it starts.
#[derive(Debug)]
struct BusSpec {
    link: Link,
    devices: Vec<DeviceSpec>,
}

fn group(specs: Vec<DeviceSpec>) -> anyhow::Result<Vec<BusSpec>> {
    let mut buses: Vec<BusSpec> = Vec::new();
    for spec in specs {
        let same_id = |d: &DeviceSpec| d.device_id == spec.device_id;
        anyhow::ensure!(
            !buses.iter().any(|b| b.devices.iter().any(same_id)),
            "--modbus: device {} is given twice",
            spec.device_id
        );
        match buses.iter_mut().find(|b| b.link.key() == spec.link.key()) {
            Some(bus) => {
                anyhow::ensure!(
                    bus.link == spec.link,
                    "--modbus: {} is given with different line settings",
                    spec.link
                );
                anyhow::ensure!(
                    !bus.devices.iter().any(|d| d.unit == spec.unit),
                    "--modbus: unit {} on {} is given twice",
                    spec.unit,
                    spec.link
                );
                bus.devices.push(spec);
            }
            None => buses.push(BusSpec { link: spec.link.clone(), devices: vec![spec] }),
        }
    }
    Ok(buses)
}

/// The task owning one bus.
struct Bus {
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
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] tokio_modbus::ProtocolError),
    #[error("the answer is for another function")]
    Mismatch,
}

impl Bus {
    fn new(link: Link, specs: Vec<DeviceSpec>, bridge: Bridge, counters: Arc<Counters>) -> Bus {
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
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut was_down = false;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = connect(&self.link, self.connect_timeout()) => c,
            };
            let answered = match opened {
                Ok(ctx) => {
                    if was_down {
                        tracing::info!("bus open again");
                        self.probe_all_now();
                        was_down = false;
                    }
                    match self.serve(ctx, &shutdown).await {
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
    async fn serve(&mut self, mut ctx: Context, shutdown: &CancellationToken) -> Ended {
        let mut answered = false;
        loop {
            let (probe_at, probe_index) = self.next_probe();
            // Both branches are cancel-safe: `Turns::next` takes a message only
            // when it returns it, and a sleep loses nothing.
            let step = tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                (i, cmd) = self.turns.next(&mut self.devices, Device::queue) => match cmd {
                    Some(cmd) => self.command(&mut ctx, i, cmd).await,
                    None => {
                        // The bridge dropped our queue: another connection took the id.
                        tracing::warn!(device_id = %self.devices[i].spec.device_id, "device taken over elsewhere");
                        self.devices[i].attached = None;
                        Ok(false)
                    }
                },
                _ = tokio::time::sleep_until(probe_at) => self.probe(&mut ctx, probe_index).await,
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

    /// Sends a request to device `i` and waits for its answer, within its timeout.
    async fn call(&mut self, ctx: &mut Context, i: usize, request: Request<'static>) -> CallResult {
        let spec = &self.devices[i].spec;
        ctx.set_slave(Slave(spec.unit));
        let outcome = match tokio::time::timeout(spec.timeout, ctx.call(request)).await {
            Err(_) => Err(Failure::Timeout(spec.timeout)),
            Ok(Err(tokio_modbus::Error::Transport(e))) => Err(Failure::Io(e)),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(Failure::Protocol(e)),
            Ok(Ok(answer)) => Ok(answer),
        };
        match &outcome {
            Ok(_) => self.answered(i).await,
            Err(e) => self.unanswered(i, e).await,
        }
        outcome
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
        if matches!(failure, Failure::Timeout(_)) {
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
    async fn probe(&mut self, ctx: &mut Context, i: usize) -> Result<bool, ()> {
        match self.call(ctx, i, Request::ReadHoldingRegisters(0, 1)).await {
            Ok(_) => Ok(true),
            Err(_) => Err(()),
        }
    }

    /// Runs one command for device `i`. `Err` when the context must be rebuilt;
    /// `Ok(true)` when the device answered.
    async fn command(&mut self, ctx: &mut Context, i: usize, cmd: CommandMessage) -> Result<bool, ()> {
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
        // tokio-modbus writes and reads in one call: just before it is the last
        // point where the receiver can say anything, so `delivered` goes now.
        self.counters.commands_written.inc();
        tracing::debug!(command_id = %cmd.id, %device_id, ?op, "request written");
        self.bridge.report(cmd.id, device_id, ReportKind::Delivered).await;
        let (code, payload) = match self.call(ctx, i, op.request()).await {
            Ok(Ok(response)) => match op.answer(response) {
                Some(payload) => (0, payload),
                None => {
                    self.unanswered(i, &Failure::Mismatch).await;
                    return Err(());
                }
            },
            Ok(Err(exception)) => exception_result(exception),
            // No result: the gateway re-sends after its result timeout.
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

/// Builds a fresh context: a new TCP connection or a freshly opened serial port.
async fn connect(link: &Link, timeout: Duration) -> io::Result<Context> {
    match link {
        Link::Tcp(addr) => {
            let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            stream.set_nodelay(true)?;
            Ok(tokio_modbus::client::tcp::attach(stream))
        }
        Link::Rtu(line) => {
            let port = line.open().map_err(io::Error::from)?;
            // A late answer to a request that timed out may still sit in the
            // line's input buffer; it must not pass for the next request's.
            port.clear(ClearBuffer::Input).map_err(io::Error::from)?;
            Ok(tokio_modbus::client::rtu::attach(port))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parsed;
    use protocol::serial_line::Parity;

    #[test]
    fn tcp_spec() {
        let d: DeviceSpec = parsed("meter-1=tcp://127.0.0.1:5020/1");
        assert_eq!(d.device_id, "meter-1");
        assert_eq!(d.link, Link::Tcp("127.0.0.1:5020".into()));
        assert_eq!((d.unit, d.timeout, d.probe_every), (1, DEFAULT_TIMEOUT, DEFAULT_PROBE));
        let d: DeviceSpec = parsed("m=tcp://plc.local:502/0?timeout_ms=250&probe_ms=5000");
        assert_eq!(
            (d.unit, d.timeout, d.probe_every),
            (0, Duration::from_millis(250), Duration::from_secs(5))
        );
    }

    #[test]
    fn rtu_spec() {
        let d: DeviceSpec = parsed("pump-2=rtu:///dev/ttyUSB0:9600,7O2/3");
        let line = SerialLine { path: "/dev/ttyUSB0".into(), baud: 9600, format: "7O2".parse().unwrap() };
        assert_eq!((d.link, d.unit), (Link::Rtu(line), 3));
        let d: DeviceSpec = parsed("p=rtu:///dev/ttyS1/247");
        let Link::Rtu(line) = d.link else { panic!("rtu") };
        assert_eq!(
            (line.path.as_str(), line.baud, line.format.parity()),
            ("/dev/ttyS1", 19200, Parity::Even)
        );
        assert_eq!(parsed::<DeviceSpec>("p=rtu:///tmp/a:115200/1").link.key(), "/tmp/a");
    }

    #[test]
    fn bad_specs() {
        for bad in [
            "tcp://127.0.0.1:502/1",
            "a/b=tcp://127.0.0.1:502/1",
            "m=tcp://127.0.0.1/1",
            "m=tcp://127.0.0.1:502",
            "m=tcp://127.0.0.1:502/256",
            "m=udp://127.0.0.1:502/1",
            "m=rtu:///dev/ttyS0/0",
            "m=rtu:///dev/ttyS0:9600,8X1/1",
            "m=rtu:///dev/ttyS0:fast/1",
            "m=tcp://127.0.0.1:502/1?timeout_ms=0",
            "m=tcp://127.0.0.1:502/1?retries=3",
        ] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn grouping_into_buses() {
        let specs = ["a=rtu:///tmp/p:9600/1", "b=rtu:///tmp/p:9600/2", "c=tcp://h:1/1", "d=tcp://h:1/2"];
        let buses = group(specs.iter().map(|s| parsed(s)).collect()).unwrap();
        assert_eq!(buses.iter().map(|b| b.devices.len()).collect::<Vec<_>>(), [2, 2]);
        for clash in [
            ["a=rtu:///tmp/p:9600/1", "b=rtu:///tmp/p:19200/2"],
            ["a=rtu:///tmp/p:9600/1", "b=rtu:///tmp/p:9600/1"],
            ["a=tcp://h:1/1", "a=tcp://h:2/1"],
        ] {
            assert!(group(clash.iter().map(|s| parsed(s)).collect()).is_err(), "{clash:?}");
        }
    }

    #[test]
    fn commands_map_to_functions() {
        let p = |name: &str, payload: serde_json::Value| Op::parse(name, payload.to_string().as_bytes());
        assert_eq!(
            p("read_holding_registers", json!({"address": 10, "count": 3})),
            Ok(Op::ReadHoldingRegisters { address: 10, count: 3 })
        );
        assert_eq!(
            p("write_multiple_coils", json!({"address": 1, "values": [true, false]})),
            Ok(Op::WriteMultipleCoils { address: 1, values: vec![true, false] })
        );
        assert_eq!(
            p("write_single_register", json!({"address": 1, "value": 65535})),
            Ok(Op::WriteSingleRegister { address: 1, value: 65535 })
        );
        assert_eq!(p("reboot", json!(null)).unwrap_err().code(), CODE_UNKNOWN_COMMAND);
        for (name, bad) in [
            ("read_coils", json!(null)),
            ("read_coils", json!({"address": 0})),
            ("read_coils", json!({"address": 0, "count": 0})),
            ("read_holding_registers", json!({"address": 0, "count": 126})),
            ("read_holding_registers", json!({"address": 65535, "count": 2})),
            ("read_input_registers", json!({"address": -1, "count": 1})),
            ("write_single_register", json!({"address": 0, "value": 65536})),
            ("write_single_coil", json!({"address": 0, "value": 1})),
            ("write_multiple_registers", json!({"address": 0, "values": []})),
            ("write_multiple_registers", json!({"address": 0, "values": [1], "extra": 1})),
        ] {
            assert_eq!(p(name, bad.clone()).unwrap_err().code(), CODE_BAD_PAYLOAD, "{name} {bad}");
        }
        assert_eq!(Op::parse("read_coils", b"\xff").unwrap_err().code(), CODE_BAD_PAYLOAD);
    }

    #[test]
    fn answers_become_json() {
        let op = Op::ReadCoils { address: 0, count: 3 };
        assert_eq!(
            op.answer(Response::ReadCoils(vec![true, false, true, false])),
            Some(json!({"values": [true, false, true]}))
        );
        let op = Op::WriteSingleRegister { address: 0, value: 1 };
        assert_eq!(op.answer(Response::WriteSingleRegister(0, 1)), Some(json!({"ok": true})));
        assert_eq!(op.answer(Response::ReadCoils(vec![])), None);
        assert_eq!(
            exception_result(ExceptionCode::IllegalDataAddress),
            (2, json!({"exception": "IllegalDataAddress"}))
        );
        assert_eq!(exception_result(ExceptionCode::new(0x0B)).0, 11);
    }

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
