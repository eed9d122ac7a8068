//! Modbus transport faults, end to end: gateway HTTP API → broker → receiver
//! → a small fake Modbus server of ours that misbehaves the way field devices
//! do (pymodbus cannot): it closes the connection after each answer or when
//! idle, answers late, twice, partially, or out of turn (another transaction,
//! unit or function), and on a serial line (RTU over a socat pty pair) answers
//! late, from the wrong unit or with a bad CRC.
//!
//! What a Modbus master must do about each is in docs/PROTOCOL.md (Modbus
//! transport conditions); these tests hold the receiver to it: every command
//! ends with its own right answer, a write reaches the device once per
//! command, and `delivered` is reported only for a request that was written.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use system_tests::procs::{binaries, within, Proc};
use system_tests::{eventually, Db, Spec, System};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Registers from this address on are the tests' targets; below it the
/// receiver's probes (holding register 0) are answered normally.
const TARGET: u16 = 10;
/// Holding registers of every fake: register `a` holds `100 + a` until written.
const REGISTERS: u16 = 100;

/// How a fake misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Closes the connection right after each answer (every request, probes too).
    CloseAfterAnswer,
    /// Closes a connection that has been idle this long.
    CloseWhenIdle(Duration),
    /// Answers the first target request this late (after the receiver's timeout).
    Late(Duration),
    /// Answers the first target request twice.
    Twice,
    /// Answers the first target request first with another transaction id and
    /// wrong values, then rightly.
    WrongTransactionFirst,
    /// Likewise from another unit id.
    WrongUnitFirst,
    /// Likewise with another function code.
    WrongFunctionFirst,
    /// Sends the first 5 bytes of the answer to the first target request, then
    /// goes silent on that connection.
    PartialThenSilent,
}

/// What a fake saw.
#[derive(Debug, Default)]
struct Seen {
    registers: Vec<u16>,
    /// Every write: (address, value), in order of arrival.
    writes: Vec<(u16, u16)>,
    connections: usize,
    closed_by_us: usize,
    /// Target requests the fault has been applied to.
    faulted: usize,
}

/// A fake Modbus TCP server (unit ids: any; it echoes the request's).
struct FakeTcp {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl FakeTcp {
    async fn start(fault: Fault) -> FakeTcp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen {
            registers: (0..REGISTERS).map(|a| 100 + a).collect(),
            ..Seen::default()
        }));
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.lock().unwrap().connections += 1;
                tokio::spawn(serve_tcp(stream, fault, shared.clone()));
            }
        });
        FakeTcp { addr, seen }
    }

    fn spec(&self, device: &str, options: &str) -> String {
        format!("{device}=tcp://{}/1?{options}", self.addr)
    }

    /// How often `value` was written to `address`.
    fn writes_of(&self, address: u16, value: u16) -> usize {
        self.seen.lock().unwrap().writes.iter().filter(|w| **w == (address, value)).count()
    }
}

