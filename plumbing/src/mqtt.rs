//! MQTT client side shared by the gateway and the receiver: broker URLs,
//! rumqttc options with the settings both need, and [`drive`], the loop that
//! polls a connection's event loop until shutdown, moving to the next of its
//! [`Brokers`] whenever a connection attempt or a connection fails.
//!
//! rumqttc pitfalls this module exists for (see `shared/notes/dependencies.md`):
//! TCP_NODELAY is off by default (a request→reply round trip then stalls on
//! delayed ACKs); the default packet limit is 10 KiB; and the event loop must
//! be polled all the time — awaiting a publish from the polling task can
//! deadlock once the request channel is full (rumqttc #1025).

use std::future::Future;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet,
};
use rumqttc::{Publish, QoS};
use tokio_util::sync::CancellationToken;

/// Largest MQTT packet our clients accept or send: above the largest
/// message the system sends (`protocol::limits::mqtt_message_limit` of
/// 1 MiB, about 1.4 MB), so a legal message is never refused here — senders
/// keep to the message limit themselves. rumqttc's own default (10 KiB) would not do.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;

/// Capacity of rumqttc's request channel. When full, `publish().await` waits.
const REQUEST_CHANNEL: usize = 1024;

/// Pause after a connection error before polling (and so connecting, to the
/// same broker or the next) again.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Keep-alive of every connection: a broker that vanished is noticed within
/// about 1.5 × this (and the next broker tried).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Publishes sent and not yet acknowledged, per connection.
const INFLIGHT: u16 = 100;

/// A broker URL that is not `mqtt://HOST:PORT`, or an empty broker list; the
/// offending text.
#[derive(Debug, thiserror::Error)]
#[error("broker URL {0:?} is not mqtt://HOST:PORT")]
pub struct BadBrokerUrl(String);

/// Where a broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for BrokerAddr {
    type Err = BadBrokerUrl;

    /// `mqtt://host:port` (or `tcp://`, or bare `host:port`; the port defaults
    /// to 1883, MQTT's IANA port; IPv6 hosts in brackets).
    fn from_str(url: &str) -> Result<BrokerAddr, BadBrokerUrl> {
        let bad = || BadBrokerUrl(url.to_owned());
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url)
            .trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') {
            return Err(bad());
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() => {
                (host.trim_start_matches('[').trim_end_matches(']'), port.parse().map_err(|_| bad())?)
            }
            Some(_) => return Err(bad()),
            None => (rest, 1883),
        };
        Ok(BrokerAddr { host: host.to_owned(), port })
    }
}

/// The brokers one client may use, in the order it tries them: it connects
/// to the first and moves to the next (round robin) whenever a connection
/// attempt or an established connection fails (see [`drive`]). Never empty;
/// one broker is the plain case.
///
/// Parsed from a comma-separated list of [`BrokerAddr`] URLs,
/// `mqtt://h1:1883,mqtt://h2:1883` (spaces around items are ignored);
/// displayed the same way, each as `mqtt://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers(Vec<BrokerAddr>);

impl Brokers {
    /// These brokers in this order; `None` when `addrs` is empty.
    pub fn new(addrs: Vec<BrokerAddr>) -> Option<Brokers> {
        (!addrs.is_empty()).then_some(Brokers(addrs))
    }

    /// The broker a new client connects to first.
    pub fn first(&self) -> &BrokerAddr {
        &self.0[0]
    }

    /// Every broker, in the order they are tried (at least one).
    pub fn as_slice(&self) -> &[BrokerAddr] {
        &self.0
    }
}

impl From<BrokerAddr> for Brokers {
    fn from(addr: BrokerAddr) -> Brokers {
        Brokers(vec![addr])
    }
}

impl std::fmt::Display for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Brokers {
    type Err = BadBrokerUrl;

    /// One or more [`BrokerAddr`] URLs separated by commas. Fails on the first
    /// item that is not a broker URL (an empty item included).
    fn from_str(urls: &str) -> Result<Brokers, BadBrokerUrl> {
        let addrs = urls.split(',').map(|url| url.trim().parse()).collect::<Result<Vec<_>, _>>()?;
        Brokers::new(addrs).ok_or_else(|| BadBrokerUrl(urls.to_owned()))
    }
}

/// Which of its brokers a connection uses, and which it tries after a
/// failure: the next one, round robin. Pure, so it is tested without a broker.
#[derive(Debug)]
struct Rotation<'a> {
    brokers: &'a Brokers,
    at: usize,
}

impl<'a> Rotation<'a> {
    /// Starting at the broker `(host, port)` names (the first one if none does).
    fn starting_at(brokers: &'a Brokers, (host, port): (String, u16)) -> Rotation<'a> {
        let at = brokers.0.iter().position(|b| b.host == host && b.port == port).unwrap_or(0);
        Rotation { brokers, at }
    }

    fn current(&self) -> &'a BrokerAddr {
        &self.brokers.0[self.at]
    }

