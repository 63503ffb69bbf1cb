//! Load driver: N concurrent clients against a running catbird-server for a while, one
//! scenario at a time. Reports requests/s, latency percentiles, errors by status, the
//! server's peak RSS (with `--pid`, from /proc), object-store requests per message
//! (from the server's own /metrics) and where the machine's CPU went: milliseconds per
//! request by process name (server, database, S3 server, this program), from /proc.
//!
//! ```sh
//! RATE_LIMIT_PER_MINUTE=0 RUST_LOG=warn cargo run --release   # the server, in one terminal
//! cargo run --release --example bench -- --scenario send --clients 64 --seconds 20 \
//!     --pid <the server's process id>                          # in the same folder
//! ```
//!
//! Any answer other than 2xx makes the run fail (exit 1) after its report: a 429 means
//! the server's rate limit is on, a 401 that the bench and the server have different
//! secrets.
//! Each client sends to itself in a conversation of its own: sends in one conversation
//! are serialized by its sequence number, sends in different ones need not be.
//!
//! Scenarios: `send`, `fetch`, `pending`, `pending-data`, `ack`, `mixed` (send → pending
//! → fetch → ack), and `floor` (the storage work of a send without HTTP, configured from
//! the environment like the server; compare its sends/s with `send`). Tokens are minted
//! with `JWT_SECRET` or the development secret in `data/jwt_secret`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use catbird_server::store::NewMessage;
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// POST /api/v1/messages (`--size` bytes of payload).
    Send,
    /// GET /api/v1/messages/{id} of messages sent before the run.
    Fetch,
    /// GET /api/v1/messages/pending?limit=50, ids only.
    Pending,
    /// The same with include_data=true: up to 50 blobs per answer.
    PendingData,
    /// Acknowledge one message, then send a replacement (only the ack is timed).
    Ack,
    /// Send → pending → fetch the first → batch-ack the page, each request timed.
    Mixed,
    /// No HTTP: the blob put and the database transaction of a send, through the
    /// project's own store code, configured like the server (DATABASE_URL, BLOB_*,
    /// R2_* from the environment or `.env`): the floor a `send` run is compared with.
    Floor,
    /// No HTTP: bulk-insert messages for 1,000 other recipients into DATABASE_URL until
    /// it holds `--rows` of them (for the scale runs; their blobs are not written).
    Seed,
}

/// Load driver for catbird-server: N concurrent clients for a while, one scenario.
///
/// Run it in the folder the server runs in: tokens are minted with JWT_SECRET (from the
/// environment or `.env`) or the development secret in `data/jwt_secret`, so both must
/// share the secret. Start the server with RATE_LIMIT_PER_MINUTE=0 (any 429 fails the
/// run) and, for figures worth comparing, build both with --release. `floor` and `seed`
/// use no server: they read DATABASE_URL, BLOB_* and R2_* like the server does.
/// BENCHMARKS.md explains the scenarios; scripts/bench-report runs them all.
#[derive(Debug, Parser)]
#[command(args_override_self = true)] // the last --clients (etc.) given wins
struct Args {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    #[arg(long, value_enum, default_value_t = Scenario::Send)]
    scenario: Scenario,
    /// Concurrent clients (each its own DID).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Length of the measured run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Server process id, to report its peak RSS (reset at the start of the run).
    #[arg(long)]
    pid: Option<u32>,
    /// `seed`: how many seeded messages the database should hold afterwards.
    #[arg(long, default_value_t = 1_000)]
    rows: u64,
    /// Append the figures to this file as one JSON object per line.
    #[arg(long)]
    record: Option<std::path::PathBuf>,
    /// Free-form label stored with `--record` (configuration, table size, …).
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Default)]
struct Stats {
    latencies_us: Vec<u64>,
    by_status: BTreeMap<u16, u64>,
    sent: u64,
}

fn mint(secret: &str, sub: &str) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "iat": now, "exp": now + 3600}),
        &key,
    )?)
}

