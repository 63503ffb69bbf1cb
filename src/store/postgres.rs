//! PostgreSQL `MessageStore`: the production metadata store.
//!
//! Same methods in the same order as `sqlite.rs`. Concurrency comes from row locks: the
//! conversation counter row serialises senders of one conversation (so `seq` is gapless
//! and in commit order), and a message row is locked while it is acknowledged (so the
//! last two recipients acknowledging at once cannot both miss "fully delivered").

use std::collections::HashSet;
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    AckOutcome, Collected, Connections, InsertOutcome, MessageMeta, MessageStore, NewMessage,
    PendingQuery, PoolSettings, PriorRequest, Receipt, StoreError, Waiting, idempotency_retention,
    millis,
};

/// A pooled connection idle for this long is checked before use.
const PING_IF_IDLE_FOR: std::time::Duration = std::time::Duration::from_millis(500);

pub struct PostgresStore {
    pool: PgPool,
    waiting: Waiting,
}

impl PostgresStore {
    pub async fn connect(url: &str, pool: &PoolSettings) -> Result<Self, anyhow::Error> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL URL: {e}"))?
            .options([
                // A lock that is never released must not hang a request (and its
                // connection).
                (
                    "statement_timeout",
                    pool.statement_timeout.as_millis().to_string(),
                ),
                // Every statement here is an index lookup whose best plan does not depend
                // on the values bound. Left to choose, PostgreSQL re-plans the pending
                // query on every call (its generic plan looks costlier), and that planning
                // probes the index ends, so it grew from 0.2 ms to 1.1 ms per call with
                // 1 M messages stored (BENCHMARKS.md).
                ("plan_cache_mode", "force_generic_plan".to_owned()),
            ]);
        // Connect lazily: a database that is down at start-up (or goes away later) gives
        // 503s and a failing /readyz until it is back, not a crash loop.
        let pool = PgPoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            // sqlx pings every connection it hands out (a round trip each time) and again
            // when it comes back. Like HikariCP's alive-bypass window, only a connection
            // that sat idle is pinged on the way out; one that failed is closed on return.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            waiting: Waiting::default(),
        })
    }
}

impl PostgresStore {
    /// A pooled connection, counted as waiting until the pool hands it over.
    async fn conn(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        let _waiting = self.waiting.enter();
        Ok(self.pool.acquire().await?)
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let _waiting = self.waiting.enter();
        Ok(self.pool.begin().await?)
    }
}

fn meta(row: &PgRow) -> Result<MessageMeta, sqlx::Error> {
    Ok(MessageMeta {
        id: row.try_get("id")?,
        convo_id: row.try_get("convo_id")?,
        seq: row.try_get("seq")?,
        sender: row.try_get("sender")?,
        size: i64::from(row.try_get::<i32, _>("size")?),
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        blob_key: row.try_get("blob_key")?,
    })
}

fn prior(row: &PgRow) -> Result<PriorRequest, sqlx::Error> {
    Ok(PriorRequest {
        fingerprint: row.try_get("fingerprint")?,
        receipt: Receipt {
            id: row.try_get("message_id")?,
            convo_id: row.try_get("convo_id")?,
            seq: row.try_get("seq")?,
            sender: row.try_get("sender")?,
            recipients: row.try_get("recipients")?,
            size: i64::from(row.try_get::<i32, _>("size")?),
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
        },
    })
}

const SELECT_PRIOR: &str = "select fingerprint, message_id, convo_id, seq, sender, recipients, size, created_at, expires_at \
     from idempotency_keys where sender = $1 and key = $2";

