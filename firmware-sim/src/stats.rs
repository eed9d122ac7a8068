//! The counters each device keeps, the fleet-wide snapshot tests and the
//! stats file read, and writing that file so a reader never sees half of it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use protocol::DeviceId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the stats file is rewritten while the fleet runs.
pub const STATS_FILE_INTERVAL: Duration = Duration::from_secs(1);

/// The counters of one device ([`DeviceStats`]) or their sums over a fleet
/// ([`Totals`]); `C` says how `connected` is told: whether the device is
/// connected, or how many devices are. A device's counters survive its
/// reconnects. Counters added after the first release default to 0 when
/// read, so older stats files still parse.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats<C> {
    /// Commands with an id new to the device.
    pub received: u64,
    /// Commands run to completion (success or failure).
    pub executed: u64,
    /// Commands whose id was already answered: answered again, not run.
    pub duplicates: u64,
    /// Executed commands that answered a non-zero code.
    pub failed: u64,
    /// Executions of an id that had already been executed. Stays 0 unless the
    /// bounded command memory was outrun; system tests assert on it.
    pub executed_ids_repeated: u64,
    /// Undecodable input and frames a device does not expect.
    pub bad_frames: u64,
    /// Commands with a new id ignored by `--drop-ratio`; not in `received`.
    #[serde(default)]
    pub dropped: u64,
    /// Successful TCP connects (serial mode: opens of the line).
    #[serde(default)]
    pub connects: u64,
    /// Connections the device dropped itself because of `--churn-ms`.
    #[serde(default)]
    pub churns: u64,
    /// Whether the device has a connection right now; in [`Totals`], how many do.
    pub connected: C,
}

/// One device's counters.
pub type DeviceStats = Stats<bool>;

/// Sums over the fleet; `connected` counts connected devices.
pub type Totals = Stats<u64>;

/// Counters of a serial line shared by the devices of a bus (serial mode only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LineStats {
    /// Times the line was opened.
    pub opens: u64,
    /// Whether the line is open now.
    pub open: bool,
    /// Undecodable input and frames no device on the bus expects.
    pub bad_input: u64,
    /// COMMAND frames not preceded by an address HELLO naming a device of this bus.
    pub unaddressed_commands: u64,
    /// Bursts of random bytes written between frames (`--noise-ratio`).
    pub noise_bursts: u64,
    /// Bytes in those bursts.
    pub noise_bytes: u64,
    /// Outgoing frames with one bit flipped (`--flip-ratio`).
    pub flipped_frames: u64,
}

/// A snapshot of the whole fleet, keyed by device id; the stats file's shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetStats {
    pub devices: BTreeMap<String, DeviceStats>,
    pub totals: Totals,
    /// The shared line, when the devices are on a serial bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<LineStats>,
}

impl FleetStats {
    fn from_devices(devices: BTreeMap<String, DeviceStats>) -> Self {
        let mut totals = Totals::default();
        for s in devices.values() {
            totals.add_counts(s, u64::from(s.connected));
        }
        Self { devices, totals, line: None }
    }
}

impl Totals {
    /// Adds `other` field by field (e.g. the totals of several fleets).
    pub fn add(&mut self, other: &Totals) {
        self.add_counts(other, other.connected);
    }

    /// Adds the counters of `other` (a device's or a fleet's), and `connected`.
    fn add_counts<C>(&mut self, other: &Stats<C>, connected: u64) {
        self.received += other.received;
        self.executed += other.executed;
        self.duplicates += other.duplicates;
        self.failed += other.failed;
        self.executed_ids_repeated += other.executed_ids_repeated;
        self.bad_frames += other.bad_frames;
        self.dropped += other.dropped;
        self.connects += other.connects;
        self.churns += other.churns;
        self.connected += connected;
    }
}

/// The counters of all devices, shared by the device tasks and the [`crate::Fleet`].
#[derive(Debug)]
pub(crate) struct SharedStats {
    ids: Vec<DeviceId>,
    /// A std mutex: it is only held to bump or copy counters, never across an
    /// `.await`, and contention is one short lock per frame.
    devices: Mutex<Vec<DeviceStats>>,
    /// Number of connected devices, so waiters wake on change instead of polling.
    connected: watch::Sender<usize>,
    /// The serial line's counters; `None` for TCP fleets.
    line: Mutex<Option<LineStats>>,
}

