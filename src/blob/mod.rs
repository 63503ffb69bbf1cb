//! `BlobStore`: the ciphertext seam. Each payload is stored under a fresh random UUIDv4
//! key that the store picks and the database records; clients never see it.

mod fs;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use fs::FsBlobStore;

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

    /// Cheap check that the store answers, for `/readyz`.
    async fn ping(&self) -> Result<(), BlobError>;
}

/// Build the blob store chosen by `BLOB_BACKEND`.
pub async fn from_config(config: &Config) -> Result<Arc<dyn BlobStore>, anyhow::Error> {
    match config.blob_backend {
        BlobBackend::Filesystem => Ok(Arc::new(FsBlobStore::open(&config.blob_dir)?)),
        BlobBackend::R2 => anyhow::bail!(
            "BLOB_BACKEND=r2 is not available in this build yet; use BLOB_BACKEND=filesystem"
        ),
    }
}
