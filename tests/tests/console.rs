//! The console (gateway/console/, served at `/console`) in a real browser:
//! Debian's headless `chromium` driven through `chromedriver` (WebDriver,
//! the `fantoccini` client). The test starts a system that requires API
//! keys, opens the page, enters a key, sends a command from the form, sees
//! it succeed, and checks that the command's timeline shows every event of
//! `GET /v1/commands/{id}/events`. With `UPDATE_SCREENSHOTS=1` it saves a
//! screenshot of each view under docs/console/. Without chromium or
//! chromedriver it is skipped with a message, except in CI (CI=true).
//!
//! Also here: `GET /v1/commands/summary` (what the console charts) on both
//! stores, and the console's headers (the Content-Security-Policy).

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use serde_json::{json, Value};
use system_tests::{eventually, free_port, on_both_stores, Db, Spec, System};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// A label value that would be markup if the page ever rendered data as HTML.
const HOSTILE_LABEL: &str = "<img src=x id=injected>";

/// chromedriver, started on a free loopback port, and a browser session of
/// headless chromium with a fresh profile. The driver dies with this value;
/// [`Browser::close`] ends the session (and chromium) first.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

/// The path of a program, from an environment variable or Debian's place.
fn program(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

impl Browser {
    /// `None` (the test is skipped) when chromium or chromedriver is absent,
    /// outside CI; in CI (CI=true) their absence fails the test.
    async fn start() -> Option<Browser> {
        let (chromium, driver) = (program("CHROMIUM", CHROMIUM), program("CHROMEDRIVER", CHROMEDRIVER));
        if let Some(missing) = [&chromium, &driver].into_iter().find(|p| !p.exists()) {
            let message = format!("{} is absent (scripts/browser.sh installs it)", missing.display());
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{message}: the console's browser test is required in CI");
            }
            eprintln!("SKIPPED: {message}; set CI=true to make this fatal");
            return None;
        }
        let port = free_port().port();
        let driver = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        eventually("chromedriver listens", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities
            .insert("goog:chromeOptions".into(), json!({"binary": chromium.to_str().unwrap(), "args": args}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session");
        Some(Browser { client, _driver: driver, _profile: profile })
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

/// The text of the first element matching `css` ("" when there is none).
async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.attr(name).await.ok()?
}

async fn count(c: &Client, css: &str) -> usize {
    c.find_all(Locator::Css(css)).await.map_or(0, |v| v.len())
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
}

async fn type_into(c: &Client, css: &str, value: &str) {
    let field = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
    field.clear().await.unwrap();
    field.send_keys(value).await.unwrap();
}

/// Saves a screenshot of the page as docs/console/NAME.png when
/// UPDATE_SCREENSHOTS is set.
async fn screenshot(c: &Client, name: &str) {
    if std::env::var_os("UPDATE_SCREENSHOTS").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console");
    std::fs::create_dir_all(&dir).unwrap();
    c.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sends_a_command_from_the_console_and_reads_its_timeline() {
    let Some(browser) = Browser::start().await else { return };
    let mut spec = Spec::new(Db::Sqlite);
    spec.tune = |config| config.insecure = false;
    let s = System::start(spec).await.expect("SQLite is always there");
    let outcome = AssertUnwindSafe(operator_session(&browser.client, &s)).catch_unwind().await;
    browser.close().await;
    s.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn operator_session(c: &Client, s: &System) {
    let dev = s.device_ids[0].clone();
    let labels = json!({"labels": {"site": "north", "note": HOSTILE_LABEL}});
    let r = s.http.put(s.url(&format!("/v1/devices/{dev}"))).json(&labels).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Some history on the other device, for the summary and the list.
    let other = &s.device_ids[1];
    for body in
        [json!({"name": "echo"}), json!({"name": "reboot"}), json!({"name": "fail", "payload": {"code": 7}})]
    {
        assert_eq!(s.send(other, body).await.0, 200);
    }

    // `/` leads to the console; without a key the page says what is missing.
    c.goto(&s.url("/")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/console");
    eventually("the 401 is shown", || async { text(c, "#error").await.contains("401") }).await;

    // The key, entered once, is kept for the tab and sent with every call.
    type_into(c, "#key", s.api_key.as_deref().unwrap()).await;
    click(c, "#key-use").await;
    let row = format!("#devices tr[data-device='{dev}']");
    eventually("the device, online", || async { text(c, &row).await.contains("online") }).await;
    assert_eq!(text(c, "#error").await, "");
    let stored: Value =
        c.execute("return sessionStorage.getItem('gateway-console-key')", vec![]).await.unwrap();
    assert_eq!(stored.as_str(), s.api_key.as_deref());
    // Labels are text, never markup.
    assert!(text(c, &row).await.contains(&format!("note={HOSTILE_LABEL}")));
    assert_eq!(count(c, "#injected").await, 0);
    // The search narrows the list.
    type_into(c, "#device-search", "site=north").await;
    eventually("one device found", || async { count(c, "#devices tr").await == 1 }).await;
    type_into(c, "#device-search", "no-such-device").await;
    eventually("none found", || async { count(c, "#devices tr").await == 0 }).await;
    type_into(c, "#device-search", "").await;
    eventually("all listed", || async { count(c, "#devices tr").await == s.device_ids.len() }).await;
    eventually("the summary's devices", || async {
        text(c, "#online").await == s.device_ids.len().to_string()
    })
    .await;
    screenshot(c, "devices").await;

    // The form refuses a payload that is not JSON, then sends a good one.
    click(c, "#tab-send").await;
    type_into(c, "#send-device", &dev).await;
    type_into(c, "#send-name", "echo").await;
    type_into(c, "#send-payload", "{\"t\": 21.5,").await;
    eventually("the payload refused", || async { text(c, "#payload-state").await.starts_with("not JSON") })
        .await;
    assert!(attr(c, "#send-submit", "disabled").await.is_some(), "submit disabled on bad JSON");
    type_into(c, "#send-payload", "{\"t\": 21.5, \"unit\": \"°C\"}").await;
    eventually("the payload accepted", || async { text(c, "#payload-state").await == "valid JSON" }).await;
    click(c, "#send-submit").await;
    eventually("the command succeeded", || async { text(c, "#send-status").await == "succeeded" }).await;
    let href = attr(c, "#send-link", "href").await.expect("a link to the command");
    let id = href.strip_prefix("#/command/").expect("#/command/ID").to_owned();
    let command = s.command(&id).await;
    assert_eq!((command["status"].as_str(), command["device_id"].as_str()), (Some("succeeded"), Some(&*dev)));
    assert_eq!(command["payload"], json!({"t": 21.5, "unit": "°C"}));
    assert!(text(c, "#send-body").await.contains("\"succeeded\""));
    screenshot(c, "send").await;

    // The command's page draws every event of its log, in order.
    click(c, "#send-link").await;
    let (_, events) = s.get(&format!("/v1/commands/{id}/events")).await;
    let events = events["items"].as_array().unwrap().clone();
    assert!(events.len() >= 3, "accepted, sent, … succeeded: {events:?}");
    eventually("every event on the timeline", || async {
        count(c, "#timeline li.event").await == events.len()
    })
    .await;
    let items = c.find_all(Locator::Css("#timeline li.event")).await.unwrap();
    for (i, (item, event)) in items.iter().zip(&events).enumerate() {
        let from = event["from"].as_str().unwrap_or("");
        assert_eq!(item.attr("data-from").await.unwrap().as_deref(), Some(from), "event {i}");
        assert_eq!(item.attr("data-to").await.unwrap().as_deref(), event["to"].as_str(), "event {i}");
        let shown = item.text().await.unwrap();
        assert!(shown.contains(&format!("attempt {}", event["attempt"])), "event {i}: {shown}");
        if let Some(detail) = event["detail"].as_str() {
            assert!(shown.contains(detail), "event {i} shows its detail {detail:?}: {shown}");
        }
        assert_eq!(i > 0, shown.contains('+'), "event {i} shows the time since the one before: {shown}");
    }
    assert_eq!(count(c, "#timeline-chart circle").await, events.len());
    assert!(text(c, "#command-fields").await.contains("succeeded"));
    screenshot(c, "command").await;

    // The command list: newest first, filtered by status and device.
    c.goto(&s.url("/console#/commands")).await.unwrap();
    let listed = format!("#commands tr[data-command='{id}']");
    eventually("the command listed", || async { text(c, &listed).await.contains("succeeded") }).await;
    assert_eq!(count(c, "#commands tr").await, 4, "every command, on one page");
    screenshot(c, "commands").await;
    c.find(Locator::Css("#command-status")).await.unwrap().select_by_value("failed").await.unwrap();
    eventually("filtered out by status", || async { count(c, &listed).await == 0 }).await;
    c.find(Locator::Css("#command-status")).await.unwrap().select_by_value("succeeded").await.unwrap();
    eventually("back with its status", || async { count(c, &listed).await == 1 }).await;
    eventually("the summary's chart", || async { count(c, "#chart rect.bar-succeeded").await >= 1 }).await;
    // A second command (async, through the API) appears on top by itself (auto-refresh).
    let (status, second) = s.send(&dev, json!({"name": "echo", "mode": "async"})).await;
    assert_eq!(status, 202);
    let second = second["id"].as_str().unwrap().to_owned();
    let first_row = "#commands tr:first-child";
    eventually("the newer command on top", || async {
        attr(c, first_row, "data-command").await.as_deref() == Some(&*second)
    })
    .await;
    s.final_state(&second).await;
    eventually("its status refreshed", || async { text(c, first_row).await.contains("succeeded") }).await;
    type_into(c, "#command-device", "someone-else").await;
    c.find(Locator::Css("#command-refresh")).await.unwrap().click().await.unwrap();
    eventually("filtered out by device", || async { count(c, "#commands tr").await == 0 }).await;
    type_into(c, "#command-device", &dev).await;
    c.find(Locator::Css("#command-refresh")).await.unwrap().click().await.unwrap();
    eventually("filtered in by device", || async { count(c, "#commands tr").await == 2 }).await;
}

/// The console's files need no key, carry a strict policy, and leave the API closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_open_and_locked_down() {
    let mut spec = Spec::new(Db::Sqlite);
    spec.tune = |config| config.insecure = false;
    let s = System::start(spec).await.expect("SQLite is always there");
    let anonymous = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let root = anonymous.get(s.url("/")).send().await.unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/console");
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let r = anonymous.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert_eq!(csp, gateway::http::console::CSP);
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    }
    let api = anonymous.get(s.url("/v1/commands/summary")).send().await.unwrap();
    assert_eq!(api.status(), 401, "the summary needs a key");
    s.stop().await;
}

/// `GET /v1/commands/summary` counts the commands of the window per status
/// and bucket, and the devices online.
async fn summary_counts(db: Db) {
    let Some(s) = System::start(Spec::new(db)).await else { return };
    let dev = &s.device_ids[0];
    let (_, empty) = s.get("/v1/commands/summary").await;
    assert_eq!(empty["totals"]["succeeded"], 0);
    for _ in 0..2 {
        assert_eq!(s.send(dev, json!({"name": "echo"})).await.0, 200);
    }
    assert_eq!(s.send(dev, json!({"name": "fail", "payload": {"code": 7}})).await.0, 200);
    let (status, summary) = s.get("/v1/commands/summary?minutes=60&buckets=12").await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["totals"]["succeeded"], 2, "{summary}");
    assert_eq!(summary["totals"]["failed"], 1, "{summary}");
    assert_eq!(summary["devices"], json!({"registered": 2, "online": 2}));
    assert_eq!(summary["bucket_ms"], 300_000);
    let buckets = summary["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 12);
    // Everything was created just now: in the last bucket, none before.
    let last = &buckets[11]["counts"];
    assert_eq!((last["succeeded"].as_u64(), last["failed"].as_u64()), (Some(2), Some(1)), "{summary}");
    let earlier: u64 = buckets[..11]
        .iter()
        .flat_map(|b| b["counts"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(earlier, 0, "{summary}");
    let since = time::OffsetDateTime::parse(
        summary["since"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let age = time::OffsetDateTime::now_utc() - since;
    assert!(age >= time::Duration::minutes(55) && age <= time::Duration::minutes(61), "{age}");
    // One minute in one bucket holds them too; devices offline are counted apart.
    let (_, minute) = s.get("/v1/commands/summary?minutes=1&buckets=1").await;
    assert_eq!(minute["totals"]["succeeded"], 2, "{minute}");
    s.register("not-connected").await;
    let (_, more) = s.get("/v1/commands/summary").await;
    assert_eq!(more["devices"], json!({"registered": 3, "online": 2}));
    for bad in ["minutes=0", "minutes=1441", "buckets=0", "buckets=121", "minutes=x"] {
        let (status, body) = s.get(&format!("/v1/commands/summary?{bad}")).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (400, Some("bad_request")), "{bad}: {body}");
    }
    s.stop().await;
}

on_both_stores!(summary_counts);
