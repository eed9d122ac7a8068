//! The figures of one run: one serializable [`Report`] (for `--json`) and its
//! rendering as a plain-text table.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::baseline::BaselineResult;
use crate::dbstats::PerCommand;
use crate::floor::Floor;
use crate::load::Latency;
use crate::pipeline::{AsyncResult, Failures, SetupTimes, SyncResult};
use crate::scheduled::ScheduledResult;

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) settings: Settings,
    /// `None` with --scheduled.
    pub(crate) baseline: Option<BaselineResult>,
    /// The same round trips straight to the embedded rumqttd, past the
    /// gateway's guard (embedded broker only): the guard's cost.
    pub(crate) baseline_unguarded: Option<BaselineResult>,
    pub(crate) setup: SetupTimes,
    pub(crate) pipeline_async: Option<AsyncResult>,
    pub(crate) pipeline_sync: Option<SyncResult>,
    pub(crate) scheduled: Option<ScheduledResult>,
    pub(crate) ratios: Ratios,
    /// The store floor (MySQL/MariaDB only; `None` on SQLite or with --scheduled).
    pub(crate) floor: Option<Floor>,
    /// The figures issue 15 sets targets for, each beside its target.
    pub(crate) targets: Vec<Target>,
    /// One caller's sync p50, taken apart (`--concurrency 1` on MySQL/MariaDB).
    pub(crate) one_caller_p50: Option<OneCallerP50>,
    /// `None` on SQLite (no statement counters).
    pub(crate) db_statements_per_command: Option<BTreeMap<&'static str, PerCommand>>,
    pub(crate) processes: BTreeMap<&'static str, ProcessFigures>,
    /// The firmware-sim's own totals (from its stats file), if it wrote them.
    pub(crate) devices: Option<serde_json::Value>,
    pub(crate) log_warnings: BTreeMap<&'static str, LogWarnings>,
    pub(crate) temp_dir: String,
    pub(crate) wall_s: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Settings {
    pub(crate) commands: usize,
    pub(crate) devices: usize,
    pub(crate) concurrency: usize,
    pub(crate) payload_bytes: usize,
    /// Gateway instances sharing the database and broker.
    pub(crate) instances: usize,
    pub(crate) mode: String,
    pub(crate) broker: String,
    pub(crate) database: String,
    pub(crate) topic_prefix: String,
}

/// Pipeline figure ÷ baseline figure.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Ratios {
    pub(crate) async_throughput: Option<f64>,
    pub(crate) sync_throughput: Option<f64>,
    pub(crate) sync_latency: Option<Latency>,
}

impl Ratios {
    pub(crate) fn of(
        base: Option<&BaselineResult>,
        a: Option<&AsyncResult>,
        s: Option<&SyncResult>,
    ) -> Ratios {
        let Some(base) = base else { return Ratios::default() };
        let div = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
        let sync_latency = match (s.and_then(|s| s.latency), base.latency) {
            (Some(p), Some(b)) => Some(Latency {
                p50_ms: div(p.p50_ms, b.p50_ms),
                p90_ms: div(p.p90_ms, b.p90_ms),
                p99_ms: div(p.p99_ms, b.p99_ms),
                max_ms: div(p.max_ms, b.max_ms),
            }),
            _ => None,
        };
        Ratios {
            async_throughput: a.map(|a| div(a.throughput_per_s, base.throughput_per_s)),
            sync_throughput: s.map(|s| div(s.throughput_per_s, base.throughput_per_s)),
            sync_latency,
        }
    }
}

/// One figure beside its target: `met` is `None` when the figure is missing.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) value: Option<f64>,
    pub(crate) unit: &'static str,
    /// `≥ 0.5`, `≤ 60`, …
    pub(crate) target: String,
    pub(crate) met: Option<bool>,
}

impl Target {
    fn at_least(name: &'static str, value: Option<f64>, unit: &'static str, bound: f64) -> Target {
        let met = value.map(|v| v >= bound);
        Target { name, value, unit, target: format!("≥ {bound}"), met }
    }

    fn at_most(name: &'static str, value: Option<f64>, unit: &'static str, bound: f64) -> Target {
        let met = value.map(|v| v <= bound);
        Target { name, value, unit, target: format!("≤ {bound}"), met }
    }
}

