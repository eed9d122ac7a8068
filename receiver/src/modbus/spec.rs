//! `--modbus` device specs: parsing `DEVICE_ID=tcp://…` / `DEVICE_ID=rtu://…`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use protocol::{DeviceId, SerialFormat};

use super::{DEFAULT_PROBE, DEFAULT_TIMEOUT};
use crate::line::SerialLine;

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
    pub(super) fn key(&self) -> &str {
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
}
