//! Distributed availability on real clusters (loopback only): 3 gateways on a
//! 3-node MariaDB Galera cluster — two through HAProxy (one writer: node 1,
//! then a backup), one straight on node 3 (a second writer) — and a 3-node
//! NATS cluster speaking MQTT, every program given all three brokers; 2
//! receivers; 10 simulated devices, each given both receivers. Load through
//! all three gateways (HTTP async, HTTP sync, MQTT submissions), and mid-load
//! one of each killed with SIGKILL in turn: a gateway, a receiver, a Galera
//! node, a NATS node, the system shown to work again after each. Then every
//! submission is audited.
//!
//! Outside CI a missing cluster program skips the test (`SKIPPED:`); with
//! CI=true it fails it (see `system_tests::clusters`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use system_tests::clusters::{nats_mqtt_client, Galera, HaProxy, NatsCluster};
use system_tests::procs::{binaries, check_events, free_port, gateway_args, read_stats, Api, Proc};
use tokio::time::Instant;

/// Every command's deadline: long enough to outlast every failover here (a
/// NATS node's loss stalls MQTT for 10–25 s), so every command must succeed.
const TTL_MS: u64 = 120_000;
/// Publications per command (the most the gateway allows): a NATS stall burns
/// one about every 1.5 s (ack timeout 1 s, back-off capped at 0.5 s).
const MAX_ATTEMPTS: u64 = 100;
/// Sync calls wait out the whole ttl, so they always end with 200 and the final command.
const SYNC_WAIT_MS: u64 = TTL_MS;
/// How long a submission is tried again (same idempotency key, or the same
/// MQTT message) after a transport error, a 503 or a missing PUBACK.
const RETRY_FOR: Duration = Duration::from_secs(90);
/// How long the system may take to show it works again after each kill.
const RECOVERY: Duration = Duration::from_secs(120);
/// Successes asked of every path after each kill before the next one.
const PROGRESS: usize = 20;

/// Pacing of the load (the only sleeps of the test besides retry pauses).
const ASYNC_EVERY: Duration = Duration::from_millis(100);
const SYNC_EVERY: Duration = Duration::from_millis(100);
const MQTT_EVERY: Duration = Duration::from_millis(150);

/// The three NATS MQTT URLs starting at node `first` (`--broker` lists are
/// tried in order, so programs given different rotations spread over the nodes).
fn brokers_from(nats: &NatsCluster, first: usize) -> String {
    (0..3).map(|k| nats.mqtt_url((first - 1 + k) % 3 + 1)).collect::<Vec<_>>().join(",")
}

/// The instance id a gateway logged at start (`gateway started … instance=gw-…`).
fn instance_id(gateway: &Proc) -> Option<String> {
    let log = std::fs::read_to_string(gateway.log_path()).ok()?;
    let line = log.lines().find(|l| l.contains("gateway started"))?;
    let plain = strip_ansi(line);
    let rest = &plain[plain.find("instance=")? + "instance=".len()..];
    Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Async,
    Sync,
    Mqtt,
}

/// One submission of the load, by its label (the command's payload, and its
/// idempotency key or MQTT correlation id).
#[derive(Debug, Clone)]
struct Submission {
    kind: Kind,
    /// The gateway first asked (1…3); 0 for MQTT (every gateway receives it).
    gateway: usize,
    /// When it was first sent, and when it was finally answered (HTTP) or
    /// acknowledged by the broker (MQTT), in ms since the load began.
    sent_ms: u64,
    done_ms: u64,
    /// What the first try got: "200", "202", "503", "transport error",
    /// "puback", "retried: <the first failure>" (MQTT), or [`IN_FLIGHT`].
    first: String,
    /// Tries until answered (1: the first one was).
    tries: u32,
    /// The command the HTTP answer named; `None` for MQTT (the replies name it)
    /// or when it never got an answer.
    id: Option<String>,
    /// Sync: the command's status in the answer.
    status: Option<String>,
}

impl Submission {
    /// Sent, not answered yet.
    fn in_flight(kind: Kind, gateway: usize, sent_ms: u64) -> Submission {
        let first = IN_FLIGHT.to_owned();
        Submission { kind, gateway, sent_ms, done_ms: 0, first, tries: 0, id: None, status: None }
    }
}

/// `Submission::first` of one sent and not answered yet.
const IN_FLIGHT: &str = "(in flight)";

/// What the load tasks share with the test.
struct Load {
    started: Instant,
    stop: AtomicBool,
    /// Gateways 1…3 not killed (the load goes to live ones only).
    alive: [AtomicBool; 3],
    apis: Vec<Api>,
    /// For sync calls, which may wait the whole ttl (`Api` gives up after 30 s).
    sync_http: reqwest::Client,
    devices: Vec<String>,
    ledger: Mutex<BTreeMap<String, Submission>>,
    next_gateway: AtomicU64,
}

impl Load {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn is_alive(&self, gateway: usize) -> bool {
        self.alive[gateway - 1].load(Ordering::SeqCst)
    }

