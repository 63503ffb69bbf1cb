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

use super::{BlobError, BlobOp, BlobPage, BlobStore, OpCounter, is_blob_name};

/// The file readiness checks create and remove in BLOB_DIR (never a blob: not a shard).
const PROBE: &str = ".readyz-probe";

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

/// An I/O error naming the file or folder it happened to.
fn io_error_at(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobError {
    let what = format!("cannot {what} {}", path.display());
    move |e| BlobError::Unavailable(format!("{what}: {e}"))
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
                io_error_at("write", &path)(e)
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
            Err(e) => Err(io_error_at("read", &path)(e)),
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
                .map_err(io_error_at("list", &root))?
                .flatten()
                // Shard folders only, as `path` names them: not a file or a symlink that
                // happens to have such a name (a symlink could lead the sweep elsewhere).
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    n.len() == 2 && n.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                })
                .filter(|n| page.as_ref().is_none_or(|after| n > after))
                .collect();
            shards.sort();
            let Some(shard) = shards.first() else {
                return Ok(BlobPage::default());
            };
            let mut blobs = Vec::new();
            let folder = root.join(shard);
            for entry in std::fs::read_dir(&folder)
                .map_err(io_error_at("list", &folder))?
                .flatten()
            {
                let (Ok(name), Ok(meta)) = (entry.file_name().into_string(), entry.metadata())
                else {
                    continue;
                };
                // Only files `path` would give a blob: anything else here is not ours,
                // and the sweep must not delete it (or count a delete of another path).
                if !(meta.is_file() && is_blob_name(&name) && name.starts_with(shard.as_str())) {
                    continue;
                }
                let modified = meta
                    .modified()
                    .map_err(io_error_at("stat", &entry.path()))?;
                blobs.push((name, modified));
            }
            let next = (shards.len() > 1).then(|| shard.clone());
            Ok(BlobPage { blobs, next })
        })
        .await
    }

    /// Ready when a file can be created in BLOB_DIR (a folder that is there but
    /// read-only, or on a full disk's inode table, fails every send).
    async fn ping(&self) -> Result<(), BlobError> {
        let probe = self.root.join(PROBE);
        self.blocking(BlobOp::Head, move || {
            std::fs::File::create(&probe).map_err(io_error_at("create", &probe))?;
            match std::fs::remove_file(&probe) {
                // Another readiness check running at the same time removed it.
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_error_at("remove", &probe)(e)),
                _ => Ok(()),
            }
        })
        .await
    }

    fn ops(&self) -> &OpCounter {
        &self.ops
    }
}
