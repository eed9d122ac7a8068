//! A simulated fleet of devices for the receiver to talk to, in-process (the
//! `demo` crate, tests) or as the `firmware-sim` binary.
//!
//! Each device is one TCP connection to a receiver (to the next of its
//! receivers, round robin, when a connect fails or the connection drops): it
//! says HELLO, then runs the commands it is sent, one at a time and in order,
//! and answers each with a RESULT. It remembers the last 4096 command ids
//! with their answer, across reconnects (to any of its receivers), so a
//! command sent again is answered again but never re-run —
//! the device half of the system's at-most-once execution. Each step a
//! command takes in a device is a debug event with its `command_id` and `device_id`.
//!
//! Layout, in the order a command meets it:
//!
//! - [`config`]: [`FleetConfig`], device ids, flag parsing.
//! - `fleet`: [`Fleet`] starts one task per device and the stats-file writer, and waits for them.
//! - `device`: one device's life on TCP: connect with backoff, HELLO, serve frames.
//! - `firmware`: what a device does with commands on any link: queue, answer
//!   repeats from memory, drop on demand, run one at a time, answer.
//! - `memory`: which command ids a device has answered, and with what.
//! - `execute`: what running a command means here (echo, fail, random failures, latency).
//! - [`stats`]: the counters tests and the stats file read, and how the file is written.
//! - `tls`: the TLS client side (`--tls-ca`).
//! - [`serial`]: serial mode — all devices on one serial line (a bus), addressed
//!   by a HELLO before each COMMAND, with line noise and bit flips on demand.

pub mod config;
mod device;
mod execute;
mod firmware;
mod fleet;
mod memory;
pub mod serial;
pub mod stats;
mod tls;

pub use config::{
    device_id, parse_churn_ms, parse_drop_ratio, parse_fail_ratio, parse_latency_ms, ConfigError, FleetConfig,
};
pub use fleet::Fleet;
pub use serial::{Bus, SerialConfig};
pub use stats::{DeviceStats, FleetStats, LineStats, Stats, Totals};
