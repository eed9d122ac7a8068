//! Publishing: commands to the receiver that holds their device (several per
//! message, per receiver), cancel notices to receivers, and answers to MQTT
//! callers on their `reply_to`. Publishes go to rumqttc's queue; the broker's
//! acknowledgement is not awaited (a lost publication is the ack timeout's to
//! re-send).

use std::time::Duration;

use plumbing::backoff::Backoff;
use rumqttc::QoS;
use serde_json::Value;

use crate::app::App;
use crate::command::machine::attempt_change;
use crate::command::{now_ms, Change, Command, ReplyTo};
use protocol::envelope::{Cancel, CommandMessage, FinalNotice};

/// A message carries at most this many commands, and at most
/// `Config::mqtt_message_limit` bytes.
const COMMANDS_PER_MESSAGE: usize = 256;

/// A command whose attempt is claimed, and the receiver to publish it to.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub command: &'a Command,
    pub receiver: &'a str,
}

impl App {
    /// The move that claims the next attempt of `command`: `sent`, one more
    /// attempt, next look after the ack timeout plus back-off (see
    /// `command::machine::attempt_change`).
    pub fn attempt_change(&self, command: &Command, receiver: &str, why: &str) -> Change {
        let config = self.config();
        let backoff = match u32::try_from(command.attempts) {
            Ok(0) | Err(_) => Duration::ZERO,
            Ok(done) => Backoff::nth(
                Duration::from_millis(config.retry_base_ms),
                Duration::from_millis(config.retry_cap_ms),
                done - 1,
            ),
        };
        let wait = Duration::from_millis(config.ack_timeout_ms) + backoff;
        attempt_change(command, receiver, why, self.instance_id(), now_ms(), wait)
    }

    /// Publishes a command whose attempt is claimed to the receiver that
    /// holds its device. If the device has moved on, that receiver reports it
    /// undeliverable and the ack timeout re-sends it where presence then says.
    pub async fn send_to_receiver(&self, command: &Command, receiver: &str) {
        self.send_to_receivers(&[Route { command, receiver }]).await;
    }

