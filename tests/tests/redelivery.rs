//! MQTT redelivery never makes a second command or a second reply: retained
//! submissions (delivered again to every new subscription, MQTT 3.1.1
//! §3.3.1.3), the same submission delivered twice (QoS 1 allows it), and
//! submissions that wait in a gateway's persistent session while it restarts.
//! On Mosquitto (127.0.0.1:1883, a unique topic prefix per test), where
//! retained messages outlive the gateway.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use system_tests::{free_port, mosquitto_addr, mqtt_client, Broker, Db, Spec, System, TestDb};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One message seen by the caller: its topic, RETAIN flag and JSON body.
#[derive(Debug)]
struct Seen {
    topic: String,
    retain: bool,
    body: Value,
}

/// An MQTT caller subscribed to `filters`, collecting what it receives.
struct Caller {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Caller {
    async fn connect(broker: &plumbing::mqtt::Brokers, filters: &[String]) -> Caller {
        let (client, mut eventloop) = mqtt_client(broker).await;
        for f in filters {
            client.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, mut seen) = mpsc::unbounded_channel();
        let subscriptions = filters.len();
        tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                let seen = match ev {
                    Event::Incoming(Packet::SubAck(_)) => {
                        Seen { topic: String::new(), retain: false, body: json!("suback") }
                    }
                    Event::Incoming(Packet::Publish(p)) => Seen {
                        topic: p.topic.clone(),
                        retain: p.retain,
                        body: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                    },
                    _ => continue,
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        for _ in 0..subscriptions {
            let ack = next(&mut seen).await;
            assert_eq!(ack.body, "suback", "{ack:?}");
        }
        Caller { client, seen }
    }

    async fn publish(&self, topic: &str, retain: bool, body: &Value) {
        self.client.publish(topic, QoS::AtLeastOnce, retain, body.to_string()).await.unwrap();
    }

    /// The next message (20 s at most).
    async fn next(&mut self) -> Seen {
        next(&mut self.seen).await
    }

    /// Reads until a roll call (a gateway publishes one right after its
    /// subscriptions, on the same connection, so the broker has them by then);
    /// returns the replies read before it.
    async fn until_rollcall(&mut self) -> Vec<Value> {
        let mut before = Vec::new();
        loop {
            let seen = self.next().await;
            if seen.topic.ends_with("/rollcall") {
                return before;
            }
            before.push(seen.body);
        }
    }
}

async fn next(r: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(20), r.recv()).await.expect("a message in time").unwrap()
}

/// A gateway on Mosquitto with its own stop switch.
async fn gateway(
    db: &TestDb,
    prefix: &str,
    instance_id: Option<&str>,
) -> (gateway::Running, CancellationToken) {
    let mut config = gateway::Config::for_local(db.url.clone(), free_port(), free_port());
    config.topic_prefix = prefix.to_owned();
    config.broker = Some(format!("mqtt://{}", mosquitto_addr()));
    config.instance_id = instance_id.map(str::to_owned);
    system_tests::test_timeouts(&mut config);
    let stop = CancellationToken::new();
    (gateway::start(config, stop.clone()).await.expect("gateway starts"), stop)
}

async fn stopped((running, stop): (gateway::Running, CancellationToken)) {
    stop.cancel();
    running.stopped().await;
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Reads the commands of the store behind `running`.
async fn commands(running: &gateway::Running) -> Vec<Value> {
    let url = format!("http://{}/v1/commands?limit=1000", running.http_addr);
    let page: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    page["items"].as_array().cloned().unwrap_or_default()
}

/// A retained submission published while no gateway listens is refused by
/// the first gateway that subscribes (one `rejected` reply that says why,
/// nothing stored), cleared at the broker, and never answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_submission_is_refused_once_and_cleared() {
    let db = TestDb::create(Db::Sqlite).await.expect("sqlite never skips");
    let prefix = unique("t");
    let submit = format!("{prefix}/commands");
    let reply_to = format!("{prefix}-replies/caller");
    let broker: plumbing::mqtt::Brokers = format!("mqtt://{}", mosquitto_addr()).parse().unwrap();
    let mut caller = Caller::connect(&broker, &[reply_to.clone(), format!("{prefix}/rollcall")]).await;
    let req =
        json!({"device_id": "dev-0000", "name": "open_valve", "reply_to": reply_to, "correlation_id": "r-1"});
    caller.publish(&submit, true, &req).await;

    let first = gateway(&db, &prefix, None).await;
    assert!(caller.until_rollcall().await.is_empty());
    let reply = caller.next().await;
    assert_eq!(reply.body["event"], "rejected", "{reply:?}");
    assert_eq!(reply.body["correlation_id"], "r-1");
    assert_eq!(reply.body["status_code"], 400);
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("retained"), "the refusal says why: {message}");
    assert!(commands(&first.0).await.is_empty(), "nothing stored for a retained submission");
    assert_eq!(first.0.app.metrics().mqtt_submissions_retained.get(), 1);
    stopped(first).await;

