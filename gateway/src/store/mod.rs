//! The only place with SQL. One code path for SQLite (embedded default) and
//! MySQL/MariaDB (production) through sqlx's Any driver; the schemas differ per
//! backend (`migrations/<backend>`), the statements do not.
//!
//! - [`devices`]: the registry and device presence.
//! - [`commands`]: new commands, reads, the event log.
//! - [`transitions`]: status changes, each a compare-and-set (`UPDATE … WHERE
//!   id = ? AND status = ? AND attempts = ?` on the state just read) in the
//!   transaction that also appends its `command_events` rows, so the log says
//!   exactly which move happened and a late or duplicate report can never move
//!   a command backwards. What a move writes is decided by `command::machine`.
//! - [`claims`]: the sweeper's leases on due commands.
//! - [`instances`]: gateway instances sharing the database, and the MQTT
//!   submissions one of them has taken.
//! - [`rows`]: mapping between rows and domain types.
//! - [`api_keys`]: HTTP API keys (hashed) and their scopes.
//! - [`device_keys`]: which key generations of each device are valid.
//! - [`summary`]: commands per status per time bucket, devices online (the console).

pub mod api_keys;
pub mod claims;
pub mod commands;
pub mod device_keys;
pub mod devices;
pub mod instances;
mod recent;
pub mod retention;
mod rows;
mod summary;
pub mod transitions;

use std::time::Duration;

use plumbing::backoff::Backoff;
use plumbing::metrics::Counter;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Executor};

pub use api_keys::{ApiKey, Revoked};
pub use commands::{request_hash, CommandFilter, Event, Inserted};
pub use devices::{Device, PresenceOutcome, Upserted};
pub use summary::{Summary, Window};
pub use transitions::Moved;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static MYSQL_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/mysql");

/// Why a store call failed. Nothing was changed by a failed call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the statement.
    #[error("store unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A unique key (device id, idempotency key, presence row) already exists.
    #[error("duplicate key: {0}")]
    Duplicate(String),
    /// A row kept changing under every compare-and-set attempt, or the
    /// database aborted the transaction for a conflict (MySQL/MariaDB 1213
    /// deadlock, which Galera also returns when certification fails at
    /// COMMIT; 1205 lock wait timeout; 3101 Group Replication rollback).
    /// Nothing was written; the whole transaction may be tried again.
    #[error("contention: {0}")]
    Contention(String),
    /// A row does not map to the domain (bad id, status, JSON).
    #[error("row is malformed: {0}")]
    Corrupt(String),
    #[error("unsupported database URL {0:?}: use sqlite:PATH or mysql://USER@HOST:PORT/DB")]
    BadUrl(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e.as_database_error() {
            Some(d) if d.is_unique_violation() => StoreError::Duplicate(d.message().to_owned()),
            Some(d) if is_conflict(d) => StoreError::Contention(d.message().to_owned()),
            _ => StoreError::Unavailable(e),
        }
    }
}

/// A transaction the server aborted for a conflict with another one: worth
/// retrying as a whole (see `StoreError::Contention`).
fn is_conflict(e: &dyn sqlx::error::DatabaseError) -> bool {
    let number = e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|m| m.number());
    matches!(number, Some(1213 | 1205 | 3101)) || e.code().as_deref() == Some("40001")
}

