//! The embedded MQTT broker (rumqttd), used when no `--broker` is given, and
//! how the gateway reaches its broker(s): [`prepare`] checks the access
//! settings (users, TLS, `--insecure`), starts the embedded broker or applies
//! the credentials for external ones.
//!
//! Access to the embedded broker: with `--mqtt-users-file` every client logs
//! in ([`users`]: Mosquitto password file hashes; client ids bound to their
//! users); an optional TLS listener (`--mqtts-listen` with
//! `--mqtt-tls-cert`/`--mqtt-tls-key`) beside the plain one. rumqttd has no
//! topic ACLs: any user may publish anywhere (docs/security/broker.md).
//!
//! rumqttd has no shutdown and binds its listener itself on its own threads, so
//! it runs on a dedicated thread for the life of the process. The gateway talks
//! to it over loopback with rumqttc, the same code as the external-broker path.
//!
//! rumqttd sets no TCP_NODELAY on the sockets it accepts, which costs a sync
//! command ~40 ms per hop (Nagle meeting delayed ACKs). On Linux an accepted
//! socket inherits TCP_NODELAY from its listener, and the listener lives in
//! this process: once it is bound we find it among our own file descriptors
//! and set the option on it. See docs/ARCHITECTURE.md.

pub mod guard;
pub mod users;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::{BorrowedFd, RawFd};

use plumbing::metrics::Counter;
use plumbing::mqtt::{BrokerAddr, Brokers, ClientAuth, Credentials, Password};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use socket2::SockRef;

use crate::config::Config as GatewayConfig;
use users::UsersFile;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot listen for MQTT on {addr}: {source}. Another broker probably holds port {port}. \
         Either give the embedded broker another address with --mqtt-listen 127.0.0.1:PORT \
         (env GATEWAY_MQTT_LISTEN), or use the broker that is already there with \
         --broker mqtt://HOST:{port} (env GATEWAY_BROKER)"
    )]
    PortTaken { addr: SocketAddr, port: u16, source: std::io::Error },
    #[error("the embedded broker did not start listening on {0} within 10 s (see its log above)")]
    NotListening(SocketAddr),
    #[error("the embedded broker's TLS {what} {path}: {reason} (--mqtt-tls-cert / --mqtt-tls-key)")]
    Tls { what: &'static str, path: PathBuf, reason: String },
}

/// What the embedded broker accepts, besides its plain listener.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Every client must log in as one of these (and use only its own client
    /// ids); `None`: anonymous clients too (`--insecure`, no users file).
    pub users: Option<Arc<UsersFile>>,
    /// A second listener speaking MQTT over TLS.
    pub tls: Option<TlsListener>,
    /// Counts refused logins (those that gave a user name).
    pub refused: Counter,
    /// What one client may cost ([`guard`]); `max_packet` is set from
    /// `start_embedded`'s `max_payload`.
    pub limits: Option<guard::Limits>,
    /// Where limit hits are counted.
    pub limit_metrics: guard::LimitMetrics,
    /// The gateway's instance id (its own clients are exempt from the per-user limits).
    pub instance_id: String,
}