/// One caller's sync p50 taken apart: the broker's own round trip, the
/// store floor's two durable commits for one command (record, then final
/// status; batches of 1 from one connection), and everything else (HTTP,
/// the gateway, the receiver, the device, the remaining statements). The
/// first two are the least any design keeping "record before publish" and
/// "2xx only after commit" can take.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct OneCallerP50 {
    pub(crate) sync_p50_ms: f64,
    pub(crate) broker_p50_ms: f64,
    /// 1,000 ÷ the floor's commands/s from one connection at batches of 1.
    pub(crate) store_floor_ms: f64,
    /// `sync_p50_ms − broker_p50_ms − store_floor_ms`.
    pub(crate) rest_ms: f64,
}

impl OneCallerP50 {
    /// `None` unless the run had one caller, a sync phase, a baseline and a floor.
    pub(crate) fn of(i: &TargetInputs<'_>) -> Option<OneCallerP50> {
        let sync_p50_ms = i.pipeline_sync.filter(|_| i.one_caller)?.latency?.p50_ms;
        let broker_p50_ms = i.baseline?.latency?.p50_ms;
        let floor = &i.floor?.one;
        if floor.batch != 1 || floor.commands_per_s <= 0.0 {
            return None;
        }
        let store_floor_ms = 1000.0 / floor.commands_per_s;
        let rest_ms = sync_p50_ms - broker_p50_ms - store_floor_ms;
        Some(OneCallerP50 { sync_p50_ms, broker_p50_ms, store_floor_ms, rest_ms })
    }
}

/// What the targets are computed from.
pub(crate) struct TargetInputs<'a> {
    pub(crate) baseline: Option<&'a BaselineResult>,
    pub(crate) pipeline_async: Option<&'a AsyncResult>,
    pub(crate) pipeline_sync: Option<&'a SyncResult>,
    pub(crate) floor: Option<&'a Floor>,
    pub(crate) processes: &'a BTreeMap<&'static str, ProcessFigures>,
    pub(crate) db: Option<&'a BTreeMap<&'static str, PerCommand>>,
    /// `--concurrency 1`: the sync latency and statement targets are for one caller.
    pub(crate) one_caller: bool,
}

/// The targets of issue 15 (docs/BENCHMARKS.md): async throughput ÷ the
/// store floor from two connections; the gateways' CPU per command (every
/// `gateway*` process, µs); sync latency above the broker's; statements and
/// commits per sync command.
pub(crate) fn targets(i: &TargetInputs<'_>) -> Vec<Target> {
    let gateway_us = |phase: &str| -> Option<f64> {
        let per_1k: Vec<f64> = i
            .processes
            .iter()
            .filter(|(name, _)| name.starts_with("gateway"))
            .filter_map(|(_, p)| p.cpu_s_per_1k.get(phase).copied())
            .collect();
        // CPU s per 1,000 commands = ms per command; × 1,000 = µs.
        (!per_1k.is_empty()).then(|| per_1k.iter().sum::<f64>() * 1000.0)
    };
    let floor_two = i.floor.map(|f| f.two.commands_per_s);
    let async_ratio = i.pipeline_async.zip(floor_two).map(|(a, f)| a.throughput_per_s / f);
    // One caller's figures only (None, so not printed, at higher concurrency).
    let one_caller_sync = i.pipeline_sync.filter(|_| i.one_caller);
    let sync_p = |pick: fn(&Latency) -> f64| one_caller_sync.and_then(|s| s.latency).map(|l| pick(&l));
    let base_p50 = i.baseline.and_then(|b| b.latency).map(|l| l.p50_ms);
    let sync_db = |counter: &str| {
        i.db.filter(|_| i.one_caller).and_then(|db| db.get("sync")).and_then(|p| p.0.get(counter).copied())
    };
    vec![
        Target::at_least("async throughput ÷ store floor (2 connections)", async_ratio, "x", 0.5),
        Target::at_most("gateway CPU per async command", gateway_us("async"), "µs", 60.0),
        Target::at_most("gateway CPU per sync command", gateway_us("sync"), "µs", 60.0),
        Target::at_most(
            "sync p50 above the broker's p50 (one caller)",
            sync_p(|l| l.p50_ms).zip(base_p50).map(|(s, b)| s - b),
            "ms",
            1.0,
        ),
        Target::at_most("sync p99 (one caller)", sync_p(|l| l.p99_ms), "ms", 5.0),
        Target::at_most("statements per sync command (one caller)", sync_db("Questions"), "", 5.0),
        Target::at_most("commits per sync command (one caller)", sync_db("Com_commit"), "", 1.0),
    ]
}

/// CPU seconds per 1,000 commands in each phase, and peak RSS, of one process.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ProcessFigures {
    pub(crate) pid: u32,
    pub(crate) cpu_s_per_1k: BTreeMap<&'static str, f64>,
    pub(crate) peak_rss_mib: f64,
    /// Peak RSS once every device was online and the warm-up done.
    pub(crate) peak_rss_after_setup_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct LogWarnings {
    pub(crate) warn: usize,
    pub(crate) error: usize,
    pub(crate) examples: Vec<String>,
}

