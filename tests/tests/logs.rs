//! One command can be followed through the logs of all three programs: with
//! `RUST_LOG=debug`, `grep <command id>` over the gateway's, the receiver's
//! and the simulator's logs shows each step of its life (ARCHITECTURE.md,
//! "Following a command").

use std::time::Duration;

use serde_json::json;
use system_tests::free_port;
use system_tests::procs::{binaries, Api, Proc};

/// Lines of `proc`'s log that mention `needle`.
fn lines_with(proc: &Proc, needle: &str) -> Vec<String> {
    let log = std::fs::read_to_string(proc.log_path()).unwrap_or_default();
    log.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

fn assert_has(lines: &[String], step: &str, program: &str) {
    assert!(
        lines.iter().any(|l| l.contains(step)),
        "{program}'s log has no {step:?} line for the command; its lines:\n{}",
        lines.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_can_be_followed_through_the_logs_of_all_three_programs() {
    let bins = binaries();
    let dir = tempfile::tempdir().unwrap();
    let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
    let debug = [("RUST_LOG", "debug,rumqttd=off,rumqttc=warn,sqlx=warn,hyper=warn")];
    let gateway_args = [
        "serve".to_owned(),
        format!("--database-url=sqlite:{}", dir.path().join("gw.db").display()),
        format!("--http-listen={http}"),
        format!("--mqtt-listen={mqtt}"),
    ];
    let gateway = Proc::start_with_env("gateway", &bins.gateway, &gateway_args, &debug, dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let receiver_args = [format!("--broker=mqtt://{mqtt}"), format!("--tcp-listen={tcp}")];
    let receiver = Proc::start_with_env("receiver", &bins.receiver, &receiver_args, &debug, dir.path());
    let device = "dev-0000".to_owned();
    api.register(&device).await;
    let sim_args = [format!("--connect={tcp}"), "--devices=1".to_owned()];
    let sim = Proc::start_with_env("sim", &bins.firmware_sim, &sim_args, &debug, dir.path());
    api.wait_online(std::slice::from_ref(&device), Duration::from_secs(30)).await;

    let body = json!({"name": "set_temp", "payload": {"celsius": 21}, "wait_ms": 10_000});
    let (status, command) = api.post(&format!("/v1/devices/{device}/commands"), &body).await.unwrap();
    assert_eq!((status, command["status"].as_str()), (200, Some("succeeded")), "{command}");
    let id = command["id"].as_str().unwrap().to_owned();
    // The simulator and the receiver log as they go; the gateway logged "final" before it answered.
    system_tests::procs::within(
        "the device's and the receiver's last lines",
        Duration::from_secs(10),
        || {
            let (receiver, sim) = (&receiver, &sim);
            let id = id.clone();
            async move { lines_with(sim, &id).len() >= 2 && lines_with(receiver, &id).len() >= 3 }
        },
    )
    .await;

    let gateway_lines = lines_with(&gateway, &id);
    for step in ["accepted", "published", "report applied", "final"] {
        assert_has(&gateway_lines, step, "gateway");
    }
    assert!(gateway_lines.iter().all(|l| l.contains(&device)), "every gateway line names the device too");
    let receiver_lines = lines_with(&receiver, &id);
    assert!(receiver_lines.iter().all(|l| l.contains(&device)), "{}", receiver_lines.join("\n"));
    let sim_lines = lines_with(&sim, &id);
    assert!(sim_lines.iter().all(|l| l.contains(&device)), "{}", sim_lines.join("\n"));
}
