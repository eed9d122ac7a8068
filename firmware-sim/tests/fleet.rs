//! The fleet against a fake receiver: a plain TCP listener on port 0 speaking
//! the frame codec. Every wait is on a frame or a condition, with a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use firmware_sim::{DeviceStats, Fleet, FleetConfig, FleetStats};
use futures::{SinkExt, StreamExt};
use protocol::{Frame, FrameCodec};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(5);

type Conn = Framed<TcpStream, FrameCodec>;

/// A fake receiver and the fleet connected to it; the fleet stops on drop.
struct Harness {
    listener: TcpListener,
    fleet: Fleet,
    shutdown: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Harness {
    async fn start(configure: impl FnOnce(&mut FleetConfig)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config =
            FleetConfig { connect: vec![listener.local_addr().unwrap()], ..FleetConfig::default() };
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let fleet = Fleet::start(config, shutdown.clone());
        let _stop_on_drop = shutdown.clone().drop_guard();
        Self { listener, fleet, shutdown, _stop_on_drop }
    }

    /// Accepts the next device connection and returns it with its HELLO id.
    async fn accept(&self) -> (Conn, String) {
        let (stream, _) =
            tokio::time::timeout(WAIT, self.listener.accept()).await.expect("a device connects").unwrap();
        let mut conn = Framed::new(stream, FrameCodec::default());
        match next_frame(&mut conn).await {
            Frame::Hello { device_id } => (conn, device_id.to_string()),
            other => panic!("first frame must be HELLO, got {other:?}"),
        }
    }

    fn device(&self, id: &str) -> DeviceStats {
        self.fleet.stats().devices[id].clone()
    }
}

async fn next_frame(conn: &mut Conn) -> Frame {
    let item = tokio::time::timeout(WAIT, conn.next()).await.expect("a frame in time");
    item.expect("connection open").unwrap().expect("a valid frame")
}

async fn send_command(conn: &mut Conn, id: Uuid, name: &str, payload: &[u8]) {
    let frame = Frame::Command { id, name: name.to_owned(), payload: Bytes::copy_from_slice(payload) };
    conn.send(frame).await.unwrap();
}

/// The next frame, which must be the RESULT of `id`: (code, payload).
async fn expect_result(conn: &mut Conn, id: Uuid) -> (i32, Bytes) {
    match next_frame(conn).await {
        Frame::Result { id: got, code, payload } if got == id => (code, payload),
        other => panic!("expected RESULT for {id}, got {other:?}"),
    }
}

/// The device closes `conn` in time, without sending anything first.
async fn expect_closed(conn: &mut Conn) {
    let item = tokio::time::timeout(WAIT, conn.next()).await.expect("the device hangs up in time");
    if let Some(Ok(item)) = item {
        panic!("expected the connection to close, got {item:?}");
    }
}

/// The RESULT of `id` if it is the next frame, `None` if the connection
/// closes first.
async fn result_or_close(conn: &mut Conn, id: Uuid) -> Option<(i32, Bytes)> {
    let item = tokio::time::timeout(WAIT, conn.next()).await.expect("a frame or a close in time");
    match item {
        Some(Ok(Ok(Frame::Result { id: got, code, payload }))) if got == id => Some((code, payload)),
        None | Some(Err(_)) => None,
        Some(other) => panic!("expected RESULT for {id} or a close, got {other:?}"),
    }
}

/// What a gateway does: on each new connection send `id` again, until the
/// device answers before hanging up. A device answers a command it has read
/// before it can hang up, so every answer it gives is seen here.
async fn resend_until_answered(h: &Harness, id: Uuid, name: &str, payload: &[u8]) -> (i32, Bytes) {
    loop {
        let (mut conn, _) = h.accept().await;
        send_command(&mut conn, id, name, payload).await;
        if let Some(answer) = result_or_close(&mut conn, id).await {
            return answer;
        }
    }
}

/// Nothing arrives on `conn` for `quiet`: only for testing an absence.
async fn expect_silence(conn: &mut Conn, quiet: Duration) {
    if let Ok(item) = tokio::time::timeout(quiet, conn.next()).await {
        panic!("expected nothing for {quiet:?}, got {item:?}");
    }
}

/// PING, then the PONG. A device takes frames in order and decides on a
/// queued command before reading the next frame, so after the PONG every
/// command sent before it has been dropped or started.
async fn ping(conn: &mut Conn) {
    conn.send(Frame::Ping).await.unwrap();
    assert_eq!(next_frame(conn).await, Frame::Pong);
}

async fn call(conn: &mut Conn, name: &str, payload: &[u8]) -> (i32, Value) {
    let id = Uuid::now_v7();
    send_command(conn, id, name, payload).await;
    let (code, payload) = expect_result(conn, id).await;
    (code, serde_json::from_slice(&payload).unwrap())
}

#[tokio::test]
async fn devices_say_hello_with_their_ids_and_run_commands() {
    let h = Harness::start(|c| {
        c.devices = 2;
        c.id_start = 5;
    })
    .await;
    let (mut a, id_a) = h.accept().await;
    let (_b, id_b) = h.accept().await;
    let mut ids = [id_a.clone(), id_b];
    ids.sort();
    assert_eq!(ids, ["dev-0005", "dev-0006"]);
    assert_eq!(h.fleet.device_ids(), ["dev-0005", "dev-0006"]);

    let (code, body) = call(&mut a, "reboot", b"").await;
    assert_eq!(code, 0);
    assert_eq!(body, json!({"ok": true, "device": id_a, "command": "reboot"}));

    let id = Uuid::now_v7();
    send_command(&mut a, id, "echo", b"\x00raw\xff").await;
    assert_eq!(expect_result(&mut a, id).await, (0, Bytes::from_static(b"\x00raw\xff")));

    let stats = h.device(&id_a);
    assert_eq!((stats.received, stats.executed, stats.failed), (2, 2, 0));
    assert!(stats.connected);
    assert_eq!(h.fleet.stats().totals.executed, 2);
}

#[tokio::test]
async fn a_repeated_id_is_answered_again_but_not_executed() {
    let h = Harness::start(|_| {}).await;
    let (mut conn, device) = h.accept().await;
    let id = Uuid::now_v7();
    send_command(&mut conn, id, "configure", b"{}").await;
    let first = expect_result(&mut conn, id).await;
    send_command(&mut conn, id, "configure", b"{}").await;
    let second = expect_result(&mut conn, id).await;
    assert_eq!(first, second);

    let stats = h.device(&device);
    assert_eq!((stats.received, stats.executed, stats.duplicates), (1, 1, 1));
    assert_eq!(stats.executed_ids_repeated, 0);
}

#[tokio::test]
async fn a_repeat_arriving_during_execution_waits_for_the_answer_and_pings_are_not_held_up() {
    let h = Harness::start(|_| {}).await;
    let (mut conn, device) = h.accept().await;
    let id = Uuid::now_v7();
    let slow = br#"{"delay_ms":500}"#;
    send_command(&mut conn, id, "slow", slow).await;
    send_command(&mut conn, id, "slow", slow).await;
    conn.send(Frame::Ping).await.unwrap();
    assert_eq!(next_frame(&mut conn).await, Frame::Pong);
    let first = expect_result(&mut conn, id).await;
    assert_eq!(expect_result(&mut conn, id).await, first);
    let stats = h.device(&device);
    assert_eq!((stats.executed, stats.duplicates), (1, 1));
}

#[tokio::test]
async fn fail_answers_the_requested_code() {
    let h = Harness::start(|_| {}).await;
    let (mut conn, device) = h.accept().await;
    assert_eq!(call(&mut conn, "fail", b"").await, (2, json!({"error": "requested failure"})));
    assert_eq!(call(&mut conn, "fail", br#"{"code":7}"#).await.0, 7);
    let stats = h.device(&device);
    assert_eq!((stats.executed, stats.failed), (2, 2));
}

#[tokio::test]
async fn fail_ratio_one_fails_everything() {
    let h = Harness::start(|c| c.fail_ratio = 1.0).await;
    let (mut conn, _) = h.accept().await;
    assert_eq!(call(&mut conn, "echo", b"{}").await, (1, json!({"error": "simulated failure"})));
}

#[tokio::test]
async fn ping_gets_pong_and_garbage_is_counted_not_fatal() {
    let h = Harness::start(|_| {}).await;
    let (mut conn, device) = h.accept().await;
    conn.send(Frame::Ping).await.unwrap();
    assert_eq!(next_frame(&mut conn).await, Frame::Pong);

    conn.get_mut().write_all(b"this is not a frame").await.unwrap();
    let device_id = protocol::DeviceId::parse("confused-receiver").unwrap();
    conn.send(Frame::Hello { device_id }).await.unwrap();
    conn.send(Frame::Ping).await.unwrap();
    assert_eq!(next_frame(&mut conn).await, Frame::Pong);

    let stats = h.device(&device);
    assert!(stats.bad_frames >= 2, "garbage and an unexpected HELLO: {stats:?}");
    assert_eq!(stats.connects, 1, "the connection was kept");
}

#[tokio::test]
async fn duplicate_results_sends_each_result_twice() {
    let h = Harness::start(|c| c.duplicate_results = true).await;
    let (mut conn, device) = h.accept().await;
    let id = Uuid::now_v7();
    send_command(&mut conn, id, "reboot", b"").await;
    let first = expect_result(&mut conn, id).await;
    assert_eq!(expect_result(&mut conn, id).await, first);
    conn.send(Frame::Ping).await.unwrap();
    assert_eq!(next_frame(&mut conn).await, Frame::Pong, "no third RESULT");
    assert_eq!(h.device(&device).executed, 1);
}

#[tokio::test]
async fn memory_survives_a_reconnect() {
    let h = Harness::start(|_| {}).await;
    let (mut conn, device) = h.accept().await;
    let id = Uuid::now_v7();
    send_command(&mut conn, id, "reboot", b"").await;
    let first = expect_result(&mut conn, id).await;
    drop(conn);

    let (mut conn, again) = h.accept().await;
    assert_eq!(again, device);
    assert_eq!(h.device(&device).connects, 2);
    send_command(&mut conn, id, "reboot", b"").await;
    assert_eq!(expect_result(&mut conn, id).await, first);
    let stats = h.device(&device);
    assert_eq!((stats.executed, stats.duplicates, stats.executed_ids_repeated), (1, 1, 0));
}

/// Accepts the next device connection on `listener`: the connection and its HELLO id.
async fn accept_on(listener: &TcpListener) -> (Conn, String) {
    let (stream, _) =
        tokio::time::timeout(WAIT, listener.accept()).await.expect("a device connects").unwrap();
    let mut conn = Framed::new(stream, FrameCodec::default());
    match next_frame(&mut conn).await {
        Frame::Hello { device_id } => (conn, device_id.to_string()),
        other => panic!("first frame must be HELLO, got {other:?}"),
    }
}

#[tokio::test]
async fn a_device_moves_to_the_next_receiver_and_answers_a_repeat_there_from_memory() {
    let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = vec![first.local_addr().unwrap(), second.local_addr().unwrap()];
    let shutdown = CancellationToken::new();
    let _stop_on_drop = shutdown.clone().drop_guard();
    let fleet = Fleet::start(FleetConfig { connect, ..FleetConfig::default() }, shutdown.clone());

    let (mut conn, device) = accept_on(&first).await;
    let id = Uuid::now_v7();
    send_command(&mut conn, id, "reboot", b"").await;
    let answer = expect_result(&mut conn, id).await;
    // The first receiver closes the connection (its RESULT may never have
    // reached the gateway, which sends the command again).
    drop(conn);

    let (mut conn, again) = accept_on(&second).await;
    assert_eq!(again, device, "the same device says HELLO to the second receiver");
    send_command(&mut conn, id, "reboot", b"").await;
    assert_eq!(expect_result(&mut conn, id).await, answer, "answered from memory");
    let stats = fleet.stats().devices[&device].clone();
    assert_eq!((stats.connects, stats.executed, stats.duplicates, stats.executed_ids_repeated), (2, 1, 1, 0));

    // Round robin: when the second drops it, the device is back on the first.
    drop(conn);
    let (_conn, again) = accept_on(&first).await;
    assert_eq!(again, device);
}

#[tokio::test]
async fn a_receiver_that_refuses_connects_is_skipped_for_the_next() {
    // Bound but not listening: connects are refused (see the test below).
    let refusing = TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = vec![refusing.local_addr().unwrap(), listener.local_addr().unwrap()];
    let shutdown = CancellationToken::new();
    let _stop_on_drop = shutdown.clone().drop_guard();
    let fleet = Fleet::start(FleetConfig { connect, devices: 2, ..FleetConfig::default() }, shutdown.clone());

    let (mut conn, device) = accept_on(&listener).await;
    let (_other, _) = accept_on(&listener).await;
    assert_eq!(call(&mut conn, "echo", b"{}").await, (0, json!({})));
    assert_eq!(fleet.stats().devices[&device].connects, 1, "the refusing receiver never connected");
}

#[tokio::test]
async fn wait_connected_wakes_on_connect_and_times_out_without_receiver() {
    let h = Harness::start(|c| c.devices = 2).await;
    assert!(h.fleet.wait_connected(2, WAIT).await);
    assert_eq!(h.fleet.stats().totals.connected, 2);

    // Bound but not listening: connects are refused, and no other test can
    // take the port meanwhile (as it could after dropping a listener).
    let refusing = TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed: SocketAddr = refusing.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let fleet =
        Fleet::start(FleetConfig { connect: vec![closed], ..FleetConfig::default() }, shutdown.clone());
    assert!(!fleet.wait_connected(1, Duration::from_millis(300)).await);
    shutdown.cancel();
    tokio::time::timeout(WAIT, fleet.stopped()).await.expect("stops promptly");
}

#[tokio::test]
async fn stopped_writes_the_stats_file_a_last_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.json");
    let file = path.clone();
    let h = Harness::start(move |c| c.stats_file = Some(file)).await;
    let (mut conn, device) = h.accept().await;
    call(&mut conn, "reboot", b"").await;

    h.shutdown.cancel();
    tokio::time::timeout(WAIT, h.fleet.stopped()).await.expect("stops promptly");
    let stats: FleetStats = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let expected = DeviceStats { received: 1, executed: 1, connects: 1, ..DeviceStats::default() };
    assert_eq!(stats.devices[&device], expected);
    assert_eq!(stats.totals.connected, 0);
    assert!(!dir.path().join("stats.json.tmp").exists());
}

#[tokio::test]
async fn drop_ratio_one_never_answers_a_new_command_even_when_sent_again() {
    let h = Harness::start(|c| c.drop_ratio = 1.0).await;
    let (mut conn, device) = h.accept().await;
    let id = Uuid::now_v7();
    send_command(&mut conn, id, "reboot", b"").await;
    ping(&mut conn).await;
    expect_silence(&mut conn, Duration::from_millis(300)).await;
    let stats = h.device(&device);
    assert_eq!((stats.dropped, stats.received, stats.executed), (1, 0, 0));

    send_command(&mut conn, id, "reboot", b"").await;
    ping(&mut conn).await;
    expect_silence(&mut conn, Duration::from_millis(300)).await;
    let stats = h.device(&device);
    assert_eq!((stats.dropped, stats.executed, stats.duplicates), (2, 0, 0));
    assert_eq!(h.fleet.stats().totals.dropped, 2);
}

#[tokio::test]
async fn a_dropped_command_is_new_when_sent_again_and_once_run_is_never_run_twice() {
    let h = Harness::start(|c| c.drop_ratio = 0.5).await;
    let (mut conn, device) = h.accept().await;
    let id = Uuid::now_v7();
    let mut sends = 0;
    let answer = loop {
        sends += 1;
        assert!(sends <= 64, "64 sends at drop ratio 0.5 were all dropped");
        send_command(&mut conn, id, "reboot", b"").await;
        // The RESULT and the PONG may come in either order; `received`
        // tells whether there is a RESULT to wait for.
        conn.send(Frame::Ping).await.unwrap();
        let first = next_frame(&mut conn).await;
        if h.device(&device).received == 1 {
            let result = match first {
                Frame::Pong => next_frame(&mut conn).await,
                result => {
                    assert_eq!(next_frame(&mut conn).await, Frame::Pong);
                    result
                }
            };
            break result;
        }
        assert_eq!(first, Frame::Pong);
    };
    assert!(matches!(answer, Frame::Result { id: got, .. } if got == id));

    // Executed now, so a repeat is answered from memory, never dropped.
    for _ in 0..8 {
        send_command(&mut conn, id, "reboot", b"").await;
        assert_eq!(next_frame(&mut conn).await, answer);
    }
    let stats = h.device(&device);
    assert_eq!((stats.executed, stats.dropped, stats.duplicates), (1, sends - 1, 8));
    assert_eq!(stats.executed_ids_repeated, 0);
}

#[tokio::test]
async fn churn_hangs_up_and_the_device_comes_back() {
    let h = Harness::start(|c| c.churn_ms = Some((50, 80))).await;
    let (mut first, device) = h.accept().await;
    expect_closed(&mut first).await;
    let (mut second, again) = h.accept().await;
    assert_eq!(again, device);
    let stats = h.device(&device);
    assert!(stats.connects >= 2, "{stats:?}");
    assert!(stats.churns >= 1, "{stats:?}");
    expect_closed(&mut second).await;
    assert!(h.device(&device).churns >= 2);
}

#[tokio::test]
async fn a_command_run_before_a_churn_is_answered_from_memory_after_it() {
    let h = Harness::start(|c| c.churn_ms = Some((50, 80))).await;
    let (mut conn, device) = h.accept().await;
    // Normally the first try is answered well inside the 50 ms; on a starved
    // machine the device may hang up first, and the test tries a fresh id.
    let (id, first) = loop {
        let id = Uuid::now_v7();
        send_command(&mut conn, id, "reboot", b"").await;
        match result_or_close(&mut conn, id).await {
            Some(answer) => break (id, answer),
            None => conn = h.accept().await.0,
        }
    };
    expect_closed(&mut conn).await;

    let before = h.device(&device);
    assert!(before.churns >= 1, "{before:?}");
    let again = resend_until_answered(&h, id, "reboot", b"").await;
    assert_eq!(again, first);
    let after = h.device(&device);
    assert_eq!(
        (after.executed - before.executed, after.duplicates - before.duplicates, after.executed_ids_repeated),
        (0, 1, 0)
    );
}

#[tokio::test]
async fn a_result_lost_to_a_churn_is_answered_from_memory_not_run_again() {
    let h = Harness::start(|c| c.churn_ms = Some((50, 80))).await;
    let (mut conn, device) = h.accept().await;
    let slow = br#"{"delay_ms":300}"#;
    // Still running when the device hangs up, so it finishes offline and its
    // RESULT is never sent. If the hang-up came before the device even read
    // the command (a starved machine), nothing ran: try a fresh id.
    let id = loop {
        let id = Uuid::now_v7();
        send_command(&mut conn, id, "slow", slow).await;
        expect_closed(&mut conn).await;
        if h.device(&device).received == 1 {
            break id;
        }
        conn = h.accept().await.0;
    };

    let (code, _) = resend_until_answered(&h, id, "slow", slow).await;
    assert_eq!(code, 0);
    let stats = h.device(&device);
    assert_eq!((stats.received, stats.executed, stats.duplicates, stats.executed_ids_repeated), (1, 1, 1, 0));
    assert!(stats.churns >= 1);
}