impl SharedStats {
    pub(crate) fn new(ids: Vec<DeviceId>) -> Arc<Self> {
        let devices = Mutex::new(vec![DeviceStats::default(); ids.len()]);
        let (connected, _) = watch::channel(0);
        Arc::new(Self { ids, devices, connected, line: Mutex::new(None) })
    }

    pub(crate) fn ids(&self) -> &[DeviceId] {
        &self.ids
    }

    pub(crate) fn snapshot(&self) -> FleetStats {
        let devices = self.lock().clone();
        let mut stats =
            FleetStats::from_devices(self.ids.iter().map(DeviceId::to_string).zip(devices).collect());
        stats.line = self.line.lock().unwrap_or_else(PoisonError::into_inner).clone();
        stats
    }

    /// Changes the line counters (creating them on first use: serial mode).
    pub(crate) fn update_line(&self, change: impl FnOnce(&mut LineStats)) {
        change(
            self.line.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(LineStats::default),
        );
    }

    pub(crate) fn watch_connected(&self) -> watch::Receiver<usize> {
        self.connected.subscribe()
    }

    /// Counters stay meaningful even if a task panicked while holding the lock.
    fn lock(&self) -> MutexGuard<'_, Vec<DeviceStats>> {
        self.devices.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One device's view of [`SharedStats`].
#[derive(Debug, Clone)]
pub(crate) struct DeviceCounters {
    shared: Arc<SharedStats>,
    index: usize,
}

impl DeviceCounters {
    pub(crate) fn new(shared: Arc<SharedStats>, index: usize) -> Self {
        Self { shared, index }
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut DeviceStats)) {
        if let Some(stats) = self.shared.lock().get_mut(self.index) {
            change(stats);
        }
    }

    /// Marks the device (dis)connected; a connect also counts in `connects`.
    pub(crate) fn set_connected(&self, now: bool) {
        let mut was = now;
        self.update(|s| {
            was = s.connected;
            s.connected = now;
            s.connects += u64::from(now);
        });
        // The lock is released before waking waiters, who will take it to read.
        if was != now {
            self.shared.connected.send_modify(|n| *n = if now { *n + 1 } else { n.saturating_sub(1) });
        }
    }
}

/// Rewrites `path` every [`STATS_FILE_INTERVAL`] until `shutdown`.
pub(crate) async fn write_periodically(shared: Arc<SharedStats>, path: PathBuf, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(STATS_FILE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => write_logged(&path, &shared.snapshot()).await,
        }
    }
}

/// [`write_atomically`], logging instead of failing: stats are best effort.
pub(crate) async fn write_logged(path: &Path, stats: &FleetStats) {
    if let Err(error) = write_atomically(path, stats).await {
        tracing::warn!(path = %path.display(), %error, "cannot write the stats file");
    }
}

/// Writes `stats` as JSON to `PATH.tmp`, then renames it over `path`.
pub async fn write_atomically(path: &Path, stats: &FleetStats) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(stats)?;
    let tmp = tmp_path(path);
    tokio::fs::write(&tmp, json).await?;
    tokio::fs::rename(&tmp, path).await
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".tmp");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(ids: &[&str]) -> Vec<DeviceId> {
        ids.iter().map(|id| DeviceId::parse(id).unwrap()).collect()
    }

    #[test]
    fn totals_sum_counters_and_count_connected_devices() {
        let shared = SharedStats::new(ids(&["a", "b"]));
        let (a, b) = (DeviceCounters::new(shared.clone(), 0), DeviceCounters::new(shared.clone(), 1));
        a.update(|s| s.executed = 2);
        b.update(|s| s.executed = 3);
        a.update(|s| s.dropped = 1);
        b.update(|s| s.churns = 4);
        a.set_connected(true);
        let snap = shared.snapshot();
        assert_eq!(snap.totals.executed, 5);
        assert_eq!((snap.totals.dropped, snap.totals.churns), (1, 4));
        assert_eq!(snap.totals.connected, 1);
        assert_eq!(*shared.watch_connected().borrow(), 1);
        a.set_connected(false);
        assert_eq!(*shared.watch_connected().borrow(), 0);
        assert_eq!(shared.snapshot().devices["a"].connects, 1);
    }

    #[tokio::test]
    async fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.json");
        let shared = SharedStats::new(ids(&["dev-0000"]));
        write_atomically(&path, &shared.snapshot()).await.unwrap();
        let read: FleetStats = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read.devices["dev-0000"], DeviceStats::default());
        assert!(!tmp_path(&path).exists());
    }
}
