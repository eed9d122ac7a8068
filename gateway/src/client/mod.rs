//! `gateway device|send|command`: a client of a running gateway's HTTP API
//! (docs/openapi.json), for operators and scripts. It knows the API's JSON,
//! never the server's internals: [`api`] makes the requests (URL, key, TLS)
//! and sorts their failures, [`outcome`] turns a command's final status into
//! an exit code, [`render`] draws tables, [`wait`] long-polls with a
//! progress line; the subcommands here tie them together.

mod api;
mod outcome;
mod render;
mod wait;

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use api::{Api, ClientError};
pub use api::{ApiKey, Connection};
pub use outcome::Exit;

/// Exit codes as `--help` shows them (the same table is in README.md).
pub const EXIT_CODES: &str = "\
Exit codes:
  0   succeeded (a read, put or async submission worked; a command succeeded)
  1   anything else went wrong (e.g. writing the output)
  2   usage error: bad flags, payload or key file
  3   cannot connect to the gateway (refused, TLS, no answer in time)
  4   the gateway answered with an HTTP error (its message is printed)
  10  the command failed: the device answered with an error
  11  the command timed out: delivered, but no result after every attempt
  12  the command expired: its deadline (ttl) passed
  13  the command was canceled
  14  the command was undeliverable: never delivered in any attempt
  15  the command is still not final after waiting";

/// The client subcommands of `gateway` (flattened into its own subcommands).
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// The device registry: register or update, read, list.
    #[command(after_help = EXIT_CODES)]
    Device(Box<DeviceArgs>),
    /// Send a command to a device; waits for its result unless --async.
    #[command(after_help = EXIT_CODES)]
    Send(Box<SendArgs>),
    /// Commands: read, list, event log, cancel, wait until final.
    #[command(after_help = EXIT_CODES)]
    Command(Box<CommandArgs>),
}

#[derive(Debug, Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    action: DeviceAction,
}

#[derive(Debug, Subcommand)]
enum DeviceAction {
    /// Register a device or replace its entry (labels and enabled flag).
    Put {
        /// The device id (1 to 128 of `A-Z a-z 0-9 . _ : -`).
        id: String,
        /// A label `KEY=VALUE` (repeatable; the value is kept as a string).
        /// The labels given replace all previous ones.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Register it disabled: commands to it are refused.
        #[arg(long)]
        disabled: bool,
    },
    /// Show one device.
    Get { id: String },
    /// List devices in id order, a page at a time.
    List {
        /// Only devices online now (filtered here, on the page(s) read).
        #[arg(long)]
        online: bool,
        /// Devices per page, 1 to 1000 (the gateway's default: 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this device id (the `next_after` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Read every page, not just one.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    connection: Connection,
    /// The device to send to.
    device: String,
    /// The command name, e.g. `reboot`.
    name: String,
    /// The payload: JSON text sent to the device exactly as written, or `-`
    /// to read it from standard input. Absent: `null`.
    payload: Option<String>,
    /// A binary payload instead, in standard base64.
    #[arg(long, conflicts_with = "payload")]
    payload_base64: Option<String>,
    /// Do not wait: print the command's id (to stdout) as soon as it is accepted.
    #[arg(long = "async")]
    is_async: bool,
    /// How long the gateway holds the call for a final result, in ms (at
    /// most 300000; its default: --default-wait-ms, 10000).
    #[arg(long, conflicts_with = "is_async")]
    wait_ms: Option<u64>,
    /// The command's deadline from acceptance, in ms (gateway default 60000).
    #[arg(long)]
    ttl_ms: Option<u64>,
    /// Publications at most (gateway default 5).
    #[arg(long)]
    max_attempts: Option<u64>,
    /// Sending again with the same key gives back the first command, not a second one.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// With --async: publish nothing before this time (RFC 3339).
    #[arg(long, requires = "is_async")]
    scheduled_at: Option<String>,
}

#[derive(Debug, Args)]
pub struct CommandArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    action: CommandAction,
}

