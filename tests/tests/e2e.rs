//! End-to-end: real gateway, broker, receiver and simulated devices, through
//! the public HTTP and MQTT interfaces, on SQLite and on MariaDB.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use system_tests::{eventually, mqtt_client, Broker, Db, Spec, System};

system_tests::on_both_stores!(
    sync_command_succeeds_with_full_event_log,
    sync_slower_than_wait_answers_202_then_final_by_polling,
    async_command_then_long_poll,
    device_error_becomes_failed_with_its_code,
    rejected_requests_store_nothing,
    mqtt_submission_gets_accepted_and_final_replies,
    duplicate_result_frames_make_one_result,
    idempotency_key_returns_the_same_command,
    device_presence_follows_the_connection,
    listing_pages_newest_first,
    a_reports_message_may_carry_many_and_a_result_implies_delivery,
    counters_of_attempts_published_and_commands_final,
);

async fn start(db: Db) -> Option<System> {
    System::start(Spec::new(db)).await
}

async fn sync_command_succeeds_with_full_event_log(db: Db) {
    let Some(s) = start(db).await else { return };
    let dev = &s.device_ids[0];
    let (status, cmd) = s.send(dev, json!({"name": "echo", "payload": {"t": 21.5}})).await;
    assert_eq!(status, 200, "{cmd}");
    assert_eq!(cmd["status"], "succeeded");
    assert_eq!(cmd["result"]["code"], 0);
    assert_eq!(cmd["result"]["payload"], json!({"t": 21.5}));
    assert_eq!(cmd["attempts"], 1);
    assert!(cmd["delivered_at"].is_string() && cmd["completed_at"].is_string());
    let events = s.events(cmd["id"].as_str().unwrap()).await;
    let expected = [
        (None, "pending"),
        (Some("pending"), "sent"),
        (Some("sent"), "delivered"),
        (Some("delivered"), "succeeded"),
    ];
    let expected: Vec<_> = expected.iter().map(|(f, t)| (f.map(str::to_owned), (*t).to_owned())).collect();
    assert_eq!(events, expected);
    s.stop().await;
}

/// `gateway_attempts_published_total` counts each attempt handed to the
/// broker, `gateway_commands_final_total` each command made final (what the
/// scheduled benchmark watches).
async fn counters_of_attempts_published_and_commands_final(db: Db) {
    let Some(s) = start(db).await else { return };
    let metrics = s.gateway.app.metrics().clone();
    let (published, finals) = (metrics.attempts_published.get(), metrics.commands_final.get());
    let dev = &s.device_ids[0];
    for name in ["echo", "fail"] {
        let (status, cmd) = s.send(dev, json!({"name": name})).await;
        assert_eq!(status, 200, "{cmd}");
    }
    assert_eq!(metrics.commands_final.get() - finals, 2, "a success and a failure, each final once");
    // At least one attempt each (a loaded machine may re-send after the ack timeout).
    assert!(metrics.attempts_published.get() - published >= 2);
    s.stop().await;
}

