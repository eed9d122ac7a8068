//! docs/openapi.json against the real gateway: every route is called on a
//! running system (SQLite, embedded broker, receiver, simulated devices), and
//! each response's status must be declared for its operation and its body must
//! match the declared schema. Coverage is checked both ways: every operation
//! and every declared status of the document was seen, and every route that
//! `gateway::http::router` serves is in the document (but the console's
//! files, which are not API).
//!
//! Schemas are OpenAPI 3.0 schema objects; `json_schema` turns them into JSON
//! Schema (2020-12) for the `jsonschema` crate: `nullable: true` becomes a type
//! union (or an `anyOf` with null where there is no `type`), `$ref`s into
//! `#/components/schemas` become `$defs` references, OpenAPI-only keywords are
//! dropped, and `additionalProperties` is kept as written (absent = allowed).

use std::collections::{BTreeMap, BTreeSet};

use gateway::api_key::Scope;
use gateway::http::auth::{access, Access, ACCESS};
use serde_json::{json, Value};
use system_tests::{create_api_key, free_port, Db, Spec, System};

const DOC: &str = include_str!("../../docs/openapi.json");
/// The fleet secret of the system under test (device keys are issued from it).
const SECRET: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const HTTP_RS: &str = include_str!("../../gateway/src/http/mod.rs");

/// What `gateway::http::router` serves, as (method, path template). Checked
/// against the source of `router()` below, and against the document.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/devices"),
    ("GET", "/v1/devices/{device_id}"),
    ("PUT", "/v1/devices/{device_id}"),
    ("POST", "/v1/devices/{device_id}/commands"),
    ("POST", "/v1/devices/{device_id}/key"),
    ("GET", "/v1/commands"),
    ("GET", "/v1/commands/summary"),
    ("GET", "/v1/commands/{id}"),
    ("GET", "/v1/commands/{id}/events"),
    ("POST", "/v1/commands/{id}/cancel"),
    ("GET", "/openapi.json"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/console"),
    ("GET", "/console/console.js"),
    ("GET", "/console/console.css"),
];

/// The console's files (gateway/src/http/console.rs): routed and open, but
/// not API, so not in the document (tests/tests/console.rs checks them).
const CONSOLE: &[(&str, &str)] =
    &[("GET", "/"), ("GET", "/console"), ("GET", "/console/console.js"), ("GET", "/console/console.css")];

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

// Path templates, as in the document.
const DEVICES: &str = "/v1/devices";
const DEVICE: &str = "/v1/devices/{device_id}";
const SUBMIT: &str = "/v1/devices/{device_id}/commands";
const KEY: &str = "/v1/devices/{device_id}/key";
const COMMANDS: &str = "/v1/commands";
const SUMMARY: &str = "/v1/commands/summary";
const COMMAND: &str = "/v1/commands/{id}";
const EVENTS: &str = "/v1/commands/{id}/events";
const CANCEL: &str = "/v1/commands/{id}/cancel";
/// Not a path of the document: the router's fallback for unknown paths.
const UNKNOWN_ROUTE: &str = "(no route)";

/// A request body. Every write says its body is JSON (the gateway refuses
/// it otherwise, with 415), also with `None`; `Text` says `text/plain`.
enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>),
    Text(String),
}

/// The document, the system under test, and what has been checked so far.
struct Api {
    doc: Value,
    /// `components.schemas`, converted to JSON Schema.
    defs: Value,
    s: System,
    /// (method, template) → statuses seen and checked.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
    /// The client requests go out with (the harness's own until the API key checks).
    client: reqwest::Client,
}

impl Api {
    /// Sends a request, asserts its status is `expect`, checks the response
    /// against the document (`check`) and returns the body (JSON, or the text
    /// as a JSON string).
    async fn call(&mut self, expect: u16, method: &str, template: &str, path: &str, body: Body) -> Value {
        self.call_as(expect, method, template, path, body, |r| r).await
    }

