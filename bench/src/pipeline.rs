//! The pipeline under test: gateway, receiver and firmware-sim as separate
//! processes, then the async and sync phases driven over the gateway's HTTP API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use demo::free_port;
use serde::Serialize;
use serde_json::{json, Value};

use crate::load::{run_pool, Latency, Progress, Recorder};
use crate::procs::{Binaries, Children};
use crate::Shape;

/// How long a sync call (and a completion long-poll) may wait for a final status.
const WAIT_MS: u64 = 60_000;
/// How often the async phase asks the gateway whether every command is final.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// Long-polls collecting async results at once: enough to keep up, few enough
/// not to compete with the pipeline for the gateway's database connections.
const COLLECTORS: usize = 8;
/// Sync commands sent before measuring (HTTP and MQTT connections warm).
const WARM_UP: usize = 20;
/// Examples of failures kept per phase.
const FAILURE_EXAMPLES: usize = 5;
/// Device registrations (PUT) in flight at once.
const REGISTER_CONCURRENCY: usize = 64;
/// Devices per page when listing them to see which are online.
const DEVICE_PAGE: usize = 1000;

/// What to start.
#[derive(Debug)]
pub(crate) struct SystemOptions<'a> {
    pub(crate) bins: &'a Binaries,
    pub(crate) database_url: &'a str,
    /// `None`: the gateway's embedded broker on a free port.
    pub(crate) broker: Option<&'a str>,
    pub(crate) prefix: &'a str,
    pub(crate) devices: usize,
    pub(crate) dir: &'a Path,
    /// Gateway instances on the same database and broker (1 to `MAX_INSTANCES`).
    pub(crate) instances: usize,
    /// Gateway↔receiver messages signed with this message secret (PROTOCOL
    /// 4.7), as in production; `None`: unsigned (`--insecure`).
    pub(crate) message_secret: Option<&'a str>,
    /// `--max-device-queue` of every gateway: at least the most commands one
    /// device will have unfinished at once (`--scheduled` parks them all).
    pub(crate) max_device_queue: usize,
}

/// Most gateway instances a run starts.
pub(crate) const MAX_INSTANCES: usize = 4;
/// The gateways' process names (logs, CPU figures).
const GATEWAY_NAMES: [&str; MAX_INSTANCES] = ["gateway", "gateway-2", "gateway-3", "gateway-4"];

/// The running pipeline's HTTP side (its processes are in the [`Children`]
/// passed to [`System::start`], kept apart so they can be watched while a
/// phase borrows this).
#[derive(Debug)]
pub(crate) struct System {
    /// The first gateway's HTTP base URL (set-up, device listing, metrics).
    pub(crate) base: String,
    /// Every gateway's; calls of the phases go round-robin over them.
    pub(crate) bases: Arc<Vec<String>>,
    pub(crate) http: reqwest::Client,
    pub(crate) sim_stats: PathBuf,
    /// How long setting up the fleet took.
    pub(crate) setup: SetupTimes,
}

/// Set-up times: registering every device over HTTP, and from starting the
/// firmware-sim until the gateway shows every device online.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct SetupTimes {
    pub(crate) devices: usize,
    pub(crate) register_s: f64,
    pub(crate) register_per_s: f64,
    pub(crate) connect_online_s: f64,
}

impl System {
    /// Starts the three programs, registers the devices and waits until all are online.
    pub(crate) async fn start(opts: SystemOptions<'_>, children: &mut Children) -> anyhow::Result<System> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_millis(WAIT_MS + 30_000))
            .build()?;
        let http_addrs: Vec<_> = (0..opts.instances).map(|_| free_port()).collect::<Result<_, _>>()?;
        let bases: Vec<String> = http_addrs.iter().map(|a| format!("http://{a}")).collect();
        let mut system = System {
            base: bases[0].clone(),
            bases: Arc::new(bases),
            http,
            sim_stats: opts.dir.join("firmware-sim-stats.json"),
            setup: SetupTimes { devices: opts.devices, ..SetupTimes::default() },
        };
        let broker = start_gateways(&opts, &http_addrs, children)?;
        for base in system.bases.iter() {
            let client = system.http.clone();
            children
                .wait_until("gateway answering /healthz", Duration::from_secs(60), || {
                    let (client, url) = (client.clone(), format!("{base}/healthz"));
                    async move { client.get(url).send().await.is_ok_and(|r| r.status().is_success()) }
                })
                .await?;
        }
        let t = Instant::now();
        system.register(opts.devices).await?;
        system.setup.register_s = t.elapsed().as_secs_f64();
        system.setup.register_per_s = opts.devices as f64 / system.setup.register_s.max(1e-9);
        let t = Instant::now();
        system.start_devices(&opts, &broker, children).await?;
        system.setup.connect_online_s = t.elapsed().as_secs_f64();
        Ok(system)
    }

