//! Test harness: starts a whole system in-process — gateway (embedded broker or
//! Mosquitto), receiver and simulated fleet — on free loopback ports, against
//! SQLite or a fresh MariaDB database, and offers the calls tests make.

use std::net::SocketAddr;
use std::time::Duration;

use plumbing::mqtt::Brokers;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
pub mod clusters;
pub mod device;
pub mod procs;

/// The MariaDB/MySQL server tests use (a fresh database per test).
pub fn mysql_server() -> String {
    std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// The external broker tests use.
pub fn mosquitto_addr() -> String {
    std::env::var("TEST_MOSQUITTO").unwrap_or_else(|_| "127.0.0.1:1883".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Mysql,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Embedded,
    Mosquitto,
}

/// A receiver's configuration for tests: this broker and topic prefix, a free
/// device port, a unique receiver id.
pub fn receiver_config(broker_url: &str, topic_prefix: &str) -> receiver::Config {
    let mut config = receiver::Config::new(broker_url.to_owned(), free_port());
    config.topic_prefix = topic_prefix.to_owned();
    config.receiver_id = unique("rx");
    config
}

/// A loopback address with a port nobody listens on, for a listener a test
/// starts later (a program given `--http-listen` and the like).
///
/// The port comes from [`clusters::free_low_port`]: below the kernel's
/// ephemeral range, so that no outgoing connection of a test running beside
/// this one can be given it before the listener binds (a port from
/// `bind(:0)` can: CI once failed with "Address already in use" that way),
/// and reserved (its UDP twin held) until this test process ends, so it is
/// never handed out twice.
pub fn free_port() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<clusters::LowPort>> = std::sync::Mutex::new(Vec::new());
    let port = clusters::free_low_port();
    let addr = port.addr();
    HELD.lock().unwrap().push(port);
    addr
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// A database for one test; dropped (MySQL) or deleted (SQLite) by `cleanup`.
#[derive(Debug)]
pub struct TestDb {
    pub url: String,
    mysql_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// `None` when MySQL is not reachable outside CI (the test is then skipped
    /// with a message); in CI (CI=true) an unreachable MySQL fails the test.
    pub async fn create(db: Db) -> Option<TestDb> {
        match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite:{}", dir.path().join("gw.db").display());
                Some(TestDb { url, mysql_name: None, _dir: Some(dir) })
            }
            Db::Mysql => {
                use sqlx::Connection;
                let server = mysql_server();
                let conn = sqlx::MySqlConnection::connect(&format!("{server}/mysql")).await;
                let mut conn = match conn {
                    Ok(c) => c,
                    Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                        panic!("MySQL at {server} is required in CI: {e}")
                    }
                    Err(e) => {
                        eprintln!(
                            "SKIPPED: MySQL at {server} unreachable ({e}); set CI=true to make this fatal"
                        );
                        return None;
                    }
                };
                let name = unique("gwtest_");
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
                Some(TestDb { url: format!("{server}/{name}"), mysql_name: Some(name), _dir: None })
            }
        }
    }

    pub async fn cleanup(&self) {
        use sqlx::Connection;
        if let Some(name) = &self.mysql_name {
            if let Ok(mut conn) = sqlx::MySqlConnection::connect(&format!("{}/mysql", mysql_server())).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut conn).await;
            }
        }
    }
}

/// What to start.
pub struct Spec {
    pub db: Db,
    pub broker: Broker,
    pub devices: usize,
    pub fleet: firmware_sim::FleetConfig,
    /// Adjusts the gateway's configuration (after the test defaults below).
    pub tune: fn(&mut gateway::Config),
    /// Adjusts the receiver's configuration (e.g. serial ports, Modbus devices).
    pub receiver_tune: Box<dyn FnOnce(&mut receiver::Config) + Send>,
}

impl Spec {
    pub fn new(db: Db) -> Spec {
        Spec {
            db,
            broker: Broker::Embedded,
            devices: 2,
            fleet: firmware_sim::FleetConfig::default(),
            tune: |_| {},
            receiver_tune: Box::new(|_| {}),
        }
    }
}

/// The broker password of the users a test makes (`mqtt_users_file`).
pub const TEST_BROKER_PASSWORD: &str = "test broker password";

/// A Mosquitto password file at `path` with `users` (user, password), made
/// by `mosquitto_passwd -b`: the format both the embedded broker and
/// Mosquitto read.
pub fn mqtt_users_file(path: &std::path::Path, users: &[(&str, &str)]) {
    for (i, (user, password)) in users.iter().enumerate() {
        let mut command = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            command.arg("-c");
        }
        let status =
            command.arg("-b").arg(path).arg(user).arg(password).status().expect("mosquitto_passwd runs");
        assert!(status.success(), "mosquitto_passwd {user}: {status}");
    }
}

/// The message secret of signed test systems (`Spec::signed`).
pub const TEST_MESSAGE_SECRET: &str = "a test message secret, at least 32 bytes long";

