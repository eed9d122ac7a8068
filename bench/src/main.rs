//! `bench`: in one run, (1) the broker baseline — two bare MQTT clients doing
//! request→reply through the broker — and (2) the pipeline — gateway, receiver
//! and firmware-sim as separate processes — with the same traffic shape, and
//! the pipeline reported as ratios of the baseline.
//!
//! Layout: [`baseline`] the bare-MQTT run; [`pipeline`] the child processes'
//! set-up and the async and sync phases over HTTP; [`procs`] starting,
//! watching, measuring and stopping children; [`load`] callers, latencies and
//! the progress line; [`dbstats`] MySQL statement counters; [`report`] the
//! figures as a table or JSON; [`scheduled`] `--scheduled N`, N commands due
//! at one instant.

mod baseline;
mod dbstats;
mod floor;
mod load;
mod pipeline;
mod procs;
mod report;
mod scheduled;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use plumbing::mqtt::BrokerAddr;

use crate::dbstats::{DbCounters, PerCommand, Snapshot};
use crate::pipeline::{System, SystemOptions};
use crate::procs::{usage_of, Binaries, Children, Usage};
use crate::report::{LogWarnings, ProcessFigures, Ratios, Report, Settings};

/// The message secret of a benchmark run (its processes live for one run, on loopback).
const BENCH_MESSAGE_SECRET: &str = "the benchmark's message secret, at least 32 bytes";

/// The gateway's default `--max-payload-bytes`, and the broker packet limit it
/// derives from it (gateway/src/server.rs), so the baseline's embedded broker
/// is configured exactly like the gateway's.
const GATEWAY_MAX_PAYLOAD: usize = 64 * 1024;
const EMBEDDED_MAX_PACKET: usize = GATEWAY_MAX_PAYLOAD * 2 + 64 * 1024;

#[derive(Debug, Parser)]
#[command(
    about = "Measures the command pipeline (gateway → broker → receiver → devices, as separate processes) \
             against the bare broker with the same traffic, in one run",
    after_help = "The gateway, receiver and firmware-sim binaries must sit next to this one: \
                  cargo build --release -p gateway -p receiver -p firmware-sim. \
                  For MySQL/MariaDB, name a database; it is created if missing, and the gateway creates its tables. A fresh one per run is cleanest."
)]
struct Args {
    /// Commands per phase [default: 2000; 300 with --quick].
    #[arg(long)]
    commands: Option<usize>,
    /// Simulated devices; commands go round-robin [default: 100; 20 with --quick].
    #[arg(long)]
    devices: Option<usize>,
    /// Requests in flight (callers), in every phase [default: 64; 16 with --quick].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Command payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Which pipeline phases to run (the baseline always runs).
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// The gateway's database [default: a fresh SQLite file in a temporary directory].
    #[arg(long)]
    database_url: Option<String>,
    /// An external MQTT broker (mqtt://HOST:PORT) for the baseline and the pipeline
    /// [default: embedded rumqttd, the gateway's own on a free port].
    #[arg(long)]
    broker: Option<String>,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Small sizes for CI: 300 commands, 20 devices, concurrency 16.
    #[arg(long)]
    quick: bool,
    /// Gateway↔receiver messages unsigned (`--insecure`); by default they
    /// are signed, as in production (PROTOCOL 4.7). Run both to see the cost.
    #[arg(long)]
    unsigned: bool,
    /// Gateway instances sharing the database and the broker (1 to 4); the
    /// phases' calls go round-robin over them, and async results are
    /// long-polled on another instance than the one that took them. Run once
    /// with 1 and once with N to compare.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=pipeline::MAX_INSTANCES as i64))]
    instances: u8,
    /// Abort after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Keep the temporary directory (child logs, SQLite file) after a successful run.
    #[arg(long)]
    keep: bool,
    /// Instead of the baseline and the async/sync phases: submit N async commands all
    /// with the same scheduled_at, then measure from that instant until all are
    /// published and until all are final.
    #[arg(long, value_name = "N")]
    scheduled: Option<usize>,
    /// With --scheduled: scheduled_at is this long after the first submission; it must
    /// leave time to submit all N [default: 15 + N / 1000].
    #[arg(long)]
    schedule_lead_secs: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Async,
    Sync,
    Both,
}

