//! Serial lines end to end: gateway HTTP API → broker → receiver `--serial` →
//! a pseudo-terminal pair made by socat → simulated devices on one bus (or a
//! device played by hand, byte by byte). socat is a child process so a test
//! can make the port disappear and come back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use protocol::frame::{encode, DEFAULT_MAX_BODY};
use protocol::{Frame, FrameCodec};
use serde_json::{json, Value};
use system_tests::{eventually, Db, Spec, System};
use tokio::io::AsyncWriteExt;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use firmware_sim::{Bus, FleetConfig, SerialConfig};

/// Per-request timeout on the test buses: short, so lost answers cost little.
const REQUEST_TIMEOUT_MS: u64 = 300;

/// `socat` joining two pseudo-terminals, reachable as `<dir>/rx` (the
/// receiver's end) and `<dir>/dev` (the devices' end). Killed on drop.
struct Socat {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Socat {
    /// Links in a fresh directory; nothing runs until [`Socat::restart`].
    fn new() -> Socat {
        Socat { dir: tempfile::tempdir().unwrap(), child: None }
    }

    fn rx(&self) -> PathBuf {
        self.dir.path().join("rx")
    }

    fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    /// Starts socat (again) with the same links and waits until both exist.
    async fn restart(&mut self) {
        let link = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let child = Command::new("socat")
            .arg(link(&self.rx()))
            .arg(link(&self.dev()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is installed");
        self.child = Some(child);
        eventually("socat links", || async { self.rx().exists() && self.dev().exists() }).await;
    }

    /// Kills socat: both ends of the line disappear.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        // socat removes its links on SIGTERM, not on SIGKILL: do it for it.
        let _ = std::fs::remove_file(self.rx());
        let _ = std::fs::remove_file(self.dev());
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A system whose receiver has one serial port with `ids` on it (no TCP
/// devices). The port appears only once the devices are registered: presence
/// published before the gateway has subscribed would be lost (see the report).
async fn start(socat: &mut Socat, ids: &[String]) -> System {
    let mut spec = Spec::new(Db::Sqlite);
    spec.devices = 0;
    let port = format!("{}:115200,timeout={REQUEST_TIMEOUT_MS}:{}", socat.rx().display(), ids.join(","));
    spec.receiver_tune = Box::new(move |c| c.serial.push(port));
    let s = System::start(spec).await.expect("SQLite is always there");
    for id in ids {
        s.register(id).await;
    }
    socat.restart().await;
    for id in ids {
        eventually("serial device online", || s.device_online(id)).await;
    }
    s
}

/// Simulated devices `<prefix>0000..` on the devices' end of the line.
async fn start_bus(socat: &Socat, prefix: &str, n: usize, line: SerialConfig) -> (Bus, CancellationToken) {
    let stop = CancellationToken::new();
    let fleet = FleetConfig { devices: n, id_prefix: prefix.into(), ..FleetConfig::default() };
    let serial = SerialConfig { path: socat.dev(), ..line };
    let bus = Bus::start(fleet, serial, stop.clone());
    assert!(bus.wait_open(Duration::from_secs(20)).await, "the bus opens its line");
    (bus, stop)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| firmware_sim::device_id(prefix, i)).collect()
}

async fn send_async(s: &System, device: &str, body: Value) -> String {
    let mut body = body;
    body["mode"] = json!("async");
    let (status, cmd) = s.send(device, body).await;
    assert_eq!(status, 202, "{cmd}");
    cmd["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_on_a_line() {
    let mut socat = Socat::new();
    let ids = ids("one-", 1);
    let s = start(&mut socat, &ids).await;
    let (bus, stop) = start_bus(&socat, "one-", 1, SerialConfig::new("")).await;
    let (status, cmd) = s.send(&ids[0], json!({"name": "echo", "payload": {"t": 21.5}})).await;
    assert_eq!(status, 200, "{cmd}");
    assert_eq!(cmd["status"], "succeeded");
    assert_eq!(cmd["result"]["payload"], json!({"t": 21.5}));
    assert_eq!(cmd["attempts"], 1);
    let (status, cmd) = s.send(&ids[0], json!({"name": "fail", "payload": {"code": 7}})).await;
    assert_eq!(
        (status, cmd["status"].as_str(), cmd["result"]["code"].as_i64()),
        (200, Some("failed"), Some(7))
    );
    let stats = bus.stats();
    assert_eq!(stats.devices[&ids[0]].executed, 2);
    assert_eq!(stats.line.unwrap().unaddressed_commands, 0);
    stop.cancel();
    bus.stopped().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_bus_answers_each_command_from_the_right_device() {
    let mut socat = Socat::new();
    let ids = ids("bus-", 4);
    let s = start(&mut socat, &ids).await;
    let (bus, stop) = start_bus(&socat, "bus-", 4, SerialConfig::new("")).await;
    let mut sent = Vec::new();
    for round in 0..5 {
        for id in &ids {
            sent.push((
                id.clone(),
                send_async(&s, id, json!({"name": "whoami", "payload": {"round": round}})).await,
            ));
        }
    }
    for (device, command) in &sent {
        let cmd = s.final_state(command).await;
        assert_eq!(cmd["status"], "succeeded", "{cmd}");
        assert_eq!(cmd["result"]["payload"]["device"], json!(device), "answered by the addressed device");
    }
    let stats = bus.stats();
    for id in &ids {
        assert_eq!(stats.devices[id].executed, 5, "{id}: {:?}", stats.devices[id]);
    }
    assert_eq!(stats.line.unwrap().unaddressed_commands, 0);
    stop.cancel();
    bus.stopped().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_and_bit_flips_are_survived_without_running_anything_twice() {
    let mut socat = Socat::new();
    let ids = ids("noisy-", 3);
    let s = start(&mut socat, &ids).await;
    let line = SerialConfig { noise_ratio: 0.3, flip_ratio: 0.2, ..SerialConfig::new("") };
    let (bus, stop) = start_bus(&socat, "noisy-", 3, line).await;
    let mut sent = Vec::new();
    for round in 0..8 {
        for id in &ids {
            let body = json!({"name": "echo", "payload": {"round": round, "device": id}, "max_attempts": 20});
            sent.push(send_async(&s, id, body).await);
        }
    }
    for command in &sent {
        let cmd = s.final_state(command).await;
        assert_eq!(cmd["status"], "succeeded", "{cmd}");
    }
    let stats = bus.stats();
    let line = stats.line.clone().unwrap();
    assert!(line.noise_bursts > 0 && line.flipped_frames > 0, "faults were injected: {line:?}");
    let bad = system_tests_bad_frames(&s);
    assert!(bad > 0, "the receiver counted bad input");
    assert_eq!(stats.totals.executed_ids_repeated, 0);
    for id in &ids {
        assert_eq!(
            stats.devices[id].executed, 8,
            "{id} ran each of its commands once: {:?}",
            stats.devices[id]
        );
    }
    stop.cancel();
    bus.stopped().await;
    s.stop().await;
}

fn system_tests_bad_frames(s: &System) -> u64 {
    s.receiver.counters.bad_frames.get()
}

/// The test plays the device itself: it reads the address HELLO and the
/// COMMAND, then answers with garbage, a truncated frame and the real RESULT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_a_truncated_frame_on_the_line_are_skipped() {
    let mut socat = Socat::new();
    let ids = ids("hand-", 1);
    let s = start(&mut socat, &ids).await;
    let port = tokio_serial::new(socat.dev().to_string_lossy(), 115_200).open_native_async().unwrap();
    let mut line = Framed::new(port, FrameCodec::default());
    line.send(Frame::Hello { device_id: ids[0].parse().unwrap() }).await.unwrap();
    let command = send_async(&s, &ids[0], json!({"name": "echo", "payload": {"x": 1}})).await;
    assert_eq!(
        next_frame(&mut line).await,
        Ok(Frame::Hello { device_id: ids[0].parse().unwrap() }),
        "address frame"
    );
    let Ok(Frame::Command { id, name, payload }) = next_frame(&mut line).await else { panic!("a COMMAND") };
    assert_eq!((id.to_string(), name.as_str()), (command.clone(), "echo"));
    let before = system_tests_bad_frames(&s);
    let mut bytes = BytesMut::from(&b"\x00\xff line noise \xa5"[..]);
    // A frame cut short: its header promises 104 body bytes that never come.
    let mut long = BytesMut::new();
    let big = Frame::Result { id, code: 0, payload: vec![b'z'; 100].into() };
    encode(&big, &mut long, DEFAULT_MAX_BODY).unwrap();
    bytes.extend_from_slice(&long[..30]);
    encode(&Frame::Result { id, code: 0, payload }, &mut bytes, DEFAULT_MAX_BODY).unwrap();
    let port = line.get_mut();
    port.write_all(&bytes).await.unwrap();
    port.flush().await.unwrap();
    let cmd = s.final_state(&command).await;
    assert_eq!(cmd["status"], "succeeded", "{cmd}");
    assert_eq!(cmd["result"]["payload"], json!({"x": 1}));
    assert_eq!(cmd["attempts"], 1, "answered on the first write, despite the junk before it");
    assert!(system_tests_bad_frames(&s) >= before + 2, "garbage and the cut frame were counted");
    s.stop().await;
}

async fn next_frame(
    line: &mut Framed<tokio_serial::SerialStream, FrameCodec>,
) -> Result<Frame, protocol::FrameError> {
    let item = tokio::time::timeout(Duration::from_secs(20), line.next()).await;
    item.expect("a frame in time").expect("line open").expect("readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_port_takes_its_devices_offline_until_it_is_back() {
    let mut socat = Socat::new();
    let ids = ids("gone-", 2);
    let s = start(&mut socat, &ids).await;
    let (bus, stop) = start_bus(&socat, "gone-", 2, SerialConfig::new("")).await;
    let (status, cmd) = s.send(&ids[0], json!({"name": "before"})).await;
    assert_eq!((status, cmd["status"].as_str()), (200, Some("succeeded")), "{cmd}");

    socat.kill().await;
    for id in &ids {
        eventually("device offline", || async { !s.device_online(id).await }).await;
    }
    let meanwhile: Vec<String> = {
        let mut sent = Vec::new();
        for id in &ids {
            sent.push(send_async(&s, id, json!({"name": "meanwhile", "payload": {"device": id}})).await);
        }
        sent
    };

    socat.restart().await;
    for id in &ids {
        eventually("device back online", || s.device_online(id)).await;
    }
    for command in &meanwhile {
        let cmd = s.final_state(command).await;
        assert_eq!(cmd["status"], "succeeded", "{cmd}");
    }
    let stats = bus.stats();
    assert!(stats.line.unwrap().opens >= 2, "the bus reopened its line");
    assert_eq!(stats.totals.executed_ids_repeated, 0);
    assert_eq!(stats.totals.executed, 3);
    stop.cancel();
    bus.stopped().await;
    s.stop().await;
}
