//! MQTT client set-up shared by the receiver and the gateway: broker URLs, and
//! rumqttc options with the settings both need (TCP_NODELAY, packet size).

use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, LastWill, MqttOptions, NetworkOptions};

/// Largest MQTT packet either side accepts: a 64 KiB payload as base64 in JSON
/// fits many times over. rumqttc's own default (10 KiB) would not.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;

/// Capacity of rumqttc's request channel. When full, `publish().await` waits.
const REQUEST_CHANNEL: usize = 1024;

#[derive(Debug, thiserror::Error)]
#[error("broker URL {0:?} is not mqtt://HOST:PORT")]
pub struct BadBrokerUrl(String);

/// `mqtt://host:port` (or `tcp://`, or bare `host:port`; port defaults to 1883).
pub fn parse_broker_url(url: &str) -> Result<(String, u16), BadBrokerUrl> {
    let bad = || BadBrokerUrl(url.to_owned());
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url)
        .trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(bad());
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
        }
        Some(_) => Err(bad()),
        None => Ok((rest.to_owned(), 1883)),
    }
}

/// Options for one client connection.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub client_id: String,
    pub clean_session: bool,
    pub manual_acks: bool,
    pub last_will: Option<LastWill>,
}

/// A client and its event loop (which the caller must poll all the time).
pub fn client(host: &str, port: u16, spec: ClientSpec) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(spec.client_id, host, port);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(parse_broker_url("mqtt://127.0.0.1:1884").unwrap(), ("127.0.0.1".into(), 1884));
        assert_eq!(parse_broker_url("localhost").unwrap(), ("localhost".into(), 1883));
        assert_eq!(parse_broker_url("mqtt://[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert!(parse_broker_url("mqtt://h:notaport").is_err());
        assert!(parse_broker_url("http://h:1/x").is_err());
    }
}
