//! New commands (one at a time or group-committed), reading commands back,
//! and their event log.

use std::collections::HashMap;

use protocol::DeviceId;
use sha2::{Digest, Sha256};
use sqlx::Row;
use uuid::Uuid;

use super::rows::{command_from_row, truncate, COMMAND_COLUMNS};
use super::{marks, retry_transient, Result, Store, StoreError, Tx};
use crate::command::machine::accepted_events;
use crate::command::{now_ms, Command, EventRecord, NewCommand, Status};

/// Longest event detail kept, in bytes.
const DETAIL_MAX: usize = 1000;

/// What storing a new command did.
#[derive(Debug)]
pub enum Inserted {
    Created(Command),
    /// The idempotency key was seen before with the same request.
    Existing(Command),
    /// The idempotency key was seen before with a different request.
    KeyConflict(Command),
    /// Another gateway instance took this MQTT submission (its key) first:
    /// nothing was stored here, and it answers the caller.
    TakenElsewhere,
}

/// One row of a command's event log, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub from: Option<String>,
    pub to: String,
    pub attempt: i64,
    pub detail: Option<String>,
    /// How many times this event happened in a row (a note repeated with
    /// nothing in between is counted here, not written again); 1 for most.
    pub repeats: i64,
    /// When it last happened, if `repeats` > 1 (ms since the Unix epoch).
    pub last_at: Option<i64>,
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

