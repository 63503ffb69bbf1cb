//! SQLite `MessageStore`: the embedded default.
//!
//! WAL mode so readers never wait for the writer, and one dedicated writer connection so
//! concurrent writes queue in the pool (bounded by the acquire timeout, then 503) instead
//! of failing with SQLITE_BUSY. Times are integer milliseconds since the epoch.
//!
//! Sends are group-committed: every commit waits for the disk (synchronous = FULL), so
//! the sends that arrive while one commit is in flight are written together by the next
//! transaction and share one disk flush. That transaction is two round trips to the
//! connection's thread whatever its size (set-based statements, `json_each` over the
//! batch, several per round trip): under load each round trip waits for a CPU, and
//! the write lock is held meanwhile (BENCHMARKS.md).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    AckOutcome, Collected, Connections, InsertOutcome, MessageMeta, MessageStore, NewMessage,
    PendingQuery, PoolSettings, PriorRequest, Receipt, StoreError, Waiting, idempotency_retention,
    millis,
};

/// The database clock, in milliseconds.
macro_rules! now {
    () => {
        "cast(round(unixepoch('subsec') * 1000) as integer)"
    };
}

/// Most sends one group commit writes.
const MAX_BATCH: usize = 64;

type InsertReply = oneshot::Sender<Result<InsertOutcome, StoreError>>;

/// A send waiting for the group-commit task, with where to answer it.
type Queued = (NewMessage, InsertReply);

pub struct SqliteStore {
    /// Exactly one connection: SQLite has one writer at a time anyway.
    writer: SqlitePool,
    readers: SqlitePool,
    waiting: Waiting,
    /// The last write through [`SqliteStore::begin`] failed.
    writer_suspect: AtomicBool,
    /// Sends queued for the group-commit task ([`insert_batches`]).
    inserts: mpsc::Sender<Queued>,
}

impl SqliteStore {
    pub async fn connect(url: &str, pool: &PoolSettings) -> Result<Self, anyhow::Error> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("DATABASE_URL is not a valid SQLite URL: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a 201 means the row is on disk, even if the machine loses power next.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(pool.statement_timeout)
            .foreign_keys(true);
        if let Some(parent) = options
            .get_filename()
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the folder {} for DATABASE_URL: {e}",
                    parent.display()
                )
            })?;
        }
        // A SQLite connection cannot go stale: no ping (a round trip to its thread)
        // before each use.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot open DATABASE_URL {url}: {e}"))?;
        let readers = SqlitePoolOptions::new()
            .max_connections(pool.max_connections)
            .test_before_acquire(false)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open DATABASE_URL {url}: {e}"))?;
        let (inserts, queue) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(insert_batches(writer.clone(), queue));
        Ok(Self {
            writer,
            readers,
            waiting: Waiting::default(),
            writer_suspect: AtomicBool::new(false),
            inserts,
        })
    }

    /// A transaction on the writer connection; a new connection if the last write failed.
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        let _waiting = self.waiting.enter();
        if self.writer_suspect.swap(false, Ordering::Relaxed) {
            // Closing it lets the pool open a new one for the transaction.
            self.writer.acquire().await?.close().await?;
        }
        Ok(begin(&self.writer).await?)
    }

    /// `write`'s outcome, remembering a failure: the writer connection may be what
    /// failed (SQLite opens a file it cannot write read-only, and it stays so after
    /// the file is fixed), so the next write starts on a new one.
    async fn write<T>(
        &self,
        write: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let outcome = write.await;
        if outcome.is_err() {
            self.writer_suspect.store(true, Ordering::Relaxed);
        }
        outcome
    }

    /// A connection of `pool`, counted as waiting until the pool hands it over.
    async fn conn(&self, pool: &SqlitePool) -> Result<PoolConnection<Sqlite>, StoreError> {
        let _waiting = self.waiting.enter();
        Ok(pool.acquire().await?)
    }
}

async fn begin(writer: &SqlitePool) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    // IMMEDIATE takes the write lock up front, so a transaction never has to upgrade
    // a read lock (which can fail with SQLITE_BUSY whatever the busy timeout).
    writer.begin_with("begin immediate").await
}

/// The group-commit task: takes every queued send (up to [`MAX_BATCH`]), writes them in
/// one transaction and answers each. Ends when the store is dropped.
async fn insert_batches(writer: SqlitePool, mut queue: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let outcomes = insert_batch(&writer, &batch).await;
        for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
            // A caller that gives up from here on may find its message stored, like any
            // commit whose answer was lost; an Idempotency-Key retry replays it.
            let _ = reply.send(outcome);
        }
    }
}