    // Restarts: the retained copy is gone, so nothing is delivered again; a
    // plain submission after each start is the first thing answered.
    for round in 0..2 {
        let again = gateway(&db, &prefix, None).await;
        assert!(caller.until_rollcall().await.is_empty(), "no second reply");
        let marker = json!({"device_id": "ghost", "name": "x", "reply_to": reply_to, "correlation_id": format!("m-{round}")});
        caller.publish(&submit, false, &marker).await;
        let reply = caller.next().await;
        assert_eq!(reply.body["correlation_id"], format!("m-{round}"), "no second reply: {reply:?}");
        assert_eq!(reply.body["status_code"], 404, "{reply:?}");
        assert!(commands(&again.0).await.is_empty());
        assert_eq!(again.0.app.metrics().mqtt_submissions_retained.get(), 0, "nothing retained left");
        stopped(again).await;
    }

    // And a fresh subscriber finds nothing retained on the topic.
    let mut watcher = Caller::connect(&broker, std::slice::from_ref(&submit)).await;
    watcher.publish(&submit, false, &json!("marker")).await;
    let first_seen = watcher.next().await;
    assert_eq!((first_seen.body, first_seen.retain), (json!("marker"), false), "retained copy cleared");
    db.cleanup().await;
}

/// A retained submission that a running gateway received live (the broker
/// clears the flag on live delivery, so it runs, once) is not run again when
/// more gateway instances subscribe later (restarts, scale-out): one command,
/// one execution, one `accepted` and one `final` reply.
async fn a_retained_submission_runs_at_most_once(db: Db) {
    let mut spec = Spec::new(db);
    spec.broker = Broker::Mosquitto;
    spec.devices = 1;
    let Some(s) = System::start(spec).await else { return };
    let submit = s.gateway.app.topics().submit();
    let reply_to = format!("{}-replies/caller", s.topic_prefix);
    let mut caller =
        Caller::connect(&s.broker, &[reply_to.clone(), format!("{}/rollcall", s.topic_prefix)]).await;
    let device = &s.device_ids[0];
    let req = json!({"device_id": device, "name": "echo", "payload": 1, "reply_to": reply_to, "correlation_id": "c-1"});
    caller.publish(&submit, true, &req).await;
    let accepted = caller.next().await;
    assert_eq!(accepted.body["event"], "accepted", "{accepted:?}");
    let final_ = caller.next().await;
    assert_eq!(
        (final_.body["event"].as_str(), final_.body["status"].as_str()),
        (Some("final"), Some("succeeded"))
    );

    // Two more instances subscribe (as restarts would): each gets the retained copy.
    let mut others = Vec::new();
    for round in 0..2 {
        let other = s.second_gateway().await;
        assert!(caller.until_rollcall().await.is_empty(), "no second reply");
        if round == 0 {
            // The first to subscribe after it got the retained copy (and cleared it).
            let app = &other.app;
            system_tests::eventually("the retained copy refused", || async {
                app.metrics().mqtt_submissions_retained.get() == 1
            })
            .await;
        }
        others.push(other);
        let marker = json!({"device_id": "ghost", "name": "x", "reply_to": reply_to, "correlation_id": format!("m-{round}")});
        caller.publish(&submit, false, &marker).await;
        // Every instance receives it; one answers.
        let reply = caller.next().await;
        assert_eq!(reply.body["correlation_id"], format!("m-{round}"), "no second reply: {reply:?}");
    }
    assert_eq!(others[1].app.metrics().mqtt_submissions_retained.get(), 0, "nothing retained left");
    assert_eq!(s.all_commands().await.len(), 1, "one command");
    let stats = s.fleet.stats();
    assert_eq!((stats.totals.executed, stats.totals.executed_ids_repeated), (1, 0), "ran once");
    s.stop().await;
}