/// Plays a receiver by hand: one reports message with two reports, one of
/// them a result for a command that never had its own `delivered`.
async fn a_reports_message_may_carry_many_and_a_result_implies_delivery(db: Db) {
    let Some(s) = start(db).await else { return };
    let topics = s.gateway.app.topics().clone();
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // Like a receiver: its status (so the gateway's roll call counts it), then presence.
    let status = json!({"receiver_id": "hand-rx", "online": true});
    client
        .publish(topics.receiver_status("hand-rx"), QoS::AtLeastOnce, false, status.to_string())
        .await
        .unwrap();
    let ghosts = ["ghost-1", "ghost-2"];
    for g in ghosts {
        s.register(g).await;
        let presence = json!({"device_id": g, "receiver_id": "hand-rx", "online": true});
        client.publish(topics.presence(g), QoS::AtLeastOnce, false, presence.to_string()).await.unwrap();
    }
    for g in ghosts {
        let s = &s;
        eventually(
            "ghost online",
            || async move { s.get(&format!("/v1/devices/{g}")).await.1["online"] == true },
        )
        .await;
    }
    let mut ids = Vec::new();
    for g in ghosts {
        let (status, cmd) = s.send(g, json!({"name": "noop", "mode": "async"})).await;
        assert_eq!((status, cmd["status"].as_str()), (202, Some("sent")), "{cmd}");
        ids.push(cmd["id"].as_str().unwrap().to_owned());
    }
    let reports = json!([
        {"command_id": ids[0], "device_id": ghosts[0], "receiver_id": "hand-rx", "kind": "result",
         "code": 0, "payload_base64": "b2s="},
        {"command_id": ids[1], "device_id": ghosts[1], "receiver_id": "hand-rx", "kind": "delivered"},
    ]);
    client.publish(topics.reports(), QoS::AtLeastOnce, false, reports.to_string()).await.unwrap();
    eventually("both reports applied", || async {
        s.command(&ids[0]).await["status"] == "succeeded" && s.command(&ids[1]).await["status"] == "delivered"
    })
    .await;
    assert!(s.command(&ids[0]).await["delivered_at"].is_string(), "a result sets delivered_at");
    let (_, events) = s.get(&format!("/v1/commands/{}/events", ids[0])).await;
    let moves: Vec<_> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["from"].as_str(), e["to"].as_str().unwrap(), e["detail"].as_str()))
        .skip(2)
        .collect();
    assert_eq!(
        moves,
        [
            (Some("sent"), "delivered", Some("implied by the result")),
            (Some("delivered"), "succeeded", Some("code 0 via receiver hand-rx")),
        ]
    );
    s.stop().await;
}

async fn sync_slower_than_wait_answers_202_then_final_by_polling(db: Db) {
    let Some(s) = start(db).await else { return };
    let dev = &s.device_ids[0];
    let (status, cmd) =
        s.send(dev, json!({"name": "slow", "payload": {"delay_ms": 1500}, "wait_ms": 50})).await;
    assert_eq!(status, 202, "{cmd}");
    assert!(!["succeeded", "failed", "expired"].contains(&cmd["status"].as_str().unwrap()));
    let id = cmd["id"].as_str().unwrap();
    let (status, polled) = s.get(&format!("/v1/commands/{id}?wait_ms=20000")).await;
    assert_eq!(status, 200);
    assert_eq!(polled["status"], "succeeded");
    s.stop().await;
}

async fn async_command_then_long_poll(db: Db) {
    let Some(s) = start(db).await else { return };
    let dev = &s.device_ids[1];
    let (status, accepted) = s.send(dev, json!({"name": "reboot", "mode": "async"})).await;
    assert_eq!(status, 202);
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert!(accepted["status"].is_string());
    let (status, done) = s.get(&format!("/v1/commands/{id}?wait_ms=20000")).await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"]["payload"]["command"], "reboot");
    assert_eq!(done["device_id"], dev.as_str());
    s.stop().await;
}

async fn device_error_becomes_failed_with_its_code(db: Db) {
    let Some(s) = start(db).await else { return };
    let (status, cmd) = s.send(&s.device_ids[0], json!({"name": "fail", "payload": {"code": 7}})).await;
    assert_eq!(status, 200);
    assert_eq!(cmd["status"], "failed");
    assert_eq!(cmd["result"]["code"], 7);
    assert_eq!(cmd["error"]["kind"], "device_error");
    s.stop().await;
}