    /// The receiver, then (once it listens) the simulated fleet answering at
    /// once; returns when the gateway shows every device online.
    async fn start_devices(
        &self,
        opts: &SystemOptions<'_>,
        broker: &str,
        children: &mut Children,
    ) -> anyhow::Result<()> {
        let tcp = free_port()?;
        let receiver_id = format!("{}-receiver", opts.prefix);
        let mut args: Vec<String> = [
            "--broker",
            broker,
            "--tcp-listen",
            &tcp.to_string(),
            "--topic-prefix",
            opts.prefix,
            "--receiver-id",
            &receiver_id,
        ]
        .map(String::from)
        .into();
        if let Some(secret) = opts.message_secret {
            let key = protocol::seal::receiver_key(secret.as_bytes(), &receiver_id, 1);
            args.extend(["--receiver-key".into(), key.to_base64()]);
        }
        children.spawn("receiver", &opts.bins.receiver, &args, opts.dir)?;
        children
            .wait_until(
                "receiver listening",
                Duration::from_secs(30),
                || async move { is_listening(tcp.port()) },
            )
            .await?;
        let args = [
            "--connect",
            &tcp.to_string(),
            "--devices",
            &opts.devices.to_string(),
            "--latency-ms",
            "0",
            "--stats-file",
            &self.sim_stats.display().to_string(),
        ]
        .map(String::from);
        children.spawn("firmware-sim", &opts.bins.firmware_sim, &args, opts.dir)?;
        self.wait_online(opts.devices, children).await
    }

    /// PUT /v1/devices/dev-NNNN for each device.
    async fn register(&self, devices: usize) -> anyhow::Result<()> {
        let (http, base) = (self.http.clone(), self.base.clone());
        let results = run_pool(devices, REGISTER_CONCURRENCY, move |i| {
            let (http, url) = (http.clone(), format!("{base}/v1/devices/{}", Shape::device_name(i)));
            async move {
                let r = http.put(url).json(&json!({"labels": {"fleet": "bench"}})).send().await?;
                anyhow::ensure!(r.status().is_success(), "registering a device: {}", r.status());
                anyhow::Ok(())
            }
        })
        .await;
        results.into_iter().collect()
    }

