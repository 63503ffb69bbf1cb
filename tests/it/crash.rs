//! Crash safety: under a sustained send load, `kill -9` the real binary, restart it on
//! the same data, and check that every message that got a 201 is readable
//! byte-identical by each recipient, that nothing visible lacks its blob, and that
//! after `catbird-server gc` with a zero grace period no orphan blob remains. On the
//! embedded default and on PostgreSQL + S3. Scale it with `CATBIRD_CRASH_CLIENTS` and
//! `CATBIRD_CRASH_MS` (defaults 8 clients, 1500 ms of load).

#![cfg(unix)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use catbird_server::config::{BlobBackend, Config};
use serde_json::json;

use crate::common::{Backend, Data, User, b64, token, unb64};
use crate::process::{Server, run};

const BOB: &str = "did:plc:bob";
const CAROL: &str = "did:plc:carol";

/// A message the server answered 201 for: its id and payload.
type Sent = (String, Vec<u8>);

/// The environment that makes the binary use `c`'s storage.
pub(crate) fn env_of(c: &Config) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("DATABASE_URL", c.database_url.clone()),
        ("BLOB_DIR", c.blob_dir.display().to_string()),
        ("JWT_SECRET", c.jwt_secret.clone().unwrap()),
        ("RATE_LIMIT_PER_MINUTE", "0".into()),
        ("RUST_LOG", "warn".into()),
    ];
    if c.blob_backend == BlobBackend::R2 {
        env.extend([
            ("BLOB_BACKEND", "r2".into()),
            ("R2_ENDPOINT", c.r2_endpoint.clone().unwrap()),
            ("R2_BUCKET", c.r2_bucket.clone()),
            ("R2_ACCESS_KEY_ID", c.r2_access_key_id.clone().unwrap()),
            (
                "R2_SECRET_ACCESS_KEY",
                c.r2_secret_access_key.clone().unwrap(),
            ),
        ]);
    }
    env
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

crate::on_all_backends!(kill_9_under_load_loses_nothing);

async fn kill_9_under_load_loses_nothing(b: Backend) {
    if b == Backend::Postgres {
        return; // covered by the other two: the embedded default and production shape
    }
    let data = Data::new(b).await;
    let env = env_of(&data.config());
    let dir = data.dir.path();
    let server = Server::start(dir, &as_refs(&env)).await;

    // Eight clients send as fast as they can; every 201 is remembered.
    let acked: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let n_clients = crate::soak::setting("CATBIRD_CRASH_CLIENTS", 8);
    let load_ms = crate::soak::setting("CATBIRD_CRASH_MS", 1500);
    let clients: Vec<_> = (0..n_clients)
        .map(|c| {
            let (acked, stop, http) = (acked.clone(), stop.clone(), http.clone());
            let url = format!("{}/api/v1/messages", server.base);
            let sender = token(&format!("did:plc:sender{c}"));
            tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let payload: Vec<u8> = format!("client {c} message {n} ").repeat(1 + (n as usize % 40)).into_bytes();
                    let body = json!({"encrypted_data": b64(&payload), "convo_id": format!("load{c}"), "recipients": [BOB, CAROL]});
                    let Ok(r) = http.post(&url).bearer_auth(&sender).json(&body).send().await else { continue };
                    if r.status() == reqwest::StatusCode::CREATED
                        && let Ok(v) = r.json::<serde_json::Value>().await
                    {
                        acked.lock().unwrap().push((v["id"].as_str().unwrap().to_owned(), payload));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(load_ms)).await;
    let mut server = server;
    server.proc.child.kill().unwrap(); // SIGKILL, mid-load
    server.proc.wait(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "the load ran ({} messages acknowledged)",
        acked.len()
    );

    // Restart on the same data: every 201 is there, byte-identical, for each recipient.
    let server = Server::start(dir, &as_refs(&env)).await;
    for who in [BOB, CAROL] {
        let user = User::new(&server.base, who);
        for (id, payload) in &acked {
            let m = user.fetch(id).await.expect(200, None).body;
            assert_eq!(
                &unb64(m["encrypted_data"].as_str().unwrap()),
                payload,
                "{id} changed"
            );
        }
        // Nothing is visible without its blob (messages committed but never answered
        // count too).
        for id in user.pending_ids("", 500).await {
            user.fetch(&id).await.expect(200, None);
        }
    }
    let status = server.stop().await;
    assert!(status.success(), "{status}");

    // One clean-up pass with no grace: exactly the referenced blobs remain.
    let mut gc_env = env.clone();
    gc_env.push(("ORPHAN_GRACE", "0s".into()));
    let gc = run(dir, &["gc"], &as_refs(&gc_env)).await;
    gc.assert_success("gc");
    let mut db = data.db().await;
    let rows = db.count("messages").await as usize;
    assert!(rows >= acked.len());
    let blobs = data.blob_files();
    assert_eq!(blobs.len(), rows, "one blob per message row, no orphans");
    let names: HashSet<String> = blobs
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), rows);
    println!(
        "crash {b:?}: {n_clients} clients, kill -9 after {load_ms} ms: {} sends answered 201, all readable \
         after restart; {rows} rows and {} blobs after gc ({})",
        acked.len(),
        blobs.len(),
        gc.stdout.lines().last().unwrap_or_default()
    );
}
