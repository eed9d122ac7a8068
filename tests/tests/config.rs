//! Configuration files (issue 14), through the real binaries: settings come
//! from built-in defaults < a TOML file (`--config`, `GATEWAY_CONFIG` /
//! `RECEIVER_CONFIG`) < environment < flags; `gateway config` and `receiver
//! --print-config` print them with every secret masked; an unknown key or a
//! wrong type stops the program with an error naming it; a gateway and a
//! receiver started with nothing but their files serve where the files say.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;
use system_tests::procs::{binaries, Api, Proc};
use system_tests::{free_port, on_both_stores, Db, TestDb};

/// Runs `program args…` with nothing in its environment but `envs` (none of
/// the test's own `GATEWAY_*` / `RECEIVER_*`).
fn run(program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(program)
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// Its stdout, after checking it succeeded.
fn printed(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    String::from_utf8(out.stdout).expect("the configuration is UTF-8")
}

/// Its stderr, after checking it failed.
fn refused(out: Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).expect("the error is UTF-8")
}

/// The value of `key` in a printed configuration (its `key = value` line).
fn setting(printed: &str, key: &str) -> String {
    let prefix = format!("{key} = ");
    let line = printed.lines().find_map(|l| l.strip_prefix(&prefix));
    line.unwrap_or_else(|| panic!("no `{key}` line in:\n{printed}")).to_owned()
}

/// A TOML file in `dir` holding `text`.
fn file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Secrets of a settings struct: the args whose environment values clap hides.
fn secret_args<T: clap::Args>() -> Vec<(String, String, String)> {
    let command = T::augment_args(clap::Command::new("settings"));
    let secrets: Vec<_> = command
        .get_arguments()
        .filter(|a| a.is_hide_env_values_set())
        .map(|a| {
            let env =
                a.get_env().expect("a secret has an environment variable").to_string_lossy().into_owned();
            (a.get_id().to_string(), a.get_long().unwrap().to_owned(), env)
        })
        .collect();
    assert!(secrets.len() >= 3, "the gateway and the receiver have several secrets: {secrets:?}");
    secrets
}

/// A distinct value per secret that every secret type accepts (64 hex digits).
fn secret_value(index: usize) -> String {
    format!("{:02x}", 0xa0 + index).repeat(32)
}

#[test]
fn gateway_precedence_is_defaults_then_file_then_environment_then_flag() {
    let gateway = &binaries().gateway;
    let dir = tempfile::tempdir().unwrap();
    let path = file(dir.path(), "gateway.toml", "default_ttl_ms = 1111\n");
    let path = path.to_str().unwrap();
    let ttl =
        |args: &[&str], envs: &[(&str, &str)]| setting(&printed(run(gateway, args, envs)), "default_ttl_ms");
    assert_eq!(ttl(&["config"], &[]), "60000", "the built-in default");
    assert_eq!(ttl(&["config", "--config", path], &[]), "1111", "the file over the default");
    assert_eq!(ttl(&["config"], &[("GATEWAY_CONFIG", path)]), "1111", "GATEWAY_CONFIG names the file");
    let env = [("GATEWAY_CONFIG", path), ("GATEWAY_DEFAULT_TTL_MS", "2222")];
    assert_eq!(ttl(&["config"], &env), "2222", "the environment over the file");
    assert_eq!(ttl(&["config", "--default-ttl-ms", "3333"], &env), "3333", "a flag over the environment");
}

#[test]
fn receiver_precedence_is_defaults_then_file_then_environment_then_flag() {
    let receiver = &binaries().receiver;
    let dir = tempfile::tempdir().unwrap();
    let path = file(dir.path(), "receiver.toml", "device_answer_timeout_ms = 1111\n");
    let path = path.to_str().unwrap();
    let timeout = |args: &[&str], envs: &[(&str, &str)]| {
        let args: Vec<&str> = ["--print-config"].iter().chain(args).copied().collect();
        setting(&printed(run(receiver, &args, envs)), "device_answer_timeout_ms")
    };
    assert_eq!(timeout(&[], &[]), "10000", "the built-in default");
    assert_eq!(timeout(&["--config", path], &[]), "1111", "the file over the default");
    assert_eq!(timeout(&[], &[("RECEIVER_CONFIG", path)]), "1111", "RECEIVER_CONFIG names the file");
    let env = [("RECEIVER_CONFIG", path), ("RECEIVER_DEVICE_ANSWER_TIMEOUT_MS", "2222")];
    assert_eq!(timeout(&[], &env), "2222", "the environment over the file");
    assert_eq!(timeout(&["--device-answer-timeout-ms", "3333"], &env), "3333", "a flag over the environment");
}