/// One connection of a [`FakeTcp`].
async fn serve_tcp(stream: tokio::net::TcpStream, fault: Fault, seen: Arc<Mutex<Seen>>) {
    let (mut rx, tx) = stream.into_split();
    let tx = Arc::new(tokio::sync::Mutex::new(tx));
    loop {
        let mut header = [0u8; 7];
        let read = rx.read_exact(&mut header);
        let read = match fault {
            Fault::CloseWhenIdle(idle) => match tokio::time::timeout(idle, read).await {
                Ok(r) => r,
                Err(_) => {
                    seen.lock().unwrap().closed_by_us += 1;
                    return;
                }
            },
            _ => read.await,
        };
        if read.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let mut pdu = vec![0u8; len.saturating_sub(1)];
        if len == 0 || rx.read_exact(&mut pdu).await.is_err() {
            return;
        }
        let (tid, unit) = (u16::from_be_bytes([header[0], header[1]]), header[6]);
        let (answer, address) = answer_pdu(&pdu, &mut seen.lock().unwrap());
        let adu = |tid: u16, unit: u8, pdu: &[u8]| {
            let mut adu = tid.to_be_bytes().to_vec();
            adu.extend([0, 0]);
            adu.extend(u16::try_from(pdu.len() + 1).unwrap().to_be_bytes());
            adu.push(unit);
            adu.extend(pdu);
            adu
        };
        let right = adu(tid, unit, &answer);
        let faulted = address >= TARGET && {
            let mut s = seen.lock().unwrap();
            s.faulted += 1;
            s.faulted == 1
        };
        let mut out = Vec::new();
        match fault {
            Fault::CloseAfterAnswer => {
                let _ = tx.lock().await.write_all(&right).await;
                seen.lock().unwrap().closed_by_us += 1;
                return;
            }
            Fault::Late(delay) if faulted => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.lock().await.write_all(&right).await;
                });
                continue;
            }
            Fault::Twice if faulted => out.extend([right.clone(), right]),
            Fault::WrongTransactionFirst if faulted => {
                out.extend([adu(tid.wrapping_add(7), unit, &wrong(&answer)), right]);
            }
            Fault::WrongUnitFirst if faulted => {
                out.extend([adu(tid, unit.wrapping_add(1), &wrong(&answer)), right]);
            }
            Fault::WrongFunctionFirst if faulted => {
                let mut other = wrong(&answer);
                other[0] = if other[0] == 3 { 4 } else { 3 };
                out.extend([adu(tid, unit, &other), right]);
            }
            Fault::PartialThenSilent if faulted => {
                let _ = tx.lock().await.write_all(&right[..5]).await;
                // Silent on this connection: read whatever comes until the peer closes.
                let mut sink = [0u8; 256];
                while rx.read(&mut sink).await.is_ok_and(|n| n > 0) {}
                return;
            }
            _ => out.push(right),
        }
        if write_all(&tx, &out).await.is_err() {
            return;
        }
    }
}

async fn write_all(tx: &tokio::sync::Mutex<OwnedWriteHalf>, frames: &[Vec<u8>]) -> std::io::Result<()> {
    let mut tx = tx.lock().await;
    for frame in frames {
        tx.write_all(frame).await?;
    }
    Ok(())
}

/// The same answer with every register value replaced by 9999 (a read), so a
/// mix-up shows in the result.
fn wrong(answer: &[u8]) -> Vec<u8> {
    let mut other = answer.to_vec();
    if other[0] == 3 {
        for word in other[2..].chunks_mut(2) {
            word.copy_from_slice(&9999u16.to_be_bytes());
        }
    }
    other
}

/// The answer PDU to a request PDU (read holding registers, write single
/// register; anything else or out of range: an exception), and the address.
fn answer_pdu(pdu: &[u8], seen: &mut Seen) -> (Vec<u8>, u16) {
    let function = pdu[0];
    let word = |i: usize| u16::from_be_bytes([pdu[i], pdu[i + 1]]);
    let address = if pdu.len() >= 5 { word(1) } else { 0 };
    match function {
        3 if pdu.len() == 5 && address + word(3) <= REGISTERS && word(3) > 0 => {
            let count = word(3);
            let mut out = vec![3, u8::try_from(count * 2).unwrap()];
            for a in address..address + count {
                out.extend(seen.registers[usize::from(a)].to_be_bytes());
            }
            (out, address)
        }
        6 if pdu.len() == 5 && address < REGISTERS => {
            seen.registers[usize::from(address)] = word(3);
            seen.writes.push((address, word(3)));
            (pdu.to_vec(), address)
        }
        _ => (vec![function | 0x80, 2], address),
    }
}

/// A system with no simulated fleet and these `--modbus` specs; with
/// `real_result_timeout` the gateway waits the default 15 s for a result
/// before re-sending (so a re-send cannot hide a receiver that waits for it).
async fn system(specs: Vec<String>, real_result_timeout: bool) -> System {
    let mut spec = Spec::new(Db::Sqlite);
    spec.devices = 0;
    if real_result_timeout {
        spec.tune = |c| c.result_timeout_ms = 15_000;
    }
    spec.receiver_tune = Box::new(move |c| c.modbus.extend(specs));
    System::start(spec).await.expect("a system on SQLite")
}

async fn online(s: &System, id: &str) {
    s.register(id).await;
    eventually(&format!("{id} online"), || s.device_online(id)).await;
}

