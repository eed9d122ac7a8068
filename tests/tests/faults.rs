//! Crash and fault tests on the real binaries, each a child process: the
//! gateway, the receiver, the database and an external broker killed mid-load
//! and started again; devices that drop commands and hang up; a device that
//! never answers. After each: every accepted command is final, its event log
//! is consistent, and no device ran a command twice.
//!
//! Everything runs on free loopback ports with private servers (a private
//! MariaDB for the outage, a private Mosquitto for the broker restart), so
//! nothing here can disturb the other tests or the machine's shared services.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use system_tests::procs::{
    binaries, check_events, free_port, read_stats, within, Api, MariaDb, Mosquitto, Proc, SharedMariaDb,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Simulated devices in each test's main fleet.
const DEVICES: usize = 20;
/// Concurrent submitters in the load.
const SUBMITTERS: usize = 4;
/// How long the audit waits for every accepted command to become final.
const SETTLE: Duration = Duration::from_secs(90);
/// Each submitter's pause after an accepted command in a paced load: about
/// 100 commands/s in all, which the gateway keeps up with (a debug build on
/// 2 cores), so the re-sends counted are the fault's, not those of a report
/// backlog outrunning the ack timeout under an unpaced load.
const PACE: Duration = Duration::from_millis(40);
const FINAL: [&str; 4] = ["succeeded", "failed", "expired", "canceled"];

/// Two tests for each scenario `async fn name(store, database_url)`, one per
/// [`Store`]: `name::sqlite` and `name::mariadb`, both run through [`on_store`].
macro_rules! on_sqlite_and_mariadb {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::{on_store, Store};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                on_store(Store::Sqlite, super::$scenario).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mariadb() {
                on_store(Store::MariaDb, super::$scenario).await;
            }
        }
    )*};
}

on_sqlite_and_mariadb!(
    gateway_kill9_mid_load,
    receiver_kill9_mid_load,
    lossy_churning_devices,
    silent_device_command_expires_at_deadline,
    external_broker_kill9_mid_load,
    receiver_dies_while_its_gateway_is_down,
);

/// The gateway dies with hundreds of commands accepted, the latest still in
/// flight (how many is printed), and comes back on the same database and
/// ports; the receiver finds the restarted embedded broker by itself.
async fn gateway_kill9_mid_load(store: Store, database_url: String) {
    let label = &format!("gateway kill -9 ({store})");
    let mut s = Stack::start(Setup::new(database_url)).await;
    // Unpaced, so as many commands as possible are in flight when it dies.
    let load = Load::start(&s.api, &s.devices);
    load.wait_accepted(200, Duration::from_secs(60)).await;
    let in_flight = s.in_flight().await;
    s.gateway.kill9();
    let at_kill = load.accepted();
    // Let the load meet a dead gateway for a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.gateway.restart();
    s.api.wait_healthy(Duration::from_secs(30)).await;
    load.wait_accepted(load.accepted() + 150, Duration::from_secs(60)).await;
    let loaded = load.stop().await;
    eprintln!("{label}: killed with {at_kill} accepted, {in_flight} of them not final");
    let audit = s.audit(&loaded).await;
    audit.print(label);
    audit.assert_sound();
    audit.assert_all_succeeded();
    loaded.assert_refusals_only(&["transport error", "503"]);
    assert!(
        s.receiver.is_running() && s.receiver.log_count("connected to the broker") >= 2,
        "the receiver (never restarted) reconnected to the new embedded broker"
    );
}

