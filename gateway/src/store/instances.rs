//! Gateway instances sharing the database: each live process holds its id
//! (a row with a nonce and a heartbeat), so two processes never run under
//! one id — which would make them evict each other from the broker — and
//! MQTT submissions, which every instance receives, are taken by one.

use super::{Result, Store, StoreError};

/// MQTT submission keys are kept this long (ms): a repeat of the same
/// message within it is recognised.
pub const SUBMISSION_MEMORY_MS: i64 = 24 * 3600 * 1000;

/// Why an instance id could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "instance id {id:?} is in use by a live gateway (heartbeat {age_ms} ms ago); \
         give each instance its own --instance-id, or leave it unset for a generated one"
    )]
    InUse { id: String, age_ms: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Takes instance id `id` for this process (`nonce`), unless a live
    /// instance (a heartbeat at or after `stale_before`) holds it.
    pub async fn claim_instance(
        &self,
        id: &str,
        nonce: &str,
        now: i64,
        stale_before: i64,
    ) -> Result<(), ClaimError> {
        let taken = self
            .query(
                "UPDATE gateway_instances SET nonce = ?, started_at = ?, heartbeat_at = ? \
                 WHERE id = ? AND (heartbeat_at < ? OR nonce = ?)",
            )
            .bind(nonce)
            .bind(now)
            .bind(now)
            .bind(id)
            .bind(stale_before)
            .bind(nonce)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        if taken.rows_affected() == 1 {
            return Ok(());
        }
        let insert = self
            .query("INSERT INTO gateway_instances (id, nonce, started_at, heartbeat_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(nonce)
            .bind(now)
            .bind(now);
        if self.insert_new(insert).await? {
            return Ok(());
        }
        let age_ms = self.instance_age(id, now).await?.unwrap_or(0);
        Err(ClaimError::InUse { id: id.to_owned(), age_ms })
    }

    async fn instance_age(&self, id: &str, now: i64) -> Result<Option<i64>> {
        use sqlx::Row;
        let row = self
            .query("SELECT heartbeat_at FROM gateway_instances WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<i64, _>("heartbeat_at")).transpose()?.map(|at| now - at))
    }

    /// Renews this process's hold on `id`; false if another process took it over.
    pub async fn heartbeat(&self, id: &str, nonce: &str, now: i64) -> Result<bool> {
        let done = self
            .query("UPDATE gateway_instances SET heartbeat_at = ? WHERE id = ? AND nonce = ?")
            .bind(now)
            .bind(id)
            .bind(nonce)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Lets go of `id` (clean shutdown).
    pub async fn release_instance(&self, id: &str, nonce: &str) -> Result<()> {
        self.query("DELETE FROM gateway_instances WHERE id = ? AND nonce = ?")
            .bind(id)
            .bind(nonce)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes MQTT submission `key` outside any command insert (a refused
    /// submission, or an idempotent repeat): false if an instance took it already.
    pub async fn claim_submission(&self, key: &str, now: i64) -> Result<bool> {
        self.insert_new(
            self.query("INSERT INTO mqtt_submissions (submission_key, created_at) VALUES (?, ?)")
                .bind(key)
                .bind(now),
        )
        .await
    }

    /// The final reply of command `id` was published: nothing is owed any more.
    pub async fn reply_sent(&self, id: uuid::Uuid) -> Result<()> {
        self.query("DELETE FROM pending_replies WHERE command_id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Claims up to `limit` final replies whose grace has passed and whose
    /// owner is not another live process (heartbeat at or after
    /// `live_since`): a live owner sends its own, however slowly — a second
    /// sender would make a second reply. Each claimed one's due time moves
    /// to `retry_at`, so other instances leave it alone meanwhile. Returns
    /// each id and whether it is this process's own (published already, or
    /// about to be: only its record is left to delete).
    pub async fn claim_due_replies(
        &self,
        now: i64,
        limit: i64,
        retry_at: i64,
        live_since: i64,
    ) -> Result<Vec<(uuid::Uuid, bool)>> {
        use sqlx::Row;
        let me = self.reply_owner.get().cloned().unwrap_or_default();
        let rows = self
            .query(
                "SELECT p.command_id, p.owner FROM pending_replies p WHERE p.due_at <= ? AND (p.owner IS NULL                  OR p.owner = ? OR NOT EXISTS (SELECT 1 FROM gateway_instances g WHERE g.nonce = p.owner                  AND g.heartbeat_at >= ?)) ORDER BY p.due_at LIMIT ?",
            )
            .bind(now)
            .bind(&me)
            .bind(live_since)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut claimed = Vec::new();
        for row in rows {
            let id: String = row.try_get("command_id")?;
            let own = row.try_get::<Option<String>, _>("owner")?.is_some_and(|o| o == me);
            let taken = self
                .query("UPDATE pending_replies SET due_at = ? WHERE command_id = ? AND due_at <= ?")
                .bind(retry_at)
                .bind(&id)
                .bind(now)
                .execute(&self.pool)
                .await?;
            if taken.rows_affected() == 1 {
                claimed.extend(id.parse::<uuid::Uuid>().ok().map(|id| (id, own)));
            }
        }
        Ok(claimed)
    }

    /// Instances whose heartbeat is older than `before` (ms): `(id, nonce)`.
    pub async fn dead_instances(&self, before: i64) -> Result<Vec<(String, String)>> {
        use sqlx::Row;
        let rows = self
            .query("SELECT id, nonce FROM gateway_instances WHERE heartbeat_at < ? LIMIT 100")
            .bind(before)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("id")?, r.try_get("nonce")?))).collect()
    }

    /// Forgets submission keys older than `before` (ms).
    pub async fn forget_before(&self, before: i64) -> Result<u64> {
        let keys = self
            .query("DELETE FROM mqtt_submissions WHERE created_at < ?")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(keys.rows_affected())
    }
}
