//! Real clusters on loopback for the distributed-availability tests: a 3-node
//! MariaDB Galera cluster (optionally behind HAProxy) and a 3-node NATS
//! cluster with JetStream and MQTT. Every node is a child [`Proc`] with its
//! own log file in the test's directory, so a test can `kill -9` one node and
//! start it again; dropping the cluster kills every node.
//!
//! Nodes are numbered 1, 2, 3 everywhere (`url(1)` is node 1); 0 panics.
//!
//! Ports come from [`free_low_port`]: free, below the kernel's ephemeral range
//! (32768…), and reserved across concurrent test processes. A Galera node
//! whose group port fell in the ephemeral range was seen failing with
//! "Address already in use" after an outgoing connection took its port; a
//! node restarted on the same ports must find them free.
//!
//! Only loopback addresses; the machine's own MariaDB (3306), Mosquitto
//! (1883) and NATS (4222) are never touched. See `shared/notes/clusters.md`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
};
use sqlx::Connection;
use tokio::time::Instant;

use crate::procs::{wait_listening, within, Proc};

/// How long a whole cluster may take to start (a few seconds on an idle
/// machine; generous for a loaded 2-core CI machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a restarted node may take to rejoin (Galera: a full rsync SST).
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(90);

pub use plumbing::ports::LowPort;

/// A free TCP port on 127.0.0.1 below the ephemeral range, reserved while
/// the value lives ([`plumbing::ports::free_low_port`]).
pub fn free_low_port() -> LowPort {
    plumbing::ports::free_low_port().expect("no free port in 127.0.0.1:20000..32000")
}

/// Whether this test runs in CI (`CI=true`), where a missing program fails the test.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// `name` on `PATH`, or in /usr/sbin, /usr/bin, /usr/local/sbin or /usr/local/bin
/// (a non-root `PATH` often lacks the sbin directories where Debian puts servers).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `true` when nothing is missing. Otherwise: in CI, a panic naming what is
/// missing; elsewhere a `SKIPPED:` line on stderr and `false`.
fn require(what: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let message =
        format!("{what} needs {} (Debian packages; scripts/services.sh installs them)", missing.join(", "));
    assert!(!in_ci(), "{message}; CI=true makes this fatal");
    eprintln!("SKIPPED: {message}");
    false
}

fn program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} is not installed (scripts/services.sh installs it)"))
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn check_node(i: usize) -> usize {
    assert!((1..=3).contains(&i), "nodes are numbered 1, 2, 3 (got {i})");
    i - 1
}

// ---------------------------------------------------------------------------
// MariaDB Galera
// ---------------------------------------------------------------------------

/// Where Debian's `galera-4` puts the wsrep provider.
pub const GALERA_PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";

/// The database every Galera cluster holds, empty, made on node 1 at start.
pub const GALERA_DB: &str = "gw";

/// Galera group-communication timeouts, shorter than the defaults (suspect
/// 5 s, inactive 15 s) so that a killed node is dropped from the cluster —
/// and commits on the others resume — within about 3 s instead of about 6 s,
/// while staying clear of the 1.5 s scheduling stalls that Galera logs on a
/// loaded 2-core machine ("last inactive check more than PT1.5S ago").
const EVS_TIMEOUTS: &str = concat!(
    "evs.suspect_timeout=PT3S;evs.inactive_timeout=PT6S;",
    "evs.inactive_check_period=PT0.5S;evs.keepalive_period=PT0.5S"
);

#[derive(Debug)]
struct GaleraNode {
    /// `nN/`: data directory, socket and pid file, owned by `mysql` when the tests run as root.
    home: PathBuf,
    sql: LowPort,
    group: LowPort,
    ist: LowPort,
    sst: LowPort,
    /// `None` until first started; not running (`pid()` is `None`) after [`Galera::kill9`].
    proc: Option<Proc>,
    /// Whether `proc`'s arguments bootstrap a new cluster (`--wsrep-new-cluster`).
    bootstraps: bool,
}

/// A 3-node MariaDB Galera cluster on 127.0.0.1: Debian's `mariadbd` with
/// `galera-4`, rsync state transfers, `binlog_format=ROW`,
/// `innodb_autoinc_lock_mode=2`. `root@127.0.0.1` has no password and the
/// database [`GALERA_DB`] exists (both replicate to every node).
///
/// As root, `mariadbd` runs as `mysql` (`--user=mysql`) with each node's
/// directory owned by `mysql`: rsync SST runs an rsync daemon as the server's
/// user, and an rsync daemon started by root writes as `nobody`, which cannot
/// write a root-owned data directory. So the test's directory is made
/// traversable by others (o+x; a temp dir is 0700), and every directory above
/// it must be too (panics otherwise).
#[derive(Debug)]
pub struct Galera {
    dir: PathBuf,
    cluster_name: String,
    nodes: Vec<GaleraNode>,
    as_root: bool,
}

