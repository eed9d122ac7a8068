//! Issue 12's broker attacks B1–B5, replayed as an attacker on the broker
//! would (an anonymous MQTT client: the embedded broker has no topic ACLs),
//! against a system whose gateway↔receiver messages are signed (PROTOCOL
//! 4.7). Each attack changes nothing, the legitimate flow beside it goes on,
//! and the refusal is counted. Both stores.

use std::time::Duration;

use protocol::envelope::{Cancel, CommandMessage, Presence, ReceiverStatus, Report, ReportKind};
use protocol::seal::{receiver_key, seal, Header, Key, FROM_GATEWAY};
use protocol::{DeviceId, Topics};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use system_tests::device::RawDevice;
use system_tests::{eventually, mqtt_client, on_both_stores, Db, Spec, System, TEST_MESSAGE_SECRET};
use tokio::sync::mpsc;
use uuid::Uuid;

on_both_stores!(
    forged_and_replayed_reports_change_nothing,
    forged_presence_and_receiver_status_change_nothing,
    commands_and_cancels_come_only_from_a_gateway,
    a_revoked_receiver_key_is_refused_and_the_new_one_works,
    a_receiver_key_rotation_loses_no_command_in_flight,
);

/// An MQTT client of the attacker's, and what it receives on `filters`.
async fn attacker(
    s: &System,
    filters: &[String],
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });
    for f in filters {
        client.subscribe(f, QoS::AtLeastOnce).await.unwrap();
    }
    // Subscribed once a message of its own comes back through the broker.
    if !filters.is_empty() {
        let probe = format!("{}/attacker/{}", s.topic_prefix, Uuid::new_v4().simple());
        client.subscribe(&probe, QoS::AtLeastOnce).await.unwrap();
        eventually("the attacker's subscriptions are made", || {
            let client = client.clone();
            let probe = probe.clone();
            async move { client.publish(probe, QoS::AtLeastOnce, false, b"x".to_vec()).await.is_ok() }
        })
        .await;
    }
    (client, rx)
}

async fn publish(client: &AsyncClient, topic: &str, body: Vec<u8>) {
    client.publish(topic, QoS::AtLeastOnce, false, body).await.unwrap();
}

fn sealed(key: &Key, from: &str, gen: u32, topic: &str, body: &impl serde::Serialize) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let header = Header { from, gen, ts: now, nonce: rand::random() };
    seal(key, topic, &header, &serde_json::to_vec(body).unwrap())
}

fn gateway_refused(s: &System, message: &str, reason: &str) -> u64 {
    s.gateway.app.provenance().refused(message, reason)
}

fn receiver_refused(s: &System, message: &str, reason: &str) -> u64 {
    s.receiver.provenance.refused(message, reason)
}

async fn id_of(s: &System, device: &str, body: Value) -> String {
    let (status, c) = s.send(device, body).await;
    assert!(status == 200 || status == 202, "{status} {c}");
    c["id"].as_str().unwrap().to_owned()
}

fn result(id: &str, device: &str, receiver: &str) -> Report {
    Report {
        command_id: id.parse().unwrap(),
        device_id: DeviceId::parse(device).unwrap(),
        receiver_id: receiver.into(),
        kind: ReportKind::Result { code: 0, payload_base64: b"\"forged\"".to_vec() },
    }
}

