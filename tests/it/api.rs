//! The v1 API end to end over real HTTP, on SQLite and on PostgreSQL: every route,
//! every row of API.md's error table we can cause, access control, paging, idempotency,
//! sequence numbers, expiry, deletion, restarts, and cases C09, C11, C12, C13, C15.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Backend, Data, Reply, SECRET, TestServer, b64, now, token_with, unb64};

const ALICE: &str = "did:plc:alice";
const BOB: &str = "did:plc:bob";
const CAROL: &str = "did:plc:carol";
const MALLORY: &str = "did:plc:mallory";

crate::on_all_backends!(
    send_fetch_pending_ack_roundtrip,
    strangers_can_neither_read_ack_delete_nor_list,
    error_table,
    unauthorized_variants,
    paging_with_shared_timestamps_returns_each_once,
    convo_filter_and_include_data,
    idempotent_retry_sequential,
    idempotent_retry_concurrent,
    seq_is_gapless_under_concurrent_senders,
    expired_messages_vanish_and_cleanup_removes_them,
    delivered_messages_are_kept_when_delete_on_delivery_is_off,
    sender_withdraws_message,
    batch_ack,
    restart_loses_nothing,
    c09_body_limit_follows_max_message_bytes,
    c11_concurrent_writers_while_polling,
    c12_locked_database_is_503_and_reads_go_on,
    c15_failed_write_leaves_no_blob_and_missing_blob_is_404,
    health_and_readiness,
    cleanup_removes_old_orphans_only,
);

async fn start(b: Backend) -> (Data, TestServer) {
    let data = Data::new(b).await;
    let server = TestServer::start(data.config()).await;
    (data, server)
}

