//! Operators' side of the programs, on real processes with real signals:
//! graceful shutdown (SIGTERM/SIGINT, a second signal), `/healthz` and
//! `/readyz` on the gateway and the receiver, `--log-format json`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use system_tests::procs::{binaries, gateway_args, within, Api, Proc};
use system_tests::{free_port, mosquitto_addr, on_both_stores, Db, TestDb};

/// How long the gateways here let waiting callers wait after SIGTERM.
const GRACE_MS: u64 = 1_500;
/// Longer than any wait of a test here: an answer before it is the shutdown's.
const LONG_WAIT_MS: u64 = 120_000;

fn prefix() -> String {
    format!("sd{}", uuid::Uuid::new_v4().simple())
}

/// A gateway process on Mosquitto with `extra` flags; its API, once healthy.
async fn gateway(db: &str, dir: &Path, extra: &[String], envs: &[(&str, &str)]) -> (Proc, Api) {
    let http = free_port();
    let broker = format!("mqtt://{}", mosquitto_addr());
    let mut args = gateway_args(db, http, &broker, &prefix());
    args.extend_from_slice(extra);
    let proc = Proc::start_with_env("gateway", &binaries().gateway, &args, envs, dir);
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    (proc, api)
}

/// `/readyz`'s status and the names in its `not_ready`.
async fn readiness(api: &Api) -> Option<(u16, Vec<String>)> {
    let (status, body) = api.get("/readyz").await.ok()?;
    let names = body["not_ready"].as_array()?.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect();
    Some((status, names))
}

async fn wait_ready(api: &Api) {
    within("/readyz to answer 200", Duration::from_secs(30), || async {
        readiness(api).await.is_some_and(|(status, _)| status == 200)
    })
    .await;
}

/// Waits until `/readyz` answers 503 naming `check`.
async fn wait_not_ready(api: &Api, check: &str) {
    within(&format!("/readyz to answer 503 naming {check}"), Duration::from_secs(30), || async {
        readiness(api).await.is_some_and(|(status, names)| status == 503 && names.iter().any(|n| n == check))
    })
    .await;
}

/// A sync call (waiting `LONG_WAIT_MS`) to `device`, which no receiver holds,
/// running in its own task; returns once the command is in the store.
async fn sync_call_in_flight(api: &Api, device: &str) -> tokio::task::JoinHandle<(u16, Value)> {
    let caller = api.clone();
    let path = format!("/v1/devices/{device}/commands");
    let call = tokio::spawn(async move {
        let body = json!({"name": "reboot", "wait_ms": LONG_WAIT_MS});
        caller.post(&path, &body).await.expect("the sync call is answered")
    });
    let listed = format!("/v1/commands?device_id={device}");
    // The device may have other commands: this call's is the one named "reboot".
    within("the sync call's command to be stored", Duration::from_secs(30), || async {
        let (status, page) = api.get_ok(&listed).await;
        status == 200
            && page["items"].as_array().is_some_and(|items| items.iter().any(|c| c["name"] == "reboot"))
    })
    .await;
    call
}

/// SIGTERM with a sync call waiting for a device that never answers: the
/// gateway turns unready and refuses new submissions at once, answers the
/// call 202 with its command within the grace, exits 0, and after a restart
/// every command it accepted is in the store.
async fn sigterm_answers_waiting_callers_and_loses_nothing(db: Db) {
    let Some(test_db) = TestDb::create(db).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let grace = [format!("--shutdown-grace-ms={GRACE_MS}")];
    let (mut gw, api) = gateway(&test_db.url, dir.path(), &grace, &[]).await;
    wait_ready(&api).await;
    let device = "silent-1";
    api.register(device).await;
    let (status, queued) = api
        .post(&format!("/v1/devices/{device}/commands"), &json!({"name": "a", "mode": "async"}))
        .await
        .unwrap();
    assert_eq!(status, 202, "{queued}");
    let call = sync_call_in_flight(&api, device).await;
    let long_poll = {
        let (api, id) = (api.clone(), queued["id"].as_str().unwrap().to_owned());
        tokio::spawn(
            async move { api.get(&format!("/v1/commands/{id}?wait_ms={LONG_WAIT_MS}")).await.unwrap() },
        )
    };

    gw.signal("TERM");
    wait_not_ready(&api, "shutdown").await;
    let refused = api.post(&format!("/v1/devices/{device}/commands"), &json!({"name": "late"})).await;
    if let Ok((status, body)) = refused {
        // (Or no connection at all, when the grace is already over.)
        assert_eq!((status, body["error"]["kind"].as_str()), (503, Some("shutting_down")), "{body}");
    }
    let (status, command) = call.await.unwrap();
    assert_eq!((status, command["status"].as_str()), (202, Some("pending")), "{command}");
    let (status, polled) = long_poll.await.unwrap();
    assert_eq!((status, &polled["id"]), (202, &queued["id"]), "{polled}");
    let exit = gw.wait_exit(Duration::from_secs(30)).await.expect("the gateway exits after the grace");
    assert_eq!(exit.code(), Some(0), "{exit:?}");

    gw.restart();
    api.wait_healthy(Duration::from_secs(60)).await;
    for id in [&command["id"], &queued["id"]] {
        let (status, stored) = api.get_ok(&format!("/v1/commands/{}", id.as_str().unwrap())).await;
        assert_eq!((status, &stored["id"]), (200, id), "an accepted command survives the shutdown");
    }
    let (_, page) = api.get_ok(&format!("/v1/commands?device_id={device}")).await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "the refused one was not stored: {page}");
    gw.terminate(Duration::from_secs(30)).await;
    test_db.cleanup().await;
}

