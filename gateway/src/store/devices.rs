//! The device registry (`devices`) and where each device is now
//! (`device_presence`, written from receivers' reports; kept apart so a
//! presence report never needs the device to be registered first).

use std::collections::HashMap;

use protocol::DeviceId;
use serde_json::Value;
use sqlx::Row;

use super::rows::{device_from_row, DEVICE_SELECT, DEVICE_SELECT_QUEUED};
use super::{marks, retry_transient, Result, Store, StoreError};
use crate::command::now_ms;

/// A registered device and its presence. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: DeviceId,
    pub enabled: bool,
    /// A JSON object of the caller's labels.
    pub labels: Value,
    /// A receiver reports it connected now.
    pub online: bool,
    /// The receiver that last reported it.
    pub receiver_id: Option<String>,
    pub seen_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What `upsert_device` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Upserted {
    pub device: Device,
    /// True when the device did not exist before.
    pub created: bool,
}

/// What [`Store::set_presence`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceOutcome {
    Changed,
    /// An offline report about a device that is not (or no longer) at that receiver.
    Unchanged,
    /// Not recorded: the device is not registered and the store already holds
    /// the most unregistered devices' presence allowed.
    TooManyUnregistered,
}

impl Store {
    /// Creates or updates a device.
    pub async fn upsert_device(&self, id: &DeviceId, enabled: bool, labels: &Value) -> Result<Upserted> {
        let now = now_ms();
        let labels_text = labels.to_string();
        let updated = self
            .query("UPDATE devices SET enabled = ?, labels = ?, updated_at = ? WHERE id = ?")
            .bind(i64::from(enabled))
            .bind(&labels_text)
            .bind(now)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        let mut created = false;
        if updated.rows_affected() == 0 {
            let insert = self
                .query("INSERT INTO devices (id, enabled, labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?)")
                .bind(id.as_str())
                .bind(i64::from(enabled))
                .bind(&labels_text)
                .bind(now)
                .bind(now);
            if !self.insert_new(insert).await? {
                // Created concurrently by another request: ours becomes an update.
                return Box::pin(self.upsert_device(id, enabled, labels)).await;
            }
            created = true;
        }
        let device = self
            .get_device(id.as_str())
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("device {id} vanished after upsert")))?;
        Ok(Upserted { device, created })
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<Device>> {
        let sql = format!("{DEVICE_SELECT} WHERE d.id = ?");
        let row = self.query(&sql).bind(id).fetch_optional(&self.pool).await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// The group-commit writer's one lookup per batch: these devices, those
    /// that exist, by id, each with its count of commands not yet final (the
    /// per-device cap's count, `--max-device-queue`), in one query per 200
    /// ids. Tried again on a broken connection (a database node failing
    /// over), as the insert that follows it is.
    pub async fn devices_with_queued(&self, ids: &[&DeviceId]) -> Result<HashMap<DeviceId, (Device, u64)>> {
        retry_transient(|| self.devices_with_queued_once(ids)).await
    }

    async fn devices_with_queued_once(&self, ids: &[&DeviceId]) -> Result<HashMap<DeviceId, (Device, u64)>> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(200) {
            let sql = format!("{DEVICE_SELECT_QUEUED} WHERE d.id IN ({})", marks(chunk.len()));
            let mut q = self.query(&sql);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for row in q.fetch_all(&self.pool).await? {
                let device = device_from_row(&row)?;
                let queued: i64 = row.try_get("queued")?;
                found.insert(device.id.clone(), (device, u64::try_from(queued).unwrap_or(0)));
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
    /// A device not in the registry is recorded only while fewer than
    /// `max_unregistered` such devices have a presence row (else
    /// [`PresenceOutcome::TooManyUnregistered`], nothing written): receivers may
    /// report devices before they are registered, but not without bound.
    pub async fn set_presence(
        &self,
        device_id: &DeviceId,
        receiver_id: &str,
        online: bool,
        max_unregistered: u64,
    ) -> Result<PresenceOutcome> {
        retry_transient(|| self.set_presence_once(device_id, receiver_id, online, max_unregistered)).await
    }

    async fn set_presence_once(
        &self,
        device_id: &DeviceId,
        receiver_id: &str,
        online: bool,
        max_unregistered: u64,
    ) -> Result<PresenceOutcome> {
        let now = now_ms();
        let done = if online {
            self.query(
                "UPDATE device_presence SET online = 1, receiver_id = ?, seen_at = ? WHERE device_id = ?",
            )
            .bind(receiver_id)
            .bind(now)
            .bind(device_id.as_str())
            .execute(&self.pool)
            .await?
        } else {
            self.query(
                "UPDATE device_presence SET online = 0, seen_at = ? WHERE device_id = ? AND receiver_id = ?",
            )
            .bind(now)
            .bind(device_id.as_str())
            .bind(receiver_id)
            .execute(&self.pool)
            .await?
        };
        if done.rows_affected() > 0 {
            return Ok(PresenceOutcome::Changed);
        }
        if !online {
            return Ok(PresenceOutcome::Unchanged);
        }
        if !self.unregistered_room(device_id, max_unregistered).await? {
            return Ok(PresenceOutcome::TooManyUnregistered);
        }
        let insert = self
            .query(
                "INSERT INTO device_presence (device_id, online, receiver_id, seen_at) VALUES (?, 1, ?, ?)",
            )
            .bind(device_id.as_str())
            .bind(receiver_id)
            .bind(now);
        if self.insert_new(insert).await? {
            return Ok(PresenceOutcome::Changed);
        }
        // Inserted concurrently by another writer: ours becomes an update.
        Box::pin(self.set_presence_once(device_id, receiver_id, online, max_unregistered)).await
    }

    /// Whether a presence row may be added for `device_id`: yes if it is
    /// registered, else if fewer than `max` unregistered devices have one.
    /// Several writers at once may overshoot `max` by their number.
    async fn unregistered_room(&self, device_id: &DeviceId, max: u64) -> Result<bool> {
        let registered = self
            .query("SELECT 1 AS one FROM devices WHERE id = ?")
            .bind(device_id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        if registered || max == 0 {
            return Ok(registered);
        }
        let strays: i64 = self
            .query(
                "SELECT COUNT(*) AS n FROM device_presence p \
                 WHERE NOT EXISTS (SELECT 1 FROM devices d WHERE d.id = p.device_id)",
            )
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok((strays as u64) < max)
    }

    /// Deletes presence rows of devices not in the registry, offline and not
    /// seen since `before` (ms): nothing refers to them.
    pub async fn forget_unregistered_before(&self, before: i64) -> Result<u64> {
        let done = self
            .query(
                "DELETE FROM device_presence WHERE online = 0 AND seen_at < ? \
                 AND device_id NOT IN (SELECT id FROM devices)",
            )
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
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
            sql += &format!(" AND receiver_id NOT IN ({})", marks(alive.len()));
        }
        let mut q = self.query(&sql).bind(now_ms());
        for r in alive {
            q = q.bind(r.clone());
        }
        Ok(q.execute(&self.pool).await?.rows_affected())
    }

    /// Which of these devices a receiver reports connected now, and which receiver.
    pub async fn online_devices(&self, device_ids: &[&DeviceId]) -> Result<HashMap<DeviceId, String>> {
        let mut conn = self.pool.acquire().await?;
        self.online_devices_on(&mut conn, device_ids).await
    }

    /// [`Store::online_devices`] on a connection the caller holds (e.g. a
    /// transaction's).
    pub(super) async fn online_devices_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        device_ids: &[&DeviceId],
    ) -> Result<HashMap<DeviceId, String>> {
        let mut online = HashMap::new();
        for chunk in device_ids.chunks(500) {
            let sql = format!(
                "SELECT device_id, receiver_id FROM device_presence WHERE online = 1 AND device_id IN ({})",
                marks(chunk.len())
            );
            let mut q = self.query(&sql);
            for id in chunk {
                q = q.bind(id.as_str());
            }
            for row in q.fetch_all(&mut *conn).await? {
                let id = DeviceId::try_from(row.try_get::<String, _>("device_id")?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                online.insert(id, row.try_get::<String, _>("receiver_id")?);
            }
        }
        Ok(online)
    }
}