impl Report {
    pub(crate) fn failures(&self) -> usize {
        self.pipeline_async.as_ref().map_or(0, |a| a.failures.count)
            + self.pipeline_sync.as_ref().map_or(0, |s| s.failures.count)
            + self.scheduled.as_ref().map_or(0, |s| s.failures.count)
    }

    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let s = &self.settings;
        let _ = writeln!(
            t,
            "bench: {} commands, {} devices, concurrency {}, payload {} B, mode {}, {} gateway instance(s)\nbroker: {}; database: {}\n",
            s.commands, s.devices, s.concurrency, s.payload_bytes, s.mode, s.instances, s.broker, s.database
        );
        self.set_up(&mut t);
        self.figures(&mut t);
        self.floor(&mut t);
        self.scheduled(&mut t);
        self.outcomes(&mut t);
        self.resources(&mut t);
        self.extras(&mut t);
        t
    }

    fn set_up(&self, t: &mut String) {
        let s = &self.setup;
        let _ = writeln!(
            t,
            "set-up: {} devices registered in {:.2} s ({:.0}/s, HTTP PUT); firmware-sim start → all online at the gateway {:.2} s\n",
            s.devices, s.register_s, s.register_per_s, s.connect_online_s
        );
    }

    fn scheduled(&self, t: &mut String) {
        let Some(s) = &self.scheduled else { return };
        let secs = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2} s"));
        let _ = writeln!(
            t,
            "scheduled: {} commands over {} devices, one scheduled_at {:.1} s after the first POST",
            s.commands, s.devices, s.lead_s
        );
        let _ = writeln!(
            t,
            "  submitting ({} callers): {:.2} s, {:.0}/s; 202 latency {}; {:.1} s to spare before the instant{}",
            s.concurrency,
            s.submit_s,
            s.submit_per_s,
            s.submit_latency.map_or_else(
                || "-".into(),
                |l| format!("p50 {:.1} / p99 {:.1} / max {:.1} ms", l.p50_ms, l.p99_ms, l.max_ms)
            ),
            s.slack_s,
            if s.slack_s < 0.0 { " — OVERRAN, not one burst" } else { "" }
        );
        let _ = writeln!(t, "  from the instant (polled, bench clock):");
        let _ = writeln!(t, "    none left scheduled/pending (all published)   {}", secs(s.all_published_s));
        let _ = writeln!(t, "    none left sent/delivered either (all final)   {}", secs(s.all_final_s));
        let _ = writeln!(t, "  from the instant (the gateway's timestamps):");
        let _ = writeln!(t, "    last delivered_at                             {}", secs(s.last_delivered_s));
        let _ = writeln!(
            t,
            "    first / last completed_at                     {} / {}  ({:.0} final commands/s)",
            secs(s.first_completed_s),
            secs(s.last_completed_s),
            s.final_per_s
        );
        let _ = writeln!(
            t,
            "  {} command(s) needed more than one attempt (most: {})\n",
            s.resent, s.max_attempts_used
        );
    }

    fn figures(&self, t: &mut String) {
        let Some(b) = &self.baseline else { return };
        let _ = writeln!(
            t,
            "{:<40}{:>12}{:>10}{:>10}{:>10}{:>10}",
            "", "commands/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        row(t, "broker baseline (MQTT round trip)", b.throughput_per_s, b.latency);
        if let Some(u) = &self.baseline_unguarded {
            row(t, "  same, past the guard (rumqttd alone)", u.throughput_per_s, u.latency);
        }
        if let Some(a) = &self.pipeline_async {
            row(t, "pipeline async (first 202→last final)", a.throughput_per_s, None);
            row(t, "  async submit (HTTP 202)", a.accept_per_s, a.accept_latency);
        }
        if let Some(s) = &self.pipeline_sync {
            row(t, "pipeline sync (HTTP round trip)", s.throughput_per_s, s.latency);
        }
        let r = &self.ratios;
        let _ = writeln!(t, "pipeline ÷ baseline");
        if let Some(x) = r.async_throughput {
            let _ = writeln!(t, "{:<40}{:>11.3}x", "  async", x);
        }
        if let Some(x) = r.sync_throughput {
            let _ = write!(t, "{:<40}{:>11.3}x", "  sync", x);
            if let Some(l) = r.sync_latency {
                let _ = write!(t, "{:>9.1}x{:>9.1}x{:>9.1}x{:>9.1}x", l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms);
            }
            let _ = writeln!(t);
        }
        let _ = writeln!(t);
    }

    fn floor(&self, t: &mut String) {
        if let Some(f) = &self.floor {
            let _ = writeln!(
                t,
                "store floor (the least durable work per async command, straight to the same database, batches of {}):",
                f.one.batch
            );
            for run in [&f.one, &f.two] {
                let cpu = run.server_cpu_us_per_command.map_or_else(
                    || "database CPU not measured".into(),
                    |us| format!("{us:.1} µs of database CPU per command"),
                );
                let _ = writeln!(
                    t,
                    "  {} connection(s): {:.0} commands/s ({} in {:.2} s), {cpu}",
                    run.connections, run.commands_per_s, run.commands, run.elapsed_s
                );
            }
        }
        if self.targets.iter().any(|x| x.value.is_some()) {
            let _ = writeln!(t, "targets (issue 15; the one-caller ones with --mode sync --concurrency 1):");
            for x in &self.targets {
                let Some(v) = x.value else { continue };
                let verdict = match x.met {
                    Some(true) => "met",
                    _ => "NOT met",
                };
                let _ =
                    writeln!(t, "  {:<48}{v:>10.3} {:<3} target {:<8} {verdict}", x.name, x.unit, x.target);
            }
        }
        if let Some(p) = &self.one_caller_p50 {
            let _ = writeln!(
                t,
                "one caller's sync p50 {:.2} ms = broker {:.2} + the store floor's two commits {:.2} + the rest {:.2} ms",
                p.sync_p50_ms, p.broker_p50_ms, p.store_floor_ms, p.rest_ms
            );
        }
        let _ = writeln!(t);
    }

    fn outcomes(&self, t: &mut String) {
        let statuses = |m: &BTreeMap<String, usize>| {
            m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        };
        let failures = |t: &mut String, f: &Failures| {
            for e in &f.examples {
                let _ = writeln!(t, "    e.g. {e}");
            }
        };
        if let Some(a) = &self.pipeline_async {
            let _ = writeln!(t, "async statuses: {}", statuses(&a.statuses));
            failures(t, &a.failures);
            let _ = writeln!(
                t,
                "  (submitting took {:.2} s; first 202 → last completed_at {:.2} s; bench saw every final after {:.2} s)",
                a.accept_elapsed_s, a.first_accept_to_last_final_s, a.collect_elapsed_s
            );
        }
        if let Some(s) = &self.scheduled {
            let _ = writeln!(t, "scheduled statuses: {}", statuses(&s.statuses));
            failures(t, &s.failures);
        }
        if let Some(s) = &self.pipeline_sync {
            let _ = writeln!(t, "sync statuses: {} (in {:.2} s)", statuses(&s.statuses), s.elapsed_s);
            failures(t, &s.failures);
        }
        match &self.db_statements_per_command {
            None => {
                let _ = writeln!(t, "database statements per command: n/a (SQLite)");
            }
            Some(phases) => {
                let _ = writeln!(t, "database statements per command (global server counters):");
                for (phase, per) in phases {
                    let _ = writeln!(t, "  {phase:<6} {}", per.render());
                }
            }
        }
        let _ = writeln!(t);
    }

    fn resources(&self, t: &mut String) {
        let phases: Vec<&str> = ["baseline", "async", "sync", "scheduled"]
            .into_iter()
            .filter(|phase| self.processes.values().any(|p| p.cpu_s_per_1k.contains_key(phase)))
            .collect();
        let _ = writeln!(t, "{:<14}{:>8}  CPU s per 1,000 commands; peak RSS MiB", "", "");
        let _ = write!(t, "{:<14}{:>8}  ", "process", "pid");
        for phase in &phases {
            let _ = write!(t, "{phase:>10}");
        }
        let _ = writeln!(t, "  {:>12}{:>12}", "after set-up", "at the end");
        for (name, p) in &self.processes {
            let _ = write!(t, "{name:<14}{:>8}  ", p.pid);
            for phase in &phases {
                match p.cpu_s_per_1k.get(phase) {
                    Some(v) => {
                        let _ = write!(t, "{v:>10.3}");
                    }
                    None => {
                        let _ = write!(t, "{:>10}", "-");
                    }
                }
            }
            let _ = writeln!(t, "  {:>12.1}{:>12.1}", p.peak_rss_after_setup_mib, p.peak_rss_mib);
        }
        let _ = writeln!(
            t,
            "(bench = this process: in the baseline, both MQTT clients{}; in the pipeline phases, the HTTP callers)\n",
            if self.settings.broker.starts_with("embedded") { " and the baseline's embedded broker" } else { "" }
        );
    }

    fn extras(&self, t: &mut String) {
        if let Some(d) = &self.devices {
            let _ = writeln!(t, "devices (firmware-sim totals, warm-up included): {d}");
        }
        for (name, w) in &self.log_warnings {
            let _ = writeln!(t, "{name} log: {} WARN, {} ERROR", w.warn, w.error);
            for e in &w.examples {
                let _ = writeln!(t, "    {e}");
            }
        }
        let _ = writeln!(t, "logs: {}\nwall time: {:.1} s", self.temp_dir, self.wall_s);
    }
}

