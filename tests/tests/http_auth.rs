//! The HTTP API's access control (docs/security/http.md), against the real
//! gateway: API keys and their scopes (401/403, revocation), `gateway token`
//! as a real process on a real database, `Content-Type` on writes (415), no
//! CORS, a JSON body on every error (414, `%FF`, 404, 405, bad JSON), and TLS
//! on the HTTP listener with a client that checks the certificate.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use gateway::api_key::Scope::{self, CommandsRead, CommandsWrite, DevicesAdmin};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, ORIGIN};
use reqwest::{Client, Method, RequestBuilder};
use serde_json::{json, Value};
use system_tests::procs::{binaries, free_port, Api, Proc};
use system_tests::{create_api_key, Db, Spec, System, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

system_tests::on_both_stores!(scopes_decide_who_may_do_what, token_cli_manages_the_keys_of_a_real_gateway);

const EVIL_ORIGIN: &str = "https://evil.example";

/// The harness with API keys required (its own client holds an all-scope key).
async fn start_secure(db: Db) -> Option<System> {
    let mut spec = Spec::new(db);
    spec.tune = |config| config.insecure = false;
    System::start(spec).await
}

/// Sends a request: status, headers and JSON body. Every answer of the
/// gateway has a JSON body when it is an error, and no CORS header.
async fn call(req: RequestBuilder) -> (u16, HeaderMap, Value) {
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    let cors: Vec<_> = headers.keys().filter(|k| k.as_str().starts_with("access-control-")).collect();
    assert!(cors.is_empty(), "CORS headers {cors:?} on a {status}");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if status >= 400 {
        assert!(
            headers.get(CONTENT_TYPE).is_some_and(|v| v == "application/json")
                && body["error"]["kind"].is_string(),
            "a {status} without a JSON error body: {headers:?} {text:?}"
        );
    }
    (status, headers, body)
}

/// (status, `error.kind`, `error.message`) of a request.
async fn refusal(req: RequestBuilder) -> (u16, String, String) {
    let (status, _, body) = call(req).await;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (status, text(&body["error"]["kind"]), text(&body["error"]["message"]))
}

/// A JSON write.
fn json_req(client: &Client, method: Method, url: String, body: &Value) -> RequestBuilder {
    client.request(method, url).header(CONTENT_TYPE, "application/json").body(body.to_string())
}

async fn command_count(s: &System) -> usize {
    s.all_commands().await.len()
}

/// The key's id: `gk_<id>_<secret>`.
fn key_id(key: &str) -> &str {
    &key[3..3 + gateway::api_key::ID_LEN]
}

/// The key's secret part.
fn key_secret(key: &str) -> &str {
    &key[3 + gateway::api_key::ID_LEN + 1..]
}

/// Polls until `key` is refused with 401 on `url`; returns how long that took.
async fn until_refused(url: &str, key: &str) -> (Duration, String) {
    let began = Instant::now();
    let client = Client::new();
    loop {
        let (status, kind, message) = refusal(client.get(url).bearer_auth(key)).await;
        if status == 401 {
            assert_eq!(kind, "unauthorized");
            return (began.elapsed(), message);
        }
        assert_eq!(status, 200, "{kind}: {message}");
        let limit = gateway::http::auth::KEY_CACHE_TTL + Duration::from_secs(2);
        assert!(began.elapsed() < limit, "a revoked key still works after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No key, a bad one, one without the scope, the right one: who may do what,
/// and that a refused request stores nothing.
async fn scopes_decide_who_may_do_what(db: Db) {
    let Some(s) = start_secure(db).await else { return };
    let dev = s.device_ids[0].clone();
    let store = s.gateway.app.store();
    let reader = create_api_key(store, "reader", &[CommandsRead]).await;
    let writer = create_api_key(store, "writer", &[CommandsWrite]).await;
    let admin = create_api_key(store, "admin", &[DevicesAdmin]).await;
    let anon = Client::new();
    let submit_url = s.url(&format!("/v1/devices/{dev}/commands"));
    let echo = json!({"name": "echo", "payload": {"n": 1}});
    let submit = |key: Option<&str>| {
        let req = json_req(&anon, Method::POST, submit_url.clone(), &echo);
        match key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    };

    // ---- no key, or a bad one: 401 with WWW-Authenticate, nothing stored ----
    let (status, headers, body) = call(submit(None)).await;
    assert_eq!((status, body["error"]["kind"].as_str()), (401, Some("unauthorized")), "{body}");
    assert_eq!(headers.get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
    let wrong_secret = format!("gk_{}_{}", key_id(&writer), "A".repeat(43));
    for bad in ["Basic dXNlcjpwdw==", "Bearer", "Bearer nonsense", "Bearer gk_0123456789abcdef_nosuchkey"] {
        let (status, kind, message) = refusal(submit(None).header(AUTHORIZATION, bad)).await;
        assert_eq!((status, kind.as_str()), (401, "unauthorized"), "{bad}: {message}");
    }
    let (status, _, message) = refusal(submit(Some(&wrong_secret))).await;
    assert_eq!((status, message.as_str()), (401, "unknown API key"), "the id alone opens nothing");
    for (method, path) in
        [("GET", "/v1/commands"), ("GET", "/v1/devices"), ("GET", &*format!("/v1/devices/{dev}"))]
    {
        let (status, kind, _) = refusal(anon.request(method.parse().unwrap(), s.url(path))).await;
        assert_eq!((status, kind.as_str()), (401, "unauthorized"), "{method} {path}");
    }
    let put = |key: &str, id: &str| {
        json_req(&anon, Method::PUT, s.url(&format!("/v1/devices/{id}")), &json!({})).bearer_auth(key)
    };
    assert_eq!(refusal(json_req(&anon, Method::PUT, s.url("/v1/devices/intruder"), &json!({}))).await.0, 401);
    assert_eq!(command_count(&s).await, 0, "a refused submission stores nothing");
    assert_eq!(s.get("/v1/devices/intruder").await.0, 404, "a refused PUT stores nothing");

    // ---- the open routes ----
    for path in ["/healthz", "/openapi.json", "/metrics"] {
        assert_eq!(call(anon.get(s.url(path))).await.0, 200, "{path} needs no key");
    }

    // ---- commands:read reads, and cannot write ----
    let (status, kind, message) = refusal(submit(Some(&reader))).await;
    assert_eq!((status, kind.as_str()), (403, "forbidden"));
    assert!(message.contains("commands:write"), "403 names the missing scope: {message}");
    let (status, _, message) = refusal(put(&reader, "by-reader")).await;
    assert!(status == 403 && message.contains("devices:admin"), "{status} {message}");
    assert_eq!(command_count(&s).await, 0);
    assert_eq!(s.get("/v1/devices/by-reader").await.0, 404);
    for path in ["/v1/commands", "/v1/devices", &*format!("/v1/devices/{dev}")] {
        assert_eq!(call(anon.get(s.url(path)).bearer_auth(&reader)).await.0, 200, "reader GET {path}");
    }
    let lower_case = anon.get(s.url("/v1/commands")).header(AUTHORIZATION, format!("bearer {reader}"));
    assert_eq!(call(lower_case).await.0, 200, "the scheme's name is case-insensitive");

    // ---- commands:write submits to a simulated device: the command succeeds ----
    let (status, _, c) = call(submit(Some(&writer))).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("succeeded")), "{c}");
    assert_eq!(c["result"]["payload"], json!({"n": 1}), "the device's echo: {c}");
    let id = c["id"].as_str().unwrap().to_owned();
    let (status, _, read) = call(anon.get(s.url(&format!("/v1/commands/{id}"))).bearer_auth(&reader)).await;
    assert_eq!((status, &read["status"]), (200, &json!("succeeded")));
    let events = s.url(&format!("/v1/commands/{id}/events"));
    assert_eq!(call(anon.get(events.clone()).bearer_auth(&reader)).await.0, 200);
    let (status, _, message) = refusal(anon.get(events).bearer_auth(&writer)).await;
    assert!(status == 403 && message.contains("commands:read"), "a writer does not read: {message}");
    let (status, _, message) = refusal(anon.get(s.url("/v1/devices")).bearer_auth(&writer)).await;
    assert!(status == 403 && message.contains("commands:read, devices:admin"), "{message}");
    let cancel = |key: &str| {
        json_req(&anon, Method::POST, s.url(&format!("/v1/commands/{id}/cancel")), &json!({}))
            .bearer_auth(key)
    };
    assert_eq!(refusal(cancel(&reader)).await.0, 403, "cancel is a write");
    assert_eq!(refusal(cancel(&writer)).await.0, 409, "past the check: the command is final");

    // ---- devices:admin manages devices, and does not submit ----
    assert_eq!(call(put(&admin, "by-admin")).await.0, 201);
    assert_eq!(call(anon.get(s.url("/v1/devices/by-admin")).bearer_auth(&admin)).await.0, 200);
    assert_eq!(refusal(submit(Some(&admin))).await.0, 403);

    // ---- a write that is not JSON: 415 before anything is stored ----
    let before = command_count(&s).await;
    let simple = anon
        .post(submit_url.clone())
        .bearer_auth(&writer)
        .header(ORIGIN, EVIL_ORIGIN)
        .header(CONTENT_TYPE, "text/plain;charset=UTF-8")
        .body(echo.to_string());
    assert_eq!(refusal(simple).await.0, 415);
    let form = anon
        .post(submit_url.clone())
        .bearer_auth(&writer)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(echo.to_string());
    assert_eq!(refusal(form).await.0, 415);
    let untyped = anon.post(submit_url.clone()).bearer_auth(&writer).body(echo.to_string());
    let (status, kind, _) = refusal(untyped).await;
    assert_eq!((status, kind.as_str()), (415, "unsupported_media_type"));
    assert_eq!(command_count(&s).await, before, "a refused write stores nothing");

    // ---- a preflight gets no CORS permission (`call` checks every answer) ----
    let preflight = anon
        .request(Method::OPTIONS, submit_url.clone())
        .header(ORIGIN, EVIL_ORIGIN)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type");
    let (status, _, body) = call(preflight).await;
    assert_eq!((status, &body["error"]["kind"]), (405, &json!("method_not_allowed")), "preflight");
    let delete = anon.delete(s.url(&format!("/v1/devices/{dev}")));
    assert_eq!(refusal(delete).await.0, 405, "a method no route has: 405 before the key check");

    // ---- a revoked key: refused within the cache time, the others go on ----
    store.revoke_api_key(key_id(&reader), gateway::command::now_ms()).await.unwrap();
    let (took, message) = until_refused(&s.url("/v1/commands"), &reader).await;
    assert!(message.contains("revoked"), "{message}");
    eprintln!("MEASURED: a revoked key was refused {took:?} after the revocation");
    assert_eq!(call(submit(Some(&writer))).await.0, 200, "other keys go on working");
    s.stop().await;
}

/// Runs `gateway ARGS…` to completion with these environment variables.
fn gateway_cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    std::process::Command::new(&binaries().gateway)
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "debug")
        .output()
        .expect("the gateway binary runs")
}

/// A log with its ANSI colour sequences (`ESC [ … m`) taken out.
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `gateway token create|list|revoke` as real processes on a real database,
/// and a real `gateway serve` on it: created keys work, revoked keys stop,
/// and no key is ever in a log.
async fn token_cli_manages_the_keys_of_a_real_gateway(db: Db) {
    let Some(test_db) = TestDb::create(db).await else { return };
    let env = [("GATEWAY_DATABASE_URL", test_db.url.as_str())];
    let created =
        gateway_cli(&["token", "create", "--name", "ops", "--scope", "commands:read,commands:write"], &env);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let ops = text(&created.stdout).trim().to_owned();
    assert!(ops.starts_with("gk_") && !ops.contains(char::is_whitespace), "stdout is the key alone: {ops:?}");
    assert!(text(&created.stderr).contains("not shown again"), "{}", text(&created.stderr));
    assert!(!text(&created.stderr).contains(key_secret(&ops)), "the key is on stdout only");
    let created = gateway_cli(&["token", "create", "--name", "devops", "--scope", "devices:admin"], &env);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let devops = text(&created.stdout).trim().to_owned();
    for bad in
        [&["token", "create", "--name", "x", "--scope", "root"][..], &["token", "create", "--name", "x"]]
    {
        let refused = gateway_cli(bad, &env);
        assert!(!refused.status.success(), "{bad:?} must fail");
        assert!(text(&refused.stderr).contains("scope"), "{bad:?}: {}", text(&refused.stderr));
    }

    let list = gateway_cli(&["token", "list"], &env);
    let table = text(&list.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].split_whitespace().eq(["ID", "NAME", "SCOPES", "CREATED", "REVOKED"]), "{table}");
    let row = lines.iter().find(|l| l.starts_with(key_id(&ops))).unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cells[1], cells[2], cells[4]), ("ops", "commands:write,commands:read", "-"), "{table}");
    assert_eq!(lines.len(), 3, "a header and the two keys: {table}");
    let listed: Value =
        serde_json::from_slice(&gateway_cli(&["token", "list", "--json"], &env).stdout).unwrap();
    assert_eq!(listed[1]["scopes"], json!(["devices:admin"]), "{listed}");
    assert_eq!((&listed[0]["id"], &listed[0]["revoked_at"]), (&json!(key_id(&ops)), &Value::Null));
    for secret in [key_secret(&ops), key_secret(&devops)] {
        assert!(!table.contains(secret) && !listed.to_string().contains(secret), "list shows no secret");
    }

    // A real gateway on that database, keys required, every line logged.
    let logs = tempfile::tempdir().unwrap();
    let (http, mqtt) = (free_port(), free_port());
    let args = ["serve", "--http-listen", &http.to_string(), "--mqtt-listen", &mqtt.to_string()];
    let users = logs.path().join("mqtt-users");
    system_tests::mqtt_users_file(&users, &[("receiver-1", system_tests::TEST_BROKER_PASSWORD)]);
    let envs = [
        ("GATEWAY_INSECURE", "false"),
        ("GATEWAY_MQTT_USERS_FILE", users.to_str().unwrap()),
        ("GATEWAY_DATABASE_URL", &test_db.url),
        ("GATEWAY_MESSAGE_SECRET", system_tests::TEST_MESSAGE_SECRET),
        ("RUST_LOG", "debug"),
    ];
    let mut gw = Proc::start_with_env("gateway", &binaries().gateway, &args, &envs, logs.path());
    let api = Api::new(http);
    api.wait_healthy(Duration::from_secs(30)).await;
    let client = Client::new();
    let url = |path: &str| format!("{}{path}", api.base);
    assert_eq!(call(client.get(url("/v1/commands"))).await.0, 401);
    assert_eq!(call(client.get(url("/v1/commands")).bearer_auth(&ops)).await.0, 200);
    let put = json_req(&client, Method::PUT, url("/v1/devices/cli-dev"), &json!({}));
    assert_eq!(call(put.try_clone().unwrap().bearer_auth(&ops)).await.0, 403);
    assert_eq!(call(put.bearer_auth(&devops)).await.0, 201);
    let submit = json!({"name": "reboot", "mode": "async"});
    let (status, _, c) =
        call(json_req(&client, Method::POST, url("/v1/devices/cli-dev/commands"), &submit).bearer_auth(&ops))
            .await;
    assert_eq!((status, c["status"].as_str()), (202, Some("pending")), "{c}");
    let wrong = format!("gk_{}_{}", key_id(&ops), key_secret(&devops));
    assert_eq!(call(client.get(url("/v1/commands")).bearer_auth(&wrong)).await.0, 401);

    let revoked = gateway_cli(&["token", "revoke", key_id(&ops)], &env);
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    assert!(text(&revoked.stdout).contains(&format!("revoked API key {}", key_id(&ops))));
    let (took, message) = until_refused(&url("/v1/commands"), &ops).await;
    assert!(message.contains("revoked"), "{message}");
    eprintln!("MEASURED: `gateway token revoke` took effect after {took:?}");
    let as_devops = Api::with_key(http, &devops);
    assert_eq!(as_devops.get("/v1/devices").await.unwrap().0, 200, "other keys still work");
    let again = gateway_cli(&["token", "revoke", key_id(&ops)], &env);
    assert!(
        again.status.success() && text(&again.stdout).contains("revoked already"),
        "{}",
        text(&again.stdout)
    );
    let unknown = gateway_cli(&["token", "revoke", "00000000deadbeef"], &env);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown.stderr).contains("no API key"), "{}", text(&unknown.stderr));
    let listed: Value =
        serde_json::from_slice(&gateway_cli(&["token", "list", "--json"], &env).stdout).unwrap();
    assert!(listed[0]["revoked_at"].is_string(), "{listed}");

    gw.terminate(Duration::from_secs(10)).await;
    let log = without_colours(&std::fs::read_to_string(gw.log_path()).unwrap());
    assert!(log.contains("api_keys=true"), "the start line says keys are required: {log}");
    for secret in [key_secret(&ops), key_secret(&devops)] {
        assert!(!log.contains(secret), "a key's secret is in the gateway's debug log");
    }
    test_db.cleanup().await;
}