/// B1: forged results — unsigned, signed with a key not derived from the
/// gateways' secret, or signed by a real receiver about a command not sent
/// to it — move no command, whatever its status (pending, scheduled,
/// delivered); a real result captured on the broker and replayed is
/// refused too. The held command then succeeds with its device's answer.
async fn forged_and_replayed_reports_change_nothing(db: Db) {
    let Some(s) = System::start(Spec::signed(db)).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let held = "held-1";
    s.register(held).await;
    let mut device = RawDevice::connect(s.receiver.tcp_addr, held).await;
    eventually("held device online", || s.device_online(held)).await;
    let in_flight = id_of(&s, held, json!({"name": "echo", "payload": "real", "mode": "async"})).await;
    let read = device.next_command(Duration::from_secs(20)).await;
    eventually("delivered", || async { s.command(&in_flight).await["status"] == "delivered" }).await;
    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let scheduled = id_of(
        &s,
        &s.device_ids[0],
        json!({"name": "echo", "mode": "async", "scheduled_at": later, "ttl_ms": 7_200_000}),
    )
    .await;
    s.register("offline-1").await;
    let pending = id_of(&s, "offline-1", json!({"name": "echo", "mode": "async"})).await;

    let (attack, mut seen) = attacker(&s, &[format!("{}/gateways/+/reports", s.topic_prefix)]).await;
    let shared = topics.reports();
    let own = topics.instance_reports(s.gateway.app.instance_id());
    let stranger = Key::from_bytes([7; 32]);
    let other_rx = "rx-other";
    let other_key = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), other_rx, 1);
    let targets = [(&in_flight, held), (&scheduled, s.device_ids[0].as_str()), (&pending, "offline-1")];
    for (id, device) in targets {
        for topic in [&shared, &own] {
            publish(&attack, topic, serde_json::to_vec(&result(id, device, &rx)).unwrap()).await;
            publish(&attack, topic, sealed(&stranger, &rx, 1, topic, &result(id, device, &rx))).await;
            // A real receiver's key (one receiver broken into): not its command.
            publish(&attack, topic, sealed(&other_key, other_rx, 1, topic, &result(id, device, other_rx)))
                .await;
        }
    }
    eventually("every forged report refused", || async {
        gateway_refused(&s, "report", "unsigned") >= 6
            && gateway_refused(&s, "report", "bad_signature") >= 6
            && gateway_refused(&s, "report", "not_sent_to_this_receiver") >= 6
    })
    .await;
    for (id, expected) in
        [(&in_flight, ["sent", "delivered"]), (&scheduled, ["scheduled"; 2]), (&pending, ["pending"; 2])]
    {
        let c = s.command(id).await;
        assert!(expected.contains(&c["status"].as_str().unwrap()), "{c}");
        assert!(c["result"].is_null(), "{c}");
        let details = s.event_details(id).await;
        assert!(!details.iter().any(|d| d.contains("forged") || d.contains(other_rx)), "{details:?}");
    }

    device.answer(read.id, 0, br#""real""#.to_vec()).await;
    let c = s.final_state(&in_flight).await;
    assert_eq!((c["status"].as_str(), &c["result"]["payload"]), (Some("succeeded"), &json!("real")), "{c}");
    // The real, signed result went by on the instance's reports topic: replayed, it is refused.
    let real_key = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), &rx, 1);
    let captured = loop {
        let (topic, body) =
            tokio::time::timeout(Duration::from_secs(20), seen.recv()).await.unwrap().unwrap();
        let genuine = protocol::seal::open(&body).is_ok_and(|m| m.verify(&real_key, &topic).is_ok());
        if genuine && String::from_utf8_lossy(&body).contains(&in_flight) {
            break (topic, body);
        }
    };
    let replayed = gateway_refused(&s, "report", "replayed");
    publish(&attack, &captured.0, captured.1).await;
    eventually("the replay refused", || async { gateway_refused(&s, "report", "replayed") > replayed }).await;
    let ok = id_of(&s, &s.device_ids[1], json!({"name": "echo", "payload": 5})).await;
    assert_eq!(s.command(&ok).await["status"], "succeeded");
    s.stop().await;
}

