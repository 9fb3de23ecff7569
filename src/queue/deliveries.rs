//! The webhook outbox (`imagegen.deliveries`): rows written by the `job_finished` trigger in the
//! transaction that finishes a job with a `callback_url`; claimed, fenced and finished here like
//! jobs, so several deliverers never send one delivery at once and a crashed one's delivery is
//! sent again after its lease.
//!
//! States: `pending` (due at `next_attempt_at`; a claim pushes that past the lease) -->
//! `delivered` | `failed` (gave up, or refused by the outbound guard); `redeliver` puts either
//! back to `pending`, due now, with the same `webhook_id`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use uuid::Uuid;

use super::{Queue, QueueError, Result, millis};

/// The channel the trigger notifies when it writes a delivery (empty payload).
pub const DELIVERIES_CHANNEL: &str = "imagegen_deliveries";

/// A delivery as a deliverer holds it after claiming it.
#[derive(Debug, Clone, FromRow)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub webhook_id: Uuid,
    pub event_id: i64,
    pub job_id: i64,
    pub url: String,
    /// This attempt, 1-based; with the deliverer's id, the fencing token.
    pub attempts: i32,
    /// The body fixed by an earlier attempt, if there was one.
    pub body: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// One delivery as `imagegen deliveries` lists it.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub webhook_id: Uuid,
    pub event_id: i64,
    pub job_id: i64,
    pub url: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered { status: u16 },
    /// Try again after `delay`.
    Retry {
        status: Option<u16>,
        error: String,
        delay: Duration,
    },
    /// Give up: out of time, or the URL is refused.
    Failed { status: Option<u16>, error: String },
}

impl Queue {
    /// Claims up to `limit` due deliveries for `owner`, oldest due first, pushing their
    /// `next_attempt_at` past `lease` so nobody else takes them meanwhile.
    pub async fn claim_deliveries(
        &self,
        owner: Uuid,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<ClaimedDelivery>> {
        Ok(sqlx::query_as(
            "WITH picked AS ( \
                 SELECT id FROM imagegen.deliveries \
                 WHERE state = 'pending' AND next_attempt_at <= now() \
                 ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE imagegen.deliveries d SET attempts = d.attempts + 1, lease_owner = $1, \
                 next_attempt_at = now() + $3 * interval '1 millisecond', updated_at = now() \
             FROM picked WHERE d.id = picked.id \
             RETURNING d.id, d.webhook_id, d.event_id, d.job_id, d.url, d.attempts, d.body, \
                 d.created_at",
        )
        .bind(owner)
        .bind(limit.max(0))
        .bind(millis(lease))
        .fetch_all(self.db())
        .await?)
    }

    /// Fixes the body of a delivery on its first attempt, so every retry sends the same bytes.
    /// Returns the body to send: `body`, or the one an earlier attempt fixed. Fenced: `None` if
    /// the claim is no longer held.
    pub async fn fix_delivery_body(
        &self,
        d: &ClaimedDelivery,
        owner: Uuid,
        body: &str,
    ) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "UPDATE imagegen.deliveries SET body = COALESCE(body, $4) \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'pending' \
             RETURNING body",
        )
        .bind(d.id)
        .bind(owner)
        .bind(d.attempts)
        .bind(body)
        .fetch_optional(self.db())
        .await?)
    }

    /// Records how an attempt ended, if `owner` still holds this claim. Returns whether it did.
    pub async fn finish_delivery(
        &self,
        d: &ClaimedDelivery,
        owner: Uuid,
        outcome: &DeliveryOutcome,
    ) -> Result<bool> {
        let (state, status, error, delay) = match outcome {
            DeliveryOutcome::Delivered { status } => ("delivered", Some(*status), None, 0),
            DeliveryOutcome::Retry {
                status,
                error,
                delay,
            } => ("pending", *status, Some(error.as_str()), millis(*delay)),
            DeliveryOutcome::Failed { status, error } => {
                ("failed", *status, Some(error.as_str()), 0)
            }
        };
        let done = sqlx::query(
            "UPDATE imagegen.deliveries SET state = $4, last_status = $5, \
                 last_error = $6, lease_owner = NULL, updated_at = now(), \
                 next_attempt_at = CASE WHEN $4 = 'pending' \
                     THEN now() + $7 * interval '1 millisecond' ELSE next_attempt_at END, \
                 delivered_at = CASE WHEN $4 = 'delivered' THEN now() END \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'pending'",
        )
        .bind(d.id)
        .bind(owner)
        .bind(d.attempts)
        .bind(state)
        .bind(status.map(i32::from))
        .bind(error.map(super::truncate_error))
        .bind(delay)
        .execute(self.db())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// When the next pending delivery is due, if any.
    pub async fn next_delivery_due(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT min(next_attempt_at) FROM imagegen.deliveries WHERE state = 'pending'",
        )
        .fetch_one(self.db())
        .await?)
    }

    /// Deliveries, newest first: all, or only failed ones.
    pub async fn deliveries(&self, only_failed: bool, limit: i64) -> Result<Vec<DeliveryRow>> {
        let sql = format!(
            "SELECT id, webhook_id, event_id, job_id, url, state, attempts, next_attempt_at, \
                 last_status, last_error, created_at, delivered_at \
             FROM imagegen.deliveries {} ORDER BY id DESC LIMIT $1",
            if only_failed {
                "WHERE state = 'failed'"
            } else {
                ""
            }
        );
        Ok(sqlx::query_as(&sql)
            .bind(limit)
            .fetch_all(self.db())
            .await?)
    }

    /// One delivery.
    pub async fn delivery(&self, id: i64) -> Result<DeliveryRow> {
        sqlx::query_as(
            "SELECT id, webhook_id, event_id, job_id, url, state, attempts, next_attempt_at, \
                 last_status, last_error, created_at, delivered_at \
             FROM imagegen.deliveries WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.db())
        .await?
        .ok_or(QueueError::NotFound(id))
    }

    /// Sends a delivery again: back to pending, due now, with a fresh 24 h window, the same
    /// `webhook_id` and the same body. Refused while an attempt holds it.
    pub async fn redeliver(&self, id: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE imagegen.deliveries SET state = 'pending', next_attempt_at = now(), \
                 created_at = now(), delivered_at = NULL, updated_at = now() \
             WHERE id = $1 AND (state <> 'pending' OR lease_owner IS NULL)",
        )
        .bind(id)
        .execute(self.db())
        .await?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let d = self.delivery(id).await?;
        Err(QueueError::WrongState {
            id,
            state: d.state,
            what: "an attempt is sending it right now",
        })
    }
}
