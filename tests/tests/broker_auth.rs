//! Broker access (issue 12, B6 and the broker half of B1–B5): the real
//! gateway, receivers and firmware-sims as processes, on both stores.
//!
//! - `embedded_broker_logins`: the gateway's embedded broker with a users
//!   file and a TLS listener. Anonymous, wrong-password and unknown-user
//!   logins are refused; a caller taking the receiver's client id is refused
//!   and the receiver keeps its connection; a password rotated in the users
//!   file takes effect without a restart; mqtts:// works for a client that
//!   trusts the test CA and fails for one that does not; commands succeed
//!   throughout (the receiver itself connects over TLS with credentials).
//! - `mosquitto_acl`: a private Mosquitto with the shipped
//!   `deploy/mosquitto/acl` and a password file made here (receiver-2 over
//!   TLS, the gateway with a percent-encoded password in its URL). Commands succeed;
//!   anonymous clients are refused; a caller cannot forge reports or
//!   presence nor read commands; receiver-2 cannot read receiver-1's commands.
//!
//! Both run with `--insecure` left on (the harness default): broker logins
//! are enforced because users / credentials are configured, and the other
//! security features (signatures, device keys, API keys) stay out of the way.
//! The refusals to start without `--insecure` are unit tests in
//! `gateway::broker`.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use plumbing::mqtt::{Brokers, ClientAuth, ClientSpec};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use system_tests::procs::{binaries, wait_listening, Api, Proc};
use system_tests::{free_port, Db, TestDb};
use tokio::sync::mpsc;

system_tests::on_both_stores!(embedded_broker_logins, mosquitto_acl);

const WAIT: Duration = Duration::from_secs(30);

// ---- the embedded broker ----