/// The same submission message delivered twice (a QoS 1 duplicate: the
/// publisher re-sent it, DUP set, after losing the PUBACK) is one command
/// with one `accepted` and one `final` reply.
async fn a_duplicate_delivery_is_one_command_and_one_reply(db: Db) {
    let mut spec = Spec::new(db);
    spec.devices = 1;
    let Some(s) = System::start(spec).await else { return };
    let submit = s.gateway.app.topics().submit();
    let reply_to = format!("{}-replies/caller", s.topic_prefix);
    let mut caller = Caller::connect(&s.broker, std::slice::from_ref(&reply_to)).await;
    let req = json!({"device_id": s.device_ids[0], "name": "echo", "payload": 2, "reply_to": reply_to, "correlation_id": "d-1"});
    caller.publish(&submit, false, &req).await;
    caller.publish(&submit, false, &req).await;
    let marker = json!({"device_id": "ghost", "name": "x", "reply_to": reply_to, "correlation_id": "marker"});
    let mut events = Vec::new();
    loop {
        let seen = caller.next().await;
        if seen.body["correlation_id"] == "marker" {
            break;
        }
        events.push(seen.body["event"].as_str().unwrap_or_default().to_owned());
        if events.len() == 2 {
            // Both copies were handled before the marker is.
            caller.publish(&submit, false, &marker).await;
        }
    }
    assert_eq!(events, ["accepted", "final"], "one reply of each");
    assert_eq!(s.all_commands().await.len(), 1);
    s.stop().await;
}

system_tests::on_both_stores!(
    a_retained_submission_runs_at_most_once,
    a_duplicate_delivery_is_one_command_and_one_reply
);

/// Submissions published while a gateway with a fixed instance id is down
/// wait in its persistent session and are delivered when it comes back:
/// each makes one command and gets one `accepted` reply, also when the
/// restarted gateway is restarted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_waiting_in_the_session_run_once_across_restarts() {
    let db = TestDb::create(Db::Sqlite).await.expect("sqlite never skips");
    let prefix = unique("t");
    let id = unique("gw-");
    let submit = format!("{prefix}/commands");
    let reply_to = format!("{prefix}-replies/caller");
    let broker: plumbing::mqtt::Brokers = format!("mqtt://{}", mosquitto_addr()).parse().unwrap();
    let mut caller = Caller::connect(&broker, &[reply_to.clone(), format!("{prefix}/rollcall")]).await;
    let first = gateway(&db, &prefix, Some(&id)).await;
    caller.until_rollcall().await;
    let api = format!("http://{}", first.0.http_addr);
    let put = reqwest::Client::new().put(format!("{api}/v1/devices/dev-q")).json(&json!({})).send().await;
    assert!(put.unwrap().status().is_success());
    stopped(first).await;
    for i in 0..5 {
        let req = json!({"device_id": "dev-q", "name": "echo", "mode": "async", "reply_to": reply_to, "correlation_id": format!("q-{i}")});
        caller.publish(&submit, false, &req).await;
    }
    let back = gateway(&db, &prefix, Some(&id)).await;
    let mut answered = Vec::new();
    while answered.len() < 5 {
        let seen = caller.next().await;
        if seen.topic.ends_with("/rollcall") {
            continue;
        }
        assert_eq!(seen.body["event"], "accepted", "{seen:?}");
        answered.push(seen.body["correlation_id"].as_str().unwrap().to_owned());
    }
    answered.sort();
    assert_eq!(answered, ["q-0", "q-1", "q-2", "q-3", "q-4"]);
    stopped(back).await;
    let again = gateway(&db, &prefix, Some(&id)).await;
    assert!(caller.until_rollcall().await.is_empty(), "nothing answered twice");
    let marker = json!({"device_id": "ghost", "name": "x", "reply_to": reply_to, "correlation_id": "marker"});
    caller.publish(&submit, false, &marker).await;
    let seen = caller.next().await;
    assert_eq!(seen.body["correlation_id"], "marker", "nothing answered twice: {seen:?}");
    assert_eq!(commands(&again.0).await.len(), 5, "one command each");
    stopped(again).await;
    db.cleanup().await;
}
