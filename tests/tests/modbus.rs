//! Modbus devices end to end: gateway HTTP API → broker → receiver → a Modbus
//! server that is not ours (pymodbus 3.x, `tests/modbus_server.py`), over TCP
//! and over RTU on a pseudo-terminal pair made by socat.
//!
//! pymodbus comes from PyPI (`scripts/python-deps.sh`). Without it (or without
//! socat) these tests are skipped with a message, and fail when CI=true.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use system_tests::procs::{within, Proc};
use system_tests::{eventually, free_port, mqtt_client, Db, Spec, System};

const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/modbus_server.py");
/// Probe often, so a dead server is noticed within about a second; the
/// request timeout stays at its default (1 s), lenient on a loaded machine.
const OPTIONS: &str = "probe_ms=200";

/// Whether the external tools are here; skips (or fails in CI) with a message otherwise.
fn tools_present(socat: bool) -> bool {
    let pymodbus = Command::new("python3")
        .args(["-c", "import pymodbus, serial; assert pymodbus.__version__.startswith('3.')"])
        .output()
        .is_ok_and(|o| o.status.success());
    let socat_ok = !socat || Command::new("socat").arg("-V").output().is_ok_and(|o| o.status.success());
    if pymodbus && socat_ok {
        return true;
    }
    let missing = if pymodbus { "socat" } else { "pymodbus[serial] 3.x for python3" };
    let message = format!("{missing} is not installed; run scripts/python-deps.sh");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message} (required in CI)");
    eprintln!("SKIPPED: {message}; set CI=true to make this fatal");
    false
}

/// A pymodbus TCP server on a free port, serving `units`.
fn tcp_server(dir: &Path, units: &[u8]) -> (Proc, u16) {
    let port = free_port().port();
    let mut args = vec![SERVER.to_owned(), "tcp".into(), port.to_string()];
    args.extend(units.iter().flat_map(|u| ["--unit".to_owned(), u.to_string()]));
    (Proc::start("pymodbus-tcp", Path::new("python3"), &args, dir), port)
}

/// A system with no simulated fleet and the given `--modbus` specs.
async fn system(db: Db, specs: Vec<String>) -> Option<System> {
    let mut spec = Spec::new(db);
    spec.devices = 0;
    spec.receiver_tune = Box::new(move |c| c.modbus.extend(specs));
    System::start(spec).await
}

async fn online(s: &System, id: &str) {
    s.register(id).await;
    eventually(&format!("{id} online"), || s.device_online(id)).await;
}

/// Sends a sync command and returns the final command object.
async fn run(s: &System, device: &str, name: &str, payload: Value) -> Value {
    let (status, cmd) = s.send(device, json!({"name": name, "payload": payload, "wait_ms": 15000})).await;
    assert_eq!(status, 200, "{name} {payload}: {cmd}");
    cmd
}

/// Sends a sync command that must succeed; returns its result payload.
async fn ok(s: &System, device: &str, name: &str, payload: Value) -> Value {
    let cmd = run(s, device, name, payload.clone()).await;
    assert_eq!(
        (cmd["status"].as_str(), cmd["result"]["code"].as_i64()),
        (Some("succeeded"), Some(0)),
        "{cmd}"
    );
    cmd["result"]["payload"].clone()
}

async fn read(s: &System, device: &str, name: &str, address: u16, count: u16) -> Value {
    ok(s, device, name, json!({"address": address, "count": count})).await["values"].clone()
}

