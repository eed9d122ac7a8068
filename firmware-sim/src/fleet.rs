//! Starting a fleet: one task per device plus the stats-file writer, all on a
//! `TaskTracker` so [`Fleet::stopped`] can wait for them after shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use protocol::DeviceId;

use crate::device::Device;
use crate::firmware::Behaviour;
use crate::stats::{self, DeviceCounters, FleetStats, SharedStats};
use crate::FleetConfig;

/// A running fleet of simulated devices.
pub struct Fleet {
    stats: Arc<SharedStats>,
    connected: watch::Receiver<usize>,
    /// The devices' key generation (see [`Fleet::set_key_generation`]).
    generation: watch::Sender<u32>,
    tasks: TaskTracker,
    stats_file: Option<PathBuf>,
}

impl Fleet {
    /// Spawns the devices on the current tokio runtime and returns at once.
    /// They run until `shutdown` is cancelled. Panics outside a tokio runtime,
    /// or when the config's device ids are not valid or it names no receiver
    /// (see [`FleetConfig::validate`]).
    pub fn start(config: FleetConfig, shutdown: CancellationToken) -> Fleet {
        assert!(!config.connect.is_empty(), "invalid fleet config: {}", crate::ConfigError::NoReceiver);
        let stats = SharedStats::new(valid_ids(&config));
        let behaviour = Arc::new(Behaviour::from_config(&config));
        let tasks = TaskTracker::new();
        let generation = watch::Sender::new(config.device_key_generation);
        for (index, id) in stats.ids().iter().enumerate() {
            let counters = DeviceCounters::new(stats.clone(), index);
            let device = Device::new(id.clone(), behaviour.clone(), counters, generation.subscribe());
            let span = tracing::info_span!("device", device_id = %id);
            tasks.spawn(device.run(shutdown.clone()).instrument(span));
        }
        let mut fleet = Fleet::running(stats, tasks, config.stats_file, shutdown);
        fleet.generation = generation;
        fleet
    }

    /// Moves every device to key generation `generation` (after the
    /// registry issued it): each drops its connection and authenticates
    /// anew with it, keeping its memory of answered commands.
    pub fn set_key_generation(&self, generation: u32) {
        self.generation.send_replace(generation);
    }

    /// What every way of starting devices (TCP fleet, serial bus) ends with:
    /// the stats-file writer beside the device tasks, and the handle.
    pub(crate) fn running(
        stats: Arc<SharedStats>,
        tasks: TaskTracker,
        stats_file: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> Fleet {
        if let Some(path) = stats_file.clone() {
            tasks.spawn(stats::write_periodically(stats.clone(), path, shutdown));
        }
        tasks.close();
        let connected = stats.watch_connected();
        Fleet { stats, connected, generation: watch::Sender::new(1), tasks, stats_file }
    }

    /// The device ids, in index order.
    pub fn device_ids(&self) -> &[DeviceId] {
        self.stats.ids()
    }

    /// A snapshot of every device's counters and the totals.
    pub fn stats(&self) -> FleetStats {
        self.stats.snapshot()
    }

    /// Waits until at least `n` devices are connected at once; `false` on timeout.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        let mut connected = self.connected.clone();
        let reached = async { connected.wait_for(|count| *count >= n).await.is_ok() };
        tokio::time::timeout(timeout, reached).await.unwrap_or(false)
    }

    /// Waits for every task to end (they do once the shutdown token is
    /// cancelled, so cancel it first), then writes the stats file a last time.
    pub async fn stopped(self) {
        self.tasks.wait().await;
        if let Some(path) = &self.stats_file {
            stats::write_logged(path, &self.stats.snapshot()).await;
        }
    }
}

/// The config's device ids; a config that would name a device with an id a
/// HELLO cannot carry is a caller's mistake ([`FleetConfig::validate`] says so).
pub(crate) fn valid_ids(config: &FleetConfig) -> Vec<DeviceId> {
    config.device_ids().unwrap_or_else(|e| panic!("invalid fleet config: {e}"))
}
