//! What every phase shares: a pool of callers pulling request numbers, a
//! latency recorder, the live progress line on stderr, and percentiles.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Runs `f(0..n)` from `concurrency` callers, each starting its next request
/// when its previous one is done; returns every output (in no particular order).
pub(crate) async fn run_pool<F, Fut, T>(n: usize, concurrency: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send,
    T: Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
        .map(|_| {
            let (next, f) = (next.clone(), f.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return out;
                    }
                    out.push(f(i).await);
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for caller in futures::future::join_all(callers).await {
        all.extend(caller.expect("a bench caller panicked"));
    }
    all
}

/// Latencies of one phase as they come in; read by the progress line.
#[derive(Debug)]
pub(crate) struct Recorder {
    label: &'static str,
    total: usize,
    started: Instant,
    done: AtomicUsize,
    /// A std mutex: held only to push or copy, never across an await.
    latencies: Mutex<Vec<Duration>>,
}

impl Recorder {
    pub(crate) fn new(label: &'static str, total: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            label,
            total,
            started: Instant::now(),
            done: AtomicUsize::new(0),
            latencies: Mutex::new(Vec::with_capacity(total)),
        })
    }

    /// One request finished; `latency` is `None` when it has none worth keeping (a failure).
    pub(crate) fn record(&self, latency: Option<Duration>) {
        if let Some(l) = latency {
            self.latencies.lock().unwrap().push(l);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn latencies(&self) -> Vec<Duration> {
        self.latencies.lock().unwrap().clone()
    }

    fn progress_line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let summary = Latency::of(self.latencies());
        let (p50, p99) = summary.map_or((0.0, 0.0), |l| (l.p50_ms, l.p99_ms));
        format!("{}: {done}/{} {rate:.0}/s p50 {p50:.2} ms p99 {p99:.2} ms", self.label, self.total)
    }
}

/// The live progress line: rewritten in place every 200 ms while the guard
/// lives (every 5 s, one line each, when stderr is not a terminal), erased on drop.
pub(crate) struct Progress {
    stop: CancellationToken,
    tty: bool,
}

impl Progress {
    pub(crate) fn show(recorder: Arc<Recorder>) -> Progress {
        let stop = CancellationToken::new();
        let tty = std::io::stderr().is_terminal();
        let every = if tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
        let token = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let line = recorder.progress_line();
                let mut err = std::io::stderr().lock();
                let _ = if tty { write!(err, "\r{line}\x1b[K") } else { writeln!(err, "{line}") };
                let _ = err.flush();
            }
        });
        Progress { stop, tty }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Percentiles (nearest rank) of one phase's latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Latency {
    pub(crate) fn of(mut latencies: Vec<Duration>) -> Option<Latency> {
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let at = |p: f64| {
            let rank = (p * latencies.len() as f64).ceil() as usize;
            latencies[rank.clamp(1, latencies.len()) - 1].as_secs_f64() * 1000.0
        };
        Some(Latency { p50_ms: at(0.50), p90_ms: at(0.90), p99_ms: at(0.99), max_ms: at(1.0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |n: u64| Duration::from_millis(n);
        let l = Latency::of((1..=100).rev().map(ms).collect()).unwrap();
        assert_eq!((l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Latency::of(vec![ms(7)]).unwrap().p50_ms, 7.0);
        assert!(Latency::of(Vec::new()).is_none());
    }

    #[tokio::test]
    async fn the_pool_runs_each_request_once() {
        let mut out = run_pool(1000, 7, |i| async move { i }).await;
        out.sort_unstable();
        assert_eq!(out, (0..1000).collect::<Vec<_>>());
    }
}
