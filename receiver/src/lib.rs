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
//! - [`provenance`]: signs what the receiver publishes, checks that commands
//!   and cancels come from a gateway.
//! - [`auth`]: how TCP devices prove who they are (challenge–response
//!   after HELLO) and the TLS acceptor of the device listener.
//! - [`metrics`]: the receiver's counters, on `/metrics` with `--metrics-listen`,
//!   beside `/healthz` and `/readyz` ([`readiness`]).
//!
//! MQTT client set-up, back-off and the bounded id memories come from `plumbing`.
//!
//! Every step of a command here is logged at debug level with its
//! `command_id` and `device_id`: `RUST_LOG=debug` and a grep for a command id
//! show its whole life in the receiver.

pub mod auth;
pub mod bridge;
pub mod line;
pub mod metrics;
pub mod modbus;
pub mod provenance;
pub mod serial;
pub mod tcp;
mod turns;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use plumbing::health::Flag;
use plumbing::metrics::Metrics;
use plumbing::mqtt::Brokers;
use plumbing::seal::Secret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Counters;

/// Settings of one receiver. As a file (`plumbing::config::Settings<Config>`,
/// `--config` / `RECEIVER_CONFIG`), keys are the field names; secrets are
/// never serialized.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Allow running without credentials: no broker login, unsigned
    /// messages from and to the gateway (without a receiver key), devices
    /// that do not authenticate (without a fleet secret; given one, they
    /// still must). For demos and tests on one machine only (docs/SECURITY.md).
    #[arg(long, env = "RECEIVER_INSECURE")]
    pub insecure: bool,
    /// This receiver's message key (PROTOCOL 4.7): what `gateway
    /// receiver-key <receiver-id>` prints (base64, or 64 hex digits). Prefer
    /// the environment or the file form to a flag.
    #[arg(long, env = "RECEIVER_KEY", hide_env_values = true)]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub receiver_key: Option<Secret>,
    /// A file holding the receiver key.
    #[arg(long, env = "RECEIVER_KEY_FILE")]
    pub receiver_key_file: Option<PathBuf>,
    /// The key's generation (`gateway receiver-key --generation`).
    #[arg(long, env = "RECEIVER_KEY_GENERATION", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub receiver_key_generation: u32,
    /// During a key rotation: the key of the generation before, still
    /// accepted on commands and cancels until the gateways use the new one.
    #[arg(long, env = "RECEIVER_PREVIOUS_KEY", hide_env_values = true)]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub receiver_previous_key: Option<Secret>,
    /// A signed command or cancel is taken only if signed within this many
    /// ms of now (either way) and never twice.
    #[arg(long, env = "RECEIVER_MESSAGE_WINDOW_MS", default_value_t = plumbing::seal::DEFAULT_WINDOW_MS)]
    pub message_window_ms: i64,
    /// User name at the broker(s) (a URL's own `user:pass@` wins). On the
    /// gateway's embedded broker and with the shipped Mosquitto ACL it is the
    /// receiver id (docs/security/broker.md).
    #[arg(long, env = "RECEIVER_BROKER_USERNAME")]
    pub broker_username: Option<String>,
    /// Password at the broker(s); prefer the environment variable or
    /// --broker-password-file to a flag other users can see in `ps`.
    #[arg(long, env = "RECEIVER_BROKER_PASSWORD", hide_env_values = true)]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub broker_password: Option<plumbing::mqtt::Password>,
    /// File holding the password at the broker(s) (one line).
    #[arg(long, env = "RECEIVER_BROKER_PASSWORD_FILE")]
    pub broker_password_file: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) that `mqtts://` brokers' certificates must chain
    /// to; unset: the system's roots.
    #[arg(long, env = "RECEIVER_BROKER_CA_FILE")]
    pub broker_ca_file: Option<std::path::PathBuf>,
    /// The fleet secret device keys derive from (hex or base64, at least 32
    /// bytes; the gateway's `--device-key-secret`): every TCP device must
    /// then answer a challenge with its key after its HELLO (PROTOCOL.md §5.9).
    #[arg(long, env = "RECEIVER_DEVICE_KEY_SECRET", hide_env_values = true, value_parser = plumbing::cli::SecretParser::<protocol::device_auth::FleetSecret>::new())]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub device_key_secret: Option<protocol::device_auth::FleetSecret>,
    /// `--device-key-secret` read from this file instead.
    #[arg(long, env = "RECEIVER_DEVICE_KEY_SECRET_FILE", conflicts_with = "device_key_secret")]
    pub device_key_secret_file: Option<std::path::PathBuf>,
    /// Accept TCP devices without authentication (any HELLO is believed),
    /// even with a fleet secret: an explicit per-receiver opt-in.
    #[arg(long, env = "RECEIVER_ALLOW_UNAUTHENTICATED_DEVICES")]
    pub allow_unauthenticated_devices: bool,
    /// TCP device connections at once, those still in their opening
    /// included; one more is closed at once (`receiver_device_connections_refused_total`).
    /// Keep it under the process's file descriptor limit (`ulimit -n`).
    #[arg(long, env = "RECEIVER_MAX_DEVICE_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_device_connections: usize,
    /// TCP connections still in their opening (TLS handshake, HELLO, AUTH)
    /// at once; a new one over that closes the oldest opening
    /// (`receiver_device_handshakes_evicted_total`), so idle connections
    /// cannot keep devices out.
    #[arg(long, env = "RECEIVER_MAX_DEVICE_HANDSHAKES", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_device_handshakes: usize,
    /// A TCP connection must name its device (TLS handshake, HELLO and,
    /// when devices authenticate, AUTH) within this many ms, or it is closed
    /// (`receiver_device_handshake_timeouts_total`).
    #[arg(long, env = "RECEIVER_DEVICE_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub device_handshake_timeout_ms: u64,
    /// A connected device silent for half this many ms gets a PING; silent
    /// for all of it (no PONG either), it is closed
    /// (`receiver_device_idle_closed_total`).
    #[arg(long, env = "RECEIVER_DEVICE_IDLE_TIMEOUT_MS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub device_idle_timeout_ms: u64,
    /// TLS on the device listener: the certificate chain (PEM, leaf first).
    #[arg(long, env = "RECEIVER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// TLS on the device listener: the private key of `--tls-cert` (PEM).
    #[arg(long, env = "RECEIVER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Log lines as `text` (for people) or `json` (one object per line, for
    /// log pipelines; `command_id`/`device_id` are fields of their own).
    #[arg(long, env = "RECEIVER_LOG_FORMAT", value_enum, default_value_t = plumbing::cli::LogFormat::Text)]
    pub log_format: plumbing::cli::LogFormat,
}

