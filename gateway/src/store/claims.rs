//! The sweeper's side of the store: claiming due commands (row locks, or a
//! lease), settling a claimed batch, putting a command off, and waking a
//! device's commands when it comes back.

use std::collections::HashMap;

use protocol::DeviceId;
use sqlx::Row;
use uuid::Uuid;

use super::rows::{command_from_row, COMMAND_COLUMNS};
use super::{marks, retry_transient, Backend, Moved, Result, Store, Tx};
use crate::command::{Command, Move};

/// A batch of due commands, claimed by [`Store::claim_due_batch`] and settled
/// by [`Store::apply_due`].
#[derive(Debug)]
pub struct DueBatch {
    /// Their ids, in acceptance order.
    pub ids: Vec<Uuid>,
    /// Each as it stands (the base of its compare-and-set).
    pub commands: HashMap<Uuid, Command>,
    /// MySQL/MariaDB: the transaction holding the batch's rows locked.
    locked: Option<Tx>,
}

impl Store {
    /// The sweeper's claim: up to `limit` due commands with their rows. On
    /// MySQL/MariaDB they are claimed by row locks (`SELECT … FOR UPDATE SKIP
    /// LOCKED`, so another gateway's sweeper skips them) held in a transaction
    /// that [`Store::apply_due`] commits with the batch's moves: one locking
    /// read, no lease written into every row. The caller must call
    /// `apply_due` (or drop the batch, rolling back) before it writes to
    /// these rows in any other way, which would wait on the locks. SQLite
    /// (one writer at a time, no row locks) and a Galera node (row locks
    /// only on their own node, so two gateways on two nodes both got the
    /// same rows, and a claim held while the sweeper decided was rolled back
    /// under it by the other node's certified write) claim with a lease
    /// ([`Store::claim_due`]) and read the rows.
    pub async fn claim_due_batch(&self, now: i64, limit: i64, lease_until: i64) -> Result<DueBatch> {
        if self.claims_by_lock {
            return retry_transient(|| self.lock_due_once(now, limit)).await;
        }
        let ids = self.claim_due(now, limit, lease_until).await?;
        let commands = self.get_commands(&ids).await?;
        Ok(DueBatch { ids, commands, locked: None })
    }

    async fn lock_due_once(&self, now: i64, limit: i64) -> Result<DueBatch> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE next_attempt_at <= ? \
             ORDER BY next_attempt_at, id LIMIT ? FOR UPDATE SKIP LOCKED"
        );
        let rows = self.query(&sql).bind(now).bind(limit).fetch_all(&mut *tx).await?;
        let mut commands = HashMap::with_capacity(rows.len());
        for row in &rows {
            let c = command_from_row(row)?;
            commands.insert(c.id, c);
        }
        let mut ids: Vec<Uuid> = commands.keys().copied().collect();
        // UUIDv7: id order is acceptance order.
        ids.sort_unstable();
        Ok(DueBatch { ids, commands, locked: Some(tx) })
    }

    /// Which of `device_ids` are online, and at which receiver, read on the
    /// batch's own connection while it holds its rows (MySQL/MariaDB), so
    /// that the sweeper never waits for a second pooled connection with rows
    /// locked.
    pub async fn online_devices_for(
        &self,
        batch: &mut DueBatch,
        device_ids: &[&DeviceId],
    ) -> Result<HashMap<DeviceId, String>> {
        match batch.locked.as_mut() {
            Some(tx) => self.online_devices_on(tx, device_ids).await,
            None => self.online_devices(device_ids).await,
        }
    }

    /// Commits a claimed batch: `put_off` (commands to look at again later,
    /// each `(as claimed, until)`, see `postpone_on`) and the moves,
    /// with [`Store::transition_many`]'s rules (each a compare-and-set from the
    /// row as claimed), in one transaction — the claim's own on MySQL/MariaDB,
    /// which releases the rows. A device that comes online meanwhile
    /// (`wake_device`) waits for the locks and then finds the later time, so
    /// its wake-up is not lost. Errors are store errors; the batch's rows are
    /// then as they were and due again. (If a move's compare-and-set lost to
    /// another writer, the batch is redone row by row without the
    /// postponements: those commands are looked at again on the next sweep.)
    pub async fn apply_due(
        &self,
        batch: DueBatch,
        put_off: &[(Command, i64)],
        moves: &[Move],
    ) -> Result<Vec<Moved>> {
        let DueBatch { commands, locked, .. } = batch;
        let mut tx = match locked {
            Some(tx) => tx,
            None => self.begin().await?,
        };
        for (current, until) in put_off {
            self.postpone_on(&mut tx, current, *until).await?;
        }
        self.transition_many_in(tx, &commands, moves).await
    }

    /// Claims up to `limit` commands that are due (`next_attempt_at <= now`) by
    /// pushing their `next_attempt_at` to `lease_until`, so that another
    /// gateway's sweeper skips them while this one works on them. Returns their
    /// ids in acceptance order. A claim is only a lease: what the sweeper then
    /// does to each command is a compare-and-set of its own, so two sweepers
    /// holding one row (a lease expired, or an engine that ignores SKIP LOCKED)
    /// still cannot both take the same attempt.
    ///
    /// The lease never reaches past a command's deadline, so a command
    /// claimed by an instance that dies is due again — and expired by another
    /// instance — at its deadline, not a lease later.
    pub async fn claim_due(&self, now: i64, limit: i64, lease_until: i64) -> Result<Vec<Uuid>> {
        retry_transient(|| self.claim_due_once(now, limit, lease_until)).await
    }

    async fn claim_due_once(&self, now: i64, limit: i64, lease_until: i64) -> Result<Vec<Uuid>> {
        let ids: Vec<String> = match self.backend {
            Backend::Sqlite => {
                let rows = self
                    .query(
                        "UPDATE commands SET next_attempt_at = MIN(?, expires_at) WHERE id IN \
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
                let rows = self
                    .query(
                        "SELECT id FROM commands WHERE next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ? \
                         FOR UPDATE SKIP LOCKED",
                    )
                    .bind(now)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?;
                let ids: Vec<String> = rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
                if !ids.is_empty() {
                    let sql = format!(
                        "UPDATE commands SET next_attempt_at = LEAST(?, expires_at) WHERE id IN ({})",
                        marks(ids.len())
                    );
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
    /// change, if it still stands as `current` (e.g. its device is offline) —
    /// its `next_attempt_at` included, so a device that came online meanwhile
    /// (`wake_device`, which sets it to now) is not put off. On `conn`, the
    /// claimed batch's transaction (`apply_due`).
    async fn postpone_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        current: &Command,
        until: i64,
    ) -> Result<bool> {
        let done = self
            .query(
                "UPDATE commands SET next_attempt_at = ? WHERE id = ? AND status = ? AND attempts = ? \
                 AND next_attempt_at = ?",
            )
            .bind(until.min(current.expires_at))
            .bind(current.id.to_string())
            .bind(current.status.as_str())
            .bind(current.attempts)
            .bind(current.next_attempt_at)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A device came online (back, or at another receiver): its commands
    /// waiting for it, or published or delivered while it was away, are due
    /// now — re-sending is safe, the device answers a repeated id from memory.
    pub async fn wake_device(&self, device_id: &DeviceId, now: i64) -> Result<u64> {
        let done = self
            .query(
                "UPDATE commands SET next_attempt_at = ? WHERE device_id = ? AND status IN ('pending', 'sent', 'delivered') \
                 AND next_attempt_at > ?",
            )
            .bind(now)
            .bind(device_id.as_str())
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