impl Galera {
    /// Whether `mariadbd`, `mariadb-install-db`, `galera-4`'s provider,
    /// `rsync` and `wsrep_sst_rsync` are installed (see [`require`]'s CI rule:
    /// missing in CI panics, elsewhere prints `SKIPPED:` and returns false).
    pub fn available() -> bool {
        let mut missing: Vec<String> = ["mariadbd", "mariadb-install-db", "wsrep_sst_rsync", "rsync"]
            .into_iter()
            .filter(|p| find_program(p).is_none())
            .map(str::to_owned)
            .collect();
        if !Path::new(GALERA_PROVIDER).exists() {
            missing.push(format!("galera-4 ({GALERA_PROVIDER})"));
        }
        require("a Galera cluster", &missing)
    }

    /// Starts the cluster in `dir` (nodes' files under `dir/galera/n1…n3`,
    /// their logs `dir/galera-n1.log`…): bootstraps node 1, starts nodes 2 and
    /// 3 (each joins by an rsync SST from node 1), and returns once every node
    /// is `Synced`, `wsrep_ready=ON` and sees `wsrep_cluster_size=3`. Panics
    /// after [`START_TIMEOUT`] (with each node's log tail).
    pub async fn start(dir: &Path) -> Galera {
        let as_root = running_as_root();
        let home = dir.join("galera");
        std::fs::create_dir_all(&home).expect("galera dir");
        if as_root {
            // mysql must reach its directories through these.
            for d in [dir, home.as_path()] {
                let mut perms = std::fs::metadata(d).expect("dir exists").permissions();
                perms.set_mode(perms.mode() | 0o711);
                std::fs::set_permissions(d, perms).expect("chmod test dir");
            }
            let dir = dir.canonicalize().expect("test dir canonicalizes");
            for above in dir.ancestors().skip(1) {
                let mode = std::fs::metadata(above).map(|m| m.permissions().mode()).unwrap_or(0);
                assert!(
                    mode & 0o001 != 0,
                    "{} is not traversable by others (mode {mode:o}): mysqld runs as mysql and \
                     cannot reach {}; use a test dir under /tmp",
                    above.display(),
                    dir.display()
                );
            }
        }
        let mut nodes = Vec::new();
        for n in 1..=3 {
            let node_home = home.join(format!("n{n}"));
            std::fs::create_dir_all(node_home.join("data")).expect("node dir");
            nodes.push(GaleraNode {
                home: node_home,
                sql: free_low_port(),
                group: free_low_port(),
                ist: free_low_port(),
                sst: free_low_port(),
                proc: None,
                bootstraps: false,
            });
        }
        if as_root {
            let status = Command::new("chown")
                .arg("-R")
                .arg("mysql:mysql")
                .args(nodes.iter().map(|n| &n.home))
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown -R mysql:mysql of the Galera node dirs failed");
        }
        let name = format!("iot-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut galera = Galera { dir: dir.to_owned(), cluster_name: name, nodes, as_root };
        galera.install_db();

        let started = Instant::now();
        galera.spawn(1, true);
        galera.wait_synced(1, START_TIMEOUT).await;
        let mut conn = galera.connect(1, "mysql").await.expect("root@127.0.0.1 on node 1");
        sqlx::query(&format!("CREATE DATABASE IF NOT EXISTS {GALERA_DB}"))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE on node 1");
        let _ = conn.close().await;
        eprintln!("galera: node 1 bootstrapped in {:?}", started.elapsed());
        // Node 3 starts once node 2 is in the primary component (about 1 s, its
        // SST still running): started together, the two joiners were seen to
        // form a non-primary view of their own and lose ~5 s merging it.
        galera.spawn(2, false);
        let left = START_TIMEOUT.saturating_sub(started.elapsed());
        within("Galera node 2 in node 1's cluster", left, || async {
            galera.size_seen_by(1).await.is_some_and(|n| n >= 2)
        })
        .await;
        galera.spawn(3, false);
        let left = START_TIMEOUT.saturating_sub(started.elapsed());
        galera.wait_cluster(3, left).await;
        eprintln!("galera: 3 nodes synced in {:?} (ports: sql {:?})", started.elapsed(), galera.sql_ports());
        galera
    }

    fn install_db(&self) {
        let data = self.nodes[0].home.join("data");
        let mut install = Command::new(program("mariadb-install-db"));
        install.args(["--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db"]);
        install.arg(format!("--datadir={}", data.display()));
        // The smaller redo log is what every joiner receives by rsync.
        install.arg("--innodb-log-file-size=8M");
        if self.as_root {
            install.arg("--user=mysql");
        }
        let log_path = self.dir.join("galera-install.log");
        let log = std::fs::File::create(&log_path).expect("install log");
        let status = install
            .stdout(log.try_clone().expect("log clones"))
            .stderr(log)
            .status()
            .expect("mariadb-install-db runs");
        assert!(status.success(), "mariadb-install-db failed: see {}", log_path.display());
    }

    fn args(&self, i: usize, bootstrap: bool) -> Vec<String> {
        let node = &self.nodes[check_node(i)];
        let peers: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.group.port())).collect();
        let mut args = vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", node.home.join("data").display()),
            format!("--socket={}", node.home.join("mariadbd.sock").display()),
            format!("--pid-file={}", node.home.join("mariadbd.pid").display()),
            format!("--port={}", node.sql.port()),
            "--bind-address=127.0.0.1".to_owned(),
            "--skip-name-resolve".to_owned(),
            "--innodb-buffer-pool-size=64M".to_owned(),
            "--innodb-log-file-size=8M".to_owned(),
            "--innodb-flush-log-at-trx-commit=2".to_owned(),
            "--performance-schema=OFF".to_owned(),
            "--max-connections=500".to_owned(),
            "--binlog-format=ROW".to_owned(),
            "--default-storage-engine=InnoDB".to_owned(),
            "--innodb-autoinc-lock-mode=2".to_owned(),
            "--wsrep-on=ON".to_owned(),
            format!("--wsrep-provider={GALERA_PROVIDER}"),
            format!("--wsrep-cluster-name={}", self.cluster_name),
            format!("--wsrep-cluster-address=gcomm://{}", peers.join(",")),
            format!("--wsrep-node-name=n{i}"),
            format!("--wsrep-node-address=127.0.0.1:{}", node.group.port()),
            format!("--wsrep-node-incoming-address=127.0.0.1:{}", node.sql.port()),
            format!(
                "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{};ist.recv_addr=127.0.0.1:{};\
                 gcache.size=32M;{EVS_TIMEOUTS}",
                node.group.port(),
                node.ist.port()
            ),
            "--wsrep-sst-method=rsync".to_owned(),
            format!("--wsrep-sst-receive-address=127.0.0.1:{}", node.sst.port()),
        ];
        if self.as_root {
            args.insert(1, "--user=mysql".to_owned());
        }
        if bootstrap {
            args.push("--wsrep-new-cluster".to_owned());
        }
        args
    }

    /// Starts node `i`: again with the same arguments when it ran before with
    /// the same `bootstrap`, else as a new process (same name and log file).
    fn spawn(&mut self, i: usize, bootstrap: bool) {
        let args = self.args(i, bootstrap);
        let node = &mut self.nodes[check_node(i)];
        match node.proc.as_mut() {
            Some(proc) if node.bootstraps == bootstrap => proc.restart(),
            _ => {
                // The old process (if any) is killed as it is dropped.
                node.proc =
                    Some(Proc::start(&format!("galera-n{i}"), &program("mariadbd"), &args, &self.dir));
                node.bootstraps = bootstrap;
            }
        }
    }

    /// Node `i` was started and not killed since (it may have died on its own).
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[check_node(i)].proc.as_ref().is_some_and(|p| p.pid().is_some())
    }

    /// `mysql://root@127.0.0.1:PORT/gw`, node `i`'s SQL endpoint.
    pub fn url(&self, i: usize) -> String {
        format!("mysql://root@127.0.0.1:{}/{GALERA_DB}", self.port(i))
    }

    /// Node `i`'s SQL port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[check_node(i)].sql.port()
    }

    fn sql_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.sql.port()).collect()
    }

    /// The node whose SQL port is `port`, if any.
    pub fn node_with_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.sql.port() == port).map(|i| i + 1)
    }

    /// Node `i`'s process (its log path; `pid()` is `None` after [`Galera::kill9`]).
    pub fn proc(&self, i: usize) -> Option<&Proc> {
        self.nodes[check_node(i)].proc.as_ref()
    }

    /// Whether node `i`'s process runs (false once killed or exited on its own).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[check_node(i)].proc.as_mut().is_some_and(Proc::is_running)
    }

    /// SIGKILL to node `i` (reaped at once). The others drop it from the
    /// cluster after 3–5 s (see `EVS_TIMEOUTS`); until then their commits wait.
    pub fn kill9(&mut self, i: usize) {
        if let Some(proc) = self.nodes[check_node(i)].proc.as_mut() {
            proc.kill9();
        }
    }

    /// Starts node `i` again (killing it first if it runs) on its data and
    /// ports, and waits until it is synced and every running node sees the
    /// same cluster size (3 when all run). It rejoins by IST or, after a
    /// `kill -9` (its saved position is lost), by a full rsync SST. When no
    /// other node runs, it bootstraps the cluster again from its own data.
    /// When the nodes still up have lost quorum (non-primary), it cannot join
    /// them and this times out: [`Galera::force_primary`] one of them first.
    pub async fn restart(&mut self, i: usize) {
        self.kill9(i);
        let started = Instant::now();
        let others_up = (1..=3).filter(|&j| j != i).any(|j| self.is_running(j));
        if !others_up {
            let grastate = self.nodes[check_node(i)].home.join("data/grastate.dat");
            if let Ok(text) = std::fs::read_to_string(&grastate) {
                let text = text.replace("safe_to_bootstrap: 0", "safe_to_bootstrap: 1");
                std::fs::write(&grastate, text).expect("grastate.dat writable");
            }
        }
        self.spawn(i, !others_up);
        let expected = (1..=3).filter(|&j| self.is_up(j)).count() as u64;
        self.wait_cluster(expected, REJOIN_TIMEOUT).await;
        eprintln!("galera: node {i} rejoined in {:?}", started.elapsed());
    }

    /// Makes node `i` — up, but in a non-primary component after the others
    /// were lost (queries fail with 1047) — the primary component on its own
    /// (`pc.bootstrap=YES`), then waits until it is synced. Galera never does
    /// this by itself: a node restarted while the last primary component's
    /// majority is still missing waits for it (so would [`Galera::restart`]).
    pub async fn force_primary(&self, i: usize) {
        let mut conn = self.connect(i, "mysql").await.expect("node answers");
        sqlx::query("SET GLOBAL wsrep_provider_options = 'pc.bootstrap=YES'")
            .execute(&mut conn)
            .await
            .expect("pc.bootstrap=YES");
        let _ = conn.close().await;
        self.wait_synced(i, REJOIN_TIMEOUT).await;
    }

    /// A connection to node `i` as root over TCP (database `db`), bounded to 5 s.
    pub async fn connect(&self, i: usize, db: &str) -> Result<sqlx::MySqlConnection, sqlx::Error> {
        let url = format!("mysql://root@127.0.0.1:{}/{db}", self.port(i));
        match tokio::time::timeout(Duration::from_secs(5), sqlx::MySqlConnection::connect(&url)).await {
            Ok(result) => result,
            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {url} took over 5 s"),
            ))),
        }
    }

    /// Node `i`'s `wsrep_%` status variables; `None` when it does not answer
    /// (down, or still starting) within 5 s.
    pub async fn wsrep_status(&self, i: usize) -> Option<HashMap<String, String>> {
        let mut conn = self.connect(i, "mysql").await.ok()?;
        let query =
            sqlx::query_as::<_, (String, String)>("SHOW GLOBAL STATUS LIKE 'wsrep%'").fetch_all(&mut conn);
        let rows = tokio::time::timeout(Duration::from_secs(5), query).await.ok()?.ok()?;
        let _ = conn.close().await;
        Some(rows.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect())
    }

    /// `wsrep_cluster_size` as node `i` sees it; `None` when it does not answer.
    pub async fn size_seen_by(&self, i: usize) -> Option<u64> {
        self.wsrep_status(i).await?.get("wsrep_cluster_size")?.parse().ok()
    }

    /// Node `i` is `Synced`, `wsrep_ready=ON`, in the primary component.
    pub async fn is_synced(&self, i: usize) -> bool {
        self.wsrep_status(i).await.is_some_and(|s| synced(&s))
    }

    async fn wait_synced(&self, i: usize, timeout: Duration) {
        within(&format!("Galera node {i} synced"), timeout, || self.is_synced(i)).await;
    }

    /// Waits until every running node is synced and sees `size` members.
    pub async fn wait_cluster(&self, size: u64, timeout: Duration) {
        let running: Vec<usize> = (1..=3).filter(|&i| self.is_up(i)).collect();
        let what = format!("Galera nodes {running:?} synced and seeing cluster size {size}");
        within(&what, timeout, || async {
            for &i in &running {
                match self.wsrep_status(i).await {
                    Some(s)
                        if synced(&s)
                            && s.get("wsrep_cluster_size").map(String::as_str) == Some(&size.to_string()) => {
                    }
                    _ => return false,
                }
            }
            true
        })
        .await;
    }
}

