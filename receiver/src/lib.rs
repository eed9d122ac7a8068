//! The receiver: bridges MQTT command topics to devices and reports back.
//!
//! - [`tcp`] accepts device connections. A device names itself in its first
//!   frame (HELLO); from then on its connection task owns the socket: it writes
//!   command frames, reads result frames.
//! - [`bridge`] owns the MQTT connection: subscribes to this receiver's
//!   commands topic, routes each command to its device's task, and publishes
//!   `delivered` (frame written), results (several per message when ready
//!   together) and presence.
//! - [`serial`] carries the same frames over serial ports, several devices per
//!   port (RS-485 style, one request in flight per bus).
//! - [`modbus`] bridges devices that speak Modbus (RTU on a serial line, or
//!   TCP) by mapping command names to Modbus functions.
//! - [`line`](mod@line): a serial line's settings and opening it (serial and Modbus RTU).
//! - `turns`: the round robin that gives each device of a bus its turn.
//! - [`metrics`]: the receiver's counters, on `/metrics` with `--metrics-listen`.
//!
//! MQTT client set-up, back-off and the bounded id memories come from `plumbing`.
//!
//! Every step of a command here is logged at debug level with its
//! `command_id` and `device_id`: `RUST_LOG=debug` and a grep for a command id
//! show its whole life in the receiver.

pub mod bridge;
pub mod line;
pub mod metrics;
pub mod modbus;
pub mod serial;
pub mod tcp;
mod turns;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use plumbing::metrics::Metrics;
use plumbing::mqtt::Brokers;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Counters;

/// Settings of one receiver.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// MQTT broker the gateway uses (mqtt://HOST:PORT), or several,
    /// comma-separated (mqtt://H1:P1,mqtt://H2:P2): the receiver connects to
    /// the first and moves to the next, round robin, whenever a connection
    /// attempt or a connection fails.
    #[arg(long, env = "RECEIVER_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Where devices connect over TCP.
    #[arg(long, env = "RECEIVER_TCP_LISTEN", default_value = "127.0.0.1:7000")]
    pub tcp_listen: SocketAddr,
    /// This receiver's id (MQTT client id and presence reports); unique per broker.
    #[arg(long, env = "RECEIVER_ID", default_value = "receiver-1")]
    pub receiver_id: String,
    /// Prefix of every MQTT topic (must match the gateway's).
    #[arg(long, env = "RECEIVER_TOPIC_PREFIX", default_value = protocol::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// A serial port whose devices speak the native frame (repeatable; syntax in
    /// `serial::PortSpec`, e.g. `/dev/ttyUSB0:115200:dev-1,dev-2`). Env: `;`-separated.
    #[arg(long = "serial", env = "RECEIVER_SERIAL", value_delimiter = ';')]
    pub serial: Vec<String>,
    /// A Modbus device (repeatable; syntax in `modbus::DeviceSpec`, e.g.
    /// `meter-1=tcp://127.0.0.1:5020/1`). Env: `;`-separated.
    #[arg(long = "modbus", env = "RECEIVER_MODBUS", value_delimiter = ';')]
    pub modbus: Vec<String>,
    /// Serve Prometheus metrics on GET http://ADDR/metrics (off when absent).
    #[arg(long, env = "RECEIVER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Commands a TCP device has at once: written, not yet answered. The
    /// rest wait here, where a cancel still stops them. 1 (the default)
    /// makes a device run its commands one at a time, like a serial bus.
    #[arg(long, env = "RECEIVER_DEVICE_WINDOW", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub device_window: u16,
    /// How long a written command holds its place in the window without an
    /// answer, in ms; then the next is written (the gateway re-sends the
    /// unanswered one after its result timeout).
    #[arg(long, env = "RECEIVER_DEVICE_ANSWER_TIMEOUT_MS", default_value_t = 10_000)]
    pub device_answer_timeout_ms: u64,
    /// Largest device answer forwarded, in bytes (at most 1 MiB, a frame's
    /// largest payload). A larger one fails its command at once
    /// (`result_too_large`). The gateway's `--max-result-bytes` must be at
    /// least this: it sizes the embedded broker (`protocol::limits`).
    #[arg(long, env = "RECEIVER_MAX_RESULT_BYTES", default_value_t = protocol::limits::DEFAULT_MAX_RESULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=protocol::frame::MAX_PAYLOAD as u64))]
    pub max_result_bytes: usize,
}

