//! The receiver's MQTT side: one connection, the table of connected devices,
//! and routing of commands to the connection task that owns each device.
//! Every report about a command goes out through here ([`Bridge::report`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumbing::memory::RecentIds;
use plumbing::mqtt::{client, Brokers, ClientSpec, Session};
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::{Config, Counters};
use protocol::envelope::{Cancel, CommandMessage, Presence, ReceiverStatus, Report, ReportKind};
use protocol::{DeviceId, Topics};

/// Commands queued for one device while its connection writes earlier ones.
/// When full, further commands are reported undeliverable (the gateway re-sends).
pub const DEVICE_QUEUE: usize = 128;

/// Handle to the MQTT side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: AsyncClient,
    topics: Topics,
    receiver_id: String,
    counters: Arc<Counters>,
    /// Connected devices. A std mutex: held for map lookups only, never across `.await`.
    devices: Mutex<HashMap<DeviceId, Slot>>,
    next_conn: AtomicU64,
    /// Recently canceled command ids, so queued copies are not written.
    canceled: Mutex<RecentIds<Uuid>>,
    /// Serialised reports for the task that publishes them, several per message.
    reports: mpsc::UnboundedSender<Vec<u8>>,
    /// The command subscription of the current broker connection is made (a
    /// clean session loses it with the connection).
    subscribed: AtomicBool,
    shutdown: CancellationToken,
}

/// A reports message carries at most this many reports…
const REPORTS_PER_MESSAGE: usize = 256;
/// …and stops taking more once its body is this large (one report always goes).
const REPORT_MESSAGE_BYTES: usize = 256 * 1024;

/// Canceled ids remembered, oldest forgotten first.
const CANCELED_MEMORY: usize = 4096;

#[derive(Debug)]
struct Slot {
    conn: u64,
    tx: mpsc::Sender<CommandMessage>,
}

/// A device's registration, held by its connection task.
#[derive(Debug)]
pub struct Attached {
    /// Which registration this is; pass it back to [`Bridge::detach`].
    pub conn: u64,
    /// The device's commands, in order ([`DEVICE_QUEUE`] at most); closed
    /// when a newer registration of the same device takes over.
    pub commands: mpsc::Receiver<CommandMessage>,
}

