//! What operators see: the Prometheus scrape after a short run, request ids on every
//! log line of a request, JSON logs, and no token, secret or message bytes in any log.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Backend, Data, Reply, SECRET, TestServer, b64};

const BOB: &str = "did:plc:bob";
const CAROL: &str = "did:plc:carol";

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        .parse()
        .unwrap()
}

crate::on_all_backends!(metrics_after_a_short_run);

async fn metrics_after_a_short_run(b: Backend) {
    if b == Backend::Postgres {
        return; // both blob stores are covered by the other two
    }
    let data = Data::new(b).await;
    let mut c = data.config();
    c.gc_interval = Duration::from_millis(200);
    let s = TestServer::start(c).await;
    let (alice, bob, carol) = (s.user("did:plc:alice"), s.user(BOB), s.user(CAROL));
    let mut ids = Vec::new();
    for i in 0..3u8 {
        ids.push(
            alice.send("c", &[BOB, CAROL], &[i; 100]).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    bob.fetch(&ids[0]).await.expect(200, None);
    bob.fetch("6f1c0000-0000-4000-8000-000000000000")
        .await
        .expect(404, None);
    bob.ack_many(&[&ids[0], &ids[1]]).await.expect(200, None);
    carol.ack(&ids[0]).await.expect(204, None); // fully delivered: deleted
    alice.delete(&ids[2]).await.expect(204, None);
    // Wait for a clean-up pass after all that (it refreshes the backlog gauges).
    tokio::time::sleep(Duration::from_millis(600)).await;

    let r = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("text")
    );
    let text = r.text().await.unwrap();
    let http = |route: &str, method: &str, status: u16| {
        sample(
            &text,
            &format!(
                "catbird_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(http("/api/v1/messages", "POST", 201), 3.0);
    assert_eq!(
        http("/api/v1/messages/{id}", "GET", 200),
        1.0,
        "route templates, not raw paths"
    );
    assert_eq!(http("/api/v1/messages/{id}", "GET", 404), 1.0);
    assert_eq!(http("/api/v1/messages/ack", "POST", 200), 1.0);
    assert!(!text.contains(&ids[0]), "no message id in any label");
    assert_eq!(
        sample(
            &text,
            "catbird_http_request_duration_seconds_count{route=\"/api/v1/messages\"}"
        ),
        3.0
    );

    let blob = |kind: &str| {
        sample(
            &text,
            &format!("catbird_blob_operations_total{{kind=\"{kind}\",outcome=\"ok\"}}"),
        )
    };
    assert_eq!(blob("put"), 3.0, "exactly one PUT per send");
    assert_eq!(blob("get"), 1.0, "one GET per fetch");
    assert!(
        blob("delete") >= 2.0,
        "the delivered and the withdrawn message"
    );

    let msgs = |event: &str| {
        sample(
            &text,
            &format!("catbird_messages_total{{event=\"{event}\"}}"),
        )
    };
    assert_eq!(msgs("stored"), 3.0);
    assert_eq!(msgs("acknowledged"), 3.0);
    assert_eq!(msgs("deleted"), 2.0);
    // Left: ids[1], waiting for carol only.
    assert_eq!(sample(&text, "catbird_pending_backlog"), 1.0);
    let age = sample(&text, "catbird_oldest_pending_age_seconds");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(sample(&text, "catbird_db_connections{state=\"open\"}") >= 1.0);
    assert_eq!(
        sample(&text, "catbird_db_connections{state=\"waiting\"}"),
        0.0,
        "nobody waits when idle"
    );
    assert!(sample(&text, "catbird_cleanup_runs_total{outcome=\"ok\"}") >= 1.0);
    assert!(sample(&text, "catbird_cleanup_duration_seconds_count") >= 1.0);

    // Off by configuration.
    let mut c = data.config();
    c.metrics_enabled = false;
    let off = TestServer::start(c).await;
    Reply::from(off.http.get(off.url("/metrics")).send().await.unwrap())
        .await
        .expect(404, Some("not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_json_logs_and_nothing_secret_in_them() {
    use crate::process::Server;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("JWT_SECRET", SECRET),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "debug"),
        ("RATE_LIMIT_PER_MINUTE", "0"),
    ];
    let server = Server::start(dir.path(), &env).await;
    let http = reqwest::Client::new();
    let token = crate::common::token("did:plc:alice");
    let payload = b"some ciphertext that must never be logged 0123456789".repeat(3);
    let body = json!({"encrypted_data": b64(&payload), "convo_id": "c", "recipients": [BOB]});
    let r = http
        .post(format!("{}/api/v1/messages", server.base))
        .bearer_auth(&token)
        .header("x-request-id", "client-chosen-id-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "client-chosen-id-42", "echoed");
    let id: Value = r.json().await.unwrap();
    let r = http
        .get(format!(
            "{}/api/v1/messages/{}",
            server.base,
            id["id"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        uuid::Uuid::parse_str(&generated).is_ok(),
        "generated when the client sends none: {generated}"
    );
    let _ = http
        .get(format!("{}/api/v1/messages/pending", server.base))
        .bearer_auth("bad.token.here")
        .send()
        .await;
    let stderr_path = server.proc.stderr_path().to_owned();
    assert!(server.stop().await.success());

    let logs = std::fs::read_to_string(stderr_path).unwrap();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l}"))
        })
        .collect();
    let tagged = |id: &str| {
        lines
            .iter()
            .filter(|l| l["span"]["request_id"] == id)
            .count()
    };
    assert!(
        tagged("client-chosen-id-42") >= 1,
        "the client's id is on its request's lines"
    );
    assert!(
        tagged(&generated) >= 1,
        "the generated id is on its request's lines"
    );
    for secret in [token.as_str(), SECRET, &b64(&payload), "bad.token.here"] {
        assert!(!logs.contains(secret), "a log line contains {secret:.20}…");
    }
    assert!(
        !logs.contains("some ciphertext"),
        "message bytes in the log"
    );
}
