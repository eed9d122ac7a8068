//! Several gateway instances on one database and broker (docs/ARCHITECTURE.md,
//! "Several instances"): real processes, `kill -9` mid-load, every accepted
//! command audited; two instances starting at once on an empty database; a
//! clash of instance ids; and deadlines that hold whichever instance claimed
//! a command, even a dead one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use system_tests::procs::{
    binaries, check_events, free_port, gateway_args, read_stats, within, Api, Proc, SharedMariaDb,
};

fn unique_prefix() -> String {
    format!("d{}", uuid::Uuid::new_v4().simple())
}

/// An MQTT caller: submits on `<prefix>/commands`, collects every reply by
/// correlation id.
struct MqttCaller {
    client: AsyncClient,
    reply_to: String,
    replies: Arc<Mutex<HashMap<String, Vec<Value>>>>,
}

impl MqttCaller {
    async fn connect(broker: std::net::SocketAddr, prefix: &str) -> MqttCaller {
        let id = format!("caller-{}", uuid::Uuid::new_v4().simple());
        let mut options = MqttOptions::new(id.clone(), broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(15));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let reply_to = format!("{prefix}/callers/{id}");
        let replies: Arc<Mutex<HashMap<String, Vec<Value>>>> = Arc::default();
        let (sink, subscribed) = (replies.clone(), Arc::new(tokio::sync::Notify::new()));
        let ready = subscribed.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => ready.notify_one(),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let key = v["correlation_id"].as_str().unwrap_or_default().to_owned();
                        sink.lock().unwrap().entry(key).or_default().push(v);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        client.subscribe(reply_to.clone(), QoS::AtLeastOnce).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), subscribed.notified())
            .await
            .expect("reply topic subscribed");
        MqttCaller { client, reply_to, replies }
    }

    async fn submit(&self, prefix: &str, device: &str, correlation_id: &str) {
        let body = json!({"device_id": device, "name": "echo", "payload": correlation_id, "mode": "async",
            "ttl_ms": 120_000, "max_attempts": 50, "reply_to": self.reply_to, "correlation_id": correlation_id});
        self.client
            .publish(format!("{prefix}/commands"), QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }

    fn events(&self, correlation_id: &str, event: &str) -> Vec<Value> {
        let replies = self.replies.lock().unwrap();
        replies.get(correlation_id).into_iter().flatten().filter(|r| r["event"] == event).cloned().collect()
    }
}