    /// The next live gateway, round robin.
    fn pick_gateway(&self) -> usize {
        loop {
            let g = (self.next_gateway.fetch_add(1, Ordering::SeqCst) % 3) as usize + 1;
            if self.is_alive(g) {
                return g;
            }
        }
    }

    fn record(&self, label: String, submission: Submission) {
        self.ledger.lock().unwrap().insert(label, submission);
    }

    fn snapshot(&self) -> BTreeMap<String, Submission> {
        self.ledger.lock().unwrap().clone()
    }
}

/// One HTTP POST: the status and body, or "transport error".
async fn post(
    load: &Load,
    kind: Kind,
    gateway: usize,
    device: &str,
    body: &Value,
) -> Result<(u16, Value), String> {
    let path = format!("/v1/devices/{device}/commands");
    match kind {
        Kind::Sync => {
            let url = format!("{}{path}", load.apis[gateway - 1].base);
            let response = load.sync_http.post(url).json(body).send().await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await.map_err(|e| e.to_string())?;
            Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
        }
        _ => load.apis[gateway - 1].post(&path, body).await.map_err(|e| e.to_string()),
    }
}

/// Submits over HTTP to `gateway`; a transport error or a 503 is tried again,
/// with the same body and so the same idempotency key, on the next live
/// gateway, for up to [`RETRY_FOR`] (what a careful client does: a 503 can
/// name a command that was stored after all, and the key finds it).
async fn submit_http(load: &Load, kind: Kind, label: String, device: &str, gateway: usize) {
    let body = match kind {
        Kind::Async => json!({"name": "echo", "payload": label, "mode": "async", "ttl_ms": TTL_MS,
            "max_attempts": MAX_ATTEMPTS, "idempotency_key": label}),
        _ => json!({"name": "echo", "payload": label, "mode": "sync", "wait_ms": SYNC_WAIT_MS,
            "ttl_ms": TTL_MS, "max_attempts": MAX_ATTEMPTS, "idempotency_key": label}),
    };
    let sent_ms = load.now_ms();
    load.record(label.clone(), Submission::in_flight(kind, gateway, sent_ms));
    let deadline = Instant::now() + RETRY_FOR;
    let (mut target, mut tries, mut first) = (gateway, 0, None);
    let (id, status) = loop {
        tries += 1;
        let outcome = post(load, kind, target, device, &body).await;
        let code = match &outcome {
            Ok((code, _)) => code.to_string(),
            Err(_) => "transport error".to_owned(),
        };
        first.get_or_insert_with(|| code.clone());
        match outcome {
            Ok((200 | 202, c)) => {
                break (c["id"].as_str().map(str::to_owned), c["status"].as_str().map(str::to_owned))
            }
            Ok((503, _)) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                target = if load.is_alive(target) && outcome.is_ok() { target } else { load.pick_gateway() };
            }
            Ok((code, c)) => {
                eprintln!("{label}: {code} {c} after {tries} tries; giving up");
                break (None, None);
            }
            Err(e) => {
                eprintln!("{label}: {e} after {tries} tries; giving up");
                break (None, None);
            }
        }
    };
    let first = first.unwrap_or_default();
    let done_ms = load.now_ms();
    load.record(label, Submission { kind, gateway, sent_ms, done_ms, first, tries, id, status });
}

/// HTTP async submissions, round robin over the live gateways.
async fn async_load(load: Arc<Load>) {
    let mut n = 0usize;
    while !load.stopped() {
        let device = load.devices[n % load.devices.len()].clone();
        let gateway = load.pick_gateway();
        submit_http(&load, Kind::Async, format!("a{n}"), &device, gateway).await;
        n += 1;
        tokio::time::sleep(ASYNC_EVERY).await;
    }
}

/// Sync calls to one gateway, one at a time, until it is killed.
async fn sync_load(load: Arc<Load>, gateway: usize) {
    let mut n = 0usize;
    while !load.stopped() && load.is_alive(gateway) {
        let device = load.devices[(n * 3 + gateway) % load.devices.len()].clone();
        submit_http(&load, Kind::Sync, format!("s{gateway}-{n}"), &device, gateway).await;
        n += 1;
        tokio::time::sleep(SYNC_EVERY).await;
    }
}

// ---------------------------------------------------------------------------
// The MQTT caller: a publisher that knows which submissions the broker took,
// and a persistent-session listener that collects every reply.
// ---------------------------------------------------------------------------

/// One reply on the caller's `reply_to`.
#[derive(Debug, Clone)]
struct Reply {
    event: String,
    id: Option<String>,
    /// The broker's DUP flag: a redelivery of a message it had sent before.
    dup: bool,
    /// When it arrived, ms since the load began.
    at_ms: u64,
    payload: Vec<u8>,
}

#[derive(Default)]
struct Replies {
    by_correlation: Mutex<HashMap<String, Vec<Reply>>>,
    /// Connections made, and subscriptions the broker refused.
    connects: AtomicU64,
    refused: AtomicU64,
}