fn synced(status: &HashMap<String, String>) -> bool {
    let is = |k: &str, v: &str| status.get(k).is_some_and(|x| x.eq_ignore_ascii_case(v));
    is("wsrep_ready", "ON")
        && is("wsrep_local_state_comment", "Synced")
        && is("wsrep_cluster_status", "Primary")
}

// ---------------------------------------------------------------------------
// HAProxy in front of Galera
// ---------------------------------------------------------------------------

/// The MariaDB user HAProxy's `mysql-check` logs in as (no password, no privileges).
const HAPROXY_CHECK_USER: &str = "haproxy_check";

/// HAProxy (TCP mode) in front of a [`Galera`]: node 1 serves while it is up,
/// else node 2, else node 3 (`backup` servers, the first one up takes all).
/// A check every 300 ms (`option mysql-check`, a real MariaDB login) marks a
/// node down after 2 failures, and so does one refused connection from live
/// traffic (`observe layer4`); the refused connection is then retried on the
/// next server (`option redispatch 1`, `retries 3`). Sessions open on a node
/// that goes down are cut (`on-marked-down shutdown-sessions`), so a client
/// pool reconnects instead of hanging on a dead node. A node is used again
/// after 2 passed checks.
///
/// What it does not see: a node that is up but not synced (a joiner, or one
/// cut off from the primary component) still passes a login check; queries
/// there fail (1047 "WSREP has not yet prepared node").
#[derive(Debug)]
pub struct HaProxy {
    pub proc: Proc,
    port: LowPort,
    stats: LowPort,
}

