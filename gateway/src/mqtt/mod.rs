//! The gateway's two MQTT connections and the tasks that poll them.
//!
//! - **main**: publishes commands and replies; takes MQTT submissions
//!   ([`submissions`]), presence and receiver status. Persistent session
//!   (submissions published while it reconnects wait for it), automatic acks.
//! - **reports**: takes delivery reports and results from receivers and
//!   hands them to the applier (`reports`): those of the attempts this
//!   instance published (its own topic, `Topics::instance_reports`), so each
//!   report is applied once on any broker, with or without shared
//!   subscriptions. Manual acks: a report is acknowledged only after its
//!   effect is committed. Persistent session: reports that arrive while it
//!   reconnects wait at the broker.
//!
//! Both sessions of an instance that died stay at the broker until another
//! instance sees its heartbeat stale and clears them (`instance::forget_dead`),
//! so instances that come and go leave nothing behind.
//!
//! The main connection also takes other instances' final notices
//! (`Topics::finals`) and wakes the callers waiting here.
//!
//! Each connection sets its flag in `App::lifecycle` (what `/readyz` calls
//! `broker`) once its subscriptions are made, and clears it when it drops;
//! at shutdown each sends DISCONNECT before its task ends.

mod submissions;

use std::sync::Arc;

use plumbing::health::Flag;
use plumbing::mqtt::{client, drive, subscribe_all, Brokers, ClientSpec, Session};
use rumqttc::{AsyncClient, ConnectionError, EventLoop, Publish};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::presence::roll_call;
use crate::provenance::{sent_by, Verified};
use crate::store::StoreError;
use protocol::envelope::{FinalNotice, Presence, ReceiverStatus};
use protocol::DeviceId;

/// MQTT submissions handled at once; more wait in the submission queue
/// (`--mqtt-submission-queue`), and past that are refused.
const SUBMISSION_CONCURRENCY: usize = 256;
/// Refusals of submissions that found the queue full, waiting to be sent
/// (each records its refusal in the store, then replies); past it, a
/// submission is dropped unanswered (`gateway_mqtt_submissions_shed_total`).
const REFUSAL_QUEUE: usize = 256;
/// At shutdown, how long each connection's DISCONNECT may take to leave.
const GOODBYE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the main connection; the client is what `App` publishes with.
pub fn main_client(broker: &Brokers, instance: &str) -> (AsyncClient, EventLoop) {
    let spec = ClientSpec {
        client_id: format!("{instance}-main"),
        // Persistent: submissions published while the connection is down
        // (a broker node failing over) wait for it at the broker. A dead
        // instance's sessions are cleared by the others (`instance::forget_dead`).
        clean_session: false,
        manual_acks: false,
        last_will: None,
    };
    client(broker, spec)
}

