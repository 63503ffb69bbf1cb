//! `BlobStore`: the ciphertext seam. Each payload is stored under a fresh random UUIDv4
//! key that the store picks and the database records; clients never see it.

mod fs;
mod s3;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub use fs::FsBlobStore;
pub use s3::{S3BlobStore, S3Settings};

use crate::config::{BlobBackend, Config};
pub use crate::metrics::BlobOp;
use crate::metrics::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No object under this key (deleted out of band, or never written).
    #[error("blob {0} not found")]
    NotFound(String),
    /// The store cannot be reached, refused, or timed out: retryable.
    #[error("blob store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Store `data` under a new key and return the key once the bytes are durable.
    async fn put(&self, data: Bytes) -> Result<String, BlobError>;

    /// The bytes stored under `key`.
    async fn get(&self, key: &str) -> Result<Bytes, BlobError>;

    /// Delete `keys`; returns the keys that are now gone (already-missing ones count as
    /// gone). Keys not returned failed and should be retried later.
    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, BlobError>;

    /// One page of stored blobs with their last-modified times, for the orphan sweep;
    /// pass the returned `next` to get the following page. Only names this store could
    /// have given a blob ([`is_blob_name`]): the sweep deletes what it lists.
    async fn list(&self, page: Option<String>) -> Result<BlobPage, BlobError>;

    /// Cheap check that the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), BlobError>;

    /// Requests made so far, by kind and outcome: what an object store bills.
    fn ops(&self) -> &OpCounter;

    /// [`BlobStore::ops`] by kind.
    fn operations(&self) -> OpCounts {
        self.ops().snapshot()
    }
}

#[derive(Debug, Default)]
pub struct BlobPage {
    pub blobs: Vec<(String, SystemTime)>,
    pub next: Option<String>,
}

/// Object-store requests by kind, retries included. R2 bills PUT and LIST as Class A,
/// GET and HEAD as Class B; DELETE is free. One DeleteObjects request counts once,
/// whatever its size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OpCounts {
    pub put: u64,
    pub get: u64,
    pub delete: u64,
    pub list: u64,
    pub head: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlobOpLabels {
    pub kind: BlobOp,
    pub outcome: Outcome,
}

/// The `catbird_blob_operations_total` counters.
pub type OpFamily = Family<BlobOpLabels, Counter>;

/// Requests a blob store made, by kind and outcome; also the metric behind them.
#[derive(Debug, Default, Clone)]
pub struct OpCounter(OpFamily);

impl OpCounter {
    pub(crate) fn record(&self, kind: BlobOp, ok: bool) {
        let outcome = if ok { Outcome::Ok } else { Outcome::Error };
        self.0.get_or_create(&BlobOpLabels { kind, outcome }).inc();
    }

    pub fn family(&self) -> &OpFamily {
        &self.0
    }

    /// Requests by kind, whatever their outcome.
    pub fn snapshot(&self) -> OpCounts {
        let count = |kind| {
            [Outcome::Ok, Outcome::Error]
                .into_iter()
                .map(|outcome| self.0.get_or_create(&BlobOpLabels { kind, outcome }).get())
                .sum()
        };
        OpCounts {
            put: count(BlobOp::Put),
            get: count(BlobOp::Get),
            delete: count(BlobOp::Delete),
            list: count(BlobOp::List),
            head: count(BlobOp::Head),
        }
    }
}

/// Build the blob store chosen by `BLOB_BACKEND`.
pub async fn from_config(config: &Config) -> Result<Arc<dyn BlobStore>, anyhow::Error> {
    match config.blob_backend {
        BlobBackend::Filesystem => Ok(Arc::new(FsBlobStore::open(&config.blob_dir)?)),
        BlobBackend::R2 => Ok(Arc::new(S3BlobStore::new(&S3Settings::from_config(
            config,
        )?))),
    }
}

/// Whether `name` is a blob's own name (R2: the key without the prefix): a UUID in its
/// canonical form, as [`BlobStore::put`] writes them.
pub fn is_blob_name(name: &str) -> bool {
    name.len() == 36
        && uuid::Uuid::parse_str(name).is_ok_and(|u| u.hyphenated().to_string() == name)
}
