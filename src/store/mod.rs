//! `MessageStore`: the metadata seam (messages, recipients, sequence counters,
//! idempotency keys and the queue of blobs to delete), with SQLite and PostgreSQL
//! implementations chosen by the `DATABASE_URL` scheme.
//!
//! Every query takes "now" from the database clock, so expiry holds the moment a message
//! expires, whatever the clean-up task has or has not done yet.

mod postgres;
mod sqlite;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or no connection was free in time: retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Self::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if unavailable(db.as_ref()) => {
                Self::Unavailable(e.to_string())
            }
            other => Self::Other(other.to_string()),
        }
    }
}

/// Whether a database error is the database being unable to work for now (retry
/// later) rather than something wrong with the request or the data.
fn unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // sqlx gives SQLite's extended code; its low byte is the primary code: BUSY,
        // LOCKED, READONLY (the file turned read-only), IOERR, FULL (disk full),
        // CANTOPEN.
        let code: i32 = db.code().and_then(|c| c.parse().ok()).unwrap_or(0);
        return matches!(code & 0xff, 5 | 6 | 8 | 10 | 13 | 14);
    }
    // PostgreSQL: statement or lock timeout, lock not available, the server shutting
    // down or restarting, out of disk space or memory, too many connections.
    matches!(
        db.code().as_deref(),
        Some("57014" | "55P03" | "57P01" | "57P02" | "57P03" | "53100" | "53200" | "53300")
    )
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Other(format!("migration failed: {e}"))
    }
}

/// Connection settings shared by both implementations.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
}

/// Open the store named by `url` (`sqlite://…` or `postgres://…`).
pub async fn connect(
    url: &str,
    pool: &PoolSettings,
) -> Result<Arc<dyn MessageStore>, anyhow::Error> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, pool).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(PostgresStore::connect(url, pool).await?))
    } else {
        anyhow::bail!(
            "DATABASE_URL must start with sqlite:// or postgres:// (got scheme {:?})",
            url.split(':').next().unwrap_or_default()
        )
    }
}

/// Connection pool figures, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Connections {
    pub open: u32,
    pub in_use: u32,
    pub waiting: u32,
}

/// Requests waiting for a pooled connection (sqlx does not count them itself).
#[derive(Debug, Default)]
pub(crate) struct Waiting(std::sync::atomic::AtomicU32);

impl Waiting {
    /// Count one waiter until the returned guard is dropped.
    pub(crate) fn enter(&self) -> impl Drop + '_ {
        use std::sync::atomic::Ordering::Relaxed;
        struct Guard<'a>(&'a std::sync::atomic::AtomicU32);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.0.fetch_add(1, Relaxed);
        Guard(&self.0)
    }

    pub(crate) fn get(&self) -> u32 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A message as the database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub id: Uuid,
    pub convo_id: String,
    pub seq: i64,
    pub sender: String,
    pub size: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub blob_key: String,
}

/// What a sender got back for a stored message; kept with its idempotency key so a
/// retry gets the same answer even after the message itself is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: Uuid,
    pub convo_id: String,
    pub seq: i64,
    pub sender: String,
    pub recipients: Vec<String>,
    pub size: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    /// Hash of everything that makes two requests "the same request".
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: Uuid,
    pub convo_id: String,
    pub sender: String,
    /// Already de-duplicated, in the order the sender gave.
    pub recipients: Vec<String>,
    pub blob_key: String,
    pub size: i64,
    pub ttl: Duration,
    pub idempotency: Option<Idempotency>,
}

/// An idempotency key that was already used by this sender.
#[derive(Debug, Clone)]
pub struct PriorRequest {
    pub fingerprint: String,
    pub receipt: Receipt,
}

#[derive(Debug)]
pub enum InsertOutcome {
    Created(Receipt),
    /// Another request with the same key won; nothing was written.
    KeyTaken(PriorRequest),
}

