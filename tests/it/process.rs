//! The real `catbird-server` binary as operators run it (API.md "Command line" and
//! "Configuration"): development secret and banner, `token`, graceful SIGTERM, restart
//! on the same folder, `migrate`, `gc`, and refusal of invalid configuration.
//!
//! Every process gets a cleared environment (only PATH kept) and a fresh temporary
//! working directory, so the developer's own `.env`, `data/` or `JWT_SECRET` can never
//! leak into a test. Output goes to files, not pipes: a chatty server can never block on
//! a full pipe, and the files are shown when something fails.

#![cfg(unix)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{SECRET, b64, unb64};

const BIN: &str = env!("CARGO_BIN_EXE_catbird-server");

/// How long a one-shot command (migrate, gc, token, a refused start-up) may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(20);
/// How long the server may take to answer /healthz, and to exit after SIGTERM.
const START_LIMIT: Duration = Duration::from_secs(10);
const STOP_LIMIT: Duration = Duration::from_secs(10);

const PENDING: &str = "/api/v1/messages/pending";

/// A port nobody listens on right now: bind port 0, keep the number, release it.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary in `dir` with only PATH, HOST, PORT and `env` set (later entries win).
pub(crate) fn catbird(dir: &Path, port: u16, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .envs(env.iter().copied())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

static SPAWNED: AtomicUsize = AtomicUsize::new(0);

/// A child process that is killed if the test fails before it exits on its own.
pub(crate) struct Proc {
    pub(crate) child: Child,
    what: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// Spawn `cmd` with stdout/stderr captured into files under `logs`.
    pub(crate) fn spawn(mut cmd: Command, logs: &Path, what: &str) -> Proc {
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let stdout = logs.join(format!("proc-{n}.stdout"));
        let stderr = logs.join(format!("proc-{n}.stderr"));
        cmd.stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        Proc {
            child,
            what: what.to_owned(),
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub(crate) fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Wait for the exit (polling, so the runtime keeps running), or panic after `limit`.
    pub(crate) async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}` still running after {limit:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, as systemd, Docker and Kubernetes stop a service. `unsafe` is forbidden
    /// in this crate, so no libc::kill: the `kill` utility sends it.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run `kill`");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only a process still running is killed: a failing test leaves nothing behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a one-shot command left behind.
pub(crate) struct Done {
    status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Done {
    pub(crate) fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "`{what}` failed with {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

/// Run `catbird-server <args>` in `dir` to completion (bounded by [`COMMAND_LIMIT`]).
pub(crate) async fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Done {
    let what = format!("catbird-server {}", args.join(" "));
    let mut proc = Proc::spawn(catbird(dir, free_port(), args, env), dir, &what);
    let status = proc.wait(COMMAND_LIMIT).await;
    Done {
        status,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    }
}

/// `catbird-server serve` on a free port, up and healthy.
pub(crate) struct Server {
    pub(crate) proc: Proc,
    pub(crate) base: String,
    http: reqwest::Client,
}

impl Server {
    pub(crate) async fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut proc = Proc::spawn(catbird(dir, port, &["serve"], env), dir, "serve");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                break;
            }
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!(
                    "server exited during start-up with {status}\n--- stderr:\n{}",
                    proc.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "server did not answer /healthz on {base} within {START_LIMIT:?}\n--- stderr:\n{}",
                    proc.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Server { proc, base, http }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn pending_status(&self, token: &str) -> StatusCode {
        self.http
            .get(self.url(PENDING))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// POST a message and return the 201 body.
    async fn send(&self, token: &str, recipients: &[&str], data: &[u8]) -> Value {
        let r = self
            .http
            .post(self.url("/api/v1/messages"))
            .bearer_auth(token)
            .json(&json!({"encrypted_data": b64(data), "convo_id": "process-test", "recipients": recipients}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "send: {body}");
        body
    }

    /// SIGTERM, then the exit status (panics if it takes longer than [`STOP_LIMIT`]).
    pub(crate) async fn stop(mut self) -> ExitStatus {
        self.proc.terminate();
        self.proc.wait(STOP_LIMIT).await
    }
}

/// The token in the development banner's `export TOKEN=…` line.
fn banner_token(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("export TOKEN="))
        .unwrap_or_else(|| panic!("no `export TOKEN=` line in the banner:\n{stdout}"))
        .trim()
        .to_owned()
}

/// The claims of a JWT, read without verifying (verification is the server's job here).
fn jwt_claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {token:?}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

/// `catbird-server token` output: exactly one line, the token.
fn single_token(done: &Done) -> String {
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "token prints one line: {:?}", done.stdout);
    lines[0].trim().to_owned()
}

/// The counts of `catbird-server gc`'s report line, by name.
fn gc_counts(stdout: &str) -> HashMap<String, u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("expired: "))
        .unwrap_or_else(|| panic!("no counts line in gc output:\n{stdout}"));
    let counts: HashMap<String, u64> = line
        .split(", ")
        .map(|field| {
            let (name, n) = field
                .split_once(": ")
                .unwrap_or_else(|| panic!("bad field {field:?} in {line:?}"));
            let n = n
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad count in {line:?}"));
            (name.to_owned(), n)
        })
        .collect();
    for name in [
        "expired",
        "delivered",
        "idempotency keys",
        "blobs deleted",
        "blob deletions failed",
        "orphans deleted",
    ] {
        assert!(counts.contains_key(name), "gc line lacks {name:?}: {line}");
    }
    counts
}

/// Every blob file under the default `data/blobs`.
fn blob_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(path: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("data/blobs"), &mut out);
    out
}

// ---------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------

/// The zero-configuration path of API.md: no key → a generated secret, a banner with a
/// working token, `token` minting for the same server, SIGTERM → exit 0, and a restart
/// that keeps both the secret and the stored messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_secret_banner_token_sigterm_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;

    let secret_path = dir.path().join("data/jwt_secret");
    let meta = std::fs::metadata(&secret_path).expect("serve creates data/jwt_secret");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the secret must be readable by its owner only"
    );
    let secret = std::fs::read_to_string(&secret_path).unwrap();
    assert!(secret.trim().len() >= 32, "generated secret too short");

    let banner = server.proc.stdout();
    assert!(
        banner.contains("data/jwt_secret"),
        "banner names the file:\n{banner}"
    );
    let dev_token = banner_token(&banner);
    assert_eq!(
        server.pending_status(&dev_token).await,
        StatusCode::OK,
        "banner token"
    );
    // Control: the server does refuse tokens, so the 200 above means something.
    assert_eq!(
        server.pending_status("garbage").await,
        StatusCode::UNAUTHORIZED
    );

    let minted = run(dir.path(), &["token", "--sub", "did:plc:alice"], &[]).await;
    minted.assert_success("token --sub did:plc:alice");
    let alice = single_token(&minted);
    assert_eq!(jwt_claims(&alice)["sub"], "did:plc:alice");
    assert_eq!(
        server.pending_status(&alice).await,
        StatusCode::OK,
        "minted token"
    );

    // Every byte value, so any re-encoding on the way to disk and back would show.
    let payload: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let sent = server
        .send(&alice, &["did:plc:alice", "did:plc:bob"], &payload)
        .await;
    let id = sent["id"].as_str().unwrap().to_owned();

    let status = server.stop().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must end in exit 0: {status}"
    );

    let server = Server::start(dir.path(), &[]).await;
    assert_eq!(
        std::fs::read_to_string(&secret_path).unwrap(),
        secret,
        "restart must reuse the secret, not regenerate it"
    );
    for (who, token) in [("banner", &dev_token), ("alice", &alice)] {
        assert_eq!(
            server.pending_status(token).await,
            StatusCode::OK,
            "{who}'s token from before the restart"
        );
    }
    let r = server
        .http
        .get(server.url(&format!("/api/v1/messages/{id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let fetched: Value = r.json().await.unwrap();
    assert_eq!(
        unb64(fetched["encrypted_data"].as_str().unwrap()),
        payload,
        "payload after restart"
    );
    let status = server.stop().await;
    assert_eq!(status.code(), Some(0), "second SIGTERM: {status}");
}

/// `token` run before the first `serve` creates the secret; the server then adopts it
/// rather than generating its own, so the token keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_before_first_serve_creates_the_secret_the_server_uses() {
    let dir = tempfile::tempdir().unwrap();
    let minted = run(dir.path(), &["token", "--sub", "did:web:example.com"], &[]).await;
    minted.assert_success("token");
    let token = single_token(&minted);
    let meta = std::fs::metadata(dir.path().join("data/jwt_secret"))
        .expect("token creates data/jwt_secret");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let server = Server::start(dir.path(), &[]).await;
    assert_eq!(server.pending_status(&token).await, StatusCode::OK);
    assert_eq!(server.stop().await.code(), Some(0));
}

/// With JWT_SECRET configured there is no development mode: no file, no banner, and
/// `token` signs with the configured secret for the configured lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_secret_means_no_banner_and_token_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("JWT_SECRET", SECRET)];
    let server = Server::start(dir.path(), &env).await;
    assert!(
        !dir.path().join("data/jwt_secret").exists(),
        "no secret file when JWT_SECRET is set"
    );
    let stdout = server.proc.stdout();
    assert!(
        !stdout.contains("export TOKEN="),
        "no dev banner when JWT_SECRET is set:\n{stdout}"
    );

    let minted = run(
        dir.path(),
        &["token", "--sub", "did:plc:alice", "--ttl", "2h"],
        &env,
    )
    .await;
    minted.assert_success("token --ttl 2h");
    let token = single_token(&minted);
    // Verify as an independent client would: HS256 with the configured secret.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        &validation,
    )
    .expect("token is HS256 with JWT_SECRET")
    .claims;
    assert_eq!(claims["sub"], "did:plc:alice");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        7200,
        "--ttl 2h: {claims}"
    );
    assert_eq!(server.pending_status(&token).await, StatusCode::OK);
    // And the server accepts what any client signs with the same secret.
    assert_eq!(
        server
            .pending_status(&crate::common::token("did:plc:bob"))
            .await,
        StatusCode::OK
    );
    assert_eq!(server.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------
// migrate, gc
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_migrations_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(dir.path(), &["migrate"], &[]).await;
    first.assert_success("migrate");
    assert!(
        first.stdout.contains("migrations applied"),
        "stdout: {}",
        first.stdout
    );
    assert!(
        dir.path().join("data/catbird.db").exists(),
        "migrate creates the default SQLite database"
    );
    // Migrations are idempotent: operators run this on every deploy.
    let again = run(dir.path(), &["migrate"], &[]).await;
    again.assert_success("migrate (second time)");
    assert!(again.stdout.contains("migrations applied"));
}

/// `gc` prints real counts: nothing on an empty folder, then exactly the message that
/// expired (row and blob), then nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_cleans_expired_messages_and_reports_counts() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("JWT_SECRET", SECRET), ("MESSAGE_TTL", "1s")];

    let empty = run(dir.path(), &["gc"], &env).await;
    empty.assert_success("gc on an empty folder");
    let counts = gc_counts(&empty.stdout);
    assert!(
        counts.values().all(|n| *n == 0),
        "nothing to clean: {counts:?}"
    );

    let server = Server::start(dir.path(), &env).await;
    let alice = crate::common::token("did:plc:alice");
    let sent = server.send(&alice, &["did:plc:bob"], b"short-lived").await;
    assert_eq!(server.stop().await.code(), Some(0));
    assert_eq!(blob_files(dir.path()).len(), 1, "one blob stored");

    // Wait exactly until the message's own expiry (1 s TTL), plus a little.
    let expires_at = chrono::DateTime::parse_from_rfc3339(sent["expires_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let left = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;

    let swept = run(dir.path(), &["gc"], &env).await;
    swept.assert_success("gc after expiry");
    let counts = gc_counts(&swept.stdout);
    assert_eq!(counts["expired"], 1, "{}", swept.stdout);
    assert_eq!(counts["blobs deleted"], 1, "{}", swept.stdout);
    assert_eq!(counts["blob deletions failed"], 0, "{}", swept.stdout);
    assert_eq!(
        blob_files(dir.path()),
        Vec::<PathBuf>::new(),
        "blob removed"
    );

    let again = run(dir.path(), &["gc"], &env).await;
    again.assert_success("gc, second pass");
    let counts = gc_counts(&again.stdout);
    assert!(
        counts.values().all(|n| *n == 0),
        "already clean: {counts:?}"
    );
}

// ---------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------

/// API.md: "A value that is present but invalid stops start-up with a message naming
/// the variable." All cases run before failing, so one report lists every offender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_exits_non_zero_naming_the_variable() {
    let cases = [
        ("MESSAGE_TTL", "abc"),
        ("DATABASE_URL", "mysql://x"),
        ("JWT_SECRET", "tooShortSecret-7f3a"),
        ("PORT", "notaport"),
        ("BLOB_BACKEND", "ftp"),
        ("GC_INTERVAL", "0s"),
        // Beyond every timestamp type: a send would fail after its commit.
        ("MESSAGE_TTL", "300000y"),
        ("ORPHAN_GRACE", "3651d"),
        // Past what SQLite's busy timeout holds; below PostgreSQL's unit (0 = off).
        ("DATABASE_STATEMENT_TIMEOUT", "25d"),
        ("DATABASE_STATEMENT_TIMEOUT", "1ns"),
        ("DATABASE_ACQUIRE_TIMEOUT", "1ns"),
        // A busy loop.
        ("GC_INTERVAL", "1ns"),
        // Overflows the token checks' arithmetic.
        ("JWT_LEEWAY_SECONDS", "9999999999"),
        ("MAX_MESSAGE_BYTES", "0"),
        ("DELETE_ON_DELIVERY", "maybe"),
        ("JWT_PUBLIC_KEY_FILE", "no-such-key.pem"),
        ("LOG_FORMAT", "xml"),
    ];
    let mut failures = Vec::new();
    for (var, value) in cases {
        let dir = tempfile::tempdir().unwrap();
        let done = run(dir.path(), &["serve"], &[(var, value)]).await;
        if done.status.success() {
            failures.push(format!("{var}={value}: exited 0"));
        } else if !done.stderr.contains(var) {
            failures.push(format!(
                "{var}={value}: stderr does not name {var}:\n{}",
                done.stderr
            ));
        }
        if var == "JWT_SECRET" && (done.stderr.contains(value) || done.stdout.contains(value)) {
            failures.push(format!("{var}: the secret value is echoed in the output"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Configuration also comes from `.env` in the working directory, and the real
/// environment wins over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotenv_file_is_read_and_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "MESSAGE_TTL=abc\n").unwrap();
    let done = run(dir.path(), &["migrate"], &[]).await;
    assert!(
        !done.status.success(),
        "invalid MESSAGE_TTL in .env must be refused"
    );
    assert!(
        done.stderr.contains("MESSAGE_TTL"),
        "stderr: {}",
        done.stderr
    );

    let done = run(dir.path(), &["migrate"], &[("MESSAGE_TTL", "1h")]).await;
    done.assert_success("migrate with MESSAGE_TTL overriding .env");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_a_sub_that_is_not_a_did_fails_naming_sub() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(
        dir.path(),
        &["token", "--sub", "notadid"],
        &[("JWT_SECRET", SECRET)],
    )
    .await;
    assert!(!done.status.success(), "token --sub notadid must fail");
    assert!(done.stderr.contains("--sub"), "stderr: {}", done.stderr);
    assert!(
        done.stdout.trim().is_empty(),
        "no token printed: {}",
        done.stdout
    );

    // Missing --sub altogether is a usage error naming it too.
    let done = run(dir.path(), &["token"], &[("JWT_SECRET", SECRET)]).await;
    assert!(!done.status.success(), "token without --sub must fail");
    assert!(done.stderr.contains("--sub"), "stderr: {}", done.stderr);
}

/// A public-key server cannot mint tokens (it has no private key): `token` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_a_public_key_configured_fails_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rsa_public.pem");
    let done = run(
        dir.path(),
        &["token", "--sub", "did:plc:alice"],
        &[("JWT_PUBLIC_KEY_FILE", key.to_str().unwrap())],
    )
    .await;
    assert!(!done.status.success(), "token must fail without a secret");
    assert!(
        done.stderr.contains("JWT_PUBLIC_KEY_FILE"),
        "stderr: {}",
        done.stderr
    );
    assert!(done.stdout.trim().is_empty(), "stdout: {}", done.stdout);
}
