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
//!
//! It holds no SQL: the outbox and the event log are read and written through
//! [`crate::queue`].

pub mod deliver;
pub mod events;
pub mod guard;
pub mod sign;

use crate::queue::{Queue, QueueError};

/// The body of a job's webhook: the job as one JSON object (its row without the lease, with
/// its stored images). The one place that decides the shape, so it can become the HTTP API's
/// job view without touching the delivery code.
pub async fn webhook_body(queue: &Queue, job_id: i64) -> Result<String, QueueError> {
    let job = queue.job(job_id).await?;
    let images = queue.job_images(job_id).await?;
    let mut value = serde_json::to_value(&job).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("lease_owner");
        map.remove("lease_expires_at");
        map.insert(
            "images".into(),
            serde_json::to_value(&images).unwrap_or_default(),
        );
    }
    Ok(value.to_string())
}