/// Runs `attempt` again (up to `CONFLICT_RETRIES` times, with a short
/// jittered back-off) while it fails with `Contention`, or (for up to
/// `RECONNECT_PATIENCE`) with a broken connection: a transaction the
/// server aborted for a conflict, or a database node that died under a
/// pooled connection, never reaches a caller as an error unless it keeps
/// failing. Every unit retried so is safe to run again: a compare-and-set,
/// a claim, or an insert that recognises its own earlier commit.
pub(crate) async fn retry_transient<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(500));
    let mut tries = 0;
    let reconnect_until = std::time::Instant::now() + RECONNECT_PATIENCE;
    loop {
        match attempt().await {
            Err(StoreError::Contention(why)) if tries < CONFLICT_RETRIES => {
                tries += 1;
                tracing::debug!(%why, tries, "transaction aborted for a conflict; trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            // A pooled connection that broke (its database node died, HAProxy
            // moved on): the pool drops it, the next try takes another.
            Err(StoreError::Unavailable(sqlx::Error::Io(why)))
                if std::time::Instant::now() < reconnect_until =>
            {
                tries += 1;
                tracing::debug!(%why, tries, "database connection broken; trying again on another");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            done => return done,
        }
    }
}

/// How many times a transaction aborted for a conflict is tried again.
const CONFLICT_RETRIES: usize = 10;
/// How long a unit of work whose connection broke keeps being tried on new
/// ones: a database node failing over behind HAProxy takes seconds (Galera
/// holds commits 3–5 s while it drops a dead node).
const RECONNECT_PATIENCE: Duration = Duration::from_secs(10);

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
}

impl Backend {
    /// The backend a database URL names (`sqlite:…`, `mysql://…`, `mariadb://…`).
    pub fn of_url(url: &str) -> Result<Backend> {
        normalise_url(url).map(|(backend, _)| backend)
    }

    /// Connections in the pool.
    pub fn pool_size(self) -> u32 {
        match self {
            Backend::Sqlite => 4,
            Backend::MySql => 16,
        }
    }

    /// File descriptors the pool may hold: one socket per MySQL connection;
    /// per SQLite connection the database, its WAL and its shared-memory
    /// index.
    pub fn pool_descriptors(self) -> usize {
        let per_connection = match self {
            Backend::Sqlite => 3,
            Backend::MySql => 1,
        };
        self.pool_size() as usize * per_connection
    }
}

/// A transaction of the store's pool.
type Tx = sqlx::Transaction<'static, sqlx::Any>;
/// A statement with its arguments bound so far.
type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Statements sent to the database (BEGIN and COMMIT included), for
    /// `/metrics` and the benchmark's statements-per-command figure.
    statements: Counter,
    /// This process's instance nonce, once claimed: the owner of the final
    /// replies it commits (`pending_replies.owner`).
    reply_owner: std::sync::Arc<std::sync::OnceLock<String>>,
    /// The commands this process wrote last (the report applier's base).
    recent: std::sync::Arc<recent::Recent>,
    /// Whether the sweeper may claim by row locks (`FOR UPDATE SKIP
    /// LOCKED`): MySQL/MariaDB, but not a Galera node, whose locks are
    /// node-local (see `Store::claim_due_batch`).
    claims_by_lock: bool,
}

impl Store {
    /// Names this process (its instance nonce) as the owner of the final
    /// replies it will commit from now on.
    pub fn set_reply_owner(&self, nonce: &str) {
        let _ = self.reply_owner.set(nonce.to_owned());
    }

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
            .max_connections(backend.pool_size());
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
        let pool = options.connect(&url).await.map_err(StoreError::Unavailable)?;
        migrate(&pool, backend).await?;
        let claims_by_lock = backend == Backend::MySql && !is_galera_node(&pool).await;
        if claims_by_lock {
            tracing::info!("the sweeper claims due commands by row locks");
        } else if backend == Backend::MySql {
            tracing::info!(
                "the sweeper claims due commands with a lease: this is a Galera node, whose row locks hold on their own node only"
            );
        }
        Ok(Store {
            pool,
            backend,
            statements: Counter::default(),
            reply_owner: Default::default(),
            recent: Default::default(),
            claims_by_lock,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Statements sent so far by this process (a counter to register in `/metrics`).
    pub fn statements(&self) -> &Counter {
        &self.statements
    }

    fn query<'q>(&self, sql: &'q str) -> Query<'q> {
        self.statements.inc();
        sqlx::query(sql)
    }

    async fn begin(&self) -> Result<Tx> {
        // BEGIN now, COMMIT later.
        self.statements.inc_by(2);
        Ok(self.pool.begin().await?)
    }