/// Sum of `catbird_blob_operations_total` by kind, from the server's scrape.
async fn blob_ops(http: &reqwest::Client, url: &str) -> BTreeMap<String, f64> {
    let text = match http.get(format!("{url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("catbird_blob_operations_total{"))
    {
        let kind = line
            .split("kind=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?");
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(kind.to_owned()).or_default() += v;
    }
    out
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Reset the process's peak RSS (VmHWM) so the next reading covers this run only.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU time used so far by every process on the machine (from /proc; empty elsewhere),
/// and the machine's idle time: two snapshots around a run tell where its CPU went.
struct CpuSnapshot {
    /// By (pid, start time), so a pid reused during the run is a new process.
    by_process: BTreeMap<(u32, u64), (String, u64)>,
    total: u64,
    idle: u64,
}

/// /proc counts CPU time in clock ticks of 1/USER_HZ s, 100 on every Linux ABI.
const TICKS_PER_SECOND: f64 = 100.0;

impl CpuSnapshot {
    fn take() -> Self {
        let mut by_process = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // "pid (comm) state ppid … utime stime …": comm may hold spaces or ')'.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            // Kernel workers rename themselves after the work item at hand: one name.
            let name = &stat[open + 1..close];
            let name = if name.starts_with("kworker/") {
                "kworker"
            } else {
                name
            };
            // utime and stime are fields 14 and 15, starttime 22; fields[0] is field 3.
            by_process.insert((pid, ticks(19)), (name.to_owned(), ticks(11) + ticks(12)));
        }
        let cpu: Vec<u64> = std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total = cpu.iter().take(8).sum();
        let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
        Self {
            by_process,
            total,
            idle,
        }
    }

    /// CPU milliseconds per request by process name since `before` (processes that
    /// ended meanwhile are not counted), and the machine's idle share in percent.
    fn since(&self, before: &Self, requests: usize) -> (BTreeMap<String, f64>, Option<f64>) {
        let mut by_name = BTreeMap::<String, u64>::new();
        for (process, (name, ticks)) in &self.by_process {
            let earlier = before.by_process.get(process).map_or(0, |(_, t)| *t);
            *by_name.entry(name.clone()).or_default() += ticks.saturating_sub(earlier);
        }
        let per_request = by_name
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .map(|(name, t)| {
                (
                    name,
                    t as f64 * 1000.0 / TICKS_PER_SECOND / requests.max(1) as f64,
                )
            })
            .collect();
        let total = self.total.saturating_sub(before.total);
        let idle = (total > 0)
            .then(|| 100.0 * self.idle.saturating_sub(before.idle) as f64 / total as f64);
        (per_request, idle)
    }
}

/// The figures of one run, printed and optionally appended to `--record`.
#[derive(serde::Serialize)]
struct Report {
    label: String,
    scenario: String,
    clients: usize,
    seconds: u64,
    size: usize,
    requests: usize,
    per_second: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    statuses: BTreeMap<u16, u64>,
    messages_sent: u64,
    blob_ops_per_message: BTreeMap<String, f64>,
    peak_rss_mib: Option<f64>,
    /// `floor`: p50 and p99 of each stage of a send, in milliseconds.
    stages_p50_p99_ms: BTreeMap<String, (f64, f64)>,
    /// Machine-wide CPU milliseconds per request, by process name (server, database,
    /// S3 server, this program), and the share of the run the CPUs were idle.
    cpu_ms_per_request: BTreeMap<String, f64>,
    idle_percent: Option<f64>,
}

impl Report {
    fn new(args: &Args, mut latencies_us: Vec<u64>, elapsed: f64) -> Self {
        latencies_us.sort_unstable();
        let l = &latencies_us;
        Self {
            label: args.label.clone(),
            scenario: args
                .scenario
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
            clients: args.clients,
            seconds: args.seconds,
            size: args.size,
            requests: l.len(),
            per_second: l.len() as f64 / elapsed,
            p50_ms: percentile(l, 0.50),
            p90_ms: percentile(l, 0.90),
            p99_ms: percentile(l, 0.99),
            max_ms: percentile(l, 1.0),
            statuses: BTreeMap::new(),
            messages_sent: 0,
            blob_ops_per_message: BTreeMap::new(),
            peak_rss_mib: None,
            stages_p50_p99_ms: BTreeMap::new(),
            cpu_ms_per_request: BTreeMap::new(),
            idle_percent: None,
        }
    }

    fn print(&self, args: &Args) -> anyhow::Result<()> {
        println!(
            "scenario {}: {} clients, {} s, {} B payloads {}",
            self.scenario, self.clients, self.seconds, self.size, self.label
        );
        println!("requests      {} ({:.0}/s)", self.requests, self.per_second);
        println!(
            "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        );
        for (stage, (p50, p99)) in &self.stages_p50_p99_ms {
            println!("  {stage:<11} p50 {p50:.2}  p99 {p99:.2}");
        }
        if !self.statuses.is_empty() {
            println!("statuses      {:?}", self.statuses);
        }
        if !self.blob_ops_per_message.is_empty() {
            let per: Vec<String> = self
                .blob_ops_per_message
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect();
            println!(
                "blob ops/msg  {} (messages sent: {})",
                per.join("  "),
                self.messages_sent
            );
        }
        if let Some(mib) = self.peak_rss_mib {
            println!("server peak RSS {mib:.1} MiB");
        }
        if let Some(idle) = self.idle_percent {
            // The main consumers; the rest (under 0.01 ms each) summed as "other".
            let mut by_cost: Vec<_> = self.cpu_ms_per_request.iter().collect();
            by_cost.sort_by(|a, b| b.1.total_cmp(a.1));
            let (main, rest): (Vec<_>, Vec<_>) =
                by_cost.into_iter().partition(|(_, ms)| **ms >= 0.01);
            let mut parts: Vec<String> = main.iter().map(|(k, v)| format!("{k} {v:.3}")).collect();
            parts.push(format!(
                "other {:.3}",
                rest.iter().map(|(_, v)| **v).sum::<f64>().max(0.0).abs()
            ));
            println!("cpu ms/request {}; idle {idle:.0} %", parts.join("  "));
        }
        if let Some(path) = &args.record {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open --record {}", path.display()))?;
            writeln!(f, "{}", serde_json::to_string(self)?)?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
    /// The body of every send, serialized once: the load generator shares the server's
    /// CPUs, so it does as little per request as it can.
    send_body: bytes::Bytes,
}

impl Client {
    /// One timed request; returns (status, JSON body).
    async fn call(&self, stats: &Mutex<Stats>, req: reqwest::RequestBuilder) -> (u16, Value) {
        let started = Instant::now();
        let (status, body) = match req.bearer_auth(&self.token).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        };
        let mut s = stats.lock().unwrap();
        s.latencies_us.push(started.elapsed().as_micros() as u64);
        *s.by_status.entry(status).or_default() += 1;
        (status, body)
    }

    async fn send(&self, stats: &Mutex<Stats>) -> Option<String> {
        let (status, v) = self
            .call(
                stats,
                self.http
                    .post(format!("{}/api/v1/messages", self.url))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(self.send_body.clone()),
            )
            .await;
        (status == 201).then(|| {
            stats.lock().unwrap().sent += 1;
            v["id"].as_str().unwrap_or_default().to_owned()
        })
    }

    async fn pending(&self, stats: &Mutex<Stats>, data: bool) -> Vec<String> {
        let url = format!(
            "{}/api/v1/messages/pending?limit=50&include_data={data}",
            self.url
        );
        let (_, v) = self.call(stats, self.http.get(url)).await;
        v["messages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The backend floor: `Relay::send` (blob put, then one transaction) without HTTP.
async fn floor(args: &Args) -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let config = catbird_server::config::Config::try_parse_from(["bench"])?;
    let relay = Arc::new(catbird_server::build_relay(&config).await?);
    let payload = bytes::Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    // Whole send, blob put, transaction: microseconds.
    let latencies = Arc::new(Mutex::new((Vec::new(), Vec::new(), Vec::new())));
    let cpu_before = CpuSnapshot::take();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let (relay, payload, latencies) = (relay.clone(), payload.clone(), latencies.clone());
            tokio::spawn(async move {
                let did = format!("did:plc:floor{i}");
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let blob_key = relay.blobs.put(payload.clone()).await?;
                    let put = t.elapsed();
                    let message = NewMessage {
                        id: uuid::Uuid::now_v7(),
                        convo_id: did.clone(),
                        sender: did.clone(),
                        recipients: vec![did.clone()],
                        blob_key,
                        size: payload.len() as i64,
                        ttl: relay.policy.message_ttl,
                        idempotency: None,
                    };
                    relay.store.insert_message(&message).await?;
                    let mut l = latencies.lock().unwrap();
                    l.0.push(t.elapsed().as_micros() as u64);
                    l.1.push(put.as_micros() as u64);
                    l.2.push((t.elapsed() - put).as_micros() as u64);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = CpuSnapshot::take();
    let (whole, mut put, mut tx) = std::mem::take(&mut *latencies.lock().unwrap());
    let mut report = Report::new(args, whole, elapsed);
    report.messages_sent = report.requests as u64;
    for (stage, l) in [("blob put", &mut put), ("transaction", &mut tx)] {
        l.sort_unstable();
        report
            .stages_p50_p99_ms
            .insert(stage.into(), (percentile(l, 0.5), percentile(l, 0.99)));
    }
    (report.cpu_ms_per_request, report.idle_percent) =
        cpu_after.since(&cpu_before, report.requests);
    report.print(args)
}

/// Bulk-insert messages from `did:plc:seeder` to 1,000 other recipients until the
/// database holds `--rows` of them. Rows only: nobody reads these blobs.
async fn seed(args: &Args) -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let config = catbird_server::config::Config::try_parse_from(["bench"])?;
    catbird_server::open_store(&config).await?; // creates and migrates
    let url = &config.database_url;
    let started = Instant::now();
    let (before, after): (i64, i64) = if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await?;
        let count = "select count(*) from messages where sender = 'did:plc:seeder'";
        let before: i64 = sqlx::query_scalar(count).fetch_one(&pool).await?;
        let mut tx = pool.begin().await?;
        // Ids and blob keys like the server's: version-7 UUIDs (creation time first) and
        // random version-4 ones, in canonical text.
        sqlx::query(
            "insert into messages (id, convo_id, seq, sender, blob_key, size, created_at, expires_at)
             with recursive n(i) as (select ?1 + 1 union all select i + 1 from n where i < ?2),
             r(i, t, h, k) as (select i, cast(unixepoch('subsec') * 1000 as integer) - (?2 - i),
                 lower(hex(randomblob(16))), lower(hex(randomblob(16))) from n),
             u(i, t, id, key) as (select i, t,
                 substr(printf('%012x', t), 1, 8) || '-' || substr(printf('%012x', t), 9, 4) || '-7'
                     || substr(h, 1, 3) || '-' || substr('89ab', 1 + (i % 4), 1) || substr(h, 4, 3)
                     || '-' || substr(h, 7, 12),
                 substr(k, 1, 8) || '-' || substr(k, 9, 4) || '-4' || substr(k, 13, 3) || '-'
                     || substr('89ab', 1 + (i / 4 % 4), 1) || substr(k, 16, 3) || '-' || substr(k, 19, 12)
                 from r)
             select id, 'seed-' || (i % 1000), i, 'did:plc:seeder', key, 1024, t, t + 30 * 86400000
             from u",
        )
        .bind(before)
        .bind(args.rows as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into recipients (message_id, recipient, created_at)
             select id, 'did:plc:seed' || (seq % 1000), created_at from messages
             where sender = 'did:plc:seeder' and seq > ?",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into conversations (convo_id, last_seq)
             select convo_id, max(seq) from messages where sender = 'did:plc:seeder' group by convo_id
             on conflict (convo_id) do update set last_seq = excluded.last_seq",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        // Measure the steady state, not the bulk load still being written back.
        sqlx::query("analyze").execute(&pool).await?;
        sqlx::query("pragma wal_checkpoint(truncate)")
            .execute(&pool)
            .await?;
        (before, sqlx::query_scalar(count).fetch_one(&pool).await?)
    } else {
        let pool = sqlx::PgPool::connect(url).await?;
        let count = "select count(*) from messages where sender = 'did:plc:seeder'";
        let before: i64 = sqlx::query_scalar(count).fetch_one(&pool).await?;
        let mut tx = pool.begin().await?;
        sqlx::query(
            "insert into messages (id, convo_id, seq, sender, blob_key, size, created_at, expires_at)
             select encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                     placing substring(int8send((extract(epoch from t) * 1000)::bigint) from 3)
                     from 1 for 6), 52, 1), 53, 1), 'hex')::uuid,
                 'seed-' || (i % 1000), i, 'did:plc:seeder', gen_random_uuid()::text, 1024,
                 t, t + interval '30 days'
             from (select i, date_trunc('milliseconds', now()) - ($2 - i) * interval '1 millisecond' as t
                   from generate_series($1 + 1, $2) i) n",
        )
        .bind(before)
        .bind(args.rows as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into recipients (message_id, recipient, created_at)
             select id, 'did:plc:seed' || (seq % 1000), created_at from messages
             where sender = 'did:plc:seeder' and seq > $1",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "insert into conversations (convo_id, last_seq)
             select convo_id, max(seq) from messages where sender = 'did:plc:seeder' group by convo_id
             on conflict (convo_id) do update set last_seq = excluded.last_seq",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        sqlx::query("vacuum analyze messages")
            .execute(&pool)
            .await?;
        sqlx::query("vacuum analyze recipients")
            .execute(&pool)
            .await?;
        if let Err(e) = sqlx::query("checkpoint").execute(&pool).await {
            println!("(no checkpoint after seeding: {e})");
        }
        (before, sqlx::query_scalar(count).fetch_one(&pool).await?)
    };
    println!(
        "seeded {} messages for 1,000 other recipients in {:.1} s: {after} in all ({})",
        after - before,
        started.elapsed().as_secs_f64(),
        config.database_url
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Named threads: profiles tell this program from the server.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench")
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.scenario {
        Scenario::Floor => return floor(&args).await,
        Scenario::Seed => return seed(&args).await,
        _ => {}
    }
    let secret = match std::env::var("JWT_SECRET") {
        Ok(s) => s,
        Err(_) => std::fs::read_to_string("data/jwt_secret")
            .context("set JWT_SECRET or run where data/jwt_secret is")?
            .trim()
            .to_owned(),
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let payload = STANDARD.encode((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    // Clients send to themselves, so fetch/pending/ack find their own messages; new DIDs
    // each run, so a run does not find the previous run's messages in its pending lists.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let clients: Vec<Arc<Client>> = (0..args.clients)
        .map(|i| {
            let did = format!("did:plc:bench{}x{i}", &run[..8]);
            Ok(Arc::new(Client {
                http: http.clone(),
                url: args.url.clone(),
                token: mint(&secret, &did)?,
                send_body: json!({"encrypted_data": payload, "convo_id": did, "recipients": [did]})
                    .to_string()
                    .into(),
            }))
        })
        .collect::<anyhow::Result<_>>()?;

    // Seed what the read scenarios need, outside the measurement.
    let seeded: Vec<Vec<String>> = if matches!(
        args.scenario,
        Scenario::Fetch | Scenario::Pending | Scenario::PendingData | Scenario::Ack
    ) {
        let scratch = Mutex::new(Stats::default());
        let mut all = Vec::new();
        for c in &clients {
            let mut ids = Vec::new();
            for _ in 0..20 {
                ids.extend(c.send(&scratch).await);
            }
            all.push(ids);
        }
        all
    } else {
        vec![Vec::new(); clients.len()]
    };

    let ops_before = blob_ops(&http, &args.url).await;
    let rss_reset = args.pid.is_some_and(reset_peak_rss);
    let cpu_before = CpuSnapshot::take();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .zip(seeded)
        .map(|(c, mut ids)| {
            let (stats, scenario) = (stats.clone(), args.scenario);
            tokio::spawn(async move {
                let mut n = 0usize;
                while Instant::now() < deadline {
                    n += 1;
                    match scenario {
                        Scenario::Send => drop(c.send(&stats).await),
                        Scenario::Fetch => {
                            if let Some(id) = ids.get(n % ids.len().max(1)) {
                                c.call(
                                    &stats,
                                    c.http.get(format!("{}/api/v1/messages/{id}", c.url)),
                                )
                                .await;
                            }
                        }
                        Scenario::Pending => drop(c.pending(&stats, false).await),
                        Scenario::PendingData => drop(c.pending(&stats, true).await),
                        Scenario::Ack => {
                            // Acknowledge a seeded message, then replace it.
                            if let Some(id) = ids.pop() {
                                c.call(
                                    &stats,
                                    c.http.post(format!("{}/api/v1/messages/{id}/ack", c.url)),
                                )
                                .await;
                            }
                            ids.extend(c.send(&Mutex::new(Stats::default())).await);
                        }
                        Scenario::Floor | Scenario::Seed => unreachable!("no HTTP"),
                        Scenario::Mixed => {
                            c.send(&stats).await;
                            let pending = c.pending(&stats, false).await;
                            if let Some(id) = pending.first() {
                                c.call(
                                    &stats,
                                    c.http.get(format!("{}/api/v1/messages/{id}", c.url)),
                                )
                                .await;
                            }
                            if !pending.is_empty() {
                                let body = json!({ "ids": pending });
                                c.call(
                                    &stats,
                                    c.http
                                        .post(format!("{}/api/v1/messages/ack", c.url))
                                        .json(&body),
                                )
                                .await;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = CpuSnapshot::take();
    let ops_after = blob_ops(&http, &args.url).await;

    let s = std::mem::take(&mut *stats.lock().unwrap());
    let mut report = Report::new(&args, s.latencies_us, elapsed);
    if s.sent > 0 {
        report.blob_ops_per_message = ops_after
            .iter()
            .map(|(k, v)| {
                let before = ops_before.get(k).copied().unwrap_or(0.0);
                (k.clone(), (v - before) / s.sent as f64)
            })
            .collect();
    }
    report.messages_sent = s.sent;
    (report.cpu_ms_per_request, report.idle_percent) =
        cpu_after.since(&cpu_before, report.requests);
    report.peak_rss_mib = args.pid.and_then(peak_rss_mib);
    report.statuses = s.by_status;
    report.print(&args)?;
    if args.pid.is_some() && !rss_reset {
        println!("(peak RSS could not be reset: it covers the server's whole life)");
    }
    // Figures with refused requests in them measure the refusals: fail instead.
    let count = |status: u16| report.statuses.get(&status).copied().unwrap_or(0);
    anyhow::ensure!(
        count(429) == 0,
        "{} requests were rate limited (429): start the server with RATE_LIMIT_PER_MINUTE=0",
        count(429)
    );
    anyhow::ensure!(
        count(401) == 0,
        "{} requests were refused (401): the bench mints tokens with JWT_SECRET or \
         data/jwt_secret in its working folder; give it the server's",
        count(401)
    );
    let failed: u64 = report
        .statuses
        .iter()
        .filter(|(k, _)| !(200..300).contains(*k))
        .map(|(_, n)| n)
        .sum();
    anyhow::ensure!(
        failed == 0,
        "{failed} requests failed or were not answered 2xx (status 0: no answer)"
    );
    Ok(())
}