fn row(t: &mut String, label: &str, per_s: f64, l: Option<Latency>) {
    let _ = write!(t, "{label:<40}{per_s:>12.1}");
    match l {
        Some(l) => {
            let _ = writeln!(t, "{:>10.2}{:>10.2}{:>10.2}{:>10.2}", l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms);
        }
        None => {
            let _ = writeln!(t, "{:>10}{:>10}{:>10}{:>10}", "-", "-", "-", "-");
        }
    }
}

/// WARN and ERROR lines of a child's log, with the first few distinct messages.
pub(crate) fn scan_log(text: &str) -> LogWarnings {
    let mut w = LogWarnings::default();
    for line in text.lines() {
        let level = line.split_whitespace().nth(1);
        match level {
            Some("WARN") => w.warn += 1,
            Some("ERROR") => w.error += 1,
            _ => continue,
        }
        let message: String = line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
        let message: String = message.chars().take(200).collect();
        if w.examples.len() < 3 && !w.examples.contains(&message) {
            w.examples.push(message);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::floor::FloorRun;

    #[test]
    fn log_levels_are_counted() {
        let log = "2026-01-01T00:00:00.1Z  INFO gateway: up\n\
                   2026-01-01T00:00:00.2Z  WARN gateway::mqtt: slow\n\
                   2026-01-01T00:00:00.3Z ERROR gateway::store: gone\n\
                   2026-01-01T00:00:00.4Z  WARN gateway::mqtt: slow\n";
        let w = scan_log(log);
        assert_eq!((w.warn, w.error), (2, 1));
        assert_eq!(w.examples, vec!["WARN gateway::mqtt: slow", "ERROR gateway::store: gone"]);
    }

    fn latency(p50_ms: f64) -> Option<Latency> {
        Some(Latency { p50_ms, p90_ms: p50_ms, p99_ms: p50_ms, max_ms: p50_ms })
    }

    fn floor_run(connections: usize, batch: usize, commands_per_s: f64) -> FloorRun {
        FloorRun {
            connections,
            commands: 100,
            batch,
            elapsed_s: 1.0,
            commands_per_s,
            server_cpu_us_per_command: None,
        }
    }

    /// The p50 is taken apart into the broker's, the floor's two commits
    /// (1,000 ÷ its rate at batches of 1) and the rest; only for one caller
    /// with a floor measured at batches of 1.
    #[test]
    fn one_callers_p50_is_the_broker_the_floor_and_the_rest() {
        let baseline =
            BaselineResult { requests: 10, elapsed_s: 1.0, throughput_per_s: 10.0, latency: latency(0.3) };
        let sync = SyncResult {
            commands: 10,
            elapsed_s: 1.0,
            throughput_per_s: 10.0,
            latency: latency(2.1),
            statuses: BTreeMap::new(),
            failures: Failures::default(),
        };
        let floor = Floor { one: floor_run(1, 1, 800.0), two: floor_run(2, 1, 1200.0) };
        let processes = BTreeMap::new();
        let mut inputs = TargetInputs {
            baseline: Some(&baseline),
            pipeline_async: None,
            pipeline_sync: Some(&sync),
            floor: Some(&floor),
            processes: &processes,
            db: None,
            one_caller: true,
        };
        let p = OneCallerP50::of(&inputs).expect("one caller with a floor");
        assert!((p.store_floor_ms - 1.25).abs() < 1e-9, "{p:?}");
        assert!((p.rest_ms - (2.1 - 0.3 - 1.25)).abs() < 1e-9, "{p:?}");
        inputs.one_caller = false;
        assert!(OneCallerP50::of(&inputs).is_none());
        inputs.one_caller = true;
        let batched = Floor { one: floor_run(1, 64, 8000.0), two: floor_run(2, 64, 12000.0) };
        inputs.floor = Some(&batched);
        assert!(OneCallerP50::of(&inputs).is_none(), "a batched floor is not one command's commits");
    }
}
