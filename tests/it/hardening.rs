//! Regressions for what adversarial testing found: ids in one spelling only, repeated
//! headers refused, oversized Content-Length refused before the body is read, and JWT
//! claim edge cases.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Backend, Data, Reply, SECRET, TestServer, now, token_with};

const BOB: &str = "did:plc:bob";

async fn start() -> (Data, TestServer) {
    let data = Data::new(Backend::Sqlite).await;
    let s = TestServer::start(data.config()).await;
    (data, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_accepted_only_lowercase_hyphenated() {
    let (_d, s) = start().await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    let id = alice.send("c", &[BOB], b"x").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let variants = [
        id.to_uppercase(),
        id.replace('-', ""),
        format!("%7B{id}%7D"),
        format!("urn:uuid:{id}"),
        "a".repeat(60_000),
    ];
    for v in &variants {
        let r = bob.fetch(v).await.expect(400, Some("invalid_request"));
        assert!(
            r.body["message"].as_str().unwrap().len() < 200,
            "the bad id is not echoed back"
        );
    }
    let r = bob
        .ack_many(&[&id.to_uppercase()])
        .await
        .expect(400, Some("invalid_request"));
    assert!(r.body["message"].as_str().unwrap().contains("ids[0]"));
    let r = bob.ack_many(&[&id, &id]).await.expect(200, None);
    assert_eq!(
        r.body,
        json!({"acked": [id], "not_found": []}),
        "the id comes back as sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_headers_are_refused() {
    let (data, s) = start().await;
    let alice = s.user("did:plc:alice");
    let body = json!({"encrypted_data": "aGk=", "convo_id": "c", "recipients": [BOB]});
    let r = alice
        .req(Method::POST, "/api/v1/messages")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .json(&body)
        .send()
        .await
        .unwrap();
    let r = Reply::from(r).await.expect(400, Some("invalid_request"));
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    let r = s
        .http
        .get(s.url("/api/v1/messages/pending"))
        .header("authorization", format!("Bearer {}", alice.token))
        .header("authorization", "Bearer nonsense")
        .send()
        .await
        .unwrap();
    Reply::from(r).await.expect(401, Some("unauthorized"));
    assert_eq!(data.db().await.count("messages").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_content_length_is_413_before_the_body() {
    let (_d, s) = start().await;
    let alice = s.user("did:plc:alice");
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 4294967296\r\n\r\n{{",
        alice.token
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("answered without waiting for 4 GiB")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_claim_edge_cases() {
    let (_d, s) = start().await;
    let path = s.url("/api/v1/messages/pending");
    let get = |t: String| s.http.get(&path).bearer_auth(t).send();
    // NumericDate may be fractional (RFC 7519): accepted for iat like for exp.
    let t = token_with(
        json!({"sub": BOB, "exp": now() + 60, "iat": now() as f64 - 0.5}),
        SECRET,
    );
    Reply::from(get(t).await.unwrap()).await.expect(200, None);
    let t = token_with(json!({"exp": now() + 60}), SECRET);
    let r = Reply::from(get(t).await.unwrap())
        .await
        .expect(401, Some("unauthorized"));
    assert!(
        r.body["message"].as_str().unwrap().contains("sub"),
        "{}",
        r.body
    );
}

/// Found by schema fuzzing: a non-canonical last base64 character ("aGl" for "hi")
/// matches the documented pattern, so it must be accepted, and the description must
/// carry the patterns the server enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzing_regressions() {
    let (_d, s) = start().await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    let id = alice
        .send_raw(
            json!({"encrypted_data": "aGl", "convo_id": "c", "recipients": [BOB]}),
            None,
        )
        .await
        .expect(201, None)
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = bob.fetch(&id).await.expect(200, None).body;
    assert_eq!(
        m["encrypted_data"], "aGk=",
        "stored as the decoded bytes, returned canonical"
    );

    let spec: serde_json::Value = s
        .http
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &spec["components"]["schemas"];
    assert!(
        schemas["Did"]["pattern"]
            .as_str()
            .unwrap()
            .starts_with("^did:")
    );
    assert!(schemas["MessageIdText"]["pattern"].is_string());
    assert!(schemas["SendBody"]["properties"]["encrypted_data"]["pattern"].is_string());
    let header = spec["paths"]["/api/v1/messages"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Idempotency-Key")
        .unwrap();
    assert_eq!(header["schema"]["maxLength"], 255);
    assert!(header["schema"]["pattern"].is_string());
}

/// Found in review: client-chosen request ids and HTTP methods must not let a client
/// flood the logs or mint unbounded metric series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_metric_labels_are_bounded() {
    let (_d, s) = start().await;
    let long = "x".repeat(200);
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("x-request-id", &long)
        .send()
        .await
        .unwrap();
    let echoed = r.headers()["x-request-id"].to_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(echoed).is_ok(),
        "replaced by a generated id: {echoed}"
    );
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("x-request-id", "ok-id.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "ok-id.1");

    for m in ["FOO1", "FOO2"] {
        let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
        let _ = s
            .http
            .request(method, s.url("/api/v1/messages"))
            .send()
            .await
            .unwrap();
    }
    let text = s
        .http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("FOO1") && !text.contains("FOO2"), "{text}");
    assert!(text.contains("method=\"other\""));
}