/// B2, B3: forged presence (a device "moved" to the attacker, or gone) and a
/// forged receiver goodbye take no device offline and move none; a real
/// goodbye captured and replayed after the receiver came back is refused.
async fn forged_presence_and_receiver_status_change_nothing(db: Db) {
    let Some(s) = System::start(Spec::signed(db)).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let dev = s.device_ids[0].clone();
    let (attack, mut seen) = attacker(&s, &[topics.receiver_status_filter()]).await;
    let presence = |receiver: &str, online| Presence {
        device_id: DeviceId::parse(&dev).unwrap(),
        receiver_id: receiver.into(),
        online,
        key_generation: None,
    };
    let goodbye = ReceiverStatus { receiver_id: rx.clone(), online: false, session: None };
    let other_key = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), "rx-other", 1);
    let ptopic = topics.presence(&dev);
    let stopic = topics.receiver_status(&rx);
    publish(&attack, &ptopic, serde_json::to_vec(&presence("evil", true)).unwrap()).await;
    publish(&attack, &ptopic, serde_json::to_vec(&presence(&rx, false)).unwrap()).await;
    publish(&attack, &stopic, serde_json::to_vec(&goodbye).unwrap()).await;
    // Signed by another (real) receiver, speaking for this one.
    publish(&attack, &ptopic, sealed(&other_key, "rx-other", 1, &ptopic, &presence(&rx, false))).await;
    publish(&attack, &stopic, sealed(&other_key, "rx-other", 1, &stopic, &goodbye)).await;
    eventually("forged presence and status refused", || async {
        gateway_refused(&s, "presence", "unsigned") >= 2
            && gateway_refused(&s, "receiver_status", "unsigned") >= 1
            && gateway_refused(&s, "presence", "wrong_sender") >= 1
            && gateway_refused(&s, "receiver_status", "wrong_sender") >= 1
    })
    .await;
    let d = s.get(&format!("/v1/devices/{dev}")).await.1;
    assert_eq!((d["online"].as_bool(), d["receiver_id"].as_str()), (Some(true), Some(rx.as_str())), "{d}");

    // A second receiver stops (its signed goodbye goes by) and comes back;
    // the captured goodbye, replayed, takes nothing offline.
    let mut config = system_tests::receiver_config(&s.broker.to_string(), &s.topic_prefix);
    let key = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), &config.receiver_id, 1);
    config.receiver_key = Some(key.to_base64().parse().unwrap());
    let second_id = config.receiver_id.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let second = receiver::start(config.clone(), stop.clone()).await.unwrap();
    s.register("dev-b").await;
    let device_b = RawDevice::connect(second.tcp_addr, "dev-b").await;
    eventually("dev-b online", || s.device_online("dev-b")).await;
    stop.cancel();
    second.stopped().await;
    drop(device_b);
    eventually("dev-b offline after the goodbye", || async { !s.device_online("dev-b").await }).await;
    let captured = loop {
        let (topic, body) =
            tokio::time::timeout(Duration::from_secs(20), seen.recv()).await.unwrap().unwrap();
        if topic == topics.receiver_status(&second_id)
            && String::from_utf8_lossy(&body).contains("\"online\":false")
        {
            break (topic, body);
        }
    };
    let stop = tokio_util::sync::CancellationToken::new();
    config.tcp_listen = system_tests::free_port();
    let again = receiver::start(config, stop.clone()).await.unwrap();
    let _device_b = RawDevice::connect(again.tcp_addr, "dev-b").await;
    eventually("dev-b online again", || s.device_online("dev-b")).await;
    let refused_before = gateway_refused(&s, "receiver_status", "replayed")
        + gateway_refused(&s, "receiver_status", "not_current_session");
    publish(&attack, &captured.0, captured.1).await;
    eventually("the replayed goodbye refused", || async {
        gateway_refused(&s, "receiver_status", "replayed")
            + gateway_refused(&s, "receiver_status", "not_current_session")
            > refused_before
    })
    .await;
    assert!(s.device_online("dev-b").await);
    let ok = id_of(&s, "dev-b", json!({"name": "echo", "payload": 1, "mode": "async"})).await;
    assert_eq!(s.command(&ok).await["status"], "sent", "routed to the receiver that holds dev-b");
    let ok = id_of(&s, &dev, json!({"name": "echo", "payload": 1})).await;
    assert_eq!(s.command(&ok).await["status"], "succeeded");
    stop.cancel();
    again.stopped().await;
    s.stop().await;
}