/// Starts the tasks that serve both connections.
pub fn spawn(
    app: App,
    mut main_loop: EventLoop,
    broker: &Brokers,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let spec = ClientSpec {
        client_id: format!("{}-reports", app.instance_id()),
        clean_session: false,
        manual_acks: true,
        last_will: None,
    };
    let (reports_client, mut reports_loop) = client(broker, spec);
    // Unbounded on purpose. The polling task must never wait on the applier: the
    // applier's acks go through rumqttc's request channel, which only that
    // polling task drains — a bounded queue here deadlocked both (seen with
    // Mosquitto at max_inflight_messages 1000). It is still bounded: reports
    // are acked only after they are applied, so at most the broker's in-flight
    // window of them (rumqttd 100; Mosquitto's max_inflight_messages, ≤ 65535)
    // can be unacknowledged, queued here or in the applier.
    let (tx, rx) = mpsc::unbounded_channel();
    let queue = usize::try_from(app.config().mqtt_submission_queue).unwrap_or(usize::MAX);
    let (submissions, queued) = mpsc::channel(queue.min(1 << 20));
    let (refusals, refused) = mpsc::channel(REFUSAL_QUEUE);
    tasks.spawn(handle_submissions(app.clone(), queued, tasks.clone()));
    tasks.spawn(refuse_submissions(app.clone(), refused));
    let mut main = MainSession { app: app.clone(), submissions, refusals, shutdown: shutdown.clone() };
    let (stop, brokers) = (shutdown.clone(), broker.clone());
    tasks.spawn(async move {
        drive(&mut main_loop, &brokers, &mut main, &stop).await;
        main.app.lifecycle().broker_main.set(false);
        plumbing::mqtt::disconnect(main.app.mqtt(), &mut main_loop, GOODBYE_WITHIN).await;
    });
    let mut reports = ReportsSession {
        client: reports_client.clone(),
        // The shared topic carries reports of messages that named no
        // `reports_to` (older gateways); every instance takes those.
        filters: vec![app.topics().instance_reports(app.instance_id()), app.topics().reports()],
        applier: tx,
        up: app.lifecycle().broker_reports.clone(),
    };
    let (stop, brokers) = (shutdown.clone(), broker.clone());
    tasks.spawn(async move {
        drive(&mut reports_loop, &brokers, &mut reports, &stop).await;
        reports.up.set(false);
        plumbing::mqtt::disconnect(&reports.client, &mut reports_loop, GOODBYE_WITHIN).await;
    });
    tasks.spawn(crate::reports::apply_until_shutdown(app, reports_client, rx, shutdown.clone()));
}

/// Takes queued MQTT submissions, up to `SUBMISSION_CONCURRENCY` at once, each
/// in its own task; the next is taken from the queue only when one is done, so
/// what waits is in the bounded queue. Ends when the main session is gone.
async fn handle_submissions(app: App, mut queued: mpsc::Receiver<Publish>, tasks: TaskTracker) {
    let slots = Arc::new(Semaphore::new(SUBMISSION_CONCURRENCY));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(publish) = queued.recv().await else { return };
        let app = app.clone();
        tasks.spawn(async move {
            submissions::handle(&app, &publish.payload, publish.retain).await;
            drop(slot);
        });
    }
}

/// Answers, one at a time, the submissions that found the queue full.
async fn refuse_submissions(app: App, mut refused: mpsc::Receiver<Publish>) {
    let queue = app.config().mqtt_submission_queue;
    while let Some(publish) = refused.recv().await {
        submissions::refuse_overloaded(&app, &publish.payload, queue).await;
    }
}

/// The main connection: submissions, presence, receiver status.
struct MainSession {
    app: App,
    /// The bounded queue of submissions (`handle_submissions` takes them).
    submissions: mpsc::Sender<Publish>,
    /// Submissions refused for a full queue, to be answered (`refuse_submissions`).
    refusals: mpsc::Sender<Publish>,
    shutdown: CancellationToken,
}

