//! `receiver`: bridges MQTT command topics to devices connected over TCP.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about = "Bridges MQTT command topics to devices connected over TCP")]
struct Cli {
    #[command(flatten)]
    config: receiver::Config,
}

/// Errors end the program with one readable line (and its causes) and exit code 1,
/// never a backtrace.
fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let running = receiver::start(cli.config, shutdown.clone()).await?;
    wait_for_signal().await;
    shutdown.cancel();
    running.stopped().await;
    Ok(())
}

async fn wait_for_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