    /// `send_to_receiver` for many commands: those for one receiver go out
    /// several per message (at most 256 or about 256 KiB; a larger command
    /// alone), in the order given, so a device still gets its commands in order.
    pub async fn send_to_receivers(&self, routes: &[Route<'_>]) {
        let mut receivers: Vec<&str> = Vec::new();
        for route in routes {
            if !receivers.contains(&route.receiver) {
                receivers.push(route.receiver);
            }
        }
        for receiver in receivers {
            let mut batch = Batch::default();
            let reports_to = self.topics().instance_reports(self.instance_id());
            for route in routes.iter().filter(|r| r.receiver == receiver) {
                let message = encode_command(route.command, &reports_to);
                if batch.is_full_for(&message, self.config().mqtt_message_limit()) {
                    self.publish_commands(receiver, std::mem::take(&mut batch)).await;
                }
                batch.push(route.command, message);
            }
            if !batch.commands.is_empty() {
                self.publish_commands(receiver, batch).await;
            }
        }
    }

    async fn publish_commands(&self, receiver: &str, batch: Batch<'_>) {
        let topic = self.topics().receiver_commands(receiver);
        let body =
            self.provenance().seal_for(receiver, &topic, protocol::envelope::join_messages(&batch.encoded));
        let published = self.mqtt().publish(topic, QoS::AtLeastOnce, false, body).await;
        if published.is_ok() {
            self.metrics().attempts_published.inc_by(batch.commands.len() as u64);
        }
        for command in batch.commands {
            let (command_id, device_id, attempt) = (command.id, command.device_id.as_str(), command.attempts);
            match &published {
                Ok(()) => tracing::debug!(%command_id, device_id, receiver, attempt, "published"),
                Err(e) => {
                    self.metrics().publish_failed.inc();
                    tracing::warn!(%command_id, device_id, receiver, error = %e, "publish failed; the ack timeout will re-send");
                }
            }
        }
    }

    /// Tells the receiver the command's current attempt went to that it was
    /// canceled: it drops it unless it has reached the device.
    pub(crate) async fn publish_cancel(&self, command: &Command) {
        let Some(receiver) = &command.sent_to else { return };
        let notice = Cancel { command_id: command.id, device_id: command.device_id.clone() };
        let body = serde_json::to_vec(&notice).expect("a Cancel always serialises");
        let topic = self.topics().receiver_cancels(receiver);
        let body = self.provenance().seal_for(receiver, &topic, body);
        if let Err(e) = self.mqtt().publish(topic, QoS::AtLeastOnce, false, body).await {
            tracing::warn!(command_id = %command.id, error = %e, "could not tell receivers of a cancel");
        }
    }

    /// Tells the other instances that `command` is final, so a caller waiting
    /// on one of them is answered at once (QoS 0: a lost notice costs that
    /// caller one store re-check period).
    pub(crate) async fn publish_final_notice(&self, command: &Command) {
        let notice = FinalNotice { command_id: command.id, instance_id: self.instance_id().to_owned() };
        let body = serde_json::to_vec(&notice).expect("a FinalNotice always serialises");
        if let Err(e) = self.mqtt().publish(self.topics().finals(), QoS::AtMostOnce, false, body).await {
            tracing::warn!(command_id = %command.id, error = %e, "could not tell the other instances of a final command");
        }
    }

    /// Publishes an answer to an MQTT caller: `body` plus `correlation_id` and `event`.
    pub async fn reply(&self, reply: &ReplyTo, event: &str, mut body: Value) {
        if let Value::Object(obj) = &mut body {
            obj.insert("correlation_id".into(), reply.correlation_id.clone().into());
            obj.insert("event".into(), event.into());
        }
        let mut bytes = serde_json::to_vec(&body).expect("a Value always serialises");
        let limit = self.config().mqtt_message_limit();
        if bytes.len() > limit {
            bytes = without_payloads(body, bytes.len(), limit);
        }
        if let Err(e) = self.mqtt().publish(reply.topic.clone(), QoS::AtLeastOnce, false, bytes).await {
            tracing::warn!(topic = %reply.topic, error = %e, "could not publish a reply");
        }
    }
}

/// A reply too large for one MQTT message, without its payload and the
/// result's payload (GET /v1/commands/{id} has them), saying so in `omitted`.
fn without_payloads(mut body: Value, size: usize, limit: usize) -> Vec<u8> {
    if let Value::Object(obj) = &mut body {
        obj.remove("payload");
        obj.remove("payload_base64");
        if let Some(Value::Object(result)) = obj.get_mut("result") {
            result.remove("payload");
            result.remove("payload_base64");
        }
        let note = format!(
            "payload and result payload left out: the reply would be {size} bytes, over the MQTT message limit of {limit}; GET /v1/commands/{{id}} has them"
        );
        obj.insert("omitted".into(), note.into());
    }
    serde_json::to_vec(&body).expect("a Value always serialises")
}

/// Commands of one message to one receiver, serialised.
#[derive(Debug, Default)]
struct Batch<'a> {
    commands: Vec<&'a Command>,
    encoded: Vec<Vec<u8>>,
    bytes: usize,
}

impl<'a> Batch<'a> {
    /// Whether `message` must go in the next message instead.
    /// (Joined as `[a,b,…]`: a byte per message besides its own.)
    fn is_full_for(&self, message: &[u8], limit: usize) -> bool {
        !self.commands.is_empty()
            && (self.commands.len() == COMMANDS_PER_MESSAGE
                || 2 + self.bytes + self.commands.len() + message.len() + 1 > limit)
    }

    fn push(&mut self, command: &'a Command, message: Vec<u8>) {
        self.bytes += message.len();
        self.commands.push(command);
        self.encoded.push(message);
    }
}

/// A command as its receiver gets it (`CommandMessage`), serialised; its
/// reports go to `reports_to`, this instance's reports topic.
fn encode_command(command: &Command, reports_to: &str) -> Vec<u8> {
    let message = CommandMessage {
        id: command.id,
        device_id: command.device_id.clone(),
        name: command.name.clone(),
        payload_base64: command.payload.bytes.clone(),
        attempt: command.attempts as u32,
        expires_at_ms: command.expires_at,
        reports_to: Some(reports_to.to_owned()),
    };
    serde_json::to_vec(&message).expect("serialising a CommandMessage cannot fail")
}
