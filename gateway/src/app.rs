//! [`App`], the handle every part of the gateway shares: configuration, store,
//! broker client, waiters, metrics. The steps of a command's life are
//! `impl App` blocks in their own modules (`submit`, `publish`, `reports`,
//! `presence`, `cancel`, `waiters`); front doors (`http`, `mqtt`) only
//! translate to and from them.

use std::sync::Arc;

use plumbing::metrics::Metrics;
use plumbing::mqtt::Brokers;
use rumqttc::AsyncClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::instance::Instance;
use crate::metrics::GatewayMetrics;
use crate::presence::RollCall;
use crate::provenance::Provenance;
use crate::receiver_limits::ReceiverLimits;
use crate::shutdown::Lifecycle;
use crate::store::Store;
use crate::waiters::Waiters;
use crate::writer::{self, InsertRequest};
use protocol::Topics;

/// Shared handle to the core; cheap to clone.
#[derive(Clone, Debug)]
pub struct App {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: Config,
    /// This process among the instances sharing the database and broker.
    pub(crate) instance: Instance,
    /// The broker(s), for clearing dead instances' sessions.
    pub(crate) brokers: Brokers,
    pub(crate) store: Store,
    pub(crate) mqtt: AsyncClient,
    pub(crate) topics: Topics,
    pub(crate) waiters: Waiters,
    pub(crate) metrics: GatewayMetrics,
    /// Wakes the sweeper before its next tick (a device came online).
    pub(crate) sweep_now: tokio::sync::Notify,
    /// The current roll call: receivers that answered it. A std mutex, never
    /// held across an `.await`.
    pub(crate) rollcall: std::sync::Mutex<RollCall>,
    /// Refused presence is logged at most once per 5 s.
    pub(crate) presence_log: plumbing::throttle::Throttle,
    /// When a count last found `--max-unregistered-devices` reached.
    pub(crate) unregistered_full: std::sync::Mutex<Option<std::time::Instant>>,
    /// New commands on their way to the group-commit writer.
    pub(crate) inserts: mpsc::Sender<InsertRequest>,
    /// Signing what goes to receivers, checking what comes from them.
    pub(crate) provenance: Provenance,
    /// How much each receiver may send.
    pub(crate) receiver_limits: ReceiverLimits,
    /// Readiness and the steps of a graceful shutdown.
    pub(crate) lifecycle: Lifecycle,
}

impl App {
    /// Builds the handle and starts the group-commit writer (it ends when
    /// every `App` is gone, or at the flush of a graceful shutdown). The
    /// shutdown begins when `shutdown` is cancelled (see [`crate::shutdown`]).
    pub fn new(
        config: Config,
        instance: Instance,
        brokers: Brokers,
        store: Store,
        mqtt: AsyncClient,
        (provenance, registry): (Provenance, Metrics),
        shutdown: &CancellationToken,
    ) -> App {
        let topics = Topics::new(config.topic_prefix.clone());
        let receiver_limits =
            ReceiverLimits::new(&registry, config.receiver_report_rate, config.receiver_presence_rate);
        let metrics = GatewayMetrics::new(registry, store.statements());
        let cap = writer::DeviceCap {
            max: config.max_device_queue,
            // The sweeper looks at a waiting command again after about this long.
            retry_after_ms: config.ack_timeout_ms,
            refused: metrics.device_queue_full.clone(),
        };
        let lifecycle = Lifecycle::new(shutdown);
        let (inserts, writer) =
            writer::start(store.clone(), instance.id.clone(), cap, lifecycle.writer_close());
        lifecycle.set_writer(writer);
        App {
            inner: Arc::new(Inner {
                config,
                instance,
                brokers,
                store,
                mqtt,
                topics,
                waiters: Waiters::default(),
                metrics,
                sweep_now: tokio::sync::Notify::new(),
                rollcall: std::sync::Mutex::default(),
                presence_log: plumbing::throttle::Throttle::default(),
                unregistered_full: std::sync::Mutex::default(),
                inserts,
                provenance,
                receiver_limits,
                lifecycle,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// This instance's id (given or generated).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance.id
    }

    pub fn instance(&self) -> &Instance {
        &self.inner.instance
    }

    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.inner.metrics
    }

    pub fn provenance(&self) -> &Provenance {
        &self.inner.provenance
    }

    pub fn receiver_limits(&self) -> &ReceiverLimits {
        &self.inner.receiver_limits
    }

    pub fn mqtt(&self) -> &AsyncClient {
        &self.inner.mqtt
    }

    pub fn waiters(&self) -> &Waiters {
        &self.inner.waiters
    }

    /// Resolves when someone asked the sweeper to run now.
    pub async fn sweep_requested(&self) {
        self.inner.sweep_now.notified().await;
    }
}
