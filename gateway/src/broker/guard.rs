//! The embedded broker's front door: every client reaches rumqttd through
//! this guard, which enforces the limits rumqttd has no setting for.
//!
//! rumqttd keeps every topic filter ever subscribed and every matched topic
//! name ever published, forever, and matches each topic name it has not seen
//! against all those filters on its one router thread; each filter also holds
//! a message log (~150 KB even empty). 60,000 subscriptions and 20,000 new
//! topic names from one client froze it for minutes and grew it by gigabytes.
//! The guard reads the MQTT 3.1.1 packets a client sends (framing and parsing
//! by rumqttd's own `protocol::v4`), forwards them unchanged to rumqttd on an
//! internal loopback port, and copies rumqttd's answers back. Per user (the
//! CONNECT user name; anonymous clients, `--insecure` only, per client id)
//! it counts:
//!
//! - live connections (`--mqtt-max-connections-per-user`): one over gets
//!   CONNACK "server unavailable";
//! - distinct topic filters subscribed (`--mqtt-max-filters-per-user`) and
//!   distinct topic names published (`--mqtt-max-topics-per-user`), over the
//!   life of the process as rumqttd remembers them: a SUBSCRIBE or PUBLISH
//!   that would pass the cap closes the connection (MQTT 3.1.1 has no refusal
//!   for a PUBLISH);
//! - how fast new names come (`--mqtt-new-names-per-second`, burst
//!   `--mqtt-new-names-burst`): a client above the rate is not read from
//!   until it is allowed again (back-pressure, nothing is dropped).
//!
//! All connections together are capped (`--mqtt-max-connections`); a
//! packet larger than the broker's packet limit closes its connection before
//! it is buffered. Each limit hit counts in `/metrics`. The gateway's own
//! clients connect straight to the internal port, not through the guard
//! (a proxy hop per message was about a tenth of the gateway's CPU per
//! command, docs/BENCHMARKS.md); one that comes to the public port logs in as
//! its internal user and is counted in the total only.
//!
//! The internal port is on loopback and needs the same logins: a local
//! process that finds it bypasses these limits (not the passwords).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use plumbing::metrics::{Counter, Gauge, Metrics};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A client must send its CONNECT within this long of connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// CONNACK with return code 3, "server unavailable" (MQTT 3.1.1 §3.2.2.3).
const CONNACK_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];

/// The guard's limits; see the module docs and the gateway's `--mqtt-max-*` flags.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections at once, all users together.
    pub max_connections: usize,
    /// Connections at once per user (per client id for anonymous clients).
    pub max_connections_per_user: usize,
    /// Distinct topic filters one user may subscribe, over the process's life.
    pub max_filters_per_user: usize,
    /// Distinct topic names one user may publish to (and last-will topics),
    /// over the process's life.
    pub max_topics_per_user: usize,
    /// New filters and topic names per second per user, after the burst.
    pub new_names_per_second: NonZeroU32,
    /// New filters and topic names a user may make at once.
    pub new_names_burst: NonZeroU32,
    /// Largest MQTT packet a client may send, in bytes after the fixed header
    /// (rumqttd's `max_payload_size`).
    pub max_packet: usize,
    /// Packets rumqttd reads from one connection per batch (its `max_inflight_count`).
    pub max_inflight: usize,
}

/// The guard's counters in `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct LimitMetrics {
    /// Connections closed at once: `--mqtt-max-connections` reached.
    pub connections_refused: Counter,
    /// CONNECTs answered "server unavailable": `--mqtt-max-connections-per-user`.
    pub user_connections_refused: Counter,
    /// Connections closed for subscribing past `--mqtt-max-filters-per-user`.
    pub filter_limit: Counter,
    /// Connections closed for publishing past `--mqtt-max-topics-per-user`.
    pub topic_limit: Counter,
    /// New names that had to wait for `--mqtt-new-names-per-second`.
    pub names_delayed: Counter,
    /// Connections closed for a packet over the broker's packet limit.
    pub oversized: Counter,
    /// Client connections open now.
    pub connections: Gauge,
    /// Distinct filters and topic names the guard has let through (what
    /// rumqttd holds at most, beside the gateway's own).
    pub names: Gauge,
}