async fn embedded_broker_logins(db: Db) {
    let Some(db) = TestDb::create(db).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d);
    let users = d.join("users");
    system_tests::mqtt_users_file(&users, &[("receiver-1", "rx-secret"), ("alice", "alice-secret")]);
    let (http, mqtt, mqtts, tcp) = (free_port(), free_port(), free_port(), free_port());
    let gateway_args = vec![
        "serve".to_owned(),
        format!("--database-url={}", db.url),
        format!("--http-listen={http}"),
        format!("--mqtt-listen={mqtt}"),
        format!("--mqtts-listen={mqtts}"),
        format!("--mqtt-tls-cert={}", pki.server_cert.display()),
        format!("--mqtt-tls-key={}", pki.server_key.display()),
        format!("--mqtt-users-file={}", users.display()),
        "--instance-id=gw-emb".to_owned(),
    ];
    let _gateway = Proc::start("gateway", &binaries().gateway, &gateway_args, d);
    let api = Api::new(http);
    api.wait_healthy(WAIT).await;
    wait_listening("the TLS listener", mqtts, WAIT).await;
    // The receiver logs in over TLS, trusting the test CA.
    let receiver = Proc::start_with_env(
        "receiver",
        &binaries().receiver,
        &[
            format!("--broker=mqtts://127.0.0.1:{}", mqtts.port()),
            format!("--broker-ca-file={}", pki.ca_cert.display()),
            format!("--tcp-listen={tcp}"),
            "--receiver-id=receiver-1".to_owned(),
        ],
        &[("RECEIVER_BROKER_USERNAME", "receiver-1"), ("RECEIVER_BROKER_PASSWORD", "rx-secret")],
        d,
    );
    let (_sim, device) = start_device(&api, "sim", tcp, "e-", d).await;
    assert_succeeds(&api, &device, 1).await;

    let plain = |userinfo: &str| format!("mqtt://{userinfo}127.0.0.1:{}", mqtt.port());
    let anonymous = connect(&plain(""), "anon-1", None).await;
    assert!(anonymous.is_err(), "an anonymous client got a CONNACK");
    let wrong = connect(&plain("alice:not-her-pw-42@"), "alice-1", None).await;
    assert!(wrong.is_err(), "a wrong password got in");
    let unknown = connect(&plain("mallory:alice-secret@"), "mallory-1", None).await;
    assert!(unknown.is_err(), "an unknown user got in");

    // B6: alice's password is right, the client id is the receiver's.
    let takeover = connect(&plain("alice:alice-secret@"), "receiver-1", None).await;
    assert!(takeover.is_err(), "a caller took the receiver's client id");
    let takeover = connect(&plain("alice:alice-secret@"), "gw-emb-reports", None).await;
    assert!(takeover.is_err(), "a caller took the gateway's client id");
    // The same caller with a client id of its own is welcome.
    let alice = connect(&plain("alice:alice-secret@"), "alice-1", None).await.expect("alice logs in");
    // The receiver was never disconnected and still carries commands.
    assert_succeeds(&api, &device, 2).await;
    assert_eq!(
        receiver.log_count("connected to the broker"),
        1,
        "the receiver reconnected:\n{}",
        receiver.log_tail(20)
    );
    drop(alice);

    // Rotation without a restart: alice gets a new password in the file.
    let status =
        Command::new("mosquitto_passwd").arg("-b").arg(&users).args(["alice", "alice-rotated"]).status();
    assert!(status.unwrap().success());
    let old = connect(&plain("alice:alice-secret@"), "alice-2", None).await;
    assert!(old.is_err(), "the old password still works after the rotation");
    connect(&plain("alice:alice-rotated@"), "alice-2", None).await.expect("the new password works at once");

    let refused = metric(http, "gateway_mqtt_logins_refused_total").await;
    // Anonymous CONNECTs are refused by rumqttd before the gateway is asked: not counted.
    assert_eq!(refused, 5.0, "wrong password, unknown user, two takeovers, the old password");
    let gateway_log = std::fs::read_to_string(d.join("gateway.log")).unwrap();
    assert!(gateway_log.contains("refused a login"), "refusals are logged");
    for secret in ["alice-secret", "alice-rotated", "rx-secret", "not-her-pw-42"] {
        assert!(!gateway_log.contains(secret), "the gateway log shows a password ({secret})");
    }

    // TLS: the test CA is trusted; another CA is not.
    let tls = |userinfo: &str| format!("mqtts://{userinfo}127.0.0.1:{}", mqtts.port());
    connect(&tls("alice:alice-rotated@"), "alice-tls", Some(&pki.ca_cert)).await.expect("mqtts with the CA");
    let other = Pki::new(&d.join("other"));
    let untrusted = connect(&tls("alice:alice-rotated@"), "alice-tls", Some(&other.ca_cert)).await;
    let error = untrusted.err().expect("a client that does not trust the broker's CA connected");
    assert!(error.contains("certificate") || error.contains("UnknownIssuer"), "{error}");
    assert_eq!(metric(http, "gateway_mqtt_logins_refused_total").await, 5.0, "a TLS failure is no login");

    // What a login costs: CONNECT → CONNACK, plain and over TLS (median of 10).
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..10 {
        for (k, (url, ca)) in
            [(plain("alice:alice-rotated@"), None), (tls("alice:alice-rotated@"), Some(&pki.ca_cert))]
                .into_iter()
                .enumerate()
        {
            let start = std::time::Instant::now();
            // A client id of its own per probe: rumqttd may still be tearing down
            // the previous probe's connection, and a new connection with that id
            // can be closed by the old one's late disconnect.
            let probe = connect(&url, &format!("alice-m{i}-{k}"), ca.map(PathBuf::as_path)).await.unwrap();
            times[k].push(start.elapsed());
            drop(probe);
        }
    }
    for t in &mut times {
        t.sort();
    }
    eprintln!(
        "login to the embedded broker (CONNECT→CONNACK, median of 10): plain {:?}, TLS {:?}",
        times[0][5], times[1][5]
    );
    db.cleanup().await;
}

// ---- Mosquitto with the shipped ACL ----

