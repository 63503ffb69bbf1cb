//! S3-compatible `BlobStore` (Cloudflare R2 in production) over aws-sdk-s3.
//!
//! Configured for R2 and other S3-compatible stores, not for AWS defaults: explicit
//! endpoint, region (`auto`) and static credentials, so nothing probes a metadata
//! service (C05); path-style addressing (C04); checksums only where an operation
//! requires one (C01, C02); connect and whole-operation timeouts with bounded retries
//! (C06); uploads from a sized in-memory buffer, so every PUT has a Content-Length (C08).

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use bytes::Bytes;
use uuid::Uuid;

use super::{BlobError, BlobOp, BlobPage, BlobStore, OpCounter, is_blob_name};
use crate::config::Config;

/// DeleteObjects takes at most this many keys per request.
const DELETE_BATCH: usize = 1000;

pub struct S3BlobStore {
    client: Client,
    bucket: String,
    prefix: String,
    ops: OpCounter,
}

/// Counts every HTTP request the SDK sends, retries included: that is what R2 bills.
#[derive(Debug)]
struct CountRequests(OpCounter);

/// The kind of the request in flight, from before it is sent until its outcome is known.
#[derive(Debug, Clone, Copy)]
struct AttemptKind(BlobOp);

impl Storable for AttemptKind {
    type Storer = StoreReplace<Self>;
}

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let request = context.request();
        let query = request
            .uri()
            .split_once('?')
            .map(|(_, q)| q)
            .unwrap_or_default();
        let kind = match request.method() {
            "HEAD" => BlobOp::Head,
            "PUT" => BlobOp::Put,
            "DELETE" => BlobOp::Delete,
            "POST"
                if query
                    .split('&')
                    .any(|p| p == "delete" || p.starts_with("delete=")) =>
            {
                BlobOp::Delete
            }
            "GET" if query.split('&').any(|p| p == "list-type=2") => BlobOp::List,
            _ => BlobOp::Get,
        };
        cfg.interceptor_state().store_put(AttemptKind(kind));
        Ok(())
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some(AttemptKind(kind)) = cfg.load::<AttemptKind>() {
            let ok = context.response().is_some_and(|r| r.status().is_success());
            self.0.record(*kind, ok);
        }
        Ok(())
    }
}

/// Where the store lives and how to reach it, checked at start-up.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub endpoint: String,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub connect_timeout: std::time::Duration,
    pub timeout: std::time::Duration,
    pub max_attempts: u32,
}

impl S3Settings {
    /// Read and check the `R2_*` variables; errors name the variable to fix.
    pub fn from_config(c: &Config) -> Result<Self, anyhow::Error> {
        let endpoint = match (&c.r2_endpoint, &c.r2_account_id) {
            (Some(url), _) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 10 {
                    anyhow::bail!("R2_ENDPOINT must be an http:// or https:// URL (got {url:?})");
                }
                url.trim_end_matches('/').to_owned()
            }
            (None, Some(id)) => {
                if id.is_empty() || !id.chars().all(|ch| ch.is_ascii_alphanumeric()) {
                    anyhow::bail!(
                        "R2_ACCOUNT_ID must be the account id from the Cloudflare dashboard (letters and digits)"
                    );
                }
                format!("https://{id}.r2.cloudflarestorage.com")
            }
            (None, None) => anyhow::bail!(
                "the R2/S3 blob store needs R2_ACCOUNT_ID (Cloudflare) or R2_ENDPOINT (any S3 store)"
            ),
        };
        let required = |v: &Option<String>, name: &str| match v.as_deref() {
            Some(s) if !s.trim().is_empty() => Ok(s.to_owned()),
            _ => Err(anyhow::anyhow!("the R2/S3 blob store needs {name}")),
        };
        let bucket = c.r2_bucket.clone();
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !valid_bucket {
            anyhow::bail!(
                "R2_BUCKET must be 3 to 63 lowercase letters, digits, '-' or '.' (got {bucket:?})"
            );
        }
        // S3's safe key characters only: anything else needs URL-encoding in listings
        // and XML requests (DeleteObjects), where some stores and proxies get it wrong.
        let prefix = c.r2_prefix.clone();
        let valid_prefix = prefix.len() <= 64
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!-_.*'()/".contains(&b));
        if !valid_prefix {
            anyhow::bail!(
                "R2_PREFIX must be at most 64 letters, digits and !-_.*'()/ such as `messages/` (got {prefix:?})"
            );
        }
        if c.r2_region.trim().is_empty() {
            anyhow::bail!("R2_REGION must not be empty (R2 uses `auto`)");
        }
        Ok(Self {
            endpoint,
            bucket,
            prefix,
            region: c.r2_region.clone(),
            access_key_id: required(&c.r2_access_key_id, "R2_ACCESS_KEY_ID")?,
            secret_access_key: required(&c.r2_secret_access_key, "R2_SECRET_ACCESS_KEY")?,
            connect_timeout: c.r2_connect_timeout,
            timeout: c.r2_timeout,
            max_attempts: c.r2_max_attempts,
        })
    }
}