impl LimitMetrics {
    /// Registers every counter and gauge in `registry`.
    pub fn new(registry: &Metrics) -> LimitMetrics {
        let c = |name: &str, help: &str| registry.counter(name, help);
        let g = |name: &str, help: &str| registry.register(name, help, Gauge::default());
        LimitMetrics {
            connections_refused: c(
                "gateway_mqtt_connections_refused",
                "Connections to the embedded broker closed at once: --mqtt-max-connections reached",
            ),
            user_connections_refused: c(
                "gateway_mqtt_user_connections_refused",
                "CONNECTs to the embedded broker answered 'server unavailable': --mqtt-max-connections-per-user reached",
            ),
            filter_limit: c(
                "gateway_mqtt_filter_limit_hits",
                "Embedded-broker connections closed for subscribing past --mqtt-max-filters-per-user",
            ),
            topic_limit: c(
                "gateway_mqtt_topic_limit_hits",
                "Embedded-broker connections closed for publishing past --mqtt-max-topics-per-user",
            ),
            names_delayed: c(
                "gateway_mqtt_new_names_delayed",
                "New topic filters or names held back by --mqtt-new-names-per-second",
            ),
            oversized: c(
                "gateway_mqtt_oversized_packets",
                "Embedded-broker connections closed for a packet over the packet limit",
            ),
            connections: g("gateway_mqtt_client_connections", "Client connections to the embedded broker now"),
            names: g(
                "gateway_mqtt_client_names",
                "Distinct topic filters and names clients made at the embedded broker",
            ),
        }
    }
}

/// What the guard needs besides its limits.
#[derive(Debug, Clone)]
pub struct Setup {
    pub limits: Limits,
    pub metrics: LimitMetrics,
    /// rumqttd's internal plain listener.
    pub upstream: SocketAddr,
    /// The gateway's instance id: its own clients log in as this user (or,
    /// anonymous without a users file, use client ids `ID-…`) and are
    /// counted in the total only.
    pub instance_id: String,
    /// Whether clients may connect without a user name (`--insecure`, no users file).
    pub anonymous: bool,
}

/// A TLS listener's certificate and key files, read at each connection (so
/// replacing them rotates the certificate).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Runs the guard on `listeners` (already bound; `TlsFiles` for a TLS one)
/// on a thread of its own for the life of the process, like rumqttd.
pub fn spawn(setup: Setup, listeners: Vec<(std::net::TcpListener, Option<TlsFiles>)>) {
    let guard = Arc::new(Guard::new(setup));
    std::thread::Builder::new()
        .name("mqtt-guard".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mqtt-guard")
                .enable_all()
                .build()
                .expect("building the MQTT guard's runtime");
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (listener, tls) in listeners {
                    listener.set_nonblocking(true).expect("a non-blocking listener");
                    let listener = TcpListener::from_std(listener).expect("a tokio listener");
                    tasks.push(tokio::spawn(accept_loop(listener, tls, guard.clone())));
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
        })
        .expect("spawning a thread");
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsFiles>, guard: Arc<Guard>) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, mostly: wait instead of spinning.
                tracing::warn!(error = %e, "the embedded broker cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let Ok(permit) = guard.slots.clone().try_acquire_owned() else {
            guard.metrics.connections_refused.inc();
            guard.log.limit("--mqtt-max-connections", "", peer);
            tokio::spawn(refuse(socket));
            continue;
        };
        let guard = guard.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => guard.serve(socket, peer, permit).await,
                Some(files) => match accept_tls(socket, &files).await {
                    Ok(stream) => guard.serve(stream, peer, permit).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        });
    }
}

/// Answers "server unavailable" without waiting for the CONNECT, and closes.
async fn refuse(mut socket: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(&CONNACK_UNAVAILABLE)).await;
}

async fn accept_tls(
    socket: TcpStream,
    files: &TlsFiles,
) -> anyhow::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let config = super::tls_server_config(&files.cert, &files.key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    Ok(tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(socket)).await??)
}