async fn rejected_requests_store_nothing(db: Db) {
    let Some(s) = start(db).await else { return };
    let dev = s.device_ids[0].clone();
    let (status, body) = s.send("nope", json!({"name": "x"})).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (404, Some("not_found")));
    let (status, body) = s.post_raw(&format!("/v1/devices/{dev}/commands"), "{not json").await;
    assert_eq!((status, body["error"]["kind"].as_str()), (400, Some("bad_request")));
    let (status, _) = s.send(&dev, json!({"name": "x", "colour": "red"})).await;
    assert_eq!(status, 400, "unknown fields are refused");
    let (status, _) = s.send(&dev, json!({"name": ""})).await;
    assert_eq!(status, 400);
    let (status, _) = s.send(&dev, json!({"name": "x", "payload_base64": "%%%"})).await;
    assert_eq!(status, 400);
    let big = "a".repeat(64 * 1024 + 1);
    let (status, body) = s.send(&dev, json!({"name": "x", "payload": big})).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (413, Some("payload_too_large")));
    let huge = vec![b' '; 8 * 1024 * 1024];
    let (status, _) = s.post_raw(&format!("/v1/devices/{dev}/commands"), huge).await;
    assert_eq!(status, 413);
    let r = s
        .http
        .put(s.url(&format!("/v1/devices/{dev}")))
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (status, body) = s.send(&dev, json!({"name": "x"})).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (409, Some("conflict")));
    assert!(s.all_commands().await.is_empty(), "nothing stored for rejected requests");
    s.stop().await;
}

async fn mqtt_submission_gets_accepted_and_final_replies(db: Db) {
    let Some(s) = start(db).await else { return };
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    let reply_to = format!("{}-replies/caller-1", s.topic_prefix);
    client.subscribe(reply_to.clone(), QoS::AtLeastOnce).await.unwrap();
    let (tx, mut replies) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(Packet::SubAck(_)) = ev {
                let _ = tx.send(json!({"event": "suback"}));
            }
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
            }
        }
    });
    assert_eq!(next(&mut replies).await["event"], "suback");
    let submit = s.gateway.app.topics().submit();
    // Garbage and a request without reply_to are dropped without harm.
    client.publish(submit.clone(), QoS::AtLeastOnce, false, &b"\xff not json"[..]).await.unwrap();
    client
        .publish(submit.clone(), QoS::AtLeastOnce, false, json!({"device_id": "x", "name": "y"}).to_string())
        .await
        .unwrap();
    let req = json!({"device_id": s.device_ids[0], "name": "echo", "payload": [1, 2], "reply_to": reply_to, "correlation_id": "c-1"});
    client.publish(submit.clone(), QoS::AtLeastOnce, false, req.to_string()).await.unwrap();
    let accepted = next(&mut replies).await;
    assert_eq!(
        (accepted["event"].as_str(), accepted["correlation_id"].as_str()),
        (Some("accepted"), Some("c-1"))
    );
    let final_ = next(&mut replies).await;
    assert_eq!(final_["event"], "final");
    assert_eq!(final_["status"], "succeeded");
    assert_eq!(final_["result"]["payload"], json!([1, 2]));
    assert_eq!(final_["id"], accepted["id"]);
    let bad = json!({"device_id": "ghost", "name": "echo", "reply_to": reply_to, "correlation_id": "c-2"});
    client.publish(submit, QoS::AtLeastOnce, false, bad.to_string()).await.unwrap();
    let rejected = next(&mut replies).await;
    assert_eq!((rejected["event"].as_str(), rejected["status_code"].as_u64()), (Some("rejected"), Some(404)));
    assert_eq!(rejected["correlation_id"], "c-2");
    let dropped = s.gateway.app.metrics().mqtt_submissions_dropped.get();
    assert_eq!(dropped, 2);
    s.stop().await;
}

async fn duplicate_result_frames_make_one_result(db: Db) {
    let mut spec = Spec::new(db);
    spec.fleet.duplicate_results = true;
    let Some(s) = System::start(spec).await else {
        return;
    };
    for i in 0..5 {
        let (status, cmd) = s.send(&s.device_ids[i % 2], json!({"name": "echo", "payload": i})).await;
        assert_eq!((status, cmd["status"].as_str()), (200, Some("succeeded")));
        let events = s.events(cmd["id"].as_str().unwrap()).await;
        assert_eq!(events.iter().filter(|(_, to)| to == "succeeded").count(), 1, "{events:?}");
        assert_eq!(events.len(), 4, "{events:?}");
    }
    let receiver_dups = &s.receiver.counters.duplicate_results;
    eventually("receiver dropped the duplicates", || async { receiver_dups.get() == 5 }).await;
    s.stop().await;
}