impl plumbing::config::ConfigFile for Config {
    const FILE_ENV: &'static str = "RECEIVER_CONFIG";

    /// What clap's `requires`/`conflicts_with` say among flags, for the merged result.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert and tls_key go together: give both, or neither"
        );
        anyhow::ensure!(
            self.device_key_secret.is_none() || self.device_key_secret_file.is_none(),
            "device_key_secret and device_key_secret_file: give one, not both"
        );
        Ok(())
    }
}

impl Config {
    /// Defaults for everything but the broker URL(s) and the device listener;
    /// no credentials (`insecure`), for tests and the demo.
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
            insecure: true,
            receiver_key: None,
            receiver_key_file: None,
            receiver_key_generation: 1,
            receiver_previous_key: None,
            message_window_ms: plumbing::seal::DEFAULT_WINDOW_MS,
            broker_username: None,
            broker_password: None,
            broker_password_file: None,
            broker_ca_file: None,
            device_key_secret: None,
            device_key_secret_file: None,
            allow_unauthenticated_devices: false,
            max_device_connections: 10_000,
            max_device_handshakes: 256,
            device_handshake_timeout_ms: 5_000,
            device_idle_timeout_ms: 300_000,
            tls_cert: None,
            tls_key: None,
            log_format: plumbing::cli::LogFormat::Text,
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
    /// Its keys, and the count of messages it refused.
    pub provenance: Arc<provenance::Provenance>,
    tasks: TaskTracker,
}

