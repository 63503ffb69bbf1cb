//! Clean-up: expired and fully-delivered messages, retired idempotency keys, the queue
//! of blobs whose rows are gone, and orphans (blobs no row references, left by a crash
//! between upload and commit). The background task and `catbird-server gc` run the
//! same [`sweep`].

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::blob::BlobError;
use crate::metrics::{MessageEvent, Outcome, OutcomeLabels, Removed, RemovedLabels};
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
    /// Unreferenced blobs older than the grace period, deleted.
    pub orphans_deleted: u64,
    /// The orphan scan stopped on a blob-store error; retried next pass.
    pub orphan_scan_failed: bool,
}

impl SweepReport {
    /// Whether something was left for the next pass because the blob store failed.
    pub fn incomplete(&self) -> bool {
        self.blobs_failed > 0 || self.orphan_scan_failed
    }
}

/// One complete clean-up pass, orphan scan included (what `catbird-server gc` runs).
pub async fn sweep(relay: &Relay) -> anyhow::Result<SweepReport> {
    sweep_pass(relay, true).await
}

/// One clean-up pass; the orphan scan lists the whole blob store (billed LIST requests
/// on R2), so the periodic task runs it only every `ORPHAN_SCAN_INTERVAL`.
async fn sweep_pass(relay: &Relay, scan_orphans: bool) -> anyhow::Result<SweepReport> {
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
    if !scan_orphans {
        return Ok(report);
    }
    match sweep_orphans(relay, &mut report.orphans_deleted).await {
        Ok(()) => {}
        Err(SweepError::Store(e)) => return Err(e.into()),
        Err(SweepError::Blob(e)) => {
            tracing::warn!(error = %e, "orphan scan failed; retrying next pass");
            report.orphan_scan_failed = true;
        }
    }
    Ok(report)
}

/// Delete blobs that no message references and that are older than the grace period.
/// The grace period covers sends in flight: their blob exists before their row does.
async fn sweep_orphans(relay: &Relay, deleted: &mut u64) -> Result<(), SweepError> {
    let cutoff = SystemTime::now() - relay.policy.orphan_grace;
    let mut page = None;
    loop {
        let listed = relay.blobs.list(page).await?;
        let old: Vec<String> = listed
            .blobs
            .into_iter()
            .filter(|(_, t)| *t <= cutoff)
            .map(|(k, _)| k)
            .collect();
        if !old.is_empty() {
            let referenced = relay.store.referenced_blobs(&old).await?;
            let orphans: Vec<String> = old
                .into_iter()
                .filter(|k| !referenced.contains(k))
                .collect();
            if !orphans.is_empty() {
                let gone = relay.blobs.delete_many(&orphans).await?;
                tracing::info!(count = gone.len(), "deleted orphan blobs");
                *deleted += gone.len() as u64;
            }
        }
        match listed.next {
            Some(next) => page = Some(next),
            None => return Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// Run a clean-up pass every `interval` (with an orphan scan every `orphan_interval`)
/// until `shutdown` turns true.
pub async fn run_periodically(
    relay: std::sync::Arc<Relay>,
    interval: Duration,
    orphan_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_orphan_scan: Option<Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let started = Instant::now();
        let scan_orphans = last_orphan_scan.is_none_or(|t| t.elapsed() >= orphan_interval);
        let result = sweep_pass(&relay, scan_orphans).await;
        if scan_orphans && result.as_ref().is_ok_and(|r| !r.orphan_scan_failed) {
            last_orphan_scan = Some(started);
        }
        record(&relay, result.as_ref().ok(), started.elapsed()).await;
        let ops = relay.blobs.operations();
        match result {
            Ok(r) => tracing::info!(
                expired = r.expired,
                delivered = r.delivered,
                idempotency_keys = r.idempotency_keys,
                blobs_deleted = r.blobs_deleted,
                blobs_failed = r.blobs_failed,
                orphans_deleted = r.orphans_deleted,
                incomplete = r.incomplete(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                blob_put = ops.put,
                blob_get = ops.get,
                blob_delete = ops.delete,
                blob_list = ops.list,
                blob_head = ops.head,
                "clean-up pass finished"
            ),
            Err(e) => tracing::warn!(error = %e, "clean-up pass failed; retrying next interval"),
        }
    }
}

/// Clean-up metrics, and the backlog gauges (refreshed here rather than per scrape, so
/// scrapes never cost a database query).
async fn record(relay: &Relay, report: Option<&SweepReport>, elapsed: Duration) {
    let m = &relay.metrics;
    let outcome = if report.is_some_and(|r| !r.incomplete()) {
        Outcome::Ok
    } else {
        Outcome::Error
    };
    m.cleanup_runs
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    m.cleanup_duration.observe(elapsed.as_secs_f64());
    if let Some(r) = report {
        for (kind, n) in [
            (Removed::Expired, r.expired),
            (Removed::Delivered, r.delivered),
            (Removed::IdempotencyKeys, r.idempotency_keys),
            (Removed::Blobs, r.blobs_deleted),
            (Removed::Orphans, r.orphans_deleted),
        ] {
            m.cleanup_removed
                .get_or_create(&RemovedLabels { kind })
                .inc_by(n);
        }
        m.message(MessageEvent::Expired, r.expired);
        m.message(MessageEvent::Deleted, r.delivered);
    }
    match relay.store.backlog().await {
        Ok((count, oldest)) => {
            m.pending_backlog.set(count);
            let age = oldest
                .map(|t| (chrono::Utc::now() - t).as_seconds_f64().max(0.0))
                .unwrap_or(0.0);
            m.oldest_pending_age.set(age);
        }
        Err(e) => tracing::warn!(error = %e, "could not measure the pending backlog"),
    }
}