impl HaProxy {
    /// Whether `haproxy` is installed (the CI rule of [`Galera::available`]).
    pub fn available() -> bool {
        let missing: Vec<String> =
            find_program("haproxy").is_none().then(|| "haproxy".to_owned()).into_iter().collect();
        require("HAProxy", &missing)
    }

    /// Starts HAProxy (config `dir/haproxy.cfg`, log `dir/haproxy.log`) in
    /// front of `galera`'s three nodes and waits until a query through it
    /// reaches node 1.
    pub async fn start(dir: &Path, galera: &Galera) -> HaProxy {
        let mut conn = galera.connect(1, "mysql").await.expect("node 1 answers");
        sqlx::query(&format!("CREATE USER IF NOT EXISTS '{HAPROXY_CHECK_USER}'@'127.0.0.1'"))
            .execute(&mut conn)
            .await
            .expect("CREATE USER for haproxy's check");
        let _ = conn.close().await;
        let port = free_low_port();
        let stats = free_low_port();
        let mut config = String::from(
            "global
    log stderr format raw local0 info
    maxconn 2000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch 1
",
        );
        config += &format!(
            "\nlisten galera\n    bind 127.0.0.1:{}\n    option mysql-check user {} post-41\n",
            port.port(),
            HAPROXY_CHECK_USER
        );
        for i in 1..=3 {
            let backup = if i == 1 { "" } else { " backup" };
            config += &format!(
                "    server n{i} 127.0.0.1:{} check inter 300ms fastinter 300ms downinter 300ms \
                 rise 2 fall 2 on-marked-down shutdown-sessions{backup}\n",
                galera.port(i)
            );
        }
        config += &format!(
            "\nlisten stats\n    mode http\n    bind 127.0.0.1:{}\n    stats enable\n    stats uri /\n",
            stats.port()
        );
        let config_path = dir.join("haproxy.cfg");
        std::fs::write(&config_path, config).expect("haproxy.cfg written");
        let args = [OsStr::new("-db"), OsStr::new("-f"), config_path.as_os_str()];
        let proc = Proc::start("haproxy", &program("haproxy"), &args, dir);
        let haproxy = HaProxy { proc, port, stats };
        wait_listening("haproxy", haproxy.port.addr(), Duration::from_secs(10)).await;
        within("a query through haproxy reaches Galera node 1", Duration::from_secs(20), || async {
            haproxy.node_behind(galera).await == Some(1)
        })
        .await;
        haproxy
    }