/// The gateway (and with it the embedded broker) is killed, then the receiver
/// dies while nobody listens, so its last will reaches no one and its devices
/// stay "online" in the database. The restarted gateway's roll call gets no
/// answer from it: after the grace period its devices are offline, a new
/// command waits instead of going to a dead receiver, and is delivered once
/// the receiver is back.
async fn receiver_dies_while_its_gateway_is_down(_store: Store, database_url: String) {
    let mut setup = Setup::new(database_url);
    setup.gateway_args = vec!["--rollcall-grace-ms=1500".to_owned()];
    let mut s = Stack::start(setup).await;
    s.gateway.kill9();
    s.receiver.kill9();
    s.gateway.restart();
    s.api.wait_healthy(Duration::from_secs(30)).await;
    for id in &s.devices {
        let api = &s.api;
        system_tests::eventually("a device of the dead receiver shown offline", || async move {
            api.get_ok(&format!("/v1/devices/{id}")).await.1["online"] == false
        })
        .await;
    }
    let body = json!({"name": "echo", "payload": "after", "mode": "async"});
    let (status, c) = s.api.post(&format!("/v1/devices/{}/commands", s.devices[0]), &body).await.unwrap();
    assert_eq!((status, c["status"].as_str()), (202, Some("pending")), "waits for its device: {c}");
    let id = c["id"].as_str().unwrap().to_owned();
    s.receiver.restart();
    s.api.wait_online(&s.devices, Duration::from_secs(30)).await;
    let (status, c) = s.api.get_ok(&format!("/v1/commands/{id}?wait_ms=20000")).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    assert_eq!(c["attempts"], 1, "no attempt was spent on the dead receiver: {c}");
}

/// The receiver dies mid-load and is started again; the devices reconnect to it.
async fn receiver_kill9_mid_load(store: Store, database_url: String) {
    let mut s = Stack::start(Setup::new(database_url)).await;
    let load = Load::paced(&s.api, &s.devices, PACE);
    load.wait_accepted(150, Duration::from_secs(60)).await;
    s.receiver.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.receiver.restart();
    s.api.wait_online(&s.devices, Duration::from_secs(30)).await;
    load.wait_accepted(load.accepted() + 150, Duration::from_secs(60)).await;
    let loaded = load.stop().await;
    let audit = s.audit(&loaded).await;
    audit.print(&format!("receiver kill -9 ({store})"));
    audit.assert_sound();
    audit.assert_all_succeeded();
    loaded.assert_refusals_only(&[]);
}

/// Devices silently drop 30% of new commands and hang up every 200–800 ms:
/// re-sends deliver everything, and nothing runs twice.
async fn lossy_churning_devices(store: Store, database_url: String) {
    let mut setup = Setup::new(database_url);
    setup.sim_args = vec!["--drop-ratio".into(), "0.3".into(), "--churn-ms".into(), "200..800".into()];
    let mut s = Stack::start(setup).await;
    let load = Load::paced(&s.api, &s.devices, PACE);
    load.wait_accepted(300, Duration::from_secs(60)).await;
    let loaded = load.stop().await;
    let audit = s.audit(&loaded).await;
    audit.print(&format!("drop 30% + churn ({store})"));
    audit.assert_sound();
    audit.assert_all_succeeded();
    loaded.assert_refusals_only(&[]);
    assert!(audit.resends > 0 && audit.totals.dropped > 0, "commands were dropped and re-sent");
    assert!(audit.totals.churns > 0, "devices hung up");
}

/// One device never answers: its command (ttl 4 s) expires at its deadline,
/// after re-sends, while the rest of the fleet works normally.
async fn silent_device_command_expires_at_deadline(store: Store, database_url: String) {
    let mut s = Stack::start(Setup::new(database_url)).await;
    let mute = "mute-0000".to_owned();
    s.api.register(&mute).await;
    s.add_sim("mute-sim", &["--devices", "1", "--id-prefix", "mute-", "--drop-ratio", "1.0"]);
    s.api.wait_online(std::slice::from_ref(&mute), Duration::from_secs(30)).await;
    let load = Load::paced(&s.api, &s.devices, PACE);
    let body =
        json!({"name": "echo", "payload": "mute", "mode": "async", "ttl_ms": 4000, "max_attempts": 50});
    let (status, c) = s.api.post(&format!("/v1/devices/{mute}/commands"), &body).await.unwrap();
    assert_eq!(status, 202, "{c}");
    let id = c["id"].as_str().unwrap().to_owned();
    let (status, c) = s.api.get_ok(&format!("/v1/commands/{id}?wait_ms=20000")).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("expired")), "{c}");
    assert_eq!(c["error"]["kind"], "deadline_passed", "{c}");
    assert!(c["attempts"].as_i64().unwrap() >= 2, "re-sent before expiring: {c}");
    assert!(time_ms(&c["completed_at"]) >= time_ms(&c["expires_at"]), "not expired early: {c}");
    load.wait_accepted(100, Duration::from_secs(60)).await;
    let mut loaded = load.stop().await;
    loaded.accepted.push((usize::MAX, id));
    let audit = s.audit(&loaded).await;
    audit.print(&format!("silent device, ttl 4 s ({store})"));
    audit.assert_sound();
    let expected = BTreeMap::from([("expired".to_owned(), 1), ("succeeded".to_owned(), audit.accepted - 1)]);
    assert_eq!(audit.by_status, expected);
    let mute_stats = &audit.sims["mute-sim"];
    assert_eq!(mute_stats.executed, 0, "{mute_stats:?}");
    assert!(mute_stats.dropped >= 1, "{mute_stats:?}");
    loaded.assert_refusals_only(&[]);
}