fn parse_time(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap();
    // RFC 3339, UTC, exactly millisecond precision: 2026-12-03T15:31:23.123Z
    assert_eq!(s.len(), 24, "{s}");
    assert!(s.ends_with('Z'), "{s}");
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// Blob deletion after delivery runs in the background; wait (bounded) for it.
async fn wait_for_blob_count(data: &Data, n: usize) {
    for _ in 0..100 {
        if data.blob_files().len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(data.blob_files().len(), n, "blob files");
}

async fn send_fetch_pending_ack_roundtrip(b: Backend) {
    let (data, s) = start(b).await;
    let (alice, bob, carol) = (s.user(ALICE), s.user(BOB), s.user(CAROL));
    let payload: Vec<u8> = (0..=255u8).cycle().take(5000).collect();

    let r = alice
        .send_raw(json!({"encrypted_data": b64(&payload), "convo_id": "convo_123", "recipients": [BOB, CAROL, BOB]}), None)
        .await
        .expect(201, None);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        r.header("location").unwrap(),
        format!("/api/v1/messages/{id}")
    );
    assert_eq!(
        uuid::Uuid::parse_str(&id).unwrap().hyphenated().to_string(),
        id,
        "lowercase hyphenated"
    );
    assert_eq!(r.body["convo_id"], "convo_123");
    assert_eq!(r.body["seq"], 1);
    assert_eq!(r.body["sender"], ALICE);
    assert_eq!(
        r.body["recipients"],
        json!([BOB, CAROL]),
        "duplicates removed, order kept"
    );
    assert_eq!(r.body["size"], 5000);
    let created = parse_time(&r.body["created_at"]);
    let expires = parse_time(&r.body["expires_at"]);
    assert_eq!(expires - created, chrono::Duration::days(30));
    assert!((created - Utc::now()).num_seconds().abs() < 60);
    assert!(r.header("idempotent-replayed").is_none());
    assert_eq!(data.blob_files().len(), 1);
    assert_eq!(
        std::fs::read(&data.blob_files()[0]).unwrap(),
        payload,
        "stored as exactly the decoded bytes"
    );

    // Sender and each recipient can fetch; fetching does not acknowledge.
    for u in [&alice, &bob, &carol, &bob] {
        let m = u.fetch(&id).await.expect(200, None).body;
        assert_eq!(unb64(m["encrypted_data"].as_str().unwrap()), payload);
        assert_eq!(
            m["encrypted_data"],
            b64(&payload),
            "canonical padded base64"
        );
        assert_eq!(m["seq"], 1);
        assert_eq!(m["created_at"], r.body["created_at"]);
        assert!(m.get("recipients").is_none());
    }

    let page = bob.pending("").await.expect(200, None).body;
    assert_eq!(page["cursor"], Value::Null);
    let msgs = page["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["id"], id.as_str());
    assert!(
        msgs[0].get("encrypted_data").is_none(),
        "no data unless include_data=true"
    );
    assert!(
        alice.pending("").await.body["messages"]
            .as_array()
            .unwrap()
            .is_empty(),
        "sender is not a recipient"
    );

    bob.ack(&id).await.expect(204, None);
    bob.ack(&id).await.expect(204, None); // twice is fine
    assert!(
        bob.pending("").await.body["messages"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(carol.pending_ids("", 10).await, vec![id.clone()]);
    bob.fetch(&id).await.expect(200, None); // still readable until everyone has it

    carol.ack(&id).await.expect(204, None);
    // Fully delivered: the message and its blob are gone.
    for u in [&alice, &bob, &carol] {
        u.fetch(&id).await.expect(404, Some("not_found"));
    }
    wait_for_blob_count(&data, 0).await;
    let mut db = data.db().await;
    assert_eq!(db.count("messages").await, 0);
    assert_eq!(db.count("recipients").await, 0);
}

async fn strangers_can_neither_read_ack_delete_nor_list(b: Backend) {
    let (_data, s) = start(b).await;
    let (alice, bob, mallory) = (s.user(ALICE), s.user(BOB), s.user(MALLORY));
    let id = alice.send("c", &[BOB], b"secret").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let random = uuid::Uuid::new_v4().to_string();

    let hidden = mallory.fetch(&id).await.expect(404, Some("not_found"));
    let absent = mallory.fetch(&random).await.expect(404, Some("not_found"));
    assert_eq!(
        hidden.body, absent.body,
        "a hidden message looks exactly like a missing one"
    );
    mallory.ack(&id).await.expect(404, Some("not_found"));
    mallory.delete(&id).await.expect(404, Some("not_found"));
    let r = mallory.ack_many(&[&id]).await.expect(200, None);
    assert_eq!(r.body, json!({"acked": [], "not_found": [id]}));
    assert!(
        mallory.pending("").await.body["messages"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A recipient cannot withdraw; the sender cannot acknowledge.
    bob.delete(&id).await.expect(404, Some("not_found"));
    alice.ack(&id).await.expect(404, Some("not_found"));
    assert_eq!(
        bob.pending_ids("", 10).await,
        vec![id.clone()],
        "nothing above changed anything"
    );
    bob.fetch(&id).await.expect(200, None);
}

async fn error_table(b: Backend) {
    let (_data, s) = start(b).await;
    let alice = s.user(ALICE);
    let ok = |data: &str| json!({"encrypted_data": data, "convo_id": "c", "recipients": [BOB]});

    // 400 invalid_request: each names the field.
    let cases = [
        (
            json!({"encrypted_data": "not base64!", "convo_id": "c", "recipients": [BOB]}),
            "encrypted_data",
        ),
        (
            json!({"encrypted_data": "", "convo_id": "c", "recipients": [BOB]}),
            "encrypted_data",
        ),
        (
            json!({"encrypted_data": "aGVsbG8-", "convo_id": "c", "recipients": [BOB]}),
            "encrypted_data",
        ),
        (
            json!({"encrypted_data": "aGk=", "convo_id": "", "recipients": [BOB]}),
            "convo_id",
        ),
        (
            json!({"encrypted_data": "aGk=", "convo_id": "has space", "recipients": [BOB]}),
            "convo_id",
        ),
        (
            json!({"encrypted_data": "aGk=", "convo_id": "x".repeat(257), "recipients": [BOB]}),
            "convo_id",
        ),
        (
            json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": []}),
            "recipients",
        ),
        (
            json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB, "bob"]}),
            "recipients[1]",
        ),
        (
            json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": ["did:PLC:x"]}),
            "recipients[0]",
        ),
    ];
    for (body, field) in cases {
        let r = alice
            .send_raw(body.clone(), None)
            .await
            .expect(400, Some("invalid_request"));
        assert!(
            r.body["message"].as_str().unwrap().contains(field),
            "{body}: {}",
            r.body
        );
    }
    // Padding is optional; convo_id may be 256 characters.
    alice.send_raw(ok("aGk"), None).await.expect(201, None);
    alice
        .send_raw(
            json!({"encrypted_data": "aGk=", "convo_id": "x".repeat(256), "recipients": [BOB]}),
            None,
        )
        .await
        .expect(201, None);
    let r = alice
        .send_raw(ok("aGk="), Some(&"k".repeat(256)))
        .await
        .expect(400, Some("invalid_request"));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );

    for (path, field) in [
        ("/api/v1/messages/not-a-uuid", "id"),
        ("/api/v1/messages/pending?limit=0", "limit"),
        ("/api/v1/messages/pending?limit=501", "limit"),
        ("/api/v1/messages/pending?limit=ten", "limit"),
        ("/api/v1/messages/pending?cursor=garbage", "cursor"),
        ("/api/v1/messages/pending?include_data=yes", "include_data"),
        ("/api/v1/messages/pending?convo_id=", "convo_id"),
    ] {
        let r = Reply::from(alice.req(Method::GET, path).send().await.unwrap())
            .await
            .expect(400, Some("invalid_request"));
        assert!(
            r.body["message"].as_str().unwrap().contains(field),
            "{path}: {}",
            r.body
        );
    }
    alice
        .ack("12345")
        .await
        .expect(400, Some("invalid_request"));
    alice
        .delete("12345")
        .await
        .expect(400, Some("invalid_request"));
    let many: Vec<String> = (0..501).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    alice
        .ack_many(&refs)
        .await
        .expect(400, Some("invalid_request"));
    alice
        .ack_many(&[])
        .await
        .expect(400, Some("invalid_request"));
    let r = alice
        .ack_many(&[&many[0], "nope"])
        .await
        .expect(400, Some("invalid_request"));
    assert!(r.body["message"].as_str().unwrap().contains("ids[1]"));

    // 400 invalid_json: syntax, missing field, wrong type, unknown field.
    let post = |body: &'static str| {
        alice
            .req(Method::POST, "/api/v1/messages")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in [
        "{not json",
        r#"{"convo_id":"c","recipients":["did:plc:bob"]}"#,
        r#"{"encrypted_data":1,"convo_id":"c","recipients":["did:plc:bob"]}"#,
        r#"{"encrypted_data":"aGk=","convo_id":"c","recipients":"did:plc:bob"}"#,
        r#"{"encrypted_data":"aGk=","convo_id":"c","recipients":["did:plc:bob"],"extra":1}"#,
    ] {
        Reply::from(post(body).await.unwrap())
            .await
            .expect(400, Some("invalid_json"));
    }
    let r = alice
        .req(Method::POST, "/api/v1/messages/ack")
        .header("content-type", "application/json")
        .body("[]");
    Reply::from(r.send().await.unwrap())
        .await
        .expect(400, Some("invalid_json"));

    // 415: no or wrong content type.
    let r = alice
        .req(Method::POST, "/api/v1/messages")
        .body(ok("aGk=").to_string())
        .send()
        .await
        .unwrap();
    Reply::from(r)
        .await
        .expect(415, Some("unsupported_media_type"));
    let r = alice
        .req(Method::POST, "/api/v1/messages")
        .header("content-type", "text/plain")
        .body(ok("aGk=").to_string());
    Reply::from(r.send().await.unwrap())
        .await
        .expect(415, Some("unsupported_media_type"));

    // 413: decoded payload above the maximum (default 1 MiB).
    let r = alice
        .send_raw(ok(&b64(&vec![7u8; 1_048_577])), None)
        .await
        .expect(413, Some("payload_too_large"));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("MAX_MESSAGE_BYTES")
    );

    // 404 for unknown routes (with or without a token), 405 for a wrong method.
    for path in ["/nope", "/api/v1/nope", "/api/v2/messages"] {
        Reply::from(s.http.get(s.url(path)).send().await.unwrap())
            .await
            .expect(404, Some("not_found"));
        Reply::from(alice.req(Method::GET, path).send().await.unwrap())
            .await
            .expect(404, Some("not_found"));
    }
    for (method, path) in [
        (Method::PUT, "/api/v1/messages"),
        (Method::GET, "/api/v1/messages"),
        (Method::DELETE, "/api/v1/messages/pending"),
        (Method::GET, "/api/v1/messages/ack"),
        (
            Method::PATCH,
            "/api/v1/messages/6f1c0000-0000-4000-8000-000000000000",
        ),
        (Method::POST, "/healthz"),
    ] {
        let r = Reply::from(alice.req(method.clone(), path).send().await.unwrap()).await;
        let r = r.expect(405, Some("method_not_allowed"));
        assert!(r.header("allow").is_some(), "{method} {path}");
    }

    // 409: same key, different request.
    alice
        .send_raw(ok("aGk="), Some("key-1"))
        .await
        .expect(201, None);
    alice
        .send_raw(ok("aGVsbG8="), Some("key-1"))
        .await
        .expect(409, Some("idempotency_conflict"));
}

async fn unauthorized_variants(b: Backend) {
    let (_data, s) = start(b).await;
    let path = s.url("/api/v1/messages/pending");
    let now = now();
    let bad_tokens = [
        token_with(json!({"sub": ALICE, "exp": now - 3600}), SECRET),
        token_with(
            json!({"sub": ALICE, "exp": now + 3600}),
            "another-secret-that-is-also-long-enough",
        ),
        token_with(json!({"sub": "alice", "exp": now + 3600}), SECRET),
        token_with(json!({"sub": ALICE}), SECRET),
        token_with(json!({"exp": now + 3600}), SECRET),
        "not.a.token".to_owned(),
    ];
    for t in &bad_tokens {
        let r = Reply::from(s.http.get(&path).bearer_auth(t).send().await.unwrap()).await;
        let r = r.expect(401, Some("unauthorized"));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    let r = Reply::from(s.http.get(&path).send().await.unwrap())
        .await
        .expect(401, Some("unauthorized"));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = s
        .http
        .get(&path)
        .header("authorization", format!("Basic {}", b64(b"a:b")));
    Reply::from(r.send().await.unwrap())
        .await
        .expect(401, Some("unauthorized"));
    // Authentication comes before validation: no token and a bad body is still 401.
    let r = s
        .http
        .post(s.url("/api/v1/messages"))
        .body("{")
        .send()
        .await
        .unwrap();
    Reply::from(r).await.expect(401, Some("unauthorized"));
    let r = s
        .http
        .get(s.url("/api/v1/messages/zzz"))
        .send()
        .await
        .unwrap();
    Reply::from(r).await.expect(401, Some("unauthorized"));
}

async fn paging_with_shared_timestamps_returns_each_once(b: Backend) {
    let (data, s) = start(b).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let mut sent = Vec::new();
    for i in 0..23u8 {
        sent.push(
            alice.send("c", &[BOB], &[i]).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    data.db().await.same_timestamp().await;

    let mut expected = sent.clone();
    expected.sort(); // ties on created_at are broken by id
    for limit in [1, 5, 7, 23, 100] {
        assert_eq!(bob.pending_ids("", limit).await, expected, "limit {limit}");
    }
    // A page boundary in the middle of the tie, then acknowledging as we go.
    let first = bob.pending("?limit=10").await.body;
    let ids: Vec<&str> = first["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, &expected[..10]);
    bob.ack_many(&ids).await.expect(200, None);
    let cursor = first["cursor"].as_str().unwrap();
    let rest = bob
        .pending(&format!("?limit=100&cursor={cursor}"))
        .await
        .body;
    let rest: Vec<&str> = rest["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(rest, &expected[10..]);
    assert_eq!(bob.pending_ids("", 4).await, &expected[10..]);
}

async fn convo_filter_and_include_data(b: Backend) {
    let (_data, s) = start(b).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let a1 = alice.send("a", &[BOB], b"one").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b1 = alice.send("b", &[BOB], b"two").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let a2 = alice.send("a", &[BOB], b"three").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_eq!(
        bob.pending_ids("&convo_id=a", 1).await,
        vec![a1.clone(), a2.clone()]
    );
    assert_eq!(bob.pending_ids("&convo_id=b", 10).await, vec![b1.clone()]);
    assert!(bob.pending_ids("&convo_id=zzz", 10).await.is_empty());

    let page = bob
        .pending("?include_data=true")
        .await
        .expect(200, None)
        .body;
    let got: Vec<(String, Vec<u8>, i64)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                unb64(m["encrypted_data"].as_str().unwrap()),
                m["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (a1, b"one".to_vec(), 1),
            (b1, b"two".to_vec(), 1),
            (a2, b"three".to_vec(), 2)
        ],
        "oldest first, per-conversation seq, exact bytes"
    );
    let page = bob.pending("?include_data=false").await.body;
    assert!(page["messages"][0].get("encrypted_data").is_none());
}

async fn idempotent_retry_sequential(b: Backend) {
    let (data, s) = start(b).await;
    let (alice, bob, carol) = (s.user(ALICE), s.user(BOB), s.user(CAROL));
    let body = json!({"encrypted_data": b64(b"hello"), "convo_id": "c", "recipients": [BOB]});

    let first = alice
        .send_raw(body.clone(), Some("retry-1"))
        .await
        .expect(201, None);
    let again = alice
        .send_raw(body.clone(), Some("retry-1"))
        .await
        .expect(201, None);
    assert_eq!(again.body, first.body, "same body");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(bob.pending_ids("", 10).await.len(), 1, "stored once");
    assert_eq!(data.blob_files().len(), 1);

    // Same key, different request → 409 (payload, conversation or recipients differ).
    for other in [
        json!({"encrypted_data": b64(b"hellO"), "convo_id": "c", "recipients": [BOB]}),
        json!({"encrypted_data": b64(b"hello"), "convo_id": "d", "recipients": [BOB]}),
        json!({"encrypted_data": b64(b"hello"), "convo_id": "c", "recipients": [BOB, CAROL]}),
    ] {
        alice
            .send_raw(other, Some("retry-1"))
            .await
            .expect(409, Some("idempotency_conflict"));
    }
    // Keys belong to a sender: carol's "retry-1" is her own.
    let theirs = carol
        .send_raw(body.clone(), Some("retry-1"))
        .await
        .expect(201, None);
    assert_ne!(theirs.body["id"], first.body["id"]);
    assert_eq!(theirs.body["seq"], 2);

    // Still remembered after the message was delivered and deleted.
    bob.ack_many(&[
        first.body["id"].as_str().unwrap(),
        theirs.body["id"].as_str().unwrap(),
    ])
    .await
    .expect(200, None);
    wait_for_blob_count(&data, 0).await;
    let late = alice
        .send_raw(body, Some("retry-1"))
        .await
        .expect(201, None);
    assert_eq!(late.body, first.body);
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    assert!(
        bob.pending_ids("", 10).await.is_empty(),
        "nothing new stored"
    );
    assert_eq!(data.blob_files().len(), 0);
}

async fn idempotent_retry_concurrent(b: Backend) {
    let (data, s) = start(b).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let body = json!({"encrypted_data": b64(&[9u8; 2000]), "convo_id": "c", "recipients": [BOB]});
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let (alice, body) = (alice.clone(), body.clone());
            tokio::spawn(async move { alice.send_raw(body, Some("same-key")).await })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut replayed = 0;
    for t in tasks {
        let r = t.await.unwrap().expect(201, None);
        replayed += usize::from(r.header("idempotent-replayed") == Some("true"));
        bodies.push(r.body);
    }
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "every retry got the same message"
    );
    assert_eq!(replayed, 11, "exactly one original");
    assert_eq!(bodies[0]["seq"], 1);
    assert_eq!(bob.pending_ids("", 50).await.len(), 1);
    assert_eq!(
        data.blob_files().len(),
        1,
        "losing attempts removed their blobs"
    );
    // The conversation counter was not consumed by the losers.
    assert_eq!(alice.send("c", &[BOB], b"next").await["seq"], 2);
}

async fn seq_is_gapless_under_concurrent_senders(b: Backend) {
    let (_data, s) = start(b).await;
    let senders: Vec<_> = (0..24)
        .map(|i| s.user(&format!("did:plc:sender{i}")))
        .collect();
    let tasks: Vec<_> = senders
        .iter()
        .cloned()
        .map(|u| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for _ in 0..3 {
                    seqs.push(u.send("busy", &[BOB], b"x").await["seq"].as_i64().unwrap());
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's messages are in order: {seqs:?}"
        );
        all.extend(seqs);
    }
    all.sort();
    assert_eq!(
        all,
        (1..=72).collect::<Vec<i64>>(),
        "1..=72, no gaps, no duplicates"
    );
    // Pending order (created_at, id) agrees with seq order within the conversation.
    let bob = s.user(BOB);
    let page = bob.pending("?limit=500").await.body;
    let seqs: Vec<i64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 72);
    let other = s.user(ALICE).send("quiet", &[BOB], b"x").await;
    assert_eq!(other["seq"], 1, "each conversation counts on its own");
}

async fn expired_messages_vanish_and_cleanup_removes_them(b: Backend) {
    let data = Data::new(b).await;
    let mut config = data.config();
    config.message_ttl = Duration::from_secs(1);
    let s = TestServer::start(config.clone()).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let r = alice
        .send_raw(
            json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB]}),
            Some("k"),
        )
        .await;
    let r = r.expect(201, None);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let created = parse_time(&r.body["created_at"]);
    assert_eq!(
        parse_time(&r.body["expires_at"]) - created,
        chrono::Duration::seconds(1)
    );
    bob.fetch(&id).await.expect(200, None);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Invisible right away, before any clean-up ran.
    bob.fetch(&id).await.expect(404, Some("not_found"));
    alice.fetch(&id).await.expect(404, Some("not_found"));
    assert!(bob.pending_ids("", 10).await.is_empty());
    bob.ack(&id).await.expect(404, Some("not_found"));
    alice.delete(&id).await.expect(404, Some("not_found"));
    assert_eq!(data.blob_files().len(), 1, "still on disk until clean-up");

    // One clean-up pass, as `catbird-server gc` runs it.
    let relay = catbird_server::build_relay(&config).await.unwrap();
    let report = catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(
        (report.expired, report.blobs_deleted, report.blobs_failed),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(data.blob_files().len(), 0);
    let mut db = data.db().await;
    for table in ["messages", "recipients", "blob_deletions"] {
        assert_eq!(db.count(table).await, 0, "{table}");
    }
    // Idempotency keys outlive the message by at least 24 h.
    assert_eq!(db.count("idempotency_keys").await, 1);
    let again = catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(again, Default::default(), "nothing left to do");
}

async fn delivered_messages_are_kept_when_delete_on_delivery_is_off(b: Backend) {
    let data = Data::new(b).await;
    let mut config = data.config();
    config.delete_on_delivery = false;
    let s = TestServer::start(config).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let id = alice.send("c", &[BOB], b"keep").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    bob.ack(&id).await.expect(204, None);
    bob.ack(&id).await.expect(204, None);
    assert!(bob.pending_ids("", 10).await.is_empty());
    bob.fetch(&id).await.expect(200, None);
    alice.fetch(&id).await.expect(200, None);
    assert_eq!(data.blob_files().len(), 1);
}

async fn sender_withdraws_message(b: Backend) {
    let (data, s) = start(b).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let id = alice.send("c", &[BOB, ALICE], b"oops").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        alice.pending_ids("", 10).await,
        vec![id.clone()],
        "the sender may list itself"
    );
    alice.delete(&id).await.expect(204, None);
    alice.delete(&id).await.expect(404, Some("not_found"));
    bob.fetch(&id).await.expect(404, Some("not_found"));
    assert!(bob.pending_ids("", 10).await.is_empty());
    assert!(alice.pending_ids("", 10).await.is_empty());
    wait_for_blob_count(&data, 0).await;
}