/// Why a connection was closed by the guard.
#[derive(Debug)]
enum Closed {
    /// The client or rumqttd ended it (or the network failed).
    Ended,
    /// A limit was hit: its flag.
    Limit(&'static str),
    /// Not MQTT 3.1.1 as rumqttd reads it.
    Malformed(String),
}

struct Guard {
    limits: Limits,
    metrics: LimitMetrics,
    upstream: SocketAddr,
    instance_id: String,
    anonymous: bool,
    slots: Arc<Semaphore>,
    users: Mutex<HashMap<String, Arc<User>>>,
    hasher: RandomState,
    log: LimitLog,
}

/// One user's (or anonymous client id's) counts.
struct User {
    names: Mutex<Names>,
    limiter: DefaultDirectRateLimiter,
}

#[derive(Default)]
struct Names {
    connections: usize,
    /// Hashes (SipHash, random key) of the filters and topic names seen.
    filters: HashSet<u64>,
    topics: HashSet<u64>,
}

impl Guard {
    fn new(setup: Setup) -> Guard {
        Guard {
            limits: setup.limits,
            metrics: setup.metrics,
            upstream: setup.upstream,
            instance_id: setup.instance_id,
            anonymous: setup.anonymous,
            slots: Arc::new(Semaphore::new(setup.limits.max_connections)),
            users: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            log: LimitLog::default(),
        }
    }

    /// The counts of a user that has logged in before, if any.
    fn known_user(&self, key: &str) -> Option<Arc<User>> {
        self.users.lock().expect("guard users lock").get(key).cloned()
    }

    /// The counts of a user that has just logged in (made on its first login,
    /// so user names that never logged in cost nothing).
    fn user(&self, key: &str) -> Arc<User> {
        let mut users = self.users.lock().expect("guard users lock");
        users
            .entry(key.to_owned())
            .or_insert_with(|| {
                let quota = Quota::per_second(self.limits.new_names_per_second)
                    .allow_burst(self.limits.new_names_burst);
                Arc::new(User { names: Mutex::default(), limiter: RateLimiter::direct(quota) })
            })
            .clone()
    }

    async fn serve<S>(&self, client: S, peer: SocketAddr, permit: OwnedSemaphorePermit)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.metrics.connections.inc();
        let closed = self.serve_connection(client, peer).await;
        self.metrics.connections.dec();
        drop(permit);
        match closed {
            Closed::Ended => {}
            Closed::Limit(flag) => tracing::debug!(%peer, flag, "closed a connection at its limit"),
            Closed::Malformed(why) => {
                tracing::debug!(%peer, why, "closed a connection sending no MQTT 3.1.1")
            }
        }
    }

