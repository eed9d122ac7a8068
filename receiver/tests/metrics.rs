//! `--metrics-listen`: the receiver serves its counters on GET /metrics. No
//! broker is needed: the counters here move on the device side (a TCP peer
//! that never says HELLO), while the MQTT side keeps trying to connect.

use std::net::SocketAddr;
use std::time::Duration;

use futures::SinkExt;
use protocol::{Frame, FrameCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// The body of `GET /metrics` at `addr`, read over plain HTTP/1.1.
async fn get_metrics(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("metrics endpoint accepts");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    body.to_owned()
}

#[tokio::test]
async fn metrics_endpoint_serves_the_counters() {
    let mut config = receiver::Config::new("mqtt://127.0.0.1:1".into(), "127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let running = receiver::start(config, shutdown.clone()).await.expect("receiver starts");
    let metrics_addr = running.metrics_addr.expect("a metrics address when --metrics-listen is given");
    assert_ne!(metrics_addr.port(), 0, "the bound port, not the requested one");

    let body = get_metrics(metrics_addr).await;
    assert!(body.contains("# HELP receiver_commands_written "), "{body}");
    assert!(body.contains("receiver_bad_frames_total 0"), "{body}");
    for refusals in ["receiver_device_auth_refused_total 0", "receiver_foreign_results_total 0"] {
        assert!(body.contains(refusals), "{body}");
    }

    // A peer that sends four PINGs and no HELLO is not a device: four bad
    // frames, then its connection is rejected.
    let socket = TcpStream::connect(running.tcp_addr).await.unwrap();
    let mut peer = Framed::new(socket, FrameCodec::default());
    for _ in 0..4 {
        peer.send(Frame::Ping).await.unwrap();
    }
    let rejected = async {
        while running.counters.connections_rejected.get() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, rejected).await.expect("the peer is rejected");

    let body = get_metrics(metrics_addr).await;
    assert_eq!(running.counters.bad_frames.get(), 4);
    assert!(body.contains("receiver_bad_frames_total 4"), "{body}");
    assert!(body.contains("receiver_connections_rejected_total 1"), "{body}");

    shutdown.cancel();
    tokio::time::timeout(WAIT, running.stopped()).await.expect("the receiver stops");
}

#[tokio::test]
async fn no_metrics_endpoint_without_metrics_listen() {
    let config = receiver::Config::new("mqtt://127.0.0.1:1".into(), "127.0.0.1:0".parse().unwrap());
    let shutdown = CancellationToken::new();
    let running = receiver::start(config, shutdown.clone()).await.expect("receiver starts");
    assert_eq!(running.metrics_addr, None);
    shutdown.cancel();
    tokio::time::timeout(WAIT, running.stopped()).await.expect("the receiver stops");
}