async fn batch_ack(b: Backend) {
    let (data, s) = start(b).await;
    let (alice, bob, carol) = (s.user(ALICE), s.user(BOB), s.user(CAROL));
    let solo = alice.send("c", &[BOB], b"1").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shared = alice.send("c", &[BOB, CAROL], b"2").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let foreign = alice.send("c", &[CAROL], b"3").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let random = uuid::Uuid::new_v4().to_string();

    let r = bob
        .ack_many(&[&shared, &random, &solo, &foreign, &shared])
        .await
        .expect(200, None);
    assert_eq!(
        r.body,
        json!({"acked": [shared, solo], "not_found": [random, foreign]})
    );
    assert!(bob.pending_ids("", 10).await.is_empty());
    // solo is fully delivered (gone); shared still waits for carol.
    wait_for_blob_count(&data, 2).await;
    carol.fetch(&shared).await.expect(200, None);
    let r = bob.ack_many(&[&shared]).await.expect(200, None);
    assert_eq!(
        r.body,
        json!({"acked": [shared], "not_found": []}),
        "acknowledging twice is fine"
    );
}

async fn restart_loses_nothing(b: Backend) {
    let data = Data::new(b).await;
    let s = TestServer::start(data.config()).await;
    let alice = s.user(ALICE);
    let mut sent = Vec::new();
    for i in 0..10u8 {
        let payload = vec![i; 100 + i as usize];
        sent.push((
            alice.send("c", &[BOB], &payload).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
            payload,
        ));
    }
    s.stop().await.expect("clean shutdown");

    let s = TestServer::start(data.config()).await;
    let bob = s.user(BOB);
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(bob.pending_ids("", 3).await, ids);
    for (id, payload) in &sent {
        let m = bob.fetch(id).await.expect(200, None).body;
        assert_eq!(&unb64(m["encrypted_data"].as_str().unwrap()), payload);
    }
    assert_eq!(
        s.user(ALICE).send("c", &[BOB], b"more").await["seq"],
        11,
        "the counter survived"
    );
}

