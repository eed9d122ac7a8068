//! `gateway demo`: a whole system in one process on embedded defaults — the
//! gateway with its embedded broker and a fresh SQLite file, a receiver, and a
//! simulated fleet — then a mix of sync and async commands through the real
//! HTTP API, and a report of what happened to each.
//!
//! Every address is a free loopback port chosen at start, so the demo runs
//! beside anything else (e.g. a Mosquitto holding port 1883).

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Options of `gateway demo`.
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

/// A free loopback port: bind port 0, read it, let it go.
pub fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let dir = tempfile_dir()?;
    let db = dir.join("demo.db");
    let config = Config::for_local(
        format!("sqlite:{}", db.display()),
        free_port()?,
        free_port()?,
    );
    let gateway = crate::start(config, shutdown.clone()).await?;
    let broker = format!("mqtt://{}:{}", gateway.broker.0, gateway.broker.1);
    let receiver = receiver::start(
        receiver::Config::new(broker.clone(), free_port()?),
        shutdown.clone(),
    )
    .await?;
    let fleet = firmware_sim::Fleet::start(
        firmware_sim::FleetConfig {
            connect: receiver.tcp_addr,
            devices: args.devices,
            fail_ratio: args.fail_ratio,
            latency_ms: (1, 30),
            ..Default::default()
        },
        shutdown.clone(),
    );
    let base = format!("http://{}", gateway.http_addr);
    println!(
        "gateway   http://{}  (embedded MQTT broker at {broker})",
        gateway.http_addr
    );
    println!("database  {}", db.display());
    println!("receiver  devices connect to {}", receiver.tcp_addr);
    let http = reqwest::Client::new();
    for id in fleet.device_ids() {
        let r = http
            .put(format!("{base}/v1/devices/{id}"))
            .json(&json!({"labels": {"demo": "yes"}}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "registering {id}: {}", r.status());
    }
    if !fleet
        .wait_connected(args.devices, Duration::from_secs(10))
        .await
    {
        anyhow::bail!("the simulated devices did not all connect within 10 s");
    }
    wait_online(&http, &base, fleet.device_ids()).await?;
    println!("fleet     {} devices connected and online\n", args.devices);

    let outcome = send_mix(&http, &base, fleet.device_ids(), args.commands).await;
    let stats = fleet.stats();
    println!(
        "\ndevices: received {}, executed {}, duplicates answered from memory {}, executed twice {}",
        stats.totals.received, stats.totals.executed, stats.totals.duplicates, stats.totals.executed_ids_repeated
    );
    if args.keep_running {
        println!("\nstill running; try: curl {base}/v1/commands?limit=5   (Ctrl-C to stop)");
        tokio::signal::ctrl_c().await?;
    }
    shutdown.cancel();
    fleet.stopped().await;
    receiver.stopped().await;
    gateway.stopped().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

async fn wait_online(http: &reqwest::Client, base: &str, ids: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in ids {
        loop {
            let d: Value = http
                .get(format!("{base}/v1/devices/{id}"))
                .send()
                .await?
                .json()
                .await?;
            if d["online"] == true {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "device {id} never showed online");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Sends the demo's commands and prints a line for each; errs if any ends badly.
async fn send_mix(
    http: &reqwest::Client,
    base: &str,
    ids: &[String],
    n: usize,
) -> anyhow::Result<()> {
    let mut sync_ms = Vec::new();
    let mut async_ids = Vec::new();
    println!(
        "{:<7} {:<10} {:<10} {:>6} {:>11}  detail",
        "mode", "device", "command", "http", "status"
    );
    for i in 0..n {
        let device = &ids[i % ids.len()];
        let mode = if i % 3 == 2 { "async" } else { "sync" };
        let body = json!({"name": "set_temp", "payload": {"celsius": 18 + (i % 8)}, "mode": mode});
        let started = Instant::now();
        let r = http
            .post(format!("{base}/v1/devices/{device}/commands"))
            .json(&body)
            .send()
            .await?;
        let code = r.status().as_u16();
        let v: Value = r.json().await?;
        if mode == "sync" {
            sync_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            async_ids.push(v["id"].as_str().unwrap_or_default().to_owned());
        }
        print_line(mode, device, "set_temp", code, &v);
    }
    // Edge cases a caller meets.
    let slow = json!({"name": "calibrate", "payload": {"delay_ms": 400}, "wait_ms": 100});
    let r = http
        .post(format!("{base}/v1/devices/{}/commands", ids[0]))
        .json(&slow)
        .send()
        .await?;
    let code = r.status().as_u16();
    let v: Value = r.json().await?;
    print_line("sync", &ids[0], "calibrate", code, &v);
    let id = v["id"].as_str().unwrap_or_default();
    let polled: Value = http
        .get(format!("{base}/v1/commands/{id}?wait_ms=5000"))
        .send()
        .await?
        .json()
        .await?;
    print_line("poll", &ids[0], "calibrate", 200, &polled);
    let fail = json!({"name": "fail", "payload": {"code": 42}});
    let r = http
        .post(format!("{base}/v1/devices/{}/commands", ids[0]))
        .json(&fail)
        .send()
        .await?;
    let code = r.status().as_u16();
    print_line("sync", &ids[0], "fail", code, &r.json().await?);
    let r = http
        .post(format!("{base}/v1/devices/no-such-device/commands"))
        .json(&json!({"name": "x"}))
        .send()
        .await?;
    let code = r.status().as_u16();
    print_line("sync", "no-such-device", "x", code, &r.json().await?);

    let mut finals = std::collections::BTreeMap::<String, usize>::new();
    for id in &async_ids {
        let v: Value = http
            .get(format!("{base}/v1/commands/{id}?wait_ms=10000"))
            .send()
            .await?
            .json()
            .await?;
        *finals
            .entry(v["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    sync_ms.sort_by(f64::total_cmp);
    let median = sync_ms.get(sync_ms.len() / 2).copied().unwrap_or_default();
    let max = sync_ms.last().copied().unwrap_or_default();
    println!(
        "\nsync calls: {} (median {median:.1} ms, max {max:.1} ms, devices answer after 1-30 ms)",
        sync_ms.len()
    );
    println!("async commands polled to final: {finals:?}");
    let pending = finals
        .iter()
        .filter(|(s, _)| !matches!(s.as_str(), "succeeded" | "failed"))
        .count();
    anyhow::ensure!(
        pending == 0,
        "some async commands did not finish: {finals:?}"
    );
    Ok(())
}

fn print_line(mode: &str, device: &str, name: &str, http: u16, v: &Value) {
    let status = v["status"]
        .as_str()
        .or(v["error"]["kind"].as_str())
        .unwrap_or("-");
    let detail = if let Some(r) = v.get("result").filter(|r| !r.is_null()) {
        format!(
            "code {} {}",
            r["code"],
            r.get("payload").map(Value::to_string).unwrap_or_default()
        )
    } else if let Some(m) = v["error"]["message"].as_str() {
        m.to_owned()
    } else {
        format!("id {}", v["id"].as_str().unwrap_or("-"))
    };
    println!("{mode:<7} {device:<10} {name:<10} {http:>6} {status:>11}  {detail}");
}
