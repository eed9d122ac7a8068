//! Delivery guarantees, in-process: scheduled commands, re-sends, expiry,
//! attempts exhausted, offline devices, cancellation, idempotency under
//! concurrency, two sweepers on one database. On SQLite and on MariaDB.

use std::time::Duration;

use serde_json::{json, Value};
use system_tests::{eventually, Db, Spec, System};

system_tests::on_both_stores!(
    scheduled_command_waits_for_its_time,
    scheduled_times_are_checked,
    silent_device_expires_at_its_deadline_with_the_attempts_used,
    attempts_run_out_before_the_deadline,
    dropped_commands_are_resent_and_executed_once,
    offline_device_keeps_its_commands_until_it_comes_back,
    cancel_moves_to_canceled_only_what_never_ran,
    commands_queued_behind_a_slow_one_are_canceled_for_real,
    a_device_that_hangs_up_gets_its_command_again_when_it_reconnects,
    commands_waiting_behind_a_slow_one_are_not_sent_again,
    concurrent_duplicate_submissions_make_one_command,
    two_sweepers_never_publish_the_same_attempt,
);

fn statuses(events: &[(Option<String>, String)]) -> Vec<&str> {
    events.iter().map(|(_, to)| to.as_str()).collect()
}

fn in_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(ms);
    // Whole milliseconds, as the store keeps them.
    let t = t.replace_nanosecond(t.millisecond() as u32 * 1_000_000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn parse_time(v: &Value) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
}

async fn scheduled_command_waits_for_its_time(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let dev = &s.device_ids[0];
    let at = in_ms(1_500);
    let (status, c) = s.send(dev, json!({"name": "later", "mode": "async", "scheduled_at": at})).await;
    assert_eq!((status, c["status"].as_str()), (202, Some("scheduled")), "{c}");
    let id = c["id"].as_str().unwrap();
    let (_, now) = s.get(&format!("/v1/commands/{id}")).await;
    assert_eq!(Some(parse_time(&now["scheduled_at"])), Some(parse_time(&json!(at))));
    let done = s.final_state(id).await;
    assert_eq!(done["status"], "succeeded");
    // Published no earlier than scheduled.
    assert!(parse_time(&done["delivered_at"]) >= parse_time(&json!(at)), "{done}");
    let events = s.events(id).await;
    assert_eq!(statuses(&events), vec!["scheduled", "sent", "delivered", "succeeded"]);
    s.stop().await;
}

async fn scheduled_times_are_checked(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let dev = &s.device_ids[0];
    // In the past: runs at once.
    let (status, c) =
        s.send(dev, json!({"name": "now", "mode": "async", "scheduled_at": in_ms(-60_000)})).await;
    assert_eq!(status, 202);
    assert_eq!(s.final_state(c["id"].as_str().unwrap()).await["status"], "succeeded");
    // After the deadline: refused.
    let late = json!({"name": "x", "mode": "async", "ttl_ms": 1000, "scheduled_at": in_ms(5_000)});
    assert_eq!(s.send(dev, late).await.0, 400);
    // Sync with a schedule makes no sense: refused.
    assert_eq!(s.send(dev, json!({"name": "x", "scheduled_at": in_ms(5_000)})).await.0, 400);
    assert_eq!(s.send(dev, json!({"name": "x", "mode": "async", "scheduled_at": "tomorrow"})).await.0, 400);
    assert_eq!(s.all_commands().await.len(), 1);
    s.stop().await;
}

async fn silent_device_expires_at_its_deadline_with_the_attempts_used(db: Db) {
    let mut spec = Spec::new(db);
    spec.fleet.drop_ratio = 1.0;
    let Some(s) = System::start(spec).await else { return };
    let (status, c) = s
        .send(&s.device_ids[0], json!({"name": "x", "ttl_ms": 5_000, "max_attempts": 50, "wait_ms": 20_000}))
        .await;
    assert_eq!(status, 200, "the sync call learns the final outcome within its wait: {c}");
    assert_eq!(c["status"], "expired");
    assert_eq!(c["error"]["kind"], "deadline_passed");
    let attempts = c["attempts"].as_i64().unwrap();
    assert!(attempts >= 2, "re-sent before expiring: {c}");
    let completed = parse_time(&c["completed_at"]);
    let expires = parse_time(&c["expires_at"]);
    assert!(completed >= expires, "not expired early: {c}");
    let id = c["id"].as_str().unwrap();
    let events = s.events(id).await;
    assert_eq!(events.iter().filter(|(_, to)| to == "sent").count() as i64, attempts);
    assert_eq!(events.last().unwrap().1, "expired");
    assert_eq!(s.fleet.stats().totals.executed, 0);
    s.stop().await;
}

