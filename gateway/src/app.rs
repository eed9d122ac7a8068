//! The gateway's core, shared by the HTTP and MQTT front doors: validate a
//! submission, record it, publish it, wait for it; apply what receivers report
//! and tell whoever waits. Front doors only translate to and from this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rumqttc::{AsyncClient, QoS};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::command::{now_ms, parse_rfc3339, Command, Payload, Status};
use crate::config::{Config, MAX_ATTEMPTS, MAX_TTL_MS, MAX_WAIT_MS};
use crate::store::{self, Change, Inserted, Moved, NewCommand, Store, StoreError};
use crate::waiters::{Waiter, Waiters};
use protocol::envelope::{CommandMessage, Presence, ReceiverStatus, Report, ReportKind};
use protocol::Topics;

/// While a caller waits, the store is re-read at least this often, so a
/// result applied by another gateway instance is seen too.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// A command submission as callers send it (HTTP body; MQTT adds routing fields).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    pub name: String,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub payload_base64: Option<String>,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub wait_ms: Option<u64>,
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub max_attempts: Option<i64>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// RFC 3339; async only. Nothing is published before it.
    #[serde(default)]
    pub scheduled_at: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Sync,
    Async,
}

/// Why a submission or query was refused. Nothing is stored for any of these.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("store unavailable, nothing was accepted: {0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Unavailable(_) => "store_unavailable",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) => 409,
            ApiError::TooLarge(_) => 413,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Unavailable(_) => 503,
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::json!({"error": {"kind": self.kind(), "message": self.to_string()}})
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "store error");
        ApiError::Unavailable(e.to_string())
    }
}

/// Counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub publish_failed: AtomicU64,
    pub reports_applied: AtomicU64,
    /// Reports that changed nothing: duplicates, or late after a final status.
    pub reports_ignored: AtomicU64,
    pub reports_unknown: AtomicU64,
    pub reports_malformed: AtomicU64,
    pub mqtt_submissions_dropped: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let rows = [
            ("gateway_commands_accepted_total", &self.accepted),
            ("gateway_commands_rejected_total", &self.rejected),
            ("gateway_publish_failed_total", &self.publish_failed),
            ("gateway_reports_applied_total", &self.reports_applied),
            ("gateway_reports_ignored_total", &self.reports_ignored),
            ("gateway_reports_unknown_total", &self.reports_unknown),
            ("gateway_reports_malformed_total", &self.reports_malformed),
            ("gateway_mqtt_submissions_dropped_total", &self.mqtt_submissions_dropped),
        ];
        rows.iter()
            .map(|(name, c)| format!("# TYPE {name} counter\n{name} {}\n", c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// How a submission ended for the caller.
#[derive(Debug)]
pub struct Submitted {
    pub command: Command,
    /// False when an idempotency key matched an earlier command.
    pub created: bool,
    /// Registered before the command was published, when the caller asked to wait.
    pub waiter: Option<Waiter>,
}

/// Shared handle to the core; cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Store,
    mqtt: AsyncClient,
    topics: Topics,
    waiters: Waiters,
    counters: Counters,
    /// Wakes the sweeper before its next tick (a device came online).
    sweep_now: tokio::sync::Notify,
    /// The current roll call: receivers that answered it. A std mutex, never
    /// held across an `.await`.
    rollcall: std::sync::Mutex<RollCall>,
    /// New commands on their way to the group-commit writer (`write_new_commands`).
    inserts: mpsc::Sender<InsertRequest>,
}

/// New commands waiting for the writer. When full, submissions wait.
const INSERT_QUEUE: usize = 1024;
/// New commands stored per transaction at most.
const INSERT_BATCH: usize = 128;

#[derive(Debug)]
struct InsertRequest {
    new: NewCommand,
    done: oneshot::Sender<Result<Stored, ApiError>>,
}

/// The writer's answer: what the store did, and the receiver to publish to
/// when the first attempt was claimed with the insert.
type Stored = (Inserted, Option<String>);

/// The single writer of new commands: takes whatever submissions are waiting
/// (up to `INSERT_BATCH`), looks up their devices in one query, stores those
/// whose device exists and is enabled in one transaction, then answers each.
/// Under load many submissions share one query and one commit; alone, one
/// waits for nothing. Ends when every `App` is gone.
async fn write_new_commands(store: Store, instance_id: String, mut rx: mpsc::Receiver<InsertRequest>) {
    let mut batch = Vec::with_capacity(INSERT_BATCH);
    while rx.recv_many(&mut batch, INSERT_BATCH).await > 0 {
        let ids: Vec<&str> = batch.iter().map(|r| r.new.device_id.as_str()).collect();
        let devices = match store.get_devices(&ids).await {
            Ok(devices) => devices,
            Err(e) => {
                answer_all(batch.drain(..), &e);
                continue;
            }
        };
        let mut accepted: Vec<(InsertRequest, Option<String>)> = Vec::with_capacity(batch.len());
        for mut request in batch.drain(..) {
            let device_id = &request.new.device_id;
            match devices.get(device_id) {
                None => {
                    let _ =
                        request.done.send(Err(ApiError::NotFound(format!("unknown device {device_id:?}"))));
                }
                Some(d) if !d.enabled => {
                    let _ = request
                        .done
                        .send(Err(ApiError::Conflict(format!("device {device_id:?} is disabled"))));
                }
                Some(d) => {
                    // Scheduled commands, and commands for a device no receiver holds
                    // now, wait in the store: the sweeper publishes them when due.
                    // Otherwise the first attempt is claimed in the same transaction
                    // as the insert and published right after the commit (a crash in
                    // between: the ack timeout re-sends).
                    let receiver = d.receiver_id.clone().filter(|_| d.online);
                    if request.new.status == Status::Pending && receiver.is_some() {
                        request.new.status = Status::Sent;
                        request.new.first_attempt_detail =
                            Some(format!("attempt 1 by {instance_id}: accepted"));
                    }
                    accepted.push((request, receiver));
                }
            }
        }
        let news: Vec<NewCommand> = accepted.iter().map(|(r, _)| r.new.clone()).collect();
        match store.insert_commands(&news).await {
            Ok(done) => {
                for ((request, receiver), inserted) in accepted.into_iter().zip(done) {
                    let _ = request.done.send(Ok((inserted, receiver)));
                }
            }
            Err(e) => answer_all(accepted.into_iter().map(|(r, _)| r), &e),
        }
    }
}

/// The store failed: every request of the batch learns it (nothing was stored).
fn answer_all(requests: impl Iterator<Item = InsertRequest>, error: &StoreError) {
    tracing::warn!(%error, "store error");
    for request in requests {
        let _ = request.done.send(Err(ApiError::Unavailable(error.to_string())));
    }
}

/// Receivers that answered the current roll call.
#[derive(Debug, Default)]
struct RollCall {
    round: u64,
    answered: std::collections::HashSet<String>,
}

/// Where an MQTT caller wants its answers.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    pub topic: String,
    pub correlation_id: String,
}