    /// `mysql://root@127.0.0.1:PORT/gw` through HAProxy.
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/{GALERA_DB}", self.port.port())
    }

    pub fn port(&self) -> u16 {
        self.port.port()
    }

    /// HAProxy's stats page (HTML; `;csv` appended gives CSV with each server's state).
    pub fn stats_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.stats.port())
    }

    /// The Galera node a new connection through HAProxy lands on (by its
    /// `@@port`); `None` if no connection or query succeeds within 5 s.
    pub async fn node_behind(&self, galera: &Galera) -> Option<usize> {
        let url = format!("mysql://root@127.0.0.1:{}/mysql", self.port.port());
        let work = async {
            let mut conn = sqlx::MySqlConnection::connect(&url).await.ok()?;
            let port: i64 =
                sqlx::query_scalar("SELECT CAST(@@port AS SIGNED)").fetch_one(&mut conn).await.ok()?;
            let _ = conn.close().await;
            galera.node_with_port(u16::try_from(port).ok()?)
        };
        tokio::time::timeout(Duration::from_secs(5), work).await.ok().flatten()
    }
}

// ---------------------------------------------------------------------------
// NATS with JetStream and MQTT
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct NatsNode {
    client: LowPort,
    monitor: LowPort,
    route: LowPort,
    mqtt: LowPort,
    /// Not running (`pid()` is `None`) after [`NatsCluster::kill9`].
    proc: Option<Proc>,
}

