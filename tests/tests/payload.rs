//! The payload's round trip is faithful (docs/PROTOCOL.md 2.3 and 2.4):
//! caller → store → device → result → caller carries numbers of any size and
//! precision exactly as written, unicode, and object keys in the order sent,
//! on SQLite and MariaDB, over HTTP (sync answer, and GET after an async
//! submission) and over MQTT (the final reply). What cannot be carried as
//! written — lone UTF-16 surrogate escapes (not Unicode text) and duplicate
//! object keys (one would be lost) — is a 400 that says why, and nothing is
//! stored or sent.
//!
//! The test plays the device itself over TCP, so it sees the exact bytes of
//! every COMMAND frame and chooses the exact bytes of every RESULT; and it
//! reads each answer's `payload` as raw text from the response bytes, never
//! through a parsed number.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use protocol::{Frame, FrameCodec};
use rumqttc::{Event, Packet, QoS};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use system_tests::{eventually, mqtt_client, Db, Spec, System};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

system_tests::on_both_stores!(
    json_payloads_reach_the_device_and_come_back_exactly,
    payloads_that_cannot_be_carried_are_refused_and_nothing_is_stored,
    device_results_come_back_exactly_or_as_base64,
    mqtt_submissions_carry_payloads_exactly,
);

/// What the caller writes as `payload` (raw JSON text), and the exact bytes
/// the device must receive: the compact serialization, key order as written,
/// numbers digit for digit as written (an exponent is written `e` with its
/// sign: `1E2` is sent as `1e+2`, the same number).
const CARRIED: &[(&str, &str)] = &[
    // 2^64, the example of the field report.
    (r#"{"serial":18446744073709551616}"#, r#"{"serial":18446744073709551616}"#),
    ("18446744073709551615", "18446744073709551615"),
    // -2^63 - 1
    ("-9223372036854775809", "-9223372036854775809"),
    ("123456789012345678901234567890", "123456789012345678901234567890"),
    ("-123456789012345678901234567890.000000000000000000001", "-123456789012345678901234567890.000000000000000000001"),
    ("0.1", "0.1"),
    ("1e400", "1e+400"),
    ("-1E-400", "-1e-400"),
    ("[1.0,1,-0,-0.0,0,1e2,1E+2,2.50,0.30000000000000004]", "[1.0,1,-0,-0.0,0,1e+2,1e+2,2.50,0.30000000000000004]"),
    // Key order as sent, at every depth.
    (r#"{"z":1,"a":2,"m":{"y":[],"b":{}},"0":null}"#, r#"{"z":1,"a":2,"m":{"y":[],"b":{}},"0":null}"#),
    // Whitespace between tokens is not part of the value.
    (" { \"b\" : [ 1 , 2.0 ] ,\n\t\"a\" : null } ", r#"{"b":[1,2.0],"a":null}"#),
    // Unicode, raw and escaped (astral characters as one surrogate pair): sent as UTF-8.
    ("\"h\u{e9}llo \u{1F600} \u{1D11E} \u{4E2D}\"", "\"h\u{e9}llo \u{1F600} \u{1D11E} \u{4E2D}\""),
    (r#""h\u00e9llo \ud83d\ude00 \uD834\uDD1E \u4e2d""#, "\"h\u{e9}llo \u{1F600} \u{1D11E} \u{4E2D}\""),
    // Escapes: control characters stay escaped (\u0000 is a character, not an end).
    (
        r#"{"s":"nul \u0000 bell \u0007 tab \t nl \n cr \r quote \" backslash \\ slash \/ \u2028"}"#,
        "{\"s\":\"nul \\u0000 bell \\u0007 tab \\t nl \\n cr \\r quote \\\" backslash \\\\ slash / \u{2028}\"}",
    ),
    (r#"{"deep":[[{"n":1.000000000000000000001}],[-0.0E-0]]}"#, r#"{"deep":[[{"n":1.000000000000000000001}],[-0.0e-0]]}"#),
    ("null", "null"),
    ("true", "true"),
    ("{}", "{}"),
    ("[]", "[]"),
    (r#""""#, r#""""#),
];

/// Payloads that cannot be carried as written, and what the 400 must say.
const REFUSED: &[(&str, &str)] = &[
    (r#""\ud800""#, "lone UTF-16 surrogate"),
    (r#"{"x":"a\udc00b"}"#, "lone UTF-16 surrogate"),
    (r#"["\ude00\ud83d"]"#, "lone UTF-16 surrogate"),
    (r#"{"a":1,"a":1}"#, r#"duplicate key "a""#),
    (r#"{"x":[{"k":1,"k":2}]}"#, r#"duplicate key "k" in payload.x[0]"#),
];

/// A device played by the test on the receiver's TCP port: it reports every
/// COMMAND it reads (name, payload bytes) and answers each with code 0 and the
/// payload bytes unchanged.
struct HandDevice {
    id: String,
    commands: mpsc::UnboundedReceiver<(String, Bytes)>,
}

impl HandDevice {
    async fn start(s: &System, id: &str) -> HandDevice {
        s.register(id).await;
        let stream = TcpStream::connect(s.receiver.tcp_addr).await.unwrap();
        let mut conn = Framed::new(stream, FrameCodec::default());
        conn.send(Frame::Hello { device_id: id.parse().unwrap() }).await.unwrap();
        let (tx, commands) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = conn.next().await {
                let answer = match frame {
                    Ok(Frame::Ping) => Frame::Pong,
                    Ok(Frame::Command { id, name, payload }) => {
                        let _ = tx.send((name, payload.clone()));
                        Frame::Result { id, code: 0, payload }
                    }
                    _ => continue,
                };
                if conn.send(answer).await.is_err() {
                    break;
                }
            }
        });
        eventually("hand device online", || s.device_online(id)).await;
        HandDevice { id: id.to_owned(), commands }
    }

    /// The payload of the next COMMAND the device reads.
    async fn received(&mut self) -> Bytes {
        let next = tokio::time::timeout(Duration::from_secs(20), self.commands.recv()).await;
        next.expect("a COMMAND in time").expect("device running").1
    }

    fn nothing_received(&mut self) -> bool {
        self.commands.try_recv().is_err()
    }
}

async fn start(db: Db) -> Option<System> {
    let mut spec = Spec::new(db);
    spec.devices = 0;
    System::start(spec).await
}

/// Posts `body` (raw text) and returns the status and raw response text.
async fn post_text(s: &System, device: &str, body: String) -> (u16, String) {
    let r = s
        .http
        .post(s.url(&format!("/v1/devices/{device}/commands")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The raw JSON text of each top-level field of a JSON object text.
fn fields(text: &str) -> HashMap<String, Box<RawValue>> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON object ({e}): {text}"))
}

/// The raw text of `payload` and of `result.payload` in a command's JSON text.
fn payload_texts(command: &str) -> (String, String) {
    let top = fields(command);
    let result = fields(top["result"].get());
    (top["payload"].get().to_owned(), result["payload"].get().to_owned())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn json_payloads_reach_the_device_and_come_back_exactly(db: Db) {
    let Some(s) = start(db).await else { return };
    let mut device = HandDevice::start(&s, "hand-0").await;
    for (input, expected) in CARRIED {
        // Sync: the answer carries the payload and the device's echo.
        let body = format!(r#"{{"name":"echo","payload":{input},"wait_ms":20000}}"#);
        let (status, answer) = post_text(&s, &device.id, body).await;
        assert_eq!(status, 200, "{input}: {answer}");
        assert_eq!(text(&device.received().await), *expected, "the bytes the device received for {input}");
        let (payload, result) = payload_texts(&answer);
        assert_eq!(
            (payload.as_str(), result.as_str()),
            (*expected, *expected),
            "sync answer for {input}: {answer}"
        );

        // Async, then GET.
        let body = format!(r#"{{"name":"echo","payload":{input},"mode":"async"}}"#);
        let (status, accepted) = post_text(&s, &device.id, body).await;
        assert_eq!(status, 202, "{input}: {accepted}");
        assert_eq!(text(&device.received().await), *expected, "the bytes the device received for {input}");
        let id = serde_json::from_str::<Value>(&accepted).unwrap()["id"].as_str().unwrap().to_owned();
        s.final_state(&id).await;
        let r = s.http.get(s.url(&format!("/v1/commands/{id}"))).send().await.unwrap();
        let shown = r.text().await.unwrap();
        let (payload, result) = payload_texts(&shown);
        assert_eq!(
            (payload.as_str(), result.as_str()),
            (*expected, *expected),
            "GET after async for {input}: {shown}"
        );
    }
    // The listing shows the same text.
    let r = s.http.get(s.url("/v1/commands?limit=1")).send().await.unwrap();
    let listing = r.text().await.unwrap();
    let items: Vec<Box<RawValue>> = serde_json::from_str(fields(&listing)["items"].get()).unwrap();
    let (payload, _) = payload_texts(items[0].get());
    assert_eq!(payload, CARRIED.last().unwrap().1);
    s.stop().await;
}

async fn payloads_that_cannot_be_carried_are_refused_and_nothing_is_stored(db: Db) {
    let Some(s) = start(db).await else { return };
    let mut device = HandDevice::start(&s, "hand-0").await;
    for (input, why) in REFUSED {
        for mode in ["sync", "async"] {
            let body = format!(r#"{{"name":"echo","payload":{input},"mode":"{mode}"}}"#);
            let (status, answer) = post_text(&s, &device.id, body).await;
            assert_eq!(status, 400, "{input}: {answer}");
            let answer: Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(answer["error"]["kind"], "bad_request", "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(why), "{input}: the message says {why:?}: {message}");
        }
    }
    assert!(s.all_commands().await.is_empty(), "nothing stored for refused payloads");
    // The device got nothing; a good command after them is the first it reads.
    assert!(device.nothing_received());
    let (status, _) = post_text(&s, &device.id, r#"{"name":"echo","payload":1}"#.into()).await;
    assert_eq!(status, 200);
    assert_eq!(text(&device.received().await), "1");
    s.stop().await;
}

/// What a device answers (exact bytes), and how the caller is shown it:
/// `payload` with this raw text, or `payload_base64` of the exact bytes.
enum Shown {
    Json(&'static str),
    Base64,
}

const RESULTS: &[(&[u8], Shown)] = &[
    (
        br#"{"serial":18446744073709551616,"z":0.1,"a":1e400,"m":-0}"#,
        Shown::Json(r#"{"serial":18446744073709551616,"z":0.1,"a":1e+400,"m":-0}"#),
    ),
    (b" [ 1.0 , 123456789012345678901234567890 ]\n", Shown::Json("[1.0,123456789012345678901234567890]")),
    (
        "{\"t\":\"\u{1F600}\\ud83d\\ude00\\u0000\"}".as_bytes(),
        Shown::Json("{\"t\":\"\u{1F600}\u{1F600}\\u0000\"}"),
    ),
    // Not carried as `payload` without losing something: shown as base64, exactly.
    (br#"{"a":1,"a":2}"#, Shown::Base64),
    (br#"["\ud800"]"#, Shown::Base64),
    (b"\xff\x00 not json", Shown::Base64),
    (b"", Shown::Base64),
];

async fn device_results_come_back_exactly_or_as_base64(db: Db) {
    let Some(s) = start(db).await else { return };
    let mut device = HandDevice::start(&s, "hand-0").await;
    for (answer, shown) in RESULTS {
        // The device echoes the payload bytes: sent as base64, they reach it unchanged.
        let body = json!({"name": "echo", "payload_base64": BASE64.encode(answer), "wait_ms": 20000});
        let (status, command) = post_text(&s, &device.id, body.to_string()).await;
        assert_eq!(status, 200, "{command}");
        assert_eq!(&device.received().await[..], *answer);
        let id = serde_json::from_str::<Value>(&command).unwrap()["id"].as_str().unwrap().to_owned();
        let r = s.http.get(s.url(&format!("/v1/commands/{id}"))).send().await.unwrap();
        let again = r.text().await.unwrap();
        for command in [&command, &again] {
            let result = fields(fields(command)["result"].get());
            match shown {
                Shown::Json(expected) => {
                    assert_eq!(result["payload"].get(), *expected, "{command}");
                    assert!(!result.contains_key("payload_base64"), "{command}");
                }
                Shown::Base64 => {
                    let b64: String = serde_json::from_str(result["payload_base64"].get()).unwrap();
                    assert_eq!(BASE64.decode(b64).unwrap(), *answer, "{command}");
                    assert!(!result.contains_key("payload"), "{command}");
                }
            }
        }
    }
    s.stop().await;
}

async fn mqtt_submissions_carry_payloads_exactly(db: Db) {
    let Some(s) = start(db).await else { return };
    let mut device = HandDevice::start(&s, "hand-0").await;
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    let reply_to = format!("{}-replies/payloads", s.topic_prefix);
    client.subscribe(reply_to.clone(), QoS::AtLeastOnce).await.unwrap();
    let (tx, mut replies) = mpsc::unbounded_channel::<Option<String>>();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => drop(tx.send(None)),
                Event::Incoming(Packet::Publish(p)) => drop(tx.send(Some(text(&p.payload)))),
                _ => {}
            }
        }
    });
    async fn next(replies: &mut mpsc::UnboundedReceiver<Option<String>>) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(20), replies.recv()).await.expect("a reply in time").unwrap()
    }
    assert_eq!(next(&mut replies).await, None, "subscribed");
    let submit = s.gateway.app.topics().submit();
    for (i, (input, expected)) in CARRIED.iter().enumerate() {
        let message = format!(
            r#"{{"device_id":"{}","name":"echo","payload":{input},"reply_to":"{reply_to}","correlation_id":"c-{i}"}}"#,
            device.id
        );
        client.publish(submit.clone(), QoS::AtLeastOnce, false, message).await.unwrap();
        let accepted = next(&mut replies).await.unwrap();
        let event = |reply: &str| -> (String, String) {
            let f = fields(reply);
            (
                serde_json::from_str(f["event"].get()).unwrap(),
                serde_json::from_str(f["correlation_id"].get()).unwrap(),
            )
        };
        assert_eq!(event(&accepted), ("accepted".into(), format!("c-{i}")), "{accepted}");
        assert_eq!(fields(&accepted)["payload"].get(), *expected, "accepted reply for {input}");
        assert_eq!(text(&device.received().await), *expected, "the bytes the device received for {input}");
        let final_ = next(&mut replies).await.unwrap();
        assert_eq!(event(&final_), ("final".into(), format!("c-{i}")), "{final_}");
        let (payload, result) = payload_texts(&final_);
        assert_eq!(
            (payload.as_str(), result.as_str()),
            (*expected, *expected),
            "final reply for {input}: {final_}"
        );
    }
    // Refused over MQTT as over HTTP: a `rejected` reply naming why, nothing stored.
    for (i, (input, why)) in REFUSED.iter().enumerate() {
        let message = format!(
            r#"{{"device_id":"{}","name":"echo","payload":{input},"reply_to":"{reply_to}","correlation_id":"r-{i}"}}"#,
            device.id
        );
        client.publish(submit.clone(), QoS::AtLeastOnce, false, message).await.unwrap();
        let rejected: serde_json::Value = serde_json::from_str(&next(&mut replies).await.unwrap()).unwrap();
        assert_eq!(
            (rejected["event"].as_str(), rejected["correlation_id"].as_str()),
            (Some("rejected"), Some(format!("r-{i}").as_str()))
        );
        let message = rejected["error"]["message"].as_str().unwrap();
        assert!(message.contains("payload refused") && message.contains(why), "{input}: {message}");
    }
    assert_eq!(s.all_commands().await.len(), CARRIED.len(), "nothing stored for the refused");
    s.stop().await;
}