/// Submits an async command; returns its id.
async fn submit(s: &System, device: &str, name: &str, payload: Value) -> String {
    let (status, cmd) = s.send(device, json!({"name": name, "payload": payload, "mode": "async"})).await;
    assert_eq!(status, 202, "{cmd}");
    cmd["id"].as_str().unwrap().to_owned()
}

/// Runs a read of one holding register to its end; returns the final command.
async fn read_one(s: &System, device: &str, address: u16) -> Value {
    let id = submit(s, device, "read_holding_registers", json!({"address": address, "count": 1})).await;
    s.final_state(&id).await
}

/// Two reads submitted together — the first one meets the fault — then a
/// third: each ends with its own register's value, never another's.
async fn two_reads_then_one(s: &System, device: &str) {
    let first = submit(s, device, "read_holding_registers", json!({"address": 10, "count": 1})).await;
    let second = submit(s, device, "read_holding_registers", json!({"address": 11, "count": 1})).await;
    assert_values(&s.final_state(&first).await, json!([110]));
    assert_values(&s.final_state(&second).await, json!([111]));
    assert_values(&read_one(s, device, 13).await, json!([113]));
}

fn assert_values(cmd: &Value, values: Value) {
    assert_eq!(
        (cmd["status"].as_str(), &cmd["result"]["payload"]["values"]),
        (Some("succeeded"), &values),
        "{cmd}"
    );
}

/// Six writes 0.3 s apart to a device that closes the connection after each
/// answer: each succeeds promptly, reaches the device once, and is reported
/// `delivered` once (only the request that was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_server_closing_after_each_answer() {
    let fake = FakeTcp::start(Fault::CloseAfterAnswer).await;
    let s = system(vec![fake.spec("closer-1", "")], true).await;
    online(&s, "closer-1").await;
    let mut sent = Vec::new();
    for i in 0..6u16 {
        let payload = json!({"address": 20 + i, "value": 700 + i});
        sent.push((i, submit(&s, "closer-1", "write_single_register", payload).await));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut took = Vec::new();
    for (i, id) in &sent {
        let cmd = s.final_state(id).await;
        assert_eq!(cmd["status"], "succeeded", "write {i}: {cmd}");
        let events = s.events(id).await;
        let to: Vec<&str> = events.iter().map(|(_, to)| to.as_str()).collect();
        assert_eq!(to, ["pending", "sent", "delivered", "succeeded"], "write {i}");
        assert_eq!(fake.writes_of(20 + i, 700 + i), 1, "write {i} reached the device once");
        took.push(time_to_final(&cmd));
    }
    eprintln!("six writes to a server closing after each answer, creation to completion: {took:?}");
    // Well under the gateway's 15 s result timeout: no write waited for a re-send.
    assert!(took.iter().all(|t| *t < Duration::from_secs(5)), "{took:?}");
    s.stop().await;
}

/// A command's time from creation to completion, by the gateway's clock.
fn time_to_final(cmd: &Value) -> Duration {
    let at = |field: &str| {
        let text = cmd[field].as_str().unwrap_or_else(|| panic!("{field} in {cmd}"));
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    };
    (at("completed_at") - at("created_at")).try_into().unwrap()
}

/// A device that closes an idle connection before the next probe: a write
/// after that goes out on a fresh connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_server_closing_when_idle() {
    let fake = FakeTcp::start(Fault::CloseWhenIdle(Duration::from_millis(600))).await;
    let s = system(vec![fake.spec("idle-1", "probe_ms=10000")], true).await;
    online(&s, "idle-1").await;
    for round in 0..2u16 {
        let closed = fake.seen.lock().unwrap().closed_by_us;
        within("the device closes the idle connection", Duration::from_secs(10), || async {
            fake.seen.lock().unwrap().closed_by_us > closed
        })
        .await;
        let at = Instant::now();
        let id =
            submit(&s, "idle-1", "write_single_register", json!({"address": 30 + round, "value": 5})).await;
        let cmd = s.final_state(&id).await;
        assert_eq!(cmd["status"], "succeeded", "{cmd}");
        assert!(at.elapsed() < Duration::from_secs(5), "round {round} took {:?}", at.elapsed());
        assert_eq!(fake.writes_of(30 + round, 5), 1);
    }
    s.stop().await;
}

