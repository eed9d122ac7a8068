//! `--scheduled N`: N async commands all due at the same instant. They are
//! submitted with one `scheduled_at` far enough ahead that submitting ends
//! first; from that instant the bench watches the gateways' counters of
//! attempts published and commands made final, and confirms with the command
//! list that none is left `scheduled` or `pending` (all published) and none
//! `sent` or `delivered` (all final), then reads every command back for the gateway's
//! own timestamps (last `delivered_at`, last `completed_at`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::load::{run_pool, Latency, Progress, Recorder};
use crate::pipeline::{
    command_body, error_kind, now_ms, parse_ms, request_error, Failures, Outcomes, System,
};
use crate::Shape;

/// The command name that marks this phase's commands (the warm-up's are "bench").
const NAME: &str = "bench-scheduled";
/// How often the gateways' progress counters are read.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often, at most, the gateway is asked (a scan of the commands table)
/// whether any command is left in a status, unless the counters say none is.
const CONFIRM_EVERY: Duration = Duration::from_secs(2);
/// Deadline beyond the scheduled instant: long enough that no command expires
/// inside any run the bench's own --timeout-secs allows.
const TTL_AFTER_DUE_MS: u64 = 3_600_000;
/// Commands listed per request when reading them all back.
const PAGE: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScheduledResult {
    pub(crate) commands: usize,
    pub(crate) devices: usize,
    pub(crate) concurrency: usize,
    /// `scheduled_at` − the first POST.
    pub(crate) lead_s: f64,
    pub(crate) submit_s: f64,
    pub(crate) submit_per_s: f64,
    pub(crate) submit_latency: Option<Latency>,
    /// `scheduled_at` − the last 202; negative means submitting overran the
    /// instant and the figures below are not those of a burst.
    pub(crate) slack_s: f64,
    /// `scheduled_at` → the first poll that found none `scheduled` or `pending`
    /// (bench clock; resolution ~0.1 s plus the queries while the counters
    /// keep up, else up to `CONFIRM_EVERY`).
    pub(crate) all_published_s: Option<f64>,
    /// `scheduled_at` → the first poll that found none `scheduled`, `pending`,
    /// `sent` or `delivered`.
    pub(crate) all_final_s: Option<f64>,
    /// `scheduled_at` → the last `delivered_at` the gateway recorded (a
    /// command is delivered moments after it is published).
    pub(crate) last_delivered_s: Option<f64>,
    /// `scheduled_at` → the first and the last `completed_at`.
    pub(crate) first_completed_s: Option<f64>,
    pub(crate) last_completed_s: Option<f64>,
    /// Commands ÷ `last_completed_s`.
    pub(crate) final_per_s: f64,
    /// Commands that needed more than one attempt, and the most attempts one needed.
    pub(crate) resent: usize,
    pub(crate) max_attempts_used: i64,
    pub(crate) statuses: BTreeMap<String, usize>,
    pub(crate) failures: Failures,
}