async fn attempts_run_out_before_the_deadline(db: Db) {
    let mut spec = Spec::new(db);
    spec.fleet.drop_ratio = 1.0;
    let Some(s) = System::start(spec).await else { return };
    let (_, c) = s
        .send(&s.device_ids[0], json!({"name": "x", "mode": "async", "max_attempts": 2, "ttl_ms": 60_000}))
        .await;
    let c = s.final_state(c["id"].as_str().unwrap()).await;
    assert_eq!(
        (c["status"].as_str(), c["error"]["kind"].as_str()),
        (Some("failed"), Some("attempts_exhausted"))
    );
    assert_eq!(c["attempts"], 2);
    s.stop().await;
}

async fn dropped_commands_are_resent_and_executed_once(db: Db) {
    let mut spec = Spec::new(db);
    spec.fleet.drop_ratio = 0.5;
    spec.devices = 3;
    let Some(s) = System::start(spec).await else { return };
    let mut ids = Vec::new();
    for i in 0..30 {
        let body =
            json!({"name": "echo", "payload": i, "mode": "async", "max_attempts": 30, "ttl_ms": 60_000});
        let (status, c) = s.send(&s.device_ids[i % 3], body).await;
        assert_eq!(status, 202);
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let mut resent = 0;
    for (i, id) in ids.iter().enumerate() {
        let c = s.final_state(id).await;
        assert_eq!(c["status"], "succeeded", "{c}");
        assert_eq!(c["result"]["payload"], json!(i));
        resent += usize::from(c["attempts"].as_i64().unwrap() > 1);
    }
    assert!(resent > 0, "with half the commands dropped, some needed a re-send");
    let t = s.fleet.stats().totals;
    assert_eq!(t.executed, 30);
    assert_eq!(t.executed_ids_repeated, 0);
    s.stop().await;
}

async fn offline_device_keeps_its_commands_until_it_comes_back(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    s.register("away-0000").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, c) = s
            .send("away-0000", json!({"name": "echo", "payload": i, "mode": "async", "max_attempts": 2}))
            .await;
        assert_eq!((status, c["status"].as_str()), (202, Some("pending")));
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    // Several sweeps pass (ack timeout 1.5 s) without burning attempts.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    for id in &ids {
        let c = s.command(id).await;
        assert_eq!((c["status"].as_str(), c["attempts"].as_i64()), (Some("pending"), Some(0)), "{c}");
    }
    let late = firmware_sim::Fleet::start(
        firmware_sim::FleetConfig {
            connect: vec![s.receiver.tcp_addr],
            devices: 1,
            id_prefix: "away-".into(),
            ..Default::default()
        },
        s.shutdown.clone(),
    );
    assert!(late.wait_connected(1, Duration::from_secs(20)).await);
    for (i, id) in ids.iter().enumerate() {
        let c = s.final_state(id).await;
        assert_eq!((c["status"].as_str(), c["attempts"].as_i64()), (Some("succeeded"), Some(1)), "{c}");
        assert_eq!(c["result"]["payload"], json!(i));
    }
    s.stop().await;
}

async fn cancel_moves_to_canceled_only_what_never_ran(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let dev = &s.device_ids[0];
    // Scheduled, never published.
    let (_, c) = s.send(dev, json!({"name": "x", "mode": "async", "scheduled_at": in_ms(30_000)})).await;
    let id = c["id"].as_str().unwrap();
    let (status, canceled) = s.post_raw(&format!("/v1/commands/{id}/cancel"), "").await;
    assert_eq!((status, canceled["status"].as_str()), (200, Some("canceled")));
    assert_eq!(s.post_raw(&format!("/v1/commands/{id}/cancel"), "").await.0, 409);
    // Already on the device: the cancel is only a request, and the device's
    // result decides. The caller is never told `canceled` for a command that runs.
    let (_, c) = s.send(dev, json!({"name": "slow", "payload": {"delay_ms": 1500}, "mode": "async"})).await;
    let id = c["id"].as_str().unwrap().to_owned();
    eventually("delivered", || async { s.command(&id).await["status"] == "delivered" }).await;
    let (status, c) = s.post_raw(&format!("/v1/commands/{id}/cancel?wait_ms=0"), "").await;
    assert_eq!((status, c["status"].as_str()), (202, Some("delivered")), "requested: {c}");
    assert!(c["cancel_requested_at"].is_string(), "{c}");
    let (status, c) = s.post_raw(&format!("/v1/commands/{id}/cancel?wait_ms=20000"), "").await;
    assert_eq!(status, 409, "it ran: {c}");
    let c = s.command(&id).await;
    assert_eq!((c["status"].as_str(), c["result"].is_null()), (Some("succeeded"), false), "{c}");
    let (_, done) = s.send(dev, json!({"name": "x"})).await;
    let done_id = done["id"].as_str().unwrap();
    assert_eq!(s.post_raw(&format!("/v1/commands/{done_id}/cancel"), "").await.0, 409);
    let ghost = uuid::Uuid::now_v7();
    assert_eq!(s.post_raw(&format!("/v1/commands/{ghost}/cancel"), "").await.0, 404);
    s.stop().await;
}