#[derive(Debug, Subcommand)]
enum CommandAction {
    /// Show one command as it stands.
    Get { id: String },
    /// List commands, newest first, a page at a time.
    List {
        /// Only this device's commands.
        #[arg(long)]
        device: Option<String>,
        /// Only commands in this status (scheduled, pending, sent, delivered,
        /// succeeded, failed, expired, canceled).
        #[arg(long)]
        status: Option<String>,
        /// Commands per page, 1 to 1000 (the gateway's default: 100).
        #[arg(long)]
        limit: Option<u32>,
        /// Older than this command id (the `next_cursor` of the previous page).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// A command's event log (every transition and note), oldest first.
    Events { id: String },
    /// Cancel a command that is not final yet.
    Cancel {
        id: String,
        /// How long to wait for the receiver to confirm, in ms (gateway default 5000).
        #[arg(long)]
        wait_ms: Option<u64>,
    },
    /// Wait until a command is final; the exit code tells how it ended.
    Wait {
        id: String,
        /// Give up after this many ms (exit 15). Default: wait until it is
        /// final, which it is at its deadline (`expires_at`) at the latest.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

/// Runs one client subcommand on a small runtime of its own; the exit code
/// is [`Exit`]'s. Errors go to stderr as one `error: …` line.
pub fn main(command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&ClientError::Other(format!("starting the runtime: {e}"))),
    };
    let mut out = std::io::stdout().lock();
    match runtime.block_on(run(command, &mut out)) {
        Ok(exit) => exit.into(),
        Err(e) => fail(&e),
    }
}

fn fail(e: &ClientError) -> ExitCode {
    eprintln!("error: {e}");
    e.exit().into()
}

/// Runs `command`, writing its output to `out`; the exit code to end with.
async fn run(client: ClientCommand, out: &mut impl Write) -> Result<Exit, ClientError> {
    match client {
        ClientCommand::Device(args) => {
            let api = Api::new(&args.connection)?;
            device(&api, args.action, args.connection.json, out).await
        }
        ClientCommand::Send(args) => {
            let api = Api::new(&args.connection)?;
            send(&api, &args, out).await
        }
        ClientCommand::Command(args) => {
            let api = Api::new(&args.connection)?;
            command(&api, args.action, args.connection.json, out).await
        }
    }
}

async fn device(
    api: &Api,
    action: DeviceAction,
    json: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    match action {
        DeviceAction::Put { id, labels, disabled } => {
            let labels: serde_json::Map<String, Value> =
                labels.into_iter().map(|(k, v)| (k, v.into())).collect();
            let body = json!({"enabled": !disabled, "labels": labels});
            let answer = api.put(&["v1", "devices", &id], &body).await?;
            print_or(out, json, &answer.text, || render::device(&answer.json))?;
        }
        DeviceAction::Get { id } => {
            let answer = api.get(&["v1", "devices", &id], &[]).await?;
            print_or(out, json, &answer.text, || render::device(&answer.json))?;
        }
        DeviceAction::List { online, limit, after, all } => {
            let page = device_pages(api, limit, after, all, online).await?;
            if json {
                writeln!(out, "{page}")?;
            } else {
                writeln!(out, "{}", render::devices(&page["items"]))?;
                hint_next(&page["next_after"], "--after");
            }
        }
    }
    Ok(Exit::Ok)
}

/// `GET /v1/devices`: one page, or every page with `all`, kept to the online
/// devices with `online`; in the API's page shape either way.
async fn device_pages(
    api: &Api,
    limit: Option<u32>,
    mut after: Option<String>,
    all: bool,
    online: bool,
) -> Result<Value, ClientError> {
    let mut items = Vec::new();
    loop {
        let mut query = Vec::new();
        query.extend(limit.map(|l| ("limit", l.to_string())));
        query.extend(after.clone().map(|a| ("after", a)));
        let page = api.get(&["v1", "devices"], &query).await?.json;
        let next = page["next_after"].as_str().map(str::to_owned);
        let list =
            page["items"].as_array().ok_or_else(|| ClientError::bad_answer("a device page without items"))?;
        items.extend(list.iter().filter(|d| !online || d["online"] == true).cloned());
        match next {
            Some(next) if all => after = Some(next),
            next => return Ok(json!({"items": items, "next_after": next})),
        }
    }
}

/// The command body of `POST /v1/devices/{id}/commands` (docs/openapi.json
/// `CommandRequest`); the payload goes as the caller wrote it.
#[derive(Debug, Serialize)]
struct CommandRequest<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<&'a str>,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled_at: Option<&'a str>,
}

