//! catbird-server: relays MLS-encrypted chat messages between AT Protocol identities.
//!
//! [`run`] is the whole server; `main.rs` and the tests both call it.

pub mod auth;
pub mod blob;
pub mod config;
pub mod did;
pub mod error;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod retention;
mod serve;
pub mod setup;
pub mod store;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::Config;
use crate::relay::{Policy, Relay};
use crate::store::{MessageStore, PoolSettings};

/// Largest total payload of one `include_data` page of pending messages.
const PAGE_DATA_BUDGET: u64 = 8 << 20;

/// Open the database named by `DATABASE_URL` and apply migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn MessageStore>> {
    let pool = PoolSettings {
        max_connections: config.database_max_connections,
        acquire_timeout: config.database_acquire_timeout,
        statement_timeout: config.database_statement_timeout,
    };
    let store = store::connect(&config.database_url, &pool).await?;
    store
        .migrate()
        .await
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: {e}"))?;
    Ok(store)
}

/// Both storage seams and the policy, as configured.
pub async fn build_relay(config: &Config) -> anyhow::Result<Relay> {
    let blobs = blob::from_config(config).await?;
    let store = open_store(config).await?;
    Ok(Relay::new(
        store,
        blobs,
        Policy {
            message_ttl: config.message_ttl,
            max_message_bytes: config.max_message_bytes,
            max_recipients: config.max_recipients,
            delete_on_delivery: config.delete_on_delivery,
            page_data_budget: PAGE_DATA_BUDGET.max(config.max_message_bytes),
            orphan_grace: config.orphan_grace,
        },
    ))
}

/// Serve on `listener` until `shutdown` completes: migrations, HTTP, and the periodic
/// clean-up task (stopped before this returns).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let relay = Arc::new(build_relay(&config).await?);
    let auth = Arc::new(Auth::from_config(&config)?);
    let addr = listener.local_addr()?;
    if let Some(path) = &auth.generated_secret {
        print_dev_banner(&auth, path, addr);
    }

    let rate_limit = http::RateLimit::from_config(&config);
    let blobs = relay.blobs.clone();
    let app = http::router(
        http::AppState {
            relay: relay.clone(),
            auth,
            rate_limit,
        },
        &config,
    )?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut cleanup = tokio::spawn(retention::run_periodically(
        relay,
        config.gc_interval,
        config.orphan_scan_interval,
        stop_rx,
    ));
    tracing::info!(%addr, "catbird-server listening");
    let deadline = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let deadline = deadline.clone();
        async move {
            shutdown.await;
            let _ = deadline.set(tokio::time::Instant::now() + config.shutdown_timeout);
            let _ = stop_tx.send(true);
        }
    };
    serve::serve(listener, app, shutdown, config.shutdown_timeout).await;
    // The clean-up task stops at its next check. A pass cut short is safe (each step is
    // a transaction or an idempotent delete), so it gets what is left of the deadline.
    let deadline = deadline
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now);
    if tokio::time::timeout_at(deadline, &mut cleanup)
        .await
        .is_err()
    {
        cleanup.abort();
    }
    let ops = blobs.operations();
    tracing::info!(
        blob_put = ops.put,
        blob_get = ops.get,
        blob_delete = ops.delete,
        blob_list = ops.list,
        blob_head = ops.head,
        "stopped"
    );
    Ok(())
}

/// Development mode (no key configured): show how to call the server right away.
fn print_dev_banner(auth: &Auth, secret_file: &std::path::Path, addr: std::net::SocketAddr) {
    let sub = "did:plc:catbird-dev";
    let Ok(token) = auth.mint(sub, std::time::Duration::from_secs(24 * 3600)) else {
        return;
    };
    println!(
        "\nNo JWT_SECRET or JWT_PUBLIC_KEY_FILE set: using the development secret in {}.\n\
         A token for {sub}, valid 24 h:\n\n  export TOKEN={token}\n\n\
         Try:  curl -H \"Authorization: Bearer $TOKEN\" http://{addr}/api/v1/messages/pending\n\
         More: {exe} token --sub did:plc:alice\n",
        secret_file.display(),
        exe = std::env::args()
            .next()
            .unwrap_or_else(|| "catbird-server".into()),
    );
}