/// A 3-node NATS cluster (Debian's `nats-server` 2.9) on 127.0.0.1: JetStream
/// on every node (file store in `dir/nats/nN`), routes between all three, an
/// MQTT listener on each. NATS speaks MQTT 3.1.1 only, QoS 0 and 1, and has no
/// `$share` subscriptions; its MQTT sessions, retained messages and QoS 1
/// messages live in JetStream streams with 3 replicas, so a client that loses
/// its node can resume its session on another.
#[derive(Debug)]
pub struct NatsCluster {
    dir: PathBuf,
    nodes: Vec<NatsNode>,
    http: reqwest::Client,
}

impl NatsCluster {
    /// Whether `nats-server` is installed (the CI rule of [`Galera::available`]).
    pub fn available() -> bool {
        let missing: Vec<String> =
            find_program("nats-server").is_none().then(|| "nats-server".to_owned()).into_iter().collect();
        require("a NATS cluster", &missing)
    }

    /// Starts the three nodes (configs `dir/nats-nN.conf`, logs
    /// `dir/nats-nN.log`) and returns once every node has its two routes,
    /// JetStream has a metadata leader that every node knows, and a QoS 1
    /// MQTT message published on node 1 reached a subscriber on node 3.
    pub async fn start(dir: &Path) -> NatsCluster {
        let started = Instant::now();
        let nodes = (0..3)
            .map(|_| NatsNode {
                client: free_low_port(),
                monitor: free_low_port(),
                route: free_low_port(),
                mqtt: free_low_port(),
                proc: None,
            })
            .collect();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("HTTP client");
        let mut cluster = NatsCluster { dir: dir.to_owned(), nodes, http };
        let routes: Vec<String> =
            cluster.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.route.port())).collect();
        for i in 1..=3 {
            let node = &cluster.nodes[i - 1];
            let store = dir.join("nats").join(format!("n{i}"));
            std::fs::create_dir_all(&store).expect("JetStream store dir");
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 1GB\n}}\n\
                 cluster {{\n  name: iot\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n\
                 mqtt {{\n  listen: 127.0.0.1:{}\n}}\n",
                node.client.port(),
                node.monitor.port(),
                store.display(),
                node.route.port(),
                routes.join(", "),
                node.mqtt.port()
            );
            std::fs::write(dir.join(format!("nats-n{i}.conf")), config).expect("nats config written");
        }
        for i in 1..=3 {
            cluster.spawn(i);
        }
        cluster.wait_formed(START_TIMEOUT).await;
        let formed = started.elapsed();
        let left = START_TIMEOUT.saturating_sub(started.elapsed());
        cluster.wait_mqtt_path(1, 3, left).await;
        eprintln!(
            "nats: cluster formed in {formed:?}, MQTT 1→3 works after {:?} (mqtt {})",
            started.elapsed(),
            cluster.mqtt_urls()
        );
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let config = self.dir.join(format!("nats-n{i}.conf"));
        let args = [OsStr::new("-c"), config.as_os_str()];
        let proc = Proc::start(&format!("nats-n{i}"), &program("nats-server"), &args, &self.dir);
        self.nodes[check_node(i)].proc = Some(proc);
    }

    /// Node `i` was started and not killed since.
    fn is_up(&self, i: usize) -> bool {
        self.nodes[check_node(i)].proc.as_ref().is_some_and(|p| p.pid().is_some())
    }

    /// `mqtt://127.0.0.1:PORT`, node `i`'s MQTT listener.
    pub fn mqtt_url(&self, i: usize) -> String {
        format!("mqtt://{}", self.mqtt_addr(i))
    }

    pub fn mqtt_addr(&self, i: usize) -> SocketAddr {
        self.nodes[check_node(i)].mqtt.addr()
    }

    /// The three MQTT URLs, comma-separated (`--broker mqtt://a,mqtt://b,mqtt://c`).
    pub fn mqtt_urls(&self) -> String {
        (1..=3).map(|i| self.mqtt_url(i)).collect::<Vec<_>>().join(",")
    }

    /// `nats://127.0.0.1:PORT`, node `i`'s NATS client port.
    pub fn nats_url(&self, i: usize) -> String {
        format!("nats://{}", self.nodes[check_node(i)].client.addr())
    }

    /// `http://127.0.0.1:PORT`, node `i`'s monitoring endpoint (`/varz`, `/routez`, `/jsz`, `/healthz`).
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://{}", self.nodes[check_node(i)].monitor.addr())
    }

    /// Node `i`'s process (its log path; `pid()` is `None` after [`NatsCluster::kill9`]).
    pub fn proc(&self, i: usize) -> Option<&Proc> {
        self.nodes[check_node(i)].proc.as_ref()
    }

    /// SIGKILL to node `i` (reaped at once). JetStream streams that had their
    /// leader there elect another among the two left (a few seconds).
    pub fn kill9(&mut self, i: usize) {
        if let Some(proc) = self.nodes[check_node(i)].proc.as_mut() {
            proc.kill9();
        }
    }

    /// Starts node `i` again (killing it first if it runs) with its config and
    /// JetStream store, and waits until it is routed to the running nodes,
    /// knows the JetStream leader, and carries MQTT: a QoS 1 message published
    /// on another running node reaches a subscriber on node `i`.
    pub async fn restart(&mut self, i: usize) {
        let started = Instant::now();
        match self.nodes[check_node(i)].proc.as_mut() {
            Some(proc) => proc.restart(),
            None => self.spawn(i),
        }
        self.wait_formed(REJOIN_TIMEOUT).await;
        let from = (1..=3).find(|&j| j != i && self.is_up(j)).unwrap_or(i);
        let left = REJOIN_TIMEOUT.saturating_sub(started.elapsed());
        self.wait_mqtt_path(from, i, left).await;
        eprintln!("nats: node {i} rejoined in {:?}", started.elapsed());
    }

    async fn json(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let response = self.http.get(format!("{}{path}", self.monitor_url(i))).send().await.ok()?;
        response.json().await.ok()
    }

    /// The JetStream metadata leader node `i` knows of (`n1`…`n3`), if any.
    pub async fn meta_leader(&self, i: usize) -> Option<String> {
        let jsz = self.json(i, "/jsz").await?;
        jsz["meta_cluster"]["leader"].as_str().filter(|s| !s.is_empty()).map(str::to_owned)
    }

    /// How many routes node `i` has (to other nodes); `None` when it does not answer.
    pub async fn routes(&self, i: usize) -> Option<u64> {
        self.json(i, "/routez").await?["num_routes"].as_u64()
    }

    /// Waits until every running node listens for MQTT, is routed to every
    /// other running node, and knows one and the same JetStream leader.
    pub async fn wait_formed(&self, timeout: Duration) {
        let running: Vec<usize> = (1..=3).filter(|&i| self.is_up(i)).collect();
        let what = format!("NATS nodes {running:?} routed to each other with one JetStream leader");
        within(&what, timeout, || async {
            let mut leaders = Vec::new();
            for &i in &running {
                if tokio::net::TcpStream::connect(self.mqtt_addr(i)).await.is_err() {
                    return false;
                }
                // Routes are counted per connection; a node may briefly hold two to one peer.
                if self.routes(i).await.is_none_or(|r| r < running.len() as u64 - 1) {
                    return false;
                }
                match self.meta_leader(i).await {
                    Some(leader) => leaders.push(leader),
                    None => return false,
                }
            }
            leaders.windows(2).all(|w| w[0] == w[1])
        })
        .await;
    }

    /// Waits until a QoS 1 MQTT message published on node `from` reaches a
    /// subscriber on node `to` (fresh clean-session clients each try).
    /// Returns how long that took.
    pub async fn wait_mqtt_path(&self, from: usize, to: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(10));
            match mqtt_roundtrip(self.mqtt_addr(from), self.mqtt_addr(to), left).await {
                Ok(()) => return started.elapsed(),
                Err(e) => {
                    if e != last_error {
                        eprintln!("nats: MQTT {from}→{to} not yet, at {:?}: {e}", started.elapsed());
                    }
                    last_error = e;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no QoS 1 MQTT message from NATS node {from} to node {to} within {timeout:?}; \
             last error: {last_error}"
        )
    }
}

