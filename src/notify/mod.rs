//! Push: telling other applications that a job finished, beyond the `NOTIFY` the database sends
//! itself (see `migrations/20261203140001_push.sql`).
//!
//! - [`sign`]: Standard Webhooks signatures and the `whsec_` secret, which never prints.
//! - [`guard`]: the only HTTP client that calls URLs from rows: schemes, redirects, timeouts,
//!   response size and the resolved address are checked.
//! - [`deliver`]: the delivery loop over the outbox (`imagegen.deliveries`): claim, sign, send,
//!   retry with capped jittered backoff for up to a day.
//! - [`events`]: the transport-independent event stream (LISTEN for wake-ups, the event log for
//!   the content) that the HTTP server's SSE endpoint serves.
//! - [`retention`]: prunes old events and finished deliveries.
//!
//! It holds no SQL: the outbox and the event log are read and written through
//! [`crate::queue`].

pub mod deliver;
pub mod events;
pub mod guard;
pub mod retention;
pub mod sign;

use crate::queue::{Queue, QueueError};

/// The body of a job's webhook: the job exactly as `GET /api/v1/jobs/{id}` returns it
/// ([`crate::queue::api::JobView`]: URLs, images, renditions, attempts, cost).
pub async fn webhook_body(queue: &Queue, job_id: i64) -> Result<String, QueueError> {
    let job = queue.job_view(job_id).await?;
    Ok(serde_json::to_string(&job).unwrap_or_default())
}
