//! Database statements per command, from MySQL/MariaDB's global status
//! counters read before and after a phase. Global: anything else using the
//! server meanwhile counts too. SQLite has no such counters.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{Connection, MySqlConnection, Row};

/// Counters read, in the order they are shown. `Questions` is every statement
/// a client sent; `Com_*` count statements of one kind.
const COUNTERS: [&str; 7] =
    ["Questions", "Com_commit", "Com_begin", "Com_insert", "Com_update", "Com_select", "Com_delete"];

/// A connection to the gateway's MySQL/MariaDB server, or nothing for SQLite.
#[derive(Debug)]
pub(crate) struct DbCounters {
    conn: Option<MySqlConnection>,
}

/// One reading of the counters.
pub(crate) type Snapshot = BTreeMap<String, u64>;

impl DbCounters {
    pub(crate) async fn connect(database_url: &str) -> anyhow::Result<DbCounters> {
        if !database_url.starts_with("mysql:") && !database_url.starts_with("mariadb:") {
            return Ok(DbCounters { conn: None });
        }
        let url = database_url.replacen("mariadb:", "mysql:", 1);
        Ok(DbCounters { conn: Some(MySqlConnection::connect(&url).await?) })
    }

    /// `None` for SQLite.
    pub(crate) async fn snapshot(&mut self) -> anyhow::Result<Option<Snapshot>> {
        let Some(conn) = self.conn.as_mut() else { return Ok(None) };
        let list = COUNTERS.map(|c| format!("'{c}'")).join(",");
        let rows = sqlx::query(&format!("SHOW GLOBAL STATUS WHERE Variable_name IN ({list})"))
            .fetch_all(conn)
            .await?;
        let mut snapshot = Snapshot::new();
        for row in rows {
            let name = text(&row, 0)?;
            let value = text(&row, 1)?.parse().unwrap_or(0);
            snapshot.insert(name, value);
        }
        Ok(Some(snapshot))
    }
}

/// For a MySQL/MariaDB URL: creates its database if the server does not have
/// it yet (saying so), so `--database-url mysql://…/bench_x` works without a
/// `CREATE DATABASE` first. Anything else is left alone.
pub(crate) async fn create_database_if_missing(database_url: &str) -> anyhow::Result<()> {
    let url = database_url.replacen("mariadb:", "mysql:", 1);
    let Some((server, name)) = split_database(&url) else { return Ok(()) };
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        anyhow::bail!("database name {name:?}: use letters, digits and _ only");
    }
    let mut conn = MySqlConnection::connect(&server).await?;
    let exists = sqlx::query("SELECT 1 FROM information_schema.schemata WHERE schema_name = ?")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await?
        .is_some();
    if !exists {
        sqlx::query(&format!("CREATE DATABASE `{name}`")).execute(&mut conn).await?;
        eprintln!("created database {name} (drop it when done: DROP DATABASE {name})");
    }
    conn.close().await?;
    Ok(())
}

/// `mysql://user@host:port/db?opts` → (`mysql://user@host:port?opts`, `db`);
/// `None` for other URLs or when no database is named.
fn split_database(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("mysql://")?;
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, name) = before_query.split_once('/')?;
    if name.is_empty() {
        return None;
    }
    let server = match query {
        Some(q) => format!("mysql://{authority}?{q}"),
        None => format!("mysql://{authority}"),
    };
    Some((server, name.to_owned()))
}

/// SHOW STATUS columns are text on MySQL and may come back as bytes on MariaDB.
fn text(row: &sqlx::mysql::MySqlRow, i: usize) -> anyhow::Result<String> {
    match row.try_get::<String, _>(i) {
        Ok(s) => Ok(s),
        Err(_) => Ok(String::from_utf8_lossy(&row.try_get::<Vec<u8>, _>(i)?).into_owned()),
    }
}

/// Per-command deltas of each counter between two readings.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PerCommand(pub(crate) BTreeMap<String, f64>);

impl PerCommand {
    pub(crate) fn between(before: &Snapshot, after: &Snapshot, commands: usize) -> PerCommand {
        let per = COUNTERS
            .iter()
            .filter_map(|c| {
                let delta = after.get(*c)?.saturating_sub(*before.get(*c)?);
                Some((c.to_string(), delta as f64 / commands.max(1) as f64))
            })
            .collect();
        PerCommand(per)
    }

    /// `Questions 12.0, Com_commit 4.0, …` in [`COUNTERS`] order.
    pub(crate) fn render(&self) -> String {
        COUNTERS
            .iter()
            .filter_map(|c| self.0.get(*c).map(|v| format!("{} {v:.1}", c.trim_start_matches("Com_"))))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_comes_off_the_url() {
        let split = split_database;
        assert_eq!(
            split("mysql://root@127.0.0.1:3306/bench_a"),
            Some(("mysql://root@127.0.0.1:3306".into(), "bench_a".into()))
        );
        assert_eq!(
            split("mysql://u:p@h/db?ssl-mode=disabled"),
            Some(("mysql://u:p@h?ssl-mode=disabled".into(), "db".into()))
        );
        assert_eq!(split("mysql://root@127.0.0.1:3306/"), None);
        assert_eq!(split("sqlite:/tmp/x.db"), None);
    }

    #[test]
    fn deltas_per_command() {
        let before = Snapshot::from([("Questions".into(), 100), ("Com_commit".into(), 10)]);
        let after = Snapshot::from([("Questions".into(), 300), ("Com_commit".into(), 50)]);
        let per = PerCommand::between(&before, &after, 20);
        assert_eq!(per.0["Questions"], 10.0);
        assert_eq!(per.render(), "Questions 10.0, commit 2.0");
    }
}