    /// Pages through GET /v1/devices until every bench device shows online
    /// (a page of 1,000 per request, so 10,000 devices cost 10 requests a round).
    async fn wait_online(&self, devices: usize, children: &mut Children) -> anyhow::Result<()> {
        let limit = Duration::from_secs(60.max(devices as u64 / 50));
        let deadline = Instant::now() + limit;
        loop {
            children.check_alive()?;
            let online = self.count_online().await?;
            if online >= devices {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {devices} device(s) never showed online within {} s",
                    devices - online,
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Devices the gateway shows online now.
    async fn count_online(&self) -> anyhow::Result<usize> {
        let (mut online, mut after) = (0, String::new());
        loop {
            let url = format!("{}/v1/devices?limit={DEVICE_PAGE}&after={after}", self.base);
            let page: Value = self.http.get(url).send().await?.error_for_status()?.json().await?;
            let items = page["items"].as_array().map(Vec::as_slice).unwrap_or_default();
            online += items.iter().filter(|d| d["online"] == true).count();
            match page["next_after"].as_str() {
                Some(next) if !items.is_empty() => after = next.to_owned(),
                _ => return Ok(online),
            }
        }
    }

    /// A few sync commands, unmeasured.
    pub(crate) async fn warm_up(&self, shape: &Shape) -> anyhow::Result<()> {
        let phase =
            self.sync_calls(shape, WARM_UP.min(shape.commands), 4, Recorder::new("warm-up", WARM_UP)).await;
        match phase.failures.examples.first() {
            Some(e) => bail!("warm-up command failed: {e}"),
            None => Ok(()),
        }
    }

    /// C callers POST sync commands; each call's latency counts.
    pub(crate) async fn run_sync(&self, shape: &Shape) -> SyncResult {
        let recorder = Recorder::new("pipeline sync", shape.commands);
        let progress = Progress::show(recorder.clone());
        let started = Instant::now();
        let calls = self.sync_calls(shape, shape.commands, shape.concurrency, recorder.clone()).await;
        let elapsed = started.elapsed().as_secs_f64();
        drop(progress);
        SyncResult {
            commands: shape.commands,
            elapsed_s: elapsed,
            throughput_per_s: shape.commands as f64 / elapsed,
            latency: Latency::of(recorder.latencies()),
            statuses: calls.statuses,
            failures: calls.failures,
        }
    }

    async fn sync_calls(
        &self,
        shape: &Shape,
        n: usize,
        concurrency: usize,
        recorder: Arc<Recorder>,
    ) -> Outcomes {
        let (http, bases, body) = (self.http.clone(), self.bases.clone(), command_body(shape, "sync"));
        let devices = shape.devices;
        let outcomes = run_pool(n, concurrency, move |i| {
            let (http, recorder, body) = (http.clone(), recorder.clone(), body.clone());
            let base = &bases[i % bases.len()];
            let url = format!("{base}/v1/devices/{}/commands", Shape::device_name(i % devices));
            async move {
                let t = Instant::now();
                let outcome = final_status(http.post(url).json(&body).send().await).await;
                let ok = matches!(&outcome, Ok((_, s)) if s == "succeeded");
                recorder.record(ok.then(|| t.elapsed()));
                outcome.map(|(_, status)| status)
            }
        })
        .await;
        Outcomes::of(outcomes)
    }

    /// C callers POST async commands; returns once the gateway counts none
    /// of them unfinished (its summary, polled every [`SETTLE_POLL`]), so the
    /// phase's CPU and statement figures can end there, before
    /// [`System::collect_async`] long-polls each one.
    pub(crate) async fn run_async(&self, shape: &Shape) -> AsyncSubmitted {
        let recorder = Recorder::new("pipeline async: accepted", shape.commands);
        let progress = Progress::show(recorder.clone());
        let started = Instant::now();
        let accepted = self.submit_async(shape, recorder.clone()).await;
        let accept_elapsed_s = started.elapsed().as_secs_f64();
        drop(progress);
        self.wait_settled().await;
        AsyncSubmitted { commands: shape.commands, started, accept_elapsed_s, recorder, accepted }
    }

    /// Long-polls every accepted command of `run_async` to its final status.
    /// Throughput runs from the first 202 to the last final status as the
    /// gateway recorded it (`completed_at`), so the collecting stretches it not.
    pub(crate) async fn collect_async(&self, submitted: AsyncSubmitted) -> AsyncResult {
        let AsyncSubmitted { commands, started, accept_elapsed_s, recorder, accepted } = submitted;
        let first_accept =
            accepted.iter().filter_map(|a| a.as_ref().ok()).map(|a| a.at_ms).fold(f64::MAX, f64::min);
        let ids: Vec<String> =
            accepted.iter().filter_map(|a| a.as_ref().ok()).map(|a| a.id.clone()).collect();
        let rejected =
            Outcomes::of(accepted.into_iter().map(|a| a.map(|_| String::new())).filter(Result::is_err));
        let finals = self.collect(ids).await;
        let last_final = finals.iter().filter_map(|f| f.as_ref().ok()).map(|f| f.0).fold(f64::MIN, f64::max);
        let done = finals.iter().filter(|f| f.is_ok()).count();
        let span_s = (last_final - first_accept) / 1000.0;
        let mut outcomes = Outcomes::of(finals.into_iter().map(|f| f.map(|(_, s)| s)));
        outcomes.absorb(rejected);
        AsyncResult {
            commands,
            accept_elapsed_s,
            accept_per_s: commands as f64 / accept_elapsed_s,
            accept_latency: Latency::of(recorder.latencies()),
            first_accept_to_last_final_s: span_s,
            throughput_per_s: if span_s > 0.0 { done as f64 / span_s } else { 0.0 },
            collect_elapsed_s: started.elapsed().as_secs_f64(),
            statuses: outcomes.statuses,
            failures: outcomes.failures,
        }
    }

    async fn submit_async(&self, shape: &Shape, recorder: Arc<Recorder>) -> Vec<Result<Accepted, String>> {
        let (http, bases, body) = (self.http.clone(), self.bases.clone(), command_body(shape, "async"));
        let devices = shape.devices;
        run_pool(shape.commands, shape.concurrency, move |i| {
            let (http, recorder, body) = (http.clone(), recorder.clone(), body.clone());
            let base = &bases[i % bases.len()];
            let url = format!("{base}/v1/devices/{}/commands", Shape::device_name(i % devices));
            async move {
                let t = Instant::now();
                let r = http.post(url).json(&body).send().await.map_err(request_error)?;
                let status = r.status();
                let v: Value = r.json().await.map_err(request_error)?;
                let at_ms = now_ms();
                let id = v["id"].as_str().filter(|_| status.as_u16() == 202).map(str::to_owned);
                recorder.record(id.as_ref().map(|_| t.elapsed()));
                id.map(|id| Accepted { id, at_ms })
                    .ok_or_else(|| format!("HTTP {status}: {}", error_kind(&v)))
            }
        })
        .await
    }

    /// Until the gateway's summary of the last hour counts no command that is
    /// not final (or [`WAIT_MS`] passed: the long-polls then say which).
    async fn wait_settled(&self) {
        let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
        let url = format!("{}/v1/commands/summary?minutes=60&buckets=1", self.bases[0]);
        while Instant::now() < deadline {
            let summary: Option<Value> = match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            let unfinished = summary.map(|v| {
                ["pending", "scheduled", "sent", "delivered"]
                    .iter()
                    .map(|s| v["totals"][*s].as_u64().unwrap_or(0))
                    .sum::<u64>()
            });
            if unfinished == Some(0) {
                return;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Long-polls each id until final; `(completed_at ms, status)` each.
    async fn collect(&self, ids: Vec<String>) -> Vec<Result<(f64, String), String>> {
        let recorder = Recorder::new("pipeline async: final", ids.len());
        let progress = Progress::show(recorder.clone());
        let (http, bases, ids) = (self.http.clone(), self.bases.clone(), Arc::new(ids));
        let finals = run_pool(ids.len(), COLLECTORS, move |k| {
            let (http, recorder) = (http.clone(), recorder.clone());
            // Long-polled on another instance than the one that took it, when there are several.
            let base = &bases[(k + 1) % bases.len()];
            let url = format!("{base}/v1/commands/{}?wait_ms={WAIT_MS}", ids[k]);
            async move {
                let outcome = final_status(http.get(url).send().await).await;
                recorder.record(Some(Duration::ZERO));
                let (v, status) = outcome?;
                let at =
                    ["completed_at", "updated_at"].iter().find_map(|k| v[*k].as_str().and_then(parse_ms));
                Ok((at.ok_or("a final command without completed_at")?, status))
            }
        })
        .await;
        drop(progress);
        finals
    }
}

/// `gateway serve`, once per instance, each on its own HTTP address: the
/// first with the embedded broker (unless one is given), the others on the
/// first's broker. Instance ids are generated. Returns the broker URL the
/// receiver must use.
fn start_gateways(
    opts: &SystemOptions<'_>,
    http_addrs: &[std::net::SocketAddr],
    children: &mut Children,
) -> anyhow::Result<String> {
    let embedded = match opts.broker {
        Some(_) => None,
        None => Some(free_port()?),
    };
    let broker = match (opts.broker, embedded) {
        (Some(url), _) => url.to_owned(),
        (None, Some(mqtt)) => format!("mqtt://{mqtt}"),
        (None, None) => unreachable!("an embedded broker address is chosen above"),
    };
    for (k, http) in http_addrs.iter().enumerate() {
        let mut args: Vec<String> =
            ["serve", "--database-url", opts.database_url, "--topic-prefix", opts.prefix]
                .map(String::from)
                .into();
        args.extend(["--http-listen".into(), http.to_string()]);
        args.extend(["--max-device-queue".into(), opts.max_device_queue.to_string()]);
        if let Some(secret) = opts.message_secret {
            args.extend(["--message-secret".into(), secret.to_owned()]);
        }
        match embedded.filter(|_| k == 0) {
            Some(mqtt) => args.extend(["--mqtt-listen".into(), mqtt.to_string()]),
            None => args.extend(["--broker".into(), broker.clone()]),
        }
        children.spawn(GATEWAY_NAMES[k], &opts.bins.gateway, &args, opts.dir)?;
    }
    Ok(broker)
}

/// An async command the gateway took, and when (bench clock, Unix ms).
#[derive(Debug)]
struct Accepted {
    id: String,
    at_ms: f64,
}

pub(crate) fn command_body(shape: &Shape, mode: &str) -> Value {
    let payload = "x".repeat(shape.payload_bytes);
    let mut body = json!({"name": "bench", "payload": payload, "mode": mode, "ttl_ms": 300_000});
    if mode == "sync" {
        body["wait_ms"] = WAIT_MS.into();
    }
    body
}

/// A response holding a final command: its JSON and status; anything else is an error text.
async fn final_status(response: reqwest::Result<reqwest::Response>) -> Result<(Value, String), String> {
    let r = response.map_err(request_error)?;
    let code = r.status();
    let v: Value = r.json().await.map_err(request_error)?;
    match (code.as_u16(), v["status"].as_str()) {
        (200, Some(status)) => Ok((v.clone(), status.to_owned())),
        (202, Some(status)) => Err(format!("still {status} after {} s", WAIT_MS / 1000)),
        _ => Err(format!("HTTP {code}: {}", error_kind(&v))),
    }
}

pub(crate) fn error_kind(v: &Value) -> String {
    v["error"]["kind"].as_str().map_or_else(|| v.to_string(), str::to_owned)
}

pub(crate) fn request_error(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "request timed out".into()
    } else if e.is_connect() {
        "cannot connect to the gateway".into()
    } else {
        format!("request failed: {e}")
    }
}

pub(crate) fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64() * 1000.0
}

pub(crate) fn parse_ms(rfc3339: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e6)
}

/// Whether a TCP socket listens on 127.0.0.1:`port` (from /proc/net/tcp, so
/// nobody connects just to find out).
fn is_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

/// Final statuses counted, and what went wrong.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    pub(crate) statuses: BTreeMap<String, usize>,
    pub(crate) failures: Failures,
}

impl Outcomes {
    pub(crate) fn of(outcomes: impl IntoIterator<Item = Result<String, String>>) -> Outcomes {
        let mut o = Outcomes::default();
        for outcome in outcomes {
            match outcome {
                Ok(status) if status == "succeeded" => *o.statuses.entry(status).or_default() += 1,
                Ok(status) => {
                    o.failures.add(format!("ended {status}"));
                    *o.statuses.entry(status).or_default() += 1;
                }
                Err(e) => {
                    o.failures.add(e);
                    *o.statuses.entry("error".into()).or_default() += 1;
                }
            }
        }
        o
    }

    pub(crate) fn absorb(&mut self, other: Outcomes) {
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.failures.count += other.failures.count;
        self.failures.examples.extend(other.failures.examples);
        self.failures.examples.truncate(FAILURE_EXAMPLES);
    }
}

/// How many requests failed, with the first few distinct reasons.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct Failures {
    pub(crate) count: usize,
    pub(crate) examples: Vec<String>,
}

impl Failures {
    fn add(&mut self, what: String) {
        self.count += 1;
        if self.examples.len() < FAILURE_EXAMPLES && !self.examples.contains(&what) {
            self.examples.push(what);
        }
    }
}

/// The async phase between its submissions and their collection.
pub(crate) struct AsyncSubmitted {
    commands: usize,
    started: Instant,
    accept_elapsed_s: f64,
    recorder: Arc<Recorder>,
    accepted: Vec<Result<Accepted, String>>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct AsyncResult {
    pub(crate) commands: usize,
    pub(crate) accept_elapsed_s: f64,
    pub(crate) accept_per_s: f64,
    pub(crate) accept_latency: Option<Latency>,
    pub(crate) first_accept_to_last_final_s: f64,
    /// Final commands per second from the first 202 to the last final status.
    pub(crate) throughput_per_s: f64,
    /// From the first POST until the bench had seen every final status.
    pub(crate) collect_elapsed_s: f64,
    pub(crate) statuses: BTreeMap<String, usize>,
    pub(crate) failures: Failures,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SyncResult {
    pub(crate) commands: usize,
    pub(crate) elapsed_s: f64,
    pub(crate) throughput_per_s: f64,
    pub(crate) latency: Option<Latency>,
    pub(crate) statuses: BTreeMap<String, usize>,
    pub(crate) failures: Failures,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_timestamps_parse_to_unix_ms() {
        assert_eq!(parse_ms("1970-01-01T00:00:01.250Z"), Some(1250.0));
        assert_eq!(parse_ms("nonsense"), None);
    }

    #[test]
    fn outcomes_count_statuses_and_keep_distinct_reasons() {
        let o = Outcomes::of([
            Ok("succeeded".into()),
            Ok("expired".into()),
            Err("HTTP 503".into()),
            Err("HTTP 503".into()),
        ]);
        assert_eq!(o.statuses["succeeded"], 1);
        assert_eq!(o.failures.count, 3);
        assert_eq!(o.failures.examples, vec!["ended expired", "HTTP 503"]);
    }
}