#[test]
fn unknown_keys_and_wrong_types_stop_the_programs_naming_them() {
    let (gateway, receiver) = (&binaries().gateway, &binaries().receiver);
    let dir = tempfile::tempdir().unwrap();
    let typo = file(dir.path(), "typo.toml", "http_listen = \"127.0.0.1:1\"\nhttp_listn = \"127.0.0.1:2\"\n");
    let typo = typo.to_str().unwrap();
    for (program, args) in
        [(gateway, vec!["serve", "--config", typo]), (gateway, vec!["config", "--config", typo])]
    {
        let error = refused(run(program, &args, &[]));
        assert!(error.contains("unknown key `http_listn`") && error.contains(typo), "{error}");
    }
    let typo = file(dir.path(), "rx-typo.toml", "tcp_listen = \"127.0.0.1:1\"\nreceiver = \"rx\"\n");
    let error = refused(run(receiver, &["--config", typo.to_str().unwrap()], &[]));
    assert!(error.contains("unknown key `receiver`"), "{error}");

    let wrong = file(dir.path(), "wrong.toml", "default_ttl_ms = \"soon\"\n");
    let error = refused(run(gateway, &["serve", "--config", wrong.to_str().unwrap()], &[]));
    assert!(error.contains("key `default_ttl_ms`") && error.contains("expected u64"), "{error}");
    let wrong = file(dir.path(), "rx-wrong.toml", "device_window = true\n");
    let error = refused(run(receiver, &["--print-config", "--config", wrong.to_str().unwrap()], &[]));
    assert!(error.contains("key `device_window`") && error.contains("expected u16"), "{error}");
    let out_of_range = file(dir.path(), "range.toml", "device_window = 0\n");
    let error = refused(run(receiver, &["--config", out_of_range.to_str().unwrap()], &[]));
    assert!(error.contains("key `device_window`") && error.contains("1..=1024"), "{error}");
}