/// `/readyz` names what is wrong with the store: on MariaDB the database
/// dropped under the gateway (`database`), on SQLite the newest migration
/// unrecorded (`migrations`, an older schema); `/healthz` stays 200.
async fn readyz_names_the_store_when_it_fails(db: Db) {
    let Some(test_db) = TestDb::create(db).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, api) = gateway(&test_db.url, dir.path(), &[], &[]).await;
    wait_ready(&api).await;
    let (status, body) = api.get("/readyz").await.unwrap();
    let checks = json!({"shutdown": "ok", "database": "ok", "migrations": "ok", "broker": "ok"});
    assert_eq!((status, &body["checks"], &body["ready"]), (200, &checks, &json!(true)), "{body}");
    let failing = match db {
        Db::Mysql => {
            test_db.cleanup().await;
            "database"
        }
        Db::Sqlite => {
            let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&test_db.url).await.unwrap();
            let newest =
                "DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)";
            sqlx::query(newest).execute(&mut conn).await.unwrap();
            "migrations"
        }
    };
    wait_not_ready(&api, failing).await;
    assert!(api.healthy().await, "/healthz stays 200: the process is up");
    gw.terminate(Duration::from_secs(30)).await;
    test_db.cleanup().await;
}

on_both_stores!(sigterm_answers_waiting_callers_and_loses_nothing, readyz_names_the_store_when_it_fails);

/// A second signal during a slow shutdown (a long grace, a caller waiting)
/// ends the process at once, with a non-zero status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let test_db = TestDb::create(Db::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let grace = [format!("--shutdown-grace-ms={LONG_WAIT_MS}")];
    let (mut gw, api) = gateway(&test_db.url, dir.path(), &grace, &[]).await;
    api.register("silent-2").await;
    let call = sync_call_in_flight(&api, "silent-2").await;
    gw.signal("TERM");
    wait_not_ready(&api, "shutdown").await;
    assert!(gw.is_running(), "still draining: the caller waits, the grace is long");
    gw.signal("INT");
    let exit =
        gw.wait_exit(Duration::from_secs(30)).await.expect("the second signal ends it long before the grace");
    assert_eq!(exit.code(), Some(plumbing::cli::EXIT_SECOND_SIGNAL), "{exit:?}");
    call.abort();
}

