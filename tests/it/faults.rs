//! Dependency faults: the database or the blob store goes away (connections cut, new
//! ones refused) and comes back. Requests fail fast with 503 and store nothing,
//! `/readyz` names the failing dependency, and everything recovers without a restart.
//! The outage is a TCP proxy in front of the real dependency that the test turns off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::common::{Backend, Data, Reply, TestServer, b64};

const BOB: &str = "did:plc:bob";

/// Forwards 127.0.0.1:<port> to `target` while up; while down, cuts every connection
/// and refuses new ones.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<JoinSet<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let task = {
            let (up, links) = (up.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is reset
                    }
                    let target = target.clone();
                    links.lock().await.spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            })
        };
        Proxy {
            port,
            up,
            links,
            task,
        }
    }

    async fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.links.lock().await.abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ready(s: &TestServer) -> Reply {
    Reply::from(s.http.get(s.url("/readyz")).send().await.unwrap()).await
}

fn message(n: u8) -> serde_json::Value {
    json!({"encrypted_data": b64(&[n; 32]), "convo_id": "c", "recipients": [BOB]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_503_then_recovers() {
    let Some(_) = Backend::postgres() else { return };
    let data = Data::new(Backend::Postgres).await;
    let mut c = data.config();
    let url = c.database_url.clone();
    let (prefix, rest) = url
        .split_once("@127.0.0.1:5432")
        .expect("the test database is on 127.0.0.1:5432");
    let proxy = Proxy::start("127.0.0.1:5432".into()).await;
    c.database_url = format!("{prefix}@127.0.0.1:{}{rest}", proxy.port);
    c.database_acquire_timeout = Duration::from_secs(1);
    let s = TestServer::start(c.clone()).await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    alice.send_raw(message(1), None).await.expect(201, None);

    proxy.down().await;
    let started = Instant::now();
    alice
        .send_raw(message(2), None)
        .await
        .expect(503, Some("unavailable"));
    bob.pending("").await.expect(503, Some("unavailable"));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "bounded: {:?}",
        started.elapsed()
    );
    let r = ready(&s).await.expect(503, Some("unavailable"));
    assert_eq!(
        (r.body["database"].as_str(), r.body["blob_store"].as_str()),
        (Some("unavailable"), Some("ok"))
    );
    assert!(r.body["message"].as_str().unwrap().contains("database"));
    assert_eq!(
        data.blob_files().len(),
        1,
        "the refused send removed its blob"
    );

    proxy.restore();
    let mut recovered = false;
    for _ in 0..50 {
        if ready(&s).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "/readyz recovers without a restart");
    alice.send_raw(message(3), None).await.expect(201, None);
    assert_eq!(bob.pending_ids("", 10).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_store_outage_is_503_then_recovers() {
    let Some(_) = Backend::postgres() else { return };
    let data = Data::new(Backend::PostgresS3).await;
    let mut c = data.config();
    let endpoint = c.r2_endpoint.clone().unwrap();
    let proxy = Proxy::start(endpoint.trim_start_matches("http://").to_owned()).await;
    c.r2_endpoint = Some(format!("http://127.0.0.1:{}", proxy.port));
    c.r2_timeout = Duration::from_secs(2);
    let s = TestServer::start(c).await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    let id = alice
        .send_raw(message(1), None)
        .await
        .expect(201, None)
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();

    proxy.down().await;
    let started = Instant::now();
    let r = alice
        .send_raw(message(2), None)
        .await
        .expect(503, Some("unavailable"));
    assert!(r.header("retry-after").is_some());
    bob.fetch(&id).await.expect(503, Some("unavailable"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        started.elapsed()
    );
    assert_eq!(
        bob.pending_ids("", 10).await,
        vec![id.clone()],
        "metadata still answers; nothing new stored"
    );
    let r = ready(&s).await.expect(503, Some("unavailable"));
    assert_eq!(
        (r.body["database"].as_str(), r.body["blob_store"].as_str()),
        (Some("ok"), Some("unavailable"))
    );

    proxy.restore();
    ready(&s).await.expect(200, None);
    bob.fetch(&id).await.expect(200, None);
    alice.send_raw(message(3), None).await.expect(201, None);
    assert_eq!(data.db().await.count("messages").await, 2);
    assert_eq!(data.blob_files().len(), 2);
}

/// A SQLite file the server cannot write (it opens such a file read-only) fails writes
/// with 503; once the file is writable again, every kind of write recovers without a
/// restart, not only sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_sqlite_file_is_503_then_recovers() {
    let data = Data::new(Backend::Sqlite).await;
    let c = data.config();
    // The messages come from a server process of their own: SQLite reuses a file
    // descriptor its process already had open, writable, for the same file.
    let work = tempfile::tempdir().unwrap();
    let blob_dir = c.blob_dir.display().to_string();
    let env = [
        ("DATABASE_URL", c.database_url.as_str()),
        ("BLOB_DIR", blob_dir.as_str()),
        ("JWT_SECRET", crate::common::SECRET),
    ];
    let p = crate::process::Server::start(work.path(), &env).await;
    let alice = crate::common::User::new(&p.base, "did:plc:alice");
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = alice.send_raw(message(i), None).await.expect(201, None);
        ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    assert!(p.stop().await.success());

    let db = c.database_url.trim_start_matches("sqlite://").to_owned();
    let db = std::path::Path::new(&db);
    if !crate::common::read_only(db, true) {
        return;
    }
    let s = TestServer::start(c).await;
    let (alice, bob) = (s.user("did:plc:alice"), s.user(BOB));
    bob.ack(&ids[0]).await.expect(503, Some("unavailable"));
    alice.delete(&ids[1]).await.expect(503, Some("unavailable"));
    crate::common::read_only(db, false);
    bob.ack(&ids[0]).await.expect(204, None);
    alice.delete(&ids[1]).await.expect(204, None);
    alice.send_raw(message(9), None).await.expect(201, None);
    assert_eq!(bob.pending_ids("", 10).await.len(), 2);
}
