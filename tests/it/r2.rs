//! The R2/S3 blob backend against a real S3-compatible server (SigV4 checked): the
//! `BlobStore` conformance suite, what goes over the wire (C01–C04, C08), start-up
//! checks (C05), failures (C06, wrong credentials, missing bucket), batch deletes and
//! their retries (C03), and `setup-bucket` (C07).

use std::sync::Arc;
use std::time::{Duration, Instant};

use catbird_server::blob::{BlobStore, S3BlobStore, S3Settings};
use catbird_server::config::Config;
use reqwest::StatusCode;
use s3s::dto::{ExpirationStatus, LifecycleExpiration, LifecycleRule, LifecycleRuleFilter};
use serde_json::json;

use crate::common::{Backend, Data, TestServer, b64, unb64};
use crate::s3_server::{BUCKET, S3Server, black_hole};

const BOB: &str = "did:plc:bob";

/// One change to a configuration, for table-driven tests.
type Tweak = fn(&mut Config);

fn s3_config(s3: &S3Server) -> Config {
    let mut c = Config::defaults();
    s3.configure(&mut c);
    c
}

fn store(c: &Config) -> Arc<dyn BlobStore> {
    Arc::new(S3BlobStore::new(&S3Settings::from_config(c).unwrap()))
}

/// SQLite metadata with blobs in `s3` (or wherever `tweak` points them).
async fn server_with(s3: &S3Server, tweak: impl FnOnce(&mut Config)) -> (Data, TestServer) {
    let data = Data::new(Backend::Sqlite).await;
    let mut c = data.config();
    s3.configure(&mut c);
    tweak(&mut c);
    let server = TestServer::start(c).await;
    (data, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3() {
    let s3 = S3Server::start().await;
    crate::blob_conformance::conformance(store(&s3_config(&s3)), "messages/").await;
    let mut c = s3_config(&s3);
    c.r2_prefix = String::new();
    crate::blob_conformance::conformance(store(&c), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c01_c02_c08_uploads_are_plain_sized_and_byte_exact() {
    let s3 = S3Server::start().await;
    let (_data, s) = server_with(&s3, |_| {}).await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    let sizes = [1usize, 100_000, 1_048_576];
    let mut ids = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let payload: Vec<u8> = (0..*n).map(|j| ((i * 7 + j) % 256) as u8).collect();
        let id = alice.send("c", &[BOB], &payload).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let back = bob.fetch(&id).await.expect(200, None).body;
        assert!(
            unb64(back["encrypted_data"].as_str().unwrap()) == payload,
            "{n} bytes round trip"
        );
        ids.push((id, payload));
    }

    // The objects are exactly the decoded payloads, under R2_PREFIX + UUIDv4 keys.
    let keys = s3.keys();
    assert_eq!(keys.len(), sizes.len());
    let mut stored: Vec<Vec<u8>> = Vec::new();
    for k in &keys {
        let id = k
            .strip_prefix("messages/")
            .unwrap_or_else(|| panic!("{k} outside the prefix"));
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        stored.push(std::fs::read(s3.bucket_dir().join(k)).unwrap());
    }
    for (id, payload) in &ids {
        assert!(stored.contains(payload), "payload of {id} stored as-is");
        assert!(
            !keys.iter().any(|k| k.contains(id.as_str())),
            "object keys are not message ids"
        );
    }

    // What went over the wire for each PUT.
    let recorded = s3.recorded.lock().unwrap();
    assert_eq!(
        recorded.puts.len(),
        sizes.len(),
        "exactly one PUT per message"
    );
    for (headers, n) in recorded.puts.iter().zip(sizes) {
        let integrity: Vec<_> = headers
            .keys()
            .filter(|k| k.as_str() == "content-md5" || k.as_str().starts_with("x-amz-checksum-"))
            .collect();
        assert!(
            integrity.len() <= 1,
            "at most one integrity header: {integrity:?}"
        );
        assert_eq!(
            headers["content-length"],
            n.to_string().as_str(),
            "sized upload"
        );
        assert!(
            headers
                .get("content-encoding")
                .is_none_or(|v| !v.to_str().unwrap().contains("aws-chunked"))
        );
        let sha = headers["x-amz-content-sha256"].to_str().unwrap();
        assert!(!sha.starts_with("STREAMING"), "no chunked signing: {sha}");
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert!(
            headers.get("x-amz-sdk-checksum-algorithm").is_none(),
            "no algorithm header without a checksum"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c03_cleanup_deletes_in_batches_and_retries_failures() {
    let s3 = S3Server::start().await;
    let (data, s) = server_with(&s3, |c| c.message_ttl = Duration::from_secs(1)).await;
    let alice = s.user("did:plc:alice");
    for i in 0..3u8 {
        alice.send("c", &[BOB], &[i; 10]).await;
    }
    assert_eq!(s3.keys().len(), 3);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // First pass with credentials the store refuses: rows go, blobs stay queued.
    let mut refused = s.config.clone();
    refused.r2_secret_access_key = Some("wrong-secret".into());
    refused.r2_max_attempts = 1;
    let relay = catbird_server::build_relay(&refused).await.unwrap();
    let r = catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(
        (r.expired, r.blobs_deleted, r.blobs_failed),
        (3, 0, 3),
        "{r:?}"
    );
    assert_eq!(s3.keys().len(), 3);
    let mut db = data.db().await;
    assert_eq!(db.count("messages").await, 0);
    assert_eq!(
        db.count("blob_deletions").await,
        3,
        "no row dropped while its object survives unnoticed"
    );

    // Next pass (store answering again): everything goes, in one DeleteObjects request.
    let deletes_before = s3.recorded.lock().unwrap().deletes.len();
    let relay = catbird_server::build_relay(&s.config).await.unwrap();
    let r = catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!((r.blobs_deleted, r.blobs_failed), (3, 0), "{r:?}");
    assert!(s3.keys().is_empty());
    assert_eq!(db.count("blob_deletions").await, 0);
    let deletes = s3.recorded.lock().unwrap().deletes.len();
    assert_eq!(deletes - deletes_before, 1, "one batch request");
    assert_eq!(relay.blobs.operations().delete, 1);

    // An object already gone counts as deleted.
    let key = relay
        .blobs
        .put(bytes::Bytes::from_static(b"x"))
        .await
        .unwrap();
    std::fs::remove_file(s3.bucket_dir().join(&key)).unwrap();
    assert_eq!(
        relay
            .blobs
            .delete_many(std::slice::from_ref(&key))
            .await
            .unwrap(),
        vec![key]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c04_c06_unreachable_or_silent_store_is_503_quickly_and_reads_go_on() {
    let (silent, _hole) = black_hole().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }; // dropped: nothing listens there any more
    for endpoint in [silent, closed] {
        let s3 = S3Server::start().await; // only for its credentials and bucket name
        let (data, s) = server_with(&s3, |c| {
            c.r2_endpoint = Some(endpoint.clone());
            c.r2_timeout = Duration::from_secs(1);
            c.r2_connect_timeout = Duration::from_millis(500);
        })
        .await;
        let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
        let send = {
            let alice = alice.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = alice
                    .send_raw(
                        json!({"encrypted_data": b64(b"hi"), "convo_id": "c", "recipients": [BOB]}),
                        None,
                    )
                    .await;
                (r, started.elapsed())
            })
        };
        // Meanwhile the database-only routes keep answering.
        let r = bob.pending("").await;
        assert_eq!(r.status, StatusCode::OK, "{endpoint}");
        let (r, took) = send.await.unwrap();
        let r = r.expect(503, Some("unavailable"));
        assert!(r.header("retry-after").is_some());
        assert!(
            !r.body["message"].as_str().unwrap().contains(BUCKET),
            "no bucket names in client errors"
        );
        assert!(
            took < Duration::from_secs(10),
            "bounded by R2_TIMEOUT ({took:?})"
        );
        assert_eq!(data.db().await.count("messages").await, 0, "no row");
        let ready =
            crate::common::Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap()).await;
        let ready = ready.expect(503, Some("unavailable"));
        assert_eq!(
            (
                ready.body["database"].as_str(),
                ready.body["blob_store"].as_str()
            ),
            (Some("ok"), Some("unavailable"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_missing_bucket_are_503_and_store_nothing() {
    let s3 = S3Server::start().await;
    let tweaks: [(&str, Tweak); 3] = [
        ("wrong secret", |c| {
            c.r2_secret_access_key = Some("not-the-secret".into())
        }),
        ("unknown key", |c| {
            c.r2_access_key_id = Some("AKIDUNKNOWN".into())
        }),
        ("missing bucket", |c| c.r2_bucket = "no-such-bucket".into()),
    ];
    for (what, tweak) in tweaks {
        let (data, s) = server_with(&s3, tweak).await;
        let alice = s.user("did:plc:alice");
        let r = alice
            .send_raw(
                json!({"encrypted_data": b64(b"hi"), "convo_id": "c", "recipients": [BOB]}),
                None,
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {}",
            r.body
        );
        r.expect(503, Some("unavailable"));
        assert_eq!(data.db().await.count("messages").await, 0, "{what}");
        let ready =
            crate::common::Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap()).await;
        assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
    }
    assert!(s3.keys().is_empty());
}

#[tokio::test]
async fn c05_startup_checks_name_the_variable() {
    let base = || {
        let mut c = Config::defaults();
        c.blob_backend = catbird_server::config::BlobBackend::R2;
        c.r2_account_id = Some("0123456789abcdef0123456789abcdef".into());
        c.r2_access_key_id = Some("id".into());
        c.r2_secret_access_key = Some("secret".into());
        c
    };
    let s = S3Settings::from_config(&base()).unwrap();
    assert_eq!(
        s.endpoint,
        "https://0123456789abcdef0123456789abcdef.r2.cloudflarestorage.com"
    );
    assert_eq!(
        (s.region.as_str(), s.prefix.as_str(), s.bucket.as_str()),
        ("auto", "messages/", "catbird-messages")
    );
    let mut c = base();
    c.r2_endpoint = Some("http://127.0.0.1:9000/".into());
    assert_eq!(
        S3Settings::from_config(&c).unwrap().endpoint,
        "http://127.0.0.1:9000",
        "endpoint overrides account id"
    );

    let cases: [(&str, Tweak); 9] = [
        ("R2_ACCESS_KEY_ID", |c| c.r2_access_key_id = None),
        ("R2_SECRET_ACCESS_KEY", |c| {
            c.r2_secret_access_key = Some(" ".into())
        }),
        ("R2_ACCOUNT_ID", |c| c.r2_account_id = None),
        ("R2_ACCOUNT_ID", |c| {
            c.r2_account_id = Some("not an id".into())
        }),
        ("R2_ENDPOINT", |c| {
            c.r2_endpoint = Some("127.0.0.1:9000".into())
        }),
        ("R2_BUCKET", |c| c.r2_bucket = "No_Such".into()),
        ("R2_REGION", |c| c.r2_region = String::new()),
        // Control characters would break listing and batch-delete XML; long prefixes
        // make keys some stores refuse.
        ("R2_PREFIX", |c| c.r2_prefix = "messages\u{1}/".into()),
        ("R2_PREFIX", |c| c.r2_prefix = "p/".repeat(33)),
    ];
    for (var, tweak) in cases {
        let mut c = base();
        tweak(&mut c);
        let e = S3Settings::from_config(&c).unwrap_err().to_string();
        assert!(e.contains(var), "{var}: {e}");
        // The same check stops the server at start-up, before it listens.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = catbird_server::run(c, listener, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(var), "{var}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c07_setup_bucket_merges_rules_and_is_safe_to_rerun() {
    let s3 = S3Server::start().await;
    let unrelated = LifecycleRule {
        id: Some("keep-logs".into()),
        status: ExpirationStatus::from_static(ExpirationStatus::ENABLED),
        filter: Some(LifecycleRuleFilter {
            prefix: Some("logs/".into()),
            ..Default::default()
        }),
        expiration: Some(LifecycleExpiration {
            days: Some(7),
            ..Default::default()
        }),
        abort_incomplete_multipart_upload: None,
        noncurrent_version_expiration: None,
        noncurrent_version_transitions: None,
        prefix: None,
        transitions: None,
    };
    *s3.lifecycle.lock().unwrap() = Some(vec![unrelated.clone()]);
    let mut c = s3_config(&s3);
    c.message_ttl = Duration::from_secs(30 * 24 * 3600);

    for run in 0..2 {
        catbird_server::setup::setup_bucket(&c)
            .await
            .unwrap_or_else(|e| panic!("run {run}: {e:#}"));
        let rules = s3.lifecycle.lock().unwrap().clone().unwrap();
        assert_eq!(rules.len(), 2, "run {run}: {rules:?}");
        assert!(
            rules.contains(&unrelated),
            "the unrelated rule survives run {run}"
        );
        let ours = rules
            .iter()
            .find(|r| r.id.as_deref() == Some("catbird-retention"))
            .unwrap();
        assert_eq!(ours.status.as_str(), "Enabled");
        assert_eq!(
            ours.expiration.as_ref().unwrap().days,
            Some(31),
            "MESSAGE_TTL + 1 day"
        );
        assert_eq!(
            ours.filter.as_ref().unwrap().prefix.as_deref(),
            Some("messages/")
        );
    }
    assert!(s3.keys().is_empty(), "the probe object was removed");

    // A changed TTL updates our rule in place.
    c.message_ttl = Duration::from_secs(36 * 3600);
    catbird_server::setup::setup_bucket(&c).await.unwrap();
    let rules = s3.lifecycle.lock().unwrap().clone().unwrap();
    assert_eq!(rules.len(), 2);
    let ours = rules
        .iter()
        .find(|r| r.id.as_deref() == Some("catbird-retention"))
        .unwrap();
    assert_eq!(
        ours.expiration.as_ref().unwrap().days,
        Some(3),
        "36 h rounds up to 2 days, plus 1"
    );

    // Bad credentials: a clear error that says what to check.
    c.r2_secret_access_key = Some("wrong".into());
    let e = format!(
        "{:#}",
        catbird_server::setup::setup_bucket(&c).await.unwrap_err()
    );
    assert!(
        e.contains("R2_SECRET_ACCESS_KEY") && e.contains("probe"),
        "{e}"
    );
}