/// The database (a private MariaDB) is SIGKILLed for ~5 s under load: a
/// submission gets 503 or 202, nothing else; results that arrive meanwhile
/// are applied once it is back; the gateway carries on without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_mid_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = MariaDb::start(dir.path()).await;
    let mut s = Stack::start(Setup::new(db.url())).await;
    let load = Load::paced(&s.api, &s.devices, PACE);
    load.wait_accepted(150, Duration::from_secs(60)).await;
    // One command whose result is sure to arrive during the outage (its device
    // takes 1.5 s), whatever the paced load happens to have in flight.
    let slow = json!({"name": "echo", "payload": {"delay_ms": 1500}, "mode": "async"});
    let (status, c) = s.api.post(&format!("/v1/devices/{}/commands", s.devices[0]), &slow).await.unwrap();
    assert_eq!(status, 202, "{c}");
    let slow_id = c["id"].as_str().unwrap().to_owned();
    system_tests::eventually("the slow command is on its device", || async {
        s.api.get_ok(&format!("/v1/commands/{slow_id}")).await.1["status"] == "delivered"
    })
    .await;
    db.proc.kill9();
    let at_kill = load.accepted();
    // Longer than the pool's 3 s acquire timeout: a result that arrives
    // during the outage cannot be committed by one attempt that just waits
    // for a connection, so it must be retried until the database is back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    db.restart().await;
    let at_restart = load.accepted();
    load.wait_accepted(at_restart + 150, Duration::from_secs(60)).await;
    let mut loaded = load.stop().await;
    loaded.accepted.push((usize::MAX, slow_id));
    let audit = s.audit(&loaded).await;
    let retried = s.gateway.log_count("not applied yet; retrying");
    eprintln!(
        "database outage: {} answered 202 after the kill (in flight at it); {retried} report retries logged",
        at_restart - at_kill
    );
    audit.print("database outage");
    audit.assert_sound();
    audit.assert_all_succeeded();
    loaded.assert_refusals_only(&["503"]);
    assert!(loaded.refused.get("503").is_some_and(|n| *n > 0), "submissions during the outage got 503");
    assert!(retried > 0, "results arrived during the outage and were retried until committed");
    assert!(s.gateway.is_running(), "the gateway rode out the outage without a restart");
}

/// An external broker (a private Mosquitto) is SIGKILLed mid-load and started
/// again on the same port; gateway and receiver reconnect by themselves.
async fn external_broker_kill9_mid_load(store: Store, database_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path()).await;
    let mut setup = Setup::new(database_url);
    setup.broker = Some(broker.url());
    let mut s = Stack::start(setup).await;
    let load = Load::paced(&s.api, &s.devices, PACE);
    load.wait_accepted(150, Duration::from_secs(60)).await;
    broker.proc.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart().await;
    load.wait_accepted(load.accepted() + 150, Duration::from_secs(60)).await;
    let loaded = load.stop().await;
    let audit = s.audit(&loaded).await;
    audit.print(&format!("mosquitto kill -9 ({store})"));
    audit.assert_sound();
    audit.assert_all_succeeded();
    loaded.assert_refusals_only(&[]);
}

// ---- the system under test ----

