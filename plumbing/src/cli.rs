//! What every binary of the system does around its own work: logs to stderr
//! (filter from `RUST_LOG`, else the program's default) as text or as one
//! JSON object per line ([`LogFormat`]), errors as one `error: …` line with
//! their causes and exit code 1 (never a backtrace), and shutdown on SIGINT
//! or SIGTERM — a second signal exits at once with [`EXIT_SECOND_SIGNAL`].

use std::future::Future;
use std::process::ExitCode;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The exit code when a second SIGINT/SIGTERM cut a graceful shutdown short
/// (128 + SIGINT, what a shell reports for an interrupted program).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// How log lines are written (`--log-format`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (tracing-subscriber's default format).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the
    /// event's fields at top level (`message`, `command_id`, `device_id`…),
    /// `span` (the innermost span's fields) and `spans` (every open span,
    /// outermost first) — tracing-subscriber's JSON formatter.
    Json,
}

/// Runs `run` on a new tokio runtime after installing the log subscriber.
/// Parse the command line first: the format comes from it.
pub fn main<F>(default_log_filter: &str, format: LogFormat, run: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_tracing(default_log_filter, format);
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr in `format`; `RUST_LOG` overrides `default_filter` (`EnvFilter` syntax).
pub fn init_tracing(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(true).init()
        }
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. From then on, one
/// more of either ends the process at once with [`EXIT_SECOND_SIGNAL`]
/// (an operator who does not want to wait for the graceful shutdown).
pub async fn shutdown_signal() {
    let mut signals = Signals::new();
    signals.next().await;
    tokio::spawn(async move {
        signals.next().await;
        eprintln!("second signal: exiting at once, without finishing the shutdown");
        std::process::exit(EXIT_SECOND_SIGNAL);
    });
}

/// SIGINT and SIGTERM, listened for from creation on: one arriving between
/// two `next` calls is kept for the second.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> Signals {
        let listen = |kind| signal(kind).expect("installing a SIGINT/SIGTERM handler");
        Signals { interrupt: listen(SignalKind::interrupt()), terminate: listen(SignalKind::terminate()) }
    }

    /// Resolves on the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// A clap value parser for secrets (keys, passwords): parses with
/// `T::from_str` and, unlike clap's own parsers, never shows the value in
/// its error, only the flag and why (`T::Err` must not quote it either).
pub struct SecretParser<T>(std::marker::PhantomData<fn() -> T>);

impl<T> SecretParser<T> {
    pub fn new() -> SecretParser<T> {
        SecretParser(std::marker::PhantomData)
    }
}

impl<T> Default for SecretParser<T> {
    fn default() -> Self {
        SecretParser::new()
    }
}

impl<T> Clone for SecretParser<T> {
    fn clone(&self) -> Self {
        SecretParser::new()
    }
}

impl<T> clap::builder::TypedValueParser for SecretParser<T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let name = arg.and_then(clap::Arg::get_long).map(|long| format!("--{long}")).unwrap_or_default();
        let refuse = |why: String| {
            let message = format!("invalid value for {name} (not shown): {why}\n");
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("not UTF-8".into()))?;
        text.parse().map_err(|e: T::Err| refuse(e.to_string()))
    }
}

#[cfg(test)]
mod secret_tests {
    use super::SecretParser;
    use clap::Parser;

    #[derive(Debug, Clone)]
    struct Even(u64);

    impl std::str::FromStr for Even {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            match s.parse::<u64>() {
                Ok(n) if n % 2 == 0 => Ok(Even(n)),
                _ => Err("not an even number".into()),
            }
        }
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, value_parser = SecretParser::<Even>::new())]
        secret: Even,
    }

    #[test]
    fn a_refused_secret_is_not_shown() {
        assert_eq!(Cli::try_parse_from(["x", "--secret", "42"]).unwrap().secret.0, 42);
        let error = Cli::try_parse_from(["x", "--secret", "s3cr3t-4711"]).unwrap_err().to_string();
        assert!(error.contains("--secret") && error.contains("not an even number"), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
    }
}