    async fn serve_connection<S>(&self, client: S, peer: SocketAddr) -> Closed
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let mut buffer = BytesMut::with_capacity(4096);
        let first =
            tokio::time::timeout(CONNECT_TIMEOUT, self.read_frame(&mut from_client, &mut buffer)).await;
        let frame = match first {
            Ok(Ok(frame)) => frame,
            Ok(Err(closed)) => return closed,
            Err(_) => return Closed::Malformed("no CONNECT in time".into()),
        };
        let (user_key, exempt, will_topic) = match parse(&frame, self.limits.max_packet) {
            Ok(Packet::Connect(connect, _, will, _, login)) => {
                let name = login.map(|l| l.username).filter(|u| !u.is_empty());
                let exempt = match &name {
                    Some(user) => *user == self.instance_id,
                    None => {
                        self.anonymous
                            && connect
                                .client_id
                                .strip_prefix(self.instance_id.as_str())
                                .is_some_and(|rest| rest.starts_with('-'))
                    }
                };
                let key = match name {
                    Some(user) => format!("user:{user}"),
                    None => format!("client:{}", connect.client_id),
                };
                (key, exempt, will.map(|w| w.topic))
            }
            Ok(_) => return Closed::Malformed("the first packet is not CONNECT".into()),
            Err(why) => return Closed::Malformed(why),
        };
        let max_per_user = self.limits.max_connections_per_user;
        let full = |user: &User| user.names.lock().expect("guard names lock").connections >= max_per_user;
        if !exempt && self.known_user(&user_key).is_some_and(|user| full(&user)) {
            return self.refuse_user(&mut to_client, &user_key, peer).await;
        }
        let upstream = match TcpStream::connect(self.upstream).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::warn!(error = %e, "the MQTT guard cannot reach the embedded broker");
                return Closed::Ended;
            }
        };
        let _ = upstream.set_nodelay(true);
        let (mut from_broker, mut to_broker) = upstream.into_split();
        if to_broker.write_all(&frame).await.is_err() {
            return Closed::Ended;
        }
        // rumqttd answers a login it accepts with CONNACK (4 bytes in 3.1.1)
        // and closes the connection of one it refuses.
        let mut connack = [0u8; 4];
        match tokio::time::timeout(CONNECT_TIMEOUT, from_broker.read_exact(&mut connack)).await {
            Ok(Ok(_)) => {}
            _ => return Closed::Ended,
        }
        if to_client.write_all(&connack).await.is_err() || connack[0] != 0x20 || connack[3] != 0 {
            return Closed::Ended;
        }
        let user = (!exempt).then(|| self.user(&user_key));
        // Another connection of the same user may have logged in meanwhile.
        let _connection = match &user {
            Some(user) => match UserConnection::open(user, max_per_user) {
                Some(connection) => Some(connection),
                None => {
                    // It has its CONNACK already: closed without another.
                    self.metrics.user_connections_refused.inc();
                    self.log.limit("--mqtt-max-connections-per-user", &user_key, peer);
                    return Closed::Limit("--mqtt-max-connections-per-user");
                }
            },
            None => None,
        };
        if let (Some(user), Some(topic)) = (&user, will_topic) {
            if let Err(closed) = self.new_names(user, &user_key, peer, &[], &[topic]).await {
                return closed;
            }
        }
        let downstream = async {
            let _ = tokio::io::copy(&mut from_broker, &mut to_client).await;
            let _ = to_client.shutdown().await;
            Closed::Ended
        };
        let upstream = async {
            // The packets read at once go on in one write.
            let mut out = BytesMut::new();
            loop {
                let frame = match self.read_frame(&mut from_client, &mut buffer).await {
                    Ok(frame) => frame,
                    Err(closed) => return closed,
                };
                if let Some(user) = &user {
                    if let Err(closed) = self.check(user, &user_key, peer, &frame).await {
                        return closed;
                    }
                }
                out.extend_from_slice(&frame);
                let more = v4::check(buffer.iter(), self.limits.max_packet).is_ok();
                if !more || out.len() >= 64 * 1024 {
                    if to_broker.write_all(&out).await.is_err() {
                        return Closed::Ended;
                    }
                    out.clear();
                }
            }
        };
        tokio::select! {
            closed = downstream => closed,
            closed = upstream => closed,
        }
    }

    /// Answers a CONNECT past `--mqtt-max-connections-per-user`.
    async fn refuse_user<W: AsyncWrite + Unpin>(
        &self,
        to_client: &mut W,
        key: &str,
        peer: SocketAddr,
    ) -> Closed {
        self.metrics.user_connections_refused.inc();
        self.log.limit("--mqtt-max-connections-per-user", key, peer);
        let _ = to_client.write_all(&CONNACK_UNAVAILABLE).await;
        Closed::Limit("--mqtt-max-connections-per-user")
    }

    /// Reads one whole MQTT packet (at most the packet limit is buffered).
    async fn read_frame<R: AsyncRead + Unpin>(
        &self,
        from: &mut R,
        buffer: &mut BytesMut,
    ) -> Result<Bytes, Closed> {
        loop {
            match v4::check(buffer.iter(), self.limits.max_packet) {
                Ok(header) => return Ok(buffer.split_to(header.frame_length()).freeze()),
                Err(rumqttd::protocol::Error::InsufficientBytes(missing)) => buffer.reserve(missing),
                Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(size)) => {
                    self.metrics.oversized.inc();
                    tracing::debug!(size, limit = self.limits.max_packet, "an MQTT packet over the limit");
                    return Err(Closed::Limit("packet limit"));
                }
                Err(e) => return Err(Closed::Malformed(e.to_string())),
            }
            match from.read_buf(buffer).await {
                Ok(0) | Err(_) => return Err(Closed::Ended),
                Ok(_) => {}
            }
        }
    }

    /// Counts the names a SUBSCRIBE or PUBLISH brings; other packets pass.
    async fn check(&self, user: &User, key: &str, peer: SocketAddr, frame: &Bytes) -> Result<(), Closed> {
        match frame[0] >> 4 {
            3 => {
                let topic =
                    publish_topic(frame).ok_or_else(|| Closed::Malformed("a PUBLISH too short".into()))?;
                self.new_names(user, key, peer, &[], &[topic]).await
            }
            8 => match parse(frame, self.limits.max_packet) {
                Ok(Packet::Subscribe(subscribe, _)) => {
                    let filters: Vec<&str> = subscribe.filters.iter().map(|f| f.path.as_str()).collect();
                    self.new_names(user, key, peer, &filters, &[]).await
                }
                Ok(_) => Ok(()),
                Err(why) => Err(Closed::Malformed(why)),
            },
            _ => Ok(()),
        }
    }

    /// Admits `filters` and `topics`: names this user has made before pass
    /// at once; each new one waits for the rate, and past a cap the
    /// connection is closed.
    async fn new_names(
        &self,
        user: &User,
        key: &str,
        peer: SocketAddr,
        filters: &[&str],
        topics: &[Bytes],
    ) -> Result<(), Closed> {
        let filters = filters.iter().map(|f| (true, self.hasher.hash_one(f.as_bytes())));
        let topics = topics.iter().map(|t| (false, self.hasher.hash_one(&t[..])));
        for (is_filter, hash) in filters.chain(topics) {
            let (flag, cap) = match is_filter {
                true => ("--mqtt-max-filters-per-user", self.limits.max_filters_per_user),
                false => ("--mqtt-max-topics-per-user", self.limits.max_topics_per_user),
            };
            {
                let names = user.names.lock().expect("guard names lock");
                let set = if is_filter { &names.filters } else { &names.topics };
                if set.contains(&hash) {
                    continue;
                }
                if set.len() >= cap {
                    drop(names);
                    let counter =
                        if is_filter { &self.metrics.filter_limit } else { &self.metrics.topic_limit };
                    counter.inc();
                    self.log.limit(flag, key, peer);
                    return Err(Closed::Limit(flag));
                }
            }
            if user.limiter.check().is_err() {
                self.metrics.names_delayed.inc();
                user.limiter.until_ready().await;
            }
            let mut names = user.names.lock().expect("guard names lock");
            let set = if is_filter { &mut names.filters } else { &mut names.topics };
            if set.len() < cap && set.insert(hash) {
                self.metrics.names.inc();
            }
        }
        Ok(())
    }
}

