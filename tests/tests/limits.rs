//! Size limits along the chain (`protocol::limits`, PROTOCOL.md §7): a
//! device answer over the receiver's `--max-result-bytes` fails its one
//! command at once with `result_too_large` and disturbs nothing else (no
//! broker disconnect, no device offline); answers up to the limit arrive
//! whole; an MQTT reply too large for one message goes out without its
//! payloads instead of not at all.

use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use serde_json::{json, Value};
use system_tests::device::RawDevice;
use system_tests::{eventually, mqtt_client, Db, Spec, System};

async fn start(db: Db) -> Option<System> {
    let mut spec = Spec::new(db);
    // A re-send would be a minute away: anything quicker is the limit's doing.
    spec.tune = |c| c.result_timeout_ms = 60_000;
    System::start(spec).await
}

async fn answers_over_the_limit_fail_alone_and_at_once(db: Db) {
    let Some(s) = start(db).await else { return };
    let limit = protocol::limits::DEFAULT_MAX_RESULT;
    let device = "big-answers";
    s.register(device).await;
    let mut raw = RawDevice::connect(s.receiver.tcp_addr, device).await;
    eventually("device online", || s.device_online(device)).await;
    for (size, fits) in [(150_000, true), (limit, true), (limit + 1, false), (1024 * 1024, false)] {
        let (_, c) = s.send(device, json!({"name": "dump", "mode": "async"})).await;
        let id = c["id"].as_str().unwrap().to_owned();
        let cmd = raw.next_command(Duration::from_secs(20)).await;
        // A JSON string of `size` bytes in all.
        let answer = format!("\"{}\"", "a".repeat(size - 2)).into_bytes();
        raw.answer(cmd.id, 0, answer).await;
        let (status, c) = s.get(&format!("/v1/commands/{id}?wait_ms=20000")).await;
        assert_eq!(status, 200, "final well before the result timeout: {c}");
        if fits {
            assert_eq!(c["status"], "succeeded", "{size}");
            assert_eq!(c["result"]["payload"].as_str().map(str::len), Some(size - 2), "whole");
        } else {
            assert_eq!(
                (c["status"].as_str(), c["error"]["kind"].as_str()),
                (Some("failed"), Some("result_too_large"))
            );
            let message = c["error"]["message"].as_str().unwrap();
            assert!(message.contains(&size.to_string()) && message.contains(&limit.to_string()), "{message}");
            assert_eq!(c["attempts"], 1, "not re-sent: {c}");
        }
        // Nothing else was disturbed: every device still online, others still served.
        for other in &s.device_ids {
            assert!(s.device_online(other).await, "{other} still online after a {size}-byte answer");
        }
        let (status, ok) = s.send(&s.device_ids[0], json!({"name": "echo", "payload": size})).await;
        assert_eq!((status, ok["status"].as_str()), (200, Some("succeeded")), "{ok}");
    }
    assert_eq!(s.receiver.counters.results_too_large.get(), 2);
    s.stop().await;
}

/// A final reply bigger than one MQTT message (a 60 KiB payload and a
/// 256 KiB binary answer, as base64) still reaches the MQTT caller, without
/// the payloads and saying so.
async fn a_reply_too_large_for_mqtt_goes_without_its_payloads(db: Db) {
    let Some(s) = start(db).await else { return };
    let device = "big-replies";
    s.register(device).await;
    let mut raw = RawDevice::connect(s.receiver.tcp_addr, device).await;
    eventually("device online", || s.device_online(device)).await;
    let (client, mut eventloop) = mqtt_client(&s.broker).await;
    let reply_to = format!("{}-replies/big", s.topic_prefix);
    client.subscribe(reply_to.clone(), QoS::AtLeastOnce).await.unwrap();
    let (tx, mut replies) = tokio::sync::mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => drop(tx.send(json!({"event": "suback"}))),
                Event::Incoming(Packet::Publish(p)) => {
                    drop(tx.send(serde_json::from_slice(&p.payload).unwrap()))
                }
                _ => {}
            }
        }
    });
    assert_eq!(next(&mut replies).await["event"], "suback");
    let req = json!({"device_id": device, "name": "dump", "payload": "p".repeat(60 * 1024), "reply_to": reply_to, "correlation_id": "big-1"});
    client.publish(s.gateway.app.topics().submit(), QoS::AtLeastOnce, false, req.to_string()).await.unwrap();
    assert_eq!(next(&mut replies).await["event"], "accepted");
    let cmd = raw.next_command(Duration::from_secs(20)).await;
    raw.answer(cmd.id, 0, vec![0xff; protocol::limits::DEFAULT_MAX_RESULT]).await;
    let final_ = next(&mut replies).await;
    assert_eq!((final_["event"].as_str(), final_["status"].as_str()), (Some("final"), Some("succeeded")));
    assert!(
        final_.get("payload").is_none() && final_["result"].get("payload_base64").is_none(),
        "{final_:?}"
    );
    assert!(final_["omitted"].as_str().unwrap().contains("MQTT message limit"));
    // The whole of it over HTTP.
    let c = s.command(final_["id"].as_str().unwrap()).await;
    assert_eq!(
        c["result"]["payload_base64"].as_str().map(str::len),
        Some(protocol::limits::DEFAULT_MAX_RESULT / 3 * 4 + 4)
    );
    s.stop().await;
}

system_tests::on_both_stores!(
    answers_over_the_limit_fail_alone_and_at_once,
    a_reply_too_large_for_mqtt_goes_without_its_payloads
);

async fn next(r: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(20), r.recv()).await.expect("a reply").unwrap()
}