impl App {
    pub fn new(config: Config, store: Store, mqtt: AsyncClient) -> App {
        let topics = Topics::new(config.topic_prefix.clone());
        let (inserts, rx) = mpsc::channel(INSERT_QUEUE);
        tokio::spawn(write_new_commands(store.clone(), config.instance_id.clone(), rx));
        App {
            inner: Arc::new(Inner {
                config,
                store,
                mqtt,
                topics,
                waiters: Waiters::default(),
                counters: Counters::default(),
                sweep_now: tokio::sync::Notify::new(),
                rollcall: std::sync::Mutex::default(),
                inserts,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn mqtt(&self) -> &AsyncClient {
        &self.inner.mqtt
    }

    /// Resolves when someone asked the sweeper to run now.
    pub async fn sweep_requested(&self) {
        self.inner.sweep_now.notified().await;
    }

    /// Validates, records (durably, before anything is published) and, when
    /// its device is online and it is not scheduled, publishes a command.
    /// Returns once it is stored and handed to the broker client. With `wait`,
    /// the result carries a waiter for `wait_submitted`.
    pub async fn submit(
        &self,
        device_id: &str,
        req: &CommandRequest,
        reply_to: Option<&ReplyTo>,
        wait: bool,
    ) -> Result<Submitted, ApiError> {
        let result = self.submit_inner(device_id, req, reply_to, wait).await;
        let counter = if result.is_ok() { &self.counters().accepted } else { &self.counters().rejected };
        Counters::bump(counter);
        result
    }

    async fn submit_inner(
        &self,
        device_id: &str,
        req: &CommandRequest,
        reply_to: Option<&ReplyTo>,
        wait: bool,
    ) -> Result<Submitted, ApiError> {
        let new = self.validate(device_id, req, reply_to)?;
        let (inserted, receiver) = self.insert(new.clone()).await?;
        match inserted {
            Inserted::Created(command) => {
                // Before the publish, so a quick result cannot slip past it.
                let waiter = wait.then(|| self.inner.waiters.register(command.id));
                if let Some(receiver) = receiver.filter(|_| command.status == Status::Sent) {
                    self.send_to_receiver(&command, &receiver).await;
                }
                Ok(Submitted { command, created: true, waiter })
            }
            Inserted::Existing(command) => {
                let waiter = wait.then(|| self.inner.waiters.register(command.id));
                // It may have become final between the read and the registration.
                let command = match &waiter {
                    Some(_) if !command.status.is_final() => {
                        self.store().get_command(command.id).await?.unwrap_or(command)
                    }
                    _ => command,
                };
                Ok(Submitted { command, created: false, waiter })
            }
            Inserted::KeyConflict(existing) => Err(ApiError::Conflict(format!(
                "idempotency key {:?} was used for command {} with a different request",
                new.idempotency_key.unwrap_or_default(),
                existing.id
            ))),
        }
    }

    fn validate(
        &self,
        device_id: &str,
        req: &CommandRequest,
        reply_to: Option<&ReplyTo>,
    ) -> Result<NewCommand, ApiError> {
        let bad = |m: &str| Err(ApiError::BadRequest(m.to_owned()));
        if !protocol::topics::is_valid_device_id(device_id) {
            return Err(ApiError::NotFound(format!("unknown device {device_id:?} (not a valid device id)")));
        }
        if req.name.is_empty() || req.name.len() > 255 {
            return bad("name must be 1 to 255 bytes");
        }
        let payload = match (&req.payload, &req.payload_base64) {
            (Some(_), Some(_)) => return bad("give payload or payload_base64, not both"),
            (Some(v), None) => Payload::json(v),
            (None, Some(b)) => match BASE64.decode(b.as_bytes()) {
                Ok(bytes) => Payload { bytes, is_json: false },
                Err(e) => return Err(ApiError::BadRequest(format!("payload_base64 is not base64: {e}"))),
            },
            (None, None) => Payload::json(&Value::Null),
        };
        let max = self.config().max_payload_bytes;
        if payload.bytes.len() > max {
            return Err(ApiError::TooLarge(format!(
                "payload is {} bytes, the limit is {max}",
                payload.bytes.len()
            )));
        }
        if req.wait_ms.is_some_and(|w| w > MAX_WAIT_MS) {
            return Err(ApiError::BadRequest(format!("wait_ms must be at most {MAX_WAIT_MS}")));
        }
        let ttl = req.ttl_ms.unwrap_or(self.config().default_ttl_ms);
        if ttl == 0 || ttl > MAX_TTL_MS {
            return Err(ApiError::BadRequest(format!("ttl_ms must be 1 to {MAX_TTL_MS}")));
        }
        let max_attempts = req.max_attempts.unwrap_or(self.config().default_max_attempts);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(ApiError::BadRequest(format!("max_attempts must be 1 to {MAX_ATTEMPTS}")));
        }
        if req.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 255) {
            return bad("idempotency_key must be 1 to 255 bytes");
        }
        let now = now_ms();
        let expires_at = now + ttl as i64;
        let scheduled_at = match &req.scheduled_at {
            None => None,
            Some(_) if req.mode != Some(Mode::Async) => {
                return bad("scheduled_at needs \"mode\": \"async\"");
            }
            Some(text) => match parse_rfc3339(text) {
                None => {
                    return Err(ApiError::BadRequest(format!(
                        "scheduled_at {text:?} is not an RFC 3339 time"
                    )))
                }
                Some(at) if at >= expires_at => {
                    return bad("scheduled_at is at or after the command's deadline (acceptance + ttl_ms)")
                }
                Some(at) => Some(at),
            },
        };
        // A time in the past runs at once.
        let status =
            if scheduled_at.is_some_and(|at| at > now) { Status::Scheduled } else { Status::Pending };
        // Until published, the sweeper looks at it when scheduled, or after the
        // ack timeout (the immediate publish failed, or the device is offline).
        let next_attempt_at = match status {
            Status::Scheduled => scheduled_at.unwrap_or(now),
            _ => now + self.config().ack_timeout_ms as i64,
        };
        let hash = store::request_hash(&[
            req.name.as_bytes(),
            &payload.bytes,
            &[u8::from(payload.is_json)],
            &ttl.to_be_bytes(),
            &max_attempts.to_be_bytes(),
            req.scheduled_at.as_deref().unwrap_or_default().as_bytes(),
        ]);
        Ok(NewCommand {
            id: Uuid::now_v7(),
            device_id: device_id.to_owned(),
            name: req.name.clone(),
            payload,
            max_attempts,
            status,
            first_attempt_detail: None,
            created_at: now,
            scheduled_at,
            expires_at,
            next_attempt_at,
            idempotency_key: req.idempotency_key.clone(),
            request_hash: hash,
            reply_to: reply_to.map(|r| r.topic.clone()),
            correlation_id: reply_to.map(|r| r.correlation_id.clone()),
        })
    }

    /// Stores a new command through the group-commit writer.
    async fn insert(&self, new: NewCommand) -> Result<Stored, ApiError> {
        let (done, answer) = oneshot::channel();
        let gone = || ApiError::Unavailable("the command writer stopped".into());
        self.inner.inserts.send(InsertRequest { new, done }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The move that claims the next attempt of `command` (`sent`, attempts + 1,
    /// next look after the ack timeout plus back-off). The caller commits it,
    /// then publishes with `send_to_receiver`: claim first, so a crash between
    /// the two leaves a `sent` command with no delivery, which the ack timeout
    /// re-sends, and a fast delivery report cannot overtake the claim.
    pub fn attempt_change(&self, command: &Command, why: &str) -> Change {
        let attempt = command.attempts + 1;
        let due = now_ms() + self.config().ack_timeout_ms as i64 + self.backoff_ms(command.attempts);
        Change {
            bump_attempts: true,
            next_attempt_at: Some(due),
            detail: Some(format!("attempt {attempt} by {}: {why}", self.config().instance_id)),
            ..Change::default()
        }
    }

    /// Publishes a command whose attempt is claimed to the receiver that
    /// holds its device. If the device has moved on, that receiver reports it
    /// undeliverable and the ack timeout re-sends it where presence then says.
    pub async fn send_to_receiver(&self, command: &Command, receiver_id: &str) {
        self.send_to_receivers(&[(command, receiver_id)]).await;
    }

    /// `send_to_receiver` for many commands: those for one receiver go out
    /// several per message (at most 256 or about 256 KiB; a larger command
    /// alone), in the order given, so a device still gets its commands in order.
    pub async fn send_to_receivers(&self, commands: &[(&Command, &str)]) {
        let mut receivers: Vec<&str> = Vec::new();
        for (_, receiver) in commands {
            if !receivers.contains(receiver) {
                receivers.push(receiver);
            }
        }
        for receiver in receivers {
            let mine = commands.iter().filter(|(_, r)| *r == receiver).map(|(c, _)| *c);
            let (mut ids, mut encoded, mut bytes) = (Vec::new(), Vec::new(), 0);
            for command in mine {
                let message = encode_command(command);
                let full = ids.len() == COMMANDS_PER_MESSAGE || bytes + message.len() > COMMAND_MESSAGE_BYTES;
                if !ids.is_empty() && full {
                    self.publish_commands(receiver, &std::mem::take(&mut ids), &std::mem::take(&mut encoded))
                        .await;
                    bytes = 0;
                }
                bytes += message.len();
                ids.push(command.id);
                encoded.push(message);
            }
            if !ids.is_empty() {
                self.publish_commands(receiver, &ids, &encoded).await;
            }
        }
    }

    async fn publish_commands(&self, receiver_id: &str, ids: &[Uuid], encoded: &[Vec<u8>]) {
        let body = protocol::envelope::join_messages(encoded);
        let topic = self.topics().receiver_commands(receiver_id);
        if let Err(e) = self.mqtt().publish(topic, QoS::AtLeastOnce, false, body).await {
            for id in ids {
                tracing::warn!(command_id = %id, error = %e, "publish failed; the ack timeout will re-send");
                Counters::bump(&self.counters().publish_failed);
            }
        }
    }

    /// Extra wait after attempt `done` (0 for the first): base × 2^(done-1),
    /// capped, with jitter down to half, so re-sends of many commands spread out.
    fn backoff_ms(&self, done: i64) -> i64 {
        if done <= 0 {
            return 0;
        }
        let base = self.config().retry_base_ms.max(1);
        let full = base.saturating_mul(1 << (done - 1).min(20)).min(self.config().retry_cap_ms.max(base));
        rand::Rng::gen_range(&mut rand::thread_rng(), full / 2..=full) as i64
    }

    /// Cancels a command that is not final. If it was already published, the
    /// receivers are told, and drop it unless it has reached the device.
    pub async fn cancel(&self, id: Uuid) -> Result<Command, ApiError> {
        let change = Change {
            error: Some(("canceled".to_owned(), "canceled by the caller".to_owned())),
            detail: Some("canceled by the caller".to_owned()),
            ..Change::default()
        };
        match self.store().transition(id, Status::Canceled, &change).await? {
            Moved::Yes { from, command } => {
                if matches!(from, Status::Sent | Status::Delivered) {
                    let notice =
                        protocol::envelope::Cancel { command_id: id, device_id: command.device_id.clone() };
                    let body = serde_json::to_vec(&notice).expect("serialisable");
                    if let Err(e) =
                        self.mqtt().publish(self.topics().cancels(), QoS::AtLeastOnce, false, body).await
                    {
                        tracing::warn!(command_id = %id, error = %e, "could not tell receivers of a cancel");
                    }
                }
                self.on_final(&command).await;
                Ok(command)
            }
            Moved::Refused(c) => Err(ApiError::Conflict(format!("command {id} is already {}", c.status))),
            Moved::NotFound => Err(ApiError::NotFound(format!("no command {id}"))),
        }
    }

    /// Waits until the command is final or `wait` has passed, and returns it as it stands.
    pub async fn wait_final(&self, id: Uuid, wait: Duration) -> Result<Option<Command>, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut waiter = self.inner.waiters.register(id);
        loop {
            let Some(command) = self.store().get_command(id).await? else {
                return Ok(None);
            };
            let now = tokio::time::Instant::now();
            if command.status.is_final() || now >= deadline {
                return Ok(Some(command));
            }
            let nap = (deadline - now).min(RECHECK_EVERY);
            if let Ok(done) = tokio::time::timeout(nap, waiter.notified()).await {
                return Ok(Some(Arc::unwrap_or_clone(done)));
            }
        }
    }

    /// `wait_final` for a command just submitted with a waiter (see `submit`):
    /// the store is read only if no notification comes within a recheck period.
    pub async fn wait_submitted(&self, submitted: Submitted, wait: Duration) -> Result<Command, ApiError> {
        let Submitted { command, waiter, .. } = submitted;
        let Some(mut waiter) = waiter.filter(|_| !command.status.is_final()) else {
            return Ok(command);
        };
        match tokio::time::timeout(wait.min(RECHECK_EVERY), waiter.notified()).await {
            Ok(done) => Ok(Arc::unwrap_or_clone(done)),
            Err(_) if wait <= RECHECK_EVERY => {
                Ok(self.store().get_command(command.id).await?.unwrap_or(command))
            }
            Err(_) => Ok(self.wait_final(command.id, wait - RECHECK_EVERY).await?.unwrap_or(command)),
        }
    }

    /// Applies receiver reports, in order, in one store transaction. Errors are
    /// store errors only: the caller retries the whole batch (the reports are
    /// acknowledged to the broker only after this succeeds; applying one twice
    /// changes nothing).
    pub async fn apply_reports(&self, reports: &[Report]) -> Result<(), StoreError> {
        let mut moves = Vec::with_capacity(reports.len());
        let mut kinds = Vec::with_capacity(reports.len());
        for report in reports {
            let id = report.command_id;
            match &report.kind {
                ReportKind::Delivered => {
                    let change = Change {
                        delivered: true,
                        next_attempt_at: Some(now_ms() + self.config().result_timeout_ms as i64),
                        detail: Some(format!("receiver {}", report.receiver_id)),
                        ..Change::default()
                    };
                    moves.push((id, Status::Delivered, change));
                    kinds.push(&report.kind);
                }
                ReportKind::Result { code, payload_base64 } => {
                    let (to, change) = result_change(*code, payload_base64, &report.receiver_id);
                    moves.push((id, to, change));
                    kinds.push(&report.kind);
                }
                ReportKind::Undeliverable { reason } => {
                    self.note_undeliverable(id, reason, &report.receiver_id).await?;
                }
            }
        }
        if moves.is_empty() {
            return Ok(());
        }
        let outcomes = self.store().transition_many(&moves).await?;
        for (((id, _, change), kind), outcome) in moves.iter().zip(kinds).zip(outcomes) {
            self.after_report(*id, kind, change, outcome).await?;
        }
        Ok(())
    }

    async fn after_report(
        &self,
        id: Uuid,
        kind: &ReportKind,
        change: &Change,
        outcome: Moved,
    ) -> Result<(), StoreError> {
        match outcome {
            Moved::Yes { command, .. } => {
                Counters::bump(&self.counters().reports_applied);
                if command.status.is_final() {
                    self.on_final(&command).await;
                }
            }
            Moved::Refused(current) => {
                Counters::bump(&self.counters().reports_ignored);
                tracing::debug!(command_id = %id, status = %current.status, report = ?kind, "report changes nothing");
                if matches!(kind, ReportKind::Result { .. }) && current.status == Status::Canceled {
                    let detail =
                        format!("result after cancel: {}", change.detail.clone().unwrap_or_default());
                    // Canceled is final: the note gets the status and attempt it was refused at.
                    self.store().note_as_it_stands(id, &detail).await?;
                }
            }
            Moved::NotFound => {
                Counters::bump(&self.counters().reports_unknown);
                tracing::warn!(command_id = %id, "report for an unknown command");
            }
        }
        Ok(())
    }

    async fn note_undeliverable(&self, id: Uuid, reason: &str, receiver: &str) -> Result<(), StoreError> {
        let detail = format!("undeliverable at receiver {receiver}: {reason}");
        if !self.store().note_as_it_stands(id, &detail).await? {
            Counters::bump(&self.counters().reports_unknown);
        }
        Ok(())
    }

    /// A command just became final: wake sync callers and long-polls, answer MQTT callers.
    pub async fn on_final(&self, command: &Command) {
        self.inner.waiters.notify(command);
        if let Some((topic, correlation_id)) = &command.reply_to {
            let reply = ReplyTo { topic: topic.clone(), correlation_id: correlation_id.clone() };
            self.reply(&reply, "final", command.to_json()).await;
        }
    }

    /// Publishes an answer to an MQTT caller: `body` plus `correlation_id` and `event`.
    pub async fn reply(&self, reply: &ReplyTo, event: &str, mut body: Value) {
        if let Value::Object(obj) = &mut body {
            obj.insert("correlation_id".into(), reply.correlation_id.clone().into());
            obj.insert("event".into(), event.into());
        }
        let bytes = serde_json::to_vec(&body).expect("a Value always serialises");
        if let Err(e) = self.mqtt().publish(reply.topic.clone(), QoS::AtLeastOnce, false, bytes).await {
            tracing::warn!(topic = %reply.topic, error = %e, "could not publish a reply");
        }
    }

    pub async fn apply_presence(&self, p: &Presence) -> Result<(), StoreError> {
        self.store().set_presence(&p.device_id, &p.receiver_id, p.online).await?;
        tracing::info!(device_id = %p.device_id, receiver = %p.receiver_id, online = p.online, "presence");
        if p.online && self.store().wake_device(&p.device_id, now_ms()).await? > 0 {
            self.inner.sweep_now.notify_one();
        }
        Ok(())
    }

    pub async fn apply_receiver_status(&self, s: &ReceiverStatus) -> Result<(), StoreError> {
        if s.online {
            self.inner.rollcall.lock().expect("rollcall lock").answered.insert(s.receiver_id.clone());
        } else {
            let n = self.store().receiver_gone(&s.receiver_id).await?;
            tracing::info!(receiver = %s.receiver_id, devices = n, "receiver gone; its devices are offline");
        }
        Ok(())
    }

    /// A roll call is about to be published: forget who answered the last one.
    pub fn start_rollcall(&self) -> u64 {
        let mut rollcall = self.inner.rollcall.lock().expect("rollcall lock");
        rollcall.round += 1;
        rollcall.answered.clear();
        rollcall.round
    }

    /// The grace period after roll call `round` is over: devices still marked
    /// online by a receiver that did not answer are marked offline — that
    /// receiver died while no gateway listened (its last will went nowhere),
    /// e.g. with an embedded broker that was down with the gateway. A newer
    /// roll call makes this one moot.
    pub async fn finish_rollcall(&self, round: u64) -> Result<(), StoreError> {
        let alive: Vec<String> = {
            let rollcall = self.inner.rollcall.lock().expect("rollcall lock");
            if rollcall.round != round {
                return Ok(());
            }
            rollcall.answered.iter().cloned().collect()
        };
        let n = self.store().receivers_gone_except(&alive).await?;
        if n > 0 {
            tracing::info!(
                devices = n,
                answered = alive.len(),
                "devices of receivers that missed the roll call are offline"
            );
        }
        Ok(())
    }
}

/// A message carries at most this many commands…
const COMMANDS_PER_MESSAGE: usize = 256;
/// …and takes no more once its body would pass this size.
const COMMAND_MESSAGE_BYTES: usize = 256 * 1024;

/// A command as its receiver gets it (`CommandMessage`), serialised.
fn encode_command(command: &Command) -> Vec<u8> {
    let message = CommandMessage {
        id: command.id,
        device_id: command.device_id.clone(),
        name: command.name.clone(),
        payload_base64: command.payload.bytes.clone(),
        attempt: command.attempts as u32,
        expires_at_ms: command.expires_at,
    };
    serde_json::to_vec(&message).expect("serialising a CommandMessage cannot fail")
}

fn result_change(code: i32, payload: &[u8], receiver: &str) -> (Status, Change) {
    let detail = Some(format!("code {code} via receiver {receiver}"));
    let result = Some((i64::from(code), payload.to_vec(), None));
    // A result proves delivery: `delivered_at` is set if no `delivered` report came first.
    if code == 0 {
        (Status::Succeeded, Change { result, detail, delivered: true, ..Change::default() })
    } else {
        let error = Some(("device_error".to_owned(), format!("the device answered with error code {code}")));
        (Status::Failed, Change { result, error, detail, delivered: true, ..Change::default() })
    }
}