/// The embedded broker's TLS listener: its address and PEM files.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub listen: SocketAddr,
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Starts rumqttd on an internal loopback port and its [`guard`] on
/// `listen` (and `access.tls`'s address, TLS ended by the guard), and returns
/// once both accept connections. `max_payload`: the largest packet, in bytes.
///
/// Returns the internal port's address: the gateway's own clients connect
/// there, straight to rumqttd (the same logins; the guard's limits are for
/// other clients), which spares every command and report a proxy hop.
pub fn start_embedded(
    listen: SocketAddr,
    max_payload: usize,
    access: Access,
) -> Result<SocketAddr, BrokerError> {
    let mut public = Vec::new();
    let tls =
        access.tls.as_ref().map(|t| (t.listen, guard::TlsFiles { cert: t.cert.clone(), key: t.key.clone() }));
    for (addr, tls) in std::iter::once((listen, None)).chain(tls.map(|(addr, files)| (addr, Some(files)))) {
        let listener = TcpListener::bind(addr).map_err(|source| BrokerError::PortTaken {
            addr,
            port: addr.port(),
            source,
        })?;
        // Accepted sockets inherit it (see `set_nodelay_on_listener`).
        let _ = SockRef::from(&listener).set_tcp_nodelay(true);
        public.push((listener, tls));
    }
    if let Some(tls) = &access.tls {
        tls_server_config(&tls.cert, &tls.key)?;
    }
    // rumqttd binds its listener itself: find a free port for it.
    let internal = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::PortTaken { addr: listen, port: 0, source })?;
    let limits = guard::Limits { max_packet: max_payload, ..access.limits.unwrap_or_else(default_limits) };
    let setup = guard::Setup {
        limits,
        metrics: access.limit_metrics.clone(),
        upstream: internal,
        instance_id: access.instance_id.clone(),
        anonymous: access.users.is_none(),
    };
    let config = config(internal, max_payload, access, &limits);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .expect("spawning a thread");
    wait_listening_with_nodelay(internal)?;
    guard::spawn(setup, public);
    Ok(internal)
}

/// The limits when none are given (the flags' defaults).
fn default_limits() -> guard::Limits {
    use crate::config as c;
    guard::Limits {
        max_connections: c::MQTT_MAX_CONNECTIONS as usize,
        max_connections_per_user: c::MQTT_MAX_CONNECTIONS_PER_USER as usize,
        max_filters_per_user: c::MQTT_MAX_FILTERS_PER_USER as usize,
        max_topics_per_user: c::MQTT_MAX_TOPICS_PER_USER as usize,
        new_names_per_second: c::MQTT_NEW_NAMES_PER_SECOND,
        new_names_burst: c::MQTT_NEW_NAMES_BURST,
        max_packet: 0,
        max_inflight: c::MQTT_MAX_INFLIGHT as usize,
    }
}

/// The limits `config` sets.
pub fn limits(config: &GatewayConfig) -> guard::Limits {
    guard::Limits {
        max_connections: config.mqtt_max_connections as usize,
        max_connections_per_user: config.mqtt_max_connections_per_user as usize,
        max_filters_per_user: config.mqtt_max_filters_per_user as usize,
        max_topics_per_user: config.mqtt_max_topics_per_user as usize,
        new_names_per_second: config.mqtt_new_names_per_second,
        new_names_burst: config.mqtt_new_names_burst,
        max_packet: config.mqtt_message_limit(),
        max_inflight: config.mqtt_max_inflight as usize,
    }
}

/// The TLS listener's server configuration from its files (read at each
/// connection, so replacing them rotates the certificate); the error names
/// what does not load or match.
pub(crate) fn tls_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_error =
        |what, path: &Path, reason: String| BrokerError::Tls { what, path: path.to_owned(), reason };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error("certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(tls_error("certificate", cert, "no CERTIFICATE block".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error("key", key, e.to_string()))?;
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, private))
            .map_err(|e| tls_error("certificate and key", cert, e.to_string()))?;
    Ok(Arc::new(config))
}

/// rumqttd's configuration: one plain listener on `listen` (the internal
/// port only the guard uses), the users' auth handler.
fn config(listen: SocketAddr, max_payload: usize, access: Access, limits: &guard::Limits) -> Config {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
        max_inflight_count: limits.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(users) = access.users {
        let log = Arc::new(RefusalLog::default());
        let refused = access.refused;
        connections.set_auth_handler(move |client_id: String, username: String, password: String| {
            let verdict = users.check(&client_id, &username, &password);
            if let Err(reason) = &verdict {
                refused.inc();
                log.refused(&client_id, &username, reason);
            }
            std::future::ready(verdict.is_ok())
        });
    }
    let server = |name: &str, listen, tls| ServerSettings {
        name: name.into(),
        listen,
        tls,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let servers = HashMap::from([("v4".to_owned(), server("v4", listen, None))]);
    Config {
        id: 0,
        router: RouterConfig {
            // The guard's clients, and room for a few the guard never sees.
            max_connections: limits.max_connections + 64,
            max_outgoing_packet_count: 500,
            // Per topic filter, the router keeps at most count × size bytes of messages.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(servers),
        ..Default::default()
    }
}

/// Waits until rumqttd's listener is bound (seen among our own sockets, so
/// nobody connects to it just to find out) and sets TCP_NODELAY on it.
fn wait_listening_with_nodelay(listen: SocketAddr) -> Result<(), BrokerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match set_nodelay_on_listener(listen.port()) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%listen, error = %e, "cannot set TCP_NODELAY on the broker listener; sync latency will suffer");
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(BrokerError::NotListening(listen))
}

