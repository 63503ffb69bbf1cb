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
}

#[derive(Debug, Parser)]
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
    /// Server process id, to report its peak RSS.
    #[arg(long)]
    pid: Option<u32>,
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
            json!({"encrypted_data": payload, "convo_id": "bench", "recipients": [self.peer]});
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
                        convo_id: "bench".into(),
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
    let mut l = std::mem::take(&mut *latencies.lock().unwrap());
    l.sort_unstable();
    println!(
        "scenario Floor: {} clients, {} s, {} B payloads ({})",
        args.clients, args.seconds, args.size, config.database_url
    );
    println!(
        "sends         {} ({:.0}/s)",
        l.len(),
        l.len() as f64 / elapsed
    );
    println!(
        "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&l, 0.50),
        percentile(&l, 0.90),
        percentile(&l, 0.99),
        percentile(&l, 1.0)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.scenario == Scenario::Floor {
        return floor(&args).await;
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
    // Clients send to themselves, so fetch/pending/ack find their own messages.
    let clients: Vec<Arc<Client>> = (0..args.clients)
        .map(|i| {
            let did = format!("did:plc:bench{i}");
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
                        Scenario::Floor => unreachable!("handled before any HTTP"),
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

    let mut s = std::mem::take(&mut *stats.lock().unwrap());
    s.latencies_us.sort_unstable();
    let requests = s.latencies_us.len();
    println!(
        "scenario {:?}: {} clients, {} s, {} B payloads",
        args.scenario, args.clients, args.seconds, args.size
    );
    println!(
        "requests      {requests} ({:.0}/s)",
        requests as f64 / elapsed
    );
    println!(
        "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        percentile(&s.latencies_us, 0.50),
        percentile(&s.latencies_us, 0.90),
        percentile(&s.latencies_us, 0.99),
        percentile(&s.latencies_us, 1.0)
    );
    println!("statuses      {:?}", s.by_status);
    if s.sent > 0 {
        let per: Vec<String> = ops_after
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k} {:.2}",
                    (v - ops_before.get(k).copied().unwrap_or(0.0)) / s.sent as f64
                )
            })
            .collect();
        println!(
            "blob ops/msg  {} (messages sent: {})",
            per.join("  "),
            s.sent
        );
    }
    if let Some(pid) = args.pid {
        println!(
            "server peak RSS {:.1} MiB",
            peak_rss_mib(pid).unwrap_or(f64::NAN)
        );
    }
    let errors: u64 = s
        .by_status
        .iter()
        .filter(|(k, _)| **k == 0 || **k >= 500)
        .map(|(_, n)| n)
        .sum();
    anyhow::ensure!(errors == 0, "{errors} requests failed or answered 5xx");
    Ok(())
}
