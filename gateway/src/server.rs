//! Builds the parts, starts their tasks, and shuts them down in the order
//! `crate::shutdown` describes: drain (readiness false, submissions refused,
//! waiting callers answered within the grace) → stop accepting HTTP and stop
//! the MQTT tasks (DISCONNECT) → flush the writer → close the database pool.

use std::net::SocketAddr;
use std::time::Duration;

use plumbing::mqtt::Brokers;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::Config;
use crate::instance::Instance;
use crate::provenance::Provenance;
use crate::store::Store;
use crate::{broker, http, mqtt};

/// How long `stopped` waits for the tasks to end after the drain, at least
/// (HTTP requests under way finish, MQTT says DISCONNECT).
const MIN_STOP_WAIT: Duration = Duration::from_secs(3);

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    pub app: App,
    /// Where the HTTP API listens (useful with port 0).
    pub http_addr: SocketAddr,
    /// Where other clients reach the gateway's broker: the embedded one's
    /// `--mqtt-listen` (the gateway's own clients use its internal port), or
    /// the external ones it was given.
    pub broker: Brokers,
    /// Cancelled by the caller: the shutdown begins (drain).
    shutdown: CancellationToken,
    /// Cancelled by `stopped` after the drain: the tasks end.
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// Starts a gateway: store (with migrations), its instance id (refused if a
/// live instance holds it), broker, MQTT tasks, HTTP server.
/// It runs until `shutdown` is cancelled; then `Running::stopped` drains it.
/// `/readyz` says 503 and submissions are refused from that moment on.
pub async fn start(mut config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    config.load_secret_files()?;
    for (flag, value) in
        [("--max-payload-bytes", config.max_payload_bytes), ("--max-result-bytes", config.max_result_bytes)]
    {
        anyhow::ensure!(
            (1..=protocol::frame::MAX_PAYLOAD).contains(&value),
            "{flag} must be 1 to {} (what a device frame carries), not {value}",
            protocol::frame::MAX_PAYLOAD
        );
    }
    // Before anything starts: the embedded broker cannot be stopped again.
    let limits = http::Limits::from_config(&config)?;
    crate::fds::raise_and_budget(&config)?;
    let tls = http::tls::server_config(&config)?;
    http::tls::check_exposure(&config, tls.is_some())?;
    let (scheme, keys) = (if tls.is_some() { "https" } else { "http" }, config.api_keys_required());
    missing_credentials(&config)?;
    // Before anything connects: a missing or bad secret fails at once.
    let registry = plumbing::metrics::Metrics::default();
    let provenance = Provenance::from_config(&config, &registry)?;
    let store = Store::connect(&config.database_url).await?;
    let instance = Instance::new(config.instance_id.as_deref());
    instance.claim(&store).await?;
    store.set_reply_owner(&instance.nonce);
    let broker_refused = plumbing::metrics::Counter::default();
    let limit_metrics = broker::guard::LimitMetrics::new(&registry);
    let broker = broker::prepare(&config, &instance.id, broker_refused.clone(), limit_metrics)?;
    let public = broker::public(&config, &broker);
    let listener = TcpListener::bind(config.http_listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for HTTP on {}: {e} (use --http-listen)", config.http_listen)
    })?;
    let http_addr = listener.local_addr()?;
    let (client, eventloop) = mqtt::main_client(&broker, &instance.id);
    let app = App::new(
        config,
        instance.clone(),
        broker.clone(),
        store.clone(),
        client,
        (provenance, registry),
        &shutdown,
    );
    app.metrics().registry.register(
        "gateway_mqtt_logins_refused",
        "Logins the embedded MQTT broker refused: unknown user, wrong password, another user's client id",
        broker_refused,
    );
    let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
    tasks.spawn(instance.keep_alive(store, stop.clone()));
    mqtt::spawn(app.clone(), eventloop, &broker, &stop, &tasks);
    tasks.spawn(crate::sweeper::run(app.clone(), stop.clone()));
    let router = http::router(app.clone());
    let (http_stop, http_metrics) = (stop.clone(), app.metrics().register_http());
    tasks.spawn(async move {
        if let Err(e) = http::serve(listener, router, tls, limits, http_metrics, http_stop).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%http_addr, scheme, api_keys = keys, broker = %public, instance = app.instance_id(), "gateway started");
    Ok(Running { app, http_addr, broker: public, shutdown, stop, tasks })
}

/// Without `--insecure`, several credentials missing at once are named in
/// one error (one missing alone gets its own, more detailed error later).
fn missing_credentials(config: &Config) -> anyhow::Result<()> {
    if config.insecure {
        return Ok(());
    }
    let mut missing = Vec::new();
    if config.message_secret.is_none() && config.message_secret_file.is_none() {
        missing.push(
            "a message secret (GATEWAY_MESSAGE_SECRET or --message-secret-file, at least 32 bytes, e.g. `openssl rand -base64 48`)",
        );
    }
    if config.broker.is_none() && config.mqtt_users_file.is_none() {
        missing.push("the embedded broker's users (--mqtt-users-file, a mosquitto_passwd file)");
    }
    anyhow::ensure!(
        missing.len() < 2,
        "without --insecure the gateway needs {}: docs/SECURITY.md#setting-it-all-up shows every step (or run with --insecure on one machine)",
        missing.join(" and ")
    );
    Ok(())
}

impl Running {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Once shutdown was asked for, runs it (`crate::shutdown`): drains
    /// within `--shutdown-grace-ms`, stops the tasks (waiting for them at
    /// most that long again), flushes the writer, leaves, closes the pool.
    pub async fn stopped(self) {
        self.shutdown.cancelled().await;
        let grace = Duration::from_millis(self.app.config().shutdown_grace_ms);
        self.app.drain(grace).await;
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace.max(MIN_STOP_WAIT), self.tasks.wait()).await.is_err() {
            tracing::warn!("tasks still running after the grace; going on with the shutdown");
        }
        self.app.flush_writer().await;
        self.app.instance().leave(&self.app).await;
        self.app.store().close().await;
        tracing::info!("stopped");
    }
}