/// Reads, writes and reads back every kind of data the mapping offers.
async fn reads_and_writes(s: &System, dev: &str) {
    assert_eq!(read(s, dev, "read_holding_registers", 0, 3).await, json!([100, 101, 102]));
    assert_eq!(read(s, dev, "read_input_registers", 30, 2).await, json!([1030, 1031]));
    assert_eq!(read(s, dev, "read_coils", 0, 5).await, json!([true, false, false, true, false]));
    assert_eq!(read(s, dev, "read_discrete_inputs", 1, 3).await, json!([false, true, false]));
    let written = ok(s, dev, "write_single_register", json!({"address": 5, "value": 4242})).await;
    assert_eq!(written, json!({"ok": true}));
    assert_eq!(read(s, dev, "read_holding_registers", 4, 3).await, json!([104, 4242, 106]));
    ok(s, dev, "write_multiple_registers", json!({"address": 97, "values": [1, 65535, 3]})).await;
    assert_eq!(read(s, dev, "read_holding_registers", 96, 4).await, json!([196, 1, 65535, 3]));
    ok(s, dev, "write_single_coil", json!({"address": 1, "value": true})).await;
    ok(s, dev, "write_multiple_coils", json!({"address": 3, "values": [false, true]})).await;
    assert_eq!(read(s, dev, "read_coils", 0, 6).await, json!([true, true, false, false, true, false]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_device_reads_writes_and_reports_errors() {
    if !tools_present(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = tcp_server(dir.path(), &[1]);
    let Some(s) = system(Db::Sqlite, vec![format!("meter-1=tcp://127.0.0.1:{port}/1?{OPTIONS}")]).await
    else {
        return;
    };
    online(&s, "meter-1").await;
    reads_and_writes(&s, "meter-1").await;

    // Events: the usual path, `delivered` included.
    let cmd = run(&s, "meter-1", "read_holding_registers", json!({"address": 0, "count": 1})).await;
    let events = s.events(cmd["id"].as_str().unwrap()).await;
    let to: Vec<&str> = events.iter().map(|(_, to)| to.as_str()).collect();
    assert_eq!(to, ["pending", "sent", "delivered", "succeeded"]);

    // A Modbus exception: its code, and its name in the payload.
    let cmd = run(&s, "meter-1", "read_holding_registers", json!({"address": 99, "count": 2})).await;
    assert_eq!(
        (cmd["status"].as_str(), cmd["error"]["kind"].as_str()),
        (Some("failed"), Some("device_error"))
    );
    assert_eq!(cmd["result"]["code"], 2);
    assert_eq!(cmd["result"]["payload"], json!({"exception": "IllegalDataAddress"}));

    // Commands that cannot become a Modbus request: answered by the receiver, never sent.
    let cmd = run(&s, "meter-1", "reboot", json!(null)).await;
    assert_eq!((cmd["status"].as_str(), cmd["result"]["code"].as_i64()), (Some("failed"), Some(404)));
    assert!(cmd["result"]["payload"]["error"].as_str().unwrap().contains("unknown command"), "{cmd}");
    let cmd = run(&s, "meter-1", "write_single_register", json!({"address": 1, "value": 70000})).await;
    assert_eq!(cmd["result"]["code"], 400, "{cmd}");
    let (status, cmd) =
        s.send("meter-1", json!({"name": "read_coils", "payload_base64": "AAEC", "wait_ms": 15000})).await;
    assert_eq!((status, cmd["result"]["code"].as_i64()), (200, Some(400)), "{cmd}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_server_killed_goes_offline_and_comes_back() {
    if !tools_present(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut server, port) = tcp_server(dir.path(), &[1]);
    let Some(s) = system(Db::Sqlite, vec![format!("plc-1=tcp://127.0.0.1:{port}/1?{OPTIONS}")]).await else {
        return;
    };
    online(&s, "plc-1").await;
    ok(&s, "plc-1", "write_single_register", json!({"address": 0, "value": 7})).await;

    server.kill9();
    eventually("plc-1 offline after the server died", || async { !s.device_online("plc-1").await }).await;
    // A command sent meanwhile waits for the device.
    let (status, queued) = s
        .send(
            "plc-1",
            json!({"name": "read_holding_registers", "payload": {"address": 0, "count": 2}, "mode": "async"}),
        )
        .await;
    assert_eq!((status, queued["status"].as_str()), (202, Some("pending")), "{queued}");

    server.restart();
    eventually("plc-1 online after the restart", || s.device_online("plc-1")).await;
    let id = queued["id"].as_str().unwrap();
    let (_, done) = s.get(&format!("/v1/commands/{id}?wait_ms=20000")).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // A fresh server: its datastore starts from the known values again.
    assert_eq!(done["result"]["payload"]["values"], json!([100, 101]));
    assert_eq!(read(&s, "plc-1", "read_coils", 0, 2).await, json!([true, false]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_command_is_answered_from_memory_not_run_again() {
    if !tools_present(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = tcp_server(dir.path(), &[1]);
    let Some(s) = system(Db::Sqlite, vec![format!("m-1=tcp://127.0.0.1:{port}/1?{OPTIONS}")]).await else {
        return;
    };
    online(&s, "m-1").await;
    // Publish one command twice, as the gateway does when a result went missing.
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let msg = protocol::envelope::CommandMessage {
        id: uuid::Uuid::now_v7(),
        device_id: "m-1".parse().unwrap(),
        name: "write_single_register".into(),
        payload_base64: br#"{"address":2,"value":99}"#.to_vec(),
        attempt: 1,
        expires_at_ms: (time::OffsetDateTime::now_utc().unix_timestamp() + 60) * 1000,
        reports_to: None,
    };
    let topic =
        protocol::Topics::new(s.topic_prefix.clone()).receiver_commands(s.receiver.bridge.receiver_id());
    let counters = &s.receiver.counters;
    let get = |c: &plumbing::metrics::Counter| c.get();
    let (written, results) = (get(&counters.commands_written), get(&counters.results_forwarded));
    for attempt in 1..=2 {
        let body =
            serde_json::to_vec(&protocol::envelope::CommandMessage { attempt, ..msg.clone() }).unwrap();
        client.publish(topic.clone(), rumqttc::QoS::AtLeastOnce, false, body).await.unwrap();
    }
    eventually("two results", || async { get(&counters.results_forwarded) == results + 2 }).await;
    assert_eq!(get(&counters.commands_written), written + 1, "the repeat was not sent to the device");
    assert_eq!(read(&s, "m-1", "read_holding_registers", 2, 1).await, json!([99]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_device_on_mariadb() {
    if !tools_present(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = tcp_server(dir.path(), &[1]);
    let Some(s) = system(Db::Mysql, vec![format!("meter-9=tcp://127.0.0.1:{port}/1?{OPTIONS}")]).await else {
        return;
    };
    online(&s, "meter-9").await;
    reads_and_writes(&s, "meter-9").await;
    s.stop().await;
}

/// A socat pseudo-terminal pair: the server opens `server`, the receiver `receiver`.
struct PtyPair {
    proc: Proc,
    server: PathBuf,
    receiver: PathBuf,
}

impl PtyPair {
    async fn start(dir: &Path) -> PtyPair {
        let (server, receiver) = (dir.join("pty-server"), dir.join("pty-receiver"));
        let end = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let proc = Proc::start("socat", Path::new("socat"), &[end(&server), end(&receiver)], dir);
        let pair = PtyPair { proc, server, receiver };
        pair.wait().await;
        pair
    }

    async fn wait(&self) {
        within("socat's pty links", Duration::from_secs(10), || async {
            self.server.exists() && self.receiver.exists()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_devices_share_one_serial_port() {
    if !tools_present(true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut pty = PtyPair::start(dir.path()).await;
    let server_args = |pty: &PtyPair| {
        let path = pty.server.display().to_string();
        vec![SERVER.to_owned(), "rtu".into(), path, "--unit".into(), "3".into(), "--unit".into(), "4".into()]
    };
    let mut server = Proc::start("pymodbus-rtu", Path::new("python3"), &server_args(&pty), dir.path());
    let line = format!("rtu://{}:19200,8N1", pty.receiver.display());
    let specs = vec![format!("pump-3={line}/3?{OPTIONS}"), format!("pump-4={line}/4?{OPTIONS}")];
    let Some(s) = system(Db::Sqlite, specs).await else { return };
    online(&s, "pump-3").await;
    online(&s, "pump-4").await;
    reads_and_writes(&s, "pump-3").await;
    // Unit 4 has a datastore of its own: unit 3's writes did not touch it.
    assert_eq!(read(&s, "pump-4", "read_holding_registers", 4, 3).await, json!([104, 105, 106]));

    // Both devices at once, several commands each: one bus, every one answered.
    let mut ids = Vec::new();
    for i in 0..8u16 {
        let dev = if i % 2 == 0 { "pump-3" } else { "pump-4" };
        let payload = json!({"address": 20 + i, "value": 500 + i});
        let (_, c) =
            s.send(dev, json!({"name": "write_single_register", "payload": payload, "mode": "async"})).await;
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        assert_eq!(s.final_state(id).await["status"], "succeeded");
    }
    assert_eq!(read(&s, "pump-3", "read_holding_registers", 20, 4).await, json!([500, 121, 502, 123]));
    assert_eq!(read(&s, "pump-4", "read_holding_registers", 20, 4).await, json!([120, 501, 122, 503]));
    let cmd = run(&s, "pump-4", "read_coils", json!({"address": 64, "count": 1})).await;
    assert_eq!(cmd["result"]["code"], 2, "{cmd}");

    // The server goes away: no answers, both devices offline. Back: online again.
    server.kill9();
    eventually("pump-3 offline", || async { !s.device_online("pump-3").await }).await;
    eventually("pump-4 offline", || async { !s.device_online("pump-4").await }).await;
    if !pty.proc.is_running() {
        // socat ends when the server's side of the pair closes; a new pair, same paths.
        pty.proc.restart();
        pty.wait().await;
    }
    server.restart();
    eventually("pump-3 online again", || s.device_online("pump-3")).await;
    eventually("pump-4 online again", || s.device_online("pump-4")).await;
    assert_eq!(read(&s, "pump-4", "read_input_registers", 0, 2).await, json!([1000, 1001]));
    s.stop().await;
}
