//! Configuration: one clap struct read from flags, the environment and `.env`.
//!
//! Every field is also an environment variable of the same name in upper case; a value
//! that is present but invalid stops start-up with clap's message, which names it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Relay for end-to-end-encrypted (MLS) chat messages.
#[derive(Debug, Parser)]
#[command(name = "catbird-server", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations, then serve HTTP (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print an HS256 token signed with the configured secret, for curl and local testing.
    Token {
        /// The caller's DID, put in the `sub` claim.
        #[arg(long)]
        sub: String,
        /// How long the token is valid (humantime: `1h`, `30m`, `7d`).
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: Duration,
    },
    /// Run one clean-up pass (expired and delivered messages, queued blob deletions) and exit.
    Gc,
    /// Check the R2/S3 bucket (write, read, delete a probe object) and install the
    /// retention lifecycle rule, keeping the bucket's other rules. Safe to re-run.
    SetupBucket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BlobBackend {
    /// Files under `BLOB_DIR` (the embedded default).
    Filesystem,
    /// Cloudflare R2 or any S3-compatible store.
    #[value(alias = "s3")]
    R2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
pub struct Config {
    /// Listen address.
    #[arg(long, env = "HOST", default_value = "127.0.0.1", global = true)]
    pub host: String,

    /// Listen port.
    #[arg(long, env = "PORT", default_value_t = 3000, global = true)]
    pub port: u16,

    /// `sqlite://path` (embedded default) or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://data/catbird.db",
        global = true
    )]
    pub database_url: String,

    /// Largest number of database connections (PostgreSQL; SQLite readers).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub database_max_connections: u32,

    /// How long a request waits for a free database connection before answering 503.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT", default_value = "5s",
          value_parser = database_timeout, global = true)]
    pub database_acquire_timeout: Duration,

    /// Longest a database statement may run or wait for a lock before the request
    /// answers 503 (PostgreSQL `statement_timeout`; SQLite busy timeout).
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT", default_value = "10s",
          value_parser = database_timeout, global = true)]
    pub database_statement_timeout: Duration,

    /// Where message ciphertext is kept.
    #[arg(long, env = "BLOB_BACKEND", value_enum, default_value_t = BlobBackend::Filesystem, global = true)]
    pub blob_backend: BlobBackend,

    /// Folder of the filesystem blob backend.
    #[arg(long, env = "BLOB_DIR", default_value = "data/blobs", global = true)]
    pub blob_dir: PathBuf,

    /// R2 account id: the endpoint becomes `https://<id>.r2.cloudflarestorage.com`.
    #[arg(long, env = "R2_ACCOUNT_ID", global = true)]
    pub r2_account_id: Option<String>,

    /// Explicit S3 endpoint URL (overrides the account id; MinIO, other S3 stores).
    #[arg(long, env = "R2_ENDPOINT", global = true)]
    pub r2_endpoint: Option<String>,

    /// Bucket holding the blobs.
    #[arg(
        long,
        env = "R2_BUCKET",
        default_value = "catbird-messages",
        global = true
    )]
    pub r2_bucket: String,

    /// Access key id (required for `BLOB_BACKEND=r2`).
    #[arg(long, env = "R2_ACCESS_KEY_ID", global = true)]
    pub r2_access_key_id: Option<String>,

    /// Secret access key (required for `BLOB_BACKEND=r2`).
    #[arg(
        long,
        env = "R2_SECRET_ACCESS_KEY",
        hide_env_values = true,
        global = true
    )]
    pub r2_secret_access_key: Option<String>,

    /// Signing region; R2 uses `auto`.
    #[arg(long, env = "R2_REGION", default_value = "auto", global = true)]
    pub r2_region: String,

    /// Key prefix of blobs.
    #[arg(long, env = "R2_PREFIX", default_value = "messages/", global = true)]
    pub r2_prefix: String,

    /// Longest wait to open a connection to the object store.
    #[arg(long, env = "R2_CONNECT_TIMEOUT", default_value = "3s", value_parser = positive_duration, global = true)]
    pub r2_connect_timeout: Duration,

    /// Longest an object-store operation may take, retries included; then 503.
    #[arg(long, env = "R2_TIMEOUT", default_value = "10s", value_parser = positive_duration, global = true)]
    pub r2_timeout: Duration,

    /// Attempts per object-store operation (1 = no retry).
    #[arg(long, env = "R2_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10), global = true)]
    pub r2_max_attempts: u32,

    /// HS256 secret (at least 32 bytes). Without it or a public key, one is generated
    /// into `data/jwt_secret`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key: RS256 (RSA), ES256 (P-256) or EdDSA (Ed25519).
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", global = true)]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `aud` claim.
    #[arg(long, env = "JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim.
    #[arg(long, env = "JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds (at most 3600).
    #[arg(long, env = "JWT_LEEWAY_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600), global = true)]
    pub jwt_leeway_seconds: u64,

    /// Retention of every message (humantime: `30d`, `12h`, `90s`).
    #[arg(long, env = "MESSAGE_TTL", default_value = "30d", value_parser = positive_duration, global = true)]
    pub message_ttl: Duration,

    /// Period of the background clean-up.
    #[arg(long, env = "GC_INTERVAL", default_value = "1h", value_parser = interval, global = true)]
    pub gc_interval: Duration,

    /// Age after which a blob that no message references (left by a crash or a failed
    /// send) is deleted by clean-up. Use `0s` only while no server is running.
    #[arg(long, env = "ORPHAN_GRACE", default_value = "1h", value_parser = duration, global = true)]
    pub orphan_grace: Duration,

    /// How often the background clean-up also scans the blob store for orphans (each
    /// scan lists every blob: billed LIST requests on R2).
    #[arg(long, env = "ORPHAN_SCAN_INTERVAL", default_value = "24h", value_parser = interval, global = true)]
    pub orphan_scan_interval: Duration,

    /// Largest decoded payload, in bytes.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u64).range(1..=(256 << 20)), global = true)]
    pub max_message_bytes: u64,

    /// Largest recipient list.
    #[arg(long, env = "MAX_RECIPIENTS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=100_000), global = true)]
    pub max_recipients: u64,

    /// Delete a message and its blob once every recipient acknowledged it.
    #[arg(long, env = "DELETE_ON_DELIVERY", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub delete_on_delivery: bool,

    /// Requests per minute one caller (DID) may make, sustained; 0 turns the limit off.
    #[arg(
        long,
        env = "RATE_LIMIT_PER_MINUTE",
        default_value_t = 600,
        global = true
    )]
    pub rate_limit_per_minute: u32,

    /// Requests one caller may make at once above the sustained rate.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub rate_limit_burst: u32,

    /// Longest a request may take; then 503 `unavailable` (the work is abandoned).
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration, global = true)]
    pub request_timeout: Duration,

    /// On SIGTERM or Ctrl-C, how long in-flight requests may take to finish.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration, global = true)]
    pub shutdown_timeout: Duration,

    /// Browser origins allowed by CORS, comma-separated (`https://app.example.com`), or
    /// `*` for any. Empty: no CORS headers (native clients and curl need none).
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", default_value = "", global = true)]
    pub cors_allowed_origins: String,

    /// Serve Prometheus metrics at `GET /metrics` (no auth: keep it off the public
    /// internet, or turn it off).
    #[arg(long, env = "METRICS_ENABLED", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub metrics_enabled: bool,

    /// Log format: `text` for people, `json` for machines (filter with `RUST_LOG`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Longest duration any setting takes: far beyond any sensible value, and far inside
/// every clock and timestamp type the server adds durations to.
const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30d, 12h, 90s)"))?;
    if d > MAX_DURATION {
        return Err("must be at most 3650d (10 years)".into());
    }
    Ok(d)
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// A database wait: SQLite's busy timeout and PostgreSQL's `statement_timeout` count
/// whole milliseconds (0 turns the latter off) and stop at about 24 days.
fn database_timeout(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if !(Duration::from_millis(1)..=Duration::from_secs(86_400)).contains(&d) {
        return Err("must be between 1ms and 1d".into());
    }
    Ok(d)
}

/// The period of a background task: at least a second, or it would keep a CPU busy.
fn interval(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

impl Config {
    /// The defaults, ignoring the environment: for tests and embedding.
    pub fn defaults() -> Self {
        // Parsing no arguments with `env` lookups disabled gives exactly the declared
        // defaults, so they live in one place (the attributes above).
        let cmd = <Self as clap::CommandFactory>::command();
        let cmd = cmd.mut_args(|a| a.env(None::<&str>));
        let matches = cmd.get_matches_from(["catbird-server"]);
        <Self as clap::FromArgMatches>::from_arg_matches(&matches).expect("defaults parse")
    }
}