async fn c09_body_limit_follows_max_message_bytes(b: Backend) {
    let data = Data::new(b).await;
    let mut config = data.config();
    // Above axum's hidden 2 MB Json limit, and base64 adds a third on top.
    config.max_message_bytes = 3 * 1024 * 1024;
    let s = TestServer::start(config).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let max: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let id = alice.send("c", &[BOB], &max).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = bob.fetch(&id).await.expect(200, None).body;
    assert!(
        unb64(m["encrypted_data"].as_str().unwrap()) == max,
        "byte-identical"
    );
    let mut over = max.clone();
    over.push(0);
    let body = json!({"encrypted_data": b64(&over), "convo_id": "c", "recipients": [BOB]});
    alice
        .send_raw(body, None)
        .await
        .expect(413, Some("payload_too_large"));
    // A body far beyond any legitimate request is refused before it is parsed.
    let huge = "A".repeat(12 * 1024 * 1024);
    let body = format!(r#"{{"encrypted_data":"{huge}","convo_id":"c","recipients":["{BOB}"]}}"#);
    let r = alice
        .req(Method::POST, "/api/v1/messages")
        .header("content-type", "application/json")
        .body(body);
    match r.send().await {
        Ok(r) => drop(Reply::from(r).await.expect(413, Some("payload_too_large"))),
        // The server may answer 413 and close before the client finished writing.
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    assert_eq!(data.blob_files().len(), 1);
}

async fn c11_concurrent_writers_while_polling(b: Backend) {
    let (data, s) = start(b).await;
    let bob = s.user(BOB);
    let poller = {
        let bob = bob.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                let r = bob.pending("?limit=500").await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            }
        })
    };
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let u = s.user(&format!("did:plc:writer{i}"));
            tokio::spawn(async move {
                let body = json!({"encrypted_data": b64(&[i as u8; 64]), "convo_id": format!("c{}", i % 5), "recipients": [BOB, CAROL]});
                u.send_raw(body, None).await.status
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    poller.await.unwrap();
    let mut db = data.db().await;
    assert_eq!(db.count("messages").await, 50);
    assert_eq!(db.count("recipients").await, 100);
    assert_eq!(data.blob_files().len(), 50);
    assert_eq!(bob.pending_ids("", 500).await.len(), 50);
}

/// `n` concurrent sends by `user`, each answered later.
fn spawn_sends(user: &crate::common::User, n: usize) -> Vec<tokio::task::JoinHandle<Reply>> {
    (0..n)
        .map(|_| {
            let user = user.clone();
            let body = json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB]});
            tokio::spawn(async move { user.send_raw(body, None).await })
        })
        .collect()
}