    /// `call`, with `prepare` adding to the request (e.g. its API key).
    async fn call_as(
        &mut self,
        expect: u16,
        method: &str,
        template: &str,
        path: &str,
        body: Body,
        prepare: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Value {
        assert!(
            template == UNKNOWN_ROUTE || matches_template(template, path),
            "{path} is not an instance of {template}"
        );
        let method_ = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let write = method != "GET";
        let mut req = self.client.request(method_, self.s.url(path));
        req = match body {
            Body::None if write => req.header("content-type", "application/json"),
            Body::None => req,
            Body::Json(v) => req.header("content-type", "application/json").body(v.to_string()),
            Body::Raw(b) => req.header("content-type", "application/json").body(b),
            Body::Text(t) => req.header("content-type", "text/plain").body(t),
        };
        let r = prepare(req).send().await.unwrap();
        let status = r.status().as_u16();
        let content_type =
            r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let text = r.text().await.unwrap();
        assert_eq!(status, expect, "{method} {path}: {text}");
        self.check(method, template, status, &content_type, &text)
    }

    /// The check: `status` is declared for the operation (method, template) —
    /// or `default` — and the body matches the schema declared for its media type.
    fn check(&mut self, method: &str, template: &str, status: u16, content_type: &str, text: &str) -> Value {
        let what = format!("{method} {template} -> {status}");
        let response = if template == UNKNOWN_ROUTE {
            assert_eq!(status, 404, "{what}");
            self.resolve(&json!({"$ref": "#/components/responses/NotFound"}))
        } else {
            let path_item =
                self.doc["paths"].get(template).unwrap_or_else(|| panic!("{what}: path not in the document"));
            match path_item.get(method.to_lowercase()) {
                Some(op) => {
                    let responses = &op["responses"];
                    let declared = responses
                        .get(status.to_string())
                        .or_else(|| responses.get(format!("{}XX", status / 100)))
                        .or_else(|| responses.get("default"))
                        .unwrap_or_else(|| panic!("{what}: status not declared; body {text}"));
                    self.resolve(declared)
                }
                // A method the document does not list for a path it lists: the router's 405.
                None => {
                    assert_eq!(status, 405, "{what}: the document has no such operation");
                    self.resolve(&json!({"$ref": "#/components/responses/MethodNotAllowed"}))
                }
            }
        };
        let media = content_type.split(';').next().unwrap().trim();
        let instance = match response.get("content") {
            None => {
                assert!(text.is_empty(), "{what}: no content declared, got {content_type} {text}");
                Value::Null
            }
            Some(content) => {
                let declared = content.get(media).unwrap_or_else(|| {
                    panic!("{what}: content type {content_type:?} not declared: {content}")
                });
                let instance = if media == "application/json" {
                    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
                } else {
                    Value::String(text.to_owned())
                };
                self.validate(&what, &declared["schema"], &instance);
                instance
            }
        };
        self.seen.entry((method.to_owned(), template.to_owned())).or_default().insert(status);
        instance
    }

    fn validate(&self, what: &str, schema: &Value, instance: &Value) {
        let errors = schema_errors(&self.defs, schema, instance);
        assert!(
            errors.is_empty(),
            "{what}: body does not match the document:\n{}\nbody: {instance:#}",
            errors.join("\n")
        );
    }

    /// Follows a `$ref` (local JSON pointer) to what it names.
    fn resolve(&self, v: &Value) -> Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("non-local $ref {r}"));
                let target = self.doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {r}"));
                self.resolve(target)
            }
            None => v.clone(),
        }
    }

    /// Each path of the document with its templates filled in.
    fn sample_path(template: &str, command_id: &str) -> String {
        template.replace("{device_id}", "dev-x").replace("{id}", command_id)
    }

    async fn get(&mut self, expect: u16, template: &str, path: &str) -> Value {
        self.call(expect, "GET", template, path, Body::None).await
    }

    async fn put(&mut self, expect: u16, template: &str, path: &str, body: Value) -> Value {
        self.call(expect, "PUT", template, path, Body::Json(body)).await
    }

    async fn post(&mut self, expect: u16, template: &str, path: &str, body: Value) -> Value {
        self.call(expect, "POST", template, path, Body::Json(body)).await
    }

    /// Submits a command to `device`.
    async fn submit(&mut self, expect: u16, device: &str, body: Value) -> Value {
        self.post(expect, SUBMIT, &format!("/v1/devices/{device}/commands"), body).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_matches_every_route() {
    let spec =
        Spec { tune: |c| c.device_key_secret = Some(SECRET.parse().unwrap()), ..Spec::new(Db::Sqlite) };
    let s = System::start(spec).await.expect("SQLite is always there");
    let doc: Value = serde_json::from_str(DOC).unwrap();
    let client = s.http.clone();
    let mut api = Api { defs: json_schema_defs(&doc), doc, s, seen: BTreeMap::new(), client };
    let dev = api.s.device_ids[0].clone();
    let slow_dev = api.s.device_ids[1].clone();

    // ---- devices ----
    let offline = "openapi-offline";
    let d = api.put(201, DEVICE, &format!("/v1/devices/{offline}"), json!({"labels": {"site": "lab"}})).await;
    assert_eq!((d["online"].as_bool(), d["last_seen_at"].as_str()), (Some(false), None), "never seen: {d}");
    api.put(200, DEVICE, &format!("/v1/devices/{offline}"), json!({"enabled": true, "labels": {}})).await;
    api.put(400, DEVICE, "/v1/devices/bad%20id", json!({})).await;
    api.put(400, DEVICE, &format!("/v1/devices/{offline}"), json!({"colour": "red"})).await;
    api.call(400, "PUT", DEVICE, &format!("/v1/devices/{offline}"), Body::Raw(b"{not json".to_vec())).await;
    api.call(400, "PUT", DEVICE, &format!("/v1/devices/{offline}"), Body::None).await;
    api.call(413, "PUT", DEVICE, &format!("/v1/devices/{offline}"), Body::Raw(vec![b' '; 256 * 1024])).await;
    let d = api.get(200, DEVICE, &format!("/v1/devices/{dev}")).await;
    assert!(d["online"] == true && d["receiver_id"].is_string() && d["last_seen_at"].is_string(), "{d}");
    api.get(200, DEVICE, &format!("/v1/devices/{offline}")).await;
    api.get(404, DEVICE, "/v1/devices/nobody").await;
    let page = api.get(200, DEVICES, "/v1/devices").await;
    assert_eq!((page["items"].as_array().unwrap().len(), &page["next_after"]), (3, &Value::Null));
    let page = api.get(200, DEVICES, "/v1/devices?limit=1").await;
    let after = page["next_after"].as_str().expect("a full page has next_after").to_owned();
    api.get(200, DEVICES, &format!("/v1/devices?after={after}&limit=1")).await;
    api.get(400, DEVICES, "/v1/devices?limit=0").await;
    api.get(400, DEVICES, "/v1/devices?limit=abc").await;

    // ---- device keys ----
    let k = api.call(201, "POST", KEY, &format!("/v1/devices/{offline}/key"), Body::None).await;
    assert_eq!((k["device_id"].as_str(), k["generation"].as_u64()), (Some(offline), Some(1)), "{k}");
    let k = api
        .call(201, "POST", KEY, &format!("/v1/devices/{offline}/key?revoke_previous=true"), Body::None)
        .await;
    assert_eq!(k["generation"], 2, "{k}");
    api.call(400, "POST", KEY, &format!("/v1/devices/{offline}/key?revoke_previous=maybe"), Body::None).await;
    api.call(404, "POST", KEY, "/v1/devices/nobody/key", Body::None).await;

    // ---- submit: sync, async, and every refusal ----
    let c = api.submit(200, &dev, json!({"name": "echo", "payload": {"hello": "world"}})).await;
    assert_eq!(c["status"], "succeeded", "{c}");
    let done_id = c["id"].as_str().unwrap().to_owned();
    let c = api.submit(200, &dev, json!({"name": "echo", "payload_base64": "/wA="})).await;
    assert_eq!(
        (c["payload_base64"].as_str(), c["result"]["payload_base64"].as_str()),
        (Some("/wA="), Some("/wA="))
    );
    let c = api.submit(200, &dev, json!({"name": "fail", "payload": {"code": 7}})).await;
    assert_eq!((c["status"].as_str(), c["error"]["kind"].as_str()), (Some("failed"), Some("device_error")));
    let slow = api
        .submit(202, &slow_dev, json!({"name": "slow", "payload": {"delay_ms": 1000}, "wait_ms": 20}))
        .await;
    assert!(slow["created_at"].is_string(), "sync 202 is the whole command: {slow}");
    let slow_id = slow["id"].as_str().unwrap().to_owned();
    let accepted =
        api.submit(202, &dev, json!({"name": "reboot", "mode": "async", "idempotency_key": "k-1"})).await;
    assert_eq!(accepted.as_object().unwrap().len(), 2, "async 202 is {{id, status}}: {accepted}");
    let again =
        api.submit(202, &dev, json!({"name": "reboot", "mode": "async", "idempotency_key": "k-1"})).await;
    assert_eq!(again["id"], accepted["id"]);
    api.submit(409, &dev, json!({"name": "other", "mode": "async", "idempotency_key": "k-1"})).await;
    let in_a_while = (time::OffsetDateTime::now_utc() + time::Duration::seconds(30))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let scheduled =
        api.submit(202, &dev, json!({"name": "later", "mode": "async", "scheduled_at": in_a_while})).await;
    assert_eq!(scheduled["status"], "scheduled");
    let scheduled_id = scheduled["id"].as_str().unwrap().to_owned();
    let pending = api.submit(202, offline, json!({"name": "x", "wait_ms": 10})).await;
    assert_eq!(pending["status"], "pending", "{pending}");
    let pending_id = pending["id"].as_str().unwrap().to_owned();
    let expiring = api.submit(202, offline, json!({"name": "x", "mode": "async", "ttl_ms": 100})).await;
    let expiring_id = expiring["id"].as_str().unwrap().to_owned();
    api.submit(404, "nobody", json!({"name": "x"})).await;
    api.submit(404, "bad%20id", json!({"name": "x"})).await;
    api.call(400, "POST", SUBMIT, &format!("/v1/devices/{dev}/commands"), Body::Raw(b"{not json".to_vec()))
        .await;
    api.submit(400, &dev, json!({"name": "x", "colour": "red"})).await;
    api.submit(400, &dev, json!({"name": ""})).await;
    api.submit(400, &dev, json!({"name": "x", "payload_base64": "%%%"})).await;
    api.submit(400, &dev, json!({"name": "x", "wait_ms": 300_001})).await;
    api.submit(400, &dev, json!({"name": "x", "scheduled_at": in_a_while})).await;
    api.submit(413, &dev, json!({"name": "x", "payload": "a".repeat(64 * 1024 + 1)})).await;
    let huge = Body::Raw(vec![b' '; 256 * 1024]);
    api.call(413, "POST", SUBMIT, &format!("/v1/devices/{dev}/commands"), huge).await;
    let disabled = "openapi-disabled";
    api.put(201, DEVICE, &format!("/v1/devices/{disabled}"), json!({"enabled": false})).await;
    api.submit(409, disabled, json!({"name": "x"})).await;

    // ---- one command: plain get, long-poll, events ----
    let c = api.get(200, COMMAND, &format!("/v1/commands/{done_id}")).await;
    assert_eq!(c["status"], "succeeded");
    api.get(200, COMMAND, &format!("/v1/commands/{scheduled_id}")).await;
    let c = api.get(202, COMMAND, &format!("/v1/commands/{scheduled_id}?wait_ms=20")).await;
    assert_eq!(c["status"], "scheduled");
    let c = api.get(200, COMMAND, &format!("/v1/commands/{slow_id}?wait_ms=20000")).await;
    assert_eq!(c["status"], "succeeded", "long-poll ends with the result: {c}");
    let c = api.get(200, COMMAND, &format!("/v1/commands/{expiring_id}?wait_ms=20000")).await;
    assert_eq!(
        (c["status"].as_str(), c["error"]["kind"].as_str()),
        (Some("expired"), Some("deadline_passed"))
    );
    api.get(400, COMMAND, &format!("/v1/commands/{done_id}?wait_ms=300001")).await;
    api.get(400, COMMAND, &format!("/v1/commands/{done_id}?wait_ms=-1")).await;
    api.get(404, COMMAND, &format!("/v1/commands/{}", uuid::Uuid::new_v4())).await;
    api.get(404, COMMAND, "/v1/commands/not-a-uuid").await;
    let events = api.get(200, EVENTS, &format!("/v1/commands/{done_id}/events")).await;
    assert_eq!(events["items"][0]["from"], Value::Null);
    api.get(404, EVENTS, &format!("/v1/commands/{}/events", uuid::Uuid::new_v4())).await;
    api.get(404, EVENTS, "/v1/commands/not-a-uuid/events").await;

    // ---- cancel ----
    let c = api.post(200, CANCEL, &format!("/v1/commands/{scheduled_id}/cancel"), json!({})).await;
    assert_eq!(c["status"], "canceled");
    let c = api.call(200, "POST", CANCEL, &format!("/v1/commands/{pending_id}/cancel"), Body::None).await;
    assert_eq!(c["error"]["kind"], "canceled");
    api.call(409, "POST", CANCEL, &format!("/v1/commands/{done_id}/cancel"), Body::None).await;
    // On its device: a request, answered 202 while the outcome is unknown.
    let busy = api
        .submit(202, &slow_dev, json!({"name": "slow", "payload": {"delay_ms": 1000}, "wait_ms": 20}))
        .await;
    let busy_id = busy["id"].as_str().unwrap().to_owned();
    let c =
        api.call(202, "POST", CANCEL, &format!("/v1/commands/{busy_id}/cancel?wait_ms=0"), Body::None).await;
    assert!(c["cancel_requested_at"].is_string(), "{c}");
    api.call(400, "POST", CANCEL, &format!("/v1/commands/{busy_id}/cancel?wait_ms=300001"), Body::None).await;
    api.call(404, "POST", CANCEL, &format!("/v1/commands/{}/cancel", uuid::Uuid::new_v4()), Body::None).await;
    api.call(404, "POST", CANCEL, "/v1/commands/not-a-uuid/cancel", Body::None).await;

    // ---- lists of commands ----
    let page = api.get(200, COMMANDS, "/v1/commands").await;
    assert!(page["items"].as_array().unwrap().len() >= 8 && page["next_cursor"].is_null(), "{page}");
    let page = api.get(200, COMMANDS, "/v1/commands?limit=2").await;
    let cursor = page["next_cursor"].as_str().expect("a full page has next_cursor").to_owned();
    api.get(200, COMMANDS, &format!("/v1/commands?limit=2&cursor={cursor}")).await;
    let page =
        api.get(200, COMMANDS, &format!("/v1/commands?device_id={dev}&status=succeeded&cursor=")).await;
    assert!(page["items"].as_array().unwrap().iter().all(|c| c["status"] == "succeeded"));
    api.get(200, COMMANDS, "/v1/commands?status=").await;
    api.get(400, COMMANDS, "/v1/commands?status=bogus").await;
    api.get(400, COMMANDS, "/v1/commands?cursor=not-a-uuid").await;
    api.get(400, COMMANDS, "/v1/commands?limit=1001").await;
    api.get(400, COMMANDS, "/v1/commands?limit=abc").await;
    let summary = api.get(200, SUMMARY, "/v1/commands/summary?minutes=5&buckets=5").await;
    assert_eq!(summary["buckets"].as_array().map(Vec::len), Some(5));
    api.get(400, SUMMARY, "/v1/commands/summary?minutes=0").await;

    // ---- service ----
    let served = api.get(200, "/openapi.json", "/openapi.json").await;
    assert_eq!(served, api.doc, "the served document is docs/openapi.json");
    let ok = api.get(200, "/healthz", "/healthz").await;
    assert_eq!(ok, "ok");
    let ready = api.get(200, "/readyz", "/readyz").await;
    assert_eq!(ready["ready"], true, "{ready}");
    let metrics = api.get(200, "/metrics", "/metrics").await;
    // The operation's description lists the metrics: exactly those are served.
    let listed = metric_names(api.doc["paths"]["/metrics"]["get"]["description"].as_str().unwrap());
    let mut served: BTreeSet<String> = metrics
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap().split('{').next().unwrap().to_owned())
        .collect();
    // A labelled family has no series until its first sample (no refusal in
    // this run): it is documented all the same.
    served.insert("gateway_messages_refused_total".to_owned());
    served.insert("gateway_receiver_messages_rate_limited_total".to_owned());
    assert_eq!(listed, served, "metrics in the description vs served");

    // ---- the router's fallbacks: unknown path 404, undeclared method 405 ----
    api.get(404, UNKNOWN_ROUTE, "/v2/nothing").await;
    let paths: Vec<(String, Vec<String>)> = api.doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, item)| (p.clone(), item.as_object().unwrap().keys().cloned().collect()))
        .collect();
    for (template, declared) in &paths {
        for method in METHODS.iter().filter(|m| !declared.contains(&m.to_lowercase())) {
            let path = Api::sample_path(template, &done_id);
            let body = api.call(405, method, template, &path, Body::None).await;
            assert_eq!(body["error"]["kind"], "method_not_allowed");
        }
    }

    // ---- a gateway without --device-key-secret issues no keys ----
    let mut plain = gateway::Config::for_local(api.s.db.url.clone(), free_port(), free_port());
    plain.topic_prefix = api.s.topic_prefix.clone();
    plain.broker = Some(api.s.broker.to_string());
    let plain = gateway::start(plain, api.s.shutdown.clone()).await.expect("a second gateway starts");
    let ours = std::mem::replace(&mut api.s.base, format!("http://{}", plain.http_addr));
    let refused = api.call(409, "POST", KEY, &format!("/v1/devices/{dev}/key"), Body::None).await;
    assert!(refused["error"]["message"].as_str().unwrap().contains("--device-key-secret"), "{refused}");
    api.s.base = ours;

    // ---- the store gone: 503 wherever the document says so ----
    api.s.gateway.app.store().close().await;
    api.get(503, DEVICES, "/v1/devices").await;
    api.get(503, DEVICE, &format!("/v1/devices/{dev}")).await;
    api.put(503, DEVICE, &format!("/v1/devices/{dev}"), json!({})).await;
    api.submit(503, &dev, json!({"name": "x"})).await;
    api.get(503, COMMANDS, "/v1/commands").await;
    api.get(503, SUMMARY, "/v1/commands/summary").await;
    api.get(503, COMMAND, &format!("/v1/commands/{done_id}")).await;
    api.get(503, EVENTS, &format!("/v1/commands/{done_id}/events")).await;
    api.call(503, "POST", CANCEL, &format!("/v1/commands/{done_id}/cancel"), Body::None).await;
    api.call(503, "POST", KEY, &format!("/v1/devices/{dev}/key"), Body::None).await;
    api.get(200, "/healthz", "/healthz").await;
    let unready = api.get(503, "/readyz", "/readyz").await;
    assert_eq!(unready["not_ready"], json!(["database", "migrations"]), "{unready}");

    // ---- API keys required: 401, 403, 415 wherever the document says so ----
    check_access(&mut api, &done_id).await;

    // ---- coverage, both ways ----
    let routes: BTreeSet<(String, String)> =
        ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(routes, routes_in_source(), "ROUTES here vs router() in gateway/src/http/mod.rs");
    let mut documented = BTreeSet::new();
    let mut undone = Vec::new();
    for (template, item) in api.doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap().iter().filter(|(k, _)| k.as_str() != "parameters") {
            let key = (method.to_uppercase(), template.clone());
            let seen = api.seen.get(&key).cloned().unwrap_or_default();
            for status in op["responses"].as_object().unwrap().keys().filter(|k| k.as_str() != "default") {
                if !seen.iter().any(|s| s.to_string() == *status) {
                    undone.push(format!("{} {} -> {status}", key.0, key.1));
                }
            }
            documented.insert(key);
        }
    }
    let console: BTreeSet<(String, String)> =
        CONSOLE.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    let missing: Vec<_> = routes.difference(&documented).filter(|r| !console.contains(r)).collect();
    assert!(missing.is_empty(), "routes the router serves that the document lacks: {missing:?}");
    let extra: Vec<_> = documented.difference(&routes).collect();
    assert!(extra.is_empty(), "operations in the document the router does not serve: {extra:?}");
    assert!(undone.is_empty(), "declared responses never exercised: {undone:?}");
    let access: BTreeSet<(String, String)> =
        ACCESS.iter().map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(routes, access, "ROUTES vs the access rules (gateway::http::auth::ACCESS)");

    for ((method, template), statuses) in &api.seen {
        eprintln!("checked {method:6} {template:34} {statuses:?}");
    }
    api.s.stop().await;
}

