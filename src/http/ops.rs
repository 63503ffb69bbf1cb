//! Operations endpoints (no auth): liveness, readiness and metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::metrics::{PoolLabels, PoolState};

/// How long `/readyz` waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Running", body = Object, example = json!({"status": "ok"}))))]
pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn check<E: std::fmt::Display>(f: impl Future<Output = Result<(), E>>) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

/// 200 when the database and the blob store both answer; otherwise 503 naming which not.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Both dependencies answer", body = Object,
            example = json!({"status": "ok", "database": "ok", "blob_store": "ok"})),
        (status = 503, description = "A dependency does not answer; `database` / `blob_store` say which", body = Object,
            example = json!({"error": "unavailable", "message": "not ready: blob store unavailable", "database": "ok", "blob_store": "unavailable"})),
    ))]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let relay = &state.relay;
    let (db, blobs) = tokio::join!(check(relay.store.ping()), check(relay.blobs.ping()));
    let status = |r: &Result<(), String>| if r.is_ok() { "ok" } else { "unavailable" };
    if db.is_ok() && blobs.is_ok() {
        return Json(json!({"status": "ok", "database": "ok", "blob_store": "ok"})).into_response();
    }
    for (name, r) in [("database", &db), ("blob store", &blobs)] {
        if let Err(cause) = r {
            tracing::warn!(dependency = name, %cause, "not ready");
        }
    }
    let failing: Vec<&str> = [("database", &db), ("blob store", &blobs)]
        .into_iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| n)
        .collect();
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "error": "unavailable",
            "message": format!("not ready: {} unavailable", failing.join(" and ")),
            "database": status(&db),
            "blob_store": status(&blobs),
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    response
}

/// Prometheus scrape (OpenMetrics text format, which Prometheus reads natively).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String)))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let relay = &state.relay;
    let c = relay.store.connections();
    let states = [
        (PoolState::Open, c.open),
        (PoolState::InUse, c.in_use),
        (PoolState::Waiting, c.waiting),
    ];
    for (pool_state, n) in states {
        relay
            .metrics
            .db_connections
            .get_or_create(&PoolLabels { state: pool_state })
            .set(i64::from(n));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        relay.metrics.render(),
    )
        .into_response()
}