/// Starts a receiver; it runs until `shutdown` is cancelled. Fails on a bad
/// broker URL, `--serial` or `--modbus` spec, or an address it cannot listen on.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    // Checked before anything connects: a bad spec fails with its own error,
    // not after an MQTT connection attempt (nor behind a missing credential).
    anyhow::ensure!(
        protocol::DeviceId::is_valid(&config.receiver_id),
        "--receiver-id {:?}: 1 to {} characters of A-Z a-z 0-9 - _ . : (it goes into topic names and every report)",
        config.receiver_id,
        protocol::DeviceId::MAX_LEN
    );
    let modbus = modbus::plan(&config.modbus)?;
    let serial = serial::plan(&config.serial)?;
    let broker = brokers(&config)?;
    let metrics = Metrics::default();
    let provenance = Arc::new(provenance::Provenance::from_config(&config, &metrics)?);
    let device_auth = auth::DeviceAuth::from_config(&config)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(auth::tls_acceptor(cert, key)?),
        _ => None,
    };
    let listener = TcpListener::bind(config.tcp_listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for devices on {}: {e} (use --tcp-listen)", config.tcp_listen)
    })?;
    let tcp_addr = listener.local_addr()?;
    let counters = Arc::new(Counters::register(&metrics));
    let tasks = TaskTracker::new();
    // Filled in once they exist; the metrics listener binds first, so a
    // taken port fails before anything connects.
    let (bridge_cell, listening) = (Arc::new(OnceLock::new()), Flag::default());
    let metrics_addr = match config.metrics_listen {
        Some(listen) => {
            let ready = readiness(bridge_cell.clone(), listening.clone(), shutdown.clone());
            let (addr, serve) = metrics
                .serve(listen, plumbing::health::router(ready), shutdown.clone())
                .await
                .with_context(|| format!("cannot serve metrics on {listen} (use --metrics-listen)"))?;
            tasks.spawn(serve);
            Some(addr)
        }
        None => None,
    };
    let bridge =
        bridge::Bridge::start(&config, &broker, counters.clone(), provenance.clone(), &shutdown, &tasks);
    let _ = bridge_cell.set(bridge.clone());
    let env = Env { bridge: bridge.clone(), counters: counters.clone(), shutdown, tasks: tasks.clone() };
    let window = tcp::Window {
        size: usize::from(config.device_window),
        answer_timeout: std::time::Duration::from_millis(config.device_answer_timeout_ms),
    };
    let (authenticated, with_tls) = (matches!(device_auth, auth::DeviceAuth::Required(_)), tls.is_some());
    let limits = tcp::Limits {
        max_connections: config.max_device_connections,
        max_handshakes: config.max_device_handshakes,
        handshake_timeout: std::time::Duration::from_millis(config.device_handshake_timeout_ms),
        idle_timeout: std::time::Duration::from_millis(config.device_idle_timeout_ms),
    };
    let devices = tcp::Devices { window, auth: device_auth, tls, limits };
    let accepting = tcp::serve(listener, env.clone(), devices);
    // The socket is bound and listening already (connections queue in its
    // backlog), so readiness says so before the accept task is first polled.
    listening.set(true);
    tasks.spawn(async move {
        accepting.await;
        listening.set(false);
    });
    serial::start(serial, &env);
    modbus::start(modbus, &env);
    tracing::info!(%tcp_addr, ?metrics_addr, %broker, receiver_id = %config.receiver_id, authenticated, with_tls, "receiver started");
    Ok(Running { tcp_addr, metrics_addr, counters, bridge, provenance, tasks })
}

