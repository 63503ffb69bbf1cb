//! Filesystem `BlobStore`: the embedded default.
//!
//! `BLOB_DIR/ab/<uuid>`, sharded by the first two hex digits. A put writes a temporary
//! file in `BLOB_DIR/.tmp`, fsyncs it, renames it into place and fsyncs the folder, so a
//! key the database records always names a complete file, even after a crash.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use super::{BlobError, BlobOp, BlobPage, BlobStore, OpCounter};

/// Folder of files being written; renamed into a shard once complete.
const TMP: &str = ".tmp";

pub struct FsBlobStore {
    root: PathBuf,
    ops: OpCounter,
}

impl FsBlobStore {
    pub fn open(root: &Path) -> Result<Self, anyhow::Error> {
        std::fs::create_dir_all(root.join(TMP))
            .map_err(|e| anyhow::anyhow!("cannot create BLOB_DIR {}: {e}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            ops: OpCounter::default(),
        })
    }

    /// The file of `key`; keys are UUIDs, so nothing else can name a path.
    /// Temporary files are listed (and deleted by the orphan sweep) as `.tmp/<uuid>`:
    /// a put cut short by a crash leaves one behind.
    fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        let (dir, id) = match key.strip_prefix(".tmp/") {
            Some(id) => (Some(TMP), id),
            None => (None, key),
        };
        let id = Uuid::parse_str(id).map_err(|_| BlobError::NotFound(key.to_owned()))?;
        let name = id.hyphenated().to_string();
        Ok(self.root.join(dir.unwrap_or(&name[..2])).join(name))
    }
}

fn io_error(e: std::io::Error) -> BlobError {
    BlobError::Unavailable(e.to_string())
}

impl FsBlobStore {
    /// Run file I/O off the async threads, counting it as one `kind` operation.
    async fn blocking<T: Send + 'static>(
        &self,
        kind: BlobOp,
        f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
    ) -> Result<T, BlobError> {
        let result = tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| BlobError::Other(e.to_string()))
            .and_then(|r| r);
        self.ops.record(kind, result.is_ok());
        result
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn put(&self, data: Bytes) -> Result<String, BlobError> {
        let key = Uuid::new_v4().to_string();
        let path = self.path(&key)?;
        let tmp = self.root.join(TMP).join(&key);
        self.blocking(BlobOp::Put, move || {
            let dir = path.parent().expect("sharded path has a parent");
            std::fs::create_dir_all(dir).map_err(io_error)?;
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()
            };
            write().map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io_error(e)
            })?;
            Ok(key)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let path = self.path(key)?;
        let key = key.to_owned();
        self.blocking(BlobOp::Get, move || match std::fs::read(&path) {
            Ok(data) => Ok(Bytes::from(data)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(BlobError::NotFound(key)),
            Err(e) => Err(io_error(e)),
        })
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, BlobError> {
        let paths: Vec<_> = keys
            .iter()
            .map(|k| (k.clone(), self.path(k).ok()))
            .collect();
        self.blocking(BlobOp::Delete, move || {
            let mut gone = Vec::with_capacity(paths.len());
            for (key, path) in paths {
                match path.map(std::fs::remove_file) {
                    None | Some(Ok(())) => gone.push(key),
                    Some(Err(e)) if e.kind() == ErrorKind::NotFound => gone.push(key),
                    Some(Err(e)) => {
                        tracing::warn!(%key, error = %e, "could not delete blob; will retry")
                    }
                }
            }
            Ok(gone)
        })
        .await
    }

    /// One shard folder per page, so memory stays bounded by 1/256 of the blobs.
    async fn list(&self, page: Option<String>) -> Result<BlobPage, BlobError> {
        let root = self.root.clone();
        self.blocking(BlobOp::List, move || {
            let mut shards: Vec<String> = std::fs::read_dir(&root)
                .map_err(io_error)?
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n == TMP || (n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit())))
                .filter(|n| page.as_ref().is_none_or(|after| n > after))
                .collect();
            shards.sort();
            let Some(shard) = shards.first() else {
                return Ok(BlobPage::default());
            };
            let mut blobs = Vec::new();
            for entry in std::fs::read_dir(root.join(shard))
                .map_err(io_error)?
                .flatten()
            {
                let (Ok(name), Ok(meta)) = (entry.file_name().into_string(), entry.metadata())
                else {
                    continue;
                };
                let key = if shard == TMP {
                    format!("{TMP}/{name}")
                } else {
                    name
                };
                blobs.push((key, meta.modified().map_err(io_error)?));
            }
            let next = (shards.len() > 1).then(|| shard.clone());
            Ok(BlobPage { blobs, next })
        })
        .await
    }

    async fn ping(&self) -> Result<(), BlobError> {
        let tmp = self.root.join(TMP);
        self.blocking(BlobOp::Head, move || {
            std::fs::metadata(&tmp).map(|_| ()).map_err(io_error)
        })
        .await
    }

    fn ops(&self) -> &OpCounter {
        &self.ops
    }
}
