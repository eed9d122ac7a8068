//! The demo (`cargo run --release -p demo`): a whole system in one process on embedded defaults — the
//! gateway with its embedded broker and a fresh SQLite file, a receiver, and a
//! simulated fleet — then a mix of sync and async commands through the real
//! HTTP API, and a report of what happened to each.
//!
//! Every address is a free loopback port chosen at start, so the demo runs
//! beside anything else (e.g. a Mosquitto holding port 1883).

use std::time::Instant;

use protocol::DeviceId;

use serde_json::{json, Value};

use crate::{LocalOptions, LocalSystem};

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 5)]
    pub devices: usize,
    /// Ordinary commands to send (plus a few that show the edge cases).
    #[arg(long, default_value_t = 30)]
    pub commands: usize,
    /// Fraction of commands the simulated devices fail at random.
    #[arg(long, default_value_t = 0.2)]
    pub fail_ratio: f64,
    /// Keep everything running after the demo (Ctrl-C to stop), to try the API by hand.
    #[arg(long)]
    pub keep_running: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let system = LocalSystem::start(LocalOptions {
        database_url: None,
        broker: None,
        devices: args.devices,
        fail_ratio: args.fail_ratio,
        latency_ms: (1, 30),
    })
    .await?;
    let (gw, rx) = (&system.gateway, &system.receiver);
    println!("gateway   {}  (embedded MQTT broker at {})", system.base, gw.broker);
    println!("database  {}", system.database_url);
    println!("receiver  devices connect to {}", rx.tcp_addr);
    println!("fleet     {} devices connected and online", args.devices);
    println!(
        "security  demo mode: anonymous HTTP API and MQTT broker on loopback (what --insecure allows);\n          gateway↔receiver messages signed (docs/SECURITY.md has the production set-up)\n"
    );
    let outcome = send_mix(&system.http, &system.base, system.fleet.device_ids(), args.commands).await;
    let t = system.fleet.stats().totals;
    println!(
        "\ndevices: received {}, executed {}, duplicates answered from memory {}, executed twice {}",
        t.received, t.executed, t.duplicates, t.executed_ids_repeated
    );
    if args.keep_running {
        println!(
            "\nstill running; open {}/console, or try: curl {}/v1/commands?limit=5   (Ctrl-C to stop)",
            system.base, system.base
        );
        tokio::signal::ctrl_c().await?;
    }
    system.stop().await;
    outcome
}

/// Sends the demo's commands and prints a line for each; errs if any ends badly.
async fn send_mix(http: &reqwest::Client, base: &str, ids: &[DeviceId], n: usize) -> anyhow::Result<()> {
    let mut sync_ms = Vec::new();
    let mut async_ids = Vec::new();
    println!("{:<7} {:<10} {:<10} {:>6} {:>11}  detail", "mode", "device", "command", "http", "status");
    for i in 0..n {
        let device = &ids[i % ids.len()];
        let mode = if i % 3 == 2 { "async" } else { "sync" };
        let body = json!({"name": "set_temp", "payload": {"celsius": 18 + (i % 8)}, "mode": mode});
        let started = Instant::now();
        let r = http.post(format!("{base}/v1/devices/{device}/commands")).json(&body).send().await?;
        let code = r.status().as_u16();
        let v: Value = r.json().await?;
        if mode == "sync" {
            sync_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            async_ids.push(v["id"].as_str().unwrap_or_default().to_owned());
        }
        print_line(mode, device.as_str(), "set_temp", code, &v);
    }
    // Edge cases a caller meets.
    let slow = json!({"name": "calibrate", "payload": {"delay_ms": 400}, "wait_ms": 100});
    let r = http.post(format!("{base}/v1/devices/{}/commands", ids[0])).json(&slow).send().await?;
    let code = r.status().as_u16();
    let v: Value = r.json().await?;
    print_line("sync", ids[0].as_str(), "calibrate", code, &v);
    let id = v["id"].as_str().unwrap_or_default();
    let polled: Value =
        http.get(format!("{base}/v1/commands/{id}?wait_ms=5000")).send().await?.json().await?;
    print_line("poll", ids[0].as_str(), "calibrate", 200, &polled);
    let fail = json!({"name": "fail", "payload": {"code": 42}});
    let r = http.post(format!("{base}/v1/devices/{}/commands", ids[0])).json(&fail).send().await?;
    let code = r.status().as_u16();
    print_line("sync", ids[0].as_str(), "fail", code, &r.json().await?);
    let r = http
        .post(format!("{base}/v1/devices/no-such-device/commands"))
        .json(&json!({"name": "x"}))
        .send()
        .await?;
    let code = r.status().as_u16();
    print_line("sync", "no-such-device", "x", code, &r.json().await?);

    let mut finals = std::collections::BTreeMap::<String, usize>::new();
    for id in &async_ids {
        let v: Value =
            http.get(format!("{base}/v1/commands/{id}?wait_ms=10000")).send().await?.json().await?;
        *finals.entry(v["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    sync_ms.sort_by(f64::total_cmp);
    let median = sync_ms.get(sync_ms.len() / 2).copied().unwrap_or_default();
    let max = sync_ms.last().copied().unwrap_or_default();
    println!(
        "\nsync calls: {} (median {median:.1} ms, max {max:.1} ms, devices answer after 1-30 ms)",
        sync_ms.len()
    );
    println!("async commands polled to final: {finals:?}");
    let pending = finals.iter().filter(|(s, _)| !matches!(s.as_str(), "succeeded" | "failed")).count();
    anyhow::ensure!(pending == 0, "some async commands did not finish: {finals:?}");
    Ok(())
}

fn print_line(mode: &str, device: &str, name: &str, http: u16, v: &Value) {
    let status = v["status"].as_str().or(v["error"]["kind"].as_str()).unwrap_or("-");
    let detail = if let Some(r) = v.get("result").filter(|r| !r.is_null()) {
        format!("code {} {}", r["code"], r.get("payload").map(Value::to_string).unwrap_or_default())
    } else if let Some(m) = v["error"]["message"].as_str() {
        m.to_owned()
    } else {
        format!("id {}", v["id"].as_str().unwrap_or("-"))
    };
    println!("{mode:<7} {device:<10} {name:<10} {http:>6} {status:>11}  {detail}");
}
