//! What the gateway admits (issue 13): a per-device cap on non-final
//! commands, a bounded MQTT submission queue, a per-API-key submission rate.
//! Each refusal is clear (HTTP 429/503 with `Retry-After`, MQTT `rejected`
//! with `retry_after_ms`) and the legitimate traffic beside it keeps flowing.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use system_tests::procs::{binaries, Api, Proc};
use system_tests::{eventually, free_port, on_both_stores, Db, Spec, System, TestDb};

on_both_stores!(an_offline_device_queues_at_most_its_cap, an_mqtt_flood_is_refused_not_queued);

/// The cap the first test sets (`--max-device-queue`).
const CAP: u64 = 100;
/// Submissions to the offline device.
const FLOOD: usize = 2_000;

/// 2,000 commands to one offline device: exactly the cap accepted (one
/// instance: the writer counts in order), the rest 429 `device_queue_full`
/// naming the cap with `Retry-After`; an idempotent repeat of an accepted
/// one still answers 202; another device is served all along. Once the
/// device comes online every queued command runs, and new ones are accepted.
async fn an_offline_device_queues_at_most_its_cap(db: Db) {
    let mut spec = Spec::new(db);
    spec.tune = |c| c.max_device_queue = CAP;
    let Some(s) = System::start(spec).await else { return };
    let prefix = firmware_sim::FleetConfig::default().id_prefix;
    let offline = firmware_sim::device_id(&prefix, 2);
    s.register(&offline).await;
    let body = json!({"name": "echo", "payload": 1, "mode": "async", "ttl_ms": 600_000});
    let mut keyed = body.clone();
    keyed["idempotency_key"] = "first".into();
    let (status, first) = s.send(&offline, keyed.clone()).await;
    assert_eq!(status, 202, "{first}");

    let url = s.url(&format!("/v1/devices/{offline}/commands"));
    let started = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (http, url, body) = (s.http.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..FLOOD / 16 {
                    let r = http.post(&url).json(&body).send().await.unwrap();
                    let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                    answers.push((r.status().as_u16(), retry_after, r.json::<Value>().await.unwrap()));
                }
                answers
            })
        })
        .collect();
    // Another device is served while the flood goes on.
    let (status, c) = s.send(&s.device_ids[0], json!({"name": "echo", "payload": 2})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    let mut accepted = 1;
    let mut refused = 0;
    for worker in workers {
        for (status, retry_after, body) in worker.await.unwrap() {
            match status {
                202 => accepted += 1,
                429 => {
                    refused += 1;
                    assert_eq!(body["error"]["kind"], "device_queue_full", "{body}");
                    let message = body["error"]["message"].as_str().unwrap();
                    assert!(message.contains(&format!("--max-device-queue {CAP}")), "{message}");
                    assert!(retry_after.is_some_and(|s| s.parse::<u64>().unwrap() >= 1), "Retry-After");
                    assert!(body["error"]["retry_after_ms"].as_u64().is_some(), "{body}");
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    eprintln!("{FLOOD} submissions to an offline device in {:?}", started.elapsed());
    assert_eq!(accepted, CAP, "exactly the cap accepted (one instance)");
    assert_eq!(refused as usize, FLOOD + 1 - CAP as usize);
    // The store holds the cap, not the flood.
    let stored = s.get(&format!("/v1/commands?device_id={offline}&limit=1000")).await.1;
    assert_eq!(stored["items"].as_array().unwrap().len() as u64, CAP);
    // A repeat of an accepted command (same idempotency key) is not refused.
    let (status, again) = s.send(&offline, keyed).await;
    assert_eq!((status, &again["id"]), (202, &first["id"]), "{again}");
    let metrics = metrics_text(&s.url("/metrics")).await;
    assert!(metrics.contains(&format!("gateway_device_queue_full_total {refused}")), "{metrics}");

    // The device comes: everything queued runs, and it takes new commands again.
    let fleet = firmware_sim::Fleet::start(
        firmware_sim::FleetConfig {
            connect: vec![s.receiver.tcp_addr],
            devices: 1,
            id_start: 2,
            ..firmware_sim::FleetConfig::default()
        },
        s.shutdown.clone(),
    );
    assert!(fleet.wait_connected(1, Duration::from_secs(20)).await);
    let queued = || async {
        let ids = [&protocol::DeviceId::parse(&offline).unwrap()];
        let found = s.gateway.app.store().devices_with_queued(&ids).await.unwrap();
        found.get(ids[0]).map_or(0, |(_, queued)| *queued)
    };
    eventually("the queued commands all run", || async { queued().await == 0 }).await;
    let stored = s.get(&format!("/v1/commands?device_id={offline}&limit=1000")).await.1;
    for c in stored["items"].as_array().unwrap() {
        assert_eq!(c["status"], "succeeded", "{c}");
    }
    let (status, c) = s.send(&offline, json!({"name": "echo", "payload": 3})).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    s.stop().await;
}

/// MQTT submissions in the flood: half QoS 1, half QoS 0, from one client.
const MQTT_FLOOD: usize = 20_000;
/// What the gateway process may grow to meanwhile (it was 1.1 GB unbounded).
const RSS_BOUND_KB: u64 = 250 * 1024;
/// How long a legitimate sync command may take during the flood.
const SERVED_WITHIN: Duration = Duration::from_secs(5);

/// 20,000 MQTT submissions from one client, as fast as it can send them, to
/// a device that is offline: the gateway (a real process) answers them —
/// accepted up to the device's cap, the rest `rejected` with a retry hint
/// (`overloaded` when its queue is full, `device_queue_full` past the cap)
/// — while sync HTTP commands to another device keep succeeding, each
/// within 5 s, and its resident memory stays under 250 MB.
async fn an_mqtt_flood_is_refused_not_queued(db: Db) {
    let Some(test_db) = TestDb::create(db).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
    let prefix = format!("a{}", uuid::Uuid::new_v4().simple());
    let args = vec![
        "serve".to_owned(),
        format!("--database-url={}", test_db.url),
        format!("--http-listen={http}"),
        format!("--mqtt-listen={mqtt}"),
        format!("--topic-prefix={prefix}"),
        "--mqtt-submission-queue=64".to_owned(),
    ];
    let mut gateway = Proc::start("gateway", &binaries().gateway, &args, dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let receiver_args = [
        format!("--broker=mqtt://{mqtt}"),
        format!("--tcp-listen={tcp}"),
        format!("--receiver-id=rx-{prefix}"),
        format!("--topic-prefix={prefix}"),
    ];
    let _receiver = Proc::start("receiver", &binaries().receiver, &receiver_args, dir.path());
    let device = firmware_sim::device_id("dev-", 0);
    api.register(&device).await;
    api.register("flooded").await;
    let sim_args = [format!("--connect={tcp}"), "--devices=1".to_owned()];
    let _sim = Proc::start("sim", &binaries().firmware_sim, &sim_args, dir.path());
    api.wait_online(std::slice::from_ref(&device), Duration::from_secs(30)).await;
    let pid = gateway.pid().expect("the gateway runs");
    let rss_before = rss_kb(pid);

    // The flooding client and its replies.
    let mut options = MqttOptions::new(format!("flood-{prefix}"), "127.0.0.1", mqtt.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let reply_to = format!("{prefix}/flood-replies");
    let (replies_tx, mut replies) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = replies_tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
            }
        }
    });
    client.subscribe(&reply_to, QoS::AtMostOnce).await.unwrap();
    let submit_topic = protocol::Topics::new(&prefix).submit();
    // Subscribed once a probe's reply comes back.
    let probe = json!({"device_id": "nobody", "reply_to": reply_to, "correlation_id": "probe", "name": "x"});
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            client.publish(&submit_topic, QoS::AtLeastOnce, false, probe.to_string()).await.unwrap();
            if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), replies.recv()).await {
                return;
            }
        }
    })
    .await
    .expect("the gateway answers MQTT submissions");

    let flood = {
        let (client, topic, reply_to) = (client.clone(), submit_topic.clone(), reply_to.clone());
        tokio::spawn(async move {
            for i in 0..MQTT_FLOOD {
                let qos = if i % 2 == 0 { QoS::AtLeastOnce } else { QoS::AtMostOnce };
                let m = json!({"device_id": "flooded", "reply_to": reply_to, "correlation_id": i, "name": "echo", "mode": "async"});
                client.publish(&topic, qos, false, m.to_string()).await.unwrap();
            }
        })
    };
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kb(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Legitimate traffic beside the flood.
    let mut slowest = Duration::ZERO;
    let mut served = 0;
    while !flood.is_finished() || served < 5 {
        let t = Instant::now();
        let (status, c) = api
            .post(&format!("/v1/devices/{device}/commands"), &json!({"name": "echo", "payload": served}))
            .await
            .unwrap();
        assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
        slowest = slowest.max(t.elapsed());
        served += 1;
    }
    flood.await.unwrap();
    // Replies: wait until they stop coming for 3 s.
    let (mut accepted, mut rejected, mut overloaded, mut capped) = (0, 0, 0, 0);
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(3), replies.recv()).await {
        match r["event"].as_str() {
            Some("accepted") => accepted += 1,
            Some("rejected") => {
                rejected += 1;
                assert!(r["error"]["retry_after_ms"].as_u64().is_some(), "a retry hint: {r}");
                match r["error"]["kind"].as_str() {
                    Some("overloaded") => {
                        assert_eq!(r["status_code"], 503, "{r}");
                        overloaded += 1;
                    }
                    Some("device_queue_full") => {
                        assert_eq!(r["status_code"], 429, "{r}");
                        capped += 1;
                    }
                    _ => panic!("unexpected refusal {r}"),
                }
            }
            _ => {}
        }
    }
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed).max(rss_kb(pid));
    let metrics = metrics_text(&format!("{}/metrics", api.base)).await;
    let counter = |name: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
    };
    let shed = counter("gateway_mqtt_submissions_shed_total");
    eprintln!(
        "MQTT flood of {MQTT_FLOOD}: {accepted} accepted, {rejected} rejected ({overloaded} overloaded, {capped} \
         over the cap), {shed} shed; {served} HTTP commands beside it, slowest {slowest:?}; gateway RSS \
         {rss_before} kB before, peak {peak} kB (sampled every 50 ms)"
    );
    assert!(slowest < SERVED_WITHIN, "a legitimate command took {slowest:?}");
    assert_eq!(accepted, 200, "the flooded device's cap (default 200)");
    assert!(rejected > 0 && overloaded + capped == rejected);
    assert!(counter("gateway_mqtt_submissions_overloaded_total") >= overloaded);
    assert!(peak < RSS_BOUND_KB, "gateway RSS {peak} kB");
    let stored = api.get_ok("/v1/commands?device_id=flooded&limit=1000").await.1;
    assert_eq!(stored["items"].as_array().unwrap().len(), 200, "the store holds the cap, not the flood");
    assert!(gateway.is_running());
    gateway.terminate(Duration::from_secs(10)).await;
    test_db.cleanup().await;
}

