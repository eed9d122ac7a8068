//! Hostile input that is well-formed enough to get through (issue 13): it is
//! refused, counted, and costs the legitimate traffic beside it nothing.

use protocol::Topics;
use rumqttc::QoS;
use serde_json::json;
use system_tests::{eventually, mqtt_client, on_both_stores, Db, Spec, System};

on_both_stores!(presence_naming_an_invalid_receiver_id_is_refused);

/// Presence and receiver status naming a receiver id that is not one — 70 KiB
/// long (once made the gateway build an MQTT packet over the broker's limit
/// and drop its own connection), or with a newline and terminal escapes
/// (raw in the log) — are refused before anything is stored; devices and
/// commands carry on. (Unsigned system: any client can publish these.)
async fn presence_naming_an_invalid_receiver_id_is_refused(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let dev = s.device_ids[0].clone();
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let refused = |message: &str| s.gateway.app.provenance().refused(message, "invalid");
    for bad in ["r".repeat(70 * 1024), "evil\n\u{1b}[31mred".to_owned()] {
        let presence = json!({"device_id": dev, "receiver_id": bad, "online": true});
        client.publish(topics.presence(&dev), QoS::AtLeastOnce, false, presence.to_string()).await.unwrap();
        let status = json!({"receiver_id": bad, "online": false});
        client
            .publish(topics.receiver_status(&rx), QoS::AtLeastOnce, false, status.to_string())
            .await
            .unwrap();
    }
    eventually("all four refused", || async { refused("presence") >= 2 && refused("receiver_status") >= 2 })
        .await;
    let d = s.get(&format!("/v1/devices/{dev}")).await.1;
    assert_eq!((d["online"].as_bool(), d["receiver_id"].as_str()), (Some(true), Some(rx.as_str())), "{d}");
    let (status, c) = s.send(&dev, json!({"name": "echo", "payload": 1})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    s.stop().await;
}

/// 20 roll calls in a row (anyone on the broker may publish one): the
/// receiver answers the first, and once more for all that came meanwhile —
/// not 20 re-announcements of every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roll_call_flood_is_answered_once_or_twice() {
    let Some(s) = System::start(Spec::new(Db::Sqlite)).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    let (tx, mut statuses) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = event {
                let _ = tx.send(p.topic);
            }
        }
    });
    client.subscribe(topics.receiver_status(&rx), QoS::AtLeastOnce).await.unwrap();
    // Subscribed once one roll call's answer comes back.
    let wait = std::time::Duration::from_secs(20);
    let first = async {
        loop {
            client.publish(topics.rollcall(), QoS::AtLeastOnce, false, b"{}".to_vec()).await.unwrap();
            if let Ok(Some(_)) =
                tokio::time::timeout(std::time::Duration::from_millis(500), statuses.recv()).await
            {
                return;
            }
        }
    };
    tokio::time::timeout(wait, first).await.expect("the receiver answers a roll call");
    // Let a straggling answer of that first one arrive, then count from zero.
    while let Ok(Some(_)) = tokio::time::timeout(std::time::Duration::from_millis(500), statuses.recv()).await
    {
    }
    for _ in 0..20 {
        client.publish(topics.rollcall(), QoS::AtLeastOnce, false, b"{}".to_vec()).await.unwrap();
    }
    tokio::time::timeout(wait, statuses.recv()).await.expect("the flood is answered").unwrap();
    let mut answers = 1;
    // Quiet for 2 s: the answers are over (20 would come well within it).
    while let Ok(Some(_)) = tokio::time::timeout(std::time::Duration::from_secs(2), statuses.recv()).await {
        answers += 1;
    }
    assert!(answers <= 2, "{answers} answers to 20 roll calls");
    let (status, c) = s.send(&s.device_ids[0], json!({"name": "echo", "payload": 1})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    s.stop().await;
}

on_both_stores!(repeated_notes_are_one_event_with_a_count);