/// Finds this process's listening TCP socket on `port` and sets TCP_NODELAY on
/// it. Returns whether one was found.
fn set_nodelay_on_listener(port: u16) -> std::io::Result<bool> {
    let mut found = false;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path())
            .map(|target| target.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: `fd` was an open socket of this process when listed. Another
        // thread may close it meanwhile; then the calls below fail or read
        // another descriptor's options, and only a listener on our port — which
        // rumqttd keeps for the life of the process — gets an option set.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        let listening_here = socket.is_listener().unwrap_or(false)
            && socket.local_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.port() == port);
        if listening_here {
            socket.set_tcp_nodelay(true)?;
            found = true;
        }
    }
    Ok(found)
}

/// Logs refused logins, at most one line a second (a flood of bad logins
/// must not flood the log); the line says how many were not logged since.
#[derive(Debug)]
struct RefusalLog {
    throttle: plumbing::throttle::Throttle,
}

impl Default for RefusalLog {
    fn default() -> RefusalLog {
        RefusalLog { throttle: plumbing::throttle::Throttle::new(Duration::from_secs(1)) }
    }
}

impl RefusalLog {
    fn refused(&self, client_id: &str, username: &str, reason: &users::Refusal) {
        let Some(unlogged) = self.throttle.pass() else { return };
        // Both come from the client: shortened, and quoted by `?`.
        let short = |text: &str| text.chars().take(64).collect::<String>();
        tracing::warn!(
            client_id = ?short(client_id),
            username = ?short(username),
            %reason,
            unlogged_refusals_before = unlogged,
            "the embedded MQTT broker refused a login"
        );
    }
}

