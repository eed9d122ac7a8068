//! The gateway (message center). How a command moves through it:
//!
//! - [`http`] and [`mqtt`] (the `gateway/commands` topic) accept a submission
//!   and hand it to [`app::App::submit`]: it is validated, then the group-commit
//!   writer checks its device and records it in the [`store`] (durably, before
//!   anything else) with its first attempt claimed, and it is published to the
//!   commands topic of the receiver that holds the device.
//! - Receivers report `delivered` and the device's result on the reports topic
//!   (several reports per message when they have several ready); [`mqtt`]
//!   feeds them to [`app::App::apply_reports`], which moves the commands
//!   forward (never back) in one transaction per batch and, for each that is
//!   final, wakes [`waiters`] (sync calls, long-polls) and answers MQTT callers
//!   on their `reply_to`.
//! - [`sweeper`] finds what the database says is due — scheduled commands,
//!   lost publications and results, deadlines — re-sends or expires it.
//! - [`broker`] embeds rumqttd when no external broker is given.
//! - [`command`] is the pure domain: statuses, transitions, JSON view.
//! - [`server`] wires the parts and owns shutdown; [`demo`] runs a whole system
//!   in one process.

pub mod app;
pub mod broker;
pub mod command;
pub mod config;
pub mod demo;
pub mod http;
pub mod local;
pub mod mqtt;
pub mod server;
pub mod store;
pub mod sweeper;
pub mod waiters;

pub use config::Config;
pub use server::{start, Running};