/// One transaction for `batch`; every message's outcome, in order. Should one message
/// make the transaction fail, each is tried again in a transaction of its own, so that
/// it fails alone. A failed transaction wrote nothing: nothing can fail after its commit.
async fn insert_batch(
    writer: &SqlitePool,
    batch: &[Queued],
) -> Vec<Result<InsertOutcome, StoreError>> {
    match insert_together(writer, batch).await {
        Ok(outcomes) => outcomes,
        Err(StoreError::Other(_)) if batch.len() > 1 => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for q in batch {
                outcomes.push(
                    insert_together(writer, std::slice::from_ref(q))
                        .await
                        .and_then(|mut o| o.remove(0)),
                );
            }
            outcomes
        }
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// A message of a batch as the batch's statements read it (`json_each`).
#[derive(serde::Serialize)]
struct BatchRow<'a> {
    id: String,
    convo_id: &'a str,
    seq: i64,
    sender: &'a str,
    blob_key: &'a str,
    size: i64,
    ttl_ms: i64,
    recipients: &'a [String],
    key: Option<&'a str>,
    fingerprint: Option<&'a str>,
    keep_ms: i64,
    /// For the receipt, computed before anything is written: once the transaction
    /// has committed, nothing may fail.
    #[serde(skip)]
    expires_at: DateTime<Utc>,
}

/// What became of one message of a batch before anything is written.
enum Fate<'a> {
    Write(BatchRow<'a>),
    /// The key was used before this batch.
    Taken(PriorRequest),
    /// The key is used by the earlier message at this index of the same batch.
    SameAs(usize),
    /// The caller gave up before the write lock was ours (REQUEST_TIMEOUT,
    /// disconnect) and was answered 503, which promises that nothing was stored.
    Abandoned,
}

/// Write the messages of `batch` in one transaction, in two round trips to SQLite's
/// thread however many there are: one to begin and read, one to write and commit.
/// Err: the transaction failed and wrote nothing; otherwise each message's outcome.
async fn insert_together(
    writer: &SqlitePool,
    batch: &[Queued],
) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
    let mut conn = writer.acquire().await?;
    let outcomes = write_together(&mut conn, batch).await;
    if outcomes.is_err() {
        // A statement failed with the transaction perhaps still open: close the
        // connection (which rolls it back) rather than hand it to the next writer.
        conn.close_on_drop();
    }
    outcomes
}

