//! The gateway's two MQTT connections and the tasks that poll them.
//!
//! - **main**: publishes commands and replies; takes MQTT submissions,
//!   presence and receiver status. Clean session, automatic acks: a submission
//!   lost before it is stored was never acknowledged to its caller.
//! - **reports**: takes delivery reports and results from receivers. Persistent
//!   session and manual acks: a report is acknowledged only after its effect is
//!   committed, so a crash or a database outage never loses one (the broker
//!   redelivers; applying a report twice changes nothing).

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{ApiError, App, CommandRequest, Counters, ReplyTo};
use protocol::envelope::{decode_one_or_many, Presence, ReceiverStatus, Report};
use receiver::mqtt::{client, ClientSpec};

/// MQTT submissions handled at once; more wait for a permit in their own task.
const SUBMISSION_CONCURRENCY: usize = 256;
/// Pause after a connection error before polling (and so reconnecting) again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Opens the main connection; the client is what `App` publishes with.
pub fn main_client(host: &str, port: u16, instance: &str) -> (AsyncClient, EventLoop) {
    client(
        host,
        port,
        ClientSpec {
            client_id: format!("{instance}-main"),
            clean_session: true,
            manual_acks: false,
            last_will: None,
        },
    )
}

/// Starts the tasks that serve both connections.
pub fn spawn(
    app: App,
    main_loop: EventLoop,
    host: &str,
    port: u16,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let (reports_client, reports_loop) = client(
        host,
        port,
        ClientSpec {
            client_id: format!("{}-reports", app.config().instance_id),
            clean_session: false,
            manual_acks: true,
            last_will: None,
        },
    );
    // Unbounded on purpose. The polling task must never wait on the applier: the
    // applier's acks go through rumqttc's request channel, which only that
    // polling task drains — a bounded queue here deadlocked both (seen with
    // Mosquitto at max_inflight_messages 1000). It is still bounded: reports
    // are acked only after they are applied, so at most the broker's in-flight
    // window of them (rumqttd 100; Mosquitto's max_inflight_messages, ≤ 65535)
    // can be unacknowledged, queued here or in the applier.
    let (tx, rx) = mpsc::unbounded_channel();
    let filters =
        vec![app.topics().submit(), app.topics().presence_filter(), app.topics().receiver_status_filter()];
    tasks.spawn(poll(main_loop, app.mqtt().clone(), filters, Incoming::Main(app.clone()), shutdown.clone()));
    let filters = vec![app.topics().reports()];
    tasks.spawn(poll(reports_loop, reports_client.clone(), filters, Incoming::Reports(tx), shutdown.clone()));
    tasks.spawn(apply_reports(app, reports_client, rx, shutdown.clone()));
}

/// Where a connection's incoming publishes go.
enum Incoming {
    Main(App),
    Reports(mpsc::UnboundedSender<Publish>),
}

/// Polls one connection until shutdown, (re)subscribing on every connect.
async fn poll(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    incoming: Incoming,
    shutdown: CancellationToken,
) {
    let submissions = Arc::new(Semaphore::new(SUBMISSION_CONCURRENCY));
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Subscribing from this task could deadlock on a full request channel.
                let (client, filters, shutdown) = (client.clone(), filters.clone(), shutdown.clone());
                let app = match &incoming {
                    Incoming::Main(app) => Some(app.clone()),
                    Incoming::Reports(_) => None,
                };
                tokio::spawn(async move {
                    for f in filters {
                        if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(filter = %f, error = %e, "subscribe failed");
                        }
                    }
                    if let Some(app) = app {
                        roll_call(&app, &client, &shutdown).await;
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => match &incoming {
                Incoming::Reports(tx) => {
                    if tx.send(publish).is_err() {
                        break;
                    }
                }
                Incoming::Main(app) => dispatch_main(app, publish, &submissions).await,
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "MQTT connection error; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
    }
    let _ = client.disconnect().await;
}

/// After the subscriptions (same connection, so the broker sees them first):
/// receivers answer with their status and the presence of every device they
/// hold; after the grace period, devices of receivers that did not answer are
/// marked offline.
async fn roll_call(app: &App, client: &AsyncClient, shutdown: &CancellationToken) {
    let round = app.start_rollcall();
    if let Err(e) = client.publish(app.topics().rollcall(), QoS::AtLeastOnce, false, &b"{}"[..]).await {
        tracing::warn!(error = %e, "roll call failed");
        return;
    }
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_millis(app.config().rollcall_grace_ms)) => {}
    }
    if let Err(e) = app.finish_rollcall(round).await {
        tracing::warn!(error = %e, "could not mark the devices of silent receivers offline");
    }
}

