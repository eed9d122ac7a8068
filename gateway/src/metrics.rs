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
}

impl GatewayMetrics {
    /// Registers every counter, and the store's statement counter.
    pub fn new(db_statements: &Counter) -> GatewayMetrics {
        let registry = Metrics::default();
        let c = |name: &str, help: &str| registry.counter(name, help);
        let metrics = GatewayMetrics {
            accepted: c("gateway_commands_accepted", "Commands accepted (stored), over HTTP and MQTT"),
            rejected: c("gateway_commands_rejected", "Submissions refused (nothing stored)"),
            publish_failed: c(
                "gateway_publish_failed",
                "Commands whose publish failed (the ack timeout re-sends)",
            ),
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
            registry: registry.clone(),
        };
        registry.register("gateway_db_statements", "Statements sent to the database", db_statements.clone());
        metrics
    }
}
