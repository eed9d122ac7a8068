//! MQTT client side shared by the gateway and the receiver: broker URLs,
//! rumqttc options with the settings both need, and [`drive`], the loop that
//! polls a connection's event loop until shutdown, moving to the next of its
//! [`Brokers`] whenever a connection attempt or a connection fails.
//!
//! rumqttc pitfalls this module exists for (see `shared/notes/dependencies.md`):
//! TCP_NODELAY is off by default (a request→reply round trip then stalls on
//! delayed ACKs); the default packet limit is 10 KiB; and the event loop must
//! be polled all the time — awaiting a publish from the polling task can
//! deadlock once the request channel is full (rumqttc #1025).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet,
    TlsConfiguration, Transport,
};
use rumqttc::{Publish, QoS};
use tokio_util::sync::CancellationToken;

/// Largest MQTT packet our clients accept or send: above the largest
/// message the system sends (`protocol::limits::mqtt_message_limit` of
/// 1 MiB, about 1.4 MB), so a legal message is never refused here — senders
/// keep to the message limit themselves. rumqttc's own default (10 KiB) would not do.
pub const MAX_PACKET: usize = 2 * 1024 * 1024;

/// Capacity of rumqttc's request channel. When full, `publish().await` waits.
const REQUEST_CHANNEL: usize = 1024;

/// Pause after a connection error before polling (and so connecting, to the
/// same broker or the next) again.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Keep-alive of every connection: a broker that vanished is noticed within
/// about 1.5 × this (and the next broker tried).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Publishes sent and not yet acknowledged, per connection.
const INFLIGHT: u16 = 100;

/// A broker URL that is not `mqtt://[USER[:PASS]@]HOST:PORT` (or `mqtts://`),
/// or an empty broker list; the offending text, its password masked.
#[derive(Debug, thiserror::Error)]
#[error("broker URL {0:?} is not mqtt://[USER:PASS@]HOST:PORT or mqtts://[USER:PASS@]HOST:PORT")]
pub struct BadBrokerUrl(String);

impl BadBrokerUrl {
    fn new(url: &str) -> BadBrokerUrl {
        BadBrokerUrl(mask_userinfo(url))
    }
}

/// `url` with the password of every `user:pass@` replaced by `***`, for
/// error messages (a broker list may hold several).
fn mask_userinfo(url: &str) -> String {
    url.split(',')
        .map(|item| match item.rsplit_once('@') {
            Some((before, host)) => match before.split_once("://") {
                Some((scheme, userinfo)) => format!("{scheme}://{}@{host}", mask_one(userinfo)),
                None => format!("{}@{host}", mask_one(before)),
            },
            None => item.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn mask_one(userinfo: &str) -> String {
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_owned(),
    }
}

/// A secret (a broker password): compared and cloned like a string, never
/// shown — `Debug` and `Display` print `***`. [`Password::expose`] is the
/// one way to the text, for the CONNECT packet.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Password {
        Password(text.into())
    }

    /// The password itself: only for sending it to the broker.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Password {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Password, Self::Err> {
        Ok(Password(text.to_owned()))
    }
}

/// A user name and password a client sends in its CONNECT. `Debug` shows the
/// user name only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Password,
}

/// Broker credentials given by flag or environment that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("a broker password is given but no user name: set {0}")]
    PasswordWithoutUser(&'static str),
    #[error("give the broker password either directly or as a file, not both ({0})")]
    TwoPasswords(&'static str),
    #[error("cannot read the broker password file {path}: {source}")]
    PasswordFile { path: PathBuf, source: std::io::Error },
}

impl Credentials {
    /// Credentials from a program's settings: a user name with a password
    /// given directly or read from a file (its content without the final
    /// line break). `None` when no user name and no password is given; a
    /// user name alone gets an empty password. `names` (e.g.
    /// `"GATEWAY_BROKER_USERNAME / GATEWAY_BROKER_PASSWORD(_FILE)"`) is quoted
    /// in the errors.
    ///
    /// Errors: a password without a user name, both a password and a
    /// password file, an unreadable file.
    pub fn from_settings(
        username: Option<&str>,
        password: Option<&Password>,
        password_file: Option<&Path>,
        names: &'static str,
    ) -> Result<Option<Credentials>, CredentialsError> {
        let password = match (password, password_file) {
            (Some(_), Some(_)) => return Err(CredentialsError::TwoPasswords(names)),
            (Some(password), None) => Some(password.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| CredentialsError::PasswordFile { path: path.to_owned(), source })?;
                Some(Password(text.trim_end_matches(['\n', '\r']).to_owned()))
            }
            (None, None) => None,
        };
        match (username, password) {
            (Some(username), password) => Ok(Some(Credentials {
                username: username.to_owned(),
                password: password.unwrap_or_default(),
            })),
            (None, Some(_)) => Err(CredentialsError::PasswordWithoutUser(names)),
            (None, None) => Ok(None),
        }
    }
}