impl Mode {
    fn runs_async(self) -> bool {
        self != Mode::Sync
    }
    fn runs_sync(self) -> bool {
        self != Mode::Async
    }
}

/// The traffic shape both the baseline and the pipeline use.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub(crate) commands: usize,
    pub(crate) devices: usize,
    pub(crate) concurrency: usize,
    pub(crate) payload_bytes: usize,
}

impl Shape {
    /// The firmware-sim's id of device `index` (its default `dev-` prefix, 4 digits).
    pub(crate) fn device_name(index: usize) -> String {
        format!("dev-{index:04}")
    }

    /// The device request `i` goes to (round-robin).
    pub(crate) fn device_id(&self, i: usize) -> String {
        Shape::device_name(i % self.devices)
    }
}

impl Args {
    fn shape(&self) -> anyhow::Result<Shape> {
        let pick =
            |given: Option<usize>, quick, normal| given.unwrap_or(if self.quick { quick } else { normal });
        let shape = Shape {
            commands: pick(self.commands, 300, 2000),
            devices: pick(self.devices, 20, 100),
            concurrency: pick(self.concurrency, 16, 64),
            payload_bytes: self.payload_bytes,
        };
        anyhow::ensure!(self.scheduled != Some(0), "--scheduled must be > 0");
        anyhow::ensure!(
            shape.commands > 0 && shape.devices > 0 && shape.concurrency > 0,
            "sizes must be > 0"
        );
        anyhow::ensure!(shape.devices <= 10_000, "at most 10,000 devices (ids are dev-0000…dev-9999)");
        anyhow::ensure!(
            shape.payload_bytes <= GATEWAY_MAX_PAYLOAD,
            "payload over the gateway's {GATEWAY_MAX_PAYLOAD} bytes"
        );
        Ok(shape)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off,rumqttc=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir =
        std::env::temp_dir().join(format!("bench-{}-{:06x}", std::process::id(), rand::random::<u32>() >> 8));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let limit = Duration::from_secs(args.timeout_secs);
    // Leaving this select drops the run, and with it the children (killed on drop).
    let outcome = tokio::select! {
        r = tokio::time::timeout(limit, run(&args, &dir)) => r.unwrap_or_else(|_| Err(anyhow::anyhow!(
            "aborted: the run took longer than {} s (--timeout-secs)", limit.as_secs()))),
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    let report = match outcome {
        Ok(report) => report,
        Err(e) => bail!("{e:#}\n(logs kept in {})", dir.display()),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    let failures = report.failures();
    if failures > 0 {
        bail!("{failures} command(s) did not succeed (logs kept in {})", dir.display());
    }
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// CPU time and peak RSS of every process at a phase boundary.
type Readings = BTreeMap<&'static str, Usage>;

fn readings(children: &Children) -> Readings {
    let mut r: Readings =
        children.pids().iter().map(|(name, pid)| (*name, usage_of(&pid.to_string()))).collect();
    r.insert("bench", usage_of("self"));
    r
}

async fn run(args: &Args, dir: &Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let shape = args.shape()?;
    let bins = Binaries::beside_me()?;
    let prefix = format!("bench{:08x}", rand::random::<u32>());
    let mut cpu = Cpu::default();

    let (baseline, baseline_unguarded) = match args.scheduled {
        Some(_) => (None, None),
        None => {
            let (broker, internal) = baseline_broker(args.broker.as_deref())?;
            let before = readings(&Children::default());
            let baseline = baseline::run(&broker, &prefix, &shape).await.context("broker baseline")?;
            cpu.phase("baseline", &before, &readings(&Children::default()), shape.commands);
            // The embedded broker's guard costs what the same round trips
            // straight to rumqttd's internal port do not.
            let unguarded = match internal {
                Some(internal) => Some(
                    baseline::run(&internal, &format!("{prefix}u"), &shape)
                        .await
                        .context("broker baseline without the guard")?,
                ),
                None => None,
            };
            (Some(baseline), unguarded)
        }
    };

    let database_url =
        args.database_url.clone().unwrap_or_else(|| format!("sqlite:{}", dir.join("gateway.db").display()));
    dbstats::create_database_if_missing(&database_url).await.context("preparing the database")?;
    let mut children = Children::default();
    let opts = SystemOptions {
        bins: &bins,
        database_url: &database_url,
        broker: args.broker.as_deref(),
        prefix: &prefix,
        devices: shape.devices,
        dir,
        instances: usize::from(args.instances),
        message_secret: (!args.unsigned).then_some(BENCH_MESSAGE_SECRET),
        // The gateway's default (200) unless --scheduled parks more per device.
        max_device_queue: args.scheduled.map_or(200, |n| n.div_ceil(shape.devices.max(1)) + 200),
    };
    let system = System::start(opts, &mut children).await.context("starting the pipeline")?;
    // MySQL/MariaDB on this machine: its CPU per command beside the gateway's.
    let server = database_url.replacen("mariadb:", "mysql:", 1);
    if let Some(pid) = floor::local_server_pid(&server).and_then(|p| p.parse().ok()) {
        children.watch("database", pid);
    }
    let mut db = DbCounters::connect(&database_url).await.context("connecting for statement counters")?;
    system.warm_up(&shape).await?;
    let after_setup = readings(&children);

    let mut db_per_command = BTreeMap::new();
    let mut scheduled = None;
    if let Some(n) = args.scheduled {
        let lead = Duration::from_secs(args.schedule_lead_secs.unwrap_or(15 + n as u64 / 1000));
        let (before, db_before) = (readings(&children), db.snapshot().await?);
        let result = watched(&mut children, scheduled::run(&system, &shape, n, lead)).await??;
        cpu.phase("scheduled", &before, &readings(&children), n);
        per_command(&mut db_per_command, "scheduled", db_before, db.snapshot().await?, n);
        scheduled = Some(result);
    }
    let floor = match args.scheduled {
        Some(_) => None,
        None => floor::run(&database_url, &shape).await.context("store floor")?,
    };
    let mut pipeline_async = None;
    if args.mode.runs_async() && args.scheduled.is_none() {
        let (before, db_before) = (readings(&children), db.snapshot().await?);
        let submitted = watched(&mut children, system.run_async(&shape)).await?;
        // The phase's figures end when every command is final at the gateway,
        // before the bench's own long-polls collecting them.
        cpu.phase("async", &before, &readings(&children), shape.commands);
        per_command(&mut db_per_command, "async", db_before, db.snapshot().await?, shape.commands);
        let result = watched(&mut children, system.collect_async(submitted)).await?;
        pipeline_async = Some(result);
    }
    let mut pipeline_sync = None;
    if args.mode.runs_sync() && args.scheduled.is_none() {
        let (before, db_before) = (readings(&children), db.snapshot().await?);
        let result = watched(&mut children, system.run_sync(&shape)).await?;
        cpu.phase("sync", &before, &readings(&children), shape.commands);
        per_command(&mut db_per_command, "sync", db_before, db.snapshot().await?, shape.commands);
        pipeline_sync = Some(result);
    }

    let end = readings(&children);
    let pids = children.pids();
    let logs = children.logs();
    children.stop().await;
    let processes = cpu.figures(&end, &after_setup, &pids);
    let db_statements_per_command = (!db_per_command.is_empty()).then_some(db_per_command);
    let inputs = report::TargetInputs {
        baseline: baseline.as_ref(),
        pipeline_async: pipeline_async.as_ref(),
        pipeline_sync: pipeline_sync.as_ref(),
        floor: floor.as_ref(),
        processes: &processes,
        db: db_statements_per_command.as_ref(),
        one_caller: shape.concurrency == 1,
    };
    let (targets, one_caller_p50) = (report::targets(&inputs), report::OneCallerP50::of(&inputs));
    Ok(Report {
        settings: Settings {
            commands: args.scheduled.unwrap_or(shape.commands),
            devices: shape.devices,
            concurrency: shape.concurrency,
            payload_bytes: shape.payload_bytes,
            instances: usize::from(args.instances),
            mode: match args.scheduled {
                Some(_) => "scheduled".into(),
                None => format!("{:?}", args.mode).to_lowercase(),
            },
            broker: args
                .broker
                .clone()
                .unwrap_or_else(|| "embedded rumqttd (baseline: one in this process, same settings)".into()),
            database: args
                .database_url
                .as_deref()
                .map_or_else(|| "SQLite, fresh temporary file".into(), hide_password),
            topic_prefix: prefix,
        },
        ratios: Ratios::of(baseline.as_ref(), pipeline_async.as_ref(), pipeline_sync.as_ref()),
        baseline,
        baseline_unguarded,
        setup: system.setup,
        pipeline_async,
        pipeline_sync,
        scheduled,
        floor,
        targets,
        one_caller_p50,
        db_statements_per_command,
        processes,
        devices: read_sim_totals(&system.sim_stats),
        log_warnings: logs.iter().map(|(name, path)| (*name, scan(path))).collect(),
        temp_dir: dir.display().to_string(),
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// With no --broker, an embedded rumqttd in this process configured like the
/// gateway's (same code: `gateway::broker::start_embedded`): its public port
/// (through the guard, as receivers and callers reach it) and its internal
/// one (straight to rumqttd, as the gateway's own clients do).
fn baseline_broker(broker: Option<&str>) -> anyhow::Result<(BrokerAddr, Option<BrokerAddr>)> {
    match broker {
        Some(url) => Ok((url.parse()?, None)),
        None => {
            let addr = demo::free_port()?;
            let internal = gateway::broker::start_embedded(addr, EMBEDDED_MAX_PACKET, Default::default())?;
            Ok((
                BrokerAddr::new(addr.ip().to_string(), addr.port()),
                Some(BrokerAddr::new(internal.ip().to_string(), internal.port())),
            ))
        }
    }
}

/// Runs a phase, failing at once if a child process dies meanwhile.
async fn watched<T>(
    children: &mut Children,
    phase: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::pin!(phase);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            result = &mut phase => return Ok(result),
            _ = tick.tick() => children.check_alive()?,
        }
    }
}

fn per_command(
    into: &mut BTreeMap<&'static str, PerCommand>,
    phase: &'static str,
    before: Option<Snapshot>,
    after: Option<Snapshot>,
    commands: usize,
) {
    if let (Some(before), Some(after)) = (before, after) {
        into.insert(phase, PerCommand::between(&before, &after, commands));
    }
}

/// CPU seconds per 1,000 commands, per process and phase.
#[derive(Debug, Default)]
struct Cpu(BTreeMap<&'static str, BTreeMap<&'static str, f64>>);

impl Cpu {
    fn phase(&mut self, phase: &'static str, before: &Readings, after: &Readings, commands: usize) {
        for (name, end) in after {
            let start = before.get(name).map_or(0.0, |u| u.cpu_s);
            let per_1k = (end.cpu_s - start) / commands as f64 * 1000.0;
            self.0.entry(name).or_default().insert(phase, per_1k);
        }
    }

    fn figures(
        self,
        end: &Readings,
        after_setup: &Readings,
        pids: &BTreeMap<&'static str, u32>,
    ) -> BTreeMap<&'static str, ProcessFigures> {
        let mut cpu = self.0;
        end.iter()
            .map(|(name, usage)| {
                let pid = pids.get(name).copied().unwrap_or_else(std::process::id);
                let cpu_s_per_1k = cpu.remove(name).unwrap_or_default();
                let peak_rss_after_setup_mib = after_setup.get(name).map_or(0.0, |u| u.peak_rss_mib);
                let figures = ProcessFigures {
                    pid,
                    cpu_s_per_1k,
                    peak_rss_mib: usage.peak_rss_mib,
                    peak_rss_after_setup_mib,
                };
                (*name, figures)
            })
            .collect()
    }
}

fn read_sim_totals(path: &PathBuf) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let stats: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(stats["totals"].clone())
}

fn scan(path: &Path) -> LogWarnings {
    report::scan_log(&std::fs::read_to_string(path).unwrap_or_default())
}

/// `mysql://user:secret@host/db` → `mysql://user:***@host/db`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((user_pass, host)) if user_pass.contains(':') => {
            let user = user_pass.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(hide_password("mysql://root:pw@127.0.0.1:3306/b"), "mysql://root:***@127.0.0.1:3306/b");
        assert_eq!(hide_password("mysql://root@127.0.0.1:3306/b"), "mysql://root@127.0.0.1:3306/b");
        assert_eq!(hide_password("sqlite:x.db"), "sqlite:x.db");
    }

    #[test]
    fn quick_sizes_yield_to_explicit_ones() {
        let args = Args::parse_from(["bench", "--quick", "--commands", "50"]);
        let s = args.shape().unwrap();
        assert_eq!((s.commands, s.devices, s.concurrency), (50, 20, 16));
    }
}