/// On a gateway that requires API keys: the document's security (open
/// operations say `security: []`, the others list their scopes in
/// `x-scopes`) is what `auth::ACCESS` enforces, and each protected operation
/// answers 401 without a key, 403 with a key lacking its scopes, and — a
/// write — 415 for a `text/plain` body with the right key.
async fn check_access(api: &mut Api, command_id: &str) {
    let mut spec = Spec::new(Db::Sqlite);
    spec.tune = |config| config.insecure = false;
    let secure = System::start(spec).await.expect("SQLite is always there");
    std::mem::replace(&mut api.s, secure).stop().await;
    api.client = reqwest::Client::new();
    let store = api.s.gateway.app.store().clone();
    let mut operations = Vec::new();
    for (template, item) in api.doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap().iter().filter(|(k, _)| k.as_str() != "parameters") {
            operations.push((method.to_uppercase(), template.clone(), op.clone()));
        }
    }
    for (method, template, op) in operations {
        let path = Api::sample_path(&template, command_id);
        let (rule, listed) = access(&method.parse().unwrap(), &template);
        assert!(listed, "{method} {template} has no line in auth::ACCESS");
        let Some(scopes) = op.get("x-scopes") else {
            assert_eq!((&op["security"], rule), (&json!([]), Access::Open), "{method} {template} is open");
            api.call(200, &method, &template, &path, Body::None).await;
            continue;
        };
        let declared: BTreeSet<Scope> =
            scopes.as_array().unwrap().iter().map(|s| Scope::parse(s.as_str().unwrap()).unwrap()).collect();
        let Access::AnyOf(enforced) = rule else {
            panic!("{method} {template}: open, documented with scopes")
        };
        assert_eq!(declared, enforced.iter().copied().collect(), "{method} {template}: x-scopes vs ACCESS");
        api.call(401, &method, &template, &path, Body::None).await;
        let others: Vec<Scope> = Scope::ALL.into_iter().filter(|s| !declared.contains(s)).collect();
        let other_key = create_api_key(&store, "other", &others).await;
        let body =
            api.call_as(403, &method, &template, &path, Body::None, |r| r.bearer_auth(&other_key)).await;
        let message = body["error"]["message"].as_str().unwrap();
        assert!(declared.iter().all(|s| message.contains(s.as_str())), "403 names the scopes: {message}");
        if method != "GET" {
            let scopes: Vec<Scope> = declared.iter().copied().collect();
            let key = create_api_key(&store, "right", &scopes).await;
            let text = Body::Text("{}".into());
            api.call_as(415, &method, &template, &path, text, |r| r.bearer_auth(&key)).await;
        }
    }
}