/// B4, B5: a command published straight to a receiver's commands topic runs
/// nowhere (no record at the gateway, nothing executed), and a forged cancel
/// suppresses nothing.
async fn commands_and_cancels_come_only_from_a_gateway(db: Db) {
    let Some(s) = System::start(Spec::signed(db)).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let dev = s.device_ids[0].clone();
    let (attack, _) = attacker(&s, &[]).await;
    let executed = s.fleet.stats().totals.executed;
    let command = CommandMessage {
        id: Uuid::now_v7(),
        device_id: DeviceId::parse(&dev).unwrap(),
        name: "echo".into(),
        payload_base64: b"1".to_vec(),
        attempt: 1,
        expires_at_ms: i64::MAX,
        reports_to: None,
    };
    let ctopic = topics.receiver_commands(&rx);
    let wrong_gen = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), &rx, 2);
    publish(&attack, &ctopic, serde_json::to_vec(&command).unwrap()).await;
    publish(&attack, &ctopic, sealed(&Key::from_bytes([9; 32]), FROM_GATEWAY, 1, &ctopic, &command)).await;
    publish(&attack, &ctopic, sealed(&wrong_gen, FROM_GATEWAY, 2, &ctopic, &command)).await;
    eventually("forged commands refused", || async {
        receiver_refused(&s, "command", "unsigned") >= 1
            && receiver_refused(&s, "command", "bad_signature") >= 1
            && receiver_refused(&s, "command", "unknown_key") >= 1
    })
    .await;

    // B5: the device runs one command at a time; the second waits at the receiver.
    let slow = id_of(&s, &dev, json!({"name": "slow", "payload": {"delay_ms": 1500}, "mode": "async"})).await;
    eventually("the slow one delivered", || async { s.command(&slow).await["status"] == "delivered" }).await;
    let queued = id_of(&s, &dev, json!({"name": "echo", "payload": "queued", "mode": "async"})).await;
    let cancel = Cancel { command_id: queued.parse().unwrap(), device_id: DeviceId::parse(&dev).unwrap() };
    let cancel_topic = topics.receiver_cancels(&rx);
    publish(&attack, &cancel_topic, serde_json::to_vec(&cancel).unwrap()).await;
    publish(
        &attack,
        &cancel_topic,
        sealed(&Key::from_bytes([9; 32]), FROM_GATEWAY, 1, &cancel_topic, &cancel),
    )
    .await;
    eventually("forged cancels refused", || async {
        receiver_refused(&s, "cancel", "unsigned") >= 1
            && receiver_refused(&s, "cancel", "bad_signature") >= 1
    })
    .await;
    assert_eq!(s.final_state(&slow).await["status"], "succeeded");
    let c = s.final_state(&queued).await;
    assert_eq!((c["status"].as_str(), &c["result"]["payload"]), (Some("succeeded"), &json!("queued")), "{c}");
    assert_eq!(s.fleet.stats().totals.executed - executed, 2, "only the two real commands ran");
    s.stop().await;
}

/// A receiver's key was rotated to generation 2 and generation 1 revoked
/// (`--receiver-key-min-generation`): the receiver with the new key works,
/// and a message signed with the old key (leaked) is refused.
async fn a_revoked_receiver_key_is_refused_and_the_new_one_works(db: Db) {
    let mut spec = Spec::signed(db);
    spec.tune = |c| {
        c.message_secret = Some(TEST_MESSAGE_SECRET.parse().unwrap());
        c.receiver_key_min_generation = vec!["rx-rotated=2".into()];
    };
    spec.receiver_tune = Box::new(|r| {
        r.receiver_id = "rx-rotated".into();
        r.receiver_key_generation = 2;
        let key = |generation| receiver_key(TEST_MESSAGE_SECRET.as_bytes(), "rx-rotated", generation);
        r.receiver_key = Some(key(2).to_base64().parse().unwrap());
        r.receiver_previous_key = Some(key(1).to_base64().parse().unwrap());
    });
    let Some(s) = System::start(spec).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let dev = s.device_ids[0].clone();
    let ok = id_of(&s, &dev, json!({"name": "echo", "payload": 1})).await;
    assert_eq!(s.command(&ok).await["status"], "succeeded", "generation 2 works both ways");
    let (attack, _) = attacker(&s, &[]).await;
    let old = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), "rx-rotated", 1);
    let p = Presence {
        device_id: DeviceId::parse(&dev).unwrap(),
        receiver_id: "rx-rotated".into(),
        online: false,
        key_generation: None,
    };
    let topic = topics.presence(&dev);
    publish(&attack, &topic, sealed(&old, "rx-rotated", 1, &topic, &p)).await;
    eventually("the old key refused", || async { gateway_refused(&s, "presence", "revoked_key") >= 1 }).await;
    assert!(s.device_online(&dev).await);
    s.stop().await;
}

