//! Serial mode: the devices of a fleet share one serial line, as on an RS-485
//! bus. One task owns the line and plays every device on it; each device keeps
//! its own memory, queue and counters, exactly as in TCP mode.
//!
//! Addressing (the COMMAND frame names no device): the receiver writes a HELLO
//! naming the target device right before each COMMAND. A device takes a
//! COMMAND only if the item decoded just before it was a HELLO naming it; any
//! other frame or undecodable input in between cancels the selection, so a
//! corrupted address never hands a command to the wrong device. RESULTs are
//! sent without an address (they carry the command id). Every device
//! announces itself with a HELLO each time the line opens.
//!
//! Faults for the line: `noise_ratio` writes a burst of random bytes before
//! an outgoing frame, `flip_ratio` flips one random bit of an outgoing frame.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use plumbing::backoff::Backoff;
use protocol::frame::{self, DEFAULT_MAX_BODY};
use protocol::{DeviceId, Frame, FrameCodec, FrameError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::firmware::{probability, sleep_until, Behaviour, Firmware};
use crate::memory::Answer;
use crate::stats::{DeviceCounters, FleetStats, SharedStats};
use crate::{Fleet, FleetConfig};

/// Baud rate when `--serial` names none.
pub const DEFAULT_BAUD: u32 = 115_200;
/// Most bytes in one noise burst.
const MAX_NOISE_BURST: usize = 16;
/// First reopen delay; doubled (with jitter) per failure up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The line and its faults; the devices themselves are a [`FleetConfig`]
/// (whose `connect` and `churn_ms` serial mode ignores).
#[derive(Debug, Clone)]
pub struct SerialConfig {
    /// The serial device (or pseudo-terminal) to open; reopened if it fails.
    pub path: PathBuf,
    /// Bits per second (the format is tokio-serial's default, 8N1).
    pub baud: u32,
    /// Probability (0.0..=1.0) that a burst of 1–16 random bytes precedes an outgoing frame.
    pub noise_ratio: f64,
    /// Probability (0.0..=1.0) that one random bit of an outgoing frame is flipped.
    pub flip_ratio: f64,
}

impl SerialConfig {
    /// The line at `path`, [`DEFAULT_BAUD`], no faults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), baud: DEFAULT_BAUD, noise_ratio: 0.0, flip_ratio: 0.0 }
    }
}

/// `PATH[:BAUD]` (a path with `:` in it needs the baud rate given).
pub fn parse_line(text: &str) -> Result<(PathBuf, u32), String> {
    let (path, baud) = match text.rsplit_once(':') {
        Some((path, baud)) => {
            let baud = baud.parse::<u32>().ok().filter(|b| *b > 0);
            (path, baud.ok_or_else(|| format!("{text:?}: baud rate is not a positive number"))?)
        }
        None => (text, DEFAULT_BAUD),
    };
    if path.is_empty() {
        return Err(format!("{text:?}: no path"));
    }
    Ok((PathBuf::from(path), baud))
}

/// A running bus of simulated devices on one serial line: a [`Fleet`] whose
/// devices share the line.
pub struct Bus(Fleet);

impl Bus {
    /// Spawns the bus on the current tokio runtime; it opens `serial.path`
    /// (again and again, with backoff, when it fails) until `shutdown`.
    /// Panics outside a tokio runtime, or when the config's device ids are
    /// not valid (see [`FleetConfig::validate`]).
    pub fn start(config: FleetConfig, serial: SerialConfig, shutdown: CancellationToken) -> Bus {
        let stats = SharedStats::new(crate::fleet::valid_ids(&config));
        stats.update_line(|_| {});
        let tasks = TaskTracker::new();
        let line = Line::new(&config, &serial, stats.clone());
        let span = tracing::info_span!("bus", path = %serial.path.display());
        tasks.spawn(line.run(serial.path, serial.baud, shutdown.clone()).instrument(span));
        Bus(Fleet::running(stats, tasks, config.stats_file, shutdown))
    }

