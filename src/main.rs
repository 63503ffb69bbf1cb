//! Thin entry point: read `.env` and the command line, set up logging, dispatch.

use std::io::IsTerminal;
use std::process::ExitCode;

use catbird_server::auth::Auth;
use catbird_server::config::{Cli, Command, LogFormat};
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Named threads, so `top -H` and profiles tell the server from other Tokio programs.
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("catbird-server")
        .build()
    {
        Ok(runtime) => runtime.block_on(serve_cli()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_cli() -> ExitCode {
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Err(e) = dotenv
        && !e.not_found()
    {
        tracing::error!("cannot read .env: {e}");
        return ExitCode::FAILURE;
    }
    match execute(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let addr = format!("{}:{}", config.host, config.port);
            let listener = TcpListener::bind(&addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (HOST/PORT): {e}"))?;
            catbird_server::run(config, listener, shutdown_signal()).await
        }
        Command::Migrate => {
            catbird_server::open_store(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Token { sub, ttl } => {
            println!("{}", Auth::from_config(&config)?.mint(&sub, ttl)?);
            Ok(())
        }
        Command::Gc => {
            let relay = catbird_server::build_relay(&config).await?;
            let r = catbird_server::retention::sweep(&relay).await?;
            println!("object-store requests made: {:?}", relay.blobs.operations());
            println!(
                "expired: {}, delivered: {}, idempotency keys: {}, blobs deleted: {}, blob deletions failed: {}, \
                 orphans deleted: {}",
                r.expired,
                r.delivered,
                r.idempotency_keys,
                r.blobs_deleted,
                r.blobs_failed,
                r.orphans_deleted
            );
            if r.incomplete() {
                anyhow::bail!(
                    "clean-up incomplete: the blob store failed (see the log); the next pass retries"
                );
            }
            Ok(())
        }
        Command::SetupBucket => catbird_server::setup::setup_bucket(&config).await,
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