async fn c12_locked_database_is_503_and_reads_go_on(b: Backend) {
    let data = Data::new(b).await;
    let mut config = data.config();
    config.database_max_connections = 6;
    config.database_acquire_timeout = Duration::from_millis(300);
    config.database_statement_timeout = Duration::from_millis(500);
    let s = TestServer::start(config).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));
    let id = alice.send("c", &[BOB], b"before").await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut lock = data.db().await;
    lock.lock_writes().await;
    let writes = spawn_sends(&alice, 4);
    // Reads are not blocked by the stuck writers.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(bob.pending_ids("", 10).await, vec![id.clone()]);
        bob.fetch(&id).await.expect(200, None);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "reads wait for writers"
        );
    }
    for w in writes {
        let r = w.await.unwrap().expect(503, Some("unavailable"));
        assert!(r.header("retry-after").is_some());
    }
    // More writers than connections: those that cannot get one are 503 too, never 500.
    let writes = spawn_sends(&alice, 10);
    for w in writes {
        w.await.unwrap().expect(503, Some("unavailable"));
    }
    lock.release().await;
    assert_eq!(
        alice.send("c", &[BOB], b"after").await["seq"],
        2,
        "recovers without a restart; no seq lost"
    );
    assert_eq!(
        data.blob_files().len(),
        2,
        "the refused sends left no blob behind"
    );
}

