//! Builds the parts, starts their tasks, and shuts them down in order:
//! stop accepting HTTP → stop the MQTT tasks → close the database pool.

use std::net::SocketAddr;

use plumbing::mqtt::{BrokerAddr, Brokers};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::Config;
use crate::instance::Instance;
use crate::store::Store;
use crate::{broker, http, mqtt};

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    pub app: App,
    /// Where the HTTP API listens (useful with port 0).
    pub http_addr: SocketAddr,
    /// The broker the gateway uses (embedded, or the external ones it was given).
    pub broker: Brokers,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Starts a gateway: store (with migrations), its instance id (refused if a
/// live instance holds it), broker, MQTT tasks, HTTP server.
/// It runs until `shutdown` is cancelled; then `Running::stopped` drains it.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    for (flag, value) in
        [("--max-payload-bytes", config.max_payload_bytes), ("--max-result-bytes", config.max_result_bytes)]
    {
        anyhow::ensure!(
            (1..=protocol::frame::MAX_PAYLOAD).contains(&value),
            "{flag} must be 1 to {} (what a device frame carries), not {value}",
            protocol::frame::MAX_PAYLOAD
        );
    }
    let store = Store::connect(&config.database_url).await?;
    let instance = Instance::new(config.instance_id.as_deref());
    instance.claim(&store).await?;
    store.set_reply_owner(&instance.nonce);
    let broker: Brokers = match &config.broker {
        Some(urls) => urls.parse()?,
        None => {
            // Every message the system sends fits (`protocol::limits`).
            broker::start_embedded(config.mqtt_listen, config.mqtt_message_limit())?;
            BrokerAddr { host: config.mqtt_listen.ip().to_string(), port: config.mqtt_listen.port() }.into()
        }
    };
    let listener = TcpListener::bind(config.http_listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen for HTTP on {}: {e} (use --http-listen)", config.http_listen)
    })?;
    let http_addr = listener.local_addr()?;
    let (client, eventloop) = mqtt::main_client(&broker, &instance.id);
    let app = App::new(config, instance.clone(), broker.clone(), store.clone(), client);
    let tasks = TaskTracker::new();
    tasks.spawn(instance.keep_alive(store, shutdown.clone()));
    mqtt::spawn(app.clone(), eventloop, &broker, &shutdown, &tasks);
    tasks.spawn(crate::sweeper::run(app.clone(), shutdown.clone()));
    let router = http::router(app.clone());
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%http_addr, %broker, instance = app.instance_id(), "gateway started");
    Ok(Running { app, http_addr, broker, shutdown, tasks })
}

impl Running {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for every task to finish after shutdown, then closes the pool.
    pub async fn stopped(self) {
        self.shutdown.cancelled().await;
        self.tasks.close();
        self.tasks.wait().await;
        self.app.instance().leave(&self.app).await;
        self.app.store().close().await;
    }
}