async fn dispatch_main(app: &App, publish: Publish, submissions: &Arc<Semaphore>) {
    let topic = publish.topic.as_str();
    if topic == app.topics().submit() {
        // The permit is awaited in the task, never here: the polling task must
        // not wait on work that itself waits on the polling task (replies go
        // through the request channel only it drains).
        let (app, submissions) = (app.clone(), submissions.clone());
        tokio::spawn(async move {
            let Ok(_permit) = submissions.acquire_owned().await else { return };
            handle_submission(&app, &publish.payload).await;
        });
    } else if topic.starts_with(&format!("{}/receivers/", app.topics().prefix())) {
        match serde_json::from_slice::<ReceiverStatus>(&publish.payload) {
            Ok(s) => log_store_error(app.apply_receiver_status(&s).await),
            Err(e) => tracing::warn!(%topic, error = %e, "malformed receiver status dropped"),
        }
    } else {
        match serde_json::from_slice::<Presence>(&publish.payload) {
            Ok(p) => log_store_error(app.apply_presence(&p).await),
            Err(e) => tracing::warn!(%topic, error = %e, "malformed presence dropped"),
        }
    }
}

fn log_store_error(r: Result<(), crate::store::StoreError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not record presence");
    }
}

/// An MQTT submission: the HTTP body plus `device_id`, `reply_to`, `correlation_id`.
/// Answered on `reply_to` once when accepted or rejected, once more when final.
async fn handle_submission(app: &App, payload: &[u8]) {
    let mut fields = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(fields)) => fields,
        _ => {
            Counters::bump(&app.counters().mqtt_submissions_dropped);
            tracing::warn!("MQTT submission is not a JSON object; dropped");
            return;
        }
    };
    let Some(Value::String(topic)) = fields.remove("reply_to") else {
        Counters::bump(&app.counters().mqtt_submissions_dropped);
        tracing::warn!("MQTT submission without reply_to; dropped");
        return;
    };
    let correlation_id = match fields.remove("correlation_id") {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let reply = ReplyTo { topic, correlation_id };
    let device_id = match fields.remove("device_id") {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    let outcome = match serde_json::from_value::<CommandRequest>(Value::Object(fields)) {
        Ok(req) if !device_id.is_empty() => app.submit(&device_id, &req, Some(&reply), false).await,
        Ok(_) => Err(ApiError::BadRequest("device_id is required".into())),
        Err(e) => Err(ApiError::BadRequest(format!("malformed request: {e}"))),
    };
    match outcome {
        Ok(submitted) => {
            let command = submitted.command;
            app.reply(&reply, "accepted", command.to_json()).await;
            // An idempotent repeat of a command that is already final gets its final answer now.
            if command.status.is_final() {
                app.reply(&reply, "final", command.to_json()).await;
            }
        }
        Err(e) => {
            let mut body = e.to_json();
            body["status_code"] = e.http_status().into();
            app.reply(&reply, "rejected", body).await;
        }
    }
}

/// A store transaction takes no more messages once it has this many reports
/// (a receiver's message may carry many).
const REPORT_BATCH: usize = 1024;

/// Applies reports in arrival order, in batches of what has arrived (one store
/// transaction each), acknowledging each only after its batch is committed.
async fn apply_reports(
    app: App,
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = rx.recv() => p,
        };
        let Some(mut next) = first else { return };
        let mut reports = Vec::new();
        loop {
            match decode_one_or_many::<Report>(&next.payload) {
                Ok(mut r) => reports.append(&mut r),
                Err(e) => {
                    Counters::bump(&app.counters().reports_malformed);
                    tracing::warn!(error = %e, "malformed reports message dropped");
                }
            }
            batch.push(next);
            if reports.len() >= REPORT_BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(p) => next = p,
                Err(_) => break,
            }
        }
        if !apply_until_committed(&app, &reports, &shutdown).await {
            return; // shutting down: not acked, so the broker redelivers them
        }
        // Acks go in the order the reports came (rumqttd disconnects on out-of-order acks).
        for publish in batch.drain(..) {
            if let Err(e) = client.ack(&publish).await {
                tracing::warn!(error = %e, "could not ack a report; the broker will redeliver it");
            }
        }
    }
}

/// Retries a batch's store write until it succeeds; false if shut down first.
async fn apply_until_committed(app: &App, reports: &[Report], shutdown: &CancellationToken) -> bool {
    let mut pause = Duration::from_millis(100);
    loop {
        match app.apply_reports(reports).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(reports = reports.len(), error = %e, "reports not applied yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}
