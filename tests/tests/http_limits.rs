//! HTTP connection limits and the file-descriptor budget (issue 13: ~20,000
//! idle HTTP connections once used up the gateway's descriptors and shut
//! out the embedded MQTT broker in the same process). The gateway runs as
//! a real process with low limits, so the descriptors counted in
//! `/proc/<pid>/fd` are its own:
//!
//! - a slowloris — [`ATTACKERS`] connections held at once,
//!   half silent, half trickling a request head a byte at a time, each
//!   reconnecting when closed, [`MAX_ATTACK_CONNECTIONS`] in all — costs
//!   the legitimate traffic nothing: every HTTP sync command beside it
//!   succeeds within 5 s, an MQTT client connects to the embedded broker
//!   and its command completes, and the gateway never holds more
//!   descriptors than its HTTP share allows (nor its whole budget);
//! - once the attack stops reconnecting, every one of its connections is
//!   closed by the gateway (header-read timeout) and the descriptors are
//!   back to where they were;
//! - with every connection busy, one more gets `503` with `Retry-After`
//!   and a JSON error; a kept-alive connection is closed after the header
//!   timeout; request heads over the limit get a 4xx;
//! - the counters show on `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use system_tests::procs::{binaries, free_port, within, Api, Proc, SharedMariaDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `--http-max-connections` of the gateway under test.
const LIMIT: usize = 40;
const HEADER_TIMEOUT_MS: u64 = 2_000;
const IDLE_TIMEOUT_MS: u64 = 4_000;
const MAX_HEAD: usize = 16 * 1024;
const MQTT_MAX: usize = 64;
const RESERVE: usize = 128;
/// Attack connections held at once: twice the limit, so that with the
/// connections the gateway answers `503` ([`REFUSAL_SLOTS`]) every
/// legitimate connection gets an answer. (Beyond limit + refusal slots, a
/// connection over the limit may be closed unanswered.)
const ATTACKERS: usize = 2 * LIMIT;
/// Attack connections opened in all.
const MAX_ATTACK_CONNECTIONS: usize = 3_000;
/// `gateway::http::serve::REFUSAL_SLOTS`: connections over the limit being answered 503.
const REFUSAL_SLOTS: usize = 64;
const DEVICES: usize = 2;

#[derive(Debug, Clone, Copy)]
enum Store {
    Sqlite,
    MariaDb,
}

mod slowloris_costs_the_others_nothing {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::on_store(super::Store::Sqlite, super::slowloris_costs_the_others_nothing).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mariadb() {
        super::on_store(super::Store::MariaDb, super::slowloris_costs_the_others_nothing).await;
    }
}

/// Gateway (embedded broker), receiver and a fleet, each a process.
struct Stack {
    gateway: Proc,
    _receiver: Proc,
    _sim: Proc,
    api: Api,
    http: SocketAddr,
    mqtt: SocketAddr,
    prefix: String,
    devices: Vec<String>,
    /// Last, so the processes are gone before it is.
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(database_url: &str) -> Stack {
        let bins = binaries();
        let dir = tempfile::tempdir().unwrap();
        let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
        let prefix = format!("h{}", uuid::Uuid::new_v4().simple());
        let gateway_args = vec![
            "serve".to_owned(),
            format!("--database-url={database_url}"),
            format!("--http-listen={http}"),
            format!("--mqtt-listen={mqtt}"),
            format!("--topic-prefix={prefix}"),
            format!("--http-max-connections={LIMIT}"),
            format!("--http-header-timeout-ms={HEADER_TIMEOUT_MS}"),
            format!("--http-idle-timeout-ms={IDLE_TIMEOUT_MS}"),
            format!("--http-max-head-bytes={MAX_HEAD}"),
            format!("--mqtt-max-connections={MQTT_MAX}"),
            format!("--fd-reserve={RESERVE}"),
        ];
        let gateway = Proc::start("gateway", &bins.gateway, &gateway_args, dir.path());
        let api = Api::new(http);
        api.wait_healthy(Duration::from_secs(60)).await;
        let receiver_args = [
            format!("--broker=mqtt://{mqtt}"),
            format!("--tcp-listen={tcp}"),
            format!("--receiver-id=rx-{prefix}"),
            format!("--topic-prefix={prefix}"),
        ];
        let receiver = Proc::start("receiver", &bins.receiver, &receiver_args, dir.path());
        let devices: Vec<String> = (0..DEVICES).map(|i| firmware_sim::device_id("dev-", i)).collect();
        for id in &devices {
            api.register(id).await;
        }
        let sim_args = [format!("--connect={tcp}"), "--devices".to_owned(), DEVICES.to_string()];
        let sim = Proc::start("sim", &bins.firmware_sim, &sim_args, dir.path());
        api.wait_online(&devices, Duration::from_secs(30)).await;
        Stack { gateway, _receiver: receiver, _sim: sim, api, http, mqtt, prefix, devices, _dir: dir }
    }

