//! `receiver`: bridges MQTT command topics to devices connected over TCP,
//! serial lines and Modbus; stops on SIGINT/SIGTERM (a second one exits at
//! once). `receiver --print-config` prints its effective settings instead.

/// mimalloc: fewer CPU cycles per allocation than glibc's malloc on the
/// per-command paths (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use plumbing::config::Settings;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about = "Bridges MQTT command topics to devices connected over TCP")]
struct Cli {
    #[command(flatten)]
    settings: Settings<receiver::Config>,
    /// Print the effective settings (defaults < --config file < environment
    /// < flags) as a TOML config file, secrets masked as "***", and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The settings are read before logging starts: its format is one.
    let read = match cli.print_config {
        true => cli.settings.effective_toml().map(|toml| print!("{toml}")).map(|()| None),
        false => cli.settings.load().map(Some),
    };
    match read {
        Ok(Some(config)) => plumbing::cli::main("info,rumqttc=warn", config.log_format, run(config)),
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: receiver::Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = receiver::start(config, shutdown.clone()).await?;
    plumbing::cli::shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    running.stopped().await;
    Ok(())
}