/// Where a broker listens, whether over TLS, and as whom to log in there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (IPv6 without brackets); over TLS, the name
    /// the broker's certificate must carry.
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS, the broker's certificate checked against the roots
    /// given to [`Brokers::with_auth`] (a CA file, or the system's).
    pub tls: bool,
    /// From the URL's `user:pass@`, or [`Brokers::with_auth`]; `None`: anonymous.
    pub credentials: Option<Credentials>,
}

impl BrokerAddr {
    /// A plain (`mqtt://`), anonymous broker address.
    pub fn new(host: impl Into<String>, port: u16) -> BrokerAddr {
        BrokerAddr { host: host.into(), port, tls: false, credentials: None }
    }
}

impl std::fmt::Display for BrokerAddr {
    /// `mqtt://HOST:PORT` or `mqtts://…`, with `USER@` when it logs in: the
    /// password is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        match &self.credentials {
            Some(c) => write!(f, "{scheme}://{}@{}:{}", c.username, self.host, self.port),
            None => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

impl std::str::FromStr for BrokerAddr {
    type Err = BadBrokerUrl;

    /// `mqtt://host:port` (or `tcp://`, or bare `host:port`; the port defaults
    /// to 1883, MQTT's IANA port; IPv6 hosts in brackets), or
    /// `mqtts://host:port` for TLS (port default 8883). Either may carry
    /// `user:password@` before the host, percent-encoded (`%40` for `@`).
    fn from_str(url: &str) -> Result<BrokerAddr, BadBrokerUrl> {
        let bad = || BadBrokerUrl::new(url);
        let (tls, rest) = match url.strip_prefix("mqtts://") {
            Some(rest) => (true, rest),
            None => {
                (false, url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://")).unwrap_or(url))
            }
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(parse_userinfo(userinfo).ok_or_else(bad)?), rest),
            None => (None, rest),
        };
        if rest.is_empty() || rest.contains('/') {
            return Err(bad());
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() => {
                (host.trim_start_matches('[').trim_end_matches(']'), port.parse().map_err(|_| bad())?)
            }
            Some(_) => return Err(bad()),
            None => (rest, default_port),
        };
        Ok(BrokerAddr { host: host.to_owned(), port, tls, credentials })
    }
}

/// `user[:password]`, each percent-decoded; `None` if empty or not UTF-8.
fn parse_userinfo(userinfo: &str) -> Option<Credentials> {
    let decode =
        |text: &str| percent_encoding::percent_decode_str(text).decode_utf8().ok().map(|t| t.into_owned());
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let username = decode(user).filter(|u| !u.is_empty())?;
    Some(Credentials { username, password: Password(decode(password)?) })
}

/// How a program's clients log in to its brokers and check them, from its
/// settings (flags / environment); applied by [`Brokers::with_auth`].
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// For every broker whose URL names no user.
    pub credentials: Option<Credentials>,
    /// PEM file of the CA certificate(s) that `mqtts://` brokers' certificates
    /// must chain to; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// TLS client settings that cannot be built: the CA file or the system roots.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA certificates from {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("no CA certificate in {0} (PEM `CERTIFICATE` blocks expected)")]
    NoCa(PathBuf),
    #[error("no system root certificates found for mqtts:// (give a CA file: --broker-ca-file)")]
    NoSystemRoots,
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client settings of `mqtts://` connections: the certificates in
/// `ca_file` (PEM) as the only roots, or the system's roots. TLS 1.2 and 1.3
/// with the `ring` provider; no client certificate.
pub fn tls_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_error = |reason: String| TlsSetupError::CaFile { path: path.to_owned(), reason };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))? {
                roots.add(cert.map_err(|e| ca_error(e.to_string()))?).map_err(|e| ca_error(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(TlsSetupError::NoCa(path.to_owned()));
            }
        }
        None => {
            let (added, _ignored) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(TlsSetupError::NoSystemRoots);
            }
        }
    }
    Ok(Arc::new(client_config(roots)?))
}

fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// For an `mqtts://` broker whose [`Brokers`] were given no TLS settings
/// ([`Brokers::with_auth`] not called): the system's roots, or, when it has
/// none, no roots at all — the connection then fails on the certificate.
fn system_roots_or_none() -> Arc<rustls::ClientConfig> {
    tls_client_config(None).unwrap_or_else(|error| {
        tracing::error!(%error, "no TLS roots for mqtts://: connections will fail");
        let none =
            client_config(rustls::RootCertStore::empty()).expect("ring supports the default TLS versions");
        Arc::new(none)
    })
}

/// The brokers one client may use, in the order it tries them: it connects
/// to the first and moves to the next (round robin) whenever a connection
/// attempt or an established connection fails (see [`drive`]). Never empty;
/// one broker is the plain case. Also holds the TLS settings of its
/// `mqtts://` brokers.
///
/// Parsed from a comma-separated list of [`BrokerAddr`] URLs,
/// `mqtt://h1:1883,mqtts://user:pass@h2:8883` (spaces around items are
/// ignored); displayed the same way without passwords.
#[derive(Clone)]
pub struct Brokers {
    addrs: Vec<BrokerAddr>,
    /// Set by [`Brokers::with_auth`]; an `mqtts://` broker without it uses
    /// the system's roots.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl PartialEq for Brokers {
    fn eq(&self, other: &Brokers) -> bool {
        self.addrs == other.addrs
    }
}

impl Eq for Brokers {}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Brokers").field("addrs", &self.addrs).field("tls", &self.tls.is_some()).finish()
    }
}

impl Brokers {
    /// These brokers in this order; `None` when `addrs` is empty.
    pub fn new(addrs: Vec<BrokerAddr>) -> Option<Brokers> {
        (!addrs.is_empty()).then_some(Brokers { addrs, tls: None })
    }

    /// The broker a new client connects to first.
    pub fn first(&self) -> &BrokerAddr {
        &self.addrs[0]
    }

    /// Every broker, in the order they are tried (at least one).
    pub fn as_slice(&self) -> &[BrokerAddr] {
        &self.addrs
    }

    /// These brokers with `auth` applied: its credentials for each broker
    /// whose URL names no user, and, if any broker is `mqtts://`, the TLS
    /// roots (its CA file, or the system's). Errors: the CA file cannot be
    /// read or holds no certificate; no system roots.
    pub fn with_auth(mut self, auth: &ClientAuth) -> Result<Brokers, TlsSetupError> {
        for addr in &mut self.addrs {
            if addr.credentials.is_none() {
                addr.credentials = auth.credentials.clone();
            }
        }
        if self.addrs.iter().any(|a| a.tls) || auth.ca_file.is_some() {
            self.tls = Some(tls_client_config(auth.ca_file.as_deref())?);
        }
        Ok(self)
    }

    /// Whether every broker has credentials to log in with.
    pub fn all_have_credentials(&self) -> bool {
        self.addrs.iter().all(|a| a.credentials.is_some())
    }
}

impl From<BrokerAddr> for Brokers {
    fn from(addr: BrokerAddr) -> Brokers {
        Brokers { addrs: vec![addr], tls: None }
    }
}

impl std::fmt::Display for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, addr) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Brokers {
    type Err = BadBrokerUrl;

    /// One or more [`BrokerAddr`] URLs separated by commas. Fails on the first
    /// item that is not a broker URL (an empty item included).
    fn from_str(urls: &str) -> Result<Brokers, BadBrokerUrl> {
        let addrs = urls.split(',').map(|url| url.trim().parse()).collect::<Result<Vec<_>, _>>()?;
        Brokers::new(addrs).ok_or_else(|| BadBrokerUrl::new(urls))
    }
}

/// Which of its brokers a connection uses, and which it tries after a
/// failure: the next one, round robin. Pure, so it is tested without a broker.
#[derive(Debug)]
struct Rotation<'a> {
    brokers: &'a Brokers,
    at: usize,
}

impl<'a> Rotation<'a> {
    /// Starting at the broker `(host, port)` names (the first one if none does).
    fn starting_at(brokers: &'a Brokers, (host, port): (String, u16)) -> Rotation<'a> {
        let at = brokers.addrs.iter().position(|b| b.host == host && b.port == port).unwrap_or(0);
        Rotation { brokers, at }
    }

    fn current(&self) -> &'a BrokerAddr {
        &self.brokers.addrs[self.at]
    }

