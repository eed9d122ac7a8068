//! MQTT topic names. Every name starts with a configurable prefix (default
//! `gateway`) so several deployments can share one broker. Topic names carry
//! device and receiver ids, never command ids: brokers such as rumqttd keep
//! every topic name they ever saw.

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "gateway";

/// Topic names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into().trim_end_matches('/').to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// MQTT-native callers submit commands here (JSON, see `envelope::MqttSubmission`).
    pub fn submit(&self) -> String {
        format!("{}/commands", self.prefix)
    }

    /// Gateway → one receiver: commands for the devices it holds
    /// (`envelope::CommandMessage`). One subscription per receiver, however many
    /// devices it holds: brokers that match every filter against every publish
    /// (rumqttd) would otherwise pay for each device on each message.
    pub fn receiver_commands(&self, receiver_id: &str) -> String {
        format!("{}/receivers/{}/commands", self.prefix, receiver_id)
    }

    /// Receiver → gateway: delivery reports and results (`envelope::Report`)
    /// of commands whose message names no `reports_to`.
    pub fn reports(&self) -> String {
        format!("{}/reports", self.prefix)
    }

    /// Receiver → one gateway instance: the reports of the attempts it
    /// published (`CommandMessage::reports_to`), so each report is applied
    /// once, by the instance that sent the attempt, on any broker.
    pub fn instance_reports(&self, instance_id: &str) -> String {
        format!("{}/gateways/{}/reports", self.prefix, instance_id)
    }

    /// Gateway → gateways: a command became final (`envelope::FinalNotice`),
    /// so a caller waiting on another instance is answered at once.
    pub fn finals(&self) -> String {
        format!("{}/finals", self.prefix)
    }

    /// Gateway → one receiver: a command it was sent was canceled (`envelope::Cancel`).
    pub fn receiver_cancels(&self, receiver_id: &str) -> String {
        format!("{}/receivers/{}/cancels", self.prefix, receiver_id)
    }

    /// Gateway → every receiver: "say which devices you hold" (any payload).
    /// A gateway publishes it after each connect, so presence that receivers
    /// published while no gateway listened is not lost.
    pub fn rollcall(&self) -> String {
        format!("{}/rollcall", self.prefix)
    }

    /// Receiver → gateway: one device came or went (`envelope::Presence`).
    pub fn presence(&self, device_id: &str) -> String {
        format!("{}/presence/{}", self.prefix, device_id)
    }

    /// Filter matching every device's presence topic.
    pub fn presence_filter(&self) -> String {
        format!("{}/presence/+", self.prefix)
    }

    /// Receiver → gateway: a receiver's own liveness, also its MQTT last will
    /// (`envelope::ReceiverStatus`).
    pub fn receiver_status(&self, receiver_id: &str) -> String {
        format!("{}/receivers/{}/status", self.prefix, receiver_id)
    }

    /// Filter matching every receiver's status topic.
    pub fn receiver_status_filter(&self) -> String {
        format!("{}/receivers/+/status", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_under_prefix() {
        let t = Topics::new("acme/");
        assert_eq!(t.submit(), "acme/commands");
        assert_eq!(t.receiver_commands("r1"), "acme/receivers/r1/commands");
        assert_eq!(t.presence_filter(), "acme/presence/+");
    }
}
