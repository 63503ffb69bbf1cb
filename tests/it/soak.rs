//! Soak: many clients run the real send → pending → fetch → ack cycle against the real
//! binary for a while; then every message must have been acknowledged by every
//! recipient and be gone (rows and blobs), with no 5xx on the way. Prints throughput
//! and the server's RSS at start and end.
//!
//! CI runs a short version. The full one (64 clients, 60 s, each configuration):
//! `CATBIRD_SOAK_SECS=60 CATBIRD_SOAK_CLIENTS=64 cargo test --release --test it soak -- --nocapture`

#![cfg(unix)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Backend, Data, User, b64, token, unb64};
use crate::process::Server;

/// A numeric knob from the environment, for running these tests at full scale.
pub(crate) fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS and VmHWM (peak) of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Tally {
    by_status: BTreeMap<u16, u64>,
    /// Message id → recipients that have not acknowledged it yet.
    open: HashMap<String, HashSet<String>>,
    sent: u64,
}

/// Record that `me` acknowledged the ids in a batch-ack answer.
fn settle(tally: &Mutex<Tally>, me: &str, answer: &Value) {
    let mut tally = tally.lock().unwrap();
    for id in answer["acked"].as_array().unwrap() {
        let id = id.as_str().unwrap();
        if let Some(left) = tally.open.get_mut(id) {
            left.remove(me);
            if left.is_empty() {
                tally.open.remove(id);
            }
        }
    }
}

crate::on_all_backends!(mixed_load_loses_nothing);

async fn mixed_load_loses_nothing(b: Backend) {
    if b == Backend::Postgres {
        return; // the embedded default and the production shape are the two configurations
    }
    let (secs, clients) = (
        setting("CATBIRD_SOAK_SECS", 3),
        setting("CATBIRD_SOAK_CLIENTS", 8) as usize,
    );
    let data = Data::new(b).await;
    let env = crate::crash::env_of(&data.config());
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(data.dir.path(), &refs).await;
    let pid = server.proc.child.id();
    let rss_start = rss_kib(pid);
    let users: Vec<String> = (0..clients).map(|i| format!("did:plc:soak{i}")).collect();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();

    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (tally, http, base, users) = (tally.clone(), http.clone(), server.base.clone(), users.clone());
            tokio::spawn(async move {
                let me = users[i].clone();
                let t = token(&me);
                let others = [users[(i + 1) % users.len()].clone(), users[(i + 2) % users.len()].clone()];
                let record = |status: u16| *tally.lock().unwrap().by_status.entry(status).or_default() += 1;
                let mut round = 0u64;
                let mut draining = false;
                loop {
                    if !draining && Instant::now() >= deadline {
                        draining = true;
                    }
                    round += 1;
                    if !draining {
                        let payload = format!("{me} round {round} ").repeat(1 + (round % 20) as usize);
                        let body = json!({"encrypted_data": b64(payload.as_bytes()), "convo_id": format!("soak{}", i % 4), "recipients": others});
                        let r = http.post(format!("{base}/api/v1/messages")).bearer_auth(&t).json(&body).send().await.unwrap();
                        record(r.status().as_u16());
                        if r.status() == 201 {
                            let v: Value = r.json().await.unwrap();
                            let mut tally = tally.lock().unwrap();
                            tally.sent += 1;
                            tally.open.insert(v["id"].as_str().unwrap().to_owned(), others.iter().cloned().collect());
                        }
                    }
                    let with_data = round.is_multiple_of(2);
                    let url = format!("{base}/api/v1/messages/pending?limit=50&include_data={with_data}");
                    let r = http.get(url).bearer_auth(&t).send().await.unwrap();
                    record(r.status().as_u16());
                    let page: Value = r.json().await.unwrap();
                    let ids: Vec<String> = page["messages"].as_array().map(|a| a.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()).unwrap_or_default();
                    if draining && ids.is_empty() {
                        return;
                    }
                    if !with_data {
                        for id in ids.iter().take(3) {
                            let r = http.get(format!("{base}/api/v1/messages/{id}")).bearer_auth(&t).send().await.unwrap();
                            record(r.status().as_u16());
                            if r.status() == 200 {
                                let m: Value = r.json().await.unwrap();
                                assert!(!unb64(m["encrypted_data"].as_str().unwrap()).is_empty());
                            }
                        }
                    }
                    if !ids.is_empty() {
                        let r = http.post(format!("{base}/api/v1/messages/ack")).bearer_auth(&t).json(&json!({"ids": ids})).send().await.unwrap();
                        record(r.status().as_u16());
                        settle(&tally, &me, &r.json().await.unwrap());
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // A client may have emptied its queue and stopped just before another client's
    // last send reached it: one more drain of every queue, now that nobody sends.
    for me in &users {
        let user = User::new(&server.base, me);
        loop {
            let ids = user.pending_ids("", 500).await;
            if ids.is_empty() {
                break;
            }
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            settle(
                &tally,
                me,
                &user.ack_many(&refs).await.expect(200, None).body,
            );
        }
    }
    let elapsed = started.elapsed();
    let rss_end = rss_kib(pid);
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let requests: u64 = tally.by_status.values().sum();
    println!(
        "soak {b:?}: {clients} clients, {secs} s load + drain in {elapsed:.1?}: {} messages, {requests} requests \
         ({:.0}/s), statuses {:?}, RSS start {} KiB, end {} KiB, peak {} KiB",
        tally.sent,
        requests as f64 / elapsed.as_secs_f64(),
        tally.by_status,
        rss_start.0,
        rss_end.0,
        rss_end.1
    );
    let server_errors: u64 = tally
        .by_status
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(server_errors, 0, "no 5xx: {:?}", tally.by_status);
    assert!(tally.sent > 0);
    assert!(
        tally.open.is_empty(),
        "{} messages never acknowledged by every recipient",
        tally.open.len()
    );
    // Delivered means gone: rows at once, blobs shortly after (deleted in the background).
    assert_eq!(data.db().await.count("messages").await, 0);
    for _ in 0..100 {
        if data.blob_files().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        data.blob_files().len(),
        0,
        "blobs of delivered messages are deleted"
    );
    assert!(server.stop().await.success());
}