async fn write_together(
    conn: &mut PoolConnection<Sqlite>,
    batch: &[Queued],
) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
    let messages: Vec<&NewMessage> = batch.iter().map(|(m, _)| m).collect();
    // Idempotency keys used before, by (sender, key), then the time every message of
    // the batch is created at and the conversations' last sequence numbers. The write
    // lock is held from here to the commit, so nobody else moves them meanwhile.
    let keys: Vec<(&str, &str)> = messages
        .iter()
        .filter_map(|m| Some((m.sender.as_str(), m.idempotency.as_ref()?.key.as_str())))
        .collect();
    let convos: Vec<&str> = messages.iter().map(|m| m.convo_id.as_str()).collect();
    let rows = sqlx::query(concat!(
        "begin immediate; \
         select k.* from idempotency_keys k join json_each(?1) j \
         on k.sender = j.value ->> 0 and k.key = j.value ->> 1; \
         select ",
        now!(),
        " as now, coalesce((select json_group_object(convo_id, last_seq) from conversations \
         where convo_id in (select value from json_each(?2))), '{}') as last_seq"
    ))
    .bind(json(&keys)?)
    .bind(json(&convos)?)
    .fetch_all(&mut **conn)
    .await?;
    // The last statement gives exactly one row, the last one.
    let (clock, key_rows) = rows
        .split_last()
        .ok_or_else(|| StoreError::Other("the batch read returned no rows".into()))?;
    let now: i64 = clock.try_get("now")?;
    let mut last_seq: HashMap<String, i64> = serde_json::from_str(clock.try_get("last_seq")?)
        .map_err(|e| StoreError::Other(e.to_string()))?;
    let mut taken = HashMap::new();
    for row in key_rows {
        let sender: String = row.try_get("sender")?;
        let key: String = row.try_get("key")?;
        taken.insert((sender, key), prior(row)?);
    }

    let created_at = ts(now)?;
    let mut claimed = HashMap::new();
    let mut fates = Vec::with_capacity(messages.len());
    for (i, (m, reply)) in batch.iter().enumerate() {
        // The write lock is ours: from here on the batch is as good as committed.
        if reply.is_closed() {
            fates.push(Fate::Abandoned);
            continue;
        }
        let idem = m.idempotency.as_ref();
        if let Some(idem) = idem {
            let id = (m.sender.clone(), idem.key.clone());
            if let Some(prior) = taken.remove(&id) {
                // Later messages of the batch with this key replay the same request.
                claimed.insert(id, i);
                fates.push(Fate::Taken(prior));
                continue;
            }
            if let Some(&first) = claimed.get(&id) {
                fates.push(Fate::SameAs(first));
                continue;
            }
            claimed.insert(id, i);
        }
        let ttl_ms = millis(m.ttl);
        let expires_at = ts(now.saturating_add(ttl_ms))?;
        let seq = last_seq.entry(m.convo_id.clone()).or_insert(0);
        *seq += 1;
        fates.push(Fate::Write(BatchRow {
            id: m.id.to_string(),
            convo_id: &m.convo_id,
            seq: *seq,
            sender: &m.sender,
            blob_key: &m.blob_key,
            size: m.size,
            ttl_ms,
            recipients: &m.recipients,
            key: idem.map(|i| i.key.as_str()),
            fingerprint: idem.map(|i| i.fingerprint.as_str()),
            keep_ms: millis(idempotency_retention(m.ttl)),
            expires_at,
        }));
    }
    let rows: Vec<&BatchRow> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Write(row) => Some(row),
            _ => None,
        })
        .collect();

    // Every statement reads the batch as ?1 and the time as ?2.
    let write = if rows.is_empty() {
        "commit"
    } else {
        "insert into messages (id, convo_id, seq, sender, blob_key, size, created_at, expires_at) \
         select value ->> 'id', value ->> 'convo_id', value ->> 'seq', value ->> 'sender', \
         value ->> 'blob_key', value ->> 'size', ?2, ?2 + (value ->> 'ttl_ms') from json_each(?1); \
         insert into recipients (message_id, recipient, created_at) \
         select m.value ->> 'id', r.value, ?2 from json_each(?1) m, json_each(m.value -> 'recipients') r; \
         insert into idempotency_keys \
         (sender, key, fingerprint, message_id, convo_id, seq, recipients, size, created_at, expires_at, keep_until) \
         select value ->> 'sender', value ->> 'key', value ->> 'fingerprint', value ->> 'id', \
         value ->> 'convo_id', value ->> 'seq', value -> 'recipients', value ->> 'size', \
         ?2, ?2 + (value ->> 'ttl_ms'), ?2 + (value ->> 'keep_ms') \
         from json_each(?1) where value ->> 'key' is not null; \
         insert into conversations (convo_id, last_seq) \
         select value ->> 'convo_id', max(value ->> 'seq') from json_each(?1) where true group by 1 \
         on conflict (convo_id) do update set last_seq = excluded.last_seq; \
         commit"
    };
    sqlx::query(write)
        .bind(json(&rows)?)
        .bind(now)
        .execute(&mut **conn)
        .await?;

    let mut outcomes: Vec<Result<InsertOutcome, StoreError>> = Vec::with_capacity(fates.len());
    for (m, fate) in messages.iter().zip(fates) {
        let outcome = match fate {
            Fate::Write(row) => Ok(InsertOutcome::Created(Receipt {
                id: m.id,
                convo_id: m.convo_id.clone(),
                seq: row.seq,
                sender: m.sender.clone(),
                recipients: m.recipients.clone(),
                size: m.size,
                created_at,
                expires_at: row.expires_at,
            })),
            Fate::Taken(prior) => Ok(InsertOutcome::KeyTaken(prior)),
            Fate::SameAs(first) => match &outcomes[first] {
                Ok(InsertOutcome::Created(receipt)) => Ok(InsertOutcome::KeyTaken(PriorRequest {
                    fingerprint: messages[first]
                        .idempotency
                        .as_ref()
                        .map(|i| i.fingerprint.clone())
                        .unwrap_or_default(),
                    receipt: receipt.clone(),
                })),
                Ok(InsertOutcome::KeyTaken(prior)) => Ok(InsertOutcome::KeyTaken(prior.clone())),
                Err(e) => Err(e.clone()),
            },
            Fate::Abandoned => Err(StoreError::Unavailable(
                "the caller gave up before its send was written".into(),
            )),
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// A bound parameter for `json_each`.
fn json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(e.to_string()))
}

fn ts(ms: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| sqlx::Error::Decode(format!("timestamp {ms} out of range").into()))
}