/// 2 gateways (generated ids) on MariaDB and Mosquitto, a receiver, ten
/// devices; HTTP sync and async and MQTT submissions through both; one
/// gateway killed with SIGKILL mid-load. Every accepted command ends final
/// with a consistent log, none ran twice, and each MQTT submission got
/// exactly one command and one `final` reply (and at most one `accepted`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_the_work_and_survive_one_killed() {
    let Some(db) = SharedMariaDb::create().await else { return };
    let bins = binaries();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto: std::net::SocketAddr = system_tests::mosquitto_addr().parse().unwrap();
    let broker = format!("mqtt://{mosquitto}");
    let prefix = unique_prefix();
    let (http_a, http_b, tcp) = (free_port(), free_port(), free_port());
    let mut a =
        Proc::start("gateway-a", &bins.gateway, &gateway_args(&db.url, http_a, &broker, &prefix), dir.path());
    let b =
        Proc::start("gateway-b", &bins.gateway, &gateway_args(&db.url, http_b, &broker, &prefix), dir.path());
    let (api_a, api_b) = (Api::new(http_a), Api::new(http_b));
    api_a.wait_healthy(Duration::from_secs(60)).await;
    api_b.wait_healthy(Duration::from_secs(60)).await;
    let receiver_args = [
        format!("--broker={broker}"),
        format!("--tcp-listen={tcp}"),
        format!("--receiver-id=rx-{prefix}"),
        format!("--topic-prefix={prefix}"),
    ];
    let _receiver = Proc::start("receiver", &bins.receiver, &receiver_args, dir.path());
    let devices: Vec<String> = (0..10).map(|i| firmware_sim::device_id("dev-", i)).collect();
    for id in &devices {
        api_a.register(id).await;
    }
    let stats = dir.path().join("sim-stats.json");
    let sim_args = [
        format!("--connect={tcp}"),
        "--devices=10".to_owned(),
        "--latency-ms=0..20".to_owned(),
        format!("--stats-file={}", stats.display()),
    ];
    let sim = Proc::start("sim", &bins.firmware_sim, &sim_args, dir.path());
    api_b.wait_online(&devices, Duration::from_secs(30)).await;
    let caller = MqttCaller::connect(mosquitto, &prefix).await;

    // Load: async over HTTP through both, sync through both, MQTT submissions.
    let mut accepted: Vec<String> = Vec::new();
    let mut sync_b = BTreeMap::<u16, usize>::new();
    let mut correlations = Vec::new();
    for i in 0..240 {
        let device = &devices[i % devices.len()];
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        if i == 120 {
            a.kill9(); // mid-load: A holds commands in every state now
        }
        let body =
            json!({"name": "echo", "payload": i, "mode": "async", "ttl_ms": 120_000, "max_attempts": 50});
        if let Ok((202, c)) = api.post(&format!("/v1/devices/{device}/commands"), &body).await {
            accepted.push(c["id"].as_str().unwrap().to_owned());
        }
        if i % 4 == 1 {
            let sync = json!({"name": "echo", "payload": i, "wait_ms": 20_000});
            let (status, c) = api_b.post(&format!("/v1/devices/{device}/commands"), &sync).await.unwrap();
            *sync_b.entry(status).or_default() += 1;
            if status == 200 {
                accepted.push(c["id"].as_str().unwrap().to_owned());
            }
        }
        if i % 3 == 0 {
            let correlation = format!("c-{i}");
            caller.submit(&prefix, device, &correlation).await;
            correlations.push(correlation);
        }
    }
    assert_eq!(sync_b.get(&200).copied(), Some(60), "every sync call to the survivor succeeded: {sync_b:?}");

    // Every MQTT submission: one final reply (the survivor finishes what A took).
    within("a final reply for every MQTT submission", Duration::from_secs(90), || async {
        correlations.iter().all(|c| !caller.events(c, "final").is_empty())
    })
    .await;
    let mut missing_accepted = 0;
    for c in &correlations {
        let (acc, fin, rej) =
            (caller.events(c, "accepted"), caller.events(c, "final"), caller.events(c, "rejected"));
        assert!(rej.is_empty(), "{c} was rejected: {rej:?}");
        assert_eq!(fin.len(), 1, "{c}: exactly one final reply, got {fin:?}");
        assert!(acc.len() <= 1, "{c}: at most one accepted reply, got {acc:?}");
        missing_accepted += usize::from(acc.is_empty());
        if let Some(a) = acc.first() {
            assert_eq!(a["id"], fin[0]["id"], "{c}: accepted and final name one command");
        }
        accepted.push(fin[0]["id"].as_str().unwrap().to_owned());
    }
    // Only a submission A stored but had not yet answered when it was killed can lack its `accepted`.
    assert!(missing_accepted <= 2, "{missing_accepted} MQTT submissions never got `accepted`");
    let (_, listed) = api_b.get("/v1/commands?limit=1000").await.unwrap();
    let stored = listed["items"].as_array().unwrap().len();
    assert!(
        stored <= accepted.len() + 2,
        "one command per submission: {stored} stored for {} accepted",
        accepted.len()
    );

    // Every accepted command ends final with a consistent log, through the survivor.
    let mut statuses = BTreeMap::<String, usize>::new();
    for id in &accepted {
        let (_, c) = api_b.get(&format!("/v1/commands/{id}?wait_ms=60000")).await.unwrap();
        assert_eq!(c["status"], "succeeded", "{c}");
        let (_, events) = api_b.get(&format!("/v1/commands/{id}/events")).await.unwrap();
        check_events(&c, events["items"].as_array().unwrap())
            .unwrap_or_else(|e| panic!("{id}: {e}\n{events}"));
        *statuses.entry(c["status"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    within("the simulator's stats are written", Duration::from_secs(5), || async {
        read_stats(&stats).is_some()
    })
    .await;
    let totals = read_stats(&stats).unwrap().totals;
    eprintln!(
        "two gateways, one killed: {} accepted ({statuses:?}), {} MQTT submissions ({missing_accepted} without `accepted`), \
         sync on the survivor {sync_b:?}, devices executed {} (repeats answered from memory {}), executed twice {}",
        accepted.len(), correlations.len(), totals.executed, totals.duplicates, totals.executed_ids_repeated
    );
    assert_eq!(totals.executed_ids_repeated, 0, "no command ran twice on a device");
    drop((b, sim));
    db.drop_database().await;
}

/// Two instances started at the same instant on an empty MariaDB database
/// both come up (migrations are serialised), each with its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_start_together_on_an_empty_database() {
    let Some(db) = SharedMariaDb::create().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let (http_a, http_b) = (free_port(), free_port());
    let (mqtt_a, mqtt_b) = (free_port(), free_port());
    let args = |http, mqtt| {
        let mut args = gateway_args(&db.url, http, "unused", &prefix);
        args.retain(|a| !a.starts_with("--broker"));
        args.push(format!("--mqtt-listen={mqtt}"));
        args
    };
    let bins = binaries();
    let a = Proc::start("gateway-a", &bins.gateway, &args(http_a, mqtt_a), dir.path());
    let b = Proc::start("gateway-b", &bins.gateway, &args(http_b, mqtt_b), dir.path());
    Api::new(http_a).wait_healthy(Duration::from_secs(90)).await;
    Api::new(http_b).wait_healthy(Duration::from_secs(90)).await;
    assert_eq!(a.log_count("migration failed") + b.log_count("migration failed"), 0);
    drop((a, b));
    db.drop_database().await;
}

/// A second process given the name of a live instance refuses to start and
/// names it, instead of evicting the first from the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_a_live_instance_id_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite:{}", dir.path().join("gw.db").display());
    let (http_a, http_b, mqtt) = (free_port(), free_port(), free_port());
    let bins = binaries();
    let prefix = unique_prefix();
    let mut first = gateway_args(&database, http_a, "unused", &prefix);
    first.retain(|a| !a.starts_with("--broker"));
    first.extend([format!("--mqtt-listen={mqtt}"), "--instance-id=edge-1".to_owned()]);
    let a = Proc::start("gateway-a", &bins.gateway, &first, dir.path());
    Api::new(http_a).wait_healthy(Duration::from_secs(60)).await;
    let second = [
        "serve".to_owned(),
        format!("--database-url={database}"),
        format!("--http-listen={http_b}"),
        format!("--broker=mqtt://{mqtt}"),
        format!("--topic-prefix={prefix}"),
        "--instance-id=edge-1".to_owned(),
    ];
    let mut b = Proc::start("gateway-b", &bins.gateway, &second, dir.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.is_running() {
        assert!(tokio::time::Instant::now() < deadline, "the second process is still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.log_count("\"edge-1\" is in use"), 1, "{}", b.log_tail(5));
    assert!(Api::new(http_a).healthy().await, "the first instance carries on");
    drop(a);
}

/// Deadlines are exact: a command whose attempt got no delivery report
/// (its receiver is frozen with SIGSTOP) and commands claimed by an instance
/// that then vanished both end `expired` within about one sweep interval of
/// `expires_at` — not an ack timeout or a claim lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_hold_whoever_claimed_the_command() {
    let bins = binaries();
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("gw.db");
    let database = format!("sqlite:{}", db_path.display());
    let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
    let prefix = unique_prefix();
    // Default ack (5 s), result (15 s) timeouts and claim lease (5 s): all longer than the ttls below.
    let gateway_args = [
        "serve".to_owned(),
        format!("--database-url={database}"),
        format!("--http-listen={http}"),
        format!("--mqtt-listen={mqtt}"),
        format!("--topic-prefix={prefix}"),
    ];
    let gateway = Proc::start("gateway", &bins.gateway, &gateway_args, dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let receiver_args = [
        format!("--broker=mqtt://{mqtt}"),
        format!("--tcp-listen={tcp}"),
        format!("--topic-prefix={prefix}"),
    ];
    let receiver = Proc::start("receiver", &bins.receiver, &receiver_args, dir.path());
    let device = "dev-0000".to_owned();
    api.register(&device).await;
    api.register("absent-1").await;
    let _sim = Proc::start(
        "sim",
        &bins.firmware_sim,
        &[format!("--connect={tcp}"), "--devices=1".to_owned()],
        dir.path(),
    );
    api.wait_online(std::slice::from_ref(&device), Duration::from_secs(30)).await;

    // (1) No delivery report: the receiver is frozen, the device still shows online.
    let pid = receiver.pid().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = json!({"name": "echo", "payload": i, "mode": "async", "ttl_ms": 1500});
        let (status, c) = api.post(&format!("/v1/devices/{device}/commands"), &body).await.unwrap();
        assert_eq!(status, 202, "{c}");
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    // (2) Claimed by an instance that then vanished: commands for a device no
    // receiver holds, claimed with a 30 s lease straight in the store.
    for i in 0..5 {
        let body = json!({"name": "echo", "payload": i, "mode": "async", "ttl_ms": 2500});
        let (status, c) = api.post("/v1/devices/absent-1/commands", &body).await.unwrap();
        assert_eq!(status, 202, "{c}");
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let store = gateway::store::Store::connect(&database).await.unwrap();
    let now = gateway::command::now_ms();
    let claimed = store.claim_due(now + 60_000, 100, now + 30_000).await.unwrap();
    assert!(claimed.len() >= 5, "the vanished instance claimed them: {claimed:?}");

    let mut lateness = Vec::new();
    for id in &ids {
        let (_, c) = api.get(&format!("/v1/commands/{id}?wait_ms=20000")).await.unwrap();
        assert_eq!(
            (c["status"].as_str(), c["error"]["kind"].as_str()),
            (Some("expired"), Some("deadline_passed")),
            "{c}"
        );
        lateness.push(time_ms(&c["completed_at"]) - time_ms(&c["expires_at"]));
    }
    eprintln!("completed_at - expires_at, ms: {lateness:?}");
    // One sweep interval (500 ms) plus the write and a loaded machine's slack;
    // before deadlines were exact these were 3.5–5 s (ack timeout) and ~28 s (lease).
    assert!(lateness.iter().all(|ms| (0..=1_500).contains(ms)), "late: {lateness:?}");
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    store.close().await;
    drop((gateway, receiver));
    let _ = std::fs::remove_file(Path::new(&db_path));
}

fn time_ms(v: &Value) -> i128 {
    let text = v.as_str().unwrap_or_else(|| panic!("{v} is not a time"));
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() / 1_000_000
}
