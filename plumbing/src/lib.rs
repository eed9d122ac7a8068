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
//! - [`cli`]: the programs' `main`: tracing set-up, one `error:` line and exit
//!   code 1 on failure, SIGINT/SIGTERM.

pub mod backoff;
pub mod cli;
pub mod memory;
pub mod metrics;
pub mod mqtt;
