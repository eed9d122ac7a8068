//! `receiver`: bridges MQTT command topics to devices connected over TCP,
//! serial lines and Modbus; stops on SIGINT/SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about = "Bridges MQTT command topics to devices connected over TCP")]
struct Cli {
    #[command(flatten)]
    config: receiver::Config,
}

fn main() -> std::process::ExitCode {
    plumbing::cli::main("info,rumqttc=warn", run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let running = receiver::start(cli.config, shutdown.clone()).await?;
    plumbing::cli::shutdown_signal().await;
    shutdown.cancel();
    running.stopped().await;
    Ok(())
}
