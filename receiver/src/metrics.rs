//! The receiver's counters: Prometheus counters in the receiver's own
//! registry (served on `/metrics` with `--metrics-listen`), readable by tests.

use plumbing::metrics::{Counter, Gauge, Metrics};

/// What the receiver counts. Each is exported as `receiver_<field>_total`
/// (help texts without a final period: prometheus-client adds it).
#[derive(Debug, Clone)]
pub struct Counters {
    /// Command frames (or Modbus requests) written to a device.
    pub commands_written: Counter,
    /// Results reported to the gateway.
    pub results_forwarded: Counter,
    /// Device answers over `--max-result-bytes`, reported `result_too_large`.
    pub results_too_large: Counter,
    /// Result frames for a command this connection already answered.
    pub duplicate_results: Counter,
    /// Frames dropped for CRC, length, version, type or body errors.
    pub bad_frames: Counter,
    /// Commands that could not be written (device not here, queue full, expired).
    pub undeliverable: Counter,
    /// TCP connections closed without a valid HELLO.
    pub connections_rejected: Counter,
    /// TCP connections that named a device but failed its authentication
    /// (no, wrong or outdated AUTH): closed, the device's current connection kept.
    pub device_auth_refused: Counter,
    /// RESULT frames for a command not written to that device here: dropped.
    pub foreign_results: Counter,
    /// TCP device connections open now, openings included (a gauge).
    pub device_connections: Gauge,
    /// TCP connections closed at once: `--max-device-connections` were open.
    pub device_connections_refused: Counter,
    /// Connections closed in their opening to make room for a newer one
    /// (`--max-device-handshakes` were opening).
    pub device_handshakes_evicted: Counter,
    /// Connections closed without a valid HELLO (and AUTH) within
    /// `--device-handshake-timeout-ms` (also in `connections_rejected`).
    pub device_handshake_timeouts: Counter,
    /// Device connections closed after `--device-idle-timeout-ms` of silence
    /// (not even a PONG to the receiver's PING).
    pub device_idle_closed: Counter,
}

impl Counters {
    /// New counters, registered in `metrics`.
    pub fn register(metrics: &Metrics) -> Counters {
        Counters {
            commands_written: metrics
                .counter("receiver_commands_written", "Command frames or Modbus requests written to devices"),
            results_forwarded: metrics
                .counter("receiver_results_forwarded", "Results reported to the gateway"),
            results_too_large: metrics.counter(
                "receiver_results_too_large",
                "Device answers over --max-result-bytes, reported as result_too_large (the command fails)",
            ),
            duplicate_results: metrics.counter(
                "receiver_duplicate_results",
                "Result frames dropped because their write was already answered",
            ),
            bad_frames: metrics.counter(
                "receiver_bad_frames",
                "Frames dropped for CRC, length, version, type or body errors, or unexpected",
            ),
            undeliverable: metrics.counter(
                "receiver_undeliverable",
                "Commands not written: device not here, queue full, canceled or expired",
            ),
            connections_rejected: metrics
                .counter("receiver_connections_rejected", "TCP connections closed without a valid HELLO"),
            device_auth_refused: metrics.counter(
                "receiver_device_auth_refused",
                "Device connections refused for a missing, wrong or outdated AUTH (the current connection is kept)",
            ),
            foreign_results: metrics.counter(
                "receiver_foreign_results",
                "RESULT frames dropped because their command was not written to that device here",
            ),
            device_connections: metrics.register(
                "receiver_device_connections",
                "TCP device connections open now, those still in their opening (TLS, HELLO, AUTH) included",
                Gauge::default(),
            ),
            device_connections_refused: metrics.counter(
                "receiver_device_connections_refused",
                "TCP device connections closed at once because --max-device-connections were open",
            ),
            device_handshakes_evicted: metrics.counter(
                "receiver_device_handshakes_evicted",
                "TCP connections closed in their opening to make room for a newer one (--max-device-handshakes)",
            ),
            device_handshake_timeouts: metrics.counter(
                "receiver_device_handshake_timeouts",
                "TCP connections closed without a valid HELLO (and AUTH) within --device-handshake-timeout-ms",
            ),
            device_idle_closed: metrics.counter(
                "receiver_device_idle_closed",
                "Device connections closed after --device-idle-timeout-ms of silence (no PONG to a PING)",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exported_with_the_receiver_prefix() {
        let metrics = Metrics::default();
        let counters = Counters::register(&metrics);
        counters.bad_frames.inc();
        let text = metrics.render();
        assert!(text.contains("receiver_bad_frames_total 1"), "{text}");
        assert!(text.contains("# HELP receiver_commands_written "), "{text}");
        assert!(!text.contains(".."), "prometheus-client ends each help text with a period itself: {text}");
        assert_eq!(counters.bad_frames.get(), 1);
    }
}