impl Bridge {
    pub(crate) fn start(
        config: &Config,
        brokers: &Brokers,
        counters: Arc<Counters>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Bridge {
        let topics = Topics::new(config.topic_prefix.clone());
        let gone = ReceiverStatus { receiver_id: config.receiver_id.clone(), online: false };
        let will = LastWill::new(
            topics.receiver_status(&config.receiver_id),
            serde_json::to_vec(&gone).expect("serialisable"),
            QoS::AtLeastOnce,
            false,
        );
        let spec = ClientSpec {
            client_id: config.receiver_id.clone(),
            clean_session: true,
            manual_acks: false,
            last_will: Some(will),
        };
        let (client, eventloop) = client(brokers, spec);
        let (reports, queued) = mpsc::unbounded_channel();
        tasks.spawn(publish_reports(client.clone(), topics.reports(), queued, shutdown.clone()));
        let bridge = Bridge {
            inner: Arc::new(Inner {
                client,
                topics,
                receiver_id: config.receiver_id.clone(),
                counters,
                devices: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                canceled: Mutex::new(RecentIds::new(CANCELED_MEMORY)),
                reports,
                subscribed: AtomicBool::new(false),
                shutdown: shutdown.clone(),
            }),
        };
        tasks.spawn(bridge.clone().poll(eventloop, brokers.clone(), shutdown.clone()));
        bridge
    }

    /// This receiver's id (its commands topic, its presence reports).
    pub fn receiver_id(&self) -> &str {
        &self.inner.receiver_id
    }

    /// Ids of the devices connected now.
    pub fn connected(&self) -> Vec<DeviceId> {
        self.inner.devices.lock().expect("devices lock").keys().cloned().collect()
    }

    /// Registers a device's connection (replacing an older one of the same
    /// device) so that its commands are routed to it, and reports it online.
    pub async fn attach(&self, device_id: &DeviceId) -> Attached {
        let (tx, commands) = mpsc::channel(DEVICE_QUEUE);
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        // Dropping the old slot's sender tells the older connection task to end.
        self.inner.devices.lock().expect("devices lock").insert(device_id.clone(), Slot { conn, tx });
        // Until this receiver's command subscription is made (after each
        // connect), its presence waits: `announce` reports every device held then.
        if self.inner.subscribed.load(Ordering::SeqCst) {
            self.presence(device_id, true).await;
        }
        Attached { conn, commands }
    }

    /// Unregisters a connection if it is still the device's current one.
    pub async fn detach(&self, device_id: &DeviceId, conn: u64) {
        let removed = {
            let mut devices = self.inner.devices.lock().expect("devices lock");
            let current = devices.get(device_id).is_some_and(|s| s.conn == conn);
            current && devices.remove(device_id).is_some()
        };
        if removed {
            self.presence(device_id, false).await;
        }
    }

    /// Whether the gateway canceled this command (then it must not be written).
    pub fn is_canceled(&self, id: Uuid) -> bool {
        self.inner.canceled.lock().expect("canceled lock").contains(&id)
    }

    /// Why a command must not be written to its device now, if it must not:
    /// the gateway canceled it, or its deadline passed.
    pub fn refusal(&self, cmd: &CommandMessage) -> Option<&'static str> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        if self.is_canceled(cmd.id) {
            Some("canceled before delivery")
        } else if cmd.expires_at_ms <= now {
            Some("deadline passed before delivery")
        } else {
            None
        }
    }

    /// Every transport asks this right before writing: true, with `cmd`
    /// reported undeliverable, when it must not be written now (see [`Bridge::refusal`]).
    pub async fn refused(&self, cmd: &CommandMessage) -> bool {
        let Some(reason) = self.refusal(cmd) else { return false };
        self.undeliverable(cmd.id, &cmd.device_id, reason).await;
        true
    }

    /// Counts a command that could not be written and reports it undeliverable.
    pub async fn undeliverable(&self, command_id: Uuid, device_id: &DeviceId, reason: impl Into<String>) {
        self.inner.counters.undeliverable.inc();
        self.report(command_id, device_id, ReportKind::Undeliverable { reason: reason.into() }).await;
    }

    /// Counts a device's answer and reports it (`code` 0 is success).
    pub async fn result(&self, command_id: Uuid, device_id: &DeviceId, code: i32, payload: Vec<u8>) {
        self.inner.counters.results_forwarded.inc();
        self.report(command_id, device_id, ReportKind::Result { code, payload_base64: payload }).await;
    }

    /// Queues a report about a command for the gateway; reports go out in the
    /// order they were queued, joined into one message when several are ready.
    pub async fn report(&self, command_id: Uuid, device_id: &DeviceId, kind: ReportKind) {
        match &kind {
            ReportKind::Delivered => tracing::debug!(%command_id, %device_id, "report: delivered"),
            ReportKind::Result { code, .. } => {
                tracing::debug!(%command_id, %device_id, code, "report: result")
            }
            ReportKind::Undeliverable { reason } => {
                tracing::debug!(%command_id, %device_id, %reason, "report: undeliverable")
            }
        }
        let report = Report {
            command_id,
            device_id: device_id.clone(),
            receiver_id: self.inner.receiver_id.clone(),
            kind,
        };
        let body = serde_json::to_vec(&report).expect("serialisable");
        if self.inner.reports.send(body).is_err() {
            tracing::warn!(%command_id, %device_id, "shutting down; report not published");
        }
    }

    async fn presence(&self, device_id: &DeviceId, online: bool) {
        let p =
            Presence { device_id: device_id.clone(), receiver_id: self.inner.receiver_id.clone(), online };
        let body = serde_json::to_vec(&p).expect("serialisable");
        let topic = self.inner.topics.presence(device_id.as_str());
        match publish_until_shutdown(&self.inner.client, topic, body, &self.inner.shutdown).await {
            Ok(()) => {}
            // The goodbye's ReceiverStatus covers every device.
            Err(e) if self.inner.shutdown.is_cancelled() => {
                tracing::debug!(%device_id, error = %e, "presence not published")
            }
            Err(e) => tracing::warn!(%device_id, error = %e, "could not publish presence"),
        }
    }

    /// After every (re)connect: subscribe again (a clean session forgets
    /// subscriptions), then say we are here and re-announce every device.
    async fn announce(self) {
        let topics = &self.inner.topics;
        let filters =
            [topics.receiver_commands(&self.inner.receiver_id), topics.cancels(), topics.rollcall()];
        plumbing::mqtt::subscribe_all(&self.inner.client, &filters).await;
        // Queued after the subscriptions on the same connection, so the broker
        // has them before any gateway hears of a device here.
        self.inner.subscribed.store(true, Ordering::SeqCst);
        self.report_presence().await;
    }

    /// Says this receiver is here and which devices it holds (after a connect,
    /// and whenever a gateway asks on the roll-call topic: presence published
    /// while no gateway was subscribed is otherwise lost).
    async fn report_presence(self) {
        let status = ReceiverStatus { receiver_id: self.inner.receiver_id.clone(), online: true };
        let topic = self.inner.topics.receiver_status(&self.inner.receiver_id);
        let body = serde_json::to_vec(&status).expect("serialisable");
        if let Err(e) = self.inner.client.publish(topic, QoS::AtLeastOnce, false, body).await {
            tracing::warn!(error = %e, "could not publish receiver status");
        }
        for device_id in self.connected() {
            self.presence(&device_id, true).await;
        }
    }

    /// Hands a command to its device's connection task, or reports why not.
    fn route(&self, msg: CommandMessage) {
        let _route =
            tracing::debug_span!("route", command_id = %msg.id, device_id = %msg.device_id).entered();
        tracing::debug!(attempt = msg.attempt, "command from MQTT");
        let refused = {
            let devices = self.inner.devices.lock().expect("devices lock");
            match devices.get(&msg.device_id) {
                None => Some((msg, "device not connected to this receiver")),
                Some(slot) => match slot.tx.try_send(msg) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(msg)) => Some((msg, "device queue full")),
                    Err(mpsc::error::TrySendError::Closed(msg)) => Some((msg, "device connection closing")),
                },
            }
        };
        let Some((msg, reason)) = refused else {
            tracing::debug!("queued for its device");
            return;
        };
        self.inner.counters.undeliverable.inc();
        let bridge = self.clone();
        // Not from the polling task: a full request channel would deadlock it.
        tokio::spawn(async move {
            let kind = ReportKind::Undeliverable { reason: reason.into() };
            bridge.report(msg.id, &msg.device_id, kind).await;
        });
    }

    /// Routes a commands message, records a cancel, or answers a roll call.
    fn on_publish(&self, p: &Publish) {
        if p.topic == self.inner.topics.rollcall() {
            // Not from the polling task: a full request channel would deadlock it.
            tokio::spawn(self.clone().report_presence());
            return;
        }
        if p.topic == self.inner.topics.cancels() {
            match serde_json::from_slice::<Cancel>(&p.payload) {
                Ok(c) => {
                    tracing::debug!(command_id = %c.command_id, device_id = %c.device_id, "cancel received");
                    self.inner.canceled.lock().expect("canceled lock").insert(c.command_id, ());
                }
                Err(e) => tracing::warn!(error = %e, "malformed cancel dropped"),
            }
            return;
        }
        match protocol::envelope::decode_one_or_many::<CommandMessage>(&p.payload) {
            Ok(messages) => messages.into_iter().for_each(|msg| self.route(msg)),
            Err(e) => tracing::warn!(topic = %p.topic, error = %e, "malformed command message dropped"),
        }
    }

    /// Drives the MQTT connection (over `brokers`, see [`plumbing::mqtt::drive`])
    /// until shutdown, then says goodbye.
    async fn poll(
        mut self,
        mut eventloop: rumqttc::EventLoop,
        brokers: Brokers,
        shutdown: CancellationToken,
    ) {
        plumbing::mqtt::drive(&mut eventloop, &brokers, &mut self, &shutdown).await;
        // A clean goodbye: the gateway marks every device of this receiver offline
        // now rather than at the keepalive. One message, what the last will would
        // have said (a clean disconnect suppresses the will), not one per device:
        // with 10,000 devices those filled the request channel while nothing
        // polled it, and the receiver hung on its way out.
        let gone = ReceiverStatus { receiver_id: self.inner.receiver_id.clone(), online: false };
        let body = serde_json::to_vec(&gone).expect("serialisable");
        let topic = self.inner.topics.receiver_status(&self.inner.receiver_id);
        let client = self.inner.client.clone();
        let farewell = async move {
            if let Err(e) = client.publish(topic, QoS::AtLeastOnce, false, body).await {
                tracing::warn!(error = %e, "could not say goodbye");
            }
            let _ = client.disconnect().await;
        };
        // Polled meanwhile: the request queue may be full (devices that went away
        // just before), and only polling drains it.
        let drive = async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(farewell, drive) })
            .await
            .is_err()
        {
            tracing::warn!("the goodbye did not leave within 2 s; the broker's last will says it instead");
        }
    }
}

