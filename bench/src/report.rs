//! The figures of one run: one serializable [`Report`] (for `--json`) and its
//! rendering as a plain-text table.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::baseline::BaselineResult;
use crate::dbstats::PerCommand;
use crate::load::Latency;
use crate::pipeline::{AsyncResult, Failures, SyncResult};

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) settings: Settings,
    pub(crate) baseline: BaselineResult,
    pub(crate) pipeline_async: Option<AsyncResult>,
    pub(crate) pipeline_sync: Option<SyncResult>,
    pub(crate) ratios: Ratios,
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
    pub(crate) fn of(base: &BaselineResult, a: Option<&AsyncResult>, s: Option<&SyncResult>) -> Ratios {
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

/// CPU seconds per 1,000 commands in each phase, and peak RSS, of one process.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ProcessFigures {
    pub(crate) pid: u32,
    pub(crate) cpu_s_per_1k: BTreeMap<&'static str, f64>,
    pub(crate) peak_rss_mib: f64,
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
    }

    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let s = &self.settings;
        let _ = writeln!(
            t,
            "bench: {} commands, {} devices, concurrency {}, payload {} B, mode {}\nbroker: {}; database: {}\n",
            s.commands, s.devices, s.concurrency, s.payload_bytes, s.mode, s.broker, s.database
        );
        self.figures(&mut t);
        self.outcomes(&mut t);
        self.resources(&mut t);
        self.extras(&mut t);
        t
    }

    fn figures(&self, t: &mut String) {
        let _ = writeln!(
            t,
            "{:<40}{:>12}{:>10}{:>10}{:>10}{:>10}",
            "", "commands/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        let b = &self.baseline;
        row(t, "broker baseline (MQTT round trip)", b.throughput_per_s, b.latency);
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
        let phases = ["baseline", "async", "sync"];
        let _ = writeln!(t, "{:<14}{:>8}  {:^30}  {:>12}", "", "", "CPU s per 1,000 commands", "");
        let _ = writeln!(
            t,
            "{:<14}{:>8}  {:>10}{:>10}{:>10}  {:>12}",
            "process", "pid", phases[0], phases[1], phases[2], "peak RSS MiB"
        );
        for (name, p) in &self.processes {
            let _ = write!(t, "{name:<14}{:>8}  ", p.pid);
            for phase in phases {
                match p.cpu_s_per_1k.get(phase) {
                    Some(v) => {
                        let _ = write!(t, "{v:>10.3}");
                    }
                    None => {
                        let _ = write!(t, "{:>10}", "-");
                    }
                }
            }
            let _ = writeln!(t, "  {:>12.1}", p.peak_rss_mib);
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
}