    /// After a failure: the broker to try next, or `None` when that is the
    /// same one (a single broker: nothing to change).
    fn advance(&mut self) -> Option<&'a BrokerAddr> {
        let count = self.brokers.0.len();
        if count == 1 {
            return None;
        }
        self.at = (self.at + 1) % count;
        Some(self.current())
    }
}

/// Options for one client connection.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// The MQTT client id; unique per broker.
    pub client_id: String,
    /// Start every connection with a fresh session (subscriptions and
    /// unacknowledged messages forgotten).
    pub clean_session: bool,
    /// Acknowledge each publish with `AsyncClient::ack` (after its effect is durable).
    pub manual_acks: bool,
    /// What the broker publishes when the client vanishes without a DISCONNECT.
    pub last_will: Option<LastWill>,
}

/// A client and its event loop (which the caller must poll all the time, see
/// [`drive`]). The event loop connects to `brokers.first()` at its first poll;
/// [`drive`] moves it along `brokers`.
pub fn client(brokers: &Brokers, spec: ClientSpec) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options(brokers.first(), spec), REQUEST_CHANNEL);
    let mut network = NetworkOptions::new();
    // Without it a request→reply round trip stalls ~40 ms on delayed ACKs.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(5);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// The rumqttc options of a connection to `broker`: the one place the
/// settings are chosen, for the first broker and for every move.
fn options(broker: &BrokerAddr, spec: ClientSpec) -> MqttOptions {
    let mut options = MqttOptions::new(spec.client_id, broker.host.clone(), broker.port);
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(spec.clean_session)
        .set_manual_acks(spec.manual_acks)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(INFLIGHT);
    if let Some(will) = spec.last_will {
        options.set_last_will(will);
    }
    options
}

/// `current` (options made by [`options`]) for another broker, every other
/// setting kept. rumqttc has no setter for the address, so the options are
/// built again from the [`ClientSpec`] they were made from.
fn retarget(current: &MqttOptions, broker: &BrokerAddr) -> MqttOptions {
    let spec = ClientSpec {
        client_id: current.client_id(),
        clean_session: current.clean_session(),
        manual_acks: current.manual_acks(),
        last_will: current.last_will(),
    };
    options(broker, spec)
}

/// What a connection does with the events of its event loop. Both methods
/// run on the polling task: they must never wait on the client's request
/// channel (publish, subscribe, ack), which only that task drains — spawn
/// such work instead.
pub trait Session: Send {
    /// The broker acknowledged a (re)connection: subscribe, announce.
    fn connected(&mut self);

    /// A publish arrived. Returns false to stop polling.
    fn received(&mut self, publish: Publish) -> impl Future<Output = bool> + Send;

    /// The connection failed (or could not be made); [`drive`] pauses, then
    /// connects again, to the next of its brokers if it has several.
    fn disconnected(&mut self, _error: &ConnectionError) {}
}