/// `/readyz` names the broker when the gateway cannot reach it; `/healthz` is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_readyz_names_an_unreachable_broker() {
    let test_db = TestDb::create(Db::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let nobody = format!("mqtt://{}", free_port());
    let args = gateway_args(&test_db.url, http, &nobody, &prefix());
    let mut gw = Proc::start("gateway", &binaries().gateway, &args, dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let (status, body) = api.get("/readyz").await.unwrap();
    assert_eq!((status, &body["not_ready"]), (503, &json!(["broker"])), "{body}");
    assert_eq!(body["checks"]["broker"], "not connected", "{body}");
    let exit = gw.terminate(Duration::from_secs(30)).await.expect("exits on SIGTERM");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

/// A receiver's `/readyz` (on `--metrics-listen`): 503 naming the broker
/// while it cannot reach one, 200 once connected with its device listener
/// up; SIGTERM → exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_readiness_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let start = |broker: String| {
        let (metrics, tcp) = (free_port(), free_port());
        let args = [
            format!("--broker={broker}"),
            format!("--tcp-listen={tcp}"),
            format!("--metrics-listen={metrics}"),
            format!("--topic-prefix={}", prefix()),
            format!("--receiver-id=rx{}", uuid::Uuid::new_v4().simple()),
        ];
        (Proc::start("receiver", &binaries().receiver, &args, dir.path()), Api::new(metrics))
    };
    let (mut lost, lost_api) = start(format!("mqtt://{}", free_port()));
    lost_api.wait_healthy(Duration::from_secs(60)).await;
    // `/healthz` may answer a moment before the device listener is up; once
    // it is, the broker alone is named, and stays so.
    within("/readyz to name the broker alone", Duration::from_secs(30), || async {
        readiness(&lost_api).await == Some((503, vec!["broker".to_owned()]))
    })
    .await;
    let (status, body) = lost_api.get("/readyz").await.unwrap();
    assert_eq!((status, &body["not_ready"]), (503, &json!(["broker"])), "{body}");
    assert_eq!(body["checks"]["broker"], "not connected", "{body}");
    let exit = lost.terminate(Duration::from_secs(30)).await.expect("exits on SIGTERM");
    assert_eq!(exit.code(), Some(0), "{exit:?}");

    let (mut rx, api) = start(format!("mqtt://{}", mosquitto_addr()));
    wait_ready(&api).await;
    let (_, body) = api.get("/readyz").await.unwrap();
    assert_eq!(body["checks"], json!({"shutdown": "ok", "broker": "ok", "devices": "ok"}), "{body}");
    let exit = rx.terminate(Duration::from_secs(30)).await.expect("exits on SIGTERM");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

/// Every line of `proc`'s log (but the harness's `===` headers) parsed as JSON.
fn json_lines(proc: &Proc) -> Vec<Value> {
    let log = std::fs::read_to_string(proc.log_path()).unwrap();
    log.lines()
        .filter(|l| !l.starts_with("=== "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// A line (an event) with `command_id` and `device_id` as fields of their own.
fn has_ids(lines: &[Value], id: &str, device: &str) -> bool {
    lines.iter().any(|l| l["command_id"] == id && l["device_id"] == device)
}

/// `--log-format json` (gateway flag; receiver and simulator by environment):
/// every line is a JSON object, and a command's lines carry its `command_id`
/// and `device_id` as fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_command_and_device_ids() {
    let test_db = TestDb::create(Db::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let filter = ("RUST_LOG", "debug,rumqttd=off,rumqttc=warn,sqlx=warn,hyper=warn,h2=warn");
    let flag = ["--log-format=json".to_owned()];
    let (http, broker, prefix) = (free_port(), format!("mqtt://{}", mosquitto_addr()), prefix());
    let mut args = gateway_args(&test_db.url, http, &broker, &prefix);
    args.extend_from_slice(&flag);
    let mut gw = Proc::start_with_env("gateway", &binaries().gateway, &args, &[filter], dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let tcp = free_port();
    let rx_args = [
        format!("--broker={broker}"),
        format!("--tcp-listen={tcp}"),
        format!("--topic-prefix={prefix}"),
        format!("--receiver-id=rx{}", uuid::Uuid::new_v4().simple()),
    ];
    let envs = [filter, ("RECEIVER_LOG_FORMAT", "json")];
    let mut rx = Proc::start_with_env("receiver", &binaries().receiver, &rx_args, &envs, dir.path());
    let id_prefix = format!("js{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let device = format!("{id_prefix}0000");
    api.register(&device).await;
    let sim_args = [format!("--connect={tcp}"), "--devices=1".to_owned(), format!("--id-prefix={id_prefix}")];
    let sim_envs = [filter, ("FIRMWARE_SIM_LOG_FORMAT", "json")];
    let mut sim = Proc::start_with_env("sim", &binaries().firmware_sim, &sim_args, &sim_envs, dir.path());
    api.wait_online(std::slice::from_ref(&device), Duration::from_secs(30)).await;

    let body = json!({"name": "set_temp", "payload": {"celsius": 21}, "wait_ms": 10_000});
    let (status, command) = api.post(&format!("/v1/devices/{device}/commands"), &body).await.unwrap();
    assert_eq!((status, command["status"].as_str()), (200, Some("succeeded")), "{command}");
    let id = command["id"].as_str().unwrap().to_owned();
    within("the receiver's report line", Duration::from_secs(10), || async {
        has_ids(&json_lines(&rx), &id, &device)
    })
    .await;
    let lines = json_lines(&gw);
    assert!(has_ids(&lines, &id, &device), "no gateway line with command_id {id} and device_id {device}");
    let steps: Vec<&str> = lines
        .iter()
        .filter(|l| l["command_id"] == id.as_str())
        .filter_map(|l| l["message"].as_str())
        .collect();
    for step in ["accepted", "published", "report applied", "final"] {
        assert!(steps.contains(&step), "no {step:?} line for the command; its lines: {steps:?}");
    }
    for proc in [&mut sim, &mut rx, &mut gw] {
        proc.terminate(Duration::from_secs(30)).await;
    }
    json_lines(&sim);
}