/// The receiver's `/readyz` checks: `shutdown` (not stopping), `broker`
/// (connected, command subscriptions made), `devices` (the TCP device
/// listener accepting). Serial and Modbus lines are opened (and reopened)
/// by their own tasks and are not part of readiness.
fn readiness(
    bridge: Arc<OnceLock<bridge::Bridge>>,
    listening: Flag,
    shutdown: CancellationToken,
) -> impl Fn() -> Vec<(&'static str, plumbing::health::Outcome)> + Clone + Send + Sync + 'static {
    move || {
        let stopping = if shutdown.is_cancelled() { Err("shutting down".to_owned()) } else { Ok(()) };
        let subscribed = bridge.get().is_some_and(bridge::Bridge::is_subscribed);
        let broker = if subscribed { Ok(()) } else { Err("not connected".to_owned()) };
        vec![
            ("shutdown", stopping),
            ("broker", broker),
            ("devices", listening.outcome("device listener not accepting")),
        ]
    }
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

/// The receiver's brokers with its credentials and CA applied. Without
/// `insecure`, every broker needs credentials (an error names the settings).
fn brokers(config: &Config) -> anyhow::Result<Brokers> {
    let credentials = plumbing::mqtt::Credentials::from_settings(
        config.broker_username.as_deref(),
        config.broker_password.as_ref(),
        config.broker_password_file.as_deref(),
        "RECEIVER_BROKER_USERNAME / RECEIVER_BROKER_PASSWORD(_FILE)",
    )?;
    let auth = plumbing::mqtt::ClientAuth { credentials, ca_file: config.broker_ca_file.clone() };
    let brokers = config.broker.parse::<Brokers>()?.with_auth(&auth)?;
    if !config.insecure {
        if let Some(bare) = brokers.as_slice().iter().find(|b| b.credentials.is_none()) {
            anyhow::bail!(
                "no credentials for the MQTT broker {bare}: give RECEIVER_BROKER_USERNAME with \
                 RECEIVER_BROKER_PASSWORD or RECEIVER_BROKER_PASSWORD_FILE (or user:pass@ in --broker), \
                 or run with --insecure"
            );
        }
    }
    for addr in brokers.as_slice() {
        if let Some(c) = addr.credentials.as_ref().filter(|c| c.username != config.receiver_id) {
            tracing::warn!(
                broker = %addr, receiver_id = %config.receiver_id, username = %c.username,
                "the broker user name is not the receiver id: the gateway's embedded broker and the \
                 shipped Mosquitto ACL expect them equal"
            );
        }
    }
    Ok(brokers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_insecure_every_broker_needs_credentials() {
        let mut config =
            Config::new("mqtt://a:1,mqtt://receiver-1:pw@b:2".into(), "127.0.0.1:0".parse().unwrap());
        config.insecure = false;
        let err = brokers(&config).unwrap_err().to_string();
        assert!(err.contains("RECEIVER_BROKER_USERNAME") && err.contains("mqtt://a:1"), "{err}");
        config.broker_username = Some("receiver-1".into());
        config.broker_password = Some(plumbing::mqtt::Password::new("env-pw"));
        let brokers = brokers(&config).unwrap();
        let passwords: Vec<_> = brokers
            .as_slice()
            .iter()
            .map(|b| b.credentials.as_ref().unwrap().password.expose().to_owned())
            .collect();
        assert_eq!(passwords, ["env-pw", "pw"], "a URL's own login wins");
        assert!(!format!("{config:?}").contains("env-pw"), "Debug masks the password");
        config.insecure = true;
        config.broker_username = None;
        config.broker_password = None;
        assert!(super::brokers(&config).is_ok(), "--insecure: anonymous allowed");
    }
}

#[cfg(test)]
mod config_tests {
    use super::Config;

    fn load(args: &[&str]) -> Config {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        plumbing::config::load_args("receiver", &args).unwrap()
    }

    /// deploy/receiver.toml sets every key (unset ones commented out) to its default.
    #[test]
    fn the_example_file_yields_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/receiver.toml");
        let check = plumbing::config::check_example_file::<Config>;
        check("receiver", path.as_ref(), "receiver --print-config").unwrap();
    }

    /// `Config::new` (tests, the demo) keeps the defaults but for its arguments and `insecure`.
    #[test]
    fn new_differs_from_the_defaults_only_where_it_says() {
        let defaults = load(&[]);
        let mut new = Config::new(defaults.broker.clone(), defaults.tcp_listen);
        new.insecure = false;
        assert_eq!(serde_json::to_value(new).unwrap(), serde_json::to_value(defaults).unwrap());
    }
}
