//! Abuse limits and bounded waits: per-caller rate limiting, the request timeout (503,
//! not 408), CORS settings that would make tower-http panic (C10), and the bounded
//! graceful shutdown.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::common::{Backend, Data, Reply, TestServer};

const BOB: &str = "did:plc:bob";

crate::on_both!(request_timeout_is_503_and_shutdown_is_bounded);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_per_caller_with_retry_after() {
    let data = Data::new(Backend::Sqlite).await;
    let mut c = data.config();
    c.rate_limit_per_minute = 60;
    c.rate_limit_burst = 3;
    let s = TestServer::start(c).await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    for _ in 0..3 {
        alice.pending("").await.expect(200, None);
    }
    let r = alice.pending("").await.expect(429, Some("rate_limited"));
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=2).contains(&wait),
        "one request per second refills: {wait}"
    );
    // Sends count too, and nothing is stored for a refused one.
    alice
        .send_raw(
            json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB]}),
            None,
        )
        .await
        .expect(429, Some("rate_limited"));
    // Another caller has a bucket of its own; unauthenticated probes are not counted.
    bob.pending("").await.expect(200, None);
    Reply::from(s.http.get(s.url("/healthz")).send().await.unwrap())
        .await
        .expect(200, None);
    tokio::time::sleep(Duration::from_secs(wait)).await;
    alice.pending("").await.expect(200, None);
    assert_eq!(data.db().await.count("messages").await, 0);
}

async fn request_timeout_is_503_and_shutdown_is_bounded(b: crate::common::Backend) {
    let data = Data::new(b).await;
    let mut c = data.config();
    c.request_timeout = Duration::from_millis(700);
    c.database_statement_timeout = Duration::from_secs(20);
    c.shutdown_timeout = Duration::from_millis(800);
    let s = TestServer::start(c.clone()).await;
    let alice = s.user("did:plc:alice");
    let body = json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB]});

    // The database stalls (a lock held elsewhere): the request ends at REQUEST_TIMEOUT.
    let mut lock = data.db().await;
    lock.lock_writes().await;
    let started = Instant::now();
    let r = alice
        .send_raw(body.clone(), None)
        .await
        .expect(503, Some("unavailable"));
    assert!(r.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // A request still in flight at shutdown is cut off after SHUTDOWN_TIMEOUT...
    let mut c2 = c.clone();
    c2.request_timeout = Duration::from_secs(60);
    let s2 = TestServer::start(c2).await;
    let stuck = {
        let alice = s2.user("did:plc:alice");
        let body = body.clone();
        tokio::spawn(async move {
            alice
                .req(Method::POST, "/api/v1/messages")
                .json(&body)
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    s2.stop().await.expect("run returns Ok");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by SHUTDOWN_TIMEOUT: {:?}",
        started.elapsed()
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck request was closed"
    );
    lock.release().await;
    if b == Backend::Sqlite {
        // Both sends gave up while queued behind the lock, before their transaction
        // began: the 503 means nothing was stored, even once the lock is free. (On
        // PostgreSQL the wait for the lock is inside the send's statement, which may
        // still commit: API.md, Request timeout.)
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(data.db().await.count("messages").await, 0);
    }

    // ...while one that finishes within it is answered before the server exits.
    lock.lock_writes().await;
    let mut c3 = c.clone();
    c3.shutdown_timeout = Duration::from_secs(20);
    c3.request_timeout = Duration::from_secs(60);
    let s3 = TestServer::start(c3).await;
    let finishing = {
        let alice = s3.user("did:plc:alice");
        let body = body.clone();
        tokio::spawn(async move { alice.send_raw(body, None).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(s3.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.release().await;
    finishing.await.unwrap().expect(201, None);
    stopping.await.unwrap().expect("clean shutdown");
    if b == Backend::Sqlite {
        assert_eq!(data.db().await.count("messages").await, 1);
    }
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_cors_settings_never_panic() {
    let bad = [
        "*,https://a.example",
        "a.example",
        "https://a.example/path",
        "ftp://a.example",
        "https://",
        "https://a b",
    ];
    for origins in bad {
        let data = Data::new(Backend::Sqlite).await;
        let mut c = data.config();
        c.cors_allowed_origins = origins.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = catbird_server::run(c, listener, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("CORS_ALLOWED_ORIGINS"), "{origins}: {e}");
    }

    for (origins, allowed, refused) in [
        ("*", "https://anything.example", None),
        (
            " https://app.example , http://localhost:5173 ",
            "http://localhost:5173",
            Some("https://evil.example"),
        ),
    ] {
        let data = Data::new(Backend::Sqlite).await;
        let mut c = data.config();
        c.cors_allowed_origins = origins.into();
        let s = TestServer::start(c).await;
        let preflight = |origin: &str| {
            s.http
                .request(Method::OPTIONS, s.url("/api/v1/messages"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization, content-type, idempotency-key",
                )
                .send()
        };
        let r = preflight(allowed).await.unwrap();
        assert!(r.status().is_success(), "{origins}: {}", r.status());
        let allow = r.headers()["access-control-allow-origin"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(allow == "*" || allow == allowed, "{allow}");
        let headers = r.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(
            headers.contains("authorization") && headers.contains("idempotency-key"),
            "{headers}"
        );
        if let Some(refused) = refused {
            let r = preflight(refused).await.unwrap();
            assert!(r.headers().get("access-control-allow-origin").is_none());
        }
        // Error responses carry the header too, so browsers can read them.
        let r = s
            .http
            .get(s.url("/api/v1/messages/pending"))
            .header("origin", allowed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().get("access-control-allow-origin").is_some());
    }

    // No setting: no CORS headers at all.
    let data = Data::new(Backend::Sqlite).await;
    let s = TestServer::start(data.config()).await;
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("origin", "https://a.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}