impl Config {
    /// Defaults for everything but the broker URL(s) and the device listener.
    pub fn new(broker: String, tcp_listen: SocketAddr) -> Config {
        Config {
            broker,
            tcp_listen,
            receiver_id: "receiver-1".into(),
            topic_prefix: protocol::topics::DEFAULT_PREFIX.into(),
            serial: Vec::new(),
            modbus: Vec::new(),
            metrics_listen: None,
            device_window: 1,
            device_answer_timeout_ms: 10_000,
            max_result_bytes: protocol::limits::DEFAULT_MAX_RESULT,
        }
    }
}

/// A started receiver.
#[derive(Debug)]
pub struct Running {
    /// Where devices connect (useful with port 0).
    pub tcp_addr: SocketAddr,
    /// Where `GET /metrics` is served, when `--metrics-listen` is given (the
    /// bound address, useful with port 0).
    pub metrics_addr: Option<SocketAddr>,
    /// The counters also on `/metrics`; readable with `.get()`.
    pub counters: Arc<Counters>,
    /// The MQTT side: which devices are connected, the receiver's id.
    pub bridge: bridge::Bridge,
    tasks: TaskTracker,
}

/// Starts a receiver; it runs until `shutdown` is cancelled. Fails on a bad
/// broker URL, `--serial` or `--modbus` spec, or an address it cannot listen on.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let broker: Brokers = config.broker.parse()?;
    // Checked before anything connects: a bad spec fails with its own error,
    // not after an MQTT connection attempt.
    let modbus = modbus::plan(&config.modbus)?;
    let serial = serial::plan(&config.serial)?;
    let listener = TcpListener::bind(config.tcp_listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for devices on {}: {e} (use --tcp-listen)", config.tcp_listen)
    })?;
    let tcp_addr = listener.local_addr()?;
    let metrics = Metrics::default();
    let counters = Arc::new(Counters::register(&metrics));
    let tasks = TaskTracker::new();
    let metrics_addr = match config.metrics_listen {
        Some(listen) => {
            let (addr, serve) = metrics
                .serve(listen, shutdown.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {listen} (use --metrics-listen)"))?;
            tasks.spawn(serve);
            Some(addr)
        }
        None => None,
    };
    let bridge = bridge::Bridge::start(&config, &broker, counters.clone(), &shutdown, &tasks);
    let env = Env { bridge: bridge.clone(), counters: counters.clone(), shutdown, tasks: tasks.clone() };
    let window = tcp::Window {
        size: usize::from(config.device_window),
        answer_timeout: std::time::Duration::from_millis(config.device_answer_timeout_ms),
    };
    tasks.spawn(tcp::serve(listener, env.clone(), window));
    serial::start(serial, &env);
    modbus::start(modbus, &env);
    tracing::info!(%tcp_addr, ?metrics_addr, %broker, receiver_id = %config.receiver_id, "receiver started");
    Ok(Running { tcp_addr, metrics_addr, counters, bridge, tasks })
}

/// What every device transport (TCP, serial, Modbus) runs with.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    /// Where commands come from and reports go.
    pub(crate) bridge: bridge::Bridge,
    pub(crate) counters: Arc<Counters>,
    /// Cancelled when the receiver stops.
    pub(crate) shutdown: CancellationToken,
    /// Where the transport's tasks go, so `Running::stopped` waits for them.
    pub(crate) tasks: TaskTracker,
}

impl Running {
    /// Waits for every task after shutdown.
    pub async fn stopped(self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Sleeps until `deadline`, or forever when there is none (a `select!` branch
/// that is off until something needs a timer).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// `text` parsed as a `T`, or a panic showing the text and why (the tests of
/// the `--serial` and `--modbus` spec parsers).
#[cfg(test)]
pub(crate) fn parsed<T>(text: &str) -> T
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}