/// The `/metrics` page (open, no key needed).
async fn metrics_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// VmRSS of a process, in kB (0 when it cannot be read).
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A key over its submission rate gets 429 `rate_limited` with `Retry-After`;
/// another key, submitting at the same time, is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_is_refused_and_others_are_not() {
    let mut spec = Spec::new(Db::Sqlite);
    spec.tune = |c| {
        c.insecure = false;
        c.submit_rate_per_key = 5;
        c.submit_burst_per_key = 10;
    };
    let Some(s) = System::start(spec).await else { return };
    let store = s.gateway.app.store();
    let scopes = [gateway::api_key::Scope::CommandsWrite];
    let hasty = system_tests::http_client(Some(&system_tests::create_api_key(store, "hasty", &scopes).await));
    let calm = system_tests::http_client(Some(&system_tests::create_api_key(store, "calm", &scopes).await));
    let url = s.url(&format!("/v1/devices/{}/commands", s.device_ids[0]));
    let body = json!({"name": "echo", "payload": 1, "mode": "async"});
    let (mut accepted, mut limited) = (0, 0);
    for _ in 0..60 {
        let r = hasty.post(&url).json(&body).send().await.unwrap();
        match r.status().as_u16() {
            202 => accepted += 1,
            429 => {
                limited += 1;
                let retry_after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry_after >= 1);
                let e: Value = r.json().await.unwrap();
                assert_eq!(e["error"]["kind"], "rate_limited", "{e}");
                assert!(e["error"]["message"].as_str().unwrap().contains("--submit-rate-per-key 5"), "{e}");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(accepted >= 10, "the burst passes: {accepted}");
    assert!(limited > 0, "60 submissions at once are over 5/s with a burst of 10");
    let r = calm.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "another key is not limited");
    let metrics = metrics_text(&s.url("/metrics")).await;
    assert!(metrics.contains(&format!("gateway_submit_rate_limited_total {limited}")), "{metrics}");
    s.stop().await;
}
