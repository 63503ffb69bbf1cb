//! `BlobStore`: the ciphertext seam. Each payload is stored under a fresh random UUIDv4
//! key that the store picks and the database records; clients never see it.

mod fs;
mod s3;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use fs::FsBlobStore;
pub use s3::{S3BlobStore, S3Settings};

use crate::config::{BlobBackend, Config};

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
    /// pass the returned `next` to get the following page.
    async fn list(&self, page: Option<String>) -> Result<BlobPage, BlobError>;

    /// Cheap check that the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), BlobError>;

    /// Requests made so far, by kind: what an object store bills.
    fn operations(&self) -> OpCounts;
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

#[derive(Debug, Default)]
pub(crate) struct OpCounter {
    put: AtomicU64,
    get: AtomicU64,
    delete: AtomicU64,
    list: AtomicU64,
    head: AtomicU64,
}

impl OpCounter {
    pub(crate) fn put(&self) {
        self.put.fetch_add(1, Relaxed);
    }
    pub(crate) fn get(&self) {
        self.get.fetch_add(1, Relaxed);
    }
    pub(crate) fn delete(&self) {
        self.delete.fetch_add(1, Relaxed);
    }
    pub(crate) fn list(&self) {
        self.list.fetch_add(1, Relaxed);
    }
    pub(crate) fn head(&self) {
        self.head.fetch_add(1, Relaxed);
    }
    pub(crate) fn snapshot(&self) -> OpCounts {
        OpCounts {
            put: self.put.load(Relaxed),
            get: self.get.load(Relaxed),
            delete: self.delete.load(Relaxed),
            list: self.list.load(Relaxed),
            head: self.head.load(Relaxed),
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
