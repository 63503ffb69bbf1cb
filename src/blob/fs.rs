//! Filesystem `BlobStore`: the embedded default.
//!
//! `BLOB_DIR/ab/<uuid>`, sharded by the first two hex digits. A put creates the file
//! under its final name, fsyncs it and then its folder, and only then returns the key:
//! the database records a key after that, so a recorded key always names a complete
//! file, even after a crash. A put cut short by a crash leaves a partial file that no
//! row names; the orphan sweep removes it once it is older than `ORPHAN_GRACE`.
//!
//! No temporary folder and no rename: with one folder for every file being written,
//! concurrent puts queued on that folder's lock and on the filesystem-wide lock of
//! cross-folder renames (BENCHMARKS.md has the profile).

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use super::{BlobError, BlobOp, BlobPage, BlobStore, OpCounter};

pub struct FsBlobStore {
    root: PathBuf,
    ops: OpCounter,
}

impl FsBlobStore {
    pub fn open(root: &Path) -> Result<Self, anyhow::Error> {
        std::fs::create_dir_all(root)
            .map_err(|e| anyhow::anyhow!("cannot create BLOB_DIR {}: {e}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            ops: OpCounter::default(),
        })
    }

    /// The file of `key`; keys are UUIDs, so nothing else can name a path.
    fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        let id = Uuid::parse_str(key).map_err(|_| BlobError::NotFound(key.to_owned()))?;
        let name = id.hyphenated().to_string();
        Ok(self.root.join(&name[..2]).join(name))
    }
}

/// Create `path` (which must not exist yet) with `data`, durably: the file's bytes and
/// size, then its folder's entry. The shard folder is made on first use.
fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("sharded path has a parent");
    let create = || std::fs::File::create_new(path);
    let mut f = match create() {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            create()?
        }
        other => other?,
    };
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
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
        self.blocking(BlobOp::Put, move || {
            write_new(&path, &data).map_err(|e| {
                let _ = std::fs::remove_file(&path);
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
                .filter(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()))
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
                blobs.push((name, meta.modified().map_err(io_error)?));
            }
            let next = (shards.len() > 1).then(|| shard.clone());
            Ok(BlobPage { blobs, next })
        })
        .await
    }

    async fn ping(&self) -> Result<(), BlobError> {
        let root = self.root.clone();
        self.blocking(BlobOp::Head, move || match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(BlobError::Unavailable(format!(
                "BLOB_DIR {} is not a folder",
                root.display()
            ))),
            Err(e) => Err(io_error(e)),
        })
        .await
    }

    fn ops(&self) -> &OpCounter {
        &self.ops
    }
}