fn uuid(s: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn meta(row: &SqliteRow) -> Result<MessageMeta, sqlx::Error> {
    Ok(MessageMeta {
        id: uuid(row.try_get("id")?)?,
        convo_id: row.try_get("convo_id")?,
        seq: row.try_get("seq")?,
        sender: row.try_get("sender")?,
        size: row.try_get("size")?,
        created_at: ts(row.try_get("created_at")?)?,
        expires_at: ts(row.try_get("expires_at")?)?,
        blob_key: row.try_get("blob_key")?,
    })
}

fn prior(row: &SqliteRow) -> Result<PriorRequest, sqlx::Error> {
    let recipients: String = row.try_get("recipients")?;
    Ok(PriorRequest {
        fingerprint: row.try_get("fingerprint")?,
        receipt: Receipt {
            id: uuid(row.try_get("message_id")?)?,
            convo_id: row.try_get("convo_id")?,
            seq: row.try_get("seq")?,
            sender: row.try_get("sender")?,
            recipients: serde_json::from_str(&recipients)
                .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            size: row.try_get("size")?,
            created_at: ts(row.try_get("created_at")?)?,
            expires_at: ts(row.try_get("expires_at")?)?,
        },
    })
}

const SELECT_PRIOR: &str = "select fingerprint, message_id, convo_id, seq, sender, recipients, size, created_at, expires_at \
     from idempotency_keys where sender = ? and key = ?";

/// Delete one message row inside `tx` and queue its blob; returns the blob key.
async fn delete_and_queue(
    tx: &mut Transaction<'static, Sqlite>,
    blob_key: String,
) -> Result<String, sqlx::Error> {
    sqlx::query(concat!(
        "insert into blob_deletions (blob_key, queued_at) values (?, ",
        now!(),
        ") on conflict do nothing"
    ))
    .bind(&blob_key)
    .execute(&mut **tx)
    .await?;
    sqlx::query("delete from messages where blob_key = ?")
        .bind(&blob_key)
        .execute(&mut **tx)
        .await?;
    Ok(blob_key)
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1")
            .execute(&mut *self.conn(&self.readers).await?)
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
            .fetch_optional(&mut *self.conn(&self.readers).await?)
            .await?;
        Ok(row.as_ref().map(prior).transpose()?)
    }

    async fn insert_message(&self, m: &NewMessage) -> Result<InsertOutcome, StoreError> {
        let _waiting = self.waiting.enter();
        let (reply, outcome) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the SQLite writer task has stopped".into());
        self.inserts
            .send((m.clone(), reply))
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    async fn get_message(&self, id: Uuid, caller: &str) -> Result<Option<MessageMeta>, StoreError> {
        let row = sqlx::query(concat!(
            "select m.id, m.convo_id, m.seq, m.sender, m.size, m.created_at, m.expires_at, m.blob_key \
             from messages m where m.id = ? and m.expires_at > ",
            now!(),
            " and (m.sender = ? or exists (select 1 from recipients r where r.message_id = m.id and r.recipient = ?))"
        ))
        .bind(id.to_string())
        .bind(caller)
        .bind(caller)
        .fetch_optional(&mut *self.conn(&self.readers).await?)
        .await?;
        Ok(row.as_ref().map(meta).transpose()?)
    }

    async fn pending(&self, q: &PendingQuery<'_>) -> Result<Vec<MessageMeta>, StoreError> {
        let rows = sqlx::query(concat!(
            "select m.id, m.convo_id, m.seq, m.sender, m.size, m.created_at, m.expires_at, m.blob_key \
             from recipients r join messages m on m.id = r.message_id \
             where r.recipient = ? and r.acked_at is null and (r.created_at, r.message_id) > (?, ?) \
             and m.expires_at > ",
            now!(),
            " and (? is null or m.convo_id = ?) \
             order by r.created_at, r.message_id limit ?"
        ))
        .bind(q.recipient)
        .bind(q.after.created_at.timestamp_millis())
        .bind(if q.after.id.is_nil() { String::new() } else { q.after.id.to_string() })
        .bind(q.convo_id)
        .bind(q.convo_id)
        .bind(q.limit)
        .fetch_all(&mut *self.conn(&self.readers).await?)
        .await?;
        Ok(rows.iter().map(meta).collect::<Result<_, _>>()?)
    }

    async fn ack(
        &self,
        recipient: &str,
        ids: &[Uuid],
        delete_delivered: bool,
    ) -> Result<AckOutcome, StoreError> {
        self.write(async {
            let mut tx = self.begin().await?;
            let mut out = AckOutcome::default();
            for id in ids {
                let hit = sqlx::query(concat!(
                    "update recipients set acked_at = coalesce(acked_at, ",
                    now!(),
                    ") where message_id = ? and recipient = ? \
                     and exists (select 1 from messages m where m.id = recipients.message_id and m.expires_at > ",
                    now!(),
                    ") returning message_id"
                ))
                .bind(id.to_string())
                .bind(recipient)
                .fetch_optional(&mut *tx)
                .await?;
                if hit.is_none() {
                    continue;
                }
                out.acked.push(*id);
                if delete_delivered {
                    let delivered: Option<String> = sqlx::query_scalar(
                        "select blob_key from messages m where m.id = ? \
                         and not exists (select 1 from recipients r where r.message_id = m.id and r.acked_at is null)",
                    )
                    .bind(id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                    if let Some(key) = delivered {
                        out.freed_blobs.push(delete_and_queue(&mut tx, key).await?);
                    }
                }
            }
            tx.commit().await?;
            Ok(out)
        })
        .await
    }

    async fn delete_message(&self, id: Uuid, sender: &str) -> Result<Option<String>, StoreError> {
        self.write(async {
            let mut tx = self.begin().await?;
            let key: Option<String> = sqlx::query_scalar(concat!(
                "select blob_key from messages where id = ? and sender = ? and expires_at > ",
                now!()
            ))
            .bind(id.to_string())
            .bind(sender)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(key) = key else { return Ok(None) };
            let key = delete_and_queue(&mut tx, key).await?;
            tx.commit().await?;
            Ok(Some(key))
        })
        .await
    }

    async fn collect(&self, delete_delivered: bool, limit: i64) -> Result<Collected, StoreError> {
        self.write(async {
            let mut tx = self.begin().await?;
            let expired: Vec<String> = sqlx::query_scalar(concat!(
                "select blob_key from messages where expires_at <= ",
                now!(),
                " order by expires_at limit ?"
            ))
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let delivered: Vec<String> = if delete_delivered {
                sqlx::query_scalar(
                    "select blob_key from messages m \
                     where not exists (select 1 from recipients r where r.message_id = m.id and r.acked_at is null) limit ?",
                )
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?
            } else {
                Vec::new()
            };
            let mut collected = Collected::default();
            for key in expired {
                delete_and_queue(&mut tx, key).await?;
                collected.expired += 1;
            }
            for key in delivered {
                // May have been counted as expired just above; then it is already gone.
                let gone =
                    sqlx::query_scalar::<_, i64>("select count(*) from messages where blob_key = ?")
                        .bind(&key)
                        .fetch_one(&mut *tx)
                        .await?
                        == 0;
                if !gone {
                    delete_and_queue(&mut tx, key).await?;
                    collected.delivered += 1;
                }
            }
            collected.idempotency_keys = sqlx::query(concat!(
                "delete from idempotency_keys where keep_until <= ",
                now!()
            ))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok(collected)
        })
        .await
    }

    async fn queued_blob_deletions(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("select blob_key from blob_deletions order by queued_at limit ?")
                .bind(limit)
                .fetch_all(&mut *self.conn(&self.readers).await?)
                .await?,
        )
    }

    async fn forget_blob_deletions(&self, keys: &[String]) -> Result<(), StoreError> {
        self.write(async {
            if keys.is_empty() {
                return Ok(());
            }
            let json = json(keys)?;
            sqlx::query(
                "delete from blob_deletions where blob_key in (select value from json_each(?))",
            )
            .bind(json)
            .execute(&mut *self.conn(&self.writer).await?)
            .await?;
            Ok(())
        })
        .await
    }

    async fn referenced_blobs(&self, keys: &[String]) -> Result<HashSet<String>, StoreError> {
        let json = json(keys)?;
        let found: Vec<String> = sqlx::query_scalar(
            "select blob_key from messages where blob_key in (select value from json_each(?))",
        )
        .bind(json)
        .fetch_all(&mut *self.conn(&self.readers).await?)
        .await?;
        Ok(found.into_iter().collect())
    }

    async fn backlog(&self) -> Result<(i64, Option<DateTime<Utc>>), StoreError> {
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(concat!(
            "select count(*), min(r.created_at) from recipients r join messages m on m.id = r.message_id \
             where r.acked_at is null and m.expires_at > ",
            now!()
        ))
        .fetch_one(&mut *self.conn(&self.readers).await?)
        .await?;
        Ok((count, oldest.map(ts).transpose()?))
    }

    fn connections(&self) -> Connections {
        let (open, idle) = [&self.writer, &self.readers]
            .iter()
            .fold((0, 0), |(o, i), p| (o + p.size(), i + p.num_idle() as u32));
        Connections {
            open,
            in_use: open.saturating_sub(idle),
            waiting: self.waiting.get(),
        }
    }
}