impl Replies {
    fn of(&self, correlation: &str) -> Vec<Reply> {
        self.by_correlation.lock().unwrap().get(correlation).cloned().unwrap_or_default()
    }

    fn has(&self, correlation: &str, event: &str) -> bool {
        let replies = self.by_correlation.lock().unwrap();
        replies.get(correlation).is_some_and(|r| r.iter().any(|r| r.event == event))
    }
}

/// Listens on `reply_to` with a persistent session (client id `client_id`) on
/// `addr`: replies published while NATS has it disconnected wait in the
/// session. Subscribes again on every connection. Returns once subscribed.
async fn listen_for_replies(
    addr: SocketAddr,
    client_id: String,
    reply_to: String,
    load: Arc<Load>,
) -> Arc<Replies> {
    let (client, mut eventloop) = nats_mqtt_client(addr, &client_id, false);
    let replies = Arc::new(Replies::default());
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let (sink, ready) = (replies.clone(), subscribed.clone());
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    sink.connects.fetch_add(1, Ordering::SeqCst);
                    // try_: the request channel is drained by this very task.
                    if let Err(e) = client.try_subscribe(reply_to.clone(), QoS::AtLeastOnce) {
                        eprintln!("caller: subscribe request not queued: {e}");
                    }
                }
                // NATS refuses a QoS 1 subscription (0x80) while JetStream cannot
                // create its consumer: ask again until it is granted.
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                        sink.refused.fetch_add(1, Ordering::SeqCst);
                        eprintln!("caller: the broker refused the reply subscription; asking again");
                        let (client, topic) = (client.clone(), reply_to.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            let _ = client.subscribe(topic, QoS::AtLeastOnce).await;
                        });
                    } else {
                        ready.notify_one();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let reply = Reply {
                        event: v["event"].as_str().unwrap_or_default().to_owned(),
                        id: v["id"].as_str().map(str::to_owned),
                        dup: p.dup,
                        at_ms: load.now_ms(),
                        payload: p.payload.to_vec(),
                    };
                    let key = v["correlation_id"].as_str().unwrap_or_default().to_owned();
                    sink.by_correlation.lock().unwrap().entry(key).or_default().push(reply);
                }
                Ok(_) => {}
                Err(e) => {
                    // Also printed as the test ends and the clusters are stopped.
                    eprintln!(
                        "caller: reply connection at {} ms of the load: {e}; reconnecting",
                        load.now_ms()
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), subscribed.notified())
        .await
        .expect("reply topic subscribed");
    replies
}

/// A publisher on one NATS node that sends one QoS 1 message at a time and
/// knows whether the broker acknowledged it. Any failure drops the connection
/// and the next try starts a fresh one (clean session: nothing queued from
/// the failed one goes out later).
struct Publisher {
    addr: SocketAddr,
    connection: Option<(AsyncClient, EventLoop)>,
    connections: u64,
}

