//! Retention of the push tables: the event log and the finished webhook deliveries grow by a
//! row per finished job, so every worker and `imagegen serve` prunes rows older than the
//! retention period (`--push-retention`, default [`DEFAULT_RETENTION`]) every
//! [`PRUNE_INTERVAL`]. Several processes pruning at once only delete the same rows once.
//!
//! A stream that resumes with a `Last-Event-ID` older than the retention gets a clear `410 Gone`,
//! never a silent restart; pending deliveries are never pruned (they fail for good after a day).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::queue::Queue;
use crate::queue::events::Pruned;

/// How long events and finished deliveries are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a process prunes.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// Rows deleted per statement: short transactions, whatever the backlog.
pub const PRUNE_CHUNK: i64 = 5000;

/// One round: deletes what is older than `retention`.
pub async fn prune_once(
    queue: &Queue,
    retention: Duration,
) -> Result<Pruned, crate::queue::QueueError> {
    queue.prune_push(retention, PRUNE_CHUNK).await
}

/// Prunes at once and then every `interval` until `stop`. Failures are logged and retried at the
/// next round: a missed round only means a few more rows.
pub async fn run(queue: Queue, retention: Duration, interval: Duration, stop: CancellationToken) {
    loop {
        match prune_once(&queue, retention).await {
            Ok(p) if p.events + p.deliveries > 0 => {
                info!(
                    events = p.events,
                    deliveries = p.deliveries,
                    "pruned push rows past the retention"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning events and deliveries failed; next round retries"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
