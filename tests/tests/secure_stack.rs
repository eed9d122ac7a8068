//! The whole system as production runs it — no `--insecure` anywhere — set
//! up the way docs/SECURITY.md and the README say, with the real programs:
//! a message secret, the receiver's key printed by `gateway receiver-key`,
//! the embedded broker's users file, an API key from `gateway token create`,
//! a fleet secret for device keys. A command goes through; an anonymous
//! caller, an anonymous MQTT client and a device without its key do not.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use system_tests::procs::{binaries, wait_listening, Api, Proc};
use system_tests::{free_port, mqtt_users_file};

const MESSAGE_SECRET: &str = "a production-like message secret, 48 bytes long.";
const FLEET_SECRET: &str = "5e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

fn run(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(&binaries().gateway).args(args).envs(envs.iter().copied()).output().unwrap();
    assert!(out.status.success(), "gateway {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_secured_the_documented_way() {
    let bins = binaries();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("message-secret"), MESSAGE_SECRET).unwrap();
    std::fs::write(path("fleet-secret"), FLEET_SECRET).unwrap();
    mqtt_users_file(&dir.path().join("mqtt-users"), &[("receiver-1", "receiver-1 broker password")]);
    let database = format!("sqlite:{}", path("gateway.db"));
    let db_env = [("GATEWAY_DATABASE_URL", database.as_str())];
    let key = run(
        &["token", "create", "--name", "ops", "--scope", "commands:write,commands:read,devices:admin"],
        &db_env,
    );
    let secret_file = path("message-secret");
    let receiver_key =
        run(&["receiver-key", "receiver-1"], &[("GATEWAY_MESSAGE_SECRET_FILE", secret_file.as_str())]);
    std::fs::write(path("receiver-1.key"), &receiver_key).unwrap();

    let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
    let (users, fleet) = (path("mqtt-users"), path("fleet-secret"));
    let gateway_env = [
        ("GATEWAY_INSECURE", "false"),
        ("GATEWAY_DATABASE_URL", database.as_str()),
        ("GATEWAY_MESSAGE_SECRET_FILE", secret_file.as_str()),
        ("GATEWAY_MQTT_USERS_FILE", users.as_str()),
        ("GATEWAY_DEVICE_KEY_SECRET_FILE", fleet.as_str()),
    ];
    let gateway_args = ["serve".to_owned(), format!("--http-listen={http}"), format!("--mqtt-listen={mqtt}")];
    let _gateway = Proc::start_with_env("gateway", &bins.gateway, &gateway_args, &gateway_env, dir.path());
    let api = Api::with_key(http, &key);
    api.wait_healthy(Duration::from_secs(60)).await;

    let key_file = path("receiver-1.key");
    let receiver_env = [
        ("RECEIVER_INSECURE", "false"),
        ("RECEIVER_BROKER_USERNAME", "receiver-1"),
        ("RECEIVER_BROKER_PASSWORD", "receiver-1 broker password"),
        ("RECEIVER_KEY_FILE", key_file.as_str()),
        ("RECEIVER_DEVICE_KEY_SECRET_FILE", fleet.as_str()),
    ];
    let receiver_args = [format!("--broker=mqtt://{mqtt}"), format!("--tcp-listen={tcp}")];
    let receiver =
        Proc::start_with_env("receiver", &bins.receiver, &receiver_args, &receiver_env, dir.path());
    wait_listening("the receiver's device port", tcp, Duration::from_secs(30)).await;
    let devices = vec!["dev-0000".to_owned(), "dev-0001".to_owned()];
    for d in &devices {
        api.register(d).await;
    }
    let sim_args =
        [format!("--connect={tcp}"), "--devices=2".to_owned(), format!("--device-key-secret-file={fleet}")];
    let _sim = Proc::start("sim", &bins.firmware_sim, &sim_args, dir.path());
    api.wait_online(&devices, Duration::from_secs(30)).await;

    for d in &devices {
        let body = json!({"name": "echo", "payload": {"from": d}, "wait_ms": 10_000});
        let (status, c) = api.post(&format!("/v1/devices/{d}/commands"), &body).await.unwrap();
        assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
        assert_eq!(c["result"]["payload"], json!({"from": d}), "{c}");
    }

    // Nobody else gets in: a caller without a key, an MQTT client without a
    // login, a device without its key.
    let anonymous = Api::new(http);
    assert_eq!(anonymous.get("/v1/commands").await.unwrap().0, 401);
    let broker: plumbing::mqtt::Brokers = format!("mqtt://{mqtt}").parse().unwrap();
    let (_client, mut eventloop) = system_tests::mqtt_client(&broker).await;
    let refused = tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await.unwrap();
    assert!(refused.is_err(), "an anonymous MQTT client is refused: {refused:?}");
    let mut impostor = system_tests::device::RawDevice::connect(tcp, "dev-0000").await;
    assert!(impostor.is_closed(Duration::from_secs(15)).await, "a HELLO without the key is refused");
    assert!(api.device_online("dev-0000").await, "the real device keeps its session");
    let log = std::fs::read_to_string(receiver.log_path()).unwrap()
        + &std::fs::read_to_string(_gateway.log_path()).unwrap();
    for secret in
        [MESSAGE_SECRET, FLEET_SECRET, receiver_key.as_str(), key.as_str(), "receiver-1 broker password"]
    {
        assert!(!log.contains(secret), "a secret in the logs");
    }
}
