//! The store floor: the least durable work an async command needs, written
//! straight to the gateway's own MySQL/MariaDB database and schema with
//! ideal batching, and how fast the database does it — the limit no gateway
//! design on this store can beat, measured in the same run as the pipeline.
//!
//! Per command, as the gateway records it (gateway/src/store/commands.rs,
//! gateway/src/command/machine.rs `accepted_events`): one transaction
//! inserts a batch of commands already `sent` with their two first events
//! (`pending`, `pending → sent`); a second transaction moves the batch to
//! `succeeded` with each command's own result (one `UPDATE … CASE`) and
//! writes one event per command. Two commits per batch, as the writer's group
//! commit and the batched report transitions do at best. Nothing the gateway
//! also needs (idempotency checks, the per-device cap's count, claims,
//! `delivered`) is in it: that is what makes it a floor.
//!
//! The rows belong to the bench's own devices and are deleted afterwards;
//! their `next_attempt_at` is an hour ahead so a running sweeper never
//! touches them.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{MySqlPool, QueryBuilder};

use crate::procs::usage_of;
use crate::Shape;

/// One floor run from a number of connections.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FloorRun {
    pub(crate) connections: usize,
    pub(crate) commands: usize,
    pub(crate) batch: usize,
    pub(crate) elapsed_s: f64,
    pub(crate) commands_per_s: f64,
    /// The database server's CPU per command, in µs (`None` when its
    /// process is not on this machine).
    pub(crate) server_cpu_us_per_command: Option<f64>,
}

/// The floor from one and from two connections.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Floor {
    pub(crate) one: FloorRun,
    pub(crate) two: FloorRun,
}

/// Runs the floor from 1 then 2 connections, `shape.commands` commands
/// each, in batches of `shape.concurrency` (the most the gateway can batch
/// with that many callers). `None` for a database other than MySQL/MariaDB.
pub(crate) async fn run(database_url: &str, shape: &Shape) -> anyhow::Result<Option<Floor>> {
    if !database_url.starts_with("mysql:") && !database_url.starts_with("mariadb:") {
        return Ok(None);
    }
    let url = database_url.replacen("mariadb:", "mysql:", 1);
    let pool = MySqlPoolOptions::new().max_connections(2).connect(&url).await.context("connecting")?;
    let devices: Vec<String> = (0..shape.devices.min(100)).map(Shape::device_name).collect();
    let server = local_server_pid(&url);
    let one = one_run(&pool, &devices, shape, 1, server.as_deref()).await?;
    let two = one_run(&pool, &devices, shape, 2, server.as_deref()).await?;
    pool.close().await;
    Ok(Some(Floor { one, two }))
}

async fn one_run(
    pool: &MySqlPool,
    devices: &[String],
    shape: &Shape,
    connections: usize,
    server: Option<&str>,
) -> anyhow::Result<FloorRun> {
    let batch = shape.concurrency.max(1);
    let ids: Vec<String> = (0..shape.commands).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let cpu_before = server.map(|pid| usage_of(pid).cpu_s);
    let started = Instant::now();
    let per_connection = ids.len().div_ceil(connections);
    let workers = ids.chunks(per_connection).map(|mine| async move {
        for (n, chunk) in mine.chunks(batch).enumerate() {
            let device_of = |i: usize| devices[(n * batch + i) % devices.len()].as_str();
            retried(|| insert_sent(pool, chunk, device_of)).await?;
            retried(|| finish(pool, chunk)).await?;
        }
        anyhow::Ok(())
    });
    futures::future::try_join_all(workers).await.context("writing the floor's commands")?;
    let elapsed = started.elapsed();
    let cpu = cpu_before.zip(server).map(|(before, pid)| usage_of(pid).cpu_s - before);
    forget(pool, &ids).await.context("deleting the floor's commands")?;
    Ok(FloorRun {
        connections,
        commands: ids.len(),
        batch,
        elapsed_s: elapsed.as_secs_f64(),
        commands_per_s: ids.len() as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        server_cpu_us_per_command: cpu.map(|s| s * 1e6 / ids.len() as f64),
    })
}

/// Runs a transaction again when the database rolled it back for a deadlock
/// or a lock wait timeout (InnoDB picks a victim when two connections'
/// inserts meet in an index; the gateway's store retries the same way), at
/// most 10 times. The retries count in the floor's time.
async fn retried<F, Fut>(mut transaction: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match transaction().await {
            Err(sqlx::Error::Database(e)) if tries < 10 && is_conflict(&*e) => tries += 1,
            other => return Ok(other?),
        }
    }
}

/// Deadlock (1213), lock wait timeout (1205), or SQLSTATE 40001.
fn is_conflict(e: &dyn sqlx::error::DatabaseError) -> bool {
    let number = e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number());
    matches!(number, Some(1213 | 1205)) || e.code().as_deref() == Some("40001")
}

fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

/// One transaction: the commands, `sent` on their first attempt, and their
/// `pending` and `pending → sent` events.
async fn insert_sent<'a>(
    pool: &MySqlPool,
    ids: &[String],
    device_of: impl Fn(usize) -> &'a str,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let later = now + Duration::from_secs(3600).as_millis() as i64;
    let mut tx = pool.begin().await?;
    let mut q = QueryBuilder::new(
        "INSERT INTO commands (id, device_id, name, payload, payload_json, status, attempts, \
         max_attempts, created_at, expires_at, updated_at, next_attempt_at, sent_to) ",
    );
    q.push_values(ids.iter().enumerate(), |mut row, (i, id)| {
        row.push_bind(id)
            .push_bind(device_of(i))
            .push_bind("floor")
            .push_bind(&br#"{"bench":"store floor"}"#[..])
            .push_bind(1_i64)
            .push_bind("sent")
            .push_bind(1_i64)
            .push_bind(5_i64)
            .push_bind(now)
            .push_bind(later)
            .push_bind(now)
            .push_bind(later)
            .push_bind("bench-floor");
    });
    q.build().execute(&mut *tx).await?;
    let mut q =
        QueryBuilder::new("INSERT INTO command_events (command_id, at, from_status, to_status, attempt) ");
    let events = ids.iter().flat_map(|id| [(id, None, "pending", 0_i64), (id, Some("pending"), "sent", 1)]);
    q.push_values(events, |mut row, (id, from, to, attempt)| {
        row.push_bind(id).push_bind(now).push_bind(from).push_bind(to).push_bind(attempt);
    });
    q.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// One transaction: every command of the batch `succeeded` with its own
/// result (one `UPDATE … CASE id`), and one event each.
async fn finish(pool: &MySqlPool, ids: &[String]) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let mut tx = pool.begin().await?;
    let mut q =
        QueryBuilder::new("UPDATE commands SET status = 'succeeded', result_code = 0, completed_at = ");
    q.push_bind(now)
        .push(", updated_at = ")
        .push_bind(now)
        .push(", next_attempt_at = NULL, result_payload = CASE id");
    for (i, id) in ids.iter().enumerate() {
        q.push(" WHEN ").push_bind(id).push(" THEN ").push_bind(format!("{{\"n\":{i}}}").into_bytes());
    }
    q.push(" END WHERE id IN (");
    let mut list = q.separated(", ");
    for id in ids {
        list.push_bind(id);
    }
    q.push(") AND status = 'sent'");
    let updated = q.build().execute(&mut *tx).await?.rows_affected();
    if updated != ids.len() as u64 {
        return Err(sqlx::Error::Protocol(format!("finished {updated} of {} floor commands", ids.len())));
    }
    let mut q =
        QueryBuilder::new("INSERT INTO command_events (command_id, at, from_status, to_status, attempt) ");
    q.push_values(ids, |mut row, id| {
        row.push_bind(id).push_bind(now).push_bind("sent").push_bind("succeeded").push_bind(1_i64);
    });
    q.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Deletes the floor's rows (not timed).
async fn forget(pool: &MySqlPool, ids: &[String]) -> anyhow::Result<()> {
    for chunk in ids.chunks(500) {
        for table in ["command_events WHERE command_id", "commands WHERE id"] {
            let mut q = QueryBuilder::new(format!("DELETE FROM {table} IN ("));
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id);
            }
            q.push(")");
            q.build().execute(pool).await?;
        }
    }
    Ok(())
}

/// The pid of the process listening on the URL's port, when the URL names
/// this machine (its CPU is read from /proc): the listening socket's inode
/// from /proc/net/tcp{,6}, then the process holding it.
pub(crate) fn local_server_pid(url: &str) -> Option<String> {
    let authority = url.strip_prefix("mysql://")?.split(['/', '?']).next()?.rsplit('@').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => (h, p.parse().ok()?),
        _ => (authority, 3306_u16),
    };
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return None;
    }
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            // sl local_address rem_address st … inode (field 9)
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9).map(|s| s.to_string()))?
        })
    })?;
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid = entry.ok()?.file_name().into_string().ok()?;
        pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .any(|target| target.to_string_lossy() == wanted);
        holds.then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_the_process_listening_on_the_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id().to_string();
        assert_eq!(local_server_pid(&format!("mysql://root@127.0.0.1:{port}/x")), Some(me));
        assert_eq!(local_server_pid(&format!("mysql://root@db.example:{port}/x")), None);
        drop(listener);
        assert_eq!(local_server_pid(&format!("mysql://root@127.0.0.1:{port}/x")), None);
    }
}
