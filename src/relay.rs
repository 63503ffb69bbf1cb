//! The relay's use cases over the two seams: store, fetch, list, acknowledge, withdraw.
//!
//! Write order is the one rule that keeps nothing lost and nothing leaked: blob first,
//! then one short database transaction (no connection is held while blob I/O runs);
//! if the transaction fails the blob is deleted again. Deleting a message queues its
//! blob in the same transaction, so a crash never leaves a blob nobody will remove.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::blob::{BlobError, BlobStore};
use crate::error::ApiError;
use crate::metrics::{MessageEvent, Metrics};
use crate::store::{
    Cursor, Idempotency, InsertOutcome, MessageMeta, MessageStore, NewMessage, PendingQuery,
    Receipt,
};

/// Payload bytes all `include_data` pages together may hold in memory: 64 MiB.
const PAGE_MEMORY_KIB: u32 = 64 * 1024;

/// Concurrent blob reads for one `include_data` page.
const PAGE_FETCH_CONCURRENCY: usize = 8;

/// Limits and policies the relay enforces.
#[derive(Debug, Clone)]
pub struct Policy {
    pub message_ttl: Duration,
    pub max_message_bytes: u64,
    pub max_recipients: u64,
    pub delete_on_delivery: bool,
    /// Stop adding messages to an `include_data` page once it holds this many bytes.
    pub page_data_budget: u64,
    /// Unreferenced blobs younger than this are left alone (a send may be in flight).
    pub orphan_grace: Duration,
}

pub struct Relay {
    pub store: Arc<dyn MessageStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub policy: Policy,
    pub metrics: Metrics,
    /// Payload bytes (in KiB permits) that `include_data` pages may hold at once, so
    /// many concurrent pages wait instead of growing memory without bound.
    page_memory: Arc<Semaphore>,
}

/// A validated send request.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub sender: String,
    pub convo_id: String,
    /// De-duplicated, in the sender's order.
    pub recipients: Vec<String>,
    pub payload: Bytes,
    pub idempotency_key: Option<String>,
}

pub struct Sent {
    pub receipt: Receipt,
    /// True when this is a replay of an earlier request with the same idempotency key.
    pub replayed: bool,
}

pub struct Page {
    pub messages: Vec<(MessageMeta, Option<Bytes>)>,
    pub next: Option<Cursor>,
    /// Held until the handler has turned the page into its response (base64 built).
    _memory: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// Everything that makes two requests "the same request" for an idempotency key.
    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for part in [self.convo_id.as_bytes(), &self.payload] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        for r in &self.recipients {
            h.update((r.len() as u64).to_be_bytes());
            h.update(r.as_bytes());
        }
        format!("{:x}", h.finalize())
    }
}

impl Relay {
    pub fn new(store: Arc<dyn MessageStore>, blobs: Arc<dyn BlobStore>, policy: Policy) -> Self {
        let page_memory = Arc::new(Semaphore::new(PAGE_MEMORY_KIB as usize));
        let metrics = Metrics::new(blobs.ops().family());
        Self {
            store,
            blobs,
            policy,
            metrics,
            page_memory,
        }
    }

    pub async fn send(&self, out: Outgoing) -> Result<Sent, ApiError> {
        let idempotency = out.idempotency_key.as_ref().map(|key| Idempotency {
            key: key.clone(),
            fingerprint: out.fingerprint(),
        });
        if let Some(idem) = &idempotency
            && let Some(prior) = self.store.find_idempotent(&out.sender, &idem.key).await?
        {
            return replay(prior.fingerprint == idem.fingerprint, prior.receipt);
        }

        let size = out.payload.len() as i64;
        let blob_key = self.blobs.put(out.payload).await?;
        let new = NewMessage {
            id: Uuid::now_v7(),
            convo_id: out.convo_id,
            sender: out.sender,
            recipients: out.recipients,
            blob_key,
            size,
            ttl: self.policy.message_ttl,
            idempotency,
        };
        match self.store.insert_message(&new).await {
            Ok(InsertOutcome::Created(receipt)) => {
                self.metrics.message(MessageEvent::Stored, 1);
                Ok(Sent {
                    receipt,
                    replayed: false,
                })
            }
            Ok(InsertOutcome::KeyTaken(prior)) => {
                self.discard_blob(&new.blob_key).await;
                let same =
                    Some(&prior.fingerprint) == new.idempotency.as_ref().map(|i| &i.fingerprint);
                replay(same, prior.receipt)
            }
            Err(e) => {
                self.discard_blob(&new.blob_key).await;
                Err(e.into())
            }
        }
    }

