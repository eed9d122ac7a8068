//! `demo`: the whole system in one process on embedded defaults, and a mix of
//! commands sent to it through the real HTTP API.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs a gateway, a receiver and a simulated fleet in one process and sends them commands"
)]
struct Cli {
    #[command(flatten)]
    args: demo::demo::DemoArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // rumqttd logs every client that drops its connection as an ERROR: off unless asked for.
    plumbing::cli::main("warn,rumqttd=off", plumbing::cli::LogFormat::Text, demo::demo::run(cli.args))
}
