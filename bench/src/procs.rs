//! The pipeline's programs as child processes: started from the binaries next
//! to this one, logging to files, watched (one dying aborts the run), measured
//! from /proc (CPU time, peak RSS), stopped with SIGTERM and killed on drop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::process::{Child, Command};

/// The programs the pipeline needs, all from one directory.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    pub(crate) gateway: PathBuf,
    pub(crate) receiver: PathBuf,
    pub(crate) firmware_sim: PathBuf,
}

impl Binaries {
    /// The binaries next to this executable (so a release bench runs release programs).
    pub(crate) fn beside_me() -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe().context("finding the bench executable")?;
        let dir = exe.parent().context("the bench executable has no directory")?;
        let bins = Binaries {
            gateway: dir.join("gateway"),
            receiver: dir.join("receiver"),
            firmware_sim: dir.join("firmware-sim"),
        };
        let missing: Vec<_> = [&bins.gateway, &bins.receiver, &bins.firmware_sim]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "missing {}: build them first with `cargo build --release -p gateway -p receiver -p firmware-sim` \
                 (with the same CARGO_TARGET_DIR as this bench)",
                missing.join(", ")
            );
        }
        Ok(bins)
    }
}

/// One running child.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    pid: u32,
    child: Child,
    log: PathBuf,
}

/// CPU time and peak memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Usage {
    pub(crate) cpu_s: f64,
    pub(crate) peak_rss_mib: f64,
}

/// The children, in start order. Dropping it kills them all (SIGKILL).
#[derive(Debug, Default)]
pub(crate) struct Children {
    procs: Vec<Proc>,
    /// Processes measured beside the children but not started or stopped
    /// here (the database server on this machine), by name.
    watched: Vec<(&'static str, u32)>,
}

impl Children {
    /// Starts `exe args…` with stdout and stderr going to `<log_dir>/<name>.log`.
    pub(crate) fn spawn(
        &mut self,
        name: &'static str,
        exe: &Path,
        args: &[String],
        log_dir: &Path,
    ) -> anyhow::Result<u32> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .env("NO_COLOR", "1")
            // Loopback only, no credentials: the benchmark measures the pipeline.
            .env("GATEWAY_INSECURE", "true")
            .env("RECEIVER_INSECURE", "true")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let pid = child.id().context("a child without a pid")?;
        self.procs.push(Proc { name, pid, child, log });
        Ok(pid)
    }

    /// An error naming the first child that has exited, with the end of its log.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    tail(&p.log, 15)
                );
            }
        }
        Ok(())
    }

    /// Waits until `ready` holds, failing if a child dies or `limit` passes.
    pub(crate) async fn wait_until<F, Fut>(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.check_alive()?;
            if ready().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{what} did not happen within {} s", limit.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Measures `pid`'s CPU and memory with the children's, as `name`.
    pub(crate) fn watch(&mut self, name: &'static str, pid: u32) {
        self.watched.push((name, pid));
    }

    /// The children's and the watched processes' pids, by name.
    pub(crate) fn pids(&self) -> BTreeMap<&'static str, u32> {
        self.procs.iter().map(|p| (p.name, p.pid)).chain(self.watched.iter().copied()).collect()
    }

    pub(crate) fn logs(&self) -> Vec<(&'static str, PathBuf)> {
        self.procs.iter().map(|p| (p.name, p.log.clone())).collect()
    }

    /// SIGTERM to each child, last started first, waiting up to 5 s for each
    /// before killing it.
    pub(crate) async fn stop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            terminate(p.pid);
            if tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await.is_err() {
                tracing::warn!(child = p.name, "did not stop within 5 s of SIGTERM; killing it");
                let _ = p.child.kill().await;
            }
        }
    }
}

fn terminate(pid: u32) {
    // std offers only SIGKILL; `kill` the command sends SIGTERM without unsafe code.
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

/// CPU time (utime + stime) and VmHWM of `/proc/<pid>`; zeros if it is gone.
pub(crate) fn usage_of(pid: &str) -> Usage {
    let cpu_ticks =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_cpu_ticks(&s));
    let hwm_kib =
        std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| parse_vm_hwm_kib(&s));
    Usage {
        cpu_s: cpu_ticks.unwrap_or(0) as f64 / clock_ticks_per_s(),
        peak_rss_mib: hwm_kib.unwrap_or(0) as f64 / 1024.0,
    }
}

/// utime + stime, fields 14 and 15 of /proc/<pid>/stat (counted after the
/// command name, which is in parentheses and may contain spaces).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state), so field n is at index n - 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `getconf CLK_TCK`, read once (100 on every common Linux).
fn clock_ticks_per_s() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The last `n` lines of a log file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_name_with_spaces() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn vm_hwm() {
        assert_eq!(parse_vm_hwm_kib("Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t 1 kB\n"), Some(12345));
    }

    #[test]
    fn our_own_usage_is_readable() {
        let u = usage_of("self");
        assert!(u.peak_rss_mib > 0.0);
    }
}