/// Polls `eventloop` (made by [`client`] with these `brokers`) until
/// `shutdown` (or the session stops it), feeding its events to `session`.
/// After an error — a connection attempt refused or timed out, or an
/// established connection lost — it pauses [`RECONNECT_PAUSE`] and connects
/// to the next broker of `brokers`, round robin (with one broker: the same
/// one again). Each connection is logged at info with its broker. Returns the
/// event loop untouched by any disconnect, so the caller may still say
/// goodbye on it.
pub async fn drive(
    eventloop: &mut EventLoop,
    brokers: &Brokers,
    session: &mut impl Session,
    shutdown: &CancellationToken,
) {
    let mut rotation = Rotation::starting_at(brokers, eventloop.mqtt_options.broker_address());
    // A broker may refuse a subscription (NATS does while JetStream elects a
    // leader after a node died): the session then subscribes again, or it
    // would stay connected and deaf.
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep_until(resubscribe_at) => {
                resubscribe_at = None;
                tracing::info!(broker = %rotation.current(), "subscribing again after a refused subscription");
                session.connected();
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(broker = %rotation.current(), "connected to the broker");
                resubscribe_at = None;
                session.connected();
            }
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                tracing::warn!(broker = %rotation.current(), "the broker refused a subscription; subscribing again shortly");
                resubscribe_at.get_or_insert(tokio::time::Instant::now() + RESUBSCRIBE_PAUSE);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if !session.received(publish).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                let failed = rotation.current();
                session.disconnected(&error);
                match rotation.advance() {
                    Some(next) => {
                        tracing::warn!(%error, broker = %failed, %next, "MQTT connection error; trying the next broker");
                        // Only the address changes: the session state, the
                        // pending publishes and the request channel stay.
                        eventloop.mqtt_options = retarget(&eventloop.mqtt_options, next);
                    }
                    None => tracing::warn!(%error, broker = %failed, "MQTT connection error; reconnecting"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
    }
}

/// Pause before subscribing again after the broker refused a subscription.
pub const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Subscribes to each filter at QoS 1 (from a task of its own, see [`Session`]).
pub async fn subscribe_all(client: &AsyncClient, filters: &[String]) {
    for filter in filters {
        if let Err(error) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
            tracing::warn!(%filter, %error, "subscribe failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(url: &str) -> Result<BrokerAddr, BadBrokerUrl> {
        url.parse()
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            addr("mqtt://127.0.0.1:1884").unwrap(),
            BrokerAddr { host: "127.0.0.1".into(), port: 1884 }
        );
        assert_eq!(addr("localhost").unwrap(), BrokerAddr { host: "localhost".into(), port: 1883 });
        assert_eq!(addr("mqtt://[::1]:1883").unwrap(), BrokerAddr { host: "::1".into(), port: 1883 });
        assert!(addr("mqtt://h:notaport").is_err());
        assert!(addr("http://h:1/x").is_err());
        assert_eq!(addr("tcp://h:1").unwrap().to_string(), "mqtt://h:1");
    }

    fn brokers(urls: &str) -> Brokers {
        urls.parse().unwrap_or_else(|e| panic!("{urls}: {e}"))
    }

    #[test]
    fn broker_lists_parse_and_display_back() {
        let one = brokers("mqtt://127.0.0.1:1884");
        assert_eq!(one, Brokers::from(addr("mqtt://127.0.0.1:1884").unwrap()));
        assert_eq!(one.to_string(), "mqtt://127.0.0.1:1884");
        let three = brokers("mqtt://a:1, tcp://b:2,c");
        let hosts: Vec<_> = three.as_slice().iter().map(|b| (b.host.as_str(), b.port)).collect();
        assert_eq!(hosts, [("a", 1), ("b", 2), ("c", 1883)]);
        assert_eq!(three.first().host, "a");
        assert_eq!(three.to_string(), "mqtt://a:1,mqtt://b:2,mqtt://c:1883");
        assert_eq!(brokers(&three.to_string()), three);
        for bad in ["", "mqtt://a:1,", ",mqtt://a:1", "mqtt://a:1,,mqtt://b:2", "mqtt://a:1,http://b/x"] {
            assert!(bad.parse::<Brokers>().is_err(), "{bad:?}");
        }
        assert!(Brokers::new(Vec::new()).is_none());
    }

    #[test]
    fn rotation_moves_round_robin_and_stays_with_one_broker() {
        let list = brokers("mqtt://a:1,mqtt://b:2,mqtt://c:3");
        let mut rotation = Rotation::starting_at(&list, ("a".into(), 1));
        assert_eq!(rotation.current().host, "a");
        let tried: Vec<_> = (0..4).map(|_| rotation.advance().unwrap().host.clone()).collect();
        assert_eq!(tried, ["b", "c", "a", "b"]);
        // Where the event loop points decides the start; an unknown address starts at the first.
        assert_eq!(Rotation::starting_at(&list, ("c".into(), 3)).current().host, "c");
        assert_eq!(Rotation::starting_at(&list, ("c".into(), 9)).current().host, "a");
        // Listed twice: the rotation still walks the whole list.
        let twice = brokers("mqtt://a:1,mqtt://a:1,mqtt://b:2");
        let mut rotation = Rotation::starting_at(&twice, ("a".into(), 1));
        let tried: Vec<_> = (0..3).map(|_| rotation.advance().unwrap().host.clone()).collect();
        assert_eq!(tried, ["a", "b", "a"]);
        let single = brokers("mqtt://a:1");
        let mut rotation = Rotation::starting_at(&single, ("a".into(), 1));
        assert!(rotation.advance().is_none());
        assert_eq!(rotation.current().host, "a");
    }

    #[test]
    fn retargeted_options_keep_every_setting_but_the_address() {
        let will = LastWill::new("t/status", b"gone".to_vec(), QoS::AtLeastOnce, false);
        let spec = ClientSpec {
            client_id: "c-1".into(),
            clean_session: false,
            manual_acks: true,
            last_will: Some(will),
        };
        let (a, b) = (addr("mqtt://a:1").unwrap(), addr("mqtt://b:2").unwrap());
        let moved = retarget(&options(&a, spec.clone()), &b);
        assert_eq!(moved.broker_address(), ("b".to_owned(), 2));
        // rumqttc's Debug shows every setting (keep-alive, packet size, inflight, will, …).
        assert_eq!(format!("{moved:?}"), format!("{:?}", options(&b, spec)));
    }
}
