//! The receiver's MQTT side: one connection, the table of connected devices,
//! and routing of commands to the connection task that owns each device.
//! Every report about a command goes out through here ([`Bridge::report`]),
//! to the topic its command's message named (`reports_to`: the gateway
//! instance that published the attempt) or, when it named none, to the
//! shared reports topic.

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

use crate::provenance::Provenance;
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
    /// Largest device answer forwarded (`Config::max_result_bytes`).
    max_result: usize,
    counters: Arc<Counters>,
    /// Connected devices. A std mutex: held for map lookups only, never across `.await`.
    devices: Mutex<HashMap<DeviceId, Slot>>,
    next_conn: AtomicU64,
    /// Which commands were canceled and which were written: one lock, so a
    /// cancel and a write of the same command are ordered (see [`Cancels`]).
    cancels: Mutex<Cancels>,
    /// Where the reports of each command routed here go, for commands whose
    /// message named a `reports_to` (the others' go to the shared topic). Set
    /// when a command is routed to its device (a re-send from another gateway
    /// instance moves it), removed when the command is answered or refused;
    /// the bound forgets the oldest of those never answered (their device
    /// went away). A std mutex: held for one map operation, never across `.await`.
    destinations: Mutex<RecentIds<Uuid, Arc<str>>>,
    /// Serialised reports, with their topic, for the task that publishes
    /// them, several per message.
    reports: mpsc::UnboundedSender<Outgoing>,
    /// The command subscription of the current broker connection is made (a
    /// clean session loses it with the connection).
    subscribed: AtomicBool,
    shutdown: CancellationToken,
    /// Signs what is published, checks commands and cancels.
    provenance: Arc<Provenance>,
    /// This process's incarnation, in its statuses and last will.
    session: String,
    /// Roll calls being answered (`Bridge::answer_rollcall`). A std mutex,
    /// never held across an `.await`.
    rollcall: Mutex<RollCalls>,
}

/// Whether a roll call is being answered, and whether another came meanwhile.
#[derive(Debug, Default)]
struct RollCalls {
    answering: bool,
    again: bool,
}

/// A reports message carries at most this many reports, and at most
/// `protocol::limits::mqtt_message_limit(max_result_bytes)` bytes.
const REPORTS_PER_MESSAGE: usize = 256;

/// Least time between the starts of two roll-call answers (`Bridge::answer_rollcall`).
const ROLLCALL_SPACING: Duration = Duration::from_secs(1);

/// Canceled ids remembered, oldest forgotten first.
const CANCELED_MEMORY: usize = 4096;
/// Written ids remembered, oldest forgotten first (about 100 bytes each).
const WRITTEN_MEMORY: usize = 65_536;

/// The receiver's half of a cancel (PROTOCOL 4.5): a command is either
/// written to its device or canceled here, never both, and `undeliverable`
/// is never reported for a command this receiver has written — so a
/// gateway may take an `undeliverable` as proof that the device did not get
/// it from here.
#[derive(Debug)]
struct Cancels {
    /// Canceled ids; the value: whether `undeliverable` was reported for it.
    canceled: RecentIds<Uuid, bool>,
    /// Ids handed to a device transport for writing (whether or not the
    /// write then worked), with the device they were written to.
    written: RecentIds<Uuid, DeviceId>,
}

impl Cancels {
    /// A cancel came: true when it is this receiver's to confirm (its device
    /// is here, it never wrote it, nobody confirmed yet).
    fn cancel(&mut self, id: Uuid, device_here: bool) -> bool {
        let confirm = device_here && !self.written.contains(&id);
        if !self.canceled.contains(&id) || confirm {
            self.canceled.insert(id, confirm);
        }
        confirm
    }

    /// A transport is about to write `id`: `None` to go ahead (it is now
    /// written), or why not and whether that still needs reporting.
    fn take(&mut self, id: Uuid, device_id: &DeviceId) -> Option<bool> {
        match self.canceled.get(&id).copied() {
            Some(reported) => {
                let report = !reported && !self.written.contains(&id);
                if report {
                    self.canceled.insert(id, true);
                }
                Some(report)
            }
            None => {
                self.written.insert(id, device_id.clone());
                None
            }
        }
    }
}

/// Commands whose reports' topic is remembered at once (about 100 bytes
/// each). Past it the oldest entry goes, and that command's reports, if any
/// still come, go to the shared topic.
const DESTINATION_MEMORY: usize = 65_536;