    /// Open file descriptors of the gateway process.
    fn fds(&self) -> usize {
        let pid = self.gateway.pid().expect("the gateway runs");
        std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
    }

    /// `/metrics` as text (retried: a connection may meet the limit).
    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.http);
        for _ in 0..50 {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status() == 200 {
                    return r.text().await.unwrap();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/metrics did not answer");
    }

    async fn metric(&self, name: &str) -> u64 {
        metric(&self.metrics().await, name)
    }
}

/// The value of `name` in a Prometheus text exposition (panics if absent).
fn metric(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not on /metrics:\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() as u64
}

async fn slowloris_costs_the_others_nothing(database_url: String) {
    let s = Stack::start(&database_url).await;
    let baseline = s.fds();
    // Over the baseline: the HTTP share and the 503 answers, plus one MQTT
    // client and the legitimate requests' connections.
    let bound = baseline + LIMIT + REFUSAL_SLOTS + 8;
    let budget = LIMIT + MQTT_MAX + 16 + RESERVE;
    eprintln!("gateway descriptors at rest: {baseline}; bound under attack {bound}, budget {budget}");

    let attack = Attack::start(s.http);
    // Wait until every attacker has connected: 2× what the gateway allows.
    within("every attacker connected", Duration::from_secs(20), || async {
        attack.opened.load(Ordering::SeqCst) >= ATTACKERS
    })
    .await;
    let watch = FdWatch::start(s.gateway.pid().unwrap());

    // Legitimate traffic beside it: HTTP sync commands, each on a new connection…
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // A 503 (every connection busy) is retried after its Retry-After, as a
    // client should; a transport error fails the test.
    let commands = async {
        let (mut slowest, mut refused) = (Duration::ZERO, 0);
        for i in 0..20 {
            let device = &s.devices[i % DEVICES];
            let started = Instant::now();
            let (status, c) = loop {
                let r = http
                    .post(format!("http://{}/v1/devices/{device}/commands", s.http))
                    .json(&json!({"name": "echo", "payload": i, "wait_ms": 5000}))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("legitimate command {i} during the attack: {e}"));
                if r.status() == 503 {
                    refused += 1;
                    let after = r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
                    tokio::time::sleep(Duration::from_secs(after)).await;
                    continue;
                }
                break (r.status().as_u16(), r.json::<Value>().await.unwrap());
            };
            assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "command {i}: {c}");
            slowest = slowest.max(started.elapsed());
        }
        (slowest, refused)
    };
    // …and, at the same time, a command over MQTT through the embedded broker.
    let mqtt = tokio::time::timeout(Duration::from_secs(20), mqtt_command(&s));
    let ((slowest, refused), reply) = tokio::join!(commands, mqtt);
    assert!(slowest < Duration::from_secs(5), "slowest legitimate command {slowest:?}");
    let reply = reply.expect("the MQTT command completes within 20 s");
    assert_eq!(reply["status"], "succeeded", "{reply}");
    let during = s.metrics().await;
    assert!(metric(&during, "gateway_http_connections_evicted_total") > 0, "{during}");
    // Its connections were closed (evicted, or at the header timeout) and it
    // came back: waited for, as the commands may all be done before the first
    // closed attacker has noticed.
    within("the attack reconnected", Duration::from_secs(20), || async {
        attack.opened.load(Ordering::SeqCst) > ATTACKERS
    })
    .await;

    // The attack stops reconnecting but keeps what it holds: the gateway
    // closes all of it, and its descriptors come back to the baseline.
    let opened = attack.stop().await;
    let peak = watch.stop().await;
    eprintln!(
        "slowloris: {opened} connections opened; gateway descriptors {baseline} at rest, peak {peak} \
         (bound {bound}); slowest of 20 legitimate commands {slowest:?}, {refused} 503s retried"
    );
    assert!(peak <= bound && peak <= budget, "peak {peak} descriptors: bound {bound}, budget {budget}");
    within("the gateway's descriptors back at rest", Duration::from_secs(20), || async {
        s.fds() <= baseline + 2
    })
    .await;
    let after = s.metrics().await;
    assert!(metric(&after, "gateway_http_header_timeouts_total") > 0, "{after}");
    for name in [
        "gateway_http_connections_refused_total",
        "gateway_http_idle_closed_total",
        "gateway_http_heads_refused_total",
        "gateway_http_accept_errors_total",
        "gateway_http_connections_open",
    ] {
        metric(&after, name);
    }
    let (status, c) = s
        .api
        .post(&format!("/v1/devices/{}/commands", s.devices[0]), &json!({"name": "echo"}))
        .await
        .unwrap();
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "after the attack: {c}");
}