impl S3BlobStore {
    pub fn new(s: &S3Settings) -> Self {
        let ops = OpCounter::default();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(s.connect_timeout)
            .operation_timeout(s.timeout)
            .operation_attempt_timeout(s.timeout / s.max_attempts.max(1))
            .build();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&s.endpoint)
            .region(Region::new(s.region.clone()))
            .credentials_provider(Credentials::new(
                &s.access_key_id,
                &s.secret_access_key,
                None,
                None,
                "catbird-config",
            ))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(s.max_attempts))
            .interceptor(CountRequests(ops.clone()))
            .build();
        Self {
            client: Client::from_conf(config),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            ops,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// Every object-store failure but "no such key" is retryable from the client's view:
/// unreachable, refused (credentials, missing bucket) or timed out. The details go to
/// the log, never to the client.
fn unavailable<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    op: &str,
    e: SdkError<E, R>,
) -> BlobError {
    BlobError::Unavailable(format!("{op}: {}", DisplayErrorContext(&e)))
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, data: Bytes) -> Result<String, BlobError> {
        let key = format!("{}{}", self.prefix, Uuid::new_v4());
        let len = data.len() as i64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/octet-stream")
            .content_length(len)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| unavailable("PutObject", e))?;
        Ok(key)
    }

    async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.code() == Some("NoSuchKey") => {
                return Err(BlobError::NotFound(key.to_owned()));
            }
            Err(e) => return Err(unavailable("GetObject", e)),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| BlobError::Unavailable(format!("GetObject body: {e}")))?;
        Ok(body.into_bytes())
    }

    async fn delete_many(&self, keys: &[String]) -> Result<Vec<String>, BlobError> {
        let mut gone = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(DELETE_BATCH) {
            let objects = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| BlobError::Other(e.to_string()))?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(|e| BlobError::Other(e.to_string()))?;
            // DeleteObjects requires an integrity header by spec; the SDK adds it
            // even with checksums "when required" (C03).
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| unavailable("DeleteObjects", e))?;
            let failed: std::collections::HashSet<&str> = out
                .errors()
                .iter()
                .filter(|e| e.code() != Some("NoSuchKey"))
                .filter_map(|e| {
                    tracing::warn!(
                        key = e.key(),
                        code = e.code(),
                        message = e.message(),
                        "blob not deleted; will retry"
                    );
                    e.key()
                })
                .collect();
            gone.extend(
                chunk
                    .iter()
                    .filter(|k| !failed.contains(k.as_str()))
                    .cloned(),
            );
        }
        Ok(gone)
    }

    async fn list(&self, page: Option<String>) -> Result<BlobPage, BlobError> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .set_continuation_token(page)
            .send()
            .await
            .map_err(|e| unavailable("ListObjectsV2", e))?;
        // Only keys this server could have written (prefix + UUID): a bucket shared
        // with other data or another R2_PREFIX that starts with ours (`messages` and
        // `messages/`) must not lose objects to our orphan scan.
        let blobs = out
            .contents()
            .iter()
            .filter_map(|o| {
                let key = o.key()?;
                if !key.strip_prefix(&self.prefix).is_some_and(is_blob_name) {
                    return None;
                }
                let modified = o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())?;
                Some((key.to_owned(), modified))
            })
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_owned)
        } else {
            None
        };
        Ok(BlobPage { blobs, next })
    }

    async fn ping(&self) -> Result<(), BlobError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| unavailable("HeadBucket", e))
    }

    fn ops(&self) -> &OpCounter {
        &self.ops
    }
}
