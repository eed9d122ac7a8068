//! HTTP API keys (`api_keys`): id, name, the SHA-256 of the secret, scopes,
//! and when each was created and revoked. The secret itself is never stored
//! (`crate::api_key`).

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{Result, Store};
use crate::api_key::{parse_scopes, scopes_text, Scope};

/// A stored key. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    /// The operator's name for it (who or what uses it).
    pub name: String,
    /// SHA-256 of the secret, lower-case hex.
    pub key_hash: String,
    pub scopes: Vec<Scope>,
    pub created_at: i64,
    /// Set once revoked; a revoked key is refused from then on.
    pub revoked_at: Option<i64>,
}

/// What `revoke_api_key` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Revoked now.
    Now,
    /// It had been revoked already, at this time.
    Already(i64),
    /// No key has this id.
    Unknown,
}

const SELECT: &str = "SELECT id, name, key_hash, scopes, created_at, revoked_at FROM api_keys";

impl Store {
    /// Stores a new key: false, and nothing written, if its id exists already.
    pub async fn insert_api_key(&self, key: &ApiKey) -> Result<bool> {
        let insert = self
            .query(
                "INSERT INTO api_keys (id, name, key_hash, scopes, created_at, revoked_at) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&key.id)
            .bind(&key.name)
            .bind(&key.key_hash)
            .bind(scopes_text(&key.scopes))
            .bind(key.created_at)
            .bind(key.revoked_at);
        self.insert_new(insert).await
    }

    /// The key with this id, revoked or not.
    pub async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>> {
        let row = self.query(&format!("{SELECT} WHERE id = ?")).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(api_key_from_row).transpose()?)
    }

    /// Every key, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        let rows = self.query(&format!("{SELECT} ORDER BY created_at, id")).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(api_key_from_row).collect::<Result<_, sqlx::Error>>()?)
    }

    /// Revokes a key at `now` (ms); a key revoked already keeps its first time.
    pub async fn revoke_api_key(&self, id: &str, now: i64) -> Result<Revoked> {
        let done = self
            .query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(Revoked::Now);
        }
        Ok(match self.get_api_key(id).await? {
            Some(ApiKey { revoked_at: Some(at), .. }) => Revoked::Already(at),
            // Revoked and un-revoked meanwhile cannot happen: nothing clears revoked_at.
            Some(_) => Revoked::Now,
            None => Revoked::Unknown,
        })
    }
}

fn api_key_from_row(row: &AnyRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        key_hash: row.try_get("key_hash")?,
        scopes: parse_scopes(&row.try_get::<String, _>("scopes")?),
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}