    /// Compensation for a send that did not commit. If this fails too, the blob is an
    /// orphan: no row names it, and clean-up removes it once it is older than
    /// `ORPHAN_GRACE`.
    async fn discard_blob(&self, key: &str) {
        if let Err(e) = self.blobs.delete_many(&[key.to_owned()]).await {
            tracing::warn!(error = %e, "could not delete the blob of a failed send; clean-up will");
        }
    }

    pub async fn fetch(&self, caller: &str, id: Uuid) -> Result<(MessageMeta, Bytes), ApiError> {
        let meta = self
            .store
            .get_message(id, caller)
            .await?
            .ok_or(ApiError::NotFound)?;
        let data = self.read_blob(&meta).await?;
        Ok((meta, data))
    }

    async fn read_blob(&self, meta: &MessageMeta) -> Result<Bytes, ApiError> {
        match self.blobs.get(&meta.blob_key).await {
            Ok(data) => Ok(data),
            Err(BlobError::NotFound(_)) => {
                tracing::error!(message_id = %meta.id, "message row exists but its blob is missing");
                Err(ApiError::NotFound)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn pending(
        &self,
        caller: &str,
        convo_id: Option<&str>,
        after: Cursor,
        limit: i64,
        include_data: bool,
    ) -> Result<Page, ApiError> {
        let rows = self
            .store
            .pending(&PendingQuery {
                recipient: caller,
                convo_id,
                after,
                limit: limit + 1,
            })
            .await?;
        let more = rows.len() as i64 > limit;
        let mut rows: Vec<MessageMeta> = rows.into_iter().take(limit as usize).collect();
        let mut truncated = false;
        if include_data {
            // Bound the page's size in memory: stop at the budget (always at least one).
            let mut total = 0u64;
            let keep = rows
                .iter()
                .take_while(|m| {
                    let fits = total == 0 || total + m.size as u64 <= self.policy.page_data_budget;
                    total += m.size as u64;
                    fits
                })
                .count();
            truncated = keep < rows.len();
            rows.truncate(keep);
        }
        let next = if more || truncated {
            rows.last().map(Cursor::after)
        } else {
            None
        };
        let memory = if include_data {
            let kib: u64 = rows.iter().map(|m| (m.size as u64).div_ceil(1024)).sum();
            let kib = u32::try_from(kib)
                .unwrap_or(u32::MAX)
                .clamp(1, PAGE_MEMORY_KIB);
            let permit = self.page_memory.clone().acquire_many_owned(kib).await;
            Some(permit.expect("the semaphore is never closed"))
        } else {
            None
        };
        let messages = if include_data {
            futures::stream::iter(rows)
                .map(|m| async move {
                    match self.read_blob(&m).await {
                        Ok(data) => Ok(Some((m, Some(data)))),
                        // Logged by read_blob; leave it out rather than fail the page.
                        Err(ApiError::NotFound) => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .buffered(PAGE_FETCH_CONCURRENCY)
                .try_filter_map(|x| async move { Ok(x) })
                .try_collect()
                .await?
        } else {
            rows.into_iter().map(|m| (m, None)).collect()
        };
        Ok(Page {
            messages,
            next,
            _memory: memory,
        })
    }

    /// Acknowledge `ids` (de-duplicated by the caller); returns those that were found.
    pub async fn ack(&self, caller: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, ApiError> {
        let outcome = self
            .store
            .ack(caller, ids, self.policy.delete_on_delivery)
            .await?;
        self.metrics
            .message(MessageEvent::Acknowledged, outcome.acked.len() as u64);
        self.metrics
            .message(MessageEvent::Deleted, outcome.freed_blobs.len() as u64);
        self.purge_blobs(outcome.freed_blobs);
        Ok(outcome.acked)
    }

    pub async fn withdraw(&self, caller: &str, id: Uuid) -> Result<(), ApiError> {
        let key = self
            .store
            .delete_message(id, caller)
            .await?
            .ok_or(ApiError::NotFound)?;
        self.metrics.message(MessageEvent::Deleted, 1);
        self.purge_blobs(vec![key]);
        Ok(())
    }

    /// Delete blobs whose rows are gone, without making the client wait. They are
    /// already queued in the database, so if this fails (or the process dies first)
    /// the next clean-up pass deletes them.
    fn purge_blobs(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let (store, blobs) = (self.store.clone(), self.blobs.clone());
        tokio::spawn(async move {
            match blobs.delete_many(&keys).await {
                Ok(gone) => {
                    if let Err(e) = store.forget_blob_deletions(&gone).await {
                        tracing::warn!(error = %e, "blobs deleted but still queued; clean-up will forget them");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not delete blobs now; clean-up will retry")
                }
            }
        });
    }
}

fn replay(same_request: bool, receipt: Receipt) -> Result<Sent, ApiError> {
    if same_request {
        Ok(Sent {
            receipt,
            replayed: true,
        })
    } else {
        Err(ApiError::IdempotencyConflict)
    }
}