async fn c15_failed_write_leaves_no_blob_and_missing_blob_is_404(b: Backend) {
    let data = Data::new(b).await;
    let mut config = data.config();
    config.database_statement_timeout = Duration::from_millis(300);
    let s = TestServer::start(config.clone()).await;
    let (alice, bob) = (s.user(ALICE), s.user(BOB));

    let mut lock = data.db().await;
    lock.lock_writes().await;
    alice
        .send_raw(
            json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB]}),
            None,
        )
        .await
        .expect(503, Some("unavailable"));
    lock.release().await;
    let relay = catbird_server::build_relay(&config).await.unwrap();
    catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(data.blob_files().len(), 0, "no blob left behind");
    assert_eq!(data.db().await.count("messages").await, 0, "no row");

    // A row whose blob vanished: 404 (logged server-side), never a 500.
    let gone = alice.send("c", &[BOB], b"vanishes").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let kept = alice.send("c", &[BOB], b"stays").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let files = data.blob_files();
    let victim = files
        .iter()
        .find(|f| std::fs::read(f).unwrap() == b"vanishes")
        .unwrap();
    std::fs::remove_file(victim).unwrap();
    bob.fetch(&gone).await.expect(404, Some("not_found"));
    alice.fetch(&gone).await.expect(404, Some("not_found"));
    let page = bob
        .pending("?include_data=true")
        .await
        .expect(200, None)
        .body;
    let ids: HashSet<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        HashSet::from([kept.as_str()]),
        "the rest of the page is still served"
    );
    bob.fetch(&kept).await.expect(200, None);
    // Acknowledging and deleting it still work (the missing blob counts as deleted).
    bob.ack(&gone).await.expect(204, None);
    catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(data.db().await.count("blob_deletions").await, 0);
}