/// The real programs: `gateway receiver-key` prints the key a receiver
/// needs (the one `protocol::seal::receiver_key` derives), and without
/// `--insecure` neither the gateway nor the receiver starts without its
/// secret; the error names the setting.
#[test]
fn the_programs_need_their_keys_unless_insecure() {
    use std::process::Command;
    let bins = system_tests::procs::binaries();
    let out = Command::new(&bins.gateway)
        .args(["receiver-key", "receiver-7", "--generation", "3"])
        .env("GATEWAY_MESSAGE_SECRET", TEST_MESSAGE_SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let expected = receiver_key(TEST_MESSAGE_SECRET.as_bytes(), "receiver-7", 3).to_base64();
    assert_eq!(printed.trim(), expected);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(TEST_MESSAGE_SECRET),
        "the secret is never echoed"
    );
    let short = Command::new(&bins.gateway)
        .args(["receiver-key", "receiver-7"])
        .env("GATEWAY_MESSAGE_SECRET", "too short")
        .output()
        .unwrap();
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 32 bytes"), "{short:?}");

    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite:{}", dir.path().join("gw.db").display());
    let http = format!("--http-listen={}", system_tests::free_port());
    let mqtt = format!("--mqtt-listen={}", system_tests::free_port());
    let gateway = Command::new(&bins.gateway)
        .args(["serve", &format!("--database-url={database}"), &http, &mqtt])
        .env("GATEWAY_INSECURE", "false")
        .env_remove("GATEWAY_MESSAGE_SECRET")
        .output()
        .unwrap();
    assert!(!gateway.status.success(), "{gateway:?}");
    let err = String::from_utf8_lossy(&gateway.stderr);
    assert!(err.contains("GATEWAY_MESSAGE_SECRET") && err.contains("--insecure"), "{err}");
    assert!(err.contains("--mqtt-users-file"), "every missing credential named at once: {err}");
    let receiver = Command::new(&bins.receiver)
        .args([format!("--tcp-listen={}", system_tests::free_port())])
        .env("RECEIVER_INSECURE", "false")
        // Its broker login is there: what is missing is its message key.
        .env("RECEIVER_BROKER_USERNAME", "receiver-1")
        .env("RECEIVER_BROKER_PASSWORD", "a broker password")
        .env_remove("RECEIVER_KEY")
        .output()
        .unwrap();
    assert!(!receiver.status.success(), "{receiver:?}");
    let err = String::from_utf8_lossy(&receiver.stderr);
    assert!(err.contains("RECEIVER_KEY") && err.contains("gateway receiver-key receiver-1"), "{err}");
}

