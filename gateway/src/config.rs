//! One typed configuration, read once from flags and `GATEWAY_*` environment
//! variables, passed down to every part.

use std::net::SocketAddr;

use clap::Args;

/// Settings of `gateway serve` (and of the gateway inside the demo).
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Database: `sqlite:PATH` (embedded default) or `mysql://USER:PASS@HOST:PORT/DB` (MySQL/MariaDB).
    #[arg(long, env = "GATEWAY_DATABASE_URL", default_value = "sqlite:gateway.db")]
    pub database_url: String,

    /// HTTP API listen address.
    #[arg(long, env = "GATEWAY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,

    /// Listen address of the embedded MQTT broker (ignored with --broker).
    #[arg(long, env = "GATEWAY_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,

    /// Use this external MQTT broker (mqtt://HOST:PORT) instead of embedding
    /// one; several, comma-separated (the nodes of a cluster), are tried in
    /// turn when the current one fails.
    #[arg(long, env = "GATEWAY_BROKER")]
    pub broker: Option<String>,

    /// Prefix of every MQTT topic the system uses.
    #[arg(long, env = "GATEWAY_TOPIC_PREFIX", default_value = protocol::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,

    /// A stable name for this instance (MQTT client ids and the event log
    /// derive from it). Unset: a fresh `gw-XXXXXXXX` at every start. Two live
    /// processes never share a name: the second refuses to start, naming it.
    /// A stable name keeps a persistent MQTT session for its reports across
    /// restarts; a generated one leaves nothing behind at the broker.
    #[arg(long, env = "GATEWAY_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Largest command payload accepted, in bytes (larger: 413); at most
    /// 1 MiB, what a device frame carries. Every limit along the way follows
    /// from it and `max_result_bytes` (`protocol::limits`).
    #[arg(long, env = "GATEWAY_MAX_PAYLOAD_BYTES", default_value_t = protocol::limits::DEFAULT_MAX_PAYLOAD)]
    pub max_payload_bytes: usize,

    /// Largest device answer the receivers forward, in bytes (their
    /// `--max-result-bytes`, which must not be larger); at most 1 MiB. Sizes
    /// the embedded broker's packet limit and the MQTT messages this gateway sends.
    #[arg(long, env = "GATEWAY_MAX_RESULT_BYTES", default_value_t = protocol::limits::DEFAULT_MAX_RESULT)]
    pub max_result_bytes: usize,

    /// How long a sync call waits when the request gives no wait_ms.
    #[arg(long, env = "GATEWAY_DEFAULT_WAIT_MS", default_value_t = 10_000)]
    pub default_wait_ms: u64,

    /// Deadline for a final result, from acceptance, when the request gives no ttl_ms.
    #[arg(long, env = "GATEWAY_DEFAULT_TTL_MS", default_value_t = 60_000)]
    pub default_ttl_ms: u64,

    /// Publication attempts per command when the request gives no max_attempts.
    #[arg(long, env = "GATEWAY_DEFAULT_MAX_ATTEMPTS", default_value_t = 5)]
    pub default_max_attempts: i64,

    /// A `sent` command with no delivery report after this long is due for a re-send.
    #[arg(long, env = "GATEWAY_ACK_TIMEOUT_MS", default_value_t = 5_000)]
    pub ack_timeout_ms: u64,

    /// A `delivered` command with no result after this long is due for a re-send
    /// (the device answers a repeat from memory, it does not run it twice).
    #[arg(long, env = "GATEWAY_RESULT_TIMEOUT_MS", default_value_t = 15_000)]
    pub result_timeout_ms: u64,

    /// Back-off before re-send n+1 grows from this (doubling, with jitter)...
    #[arg(long, env = "GATEWAY_RETRY_BASE_MS", default_value_t = 1_000)]
    pub retry_base_ms: u64,

    /// ...up to this.
    #[arg(long, env = "GATEWAY_RETRY_CAP_MS", default_value_t = 30_000)]
    pub retry_cap_ms: u64,

    /// How often the sweeper looks for due work (it also runs when a device comes online).
    #[arg(long, env = "GATEWAY_SWEEP_INTERVAL_MS", default_value_t = 500)]
    pub sweep_interval_ms: u64,

    /// Commands the sweeper claims per query.
    #[arg(long, env = "GATEWAY_SWEEP_BATCH", default_value_t = 200)]
    pub sweep_batch: i64,

    /// How long a sweeper's claim keeps other gateway instances off a command
    /// (never past its deadline): work claimed by an instance that dies is
    /// taken up by the others after this long.
    #[arg(long, env = "GATEWAY_CLAIM_LEASE_MS", default_value_t = 5_000)]
    pub claim_lease_ms: u64,

    /// After each connection to the broker the gateway asks receivers to
    /// report (roll call); devices held by a receiver that has not answered
    /// within this time are marked offline (it died while nobody listened).
    #[arg(long, env = "GATEWAY_ROLLCALL_GRACE_MS", default_value_t = 10_000)]
    pub rollcall_grace_ms: u64,
}

/// Longest a caller may ask to wait (sync `wait_ms`, long-poll `wait_ms`).
pub const MAX_WAIT_MS: u64 = 300_000;
/// Longest deadline a command may have.
pub const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most attempts a command may ask for.
pub const MAX_ATTEMPTS: i64 = 100;

impl Config {
    /// The largest MQTT message this system sends or carries, from the payload
    /// and result limits (`protocol::limits::mqtt_message_limit`).
    pub fn mqtt_message_limit(&self) -> usize {
        protocol::limits::mqtt_message_limit(self.max_payload_bytes.max(self.max_result_bytes))
    }

    /// Defaults for tests and the demo: everything on loopback, nothing fixed.
    pub fn for_local(database_url: String, http_listen: SocketAddr, mqtt_listen: SocketAddr) -> Config {
        Config {
            database_url,
            http_listen,
            mqtt_listen,
            broker: None,
            topic_prefix: protocol::topics::DEFAULT_PREFIX.into(),
            instance_id: None,
            max_payload_bytes: protocol::limits::DEFAULT_MAX_PAYLOAD,
            max_result_bytes: protocol::limits::DEFAULT_MAX_RESULT,
            default_wait_ms: 10_000,
            default_ttl_ms: 60_000,
            default_max_attempts: 5,
            ack_timeout_ms: 5_000,
            result_timeout_ms: 15_000,
            retry_base_ms: 1_000,
            retry_cap_ms: 30_000,
            sweep_interval_ms: 500,
            sweep_batch: 200,
            claim_lease_ms: 5_000,
            rollcall_grace_ms: 10_000,
        }
    }
}
