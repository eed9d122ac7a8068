//! `gateway`: the message center (`serve`) and a self-contained demo (`demo`).

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about = "Delivers commands to IoT devices and tells the caller what happened")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the gateway: HTTP API, MQTT submission topic, embedded or external broker.
    Serve(Box<gateway::Config>),
    /// Run a gateway, a receiver and a simulated fleet in one process and send them commands.
    Demo(gateway::demo::DemoArgs),
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
    let cli = Cli::parse();
    // rumqttd logs every client that drops its connection as an ERROR: off unless asked for.
    let default_filter = match cli.command {
        Cmd::Serve(_) => "info,rumqttd=off,rumqttc=warn",
        Cmd::Demo(_) => "warn,rumqttd=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Cmd::Serve(config) => serve(*config).await,
        Cmd::Demo(args) => gateway::demo::run(args).await,
    }
}

async fn serve(config: gateway::Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = gateway::start(config, shutdown.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    running.stopped().await;
    Ok(())
}