    /// The device ids, in index order.
    pub fn device_ids(&self) -> &[DeviceId] {
        self.0.device_ids()
    }

    /// Every device's counters, the totals and the line's counters.
    pub fn stats(&self) -> FleetStats {
        self.0.stats()
    }

    /// Waits until the line is open (all devices connected); `false` on timeout.
    pub async fn wait_open(&self, timeout: Duration) -> bool {
        self.0.wait_connected(self.device_ids().len(), timeout).await
    }

    /// Waits for the bus to stop (cancel its shutdown token first), then
    /// writes the stats file a last time.
    pub async fn stopped(self) {
        self.0.stopped().await
    }
}

/// The line's owner: the devices, the faults, the shared counters.
struct Line {
    /// The devices on the bus: what each keeps across reopens of the line.
    devices: Vec<Firmware>,
    noise_ratio: f64,
    flip_ratio: f64,
    stats: Arc<SharedStats>,
    rng: StdRng,
    /// The device the last decoded item addressed, if it was a HELLO naming one of ours.
    selected: Option<usize>,
}

type Framed_<T> = Framed<T, FrameCodec>;

impl Line {
    fn new(config: &FleetConfig, serial: &SerialConfig, stats: Arc<SharedStats>) -> Line {
        let behaviour = Arc::new(Behaviour::from_config(config));
        let devices = stats
            .ids()
            .iter()
            .enumerate()
            .map(|(index, id)| {
                Firmware::new(id.clone(), behaviour.clone(), DeviceCounters::new(stats.clone(), index))
            })
            .collect();
        Line {
            devices,
            noise_ratio: probability(serial.noise_ratio),
            flip_ratio: probability(serial.flip_ratio),
            stats,
            rng: StdRng::from_entropy(),
            selected: None,
        }
    }

    async fn run(mut self, path: PathBuf, baud: u32, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(INITIAL_BACKOFF, MAX_BACKOFF);
        while !shutdown.is_cancelled() {
            match tokio_serial::new(path.to_string_lossy(), baud).open_native_async() {
                Ok(port) => {
                    let end = self.serve(Framed::new(port, FrameCodec::default()), &shutdown).await;
                    tracing::info!(reason = %end, "line closed");
                    backoff.reset();
                }
                Err(error) => tracing::debug!(%error, "cannot open the line"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// Serves one open of the line: announce every device, then frames.
    async fn serve<T>(&mut self, mut line: Framed_<T>, shutdown: &CancellationToken) -> std::io::Error
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        self.set_open(true);
        let end = self.serve_open(&mut line, shutdown).await;
        self.set_open(false);
        self.selected = None;
        for device in &mut self.devices {
            // Queued commands are lost with the line; the running ones finish
            // and are answered on the next open (the receiver forwards late results).
            device.link_lost();
        }
        end
    }

    async fn serve_open<T>(&mut self, line: &mut Framed_<T>, shutdown: &CancellationToken) -> std::io::Error
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        tracing::info!("line open");
        for index in 0..self.devices.len() {
            let hello = Frame::Hello { device_id: self.devices[index].id().clone() };
            if let Err(error) = self.send(line, &hello).await {
                return error;
            }
        }
        loop {
            if let Err(error) = self.start_queued(line).await {
                return error;
            }
            let done_at = self.devices.iter().filter_map(Firmware::done_at).min();
            // Cancel-safe: `next()` keeps partial frames in the codec buffer and
            // the deadlines live in the devices.
            let step = tokio::select! {
                _ = shutdown.cancelled() => return std::io::Error::other("shutting down"),
                item = line.next() => match item {
                    None => Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Some(Err(error)) => Err(error),
                    Some(Ok(item)) => self.on_item(item, line).await,
                },
                _ = sleep_until(done_at) => self.finish_due(line).await,
            };
            if let Err(error) = step {
                return error;
            }
        }
    }

    fn set_open(&self, open: bool) {
        self.stats.update_line(|l| {
            l.open = open;
            l.opens += u64::from(open);
        });
        for device in &self.devices {
            device.counters().set_connected(open);
        }
    }

    async fn on_item<T>(
        &mut self,
        item: Result<Frame, FrameError>,
        line: &mut Framed_<T>,
    ) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let selected = self.selected.take();
        match item {
            Ok(Frame::Hello { device_id }) => {
                self.selected = self.devices.iter().position(|d| *d.id() == device_id);
            }
            Ok(Frame::Command { id, name, payload }) => match selected {
                Some(index) => self.devices[index].receive(id, name, payload),
                None => {
                    tracing::debug!(command_id = %id, "command for no device of this bus ignored");
                    self.stats.update_line(|l| l.unaddressed_commands += 1);
                }
            },
            // The bus answers as a whole: the line is alive.
            Ok(Frame::Ping) => self.send(line, &Frame::Pong).await?,
            Ok(other) => self.bad_input(&format!("unexpected {other:?}")),
            Err(error) => self.bad_input(&error.to_string()),
        }
        Ok(())
    }

    fn bad_input(&self, what: &str) {
        tracing::debug!(what, "bad input ignored");
        self.stats.update_line(|l| l.bad_input += 1);
    }

    /// Lets every idle device take its queued commands, sending the answers
    /// of repeats as they come.
    async fn start_queued<T>(&mut self, line: &mut Framed_<T>) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        for index in 0..self.devices.len() {
            while let Some((id, answer)) = self.devices[index].take_queued() {
                self.send_result(line, index, id, answer).await?;
            }
        }
        Ok(())
    }

