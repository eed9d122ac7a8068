//! The embedded broker's limits (issue 13): one logged-in client flooding it
//! with subscriptions and new topic names cannot stall the others, and
//! connection and packet limits refuse cleanly. The attacker speaks raw MQTT
//! 3.1.1 over TCP (no client library throttles it); the broker is the
//! gateway's embedded rumqttd behind its guard (`gateway::broker::guard`).
//!
//! Before the guard, 60,000 subscriptions and 20,000 new topic names sent in
//! 0.3 s froze the embedded broker for more than 200 s and grew the gateway
//! from 30 MB to 7 GB (debug build, this machine class).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, Event, Packet, QoS};
use serde_json::json;
use system_tests::{eventually, Db, Spec, System, TEST_BROKER_PASSWORD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RECEIVER: &str = "rx-limits";

/// Users of the broker in these tests: the receiver, the attacker, a
/// legitimate MQTT client. One file per test (each test has its own gateway).
fn users_file(cell: &'static OnceLock<(tempfile::TempDir, PathBuf)>) -> &'static PathBuf {
    &cell
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("users");
            system_tests::mqtt_users_file(
                &path,
                &[
                    (RECEIVER, TEST_BROKER_PASSWORD),
                    ("mallory", TEST_BROKER_PASSWORD),
                    ("alice", TEST_BROKER_PASSWORD),
                ],
            );
            (dir, path)
        })
        .1
}

static FLOOD_USERS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
static LIMIT_USERS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();

/// A system whose embedded broker needs logins (`users`); `tune` as in `Spec`.
async fn start(tune: fn(&mut gateway::Config)) -> Option<System> {
    let spec = Spec {
        tune,
        receiver_tune: Box::new(|r| {
            r.receiver_id = RECEIVER.to_owned();
            r.broker_username = Some(RECEIVER.to_owned());
            r.broker_password = Some(TEST_BROKER_PASSWORD.parse().unwrap());
        }),
        ..Spec::new(Db::Sqlite)
    };
    System::start(spec).await
}

