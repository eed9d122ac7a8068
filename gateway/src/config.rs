//! One typed configuration, read once — built-in defaults < a TOML file
//! (`--config`, `GATEWAY_CONFIG`) < `GATEWAY_*` environment variables <
//! flags, merged by `plumbing::config` — and passed down to every part.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use plumbing::mqtt::Password;
use plumbing::seal::Secret;
use serde::{Deserialize, Serialize};

/// Settings of `gateway serve` (and of the gateway inside the demo). As a
/// file (`plumbing::config::Settings<Config>`), keys are the field names;
/// secrets are never serialized.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

    /// SQLite: how long a sweeper's claim keeps other gateway instances off a
    /// command (never past its deadline): work claimed by an instance that
    /// dies is taken up by the others after this long. MySQL/MariaDB claims
    /// by row locks held until the batch commits, and ignores it.
    #[arg(long, env = "GATEWAY_CLAIM_LEASE_MS", default_value_t = 5_000)]
    pub claim_lease_ms: u64,

    /// After each connection to the broker the gateway asks receivers to
    /// report (roll call); devices held by a receiver that has not answered
    /// within this time are marked offline (it died while nobody listened).
    #[arg(long, env = "GATEWAY_ROLLCALL_GRACE_MS", default_value_t = 10_000)]
    pub rollcall_grace_ms: u64,

    /// Final commands (and their events) are deleted this long after they
    /// became final, in ms (default 30 days); 0 keeps them forever. An
    /// idempotency key is remembered as long as its command is kept.
    #[arg(long, env = "GATEWAY_RETENTION_MS", default_value_t = DEFAULT_RETENTION_MS)]
    pub retention_ms: u64,

    /// Commands deleted per retention statement (one short transaction
    /// each, so live traffic is never held up for long).
    #[arg(long, env = "GATEWAY_RETENTION_BATCH", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub retention_batch: i64,

    /// Most devices not in the registry whose presence is kept (receivers
    /// may report a device before it is registered); presence of further
    /// unregistered devices is refused and counted
    /// (`gateway_presence_unregistered_refused`). Registered devices are
    /// never refused.
    #[arg(long, env = "GATEWAY_MAX_UNREGISTERED_DEVICES", default_value_t = 10_000)]
    pub max_unregistered_devices: u64,

    /// Reports (delivered, results, undeliverable) one receiver may send per
    /// second, with bursts of 5 s worth; more are dropped and counted, their
    /// commands re-sent after the ack/result timeout (`receiver_limits`).
    #[arg(long, env = "GATEWAY_RECEIVER_REPORT_RATE", default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub receiver_report_rate: u32,

    /// Device presence messages one receiver may send per second, with
    /// bursts of 5 s worth (a receiver announcing all its devices at once);
    /// more are dropped and counted, corrected by its next announcement.
    #[arg(long, env = "GATEWAY_RECEIVER_PRESENCE_RATE", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub receiver_presence_rate: u32,

    /// Allow running without credentials: HTTP callers without API keys (none
    /// is checked), anonymous
    /// clients on the embedded broker (without a users file), unsigned
    /// gateway↔receiver messages (without a message secret), plain listeners
    /// off loopback. A credential that is configured is still used. For demos
    /// and tests on one machine only (docs/SECURITY.md); without it every one
    /// of these needs its credential, and the gateway refuses to start,
    /// naming what is missing.
    #[arg(long, env = "GATEWAY_INSECURE")]
    pub insecure: bool,

    /// The secret every receiver's message key derives from (PROTOCOL 4.7),
    /// shared by all gateway instances; at least 32 bytes (e.g. `openssl rand
    /// -base64 48`). Prefer the environment or the file form to a flag.
    #[arg(long, env = "GATEWAY_MESSAGE_SECRET", hide_env_values = true)]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub message_secret: Option<Secret>,

    /// A file holding the message secret (read at start; a trailing newline is ignored).
    #[arg(long, env = "GATEWAY_MESSAGE_SECRET_FILE")]
    pub message_secret_file: Option<PathBuf>,

    /// `RECEIVER=N`: refuse messages that receiver signs with a key
    /// generation below N (after rotating its key; repeatable). Default 1.
    #[arg(long, env = "GATEWAY_RECEIVER_KEY_MIN_GENERATION", value_delimiter = ',')]
    pub receiver_key_min_generation: Vec<String>,

    /// A signed message is accepted only if signed within this many ms of
    /// now (either way) and never twice.
    #[arg(long, env = "GATEWAY_MESSAGE_WINDOW_MS", default_value_t = plumbing::seal::DEFAULT_WINDOW_MS)]
    pub message_window_ms: i64,

    /// Serve the HTTP API over TLS with this certificate chain (PEM file,
    /// leaf first); needs --http-tls-key. Without TLS and without
    /// --insecure, the gateway listens for HTTP on loopback addresses only.
    #[arg(long, env = "GATEWAY_HTTP_TLS_CERT", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,

    /// The private key of --http-tls-cert (PEM file: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "GATEWAY_HTTP_TLS_KEY", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,

    /// The embedded broker's users: a Mosquitto password file (`USER:HASH`
    /// lines as `mosquitto_passwd` writes them, `$7$` or `$6$`). Given, every
    /// client logs in and may use only its own client ids (a user owns the
    /// id equal to its name and ids starting with `NAME-`). Read again when it
    /// changes. Required without --insecure (docs/security/broker.md).
    #[arg(long, env = "GATEWAY_MQTT_USERS_FILE")]
    pub mqtt_users_file: Option<PathBuf>,

    /// A second listener of the embedded broker speaking MQTT over TLS (with
    /// --mqtt-tls-cert and --mqtt-tls-key), for clients on other machines;
    /// the plain --mqtt-listen stays (on loopback unless --insecure).
    #[arg(long, env = "GATEWAY_MQTTS_LISTEN")]
    pub mqtts_listen: Option<SocketAddr>,

    /// PEM certificate chain (leaf first) of the --mqtts-listen listener;
    /// read again at each connection, so replacing the file rotates it.
    #[arg(long, env = "GATEWAY_MQTT_TLS_CERT")]
    pub mqtt_tls_cert: Option<PathBuf>,

    /// PEM private key of the --mqtts-listen listener.
    #[arg(long, env = "GATEWAY_MQTT_TLS_KEY")]
    pub mqtt_tls_key: Option<PathBuf>,

    /// Client connections the embedded broker takes at once; one more is
    /// answered "server unavailable" and closed
    /// (metric `gateway_mqtt_connections_refused_total`).
    #[arg(long, env = "GATEWAY_MQTT_MAX_CONNECTIONS", default_value_t = MQTT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub mqtt_max_connections: u32,

    /// Connections one broker user (an anonymous client id under
    /// --insecure) may hold at once; one more gets CONNACK "server
    /// unavailable" (`gateway_mqtt_user_connections_refused_total`).
    #[arg(long, env = "GATEWAY_MQTT_MAX_CONNECTIONS_PER_USER", default_value_t = MQTT_MAX_CONNECTIONS_PER_USER, value_parser = clap::value_parser!(u32).range(1..))]
    pub mqtt_max_connections_per_user: u32,

    /// Distinct topic filters one broker user may subscribe while the
    /// gateway runs (rumqttd keeps every filter, ~150 KB each, and matches
    /// each new topic against all). A receiver needs 3. Past it the
    /// connection is closed (`gateway_mqtt_filter_limit_hits_total`).
    #[arg(long, env = "GATEWAY_MQTT_MAX_FILTERS_PER_USER", default_value_t = MQTT_MAX_FILTERS_PER_USER, value_parser = clap::value_parser!(u32).range(1..))]
    pub mqtt_max_filters_per_user: u32,

    /// Distinct topic names one broker user may publish to while the gateway
    /// runs (rumqttd keeps every topic name). A receiver needs one per device
    /// plus a few: keep it above the devices of the largest receiver. Past it
    /// the connection is closed (`gateway_mqtt_topic_limit_hits_total`).
    #[arg(long, env = "GATEWAY_MQTT_MAX_TOPICS_PER_USER", default_value_t = MQTT_MAX_TOPICS_PER_USER, value_parser = clap::value_parser!(u32).range(1..))]
    pub mqtt_max_topics_per_user: u32,

    /// New topic filters and names per second one broker user may make after
    /// --mqtt-new-names-burst; faster, the broker stops reading that client
    /// until it may go on (`gateway_mqtt_new_names_delayed_total`).
    #[arg(long, env = "GATEWAY_MQTT_NEW_NAMES_PER_SECOND", default_value_t = MQTT_NEW_NAMES_PER_SECOND)]
    pub mqtt_new_names_per_second: NonZeroU32,

    /// New topic filters and names one broker user may make at once.
    #[arg(long, env = "GATEWAY_MQTT_NEW_NAMES_BURST", default_value_t = MQTT_NEW_NAMES_BURST)]
    pub mqtt_new_names_burst: NonZeroU32,

    /// Packets the embedded broker reads from one connection in a batch
    /// before serving others (rumqttd's `max_inflight_count`).
    #[arg(long, env = "GATEWAY_MQTT_MAX_INFLIGHT", default_value_t = MQTT_MAX_INFLIGHT, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub mqtt_max_inflight: u32,

    /// User name at the external --broker(s) (a URL's own `user:pass@` wins).
    #[arg(long, env = "GATEWAY_BROKER_USERNAME")]
    pub broker_username: Option<String>,

    /// Password at the external --broker(s); prefer the environment variable
    /// or --broker-password-file to a flag other users can see in `ps`.
    #[arg(long, env = "GATEWAY_BROKER_PASSWORD", hide_env_values = true)]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub broker_password: Option<Password>,

    /// File holding the password at the external --broker(s) (one line).
    #[arg(long, env = "GATEWAY_BROKER_PASSWORD_FILE")]
    pub broker_password_file: Option<PathBuf>,

    /// PEM CA certificate(s) that `mqtts://` brokers' certificates must chain
    /// to; unset: the system's roots.
    #[arg(long, env = "GATEWAY_BROKER_CA_FILE")]
    pub broker_ca_file: Option<PathBuf>,

    /// The fleet secret device keys derive from (hex or base64, at least 32
    /// bytes; the receivers' `--device-key-secret`): needed to issue keys
    /// (`POST /v1/devices/{id}/key`), PROTOCOL.md §5.9.
    #[arg(long, env = "GATEWAY_DEVICE_KEY_SECRET", hide_env_values = true, value_parser = plumbing::cli::SecretParser::<protocol::device_auth::FleetSecret>::new())]
    #[serde(default, skip_serializing, deserialize_with = "plumbing::config::secret")]
    pub device_key_secret: Option<protocol::device_auth::FleetSecret>,

    /// `--device-key-secret` read from this file instead (read at start).
    #[arg(long, env = "GATEWAY_DEVICE_KEY_SECRET_FILE", conflicts_with = "device_key_secret")]
    pub device_key_secret_file: Option<std::path::PathBuf>,

    /// Non-final commands (scheduled, pending, sent, delivered) one device may
    /// have; a submission past it is refused with 429 `device_queue_full`
    /// (an idempotent repeat of an accepted command is not). Checked by each
    /// instance's writer before its insert: exact for one instance; several
    /// instances sharing the database may overshoot by the batches the others
    /// have in flight at that moment (at most 128 each).
    #[arg(long, env = "GATEWAY_MAX_DEVICE_QUEUE", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_device_queue: u64,

    /// HTTP command submissions one API key may make per second, sustained
    /// (a token bucket per key id, per gateway instance); past it: 429
    /// `rate_limited` with `Retry-After`. 0: no limit. Not applied without
    /// API keys (`--insecure`): there is no caller identity to key it by.
    #[arg(long, env = "GATEWAY_SUBMIT_RATE_PER_KEY", default_value_t = 200)]
    pub submit_rate_per_key: u32,

    /// Submissions an API key may make at once before its rate applies (the bucket's size).
    #[arg(long, env = "GATEWAY_SUBMIT_BURST_PER_KEY", default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..))]
    pub submit_burst_per_key: u32,

    /// MQTT submissions waiting to be handled (256 are handled at once); one
    /// that arrives when this queue is full is answered `rejected` with 503
    /// `overloaded` and `retry_after_ms`, not queued.
    #[arg(long, env = "GATEWAY_MQTT_SUBMISSION_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub mqtt_submission_queue: u64,

    /// Most HTTP connections open at once (each one file descriptor). A new
    /// connection beyond it closes the oldest one with no request under way
    /// and takes its place; when every one has a request under way, it is
    /// answered `503` with `Retry-After` and closed (closed unanswered while
    /// 64 such answers are already under way).
    #[arg(long, env = "GATEWAY_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,

    /// Time a client has, in ms, for the TLS handshake and for sending a
    /// request's whole head (request line and headers), counted from the
    /// connection or, on a kept-alive HTTP/1 connection, from the previous
    /// answer; then the connection is closed (hyper's `header_read_timeout`).
    #[arg(long, env = "GATEWAY_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,

    /// A connection (HTTP/1 or HTTP/2) with no request under way for this
    /// many ms is closed gracefully.
    #[arg(long, env = "GATEWAY_HTTP_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub http_idle_timeout_ms: u64,

    /// Largest request head, in bytes: request line and headers together
    /// (hyper's read buffer; HTTP/2: the header list). Over it: hyper's
    /// `431` (`414` for a URI over 65,534 bytes). At least 8192.
    #[arg(long, env = "GATEWAY_HTTP_MAX_HEAD_BYTES", default_value_t = 32 * 1024)]
    pub http_max_head_bytes: usize,

    /// File descriptors kept out of the HTTP, broker and database shares
    /// (listeners, the runtime, log and database files, the gateway's own
    /// MQTT clients). At start the soft descriptor limit is raised to the
    /// hard one; if the shares and this reserve do not fit in it, the
    /// gateway refuses to start, naming the numbers.
    #[arg(long, env = "GATEWAY_FD_RESERVE", default_value_t = 256)]
    pub fd_reserve: usize,

    /// How long a graceful shutdown (SIGTERM, Ctrl-C) lets sync calls and
    /// long-polls under way wait for their command to become final, in ms;
    /// then they are answered `202` with the command as it stands. New
    /// submissions are refused (`503 shutting_down`) from the signal on.
    /// Keep it below the service manager's stop timeout (systemd
    /// `TimeoutStopSec`).
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE_MS", default_value_t = DEFAULT_SHUTDOWN_GRACE_MS, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_MS))]
    pub shutdown_grace_ms: u64,

    /// Log lines as `text` (for people) or `json` (one object per line, for
    /// log pipelines; `command_id`/`device_id` are fields of their own).
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value_t = plumbing::cli::LogFormat::Text)]
    pub log_format: plumbing::cli::LogFormat,
}