    /// Completes every command whose time has come and sends its RESULT.
    async fn finish_due<T>(&mut self, line: &mut Framed_<T>) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let now = Instant::now();
        for index in 0..self.devices.len() {
            if self.devices[index].done_at().is_some_and(|at| at <= now) {
                if let Some((id, answer)) = self.devices[index].finish() {
                    self.send_result(line, index, id, answer).await?;
                }
            }
        }
        Ok(())
    }

    /// Sends device `index`'s answer to command `id`.
    async fn send_result<T>(
        &mut self,
        line: &mut Framed_<T>,
        index: usize,
        id: Uuid,
        answer: Answer,
    ) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        for frame in self.devices[index].result_frames(id, answer) {
            self.send(line, &frame).await?;
        }
        Ok(())
    }

    /// Writes one frame, with the line's faults applied.
    async fn send<T>(&mut self, line: &mut Framed_<T>, frame: &Frame) -> std::io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut bytes = BytesMut::new();
        if self.rng.gen_bool(self.noise_ratio) {
            let n = self.rng.gen_range(1..=MAX_NOISE_BURST);
            bytes.extend((0..n).map(|_| self.rng.gen::<u8>()));
            self.stats.update_line(|l| {
                l.noise_bursts += 1;
                l.noise_bytes += n as u64;
            });
        }
        let start = bytes.len();
        frame::encode(frame, &mut bytes, DEFAULT_MAX_BODY).map_err(std::io::Error::other)?;
        if self.rng.gen_bool(self.flip_ratio) {
            let bit = self.rng.gen_range(0..(bytes.len() - start) * 8);
            bytes[start + bit / 8] ^= 1 << (bit % 8);
            self.stats.update_line(|l| l.flipped_frames += 1);
        }
        // Frames are only ever written here, so the Framed write buffer stays empty.
        let port = line.get_mut();
        port.write_all(&bytes).await?;
        port.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_is_a_path_with_an_optional_baud_rate() {
        assert_eq!(parse_line("/tmp/a"), Ok((PathBuf::from("/tmp/a"), DEFAULT_BAUD)));
        assert_eq!(parse_line("/dev/ttyS0:9600"), Ok((PathBuf::from("/dev/ttyS0"), 9600)));
        assert!(parse_line("/dev/ttyS0:fast").is_err());
        assert!(parse_line(":9600").is_err());
    }
}