impl Publisher {
    async fn try_once(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        if self.connection.is_none() {
            self.connections += 1;
            let id = format!("caller-pub-{}", uuid::Uuid::new_v4().simple());
            let (client, mut eventloop) = nats_mqtt_client(self.addr, &id, true);
            while !matches!(
                eventloop.poll().await.map_err(|e| format!("connecting: {e}"))?,
                Event::Incoming(Packet::ConnAck(_))
            ) {}
            self.connection = Some((client, eventloop));
        }
        let (client, eventloop) = self.connection.as_mut().expect("connected above");
        client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).await.map_err(|e| e.to_string())?;
        while !matches!(
            eventloop.poll().await.map_err(|e| format!("publishing: {e}"))?,
            Event::Incoming(Packet::PubAck(_))
        ) {}
        Ok(())
    }

    /// Publishes until the broker acknowledges (for up to [`RETRY_FOR`]):
    /// the number of tries and the first failure, if any.
    async fn publish_acked(&mut self, topic: &str, payload: &[u8]) -> Result<(u32, Option<String>), String> {
        let deadline = Instant::now() + RETRY_FOR;
        let (mut tries, mut first_error) = (0, None);
        loop {
            tries += 1;
            let outcome = tokio::time::timeout(Duration::from_secs(10), self.try_once(topic, payload))
                .await
                .unwrap_or_else(|_| Err("no PUBACK within 10 s".to_owned()));
            match outcome {
                Ok(()) => return Ok((tries, first_error)),
                Err(e) => {
                    self.connection = None;
                    if Instant::now() >= deadline {
                        return Err(format!("{tries} tries, last: {e}"));
                    }
                    first_error.get_or_insert(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// MQTT submissions on `<prefix>/commands`, published on one NATS node.
async fn mqtt_load(load: Arc<Load>, mut publisher: Publisher, prefix: String, reply_to: String) -> u64 {
    let mut n = 0usize;
    while !load.stopped() {
        let label = format!("m{n}");
        let device = &load.devices[(n * 7) % load.devices.len()];
        let body = json!({"device_id": device, "name": "echo", "payload": label, "mode": "async",
            "ttl_ms": TTL_MS, "max_attempts": MAX_ATTEMPTS, "reply_to": reply_to, "correlation_id": label});
        let sent_ms = load.now_ms();
        load.record(label.clone(), Submission::in_flight(Kind::Mqtt, 0, sent_ms));
        let outcome =
            publisher.publish_acked(&format!("{prefix}/commands"), body.to_string().as_bytes()).await;
        let done_ms = load.now_ms();
        let (first, tries) = match outcome {
            Ok((tries, None)) => ("puback".to_owned(), tries),
            Ok((tries, Some(e))) => (format!("retried: {e}"), tries),
            Err(e) => panic!("{label}: the broker never acknowledged it: {e}"),
        };
        load.record(
            label,
            Submission {
                kind: Kind::Mqtt,
                gateway: 0,
                sent_ms,
                done_ms,
                first,
                tries,
                id: None,
                status: None,
            },
        );
        n += 1;
        tokio::time::sleep(MQTT_EVERY).await;
    }
    publisher.connections
}

/// Waits until, for submissions sent after `since_ms`, every live gateway has
/// answered [`PROGRESS`] sync calls with 200 and [`PROGRESS`] MQTT
/// submissions got their `final` reply: the whole path works again. Panics
/// after [`RECOVERY`] with what did and did not come back.
async fn wait_progress(what: &str, load: &Load, replies: &Replies, since_ms: u64) {
    let started = Instant::now();
    loop {
        let ledger = load.snapshot();
        let fresh = ledger.iter().filter(|(_, s)| s.sent_ms >= since_ms);
        let sync_ok: BTreeMap<usize, usize> = (1..=3)
            .filter(|&g| load.is_alive(g))
            .map(|g| {
                let ok =
                    fresh.clone().filter(|(_, s)| s.kind == Kind::Sync && s.gateway == g && s.first == "200");
                (g, ok.count())
            })
            .collect();
        let mqtt_sent = fresh.clone().filter(|(_, s)| s.kind == Kind::Mqtt).count();
        let mqtt_ok =
            fresh.clone().filter(|(label, s)| s.kind == Kind::Mqtt && replies.has(label, "final")).count();
        if sync_ok.values().all(|&n| n >= PROGRESS) && mqtt_ok >= PROGRESS {
            eprintln!("ha: working again {:?} after {what}", started.elapsed());
            return;
        }
        if started.elapsed() > RECOVERY {
            let in_flight: Vec<_> =
                fresh.filter(|(_, s)| s.first == IN_FLIGHT).map(|(l, s)| (l, s.sent_ms)).collect();
            let earlier = anomalies_so_far(&ledger, replies);
            panic!(
                "the system did not work again within {RECOVERY:?} after {what} (at {since_ms} ms of the \
                 load): sync calls answered 200 since, per live gateway: {sync_ok:?}; MQTT submissions \
                 published since {mqtt_sent}, with a final reply {mqtt_ok}; submissions not answered (or \
                 acknowledged by the broker) yet, with when they were sent: {in_flight:?}; what went wrong \
                 before (the full audit does not run): {earlier:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// First tries that failed and MQTT replies that contradict each other, so far:
/// what a run that stops early (no recovery) can still report.
fn anomalies_so_far(ledger: &BTreeMap<String, Submission>, replies: &Replies) -> Vec<String> {
    let mut found = Vec::new();
    for (label, s) in ledger {
        if !matches!(s.first.as_str(), "200" | "202" | "puback" | IN_FLIGHT) {
            found.push(format!(
                "{label} to gateway {} at {}–{} ms: {}",
                s.gateway, s.sent_ms, s.done_ms, s.first
            ));
        }
        if s.kind == Kind::Mqtt {
            let all = replies.of(label);
            let n = |event: &str| all.iter().filter(|r| r.event == event && !r.dup).count();
            if n("rejected") > 0 || n("accepted") > 1 || n("final") > 1 {
                let story: Vec<_> =
                    all.iter().map(|r| (r.event.as_str(), r.id.as_deref(), r.dup, r.at_ms)).collect();
                found.push(format!(
                    "{label} sent at {} ms, replies (event, id, dup, at ms): {story:?}",
                    s.sent_ms
                ));
            }
        }
    }
    found
}

/// The test's directory (every process's log, the clusters' data), deleted
/// when the test passes; when it fails, the logs and configurations are kept
/// and the path printed (the clusters' data, some 300 MB, is deleted). Declared
/// before the processes, so they are gone when it drops.
struct KeptOnFailure(Option<tempfile::TempDir>);

impl KeptOnFailure {
    fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("until dropped").path()
    }
}

impl Drop for KeptOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.0.take() {
                let kept = dir.keep();
                for data in ["galera", "nats"] {
                    let _ = std::fs::remove_dir_all(kept.join(data));
                }
                eprintln!("ha: the test's logs are kept in {}", kept.display());
            }
        }
    }
}

/// Every command the gateways hold, through `api` (all pages, newest first).
async fn all_commands(api: &Api) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/commands?limit=1000&cursor={c}"),
            None => "/v1/commands?limit=1000".to_owned(),
        };
        let (status, page) = api.get_ok(&path).await;
        assert_eq!(status, 200, "GET {path}: {page}");
        all.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return all,
        }
    }
}

/// A command's final state and event log, read through `api`, waiting up to a minute for it to be final.
async fn final_with_events(api: &Api, id: &str) -> (Value, Vec<Value>) {
    let (status, command) = api.get_ok(&format!("/v1/commands/{id}?wait_ms=60000")).await;
    assert!(matches!(status, 200 | 202), "GET {id}: {status} {command}");
    let (status, events) = api.get_ok(&format!("/v1/commands/{id}/events")).await;
    assert_eq!(status, 200, "GET {id}/events: {events}");
    (command, events["items"].as_array().expect("event items").clone())
}

/// `what` was killed at `at` ms of the load: waits until the system works
/// again, and returns what, when, and how long that took.
async fn after_kill(
    what: &'static str,
    at: u64,
    load: &Load,
    replies: &Replies,
) -> (&'static str, u64, Duration) {
    eprintln!("ha: {what} killed at {at} ms of the load");
    let started = Instant::now();
    wait_progress(what, load, replies, at).await;
    (what, at, started.elapsed())
}

fn count<K: Ord>(items: impl IntoIterator<Item = K>) -> BTreeMap<K, usize> {
    let mut counts = BTreeMap::new();
    for k in items {
        *counts.entry(k).or_default() += 1;
    }
    counts
}

/// The distributed-availability test (see the module doc). Kills, in turn:
/// gateway 2 (HAProxy, one of the two on the single writer), receiver 1 (its
/// 5 devices move to receiver 2), Galera node 1 (HAProxy's primary: gateway 1
/// moves to node 2, now a second writer beside gateway 3's node 3), NATS node
/// 1 (gateway 1 and receiver 2 were connected there). After each, the test
/// waits until every live gateway answers sync calls again and MQTT
/// submissions get their final replies. Then: every submission answered and
/// stored once, every command `succeeded` with a consistent event log, run
/// once on its device; one `accepted` (none only for a submission gateway 2
/// stored and was killed before answering) and one `final` per MQTT
/// submission; every sync call to a surviving gateway answered 200.
///
/// What this test found when it was written, all fixed since (each failure
/// keeps its logs, see [`KeptOnFailure`]; the gateways log at debug for this):
/// - Galera node 1 killed: a sync call in flight got 503 (a broken pooled
///   connection was not tried again), and an MQTT submission was refused by
///   one gateway ("MQTT refusal not recorded") while another ran it.
/// - NATS node 1 killed: NATS refuses QoS 1 SUBSCRIBEs while JetStream
///   re-elects, and nobody checked the SUBACK: a receiver deaf to its
///   commands or the roll call (devices marked offline for good), gateways
///   deaf to their topics; and submissions the broker acknowledged were lost
///   while the gateways' clean-session connections were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_each_killed_on_galera_and_nats_loses_nothing() {
    if !(Galera::available() & HaProxy::available() & NatsCluster::available()) {
        return;
    }
    let test_started = Instant::now();
    let bins = binaries();
    let dir = KeptOnFailure(Some(tempfile::Builder::new().prefix("ha-clusters-").tempdir().unwrap()));
    let (mut galera, mut nats) = tokio::join!(Galera::start(dir.path()), NatsCluster::start(dir.path()));
    let haproxy = HaProxy::start(dir.path(), &galera).await;
    let clusters_up = test_started.elapsed();

    // Gateways: 1 and 2 through HAProxy, 3 straight on node 3; NATS lists starting at nodes 1, 2, 3.
    let prefix = format!("ha{}", uuid::Uuid::new_v4().simple());
    let http = [free_port(), free_port(), free_port()];
    let databases = [haproxy.url(), haproxy.url(), galera.url(3)];
    let gateway = |g: usize| {
        let args = gateway_args(&databases[g - 1], http[g - 1], &brokers_from(&nats, g), &prefix);
        Proc::start_with_env(
            &format!("gateway-{g}"),
            &bins.gateway,
            &args,
            // Debug: every submission's outcome ("accepted", "taken by another instance", "refused").
            &[("NO_COLOR", "1"), ("RUST_LOG", "info,gateway=debug,sqlx=warn")],
            dir.path(),
        )
    };
    let apis: Vec<Api> = http.iter().map(|&a| Api::new(a)).collect();
    // Gateway 1 first: it runs the migrations. (Their lock is GET_LOCK, which Galera does not
    // replicate: gateways on different nodes starting at once are not what this test is about.)
    let mut gateways = vec![gateway(1)];
    apis[0].wait_healthy(Duration::from_secs(90)).await;
    gateways.extend([gateway(2), gateway(3)]);
    apis[1].wait_healthy(Duration::from_secs(90)).await;
    apis[2].wait_healthy(Duration::from_secs(90)).await;
    let instances: Vec<String> =
        gateways.iter().map(|g| instance_id(g).unwrap_or_else(|| format!("?{}", g.name()))).collect();
    // Row locks hold on one Galera node only: the sweepers claim with a lease here.
    for g in &gateways {
        assert_eq!(g.log_count("the sweeper claims due commands with a lease"), 1, "{}", g.log_tail(20));
    }

    // Receivers: 1 on NATS node 2 first, 2 on node 1 first.
    let tcp = [free_port(), free_port()];
    let mut receivers: Vec<Proc> = (1..=2)
        .map(|r| {
            let args = [
                format!("--broker={}", brokers_from(&nats, 3 - r)),
                format!("--tcp-listen={}", tcp[r - 1]),
                format!("--receiver-id=rx{r}-{prefix}"),
                format!("--topic-prefix={prefix}"),
            ];
            Proc::start(&format!("receiver-{r}"), &bins.receiver, &args, dir.path())
        })
        .collect();

    // Ten devices: 0–4 try receiver 1 first, 5–9 receiver 2 first; each moves to the other when its connection drops.
    let devices: Vec<String> = (0..10).map(|i| firmware_sim::device_id("dev-", i)).collect();
    for id in &devices {
        apis[0].register(id).await;
    }
    let stats = [dir.path().join("sim-a-stats.json"), dir.path().join("sim-b-stats.json")];
    let sims: Vec<Proc> = [("sim-a", 0, [tcp[0], tcp[1]]), ("sim-b", 5, [tcp[1], tcp[0]])]
        .into_iter()
        .zip(&stats)
        .map(|((name, start, [first, second]), stats)| {
            let args = [
                format!("--connect={first},{second}"),
                "--devices=5".to_owned(),
                format!("--id-start={start}"),
                "--latency-ms=0..20".to_owned(),
                format!("--stats-file={}", stats.display()),
            ];
            Proc::start(name, &bins.firmware_sim, &args, dir.path())
        })
        .collect();
    apis[0].wait_online(&devices, Duration::from_secs(60)).await;
    apis[2].wait_online(&devices, Duration::from_secs(60)).await;

    // The load, and the MQTT caller on NATS node 3 (never killed).
    let load = Arc::new(Load {
        started: Instant::now(),
        stop: AtomicBool::new(false),
        alive: [AtomicBool::new(true), AtomicBool::new(true), AtomicBool::new(true)],
        apis: apis.clone(),
        sync_http: reqwest::Client::builder()
            .timeout(Duration::from_millis(SYNC_WAIT_MS) + Duration::from_secs(30))
            .build()
            .unwrap(),
        devices: devices.clone(),
        ledger: Mutex::default(),
        next_gateway: AtomicU64::new(0),
    });
    let reply_to = format!("{prefix}/callers/caller-1");
    let replies =
        listen_for_replies(nats.mqtt_addr(3), format!("caller-{prefix}"), reply_to.clone(), load.clone())
            .await;
    let publisher = Publisher { addr: nats.mqtt_addr(3), connection: None, connections: 0 };
    let setup = test_started.elapsed();
    let mut tasks = vec![tokio::spawn(async_load(load.clone()))];
    tasks.extend((1..=3).map(|g| tokio::spawn(sync_load(load.clone(), g))));
    let mqtt_task = tokio::spawn(mqtt_load(load.clone(), publisher, prefix.clone(), reply_to));

    // The kills, each once the whole path works.
    let mut kills: Vec<(&str, u64, Duration)> = Vec::new();
    wait_progress("the start", &load, &replies, 0).await;
    let at = load.now_ms();
    load.alive[1].store(false, Ordering::SeqCst);
    gateways[1].kill9();
    kills.push(after_kill("gateway 2", at, &load, &replies).await);
    let at = load.now_ms();
    receivers[0].kill9();
    kills.push(after_kill("receiver 1", at, &load, &replies).await);
    let at = load.now_ms();
    galera.kill9(1);
    kills.push(after_kill("Galera node 1", at, &load, &replies).await);
    let at = load.now_ms();
    nats.kill9(1);
    kills.push(after_kill("NATS node 1", at, &load, &replies).await);
    load.stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("a load task panicked");
    }
    let publisher_connections = mqtt_task.await.expect("the MQTT load panicked");
    let load_time = load.started.elapsed();
    let gateway2_killed = kills[0].1;
    let ledger = load.snapshot();

    // The audit: every violation is collected, all are printed, then the test fails if there was one.
    let mut problems: Vec<String> = Vec::new();

    // Every HTTP submission answered (after retries with its idempotency key).
    for (label, s) in ledger.iter().filter(|(_, s)| s.kind != Kind::Mqtt && s.id.is_none()) {
        problems.push(format!("HTTP submission {label} never answered: {s:?}"));
    }
    // What did not work the first time, for the report.
    let mut failed_first: Vec<(&String, &Submission)> =
        ledger.iter().filter(|(_, s)| !matches!(s.first.as_str(), "200" | "202" | "puback")).collect();
    failed_first.sort_by_key(|(_, s)| s.sent_ms);
    let hiccups: Vec<String> = failed_first
        .iter()
        .map(|(label, s)| {
            format!(
                "{label} to gateway {} at {}–{} ms: {} ({} tries)",
                s.gateway, s.sent_ms, s.done_ms, s.first, s.tries
            )
        })
        .collect();

    // Sync calls: 200 with the final command from every gateway that was alive throughout the call;
    // only calls to gateway 2 in flight when it was killed may have failed (then retried elsewhere).
    let mut sync_in_flight_at_kill = 0;
    for (label, s) in ledger.iter().filter(|(_, s)| s.kind == Kind::Sync) {
        let gateway_died_during =
            s.gateway == 2 && s.sent_ms <= gateway2_killed && s.done_ms >= gateway2_killed;
        if gateway_died_during && s.first != "200" {
            sync_in_flight_at_kill += 1;
            continue;
        }
        if !(s.first == "200" && s.tries == 1 && s.status.as_deref() == Some("succeeded")) {
            problems.push(format!(
                "sync call {label} to surviving gateway {} not answered 200: {s:?}",
                s.gateway
            ));
        }
    }

    // A final reply for every MQTT submission the broker took.
    let mqtt: Vec<(&String, &Submission)> = ledger.iter().filter(|(_, s)| s.kind == Kind::Mqtt).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while mqtt.iter().any(|(label, _)| !replies.has(label, "final")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One command per submission, and nothing else stored.
    let stored = all_commands(&apis[0]).await;
    let mut by_label: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for c in &stored {
        match c["payload"].as_str() {
            Some(label) => by_label.entry(label.to_owned()).or_default().push(c.clone()),
            None => problems.push(format!("a command with a foreign payload: {c}")),
        }
    }
    for label in by_label.keys().filter(|l| !ledger.contains_key(*l)) {
        problems.push(format!("command(s) no submission asked for: {label}: {:?}", by_label[label]));
    }
    for (label, s) in &ledger {
        let commands = by_label.get(label).map(Vec::as_slice).unwrap_or_default();
        let ids: Vec<_> = commands.iter().map(|c| c["id"].as_str().unwrap_or_default()).collect();
        if ids.len() != 1 {
            problems.push(format!("{label} ({s:?}): {} commands stored, not one: {ids:?}", ids.len()));
        } else if s.id.as_ref().is_some_and(|id| id != ids[0]) {
            problems.push(format!("{label}: the answer named {:?}, the store holds {}", s.id, ids[0]));
        }
    }

    // Every command final, succeeded, its log consistent.
    let audited: Vec<(Value, Vec<Value>)> = futures::stream::iter(stored.iter())
        .map(|c| final_with_events(&apis[0], c["id"].as_str().unwrap()))
        .buffer_unordered(8)
        .collect()
        .await;
    let mut events_of: HashMap<String, Vec<Value>> = HashMap::new();
    for (c, events) in &audited {
        let id = c["id"].as_str().unwrap().to_owned();
        if c["status"] != "succeeded" {
            problems.push(format!("command {id} ended {}: {c}\n{events:?}", c["status"]));
        }
        if let Err(e) = check_events(c, events) {
            problems.push(format!("command {id}: inconsistent event log: {e}\n{c}\n{events:?}"));
        }
        events_of.insert(id, events.clone());
    }
    let statuses = count(audited.iter().map(|(c, _)| c["status"].as_str().unwrap_or_default().to_owned()));
    let attempts = count(audited.iter().map(|(c, _)| c["attempts"].as_i64().unwrap_or_default()));

    // MQTT: exactly one `final` and at most one `accepted` per submission, naming its command, none
    // rejected. A reply the broker delivered again (DUP set, same bytes) is the broker's QoS 1, not a
    // second reply; it is counted apart.
    let (mut missing_accepted, mut redelivered, mut last_final_ms) = (Vec::new(), 0, 0);
    for (label, s) in &mqtt {
        let all = replies.of(label);
        let mut seen: Vec<&[u8]> = Vec::new();
        let mut replies_sent = Vec::new();
        for r in &all {
            if r.dup && seen.contains(&r.payload.as_slice()) {
                redelivered += 1;
                continue;
            }
            seen.push(&r.payload);
            replies_sent.push(r);
        }
        let of = |event: &str| replies_sent.iter().filter(|r| r.event == event).collect::<Vec<_>>();
        let (accepted, finals, rejected) = (of("accepted"), of("final"), of("rejected"));
        let id = by_label.get(*label).and_then(|c| c[0]["id"].as_str()).unwrap_or("(none stored)");
        let story = || {
            let replies: Vec<_> =
                all.iter().map(|r| (r.event.as_str(), r.id.as_deref(), r.dup, r.at_ms)).collect();
            format!("{label} (published {}–{} ms, {} tries; command {id}); replies (event, id, dup, at ms): {replies:?}",
                s.sent_ms, s.done_ms, s.tries)
        };
        if !rejected.is_empty() {
            problems.push(format!("MQTT submission rejected: {}", story()));
        }
        if finals.len() != 1 {
            problems.push(format!(
                "MQTT submission with {} final replies, not one: {}",
                finals.len(),
                story()
            ));
        } else {
            last_final_ms = last_final_ms.max(finals[0].at_ms);
        }
        if finals.iter().chain(&accepted).any(|r| r.id.as_deref() != Some(id)) {
            problems.push(format!("MQTT replies naming another command: {}", story()));
        }
        match accepted.len() {
            0 => missing_accepted.push((label.to_string(), s.sent_ms, id.to_owned())),
            1 => {}
            n => problems.push(format!("MQTT submission with {n} accepted replies: {}", story())),
        }
    }
    // Only a submission gateway 2 stored, and was killed before answering, may lack its `accepted`.
    for (label, sent_ms, id) in &missing_accepted {
        let first_attempt = events_of
            .get(id)
            .into_iter()
            .flatten()
            .find_map(|e| e["detail"].as_str().filter(|d| d.starts_with("attempt 1 by ")))
            .unwrap_or_default()
            .to_owned();
        eprintln!("ha: {label} (command {id}, sent at {sent_ms} ms) got no `accepted`; {first_attempt:?}");
        let in_flight = *sent_ms <= gateway2_killed && gateway2_killed - sent_ms < 5_000;
        if !in_flight || !(first_attempt.is_empty() || first_attempt.contains(&instances[1])) {
            problems.push(format!(
                "{label} (command {id}, sent at {sent_ms} ms) got no `accepted` and was not a submission \
                 gateway 2 ({}) took before it was killed at {gateway2_killed} ms: {first_attempt:?}",
                instances[1]
            ));
        }
    }

    // Which instance took each MQTT submission (its first attempt's event), before and after the NATS kill.
    let nats_killed = kills[3].1;
    let taken_by = count(mqtt.iter().filter_map(|(label, s)| {
        let id = by_label.get(*label)?[0]["id"].as_str()?;
        let detail =
            events_of.get(id)?.iter().find_map(|e| e["detail"].as_str()?.strip_prefix("attempt 1 by "))?;
        let instance = detail.split(':').next()?;
        let gateway = instances.iter().position(|i| i == instance).map_or(0, |i| i + 1);
        Some((if s.sent_ms < nats_killed { "before NATS kill" } else { "after NATS kill" }, gateway))
    }));

    // No device ran a command twice; each command ran once.
    let fleet = || {
        stats.iter().map(|p| read_stats(p)).collect::<Option<Vec<_>>>().map(|s| {
            let mut totals = firmware_sim::Totals::default();
            for f in &s {
                totals.add(&f.totals);
            }
            totals
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while fleet().is_none_or(|t| t.executed < stored.len() as u64) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let totals = fleet().expect("the simulators wrote their stats");
    if totals.executed_ids_repeated != 0 {
        problems.push(format!("{} commands ran twice on a device", totals.executed_ids_repeated));
    }
    if totals.executed != stored.len() as u64 {
        problems.push(format!("devices ran {} commands, {} are stored", totals.executed, stored.len()));
    }

    let by_kind = |kind: Kind| count(ledger.values().filter(|s| s.kind == kind).map(|s| s.first.clone()));
    let retried = |kind: Kind| ledger.values().filter(|s| s.kind == kind && s.tries > 1).count();
    let sync_per_gateway = count(ledger.values().filter(|s| s.kind == Kind::Sync).map(|s| s.gateway));
    eprintln!("ha: first tries that failed ({}): {hiccups:#?}", hiccups.len());
    eprintln!(
        "ha clusters: {} commands {statuses:?}, attempts per command {attempts:?}; \
         async {} (first tries {:?}, {} retried), sync {} per gateway {sync_per_gateway:?} (first tries {:?}, \
         {sync_in_flight_at_kill} in flight at the gateway kill), MQTT {} (first tries {:?}, {} republished; \
         {} without `accepted`, {redelivered} replies redelivered by the broker, last final reply at \
         {last_final_ms} ms, caller connections {} (reply subscriptions refused {}), publisher connections {publisher_connections}, \
         taken by gateway {taken_by:?}); \
         devices executed {} (repeats answered from memory {}), executed twice {}; gateways {instances:?}; \
         kills (what, at ms of load, back to work after) {kills:?}; clusters up in {clusters_up:?}, \
         set up in {setup:?}, load {load_time:?}, whole test {:?}",
        stored.len(),
        ledger.values().filter(|s| s.kind == Kind::Async).count(),
        by_kind(Kind::Async),
        retried(Kind::Async),
        ledger.values().filter(|s| s.kind == Kind::Sync).count(),
        by_kind(Kind::Sync),
        mqtt.len(),
        by_kind(Kind::Mqtt),
        retried(Kind::Mqtt),
        missing_accepted.len(),
        replies.connects.load(Ordering::SeqCst),
        replies.refused.load(Ordering::SeqCst),
        totals.executed,
        totals.duplicates,
        totals.executed_ids_repeated,
        test_started.elapsed()
    );
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    drop((gateways, receivers, sims, haproxy));
}
