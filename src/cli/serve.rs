//! `imagegen serve`: the HTTP API (and later the dashboard) without a worker, and the same
//! server started inside `imagegen worker --http`. `imagegen serve` also delivers webhooks and
//! prunes the push tables, as a worker does.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;
use imagegen::http::auth::AuthArgs;
use imagegen::http::{self, HttpState};
use imagegen::queue::Queue;
use imagegen::storage::{Storage, StorageConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on. Anything but loopback needs IMAGEGEN_HTTP_TOKEN or --no-auth.
    #[arg(long, env = "IMAGEGEN_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub webhooks: super::deliveries::WebhookArgs,
    #[command(flatten)]
    pub storage: StorageConfig,
}

/// How often `imagegen serve` looks for due webhook deliveries without a notification.
const DELIVERY_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves on the listener [`http::bind`] made until SIGINT/SIGTERM.
pub async fn run(
    queue: Queue,
    args: ServeArgs,
    (listener, auth): (tokio::net::TcpListener, http::auth::Auth),
) -> anyhow::Result<()> {
    let storage = Storage::open(&args.storage)
        .await
        .context("storage settings")?;
    let shutdown = super::shutdown_token();
    // Webhooks are delivered by whichever process runs: a worker or this server.
    let deliverer =
        super::deliveries::spawn_deliverer(&queue, &args.webhooks, DELIVERY_POLL, shutdown.clone())
            .await?;
    let pruner = super::deliveries::spawn_pruner(&queue, &args.webhooks, shutdown.clone());
    let task = start(queue, Some(storage), listener, auth, shutdown)?;
    let served = task.await.context("the HTTP server task failed")?;
    if let Some(d) = deliverer {
        let _ = d.await;
    }
    let _ = pruner.await;
    served?;
    Ok(())
}

/// Starts the server on an already bound listener; it stops when `shutdown` is cancelled. Prints
/// the address it listens on (port 0 picks a free one).
pub fn start(
    queue: Queue,
    storage: Option<Storage>,
    listener: tokio::net::TcpListener,
    auth: http::auth::Auth,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<Result<(), http::HttpError>>> {
    let addr = listener.local_addr().context("listening address")?;
    let state = HttpState::new(queue, storage, auth).with_shutdown(&shutdown);
    let router = http::router(state);
    println!("listening on http://{addr}");
    tracing::info!(%addr, "HTTP server listening");
    Ok(tokio::spawn(http::serve(listener, router, shutdown)))
}