async fn health_and_readiness(b: Backend) {
    let (data, s) = start(b).await;
    let r = Reply::from(s.http.get(s.url("/healthz")).send().await.unwrap())
        .await
        .expect(200, None);
    assert_eq!(r.body, json!({"status": "ok"}));
    let r = Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap())
        .await
        .expect(200, None);
    assert_eq!(r.body["status"], "ok");
    // A blob folder that is there but cannot be written to fails every send: not ready.
    if b != Backend::PostgresS3 && crate::common::read_only(&data.blob_root(), true) {
        let r = Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap())
            .await
            .expect(503, Some("unavailable"));
        assert_eq!(r.body["blob_store"], "unavailable");
        s.user("did:plc:alice")
            .send_raw(
                json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": ["did:plc:bob"]}),
                None,
            )
            .await
            .expect(503, Some("unavailable"));
        crate::common::read_only(&data.blob_root(), false);
        Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap())
            .await
            .expect(200, None);
    }
    // Take the blob folder away: readiness names the blob store.
    std::fs::remove_dir_all(data.blob_root()).unwrap();
    let r = Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap())
        .await
        .expect(503, Some("unavailable"));
    assert_eq!(r.body["blob_store"], "unavailable");
    assert_eq!(r.body["database"], "ok");
    assert!(r.body["message"].as_str().unwrap().contains("blob store"));
}

