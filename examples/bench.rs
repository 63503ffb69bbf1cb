//! Load driver: N concurrent clients against a running catbird-server for a while, one
//! scenario at a time. Reports requests/s, latency percentiles, errors by status, the
//! server's peak RSS (with `--pid`, from /proc) and object-store requests per message
//! (from the server's own /metrics).
//!
//! ```sh
//! cargo run --release                                   # the server, in one terminal
//! cargo run --release --example bench -- --scenario send --clients 64 --seconds 20 \
//!     --pid $(pgrep -n catbird-server)
//! ```
//!
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
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Send,
    Fetch,
    Pending,
    PendingData,
    Ack,
    Mixed,
    /// No HTTP: the blob put and the database transaction of a send, through the
    /// project's own store code, configured like the server (DATABASE_URL, BLOB_*,
    /// R2_* from the environment or `.env`): the floor a `send` run is compared with.
    Floor,
    /// No HTTP: bulk-insert messages for 1,000 other recipients into DATABASE_URL until
    /// it holds `--rows` of them (for the scale runs; their blobs are not written).
    Seed,
}

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
    peer: String,
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

    async fn send(&self, stats: &Mutex<Stats>, payload: &str) -> Option<String> {
        let body =
            json!({"encrypted_data": payload, "convo_id": self.peer, "recipients": [self.peer]});
        let (status, v) = self
            .call(
                stats,
                self.http
                    .post(format!("{}/api/v1/messages", self.url))
                    .json(&body),
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
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let (relay, payload, latencies) = (relay.clone(), payload.clone(), latencies.clone());
            tokio::spawn(async move {
                let did = format!("did:plc:floor{i}");
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let out = catbird_server::relay::Outgoing {
                        sender: did.clone(),
                        convo_id: did.clone(),
                        recipients: vec![did.clone()],
                        payload: payload.clone(),
                        idempotency_key: None,
                    };
                    relay.send(out).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    latencies
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_micros() as u64);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let l = std::mem::take(&mut *latencies.lock().unwrap());
    let mut report = Report::new(args, l, elapsed);
    report.messages_sent = report.requests as u64;
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
        // Random version-4 UUIDs in canonical text, like the server's.
        sqlx::query(
            "insert into messages (id, convo_id, seq, sender, blob_key, size, created_at, expires_at)
             with recursive n(i) as (select ?1 + 1 union all select i + 1 from n where i < ?2),
             r(i, h) as (select i, lower(hex(randomblob(16))) from n),
             u(i, id) as (select i, substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3)
                 || '-' || substr('89ab', 1 + (i % 4), 1) || substr(h, 18, 3) || '-' || substr(h, 21, 12) from r)
             select id, 'seed-' || (i % 1000), i, 'did:plc:seeder', 'seed/' || i, 1024,
                 cast(unixepoch('subsec') * 1000 as integer) - (?2 - i),
                 cast(unixepoch('subsec') * 1000 as integer) + 30 * 86400000
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
             select id, 'seed-' || (i % 1000), i, 'did:plc:seeder', 'seed/' || i, 1024,
                 now() - ($2 - i) * interval '1 millisecond', now() + interval '30 days'
             from (select i, gen_random_uuid() as id from generate_series($1 + 1, $2) i) n",
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
                peer: did,
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
                ids.extend(c.send(&scratch, &payload).await);
            }
            all.push(ids);
        }
        all
    } else {
        vec![Vec::new(); clients.len()]
    };

    let ops_before = blob_ops(&http, &args.url).await;
    let rss_reset = args.pid.is_some_and(reset_peak_rss);
    let stats = Arc::new(Mutex::new(Stats::default()));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .cloned()
        .zip(seeded)
        .map(|(c, mut ids)| {
            let (stats, payload, scenario) = (stats.clone(), payload.clone(), args.scenario);
            tokio::spawn(async move {
                let mut n = 0usize;
                while Instant::now() < deadline {
                    n += 1;
                    match scenario {
                        Scenario::Send => drop(c.send(&stats, &payload).await),
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
                            ids.extend(c.send(&Mutex::new(Stats::default()), &payload).await);
                        }
                        Scenario::Floor | Scenario::Seed => unreachable!("no HTTP"),
                        Scenario::Mixed => {
                            c.send(&stats, &payload).await;
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
    report.peak_rss_mib = args.pid.and_then(peak_rss_mib);
    report.statuses = s.by_status;
    report.print(&args)?;
    if args.pid.is_some() && !rss_reset {
        println!("(peak RSS could not be reset: it covers the server's whole life)");
    }
    let errors: u64 = report
        .statuses
        .iter()
        .filter(|(k, _)| **k == 0 || **k >= 500)
        .map(|(_, n)| n)
        .sum();
    anyhow::ensure!(errors == 0, "{errors} requests failed or answered 5xx");
    Ok(())
}
