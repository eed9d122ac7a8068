//! `gateway device|send|command`, the real binary, against a real system
//! with API keys required: what it prints (tables and `--json`), and the
//! exit code of every outcome a script acts on — succeeded, failed, expired,
//! canceled, not final yet, usage error, HTTP error, unreachable — and
//! HTTPS with a private CA. The key is never in its output.

use std::path::Path;

use serde_json::{json, Value};
use system_tests::procs::{binaries, free_port};
use system_tests::{create_api_key, Db, Spec, System};

/// One run of the CLI: its exit code and output.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not one JSON document ({e}): {self:?}"))
    }

    /// The rows of a table on stdout, each split into its cells' words.
    fn rows(&self) -> Vec<Vec<&str>> {
        self.stdout.lines().map(|l| l.split_whitespace().collect()).collect()
    }

    /// The value of `field` in a key/value table (`field  value`).
    fn field(&self, field: &str) -> String {
        let line = self.stdout.lines().find(|l| l.starts_with(&format!("{field} "))).unwrap_or_else(|| {
            panic!("no {field:?} in {self:?}");
        });
        line[field.len()..].trim().to_owned()
    }
}

/// The `gateway` binary pointed at one gateway by its environment, as a
/// script would set it up.
struct Cli {
    env: Vec<(&'static str, String)>,
    /// Must never be printed.
    key: String,
}

impl Cli {
    fn new(url: &str, key: &str) -> Cli {
        Cli {
            env: vec![("GATEWAY_URL", url.to_owned()), ("GATEWAY_API_KEY", key.to_owned())],
            key: key.to_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, &self.env).await
    }

