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

mod submissions;

use std::sync::Arc;

use plumbing::mqtt::{client, drive, subscribe_all, Brokers, ClientSpec, Session};
use rumqttc::{AsyncClient, EventLoop, Publish};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::presence::roll_call;
use crate::store::StoreError;
use protocol::envelope::{FinalNotice, Presence, ReceiverStatus};

/// MQTT submissions handled at once; more wait for a permit in their own task.
const SUBMISSION_CONCURRENCY: usize = 256;

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
    let mut main = MainSession {
        app: app.clone(),
        submissions: Arc::new(Semaphore::new(SUBMISSION_CONCURRENCY)),
        shutdown: shutdown.clone(),
    };
    let (stop, brokers) = (shutdown.clone(), broker.clone());
    tasks.spawn(async move {
        drive(&mut main_loop, &brokers, &mut main, &stop).await;
        let _ = main.app.mqtt().disconnect().await;
    });
    let mut reports = ReportsSession {
        client: reports_client.clone(),
        // The shared topic carries reports of messages that named no
        // `reports_to` (older gateways); every instance takes those.
        filters: vec![app.topics().instance_reports(app.instance_id()), app.topics().reports()],
        applier: tx,
    };
    let (stop, brokers) = (shutdown.clone(), broker.clone());
    tasks.spawn(async move {
        drive(&mut reports_loop, &brokers, &mut reports, &stop).await;
        let _ = reports.client.disconnect().await;
    });
    tasks.spawn(crate::reports::apply_until_shutdown(app, reports_client, rx, shutdown.clone()));
}

/// The main connection: submissions, presence, receiver status.
struct MainSession {
    app: App,
    submissions: Arc<Semaphore>,
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
            roll_call(&app, app.mqtt(), &shutdown).await;
        });
    }

    async fn received(&mut self, publish: Publish) -> bool {
        let app = &self.app;
        let topic = publish.topic.as_str();
        if topic == app.topics().submit() {
            // The permit is awaited in the task, never here: the polling task must
            // not wait on work that itself waits on the polling task (replies go
            // through the request channel only it drains).
            let (app, submissions) = (app.clone(), self.submissions.clone());
            tokio::spawn(async move {
                let Ok(_permit) = submissions.acquire_owned().await else { return };
                submissions::handle(&app, &publish.payload, publish.retain).await;
            });
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
                Err(e) => tracing::warn!(%topic, error = %e, "malformed final notice dropped"),
            }
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
        true
    }
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
}

impl Session for ReportsSession {
    fn connected(&mut self) {
        let (client, filters) = (self.client.clone(), self.filters.clone());
        tokio::spawn(async move { subscribe_all(&client, &filters).await });
    }

    async fn received(&mut self, publish: Publish) -> bool {
        self.applier.send(publish).is_ok()
    }
}