impl Session for MainSession {
    fn connected(&mut self) {
        let topics = self.app.topics();
        let filters =
            vec![topics.submit(), topics.presence_filter(), topics.receiver_status_filter(), topics.finals()];
        let (app, shutdown) = (self.app.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            subscribe_all(app.mqtt(), &filters).await;
            app.lifecycle().broker_main.set(true);
            roll_call(&app, app.mqtt(), &shutdown).await;
        });
    }

    fn disconnected(&mut self, _error: &ConnectionError) {
        self.app.lifecycle().broker_main.set(false);
    }

    async fn received(&mut self, publish: Publish) -> bool {
        let app = &self.app;
        let topic = publish.topic.as_str();
        if topic == app.topics().submit() {
            // Never waits here: the polling task must not wait on work that
            // itself waits on the polling task (replies go through the request
            // channel only it drains). A full queue is a refusal, not a wait.
            match self.submissions.try_send(publish) {
                Ok(()) => {}
                Err(TrySendError::Full(publish)) => {
                    app.metrics().mqtt_submissions_overloaded.inc();
                    if self.refusals.try_send(publish).is_err() {
                        app.metrics().mqtt_submissions_shed.inc();
                        tracing::debug!("MQTT submission queue and refusal queue full; submission dropped");
                    }
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        } else if topic == app.topics().finals() {
            match serde_json::from_slice::<FinalNotice>(&publish.payload) {
                Ok(notice) if notice.instance_id != app.instance_id() => {
                    if app.waiters().is_waited_for(notice.command_id) {
                        // A store read: not on the polling task.
                        let app = app.clone();
                        tokio::spawn(async move { app.wake_waiters(notice.command_id).await });
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(?topic, error = %e, "malformed final notice dropped"),
            }
        } else if topic.starts_with(&format!("{}/receivers/", app.topics().prefix())) {
            // A goodbye (or last will) is signed when the receiver connected:
            // checked for replay by its session (`apply_receiver_status`), not its age.
            let will = |body: &[u8]| serde_json::from_slice::<ReceiverStatus>(body).is_ok_and(|s| !s.online);
            let Some(verified) = app.provenance().open("receiver_status", topic, &publish.payload, will)
            else {
                return true;
            };
            match serde_json::from_slice::<ReceiverStatus>(verified.body) {
                Ok(s) if !valid_status(&s) => {
                    app.provenance().refuse_invalid_receiver("receiver_status", topic, &s.receiver_id)
                }
                Ok(s)
                    if sent_by(&verified, &s.receiver_id)
                        && topic == app.topics().receiver_status(&s.receiver_id) =>
                {
                    log_store_error(app.apply_receiver_status(&s).await)
                }
                Ok(s) => refuse_claim(app, "receiver_status", topic, &s.receiver_id, &verified),
                Err(e) => tracing::warn!(?topic, error = %e, "malformed receiver status dropped"),
            }
        } else {
            let Some(verified) = app.provenance().open("presence", topic, &publish.payload, |_| false) else {
                return true;
            };
            match serde_json::from_slice::<Presence>(verified.body) {
                Ok(p) if !DeviceId::is_valid(&p.receiver_id) => {
                    app.provenance().refuse_invalid_receiver("presence", topic, &p.receiver_id)
                }
                Ok(p) if !sent_by(&verified, &p.receiver_id) => {
                    refuse_claim(app, "presence", topic, &p.receiver_id, &verified)
                }
                Ok(p) if !app.receiver_limits().allow_presence(&p.receiver_id) => {}
                Ok(p) => log_store_error(app.apply_presence(&p).await),
                Err(e) => tracing::warn!(?topic, error = %e, "malformed presence dropped"),
            }
        }
        true
    }
}

/// Longest receiver session name accepted (the receiver makes 32 hex digits).
const MAX_SESSION_LEN: usize = 64;

/// A receiver status whose receiver id follows the id rules (it is stored
/// and goes into topic names) and whose session is of sane length.
fn valid_status(s: &ReceiverStatus) -> bool {
    DeviceId::is_valid(&s.receiver_id) && s.session.as_ref().is_none_or(|v| v.len() <= MAX_SESSION_LEN)
}

/// A message signed by one receiver that speaks for another (or on another's topic).
fn refuse_claim(app: &App, message: &str, topic: &str, claimed: &str, verified: &Verified<'_>) {
    let why = format!("names receiver {claimed:?}, signed by {:?}", verified.from);
    app.provenance().refuse(message, "wrong_sender", topic, &why);
}

fn log_store_error(r: Result<(), StoreError>) {
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not record presence");
    }
}

/// The reports connection: every publish goes to the applier.
struct ReportsSession {
    client: AsyncClient,
    filters: Vec<String>,
    applier: mpsc::UnboundedSender<Publish>,
    /// Connected with its subscriptions made (`/readyz`).
    up: Flag,
}

impl Session for ReportsSession {
    fn connected(&mut self) {
        let (client, filters, up) = (self.client.clone(), self.filters.clone(), self.up.clone());
        tokio::spawn(async move {
            subscribe_all(&client, &filters).await;
            up.set(true);
        });
    }

    async fn received(&mut self, publish: Publish) -> bool {
        self.applier.send(publish).is_ok()
    }

    fn disconnected(&mut self, _error: &ConnectionError) {
        self.up.set(false);
    }
}
