//! Command implementations of the `imagegen` binary, one file per command group as they grow
//! (`main.rs` only parses and dispatches). Commands call the library (queue, pipeline, storage,
//! http); they hold no SQL and no policy of their own.

pub mod renditions;

use tokio_util::sync::CancellationToken;

pub mod batch;
pub mod budget;
pub mod deliveries;
pub mod prune;
pub mod regenerate;
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

/// `--reference` values as a job stores them: https URLs as given, local files stored once (a
/// content-addressed key), anything else a storage key that must exist. Storage is opened only
/// when a value needs it.
pub async fn references(
    values: &[String],
    storage: &imagegen::storage::StorageConfig,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context as _;
    if values.len() > imagegen::openrouter::MAX_REFERENCES {
        anyhow::bail!(
            "at most {} --reference images",
            imagegen::openrouter::MAX_REFERENCES
        );
    }
    let mut out = values.to_vec();
    let mut opened = None;
    for (v, stored) in values.iter().zip(out.iter_mut()) {
        if imagegen::references::is_url(v) {
            imagegen::references::check_url(v).await?;
            continue;
        }
        let s = match opened.take() {
            Some(s) => s,
            None => imagegen::storage::Storage::open(storage).await?,
        };
        let path = std::path::Path::new(v);
        if path.is_file() {
            *stored = imagegen::references::store_reference(&s, path).await?;
        } else {
            let bytes = s
                .get(v)
                .await
                .with_context(|| format!("--reference {v}: neither a file nor a stored object"))?;
            imagegen::references::check_image(v, &bytes)?;
        }
        opened = Some(s);
    }
    Ok(out)
}
