//! The console's summary: how many commands of each status were created in
//! each time bucket of a recent window, and how many devices are online.
//! Read-only; the HTTP layer shapes it (`GET /v1/commands/summary`).

use sqlx::Row;
use uuid::Uuid;

use super::{Backend, Result, Store, StoreError};
use crate::command::Status;

/// A window cut into equal buckets. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Start of the first bucket (inclusive).
    pub since: i64,
    /// Length of each bucket, in milliseconds (≥ 1).
    pub bucket_ms: i64,
    /// Number of buckets (≥ 1); the window ends at `since + buckets * bucket_ms`.
    pub buckets: usize,
}

/// Commands created in the window, per bucket and status, and the devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// One entry per bucket, oldest first: the count per status, in
    /// [`Status::ALL`] order.
    pub counts: Vec<[u64; Status::ALL.len()]>,
    /// Registered devices.
    pub devices: u64,
    /// Registered devices a receiver reports online.
    pub online: u64,
}

impl Store {
    /// Counts commands by the bucket of their `created_at` and their current
    /// status. Command ids are UUIDv7 (time-ordered, the creation millisecond
    /// first), so the scan is bounded by the primary key rather than an
    /// index on `created_at`; its cost grows with the commands in the window.
    pub async fn summary(&self, window: Window) -> Result<Summary> {
        let end = window.since + window.bucket_ms * window.buckets as i64;
        // Integer division of BIGINTs: `/` in SQLite, `DIV` in MySQL (whose `/` gives a decimal).
        let div = match self.backend {
            Backend::Sqlite => "/",
            Backend::MySql => "DIV",
        };
        let sql = format!(
            "SELECT (created_at - ?) {div} ? AS bucket, status, COUNT(*) AS n FROM commands \
             WHERE id >= ? AND created_at >= ? AND created_at < ? GROUP BY bucket, status"
        );
        let rows = self
            .query(&sql)
            .bind(window.since)
            .bind(window.bucket_ms)
            .bind(first_id_at(window.since - ID_CLOCK_SLACK_MS).to_string())
            .bind(window.since)
            .bind(end)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = vec![[0u64; Status::ALL.len()]; window.buckets];
        for row in rows {
            let bucket: i64 = row.try_get("bucket")?;
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            let index = Status::ALL
                .iter()
                .position(|s| s.as_str() == status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown status {status:?}")))?;
            if let Some(bucket) = usize::try_from(bucket).ok().and_then(|b| counts.get_mut(b)) {
                bucket[index] += u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(Summary {
            counts,
            devices: self.count("SELECT COUNT(*) AS n FROM devices").await?,
            online: self
                .count(
                    "SELECT COUNT(*) AS n FROM devices d JOIN device_presence p ON p.device_id = d.id \
                 WHERE p.online = 1",
                )
                .await?,
        })
    }

    async fn count(&self, sql: &str) -> Result<u64> {
        let n: i64 = self.query(sql).fetch_one(&self.pool).await?.try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// How far before the window the id bound starts: a command's id and its
/// `created_at` are read from the clock separately, a moment apart.
const ID_CLOCK_SLACK_MS: i64 = 60_000;

/// The smallest UUIDv7 of millisecond `ms`: every id made at or after `ms`
/// sorts at or after it, as text too (lower-case hex, the time first).
fn first_id_at(ms: i64) -> Uuid {
    let ms = u64::try_from(ms).unwrap_or(0) & 0xFFFF_FFFF_FFFF;
    Uuid::from_u128(((ms as u128) << 80) | (0x7 << 76) | (0b10 << 62))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_id_sorts_before_the_ids_of_its_millisecond_and_after_earlier_ones() {
        let ms = 1_790_000_000_123;
        let first = first_id_at(ms).to_string();
        let ts =
            |ms: u64| uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
        for _ in 0..100 {
            let same = Uuid::new_v7(ts(ms as u64)).to_string();
            let before = Uuid::new_v7(ts(ms as u64 - 1)).to_string();
            assert!(first <= same, "{first} > {same}");
            assert!(before < first, "{before} >= {first}");
        }
        assert_eq!(first_id_at(ms).get_version_num(), 7);
    }
}