async fn concurrent_duplicate_submissions_make_one_command(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let url = s.url(&format!("/v1/devices/{}/commands", s.device_ids[0]));
    let body = json!({"name": "once", "mode": "async", "idempotency_key": "same"});
    let calls = (0..16).map(|_| {
        let (http, url, body) = (s.http.clone(), url.clone(), body.clone());
        tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        })
    });
    let results = futures::future::join_all(calls).await;
    let ids: std::collections::HashSet<String> = results
        .into_iter()
        .map(|r| {
            let (status, v) = r.unwrap();
            assert_eq!(status, 202, "{v}");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let id = ids.into_iter().next().unwrap();
    assert_eq!(s.final_state(&id).await["status"], "succeeded");
    assert_eq!(s.all_commands().await.len(), 1);
    assert_eq!(s.fleet.stats().totals.executed, 1);
    s.stop().await;
}

async fn two_sweepers_never_publish_the_same_attempt(db: Db) {
    let mut spec = Spec::new(db);
    spec.devices = 4;
    spec.tune = |c| {
        c.sweep_batch = 10;
        // No legitimate re-sends here, so any second publication is a double claim.
        c.ack_timeout_ms = 30_000;
        c.result_timeout_ms = 30_000;
    };
    let Some(s) = System::start(spec).await else { return };
    let second = s.second_gateway().await;
    // Far enough ahead that all 200 are accepted before it.
    let at = in_ms(8_000);
    let mut ids = Vec::new();
    for i in 0..200 {
        let body =
            json!({"name": "echo", "payload": i, "mode": "async", "scheduled_at": at, "ttl_ms": 120_000});
        let (status, c) = s.send(&s.device_ids[i % 4], body).await;
        assert_eq!(status, 202);
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let mut by_instance = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let c = s.final_state(id).await;
        assert_eq!((c["status"].as_str(), c["attempts"].as_i64()), (Some("succeeded"), Some(1)), "{c}");
        // Publications only: a device busy with another command has this one
        // wait at the receiver, which says so (`queued`, a `sent → sent` event).
        let details = s.event_details(id).await;
        let events: Vec<_> = s
            .events(id)
            .await
            .into_iter()
            .zip(&details)
            .filter(|(_, d)| !d.starts_with("waiting at receiver"))
            .map(|(e, _)| e)
            .collect();
        assert_eq!(statuses(&events), vec!["scheduled", "sent", "delivered", "succeeded"], "{id}");
        let sent = &details[1];
        let instance = sent.split(" by ").nth(1).and_then(|r| r.split(':').next()).unwrap_or("?");
        *by_instance.entry(instance.to_owned()).or_default() += 1;
    }
    println!("attempts published per gateway instance: {by_instance:?}");
    let t = s.fleet.stats().totals;
    assert_eq!((t.executed, t.duplicates), (200, 0), "each command published once");
    drop(second);
    s.stop().await;
}

/// A TCP device has one command at a time (the receiver's default window):
/// commands queued behind a slow one wait at the receiver, where a cancel
/// stops them for real — `canceled`, and the device never runs them — while
/// the command on the device is not reported canceled and finishes.
async fn commands_queued_behind_a_slow_one_are_canceled_for_real(db: Db) {
    let Some(system) = System::start(Spec::new(db)).await else { return };
    queued_cancels(&system).await;
    system.stop().await;
}

async fn queued_cancels(s: &System) {
    let dev = &s.device_ids[0];
    let executed_before = s.fleet.stats().totals.executed;
    let send = |body: Value| async move { s.send(dev, body).await.1["id"].as_str().unwrap().to_owned() };
    let slow = send(json!({"name": "slow", "payload": {"delay_ms": 1500}, "mode": "async"})).await;
    eventually("the slow one delivered", || async { s.command(&slow).await["status"] == "delivered" }).await;
    let queued: Vec<String> = vec![
        send(json!({"name": "echo", "payload": 1, "mode": "async"})).await,
        send(json!({"name": "echo", "payload": 2, "mode": "async"})).await,
    ];
    for id in &queued {
        let (status, c) = s.post_raw(&format!("/v1/commands/{id}/cancel"), "").await;
        assert_eq!((status, c["status"].as_str()), (200, Some("canceled")), "{c}");
    }
    assert_eq!(s.final_state(&slow).await["status"], "succeeded");
    let after = send(json!({"name": "echo", "payload": 3})).await;
    assert_eq!(s.final_state(&after).await["status"], "succeeded");
    for id in &queued {
        let c = s.command(id).await;
        assert_eq!((c["status"].as_str(), c["result"].is_null()), (Some("canceled"), true), "{c}");
        let details = s.event_details(id).await;
        assert!(!details.iter().any(|d| d.contains("result after cancel")), "never ran: {details:?}");
    }
    assert_eq!(s.fleet.stats().totals.executed - executed_before, 2, "only the slow one and the last ran");
}

/// A device that read a command, hung up and came back 0.5 s later gets the
/// command again at once — not after the gateway's result timeout (a minute
/// here) — and the command succeeds with its second attempt.
async fn a_device_that_hangs_up_gets_its_command_again_when_it_reconnects(db: Db) {
    use system_tests::device::RawDevice;
    let mut spec = Spec::new(db);
    spec.tune = |c| c.result_timeout_ms = 60_000;
    let Some(s) = System::start(spec).await else { return };
    let device = "hangs-up-1";
    s.register(device).await;
    let mut first = RawDevice::connect(s.receiver.tcp_addr, device).await;
    eventually("device online", || s.device_online(device)).await;
    let (_, c) = s.send(device, json!({"name": "echo", "payload": "again", "mode": "async"})).await;
    let id = c["id"].as_str().unwrap().to_owned();
    assert_eq!(first.next_command(Duration::from_secs(20)).await.id.to_string(), id);
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = RawDevice::connect(s.receiver.tcp_addr, device).await;
    // Well before the 60 s result timeout.
    let again = second.next_command(Duration::from_secs(15)).await;
    assert_eq!(again.id.to_string(), id);
    second.answer(again.id, 0, br#""again""#.to_vec()).await;
    let c = s.final_state(&id).await;
    assert_eq!((c["status"].as_str(), c["attempts"].as_i64()), (Some("succeeded"), Some(2)), "{c}");
    s.stop().await;
}

/// Commands that wait at the receiver behind a slow one (the device has one
/// at a time) are reported `queued`: the gateway waits its result timeout
/// for them, not its ack timeout, so they cost no extra attempt.
async fn commands_waiting_behind_a_slow_one_are_not_sent_again(db: Db) {
    let mut spec = Spec::new(db);
    // Ack timeout 1.5 s (the test default), far below the slow command's 4 s.
    spec.tune = |c| c.result_timeout_ms = 30_000;
    let Some(s) = System::start(spec).await else { return };
    let dev = &s.device_ids[0];
    let (_, slow) =
        s.send(dev, json!({"name": "slow", "payload": {"delay_ms": 4000}, "mode": "async"})).await;
    let slow = slow["id"].as_str().unwrap().to_owned();
    eventually("the slow one delivered", || async { s.command(&slow).await["status"] == "delivered" }).await;
    let mut waiting = Vec::new();
    for i in 0..2 {
        let (_, c) = s.send(dev, json!({"name": "echo", "payload": i, "mode": "async"})).await;
        waiting.push(c["id"].as_str().unwrap().to_owned());
    }
    for id in &waiting {
        let c = s.final_state(id).await;
        assert_eq!((c["status"].as_str(), c["attempts"].as_i64()), (Some("succeeded"), Some(1)), "{c}");
        let details = s.event_details(id).await;
        assert!(details.iter().any(|d| d.contains("waiting at receiver")), "{details:?}");
    }
    s.stop().await;
}
