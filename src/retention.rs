//! Clean-up: expired and fully-delivered messages, retired idempotency keys, and the
//! queue of blobs whose rows are gone. The background task and `catbird-server gc` run
//! the same [`sweep`].

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::relay::Relay;
use crate::store::StoreError;

/// Rows and blobs handled per database transaction / blob-store request.
const BATCH: i64 = 1000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub expired: u64,
    pub delivered: u64,
    pub idempotency_keys: u64,
    pub blobs_deleted: u64,
    /// Blobs still queued because the store refused or failed; retried next pass.
    pub blobs_failed: u64,
}

/// One complete clean-up pass.
pub async fn sweep(relay: &Relay) -> Result<SweepReport, StoreError> {
    let mut report = SweepReport::default();
    loop {
        let c = relay
            .store
            .collect(relay.policy.delete_on_delivery, BATCH)
            .await?;
        report.expired += c.expired;
        report.delivered += c.delivered;
        report.idempotency_keys += c.idempotency_keys;
        if c.expired + c.delivered < BATCH as u64 {
            break;
        }
    }
    // Each batch is forgotten before the next is read, so a failing key is seen once
    // per pass; stop when a batch makes no progress.
    loop {
        let keys = relay.store.queued_blob_deletions(BATCH).await?;
        if keys.is_empty() {
            break;
        }
        let gone = match relay.blobs.delete_many(&keys).await {
            Ok(gone) => gone,
            Err(e) => {
                tracing::warn!(error = %e, "blob deletions failed; retrying next pass");
                report.blobs_failed += keys.len() as u64;
                break;
            }
        };
        relay.store.forget_blob_deletions(&gone).await?;
        report.blobs_deleted += gone.len() as u64;
        let failed = (keys.len() - gone.len()) as u64;
        if failed > 0 {
            report.blobs_failed += failed;
            break;
        }
    }
    Ok(report)
}

/// Run [`sweep`] every `interval` until `shutdown` turns true.
pub async fn run_periodically(
    relay: std::sync::Arc<Relay>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let started = Instant::now();
        match sweep(&relay).await {
            Ok(r) => tracing::info!(
                expired = r.expired,
                delivered = r.delivered,
                idempotency_keys = r.idempotency_keys,
                blobs_deleted = r.blobs_deleted,
                blobs_failed = r.blobs_failed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                blob_ops = ?relay.blobs.operations(),
                "clean-up pass finished"
            ),
            Err(e) => tracing::warn!(error = %e, "clean-up pass failed; retrying next interval"),
        }
    }
}
