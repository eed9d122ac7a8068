//! The gateway (message center). Its modules follow a command's life; the
//! step → function table is in docs/ARCHITECTURE.md.
//!
//! 1. **Accept** — [`http`] and [`mqtt`] (the `<prefix>/commands` topic) take a
//!    submission; [`submit`] validates it.
//! 2. **Record** — [`writer`], the group-commit writer, checks the device and
//!    stores the command in the [`store`] (durably, before anything else),
//!    with its first attempt claimed when the device is online.
//! 3. **Publish** — [`publish`] sends it to the commands topic of the receiver
//!    that holds the device.
//! 4. **Report** — receivers report `delivered` and the device's result;
//!    [`reports`] applies them in batches (one transaction each) and
//!    acknowledges them only after the commit.
//! 5. **Answer** — a final command wakes [`waiters`] (sync calls, long-polls)
//!    and MQTT callers' `reply_to`; [`cancel`] ends a command early.
//! 6. **Sweep** — [`sweeper`] finds what the database says is due (scheduled
//!    commands, lost publications and results, deadlines) and re-sends or
//!    expires it.
//!
//! Beside the steps: [`command`] is the pure domain (statuses and the state
//! machine, unit-tested without I/O); [`instance`] is this process among
//! several gateway instances; [`presence`] tracks which receiver holds
//! each device (and the roll call); [`provenance`] signs what goes to
//! receivers and checks who sent what comes back; [`broker`] embeds rumqttd when no external
//! broker is given; [`app`] is the shared handle; [`server`] wires the parts
//! and [`shutdown`] says how they stop (and whether the instance is ready); [`fds`] shares the file descriptors out among HTTP,
//! the broker and the database; [`error`] and [`metrics`] are what callers and
//! operators see. [`api_key`] is what HTTP callers prove themselves with
//! (checked in `http::auth`); [`token`] is `gateway token`, which manages them.
//! `http::console` serves the operators' web page, a client of the HTTP API.
//! [`client`] is `gateway device|send|command`: a client of the HTTP API,
//! apart from all of the above.

pub mod api_key;
pub mod app;
pub mod broker;
pub mod cancel;
pub mod client;
pub mod command;
pub mod config;
pub mod error;
pub mod fds;
pub mod http;
pub mod instance;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod provenance;
pub mod publish;
pub mod receiver_limits;
pub mod reports;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod submit;
pub mod sweeper;
pub mod token;
pub mod waiters;
pub mod writer;

pub use config::Config;
pub use server::{start, Running};