/// What to run.
struct Setup {
    database_url: String,
    /// External broker URL; `None` embeds one in the gateway.
    broker: Option<String>,
    /// Extra firmware-sim flags (faults).
    sim_args: Vec<String>,
    /// Extra `gateway serve` flags.
    gateway_args: Vec<String>,
}

impl Setup {
    fn new(database_url: String) -> Setup {
        Setup { database_url, broker: None, sim_args: Vec::new(), gateway_args: Vec::new() }
    }
}

/// Gateway, receiver and fleets, each a process; logs and stats in `dir`.
struct Stack {
    api: Api,
    gateway: Proc,
    receiver: Proc,
    sims: Vec<Sim>,
    devices: Vec<String>,
    receiver_tcp: SocketAddr,
    /// Last, so the processes are gone before it is; kept if a test fails.
    dir: Option<tempfile::TempDir>,
}

struct Sim {
    proc: Proc,
    stats: PathBuf,
}

impl Stack {
    /// Starts gateway, receiver and a fleet of [`DEVICES`], registers the
    /// devices and waits until all are online.
    async fn start(setup: Setup) -> Stack {
        let bins = binaries();
        let dir = tempfile::tempdir().unwrap();
        let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
        let prefix = format!("f{}", uuid::Uuid::new_v4().simple());
        let broker = setup.broker.clone().unwrap_or_else(|| format!("mqtt://{mqtt}"));
        let mut gateway_args = vec![
            "serve".to_owned(),
            format!("--database-url={}", setup.database_url),
            format!("--http-listen={http}"),
            format!("--topic-prefix={prefix}"),
            format!("--instance-id=gw-{prefix}"),
            "--ack-timeout-ms=1000".to_owned(),
            "--result-timeout-ms=2000".to_owned(),
            "--retry-base-ms=100".to_owned(),
            "--retry-cap-ms=500".to_owned(),
            "--sweep-interval-ms=100".to_owned(),
        ];
        gateway_args.push(match &setup.broker {
            Some(url) => format!("--broker={url}"),
            None => format!("--mqtt-listen={mqtt}"),
        });
        gateway_args.extend(setup.gateway_args.iter().cloned());
        let gateway = Proc::start("gateway", &bins.gateway, &gateway_args, dir.path());
        let api = Api::new(http);
        api.wait_healthy(Duration::from_secs(60)).await;
        let receiver_args = [
            format!("--broker={broker}"),
            format!("--tcp-listen={tcp}"),
            format!("--receiver-id=rx-{prefix}"),
            format!("--topic-prefix={prefix}"),
        ];
        let receiver = Proc::start("receiver", &bins.receiver, &receiver_args, dir.path());
        let devices: Vec<String> = (0..DEVICES).map(|i| firmware_sim::device_id("dev-", i)).collect();
        for id in &devices {
            api.register(id).await;
        }
        let mut stack =
            Stack { api, gateway, receiver, sims: Vec::new(), devices, receiver_tcp: tcp, dir: Some(dir) };
        let mut sim_args =
            vec!["--devices".to_owned(), DEVICES.to_string(), "--latency-ms".into(), "0..20".into()];
        sim_args.extend(setup.sim_args);
        stack.add_sim("sim", &sim_args);
        stack.api.wait_online(&stack.devices, Duration::from_secs(30)).await;
        stack
    }

    fn dir(&self) -> &std::path::Path {
        self.dir.as_ref().expect("dir lives as long as the stack").path()
    }

    /// Starts another firmware-sim connected to the receiver, with its own stats file.
    fn add_sim<S: AsRef<str>>(&mut self, name: &str, args: &[S]) {
        let stats = self.dir().join(format!("{name}-stats.json"));
        let mut all =
            vec![format!("--connect={}", self.receiver_tcp), format!("--stats-file={}", stats.display())];
        all.extend(args.iter().map(|a| a.as_ref().to_owned()));
        let proc = Proc::start(name, &binaries().firmware_sim, &all, self.dir());
        self.sims.push(Sim { proc, stats });
    }

