//! Smoke tests of the cluster harness (`system_tests::clusters`): a real
//! 3-node MariaDB Galera cluster (and HAProxy in front of it) and a real
//! 3-node NATS cluster with MQTT, each node a child process on loopback that
//! is killed with SIGKILL and started again. Outside CI a missing program
//! skips a test (`SKIPPED:`); in CI (CI=true) it fails it.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use sqlx::{Connection, MySqlConnection};
use system_tests::clusters::{
    mqtt_poll_until, mqtt_publish_acked, nats_mqtt_client, Galera, HaProxy, NatsCluster,
};
use system_tests::procs::within;
use tokio::time::Instant;

/// Any single step of these tests (a commit that waits out a node's death, a
/// reconnection) must finish within this.
const STEP: Duration = Duration::from_secs(30);

/// How long MQTT on the surviving NATS nodes may take to work again after a
/// node is killed (JetStream leader elections; 15–25 s seen).
const FAILOVER: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> MySqlConnection {
    tokio::time::timeout(STEP, MySqlConnection::connect(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} took over {STEP:?}"))
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

/// Connects, retrying failed attempts (a proxy that has not yet marked a dead node down) for [`STEP`].
async fn reconnect(url: &str) -> MySqlConnection {
    let deadline = Instant::now() + STEP;
    loop {
        match tokio::time::timeout(STEP, MySqlConnection::connect(url)).await {
            Ok(Ok(conn)) => return conn,
            Ok(Err(e)) if Instant::now() < deadline => eprintln!("connecting to {url}: {e}; again"),
            Ok(Err(e)) => panic!("connecting to {url}: {e}"),
            Err(_) => panic!("connecting to {url} took over {STEP:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn insert(conn: &mut MySqlConnection, v: &str) {
    tokio::time::timeout(STEP, sqlx::query("INSERT INTO smoke (v) VALUES (?)").bind(v).execute(conn))
        .await
        .unwrap_or_else(|_| panic!("INSERT {v} took over {STEP:?}"))
        .unwrap_or_else(|e| panic!("INSERT {v}: {e}"));
}

/// The rows' values as node `url` sees them, after it has applied everything
/// committed anywhere before this call (`wsrep_sync_wait=1`: a causal read).
async fn values(url: &str) -> Vec<String> {
    let mut conn = connect(url).await;
    sqlx::query("SET SESSION wsrep_sync_wait = 1").execute(&mut conn).await.unwrap();
    let rows = sqlx::query_scalar("SELECT v FROM smoke ORDER BY id").fetch_all(&mut conn).await.unwrap();
    let _ = conn.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_replicates_keeps_quorum_and_rejoins() {
    if !Galera::available() {
        return;
    }
    let test_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut galera = Galera::start(dir.path()).await;
    let start_time = test_started.elapsed();

    // Written on node 1, read on node 3.
    let mut n1 = connect(&galera.url(1)).await;
    sqlx::query("CREATE TABLE smoke (id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64) NOT NULL)")
        .execute(&mut n1)
        .await
        .unwrap();
    insert(&mut n1, "first").await;
    assert_eq!(values(&galera.url(3)).await, ["first"]);

    // Node 2 killed: nodes 1 and 3 keep quorum (2 of 3); a commit on node 1
    // waits until node 2 is dropped from the cluster, then succeeds.
    galera.kill9(2);
    let killed = Instant::now();
    insert(&mut n1, "while node 2 is down").await;
    let commit_stall = killed.elapsed();
    within("node 1 sees a 2-node cluster", STEP, || async { galera.size_seen_by(1).await == Some(2) }).await;
    let dropped = killed.elapsed();
    assert_eq!(galera.size_seen_by(2).await, None, "node 2 is down");
    assert_eq!(values(&galera.url(3)).await, ["first", "while node 2 is down"]);

    // Node 2 rejoins and has what was written while it was down.
    let restarting = Instant::now();
    galera.restart(2).await;
    let rejoin_time = restarting.elapsed();
    assert_eq!(galera.size_seen_by(2).await, Some(3));
    assert_eq!(values(&galera.url(2)).await, ["first", "while node 2 is down"]);
    let _ = n1.close().await;

    // HAProxy in front: node 1 serves; when it dies, new connections go to a backup.
    let mut failover = None;
    if HaProxy::available() {
        let haproxy = HaProxy::start(dir.path(), &galera).await;
        let mut via = connect(&haproxy.url()).await;
        insert(&mut via, "through haproxy").await;
        galera.kill9(1);
        let killed = Instant::now();
        // The session open on node 1 is gone; a new one lands on node 2.
        assert!(sqlx::query("SELECT 1").execute(&mut via).await.is_err(), "a session on a killed node fails");
        let mut via = reconnect(&haproxy.url()).await;
        insert(&mut via, "after node 1 died").await;
        failover = Some(killed.elapsed());
        assert_eq!(haproxy.node_behind(&galera).await, Some(2), "node 2, the first backup, serves");
        assert_eq!(
            values(&galera.url(3)).await,
            ["first", "while node 2 is down", "through haproxy", "after node 1 died"]
        );
        let _ = via.close().await;
    }
    eprintln!(
        "galera smoke: start {start_time:?}, commit on node 1 after killing node 2 took {commit_stall:?}, \
         node 2 dropped after {dropped:?}, \
         rejoin {rejoin_time:?}, haproxy failover write {failover:?}, whole test {:?}",
        test_started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_carries_mqtt_across_nodes_and_survives_a_node() {
    if !NatsCluster::available() {
        return;
    }
    let test_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(dir.path()).await;
    let start_time = test_started.elapsed();

    // A persistent-session subscriber on node 1, a publisher on node 3.
    let topic = "smoke/cmd";
    let sub_id = format!("smoke-sub-{}", uuid::Uuid::new_v4().simple());
    let (sub, mut sub_loop) = nats_mqtt_client(nats.mqtt_addr(1), &sub_id, false);
    mqtt_poll_until(&mut sub_loop, STEP, |e| matches!(e, Event::Incoming(Packet::ConnAck(_)))).await.unwrap();
    sub.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    mqtt_poll_until(&mut sub_loop, STEP, |e| matches!(e, Event::Incoming(Packet::SubAck(_)))).await.unwrap();

    let (publisher, mut pub_loop) = nats_mqtt_client(nats.mqtt_addr(3), "smoke-pub", true);
    mqtt_poll_until(&mut pub_loop, STEP, |e| matches!(e, Event::Incoming(Packet::ConnAck(_)))).await.unwrap();
    publisher.publish(topic, QoS::AtLeastOnce, false, "one").await.unwrap();
    mqtt_poll_until(&mut pub_loop, STEP, |e| matches!(e, Event::Incoming(Packet::PubAck(_)))).await.unwrap();
    let got =
        mqtt_poll_until(&mut sub_loop, STEP, |e| matches!(e, Event::Incoming(Packet::Publish(_)))).await;
    let Ok(Event::Incoming(Packet::Publish(p))) = got else { panic!("node 1 subscriber: {got:?}") };
    assert_eq!((p.topic.as_str(), &p.payload[..]), (topic, &b"one"[..]));

    // Node 1 killed. JetStream re-elects the leaders that were on node 1
    // (each stream and consumer its own raft group, 4–9 s apiece); meanwhile
    // NATS closes an MQTT connection whose JetStream request timed out (4 s).
    nats.kill9(1);
    let killed = Instant::now();
    let lost = mqtt_poll_until(&mut sub_loop, STEP, |_| false).await;
    assert!(lost.is_err(), "the subscriber's connection to node 1 ends");
    drop((sub, sub_loop, publisher, pub_loop));

    // Fresh clients on nodes 2 and 3 work again.
    let path_2_to_3 = nats.wait_mqtt_path(2, 3, FAILOVER).await;
    let fresh_clients = killed.elapsed();

    // A message published (on node 3) while the subscriber is away waits in
    // its JetStream-backed session.
    let deadline = Instant::now() + FAILOVER;
    while let Err(e) = mqtt_publish_acked(nats.mqtt_addr(3), topic, b"two", STEP).await {
        assert!(Instant::now() < deadline, "publishing on node 3 after node 1 died: {e}");
        eprintln!("publishing on node 3 after node 1 died: {e}; again");
    }

    // The subscriber resumes its session on node 2 (same client id, not
    // clean): the message sent while it was away arrives without a new
    // SUBSCRIBE. "one" may come again first: its PUBACK may not have left
    // before node 1 died (QoS 1 is at least once).
    let resuming = Instant::now();
    let (_sub, mut sub_loop) = nats_mqtt_client(nats.mqtt_addr(2), &sub_id, false);
    loop {
        let got =
            mqtt_poll_until(&mut sub_loop, STEP, |e| matches!(e, Event::Incoming(Packet::Publish(_)))).await;
        let Ok(Event::Incoming(Packet::Publish(p))) = got else {
            panic!("resumed subscriber on node 2: {got:?}")
        };
        match &p.payload[..] {
            b"two" => break,
            b"one" => eprintln!("nats smoke: \"one\" redelivered (dup={}) on the resumed session", p.dup),
            other => panic!("unexpected message {other:?}"),
        }
    }
    let resumed = resuming.elapsed();

    // Node 1 comes back and carries MQTT again.
    let restarting = Instant::now();
    nats.restart(1).await;
    let rejoin_time = restarting.elapsed();
    eprintln!(
        "nats smoke: start {start_time:?}, after killing node 1: MQTT 2→3 in {path_2_to_3:?} \
         ({fresh_clients:?} after the kill), session resumed on node 2 in {resumed:?}, node 1 rejoin \
         {rejoin_time:?}, whole test {:?}",
        test_started.elapsed()
    );
}