#[test]
fn c13_migrations_are_pinned_to_lf() {
    let attrs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.gitattributes")).unwrap();
    assert!(
        attrs
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["*.sql", "text", "eol=lf"])
    );
    for db in ["sqlite", "postgres"] {
        let dir = format!("{}/migrations/{db}", env!("CARGO_MANIFEST_DIR"));
        for f in std::fs::read_dir(dir).unwrap().flatten() {
            assert!(
                !std::fs::read(f.path()).unwrap().contains(&b'\r'),
                "{} has CR line endings",
                f.path().display()
            );
        }
    }
}

async fn cleanup_removes_old_orphans_only(b: Backend) {
    let (data, s) = start(b).await;
    let alice = s.user(ALICE);
    let id = alice.send("c", &[BOB], b"referenced").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // An orphan, as a crash between upload and commit leaves it.
    let relay = catbird_server::build_relay(&s.config).await.unwrap();
    relay
        .blobs
        .put(bytes::Bytes::from_static(b"orphan"))
        .await
        .unwrap();
    assert_eq!(data.blob_files().len(), 2);

    // Within the grace period (default 1 h) it may belong to a send in flight: kept.
    let r = catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(r.orphans_deleted, 0);
    assert_eq!(data.blob_files().len(), 2);

    // What this server could not have written is never an orphan: on R2 another
    // deployment's blob under a longer prefix (ours + `nested/`), in a folder a stray file.
    let mut config = s.config.clone();
    config.orphan_grace = Duration::ZERO;
    let mut kept = Vec::new();
    let outside = tempfile::tempdir().unwrap();
    if b == Backend::PostgresS3 {
        let mut other = config.clone();
        other.r2_prefix = format!("{}nested/", config.r2_prefix);
        let other = catbird_server::build_relay(&other).await.unwrap();
        other
            .blobs
            .put(bytes::Bytes::from_static(b"foreign"))
            .await
            .unwrap();
    } else {
        // A file where a shard folder would be (it must not stop the scan), a blob name
        // in the wrong shard or an upper-case one (the sweep would delete another path
        // and count it), and a symlinked shard (its target is outside BLOB_DIR).
        let root = data.blob_root();
        let uuid = |first: &str| format!("{first}{}", &uuid::Uuid::new_v4().to_string()[2..]);
        for (path, bytes) in [
            (root.join("ab/notes.txt"), &b"foreign"[..]),
            (root.join("fe"), b"foreign"),
            (root.join("00").join(uuid("ff")), b"foreign"),
            (root.join("AB").join(uuid("ab")), b"foreign"),
            (outside.path().join(uuid("cd")), b"outside"),
        ] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            kept.push(path);
        }
        std::os::unix::fs::symlink(outside.path(), root.join("cd")).unwrap();
    }

    let relay = catbird_server::build_relay(&config).await.unwrap();
    let r = catbird_server::retention::sweep(&relay).await.unwrap();
    assert_eq!(r.orphans_deleted, 1, "{r:?}");
    assert!(!r.orphan_scan_failed, "{r:?}");
    for path in &kept {
        assert!(path.exists(), "{} was deleted", path.display());
    }
    let mut left: Vec<Vec<u8>> = data
        .blob_files()
        .iter()
        .filter(|f| !kept.contains(f))
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    left.sort();
    left.dedup();
    let expected: &[&[u8]] = if b == Backend::PostgresS3 {
        &[b"foreign", b"referenced"]
    } else {
        &[b"outside", b"referenced"] // blob_files follows the symlinked shard
    };
    assert_eq!(
        left, expected,
        "a referenced blob is never an orphan, nor is what the server did not write"
    );
    s.user(BOB).fetch(&id).await.expect(200, None);
    assert!(relay.blobs.operations().list >= 1);
}
