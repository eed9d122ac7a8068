//! The HTTP server loop, one for clear text and TLS: accepts connections up
//! to a limit and serves each with hyper's own limits (issue 13: a
//! slowloris of idle and half-sent requests used up the process's file
//! descriptors, shutting out the embedded broker beside it).
//!
//! - At most [`Limits::max_connections`] connections are open at once (a
//!   semaphore around accept: tower's concurrency limits count requests,
//!   not connections). A new connection that finds them all taken closes
//!   the oldest one with no request under way — one that has not sent a
//!   whole request head [`LIST_AFTER`] after it was accepted, or sits idle
//!   between requests, or
//!   is still in its TLS handshake after [`SLOW_HANDSHAKE`] — and takes its
//!   place (`gateway_http_connections_evicted`): connections that hold a
//!   place without using it cannot lock out clients that send requests. A
//!   connection that sends its request head at once (any ordinary client)
//!   is not evicted before its request is read.
//!   When every connection has a request under way, the new one is
//!   answered `503` with `Retry-After` and closed; while [`REFUSAL_SLOTS`]
//!   such answers are under way, further ones are closed unanswered. Both
//!   count in `gateway_http_connections_refused`.
//! - A client has [`Limits::header_timeout`] for the TLS handshake and for
//!   each request head (hyper's `header_read_timeout`, which on HTTP/1 also
//!   runs while a kept-alive connection waits for its next request); then
//!   the connection is closed (`gateway_http_header_timeouts`).
//! - A connection with no request under way for [`Limits::idle_timeout`]
//!   (HTTP/2 has no header timeout between requests) is shut down
//!   gracefully (`gateway_http_idle_closed`).
//! - A request head (request line and headers) over [`Limits::max_head_bytes`]
//!   is refused by hyper, `431` (`gateway_http_heads_refused`, which also
//!   counts hyper's `414` and `400` for a malformed head).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use plumbing::metrics::{Counter, Gauge};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::GatewayMetrics;

/// Connections over the limit answered at once (`503`); beyond these, a
/// connection over the limit is closed without an answer.
pub const REFUSAL_SLOTS: usize = 64;
/// How long a connection over the limit may take to send its request head
/// before it is closed; also the whole life of such a connection.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// `Retry-After` of the `503` to a connection over the limit, in seconds.
const RETRY_AFTER_S: u64 = 1;
/// How long a new connection waits for the one it evicted to let go of its place.
const EVICTION_WAIT: Duration = Duration::from_millis(500);
/// A connection that has sent no whole request head this long after it was
/// accepted may be evicted.
const LIST_AFTER: Duration = Duration::from_millis(250);
/// A TLS handshake under way this long may be evicted like a connection
/// without a request.
const SLOW_HANDSHAKE: Duration = Duration::from_secs(1);
/// After a graceful shutdown of an idle connection, how long a half-sent
/// request head may keep it.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// The server's limits (see the module docs), from `--http-*` flags.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bytes; hyper's read buffer, at least 8192.
    pub max_head_bytes: usize,
}

impl Limits {
    /// The limits `config` sets; an error for a head limit under hyper's
    /// minimum of 8192 bytes or a zero connection limit or timeout.
    pub fn from_config(config: &Config) -> anyhow::Result<Limits> {
        anyhow::ensure!(
            config.http_max_head_bytes >= 8192,
            "--http-max-head-bytes must be at least 8192 (hyper's smallest read buffer), not {}",
            config.http_max_head_bytes
        );
        anyhow::ensure!(config.http_max_connections >= 1, "--http-max-connections must be at least 1");
        anyhow::ensure!(
            config.http_header_timeout_ms >= 1 && config.http_idle_timeout_ms >= 1,
            "--http-header-timeout-ms and --http-idle-timeout-ms must be at least 1"
        );
        Ok(Limits {
            max_connections: config.http_max_connections,
            header_timeout: Duration::from_millis(config.http_header_timeout_ms),
            idle_timeout: Duration::from_millis(config.http_idle_timeout_ms),
            max_head_bytes: config.http_max_head_bytes,
        })
    }
}