    /// After a failure: the broker to try next, or `None` when that is the
    /// same one (a single broker: nothing to change).
    fn advance(&mut self) -> Option<&'a BrokerAddr> {
        let count = self.brokers.addrs.len();
        if count == 1 {
            return None;
        }
        self.at = (self.at + 1) % count;
        Some(self.current())
    }
}

/// Options for one client connection.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// The MQTT client id; unique per broker.
    pub client_id: String,
    /// Start every connection with a fresh session (subscriptions and
    /// unacknowledged messages forgotten).
    pub clean_session: bool,
    /// Acknowledge each publish with `AsyncClient::ack` (after its effect is durable).
    pub manual_acks: bool,
    /// What the broker publishes when the client vanishes without a DISCONNECT.
    pub last_will: Option<LastWill>,
}

/// A client and its event loop (which the caller must poll all the time, see
/// [`drive`]). The event loop connects to `brokers.first()` at its first poll;
/// [`drive`] moves it along `brokers`.
pub fn client(brokers: &Brokers, spec: ClientSpec) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options(brokers, brokers.first(), spec), REQUEST_CHANNEL);
    let mut network = NetworkOptions::new();
    // Without it a request→reply round trip stalls ~40 ms on delayed ACKs.
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(5);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// The rumqttc options of a connection to `broker` (one of `brokers`): the
/// one place the settings are chosen, for the first broker and for every
/// move. Its credentials go into the CONNECT; `mqtts://` connects with the
/// TLS settings of `brokers` (the system's roots if none were given).
fn options(brokers: &Brokers, broker: &BrokerAddr, spec: ClientSpec) -> MqttOptions {
    let mut options = MqttOptions::new(spec.client_id, broker.host.clone(), broker.port);
    if let Some(credentials) = &broker.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.expose());
    }
    if broker.tls {
        let config = brokers.tls.clone().unwrap_or_else(system_roots_or_none);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    options
        .set_keep_alive(KEEP_ALIVE)
        .set_clean_session(spec.clean_session)
        .set_manual_acks(spec.manual_acks)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(INFLIGHT);
    if let Some(will) = spec.last_will {
        options.set_last_will(will);
    }
    options
}

/// `current` (options made by [`options`]) for another broker, every other
/// setting kept. rumqttc has no setter for the address, so the options are
/// built again from the [`ClientSpec`] they were made from.
fn retarget(current: &MqttOptions, brokers: &Brokers, broker: &BrokerAddr) -> MqttOptions {
    let spec = ClientSpec {
        client_id: current.client_id(),
        clean_session: current.clean_session(),
        manual_acks: current.manual_acks(),
        last_will: current.last_will(),
    };
    options(brokers, broker, spec)
}

/// What a connection does with the events of its event loop. Both methods
/// run on the polling task: they must never wait on the client's request
/// channel (publish, subscribe, ack), which only that task drains — spawn
/// such work instead.
pub trait Session: Send {
    /// The broker acknowledged a (re)connection: subscribe, announce.
    fn connected(&mut self);

    /// A publish arrived. Returns false to stop polling.
    fn received(&mut self, publish: Publish) -> impl Future<Output = bool> + Send;

    /// The connection failed (or could not be made); [`drive`] pauses, then
    /// connects again, to the next of its brokers if it has several.
    fn disconnected(&mut self, _error: &ConnectionError) {}
}

/// Polls `eventloop` (made by [`client`] with these `brokers`) until
/// `shutdown` (or the session stops it), feeding its events to `session`.
/// After an error — a connection attempt refused or timed out, or an
/// established connection lost — it pauses [`RECONNECT_PAUSE`] and connects
/// to the next broker of `brokers`, round robin (with one broker: the same
/// one again). Each connection is logged at info with its broker. Returns the
/// event loop untouched by any disconnect, so the caller may still say
/// goodbye on it.
pub async fn drive(
    eventloop: &mut EventLoop,
    brokers: &Brokers,
    session: &mut impl Session,
    shutdown: &CancellationToken,
) {
    let mut rotation = Rotation::starting_at(brokers, eventloop.mqtt_options.broker_address());
    // A broker may refuse a subscription (NATS does while JetStream elects a
    // leader after a node died): the session then subscribes again, or it
    // would stay connected and deaf.
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep_until(resubscribe_at) => {
                resubscribe_at = None;
                tracing::info!(broker = %rotation.current(), "subscribing again after a refused subscription");
                session.connected();
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(broker = %rotation.current(), "connected to the broker");
                resubscribe_at = None;
                session.connected();
            }
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                tracing::warn!(broker = %rotation.current(), "the broker refused a subscription; subscribing again shortly");
                resubscribe_at.get_or_insert(tokio::time::Instant::now() + RESUBSCRIBE_PAUSE);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if !session.received(publish).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                let failed = rotation.current();
                session.disconnected(&error);
                match rotation.advance() {
                    Some(next) => {
                        tracing::warn!(%error, broker = %failed, %next, "MQTT connection error; trying the next broker");
                        // Only the address changes: the session state, the
                        // pending publishes and the request channel stay.
                        eventloop.mqtt_options = retarget(&eventloop.mqtt_options, brokers, next);
                    }
                    None => tracing::warn!(%error, broker = %failed, "MQTT connection error; reconnecting"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
            }
        }
    }
}

