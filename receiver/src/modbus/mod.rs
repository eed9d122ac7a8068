//! Modbus devices: RTU on a serial line, or Modbus TCP. One task per bus — a
//! serial port or a TCP endpoint — owns the tokio-modbus context and has one
//! request in flight at a time, taking its devices' commands in turn. Command
//! names map to Modbus functions ([`Op`]); answers go back as JSON results.
//!
//! A device is online (attached to the [`Bridge`](crate::bridge::Bridge)) from
//! its first answer — to a command or to the idle probe, a read of holding
//! register 0 where any answer, an exception too, counts — until a request to
//! it times out or its bus cannot be (re)opened. tokio-modbus has no timeout
//! of its own: every call is wrapped in one, and after a timeout or an I/O
//! error the context is rebuilt (reconnect / reopen), with back-off while
//! that fails.
//!
//! Under tokio-modbus, `wire` watches the line (docs/PROTOCOL.md, "Modbus
//! transport conditions"): a connection the device closed (Modbus TCP allows
//! that after any answer or when idle) is noticed before a request is
//! written, and the request goes out at once on a fresh connection;
//! `delivered` is reported only once a request was written; answers to
//! another transaction, unit or function, late and repeated answers, other
//! units' RTU frames and frames with a bad CRC are discarded, never taken for
//! the answer.
//!
//! Modbus devices do not know command ids, so the bus task remembers the last
//! [`MEMORY`] ids per device with their results (a
//! `plumbing::memory::RecentIds`) and answers a re-sent id from that memory.
//! The memory dies with the receiver: a command re-sent after a receiver
//! restart runs again (harmless for the absolute writes offered here).
//!
//! Files: `spec` parses `--modbus`, `op` maps commands to Modbus functions
//! and answers to results, `bus` runs a bus, `wire` is the transport.

mod bus;
mod op;
mod spec;
mod wire;

use std::time::Duration;

use tracing::Instrument;

pub use op::{BadCommand, Op, COMMANDS};
pub use spec::{DeviceSpec, Link, SpecError};

use crate::Env;

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

/// Parsed and checked `--modbus` specs, grouped into buses; nothing started yet.
#[derive(Debug)]
pub(crate) struct Plan(Vec<BusSpec>);

/// Parses and checks the `--modbus` specs: a bad spec, a device id given
/// twice or clashing line settings fail here, before anything connects.
pub(crate) fn plan(specs: &[String]) -> anyhow::Result<Plan> {
    let parsed = specs.iter().map(|s| s.parse()).collect::<Result<Vec<DeviceSpec>, _>>()?;
    Ok(Plan(group(parsed)?))
}

/// Starts one task per bus.
pub(crate) fn start(plan: Plan, env: &Env) {
    for bus in plan.0 {
        let span = tracing::info_span!("modbus", bus = %bus.link);
        let bus = bus::Bus::new(bus.link, bus.devices, env.bridge.clone(), env.counters.clone());
        env.tasks.spawn(bus.run(env.shutdown.clone()).instrument(span));
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parsed;

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
}