/// Every error has a JSON body — URI too long, a path that is not UTF-8,
/// unknown route, wrong method, bad JSON — and a web page cannot write even
/// with no key needed (`--insecure`): its `text/plain` POST is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_a_cross_origin_simple_post_is_refused() {
    let s = System::start(Spec::new(Db::Sqlite)).await.expect("SQLite is always there");
    assert!(s.api_key.is_none(), "this one runs --insecure: no key in the way");
    let http = Client::new();
    let dev = s.device_ids[0].clone();
    let expect = |status: u16, kind: &'static str| {
        move |(s, k, m): (u16, String, String)| {
            assert_eq!((s, k.as_str()), (status, kind), "{m}");
        }
    };

    // A cross-origin "simple" request: no preflight, so it must be refused here.
    let simple = http
        .post(s.url(&format!("/v1/devices/{dev}/commands")))
        .header(ORIGIN, EVIL_ORIGIN)
        .header(CONTENT_TYPE, "text/plain")
        .body(json!({"name": "reboot"}).to_string());
    expect(415, "unsupported_media_type")(refusal(simple).await);
    let simple_cancel = http.post(s.url(&format!("/v1/commands/{}/cancel", uuid::Uuid::new_v4())));
    expect(415, "unsupported_media_type")(refusal(simple_cancel.header(ORIGIN, EVIL_ORIGIN)).await);
    let simple_put = http.put(s.url("/v1/devices/by-page")).header(CONTENT_TYPE, "text/plain").body("{}");
    expect(415, "unsupported_media_type")(refusal(simple_put).await);
    assert_eq!(command_count(&s).await, 0, "nothing stored");
    assert_eq!(s.get("/v1/devices/by-page").await.0, 404, "nothing stored");
    let preflight = http
        .request(Method::OPTIONS, s.url(&format!("/v1/devices/{dev}/commands")))
        .header(ORIGIN, EVIL_ORIGIN)
        .header("access-control-request-method", "POST");
    expect(405, "method_not_allowed")(refusal(preflight).await);

    // Paths that are not UTF-8 once decoded.
    for path in ["/v1/devices/%FF", "/v1/commands/%FF", "/v1/commands/%C3%28/events"] {
        expect(400, "bad_request")(refusal(http.get(s.url(path))).await);
    }
    let put = json_req(&http, Method::PUT, s.url("/v1/devices/%FF"), &json!({}));
    expect(400, "bad_request")(refusal(put).await);
    let post = json_req(&http, Method::POST, s.url("/v1/devices/%FF%FE/commands"), &json!({"name": "x"}));
    expect(400, "bad_request")(refusal(post).await);

    // Too long a URI: 414 from the gateway up to hyper's own limit.
    let long = s.url(&format!("/v1/commands?device_id={}", "a".repeat(gateway::http::MAX_URI_BYTES)));
    expect(414, "uri_too_long")(refusal(http.get(long)).await);
    let long_path = s.url(&format!("/v1/devices/{}", "d".repeat(20_000)));
    expect(414, "uri_too_long")(refusal(http.get(long_path)).await);

    // Unknown route, wrong method, bad bodies.
    expect(404, "not_found")(refusal(http.get(s.url("/v2/nothing"))).await);
    expect(405, "method_not_allowed")(refusal(http.delete(s.url("/v1/devices/x"))).await);
    let put = |body: &str| {
        http.put(s.url("/v1/devices/x")).header(CONTENT_TYPE, "application/json").body(body.to_owned())
    };
    for bad in ["{not json", "", "{\"enabled\": \"yes\"}", "\u{0}"] {
        expect(400, "bad_request")(refusal(put(bad)).await);
    }
    let bad_utf8 =
        http.put(s.url("/v1/devices/x")).header(CONTENT_TYPE, "application/json").body(vec![0xff, 0xfe]);
    expect(400, "bad_request")(refusal(bad_utf8).await);

    // Bytes that are not UTF-8 (nor URI characters) in the request line
    // itself: hyper refuses them before any router, with a bare 400.
    let raw = raw_request(s.gateway.http_addr, b"GET /v1/devices/\xff HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw:?}");
    assert!(raw.contains("content-length: 0"), "no body at all, so no non-JSON one: {raw:?}");
    // Beyond the request-head limit (--http-max-head-bytes, 32 KiB) hyper
    // answers 431, also bodiless.
    let huge = format!("GET /v1/devices/{} HTTP/1.1\r\nHost: x\r\n\r\n", "d".repeat(70_000));
    let raw = raw_request(s.gateway.http_addr, huge.as_bytes()).await;
    assert!(raw.starts_with("HTTP/1.1 431") && raw.contains("content-length: 0"), "{raw:?}");
    s.stop().await;
}

