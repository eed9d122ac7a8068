//! The only place with SQL. One code path for SQLite (embedded default) and
//! MySQL/MariaDB (production) through sqlx's Any driver; the schemas differ per
//! backend (`migrations/<backend>`), the statements do not.
//!
//! Every status change is a compare-and-set (`UPDATE … WHERE id = ? AND
//! status = ?` on the status just read) inside the transaction that also
//! appends its `command_events` row, so the log always says exactly which move
//! happened, and a late or duplicate report can never move a command backwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use uuid::Uuid;

use crate::command::{now_ms, Command, Payload, Status};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static MYSQL_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/mysql");

/// How many times a compare-and-set is retried when another writer moved the row first.
const CAS_RETRIES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the statement; nothing was changed.
    #[error("store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("unsupported database URL {0:?}: use sqlite:PATH or mysql://USER@HOST:PORT/DB")]
    BadUrl(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("row is malformed: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: String,
    pub enabled: bool,
    pub labels: Value,
    pub online: bool,
    pub receiver_id: Option<String>,
    pub seen_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A command about to be stored.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub id: Uuid,
    pub device_id: String,
    pub name: String,
    pub payload: Payload,
    pub max_attempts: i64,
    /// `Pending`; `Scheduled` with `scheduled_at` in the future; or `Sent`:
    /// the first attempt is claimed with the insert (device online, publish next).
    pub status: Status,
    /// The event detail of that first attempt.
    pub first_attempt_detail: Option<String>,
    pub created_at: i64,
    pub scheduled_at: Option<i64>,
    pub expires_at: i64,
    /// When the sweeper first looks at it: the scheduled time, or a grace
    /// period after which an unpublished command is published by the sweeper.
    pub next_attempt_at: i64,
    pub idempotency_key: Option<String>,
    /// Digest of everything the caller asked for, to tell a retry from a different request.
    pub request_hash: String,
    /// MQTT callers: where and under which correlation id the final answer goes.
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// What `insert_command` did.
#[derive(Debug)]
pub enum Inserted {
    Created(Command),
    /// The idempotency key was seen before with the same request.
    Existing(Command),
    /// The idempotency key was seen before with a different request.
    KeyConflict(Command),
}

/// One row of a command's transition log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: i64,
    pub from: Option<String>,
    pub to: String,
    pub attempt: i64,
    pub detail: Option<String>,
}

/// Fields a transition sets besides the status.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub delivered: bool,
    pub result: Option<(i64, Vec<u8>, Option<String>)>,
    pub error: Option<(String, String)>,
    pub bump_attempts: bool,
    pub next_attempt_at: Option<i64>,
    pub detail: Option<String>,
}

/// What `transition` did.
#[derive(Debug)]
pub enum Moved {
    /// The command moved from `from`; `command` is its new state.
    Yes {
        from: Status,
        command: Command,
    },
    /// The move is not legal from where the command stands (e.g. already final).
    Refused(Command),
    NotFound,
}

/// Filter for `list_commands`.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub device_id: Option<String>,
    pub status: Option<Status>,
    /// Return commands older than this id (the previous page's cursor).
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Statements sent to the database (BEGIN and COMMIT included), for
    /// `/metrics` and the benchmark's statements-per-command figure.
    statements: Arc<AtomicU64>,
}

const DEVICE_SELECT: &str = "SELECT d.id, d.enabled, d.labels, d.created_at, d.updated_at, \
    p.online, p.receiver_id, p.seen_at FROM devices d LEFT JOIN device_presence p ON p.device_id = d.id";

const COMMAND_COLUMNS: &str = "id, device_id, name, payload, payload_json, status, attempts, \
    max_attempts, created_at, scheduled_at, expires_at, next_attempt_at, updated_at, delivered_at, completed_at, \
    result_code, result_payload, result_message, error_kind, error_message, idempotency_key, \
    request_hash, reply_to, correlation_id";