/// `components.schemas` of the document, as JSON Schema `$defs`.
fn json_schema_defs(doc: &Value) -> Value {
    let defs = doc["components"]["schemas"].as_object().unwrap();
    Value::Object(defs.iter().map(|(name, schema)| (name.clone(), json_schema(schema))).collect())
}

/// Why `instance` does not match the OpenAPI `schema` (none: it does).
fn schema_errors(defs: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let root = json!({"$defs": defs, "allOf": [json_schema(schema)]});
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .should_ignore_unknown_formats(true) // int32, int64: OpenAPI's, for numbers
        .with_format("byte", is_base64)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}"));
    validator.iter_errors(instance).map(|e| format!("at {:?}: {e}", e.instance_path().as_str())).collect()
}

/// The checker itself: the conversion keeps what the document forbids
/// forbidden and lets `nullable` fields be null; and the document's own
/// examples match their schemas.
#[test]
fn the_checker_accepts_good_bodies_and_rejects_bad_ones() {
    let doc: Value = serde_json::from_str(DOC).unwrap();
    let defs = json_schema_defs(&doc);
    let schema = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let command = doc["components"]["schemas"]["Command"]["example"].clone();
    let with = |field: &str, value: Value| {
        let mut c = command.clone();
        c[field] = value;
        c
    };
    let mut as_base64 = with("payload_base64", json!("/wA="));
    as_base64.as_object_mut().unwrap().remove("payload");
    let good = [
        command.clone(),
        as_base64,
        with("result", Value::Null),
        with("error", json!({"kind": "canceled", "message": null})),
        with("idempotency_key", json!("k")),
        with("next_attempt_at", json!("2025-11-25T19:57:08.120Z")),
    ];
    for c in &good {
        assert_eq!(schema_errors(&defs, &schema("Command"), c), Vec::<String>::new(), "good: {c}");
    }
    let mut unrequired = command.clone();
    unrequired.as_object_mut().unwrap().remove("next_attempt_at");
    let bad = [
        unrequired,                             // required
        with("colour", json!("red")),           // additionalProperties: false
        with("status", json!("done")),          // enum
        with("attempts", Value::Null),          // not nullable
        with("result", json!({})),              // nullable, but else a Result
        with("created_at", json!("yesterday")), // format: date-time
        with("id", json!("not-a-uuid")),        // format: uuid
        with("payload_base64", json!("%%%")),   // format: byte
    ];
    for c in &bad {
        assert!(!schema_errors(&defs, &schema("Command"), c).is_empty(), "bad, but passed: {c}");
    }
    let event = json!({"at": "2025-11-25T19:57:03.120Z", "from": null, "to": "pending", "attempt": 0, "detail": null});
    assert!(schema_errors(&defs, &schema("Event"), &event).is_empty());
    let event = json!({"at": "2025-11-25T19:57:03.120Z", "from": "nope", "to": "pending", "attempt": 0, "detail": null});
    assert!(!schema_errors(&defs, &schema("Event"), &event).is_empty());

    // Every example in the document matches the schema beside it.
    fn examples<'a>(v: &'a Value, out: &mut Vec<(&'a Value, &'a Value)>) {
        match v {
            Value::Object(o) => {
                if let Some(example) = o.get("example") {
                    out.push((o.get("schema").unwrap_or(v), example));
                }
                o.values().for_each(|v| examples(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| examples(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    examples(&doc, &mut found);
    assert!(found.len() >= 4, "the document's examples: {}", found.len());
    for (schema, example) in found {
        assert_eq!(schema_errors(&defs, schema, example), Vec::<String>::new(), "example {example}");
    }
}

/// Whether `path` (query ignored) is an instance of `template`.
fn matches_template(template: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap();
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| if t.starts_with('{') { !p.is_empty() } else { t == p })
}

/// The routes `router()` in gateway/src/http/mod.rs registers: each
/// `.route("PATH", get(..).put(..))` gives (METHOD, PATH) per method router.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let start = HTTP_RS.find("pub fn router(").expect("router() in http/mod.rs");
    let body = &HTTP_RS[start..];
    let body = &body[..body.find("\n}\n").expect("end of router()")];
    for other in [".nest(", ".merge(", ".route_service(", ".nest_service("] {
        assert!(!body.contains(other), "router() uses {other}: teach routes_in_source about it");
    }
    let mut routes = BTreeSet::new();
    for (at, _) in body.match_indices(".route(") {
        let args = &body[at + ".route(".len()..];
        let mut depth = 1;
        let end = args
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .expect("balanced .route(..)")
            .0;
        let args = &args[..end];
        let path = args.split('"').nth(1).expect("a path literal");
        let handlers = &args[args.find(',').expect("a method router")..];
        for method in METHODS {
            let call = format!("{}(", method.to_lowercase());
            let is_method_router = handlers.match_indices(&call).any(|(i, _)| {
                !handlers[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
            });
            if is_method_router {
                routes.insert((method.to_owned(), path.to_owned()));
            }
        }
    }
    routes
}

/// Metric names (`gateway_…`) mentioned in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("gateway_"))
        .map(str::to_owned)
        .collect()
}

/// An OpenAPI 3.0 schema object as JSON Schema 2020-12.
fn json_schema(schema: &Value) -> Value {
    let Some(obj) = schema.as_object() else { return schema.clone() };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        // OpenAPI 3.0: a $ref's siblings are ignored.
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("schema $ref {r}"));
        return json!({"$ref": format!("#/$defs/{name}")});
    }
    let mut out = serde_json::Map::new();
    for (key, v) in obj {
        let converted = match key.as_str() {
            "nullable" | "example" | "discriminator" | "xml" | "externalDocs" | "deprecated" | "readOnly"
            | "writeOnly" => continue,
            "properties" => Value::Object(
                v.as_object().unwrap().iter().map(|(k, s)| (k.clone(), json_schema(s))).collect(),
            ),
            "items" | "not" | "additionalProperties" => json_schema(v),
            "allOf" | "anyOf" | "oneOf" => {
                Value::Array(v.as_array().unwrap().iter().map(json_schema).collect())
            }
            _ => v.clone(),
        };
        out.insert(key.clone(), converted);
    }
    if obj.get("nullable") != Some(&Value::Bool(true)) {
        return Value::Object(out);
    }
    let composed = ["allOf", "anyOf", "oneOf", "not"].iter().any(|k| out.contains_key(*k));
    match out.get("type").cloned() {
        Some(Value::String(t)) if !composed => {
            out.insert("type".into(), json!([t, "null"]));
            if let Some(Value::Array(values)) = out.get_mut("enum") {
                if !values.contains(&Value::Null) {
                    values.push(Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => json!({"anyOf": [{"type": "null"}, Value::Object(out)]}),
    }
}

/// OpenAPI's `format: byte`: standard padded base64.
fn is_base64(s: &str) -> bool {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).is_ok()
}
