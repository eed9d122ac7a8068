//! Retention: final commands older than `--retention-ms` are deleted with
//! everything that refers to them, oldest first, in small batches (one short
//! transaction each), so the tables stop growing without holding up live
//! traffic. Run by the sweeper (`sweeper::forget_old`).

use sqlx::Row;

use super::{marks, Result, Store};

impl Store {
    /// Deletes up to `batch` commands that became final before `before` (ms
    /// since the Unix epoch), oldest first, with their events and owed-reply
    /// records, in one transaction; returns how many commands went. Only
    /// final commands have a `completed_at`, so nothing live is touched.
    pub async fn delete_final_before(&self, before: i64, batch: i64) -> Result<u64> {
        let rows = self
            .query("SELECT id FROM commands WHERE completed_at < ? ORDER BY completed_at LIMIT ?")
            .bind(before)
            .bind(batch)
            .fetch_all(&self.pool)
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.try_get("id")).collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let set = marks(ids.len());
        let mut tx = self.begin().await?;
        for table in ["command_events WHERE command_id", "pending_replies WHERE command_id"] {
            let sql = format!("DELETE FROM {table} IN ({set})");
            let mut q = self.query(&sql);
            for id in &ids {
                q = q.bind(id.as_str());
            }
            q.execute(&mut *tx).await?;
        }
        let sql = format!("DELETE FROM commands WHERE id IN ({set}) AND completed_at < ?");
        let mut q = self.query(&sql);
        for id in &ids {
            q = q.bind(id.as_str());
        }
        let deleted = q.bind(before).execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }
}
