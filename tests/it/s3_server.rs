//! A real S3-compatible server for the tests, in-process: `s3s` (SigV4 checked against
//! fixed credentials) over `s3s-fs` (objects as files under a temporary folder).
//!
//! s3s-fs has no lifecycle API, so the wrapper keeps lifecycle rules in memory; it also
//! records the headers of every PutObject and DeleteObjects so tests can check exactly
//! what the client sent (C01, C02, C03).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use tempfile::TempDir;
use tokio::net::TcpListener;

pub const ACCESS_KEY: &str = "catbird-test-access-key";
pub const SECRET_KEY: &str = "catbird-test-secret-key-0123456789";
pub const BUCKET: &str = "catbird-test";

#[derive(Default)]
pub struct Recorded {
    pub puts: Vec<axum::http::HeaderMap>,
    pub deletes: Vec<axum::http::HeaderMap>,
}

struct Store {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
    recorded: Arc<Mutex<Recorded>>,
    lifecycle: Arc<Mutex<Option<Vec<LifecycleRule>>>>,
}

impl Store {
    /// s3s-fs writes into a missing bucket as if it existed; a real store refuses.
    fn bucket_exists(&self, bucket: &str) -> S3Result<()> {
        if self.root.join(bucket).is_dir() {
            Ok(())
        } else {
            Err(s3_error!(NoSuchBucket))
        }
    }
}

#[async_trait::async_trait]
impl S3 for Store {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.recorded.lock().unwrap().puts.push(req.headers.clone());
        self.bucket_exists(&req.input.bucket)?;
        self.fs.put_object(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.fs.get_object(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        // By spec DeleteObjects needs Content-MD5 or an x-amz-checksum-* header.
        let has_integrity = req
            .headers
            .keys()
            .any(|k| k.as_str() == "content-md5" || k.as_str().starts_with("x-amz-checksum-"));
        self.recorded
            .lock()
            .unwrap()
            .deletes
            .push(req.headers.clone());
        self.bucket_exists(&req.input.bucket)?;
        if !has_integrity {
            return Err(s3_error!(
                InvalidRequest,
                "Missing required header for this request: Content-MD5"
            ));
        }
        self.fs.delete_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn get_bucket_lifecycle_configuration(
        &self,
        _req: S3Request<GetBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<GetBucketLifecycleConfigurationOutput>> {
        match self.lifecycle.lock().unwrap().clone() {
            Some(rules) => Ok(S3Response::new(GetBucketLifecycleConfigurationOutput {
                rules: Some(rules),
                ..Default::default()
            })),
            None => Err(s3_error!(NoSuchLifecycleConfiguration)),
        }
    }

    async fn put_bucket_lifecycle_configuration(
        &self,
        req: S3Request<PutBucketLifecycleConfigurationInput>,
    ) -> S3Result<S3Response<PutBucketLifecycleConfigurationOutput>> {
        let rules = req
            .input
            .lifecycle_configuration
            .map(|c| c.rules)
            .unwrap_or_default();
        // Like S3 and R2: every rule needs a status, and the whole configuration is replaced.
        for r in &rules {
            if r.status.as_str() != "Enabled" && r.status.as_str() != "Disabled" {
                return Err(s3_error!(
                    MalformedXML,
                    "rule status must be Enabled or Disabled"
                ));
            }
        }
        *self.lifecycle.lock().unwrap() = Some(rules);
        Ok(S3Response::new(
            PutBucketLifecycleConfigurationOutput::default(),
        ))
    }
}

pub struct S3Server {
    pub endpoint: String,
    pub root: TempDir,
    pub recorded: Arc<Mutex<Recorded>>,
    pub lifecycle: Arc<Mutex<Option<Vec<LifecycleRule>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Server {
    /// A server with the bucket [`BUCKET`] already created.
    pub async fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let lifecycle = Arc::new(Mutex::new(None));
        let store = Store {
            fs: s3s_fs::FileSystem::new(root.path()).unwrap(),
            root: root.path().to_path_buf(),
            recorded: recorded.clone(),
            lifecycle: lifecycle.clone(),
        };
        let mut builder = S3ServiceBuilder::new(store);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                // Without it, small GETs wait ~25 ms on Nagle's algorithm.
                let _ = socket.set_nodelay(true);
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            endpoint,
            root,
            recorded,
            lifecycle,
            task,
        }
    }

    /// The folder holding the bucket's objects (one file per key).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }

    /// Every object key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bucket_dir(), &self.bucket_dir(), &mut out);
        out.sort();
        out
    }

    /// Point a configuration at this server.
    pub fn configure(&self, c: &mut catbird_server::config::Config) {
        c.blob_backend = catbird_server::config::BlobBackend::R2;
        c.r2_endpoint = Some(self.endpoint.clone());
        c.r2_bucket = BUCKET.to_owned();
        c.r2_access_key_id = Some(ACCESS_KEY.to_owned());
        c.r2_secret_access_key = Some(SECRET_KEY.to_owned());
        c.r2_timeout = std::time::Duration::from_secs(5);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP listener that accepts connections and never answers (C06).
pub async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (endpoint, task)
}