/// A subscription and topic-name flood from one user: the steady command
/// stream and another client's round trips never pause for a second, the
/// attacker is cut off at its filter cap (for good: a new connection of the
/// same user is cut off at its first new filter), its new topic names are
/// held to the rate, memory stays put, and /metrics shows each limit hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_and_topic_flood_does_not_stall_the_others() {
    // Tighter than the defaults (sized for receivers of 20,000 devices), so
    // the flood meets the name rate within the test's few seconds.
    let Some(s) = start(|c| {
        c.mqtt_users_file = Some(users_file(&FLOOD_USERS).clone());
        c.mqtt_new_names_per_second = std::num::NonZeroU32::new(200).unwrap();
        c.mqtt_new_names_burst = std::num::NonZeroU32::new(1_000).unwrap();
    })
    .await
    else {
        return;
    };
    let broker = broker_addr(&s);
    let config = s.gateway.app.config().clone();
    let dev = s.device_ids[0].clone();

    // The legitimate traffic: sequential commands, and alice's round trips
    // through the broker on a topic of her own.
    let completions = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let commands = {
        let (completions, stop, http, base) =
            (completions.clone(), stop.clone(), s.http.clone(), s.base.clone());
        let dev = dev.clone();
        tokio::spawn(async move {
            let mut failed = Vec::new();
            while !stop.is_cancelled() {
                let r = http
                    .post(format!("{base}/v1/devices/{dev}/commands"))
                    .json(&json!({"name": "echo", "payload": 1}))
                    .send()
                    .await
                    .unwrap();
                let body: serde_json::Value = r.json().await.unwrap();
                if body["status"] != "succeeded" {
                    failed.push(body);
                }
                completions.lock().unwrap().push(Instant::now());
            }
            failed
        })
    };
    let probe = {
        let (broker, stop) = (broker.clone(), stop.clone());
        tokio::spawn(async move { round_trips(&broker, stop).await })
    };
    eventually("the legitimate stream runs", || async { completions.lock().unwrap().len() >= 5 }).await;
    let rss_before = rss_kib();

    // The flood: 60,000 filters in SUBSCRIBEs of 100, and 20,000 QoS 0
    // publishes on new topic names, each as fast as TCP takes them.
    let flood_start = Instant::now();
    let mut subscriber = connect(&broker, "mallory-1", "mallory").await.expect("mallory logs in");
    let mut subscribes = Vec::new();
    for (i, chunk) in (0..60_000).collect::<Vec<_>>().chunks(100).enumerate() {
        let filters: Vec<String> = chunk.iter().map(|n| format!("flood/{n}/+")).collect();
        subscribes.extend(subscribe_packet(i as u16 + 1, &filters));
    }
    let subscribe_result =
        tokio::time::timeout(Duration::from_secs(10), subscriber.write_all(&subscribes)).await;
    let publisher = tokio::spawn(async move {
        let mut publisher = connect(&broker_addr_owned(&config), "mallory-2", "mallory").await.unwrap();
        let mut sent = 0usize;
        for batch in 0..200 {
            let mut bytes = Vec::new();
            for n in 0..100 {
                bytes.extend(publish_packet(&format!("t/{}", batch * 100 + n), b"x"));
            }
            if publisher.write_all(&bytes).await.is_err() {
                break;
            }
            sent += 100;
        }
        sent
    });
    // Five seconds of flood, then the attacker is stopped.
    tokio::time::sleep(Duration::from_secs(5)).await;
    publisher.abort();
    let flood_end = Instant::now();
    // Two more seconds of legitimate traffic after it (a measuring window).
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let failed = commands.await.unwrap();
    let worst_round_trip = probe.await.unwrap();

    // The largest gap between successive completions in the window, its
    // start and end included.
    let window_end = flood_end + Duration::from_secs(2);
    let completions = completions.lock().unwrap().clone();
    let mut in_flood = vec![flood_start];
    in_flood.extend(completions.iter().copied().filter(|t| *t > flood_start && *t < window_end));
    in_flood.push(window_end);
    let largest_gap = in_flood.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap();
    let rss_after = rss_kib();
    let m = |name: &str| metric(&s, name);
    eprintln!(
        "flood: {} commands in 7 s, largest gap between completions {largest_gap:?}, worst round trip of another client {worst_round_trip:?}; \
         process RSS {rss_before} → {rss_after} KiB; filter cap hits {}, new names delayed {}, names {}",
        in_flood.len() - 2,
        m("gateway_mqtt_filter_limit_hits_total"),
        m("gateway_mqtt_new_names_delayed_total"),
        m("gateway_mqtt_client_names"),
    );
    assert!(failed.is_empty(), "commands failed during the flood: {failed:?}");
    assert!(largest_gap < Duration::from_secs(1), "commands paused for {largest_gap:?}");
    assert!(
        worst_round_trip < Duration::from_secs(1),
        "another client's round trip took {worst_round_trip:?}"
    );
    // 60,000 filters alone once cost rumqttd gigabytes (~120 KB each).
    assert!(rss_after < rss_before + 100 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");
    // The subscriber was cut off at its cap: the rest of the 60,000 went nowhere.
    assert!(
        subscribe_result.is_err() || closed(&mut subscriber).await,
        "the subscribing connection is closed at its filter cap"
    );
    // The cap holds for the user, not the connection.
    let mut again = connect(&broker, "mallory-3", "mallory").await.expect("mallory may connect again");
    again.write_all(&subscribe_packet(1, &["flood/new/+".to_owned()])).await.unwrap();
    assert!(closed(&mut again).await, "a new filter past the cap closes a new connection too");

    assert!(m("gateway_mqtt_filter_limit_hits_total") >= 2.0);
    assert!(m("gateway_mqtt_new_names_delayed_total") >= 1.0, "new topic names were not held to the rate");
    // What rumqttd was given: mallory's 32 filters, the burst and ~7 s of the
    // rate (1,000 + 200/s) of topic names, the legitimate clients' few.
    let names = m("gateway_mqtt_client_names");
    assert!((32.0..=32.0 + 1_000.0 + 200.0 * 8.0 + 20.0).contains(&names), "{names} names");
    s.stop().await;
}

/// The connection caps and the packet limit: a third connection of one
/// user gets CONNACK "server unavailable", so does any connection past the
/// total; a packet over the limit closes its connection; commands go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_packet_limits_refuse_cleanly() {
    let Some(s) = start(|c| {
        c.mqtt_users_file = Some(users_file(&LIMIT_USERS).clone());
        c.mqtt_max_connections_per_user = 2;
        // The receiver, alice's two, mallory's one (the gateway's own clients
        // go straight to rumqttd's internal port, past the guard).
        c.mqtt_max_connections = 4;
    })
    .await
    else {
        return;
    };
    let broker = broker_addr(&s);
    let first = connect(&broker, "alice-1", "alice").await.expect("alice's first connection");
    let second = connect(&broker, "alice-2", "alice").await.expect("alice's second connection");
    let third = connect(&broker, "alice-3", "alice").await;
    assert_eq!(third.err(), Some(3), "a third connection of one user: CONNACK 3 (server unavailable)");
    assert_eq!(metric(&s, "gateway_mqtt_user_connections_refused_total"), 1.0);
    let last = connect(&broker, "mallory-1", "mallory").await.expect("the last connection within the total");
    let over = connect(&broker, "mallory-2", "mallory").await;
    assert_eq!(over.err(), Some(3), "past the total: CONNACK 3 (server unavailable)");
    assert_eq!(metric(&s, "gateway_mqtt_connections_refused_total"), 1.0);
    // A rumqttc client sees the refusal as such.
    let refused = rumqttc_connect(&broker, "mallory-3", "mallory").await;
    assert_eq!(refused, Err(ConnectReturnCode::ServiceUnavailable));
    assert_eq!(metric(&s, "gateway_mqtt_client_connections"), 4.0);
    drop(second);
    eventually("alice's second connection is gone", || async {
        metric(&s, "gateway_mqtt_client_connections") <= 3.0
    })
    .await;

    // A packet over the broker's limit: the connection closes before the
    // guard buffers it (only the header and a little are sent).
    let limit = s.gateway.app.config().mqtt_message_limit();
    let mut big = connect(&broker, "alice-3", "alice").await.expect("a slot is free again");
    let mut header = vec![0x30];
    header.extend(remaining_length(limit + 1));
    header.extend([0, 1, b'x']);
    big.write_all(&header).await.unwrap();
    assert!(closed(&mut big).await, "a packet over the limit closes the connection");
    assert_eq!(metric(&s, "gateway_mqtt_oversized_packets_total"), 1.0);

    let (status, c) = s.send(&s.device_ids[0], json!({"name": "echo", "payload": 1})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    drop((first, last));
    s.stop().await;
}

