//! `gateway bench`: commands through a whole local system (see [`crate::local`])
//! with devices that answer at once, so the pipeline itself is measured:
//! latency percentiles of sync calls and throughput. A benchmark, not a test:
//! it prints figures and asserts nothing but that every command succeeded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::local::{LocalOptions, LocalSystem};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Commands to send (after a warm-up of 20).
    #[arg(long, default_value_t = 500)]
    pub commands: usize,
    /// Callers sending at once, each waiting for its command's final result.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Simulated devices (commands go round-robin).
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Payload size in bytes (a JSON string of that length).
    #[arg(long, default_value_t = 16)]
    pub payload_bytes: usize,
    /// Database URL (default: a fresh SQLite file).
    #[arg(long)]
    pub database_url: Option<String>,
    /// External broker (default: the embedded one on a free port).
    #[arg(long)]
    pub broker: Option<String>,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let system = LocalSystem::start(LocalOptions {
        database_url: args.database_url.clone(),
        broker: args.broker.clone(),
        devices: args.devices,
        fail_ratio: 0.0,
        latency_ms: (0, 0),
    })
    .await?;
    let payload = Value::String("x".repeat(args.payload_bytes));
    run_calls(&system, 20, 1, &payload).await?;
    let started = Instant::now();
    let mut latencies = run_calls(&system, args.commands, args.concurrency.max(1), &payload).await?;
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = json!({
        "database": if args.database_url.is_some() { "external" } else { "sqlite" },
        "broker": args.broker.clone().unwrap_or_else(|| "embedded".into()),
        "commands": args.commands,
        "concurrency": args.concurrency,
        "devices": args.devices,
        "payload_bytes": args.payload_bytes,
        "throughput_per_s": args.commands as f64 / elapsed.as_secs_f64(),
        "sync_latency_ms": {"p50": ms(pct(0.50)), "p90": ms(pct(0.90)), "p99": ms(pct(0.99)), "max": ms(pct(1.0))},
    });
    if args.json {
        println!("{report}");
    } else {
        let l = &report["sync_latency_ms"];
        println!(
            "{} sync commands, concurrency {}, {} device(s): {:.0} commands/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            args.commands, args.concurrency, args.devices, report["throughput_per_s"].as_f64().unwrap_or_default(),
            l["p50"].as_f64().unwrap_or_default(), l["p90"].as_f64().unwrap_or_default(),
            l["p99"].as_f64().unwrap_or_default(), l["max"].as_f64().unwrap_or_default(),
        );
    }
    system.stop().await;
    Ok(())
}

/// Sends `n` sync commands from `concurrency` callers; returns each call's latency.
async fn run_calls(
    system: &LocalSystem,
    n: usize,
    concurrency: usize,
    payload: &Value,
) -> anyhow::Result<Vec<Duration>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..concurrency {
        let (next, http, base, payload) =
            (next.clone(), system.http.clone(), system.base.clone(), payload.clone());
        let devices = system.fleet.device_ids().to_vec();
        callers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(latencies);
                }
                let url = format!("{base}/v1/devices/{}/commands", devices[i % devices.len()]);
                let body = json!({"name": "bench", "payload": payload});
                let t = Instant::now();
                let r: Value = http.post(url).json(&body).send().await?.json().await?;
                latencies.push(t.elapsed());
                anyhow::ensure!(r["status"] == "succeeded", "command {i} ended {r}");
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for c in callers {
        all.extend(c.await??);
    }
    Ok(all)
}
