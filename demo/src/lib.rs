//! A whole system in one process — gateway, receiver and simulated fleet on
//! free loopback ports — for the demo (`cargo run --release -p demo`) and the
//! benchmark. Every address is chosen at start, so it runs beside anything
//! else (e.g. a Mosquitto holding port 1883).
//!
//! This crate is the only one that depends on all three programs: they meet
//! nowhere else but on the wire.

pub mod demo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use gateway::Config;

/// A free loopback port below the ephemeral range, reserved until this
/// process ends ([`plumbing::ports::reserve_free_port`]).
pub fn free_port() -> std::io::Result<SocketAddr> {
    plumbing::ports::reserve_free_port()
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// `None`: a fresh SQLite file in a temporary directory.
    pub database_url: Option<String>,
    /// `None`: the embedded broker on a free port.
    pub broker: Option<String>,
    pub devices: usize,
    pub fail_ratio: f64,
    pub latency_ms: (u64, u64),
}

/// The running system.
pub struct LocalSystem {
    pub base: String,
    pub http: reqwest::Client,
    pub gateway: gateway::Running,
    pub receiver: receiver::Running,
    pub fleet: firmware_sim::Fleet,
    pub database_url: String,
    shutdown: CancellationToken,
    temp_dir: Option<PathBuf>,
}

impl LocalSystem {
    /// Starts everything, registers the fleet's devices and waits until they are online.
    pub async fn start(opts: LocalOptions) -> anyhow::Result<LocalSystem> {
        let shutdown = CancellationToken::new();
        let (database_url, temp_dir) = match opts.database_url {
            Some(url) => (url, None),
            None => {
                let dir = std::env::temp_dir().join(format!("gateway-local-{}", std::process::id()));
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                (format!("sqlite:{}", dir.join("gateway.db").display()), Some(dir))
            }
        };
        // Demo mode (`insecure`: anonymous HTTP API and MQTT broker, on
        // loopback only), but gateway↔receiver messages signed, with a secret
        // made for this run (PROTOCOL 4.7).
        let secret: String = (0..48).map(|_| char::from(b'a' + rand::random::<u8>() % 26)).collect();
        let mut config = Config::for_local(database_url.clone(), free_port()?, free_port()?);
        config.broker = opts.broker;
        config.message_secret = Some(secret.parse()?);
        let gateway = gateway::start(config, shutdown.clone()).await?;
        let broker = gateway.broker.to_string();
        let mut rconfig = receiver::Config::new(broker, free_port()?);
        let key = protocol::seal::receiver_key(secret.as_bytes(), &rconfig.receiver_id, 1);
        rconfig.receiver_key = Some(key.to_base64().parse()?);
        let receiver = receiver::start(rconfig, shutdown.clone()).await?;
        let fleet_config = firmware_sim::FleetConfig {
            connect: vec![receiver.tcp_addr],
            devices: opts.devices,
            fail_ratio: opts.fail_ratio,
            latency_ms: opts.latency_ms,
            ..Default::default()
        };
        let fleet = firmware_sim::Fleet::start(fleet_config, shutdown.clone());
        let base = format!("http://{}", gateway.http_addr);
        let system = LocalSystem {
            base,
            http: reqwest::Client::new(),
            gateway,
            receiver,
            fleet,
            database_url,
            shutdown,
            temp_dir,
        };
        system.register_fleet().await?;
        Ok(system)
    }

    async fn register_fleet(&self) -> anyhow::Result<()> {
        for id in self.fleet.device_ids() {
            let url = format!("{}/v1/devices/{id}", self.base);
            let r = self.http.put(url).json(&json!({"labels": {"fleet": "simulated"}})).send().await?;
            anyhow::ensure!(r.status().is_success(), "registering {id}: {}", r.status());
        }
        let n = self.fleet.device_ids().len();
        anyhow::ensure!(
            self.fleet.wait_connected(n, Duration::from_secs(30)).await,
            "the simulated devices did not all connect within 30 s"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for id in self.fleet.device_ids() {
            while !self.online(id.as_str()).await? {
                anyhow::ensure!(Instant::now() < deadline, "device {id} never showed online");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    async fn online(&self, id: &str) -> anyhow::Result<bool> {
        let d: Value = self.http.get(format!("{}/v1/devices/{id}", self.base)).send().await?.json().await?;
        Ok(d["online"] == true)
    }

    /// Stops everything in order and removes the temporary database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.fleet.stopped().await;
        self.receiver.stopped().await;
        self.gateway.stopped().await;
        if let Some(dir) = self.temp_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