/// Parses one whole frame with rumqttd's own reader.
fn parse(frame: &Bytes, max_packet: usize) -> Result<Packet, String> {
    V4.read_mut(&mut BytesMut::from(&frame[..]), max_packet).map_err(|e| e.to_string())
}

/// The topic name of a whole PUBLISH frame (MQTT 3.1.1 §3.3.2.1).
fn publish_topic(frame: &Bytes) -> Option<Bytes> {
    let header = v4::check(frame.iter(), usize::MAX).ok()?;
    let start = header.frame_length() - header.remaining_len;
    let length = usize::from(u16::from_be_bytes([*frame.get(start)?, *frame.get(start + 1)?]));
    (start + 2 + length <= frame.len()).then(|| frame.slice(start + 2..start + 2 + length))
}

/// A live connection counted against its user.
struct UserConnection<'a>(&'a User);

impl<'a> UserConnection<'a> {
    fn open(user: &'a User, max: usize) -> Option<UserConnection<'a>> {
        let mut names = user.names.lock().expect("guard names lock");
        if names.connections >= max {
            return None;
        }
        names.connections += 1;
        Some(UserConnection(user))
    }
}

impl Drop for UserConnection<'_> {
    fn drop(&mut self) {
        self.0.names.lock().expect("guard names lock").connections -= 1;
    }
}

/// Logs limit hits, at most one line a second; the line says how many were
/// not logged since.
struct LimitLog {
    next: Mutex<Instant>,
    unlogged: AtomicU64,
}

impl Default for LimitLog {
    fn default() -> LimitLog {
        LimitLog { next: Mutex::new(Instant::now()), unlogged: AtomicU64::new(0) }
    }
}

impl LimitLog {
    fn limit(&self, flag: &str, user: &str, peer: SocketAddr) {
        let now = Instant::now();
        {
            let mut next = self.next.lock().expect("limit log lock");
            if now < *next {
                self.unlogged.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *next = now + Duration::from_secs(1);
        }
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        // The user name comes from the client: shortened, and quoted by `?`.
        let user = user.chars().take(80).collect::<String>();
        tracing::warn!(
            limit = flag,
            user = ?user,
            %peer,
            unlogged_limit_hits_before = unlogged,
            "an MQTT client of the embedded broker hit a limit (raise the flag if it is legitimate)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_of_a_publish_frame() {
        // PUBLISH QoS 0, topic "a/b", payload "xy".
        let frame = Bytes::from_static(&[0x30, 7, 0, 3, b'a', b'/', b'b', b'x', b'y']);
        assert_eq!(publish_topic(&frame).unwrap(), Bytes::from_static(b"a/b"));
        let short = Bytes::from_static(&[0x30, 3, 0, 9, b'a']);
        assert!(publish_topic(&short).is_none());
    }
}
