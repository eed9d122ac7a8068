//! The gateway's Prometheus metrics (`GET /metrics`), one registry per
//! instance (see `plumbing::metrics`).

use plumbing::metrics::{Counter, Metrics};

/// Counters of one gateway instance. Exposed with a `_total` suffix.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    pub registry: Metrics,
    pub accepted: Counter,
    pub rejected: Counter,
    pub publish_failed: Counter,
    /// Command attempts handed to the broker (first attempts and re-sends).
    pub attempts_published: Counter,
    /// Commands this instance made final, whatever the final status.
    pub commands_final: Counter,
    pub reports_applied: Counter,
    /// Reports that changed nothing: duplicates, or late after a final status.
    pub reports_ignored: Counter,
    pub reports_unknown: Counter,
    pub reports_malformed: Counter,
    pub mqtt_submissions_dropped: Counter,
    /// MQTT submissions another instance took and answered.
    pub mqtt_submissions_elsewhere: Counter,
    /// Retained MQTT submissions refused (and cleared at the broker).
    pub mqtt_submissions_retained: Counter,
    /// Presence reports refused for a key generation not (or no longer) valid.
    pub presence_key_refused: Counter,
    /// Presence refused: the device is unregistered and `--max-unregistered-devices` are held.
    pub presence_unregistered_refused: Counter,
    /// Final commands deleted by retention (`--retention-ms`).
    pub retention_deleted: Counter,
    /// Submissions refused: their device had `--max-device-queue` non-final commands.
    pub device_queue_full: Counter,
    /// HTTP submissions refused: their API key was over `--submit-rate-per-key`.
    pub submit_rate_limited: Counter,
    /// MQTT submissions refused unhandled: the queue (`--mqtt-submission-queue`) was full.
    pub mqtt_submissions_overloaded: Counter,
    /// MQTT submissions dropped without a reply: even the refusals' queue was full.
    pub mqtt_submissions_shed: Counter,
}

impl GatewayMetrics {
    /// Registers every counter, and the store's statement counter, in `registry`.
    pub fn new(registry: Metrics, db_statements: &Counter) -> GatewayMetrics {
        let c = |name: &str, help: &str| registry.counter(name, help);
        let metrics = GatewayMetrics {
            accepted: c("gateway_commands_accepted", "Commands accepted (stored), over HTTP and MQTT"),
            rejected: c("gateway_commands_rejected", "Submissions refused (nothing stored)"),
            publish_failed: c(
                "gateway_publish_failed",
                "Commands whose publish failed (the ack timeout re-sends)",
            ),
            attempts_published: c(
                "gateway_attempts_published",
                "Command attempts handed to the broker (first attempts and re-sends)",
            ),
            commands_final: c("gateway_commands_final", "Commands this instance made final (any final status)"),
            reports_applied: c("gateway_reports_applied", "Receiver reports that moved a command"),
            reports_ignored: c("gateway_reports_ignored", "Reports that changed nothing (duplicate or late)"),
            reports_unknown: c("gateway_reports_unknown", "Reports for a command this store does not hold"),
            reports_malformed: c("gateway_reports_malformed", "Reports messages that did not decode"),
            mqtt_submissions_dropped: c(
                "gateway_mqtt_submissions_dropped",
                "MQTT submissions dropped unanswered (not JSON, or no reply_to)",
            ),
            mqtt_submissions_elsewhere: c(
                "gateway_mqtt_submissions_elsewhere",
                "MQTT submissions another gateway instance took and answered",
            ),
            mqtt_submissions_retained: c(
                "gateway_mqtt_submissions_retained",
                "Retained MQTT submissions refused, not run (delivered again at every new subscription)",
            ),
            presence_key_refused: c(
                "gateway_presence_key_refused",
                "Device presence refused: the device authenticated with a key generation not or no longer valid",
            ),
            presence_unregistered_refused: c(
                "gateway_presence_unregistered_refused",
                "Device presence refused: not in the registry, and --max-unregistered-devices such devices are held",
            ),
            retention_deleted: c(
                "gateway_retention_deleted_commands",
                "Final commands deleted with their events, older than --retention-ms",
            ),
            device_queue_full: c(
                "gateway_device_queue_full",
                "Submissions refused (429 device_queue_full): the device had --max-device-queue non-final commands",
            ),
            submit_rate_limited: c(
                "gateway_submit_rate_limited",
                "HTTP submissions refused (429 rate_limited): the API key was over --submit-rate-per-key",
            ),
            mqtt_submissions_overloaded: c(
                "gateway_mqtt_submissions_overloaded",
                "MQTT submissions answered rejected (503 overloaded): --mqtt-submission-queue was full",
            ),
            mqtt_submissions_shed: c(
                "gateway_mqtt_submissions_shed",
                "MQTT submissions dropped unanswered: the submission queue and the refusals' queue were both full",
            ),
            registry: registry.clone(),
        };
        registry.register("gateway_db_statements", "Statements sent to the database", db_statements.clone());
        metrics
    }
}