/// A report on its way to the publisher.
#[derive(Debug)]
struct Outgoing {
    /// Its topic; `None`: the shared `Topics::reports`.
    to: Option<Arc<str>>,
    /// The JSON `Report`.
    body: Vec<u8>,
}

#[derive(Debug)]
struct Slot {
    conn: u64,
    tx: mpsc::Sender<CommandMessage>,
    /// The key generation the connection authenticated with, if it did.
    key_generation: Option<u32>,
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
        provenance: Arc<Provenance>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Bridge {
        let topics = Topics::new(config.topic_prefix.clone());
        let session = Uuid::now_v7().simple().to_string();
        let status_topic = topics.receiver_status(&config.receiver_id);
        let gone = status(&config.receiver_id, false, &session);
        let will = LastWill::new(
            status_topic.clone(),
            provenance.seal(&status_topic, gone),
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
        let message_limit = protocol::limits::mqtt_message_limit(config.max_result_bytes);
        tasks.spawn(publish_reports(
            client.clone(),
            topics.reports(),
            queued,
            (message_limit, provenance.clone()),
            shutdown.clone(),
        ));
        let bridge = Bridge {
            inner: Arc::new(Inner {
                client,
                topics,
                receiver_id: config.receiver_id.clone(),
                max_result: config.max_result_bytes,
                counters,
                devices: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
                cancels: Mutex::new(Cancels {
                    canceled: RecentIds::new(CANCELED_MEMORY),
                    written: RecentIds::new(WRITTEN_MEMORY),
                }),
                destinations: Mutex::new(RecentIds::new(DESTINATION_MEMORY)),
                reports,
                subscribed: AtomicBool::new(false),
                shutdown: shutdown.clone(),
                provenance,
                session,
                rollcall: Mutex::default(),
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
        self.attach_with_key(device_id, None).await.expect("an unauthenticated attach never loses")
    }

    /// [`Bridge::attach`] for a device that authenticated with key
    /// `key_generation` (reported in its presence); `None`, changing
    /// nothing, when its current connection here authenticated with a newer
    /// generation (an old key cannot take a device over from its new one).
    pub async fn attach_with_key(
        &self,
        device_id: &DeviceId,
        key_generation: Option<u32>,
    ) -> Option<Attached> {
        let (tx, commands) = mpsc::channel(DEVICE_QUEUE);
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut devices = self.inner.devices.lock().expect("devices lock");
            let newer = devices.get(device_id).and_then(|s| s.key_generation).zip(key_generation);
            if newer.is_some_and(|(current, offered)| current > offered) {
                return None;
            }
            // Dropping the old slot's sender tells the older connection task to end.
            devices.insert(device_id.clone(), Slot { conn, tx, key_generation });
        }
        // Until this receiver's command subscription is made (after each
        // connect), its presence waits: `announce` reports every device held then.
        if self.inner.subscribed.load(Ordering::SeqCst) {
            self.presence(device_id, true).await;
        }
        Some(Attached { conn, commands })
    }

    /// Whether the receiver is connected to the broker with its command
    /// subscriptions made (what `/readyz` calls `broker`).
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::SeqCst)
    }

    /// The key generation the device's current connection here authenticated with.
    pub fn key_generation(&self, device_id: &DeviceId) -> Option<u32> {
        self.inner.devices.lock().expect("devices lock").get(device_id).and_then(|s| s.key_generation)
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

    /// Whether a command was written to its device here (as far as the
    /// bounded memory of written ids reaches).
    pub fn was_written(&self, id: Uuid) -> bool {
        self.inner.cancels.lock().expect("cancels lock").written.contains(&id)
    }

    /// Whether command `id` was written here to `device_id` (on any of its
    /// connections, as far as the bounded memory of written ids reaches): a
    /// device answers only commands sent to it.
    pub fn written_to(&self, id: Uuid, device_id: &DeviceId) -> bool {
        self.inner.cancels.lock().expect("cancels lock").written.get(&id) == Some(device_id)
    }

    /// Every transport asks this right before writing: true when `cmd` must
    /// not be written — its deadline passed, or the gateway canceled it —
    /// with it reported undeliverable (to its own `reports_to`) unless that
    /// was done already. False: go ahead; from now on it counts as written.
    pub async fn refused(&self, cmd: &CommandMessage) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let reason = if cmd.expires_at_ms <= now {
            "deadline passed before delivery"
        } else {
            match self.inner.cancels.lock().expect("cancels lock").take(cmd.id, &cmd.device_id) {
                None => return false,
                Some(false) => {
                    tracing::debug!(command_id = %cmd.id, "canceled; not written");
                    return true;
                }
                Some(true) => "canceled before delivery",
            }
        };
        self.inner.counters.undeliverable.inc();
        self.take_destination(cmd.id);
        let kind = ReportKind::Undeliverable { reason: reason.into() };
        self.report_to(cmd.id, &cmd.device_id, kind, destination_of(cmd, &mut None)).await;
        true
    }

    /// Counts a command that could not be written and reports it undeliverable.
    pub async fn undeliverable(&self, command_id: Uuid, device_id: &DeviceId, reason: impl Into<String>) {
        self.inner.counters.undeliverable.inc();
        self.report(command_id, device_id, ReportKind::Undeliverable { reason: reason.into() }).await;
    }

    /// Counts a device's answer and reports it (`code` 0 is success); an
    /// answer larger than `--max-result-bytes` is reported as
    /// `result_too_large` instead, so that command fails at once.
    pub async fn result(&self, command_id: Uuid, device_id: &DeviceId, code: i32, payload: Vec<u8>) {
        let limit = self.inner.max_result;
        let kind = if payload.len() > limit {
            self.inner.counters.results_too_large.inc();
            tracing::warn!(%command_id, %device_id, size = payload.len(), limit, "device answer larger than --max-result-bytes; the command fails");
            ReportKind::ResultTooLarge { size: payload.len() as u64, limit: limit as u64 }
        } else {
            self.inner.counters.results_forwarded.inc();
            ReportKind::Result { code, payload_base64: payload }
        };
        self.report(command_id, device_id, kind).await;
    }

    /// Queues a report about a command for the gateway, on the topic the
    /// command's message named when it was routed here (the shared reports
    /// topic if it named none); reports go out in the order they were queued,
    /// those ready together for one topic joined into one message. A `result`
    /// or `undeliverable` ends the command here: its topic is forgotten.
    pub async fn report(&self, command_id: Uuid, device_id: &DeviceId, kind: ReportKind) {
        let to = match kind {
            ReportKind::Delivered | ReportKind::Queued => self.destination(command_id),
            _ => self.take_destination(command_id),
        };
        self.report_to(command_id, device_id, kind, to).await;
    }

    /// Queues a report for topic `to` (`None`: the shared reports topic).
    async fn report_to(
        &self,
        command_id: Uuid,
        device_id: &DeviceId,
        kind: ReportKind,
        to: Option<Arc<str>>,
    ) {
        if matches!(kind, ReportKind::Undeliverable { .. }) && self.was_written(command_id) {
            // An earlier copy reached the device: this one's refusal proves nothing.
            tracing::debug!(%command_id, %device_id, "undeliverable not reported: written here before");
            return;
        }
        match &kind {
            ReportKind::Delivered => tracing::debug!(%command_id, %device_id, "report: delivered"),
            ReportKind::Queued => tracing::debug!(%command_id, %device_id, "report: queued"),
            ReportKind::Result { code, .. } => {
                tracing::debug!(%command_id, %device_id, code, "report: result")
            }
            ReportKind::Undeliverable { reason } => {
                tracing::debug!(%command_id, %device_id, %reason, "report: undeliverable")
            }
            ReportKind::ResultTooLarge { size, limit } => {
                tracing::debug!(%command_id, %device_id, size, limit, "report: result too large")
            }
        }
        let report = Report {
            command_id,
            device_id: device_id.clone(),
            receiver_id: self.inner.receiver_id.clone(),
            kind,
        };
        let body = serde_json::to_vec(&report).expect("serialisable");
        if self.inner.reports.send(Outgoing { to, body }).is_err() {
            tracing::warn!(%command_id, %device_id, "shutting down; report not published");
        }
    }

    /// Where reports about `command_id` go now (`None`: the shared topic).
    fn destination(&self, command_id: Uuid) -> Option<Arc<str>> {
        self.inner.destinations.lock().expect("destinations lock").get(&command_id).cloned()
    }

    /// Forgets where reports about `command_id` go, returning it.
    fn take_destination(&self, command_id: Uuid) -> Option<Arc<str>> {
        let mut destinations = self.inner.destinations.lock().expect("destinations lock");
        let to = destinations.get(&command_id).cloned();
        destinations.forget(&command_id);
        to
    }

    /// Sets where reports about `command_id` go (`None`: the shared topic),
    /// returning what it replaces.
    fn set_destination(&self, command_id: Uuid, to: Option<Arc<str>>) -> Option<Arc<str>> {
        let mut destinations = self.inner.destinations.lock().expect("destinations lock");
        let previous = destinations.get(&command_id).cloned();
        destinations.forget(&command_id);
        if let Some(to) = to {
            destinations.insert(command_id, to);
        }
        previous
    }

    async fn presence(&self, device_id: &DeviceId, online: bool) {
        let key_generation = if online { self.key_generation(device_id) } else { None };
        let p = Presence {
            device_id: device_id.clone(),
            receiver_id: self.inner.receiver_id.clone(),
            online,
            key_generation,
        };
        let topic = self.inner.topics.presence(device_id.as_str());
        let body = self.inner.provenance.seal(&topic, serde_json::to_vec(&p).expect("serialisable"));
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
        let filters = [
            topics.receiver_commands(&self.inner.receiver_id),
            topics.receiver_cancels(&self.inner.receiver_id),
            topics.rollcall(),
        ];
        plumbing::mqtt::subscribe_all(&self.inner.client, &filters).await;
        // Queued after the subscriptions on the same connection, so the broker
        // has them before any gateway hears of a device here.
        self.inner.subscribed.store(true, Ordering::SeqCst);
        self.report_presence().await;
    }

    /// Answers a roll call — at most one at a time, and answers at least
    /// `ROLLCALL_SPACING` apart: roll calls that come while one is being
    /// answered (or within that spacing) make one more answer after it, not
    /// one each (20 roll calls in a row once cost 20 re-announcements of every
    /// device and delayed real presence changes by most of a minute).
    fn answer_rollcall(&self) {
        {
            let mut rollcall = self.inner.rollcall.lock().expect("rollcall lock");
            if rollcall.answering {
                rollcall.again = true;
                return;
            }
            rollcall.answering = true;
        }
        let bridge = self.clone();
        // Not from the polling task: a full request channel would deadlock it.
        tokio::spawn(async move {
            loop {
                let started = tokio::time::Instant::now();
                bridge.clone().report_presence().await;
                tokio::time::sleep_until(started + ROLLCALL_SPACING).await;
                let mut rollcall = bridge.inner.rollcall.lock().expect("rollcall lock");
                if !std::mem::take(&mut rollcall.again) {
                    rollcall.answering = false;
                    return;
                }
            }
        });
    }

    /// Says this receiver is here and which devices it holds (after a connect,
    /// and whenever a gateway asks on the roll-call topic: presence published
    /// while no gateway was subscribed is otherwise lost).
    async fn report_presence(self) {
        let topic = self.inner.topics.receiver_status(&self.inner.receiver_id);
        let body = status(&self.inner.receiver_id, true, &self.inner.session);
        let body = self.inner.provenance.seal(&topic, body);
        if let Err(e) = self.inner.client.publish(topic, QoS::AtLeastOnce, false, body).await {
            tracing::warn!(error = %e, "could not publish receiver status");
        }
        for device_id in self.connected() {
            self.presence(&device_id, true).await;
        }
    }

    /// Hands a command to its device's connection task, or reports why not
    /// (to the topic `to` that its message names).
    fn route(&self, msg: CommandMessage, to: Option<Arc<str>>) {
        let _route =
            tracing::debug_span!("route", command_id = %msg.id, device_id = %msg.device_id).entered();
        tracing::debug!(attempt = msg.attempt, "command from MQTT");
        // Before the command is queued: its device task may report on it at once.
        let previous = self.set_destination(msg.id, to.clone());
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
        // An earlier copy of the command may still be queued here: its reports
        // keep going where they went.
        self.set_destination(msg.id, previous);
        self.inner.counters.undeliverable.inc();
        let bridge = self.clone();
        // Not from the polling task: a full request channel would deadlock it.
        tokio::spawn(async move {
            let kind = ReportKind::Undeliverable { reason: reason.into() };
            bridge.report_to(msg.id, &msg.device_id, kind, to).await;
        });
    }

    /// Routes a commands message, records a cancel, or answers a roll call.
    fn on_publish(&self, p: &Publish) {
        if p.topic == self.inner.topics.rollcall() {
            self.answer_rollcall();
            return;
        }
        let cancels = p.topic == self.inner.topics.receiver_cancels(&self.inner.receiver_id);
        let kind = if cancels { "cancel" } else { "command" };
        let Some(body) = self.inner.provenance.open(kind, &p.topic, &p.payload) else { return };
        if cancels {
            match serde_json::from_slice::<Cancel>(body) {
                Ok(c) => self.on_cancel(c),
                Err(e) => tracing::warn!(error = %e, "malformed cancel dropped"),
            }
            return;
        }
        match protocol::envelope::decode_one_or_many::<CommandMessage>(body) {
            Ok(messages) => {
                // The commands of one message name one topic, normally: shared, not copied.
                let mut last = None;
                for msg in messages {
                    let to = destination_of(&msg, &mut last);
                    self.route(msg, to);
                }
            }
            Err(e) => tracing::warn!(topic = %p.topic, error = %e, "malformed command message dropped"),
        }
    }

    /// A gateway canceled a command: it is never written here from now on;
    /// if its device is here and it was not written, that is confirmed at
    /// once (`undeliverable`, "canceled before delivery") — whether it waits
    /// in the device's queue or has not arrived yet.
    fn on_cancel(&self, c: Cancel) {
        let here = self.inner.devices.lock().expect("devices lock").contains_key(&c.device_id);
        let confirm = self.inner.cancels.lock().expect("cancels lock").cancel(c.command_id, here);
        tracing::debug!(command_id = %c.command_id, device_id = %c.device_id, confirm, "cancel received");
        if confirm {
            self.inner.counters.undeliverable.inc();
            let to = self.take_destination(c.command_id);
            let bridge = self.clone();
            // Not from the polling task: a full request channel would deadlock it.
            tokio::spawn(async move {
                let kind = ReportKind::Undeliverable { reason: "canceled before delivery".into() };
                bridge.report_to(c.command_id, &c.device_id, kind, to).await;
            });
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
        let topic = self.inner.topics.receiver_status(&self.inner.receiver_id);
        let body = status(&self.inner.receiver_id, false, &self.inner.session);
        let body = self.inner.provenance.seal(&topic, body);
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

/// This receiver's status message, serialised (PROTOCOL 4.4).
fn status(receiver_id: &str, online: bool, session: &str) -> Vec<u8> {
    let s = ReceiverStatus { receiver_id: receiver_id.to_owned(), online, session: Some(session.to_owned()) };
    serde_json::to_vec(&s).expect("serialisable")
}

/// The topic a command's reports go to, from its message: `reports_to`, or
/// `None` (the shared reports topic) when absent — or unusable as a topic
/// name (empty, a wildcard), which would lose the reports. `last` is the
/// previous answer, reused when it names the same topic, so the commands of
/// one message share one copy.
fn destination_of(msg: &CommandMessage, last: &mut Option<Arc<str>>) -> Option<Arc<str>> {
    let topic = msg.reports_to.as_deref()?;
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        tracing::warn!(command_id = %msg.id, reports_to = %topic, "unusable reports_to; reporting on the shared topic");
        return None;
    }
    match last {
        Some(shared) if &**shared == topic => Some(shared.clone()),
        _ => {
            let fresh: Arc<str> = Arc::from(topic);
            *last = Some(fresh.clone());
            Some(fresh)
        }
    }
}

/// Publishes queued reports until shutdown, then what is still queued: each
/// round takes every report ready at that moment (up to a size) and sends
/// one message per topic among them, so under load one message and one
/// broker round trip carry many reports, and alone a report goes out at once.
/// Reports for different topics never share a message; per topic they keep
/// their order.
async fn publish_reports(
    client: AsyncClient,
    shared: String,
    mut queued: mpsc::UnboundedReceiver<Outgoing>,
    (message_limit, provenance): (usize, Arc<Provenance>),
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
        batch.push(first);
        // Let the device tasks that are ready run first, so their reports join this message.
        tokio::task::yield_now().await;
        while batch.len() < REPORTS_PER_MESSAGE {
            let Ok(next) = queued.try_recv() else { break };
            batch.push(next);
        }
        for (to, bodies) in by_topic(batch.drain(..)) {
            let topic = to.map_or_else(|| shared.clone(), |to| to.to_string());
            for part in within_limit(&bodies, message_limit) {
                let body = provenance.seal(&topic, protocol::envelope::join_messages(part));
                if let Err(e) = publish_until_shutdown(&client, topic.clone(), body, &shutdown).await {
                    tracing::warn!(%topic, reports = part.len(), error = %e, "could not publish reports");
                }
            }
        }
    }
}

/// `bodies` cut into runs whose joined message (`[a,b,…]`) is at most
/// `limit` bytes; a body alone over it (none is, by `protocol::limits`)
/// still goes, alone.
fn within_limit(bodies: &[Vec<u8>], limit: usize) -> Vec<&[Vec<u8>]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 2);
    for (i, body) in bodies.iter().enumerate() {
        if i > start && bytes + body.len() + 1 > limit {
            parts.push(&bodies[start..i]);
            (start, bytes) = (i, 2);
        }
        bytes += body.len() + 1;
    }
    if start < bodies.len() {
        parts.push(&bodies[start..]);
    }
    parts
}