/// [`ATTACKERS`] slowloris connections, each opened again (after 200 ms)
/// when the gateway closes it, until [`MAX_ATTACK_CONNECTIONS`] or `stop`.
struct Attack {
    stop: CancellationToken,
    /// Connections open now, and opened in all.
    open: Arc<AtomicUsize>,
    opened: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Attack {
    fn start(addr: SocketAddr) -> Attack {
        let stop = CancellationToken::new();
        let (open, opened) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = (0..ATTACKERS)
            .map(|i| {
                let (stop, open, opened) = (stop.clone(), open.clone(), opened.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled()
                        && opened.fetch_add(1, Ordering::SeqCst) < MAX_ATTACK_CONNECTIONS
                    {
                        let Ok(mut conn) = TcpStream::connect(addr).await else { break };
                        open.fetch_add(1, Ordering::SeqCst);
                        hold(&mut conn, i % 2 == 1).await;
                        open.fetch_sub(1, Ordering::SeqCst);
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                })
            })
            .collect();
        Attack { stop, open, opened, tasks }
    }

    /// Stops reconnecting and waits (at most 20 s) until the gateway has
    /// closed every connection still held. Returns how many were opened.
    async fn stop(self) -> usize {
        self.stop.cancel();
        let all = futures::future::join_all(self.tasks);
        tokio::time::timeout(Duration::from_secs(20), all).await.unwrap_or_else(|_| {
            panic!("{} attack connections still open after 20 s", self.open.load(Ordering::SeqCst))
        });
        self.opened.load(Ordering::SeqCst).min(MAX_ATTACK_CONNECTIONS)
    }
}

/// Holds `conn` until the gateway closes it: silent, or (`trickle`) sending
/// a request head one byte every 300 ms, never finishing it.
async fn hold(conn: &mut TcpStream, trickle: bool) {
    let head = b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    if trickle && conn.write_all(head).await.is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = conn.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(300)), if trickle => {
                if conn.write_all(b"a").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The highest descriptor count of a process, sampled every 50 ms.
struct FdWatch {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<usize>,
}

impl FdWatch {
    fn start(pid: u32) -> FdWatch {
        let stop = CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !until.is_cancelled() {
                let n = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
                peak = peak.max(n);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        });
        FdWatch { stop, task }
    }

    async fn stop(self) -> usize {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// Connects to the embedded broker, submits an echo command over MQTT and
/// returns its final reply.
async fn mqtt_command(s: &Stack) -> Value {
    let mut options =
        MqttOptions::new(format!("caller-{}", s.prefix), s.mqtt.ip().to_string(), s.mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let reply_to = format!("{}-replies/slowloris", s.prefix);
    client.subscribe(reply_to.clone(), QoS::AtLeastOnce).await.unwrap();
    let submit = json!({"device_id": s.devices[0], "name": "echo", "payload": "over mqtt", "reply_to": reply_to, "correlation_id": "m-1"});
    let mut sent = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) if !sent => {
                let topic = protocol::Topics::new(&s.prefix).submit();
                client.publish(topic, QoS::AtLeastOnce, false, submit.to_string()).await.unwrap();
                sent = true;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let reply: Value = serde_json::from_slice(&p.payload).unwrap();
                if reply["event"] == "final" {
                    return reply;
                }
                assert_eq!(reply["event"], "accepted", "{reply}");
            }
            Ok(_) => {}
            Err(e) => panic!("the MQTT caller lost the embedded broker: {e}"),
        }
    }
}

/// With every connection busy (long-polls), one more is answered `503` with
/// `Retry-After` and a JSON error; a kept-alive connection is closed after
/// the header timeout; request heads over the limit get a 4xx; each counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_timeouts_and_oversized_heads() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("gw.db").display());
    let s = Stack::start(&url).await;