    async fn run_with(&self, args: &[&str], env: &[(&str, String)]) -> Run {
        let mut command = tokio::process::Command::new(&binaries().gateway);
        command.args(args).stdin(std::process::Stdio::null());
        for var in ["GATEWAY_URL", "GATEWAY_API_KEY", "GATEWAY_API_KEY_FILE", "GATEWAY_CA_FILE"] {
            command.env_remove(var);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let output = command.output().await.expect("the gateway binary runs");
        let run = Run {
            code: output.status.code().expect("exited, not killed"),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        let secret = &self.key[3 + gateway::api_key::ID_LEN + 1..];
        assert!(!run.stdout.contains(secret) && !run.stderr.contains(secret), "the key was printed: {run:?}");
        run
    }

    /// Runs `args`; it must exit with `code`.
    async fn expect(&self, code: i32, args: &[&str]) -> Run {
        let run = self.run(args).await;
        assert_eq!(run.code, code, "gateway {args:?}: {run:?}");
        run
    }
}

async fn start_secure() -> Option<System> {
    let mut spec = Spec::new(Db::Sqlite);
    spec.tune = |config| config.insecure = false;
    System::start(spec).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_by_hand() {
    let Some(s) = start_secure().await else { return };
    let cli = Cli::new(&s.base, s.api_key.as_deref().unwrap());

    let put = cli
        .expect(0, &["device", "put", "pump-7", "--label", "site=north", "--label", "floor=2", "--disabled"])
        .await;
    assert_eq!(put.field("labels"), "site=north,floor=2");
    assert_eq!((put.field("enabled"), put.field("online")), ("no".into(), "no".into()));
    let got = cli.expect(0, &["device", "get", "pump-7", "--json"]).await.json();
    assert_eq!((&got["labels"], &got["enabled"]), (&json!({"site": "north", "floor": "2"}), &json!(false)));
    // A full replacement: no labels, enabled.
    cli.expect(0, &["device", "put", "pump-7"]).await;
    let got = cli.expect(0, &["device", "get", "pump-7", "--json"]).await.json();
    assert_eq!((&got["labels"], &got["enabled"]), (&json!({}), &json!(true)));

    let list = cli.expect(0, &["device", "list"]).await;
    let rows = list.rows();
    assert_eq!(rows[0], ["ID", "ONLINE", "ENABLED", "RECEIVER", "LAST", "SEEN", "LABELS"], "{list:?}");
    for id in &s.device_ids {
        let row = rows.iter().find(|r| r[0] == id).unwrap_or_else(|| panic!("{id} missing: {list:?}"));
        assert_eq!(row[1..4], ["yes", "yes", s.receiver.bridge.receiver_id()], "{list:?}");
    }
    assert!(rows.iter().any(|r| r[0] == "pump-7" && r[1] == "no"), "{list:?}");
    let online = cli.expect(0, &["device", "list", "--online", "--json"]).await.json();
    let ids: Vec<&str> =
        online["items"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, s.device_ids.iter().map(String::as_str).collect::<Vec<_>>(), "only the online ones");
    // Paging: one a page, then every page.
    let page = cli.expect(0, &["device", "list", "--limit", "1", "--json"]).await.json();
    assert_eq!((page["items"].as_array().unwrap().len(), &page["next_after"]), (1, &json!(s.device_ids[0])));
    let all = cli.expect(0, &["device", "list", "--limit", "1", "--all", "--json"]).await.json();
    assert_eq!((all["items"].as_array().unwrap().len(), &all["next_after"]), (3, &Value::Null));

    let unknown = cli.expect(4, &["device", "get", "nobody"]).await;
    assert!(
        unknown.stderr.contains("unknown device \"nobody\"") && unknown.stderr.contains("404"),
        "{unknown:?}"
    );
    let bad = cli.expect(4, &["device", "put", "bad id"]).await;
    assert!(bad.stderr.contains("400"), "{bad:?}");
    let usage = cli.expect(2, &["device", "put", "x", "--label", "novalue"]).await;
    assert!(usage.stderr.contains("KEY=VALUE"), "{usage:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_by_hand() {
    let Some(s) = start_secure().await else { return };
    let cli = Cli::new(&s.base, s.api_key.as_deref().unwrap());
    let dev = s.device_ids[0].as_str();

    // ---- sync: the result is printed, 0 ----
    let sent = cli.expect(0, &["send", dev, "echo", r#"{"n": 1, "big": 12345678901234567890}"#]).await;
    assert_eq!(sent.field("status"), "succeeded");
    assert_eq!(sent.field("result"), r#"code 0: {"n":1,"big":12345678901234567890}"#, "numbers as written");
    let sent = cli.expect(0, &["send", dev, "echo", "[1,2]", "--json", "--ttl-ms", "20000"]).await.json();
    assert_eq!((&sent["status"], &sent["result"]["payload"]), (&json!("succeeded"), &json!([1, 2])));

    // ---- a device error: 10 ----
    let failed = cli.expect(10, &["send", dev, "fail", r#"{"code": 7}"#]).await;
    assert_eq!(failed.field("status"), "failed");
    assert!(failed.field("result").starts_with("code 7: "), "{failed:?}");
    assert!(failed.field("error").starts_with("device_error"), "{failed:?}");

    // ---- async, then wait: the id alone on stdout ----
    let id = cli
        .expect(0, &["send", dev, "echo", r#"{"delay_ms": 300}"#, "--async"])
        .await
        .stdout
        .trim()
        .to_owned();
    assert!(id.parse::<uuid::Uuid>().is_ok(), "{id:?}");
    let waited = cli.expect(0, &["command", "wait", &id]).await;
    assert_eq!((waited.field("id"), waited.field("status")), (id.clone(), "succeeded".into()));
    let got = cli.expect(0, &["command", "get", &id, "--json"]).await.json();
    assert_eq!((&got["id"], &got["status"]), (&json!(id), &json!("succeeded")));
    let async_json = cli.expect(0, &["send", dev, "echo", "--async", "--json"]).await.json();
    assert!(async_json["id"].is_string() && async_json["status"].is_string(), "{async_json}");

    // ---- events: every transition, as a table and as the API's JSON ----
    let events = cli.expect(0, &["command", "events", &id, "--json"]).await.json();
    let items = events["items"].as_array().unwrap();
    let table = cli.expect(0, &["command", "events", &id]).await;
    assert_eq!(table.rows()[0], ["AT", "AFTER", "CHANGE", "ATTEMPT", "DETAIL"]);
    assert_eq!(table.rows().len(), items.len() + 1, "{table:?}");
    for (row, e) in table.stdout.lines().skip(1).zip(items) {
        assert!(row.starts_with(e["at"].as_str().unwrap()), "{row} / {e}");
        assert!(
            row.contains(&format!("→ {}", e["to"].as_str().unwrap())) || e["from"] == e["to"],
            "{row} / {e}"
        );
    }
    assert!(table.stdout.contains("delivered → succeeded"), "{table:?}");

    // ---- list: filters and paging as the API does ----
    let list =
        cli.expect(0, &["command", "list", "--device", dev, "--status", "succeeded", "--json"]).await.json();
    let items = list["items"].as_array().unwrap();
    assert!(
        items.len() >= 3 && items.iter().all(|c| c["status"] == "succeeded" && c["device_id"] == dev),
        "{list}"
    );
    let first = cli.expect(0, &["command", "list", "--limit", "1", "--json"]).await.json();
    let cursor = first["next_cursor"].as_str().expect("more than one command").to_owned();
    let second =
        cli.expect(0, &["command", "list", "--limit", "1", "--cursor", &cursor, "--json"]).await.json();
    assert_ne!(first["items"][0]["id"], second["items"][0]["id"]);
    let table = cli.expect(0, &["command", "list", "--status", "failed"]).await;
    let rows = table.rows();
    assert_eq!(rows[0], ["ID", "DEVICE", "NAME", "STATUS", "ATTEMPTS", "CREATED", "OUTCOME"]);
    assert_eq!(rows.len(), 2, "the one failed command: {table:?}");
    assert_eq!((rows[1][2], rows[1][3], rows[1][6]), ("fail", "failed", "device_error:"), "{table:?}");
    cli.expect(4, &["command", "list", "--status", "lost"]).await;

    // ---- a device that never comes online: not final (15), canceled (13), expired (12) ----
    s.register("ghost").await;
    let pending = cli.expect(15, &["send", "ghost", "echo", "--wait-ms", "100"]).await;
    assert_eq!(pending.field("status"), "pending");
    let ghost_id = pending.field("id");
    assert!(pending.stderr.contains(&format!("gateway command wait {ghost_id}")), "{pending:?}");
    let still = cli.expect(15, &["command", "wait", &ghost_id, "--timeout-ms", "300"]).await;
    assert_eq!(still.field("status"), "pending");
    let canceled = cli.expect(0, &["command", "cancel", &ghost_id]).await;
    assert_eq!(canceled.field("status"), "canceled");
    cli.expect(13, &["command", "wait", &ghost_id]).await;
    let again = cli.expect(4, &["command", "cancel", &ghost_id]).await;
    assert!(again.stderr.contains("already canceled") && again.stderr.contains("409"), "{again:?}");
    let short = cli.expect(0, &["send", "ghost", "echo", "--async", "--ttl-ms", "200"]).await.stdout;
    let expired = cli.expect(12, &["command", "wait", short.trim()]).await;
    assert_eq!(expired.field("status"), "expired");

    // ---- bad input: 2, before any request ----
    let before = s.all_commands().await.len();
    let usage = cli.expect(2, &["send", dev, "echo", "{not json"]).await;
    assert!(usage.stderr.contains("the payload is not JSON"), "{usage:?}");
    cli.expect(2, &["send", dev, "echo", "--async", "--wait-ms", "5"]).await;
    cli.expect(2, &["command", "frobnicate"]).await;
    assert_eq!(s.all_commands().await.len(), before, "nothing sent");
    cli.expect(4, &["command", "get", "not-a-command"]).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_connections() {
    let Some(s) = start_secure().await else { return };
    let key = s.api_key.clone().unwrap();
    let cli = Cli::new(&s.base, &key);
    let url = ("GATEWAY_URL", s.base.clone());

    // No key, a wrong one, one without the scope: the gateway's refusal, 4.
    let none = cli.run_with(&["device", "list"], std::slice::from_ref(&url)).await;
    assert_eq!(none.code, 4, "{none:?}");
    assert!(none.stderr.contains("401") && none.stderr.contains("unauthorized"), "{none:?}");
    let wrong = format!("{}{}", &key[..key.len() - 4], "AAAA");
    let refused = cli.run_with(&["device", "list"], &[url.clone(), ("GATEWAY_API_KEY", wrong.clone())]).await;
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(
        refused.stderr.contains("unknown API key") && !refused.stderr.contains(&wrong[8..]),
        "{refused:?}"
    );
    let reader =
        create_api_key(s.gateway.app.store(), "reader", &[gateway::api_key::Scope::CommandsRead]).await;
    let forbidden =
        cli.run_with(&["send", &s.device_ids[0], "echo"], &[url.clone(), ("GATEWAY_API_KEY", reader)]).await;
    assert_eq!(forbidden.code, 4, "{forbidden:?}");
    assert!(forbidden.stderr.contains("403") && forbidden.stderr.contains("commands:write"), "{forbidden:?}");

    // The key from a file (trailing newline and all); not from two places.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let file = ("GATEWAY_API_KEY_FILE", key_file.display().to_string());
    let from_file = cli.run_with(&["device", "list", "--json"], &[url.clone(), file.clone()]).await;
    assert_eq!(from_file.code, 0, "{from_file:?}");
    assert_eq!(from_file.json()["items"].as_array().unwrap().len(), s.device_ids.len());
    let flags = ["device", "list", "--url", &s.base, "--api-key-file"];
    let by_flag = cli.run_with(&[&flags[..], &[&*file.1]].concat(), &[]).await;
    assert_eq!(by_flag.code, 0, "{by_flag:?}");
    let both =
        cli.run_with(&["device", "list"], &[url.clone(), file, ("GATEWAY_API_KEY", key.clone())]).await;
    assert_eq!(both.code, 2, "{both:?}");
    let missing = cli
        .run_with(&["device", "list", "--api-key-file", "/nonexistent/key"], std::slice::from_ref(&url))
        .await;
    assert!(missing.code == 2 && missing.stderr.contains("/nonexistent/key"), "{missing:?}");

    // Nobody listening: 3.
    let nobody = format!("http://{}", free_port());
    let down = cli
        .run_with(&["command", "list"], &[("GATEWAY_URL", nobody.clone()), ("GATEWAY_API_KEY", key)])
        .await;
    assert_eq!(down.code, 3, "{down:?}");
    assert!(down.stderr.contains(&format!("cannot reach the gateway at {nobody}")), "{down:?}");
    assert!(down.stderr.contains("refused"), "says why: {down:?}");
    s.stop().await;
}

/// A gateway whose HTTP listener has a certificate from a private CA: the
/// CLI trusts it with --ca-file only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pki(dir.path());
    let mut config = gateway::Config::for_local(
        format!("sqlite:{}", dir.path().join("gw.db").display()),
        free_port(),
        free_port(),
    );
    // Keys required, so without --insecure: the broker's users and the message secret too.
    config.insecure = false;
    config.message_secret = Some(system_tests::TEST_MESSAGE_SECRET.parse().unwrap());
    let users = dir.path().join("mqtt-users");
    system_tests::mqtt_users_file(&users, &[("receiver-1", system_tests::TEST_BROKER_PASSWORD)]);
    config.mqtt_users_file = Some(users);
    config.http_tls_cert = Some(dir.path().join("cert.pem"));
    config.http_tls_key = Some(dir.path().join("key.pem"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gw = gateway::start(config, shutdown.clone()).await.expect("a gateway with TLS starts");
    let key = create_api_key(gw.app.store(), "tls", &gateway::api_key::Scope::ALL).await;
    let cli = Cli::new(&format!("https://localhost:{}", gw.http_addr.port()), &key);
    let ca = ca.display().to_string();

    let put = cli.expect(0, &["device", "put", "tls-dev", "--ca-file", &ca, "--json"]).await.json();
    assert_eq!(put["id"], "tls-dev");
    let keyless = cli.run_with(&["device", "get", "tls-dev", "--ca-file", &ca], &cli.env[..1]).await;
    assert!(keyless.code == 4 && keyless.stderr.contains("401"), "the key went over TLS: {keyless:?}");
    let untrusted = cli.expect(3, &["device", "get", "tls-dev"]).await;
    assert!(untrusted.stderr.to_lowercase().contains("certificate"), "{untrusted:?}");
    let garbage = dir.path().join("key.pem").display().to_string();
    let bad_ca = cli.expect(2, &["device", "get", "tls-dev", "--ca-file", &garbage]).await;
    assert!(bad_ca.stderr.contains("--ca-file"), "{bad_ca:?}");
    shutdown.cancel();
    gw.stopped().await;
}

/// A CA and a certificate it signed for localhost, as `cert.pem`, `key.pem`
/// and `ca.pem` in `dir`; the path of `ca.pem`.
fn write_pki(dir: &Path) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "cli test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    dir.join("ca.pem")
}