async fn mosquitto_acl(db: Db) {
    let Some(db) = TestDb::create(db).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let users = d.join("passwd");
    // A password with URL-reserved characters, passed percent-encoded in --broker.
    system_tests::mqtt_users_file(
        &users,
        &[("gateway", "gw@p:ss"), ("receiver-1", "r1-pw"), ("receiver-2", "r2-pw"), ("alice", "alice-pw")],
    );
    let pki = Pki::new(d);
    let (_mosquitto, broker, tls_broker) = private_mosquitto(d, &users, &pki).await;
    let (http, tcp1, tcp2) = (free_port(), free_port(), free_port());
    let gateway_args = vec![
        "serve".to_owned(),
        format!("--database-url={}", db.url),
        format!("--http-listen={http}"),
        format!("--broker=mqtt://gateway:gw%40p%3Ass@{broker}"),
        "--instance-id=gw-mosq".to_owned(),
    ];
    let _gateway = Proc::start("gateway", &binaries().gateway, &gateway_args, d);
    let api = Api::new(http);
    api.wait_healthy(WAIT).await;
    let receiver_args = |tcp: SocketAddr, id: &str| {
        vec![
            format!("--broker=mqtt://{broker}"),
            format!("--tcp-listen={tcp}"),
            format!("--receiver-id={id}"),
        ]
    };
    // receiver-2 connects over TLS (Mosquitto's listener, the test CA).
    let mut rx2_args = receiver_args(tcp2, "receiver-2");
    rx2_args[0] = format!("--broker=mqtts://127.0.0.1:{}", tls_broker.port());
    rx2_args.push(format!("--broker-ca-file={}", pki.ca_cert.display()));
    let _rx1 = Proc::start_with_env(
        "receiver-1",
        &binaries().receiver,
        &receiver_args(tcp1, "receiver-1"),
        &[("RECEIVER_BROKER_USERNAME", "receiver-1"), ("RECEIVER_BROKER_PASSWORD", "r1-pw")],
        d,
    );
    let password_file = d.join("r2-password");
    std::fs::write(&password_file, "r2-pw\n").unwrap();
    let _rx2 = Proc::start_with_env(
        "receiver-2",
        &binaries().receiver,
        &rx2_args,
        &[
            ("RECEIVER_BROKER_USERNAME", "receiver-2"),
            ("RECEIVER_BROKER_PASSWORD_FILE", password_file.to_str().unwrap()),
        ],
        d,
    );
    let (_sim1, dev1) = start_device(&api, "sim-1", tcp1, "a-", d).await;
    let (_sim2, dev2) = start_device(&api, "sim-2", tcp2, "b-", d).await;
    assert_succeeds(&api, &dev1, 1).await;
    assert_succeeds(&api, &dev2, 1).await;

    let url = |userinfo: &str| format!("mqtt://{userinfo}{broker}");
    let anonymous = connect(&url(""), "anon-1", None).await;
    let error = anonymous.err().expect("an anonymous client got in");
    assert!(error.contains("refused") || error.contains("NotAuthorized"), "{error}");
    assert!(connect(&url("alice:wrong@"), "alice-0", None).await.is_err(), "a wrong password got in");

    // B1/B2: a caller's forged report and presence never reach the gateway.
    let mut observer = connect(&url("gateway:gw@p:ss@"), "observer", None).await.unwrap();
    for filter in ["gateway/reports", "gateway/presence/+", "gateway/gateways/+/reports", "gateway/commands"]
    {
        assert!(observer.subscribe(filter).await, "the gateway user may read {filter}");
    }
    let mut alice = connect(&url("alice:alice-pw@"), "alice-1", None).await.unwrap();
    let forged_report = json!([{"kind": "result", "command_id": "01936b2e-8f3a-7c1d-9e4f-0a1b2c3d4e5f",
        "device_id": dev1, "receiver_id": "receiver-1", "code": 0, "payload": "FORGED"}]);
    alice.publish("gateway/reports", &forged_report).await;
    alice.publish("gateway/gateways/gw-mosq/reports", &forged_report).await;
    let forged_presence = json!({"device_id": dev1, "receiver_id": "FORGED", "online": true});
    alice.publish(&format!("gateway/presence/{dev1}"), &forged_presence).await;
    // Then a message alice may send: once the observer has it, anything
    // alice published before would have reached it too (one publisher, one
    // subscriber, in order).
    alice.publish("gateway/commands", &json!({"marker": "alice-done"})).await;
    let seen = observer.until(|p| p.topic == "gateway/commands" && text(p).contains("alice-done")).await;
    let forged: Vec<_> = seen.iter().filter(|p| text(p).contains("FORGED")).collect();
    assert!(forged.is_empty(), "a caller's forgery reached the gateway: {forged:?}");
    assert_succeeds(&api, &dev1, 2).await;

    // A caller reads no commands, even subscribed to gateway/#.
    let code = alice.subscribe_code("gateway/#").await;
    eprintln!("Mosquitto answered alice's subscription to gateway/# with {code:?}");
    assert!(alice.subscribe("clients/alice/marker").await);
    // receiver-2's user cannot read receiver-1's commands; receiver-1's can.
    let mut rx2 = connect(&url("receiver-2:r2-pw@"), "receiver-2-probe", None).await.unwrap();
    let rx2_code = rx2.subscribe_code("gateway/receivers/receiver-1/commands").await;
    eprintln!("Mosquitto answered receiver-2's subscription to receiver-1's commands with {rx2_code:?}");
    assert!(rx2.subscribe("clients/receiver-2/marker").await);
    let mut rx1 = connect(&url("receiver-1:r1-pw@"), "receiver-1-probe", None).await.unwrap();
    assert!(rx1.subscribe("gateway/receivers/receiver-1/commands").await);
    assert_succeeds(&api, &dev1, 3).await;
    let own = rx1.until(|p| p.topic == "gateway/receivers/receiver-1/commands").await;
    assert!(!own.is_empty(), "receiver-1's user reads its commands (the probe works)");
    for (probe, user) in [(&mut alice, "alice"), (&mut rx2, "receiver-2")] {
        let marker = format!("clients/{user}/marker");
        probe.publish(&marker, &json!("end")).await;
        let seen = probe.until(|p| p.topic == marker).await;
        let leaked: Vec<_> = seen.iter().filter(|p| p.topic.starts_with("gateway/")).collect();
        assert!(leaked.is_empty(), "{user} read {leaked:?}");
    }

    // A caller's own MQTT submission, replies under clients/alice/.
    assert!(alice.subscribe("clients/alice/replies").await);
    let submission = json!({"device_id": dev2, "name": "echo", "payload": {"via": "mqtt"},
        "reply_to": "clients/alice/replies", "correlation_id": "c-1"});
    alice.publish("gateway/commands", &submission).await;
    let replies = alice.until(|p| p.topic == "clients/alice/replies" && text(p).contains("\"final\"")).await;
    let last: Value = serde_json::from_slice(&replies.last().unwrap().payload).unwrap();
    assert_eq!(last["status"], "succeeded", "{last}");
    db.cleanup().await;
}

