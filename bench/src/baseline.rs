//! The broker baseline: the same traffic shape as the pipeline through the
//! same broker, with nothing but two MQTT clients — a "device side" answering
//! every command with a report, and a "caller side" keeping C requests in
//! flight. What the pipeline cannot beat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes_of_id::{id_of, payload_for};
use plumbing::mqtt::{client, BrokerAddr, ClientSpec};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::load::{run_pool, Latency, Progress, Recorder};
use crate::Shape;

/// Requests sent before measuring (connections warm, topics known to the broker).
const WARM_UP: usize = 50;
/// A request with no reply after this long fails the baseline.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands the device side's event loop hands to its responder. In flight is
/// at most C, far below this, so the event loop never waits on it.
const RESPONDER_QUEUE: usize = 16 * 1024;

/// Replies still awaited, by request id. A std mutex: held only to insert or
/// remove, never across an await.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct BaselineResult {
    pub(crate) requests: usize,
    pub(crate) elapsed_s: f64,
    pub(crate) throughput_per_s: f64,
    pub(crate) latency: Option<Latency>,
}

/// Runs the baseline against `broker`, topics under `prefix`.
pub(crate) async fn run(broker: &BrokerAddr, prefix: &str, shape: &Shape) -> anyhow::Result<BaselineResult> {
    let pending: Pending = Arc::default();
    let (device, device_loop) = device_side(broker, prefix).await?;
    let (caller, caller_loop) = caller_side(broker, prefix, pending.clone()).await?;
    let result = tokio::select! {
        r = measure(&caller, prefix, shape, &pending) => r,
        r = device_loop => bail!("baseline device side: {}", loop_end(r)),
        r = caller_loop => bail!("baseline caller side: {}", loop_end(r)),
    };
    let _ = caller.disconnect().await;
    let _ = device.disconnect().await;
    result
}

fn loop_end(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "event loop ended".into(),
        Ok(Err(e)) => format!("{e:#}"),
        Err(e) => e.to_string(),
    }
}

async fn measure(
    caller: &AsyncClient,
    prefix: &str,
    shape: &Shape,
    pending: &Pending,
) -> anyhow::Result<BaselineResult> {
    let warm = Recorder::new("baseline warm-up", WARM_UP);
    send_all(caller, prefix, shape, pending, WARM_UP, 1_000_000_000, warm).await?;
    let recorder = Recorder::new("baseline", shape.commands);
    let progress = Progress::show(recorder.clone());
    let started = Instant::now();
    send_all(caller, prefix, shape, pending, shape.commands, 0, recorder.clone()).await?;
    let elapsed = started.elapsed().as_secs_f64();
    drop(progress);
    Ok(BaselineResult {
        requests: shape.commands,
        elapsed_s: elapsed,
        throughput_per_s: shape.commands as f64 / elapsed,
        latency: Latency::of(recorder.latencies()),
    })
}

/// `n` request→reply round trips from `shape.concurrency` callers, ids from `first_id`.
async fn send_all(
    caller: &AsyncClient,
    prefix: &str,
    shape: &Shape,
    pending: &Pending,
    n: usize,
    first_id: u64,
    recorder: Arc<Recorder>,
) -> anyhow::Result<()> {
    let (caller, pending, prefix, shape) =
        (caller.clone(), pending.clone(), prefix.to_owned(), shape.clone());
    let results = run_pool(n, shape.concurrency, move |i| {
        let (caller, pending, recorder) = (caller.clone(), pending.clone(), recorder.clone());
        let topic = format!("{prefix}/devices/{}/commands", shape.device_id(i));
        let payload = payload_for(first_id + i as u64, shape.payload_bytes);
        async move {
            let (tx, rx) = oneshot::channel();
            pending.lock().unwrap().insert(first_id + i as u64, tx);
            let t = Instant::now();
            caller.publish(topic, QoS::AtLeastOnce, false, payload).await?;
            tokio::time::timeout(REPLY_TIMEOUT, rx).await.context("no reply within 30 s")??;
            recorder.record(Some(t.elapsed()));
            anyhow::Ok(())
        }
    })
    .await;
    results.into_iter().collect()
}