/// 20,000 identical `undeliverable` reports about one command, from the
/// receiver it went to (an unsigned system: anyone may publish them; signed,
/// only a receiver's own key can), once wrote 20,000 event rows and held
/// up every real result behind them. Now they are one event with
/// `repeats`, and a command to another device beside them succeeds.
async fn repeated_notes_are_one_event_with_a_count(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let (dev, other) = (s.device_ids[0].clone(), s.device_ids[1].clone());
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let (status, c) = s.send(&dev, json!({"name": "echo", "payload": 1})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    let id = c["id"].as_str().unwrap().to_owned();
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let report = json!({"command_id": id, "device_id": dev, "receiver_id": rx, "kind": "undeliverable", "reason": "spam"});
    const MESSAGES: usize = 200;
    const PER_MESSAGE: usize = 100;
    let flood = {
        let (client, topic, batch) = (client.clone(), topics.reports(), json!(vec![report; PER_MESSAGE]));
        tokio::spawn(async move {
            for _ in 0..MESSAGES {
                client.publish(&topic, QoS::AtLeastOnce, false, batch.to_string()).await.unwrap();
            }
        })
    };
    // A real command beside the flood.
    let started = std::time::Instant::now();
    let (status, c) = s.send(&other, json!({"name": "echo", "payload": 2})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    eprintln!("a command beside 20,000 repeated reports took {:?}", started.elapsed());
    flood.await.unwrap();
    let spam = |items: &[serde_json::Value]| -> Vec<serde_json::Value> {
        let is_spam = |e: &&serde_json::Value| e["detail"].as_str().is_some_and(|d| d.ends_with(": spam"));
        items.iter().filter(is_spam).cloned().collect()
    };
    let total = |items: &[serde_json::Value]| -> u64 {
        spam(items).iter().map(|e| e["repeats"].as_u64().unwrap_or(1)).sum()
    };
    let events =
        || async { s.get(&format!("/v1/commands/{id}/events")).await.1["items"].as_array().unwrap().clone() };
    eventually("every repeat counted", || async {
        total(&events().await) == (MESSAGES * PER_MESSAGE) as u64
    })
    .await;
    let items = events().await;
    // A batch boundary may split them when a real event comes between: not here.
    assert_eq!(spam(&items).len(), 1, "one event for the repeats: {items:?}");
    assert!(spam(&items)[0]["last_at"].is_string(), "{items:?}");
    assert_eq!(s.command(&id).await["status"], "succeeded");
    s.stop().await;
}

on_both_stores!(presence_of_unregistered_devices_is_capped);

/// Presence of 300 made-up devices (once stored forever, 4.5 → 134 MB for
/// enough of them): at most `--max-unregistered-devices` are kept, the rest
/// are refused and counted; a registered device is never refused.
async fn presence_of_unregistered_devices_is_capped(db: Db) {
    const CAP: u64 = 40;
    let spec = Spec { tune: |c| c.max_unregistered_devices = CAP, ..Spec::new(db) };
    let Some(s) = System::start(spec).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    for i in 0..300 {
        let dev = format!("junk-{i:04}");
        let presence = json!({"device_id": dev, "receiver_id": rx, "online": true});
        client.publish(topics.presence(&dev), QoS::AtLeastOnce, false, presence.to_string()).await.unwrap();
    }
    let refused = || s.gateway.app.metrics().presence_unregistered_refused.get();
    eventually("the presence over the cap refused", || async { refused() >= 300 - CAP }).await;
    let pool = sqlx::AnyPool::connect(&s.db.url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_presence WHERE device_id LIKE 'junk-%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows as u64, CAP, "unregistered devices' presence kept");
    // Registered later, a device counts no more against the cap; a new one is still recorded.
    s.register("late-1").await;
    let presence = json!({"device_id": "late-1", "receiver_id": rx, "online": true});
    client.publish(topics.presence("late-1"), QoS::AtLeastOnce, false, presence.to_string()).await.unwrap();
    eventually("a registered device's presence is recorded", || s.device_online("late-1")).await;
    assert_eq!(refused(), 300 - CAP, "only the unregistered were refused");
    let (status, c) = s.send(&s.device_ids[0], json!({"name": "echo", "payload": 1})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    pool.close().await;
    s.stop().await;
}

on_both_stores!(retention_deletes_old_final_commands_and_nothing_else);

/// With `--retention-ms` 1500 (30 days by default), final commands and their
/// events go in batches of `--retention-batch`; a command still waiting for
/// its device stays, and so do its events.
async fn retention_deletes_old_final_commands_and_nothing_else(db: Db) {
    let spec = Spec {
        tune: |c| {
            c.retention_ms = 1_500;
            c.retention_batch = 7;
        },
        ..Spec::new(db)
    };
    let Some(s) = System::start(spec).await else { return };
    s.register("offline-1").await;
    let (status, waiting) =
        s.send("offline-1", json!({"name": "echo", "payload": 0, "mode": "async", "ttl_ms": 120_000})).await;
    assert_eq!(status, 202, "{waiting}");
    let waiting = waiting["id"].as_str().unwrap().to_owned();
    let mut done = Vec::new();
    for i in 0..30 {
        let (status, c) = s.send(&s.device_ids[i % 2], json!({"name": "echo", "payload": i})).await;
        assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
        done.push(c["id"].as_str().unwrap().to_owned());
    }
    let pool = sqlx::AnyPool::connect(&s.db.url).await.unwrap();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    eventually("old final commands deleted", || async { count("SELECT COUNT(*) FROM commands").await == 1 })
        .await;
    for id in &done[..3] {
        assert_eq!(s.get(&format!("/v1/commands/{id}")).await.0, 404);
    }
    let left: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT command_id FROM command_events").fetch_all(&pool).await.unwrap();
    assert_eq!(left, vec![waiting.clone()], "only the waiting command's events are left");
    assert_eq!(s.command(&waiting).await["status"], "pending");
    assert!(s.gateway.app.metrics().retention_deleted.get() >= 30);
    pool.close().await;
    s.stop().await;
}

/// A receiver over `--receiver-report-rate` (here 100/s, bursts of 500):
/// 5,000 reports in 0.1 s are mostly dropped and counted — and a real
/// command of that same receiver, whose own reports are then dropped too,
/// still succeeds: the sweeper sends it again and the device answers the
/// repeat from memory. Nothing is lost, only time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_over_its_report_rate_loses_nothing() {
    let spec = Spec { tune: |c| c.receiver_report_rate = 100, ..Spec::new(Db::Sqlite) };
    let Some(s) = System::start(spec).await else { return };
    let topics = Topics::new(&s.topic_prefix);
    let dev = s.device_ids[0].clone();
    let rx = s.receiver.bridge.receiver_id().to_owned();
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let fake = uuid::Uuid::new_v4();
    let report = json!({"command_id": fake, "device_id": dev, "receiver_id": rx, "kind": "undeliverable", "reason": "spam"});
    let batch = json!(vec![report; 100]).to_string();
    for _ in 0..50 {
        client.publish(topics.reports(), QoS::AtLeastOnce, false, batch.clone()).await.unwrap();
    }
    let limits = s.gateway.app.receiver_limits();
    eventually("the reports over the rate dropped", || async { limits.dropped("report") >= 4_000 }).await;
    let before = s.fleet.stats().totals;
    let body = json!({"name": "echo", "payload": 7, "wait_ms": 20_000});
    let (status, c) = s.send(&dev, body).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    let after = s.fleet.stats().totals;
    assert_eq!(after.executed - before.executed, 1, "run once, however many times it was sent");
    assert_eq!(after.executed_ids_repeated, before.executed_ids_repeated);
    s.stop().await;
}
