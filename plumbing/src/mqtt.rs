//! MQTT client side shared by the gateway and the receiver: broker URLs,
//! rumqttc options with the settings both need, and [`drive`], the loop that
//! polls a connection's event loop until shutdown.
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

/// Largest MQTT packet either side accepts: a 64 KiB payload as base64 in JSON
/// fits many times over. rumqttc's own default (10 KiB) would not.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;

/// Capacity of rumqttc's request channel. When full, `publish().await` waits.
const REQUEST_CHANNEL: usize = 1024;

/// Pause after a connection error before polling (and so reconnecting) again.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[error("broker URL {0:?} is not mqtt://HOST:PORT")]
pub struct BadBrokerUrl(String);

/// Where a broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
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

/// Options for one client connection.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub client_id: String,
    pub clean_session: bool,
    /// Acknowledge each publish with `AsyncClient::ack` (after its effect is durable).
    pub manual_acks: bool,
    pub last_will: Option<LastWill>,
}

/// A client and its event loop (which the caller must poll all the time, see [`drive`]).
pub fn client(broker: &BrokerAddr, spec: ClientSpec) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(spec.client_id, broker.host.clone(), broker.port);
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_clean_session(spec.clean_session)
        .set_manual_acks(spec.manual_acks)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(100);
    if let Some(will) = spec.last_will {
        options.set_last_will(will);
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let mut network = NetworkOptions::new();
    // Without it a request→reply round trip stalls ~40 ms on delayed ACKs.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(5);
    eventloop.set_network_options(network);
    (client, eventloop)
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

    /// The connection failed; [`drive`] pauses, then reconnects.
    fn disconnected(&mut self, _error: &ConnectionError) {}
}

/// Polls `eventloop` until `shutdown` (or the session stops it), feeding its
/// events to `session` and reconnecting after errors. Returns the event loop
/// untouched by any disconnect, so the caller may still say goodbye on it.
pub async fn drive(eventloop: &mut EventLoop, session: &mut impl Session, shutdown: &CancellationToken) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => session.connected(),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if !session.received(publish).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "MQTT connection error; reconnecting");
                session.disconnected(&error);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
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
}