/// Every secret, given in the file, the environment or as a flag, and every
/// password inside a URL, shows as `***`; none appears in an error either.
fn masks_every_secret<T: clap::Args>(program: &Path, print: &[&str], urls: &[(&str, &str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secret_args::<T>();
    let values: Vec<String> = (0..secrets.len()).map(secret_value).collect();
    let url_lines: String = urls.iter().map(|(key, url, _)| format!("{key} = \"{url}\"\n")).collect();
    let in_file: String =
        secrets.iter().zip(&values).map(|((key, ..), v)| format!("{key} = \"{v}\"\n")).collect();
    let check = |shown: String, how: &str| {
        for ((key, ..), value) in secrets.iter().zip(&values) {
            assert_eq!(setting(&shown, key), "\"***\"", "{key} from {how}");
            assert!(!shown.contains(value.as_str()), "{key}'s value shown (from {how}):\n{shown}");
        }
        for (key, _, password) in urls {
            assert!(!shown.contains(password) && setting(&shown, key).contains(":***@"), "{key}:\n{shown}");
        }
    };

    let path = file(dir.path(), "secrets.toml", &format!("{url_lines}{in_file}"));
    let args: Vec<&str> = print.iter().copied().chain(["--config", path.to_str().unwrap()]).collect();
    check(printed(run(program, &args, &[])), "the file");

    let path = file(dir.path(), "urls.toml", &url_lines);
    let envs: Vec<(&str, &str)> =
        secrets.iter().zip(&values).map(|((_, _, env), v)| (env.as_str(), v.as_str())).collect();
    let args: Vec<&str> = print.iter().copied().chain(["--config", path.to_str().unwrap()]).collect();
    check(printed(run(program, &args, &envs)), "the environment");

    let flags: Vec<String> =
        secrets.iter().zip(&values).map(|((_, long, _), v)| format!("--{long}={v}")).collect();
    let args: Vec<&str> = args.iter().copied().chain(flags.iter().map(String::as_str)).collect();
    check(printed(run(program, &args, &[])), "flags");

    let broken = file(dir.path(), "broken.toml", &format!("{in_file}{url_lines}unknown_key = 1\n"));
    let args: Vec<&str> = print.iter().copied().chain(["--config", broken.to_str().unwrap()]).collect();
    let error = refused(run(program, &args, &[]));
    let (key, ..) = &secrets[0];
    let unterminated = file(dir.path(), "unterminated.toml", &format!("{key} = \"{}\n", values[0]));
    let args: Vec<&str> = print.iter().copied().chain(["--config", unterminated.to_str().unwrap()]).collect();
    let error = error + &refused(run(program, &args, &[]));
    let mistyped = file(dir.path(), "mistyped.toml", &format!("{key} = 1234567890987\n"));
    let args: Vec<&str> = print.iter().copied().chain(["--config", mistyped.to_str().unwrap()]).collect();
    let error = error + &refused(run(program, &args, &[]));
    for secret in values.iter().map(String::as_str).chain(urls.iter().map(|u| u.2)).chain(["1234567890987"]) {
        assert!(!error.contains(secret), "a secret in an error: {error}");
    }
}

#[test]
fn gateway_config_masks_every_secret() {
    let urls = [
        ("database_url", "mysql://gw:db-pass-4711@127.0.0.1:1/gw", "db-pass-4711"),
        ("broker", "mqtt://gw:broker-pass-4711@127.0.0.1:1,mqtt://127.0.0.1:2", "broker-pass-4711"),
    ];
    masks_every_secret::<gateway::Config>(&binaries().gateway, &["config"], &urls);
}

#[test]
fn receiver_print_config_masks_every_secret() {
    let urls = [("broker", "mqtts://rx:broker-pass-4711@127.0.0.1:1", "broker-pass-4711")];
    masks_every_secret::<receiver::Config>(&binaries().receiver, &["--print-config"], &urls);
}

on_both_stores!(a_system_started_from_config_files_alone_serves_where_they_say);

/// A gateway and a receiver given nothing but a config file each (named by
/// `GATEWAY_CONFIG` / `RECEIVER_CONFIG`, no flags) listen where the files
/// say and carry a command to a simulated device.
async fn a_system_started_from_config_files_alone_serves_where_they_say(db: Db) {
    let Some(test_db) = TestDb::create(db).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let (http, mqtt, tcp) = (free_port(), free_port(), free_port());
    let prefix = format!("c{}", uuid::Uuid::new_v4().simple());
    let gateway_toml = format!(
        "database_url = \"{}\"\nhttp_listen = \"{http}\"\nmqtt_listen = \"{mqtt}\"\n\
         topic_prefix = \"{prefix}\"\ninsecure = true\n",
        test_db.url
    );
    let gateway_file = file(dir.path(), "gateway.toml", &gateway_toml);
    let receiver_toml = format!(
        "broker = \"mqtt://{mqtt}\"\ntcp_listen = \"{tcp}\"\nreceiver_id = \"rx-{prefix}\"\n\
         topic_prefix = \"{prefix}\"\ninsecure = true\n"
    );
    let receiver_file = file(dir.path(), "receiver.toml", &receiver_toml);
    let gateway_env = [("GATEWAY_CONFIG", gateway_file.to_str().unwrap())];
    let _gateway = Proc::start_with_env("gateway", &binaries().gateway, &["serve"], &gateway_env, dir.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(60)).await;
    let receiver_env = [("RECEIVER_CONFIG", receiver_file.to_str().unwrap())];
    let no_args: [&str; 0] = [];
    let _receiver =
        Proc::start_with_env("receiver", &binaries().receiver, &no_args, &receiver_env, dir.path());
    let device = firmware_sim::device_id("dev-", 0);
    api.register(&device).await;
    let sim_args = [format!("--connect={tcp}"), "--devices=1".to_owned()];
    let _sim = Proc::start("sim", &binaries().firmware_sim, &sim_args, dir.path());
    api.wait_online(std::slice::from_ref(&device), Duration::from_secs(30)).await;
    let (status, c) = api
        .post(&format!("/v1/devices/{device}/commands"), &json!({"name": "echo", "payload": 1}))
        .await
        .unwrap();
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    test_db.cleanup().await;
}