/// Delete one message row inside `tx` and queue its blob; returns the blob key.
async fn delete_and_queue(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "with d as (delete from messages where id = $1 returning blob_key) \
         insert into blob_deletions (blob_key, queued_at) select blob_key, now() from d \
         on conflict (blob_key) do update set queued_at = excluded.queued_at returning blob_key",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

fn size_i32(size: i64) -> Result<i32, StoreError> {
    i32::try_from(size)
        .map_err(|_| StoreError::Other(format!("message size {size} does not fit the size column")))
}

#[async_trait]
impl MessageStore for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1")
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    async fn find_idempotent(
        &self,
        sender: &str,
        key: &str,
    ) -> Result<Option<PriorRequest>, StoreError> {
        let row = sqlx::query(SELECT_PRIOR)
            .bind(sender)
            .bind(key)
            .fetch_optional(&mut *self.conn().await?)
            .await?;
        Ok(row.as_ref().map(prior).transpose()?)
    }

    async fn insert_message(&self, m: &NewMessage) -> Result<InsertOutcome, StoreError> {
        // One statement, so one round trip and its own transaction. The upsert locks the
        // conversation row, so `seq` is gapless and in commit order, and the time is read
        // after the lock (clock_timestamp(), not the statement start), so creation times
        // follow `seq` within a conversation.
        let idem = m.idempotency.as_ref();
        let inserted = sqlx::query(
            "with c as ( \
                 insert into conversations (convo_id, last_seq) values ($2, 1) \
                 on conflict (convo_id) do update set last_seq = conversations.last_seq + 1 \
                 returning last_seq, date_trunc('milliseconds', clock_timestamp()) as t), \
             m as ( \
                 insert into messages (id, convo_id, seq, sender, blob_key, size, created_at, expires_at) \
                 select $1, $2, c.last_seq, $3, $4, $5, c.t, c.t + $6 * interval '1 millisecond' from c \
                 returning id, convo_id, seq, sender, size, created_at, expires_at), \
             r as ( \
                 insert into recipients (message_id, recipient, created_at) \
                 select m.id, unnest($7::text[]), m.created_at from m), \
             k as ( \
                 insert into idempotency_keys \
                 (sender, key, fingerprint, message_id, convo_id, seq, recipients, size, created_at, expires_at, keep_until) \
                 select m.sender, $8, $9, m.id, m.convo_id, m.seq, $7, m.size, m.created_at, m.expires_at, \
                     m.created_at + $10 * interval '1 millisecond' \
                 from m where $8::text is not null) \
             select seq, created_at, expires_at from m",
        )
        .bind(m.id)
        .bind(&m.convo_id)
        .bind(&m.sender)
        .bind(&m.blob_key)
        .bind(size_i32(m.size)?)
        .bind(millis(m.ttl) as f64)
        .bind(&m.recipients)
        .bind(idem.map(|i| &i.key))
        .bind(idem.map(|i| &i.fingerprint))
        .bind(millis(idempotency_retention(m.ttl)) as f64)
        .fetch_one(&mut *self.conn().await?)
        .await;
        let row = match inserted {
            Ok(row) => row,
            // Another request holds the key: the statement wrote nothing (seq included).
            // A concurrent one with the same key waited above until that one committed.
            Err(sqlx::Error::Database(e)) if e.constraint() == Some("idempotency_keys_pkey") => {
                let idem = idem.expect("only a send with a key inserts one");
                let row = sqlx::query(SELECT_PRIOR)
                    .bind(&m.sender)
                    .bind(&idem.key)
                    .fetch_one(&mut *self.conn().await?)
                    .await?;
                return Ok(InsertOutcome::KeyTaken(prior(&row)?));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(InsertOutcome::Created(Receipt {
            id: m.id,
            convo_id: m.convo_id.clone(),
            seq: row.try_get("seq")?,
            sender: m.sender.clone(),
            recipients: m.recipients.clone(),
            size: m.size,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
        }))
    }

    async fn get_message(&self, id: Uuid, caller: &str) -> Result<Option<MessageMeta>, StoreError> {
        let row = sqlx::query(
            "select m.id, m.convo_id, m.seq, m.sender, m.size, m.created_at, m.expires_at, m.blob_key \
             from messages m where m.id = $1 and m.expires_at > now() \
             and (m.sender = $2 or exists (select 1 from recipients r where r.message_id = m.id and r.recipient = $2))",
        )
        .bind(id)
        .bind(caller)
        .fetch_optional(&mut *self.conn().await?)
        .await?;
        Ok(row.as_ref().map(meta).transpose()?)
    }

    async fn pending(&self, q: &PendingQuery<'_>) -> Result<Vec<MessageMeta>, StoreError> {
        let rows = sqlx::query(
            "select m.id, m.convo_id, m.seq, m.sender, m.size, m.created_at, m.expires_at, m.blob_key \
             from recipients r join messages m on m.id = r.message_id \
             where r.recipient = $1 and r.acked_at is null and (r.created_at, r.message_id) > ($2, $3) \
             and m.expires_at > now() and ($4::text is null or m.convo_id = $4) \
             order by r.created_at, r.message_id limit $5",
        )
        .bind(q.recipient)
        .bind(q.after.created_at)
        .bind(q.after.id)
        .bind(q.convo_id)
        .bind(q.limit)
        .fetch_all(&mut *self.conn().await?)
        .await?;
        Ok(rows.iter().map(meta).collect::<Result<_, _>>()?)
    }

    async fn ack(
        &self,
        recipient: &str,
        ids: &[Uuid],
        delete_delivered: bool,
    ) -> Result<AckOutcome, StoreError> {
        // Lock messages in id order so two batch acks can never deadlock each other.
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut tx = self.begin().await?;
        let mut out = AckOutcome::default();
        for id in sorted {
            let live: Option<i32> = sqlx::query_scalar(
                "select 1 from messages where id = $1 and expires_at > now() for update",
            )
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if live.is_none() {
                continue;
            }
            let hit = sqlx::query(
                "update recipients set acked_at = coalesce(acked_at, now()) \
                 where message_id = $1 and recipient = $2",
            )
            .bind(id)
            .bind(recipient)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if !hit {
                continue;
            }
            out.acked.push(id);
            if delete_delivered {
                let delivered: bool = sqlx::query_scalar(
                    "select not exists (select 1 from recipients where message_id = $1 and acked_at is null)",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                if delivered && let Some(key) = delete_and_queue(&mut tx, id).await? {
                    out.freed_blobs.push(key);
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn delete_message(&self, id: Uuid, sender: &str) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin().await?;
        let mine: Option<i32> =
            sqlx::query_scalar("select 1 from messages where id = $1 and sender = $2 and expires_at > now() for update")
                .bind(id)
                .bind(sender)
                .fetch_optional(&mut *tx)
                .await?;
        if mine.is_none() {
            return Ok(None);
        }
        let key = delete_and_queue(&mut tx, id).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn collect(&self, delete_delivered: bool, limit: i64) -> Result<Collected, StoreError> {
        let mut tx = self.begin().await?;
        let expired = sqlx::query(
            "with d as (delete from messages where id in \
                 (select id from messages where expires_at <= now() order by expires_at limit $1) \
                 returning blob_key) \
             insert into blob_deletions (blob_key, queued_at) select blob_key, now() from d on conflict do nothing",
        )
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let delivered = if delete_delivered {
            sqlx::query(
                "with d as (delete from messages where id in \
                     (select m.id from messages m where not exists \
                         (select 1 from recipients r where r.message_id = m.id and r.acked_at is null) limit $1) \
                     returning blob_key) \
                 insert into blob_deletions (blob_key, queued_at) select blob_key, now() from d on conflict do nothing",
            )
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            0
        };
        let idempotency_keys =
            sqlx::query("delete from idempotency_keys where keep_until <= now()")
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(Collected {
            expired,
            delivered,
            idempotency_keys,
        })
    }

    async fn queued_blob_deletions(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("select blob_key from blob_deletions order by queued_at limit $1")
                .bind(limit)
                .fetch_all(&mut *self.conn().await?)
                .await?,
        )
    }

    async fn forget_blob_deletions(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        sqlx::query("delete from blob_deletions where blob_key = any($1)")
            .bind(keys)
            .execute(&mut *self.conn().await?)
            .await?;
        Ok(())
    }

    async fn referenced_blobs(&self, keys: &[String]) -> Result<HashSet<String>, StoreError> {
        let found: Vec<String> =
            sqlx::query_scalar("select blob_key from messages where blob_key = any($1)")
                .bind(keys)
                .fetch_all(&mut *self.conn().await?)
                .await?;
        Ok(found.into_iter().collect())
    }

    async fn backlog(&self) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
        Ok(sqlx::query_as(
            "select count(*), min(r.created_at) from recipients r join messages m on m.id = r.message_id \
             where r.acked_at is null and m.expires_at > now()",
        )
        .fetch_one(&mut *self.conn().await?)
        .await?)
    }

    fn connections(&self) -> Connections {
        let open = self.pool.size();
        Connections {
            open,
            in_use: open.saturating_sub(self.pool.num_idle() as u32),
            waiting: self.waiting.get(),
        }
    }
}