/// Answers out of turn — another transaction, another unit, another
/// function, or the same answer twice — are discarded: each command gets its
/// own right answer, never another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_answers_out_of_turn_are_discarded() {
    let faults = [
        ("tid-1", Fault::WrongTransactionFirst),
        ("unit-1", Fault::WrongUnitFirst),
        ("func-1", Fault::WrongFunctionFirst),
        ("twice-1", Fault::Twice),
    ];
    let mut fakes = HashMap::new();
    for (device, fault) in faults {
        fakes.insert(device, FakeTcp::start(fault).await);
    }
    let specs = fakes.iter().map(|(device, fake)| fake.spec(device, "probe_ms=10000")).collect();
    let s = system(specs, true).await;
    for (device, _) in faults {
        online(&s, device).await;
    }
    for (device, _) in faults {
        let at = Instant::now();
        assert_values(&read_one(&s, device, 10).await, json!([110]));
        assert_values(&read_one(&s, device, 11).await, json!([111]));
        let id = submit(&s, device, "write_single_register", json!({"address": 12, "value": 4})).await;
        assert_eq!(s.final_state(&id).await["status"], "succeeded");
        assert_values(&read_one(&s, device, 12).await, json!([4]));
        assert!(at.elapsed() < Duration::from_secs(10), "{device}: {:?}", at.elapsed());
        assert_eq!(fakes[device].writes_of(12, 4), 1, "{device}");
    }
    s.stop().await;
}

/// A late answer (after the request timeout) and a partial answer followed by
/// silence: the request times out, the receiver reconnects, the late answer is
/// never taken for a later request's, and the device works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_late_and_partial_answers() {
    let late = FakeTcp::start(Fault::Late(Duration::from_millis(800))).await;
    let partial = FakeTcp::start(Fault::PartialThenSilent).await;
    let options = "timeout_ms=300&probe_ms=200";
    let s = system(vec![late.spec("late-1", options), partial.spec("partial-1", options)], false).await;
    for device in ["late-1", "partial-1"] {
        online(&s, device).await;
        two_reads_then_one(&s, device).await;
    }
    assert!(partial.seen.lock().unwrap().connections >= 2, "the receiver reconnected");
    s.stop().await;
}

/// A bad `--modbus` spec stops the receiver before it connects to MQTT: a
/// non-zero exit naming the spec, and no connection to the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spec_fails_before_mqtt() {
    let broker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    broker.set_nonblocking(true).unwrap();
    let broker_url = format!("mqtt://{}", broker.local_addr().unwrap());
    for bad in ["m=tcp://127.0.0.1/1", "a=tcp://127.0.0.1:502/1;a=tcp://127.0.0.1:503/1"] {
        let output = Command::new(&binaries().receiver)
            .args(["--broker", &broker_url, "--tcp-listen", "127.0.0.1:0"])
            .env("RECEIVER_MODBUS", bad)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!output.status.success(), "{bad}: {text}");
        assert!(text.contains("--modbus"), "{bad}: the error names the option: {text}");
        assert!(!text.to_lowercase().contains("mqtt connection"), "{bad}: {text}");
        assert!(broker.accept().is_err(), "{bad}: the receiver connected to the broker: {text}");
    }
    let first = "m=tcp://127.0.0.1/1";
    let output = Command::new(&binaries().receiver)
        .args(["--broker", &broker_url, "--tcp-listen", "127.0.0.1:0", "--modbus", first])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("bad --modbus spec {first:?}")), "{stderr}");
}

/// A socat pseudo-terminal pair: the fake opens `device`, the receiver `receiver`.
struct PtyPair {
    _proc: Proc,
    device: PathBuf,
    receiver: PathBuf,
}

impl PtyPair {
    async fn start(dir: &Path) -> Option<PtyPair> {
        if !Command::new("socat").arg("-V").output().is_ok_and(|o| o.status.success()) {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "socat is required in CI");
            eprintln!("SKIPPED: socat is not installed; run scripts/python-deps.sh");
            return None;
        }
        let (device, receiver) = (dir.join("pty-device"), dir.join("pty-receiver"));
        let end = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let proc = Proc::start("socat", Path::new("socat"), &[end(&device), end(&receiver)], dir);
        within("socat's pty links", Duration::from_secs(10), || async {
            device.exists() && receiver.exists()
        })
        .await;
        Some(PtyPair { _proc: proc, device, receiver })
    }
}

