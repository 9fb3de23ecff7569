//! Command implementations of the `imagegen` binary, one file per command group as they grow
//! (`main.rs` only parses and dispatches). Commands call the library (queue, pipeline, storage,
//! http); they hold no SQL and no policy of their own.

pub mod renditions;

use tokio_util::sync::CancellationToken;

pub mod batch;
pub mod budget;
pub mod deliveries;
pub mod serve;

/// Turns a constraint violation into the rule it names, for people at a terminal.
pub fn explain_constraint(e: imagegen::queue::QueueError) -> anyhow::Error {
    if let imagegen::queue::QueueError::Database(sqlx::Error::Database(db)) = &e
        && let Some(c) = db.constraint()
    {
        return anyhow::anyhow!("rejected by the database: {c} ({})", db.message());
    }
    e.into()
}

/// Cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested: no new claims, draining in-flight jobs");
        t.cancel();
    });
    token
}
