//! `firmware-sim`: parses flags, starts a [`Fleet`] (TCP) or a [`Bus`] (one
//! serial line), stops it on SIGINT/SIGTERM.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::Parser;
use firmware_sim::serial::parse_line;
use firmware_sim::{
    parse_churn_ms, parse_drop_ratio, parse_fail_ratio, parse_latency_ms, Bus, Fleet, FleetConfig,
    SerialConfig,
};
use plumbing::cli::{shutdown_signal, SecretParser};
use protocol::device_auth::{DeviceKey, FleetSecret};
use tokio_util::sync::CancellationToken;

/// A simulated fleet of devices, each a TCP connection to a receiver, or all
/// on one serial line (--serial).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Receiver address, host:port; or several, comma-separated
    /// (host1:port1,host2:port2): each device connects to the first and moves
    /// to the next, round robin, when a connect fails or its connection drops.
    #[arg(long, env = "FIRMWARE_SIM_CONNECT", value_parser = parse_addr, value_delimiter = ',', required_unless_present = "serial", conflicts_with = "serial")]
    connect: Vec<SocketAddr>,
    /// Play every device on this serial line (a bus): PATH[:BAUD], default
    /// baud 115200. Devices are addressed by a HELLO before each COMMAND.
    #[arg(long, env = "FIRMWARE_SIM_SERIAL", value_parser = parse_line)]
    serial: Option<(PathBuf, u32)>,
    /// Serial only: probability (0.0..=1.0) of a burst of random bytes before an outgoing frame.
    #[arg(long, env = "FIRMWARE_SIM_NOISE_RATIO", default_value = "0", value_parser = parse_probability, requires = "serial")]
    noise_ratio: f64,
    /// Serial only: probability (0.0..=1.0) that one bit of an outgoing frame is flipped.
    #[arg(long, env = "FIRMWARE_SIM_FLIP_RATIO", default_value = "0", value_parser = parse_probability, requires = "serial")]
    flip_ratio: f64,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, env = "FIRMWARE_SIM_LOG_FORMAT", value_enum, default_value_t = plumbing::cli::LogFormat::Text)]
    log_format: plumbing::cli::LogFormat,
    /// Number of devices (one connection each, or all on the serial line).
    #[arg(long, env = "FIRMWARE_SIM_DEVICES", value_parser = clap::value_parser!(u32).range(1..))]
    devices: u32,
    /// Device ids are <prefix><index, 4 digits>.
    #[arg(long, env = "FIRMWARE_SIM_ID_PREFIX", default_value = "dev-")]
    id_prefix: String,
    /// Index of the first device.
    #[arg(long, env = "FIRMWARE_SIM_ID_START", default_value_t = 0)]
    id_start: usize,
    /// Probability (0.0..=1.0) that a command fails with code 1.
    #[arg(long, env = "FIRMWARE_SIM_FAIL_RATIO", default_value = "0", value_parser = parse_fail_ratio)]
    fail_ratio: f64,
    /// Work time per command in ms: MIN..MAX (inclusive) or a single number.
    #[arg(long, env = "FIRMWARE_SIM_LATENCY_MS", default_value = "0..0", value_parser = parse_latency_ms)]
    latency_ms: (u64, u64),
    /// Write JSON stats here every second and on exit.
    #[arg(long, env = "FIRMWARE_SIM_STATS_FILE")]
    stats_file: Option<PathBuf>,
    /// Send every RESULT frame twice.
    #[arg(long, env = "FIRMWARE_SIM_DUPLICATE_RESULTS")]
    duplicate_results: bool,
    /// Probability (0.0..=1.0) that a command with a new id is ignored, as if
    /// lost on the line: not run, not remembered, not answered.
    #[arg(long, env = "FIRMWARE_SIM_DROP_RATIO", default_value = "0", value_parser = parse_drop_ratio)]
    drop_ratio: f64,
    /// Each device drops its connection MIN..MAX ms (inclusive; or a single
    /// number) after connecting, then reconnects. Off by default.
    #[arg(long, env = "FIRMWARE_SIM_CHURN_MS", value_parser = parse_churn_ms)]
    churn_ms: Option<(u64, u64)>,
    /// The fleet secret each device's key derives from (hex or base64, at
    /// least 32 bytes; the gateway's and receivers' --device-key-secret):
    /// devices answer a receiver's challenge with it. Without it, a device
    /// that is challenged disconnects, saying the receiver wants keys.
    #[arg(long, env = "FIRMWARE_SIM_DEVICE_KEY_SECRET", hide_env_values = true, value_parser = SecretParser::<FleetSecret>::new())]
    device_key_secret: Option<FleetSecret>,
    /// `--device-key-secret` read from this file instead.
    #[arg(long, env = "FIRMWARE_SIM_DEVICE_KEY_SECRET_FILE", conflicts_with = "device_key_secret")]
    device_key_secret_file: Option<PathBuf>,
    /// One device's own key as the registry issued it (base64 or hex; with
    /// --devices 1 and the generation it was issued as): what a real device
    /// is provisioned with, instead of --device-key-secret.
    #[arg(long, env = "FIRMWARE_SIM_DEVICE_KEY", hide_env_values = true, value_parser = SecretParser::<DeviceKey>::new(), conflicts_with_all = ["device_key_secret", "device_key_secret_file"])]
    device_key: Option<DeviceKey>,
    /// The key generation the devices authenticate with.
    #[arg(long, env = "FIRMWARE_SIM_DEVICE_KEY_GENERATION", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    device_key_generation: u32,
    /// Connect over TLS, trusting the certificates in this PEM file.
    #[arg(long, env = "FIRMWARE_SIM_TLS_CA", conflicts_with = "serial")]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: the name the receiver's certificate must carry (default: the IP address connected to).
    #[arg(long, env = "FIRMWARE_SIM_TLS_SERVER_NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl Cli {
    /// The fleet, and the line when in serial mode; fails on a secret file it cannot read.
    fn into_config(self) -> anyhow::Result<(FleetConfig, Option<SerialConfig>)> {
        let device_key_secret = match (self.device_key_secret, &self.device_key_secret_file) {
            (Some(secret), _) => Some(secret),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("cannot read --device-key-secret-file {}: {e}", path.display())
                })?;
                Some(
                    parse_secret(&text)
                        .map_err(|e| anyhow::anyhow!("--device-key-secret-file {}: {e}", path.display()))?,
                )
            }
            (None, None) => None,
        };
        let serial = self.serial.map(|(path, baud)| SerialConfig {
            path,
            baud,
            noise_ratio: self.noise_ratio,
            flip_ratio: self.flip_ratio,
        });
        let connect = if self.connect.is_empty() { FleetConfig::default().connect } else { self.connect };
        let fleet = FleetConfig {
            connect,
            devices: self.devices as usize,
            id_prefix: self.id_prefix,
            id_start: self.id_start,
            fail_ratio: self.fail_ratio,
            latency_ms: self.latency_ms,
            stats_file: self.stats_file,
            duplicate_results: self.duplicate_results,
            drop_ratio: self.drop_ratio,
            churn_ms: self.churn_ms,
            device_key_secret,
            device_key: self.device_key,
            device_key_generation: self.device_key_generation,
            tls_ca: self.tls_ca,
            tls_server_name: self.tls_server_name,
        };
        Ok((fleet, serial))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    plumbing::cli::main("info", cli.log_format, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, serial) = cli.into_config()?;
    config.validate()?;
    let shutdown = CancellationToken::new();
    match serial {
        Some(serial) => {
            tracing::info!(devices = config.devices, line = %serial.path.display(), "starting bus");
            let bus = Bus::start(config, serial, shutdown.clone());
            shutdown_signal().await;
            tracing::info!("stopping");
            shutdown.cancel();
            bus.stopped().await;
        }
        None => {
            tracing::info!(devices = config.devices, connect = ?config.connect, "starting fleet");
            let fleet = Fleet::start(config, shutdown.clone());
            shutdown_signal().await;
            tracing::info!("stopping");
            shutdown.cancel();
            fleet.stopped().await;
        }
    }
    Ok(())
}

/// `host:port`, resolved once at startup (the first address wins). Spaces
/// around it (after a comma in a list) are ignored.
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    text.to_socket_addrs()
        .map_err(|error| format!("{text:?} is not a usable host:port ({error})"))?
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// A fleet secret; the error says why, never the value.
fn parse_secret(text: &str) -> Result<FleetSecret, String> {
    FleetSecret::parse(text).map_err(|e| format!("not a usable fleet secret: {e}"))
}

/// A probability in `0.0..=1.0`.
fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a number in 0.0..=1.0")),
    }
}