impl Spec {
    /// Gateway↔receiver messages signed (PROTOCOL 4.7): the gateway has
    /// `TEST_MESSAGE_SECRET`; `System::start` gives the receiver its key.
    pub fn signed(db: Db) -> Spec {
        Spec { tune: |c| c.message_secret = Some(TEST_MESSAGE_SECRET.parse().unwrap()), ..Spec::new(db) }
    }
}

/// Timeouts short enough for tests, long enough for a loaded 2-core machine.
pub fn test_timeouts(config: &mut gateway::Config) {
    config.ack_timeout_ms = 1_500;
    config.result_timeout_ms = 3_000;
    config.retry_base_ms = 100;
    config.retry_cap_ms = 400;
    config.sweep_interval_ms = 100;
}

/// A running system.
pub struct System {
    pub base: String,
    pub http: reqwest::Client,
    pub gateway: gateway::Running,
    pub receiver: receiver::Running,
    pub fleet: firmware_sim::Fleet,
    pub broker: Brokers,
    pub topic_prefix: String,
    pub device_ids: Vec<String>,
    pub db: TestDb,
    pub shutdown: CancellationToken,
    tune: fn(&mut gateway::Config),
    /// The key (every scope) `http` sends when the gateway requires API keys.
    pub api_key: Option<String>,
    /// The embedded broker's users file, when the gateway runs without --insecure.
    _users: Option<tempfile::TempDir>,
}

impl System {
    /// Starts everything, registers the devices and waits until they are online.
    /// `None` when the test must be skipped (see `TestDb::create`).
    pub async fn start(spec: Spec) -> Option<System> {
        let db = TestDb::create(spec.db).await?;
        let shutdown = CancellationToken::new();
        // A unique prefix and unique client ids keep tests apart on a shared Mosquitto.
        let topic_prefix = unique("t");
        let mut config = gateway::Config::for_local(db.url.clone(), free_port(), free_port());
        config.topic_prefix = topic_prefix.clone();
        config.instance_id = Some(unique("gw"));
        if spec.broker == Broker::Mosquitto {
            config.broker = Some(format!("mqtt://{}", mosquitto_addr()));
        }
        test_timeouts(&mut config);
        (spec.tune)(&mut config);
        let mut rconfig = receiver_config("mqtt://set.below:1", &topic_prefix);
        (spec.receiver_tune)(&mut rconfig);
        // Without --insecure the gateway needs a message secret (the test one)
        // and its embedded broker users (the receiver, with a test password).
        if !config.insecure && config.message_secret.is_none() {
            config.message_secret = Some(TEST_MESSAGE_SECRET.parse().unwrap());
        }
        let users =
            (!config.insecure && config.broker.is_none() && config.mqtt_users_file.is_none()).then(|| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("mqtt-users");
                mqtt_users_file(&path, &[(&rconfig.receiver_id, TEST_BROKER_PASSWORD)]);
                config.mqtt_users_file = Some(path);
                rconfig.broker_username = Some(rconfig.receiver_id.clone());
                rconfig.broker_password = Some(TEST_BROKER_PASSWORD.parse().unwrap());
                dir
            });
        let secret = config.message_secret.clone();
        let gateway = gateway::start(config, shutdown.clone()).await.expect("gateway starts");
        let broker = gateway.broker.clone();
        // The addresses only: the gateway's own login is not the receiver's.
        rconfig.broker = broker
            .as_slice()
            .iter()
            .map(|b| format!("{}://{}:{}", if b.tls { "mqtts" } else { "mqtt" }, b.host, b.port))
            .collect::<Vec<_>>()
            .join(",");
        // A signing gateway's receiver holds its key, unless the test gave one.
        if let Some(secret) = secret.filter(|_| rconfig.receiver_key.is_none()) {
            let key = protocol::seal::receiver_key(secret.expose().as_bytes(), &rconfig.receiver_id, 1);
            rconfig.receiver_key = Some(key.to_base64().parse().unwrap());
        }
        let receiver = receiver::start(rconfig, shutdown.clone()).await.expect("receiver starts");
        // With API keys required, the harness's own client holds one with every scope.
        let api_key = match gateway.app.config().api_keys_required() {
            true => Some(create_api_key(gateway.app.store(), "harness", &gateway::api_key::Scope::ALL).await),
            false => None,
        };
        let http = http_client(api_key.as_deref());
        let base = format!("http://{}", gateway.http_addr);
        let fleet_config = firmware_sim::FleetConfig {
            connect: vec![receiver.tcp_addr],
            devices: spec.devices,
            ..spec.fleet
        };
        let device_ids: Vec<String> = (0..spec.devices)
            .map(|i| firmware_sim::device_id(&fleet_config.id_prefix, fleet_config.id_start + i))
            .collect();
        for id in &device_ids {
            let r = http.put(format!("{base}/v1/devices/{id}")).json(&json!({})).send().await.unwrap();
            assert!(r.status().is_success(), "registering {id}");
        }
        let fleet = firmware_sim::Fleet::start(fleet_config, shutdown.clone());
        assert!(fleet.wait_connected(spec.devices, Duration::from_secs(20)).await, "devices connect");
        let system = System {
            base,
            http,
            gateway,
            receiver,
            fleet,
            broker,
            topic_prefix,
            device_ids,
            db,
            shutdown,
            tune: spec.tune,
            _users: users,
            api_key,
        };
        for id in &system.device_ids {
            eventually("device online", || system.device_online(id)).await;
        }
        Some(system)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn send(&self, device: &str, body: Value) -> (u16, Value) {
        self.post_raw(&format!("/v1/devices/{device}/commands"), body.to_string()).await
    }