/// The bridge's side of [`plumbing::mqtt::drive`]: runs on the polling task,
/// so anything that publishes or subscribes is spawned.
impl Session for Bridge {
    fn connected(&mut self) {
        // `drive` logs the connection, with its broker.
        tokio::spawn(self.clone().announce());
    }

    async fn received(&mut self, publish: Publish) -> bool {
        self.on_publish(&publish);
        true
    }

    fn disconnected(&mut self, _error: &ConnectionError) {
        self.inner.subscribed.store(false, Ordering::SeqCst);
    }
}

/// Publishes queued reports until shutdown, then what is still queued: each
/// message takes every report ready at that moment (up to a size), so under
/// load one message and one broker round trip carry many reports, and alone a
/// report goes out at once.
async fn publish_reports(
    client: AsyncClient,
    topic: String,
    mut queued: mpsc::UnboundedReceiver<Vec<u8>>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            report = queued.recv() => report,
            _ = shutdown.cancelled() => None,
        };
        let Some(first) = first else { return };
        let mut bytes = first.len();
        batch.push(first);
        // Let the device tasks that are ready run first, so their reports join this message.
        tokio::task::yield_now().await;
        while batch.len() < REPORTS_PER_MESSAGE && bytes < REPORT_MESSAGE_BYTES {
            let Ok(next) = queued.try_recv() else { break };
            bytes += next.len();
            batch.push(next);
        }
        let body = protocol::envelope::join_messages(&batch);
        if let Err(e) = publish_until_shutdown(&client, topic.clone(), body, &shutdown).await {
            tracing::warn!(reports = batch.len(), error = %e, "could not publish reports");
        }
        batch.clear();
    }
}

/// A QoS 1 publish that gives up once shutdown has begun and rumqttc's request
/// channel is full: after shutdown nothing drains that channel for long (the
/// polling task says goodbye and stops), so a plain `publish().await` could
/// wait forever and keep the receiver from exiting. What is dropped so is
/// re-sent by the gateway after its ack timeout (devices answer a repeated id
/// from memory).
async fn publish_until_shutdown(
    client: &AsyncClient,
    topic: String,
    body: Vec<u8>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    tokio::select! {
        biased;
        done = client.publish(topic, QoS::AtLeastOnce, false, body) => done.map_err(|e| e.to_string()),
        _ = shutdown.cancelled() => Err("shutting down, and the MQTT request queue is full".to_owned()),
    }
}
