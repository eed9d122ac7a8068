//! Broker failover against a real broker: the first address is a closed
//! loopback port, the second the machine's Mosquitto (`TEST_MOSQUITTO`,
//! default 127.0.0.1:1883). The client must end up connected through the
//! second: subscribed, and receiving its own publish there. The same when
//! the first accepts the connection and then drops it.

use std::time::Duration;

use plumbing::mqtt::{client, drive, BrokerAddr, Brokers, ClientSpec, Session};
use rumqttc::{Publish, QoS};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// Records what [`drive`] reports and stops it once the probe message is back.
struct Probe {
    client: rumqttc::AsyncClient,
    topic: String,
    /// ConnAcks seen.
    connects: usize,
    /// Connection errors seen.
    failures: usize,
}

impl Session for Probe {
    fn connected(&mut self) {
        self.connects += 1;
        let (client, topic) = (self.client.clone(), self.topic.clone());
        tokio::spawn(async move {
            client.subscribe(topic.clone(), QoS::AtLeastOnce).await.unwrap();
            client.publish(topic, QoS::AtLeastOnce, false, b"probe".to_vec()).await.unwrap();
        });
    }

    async fn received(&mut self, publish: Publish) -> bool {
        // Stop polling: the round trip went through.
        !(publish.topic == self.topic && publish.payload.as_ref() == b"probe")
    }

    fn disconnected(&mut self, _error: &rumqttc::ConnectionError) {
        self.failures += 1;
    }
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> BrokerAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    BrokerAddr::new("127.0.0.1", port)
}

fn mosquitto() -> Option<BrokerAddr> {
    let addr = std::env::var("TEST_MOSQUITTO").unwrap_or_else(|_| "127.0.0.1:1883".into());
    if std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "Mosquitto at {addr} unreachable");
        eprintln!("SKIPPED: Mosquitto at {addr} unreachable; set CI=true to make this fatal");
        return None;
    }
    Some(addr.parse().unwrap())
}

#[tokio::test]
async fn a_dead_first_broker_is_skipped_for_the_next() {
    let Some(second) = mosquitto() else { return };
    let brokers = Brokers::new(vec![closed_port(), second.clone()]).unwrap();
    assert_eq!(brokers.to_string().split(',').count(), 2);
    let probe = connect_through(&brokers, &second).await;
    assert_eq!(probe.connects, 1, "only the second broker acknowledged a connection");
}

#[tokio::test]
async fn a_lost_connection_moves_to_the_next_broker() {
    let Some(second) = mosquitto() else { return };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let first = BrokerAddr::new("127.0.0.1", listener.local_addr().unwrap().port());
    tokio::spawn(accept_then_drop(listener));
    let brokers = Brokers::new(vec![first, second.clone()]).unwrap();
    let probe = connect_through(&brokers, &second).await;
    assert_eq!(probe.connects, 2, "connected to the first, then to the second");
}

/// A broker that acknowledges one connection and then drops it.
async fn accept_then_drop(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut socket, _) = listener.accept().await.unwrap();
    let mut connect = [0u8; 256];
    let _ = socket.read(&mut connect).await.unwrap();
    // CONNACK: session not present, connection accepted.
    socket.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    // Then gone, and nothing listens any more.
    drop(socket);
    drop(listener);
}

/// Drives a client over `brokers` until its probe message comes back, and
/// checks it ended up on `expected`.
async fn connect_through(brokers: &Brokers, expected: &BrokerAddr) -> Probe {
    let unique = format!("{}-{}", std::process::id(), uuid_ish());
    let spec = ClientSpec {
        client_id: format!("failover-{unique}"),
        clean_session: true,
        manual_acks: false,
        last_will: None,
    };
    let (mqtt, mut eventloop) = client(brokers, spec);
    let mut probe =
        Probe { client: mqtt, topic: format!("plumbing-failover/{unique}"), connects: 0, failures: 0 };
    let shutdown = CancellationToken::new();

    tokio::time::timeout(WAIT, drive(&mut eventloop, brokers, &mut probe, &shutdown))
        .await
        .expect("the probe comes back through the second broker in time");

    assert!(probe.failures >= 1, "the first broker failed");
    let (host, port) = eventloop.mqtt_options.broker_address();
    assert_eq!(
        (host.as_str(), port),
        (expected.host.as_str(), expected.port),
        "connected through the second"
    );
    let _ = probe.client.disconnect().await;
    probe
}

/// Nanoseconds since the epoch: unique enough for a topic and a client id.
fn uuid_ish() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}