/// Position in a recipient's pending list: after (`created_at`, `id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    /// Before every message (none is older than the epoch; both databases can hold it).
    pub const START: Cursor = Cursor {
        created_at: DateTime::<Utc>::UNIX_EPOCH,
        id: Uuid::nil(),
    };

    pub fn after(m: &MessageMeta) -> Self {
        Self {
            created_at: m.created_at,
            id: m.id,
        }
    }

    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{}.{}",
            self.created_at.timestamp_millis(),
            self.id
        ))
    }

    pub fn decode(s: &str) -> Option<Self> {
        let raw = String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok()?;
        let (ms, id) = raw.split_once('.')?;
        Some(Self {
            created_at: DateTime::from_timestamp_millis(ms.parse().ok()?)?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PendingQuery<'a> {
    pub recipient: &'a str,
    pub convo_id: Option<&'a str>,
    pub after: Cursor,
    pub limit: i64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// Ids the caller is a recipient of (now acknowledged), in request order.
    pub acked: Vec<Uuid>,
    /// Blobs of messages that are now fully delivered and were deleted; they are queued
    /// for deletion in the same transaction, so a crash cannot lose track of them.
    pub freed_blobs: Vec<String>,
}

/// What one clean-up pass removed from the database.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub expired: u64,
    pub delivered: u64,
    pub idempotency_keys: u64,
}

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Apply pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Cheap round trip, for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The earlier request that used this sender's idempotency key, if any.
    async fn find_idempotent(
        &self,
        sender: &str,
        key: &str,
    ) -> Result<Option<PriorRequest>, StoreError>;

    /// In one transaction: next `seq` of the conversation, the message row, one row per
    /// recipient, and the idempotency key (unless another request holds it).
    async fn insert_message(&self, m: &NewMessage) -> Result<InsertOutcome, StoreError>;

    /// The message, if it exists, has not expired and `caller` is its sender or a recipient.
    async fn get_message(&self, id: Uuid, caller: &str) -> Result<Option<MessageMeta>, StoreError>;

    /// Messages `q.recipient` has not acknowledged, oldest first, after `q.after`.
    async fn pending(&self, q: &PendingQuery<'_>) -> Result<Vec<MessageMeta>, StoreError>;

    /// Acknowledge `ids` for `recipient`; with `delete_delivered`, delete the messages
    /// every recipient has now acknowledged and queue their blobs for deletion.
    async fn ack(
        &self,
        recipient: &str,
        ids: &[Uuid],
        delete_delivered: bool,
    ) -> Result<AckOutcome, StoreError>;

    /// Delete a message sent by `sender` and queue its blob; `None` when there is none.
    async fn delete_message(&self, id: Uuid, sender: &str) -> Result<Option<String>, StoreError>;

    /// Delete up to `limit` expired (and, with `delete_delivered`, fully-delivered)
    /// messages, queueing their blobs; drop idempotency keys past their retention.
    async fn collect(&self, delete_delivered: bool, limit: i64) -> Result<Collected, StoreError>;

    /// Up to `limit` blob keys queued for deletion.
    async fn queued_blob_deletions(&self, limit: i64) -> Result<Vec<String>, StoreError>;

    /// Forget queued keys whose blobs are gone.
    async fn forget_blob_deletions(&self, keys: &[String]) -> Result<(), StoreError>;

    /// The subset of `keys` that a message row still references.
    async fn referenced_blobs(&self, keys: &[String]) -> Result<HashSet<String>, StoreError>;

    /// Unacknowledged (message, recipient) pairs of live messages, and the creation
    /// time of the oldest such message.
    async fn backlog(&self) -> Result<(i64, Option<DateTime<Utc>>), StoreError>;

    /// Database connections: open, in use, and requests waiting for one.
    fn connections(&self) -> Connections;
}

/// How long an idempotency key is kept: as long as the message, and at least 24 hours.
pub(crate) fn idempotency_retention(ttl: Duration) -> Duration {
    ttl.max(Duration::from_secs(24 * 3600))
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk is the store being unavailable (503, retry later), not a 500: SQLite
    /// says SQLITE_FULL when a write needs a page it cannot have, here because the
    /// database may not grow past its current size.
    #[tokio::test]
    async fn sqlite_full_is_unavailable() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("create table t (b blob)")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("pragma max_page_count = 2")
            .execute(&mut *conn)
            .await
            .unwrap();
        let e = sqlx::query("insert into t values (zeroblob(100000))")
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("full"), "{e}");
        assert!(
            matches!(StoreError::from(e), StoreError::Unavailable(_)),
            "SQLITE_FULL is retryable"
        );
        // A mistake in a statement is not.
        let e = sqlx::query("select * from missing")
            .execute(&mut *conn)
            .await
            .unwrap_err();
        assert!(matches!(StoreError::from(e), StoreError::Other(_)));
    }
}
