//! What every binary of the system does around its own work: logs to stderr
//! (filter from `RUST_LOG`, else the program's default), errors as one
//! `error: …` line with their causes and exit code 1 (never a backtrace), and
//! shutdown on SIGINT or SIGTERM.

use std::future::Future;
use std::process::ExitCode;

/// Runs `run` on a new tokio runtime after installing the log subscriber.
pub fn main<F>(default_log_filter: &str, run: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_tracing(default_log_filter);
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default_filter` (`EnvFilter` syntax).
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
