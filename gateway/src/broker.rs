//! The embedded MQTT broker (rumqttd), used when no `--broker` is given.
//!
//! rumqttd has no shutdown and binds its listener itself on its own threads, so
//! it runs on a dedicated thread for the life of the process. The gateway talks
//! to it over loopback with rumqttc, the same code as the external-broker path.
//!
//! rumqttd sets no TCP_NODELAY on the sockets it accepts, which costs a sync
//! command ~40 ms per hop (Nagle meeting delayed ACKs). On Linux an accepted
//! socket inherits TCP_NODELAY from its listener, and the listener lives in
//! this process: once it is bound we find it among our own file descriptors
//! and set the option on it. See docs/ARCHITECTURE.md.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use std::os::fd::{BorrowedFd, RawFd};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use socket2::SockRef;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot listen for MQTT on {addr}: {source}. Another broker probably holds port {port}. \
         Either give the embedded broker another address with --mqtt-listen 127.0.0.1:PORT \
         (env GATEWAY_MQTT_LISTEN), or use the broker that is already there with \
         --broker mqtt://HOST:{port} (env GATEWAY_BROKER)"
    )]
    PortTaken { addr: SocketAddr, port: u16, source: std::io::Error },
    #[error("the embedded broker did not start listening on {0} within 10 s (see its log above)")]
    NotListening(SocketAddr),
}

/// Starts rumqttd on `listen` and returns once it accepts connections.
pub fn start_embedded(listen: SocketAddr, max_payload: usize) -> Result<(), BrokerError> {
    // rumqttd only logs a failed bind; check the port ourselves first.
    TcpListener::bind(listen).map_err(|source| BrokerError::PortTaken {
        addr: listen,
        port: listen.port(),
        source,
    })?;
    let config = config(listen, max_payload);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .expect("spawning a thread");
    wait_listening_with_nodelay(listen)?;
    Ok(())
}

fn config(listen: SocketAddr, max_payload: usize) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server =
        ServerSettings { name: "v4".into(), listen, tls: None, next_connection_delay_ms: 0, connections };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 500,
            // Per topic filter, the router keeps at most count × size bytes of messages.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    }
}

/// Waits until rumqttd's listener is bound (seen among our own sockets, so
/// nobody connects to it just to find out) and sets TCP_NODELAY on it.
fn wait_listening_with_nodelay(listen: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match set_nodelay_on_listener(listen.port()) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%listen, error = %e, "cannot set TCP_NODELAY on the broker listener; sync latency will suffer");
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(BrokerError::NotListening(listen))
}

/// Finds this process's listening TCP socket on `port` and sets TCP_NODELAY on
/// it. Returns whether one was found.
fn set_nodelay_on_listener(port: u16) -> std::io::Result<bool> {
    let mut found = false;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path())
            .map(|target| target.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: `fd` was an open socket of this process when listed. Another
        // thread may close it meanwhile; then the calls below fail or read
        // another descriptor's options, and only a listener on our port — which
        // rumqttd keeps for the life of the process — gets an option set.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        let listening_here = socket.is_listener().unwrap_or(false)
            && socket.local_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port);
        if listening_here {
            socket.set_tcp_nodelay(true)?;
            found = true;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_names_the_port_and_both_ways_out() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = start_embedded(addr, 1024).unwrap_err().to_string();
        assert!(err.contains(&addr.port().to_string()), "{err}");
        assert!(err.contains("--mqtt-listen") && err.contains("--broker"), "{err}");
    }

    #[test]
    fn nodelay_is_set_on_our_own_listener_and_inherited() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(set_nodelay_on_listener(addr.port()).unwrap());
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