/// Default `--shutdown-grace-ms`.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 5_000;

/// `--device-key-secret`'s parser: the error says why, never the value.
fn parse_secret(text: &str) -> Result<protocol::device_auth::FleetSecret, String> {
    protocol::device_auth::FleetSecret::parse(text).map_err(|e| format!("not a usable fleet secret: {e}"))
}

/// Default `--retention-ms`: 30 days.
pub const DEFAULT_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;

/// Defaults of the embedded broker's limits (`--mqtt-max-*`, `--mqtt-new-names-*`).
pub const MQTT_MAX_CONNECTIONS: u32 = 4_096;
pub const MQTT_MAX_CONNECTIONS_PER_USER: u32 = 16;
pub const MQTT_MAX_FILTERS_PER_USER: u32 = 32;
pub const MQTT_MAX_TOPICS_PER_USER: u32 = 100_000;
pub const MQTT_NEW_NAMES_PER_SECOND: NonZeroU32 = NonZeroU32::new(1_000).expect("not zero");
pub const MQTT_NEW_NAMES_BURST: NonZeroU32 = NonZeroU32::new(20_000).expect("not zero");
pub const MQTT_MAX_INFLIGHT: u32 = 500;

/// Longest a caller may ask to wait (sync `wait_ms`, long-poll `wait_ms`).
pub const MAX_WAIT_MS: u64 = 300_000;
/// Longest deadline a command may have.
pub const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most attempts a command may ask for.
pub const MAX_ATTEMPTS: i64 = 100;