async fn send(api: &Api, args: &SendArgs, out: &mut impl Write) -> Result<Exit, ClientError> {
    let text = match args.payload.as_deref() {
        Some("-") => Some(read_stdin()?),
        other => other.map(str::to_owned),
    };
    let payload = match &text {
        Some(text) => Some(
            serde_json::from_str::<&RawValue>(text)
                .map_err(|e| ClientError::Usage(format!("the payload is not JSON: {e}")))?,
        ),
        None => None,
    };
    let body = CommandRequest {
        name: &args.name,
        payload,
        payload_base64: args.payload_base64.as_deref(),
        mode: if args.is_async { "async" } else { "sync" },
        wait_ms: args.wait_ms,
        ttl_ms: args.ttl_ms,
        max_attempts: args.max_attempts,
        idempotency_key: args.idempotency_key.as_deref(),
        scheduled_at: args.scheduled_at.as_deref(),
    };
    let body = serde_json::to_value(&body).map_err(|e| ClientError::Other(e.to_string()))?;
    let path = ["v1", "devices", &args.device, "commands"];
    let json = args.connection.json;
    if args.is_async {
        let answer = api.post(&path, &[], &body, None).await?;
        let id = answer.json["id"]
            .as_str()
            .ok_or_else(|| ClientError::bad_answer("an accepted command without id"))?;
        let line = if json { answer.text.as_str() } else { id };
        writeln!(out, "{line}")?;
        return Ok(Exit::Ok);
    }
    // The gateway holds the call up to wait_ms (300 s at most).
    let hold = Duration::from_millis(args.wait_ms.unwrap_or(300_000));
    let label = format!("sending {} to {}", args.name, args.device);
    let answer = wait::with_progress(&label, api.post(&path, &[], &body, Some(hold))).await?;
    finished(out, json, &answer.text, &answer.json)
}

async fn command(
    api: &Api,
    action: CommandAction,
    json: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    match action {
        CommandAction::Get { id } => {
            let answer = api.get(&["v1", "commands", &id], &[]).await?;
            print_or(out, json, &answer.text, || render::command(&answer.json))?;
        }
        CommandAction::List { device, status, limit, cursor } => {
            let mut query = Vec::new();
            query.extend(device.map(|d| ("device_id", d)));
            query.extend(status.map(|s| ("status", s)));
            query.extend(limit.map(|l| ("limit", l.to_string())));
            query.extend(cursor.map(|c| ("cursor", c)));
            let answer = api.get(&["v1", "commands"], &query).await?;
            print_or(out, json, &answer.text, || render::commands(&answer.json["items"]))?;
            if !json {
                hint_next(&answer.json["next_cursor"], "--cursor");
            }
        }
        CommandAction::Events { id } => {
            let answer = api.get(&["v1", "commands", &id, "events"], &[]).await?;
            print_or(out, json, &answer.text, || render::events(&answer.json["items"]))?;
        }
        CommandAction::Cancel { id, wait_ms } => {
            let query: Vec<_> = wait_ms.map(|w| ("wait_ms", w.to_string())).into_iter().collect();
            let hold = Duration::from_millis(wait_ms.unwrap_or(5_000));
            let answer =
                api.post(&["v1", "commands", &id, "cancel"], &query, &json!(null), Some(hold)).await?;
            // Canceled: the cancel worked (0). Not final yet: asked for, the
            // receiver's answer still to come (15).
            return match finished(out, json, &answer.text, &answer.json)? {
                Exit::Canceled => Ok(Exit::Ok),
                other => Ok(other),
            };
        }
        CommandAction::Wait { id, timeout_ms } => {
            let answer = wait::until_final(api, &id, timeout_ms.map(Duration::from_millis)).await?;
            return finished(out, json, &answer.text, &answer.json);
        }
    }
    Ok(Exit::Ok)
}

/// Prints a command that a wait ended with; its status is the exit code.
/// One still under way also gets a hint on stderr.
fn finished(out: &mut impl Write, json: bool, text: &str, command: &Value) -> Result<Exit, ClientError> {
    print_or(out, json, text, || render::command(command))?;
    let exit = Exit::of_command(command);
    if exit == Exit::NotFinal {
        let id = command["id"].as_str().unwrap_or("?");
        let status = command["status"].as_str().unwrap_or("?");
        eprintln!("command {id} is still {status}; `gateway command wait {id}` waits on");
    }
    Ok(exit)
}

/// `--json`: the API's document as it came; else the table `human` draws.
fn print_or(
    out: &mut impl Write,
    json: bool,
    text: &str,
    human: impl FnOnce() -> String,
) -> std::io::Result<()> {
    match json {
        true => writeln!(out, "{}", text.trim_end()),
        false => writeln!(out, "{}", human()),
    }
}

/// Tells on stderr (only to a person at a terminal) how to read the next page.
fn hint_next(next: &Value, flag: &str) {
    if let (Some(next), true) = (next.as_str(), std::io::stderr().is_terminal()) {
        eprintln!("(more: {flag} {next})");
    }
}

fn read_stdin() -> Result<String, ClientError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| ClientError::Usage(format!("reading the payload from stdin: {e}")))?;
    Ok(text)
}

/// `KEY=VALUE` of `--label`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