    pub async fn command(&self, id: &str) -> Value {
        self.get(&format!("/v1/commands/{id}")).await.1
    }

    /// The `detail` of each of a command's events.
    pub async fn event_details(&self, id: &str) -> Vec<String> {
        let (_, v) = self.get(&format!("/v1/commands/{id}/events")).await;
        v["items"].as_array().unwrap().iter().map(|e| e["detail"].as_str().unwrap_or("").to_owned()).collect()
    }

    pub async fn events(&self, id: &str) -> Vec<(Option<String>, String)> {
        let (_, v) = self.get(&format!("/v1/commands/{id}/events")).await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["from"].as_str().map(str::to_owned), e["to"].as_str().unwrap().to_owned()))
            .collect()
    }

    pub async fn all_commands(&self) -> Vec<Value> {
        let (_, v) = self.get("/v1/commands?limit=1000").await;
        v["items"].as_array().cloned().unwrap_or_default()
    }

    pub async fn device_online(&self, id: &str) -> bool {
        self.get(&format!("/v1/devices/{id}")).await.1["online"] == true
    }

    /// Starts another gateway instance on the same database and broker.
    pub async fn second_gateway(&self) -> gateway::Running {
        let mut config = gateway::Config::for_local(self.db.url.clone(), free_port(), free_port());
        config.topic_prefix = self.topic_prefix.clone();
        config.instance_id = Some(unique("gw"));
        config.broker = Some(self.broker.to_string());
        test_timeouts(&mut config);
        (self.tune)(&mut config);
        gateway::start(config, self.shutdown.clone()).await.expect("second gateway starts")
    }

    /// Registers a device (no simulated device behind it unless started separately).
    pub async fn register(&self, id: &str) {
        let r = self.http.put(self.url(&format!("/v1/devices/{id}"))).json(&json!({})).send().await.unwrap();
        assert!(r.status().is_success());
    }

    /// Long-polls a command until final (panics if it is not final within 30 s).
    pub async fn final_state(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, c) = self.get(&format!("/v1/commands/{id}?wait_ms=5000")).await;
            if ["succeeded", "failed", "expired", "canceled"].contains(&c["status"].as_str().unwrap_or("")) {
                return c;
            }
            assert!(tokio::time::Instant::now() < deadline, "command {id} not final: {c}");
        }
    }

    /// Stops everything and drops the test database.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.fleet.stopped().await;
        self.receiver.stopped().await;
        self.gateway.stopped().await;
        self.db.cleanup().await;
    }
}

/// Polls `cond` until it holds (20 s at most, then panics naming `what`).
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An MQTT client for tests (submissions, watching topics).
pub async fn mqtt_client(broker: &Brokers) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let spec = plumbing::mqtt::ClientSpec {
        client_id: unique("test"),
        clean_session: true,
        manual_acks: false,
        last_will: None,
    };
    plumbing::mqtt::client(broker, spec)
}

/// Runs each named scenario `async fn name(db: Db)` once on SQLite and once on
/// MariaDB, as `name::sqlite` and `name::mysql`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                super::$name($crate::Db::Mysql).await
            }
        }
    )*};
}

/// Creates an API key with these scopes in the gateway's store, as
/// `gateway token create` does; returns its text (`gk_<id>_<secret>`).
pub async fn create_api_key(
    store: &gateway::store::Store,
    name: &str,
    scopes: &[gateway::api_key::Scope],
) -> String {
    let new = gateway::api_key::NewKey::generate();
    let key = gateway::store::ApiKey {
        id: new.id.clone(),
        name: name.to_owned(),
        key_hash: new.hash.clone(),
        scopes: scopes.to_vec(),
        created_at: gateway::command::now_ms(),
        revoked_at: None,
    };
    assert!(store.insert_api_key(&key).await.expect("the key is stored"), "a fresh key id");
    new.text().to_owned()
}

/// An HTTP client that sends `Authorization: Bearer <key>` on every request
/// when given a key.
pub fn http_client(api_key: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let mut value: reqwest::header::HeaderValue = format!("Bearer {key}").parse().unwrap();
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}