/// MQTT client options that suit NATS: MQTT 3.1.1 (rumqttc's v4 client),
/// TCP_NODELAY, a short connect timeout and keep-alive, a 1 MiB packet limit.
pub fn nats_mqtt_client(addr: SocketAddr, client_id: &str, clean_session: bool) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_session(clean_session)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(5);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Polls `eventloop` until `want` accepts an event; an error (connection
/// refused, closed, …) or `timeout` ends it with a message.
pub async fn mqtt_poll_until(
    eventloop: &mut EventLoop,
    timeout: Duration,
    mut want: impl FnMut(&Event) -> bool,
) -> Result<Event, String> {
    let work = async {
        loop {
            match eventloop.poll().await {
                Ok(event) if want(&event) => return Ok(event),
                Ok(_) => {}
                Err(e) => return Err(describe(&e)),
            }
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| Err(format!("nothing within {timeout:?}")))
}

fn describe(e: &ConnectionError) -> String {
    format!("{e} ({e:?})")
}

/// Publishes one QoS 1 message from a new clean-session client on `addr` and
/// waits for its PUBACK (then disconnects). One attempt: NATS refuses or
/// closes the connection while JetStream has no leader for its MQTT streams.
pub async fn mqtt_publish_acked(
    addr: SocketAddr,
    topic: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let id = format!("pub-{}", uuid::Uuid::new_v4().simple());
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let (client, mut eventloop) = nats_mqtt_client(addr, &id, true);
    mqtt_poll_until(&mut eventloop, left(), |e| matches!(e, Event::Incoming(Packet::ConnAck(_))))
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()).await.map_err(|e| e.to_string())?;
    mqtt_poll_until(&mut eventloop, left(), |e| matches!(e, Event::Incoming(Packet::PubAck(_))))
        .await
        .map_err(|e| format!("publishing on {addr}: {e}"))?;
    let _ = client.try_disconnect();
    let _ = mqtt_poll_until(&mut eventloop, Duration::from_millis(200), |e| {
        matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect))
    })
    .await;
    Ok(())
}