async fn idempotency_key_returns_the_same_command(db: Db) {
    let Some(s) = start(db).await else { return };
    let dev = &s.device_ids[0];
    let body = json!({"name": "set", "payload": {"v": 1}, "idempotency_key": "k-1"});
    let (status, first) = s.send(dev, body.clone()).await;
    assert_eq!(status, 200);
    let (status, again) = s.send(dev, body).await;
    assert_eq!((status, &again["id"]), (200, &first["id"]));
    let (status, err) =
        s.send(dev, json!({"name": "set", "payload": {"v": 2}, "idempotency_key": "k-1"})).await;
    assert_eq!((status, err["error"]["kind"].as_str()), (409, Some("conflict")));
    assert_eq!(s.all_commands().await.len(), 1);
    assert_eq!(s.fleet.stats().totals.executed, 1);
    s.stop().await;
}

async fn device_presence_follows_the_connection(db: Db) {
    let Some(s) = start(db).await else { return };
    let dev = s.device_ids[0].clone();
    let (_, d) = s.get(&format!("/v1/devices/{dev}")).await;
    assert_eq!(d["online"], true);
    assert!(d["receiver_id"].as_str().unwrap().starts_with("rx"));
    // A device that connects before it is registered shows online once registered.
    let late = firmware_sim::Fleet::start(
        firmware_sim::FleetConfig {
            connect: vec![s.receiver.tcp_addr],
            devices: 1,
            id_prefix: "late-".into(),
            ..Default::default()
        },
        tokio_util::sync::CancellationToken::new(),
    );
    assert!(late.wait_connected(1, Duration::from_secs(20)).await);
    eventually("late device reported", || async {
        s.receiver.bridge.connected().iter().any(|d| d == "late-0000")
    })
    .await;
    let r = s
        .http
        .put(s.url("/v1/devices/late-0000"))
        .json(&json!({"labels": {"room": "2"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    eventually("late device online", || s.device_online("late-0000")).await;
    let (_, list) = s.get("/v1/devices").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    s.stop().await;
}

async fn listing_pages_newest_first(db: Db) {
    let Some(s) = start(db).await else { return };
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, c) = s.send(&s.device_ids[0], json!({"name": "n", "payload": i, "mode": "async"})).await;
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let (_, page1) = s.get("/v1/commands?limit=3").await;
    let got: Vec<&str> =
        page1["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str(), ids[2].as_str()]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = s.get(&format!("/v1/commands?limit=3&cursor={cursor}")).await;
    let got: Vec<&str> =
        page2["items"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(got, vec![ids[1].as_str(), ids[0].as_str()]);
    assert!(page2["next_cursor"].is_null());
    let (status, _) = s.get("/v1/commands?status=bogus").await;
    assert_eq!(status, 400);
    let (status, body) = s.get("/v1/commands?limit=abc").await;
    assert_eq!((status, body["error"]["kind"].as_str()), (400, Some("bad_request")));
    let r = s.http.delete(s.url("/v1/devices/x")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "method_not_allowed");
    let dev = &s.device_ids[1];
    let (_, none) = s.get(&format!("/v1/commands?device_id={dev}")).await;
    assert!(none["items"].as_array().unwrap().is_empty());
    s.stop().await;
}

async fn next(r: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(20), r.recv()).await.expect("reply in time").unwrap()
}

/// External broker mode: the same pipeline through Mosquitto (127.0.0.1:1883).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_mosquitto() {
    let mut spec = Spec::new(Db::Sqlite);
    spec.broker = Broker::Mosquitto;
    let s = System::start(spec).await.expect("sqlite never skips");
    assert_eq!(
        s.broker.first().port,
        system_tests::mosquitto_addr().rsplit(':').next().unwrap().parse::<u16>().unwrap()
    );
    for i in 0..10 {
        let mode = if i % 2 == 0 { "sync" } else { "async" };
        let (_, c) = s.send(&s.device_ids[i % 2], json!({"name": "echo", "payload": i, "mode": mode})).await;
        let id = c["id"].as_str().unwrap();
        let (status, done) = s.get(&format!("/v1/commands/{id}?wait_ms=20000")).await;
        assert_eq!((status, done["status"].as_str()), (200, Some("succeeded")));
        assert_eq!(done["result"]["payload"], json!(i));
    }
    s.stop().await;
}

/// Presence that receivers published before any gateway listened is not lost:
/// a gateway's roll call on connect makes receivers report again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_after_its_receivers_learns_their_devices() {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let broker = format!("mqtt://{}", system_tests::mosquitto_addr());
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let rconfig = system_tests::receiver_config(&broker, &prefix);
    let receiver = receiver::start(rconfig, shutdown.clone()).await.unwrap();
    let fleet = firmware_sim::Fleet::start(
        firmware_sim::FleetConfig {
            connect: vec![receiver.tcp_addr],
            devices: 1,
            id_prefix: "early-".into(),
            ..Default::default()
        },
        shutdown.clone(),
    );
    assert!(fleet.wait_connected(1, Duration::from_secs(20)).await);
    eventually("receiver holds the device", || async { receiver.bridge.connected().len() == 1 }).await;
    let db = system_tests::TestDb::create(Db::Sqlite).await.unwrap();
    let mut config =
        gateway::Config::for_local(db.url.clone(), system_tests::free_port(), system_tests::free_port());
    config.broker = Some(broker);
    config.topic_prefix = prefix;
    config.instance_id = Some(format!("gw{}", uuid::Uuid::new_v4().simple()));
    let gw = gateway::start(config, shutdown.clone()).await.unwrap();
    let base = format!("http://{}", gw.http_addr);
    let http = reqwest::Client::new();
    http.put(format!("{base}/v1/devices/early-0000")).json(&json!({})).send().await.unwrap();
    eventually("device online at the late gateway", || async {
        let d: Value =
            http.get(format!("{base}/v1/devices/early-0000")).send().await.unwrap().json().await.unwrap();
        d["online"] == true
    })
    .await;
    shutdown.cancel();
    fleet.stopped().await;
    receiver.stopped().await;
    gw.stopped().await;
}

/// A receiver that shuts down cleanly takes its devices offline at once (one
/// ReceiverStatus, not a presence per device), and only its own devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_stopping_cleanly_takes_its_devices_offline() {
    let Some(s) = start(Db::Sqlite).await else { return };
    let own = tokio_util::sync::CancellationToken::new();
    let rconfig = system_tests::receiver_config(&s.broker.to_string(), &s.topic_prefix);
    let second = receiver::start(rconfig, own.clone()).await.unwrap();
    let fleet = firmware_sim::Fleet::start(
        firmware_sim::FleetConfig {
            connect: vec![second.tcp_addr],
            devices: 3,
            id_prefix: "second-".into(),
            ..Default::default()
        },
        own.clone(),
    );
    let ids: Vec<String> = (0..3).map(|i| firmware_sim::device_id("second-", i)).collect();
    for id in &ids {
        s.register(id).await;
    }
    assert!(fleet.wait_connected(3, Duration::from_secs(20)).await);
    for id in &ids {
        eventually("second receiver's device online", || s.device_online(id)).await;
    }
    own.cancel();
    second.stopped().await;
    for id in &ids {
        eventually("device offline after its receiver stopped", || async { !s.device_online(id).await })
            .await;
    }
    assert!(s.device_online(&s.device_ids[0]).await, "the other receiver's device stays online");
    fleet.stopped().await;
    s.stop().await;
}
