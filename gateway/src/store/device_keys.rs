//! Which key generations of each device are valid (`device_keys`,
//! PROTOCOL.md §5.9). The keys themselves are never stored: each is derived
//! from the fleet secret, the device id and the generation. A device
//! without a row has generation 1 (provisioned at the factory, or by its
//! first `POST /v1/devices/{id}/key`).

use protocol::DeviceId;
use sqlx::Row;

use super::{retry_transient, Result, Store, StoreError};
use crate::command::now_ms;

/// How many times issuing a generation is tried against concurrent changes.
const ISSUE_TRIES: usize = 10;

/// A device's valid key generations: `min..=latest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyGenerations {
    /// The newest generation issued.
    pub latest: u32,
    /// The oldest generation still accepted.
    pub min: u32,
}

impl KeyGenerations {
    /// A device the registry never issued a key for: its factory generation 1.
    pub const FACTORY: KeyGenerations = KeyGenerations { latest: 1, min: 1 };

    pub fn accepts(&self, generation: u32) -> bool {
        (self.min..=self.latest).contains(&generation)
    }
}

impl Store {
    /// The device's valid generations; `None` when none was ever issued
    /// through the registry ([`KeyGenerations::FACTORY`] holds then).
    pub async fn key_generations(&self, device_id: &DeviceId) -> Result<Option<KeyGenerations>> {
        let row = self
            .query("SELECT latest_generation, min_generation FROM device_keys WHERE device_id = ?")
            .bind(device_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let generation = |column: &str| -> Result<u32> {
            let value: i64 = row.try_get(column)?;
            u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("device_keys.{column} = {value}")))
        };
        Ok(Some(KeyGenerations {
            latest: generation("latest_generation")?,
            min: generation("min_generation")?,
        }))
    }

    /// Issues the device's next key generation and returns it: 1 for a
    /// device never issued one, else the latest plus one. The previous ones
    /// stay accepted until the device authenticates with the new one
    /// (`accept_key_generation`), or not at all with `revoke_previous`.
    pub async fn issue_key_generation(&self, device_id: &DeviceId, revoke_previous: bool) -> Result<u32> {
        retry_transient(|| self.issue_key_generation_once(device_id, revoke_previous)).await
    }

    async fn issue_key_generation_once(&self, device_id: &DeviceId, revoke_previous: bool) -> Result<u32> {
        for _ in 0..ISSUE_TRIES {
            let now = now_ms();
            let Some(current) = self.key_generations(device_id).await? else {
                let insert = self
                    .query(
                        "INSERT INTO device_keys (device_id, latest_generation, min_generation, updated_at) \
                         VALUES (?, 1, 1, ?)",
                    )
                    .bind(device_id.as_str())
                    .bind(now);
                if self.insert_new(insert).await? {
                    return Ok(1);
                }
                continue;
            };
            let next = current.latest.checked_add(1).ok_or_else(|| {
                StoreError::Corrupt(format!("device {device_id}: no key generation after u32::MAX"))
            })?;
            let min = if revoke_previous { next } else { current.min };
            // A compare-and-set on both: neither a concurrent issue nor a raised minimum is lost.
            let done = self
                .query(
                    "UPDATE device_keys SET latest_generation = ?, min_generation = ?, updated_at = ? \
                     WHERE device_id = ? AND latest_generation = ? AND min_generation = ?",
                )
                .bind(i64::from(next))
                .bind(i64::from(min))
                .bind(now)
                .bind(device_id.as_str())
                .bind(i64::from(current.latest))
                .bind(i64::from(current.min))
                .execute(&self.pool)
                .await?;
            if done.rows_affected() == 1 {
                return Ok(next);
            }
        }
        Err(StoreError::Contention(format!("device {device_id}: key generation kept changing")))
    }

    /// A receiver reports the device authenticated with `generation`: true
    /// when that generation is valid (issued, not older than the minimum).
    /// The first use of a newer generation than the minimum raises the
    /// minimum to it: the older ones are refused from then on.
    pub async fn accept_key_generation(&self, device_id: &DeviceId, generation: u32) -> Result<bool> {
        retry_transient(|| self.accept_key_generation_once(device_id, generation)).await
    }

    async fn accept_key_generation_once(&self, device_id: &DeviceId, generation: u32) -> Result<bool> {
        let Some(valid) = self.key_generations(device_id).await? else {
            return Ok(KeyGenerations::FACTORY.accepts(generation));
        };
        if !valid.accepts(generation) {
            return Ok(false);
        }
        if generation > valid.min {
            // Only ever raised; a concurrent revocation raised it further and stays.
            self.query(
                "UPDATE device_keys SET min_generation = ?, updated_at = ? \
                 WHERE device_id = ? AND min_generation < ?",
            )
            .bind(i64::from(generation))
            .bind(now_ms())
            .bind(device_id.as_str())
            .bind(i64::from(generation))
            .execute(&self.pool)
            .await?;
            tracing::info!(%device_id, generation, "device authenticated with a new key: older generations are refused from now on");
        }
        Ok(true)
    }
}
