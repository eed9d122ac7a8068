//! Infrastructure shared by `gateway`, `receiver` and `firmware-sim` that is
//! not the wire contract (that is `protocol`). Each piece wraps a well-kept
//! crate with the settings this system needs, so the three programs configure
//! it once:
//!
//! - [`mqtt`]: broker URLs (one or several, for failover), rumqttc client
//!   options, and the driver that polls an event loop, reconnecting — to the
//!   next broker when there are several — until shutdown.
//! - [`backoff`]: exponential back-off with jitter (`backon`).
//! - [`memory`]: a bounded memory of recent ids, oldest forgotten first (`lru`).
//! - [`metrics`]: a Prometheus registry and its `/metrics` endpoint
//!   (`prometheus-client`, `axum`).
//! - [`seal`]: signed messages at run time: nonces, the replay guard,
//!   counting refused messages (`protocol::seal` is the format).
//! - [`health`]: `/healthz` and `/readyz` answers (`axum`).
//! - [`throttle`]: at most one log line per period about a frequent event.
//! - [`config`]: settings from defaults, a TOML file, the environment and
//!   flags, in that order of precedence (`figment`, `clap`); printed with
//!   secrets masked.
//! - [`ports`]: free loopback ports below the ephemeral range, reserved
//!   until the process ends, for listeners started later (demo, bench, tests).
//! - [`cli`]: the programs' `main`: tracing set-up (text or JSON lines), one `error:`
//!   line and exit code 1 on failure, SIGINT/SIGTERM (a second one exits at once).

pub mod backoff;
pub mod cli;
pub mod config;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod mqtt;
pub mod ports;
pub mod seal;
pub mod throttle;