/// How a fake RTU device misbehaves on its first target request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RtuFault {
    /// Answers after this delay (after the receiver's timeout).
    Late(Duration),
    /// Answers with a corrupted CRC (and nothing else).
    BadCrc,
    /// First a frame from another unit (with wrong values), then rightly.
    WrongUnitFirst,
    /// Garbage bytes, then the right answer.
    NoiseFirst,
}

/// CRC-16/MODBUS, low byte first on the wire.
fn crc16(data: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0xFFFF;
    for byte in data {
        crc ^= u16::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xA001 } else { crc >> 1 };
        }
    }
    crc.to_le_bytes()
}

fn rtu_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = vec![unit];
    frame.extend(pdu);
    let crc = crc16(&frame);
    frame.extend(crc);
    frame
}

/// A fake RTU device (unit 5) on `path`; requests are all 8 bytes (functions 3 and 6).
fn fake_rtu(path: &Path, fault: RtuFault) -> Arc<Mutex<Seen>> {
    use tokio_serial::SerialPortBuilderExt;
    let mut port = tokio_serial::new(path.to_string_lossy(), 19200).open_native_async().unwrap();
    let seen = Arc::new(Mutex::new(Seen {
        registers: (0..REGISTERS).map(|a| 100 + a).collect(),
        ..Seen::default()
    }));
    let shared = seen.clone();
    tokio::spawn(async move {
        let mut frame = [0u8; 8];
        while port.read_exact(&mut frame).await.is_ok() {
            if frame[0] != 5 || crc16(&frame[..6]) != frame[6..] {
                // Not for us or garbled: resynchronise on silence.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let mut sink = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_millis(10), port.read(&mut sink)).await;
                continue;
            }
            let (answer, address) = answer_pdu(&frame[1..6], &mut shared.lock().unwrap());
            let right = rtu_frame(5, &answer);
            let faulted = address >= TARGET && {
                let mut s = shared.lock().unwrap();
                s.faulted += 1;
                s.faulted == 1
            };
            let out = match fault {
                RtuFault::Late(delay) if faulted => {
                    tokio::time::sleep(delay).await;
                    right
                }
                RtuFault::BadCrc if faulted => {
                    let mut bad = right;
                    let last = bad.len() - 1;
                    bad[last] ^= 0xFF;
                    bad
                }
                RtuFault::WrongUnitFirst if faulted => {
                    let mut out = rtu_frame(6, &wrong(&answer));
                    out.extend(right);
                    out
                }
                RtuFault::NoiseFirst if faulted => {
                    let mut out = vec![0x00, 0xFF, 0x05];
                    out.extend(right);
                    out
                }
                _ => right,
            };
            if port.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    seen
}

/// RTU: a late answer is not taken for the next request's, an answer from
/// another unit or after line noise is skipped, and an answer with a bad CRC
/// counts as no answer (the command is answered on a later attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_late_foreign_and_corrupt_answers() {
    let faults = [
        ("rtu-late", RtuFault::Late(Duration::from_millis(500))),
        ("rtu-crc", RtuFault::BadCrc),
        ("rtu-unit", RtuFault::WrongUnitFirst),
        ("rtu-noise", RtuFault::NoiseFirst),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (device, fault) in faults {
        let sub = dir.path().join(device);
        std::fs::create_dir(&sub).unwrap();
        let Some(pty) = PtyPair::start(&sub).await else { return };
        let _seen = fake_rtu(&pty.device, fault);
        let spec =
            format!("{device}=rtu://{}:19200,8N1/5?timeout_ms=300&probe_ms=200", pty.receiver.display());
        let s = system(vec![spec], false).await;
        online(&s, device).await;
        two_reads_then_one(&s, device).await;
        s.stop().await;
    }
}

#[test]
fn crc_of_a_known_frame() {
    // Read holding registers 0..1 from unit 1: 01 03 00 00 00 01 84 0A.
    assert_eq!(crc16(&[1, 3, 0, 0, 0, 1]), [0x84, 0x0A]);
}
