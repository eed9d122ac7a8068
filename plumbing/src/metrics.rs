//! Prometheus metrics: one registry per program instance (tests run several
//! in one process, so nothing is global), rendered in the text exposition
//! format by `prometheus-client`, the Prometheus project's Rust client.
//!
//! Counters are registered without their `_total` suffix; the encoder adds it
//! (OpenMetrics 1.0, "Counter"). Values stay readable (`Counter::get`) for tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::header;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry of one program instance; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// A std mutex: held to register or to encode, never across an `.await`.
    registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// Registers `metric` under `name` (counters without `_total`) with its
    /// help text (without a final period: the encoder adds one).
    pub fn register<M: Metric + Clone>(&self, name: &str, help: &str, metric: M) -> M {
        self.registry.lock().expect("metrics registry lock").register(name, help, metric.clone());
        metric
    }

    /// A new counter, registered.
    pub fn counter(&self, name: &str, help: &str) -> Counter {
        self.register(name, help, Counter::default())
    }

    /// Every metric in the text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry.lock().expect("metrics registry lock"))
            .expect("writing to a String cannot fail");
        text
    }

    /// A router answering `GET /metrics`.
    pub fn router(&self) -> Router {
        let metrics = self.clone();
        Router::new().route(
            "/metrics",
            get(move || {
                let text = metrics.render();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], text) }
            }),
        )
    }

    /// Serves `GET /metrics` and the routes of `extra` (e.g. `/readyz`) on
    /// `listen` until `shutdown`. Binds before returning, so a taken port is
    /// an error at start; returns the bound address (useful with port 0) and
    /// the task to run.
    pub async fn serve(
        &self,
        listen: SocketAddr,
        extra: Router,
        shutdown: CancellationToken,
    ) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()> + Send + 'static)> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let router = self.router().merge(extra);
        let serve = async move {
            let served =
                axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics server failed");
            }
        };
        Ok((addr, serve))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_total_and_help() {
        let metrics = Metrics::default();
        let c = metrics.counter("things_done", "Things done");
        c.inc();
        c.inc();
        let text = metrics.render();
        assert!(text.contains("# HELP things_done Things done."), "{text}");
        assert!(text.contains("things_done_total 2"), "{text}");
        assert_eq!(c.get(), 2);
    }
}