    // A command that stays pending: its device is registered, never online.
    s.api.register("ghost-0001").await;
    let (status, c) = s
        .api
        .post("/v1/devices/ghost-0001/commands", &json!({"name": "echo", "mode": "async"}))
        .await
        .unwrap();
    assert_eq!(status, 202, "{c}");
    let id = c["id"].as_str().unwrap().to_owned();
    let long_poll = format!("GET /v1/commands/{id}?wait_ms=8000 HTTP/1.1\r\nHost: x\r\n\r\n");
    let poll = || async {
        let mut conn = TcpStream::connect(s.http).await.unwrap();
        conn.write_all(long_poll.as_bytes()).await.unwrap();
        conn
    };
    let mut polls = Vec::new();
    for _ in 1..LIMIT {
        polls.push(poll().await);
    }
    // All but one place busy (the last is this metrics request's own)…
    within("every long-poll under way", Duration::from_secs(10), || async {
        s.metric("gateway_http_requests_under_way").await >= LIMIT as u64
    })
    .await;
    // …then the last: one more connection gets 503. (A probe that comes
    // before the last long-poll's head is read evicts it and is answered:
    // then again.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        polls.push(poll().await);
        let probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let answer = raw_request(s.http, probe).await;
        if answer.starts_with("HTTP/1.1 503") {
            break answer;
        }
        assert!(Instant::now() < deadline, "no 503 with every connection busy: {answer:?}");
    };
    let lower = refusal.to_ascii_lowercase();
    assert!(
        lower.contains("retry-after: 1") && lower.contains("content-type: application/json"),
        "{refusal}"
    );
    let body: Value = serde_json::from_str(refusal.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["kind"], "overloaded", "{body}");
    // The long-polls end (200, still pending), or were evicted by a probe.
    for mut conn in polls {
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(15), conn.read(&mut buf)).await;
        assert!(read.is_ok(), "a long-poll neither answered nor closed");
    }

    // Kept alive after an answer, then silent: closed by the gateway.
    let mut conn = TcpStream::connect(s.http).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "kept-alive idle connection closed: {closed:?}");

    // Heads over --http-max-head-bytes: a long request line, many headers.
    let line = format!("GET /v1/devices/{} HTTP/1.1\r\nHost: x\r\n\r\n", "d".repeat(MAX_HEAD + 1000));
    let headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        "X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(MAX_HEAD / 40)
    );
    for head in [line, headers] {
        let answer = raw_request(s.http, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer:?}");
    }
    // A URI over the API's own 8 KiB, within the head limit: its JSON 414.
    let uri =
        format!("GET /v1/devices/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "d".repeat(9000));
    let answer = raw_request(s.http, uri.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 414") && answer.contains("uri_too_long"), "{answer:?}");

    let text = s.metrics().await;
    assert!(metric(&text, "gateway_http_connections_refused_total") >= 1, "{text}");
    assert!(metric(&text, "gateway_http_heads_refused_total") >= 2, "{text}");
    within("the idle close counted", Duration::from_secs(10), || async {
        s.metric("gateway_http_header_timeouts_total").await
            + s.metric("gateway_http_idle_closed_total").await
            >= 1
    })
    .await;
}

/// The gateway refuses to start when its shares do not fit the descriptor
/// limit, naming the flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_over_the_descriptor_limit_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "serve".to_owned(),
        format!("--database-url=sqlite:{}", dir.path().join("gw.db").display()),
        format!("--http-listen={}", free_port()),
        format!("--mqtt-listen={}", free_port()),
        "--http-max-connections=100000000".to_owned(),
    ];
    let mut gateway = Proc::start("gateway", &binaries().gateway, &args, dir.path());
    within("the gateway exits", Duration::from_secs(30), || {
        let running = gateway.is_running();
        async move { !running }
    })
    .await;
    let log = std::fs::read_to_string(gateway.log_path()).unwrap();
    assert!(log.contains("--http-max-connections") && log.contains("do not fit"), "{log}");
}

/// Writes `request` on a new connection and reads the answer until the
/// gateway closes the connection (or 10 s).
async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let Ok(mut conn) = TcpStream::connect(addr).await else { return String::new() };
    let _ = conn.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Runs `scenario(database_url)` on a fresh database of `store`; the
/// MariaDB database is dropped whether it passes or panics (skipped with a
/// message when MariaDB is unreachable outside CI).
async fn on_store<F, Fut>(store: Store, scenario: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match store {
        Store::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            scenario(format!("sqlite:{}", dir.path().join("gw.db").display())).await;
        }
        Store::MariaDb => {
            let Some(db) = SharedMariaDb::create().await else { return };
            let outcome = std::panic::AssertUnwindSafe(scenario(db.url.clone())).catch_unwind().await;
            db.drop_database().await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        }
    }
}
