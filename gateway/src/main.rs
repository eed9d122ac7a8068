//! `gateway serve`: the message center. (The all-in-one demo is its own
//! crate: `cargo run --release -p demo`.)

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every client that drops its connection as an ERROR: off unless asked for.
    plumbing::cli::main("info,rumqttd=off,rumqttc=warn", async move {
        let Cmd::Serve(config) = cli.command;
        serve(*config).await
    })
}

async fn serve(config: gateway::Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = gateway::start(config, shutdown.clone()).await?;
    plumbing::cli::shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    running.stopped().await;
    Ok(())
}