/// Submits `n` commands due `lead` after the first POST, then measures.
pub(crate) async fn run(
    system: &System,
    shape: &Shape,
    n: usize,
    lead: Duration,
) -> anyhow::Result<ScheduledResult> {
    let started_ms = now_ms();
    let due_ms = (started_ms + lead.as_secs_f64() * 1000.0).round();
    let recorder = Recorder::new("scheduled: accepted", n);
    let progress = Progress::show(recorder.clone());
    let started = Instant::now();
    let rejected = submit(system, shape, n, due_ms, recorder.clone()).await?;
    let submit_s = started.elapsed().as_secs_f64();
    let last_accept_ms = now_ms();
    drop(progress);
    let slack_s = (due_ms - last_accept_ms) / 1000.0;
    if slack_s < 0.0 {
        tracing::warn!(
            "submitting overran scheduled_at by {:.1} s: raise --schedule-lead-secs; the figures are not those of one burst",
            -slack_s
        );
    } else {
        eprintln!("scheduled: {n} submitted in {submit_s:.1} s; due in {slack_s:.1} s");
        tokio::time::sleep(Duration::from_secs_f64(slack_s)).await;
    }
    let at_due = counters(system).await?;

    let since_due = || (now_ms() - due_ms) / 1000.0;
    let accepted = n - rejected.len();
    let mut all_published_s = None;
    let mut last_note = Instant::now();
    let mut last_listed = Instant::now();
    let all_final_s = loop {
        // The counters say when the work is probably done (one cheap read per
        // instance); the list query, a scan of the commands table, confirms
        // it then and otherwise runs only every `CONFIRM_EVERY`, so polling
        // costs the database little beside the work measured.
        let now = counters(system).await?.since(&at_due);
        let list = last_listed.elapsed() >= CONFIRM_EVERY;
        if all_published_s.is_none()
            && (now.published >= accepted || list)
            && none_in(system, &["scheduled", "pending"]).await?
        {
            all_published_s = Some(since_due());
            eprintln!("scheduled: all published {:.2} s after the instant", since_due());
        }
        if all_published_s.is_some()
            && (now.finals >= accepted || list)
            && none_in(system, &["scheduled", "pending", "sent", "delivered"]).await?
        {
            break since_due();
        }
        if list {
            last_listed = Instant::now();
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            last_note = Instant::now();
            eprintln!(
                "scheduled: {:.0} s after the instant, {} published, {} final",
                since_due(),
                now.published,
                now.finals
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    };

    let mut outcomes = Outcomes::of(rejected.into_iter().map(Err));
    let read = read_back(system).await?;
    outcomes.absorb(Outcomes::of(read.statuses.iter().map(|s| Ok(s.clone()))));
    let rel = |ms: Option<f64>| ms.map(|ms| (ms - due_ms) / 1000.0);
    let last_completed_s = rel(read.last_completed_ms);
    Ok(ScheduledResult {
        commands: n,
        devices: shape.devices,
        concurrency: shape.concurrency,
        lead_s: (due_ms - started_ms) / 1000.0,
        submit_s,
        submit_per_s: n as f64 / submit_s,
        submit_latency: Latency::of(recorder.latencies()),
        slack_s,
        all_published_s,
        all_final_s: Some(all_final_s),
        last_delivered_s: rel(read.last_delivered_ms),
        first_completed_s: rel(read.first_completed_ms),
        last_completed_s,
        final_per_s: last_completed_s.filter(|s| *s > 0.0).map_or(0.0, |s| read.count as f64 / s),
        resent: read.resent,
        max_attempts_used: read.max_attempts,
        statuses: outcomes.statuses,
        failures: outcomes.failures,
    })
}

/// POSTs the commands; returns the reasons of those not accepted.
async fn submit(
    system: &System,
    shape: &Shape,
    n: usize,
    due_ms: f64,
    recorder: Arc<Recorder>,
) -> anyhow::Result<Vec<String>> {
    let mut body = command_body(shape, "async");
    body["name"] = NAME.into();
    body["scheduled_at"] = rfc3339(due_ms)?.into();
    body["ttl_ms"] = ((due_ms - now_ms()).max(0.0) as u64 + TTL_AFTER_DUE_MS).into();
    let (http, base, devices) = (system.http.clone(), system.base.clone(), shape.devices);
    let results = run_pool(n, shape.concurrency, move |i| {
        let (http, recorder, body) = (http.clone(), recorder.clone(), body.clone());
        let url = format!("{base}/v1/devices/{}/commands", Shape::device_name(i % devices));
        async move {
            let t = Instant::now();
            let r = http.post(url).json(&body).send().await.map_err(request_error)?;
            let code = r.status();
            let v: Value = r.json().await.map_err(request_error)?;
            let ok = code.as_u16() == 202 && v["status"] == "scheduled";
            recorder.record(ok.then(|| t.elapsed()));
            if ok {
                Ok(())
            } else if code.as_u16() == 202 {
                Err(format!("accepted as {} instead of scheduled", v["status"]))
            } else {
                Err(format!("HTTP {code}: {}", error_kind(&v)))
            }
        }
    })
    .await;
    Ok(results.into_iter().filter_map(Result::err).collect())
}

/// Whether the gateway lists no command in any of `statuses`.
async fn none_in(system: &System, statuses: &[&str]) -> anyhow::Result<bool> {
    for status in statuses {
        let url = format!("{}/v1/commands?status={status}&limit=1", system.base);
        let page: Value = system.http.get(url).send().await?.error_for_status()?.json().await?;
        if page["items"].as_array().is_some_and(|items| !items.is_empty()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Progress counters of every gateway instance, summed.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    /// `gateway_attempts_published_total` (re-sends count too).
    published: usize,
    /// `gateway_commands_final_total`.
    finals: usize,
}

impl Counters {
    fn since(self, start: &Counters) -> Counters {
        Counters {
            published: self.published.saturating_sub(start.published),
            finals: self.finals.saturating_sub(start.finals),
        }
    }
}

async fn counters(system: &System) -> anyhow::Result<Counters> {
    let mut sum = Counters::default();
    for base in system.bases.iter() {
        let text =
            system.http.get(format!("{base}/metrics")).send().await?.error_for_status()?.text().await?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as usize
        };
        sum.published += value("gateway_attempts_published_total");
        sum.finals += value("gateway_commands_final_total");
    }
    Ok(sum)
}

/// What every command of this phase looks like at the end.
#[derive(Debug, Default)]
struct ReadBack {
    count: usize,
    statuses: Vec<String>,
    last_delivered_ms: Option<f64>,
    first_completed_ms: Option<f64>,
    last_completed_ms: Option<f64>,
    resent: usize,
    max_attempts: i64,
}

/// Pages through GET /v1/commands (newest first) and folds this phase's commands.
async fn read_back(system: &System) -> anyhow::Result<ReadBack> {
    let mut read = ReadBack::default();
    let mut cursor = String::new();
    loop {
        let url = format!("{}/v1/commands?limit={PAGE}&cursor={cursor}", system.base);
        let page: Value = system.http.get(url).send().await?.error_for_status()?.json().await?;
        let items = page["items"].as_array().map(Vec::as_slice).unwrap_or_default();
        for c in items.iter().filter(|c| c["name"] == NAME) {
            read.count += 1;
            read.statuses.push(c["status"].as_str().unwrap_or("?").to_owned());
            let at = |k: &str| c[k].as_str().and_then(parse_ms);
            let max = |a: Option<f64>, b: Option<f64>| a.into_iter().chain(b).reduce(f64::max);
            read.last_delivered_ms = max(read.last_delivered_ms, at("delivered_at"));
            read.last_completed_ms = max(read.last_completed_ms, at("completed_at"));
            read.first_completed_ms =
                read.first_completed_ms.into_iter().chain(at("completed_at")).reduce(f64::min);
            let attempts = c["attempts"].as_i64().unwrap_or(0);
            read.resent += usize::from(attempts > 1);
            read.max_attempts = read.max_attempts.max(attempts);
        }
        match page["next_cursor"].as_str() {
            Some(next) if !items.is_empty() => cursor = next.to_owned(),
            _ => return Ok(read),
        }
    }
}

fn rfc3339(unix_ms: f64) -> anyhow::Result<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(unix_ms as i128 * 1_000_000)?;
    Ok(t.format(&time::format_description::well_known::Rfc3339)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_format_as_rfc3339_and_back() {
        let text = rfc3339(1_250.0).unwrap();
        assert_eq!(text, "1970-01-01T00:00:01.25Z");
        assert_eq!(parse_ms(&text), Some(1250.0));
    }
}
