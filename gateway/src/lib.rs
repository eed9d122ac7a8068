//! The gateway (message center). How a command moves through it:
//!
//! - [`http`] and [`mqtt`] (the `gateway/commands` topic) accept a submission
//!   and hand it to [`app::App::submit`], which validates it against the device
//!   registry, records it in the [`store`] (durably, before anything else),
//!   claims its first attempt and publishes it on the device's topic.
//! - Receivers report `delivered` and the device's result on the reports topic;
//!   [`mqtt`] feeds them to [`app::App::apply_report`], which moves the command
//!   forward (never back) and, when it is final, wakes [`waiters`] (sync calls,
//!   long-polls) and answers MQTT callers on their `reply_to`.
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