impl plumbing::config::ConfigFile for Config {
    const FILE_ENV: &'static str = "GATEWAY_CONFIG";

    /// What clap's `requires`/`conflicts_with` say among flags, for the merged result.
    fn check(&self) -> anyhow::Result<()> {
        if self.http_tls_cert.is_some() != self.http_tls_key.is_some() {
            bail!("http_tls_cert and http_tls_key go together: give both, or neither");
        }
        if self.device_key_secret.is_some() && self.device_key_secret_file.is_some() {
            bail!("device_key_secret and device_key_secret_file: give one, not both");
        }
        Ok(())
    }
}

impl Config {
    /// The message secret's bytes, from the flag/environment or the file;
    /// `None` if neither is set. Errors: unreadable file, fewer than 32 bytes.
    pub fn message_secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let secret =
            plumbing::seal::read_secret(self.message_secret.as_ref(), self.message_secret_file.as_deref())?;
        match secret {
            Some(s) if s.expose().len() < protocol::seal::MIN_SECRET_LEN => bail!(
                "the message secret is {} bytes; at least {} are needed",
                s.expose().len(),
                protocol::seal::MIN_SECRET_LEN
            ),
            s => Ok(s.map(|s| s.expose().as_bytes().to_vec())),
        }
    }

    /// The largest MQTT message this system sends or carries, from the payload
    /// and result limits (`protocol::limits::mqtt_message_limit`).
    pub fn mqtt_message_limit(&self) -> usize {
        protocol::limits::mqtt_message_limit(self.max_payload_bytes.max(self.max_result_bytes))
    }

    /// Defaults for tests and the demo: everything on loopback, nothing fixed,
    /// no credentials (`insecure`).
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
            retention_ms: DEFAULT_RETENTION_MS,
            retention_batch: 500,
            max_unregistered_devices: 10_000,
            receiver_report_rate: 50_000,
            receiver_presence_rate: 10_000,
            insecure: true,
            message_secret: None,
            message_secret_file: None,
            receiver_key_min_generation: Vec::new(),
            message_window_ms: plumbing::seal::DEFAULT_WINDOW_MS,
            http_tls_cert: None,
            http_tls_key: None,
            mqtt_users_file: None,
            mqtts_listen: None,
            mqtt_tls_cert: None,
            mqtt_tls_key: None,
            mqtt_max_connections: MQTT_MAX_CONNECTIONS,
            mqtt_max_connections_per_user: MQTT_MAX_CONNECTIONS_PER_USER,
            mqtt_max_filters_per_user: MQTT_MAX_FILTERS_PER_USER,
            mqtt_max_topics_per_user: MQTT_MAX_TOPICS_PER_USER,
            mqtt_new_names_per_second: MQTT_NEW_NAMES_PER_SECOND,
            mqtt_new_names_burst: MQTT_NEW_NAMES_BURST,
            mqtt_max_inflight: MQTT_MAX_INFLIGHT,
            broker_username: None,
            broker_password: None,
            broker_password_file: None,
            broker_ca_file: None,
            device_key_secret: None,
            device_key_secret_file: None,
            max_device_queue: 200,
            submit_rate_per_key: 200,
            submit_burst_per_key: 400,
            mqtt_submission_queue: 1024,
            http_max_connections: 1024,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            http_max_head_bytes: 32 * 1024,
            fd_reserve: 256,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            log_format: plumbing::cli::LogFormat::Text,
        }
    }

    /// Whether HTTP callers must present an API key (`http::auth`): always,
    /// unless `--insecure`.
    pub fn api_keys_required(&self) -> bool {
        !self.insecure
    }

    /// Reads `--device-key-secret-file` into `device_key_secret`; the error names the file.
    pub fn load_secret_files(&mut self) -> anyhow::Result<()> {
        if let Some(path) = self.device_key_secret_file.take() {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                anyhow::anyhow!("cannot read --device-key-secret-file {}: {e}", path.display())
            })?;
            let secret = parse_secret(&text)
                .map_err(|e| anyhow::anyhow!("--device-key-secret-file {}: {e}", path.display()))?;
            self.device_key_secret = Some(secret);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    fn load(args: &[&str]) -> Config {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        plumbing::config::load_args("gateway", &args).unwrap()
    }

    /// deploy/gateway.toml sets every key (unset ones commented out) to its default.
    #[test]
    fn the_example_file_yields_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/gateway.toml");
        plumbing::config::check_example_file::<Config>("gateway", path.as_ref(), "gateway config").unwrap();
    }

    /// Secrets work from the file, inline or through their `*_file` keys.
    #[test]
    fn secrets_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = dir.path().join("fleet");
        std::fs::write(&fleet, format!("{}\n", "ab".repeat(32))).unwrap();
        let message = "m".repeat(40);
        let toml = format!(
            "message_secret = \"{message}\"\nbroker_password = \"pw-from-file\"\ndevice_key_secret_file = {:?}\n",
            fleet.display()
        );
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        let mut config = load(&["--config", path.to_str().unwrap()]);
        assert_eq!(config.message_secret().unwrap().unwrap(), message.as_bytes());
        assert_eq!(config.broker_password.as_ref().unwrap().expose(), "pw-from-file");
        config.load_secret_files().unwrap();
        assert!(config.device_key_secret.is_some(), "read from device_key_secret_file");
    }

    /// `for_local` (tests, the demo) keeps the defaults but for its arguments and `insecure`.
    #[test]
    fn for_local_differs_from_the_defaults_only_where_it_says() {
        let defaults = load(&[]);
        let mut local =
            Config::for_local(defaults.database_url.clone(), defaults.http_listen, defaults.mqtt_listen);
        local.insecure = false;
        assert_eq!(serde_json::to_value(local).unwrap(), serde_json::to_value(defaults).unwrap());
    }
}
