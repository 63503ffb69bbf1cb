//! `catbird-server setup-bucket`: check that the configured bucket works, and install
//! the retention lifecycle rule without disturbing the bucket's other rules.
//!
//! PutBucketLifecycleConfiguration replaces the whole configuration, so the current
//! rules are read first and only our rule (by id) is replaced (C07). The rule is a
//! backstop: R2 applies rules up to a day late, and expiry is enforced from the
//! database anyway.

use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    BucketLifecycleConfiguration, ExpirationStatus, LifecycleExpiration, LifecycleRule,
    LifecycleRuleFilter,
};
use uuid::Uuid;

use crate::blob::{S3BlobStore, S3Settings};
use crate::config::Config;

/// Id of the rule this command owns.
pub const RULE_ID: &str = "catbird-retention";

/// Days after which the bucket expires blobs: the message TTL rounded up, plus a day.
pub fn rule_days(ttl: Duration) -> i32 {
    let days = ttl.as_secs().div_ceil(24 * 3600);
    i32::try_from(days + 1).unwrap_or(i32::MAX)
}

/// Run the checks and the rule installation, printing each step to stdout.
pub async fn setup_bucket(config: &Config) -> anyhow::Result<()> {
    let settings = S3Settings::from_config(config)?;
    let store = S3BlobStore::new(&settings);
    let (client, bucket) = (store.client(), store.bucket());
    println!(
        "endpoint {}  bucket {bucket}  prefix {:?}",
        settings.endpoint, settings.prefix
    );

    let fail = |step: &str, e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "{step} failed: {e}\nCheck R2_BUCKET, R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY (the token needs \
             Object Read & Write on this bucket), and R2_ACCOUNT_ID / R2_ENDPOINT. See R2_SETUP.md."
        )
    };

    // 1. Write, read back and delete a probe object.
    let probe = format!("{}setup-probe-{}", settings.prefix, Uuid::new_v4());
    let body = format!("catbird-server setup probe {}", Uuid::new_v4());
    client
        .put_object()
        .bucket(bucket)
        .key(&probe)
        .content_type("application/octet-stream")
        .content_length(body.len() as i64)
        .body(ByteStream::from(body.clone().into_bytes()))
        .send()
        .await
        .map_err(|e| fail("writing a probe object", &DisplayErrorContext(&e)))?;
    let read = client
        .get_object()
        .bucket(bucket)
        .key(&probe)
        .send()
        .await
        .map_err(|e| fail("reading the probe object", &DisplayErrorContext(&e)))?
        .body
        .collect()
        .await
        .map_err(|e| fail("reading the probe object", &e))?
        .into_bytes();
    if read != body.as_bytes() {
        anyhow::bail!(
            "the probe object read back differs from what was written; is R2_ENDPOINT an S3 store?"
        );
    }
    client
        .delete_object()
        .bucket(bucket)
        .key(&probe)
        .send()
        .await
        .map_err(|e| fail("deleting the probe object", &DisplayErrorContext(&e)))?;
    println!("ok    write, read and delete of a probe object");

    // 2. Merge our retention rule into the existing lifecycle configuration. On R2,
    // lifecycle rules are a bucket setting: an "Object Read & Write" token cannot
    // touch them, and that refusal deserves its own explanation.
    let lifecycle_fail = |step: &str, code: Option<&str>, e: &dyn std::fmt::Display| {
        if code == Some("AccessDenied") {
            anyhow::anyhow!(
                "{step} failed: access denied. Objects work, but lifecycle rules need a token with bucket \
                 (Admin Read & Write) permission: run setup-bucket once with such a token, or add the rule \
                 in the dashboard (see R2_SETUP.md). Details: {e}"
            )
        } else {
            fail(step, e)
        }
    };
    let existing = match client
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => out.rules().to_vec(),
        Err(e) if e.code() == Some("NoSuchLifecycleConfiguration") => Vec::new(),
        Err(e) => {
            let step = "reading the lifecycle configuration";
            return Err(lifecycle_fail(step, e.code(), &DisplayErrorContext(&e)));
        }
    };
    let days = rule_days(config.message_ttl);
    let ours = LifecycleRule::builder()
        .id(RULE_ID)
        .filter(
            LifecycleRuleFilter::builder()
                .prefix(&settings.prefix)
                .build(),
        )
        .expiration(LifecycleExpiration::builder().days(days).build())
        .status(ExpirationStatus::Enabled)
        .build()?;
    let others: Vec<LifecycleRule> = existing
        .iter()
        .filter(|r| r.id() != Some(RULE_ID))
        .cloned()
        .collect();
    println!(
        "found {} lifecycle rule(s): {}",
        existing.len(),
        if existing.is_empty() {
            "none".to_owned()
        } else {
            existing
                .iter()
                .map(|r| r.id().unwrap_or("(no id)"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let current = existing.iter().find(|r| r.id() == Some(RULE_ID));
    if current.is_some_and(|r| same_rule(r, &ours)) {
        println!(
            "ok    rule {RULE_ID} already expires {:?} after {days} days; nothing to change",
            settings.prefix
        );
    } else {
        let mut rules = others.clone();
        rules.push(ours);
        client
            .put_bucket_lifecycle_configuration()
            .bucket(bucket)
            .lifecycle_configuration(
                BucketLifecycleConfiguration::builder()
                    .set_rules(Some(rules))
                    .build()?,
            )
            .send()
            .await
            .map_err(|e| {
                let step = "writing the lifecycle configuration";
                lifecycle_fail(step, e.code(), &DisplayErrorContext(&e))
            })?;
        println!(
            "ok    {} rule {RULE_ID}: expire {:?} after {days} days (MESSAGE_TTL + 1 day); kept {} other rule(s)",
            if current.is_some() {
                "updated"
            } else {
                "installed"
            },
            settings.prefix,
            others.len()
        );
    }
    println!(
        "object-store requests made: {:?}",
        crate::blob::BlobStore::operations(&store)
    );
    println!("bucket ready: start the server with BLOB_BACKEND=r2");
    Ok(())
}

fn same_rule(a: &LifecycleRule, b: &LifecycleRule) -> bool {
    a.status() == b.status()
        && a.expiration().and_then(|e| e.days()) == b.expiration().and_then(|e| e.days())
        && a.filter().and_then(|f| f.prefix()) == b.filter().and_then(|f| f.prefix())
}