/// One QoS 1 message from a new client on `from` to a new subscriber on `to`.
async fn mqtt_roundtrip(from: SocketAddr, to: SocketAddr, timeout: Duration) -> Result<(), String> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("probe/{id}");
    let payload = id.clone().into_bytes();
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());

    let (sub, mut sub_loop) = nats_mqtt_client(to, &format!("probe-sub-{id}"), true);
    mqtt_poll_until(&mut sub_loop, left(), |e| matches!(e, Event::Incoming(Packet::ConnAck(_))))
        .await
        .map_err(|e| format!("subscriber connecting to {to}: {e}"))?;
    sub.subscribe(&topic, QoS::AtLeastOnce).await.map_err(|e| e.to_string())?;
    let suback = mqtt_poll_until(&mut sub_loop, left(), |e| matches!(e, Event::Incoming(Packet::SubAck(_))))
        .await
        .map_err(|e| format!("subscribing on {to}: {e}"))?;
    if let Event::Incoming(Packet::SubAck(ack)) = &suback {
        if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
            return Err(format!("subscription refused on {to}"));
        }
    }

    let (publisher, mut pub_loop) = nats_mqtt_client(from, &format!("probe-pub-{id}"), true);
    mqtt_poll_until(&mut pub_loop, left(), |e| matches!(e, Event::Incoming(Packet::ConnAck(_))))
        .await
        .map_err(|e| format!("publisher connecting to {from}: {e}"))?;
    publisher.publish(&topic, QoS::AtLeastOnce, false, payload.clone()).await.map_err(|e| e.to_string())?;
    mqtt_poll_until(&mut pub_loop, left(), |e| matches!(e, Event::Incoming(Packet::PubAck(_))))
        .await
        .map_err(|e| format!("publishing on {from}: {e}"))?;
    mqtt_poll_until(&mut sub_loop, left(), |e| {
        matches!(e, Event::Incoming(Packet::Publish(p)) if p.topic == topic && p.payload[..] == payload[..])
    })
    .await
    .map_err(|e| format!("receiving on {to}: {e}"))?;
    let _ = publisher.try_disconnect();
    let _ = sub.try_disconnect();
    // Let both DISCONNECTs out, so the broker drops the sessions cleanly.
    let _ = mqtt_poll_until(&mut pub_loop, Duration::from_millis(200), |e| {
        matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect))
    })
    .await;
    let _ = mqtt_poll_until(&mut sub_loop, Duration::from_millis(200), |e| {
        matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect))
    })
    .await;
    Ok(())
}