/// A Mosquitto on free loopback ports (plain, and TLS with `pki`'s
/// certificate), logins required, the shipped ACL.
async fn private_mosquitto(dir: &Path, passwd: &Path, pki: &Pki) -> (Proc, SocketAddr, SocketAddr) {
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/acl");
    assert!(acl.exists(), "{} is shipped", acl.display());
    let (addr, tls) = (free_port(), free_port());
    let conf = dir.join("mosquitto.conf");
    let text = format!(
        "per_listener_settings false\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
         set_tcp_nodelay true\npersistence false\nlog_dest stderr\nlistener {} 127.0.0.1\n\
         listener {} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
        passwd.display(),
        acl.display(),
        addr.port(),
        tls.port(),
        pki.server_cert.display(),
        pki.server_key.display()
    );
    std::fs::write(&conf, text).unwrap();
    let proc = Proc::start("mosquitto", Path::new("mosquitto"), &[OsStr::new("-c"), conf.as_os_str()], dir);
    wait_listening("private mosquitto", addr, WAIT).await;
    wait_listening("private mosquitto's TLS listener", tls, WAIT).await;
    (proc, addr, tls)
}

// ---- helpers ----

/// Starts a firmware-sim with one device `<prefix>0000` on the receiver at
/// `tcp`, registers it and waits until it is online; returns the process and the id.
async fn start_device(api: &Api, name: &str, tcp: SocketAddr, prefix: &str, dir: &Path) -> (Proc, String) {
    let args = [format!("--connect={tcp}"), "--devices=1".to_owned(), format!("--id-prefix={prefix}")];
    let sim = Proc::start(name, &binaries().firmware_sim, &args, dir);
    let id = firmware_sim::device_id(prefix, 0);
    api.register(&id).await;
    api.wait_online(std::slice::from_ref(&id), WAIT).await;
    (sim, id)
}

