//! Reports go to the topic each command's message names (`reports_to`), or
//! to the shared reports topic when it names none. A receiver on the
//! machine's Mosquitto (`TEST_MOSQUITTO`, default 127.0.0.1:1883; topics
//! under a prefix of this test's own), a fake TCP device, and a test client
//! in the gateways' place that publishes commands and watches the topics.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use plumbing::mqtt::{client, ClientSpec};
use protocol::envelope::{decode_one_or_many, CommandMessage, Report, ReportKind};
use protocol::{DeviceId, Frame, FrameCodec, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn mosquitto() -> Option<String> {
    let addr = std::env::var("TEST_MOSQUITTO").unwrap_or_else(|_| "127.0.0.1:1883".into());
    if std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "Mosquitto at {addr} unreachable");
        eprintln!("SKIPPED: Mosquitto at {addr} unreachable; set CI=true to make this fatal");
        return None;
    }
    Some(format!("mqtt://{addr}"))
}

/// The gateways' side: one client that publishes commands and hears the
/// reports topics and the device's presence.
struct Gateways {
    mqtt: rumqttc::AsyncClient,
    /// (topic, payload) of every publish heard.
    heard: mpsc::UnboundedReceiver<(String, Bytes)>,
    /// Reports heard so far, with their topic.
    reports: Vec<(String, Report)>,
}

impl Gateways {
    /// Connected and subscribed to every filter (each SUBACK seen).
    async fn start(broker: &str, filters: &[String]) -> Gateways {
        let spec = ClientSpec {
            client_id: format!("gw-{}", Uuid::now_v7().simple()),
            clean_session: true,
            manual_acks: false,
            last_will: None,
        };
        let (mqtt, mut eventloop) = client(&broker.parse().unwrap(), spec);
        let (tx, heard) = mpsc::unbounded_channel();
        let (subacked, mut subacks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                match event {
                    Event::Incoming(Packet::Publish(p)) => {
                        let _ = tx.send((p.topic, p.payload));
                    }
                    Event::Incoming(Packet::SubAck(_)) => {
                        let _ = subacked.send(());
                    }
                    _ => {}
                }
            }
        });
        for filter in filters {
            mqtt.subscribe(filter.clone(), QoS::AtLeastOnce).await.unwrap();
        }
        for _ in filters {
            tokio::time::timeout(WAIT, subacks.recv()).await.expect("subscribed in time");
        }
        Gateways { mqtt, heard, reports: Vec::new() }
    }

    /// Waits for a publish on `topic` (others heard meanwhile are kept if reports).
    async fn wait_for_topic(&mut self, topic: &str) {
        loop {
            if self.next().await == topic {
                return;
            }
        }
    }

    /// Waits until `done` holds for the reports heard so far.
    async fn wait_reports(&mut self, what: &str, done: impl Fn(&[(String, Report)]) -> bool) {
        let waited = async {
            while !done(&self.reports) {
                self.next().await;
            }
        };
        if tokio::time::timeout(WAIT, waited).await.is_err() {
            panic!("timed out waiting for {what}; heard {:#?}", self.reports);
        }
    }

    /// The next publish heard; its topic. Reports are recorded.
    async fn next(&mut self) -> String {
        let (topic, payload) =
            tokio::time::timeout(WAIT, self.heard.recv()).await.expect("a publish in time").unwrap();
        if let Ok(reports) = decode_one_or_many::<Report>(&payload) {
            self.reports.extend(reports.into_iter().map(|r| (topic.clone(), r)));
        }
        topic
    }
}

fn command(device: &str, reports_to: Option<String>) -> CommandMessage {
    CommandMessage {
        id: Uuid::now_v7(),
        device_id: DeviceId::parse(device).unwrap(),
        name: "echo".into(),
        payload_base64: b"{}".to_vec(),
        attempt: 1,
        expires_at_ms: i64::MAX,
        reports_to,
    }
}

