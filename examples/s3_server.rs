//! A local S3-compatible server for benchmarks and manual runs of the production shape:
//! `s3s` (SigV4 checked) over `s3s-fs` (one file per object under a folder), the same
//! server the test suite runs in-process. Not for production: no lifecycle API.
//!
//! ```sh
//! cargo run --release --example s3_server -- --dir /tmp/s3 --port 9000
//! # then, for catbird-server:
//! BLOB_BACKEND=r2 R2_ENDPOINT=http://127.0.0.1:9000 R2_BUCKET=catbird \
//!   R2_ACCESS_KEY_ID=local-access-key R2_SECRET_ACCESS_KEY=local-secret-key cargo run --release
//! ```

use std::path::PathBuf;

use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
struct Args {
    /// Folder holding the buckets (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Port on 127.0.0.1.
    #[arg(long, default_value_t = 9000)]
    port: u16,
    /// Bucket created at start.
    #[arg(long, default_value = "catbird")]
    bucket: String,
    #[arg(long, default_value = "local-access-key")]
    access_key: String,
    #[arg(long, default_value = "local-secret-key")]
    secret_key: String,
}

fn main() -> anyhow::Result<()> {
    // Named threads: profiles tell this program from the server.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("s3-server")
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(args.dir.join(&args.bucket))?;
    let fs = s3s_fs::FileSystem::new(&args.dir)
        .map_err(|e| anyhow::anyhow!("cannot serve {}: {e:?}", args.dir.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(
        args.access_key.as_str(),
        args.secret_key.as_str(),
    ));
    let service = builder.build();
    let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
    eprintln!(
        "S3 endpoint http://{} (bucket {:?}, folder {})",
        listener.local_addr()?,
        args.bucket,
        args.dir.display()
    );
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        // Without it, small GETs wait ~25 ms on Nagle's algorithm.
        socket.set_nodelay(true)?;
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