/// Broker access settings that do not fit together, or are missing; each
/// names the flags that settle it.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "the embedded MQTT broker would accept anonymous clients: give it users with \
         --mqtt-users-file PATH (env GATEWAY_MQTT_USERS_FILE; a mosquitto_passwd file), \
         or run with --insecure on one machine"
    )]
    NoUsers,
    #[error(
        "the embedded MQTT broker's plain listener {0} is not on loopback: passwords would cross \
         the network in clear. Keep --mqtt-listen on 127.0.0.1 and give other machines \
         --mqtts-listen ADDR with --mqtt-tls-cert/--mqtt-tls-key, or run with --insecure"
    )]
    PlainNotLoopback(SocketAddr),
    #[error("--mqtts-listen needs both --mqtt-tls-cert and --mqtt-tls-key")]
    TlsFilesMissing,
    #[error("--mqtt-tls-cert/--mqtt-tls-key are for the embedded broker's TLS listener: give --mqtts-listen ADDR too")]
    TlsListenMissing,
    #[error(
        "no credentials for the MQTT broker {0}: give GATEWAY_BROKER_USERNAME with \
         GATEWAY_BROKER_PASSWORD or GATEWAY_BROKER_PASSWORD_FILE (or user:pass@ in --broker), \
         or run with --insecure"
    )]
    NoCredentials(String),
    #[error(transparent)]
    Users(#[from] users::UsersError),
    #[error(transparent)]
    Credentials(#[from] plumbing::mqtt::CredentialsError),
    #[error(transparent)]
    Tls(#[from] plumbing::mqtt::TlsSetupError),
    #[error(transparent)]
    Url(#[from] plumbing::mqtt::BadBrokerUrl),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The brokers this gateway uses, ready to connect to: with `--broker`, those
/// URLs with the `GATEWAY_BROKER_*` credentials and CA applied; without, the
/// embedded broker, started here with its users (plus an internal user named
/// `instance_id` for this gateway's own clients, password random per start)
/// and its TLS listener. `refused` counts the embedded broker's refused
/// logins, `limit_metrics` its clients' limit hits ([`guard`]).
///
/// Without `insecure`: the embedded broker needs a users file and a loopback
/// plain listener, an external broker needs credentials. Errors name the flags.
pub fn prepare(
    config: &GatewayConfig,
    instance_id: &str,
    refused: Counter,
    limit_metrics: guard::LimitMetrics,
) -> Result<Brokers, AccessError> {
    match &config.broker {
        Some(urls) => external(config, urls),
        None => embedded(config, instance_id, refused, limit_metrics),
    }
}

fn external(config: &GatewayConfig, urls: &str) -> Result<Brokers, AccessError> {
    let credentials = Credentials::from_settings(
        config.broker_username.as_deref(),
        config.broker_password.as_ref(),
        config.broker_password_file.as_deref(),
        "GATEWAY_BROKER_USERNAME / GATEWAY_BROKER_PASSWORD(_FILE)",
    )?;
    let auth = ClientAuth { credentials, ca_file: config.broker_ca_file.clone() };
    let brokers = urls.parse::<Brokers>()?.with_auth(&auth)?;
    if !config.insecure {
        if let Some(bare) = brokers.as_slice().iter().find(|b| b.credentials.is_none()) {
            return Err(AccessError::NoCredentials(bare.to_string()));
        }
    }
    for plain in brokers.as_slice().iter().filter(|b| !b.tls && b.credentials.is_some()) {
        if !is_loopback_host(&plain.host) {
            tracing::warn!(broker = %plain, "the broker password crosses the network in clear: use mqtts://");
        }
    }
    Ok(brokers)
}

fn embedded(
    config: &GatewayConfig,
    instance_id: &str,
    refused: Counter,
    limit_metrics: guard::LimitMetrics,
) -> Result<Brokers, AccessError> {
    let opened =
        config.mqtt_users_file.as_deref().map(|path| UsersFile::open(path, instance_id)).transpose()?;
    if !config.insecure {
        if opened.is_none() {
            return Err(AccessError::NoUsers);
        }
        if !config.mqtt_listen.ip().is_loopback() {
            return Err(AccessError::PlainNotLoopback(config.mqtt_listen));
        }
    }
    let tls = match (config.mqtts_listen, &config.mqtt_tls_cert, &config.mqtt_tls_key) {
        (Some(listen), Some(cert), Some(key)) => {
            Some(TlsListener { listen, cert: cert.clone(), key: key.clone() })
        }
        (Some(_), _, _) => return Err(AccessError::TlsFilesMissing),
        (None, None, None) => None,
        (None, _, _) => return Err(AccessError::TlsListenMissing),
    };
    let (users, credentials) = match opened {
        Some((users, password)) => {
            let own = Credentials { username: instance_id.to_owned(), password: Password::new(password) };
            (Some(Arc::new(users)), Some(own))
        }
        None => (None, None),
    };
    // Every message the system sends fits (`protocol::limits`).
    let access = Access {
        users,
        tls,
        refused,
        limits: Some(limits(config)),
        limit_metrics,
        instance_id: instance_id.to_owned(),
    };
    let internal = start_embedded(config.mqtt_listen, config.mqtt_message_limit(), access)?;
    let mut own = BrokerAddr::new(internal.ip().to_string(), internal.port());
    own.credentials = credentials;
    Ok(own.into())
}

/// Where other clients (receivers, callers, other gateways) reach the broker
/// `own` (what [`prepare`] returned): the embedded broker's `--mqtt-listen`
/// (its guard) with `own`'s login, or the external brokers themselves.
pub fn public(config: &GatewayConfig, own: &Brokers) -> Brokers {
    if config.broker.is_some() {
        return own.clone();
    }
    let mut public = BrokerAddr::new(config.mqtt_listen.ip().to_string(), config.mqtt_listen.port());
    public.credentials = own.as_slice().first().and_then(|b| b.credentials.clone());
    public.into()
}

/// `localhost` or a loopback IP address.
fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_names_the_port_and_both_ways_out() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = start_embedded(addr, 1024, Access::default()).unwrap_err().to_string();
        assert!(err.contains(&addr.port().to_string()), "{err}");
        assert!(err.contains("--mqtt-listen") && err.contains("--broker"), "{err}");
    }

    #[test]
    fn nodelay_is_set_on_our_own_listener_and_inherited() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(set_nodelay_on_listener(addr.port()).unwrap());
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    fn secure_config(mqtt_listen: &str) -> GatewayConfig {
        let mut config = GatewayConfig::for_local(
            "sqlite::memory:".into(),
            "127.0.0.1:0".parse().unwrap(),
            mqtt_listen.parse().unwrap(),
        );
        config.insecure = false;
        config
    }

    fn users_file(dir: &Path) -> PathBuf {
        let path = dir.join("users");
        // receiver-1 / s3cret! (mosquitto_passwd 2.0.11)
        std::fs::write(&path, "receiver-1:$7$101$DxcFuBrGDZbZYHi2$+QHZ35tzqrchCV4qLiuoTWDmh9FHykoCLNZKUwVuACX5B4wYsd2Em9DmgWp/BCNma7qAwKdP7T+Ea2YkTAZMdw==\n").unwrap();
        path
    }

    #[test]
    fn without_insecure_the_embedded_broker_needs_users_and_a_loopback_plain_listener() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let err = prepare(&secure_config(&free), "gw-t", Counter::default(), Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--mqtt-users-file") && err.contains("--insecure"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let mut config = secure_config("0.0.0.0:1883");
        config.mqtt_users_file = Some(users_file(dir.path()));
        let err = prepare(&config, "gw-t", Counter::default(), Default::default()).unwrap_err().to_string();
        assert!(err.contains("not on loopback") && err.contains("--mqtts-listen"), "{err}");
        config.mqtt_listen = "127.0.0.1:1883".parse().unwrap();
        config.mqtts_listen = Some("0.0.0.0:8883".parse().unwrap());
        let err = prepare(&config, "gw-t", Counter::default(), Default::default()).unwrap_err().to_string();
        assert!(err.contains("--mqtt-tls-cert"), "{err}");
        // The internal user may not be in the file.
        let mut config = secure_config(&free);
        config.mqtt_users_file = Some(users_file(dir.path()));
        let err =
            prepare(&config, "receiver-1", Counter::default(), Default::default()).unwrap_err().to_string();
        assert!(err.contains("internal user"), "{err}");
    }

    #[test]
    fn with_users_the_gateway_logs_in_to_its_own_broker() {
        let dir = tempfile::tempdir().unwrap();
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let mut config = secure_config(&free);
        config.mqtt_users_file = Some(users_file(dir.path()));
        let brokers = prepare(&config, "gw-t", Counter::default(), Default::default()).unwrap();
        let own = brokers.first().credentials.clone().unwrap();
        assert_eq!(own.username, "gw-t");
        assert_eq!(own.password.expose().len(), 64);
    }

    #[test]
    fn without_insecure_an_external_broker_needs_credentials() {
        let mut config = secure_config("127.0.0.1:1883");
        config.broker = Some("mqtt://a:1,mqtt://u:p@b:2".into());
        let err = prepare(&config, "gw-t", Counter::default(), Default::default()).unwrap_err().to_string();
        assert!(err.contains("GATEWAY_BROKER_USERNAME") && err.contains("mqtt://a:1"), "{err}");
        config.broker_username = Some("gw".into());
        config.broker_password = Some(Password::new("pw"));
        let brokers = prepare(&config, "gw-t", Counter::default(), Default::default()).unwrap();
        let users: Vec<_> =
            brokers.as_slice().iter().map(|b| b.credentials.clone().unwrap().username).collect();
        assert_eq!(users, ["gw", "u"]);
        assert!(!format!("{brokers:?} {brokers}").contains("pw"), "{brokers:?}");
        config.insecure = true;
        config.broker_username = None;
        config.broker_password = None;
        assert!(
            prepare(&config, "gw-t", Counter::default(), Default::default()).is_ok(),
            "--insecure: anonymous allowed"
        );
    }
}
