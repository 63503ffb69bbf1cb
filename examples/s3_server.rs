//! A local S3-compatible server for benchmarks and manual runs of the production shape:
//! `s3s` (the S3 protocol, SigV4 checked) over a lean folder store that does only what
//! catbird-server asks of R2: PutObject, GetObject, DeleteObject(s), ListObjectsV2 and
//! HeadBucket. Not for production: no fsync, no lifecycle API, no multipart uploads.
//!
//! Why not `s3s-fs` (which the test suite runs in-process, and which checks integrity
//! headers): it writes every object, a temporary file and a metadata file through
//! shared folders and a cross-folder rename, so on two cores it spent 0.7 ms of CPU per
//! PUT, most of it waiting on those folders' locks: more than catbird-server itself.
//! R2's own cost is on Cloudflare's machines, so the stand-in should cost as little of
//! ours as it can (BENCHMARKS.md).
//!
//! ```sh
//! cargo run --release --example s3_server -- --dir /tmp/s3 --port 9000
//! # then, for catbird-server:
//! BLOB_BACKEND=r2 R2_ENDPOINT=http://127.0.0.1:9000 R2_BUCKET=catbird \
//!   R2_ACCESS_KEY_ID=local-access-key R2_SECRET_ACCESS_KEY=local-secret-key cargo run --release
//! ```

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use clap::Parser;
use futures::TryStreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
struct Args {
    /// Folder holding the buckets (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Bucket created at start.
    #[arg(long, default_value = "catbird")]
    bucket: String,
    #[arg(long, default_value = "local-access-key")]
    access_key: String,
    #[arg(long, default_value = "local-secret-key")]
    secret_key: String,
}

fn main() -> anyhow::Result<()> {
    // Named threads: profiles tell this program from the server.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("s3-server")
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = Store {
        root: args.dir.clone(),
    };
    store
        .create_bucket(&args.bucket)
        .map_err(|e| anyhow::anyhow!("cannot serve {}: {e}", args.dir.display()))?;
    let mut builder = S3ServiceBuilder::new(store);
    builder.set_auth(SimpleAuth::from_single(
        args.access_key.as_str(),
        args.secret_key.as_str(),
    ));
    let service = builder.build();
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    eprintln!(
        "S3 endpoint http://{} (bucket {:?}, folder {})",
        listener.local_addr()?,
        args.bucket,
        args.dir.display()
    );
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        // Without it, small GETs wait ~25 ms on Nagle's algorithm.
        socket.set_nodelay(true)?;
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// `root/<bucket>/<folder>/<shard>/<name>`, where a key `a/b/name` has the folder
/// `a%2Fb%2F` (everything up to its last `/`, percent-encoded; `_` when there is none)
/// and one of 256 shards by a hash of the key: concurrent PUTs rarely share a folder,
/// and listing a prefix such as `R2_PREFIX` reads only that prefix's folder.
struct Store {
    root: PathBuf,
}

const SHARDS: usize = 256;

/// The folder of keys without a `/`.
const NO_FOLDER: &str = "_";

impl Store {
    fn create_bucket(&self, bucket: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.root.join(bucket))
    }

    fn bucket(&self, bucket: &str) -> S3Result<PathBuf> {
        let path = self.root.join(bucket);
        if bucket.contains(['/', '\\']) || bucket.starts_with('.') || !path.is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        Ok(path)
    }

    fn object(&self, bucket: &str, key: &str) -> S3Result<PathBuf> {
        let (folder, name) = match key.rfind('/') {
            Some(i) => (encode(&key[..=i]), encode(&key[i + 1..])),
            None => (NO_FOLDER.to_owned(), encode(key)),
        };
        // FNV-1a: any stable spread will do.
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Ok(self
            .bucket(bucket)?
            .join(folder)
            .join(format!("{:02x}", hash as usize % SHARDS))
            .join(name))
    }
}