// ---- helpers ----

fn broker_addr(s: &System) -> String {
    let b = s.broker.first();
    format!("{}:{}", b.host, b.port)
}

fn broker_addr_owned(config: &gateway::Config) -> String {
    config.mqtt_listen.to_string()
}

fn metric(s: &System, name: &str) -> f64 {
    let text = s.gateway.app.metrics().registry.render();
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}"))
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Round trips of alice's messages through the broker, one at a time, until
/// `stop`; returns the longest.
async fn round_trips(broker: &str, stop: tokio_util::sync::CancellationToken) -> Duration {
    let (host, port) = broker.rsplit_once(':').unwrap();
    let mut options = rumqttc::MqttOptions::new("alice-probe", host, port.parse().unwrap());
    options.set_credentials("alice", TEST_BROKER_PASSWORD);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(_) | Packet::SubAck(_)) = event {
                let _ = tx.send(());
            }
        }
    });
    client.subscribe("clients/alice/probe", QoS::AtMostOnce).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("alice subscribed");
    let mut worst = Duration::ZERO;
    while !stop.is_cancelled() {
        let start = Instant::now();
        client.publish("clients/alice/probe", QoS::AtMostOnce, false, b"p".to_vec()).await.unwrap();
        // Bounded: a frozen broker shows as a 30 s round trip, not a hang.
        let _ = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
        worst = worst.max(start.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worst
}

/// Connects and logs in with raw MQTT 3.1.1; `Err(code)` for a refusing CONNACK.
async fn connect(broker: &str, client_id: &str, user: &str) -> Result<TcpStream, u8> {
    let mut stream = TcpStream::connect(broker).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut body = Vec::new();
    body.extend(string("MQTT"));
    body.extend([4, 0xC2]); // level 4; user name, password, clean session
    body.extend(60u16.to_be_bytes());
    body.extend(string(client_id));
    body.extend(string(user));
    body.extend(string(TEST_BROKER_PASSWORD));
    let mut packet = vec![0x10];
    packet.extend(remaining_length(body.len()));
    packet.extend(body);
    stream.write_all(&packet).await.unwrap();
    let mut connack = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut connack)).await {
        Ok(Ok(_)) if connack[0] == 0x20 && connack[3] == 0 => Ok(stream),
        Ok(Ok(_)) if connack[0] == 0x20 => Err(connack[3]),
        other => panic!("no CONNACK for {client_id}: {other:?} {connack:?}"),
    }
}

async fn rumqttc_connect(broker: &str, client_id: &str, user: &str) -> Result<(), ConnectReturnCode> {
    let (host, port) = broker.rsplit_once(':').unwrap();
    let mut options = rumqttc::MqttOptions::new(client_id, host, port.parse().unwrap());
    options.set_credentials(user, TEST_BROKER_PASSWORD);
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await.expect("an answer") {
        Ok(_) => Ok(()),
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Err(code),
        Err(e) => panic!("{e}"),
    }
}

/// Whether the peer closes the connection within 10 s (reading and
/// dropping what it sends meanwhile).
async fn closed(stream: &mut TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

fn subscribe_packet(pkid: u16, filters: &[String]) -> Vec<u8> {
    let mut body = pkid.max(1).to_be_bytes().to_vec();
    for filter in filters {
        body.extend(string(filter));
        body.push(0);
    }
    let mut packet = vec![0x82];
    packet.extend(remaining_length(body.len()));
    packet.extend(body);
    packet
}

fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    body.extend(payload);
    let mut packet = vec![0x30];
    packet.extend(remaining_length(body.len()));
    packet.extend(body);
    packet
}

fn string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend(text.as_bytes());
    out
}

fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}
