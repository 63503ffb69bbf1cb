//! Test harness: the real server on 127.0.0.1:0 over real HTTP, on SQLite (a temporary
//! folder) or PostgreSQL (a fresh database per test, dropped afterwards).
//!
//! PostgreSQL comes from `CATBIRD_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`, which must be reachable). Set it to
//! `skip` to run only the SQLite half locally; under `CI=true` skipping is refused.

#![allow(dead_code)]

use std::time::Duration;

use catbird_server::config::Config;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::s3_server::S3Server;

pub const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";
pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Generates one test per backend from `async fn name(b: Backend)` functions in the
/// invoking module: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(b) = $crate::common::Backend::postgres() {
                        super::$name(b).await
                    }
                }
            )*
        }
    };
}

/// Like [`on_both!`], plus `postgres_s3::name`: the production shape, PostgreSQL with
/// blobs in an S3-compatible server.
#[macro_export]
macro_rules! on_all_backends {
    ($($name:ident),* $(,)?) => {
        $crate::on_both!($($name),*);
        mod postgres_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::common::Backend::postgres().is_some() {
                        super::$name($crate::common::Backend::PostgresS3).await
                    }
                }
            )*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: SQLite and blobs in a folder.
    Sqlite,
    /// PostgreSQL and blobs in a folder.
    Postgres,
    /// Production shape: PostgreSQL and blobs in an S3-compatible server.
    PostgresS3,
}

impl Backend {
    /// `Some(Postgres)` unless PostgreSQL tests are explicitly skipped (never under CI).
    pub fn postgres() -> Option<Backend> {
        match std::env::var("CATBIRD_TEST_POSTGRES_URL").as_deref() {
            Ok("skip") if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!(
                    "CATBIRD_TEST_POSTGRES_URL=skip is not allowed under CI: PostgreSQL tests must run"
                )
            }
            Ok("skip") => {
                eprintln!("PostgreSQL test skipped (CATBIRD_TEST_POSTGRES_URL=skip)");
                None
            }
            _ => Some(Backend::Postgres),
        }
    }
}

fn admin_url() -> String {
    std::env::var("CATBIRD_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG.to_owned())
}

/// A PostgreSQL database of its own, dropped when this is dropped.
pub struct PgDb {
    pub url: String,
    name: String,
}

impl PgDb {
    pub async fn create() -> PgDb {
        let admin = admin_url();
        let name = format!("catbird_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL tests need a server at {admin} ({e}). Start one, point \
                 CATBIRD_TEST_POSTGRES_URL at another, or set it to `skip` to run only SQLite tests."
            )
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        PgDb {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        // Drop runs inside a runtime; do the async clean-up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "drop database if exists {name} with (force)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// Where a test server keeps its data; survives restarts of the server.
pub struct Data {
    pub dir: TempDir,
    pub pg: Option<PgDb>,
    pub s3: Option<S3Server>,
}

impl Data {
    pub async fn new(backend: Backend) -> Data {
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres | Backend::PostgresS3 => Some(PgDb::create().await),
        };
        let s3 = match backend {
            Backend::PostgresS3 => Some(S3Server::start().await),
            _ => None,
        };
        Data {
            dir: tempfile::tempdir().unwrap(),
            pg,
            s3,
        }
    }

    pub fn database_url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url.clone(),
            None => format!("sqlite://{}/catbird.db", self.dir.path().display()),
        }
    }

    /// A configuration using this data, the test secret and no periodic clean-up.
    pub fn config(&self) -> Config {
        let mut c = Config::defaults();
        c.database_url = self.database_url();
        c.blob_dir = self.dir.path().join("blobs");
        c.jwt_secret = Some(SECRET.to_owned());
        c.gc_interval = Duration::from_secs(24 * 3600);
        // Tests make many requests as one caller; tests/it/limits.rs turns it back on.
        c.rate_limit_per_minute = 0;
        if let Some(s3) = &self.s3 {
            s3.configure(&mut c);
        }
        c
    }

    /// The folder where blobs end up as files: `BLOB_DIR`, or the S3 server's bucket.
    pub fn blob_root(&self) -> std::path::PathBuf {
        match &self.s3 {
            Some(s3) => s3.bucket_dir(),
            None => self.dir.path().join("blobs"),
        }
    }

    /// Every stored blob, as a file.
    pub fn blob_files(&self) -> Vec<std::path::PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.push(e.path());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.blob_root(), &mut out);
        out
    }
}

pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(catbird_server::run(config.clone(), listener, async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let server = TestServer {
            base,
            http,
            config,
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("server exited during start-up");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server did not become healthy");
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap()
    }

    pub fn user(&self, did: &str) -> User {
        User::new(&self.base, did)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An HS256 token signed with the test secret, as any client library would sign it.
pub fn token(sub: &str) -> String {
    token_with(json!({"sub": sub, "exp": now() + 3600}), SECRET)
}

pub fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// A caller with a valid token.
#[derive(Clone)]
pub struct User {
    pub did: String,
    pub token: String,
    base: String,
    http: reqwest::Client,
}

/// Status, headers and JSON body (Null when empty) of a response.
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub async fn from(r: reqwest::Response) -> Reply {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{status}: body is not JSON ({e}): {text}"))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Asserts the status and, for errors, API.md's error shape with this code.
    pub fn expect(self, status: u16, code: Option<&str>) -> Reply {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.body
        );
        if let Some(code) = code {
            assert_eq!(self.body["error"], code, "body: {}", self.body);
            assert!(
                self.body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "body: {}",
                self.body
            );
            assert_eq!(self.headers["content-type"], "application/json");
        }
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

impl User {
    /// A caller of the server at `base` (in-process or a spawned binary).
    pub fn new(base: &str, did: &str) -> User {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        User {
            did: did.to_owned(),
            token: token(did),
            base: base.to_owned(),
            http,
        }
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    pub async fn send_raw(&self, body: Value, idempotency_key: Option<&str>) -> Reply {
        let mut r = self.req(Method::POST, "/api/v1/messages").json(&body);
        if let Some(k) = idempotency_key {
            r = r.header("Idempotency-Key", k);
        }
        Reply::from(r.send().await.unwrap()).await
    }

    /// Send `data` and expect 201; returns the response body.
    pub async fn send(&self, convo: &str, recipients: &[&str], data: &[u8]) -> Value {
        self.send_raw(
            json!({"encrypted_data": b64(data), "convo_id": convo, "recipients": recipients}),
            None,
        )
        .await
        .expect(201, None)
        .body
    }

    pub async fn fetch(&self, id: &str) -> Reply {
        Reply::from(
            self.req(Method::GET, &format!("/api/v1/messages/{id}"))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn pending(&self, query: &str) -> Reply {
        Reply::from(
            self.req(Method::GET, &format!("/api/v1/messages/pending{query}"))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Ids of every pending message, following cursors.
    pub async fn pending_ids(&self, extra: &str, limit: u32) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = format!("?limit={limit}{extra}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let page = self.pending(&q).await.expect(200, None).body;
            ids.extend(
                page["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m["id"].as_str().unwrap().to_owned()),
            );
            match page["cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return ids,
            }
        }
    }

    pub async fn ack(&self, id: &str) -> Reply {
        Reply::from(
            self.req(Method::POST, &format!("/api/v1/messages/{id}/ack"))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn ack_many(&self, ids: &[&str]) -> Reply {
        Reply::from(
            self.req(Method::POST, "/api/v1/messages/ack")
                .json(&json!({ "ids": ids }))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    pub async fn delete(&self, id: &str) -> Reply {
        Reply::from(
            self.req(Method::DELETE, &format!("/api/v1/messages/{id}"))
                .send()
                .await
                .unwrap(),
        )
        .await
    }
}

/// A direct connection to a test server's database, for what HTTP cannot show
/// (row counts) or cause (many messages sharing one timestamp, a locked database).
pub enum Db {
    Sqlite(sqlx::SqliteConnection),
    Pg(sqlx::PgConnection),
}

impl Data {
    pub async fn db(&self) -> Db {
        match &self.pg {
            Some(pg) => Db::Pg(sqlx::PgConnection::connect(&pg.url).await.unwrap()),
            None => Db::Sqlite(
                sqlx::SqliteConnection::connect(&self.database_url())
                    .await
                    .unwrap(),
            ),
        }
    }
}

impl Db {
    pub async fn exec(&mut self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Db::Sqlite(c) => sqlx::query(sql).execute(c).await.map(|_| ()),
            Db::Pg(c) => sqlx::query(sql).execute(c).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn count(&mut self, table: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(format!("select count(*) from {table}"));
        match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
            Db::Pg(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
        }
    }

    /// Hold the database's write lock (SQLite) or an exclusive lock on the conversation
    /// counters (PostgreSQL) until [`Db::release`]: writes wait, reads go on.
    pub async fn lock_writes(&mut self) {
        match self {
            Db::Sqlite(_) => self.exec("begin immediate").await,
            Db::Pg(_) => {
                self.exec("begin").await;
                self.exec("lock table conversations in exclusive mode")
                    .await;
            }
        }
    }

    pub async fn release(&mut self) {
        self.exec("rollback").await
    }

    /// Give every message (and recipient row) the same creation time.
    pub async fn same_timestamp(&mut self) {
        match self {
            Db::Sqlite(_) => {
                self.exec("update messages set created_at = 1796300000000")
                    .await;
                self.exec("update recipients set created_at = 1796300000000")
                    .await;
            }
            Db::Pg(_) => {
                self.exec("update messages set created_at = '2026-12-01T00:00:00.000Z'")
                    .await;
                self.exec("update recipients set created_at = '2026-12-01T00:00:00.000Z'")
                    .await;
            }
        }
    }
}

/// Make the file or folder `path` read-only (or writable again); whether it is now
/// read-only. Permissions do not stop root, so as root it is made immutable
/// (`chattr +i`), where the filesystem allows it.
pub fn read_only(path: &std::path::Path, on: bool) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let chattr = || {
        let _ = std::process::Command::new("chattr")
            .arg(if on { "+i" } else { "-i" })
            .arg(path)
            .stderr(std::process::Stdio::null())
            .status();
    };
    let chmod = || {
        let mode = match (path.is_dir(), on) {
            (true, true) => 0o555,
            (true, false) => 0o755,
            (false, true) => 0o444,
            (false, false) => 0o644,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // An immutable file's permissions cannot change: chmod first, chattr last.
    if on {
        chmod();
        chattr();
    } else {
        chattr();
        chmod();
    }
    let writable = if path.is_dir() {
        let probe = path.join("writable-probe");
        let created = std::fs::File::create(&probe).is_ok();
        let _ = std::fs::remove_file(probe);
        created
    } else {
        std::fs::OpenOptions::new().append(true).open(path).is_ok()
    };
    if on && writable {
        eprintln!(
            "cannot make {} read-only here; check skipped",
            path.display()
        );
    }
    !writable
}