/// Text as one file name: bytes outside `[A-Za-z0-9_-]` become `%XX`.
fn encode(text: &str) -> String {
    let mut name = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

fn decode(name: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

fn internal(e: impl std::fmt::Display) -> S3Error {
    S3Error::with_message(S3ErrorCode::InternalError, e.to_string())
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> S3Result<T> + Send + 'static,
) -> S3Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

/// One page of the keys in the bucket folder `dir` that start with `prefix` and sort
/// after `after`: at most `max` of them in order, with their files, and whether more
/// follow. Only the folders that can hold such keys are read.
fn list(
    dir: &Path,
    prefix: &str,
    after: Option<&str>,
    max: usize,
) -> std::io::Result<(Vec<(String, PathBuf)>, bool)> {
    let mut keys = Vec::new();
    for folder in std::fs::read_dir(dir)? {
        let folder = folder?;
        let Some(name) = folder.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let path = if name == NO_FOLDER {
            String::new()
        } else {
            match decode(&name) {
                Some(path) => path,
                None => continue,
            }
        };
        if !(path.starts_with(prefix) || prefix.starts_with(&path)) {
            continue;
        }
        for shard in std::fs::read_dir(folder.path())? {
            for file in std::fs::read_dir(shard?.path())? {
                let file = file?;
                let Some(key) = file.file_name().to_str().and_then(decode) else {
                    continue;
                };
                let key = path.clone() + &key;
                if key.starts_with(prefix) && after.is_none_or(|a| key.as_str() > a) {
                    keys.push((key, file.path()));
                }
            }
        }
    }
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let more = keys.len() > max;
    keys.truncate(max);
    Ok((keys, more))
}

#[async_trait::async_trait]
impl S3 for Store {
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.bucket(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let input = req.input;
        let path = self.object(&input.bucket, &input.key)?;
        let mut data = BytesMut::new();
        if let Some(mut body) = input.body {
            while let Some(chunk) = body.try_next().await.map_err(internal)? {
                data.extend_from_slice(&chunk);
            }
        }
        let etag = format!("{:x}", data.len());
        blocking(move || {
            let write = || std::fs::write(&path, &data);
            match write() {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    // The first key of its folder and shard.
                    std::fs::create_dir_all(path.parent().expect("object paths have a folder"))
                        .and_then(|()| write())
                }
                other => other,
            }
            .map_err(internal)
        })
        .await?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let path = self.object(&req.input.bucket, &req.input.key)?;
        let data = blocking(move || match std::fs::read(&path) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(s3_error!(NoSuchKey)),
            Err(e) => Err(internal(e)),
        })
        .await?;
        Ok(S3Response::new(GetObjectOutput {
            content_length: Some(data.len() as i64),
            body: Some(StreamingBlob::from(s3s::Body::from(data))),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let path = self.object(&req.input.bucket, &req.input.key)?;
        blocking(move || remove(&path)).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        let paths = input
            .delete
            .objects
            .iter()
            .map(|o| self.object(&input.bucket, &o.key))
            .collect::<S3Result<Vec<_>>>()?;
        blocking(move || paths.iter().try_for_each(|p| remove(p))).await?;
        let deleted = input
            .delete
            .objects
            .into_iter()
            .map(|o| DeletedObject {
                key: Some(o.key),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let dir = self.bucket(&input.bucket)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        // The continuation token is the last key of the previous page.
        let after = input.continuation_token.or(input.start_after);
        let max = input.max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let (page, truncated) = blocking(move || {
            let (page, more) = list(&dir, &prefix, after.as_deref(), max).map_err(internal)?;
            let page = page
                .into_iter()
                .filter_map(|(key, path)| Some((key, std::fs::metadata(path).ok()?)))
                .collect::<Vec<_>>();
            Ok((page, more))
        })
        .await?;
        let contents: Vec<Object> = page
            .into_iter()
            .map(|(key, meta)| Object {
                key: Some(key),
                size: Some(meta.len() as i64),
                last_modified: meta.modified().ok().map(Timestamp::from),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            key_count: Some(contents.len() as i32),
            max_keys: Some(max as i32),
            is_truncated: Some(truncated),
            next_continuation_token: truncated
                .then(|| contents.last().and_then(|o| o.key.clone()))
                .flatten(),
            contents: Some(contents),
            ..Default::default()
        }))
    }
}

fn remove(path: &Path) -> S3Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(internal(e)),
        _ => Ok(()),
    }
}
