//! The event log (`imagegen.events`): one row per job reaching a final state, written by the
//! `job_finished` trigger, read here in a resumable order for the event stream.
//!
//! Identity ids are handed out when a row is inserted, not when its transaction commits, so two
//! finishing transactions can commit in the other order: a reader that had moved past id 12
//! would never see id 11 committed after it. Rows are therefore read in (`tx`, `id`) order (the
//! writing transaction's 64-bit id first) and only below `imagegen.event_horizon()`, the oldest
//! transaction still running in this database: no row can appear later below it, so a position
//! there never skips anything. The cost is latency: an event waits for the write transactions
//! of this database that began before it to end (ours are single statements; an application's
//! long transaction that wrote here delays events, never loses them). One known gap: a
//! transaction that took an id without writing here (`SELECT pg_current_xact_id()`) and much
//! later finishes a job could have that event passed over by a reader meanwhile.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;

use super::{Queue, QueueError, Result};

/// The NOTIFY channel of finished jobs (payload: `{"id", "state", "batch", "idempotency_key",
/// "event_id"}`, plus `"truncated": true` when a long batch or key was left out).
pub const FINISHED_CHANNEL: &str = "imagegen_job_finished";

/// The most events one read returns.
pub const MAX_EVENTS_PAGE: i64 = 1000;

/// One job reaching a final state.
#[derive(Debug, Clone, PartialEq, Eq, FromRow, Serialize)]
pub struct Event {
    /// The event id: what the stream sends as its SSE `id` and a client sends back as
    /// `Last-Event-ID`.
    pub id: i64,
    #[serde(skip)]
    pub tx: i64,
    pub job_id: i64,
    pub state: String,
    pub batch: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A position in the event order: everything at or before it has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventCursor {
    tx: i64,
    id: i64,
}

impl EventCursor {
    /// The position just after `event`.
    pub fn after(event: &Event) -> EventCursor {
        EventCursor {
            tx: event.tx,
            id: event.id,
        }
    }
}

impl Queue {
    /// The position to read from: after event `last_seen` (a client's `Last-Event-ID`), or with
    /// `None`, "now": every event whose transaction has ended is behind it, every later one
    /// ahead. A `last_seen` that names no event is an error (`NotFound`), not a silent restart.
    pub async fn event_cursor(&self, last_seen: Option<i64>) -> Result<EventCursor> {
        match last_seen {
            Some(id) => {
                let tx: Option<i64> =
                    sqlx::query_scalar("SELECT tx FROM imagegen.events WHERE id = $1")
                        .bind(id)
                        .fetch_optional(self.db())
                        .await?;
                let tx = tx.ok_or(QueueError::NotFound(id))?;
                Ok(EventCursor { tx, id })
            }
            None => {
                // Row comparison is strict: (horizon, 0) puts events of transactions still
                // running (tx >= horizon) ahead and every finished one behind.
                let tx = self.event_horizon().await?;
                Ok(EventCursor { tx, id: 0 })
            }
        }
    }

    /// See `imagegen.event_horizon()` in the push migration. Its own statement, before the read
    /// it bounds.
    async fn event_horizon(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT imagegen.event_horizon()")
            .fetch_one(self.db())
            .await?)
    }

    /// Up to `limit` events after `cursor` (of one batch, if given), in the order that never
    /// skips one: see the module doc.
    pub async fn events_after(
        &self,
        cursor: EventCursor,
        batch: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Event>> {
        let limit = limit.clamp(1, MAX_EVENTS_PAGE);
        let horizon = self.event_horizon().await?;
        // Two statements rather than `$3 IS NULL OR batch = $3`: each gets the plan of its index.
        let events = match batch {
            None => {
                sqlx::query_as(
                    "SELECT id, tx, job_id, state, batch, created_at FROM imagegen.events \
                 WHERE (tx, id) > ($1, $2) \
                   AND tx < $4 ORDER BY tx, id LIMIT $3",
                )
                .bind(cursor.tx)
                .bind(cursor.id)
                .bind(limit)
                .bind(horizon)
                .fetch_all(self.db())
                .await?
            }
            Some(b) => {
                sqlx::query_as(
                    "SELECT id, tx, job_id, state, batch, created_at FROM imagegen.events \
                 WHERE batch = $5 AND (tx, id) > ($1, $2) \
                   AND tx < $4 ORDER BY tx, id LIMIT $3",
                )
                .bind(cursor.tx)
                .bind(cursor.id)
                .bind(limit)
                .bind(horizon)
                .bind(b)
                .fetch_all(self.db())
                .await?
            }
        };
        Ok(events)
    }

    /// Deletes events, and deliveries that are done (delivered or failed), older than
    /// `older_than`: one round of the retention (`notify::retention`). Events go oldest id first
    /// (the primary key, so a round walks a few index pages, not the table) in chunks of `chunk`,
    /// each its own statement, until a chunk finds fewer to delete. The outbox is small (only
    /// jobs with a callback) and is filtered directly.
    pub async fn prune_push(&self, older_than: std::time::Duration, chunk: i64) -> Result<Pruned> {
        let ms = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let chunk = chunk.max(1);
        let mut pruned = Pruned::default();
        loop {
            let n: i64 = sqlx::query_scalar(
                // The oldest by id are (nearly) the oldest by time: once a chunk of them is not
                // all old, what is left is young.
                "WITH oldest AS ( \
                     SELECT id, created_at FROM imagegen.events ORDER BY id LIMIT $2), \
                 gone AS (DELETE FROM imagegen.events e USING oldest o WHERE e.id = o.id \
                     AND o.created_at < now() - $1 * interval '1 millisecond' RETURNING 1) \
                 SELECT count(*) FROM gone",
            )
            .bind(ms)
            .bind(chunk)
            .fetch_one(self.db())
            .await?;
            pruned.events += u64::try_from(n).unwrap_or(0);
            if n < chunk {
                break;
            }
        }
        loop {
            let n: i64 = sqlx::query_scalar(
                "WITH oldest AS ( \
                     SELECT id FROM imagegen.deliveries \
                     WHERE state IN ('delivered', 'failed') \
                       AND updated_at < now() - $1 * interval '1 millisecond' \
                     ORDER BY id LIMIT $2), \
                 gone AS (DELETE FROM imagegen.deliveries d USING oldest o WHERE d.id = o.id \
                     RETURNING 1) \
                 SELECT count(*) FROM gone",
            )
            .bind(ms)
            .bind(chunk)
            .fetch_one(self.db())
            .await?;
            pruned.deliveries += u64::try_from(n).unwrap_or(0);
            if n < chunk {
                break;
            }
        }
        Ok(pruned)
    }
}

/// What one retention round deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub deliveries: u64,
}
