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
//! - [`mqtt`] is client set-up shared with the gateway.

pub mod bridge;
pub mod modbus;
pub mod mqtt;
mod recent;
pub mod serial;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Settings of one receiver.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// MQTT broker the gateway uses (mqtt://HOST:PORT).
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
}

impl Config {
    pub fn new(broker: String, tcp_listen: SocketAddr) -> Config {
        Config {
            broker,
            tcp_listen,
            receiver_id: "receiver-1".into(),
            topic_prefix: protocol::topics::DEFAULT_PREFIX.into(),
            serial: Vec::new(),
            modbus: Vec::new(),
        }
    }
}

/// Counters the receiver keeps (logged at shutdown, read by tests).
#[derive(Debug, Default)]
pub struct Counters {
    pub commands_written: AtomicU64,
    pub results_forwarded: AtomicU64,
    /// Result frames for a command this connection already answered.
    pub duplicate_results: AtomicU64,
    /// Frames dropped for CRC, length, version, type or body errors.
    pub bad_frames: AtomicU64,
    /// Commands that could not be written (device not here, queue full, expired).
    pub undeliverable: AtomicU64,
    pub connections_rejected: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A started receiver.
#[derive(Debug)]
pub struct Running {
    /// Where devices connect (useful with port 0).
    pub tcp_addr: SocketAddr,
    pub counters: Arc<Counters>,
    pub bridge: bridge::Bridge,
    tasks: TaskTracker,
}

/// Starts a receiver; it runs until `shutdown` is cancelled.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let (host, port) = mqtt::parse_broker_url(&config.broker)?;
    let listener = TcpListener::bind(config.tcp_listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for devices on {}: {e} (use --tcp-listen)", config.tcp_listen)
    })?;
    let tcp_addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let tasks = TaskTracker::new();
    let bridge = bridge::Bridge::start(&config, &host, port, counters.clone(), &shutdown, &tasks);
    tasks.spawn(tcp::serve(listener, bridge.clone(), counters.clone(), shutdown.clone(), tasks.clone()));
    serial::start(&config.serial, &bridge, &counters, &shutdown, &tasks)?;
    modbus::start(&config.modbus, &bridge, &counters, &shutdown, &tasks)?;
    tracing::info!(%tcp_addr, broker = %config.broker, receiver_id = %config.receiver_id, "receiver started");
    Ok(Running { tcp_addr, counters, bridge, tasks })
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