/// Says DISCONNECT on `client`'s connection and polls `eventloop` (no
/// longer driven by [`drive`]) until it has left, the connection failed, or
/// `within` has passed: a clean goodbye, so the broker does not wait out a
/// keep-alive (nor publish a last will).
pub async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop, within: Duration) {
    if client.try_disconnect().is_err() {
        return;
    }
    let gone = tokio::time::timeout(within, async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                return;
            }
        }
    });
    if gone.await.is_err() {
        tracing::debug!("DISCONNECT did not leave in time");
    }
}

/// Pause before subscribing again after the broker refused a subscription.
pub const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Subscribes to each filter at QoS 1 (from a task of its own, see [`Session`]).
pub async fn subscribe_all(client: &AsyncClient, filters: &[String]) {
    for filter in filters {
        if let Err(error) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
            tracing::warn!(%filter, %error, "subscribe failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(url: &str) -> Result<BrokerAddr, BadBrokerUrl> {
        url.parse()
    }

    #[test]
    fn broker_urls() {
        assert_eq!(addr("mqtt://127.0.0.1:1884").unwrap(), BrokerAddr::new("127.0.0.1", 1884));
        assert_eq!(addr("localhost").unwrap(), BrokerAddr::new("localhost", 1883));
        assert_eq!(addr("mqtt://[::1]:1883").unwrap(), BrokerAddr::new("::1", 1883));
        assert!(addr("mqtt://h:notaport").is_err());
        assert!(addr("http://h:1/x").is_err());
        assert_eq!(addr("tcp://h:1").unwrap().to_string(), "mqtt://h:1");
    }

    fn brokers(urls: &str) -> Brokers {
        urls.parse().unwrap_or_else(|e| panic!("{urls}: {e}"))
    }

    #[test]
    fn broker_lists_parse_and_display_back() {
        let one = brokers("mqtt://127.0.0.1:1884");
        assert_eq!(one, Brokers::from(addr("mqtt://127.0.0.1:1884").unwrap()));
        assert_eq!(one.to_string(), "mqtt://127.0.0.1:1884");
        let three = brokers("mqtt://a:1, tcp://b:2,c");
        let hosts: Vec<_> = three.as_slice().iter().map(|b| (b.host.as_str(), b.port)).collect();
        assert_eq!(hosts, [("a", 1), ("b", 2), ("c", 1883)]);
        assert_eq!(three.first().host, "a");
        assert_eq!(three.to_string(), "mqtt://a:1,mqtt://b:2,mqtt://c:1883");
        assert_eq!(brokers(&three.to_string()), three);
        for bad in ["", "mqtt://a:1,", ",mqtt://a:1", "mqtt://a:1,,mqtt://b:2", "mqtt://a:1,http://b/x"] {
            assert!(bad.parse::<Brokers>().is_err(), "{bad:?}");
        }
        assert!(Brokers::new(Vec::new()).is_none());
    }

    #[test]
    fn rotation_moves_round_robin_and_stays_with_one_broker() {
        let list = brokers("mqtt://a:1,mqtt://b:2,mqtt://c:3");
        let mut rotation = Rotation::starting_at(&list, ("a".into(), 1));
        assert_eq!(rotation.current().host, "a");
        let tried: Vec<_> = (0..4).map(|_| rotation.advance().unwrap().host.clone()).collect();
        assert_eq!(tried, ["b", "c", "a", "b"]);
        // Where the event loop points decides the start; an unknown address starts at the first.
        assert_eq!(Rotation::starting_at(&list, ("c".into(), 3)).current().host, "c");
        assert_eq!(Rotation::starting_at(&list, ("c".into(), 9)).current().host, "a");
        // Listed twice: the rotation still walks the whole list.
        let twice = brokers("mqtt://a:1,mqtt://a:1,mqtt://b:2");
        let mut rotation = Rotation::starting_at(&twice, ("a".into(), 1));
        let tried: Vec<_> = (0..3).map(|_| rotation.advance().unwrap().host.clone()).collect();
        assert_eq!(tried, ["a", "b", "a"]);
        let single = brokers("mqtt://a:1");
        let mut rotation = Rotation::starting_at(&single, ("a".into(), 1));
        assert!(rotation.advance().is_none());
        assert_eq!(rotation.current().host, "a");
    }

    #[test]
    fn retargeted_options_keep_every_setting_but_the_address() {
        let will = LastWill::new("t/status", b"gone".to_vec(), QoS::AtLeastOnce, false);
        let spec = ClientSpec {
            client_id: "c-1".into(),
            clean_session: false,
            manual_acks: true,
            last_will: Some(will),
        };
        let (a, b) = (addr("mqtt://a:1").unwrap(), addr("mqtt://b:2").unwrap());
        let list = Brokers::new(vec![a.clone(), b.clone()]).unwrap();
        let moved = retarget(&options(&list, &a, spec.clone()), &list, &b);
        assert_eq!(moved.broker_address(), ("b".to_owned(), 2));
        // rumqttc's Debug shows every setting (keep-alive, packet size, inflight, will, …).
        assert_eq!(format!("{moved:?}"), format!("{:?}", options(&list, &b, spec)));
    }

    #[test]
    fn urls_carry_percent_decoded_credentials_and_tls_and_never_show_the_password() {
        let a = addr("mqtts://gw%40site:p%3Ass@word@broker.example:8884").unwrap();
        assert!(a.tls);
        assert_eq!((a.host.as_str(), a.port), ("broker.example", 8884));
        let c = a.credentials.clone().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("gw@site", "p:ss@word"));
        assert_eq!(a.to_string(), "mqtts://gw@site@broker.example:8884");
        assert!(!format!("{a:?}").contains("ss@word"), "{a:?}");
        assert_eq!(addr("mqtts://h").unwrap().port, 8883);
        assert_eq!(addr("mqtt://u@h:1").unwrap().credentials.unwrap().password.expose(), "");
        assert!(addr("mqtt://:pw@h:1").is_err());
        // A URL that does not parse is quoted without its password.
        let err = "mqtt://u:secret@h:x".parse::<Brokers>().unwrap_err().to_string();
        assert!(err.contains("u:***@h:x") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn settings_credentials_fill_only_brokers_without_their_own() {
        let creds = |u: &str, p: &str| Credentials { username: u.into(), password: Password::new(p) };
        let auth = ClientAuth { credentials: Some(creds("env", "e")), ca_file: None };
        let list = brokers("mqtt://own:o@a:1,mqtt://b:2").with_auth(&auth).unwrap();
        assert_eq!(list.as_slice()[0].credentials, Some(creds("own", "o")));
        assert_eq!(list.as_slice()[1].credentials, Some(creds("env", "e")));
        assert!(list.all_have_credentials());
        assert!(!brokers("mqtt://a:1").all_have_credentials());
        // The options carry them into the CONNECT.
        let spec =
            ClientSpec { client_id: "c".into(), clean_session: true, manual_acks: false, last_will: None };
        let options = options(&list, &list.as_slice()[1], spec);
        let login = options.credentials().unwrap();
        assert_eq!((login.username.as_str(), login.password.as_str()), ("env", "e"));
    }

    #[test]
    fn credentials_from_settings() {
        let names = "X_USERNAME / X_PASSWORD(_FILE)";
        let dir = std::env::temp_dir().join(format!("plumbing-pw-{}", std::process::id()));
        std::fs::write(&dir, "from-file\n").unwrap();
        let from_file = Credentials::from_settings(Some("u"), None, Some(&dir), names).unwrap().unwrap();
        assert_eq!(from_file.password.expose(), "from-file");
        std::fs::remove_file(&dir).unwrap();
        assert!(Credentials::from_settings(None, None, None, names).unwrap().is_none());
        let pw = Password::new("p");
        let err = Credentials::from_settings(None, Some(&pw), None, names).unwrap_err().to_string();
        assert!(err.contains("X_USERNAME"), "{err}");
        assert!(Credentials::from_settings(Some("u"), Some(&pw), Some(&dir), names).is_err());
        assert!(Credentials::from_settings(Some("u"), None, Some(&dir), names).is_err());
        assert_eq!(format!("{pw:?} {pw}"), "*** ***");
    }
}