impl Store {
    /// Connects, creating a SQLite file if needed, and runs the migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalise_url(url)?;
        // No ping before every acquire (sqlx's default): it cost a round trip per
        // statement batch, 13 % of the gateway's CPU at one caller. A dead
        // connection fails its statement instead, and every caller already
        // retries or answers 503 on a store error.
        let mut options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(3))
            .test_before_acquire(false)
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::MySql => 16,
            });
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers run beside the one writer; FULL makes every
                    // commit durable before the caller hears "accepted".
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::MySql => MYSQL_MIGRATIONS.run(&pool).await?,
        }
        Ok(Store { pool, backend, statements: Arc::default() })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Statements sent so far by this process.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    fn query<'q>(&self, sql: &'q str) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        self.statements.fetch_add(1, Ordering::Relaxed);
        sqlx::query(sql)
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        // BEGIN now, COMMIT later.
        self.statements.fetch_add(2, Ordering::Relaxed);
        Ok(self.pool.begin().await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- devices ----

    /// Creates or updates a device; `true` when it was created.
    pub async fn upsert_device(&self, id: &str, enabled: bool, labels: &Value) -> Result<(Device, bool)> {
        let now = now_ms();
        let labels_text = labels.to_string();
        let updated = self
            .query("UPDATE devices SET enabled = ?, labels = ?, updated_at = ? WHERE id = ?")
            .bind(i64::from(enabled))
            .bind(&labels_text)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        let mut created = false;
        if updated.rows_affected() == 0 {
            let inserted = self.query(
                "INSERT INTO devices (id, enabled, labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(i64::from(enabled))
            .bind(&labels_text)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await;
            match inserted {
                Ok(_) => created = true,
                // Created concurrently by another request: ours becomes an update.
                Err(e) if is_unique_violation(&e) => {
                    return Box::pin(self.upsert_device(id, enabled, labels)).await
                }
                Err(e) => return Err(e.into()),
            }
        }
        let device = self
            .get_device(id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("device {id} vanished after upsert")))?;
        Ok((device, created))
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<Device>> {
        let sql = format!("{DEVICE_SELECT} WHERE d.id = ?");
        let row = self.query(&sql).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// These devices, those that exist, by id (one query per 200).
    pub async fn get_devices(&self, ids: &[&str]) -> Result<HashMap<String, Device>> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(200) {
            let sql = format!("{DEVICE_SELECT} WHERE d.id IN ({})", vec!["?"; chunk.len()].join(", "));
            let mut q = self.query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&self.pool).await? {
                let device = device_from_row(&row)?;
                found.insert(device.id.clone(), device);
            }
        }
        Ok(found)
    }

    /// Devices in id order, after `after` (the previous page's last id).
    pub async fn list_devices(&self, after: Option<&str>, limit: i64) -> Result<Vec<Device>> {
        let sql = format!("{DEVICE_SELECT} WHERE d.id > ? ORDER BY d.id LIMIT ?");
        let rows = self.query(&sql).bind(after.unwrap_or("")).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(device_from_row).collect()
    }

    /// Records that a receiver gained or lost a device (registered or not yet).
    /// An offline report from a receiver the device has since left is ignored.
    pub async fn set_presence(&self, device_id: &str, receiver_id: &str, online: bool) -> Result<bool> {
        let now = now_ms();
        let done = if online {
            self.query(
                "UPDATE device_presence SET online = 1, receiver_id = ?, seen_at = ? WHERE device_id = ?",
            )
            .bind(receiver_id)
            .bind(now)
            .bind(device_id)
            .execute(&self.pool)
            .await?
        } else {
            self.query(
                "UPDATE device_presence SET online = 0, seen_at = ? WHERE device_id = ? AND receiver_id = ?",
            )
            .bind(now)
            .bind(device_id)
            .bind(receiver_id)
            .execute(&self.pool)
            .await?
        };
        if done.rows_affected() > 0 || !online {
            return Ok(done.rows_affected() > 0);
        }
        let inserted = self
            .query(
                "INSERT INTO device_presence (device_id, online, receiver_id, seen_at) VALUES (?, 1, ?, ?)",
            )
            .bind(device_id)
            .bind(receiver_id)
            .bind(now)
            .execute(&self.pool)
            .await;
        match inserted {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => {
                Box::pin(self.set_presence(device_id, receiver_id, online)).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Marks every device of a receiver offline (the receiver went away).
    pub async fn receiver_gone(&self, receiver_id: &str) -> Result<u64> {
        let done = self
            .query("UPDATE device_presence SET online = 0, seen_at = ? WHERE receiver_id = ? AND online = 1")
            .bind(now_ms())
            .bind(receiver_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Marks offline every device reported online by a receiver not in
    /// `alive`; returns how many.
    pub async fn receivers_gone_except(&self, alive: &[String]) -> Result<u64> {
        let mut sql = "UPDATE device_presence SET online = 0, seen_at = ? WHERE online = 1".to_owned();
        if !alive.is_empty() {
            sql += &format!(" AND receiver_id NOT IN ({})", vec!["?"; alive.len()].join(", "));
        }
        let mut q = self.query(&sql).bind(now_ms());
        for r in alive {
            q = q.bind(r.clone());
        }
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    // ---- commands ----

    /// Stores a new command with its first event(s), in one transaction. With
    /// `new.status == Sent` the first attempt is claimed in the same
    /// transaction (two events: `→ pending`, `pending → sent`); the caller
    /// publishes after the commit.
    pub async fn insert_command(&self, new: &NewCommand) -> Result<Inserted> {
        let mut tx = self.begin().await?;
        match self.insert_rows(&mut tx, std::slice::from_ref(new)).await {
            Ok(()) => {}
            Err(StoreError::Unavailable(e)) if is_unique_violation(&e) && new.idempotency_key.is_some() => {
                drop(tx);
                return self.existing_for_key(new).await;
            }
            Err(e) => return Err(e),
        }
        tx.commit().await?;
        Ok(Inserted::Created(new.to_command()))
    }

    /// Group commit: stores many new commands in one transaction (multi-row
    /// inserts). If any of them collides on an idempotency key, the batch is
    /// rolled back and each is stored on its own, so the outcome per command is
    /// exactly `insert_command`'s.
    pub async fn insert_commands(&self, news: &[NewCommand]) -> Result<Vec<Inserted>> {
        if news.len() == 1 {
            return Ok(vec![self.insert_command(&news[0]).await?]);
        }
        let mut tx = self.begin().await?;
        match self.insert_rows(&mut tx, news).await {
            Ok(()) => {
                tx.commit().await?;
                Ok(news.iter().map(|n| Inserted::Created(n.to_command())).collect())
            }
            Err(StoreError::Unavailable(e)) if is_unique_violation(&e) => {
                drop(tx);
                let mut done = Vec::with_capacity(news.len());
                for new in news {
                    done.push(self.insert_command(new).await?);
                }
                Ok(done)
            }
            Err(e) => Err(e),
        }
    }

    async fn insert_rows(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        news: &[NewCommand],
    ) -> Result<()> {
        for chunk in news.chunks(100) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO commands (id, device_id, name, payload, payload_json, status, attempts, \
                 max_attempts, created_at, scheduled_at, expires_at, updated_at, next_attempt_at, \
                 idempotency_key, request_hash, reply_to, correlation_id) VALUES {rows}"
            );
            let mut q = self.query(&sql);
            for new in chunk {
                q = q
                    .bind(new.id.to_string())
                    .bind(new.device_id.clone())
                    .bind(new.name.clone())
                    .bind(new.payload.bytes.clone())
                    .bind(i64::from(new.payload.is_json))
                    .bind(new.status.as_str())
                    .bind(new.first_attempts())
                    .bind(new.max_attempts)
                    .bind(new.created_at)
                    .bind(new.scheduled_at)
                    .bind(new.expires_at)
                    .bind(new.created_at)
                    .bind(new.next_attempt_at)
                    .bind(new.idempotency_key.clone())
                    .bind(new.request_hash.clone())
                    .bind(new.reply_to.clone())
                    .bind(new.correlation_id.clone());
            }
            q.execute(&mut **tx).await?;
        }
        let events: Vec<NewEvent> = news.iter().flat_map(NewCommand::first_events).collect();
        self.insert_events(tx, &events).await
    }

    async fn existing_for_key(&self, new: &NewCommand) -> Result<Inserted> {
        let sql =
            format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = ? AND idempotency_key = ?");
        let row = self
            .query(&sql)
            .bind(&new.device_id)
            .bind(new.idempotency_key.clone())
            .fetch_one(&self.pool)
            .await?;
        let same = row.try_get::<Option<String>, _>("request_hash")?.as_deref() == Some(&new.request_hash);
        let command = command_from_row(&row)?;
        Ok(if same { Inserted::Existing(command) } else { Inserted::KeyConflict(command) })
    }

    pub async fn get_command(&self, id: Uuid) -> Result<Option<Command>> {
        let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?");
        let row = self.query(&sql).bind(id.to_string()).fetch_optional(&self.pool).await?;
        row.as_ref().map(command_from_row).transpose()
    }

    /// Several commands at once (missing ids are simply absent).
    pub async fn get_commands(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Command>> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id IN ({marks})");
            let mut q = self.query(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.pool).await? {
                let c = command_from_row(&row)?;
                found.insert(c.id, c);
            }
        }
        Ok(found)
    }

    /// Newest first.
    pub async fn list_commands(&self, filter: &CommandFilter) -> Result<Vec<Command>> {
        let mut sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE 1 = 1");
        if filter.device_id.is_some() {
            sql.push_str(" AND device_id = ?");
        }
        if filter.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if filter.before.is_some() {
            sql.push_str(" AND id < ?");
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        let mut q = self.query(&sql);
        if let Some(d) = &filter.device_id {
            q = q.bind(d.clone());
        }
        if let Some(s) = filter.status {
            q = q.bind(s.as_str());
        }
        if let Some(b) = filter.before {
            q = q.bind(b.to_string());
        }
        let rows = q.bind(filter.limit).fetch_all(&self.pool).await?;
        rows.iter().map(command_from_row).collect()
    }

    pub async fn events(&self, id: Uuid) -> Result<Vec<Event>> {
        let rows = self.query(
            "SELECT at, from_status, to_status, attempt, detail FROM command_events WHERE command_id = ? ORDER BY id",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Event {
                    at: r.try_get("at")?,
                    from: r.try_get("from_status")?,
                    to: r.try_get("to_status")?,
                    attempt: r.try_get("attempt")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Logs an event that changes nothing, with the status and attempt the
    /// command has at that moment — read in the same statement, so a move
    /// committed meanwhile (a re-send) cannot end up before a note about it in
    /// the log. False if there is no such command.
    pub async fn note_as_it_stands(&self, id: Uuid, detail: &str) -> Result<bool> {
        let done = self
            .query(
                "INSERT INTO command_events (command_id, at, from_status, to_status, attempt, detail) \
                 SELECT id, ?, status, status, attempts, ? FROM commands WHERE id = ?",
            )
            .bind(now_ms())
            .bind(truncate(detail, 1000))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims up to `limit` commands that are due (`next_attempt_at <= now`) by
    /// pushing their `next_attempt_at` to `lease_until`, so that another
    /// gateway's sweeper skips them while this one works on them. Returns their
    /// ids in acceptance order. A claim is only a lease: what the sweeper then
    /// does to each command is a compare-and-set of its own, so two sweepers
    /// holding one row (a lease expired, or an engine that ignores SKIP LOCKED)
    /// still cannot both take the same attempt.
    pub async fn claim_due(&self, now: i64, limit: i64, lease_until: i64) -> Result<Vec<Uuid>> {
        let ids: Vec<String> = match self.backend {
            Backend::Sqlite => {
                let rows = self.query(
                    "UPDATE commands SET next_attempt_at = ? WHERE id IN \
                     (SELECT id FROM commands WHERE next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?) \
                     RETURNING id",
                )
                .bind(lease_until)
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?
            }
            Backend::MySql => {
                let mut tx = self.begin().await?;
                let rows = self.query(
                    "SELECT id FROM commands WHERE next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ? \
                     FOR UPDATE SKIP LOCKED",
                )
                .bind(now)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                let ids: Vec<String> = rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
                if !ids.is_empty() {
                    let marks = vec!["?"; ids.len()].join(", ");
                    let sql = format!("UPDATE commands SET next_attempt_at = ? WHERE id IN ({marks})");
                    let mut q = self.query(&sql).bind(lease_until);
                    for id in &ids {
                        q = q.bind(id.clone());
                    }
                    q.execute(&mut *tx).await?;
                }
                tx.commit().await?;
                ids
            }
        };
        let mut ids: Vec<Uuid> = ids.iter().filter_map(|id| id.parse().ok()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Moves the sweeper's next look at a command to `until` without another
    /// change, if it still stands as `current` (e.g. its device is offline).
    pub async fn postpone(&self, current: &Command, until: i64) -> Result<bool> {
        let done = self
            .query("UPDATE commands SET next_attempt_at = ? WHERE id = ? AND status = ? AND attempts = ?")
            .bind(until.min(current.expires_at))
            .bind(current.id.to_string())
            .bind(current.status.as_str())
            .bind(current.attempts)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A device came online: its commands waiting for it, or published while
    /// it was away, are due now.
    pub async fn wake_device(&self, device_id: &str, now: i64) -> Result<u64> {
        let done = self.query(
            "UPDATE commands SET next_attempt_at = ? WHERE device_id = ? AND status IN ('pending', 'sent') \
             AND next_attempt_at > ?",
        )
        .bind(now)
        .bind(device_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Which of these devices a receiver reports connected now, and which receiver.
    pub async fn online_devices(&self, device_ids: &[String]) -> Result<HashMap<String, String>> {
        let mut online = HashMap::new();
        for chunk in device_ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT device_id, receiver_id FROM device_presence WHERE online = 1 AND device_id IN ({marks})"
            );
            let mut q = self.query(&sql);
            for id in chunk {
                q = q.bind(id.clone());
            }
            for row in q.fetch_all(&self.pool).await? {
                online
                    .insert(row.try_get::<String, _>("device_id")?, row.try_get::<String, _>("receiver_id")?);
            }
        }
        Ok(online)
    }

    /// Moves a command to `to` if that is legal from where it stands, applying
    /// `change` and logging the move, atomically. See the module docs.
    pub async fn transition(&self, id: Uuid, to: Status, change: &Change) -> Result<Moved> {
        for _ in 0..CAS_RETRIES {
            let Some(current) = self.get_command(id).await? else {
                return Ok(Moved::NotFound);
            };
            if !current.status.can_move_to(to) {
                return Ok(Moved::Refused(current));
            }
            let next = apply(&current, to, change, now_ms());
            if self.compare_and_set(&current, &next, change).await? {
                return Ok(Moved::Yes { from: current.status, command: next });
            }
        }
        Err(StoreError::Corrupt(format!("command {id} kept changing under {CAS_RETRIES} attempts")))
    }

    async fn compare_and_set(&self, current: &Command, next: &Command, change: &Change) -> Result<bool> {
        let mut tx = self.begin().await?;
        if !self.update_if_unchanged(&mut tx, current, next).await? {
            return Ok(false);
        }
        self.insert_events(&mut tx, &NewEvent::of_move(current, next, change)).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Applies many moves in one transaction (one commit, one multi-row event
    /// insert): the batch form of `transition`, with the same rules. Moves are
    /// applied in order, a later move of the same command seeing the earlier
    /// one, and each command is written once, from the state read to the last
    /// one reached (a fast device's `delivered` and result cost one UPDATE).
    /// Rows are written in id order, so two batches never wait on each other's
    /// locks in a cycle. A command whose compare-and-set lost to another
    /// writer has its moves retried one by one after the commit.
    pub async fn transition_many(&self, moves: &[(Uuid, Status, Change)]) -> Result<Vec<Moved>> {
        let ids: Vec<Uuid> = moves.iter().map(|(id, _, _)| *id).collect();
        let read = self.get_commands(&ids).await?;
        self.transition_many_from(&read, moves).await
    }

    /// `transition_many` from commands the caller has just read (the base of
    /// every compare-and-set; one that has moved since is retried on its own).
    pub async fn transition_many_from(
        &self,
        read: &HashMap<Uuid, Command>,
        moves: &[(Uuid, Status, Change)],
    ) -> Result<Vec<Moved>> {
        let mut current = read.clone();
        let mut outcomes = Vec::with_capacity(moves.len());
        let mut events = Vec::new();
        for (id, to, change) in moves {
            let Some(cur) = current.get(id) else {
                outcomes.push(Moved::NotFound);
                continue;
            };
            if !cur.status.can_move_to(*to) {
                outcomes.push(Moved::Refused(cur.clone()));
                continue;
            }
            let next = apply(cur, *to, change, now_ms());
            events.extend(NewEvent::of_move(cur, &next, change));
            outcomes.push(Moved::Yes { from: cur.status, command: next.clone() });
            current.insert(*id, next);
        }
        let mut changed: Vec<Uuid> =
            moves.iter().map(|(id, _, _)| *id).filter(|id| current.get(id) != read.get(id)).collect();
        changed.sort_unstable();
        changed.dedup();
        let mut lost = std::collections::HashSet::new();
        let pairs: Vec<(&Command, &Command)> = changed.iter().map(|id| (&read[id], &current[id])).collect();
        let mut tx = self.begin().await?;
        if !self.update_all_if_unchanged(&mut tx, &pairs).await? {
            // Some row moved under us: start over row by row to learn which.
            tx.rollback().await?;
            tx = self.begin().await?;
            for (before, after) in &pairs {
                if !self.update_if_unchanged(&mut tx, before, after).await? {
                    lost.insert(before.id);
                }
            }
        }
        events.retain(|e| !lost.contains(&e.id));
        self.insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        let mut done = Vec::with_capacity(moves.len());
        for ((id, to, change), outcome) in moves.iter().zip(outcomes) {
            done.push(if lost.contains(id) { self.transition(*id, *to, change).await? } else { outcome });
        }
        Ok(done)
    }

    /// The compare-and-set for many commands at once, with one UPDATE per
    /// chunk of up to 128 rows: true if every row still had its read status and
    /// attempts and so was written; false if any had moved (then the caller
    /// must roll back: the other rows of the chunk were written).
    async fn update_all_if_unchanged(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        pairs: &[(&Command, &Command)],
    ) -> Result<bool> {
        for chunk in pairs.chunks(128) {
            if let [(before, after)] = chunk {
                if !self.update_if_unchanged(tx, before, after).await? {
                    return Ok(false);
                }
                continue;
            }
            // Padded to a power of two with copies of the first row (a repeated
            // WHEN never wins, a repeated IN item matches once), so that few
            // statement shapes exist and the prepared-statement cache keeps them.
            let size = chunk.len().next_power_of_two();
            let rows: Vec<&(&Command, &Command)> =
                chunk.iter().chain(std::iter::repeat(&chunk[0])).take(size).collect();
            let whens = vec!["WHEN ? THEN ?"; size].join(" ");
            let sets: Vec<String> =
                MOVED_COLUMNS.iter().map(|(name, _)| format!("{name} = CASE id {whens} END")).collect();
            let marks = vec!["?"; size].join(", ");
            let checks = vec!["WHEN ? THEN status = ? AND attempts = ?"; size].join(" ");
            let sql = format!(
                "UPDATE commands SET {} WHERE id IN ({marks}) AND CASE id {checks} ELSE 0 END",
                sets.join(", ")
            );
            let mut q = self.query(&sql);
            for (_, value) in &MOVED_COLUMNS {
                for (before, after) in &rows {
                    q = value(after).bind_to(q.bind(before.id.to_string()));
                }
            }
            for (before, _) in &rows {
                q = q.bind(before.id.to_string());
            }
            for (before, _) in &rows {
                q = q.bind(before.id.to_string()).bind(before.status.as_str()).bind(before.attempts);
            }
            if q.execute(&mut **tx).await?.rows_affected() != chunk.len() as u64 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The compare-and-set itself: writes `next` if the row still has `current`'s status and attempts.
    async fn update_if_unchanged(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        current: &Command,
        next: &Command,
    ) -> Result<bool> {
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            let sets: Vec<String> = MOVED_COLUMNS.iter().map(|(name, _)| format!("{name} = ?")).collect();
            format!("UPDATE commands SET {} WHERE id = ? AND status = ? AND attempts = ?", sets.join(", "))
        });
        let mut q = self.query(&SQL);
        for (_, value) in &MOVED_COLUMNS {
            q = value(next).bind_to(q);
        }
        let done = q
            .bind(current.id.to_string())
            .bind(current.status.as_str())
            .bind(current.attempts)
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Appends events with one multi-row INSERT.
    async fn insert_events(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        events: &[NewEvent],
    ) -> Result<()> {
        for chunk in events.chunks(200) {
            let rows = vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO command_events (command_id, at, from_status, to_status, attempt, detail) VALUES {rows}"
            );
            let mut q = self.query(&sql);
            for e in chunk {
                q = q
                    .bind(e.id.to_string())
                    .bind(e.at)
                    .bind(e.from.map(Status::as_str))
                    .bind(e.to.as_str())
                    .bind(e.attempt)
                    .bind(e.detail.as_deref().map(|d| truncate(d, 1000)));
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// The columns a move may change, and how to read each from a command: the
/// one list both compare-and-set forms (`update_if_unchanged`,
/// `update_all_if_unchanged`) write.
type MovedColumn = (&'static str, fn(&Command) -> Bound);
const MOVED_COLUMNS: [MovedColumn; 11] = [
    ("status", |c| Bound::Text(Some(c.status.as_str().to_owned()))),
    ("attempts", |c| Bound::Int(Some(c.attempts))),
    ("updated_at", |c| Bound::Int(Some(c.updated_at))),
    ("delivered_at", |c| Bound::Int(c.delivered_at)),
    ("completed_at", |c| Bound::Int(c.completed_at)),
    ("result_code", |c| Bound::Int(c.result_code)),
    ("result_payload", |c| Bound::Bytes(c.result_payload.clone())),
    ("result_message", |c| Bound::Text(c.result_message.clone())),
    ("error_kind", |c| Bound::Text(c.error_kind.clone())),
    ("error_message", |c| Bound::Text(c.error_message.clone())),
    ("next_attempt_at", |c| Bound::Int(c.next_attempt_at)),
];

/// A value to bind whose type is only known at run time.
enum Bound {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Bound {
    fn bind_to<'q>(
        self,
        q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        match self {
            Bound::Int(v) => q.bind(v),
            Bound::Text(v) => q.bind(v),
            Bound::Bytes(v) => q.bind(v),
        }
    }
}

/// A `command_events` row to write.
#[derive(Debug, Clone)]
struct NewEvent {
    id: Uuid,
    at: i64,
    from: Option<Status>,
    to: Status,
    attempt: i64,
    detail: Option<String>,
}

impl NewEvent {
    /// The events of one move: one, or two when a result reaches a `sent`
    /// command whose `delivered` report never came on its own (a receiver
    /// folds it into a quick result): the result proves the delivery.
    fn of_move(current: &Command, next: &Command, change: &Change) -> Vec<NewEvent> {
        let event = |from: Status, to: Status, detail: Option<String>| NewEvent {
            id: current.id,
            at: next.updated_at,
            from: Some(from),
            to,
            attempt: next.attempts,
            detail,
        };
        if current.status == Status::Sent && change.result.is_some() && next.status.is_final() {
            vec![
                event(Status::Sent, Status::Delivered, Some("implied by the result".to_owned())),
                event(Status::Delivered, next.status, change.detail.clone()),
            ]
        } else {
            vec![event(current.status, next.status, change.detail.clone())]
        }
    }
}

impl NewCommand {
    /// 1 when the first attempt is claimed with the insert.
    fn first_attempts(&self) -> i64 {
        i64::from(self.status == Status::Sent)
    }

    /// Its first event, or two when the first attempt is claimed with the insert.
    fn first_events(&self) -> Vec<NewEvent> {
        let (id, at) = (self.id, self.created_at);
        if self.status == Status::Sent {
            let detail = self.first_attempt_detail.clone();
            vec![
                NewEvent { id, at, from: None, to: Status::Pending, attempt: 0, detail: None },
                NewEvent { id, at, from: Some(Status::Pending), to: Status::Sent, attempt: 1, detail },
            ]
        } else {
            vec![NewEvent { id, at, from: None, to: self.status, attempt: 0, detail: None }]
        }
    }

    /// The command as stored by `insert_command`.
    fn to_command(&self) -> Command {
        let attempts = self.first_attempts();
        Command {
            id: self.id,
            device_id: self.device_id.clone(),
            name: self.name.clone(),
            payload: self.payload.clone(),
            status: self.status,
            attempts,
            max_attempts: self.max_attempts,
            created_at: self.created_at,
            updated_at: self.created_at,
            scheduled_at: self.scheduled_at,
            expires_at: self.expires_at,
            next_attempt_at: Some(self.next_attempt_at),
            delivered_at: None,
            completed_at: None,
            result_code: None,
            result_payload: None,
            result_message: None,
            error_kind: None,
            error_message: None,
            idempotency_key: self.idempotency_key.clone(),
            reply_to: self.reply_to.clone().map(|t| (t, self.correlation_id.clone().unwrap_or_default())),
        }
    }
}

/// The command as it will be after the move.
fn apply(current: &Command, to: Status, change: &Change, now: i64) -> Command {
    let mut next = current.clone();
    next.status = to;
    next.updated_at = now;
    if change.bump_attempts {
        next.attempts += 1;
    }
    if change.delivered && next.delivered_at.is_none() {
        next.delivered_at = Some(now);
    }
    if let Some((code, payload, message)) = &change.result {
        next.result_code = Some(*code);
        next.result_payload = Some(payload.clone());
        next.result_message = message.clone();
    }
    if let Some((kind, message)) = &change.error {
        next.error_kind = Some(kind.clone());
        next.error_message = Some(message.clone());
    }
    if to.is_final() {
        next.completed_at = Some(now);
        next.next_attempt_at = None;
    } else {
        // Never later than the deadline, so the sweeper sees every expiry in time.
        let due = change.next_attempt_at.or(current.next_attempt_at).unwrap_or(now);
        next.next_attempt_at = Some(due.min(current.expires_at));
    }
    next
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Hex SHA-256 of the parts of a request that make it "the same request".
pub fn request_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn normalise_url(url: &str) -> Result<(Backend, String)> {
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return Ok((Backend::MySql, url.replacen("mariadb://", "mysql://", 1)));
    }
    let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) else {
        return Err(StoreError::BadUrl(url.to_owned()));
    };
    let url = if path.contains("mode=") {
        format!("sqlite://{path}")
    } else if path.contains('?') {
        format!("sqlite://{path}&mode=rwc")
    } else {
        format!("sqlite://{path}?mode=rwc")
    };
    Ok((Backend::Sqlite, url))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

fn device_from_row(row: &AnyRow) -> Result<Device> {
    let labels: String = row.try_get("labels")?;
    Ok(Device {
        id: row.try_get("id")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        online: row.try_get::<Option<i64>, _>("online")?.unwrap_or(0) != 0,
        receiver_id: row.try_get("receiver_id")?,
        seen_at: row.try_get("seen_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn command_from_row(row: &AnyRow) -> Result<Command> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    Ok(Command {
        id: id.parse().map_err(|_| StoreError::Corrupt(format!("bad command id {id:?}")))?,
        device_id: row.try_get("device_id")?,
        name: row.try_get("name")?,
        payload: Payload {
            bytes: row.try_get("payload")?,
            is_json: row.try_get::<i64, _>("payload_json")? != 0,
        },
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("bad status {status:?}")))?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        scheduled_at: row.try_get("scheduled_at")?,
        expires_at: row.try_get("expires_at")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        delivered_at: row.try_get("delivered_at")?,
        completed_at: row.try_get("completed_at")?,
        result_code: row.try_get("result_code")?,
        result_payload: row.try_get("result_payload")?,
        result_message: row.try_get("result_message")?,
        error_kind: row.try_get("error_kind")?,
        error_message: row.try_get("error_message")?,
        idempotency_key: row.try_get("idempotency_key")?,
        reply_to: match row.try_get::<Option<String>, _>("reply_to")? {
            Some(topic) => {
                Some((topic, row.try_get::<Option<String>, _>("correlation_id")?.unwrap_or_default()))
            }
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            normalise_url("sqlite:gw.db").unwrap(),
            (Backend::Sqlite, "sqlite://gw.db?mode=rwc".into())
        );
        assert_eq!(normalise_url("mariadb://root@h/db").unwrap().0, Backend::MySql);
        assert!(normalise_url("postgres://x").is_err());
    }

    fn new_command(device_id: &str) -> NewCommand {
        let now = now_ms();
        NewCommand {
            id: Uuid::now_v7(),
            device_id: device_id.into(),
            name: "noop".into(),
            payload: Payload::json(&serde_json::json!({})),
            max_attempts: 5,
            status: Status::Pending,
            first_attempt_detail: None,
            created_at: now,
            scheduled_at: None,
            expires_at: now + 60_000,
            next_attempt_at: now + 60_000,
            idempotency_key: None,
            request_hash: String::new(),
            reply_to: None,
            correlation_id: None,
        }
    }

    /// The multi-row compare-and-set writes every row, or reports that one had
    /// moved (and the caller's rollback leaves every row as it was).
    #[tokio::test]
    async fn many_rows_in_one_compare_and_set() {
        let path = std::env::temp_dir().join(format!("gw-store-test-{}.db", Uuid::now_v7()));
        let store = Store::connect(&format!("sqlite:{}", path.display())).await.unwrap();
        store.upsert_device("d", true, &serde_json::json!({})).await.unwrap();
        let news: Vec<NewCommand> = (0..5).map(|_| new_command("d")).collect();
        store.insert_commands(&news).await.unwrap();
        let ids: Vec<Uuid> = news.iter().map(|n| n.id).collect();
        let sent =
            Change { bump_attempts: true, next_attempt_at: Some(now_ms() + 5_000), ..Change::default() };

        let read = store.get_commands(&ids).await.unwrap();
        let next: HashMap<Uuid, Command> =
            read.iter().map(|(id, c)| (*id, apply(c, Status::Sent, &sent, now_ms()))).collect();
        let pairs: Vec<(&Command, &Command)> = ids.iter().map(|id| (&read[id], &next[id])).collect();
        let mut tx = store.begin().await.unwrap();
        assert!(store.update_all_if_unchanged(&mut tx, &pairs).await.unwrap());
        tx.commit().await.unwrap();
        let now = store.get_commands(&ids).await.unwrap();
        for id in &ids {
            assert_eq!(now[id], next[id], "every row written, each with its own values");
        }

        // One command moves behind the batch's back: the batch must not overwrite it.
        let read = now;
        let canceled = Change { error: Some(("canceled".into(), "test".into())), ..Change::default() };
        assert!(matches!(
            store.transition(ids[3], Status::Canceled, &canceled).await.unwrap(),
            Moved::Yes { .. }
        ));
        let delivered = Change { delivered: true, ..Change::default() };
        let next: HashMap<Uuid, Command> =
            read.iter().map(|(id, c)| (*id, apply(c, Status::Delivered, &delivered, now_ms()))).collect();
        let pairs: Vec<(&Command, &Command)> = ids.iter().map(|id| (&read[id], &next[id])).collect();
        let mut tx = store.begin().await.unwrap();
        assert!(!store.update_all_if_unchanged(&mut tx, &pairs).await.unwrap());
        tx.rollback().await.unwrap();
        let after = store.get_commands(&ids).await.unwrap();
        assert_eq!(after[&ids[3]].status, Status::Canceled);
        assert!(ids.iter().filter(|id| **id != ids[3]).all(|id| after[id] == read[id]));

        // The batch form finds out which one lost and applies the rest.
        let moves: Vec<_> = ids.iter().map(|id| (*id, Status::Delivered, delivered.clone())).collect();
        let outcomes = store.transition_many(&moves).await.unwrap();
        let yes = outcomes.iter().filter(|o| matches!(o, Moved::Yes { .. })).count();
        assert_eq!(yes, 4);
        assert!(matches!(&outcomes[3], Moved::Refused(c) if c.status == Status::Canceled));
        store.close().await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    #[test]
    fn request_hash_separates_parts() {
        assert_ne!(request_hash(&[b"ab", b"c"]), request_hash(&[b"a", b"bc"]));
    }
}