/// A sync echo to `device` succeeds with its payload.
async fn assert_succeeds(api: &Api, device: &str, n: u32) {
    let body = json!({"name": "echo", "payload": {"n": n}, "mode": "sync", "wait_ms": 20_000});
    let (status, c) = api.post(&format!("/v1/devices/{device}/commands"), &body).await.unwrap();
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "command {n} to {device}: {c}");
    assert_eq!(c["result"]["payload"], json!({"n": n}));
}

/// One sample of the gateway's `/metrics`.
async fn metric(http: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}"))
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// The test CA and a server certificate it signed for 127.0.0.1 and localhost (rcgen).
struct Pki {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        std::fs::create_dir_all(dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let pki = Pki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        std::fs::write(&pki.ca_cert, ca.pem()).unwrap();
        std::fs::write(&pki.server_cert, cert.pem()).unwrap();
        std::fs::write(&pki.server_key, key.serialize_pem()).unwrap();
        pki
    }
}

/// An MQTT client that got its CONNACK; its event loop runs on a task.
struct Probe {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    subacks: mpsc::UnboundedReceiver<Vec<SubscribeReasonCode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `url` (credentials in it) as `client_id`, trusting `ca` for
/// mqtts://. `Err`: the connection error (no CONNACK, a refusal, TLS).
async fn connect(url: &str, client_id: &str, ca: Option<&Path>) -> Result<Probe, String> {
    let auth = ClientAuth { credentials: None, ca_file: ca.map(Path::to_owned) };
    let brokers = url.parse::<Brokers>().unwrap().with_auth(&auth).unwrap();
    let spec = ClientSpec {
        client_id: client_id.to_owned(),
        clean_session: true,
        manual_acks: false,
        last_will: None,
    };
    let (client, mut eventloop) = plumbing::mqtt::client(&brokers, spec);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack),
                Ok(_) => {}
                Err(e) => return Err(format!("{e} ({e:?})")),
            }
        }
    })
    .await
    .map_err(|_| "no answer within 10 s".to_owned())??;
    assert_eq!(first.code, rumqttc::ConnectReturnCode::Success);
    let (publish_tx, publishes) = mpsc::unbounded_channel();
    let (suback_tx, subacks) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => drop(publish_tx.send(p)),
                Event::Incoming(Packet::SubAck(ack)) => drop(suback_tx.send(ack.return_codes)),
                _ => {}
            }
        }
    });
    Ok(Probe { client, publishes, subacks, task })
}

impl Probe {
    /// Subscribes at QoS 1; the broker's answer.
    async fn subscribe_code(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let codes =
            tokio::time::timeout(WAIT, self.subacks.recv()).await.expect("a SUBACK").expect("connected");
        codes[0]
    }

    /// Subscribes; whether the broker granted it.
    async fn subscribe(&mut self, filter: &str) -> bool {
        matches!(self.subscribe_code(filter).await, SubscribeReasonCode::Success(_))
    }

    async fn publish(&self, topic: &str, body: &Value) {
        self.client.publish(topic, QoS::AtLeastOnce, false, body.to_string()).await.unwrap();
    }

    /// Every message received until (and with) the first that `last`
    /// accepts; panics after 30 s.
    async fn until(&mut self, last: impl Fn(&Publish) -> bool) -> Vec<Publish> {
        let mut seen = Vec::new();
        loop {
            let p = tokio::time::timeout(WAIT, self.publishes.recv())
                .await
                .unwrap_or_else(|_| panic!("waited 30 s; received {seen:?}"))
                .expect("connected");
            let done = last(&p);
            seen.push(p);
            if done {
                return seen;
            }
        }
    }
}
