//! Devices prove who they are (issue 12, attacks C4 and C5; PROTOCOL.md §5):
//! a connection naming a live device without its key is refused and the real
//! device keeps its session; a device answers only its own commands; keys
//! rotate through the registry API without losing or repeating a command;
//! the device listener speaks TLS; unauthenticated devices only by opt-in.
//! Real gateway, receiver and simulated fleet (in-process), both stores
//! wherever the gateway's store decides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use protocol::device_auth::FleetSecret;
use protocol::{DeviceId, Frame, FrameCodec};
use serde_json::{json, Value};
use system_tests::{eventually, on_both_stores, receiver_config, Db, Spec, System};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use uuid::Uuid;

/// The fleet secret of these systems (hex, 32 bytes).
const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn secret() -> FleetSecret {
    SECRET.parse().unwrap()
}

/// A system whose gateway, receiver and fleet share the fleet secret: the
/// receiver challenges every device (a configured secret always means
/// authentication, `--insecure` or not).
async fn secured(
    db: Db,
    devices: usize,
    tune: impl FnOnce(&mut receiver::Config) + Send + 'static,
) -> Option<System> {
    let mut spec = Spec::new(db);
    spec.devices = devices;
    spec.tune = |c| c.device_key_secret = Some(SECRET.parse().unwrap());
    spec.fleet.device_key_secret = Some(secret());
    spec.receiver_tune = Box::new(move |c| {
        c.device_key_secret = Some(secret());
        tune(c);
    });
    System::start(spec).await
}

/// A hand-played device connection: HELLO, then whatever the test says.
struct Raw {
    framed: Framed<TcpStream, FrameCodec>,
    id: DeviceId,
}

impl Raw {
    async fn hello(receiver: SocketAddr, id: &str) -> Raw {
        let socket = TcpStream::connect(receiver).await.expect("the receiver's device port");
        let mut framed = Framed::new(socket, FrameCodec::default());
        let id = DeviceId::parse(id).unwrap();
        framed.send(&Frame::Hello { device_id: id.clone() }).await.unwrap();
        Raw { framed, id }
    }

    /// The CHALLENGE's nonce (the receiver's answer to the HELLO).
    async fn challenge(&mut self) -> [u8; 32] {
        let next = tokio::time::timeout(Duration::from_secs(10), self.framed.next()).await;
        match next.expect("a CHALLENGE in time") {
            Some(Ok(Ok(Frame::Challenge { nonce }))) => nonce,
            other => panic!("expected a CHALLENGE, got {other:?}"),
        }
    }

    /// Answers the challenge with the key of `generation` under `secret`.
    async fn authenticate(receiver: SocketAddr, id: &str, secret: &FleetSecret, generation: u32) -> Raw {
        let mut raw = Raw::hello(receiver, id).await;
        let nonce = raw.challenge().await;
        let proof = secret.device_key(&raw.id, generation).prove(&raw.id, &nonce);
        raw.framed.send(&Frame::Auth { generation, proof }).await.unwrap();
        raw
    }

    async fn send(&mut self, frame: Frame) {
        // The receiver may have closed already: what counts is what it does next.
        let _ = self.framed.send(&frame).await;
    }