/// What the server counts (registered in `/metrics` by [`GatewayMetrics`]).
#[derive(Debug, Clone, Default)]
pub struct HttpMetrics {
    pub open: Gauge,
    pub under_way: Gauge,
    pub refused: Counter,
    pub header_timeouts: Counter,
    pub idle_closed: Counter,
    pub heads_refused: Counter,
    pub accept_errors: Counter,
    pub evicted: Counter,
}

/// Serves `router` on `listener` until `stop` is cancelled: clear text, or
/// TLS when `tls` is given; within `limits`. After `stop`, no connection is
/// accepted, idle ones are closed, and requests under way are let finish
/// before this returns. Errors: none once listening (accept errors, such as
/// running out of descriptors, are counted, logged and waited out).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    metrics: HttpMetrics,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let server = Arc::new(Server {
        router,
        tls: tls.map(TlsAcceptor::from),
        builder: builder(&limits),
        refusal_builder: refusal_builder(),
        limits,
        metrics,
        waiting: Arc::default(),
        stop,
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSAL_SLOTS));
    let connections = TaskTracker::new();
    let mut accept_log = Instant::now();
    loop {
        let stream = tokio::select! {
            () = server.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: wait for a connection to close.
                    server.metrics.accept_errors.inc();
                    if accept_log <= Instant::now() {
                        tracing::warn!(error = %e, "cannot accept an HTTP connection");
                        accept_log = Instant::now() + Duration::from_secs(1);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let mut permit = permits.clone().try_acquire_owned().ok();
        if permit.is_none() && server.waiting.evict_oldest() {
            // Its task lets go of its permit at once.
            permit = tokio::time::timeout(EVICTION_WAIT, permits.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok);
        }
        match permit {
            Some(permit) => {
                connections.spawn(server.clone().connection(stream, permit));
            }
            None => {
                server.metrics.refused.inc();
                if let Ok(slot) = refusals.clone().try_acquire_owned() {
                    connections.spawn(server.clone().refuse(stream, slot));
                }
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// hyper's settings for the connections served.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
    builder
}

/// hyper's settings for a connection over the limit: one request, soon.
fn refusal_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(REFUSAL_TIME).keep_alive(false);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(1);
    builder
}

struct Server {
    router: Router,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    refusal_builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    metrics: HttpMetrics,
    waiting: Arc<Waiting>,
    stop: CancellationToken,
}

impl Server {
    /// One connection within the limit, holding `permit` while it is open.
    async fn connection(self: Arc<Self>, stream: TcpStream, permit: OwnedSemaphorePermit) {
        self.metrics.open.inc();
        let activity = Arc::new(Activity::new(self.waiting.clone()));
        match &self.tls {
            None => self.serve(stream, &activity).await,
            Some(tls) => {
                let handshake = tokio::time::timeout(self.limits.header_timeout, tls.accept(stream));
                // A handshake still under way after a while may be evicted.
                let slow = async {
                    tokio::time::sleep(SLOW_HANDSHAKE).await;
                    activity.list();
                    std::future::pending::<()>().await;
                };
                let handshake = tokio::select! {
                    handshake = handshake => Some(handshake),
                    () = slow => None,
                    () = activity.evicted.cancelled() => {
                        self.metrics.evicted.inc();
                        None
                    }
                };
                activity.unlist();
                match handshake {
                    Some(Ok(Ok(stream))) => self.serve(stream, &activity).await,
                    Some(Ok(Err(e))) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Some(Err(_)) => {
                        self.metrics.header_timeouts.inc();
                    }
                    None => {}
                }
            }
        }
        activity.unlist();
        self.metrics.open.dec();
        drop(permit);
    }

    async fn serve<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        io: I,
        activity: &Arc<Activity>,
    ) {
        let tower = TowerToHyperService::new(self.router.clone());
        let (track, under_way) = (activity.clone(), self.metrics.under_way.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let busy = track.begin(&under_way);
            let answer = tower.call(request);
            async move {
                let response = answer.await;
                drop(busy);
                response
            }
        });
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        // A first look at what the client sent: a request whose head is
        // already here is under way before the connection can be evicted;
        // one that has sent nothing or part of a head becomes evictable.
        let first = std::future::poll_fn(|cx| match std::future::Future::poll(conn.as_mut(), cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        if let Some(result) = first {
            if let Err(e) = result {
                self.count_error(&*e);
            }
            return;
        }
        // Nothing whole yet: evictable a moment later if still nothing (an
        // ordinary client's head, sent with the connection, is read by then).
        let list_later = async {
            tokio::time::sleep(LIST_AFTER).await;
            activity.list();
            std::future::pending::<()>().await;
        };
        tokio::pin!(list_later);
        let (first, idle) = (self.limits.header_timeout, self.limits.idle_timeout);
        let mut shutting = false;
        let mut grace: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                () = &mut list_later => {}
                () = activity.evicted.cancelled() => {
                    self.metrics.evicted.inc();
                    break Ok(());
                }
                () = self.stop.cancelled(), if !shutting => {
                    conn.as_mut().graceful_shutdown();
                    shutting = true;
                }
                () = activity.idle(first, idle), if !shutting => {
                    if activity.any() {
                        self.metrics.idle_closed.inc();
                    } else {
                        self.metrics.header_timeouts.inc();
                    }
                    conn.as_mut().graceful_shutdown();
                    shutting = true;
                    // What is left is a half-sent head at most (nothing was under way).
                    grace = Some(Instant::now() + IDLE_GRACE);
                }
                () = tokio::time::sleep_until(grace.unwrap_or_else(Instant::now)), if grace.is_some() => {
                    break Ok(());
                }
            }
        };
        if let Err(e) = result {
            self.count_error(&*e);
        }
    }

    fn count_error(&self, e: &(dyn std::error::Error + 'static)) {
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_timeout() {
                self.metrics.header_timeouts.inc();
            } else if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
                self.metrics.heads_refused.inc();
            }
        }
    }

    /// A connection over the limit: `503` with `Retry-After` to its first
    /// request if it comes within [`REFUSAL_TIME`], then closed.
    async fn refuse(self: Arc<Self>, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let answer = async {
            match &self.tls {
                None => self.answer_refusal(stream).await,
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        self.answer_refusal(stream).await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_TIME, answer).await;
        drop(slot);
    }

    async fn answer_refusal<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(&self, io: I) {
        let max = self.limits.max_connections;
        let service =
            service_fn(move |_: Request<Incoming>| async move { Ok::<_, Infallible>(refusal_response(max)) });
        let _ = self.refusal_builder.serve_connection(TokioIo::new(io), service).await;
    }
}

/// `503` with `Retry-After` and the API's JSON error, for a connection
/// over `--http-max-connections`.
fn refusal_response(max: usize) -> Response<Body> {
    let message = format!(
        "the gateway serves at most {max} HTTP connections at once (--http-max-connections), all busy; try again"
    );
    let error = crate::error::ApiError::new(crate::error::ErrorKind::Overloaded, message)
        .retry_after(RETRY_AFTER_S * 1000);
    let mut response = Response::new(Body::from(error.to_json().to_string()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The connections with no request under way, oldest first: the first to
/// be closed when a new connection finds the limit reached.
#[derive(Debug, Default)]
struct Waiting {
    next: AtomicU64,
    by_age: Mutex<BTreeMap<u64, CancellationToken>>,
}

impl Waiting {
    fn insert(&self, evict: CancellationToken) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_age.lock().expect("waiting lock").insert(key, evict);
        key
    }

    fn remove(&self, key: u64) {
        self.by_age.lock().expect("waiting lock").remove(&key);
    }

    /// Closes the oldest connection without a request under way; whether there was one.
    fn evict_oldest(&self) -> bool {
        let oldest = self.by_age.lock().expect("waiting lock").pop_first();
        oldest.map(|(_, evict)| evict.cancel()).is_some()
    }
}

/// Requests under way on one connection, and since when it has had none.
struct Activity {
    state: Mutex<State>,
    waiting: Arc<Waiting>,
    /// Cancelled when the connection is evicted.
    evicted: CancellationToken,
}

struct State {
    busy: usize,
    /// When the last request ended (or the connection opened).
    since: Instant,
    /// Whether a request was ever made.
    any: bool,
    /// Its place in [`Waiting`] while no request is under way.
    waiting: Option<u64>,
}

/// A request under way; its end when dropped.
struct Busy(Arc<Activity>, Gauge);

impl Drop for Busy {
    fn drop(&mut self) {
        self.1.dec();
        let mut state = self.0.state.lock().expect("activity lock");
        state.busy -= 1;
        state.since = Instant::now();
        if state.busy == 0 && !self.0.evicted.is_cancelled() {
            state.waiting = Some(self.0.waiting.insert(self.0.evicted.clone()));
        }
    }
}

impl Activity {
    /// A new connection, not evictable until [`Activity::list`]ed.
    fn new(waiting: Arc<Waiting>) -> Activity {
        let evicted = CancellationToken::new();
        let state = State { busy: 0, since: Instant::now(), any: false, waiting: None };
        Activity { state: Mutex::new(state), waiting, evicted }
    }

    /// Evictable from now on while no request is under way.
    fn list(&self) {
        let mut state = self.state.lock().expect("activity lock");
        if state.busy == 0 && state.waiting.is_none() && !self.evicted.is_cancelled() {
            state.waiting = Some(self.waiting.insert(self.evicted.clone()));
        }
    }

    fn begin(self: &Arc<Self>, under_way: &Gauge) -> Busy {
        under_way.inc();
        let mut state = self.state.lock().expect("activity lock");
        state.busy += 1;
        state.any = true;
        if let Some(key) = state.waiting.take() {
            self.waiting.remove(key);
        }
        Busy(self.clone(), under_way.clone())
    }

    /// Not evictable (the connection is closed, or its handshake over).
    fn unlist(&self) {
        if let Some(key) = self.state.lock().expect("activity lock").waiting.take() {
            self.waiting.remove(key);
        }
    }

    /// Whether a request was ever made on the connection.
    fn any(&self) -> bool {
        self.state.lock().expect("activity lock").any
    }

    /// Returns once no request has been under way for `idle` (for `first`
    /// when there was none yet).
    async fn idle(&self, first: Duration, idle: Duration) {
        loop {
            let (busy, since, any) = {
                let state = self.state.lock().expect("activity lock");
                (state.busy, state.since, state.any)
            };
            let wait = if any { idle } else { first };
            if busy > 0 {
                tokio::time::sleep(wait).await;
                continue;
            }
            let deadline = since + wait;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl GatewayMetrics {
    /// The HTTP server's counters, registered in this instance's registry.
    pub fn register_http(&self) -> HttpMetrics {
        let r = &self.registry;
        HttpMetrics {
            open: r.register("gateway_http_connections_open", "HTTP connections open", Gauge::default()),
            under_way: r.register(
                "gateway_http_requests_under_way",
                "HTTP requests read and not yet answered",
                Gauge::default(),
            ),
            refused: r.counter(
                "gateway_http_connections_refused",
                "HTTP connections over --http-max-connections: answered 503 with Retry-After, or closed",
            ),
            header_timeouts: r.counter(
                "gateway_http_header_timeouts",
                "HTTP connections closed for a TLS handshake or request head not complete within --http-header-timeout-ms",
            ),
            idle_closed: r.counter(
                "gateway_http_idle_closed",
                "HTTP connections closed after --http-idle-timeout-ms without a request under way",
            ),
            heads_refused: r.counter(
                "gateway_http_heads_refused",
                "HTTP request heads hyper refused: over --http-max-head-bytes (431), URI over 65,534 bytes (414), malformed (400)",
            ),
            evicted: r.counter(
                "gateway_http_connections_evicted",
                "HTTP connections without a request under way closed to make room for a new one at --http-max-connections",
            ),
            accept_errors: r.counter(
                "gateway_http_accept_errors",
                "Failed accepts of HTTP connections (e.g. out of file descriptors)",
            ),
        }
    }
}