/// A receiver's key rotated in the middle of traffic: the receiver restarts
/// with generation 2 (and generation 1 as its previous key) while commands
/// are queued at it and on their devices. Every command succeeds, none runs
/// twice, and the gateway then seals what it sends that receiver with
/// generation 2.
async fn a_receiver_key_rotation_loses_no_command_in_flight(db: Db) {
    use system_tests::{free_port, test_timeouts, TestDb};
    let Some(store) = TestDb::create(db).await else { return };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut config = gateway::Config::for_local(store.url.clone(), free_port(), free_port());
    config.message_secret = Some(TEST_MESSAGE_SECRET.parse().unwrap());
    test_timeouts(&mut config);
    let gateway = gateway::start(config, shutdown.clone()).await.unwrap();
    let base = format!("http://{}", gateway.http_addr);
    let http = reqwest::Client::new();
    let key = |generation| receiver_key(TEST_MESSAGE_SECRET.as_bytes(), "rx-rot", generation).to_base64();
    let mut rconfig = receiver::Config::new(gateway.broker.to_string(), free_port());
    rconfig.receiver_id = "rx-rot".into();
    rconfig.receiver_key = Some(key(1).parse().unwrap());
    let first_stop = tokio_util::sync::CancellationToken::new();
    let first = receiver::start(rconfig.clone(), first_stop.clone()).await.unwrap();
    let fleet_config =
        firmware_sim::FleetConfig { connect: vec![first.tcp_addr], devices: 2, ..Default::default() };
    let devices: Vec<String> =
        (0..2).map(|i| firmware_sim::device_id(&fleet_config.id_prefix, fleet_config.id_start + i)).collect();
    for d in &devices {
        let r = http.put(format!("{base}/v1/devices/{d}")).json(&json!({})).send().await.unwrap();
        assert!(r.status().is_success());
    }
    let fleet = firmware_sim::Fleet::start(fleet_config, shutdown.clone());
    let online = |d: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let v: Value =
                http.get(format!("{base}/v1/devices/{d}")).send().await.unwrap().json().await.unwrap();
            v["online"] == true
        }
    };
    for d in &devices {
        eventually("device online", || online(d.clone())).await;
    }
    let mut ids = Vec::new();
    for i in 0..20 {
        let body =
            json!({"name": "slow", "payload": {"delay_ms": 100, "n": i}, "mode": "async", "ttl_ms": 120_000});
        let r = http
            .post(format!("{base}/v1/devices/{}/commands", devices[i % 2]))
            .json(&body)
            .send()
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    // Rotation while most of them wait at the receiver or on a device.
    first_stop.cancel();
    first.stopped().await;
    rconfig.receiver_key = Some(key(2).parse().unwrap());
    rconfig.receiver_key_generation = 2;
    rconfig.receiver_previous_key = Some(key(1).parse().unwrap());
    let second_stop = tokio_util::sync::CancellationToken::new();
    let second = receiver::start(rconfig, second_stop.clone()).await.unwrap();
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v: Value = http
                .get(format!("{base}/v1/commands/{id}?wait_ms=5000"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["status"] == "succeeded" {
                break;
            }
            assert!(!["failed", "expired", "canceled"].contains(&v["status"].as_str().unwrap()), "{v}");
            assert!(tokio::time::Instant::now() < deadline, "not final: {v}");
        }
    }
    let totals = fleet.stats().totals;
    assert_eq!((totals.executed, totals.executed_ids_repeated), (20, 0), "each ran once: {totals:?}");
    assert_eq!(second.provenance.refused("command", "unknown_key"), 0);
    assert_eq!(gateway.app.provenance().refused("report", "bad_signature"), 0);
    second_stop.cancel();
    second.stopped().await;
    shutdown.cancel();
    fleet.stopped().await;
    gateway.stopped().await;
    store.cleanup().await;
}

/// Two gateway instances share the message secret: commands taken by either
/// go out sealed and their sealed reports come back to the instance that
/// published them; nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_signing_gateways_share_the_work() {
    let Some(s) = System::start(Spec::signed(Db::Sqlite)).await else { return };
    let second = s.second_gateway().await;
    let http = reqwest::Client::new();
    for (i, base) in [s.base.clone(), format!("http://{}", second.http_addr)].iter().enumerate() {
        let body = json!({"name": "echo", "payload": i});
        let url = format!("{base}/v1/devices/{}/commands", s.device_ids[i % 2]);
        let c: Value = http.post(url).json(&body).send().await.unwrap().json().await.unwrap();
        assert_eq!((c["status"].as_str(), &c["result"]["payload"]), (Some("succeeded"), &json!(i)), "{c}");
    }
    for app in [&s.gateway.app, &second.app] {
        for reason in ["unsigned", "bad_signature", "replayed", "not_sent_to_this_receiver"] {
            assert_eq!(app.provenance().refused("report", reason), 0, "{reason}");
        }
    }
    assert_eq!(s.receiver.provenance.refused("command", "bad_signature"), 0);
    s.stop().await;
}