    /// Runs an INSERT: false, and nothing written, if a row with its unique
    /// key exists already.
    async fn insert_new(&self, insert: Query<'_>) -> Result<bool> {
        match insert.execute(&self.pool).await.map_err(StoreError::from) {
            Ok(_) => Ok(true),
            Err(StoreError::Duplicate(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// For `/readyz`: whether the database answers and has every migration
    /// this binary carries applied (`Ok(false)`: it answers, but an older
    /// schema). Errors: the database cannot be reached (as any statement).
    pub async fn migrations_applied(&self) -> Result<bool> {
        let row = self
            .query("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
            .fetch_one(&self.pool)
            .await?;
        let latest: Option<i64> = sqlx::Row::try_get(&row, 0)?;
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::MySql => &MYSQL_MIGRATIONS,
        };
        let needed = migrator.iter().map(|m| m.version).max();
        Ok(latest >= needed)
    }
}

/// Whether the MySQL/MariaDB server is a Galera node (`@@global.wsrep_on`;
/// MySQL, which has no such variable, is not). On Galera a row lock holds
/// on its own node only, and an idle transaction holding one may be rolled
/// back by a write certified on another node: the sweeper then claims with
/// a lease instead (docs/ARCHITECTURE.md, "Several gateways").
async fn is_galera_node(pool: &AnyPool) -> bool {
    match sqlx::query_scalar::<_, i64>("SELECT CAST(@@global.wsrep_on AS SIGNED)").fetch_one(pool).await {
        Ok(on) => on == 1,
        Err(e) => {
            tracing::debug!(error = %e, "no wsrep_on: not a Galera node");
            false
        }
    }
}

/// Runs the migrations, safe when several instances start at once on an
/// empty database. On MySQL/MariaDB they hold a named lock meanwhile (sqlx
/// 0.8 takes `GET_LOCK(name, -1)`, which MariaDB answers with NULL — no lock —
/// and sqlx does not check: two instances then collided on the migrations
/// table). Where such a lock is node-local (Galera with instances on
/// different nodes) a run that loses a race fails; it is tried again, and
/// then finds the migrations applied.
async fn migrate(pool: &AnyPool, backend: Backend) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let deadline = std::time::Instant::now() + MIGRATION_PATIENCE;
    loop {
        let done = match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(pool).await.map_err(StoreError::from),
            Backend::MySql => migrate_mysql_locked(pool).await,
        };
        match done {
            Err(e) if std::time::Instant::now() < deadline && lost_a_race(&e) => {
                tracing::warn!(error = %e, "migrations did not run (another instance is migrating?); trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            done => return done,
        }
    }
}

/// Errors of a migration run that another instance's run can cause.
fn lost_a_race(e: &StoreError) -> bool {
    use sqlx::migrate::MigrateError::{Dirty, Execute, ExecuteMigration};
    matches!(
        e,
        StoreError::Contention(_)
            | StoreError::Duplicate(_)
            | StoreError::Migrate(Execute(_) | ExecuteMigration(..) | Dirty(_))
    )
}

/// How long `migrate` keeps trying while another instance migrates.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(60);

async fn migrate_mysql_locked(pool: &AnyPool) -> Result<()> {
    const LOCK: &str = "CONCAT('iot-gateway-migrations:', DATABASE())";
    let mut conn = pool.acquire().await?;
    let got: Option<i64> =
        sqlx::query_scalar(&format!("SELECT GET_LOCK({LOCK}, 30)")).fetch_one(&mut *conn).await?;
    if got != Some(1) {
        return Err(StoreError::Contention("the migration lock is held by another instance".into()));
    }
    let done = MYSQL_MIGRATIONS.run_direct(&mut *conn).await;
    let _ = sqlx::query(&format!("SELECT RELEASE_LOCK({LOCK})")).execute(&mut *conn).await;
    Ok(done?)
}

/// `?, ?, …` with `n` marks.
fn marks(n: usize) -> String {
    vec!["?"; n].join(", ")
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
}