fn has(reports: &[(String, Report)], id: Uuid, kind: fn(&ReportKind) -> bool) -> bool {
    reports.iter().any(|(_, r)| r.command_id == id && kind(&r.kind))
}

#[tokio::test]
async fn each_command_is_reported_on_the_topic_its_message_names() {
    let Some(broker) = mosquitto() else { return };
    let prefix = format!("rx-reports-{}", Uuid::now_v7().simple());
    let topics = Topics::new(prefix.clone());
    let (to_a, to_b, shared) = (topics.instance_reports("a"), topics.instance_reports("b"), topics.reports());
    let device = "dev-1";
    let filters = [to_a.clone(), to_b.clone(), shared.clone(), topics.presence(device)];
    let mut gateways = Gateways::start(&broker, &filters).await;

    let mut config = receiver::Config::new(broker.clone(), "127.0.0.1:0".parse().unwrap());
    config.topic_prefix = prefix.clone();
    config.receiver_id = format!("rx-{}", Uuid::now_v7().simple());
    // The device holds three commands at once (the default is one at a time).
    config.device_window = 3;
    let shutdown = CancellationToken::new();
    let running = receiver::start(config, shutdown.clone()).await.expect("receiver starts");

    let socket = TcpStream::connect(running.tcp_addr).await.unwrap();
    let mut dev = Framed::new(socket, FrameCodec::default());
    dev.send(Frame::Hello { device_id: DeviceId::parse(device).unwrap() }).await.unwrap();
    // Presence comes after the receiver's command subscription.
    gateways.wait_for_topic(&topics.presence(device)).await;

    // One message, three destinations, and a command for a device not here.
    let (a, b, none) =
        (command(device, Some(to_a.clone())), command(device, Some(to_b.clone())), command(device, None));
    let stray = command("dev-elsewhere", Some(to_b.clone()));
    let message = serde_json::to_vec(&[&a, &b, &none, &stray]).unwrap();
    let commands = topics.receiver_commands(running.bridge.receiver_id());
    gateways.mqtt.publish(commands, QoS::AtLeastOnce, false, message).await.unwrap();

    // The device reads the three commands and holds its answers until each
    // `delivered` is out, so those are reported on their own.
    let mut written = Vec::new();
    while written.len() < 3 {
        let frame = tokio::time::timeout(WAIT, dev.next()).await.expect("a frame in time");
        if let Frame::Command { id, .. } = frame.unwrap().unwrap().unwrap() {
            written.push(id);
        }
    }
    assert_eq!(written, [a.id, b.id, none.id], "written in order");
    let delivered = |k: &ReportKind| matches!(k, ReportKind::Delivered);
    gateways
        .wait_reports("the deliveries and the stray's undeliverable", |r| {
            [a.id, b.id, none.id].iter().all(|id| has(r, *id, delivered))
                && has(r, stray.id, |k| matches!(k, ReportKind::Undeliverable { .. }))
        })
        .await;
    for id in written {
        let result = Frame::Result { id, code: 0, payload: Bytes::from_static(b"ok") };
        dev.send(result).await.unwrap();
    }
    let result = |k: &ReportKind| matches!(k, ReportKind::Result { .. });
    gateways
        .wait_reports("the results", |r| [a.id, b.id, none.id].iter().all(|id| has(r, *id, result)))
        .await;

    let expected: HashMap<Uuid, &str> =
        HashMap::from([(a.id, &*to_a), (b.id, &*to_b), (none.id, &*shared), (stray.id, &*to_b)]);
    for (topic, report) in &gateways.reports {
        assert_eq!(topic, expected[&report.command_id], "{report:?} on the wrong topic");
    }
    assert_eq!(gateways.reports.len(), 7, "3 delivered, 3 results, 1 undeliverable: {:#?}", gateways.reports);

    shutdown.cancel();
    tokio::time::timeout(WAIT, running.stopped()).await.expect("the receiver stops");
}