    /// True when the receiver closes the connection within 15 s (frames before that skipped).
    async fn closed(&mut self) -> bool {
        let end = async {
            loop {
                match self.framed.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(15), end).await.is_ok()
    }

    /// The next COMMAND's id within `within`, `None` if none came (or the connection ended).
    async fn next_command(&mut self, within: Duration) -> Option<Uuid> {
        let read = async {
            loop {
                match self.framed.next().await {
                    Some(Ok(Ok(Frame::Command { id, .. }))) => return Some(id),
                    Some(Ok(_)) => continue,
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(within, read).await.ok().flatten()
    }
}

/// Sends `n` sync echo commands to `device` one after the other; returns their final states.
async fn echoes(s: &System, device: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..n {
        let (status, c) =
            s.send(device, json!({"name": "echo", "payload": {"i": i}, "wait_ms": 20_000})).await;
        assert_eq!(status, 200, "{c}");
        out.push(c);
    }
    out
}

fn all_echoed(commands: &[Value]) {
    for (i, c) in commands.iter().enumerate() {
        assert_eq!(c["status"], "succeeded", "{c}");
        assert_eq!(c["result"]["payload"], json!({"i": i}), "the real device's answer: {c}");
    }
}

async fn presence_receiver(s: &System, device: &str) -> Value {
    s.get(&format!("/v1/devices/{device}")).await.1["receiver_id"].clone()
}

/// C4: impostors naming a live device — no AUTH, a RESULT instead, a wrong
/// proof, a key of another fleet, a proof for another generation — are each
/// refused; the real device keeps its session and answers every command.
async fn an_impostor_without_the_key_is_refused_and_the_device_keeps_its_session(db: Db) {
    let Some(s) = secured(db, 1, |_| {}).await else { return };
    let dev = s.device_ids[0].clone();
    let at = presence_receiver(&s, &dev).await;
    let addr = s.receiver.tcp_addr;
    let refused = &s.receiver.counters.device_auth_refused;
    let before = refused.get();
    let commands = async { echoes(&s, &dev, 30).await };
    let attacks = async {
        // 1. HELLO, then no AUTH: a RESULT frame instead.
        let mut raw = Raw::hello(addr, &dev).await;
        raw.challenge().await;
        raw.send(Frame::Result { id: Uuid::now_v7(), code: 0, payload: "forged".into() }).await;
        assert!(raw.closed().await, "no AUTH: closed");
        // 2. A random proof.
        let mut raw = Raw::hello(addr, &dev).await;
        raw.challenge().await;
        raw.send(Frame::Auth { generation: 1, proof: [7; 32] }).await;
        assert!(raw.closed().await, "a wrong proof: closed");
        // 3. The right construction with another fleet's secret.
        let other = FleetSecret::from_bytes(vec![9; 32]).unwrap();
        assert!(Raw::authenticate(addr, &dev, &other, 1).await.closed().await, "another fleet's key: closed");
        // 4. Generation 2 claimed, generation 1's proof: the wrong generation.
        let mut raw = Raw::hello(addr, &dev).await;
        let nonce = raw.challenge().await;
        let proof = secret().device_key(&raw.id, 1).prove(&raw.id, &nonce);
        raw.send(Frame::Auth { generation: 2, proof }).await;
        assert!(raw.closed().await, "a proof for another generation: closed");
        // 5. A HELLO and silence: refused when the HELLO window ends (10 s).
        let mut raw = Raw::hello(addr, &dev).await;
        raw.challenge().await;
        assert!(raw.closed().await, "silence: closed");
    };
    let (results, ()) = tokio::join!(commands, attacks);
    all_echoed(&results);
    assert_eq!(refused.get() - before, 5, "each attempt counted");
    assert_eq!(s.fleet.stats().totals.executed, 30, "the real device ran every command, once");
    assert_eq!(s.fleet.stats().totals.connects, 1, "and never lost its session");
    assert_eq!(presence_receiver(&s, &dev).await, at);
    assert!(s.device_online(&dev).await);
    s.stop().await;
}

/// C5: a device's (authenticated) connection that answers another device's
/// command is dropped and counted; the real answer wins.
async fn a_device_cannot_answer_another_devices_command(db: Db) {
    let Some(s) = secured(db, 1, |_| {}).await else { return };
    let dev = s.device_ids[0].clone();
    s.register("rogue-1").await;
    let mut rogue = Raw::authenticate(s.receiver.tcp_addr, "rogue-1", &secret(), 1).await;
    eventually("the rogue online", || s.device_online("rogue-1")).await;
    let foreign = &s.receiver.counters.foreign_results;
    let (_, c) = s
        .send(&dev, json!({"name": "echo", "payload": {"real": true, "delay_ms": 3000}, "mode": "async"}))
        .await;
    let id: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    // The rogue answers it while the real device works on it.
    eventually("the command is delivered", || async {
        ["delivered", "succeeded"]
            .contains(&s.command(&id.to_string()).await["status"].as_str().unwrap_or(""))
    })
    .await;
    rogue.send(Frame::Result { id, code: 0, payload: r#"{"forged":true}"#.into() }).await;
    eventually("the forged RESULT is counted", || async { foreign.get() == 1 }).await;
    let c = s.final_state(&id.to_string()).await;
    assert_eq!(
        (c["status"].as_str(), &c["result"]["payload"]),
        (Some("succeeded"), &json!({"real": true, "delay_ms": 3000})),
        "{c}"
    );
    // Its own commands the rogue still answers.
    let mine = tokio::spawn({
        let (http, url) = (s.http.clone(), s.url("/v1/devices/rogue-1/commands"));
        async move {
            http.post(url).json(&json!({"name": "x"})).send().await.unwrap().json::<Value>().await.unwrap()
        }
    });
    let own = rogue.next_command(Duration::from_secs(10)).await.expect("the rogue's own command");
    rogue.send(Frame::Result { id: own, code: 0, payload: "{}".into() }).await;
    assert_eq!(mine.await.unwrap()["status"], "succeeded");
    assert_eq!(foreign.get(), 1);
    s.stop().await;
}

/// Rotation: with commands in flight, each device is issued a new key and
/// reconnects with it; none is lost or run twice; then the old key is
/// refused (by the receiver holding the new session, and by the gateway when
/// it turns up at another receiver), and a revoked one too.
async fn keys_rotate_without_losing_a_command(db: Db) {
    let Some(s) = secured(db, 2, |_| {}).await else { return };
    let ids: Vec<String> = s.device_ids.clone();
    // Provisioning: generation 1, the key the devices already hold.
    for dev in &ids {
        let issued = s.post_raw(&format!("/v1/devices/{dev}/key"), "").await;
        assert_eq!((issued.0, issued.1["generation"].as_u64()), (201, Some(1)), "{issued:?}");
    }
    let mut pending = Vec::new();
    for i in 0..20 {
        let dev = &ids[i % 2];
        let (status, c) =
            s.send(dev, json!({"name": "echo", "payload": {"i": i, "delay_ms": 50}, "mode": "async"})).await;
        assert_eq!(status, 202, "{c}");
        pending.push(c["id"].as_str().unwrap().to_owned());
    }
    for dev in &ids {
        let (status, issued) = s.post_raw(&format!("/v1/devices/{dev}/key"), "").await;
        assert_eq!((status, issued["generation"].as_u64()), (201, Some(2)), "{issued}");
        let expected = secret().device_key(&DeviceId::parse(dev).unwrap(), 2).to_base64();
        assert_eq!(issued["key"], expected.as_str(), "the key is the one derived from the fleet secret");
    }
    s.fleet.set_key_generation(2);
    for id in &pending {
        let c = s.final_state(id).await;
        assert_eq!(c["status"], "succeeded", "{c}");
    }
    let totals = s.fleet.stats().totals;
    assert_eq!(
        (totals.executed, totals.executed_ids_repeated),
        (20, 0),
        "each command ran exactly once: {totals:?}"
    );
    assert!(totals.connects >= 4, "every device reconnected with its new key: {totals:?}");
    let dev = DeviceId::parse(&ids[0]).unwrap();
    eventually("generation 1 is retired once generation 2 was used", || async {
        s.gateway.app.store().key_generations(&dev).await.unwrap().map(|g| (g.min, g.latest)) == Some((2, 2))
    })
    .await;
    // The old key at the receiver that holds the new session: refused there.
    let refused = &s.receiver.counters.device_auth_refused;
    let before = refused.get();
    assert!(Raw::authenticate(s.receiver.tcp_addr, &ids[0], &secret(), 1).await.closed().await);
    assert_eq!(refused.get(), before + 1);
    // The old key at another receiver (which cannot know it is old): the gateway refuses its presence.
    let mut config = receiver_config(&s.broker.to_string(), &s.topic_prefix);
    config.device_key_secret = Some(secret());
    let other = receiver::start(config, s.shutdown.clone()).await.expect("a second receiver");
    let at = presence_receiver(&s, &ids[0]).await;
    let presence_refused = &s.gateway.app.metrics().presence_key_refused;
    let _old = Raw::authenticate(other.tcp_addr, &ids[0], &secret(), 1).await;
    // (At least once: a device attached while the receiver announces itself is reported twice.)
    eventually("the gateway refuses the old key's presence", || async { presence_refused.get() >= 1 }).await;
    assert_eq!(presence_receiver(&s, &ids[0]).await, at, "the device stays where its new key is");
    all_echoed(&echoes(&s, &ids[0], 3).await);
    // A revoked key: generation 3 with revoke_previous; 2 is refused at once.
    let (status, issued) = s.post_raw(&format!("/v1/devices/{}/key?revoke_previous=true", ids[1]), "").await;
    assert_eq!((status, issued["generation"].as_u64()), (201, Some(3)), "{issued}");
    let before = presence_refused.get();
    let _revoked = Raw::authenticate(other.tcp_addr, &ids[1], &secret(), 2).await;
    eventually("the gateway refuses the revoked key", || async { presence_refused.get() > before }).await;
    assert_ne!(presence_receiver(&s, &ids[1]).await, json!(other.bridge.receiver_id()));
    s.stop().await;
    other.stopped().await;
}

/// A fleet without keys is refused by a receiver that wants them (and says
/// why in its log); the same fleet works where unauthenticated devices were
/// opted into; a receiver with neither refuses to start, naming the flags.
async fn unauthenticated_devices_only_by_opt_in(db: Db) {
    // The fleet has no key: System::start would wait for it forever, so the
    // receiver is first tried by hand.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut config = receiver_config("mqtt://127.0.0.1:1", "t-none");
    config.insecure = false;
    // Its other credentials are there: what is missing is the devices'.
    config.broker_username = Some(config.receiver_id.clone());
    config.broker_password = Some("a broker password".parse().unwrap());
    config.receiver_key = Some(protocol::seal::Key::from_bytes([1; 32]).to_base64().parse().unwrap());
    let error = receiver::start(config.clone(), shutdown.clone()).await.unwrap_err().to_string();
    assert!(
        error.contains("--device-key-secret") && error.contains("--allow-unauthenticated-devices"),
        "{error}"
    );
    config.device_key_secret = Some(secret());
    let strict = receiver::start(config, shutdown.clone()).await.expect("with a secret it starts");
    let keyless = firmware_sim::FleetConfig {
        connect: vec![strict.tcp_addr],
        id_prefix: "keyless-".into(),
        ..Default::default()
    };
    let fleet = firmware_sim::Fleet::start(keyless, shutdown.clone());
    eventually("the keyless device is refused", || async { strict.counters.device_auth_refused.get() >= 1 })
        .await;
    assert!(strict.bridge.connected().is_empty(), "never registered");
    shutdown.cancel();
    fleet.stopped().await;
    strict.stopped().await;
    // Opted in: the keyless fleet (System's default) works, beside a secret.
    let mut spec = Spec::new(db);
    spec.receiver_tune = Box::new(|c| {
        c.device_key_secret = Some(secret());
        c.allow_unauthenticated_devices = true;
    });
    let Some(s) = System::start(spec).await else { return };
    all_echoed(&echoes(&s, &s.device_ids[0], 2).await);
    assert_eq!(s.receiver.counters.device_auth_refused.get(), 0);
    s.stop().await;
}

on_both_stores!(
    an_impostor_without_the_key_is_refused_and_the_device_keeps_its_session,
    a_device_cannot_answer_another_devices_command,
    keys_rotate_without_losing_a_command,
    unauthenticated_devices_only_by_opt_in,
);

/// A CA and a receiver certificate for 127.0.0.1 and localhost, in `dir`:
/// (ca.pem, cert.pem, key.pem).
fn test_certs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test device CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// TLS on the device listener: the fleet trusting the CA connects,
/// authenticates and runs commands; a client trusting another CA, and a
/// plain TCP client, do not get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_listener_speaks_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certs(dir.path());
    let mut spec = Spec::new(Db::Sqlite);
    spec.fleet.device_key_secret = Some(secret());
    spec.fleet.tls_ca = Some(ca);
    spec.receiver_tune = Box::new(move |c| {
        c.device_key_secret = Some(secret());
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
    });
    let s = System::start(spec).await.expect("SQLite is always there");
    all_echoed(&echoes(&s, &s.device_ids[0], 3).await);
    let addr = s.receiver.tcp_addr;
    // A client that trusts another CA: the handshake fails on its side.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = test_certs(other_dir.path());
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&other_ca).unwrap();
    use rustls::pki_types::pem::PemObject;
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let socket = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshake = connector.connect(name, socket).await;
    assert!(handshake.is_err(), "a certificate from an untrusted CA is refused by the client");
    // Plain TCP speaking the frame: no TLS handshake, no device.
    let rejected = s.receiver.counters.connections_rejected.get();
    let mut plain = Raw::hello(addr, &s.device_ids[0]).await;
    assert!(plain.closed().await, "plain TCP is closed");
    eventually("the plain connection is counted", || async {
        s.receiver.counters.connections_rejected.get() > rejected
    })
    .await;
    all_echoed(&echoes(&s, &s.device_ids[0], 2).await);
    s.stop().await;
}

/// The real binaries, configured as an operator would: the fleet secret in a
/// file (by flag for the gateway and the simulator, by environment variable
/// for the receiver); a receiver with no secret refuses to start, naming the
/// flags; a keyless simulator is refused and says why; the gateway issues keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_programs_take_the_secret_from_a_file_and_a_receiver_without_one_refuses_to_start() {
    use system_tests::procs::{binaries, read_stats, wait_listening, within, Api, Proc};
    let bins = binaries();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("fleet.key");
    std::fs::write(&key_file, format!("{SECRET}\n")).unwrap();
    let key_arg = format!("--device-key-secret-file={}", key_file.display());
    let (http, mqtt, tcp) = (system_tests::free_port(), system_tests::free_port(), system_tests::free_port());
    let gateway_args = [
        "serve".to_owned(),
        format!("--database-url=sqlite:{}", dir.path().join("gw.db").display()),
        format!("--http-listen={http}"),
        format!("--mqtt-listen={mqtt}"),
        key_arg.clone(),
    ];
    let _gateway = Proc::start("gateway", &bins.gateway, &gateway_args, dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let receiver_args = [format!("--broker=mqtt://{mqtt}"), format!("--tcp-listen={tcp}")];
    // Its other credentials are there: what is missing is the devices'.
    let receiver_key = protocol::seal::Key::from_bytes([1; 32]).to_base64();
    let strict = [
        ("RECEIVER_INSECURE", "false"),
        ("RECEIVER_BROKER_USERNAME", "receiver-1"),
        ("RECEIVER_BROKER_PASSWORD", "a broker password"),
        ("RECEIVER_KEY", receiver_key.as_str()),
    ];
    let mut bare = Proc::start_with_env("receiver-bare", &bins.receiver, &receiver_args, &strict, dir.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bare.is_running() {
        assert!(tokio::time::Instant::now() < deadline, "a receiver without a secret keeps running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let said = bare.log_tail(10);
    assert!(
        said.contains("--device-key-secret") && said.contains("--allow-unauthenticated-devices"),
        "{said}"
    );
    let key_path = key_file.display().to_string();
    // The secret from a file turns device authentication on (messages and the
    // broker stay as the gateway here runs them: --insecure).
    let env = [("RECEIVER_DEVICE_KEY_SECRET_FILE", key_path.as_str())];
    let receiver = Proc::start_with_env("receiver", &bins.receiver, &receiver_args, &env, dir.path());
    wait_listening("the receiver's device port", tcp, Duration::from_secs(30)).await;
    api.register("dev-0000").await;
    let sim_args = [format!("--connect={tcp}"), "--devices=1".to_owned(), key_arg];
    let _sim = Proc::start("sim", &bins.firmware_sim, &sim_args, dir.path());
    api.wait_online(&["dev-0000".to_owned()], Duration::from_secs(30)).await;
    let body = json!({"name": "echo", "payload": {"ok": 1}, "wait_ms": 10_000});
    let (status, c) = api.post("/v1/devices/dev-0000/commands", &body).await.unwrap();
    assert_eq!((status, &c["status"]), (200, &json!("succeeded")), "{c}");
    let keyless_args =
        [format!("--connect={tcp}"), "--devices=1".to_owned(), "--id-prefix=keyless-".to_owned()];
    let keyless = Proc::start("keyless", &bins.firmware_sim, &keyless_args, dir.path());
    within("the keyless simulator says why it is refused", Duration::from_secs(30), || {
        let seen = keyless.log_count("requires device authentication") > 0;
        async move { seen }
    })
    .await;
    let (status, issued) = api.post("/v1/devices/dev-0000/key", &json!(null)).await.unwrap();
    assert_eq!((status, &issued["generation"]), (201, &json!(1)), "{issued}");
    let expected = secret().device_key(&DeviceId::parse("dev-0000").unwrap(), 1).to_base64();
    assert_eq!(
        issued["key"],
        expected.as_str(),
        "the gateway derives the simulator's key from the same file"
    );
    // Rotation as an operator does it: generation 2, handed to the device
    // (a second simulator holding only that key); it takes over, and the
    // first one, still on generation 1, is refused from then on.
    let (status, issued) = api.post("/v1/devices/dev-0000/key", &json!(null)).await.unwrap();
    assert_eq!((status, &issued["generation"]), (201, &json!(2)), "{issued}");
    let own_key = format!("--device-key={}", issued["key"].as_str().unwrap());
    let stats = dir.path().join("rotated.json");
    let rotated_args = [
        format!("--connect={tcp}"),
        "--devices=1".to_owned(),
        own_key,
        "--device-key-generation=2".to_owned(),
        format!("--stats-file={}", stats.display()),
    ];
    let rotated = Proc::start("rotated", &bins.firmware_sim, &rotated_args, dir.path());
    within("the first simulator is refused (an older key)", Duration::from_secs(30), || {
        let seen = receiver.log_count("older than the one (2)") > 0;
        async move { seen }
    })
    .await;
    let (status, c) = api.post("/v1/devices/dev-0000/commands", &body).await.unwrap();
    assert_eq!((status, &c["status"]), (200, &json!("succeeded")), "{c}");
    within("the device with the new key ran it", Duration::from_secs(10), || {
        let ran = read_stats(&stats).is_some_and(|s| s.totals.executed == 1);
        async move { ran }
    })
    .await;
    drop(rotated);
}
