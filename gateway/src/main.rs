//! `gateway serve`: the message center; `gateway config`: its effective
//! settings; `gateway token`: its HTTP API keys; `gateway
//! device|send|command`: a client of its HTTP API.
//! (The all-in-one demo is its own crate: `cargo run --release -p demo`.)

/// mimalloc: fewer CPU cycles per allocation than glibc's malloc on the
/// per-command paths (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use plumbing::config::Settings;
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
    Serve(Box<Settings<gateway::Config>>),
    /// Print the settings `serve` would run with (same flags, --config and
    /// environment) as a TOML config file, secrets masked as "***".
    Config(Box<Settings<gateway::Config>>),
    /// Print a receiver's message key (PROTOCOL 4.7), derived from the
    /// message secret: give it to that receiver as RECEIVER_KEY.
    ReceiverKey(ReceiverKeyArgs),
    /// Manage HTTP API keys: create (printed once), list, revoke.
    Token(gateway::token::TokenArgs),
    /// Client of a running gateway's HTTP API: `device`, `send`, `command`.
    #[command(flatten)]
    Client(gateway::client::ClientCommand),
}

#[derive(Debug, clap::Args)]
struct ReceiverKeyArgs {
    /// The receiver's id (its --receiver-id).
    receiver_id: String,
    /// Key generation: 1, then one more at each rotation (docs/SECURITY.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    generation: u32,
    /// The gateways' message secret.
    #[arg(long, env = "GATEWAY_MESSAGE_SECRET", hide_env_values = true)]
    message_secret: Option<plumbing::seal::Secret>,
    /// A file holding the message secret.
    #[arg(long, env = "GATEWAY_MESSAGE_SECRET_FILE")]
    message_secret_file: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Cmd::Client(command) = cli.command {
        return gateway::client::main(command);
    }
    if let Cmd::Config(settings) = &cli.command {
        return print_config(settings);
    }
    if let Cmd::ReceiverKey(args) = &cli.command {
        return match receiver_key(args) {
            Ok(key) => {
                println!("{key}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // `serve`'s settings are read before logging starts: its format is one.
    let config = match &cli.command {
        Cmd::Serve(settings) => match settings.load() {
            Ok(config) => Some(config),
            Err(e) => {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let log_format = config.as_ref().map_or(plumbing::cli::LogFormat::Text, |c| c.log_format);
    // rumqttd logs every client that drops its connection as an ERROR: off unless asked for.
    plumbing::cli::main("info,rumqttd=off,rumqttc=warn", log_format, async move {
        match (cli.command, config) {
            (Cmd::Serve(_), Some(config)) => serve(config).await,
            (Cmd::Token(args), _) => gateway::token::run(args, &mut std::io::stdout()).await,
            _ => unreachable!("handled before the runtime starts"),
        }
    })
}

/// `gateway config`: the effective settings on stdout, or one `error:` line.
fn print_config(settings: &Settings<gateway::Config>) -> std::process::ExitCode {
    match settings.effective_toml() {
        Ok(toml) => {
            print!("{toml}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The key `gateway receiver-key` prints (standard base64).
fn receiver_key(args: &ReceiverKeyArgs) -> anyhow::Result<String> {
    let secret =
        plumbing::seal::read_secret(args.message_secret.as_ref(), args.message_secret_file.as_deref())?
            .ok_or_else(|| {
                anyhow::anyhow!("no message secret: set GATEWAY_MESSAGE_SECRET or --message-secret-file")
            })?;
    anyhow::ensure!(
        secret.expose().len() >= protocol::seal::MIN_SECRET_LEN,
        "the message secret must be at least {} bytes",
        protocol::seal::MIN_SECRET_LEN
    );
    anyhow::ensure!(
        protocol::DeviceId::parse(&args.receiver_id).is_ok(),
        "{:?} is not a valid receiver id (the device id rules apply)",
        args.receiver_id
    );
    let key = protocol::seal::receiver_key(secret.expose().as_bytes(), &args.receiver_id, args.generation);
    Ok(key.to_base64())
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