/// Writes `request` on a fresh connection; what comes back until the server closes.
async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server answers and closes: {:?}", text(&answer));
    text(&answer).to_lowercase().replace("http/1.1", "HTTP/1.1")
}

/// A test CA, and a certificate it signed for 127.0.0.1 and localhost, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "gateway test CA");
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("garbage.pem"), "not a PEM file\n").unwrap();
        let other = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("other-key.pem"), other.serialize_pem()).unwrap();
        Pki { ca_pem: ca.pem(), dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A gateway config on SQLite in `dir`, keys required, TLS from `pki` files.
fn tls_config(
    dir: &Path,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
) -> gateway::Config {
    let url = format!("sqlite:{}", dir.join("gw.db").display());
    let mut config = gateway::Config::for_local(url, free_port(), free_port());
    config.insecure = false;
    config.message_secret = Some(system_tests::TEST_MESSAGE_SECRET.parse().unwrap());
    let users = dir.join("mqtt-users");
    system_tests::mqtt_users_file(&users, &[("receiver-1", system_tests::TEST_BROKER_PASSWORD)]);
    config.mqtt_users_file = Some(users);
    config.http_tls_cert = cert;
    config.http_tls_key = key;
    config
}

/// TLS on the HTTP listener: a client trusting the test CA gets 200 (and
/// the key check still applies); one that does not trust it, and plain HTTP
/// to the TLS port, fail. Bad TLS settings, and clear text off loopback,
/// stop the gateway at start with an error naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_http_listener() {
    let pki = Pki::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = tls_config(pki.dir.path(), Some(pki.path("cert.pem")), Some(pki.path("key.pem")));
    let gw = gateway::start(config, shutdown.clone()).await.expect("a gateway with TLS starts");
    let key = create_api_key(gw.app.store(), "tls", &Scope::ALL).await;
    let https = format!("https://{}", gw.http_addr);
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let trusting = Client::builder().use_rustls_tls().tls_built_in_root_certs(false).add_root_certificate(ca);
    let trusting = trusting.build().unwrap();
    assert_eq!(call(trusting.get(format!("{https}/healthz"))).await.0, 200);
    assert_eq!(call(trusting.get(format!("{https}/v1/devices")).bearer_auth(&key)).await.0, 200);
    assert_eq!(call(trusting.get(format!("{https}/v1/devices"))).await.0, 401, "keys still required");
    let by_name = format!("https://localhost:{}/healthz", gw.http_addr.port());
    let by_name_client = Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", gw.http_addr)
        .build()
        .unwrap();
    assert_eq!(call(by_name_client.get(by_name)).await.0, 200, "the name in the certificate works too");

    let distrusting = Client::builder().use_rustls_tls().tls_built_in_root_certs(false).build().unwrap();
    let e = distrusting.get(format!("{https}/healthz")).send().await.expect_err("an unknown CA is refused");
    assert!(format!("{e:?}").contains("UnknownIssuer"), "a certificate error: {e:?}");
    let plain = Client::new().get(format!("http://{}/healthz", gw.http_addr)).send().await;
    assert!(plain.is_err(), "plain HTTP to the TLS port gets no answer: {plain:?}");
    assert_eq!(call(trusting.get(format!("{https}/healthz"))).await.0, 200, "still serving after those");
    shutdown.cancel();
    gw.stopped().await;

    // Refused at start, each with an error naming the setting.
    let dir = pki.dir.path();
    let cases: [(Option<&str>, Option<&str>, &str); 5] = [
        (Some("cert.pem"), None, "--http-tls-cert and --http-tls-key go together"),
        (Some("missing.pem"), Some("key.pem"), "missing.pem"),
        (Some("garbage.pem"), Some("key.pem"), "no PEM certificate"),
        (Some("cert.pem"), Some("garbage.pem"), "no PEM private key"),
        (Some("cert.pem"), Some("other-key.pem"), "--http-tls-key"),
    ];
    for (cert, key, says) in cases {
        let config = tls_config(dir, cert.map(|c| pki.path(c)), key.map(|k| pki.path(k)));
        let e = gateway::start(config, shutdown.clone()).await.expect_err("bad TLS settings stop the start");
        assert!(format!("{e:#}").contains(says), "{cert:?}/{key:?}: {e:#}");
    }
    let mut exposed = tls_config(dir, None, None);
    exposed.http_listen = "0.0.0.0:0".parse().unwrap();
    let e = gateway::start(exposed.clone(), shutdown.clone()).await.expect_err("clear text off loopback");
    let e = format!("{e:#}");
    assert!(e.contains("refusing") && e.contains("--http-tls-cert") && e.contains("--insecure"), "{e}");

    // The same through the binary: the flags go together, and the refusal exits 1.
    let alone = gateway_cli(&["serve", "--http-tls-cert", "/nonexistent.pem"], &[]);
    assert!(
        !alone.status.success() && text(&alone.stderr).contains("--http-tls-key"),
        "{}",
        text(&alone.stderr)
    );
    let db = format!("sqlite:{}", dir.join("cli.db").display());
    let args = ["serve", "--http-listen", "0.0.0.0:0", "--database-url", &db];
    let refused = gateway_cli(&args, &[("GATEWAY_INSECURE", "false")]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("refusing to serve HTTP without TLS"),
        "{}",
        text(&refused.stderr)
    );
}