    /// Commands not final now (the newest 1000).
    async fn in_flight(&self) -> usize {
        let (_, page) = self.api.get_ok("/v1/commands?limit=1000").await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        items.iter().filter(|c| !FINAL.contains(&c["status"].as_str().unwrap_or(""))).count()
    }

    /// Waits until every accepted command is final (or [`SETTLE`] has passed),
    /// then checks each one's event log, lists everything stored, stops the
    /// fleets (SIGTERM: they write their stats a last time) and reads their stats.
    async fn audit(&mut self, loaded: &Loaded) -> Audit {
        let deadline = Instant::now() + SETTLE;
        let api = self.api.clone();
        let finals: Vec<(String, Value)> =
            futures::stream::iter(loaded.accepted.iter().map(|(_, id)| id.clone()))
                .map(|id| {
                    let api = api.clone();
                    async move {
                        let c = settle(&api, &id, deadline).await;
                        (id, c)
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
        let mut audit = Audit { accepted: finals.len(), ..Audit::default() };
        for (id, c) in &finals {
            let status = c["status"].as_str().unwrap_or("?").to_owned();
            let (_, events) = self.api.get_ok(&format!("/v1/commands/{id}/events")).await;
            let events = events["items"].as_array().cloned().unwrap_or_default();
            if !FINAL.contains(&status.as_str()) {
                audit.lost.push(format!("{id}: {c}\n  events: {}", Value::Array(events.clone())));
            }
            if let Err(why) = check_events(c, &events) {
                audit
                    .bad_logs
                    .push(format!("{id}: {why}\n  command: {c}\n  events: {}", Value::Array(events)));
            }
            if status == "succeeded" && c["result"]["payload"] != c["payload"] {
                audit.wrong_results.push(format!("{id}: echo answered another payload: {c}"));
            }
            audit.resends += c["attempts"].as_i64().unwrap_or(0).saturating_sub(1).max(0);
            *audit.by_status.entry(status).or_default() += 1;
        }
        self.audit_store(loaded, &mut audit).await;
        for sim in &mut self.sims {
            sim.proc.terminate(Duration::from_secs(10)).await;
            let stats =
                read_stats(&sim.stats).unwrap_or_else(|| panic!("{} wrote no stats", sim.proc.name()));
            audit.totals.add(&stats.totals);
            audit.sims.insert(sim.proc.name().to_owned(), stats.totals);
        }
        audit
    }

    /// Everything stored, accepted or not: all final, and which were stored
    /// although their submission did not answer 202.
    async fn audit_store(&self, loaded: &Loaded, audit: &mut Audit) {
        let accepted: HashSet<&str> = loaded.accepted.iter().map(|(_, id)| id.as_str()).collect();
        let mut cursor = String::new();
        loop {
            let (status, page) = self.api.get_ok(&format!("/v1/commands?limit=1000&cursor={cursor}")).await;
            assert_eq!(status, 200, "{page}");
            for c in page["items"].as_array().unwrap() {
                audit.stored += 1;
                let id = c["id"].as_str().unwrap();
                let status = c["status"].as_str().unwrap_or("?");
                if status == "succeeded" {
                    audit.stored_succeeded += 1;
                }
                if !FINAL.contains(&status) {
                    audit.stored_not_final.push(c.to_string());
                }
                if !accepted.contains(id) {
                    let refusal = c["payload"].as_u64().and_then(|i| loaded.refusals.get(&(i as usize)));
                    let answer = refusal.map_or("?".to_owned(), |r| format!("{} {}", r.kind, r.detail));
                    audit
                        .stored_unaccepted
                        .push(format!("{id}, its POST answered: {answer}\n    stored: {c}"));
                }
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = next.to_owned(),
                None => break,
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("logs and stats kept in {}", dir.keep().display());
            }
        }
    }
}

/// Long-polls a command until it is final or `deadline` passes; returns it as it stands.
async fn settle(api: &Api, id: &str, deadline: Instant) -> Value {
    loop {
        let (_, c) = api.get_ok(&format!("/v1/commands/{id}?wait_ms=5000")).await;
        if FINAL.contains(&c["status"].as_str().unwrap_or("")) || Instant::now() >= deadline {
            return c;
        }
    }
}

fn time_ms(v: &Value) -> i128 {
    let text = v.as_str().unwrap_or_else(|| panic!("{v} is not a time"));
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap();
    t.unix_timestamp_nanos() / 1_000_000
}

/// What a test found.
#[derive(Debug, Default)]
struct Audit {
    accepted: usize,
    /// Final (or not) status of the accepted commands.
    by_status: BTreeMap<String, usize>,
    /// Accepted and not final after [`SETTLE`].
    lost: Vec<String>,
    bad_logs: Vec<String>,
    wrong_results: Vec<String>,
    /// Sum over accepted commands of attempts - 1.
    resends: i64,
    stored: usize,
    stored_succeeded: usize,
    stored_not_final: Vec<String>,
    /// Stored although the submission did not answer 202.
    stored_unaccepted: Vec<String>,
    /// Fleet totals, and per firmware-sim process.
    totals: firmware_sim::Totals,
    sims: BTreeMap<String, firmware_sim::Totals>,
}

impl Audit {
    fn count(&self, status: &str) -> usize {
        self.by_status.get(status).copied().unwrap_or(0)
    }

    fn print(&self, label: &str) {
        eprintln!(
            "{label}: accepted {}, succeeded {}, failed {}, expired {}, lost {}, executed twice {} \
             | re-sends {}, stored {} ({} without a 202), device runs {}, answered from memory {}, \
             dropped {}, churns {}",
            self.accepted,
            self.count("succeeded"),
            self.count("failed"),
            self.count("expired"),
            self.lost.len(),
            self.totals.executed_ids_repeated,
            self.resends,
            self.stored,
            self.stored_unaccepted.len(),
            self.totals.executed,
            self.totals.duplicates,
            self.totals.dropped,
            self.totals.churns,
        );
        for s in &self.stored_unaccepted {
            eprintln!("  stored without a 202: {s}");
        }
    }

    /// What must hold after any fault.
    fn assert_sound(&self) {
        assert!(self.lost.is_empty(), "accepted commands never final:\n{}", self.lost.join("\n"));
        assert!(self.bad_logs.is_empty(), "inconsistent event logs:\n{}", self.bad_logs.join("\n"));
        assert!(self.wrong_results.is_empty(), "{}", self.wrong_results.join("\n"));
        assert_eq!(self.totals.executed_ids_repeated, 0, "a device ran a command twice: {:?}", self.sims);
        assert!(self.stored >= self.accepted, "{} stored < {} accepted", self.stored, self.accepted);
        assert!(
            self.stored_not_final.is_empty(),
            "stored commands never final:\n{}",
            self.stored_not_final.join("\n")
        );
        assert_eq!(
            self.totals.executed as usize, self.stored_succeeded,
            "every succeeded command ran exactly once on its device (totals {:?})",
            self.totals
        );
    }

    fn assert_all_succeeded(&self) {
        let expected = BTreeMap::from([("succeeded".to_owned(), self.accepted)]);
        assert_eq!(self.by_status, expected, "with a 120 s ttl and 50 attempts every command succeeds");
    }
}

// ---- load ----

/// Submitters posting async echo commands round-robin over the devices, each
/// with a unique payload (its submission number). A 202 is an accepted
/// command; anything else (503, connection refused) is counted and the
/// submitter moves on to a new command after a short pause.
struct Load {
    shared: Arc<LoadShared>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

struct LoadShared {
    api: Api,
    /// Each submitter's pause after an accepted command (zero: as fast as the gateway answers).
    pace: Duration,
    devices: Vec<String>,
    stop: CancellationToken,
    next: AtomicUsize,
    /// (submission number, command id)
    accepted: Mutex<Vec<(usize, String)>>,
    /// submission number → how it was refused
    refusals: Mutex<HashMap<usize, Refusal>>,
}

/// A submission that did not answer 202: the status code (or "transport
/// error") and the body (or the error).
#[derive(Debug, Clone)]
struct Refusal {
    kind: String,
    detail: String,
}

/// What a load did.
#[derive(Debug, Default)]
struct Loaded {
    accepted: Vec<(usize, String)>,
    refusals: HashMap<usize, Refusal>,
    /// Refusals counted by kind.
    refused: BTreeMap<String, usize>,
}

impl Loaded {
    fn assert_refusals_only(&self, allowed: &[&str]) {
        let other: Vec<_> = self.refused.keys().filter(|k| !allowed.contains(&k.as_str())).collect();
        assert!(other.is_empty(), "submissions refused unexpectedly: {:?}", self.refused);
    }
}

impl Load {
    /// As fast as the gateway takes them: builds a backlog of commands in flight.
    fn start(api: &Api, devices: &[String]) -> Load {
        Load::paced(api, devices, Duration::ZERO)
    }

    /// At most `SUBMITTERS` commands per `pace`.
    fn paced(api: &Api, devices: &[String], pace: Duration) -> Load {
        let shared = Arc::new(LoadShared {
            api: api.clone(),
            pace,
            devices: devices.to_vec(),
            stop: CancellationToken::new(),
            next: AtomicUsize::new(0),
            accepted: Mutex::new(Vec::new()),
            refusals: Mutex::new(HashMap::new()),
        });
        let workers = (0..SUBMITTERS).map(|_| tokio::spawn(submit_until_stopped(shared.clone()))).collect();
        Load { shared, workers }
    }

    fn accepted(&self) -> usize {
        self.shared.accepted.lock().unwrap().len()
    }

    async fn wait_accepted(&self, n: usize, timeout: Duration) {
        within(&format!("{n} commands accepted"), timeout, || async { self.accepted() >= n }).await;
    }

    async fn stop(self) -> Loaded {
        self.shared.stop.cancel();
        for w in self.workers {
            w.await.expect("a submitter panicked");
        }
        let accepted = std::mem::take(&mut *self.shared.accepted.lock().unwrap());
        let refusals = std::mem::take(&mut *self.shared.refusals.lock().unwrap());
        let mut refused = BTreeMap::new();
        for r in refusals.values() {
            *refused.entry(r.kind.clone()).or_default() += 1;
        }
        Loaded { accepted, refusals, refused }
    }
}

async fn submit_until_stopped(load: Arc<LoadShared>) {
    while !load.stop.is_cancelled() {
        let i = load.next.fetch_add(1, Ordering::Relaxed);
        let device = &load.devices[i % load.devices.len()];
        let body =
            json!({"name": "echo", "payload": i, "mode": "async", "ttl_ms": 120_000, "max_attempts": 50});
        let refused = match load.api.post(&format!("/v1/devices/{device}/commands"), &body).await {
            Ok((202, c)) => {
                let id = c["id"].as_str().unwrap_or_else(|| panic!("a 202 without an id: {c}"));
                load.accepted.lock().unwrap().push((i, id.to_owned()));
                tokio::time::sleep(load.pace).await;
                None
            }
            Ok((status, body)) => Some(Refusal { kind: status.to_string(), detail: body.to_string() }),
            Err(e) => Some(Refusal { kind: "transport error".to_owned(), detail: e.to_string() }),
        };
        if let Some(refusal) = refused {
            load.refusals.lock().unwrap().insert(i, refusal);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---- where the gateway stores its commands ----

/// The database a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// A file in a fresh temporary directory.
    Sqlite,
    /// A fresh database on the shared server ([`SharedMariaDb`]).
    MariaDb,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::Sqlite => "sqlite",
            Store::MariaDb => "mariadb",
        })
    }
}

/// Runs `scenario(store, database_url)` on a fresh database of `store`. The
/// MariaDB database is dropped whether the scenario passes or panics; the
/// test is skipped (with a message) when the server is unreachable outside CI.
async fn on_store<F, Fut>(store: Store, scenario: F)
where
    F: FnOnce(Store, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    match store {
        Store::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite:{}", dir.path().join("gw.db").display());
            scenario(store, url).await;
        }
        Store::MariaDb => {
            let Some(db) = SharedMariaDb::create().await else { return };
            let run = scenario(store, db.url.clone());
            let outcome = std::panic::AssertUnwindSafe(run).catch_unwind().await;
            db.drop_database().await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

// ---- a database on the shared MariaDB ----