/// Subscribed to every device's command topic; answers each command with a
/// QoS 1 report carrying its id. Returns once the subscription is acknowledged.
async fn device_side(
    broker: &BrokerAddr,
    prefix: &str,
) -> anyhow::Result<(AsyncClient, JoinHandle<anyhow::Result<()>>)> {
    let (client, eventloop) = client(&broker.clone().into(), spec(prefix, "device"));
    client.subscribe(format!("{prefix}/devices/+/commands"), QoS::AtLeastOnce).await?;
    let (to_responder, mut commands) = mpsc::channel::<u64>(RESPONDER_QUEUE);
    let (subscribed, ready) = oneshot::channel();
    let handle = tokio::spawn(poll(eventloop, subscribed, move |payload| {
        if let Some(id) = id_of(payload) {
            // Full only if far more than C commands are unanswered: drop and let the caller time out.
            let _ = to_responder.try_send(id);
        }
    }));
    // Publishing from the task that polls can deadlock (rumqttc #1025): a separate responder.
    let (responder, reports) = (client.clone(), format!("{prefix}/reports"));
    tokio::spawn(async move {
        while let Some(id) = commands.recv().await {
            if responder.publish(reports.clone(), QoS::AtLeastOnce, false, payload_for(id, 0)).await.is_err()
            {
                return;
            }
        }
    });
    wait_subscribed(ready).await?;
    Ok((client, handle))
}

/// Subscribed to the reports topic; completes the pending request each report names.
async fn caller_side(
    broker: &BrokerAddr,
    prefix: &str,
    pending: Pending,
) -> anyhow::Result<(AsyncClient, JoinHandle<anyhow::Result<()>>)> {
    let (client, eventloop) = client(&broker.clone().into(), spec(prefix, "caller"));
    client.subscribe(format!("{prefix}/reports"), QoS::AtLeastOnce).await?;
    let (subscribed, ready) = oneshot::channel();
    let handle = tokio::spawn(poll(eventloop, subscribed, move |payload| {
        let waiter = id_of(payload).and_then(|id| pending.lock().unwrap().remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(());
        }
    }));
    wait_subscribed(ready).await?;
    Ok((client, handle))
}

async fn wait_subscribed(ready: oneshot::Receiver<()>) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(10), ready).await {
        Ok(Ok(())) => Ok(()),
        _ => bail!("the baseline broker did not acknowledge a subscription within 10 s"),
    }
}

fn spec(prefix: &str, side: &str) -> ClientSpec {
    ClientSpec {
        client_id: format!("{prefix}-baseline-{side}"),
        clean_session: true,
        manual_acks: false,
        last_will: None,
    }
}

/// Polls `eventloop` for ever, handing each incoming publish's payload to
/// `on_publish`; an error (the connection failed) ends it.
async fn poll(
    mut eventloop: EventLoop,
    subscribed: oneshot::Sender<()>,
    on_publish: impl Fn(&[u8]) + Send + 'static,
) -> anyhow::Result<()> {
    let mut subscribed = Some(subscribed);
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::Publish(p)) => on_publish(&p.payload),
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(s) = subscribed.take() {
                    let _ = s.send(());
                }
            }
            _ => {}
        }
    }
}

/// The baseline's payload: the request id as 20 ASCII digits, padded with `x`
/// to the requested size (never shorter than the id).
mod bytes_of_id {
    const ID_LEN: usize = 20;

    pub(super) fn payload_for(id: u64, size: usize) -> Vec<u8> {
        let mut p = format!("{id:020}").into_bytes();
        p.resize(size.max(ID_LEN), b'x');
        p
    }

    pub(super) fn id_of(payload: &[u8]) -> Option<u64> {
        std::str::from_utf8(payload.get(..ID_LEN)?).ok()?.parse().ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_round_trip_whatever_the_size() {
            assert_eq!(payload_for(42, 64).len(), 64);
            assert_eq!(id_of(&payload_for(42, 64)), Some(42));
            assert_eq!(id_of(&payload_for(u64::MAX, 0)), Some(u64::MAX));
            assert_eq!(id_of(b"short"), None);
        }
    }
}