impl Store {
    /// Stores a new command with its first event(s), in one transaction. With
    /// `new.status == Sent` the first attempt is claimed in the same
    /// transaction (two events: `→ pending`, `pending → sent`); the caller
    /// publishes after the commit.
    ///
    /// An MQTT submission's key is taken in the same transaction: if another
    /// instance took it, nothing is stored (`TakenElsewhere`).
    pub async fn insert_command(&self, new: &NewCommand) -> Result<Inserted> {
        let mut tx = self.begin().await?;
        if let Some(key) = &new.submission_key {
            match self.insert_submission_keys(&mut tx, &[key], new.created_at).await {
                Err(StoreError::Duplicate(_)) => {
                    drop(tx);
                    return Ok(self.own_earlier_commit(new).await?.unwrap_or(Inserted::TakenElsewhere));
                }
                done => done?,
            }
        }
        match self.insert_command_rows(&mut tx, std::slice::from_ref(new)).await {
            Ok(()) => {}
            Err(StoreError::Duplicate(_)) => {
                drop(tx);
                if let Some(ours) = self.own_earlier_commit(new).await? {
                    return Ok(ours);
                }
                if new.idempotency_key.is_none() {
                    return Err(StoreError::Duplicate(format!("command {} exists", new.id)));
                }
                if let Some(key) = &new.submission_key {
                    if !self.claim_submission(key, new.created_at).await? {
                        return Ok(Inserted::TakenElsewhere);
                    }
                }
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
        let inserted = retry_transient(|| self.insert_commands_once(news)).await?;
        self.recent.remember(inserted.iter().filter_map(|i| match i {
            Inserted::Created(c) => Some(c),
            _ => None,
        }));
        Ok(inserted)
    }

    async fn insert_commands_once(&self, news: &[NewCommand]) -> Result<Vec<Inserted>> {
        if let [one] = news {
            return Ok(vec![self.insert_command(one).await?]);
        }
        let mut tx = self.begin().await?;
        match self.insert_rows(&mut tx, news).await {
            Ok(()) => {
                tx.commit().await?;
                Ok(news.iter().map(|n| Inserted::Created(n.to_command())).collect())
            }
            Err(StoreError::Duplicate(_)) => {
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

    /// The rows of new commands: MQTT submission keys, commands, first events.
    async fn insert_rows(&self, tx: &mut Tx, news: &[NewCommand]) -> Result<()> {
        let keys: Vec<&String> = news.iter().filter_map(|n| n.submission_key.as_ref()).collect();
        if let Some(first) = news.first().filter(|_| !keys.is_empty()) {
            self.insert_submission_keys(tx, &keys, first.created_at).await?;
        }
        self.insert_command_rows(tx, news).await
    }

    async fn insert_submission_keys(&self, tx: &mut Tx, keys: &[&String], at: i64) -> Result<()> {
        for chunk in keys.chunks(200) {
            let rows = vec!["(?, ?)"; chunk.len()].join(", ");
            let sql = format!("INSERT INTO mqtt_submissions (submission_key, created_at) VALUES {rows}");
            let mut q = self.query(&sql);
            for key in chunk {
                q = q.bind(key.as_str()).bind(at);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn insert_command_rows(&self, tx: &mut Tx, news: &[NewCommand]) -> Result<()> {
        for chunk in news.chunks(100) {
            let rows = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO commands (id, device_id, name, payload, payload_json, status, attempts, \
                 max_attempts, created_at, scheduled_at, expires_at, updated_at, next_attempt_at, \
                 idempotency_key, request_hash, reply_to, correlation_id, sent_to) VALUES {rows}"
            );
            let mut q = self.query(&sql);
            for new in chunk {
                q = q
                    .bind(new.id.to_string())
                    .bind(new.device_id.as_str().to_owned())
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
                    .bind(new.reply_to.as_ref().map(|r| r.topic.clone()))
                    .bind(new.reply_to.as_ref().map(|r| r.correlation_id.clone()))
                    .bind(new.sent_to.clone().filter(|_| new.status == Status::Sent));
            }
            q.execute(&mut **tx).await?;
        }
        let events: Vec<EventRecord> = news.iter().flat_map(accepted_events).collect();
        self.insert_events(tx, &events).await
    }

    /// A command with `new`'s id exists already: this very insert committed
    /// on an earlier try whose answer was lost (a connection that broke at
    /// COMMIT, a Galera abort reported after the commit). Ids are fresh
    /// random UUIDs, so nobody else wrote it.
    async fn own_earlier_commit(&self, new: &NewCommand) -> Result<Option<Inserted>> {
        Ok(self.get_command(new.id).await?.map(Inserted::Created))
    }

    async fn existing_for_key(&self, new: &NewCommand) -> Result<Inserted> {
        let sql =
            format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = ? AND idempotency_key = ?");
        let row = self
            .query(&sql)
            .bind(new.device_id.as_str())
            .bind(new.idempotency_key.clone())
            .fetch_one(&self.pool)
            .await?;
        let same = row.try_get::<Option<String>, _>("request_hash")?.as_deref() == Some(&new.request_hash);
        let command = command_from_row(&row)?;
        Ok(if same { Inserted::Existing(command) } else { Inserted::KeyConflict(command) })
    }

    /// Whether a command with this idempotency key exists for the device
    /// (a repeat of it is answered from it, never refused by the cap).
    pub async fn has_idempotency_key(&self, device_id: &DeviceId, key: &str) -> Result<bool> {
        retry_transient(|| self.has_idempotency_key_once(device_id, key)).await
    }

    async fn has_idempotency_key_once(&self, device_id: &DeviceId, key: &str) -> Result<bool> {
        let row = self
            .query("SELECT 1 AS one FROM commands WHERE device_id = ? AND idempotency_key = ?")
            .bind(device_id.as_str().to_owned())
            .bind(key.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
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
            let sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE id IN ({})", marks(chunk.len()));
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

    /// A command's event log, oldest first.
    pub async fn events(&self, id: Uuid) -> Result<Vec<Event>> {
        let rows = self
            .query(
                "SELECT at, from_status, to_status, attempt, detail, repeats, last_at FROM command_events \
                 WHERE command_id = ? ORDER BY id",
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
                    repeats: r.try_get("repeats")?,
                    last_at: r.try_get("last_at")?,
                })
            })
            .collect()
    }

    /// Logs an event that changes nothing, with the status and attempt the
    /// command has at that moment — read in the same statement, so a move
    /// committed meanwhile (a re-send) cannot end up before a note about it in
    /// the log. `times`: how many identical notes this one stands for (≥ 1),
    /// added to `repeats`. False if there is no such command.
    pub async fn note_as_it_stands(&self, id: Uuid, detail: &str, times: i64) -> Result<bool> {
        let (detail, now) = (truncate(detail, DETAIL_MAX), now_ms());
        // The same note as the latest event: counted there, not written again
        // (a receiver repeating itself 100,000 times is one row). Two instances
        // noting at once may each write a row: harmless.
        let latest = self
            .query("SELECT id, detail FROM command_events WHERE command_id = ? ORDER BY id DESC LIMIT 1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = latest {
            if row.try_get::<Option<String>, _>("detail")?.as_deref() == Some(detail.as_str()) {
                let event: i64 = row.try_get("id")?;
                self.query("UPDATE command_events SET repeats = repeats + ?, last_at = ? WHERE id = ?")
                    .bind(times)
                    .bind(now)
                    .bind(event)
                    .execute(&self.pool)
                    .await?;
                return Ok(true);
            }
        }
        let last_at = (times > 1).then_some(now);
        let done = self
            .query(
                "INSERT INTO command_events (command_id, at, from_status, to_status, attempt, detail, repeats, last_at) \
                 SELECT id, ?, status, status, attempts, ?, ?, ? FROM commands WHERE id = ?",
            )
            .bind(now)
            .bind(detail)
            .bind(times)
            .bind(last_at)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Appends events with one multi-row INSERT per 200.
    pub(super) async fn insert_events(&self, tx: &mut Tx, events: &[EventRecord]) -> Result<()> {
        for chunk in events.chunks(200) {
            let rows = vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO command_events (command_id, at, from_status, to_status, attempt, detail) VALUES {rows}"
            );
            let mut q = self.query(&sql);
            for e in chunk {
                q = q
                    .bind(e.command_id.to_string())
                    .bind(e.at)
                    .bind(e.from.map(Status::as_str))
                    .bind(e.to.as_str())
                    .bind(e.attempt)
                    .bind(e.detail.as_deref().map(|d| truncate(d, DETAIL_MAX)));
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

/// Hex SHA-256 of the parts of a request that make it "the same request"
/// (each part length-prefixed, so parts cannot run into each other).
pub fn request_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_hash_separates_parts() {
        assert_ne!(request_hash(&[b"ab", b"c"]), request_hash(&[b"a", b"bc"]));
    }
}