/// The reports one message carries: its topic (`None`: the shared one) and
/// the reports' JSON, in order.
type TopicBatch = (Option<Arc<str>>, Vec<Vec<u8>>);

/// The reports of one round grouped by topic, the topics in the order they
/// first appear, each group's reports in their order.
fn by_topic(batch: impl IntoIterator<Item = Outgoing>) -> Vec<TopicBatch> {
    let mut groups: Vec<TopicBatch> = Vec::new();
    for Outgoing { to, body } in batch {
        // A linear search: a round names as many topics as there are gateway instances.
        match groups.iter_mut().find(|(topic, _)| *topic == to) {
            Some((_, bodies)) => bodies.push(body),
            None => groups.push((to, vec![body])),
        }
    }
    groups
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(reports_to: Option<&str>) -> CommandMessage {
        CommandMessage {
            id: Uuid::now_v7(),
            device_id: DeviceId::parse("d").unwrap(),
            name: "x".into(),
            payload_base64: Vec::new(),
            attempt: 1,
            expires_at_ms: i64::MAX,
            reports_to: reports_to.map(str::to_owned),
        }
    }

    #[test]
    fn a_message_names_its_reports_topic_or_the_shared_one() {
        let mut last = None;
        assert_eq!(destination_of(&message(None), &mut last), None);
        let a = destination_of(&message(Some("p/gateways/a/reports")), &mut last).unwrap();
        assert_eq!(&*a, "p/gateways/a/reports");
        let again = destination_of(&message(Some("p/gateways/a/reports")), &mut last).unwrap();
        assert!(Arc::ptr_eq(&a, &again), "one copy for the commands of one message");
        let b = destination_of(&message(Some("p/gateways/b/reports")), &mut last).unwrap();
        assert_eq!(&*b, "p/gateways/b/reports");
        for unusable in ["", "p/+/reports", "p/#"] {
            assert_eq!(destination_of(&message(Some(unusable)), &mut last), None, "{unusable:?}");
        }
    }

    #[test]
    fn batches_are_cut_to_the_message_limit() {
        let bodies: Vec<Vec<u8>> = [40, 40, 40, 10, 95, 5].iter().map(|n| vec![b'x'; *n]).collect();
        let parts = within_limit(&bodies, 100);
        let sizes: Vec<Vec<usize>> = parts.iter().map(|p| p.iter().map(Vec::len).collect()).collect();
        assert_eq!(sizes, [vec![40, 40], vec![40, 10], vec![95], vec![5]]);
        for part in parts.iter().filter(|p| p.len() > 1) {
            assert!(protocol::envelope::join_messages(part).len() <= 100);
        }
        assert!(within_limit(&[], 100).is_empty());
    }

    #[test]
    fn reports_are_grouped_by_topic_in_order() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let out = |to: &Option<Arc<str>>, body: &str| Outgoing { to: to.clone(), body: body.into() };
        let (a, b, shared) = (Some(a), Some(b), None);
        let batch = [out(&a, "1"), out(&shared, "2"), out(&b, "3"), out(&a, "4"), out(&shared, "5")];
        let groups: Vec<(Option<String>, Vec<String>)> = by_topic(batch)
            .into_iter()
            .map(|(to, bodies)| {
                let bodies = bodies.into_iter().map(|b| String::from_utf8(b).unwrap()).collect();
                (to.map(|t| t.to_string()), bodies)
            })
            .collect();
        assert_eq!(
            groups,
            [
                (Some("a".to_owned()), vec!["1".to_owned(), "4".to_owned()]),
                (None, vec!["2".to_owned(), "5".to_owned()]),
                (Some("b".to_owned()), vec!["3".to_owned()]),
            ]
        );
    }
}
