//! The read and steer side of the queue that the HTTP API (and `imagegen show --json`) uses: the
//! one JSON shape of a job ([`JobView`]), filtered keyset listing, transactional bulk submission
//! with idempotency keys, batch summaries, workers, installation statistics, the queue gauges of
//! `/metrics`, and the installation settings (the daily budget). Only SQL lives here; handlers
//! turn these answers into HTTP.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, Postgres, QueryBuilder};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{NewJob, Queue, QueueError, Result};

/// The default aspect ratio, model, priority and attempts of a job: the table's defaults
/// (first migration), repeated here for the idempotency comparison and inserts.
const DEFAULT_ASPECT_RATIO: &str = "16:9";
const DEFAULT_MODEL: &str = crate::openrouter::models::FLASH_IMAGE;
const DEFAULT_PRIORITY: i32 = 0;
const DEFAULT_MAX_ATTEMPTS: i32 = 3;

/// The most jobs one listing returns.
pub const MAX_PAGE: i64 = 500;
/// The most jobs one submission may carry (one transaction).
pub const MAX_SUBMIT: usize = 1000;
/// A listing that takes longer than this is cancelled by Postgres rather than loading it: the
/// caller is asked to narrow the filters. Listings bounded by batch or state stay far below.
pub const LIST_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The window batch ETAs are estimated over.
pub const ETA_WINDOW: Duration = Duration::from_secs(15 * 60);
/// A worker whose heartbeat is older than this is not listed as running.
pub const WORKER_FRESH: Duration = Duration::from_secs(120);

/// The states a job can be in (the `jobs_state_valid` constraint).
pub const STATES: [&str; 5] = ["pending", "running", "succeeded", "failed", "cancelled"];

/// One job as every outside reader sees it: the API's answers and list items,
/// `imagegen show --json`, and later the webhook body and the event stream. Fields may be added
/// (renditions, callback URLs); none is removed or changes meaning. Money is a decimal string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct JobView {
    pub id: i64,
    /// pending, running, succeeded, failed or cancelled.
    #[schema(example = "succeeded")]
    pub state: String,
    pub prompt: String,
    #[schema(example = "16:9")]
    pub aspect_ratio: String,
    #[schema(example = "google/gemini-2.5-flash-image")]
    pub model: String,
    pub image_size: Option<String>,
    pub batch: Option<String>,
    pub priority: i32,
    /// Not before this time.
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    /// Attempts spent so far (the row's `attempts` column).
    pub attempts_used: i32,
    pub max_attempts: i32,
    /// Whatever JSON the application stored on the row, untouched (any JSON value). A value
    /// with numbers beyond what JSON readers hold (over ±1e300, possible only through SQL) is
    /// given as its JSON text instead.
    pub metadata: Option<serde_json::Value>,
    pub last_error: Option<String>,
    pub image_urls: Vec<String>,
    /// The stored images, in order.
    pub images: Vec<ImageView>,
    /// The rendition specs asked for (`og`, `thumb`, `webp`, `1200x630.jpg`, ...).
    pub renditions: Vec<String>,
    /// Spec -> one URL per image, in the order of `image_urls`; a spec is here once every image
    /// has it.
    #[schema(value_type = Object)]
    pub rendition_urls: serde_json::Value,
    /// Spec -> why it could not be made (the job still succeeded).
    #[schema(value_type = Option<Object>)]
    pub rendition_errors: Option<serde_json::Value>,
    /// Every attempt, oldest first, billed failures included.
    pub attempts: Vec<AttemptView>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// What the job was billed over all its attempts, in USD, as a decimal string.
    #[schema(value_type = String, example = "0.0387036")]
    pub cost_usd: Decimal,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The worker process holding the job while it runs.
    pub lease_owner: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Reference images sent with the prompt: https URLs or storage keys.
    #[serde(default)]
    pub reference_images: Vec<String>,
    /// 1, plus one per regeneration; `images` and `image_urls` are this generation's.
    #[serde(default = "first_generation")]
    pub generation: i32,
}

fn first_generation() -> i32 {
    1
}

/// One stored image of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow, ToSchema)]
#[non_exhaustive]
pub struct ImageView {
    #[sqlx(rename = "idx")]
    pub index: i32,
    pub key: String,
    pub url: String,
    pub content_type: String,
    pub bytes: i64,
    pub width: i32,
    pub height: i32,
    pub sha256: String,
    /// A ThumbHash of the image (base64): a blurred preview to paint before it loads.
    pub placeholder: Option<String>,
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow, ToSchema)]
#[non_exhaustive]
pub struct AttemptView {
    pub attempt: i32,
    pub worker_id: Uuid,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// succeeded, retry, failed, halted, released or lease_expired.
    pub outcome: String,
    pub error: Option<String>,
    pub http_status: Option<i32>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub image_tokens: i64,
    #[schema(value_type = String, example = "0.0387036")]
    pub cost_usd: Decimal,
    pub generation_id: Option<String>,
    pub duration_ms: Option<i64>,
}

#[derive(FromRow)]
struct JobBase {
    id: i64,
    state: String,
    prompt: String,
    aspect_ratio: String,
    model: String,
    image_size: Option<String>,
    batch: Option<String>,
    priority: i32,
    run_at: DateTime<Utc>,
    idempotency_key: Option<String>,
    attempts: i32,
    max_attempts: i32,
    /// As text: Postgres prints jsonb numbers in full, which a JSON reader may not hold.
    metadata: Option<String>,
    last_error: Option<String>,
    image_urls: Vec<String>,
    renditions: Vec<String>,
    rendition_urls: serde_json::Value,
    rendition_errors: Option<serde_json::Value>,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_usd: Decimal,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    lease_owner: Option<Uuid>,
    lease_expires_at: Option<DateTime<Utc>>,
    reference_images: Vec<String>,
    generation: i32,
}

#[derive(FromRow)]
struct JobAttempt {
    job_id: i64,
    #[sqlx(flatten)]
    attempt: AttemptView,
}

#[derive(FromRow)]
struct JobImage {
    job_id: i64,
    #[sqlx(flatten)]
    image: ImageView,
}

/// Which jobs a listing returns. Every field narrows; none set lists everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    /// Any of these states (each one of [`STATES`]).
    pub states: Vec<String>,
    pub batch: Option<String>,
    pub model: Option<String>,
    /// A case-insensitive substring of the prompt.
    pub q: Option<String>,
    /// JSON the job's metadata must contain (`@>`).
    pub metadata: Option<serde_json::Value>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// The order of a listing, which is also what its cursor means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobOrder {
    /// Newest first (descending id). The cursor is the last id seen.
    #[default]
    Newest,
    /// File order within one batch: the order the batch's jobs were inserted in (ascending id).
    /// Needs a batch filter.
    Batch,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// The id to continue after, when more jobs match.
    pub next_after: Option<i64>,
}

/// Errors of a submission. Nothing of the submission was applied.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The database refused an item (a constraint, a malformed value) or could not be reached.
    #[error("job {index}: {source}")]
    Item {
        index: usize,
        #[source]
        source: sqlx::Error,
    },
    /// The database failed outside any one item.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// An idempotency key that exists already came with a different job.
    #[error("job {index}: idempotency key {key:?} was used for a different job ({existing})")]
    KeyReused {
        index: usize,
        key: String,
        existing: i64,
    },
}

/// A submitted job and whether this submission created it.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: JobView,
    pub created: bool,
}

/// Jobs per state. Every state is always present.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StateCounts {
    pub pending: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl StateCounts {
    pub fn total(&self) -> i64 {
        self.pending + self.running + self.succeeded + self.failed + self.cancelled
    }

    pub(super) fn add(&mut self, state: &str, n: i64) {
        match state {
            "pending" => self.pending += n,
            "running" => self.running += n,
            "succeeded" => self.succeeded += n,
            "failed" => self.failed += n,
            "cancelled" => self.cancelled += n,
            _ => {}
        }
    }

    /// (state, count) pairs in [`STATES`] order.
    pub fn pairs(&self) -> [(&'static str, i64); 5] {
        [
            ("pending", self.pending),
            ("running", self.running),
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("cancelled", self.cancelled),
        ]
    }
}

/// A batch: its jobs per state, spend, budget and when it may be done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct BatchSummary {
    pub batch: String,
    pub counts: StateCounts,
    pub jobs: i64,
    /// Billed so far, in USD.
    #[schema(value_type = String, example = "1.2345")]
    pub cost_usd: Decimal,
    #[schema(value_type = Option<String>, example = "20")]
    pub budget_usd: Option<Decimal>,
    /// Budget minus billed spend (never below zero); absent without a budget.
    #[schema(value_type = Option<String>)]
    pub budget_remaining_usd: Option<Decimal>,
    /// Jobs that finished in the last 15 minutes: the rate the ETA assumes.
    pub finished_recently: i64,
    /// Seconds until pending and running jobs are done at the recent rate; absent when nothing
    /// is left or nothing finished recently.
    pub eta_seconds: Option<i64>,
    pub first_created_at: Option<DateTime<Utc>>,
    pub last_finished_at: Option<DateTime<Utc>>,
}

#[derive(FromRow)]
struct BatchRow {
    batch: String,
    pending: i64,
    running: i64,
    succeeded: i64,
    failed: i64,
    cancelled: i64,
    cost_usd: Decimal,
    recent: i64,
    first_created_at: Option<DateTime<Utc>>,
    last_finished_at: Option<DateTime<Utc>>,
    budget_usd: Option<Decimal>,
}

impl From<BatchRow> for BatchSummary {
    fn from(r: BatchRow) -> Self {
        let counts = StateCounts {
            pending: r.pending,
            running: r.running,
            succeeded: r.succeeded,
            failed: r.failed,
            cancelled: r.cancelled,
        };
        let left = counts.pending + counts.running;
        let eta_seconds = (left > 0 && r.recent > 0).then(|| {
            let per_job = ETA_WINDOW.as_secs_f64() / r.recent as f64;
            (per_job * left as f64).ceil() as i64
        });
        BatchSummary {
            batch: r.batch,
            jobs: counts.total(),
            counts,
            cost_usd: r.cost_usd,
            budget_remaining_usd: r.budget_usd.map(|b| (b - r.cost_usd).max(Decimal::ZERO)),
            budget_usd: r.budget_usd,
            finished_recently: r.recent,
            eta_seconds,
            first_created_at: r.first_created_at,
            last_finished_at: r.last_finished_at,
        }
    }
}

/// A running worker process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow, ToSchema)]
#[non_exhaustive]
pub struct WorkerView {
    pub id: Uuid,
    pub hostname: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Claiming is paused (a halting error such as a bad key or the daily budget, or a provider
    /// cool-down).
    pub paused: bool,
    pub paused_until: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
    /// Jobs this worker holds now.
    pub in_flight: i64,
}

/// What one model cost today.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow, ToSchema)]
pub struct ModelSpend {
    pub model: String,
    pub attempts: i64,
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
}

/// Attempts that ended in the last hour.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, FromRow, ToSchema)]
pub struct Throughput {
    pub attempts: i64,
    pub succeeded: i64,
    pub failed: i64,
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
}

/// The whole installation at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct Stats {
    pub counts: StateCounts,
    pub jobs: i64,
    /// Billed over all time, in USD.
    #[schema(value_type = String)]
    pub cost_usd: Decimal,
    /// Billed today (UTC), in USD: what the daily budget counts.
    #[schema(value_type = String)]
    pub spend_today_usd: Decimal,
    #[schema(value_type = Option<String>)]
    pub daily_budget_usd: Option<Decimal>,
    /// Daily budget minus today's spend and the reservations of calls in flight (never below
    /// zero); absent without a daily budget.
    #[schema(value_type = Option<String>)]
    pub daily_budget_remaining_usd: Option<Decimal>,
    /// Today's spend per model.
    pub spend_today_by_model: Vec<ModelSpend>,
    pub last_hour: Throughput,
    /// Age of the oldest job that is due and waiting; absent when none waits.
    pub oldest_pending_seconds: Option<f64>,
}

/// The installation-wide settings (the `imagegen.settings` row).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Settings {
    #[schema(value_type = Option<String>, example = "20")]
    pub daily_budget_usd: Option<Decimal>,
}

/// The queue figures `/metrics` exports: the same on every instance, since they are read from
/// Postgres.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueGauges {
    pub counts: StateCounts,
    pub oldest_pending_seconds: f64,
    pub spend_today_usd: Decimal,
    /// Daily budget left (after in-flight reservations), if there is a daily budget.
    pub daily_remaining_usd: Option<Decimal>,
    /// The smallest budget left among batches that have a budget and unfinished jobs.
    pub batch_remaining_usd: Option<Decimal>,
}

const JOB_VIEW_COLUMNS: &str = "id, state, prompt, aspect_ratio, model, image_size, batch, \
    priority, run_at, idempotency_key, attempts, max_attempts, metadata::text AS metadata, \
    last_error, image_urls, renditions, rendition_urls, rendition_errors, prompt_tokens, \
    completion_tokens, cost_usd, created_at, started_at, finished_at, updated_at, lease_owner, \
    lease_expires_at, reference_images, generation";

/// Today (UTC) as a timestamptz expression.
const TODAY: &str = "(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')";

impl Queue {
    /// One job in its outside shape.
    pub async fn job_view(&self, id: i64) -> Result<JobView> {
        self.job_views(&[id])
            .await?
            .pop()
            .ok_or(QueueError::NotFound(id))
    }

    /// Jobs in their outside shape, in the order of `ids` (missing ids are left out). Three
    /// statements however many jobs.
    pub async fn job_views(&self, ids: &[i64]) -> Result<Vec<JobView>> {
        if self.keep_statements() {
            let mut conn = self.pool.acquire().await?;
            return Ok(load_views(&mut conn, ids, true).await?);
        }
        // Through a pooler (the webhook body is read here): the three statements pinned to one
        // server by a transaction, and unnamed (see `pooled`).
        let mut tx = self.pool.begin().await?;
        let views = load_views(&mut tx, ids, false).await?;
        tx.commit().await?;
        Ok(views)
    }

    /// A page of jobs matching `filter`, continuing after `after` (the `next_after` of the
    /// previous page). Keyset pagination on the primary key: a page costs the same however deep,
    /// and a job inserted meanwhile never shifts the pages (newest first, new jobs come before
    /// the first page; in batch order, after the last).
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        order: JobOrder,
        after: Option<i64>,
        limit: i64,
    ) -> Result<JobPage> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT id FROM imagegen.jobs WHERE true");
        // States are inlined (each is checked against the fixed set), so the planner sees the
        // literal and can use the partial indexes of pending and running jobs.
        let states: Vec<&str> = filter
            .states
            .iter()
            .filter_map(|s| STATES.iter().find(|k| *k == s).copied())
            .collect();
        if !filter.states.is_empty() {
            if states.is_empty() {
                return Ok(JobPage {
                    jobs: Vec::new(),
                    next_after: None,
                });
            }
            let list: Vec<String> = states.iter().map(|s| format!("'{s}'")).collect();
            if list.len() == 1 {
                qb.push(format!(" AND state = {}", list[0]));
            } else {
                qb.push(format!(" AND state IN ({})", list.join(", ")));
            }
        }
        if let Some(b) = &filter.batch {
            qb.push(" AND batch = ").push_bind(b.clone());
        }
        if let Some(m) = &filter.model {
            qb.push(" AND model = ").push_bind(m.clone());
        }
        if let Some(q) = &filter.q {
            qb.push(" AND prompt ILIKE ")
                .push_bind(format!("%{}%", escape_like(q)));
        }
        if let Some(m) = &filter.metadata {
            qb.push(" AND metadata @> ").push_bind(m.clone());
        }
        if let Some(t) = filter.created_after {
            qb.push(" AND created_at > ").push_bind(t);
        }
        if let Some(t) = filter.created_before {
            qb.push(" AND created_at < ").push_bind(t);
        }
        let descending = order == JobOrder::Newest;
        if let Some(a) = after {
            qb.push(if descending {
                " AND id < "
            } else {
                " AND id > "
            })
            .push_bind(a);
        }
        qb.push(if descending {
            " ORDER BY id DESC"
        } else {
            " ORDER BY id"
        });
        qb.push(" LIMIT ").push_bind(limit + 1);

        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "SET LOCAL statement_timeout = {}",
            LIST_STATEMENT_TIMEOUT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        let mut ids: Vec<i64> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
        let more = ids.len() as i64 > limit;
        ids.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let jobs = load_views(&mut tx, &ids, self.keep_statements()).await?;
        tx.commit().await?;
        Ok(JobPage {
            next_after: if more { ids.last().copied() } else { None },
            jobs,
        })
    }

    /// Inserts jobs in one transaction: all of them or none. An item whose idempotency key exists
    /// already (earlier, or earlier in this submission) with the same job is answered with that
    /// job and `created: false`; with a different job the whole submission fails with
    /// [`SubmitError::KeyReused`]. A refused item fails it with the item's index.
    pub async fn submit(
        &self,
        jobs: &[NewJob],
    ) -> std::result::Result<Vec<Submitted>, SubmitError> {
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(jobs.len());
        for (index, job) in jobs.iter().enumerate() {
            let item = |source| SubmitError::Item { index, source };
            let inserted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO imagegen.jobs (prompt, aspect_ratio, model, image_size, batch, \
                     priority, run_at, idempotency_key, max_attempts, metadata, callback_url, \
                     renditions, reference_images) \
                 VALUES ($1, COALESCE($2, $11), COALESCE($3, $12), $4, $5, COALESCE($6, $13), \
                     COALESCE($7, now()), $8, COALESCE($9, $14), $10, $15, $16, $17) \
                 ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            )
            .bind(&job.prompt)
            .bind(&job.aspect_ratio)
            .bind(&job.model)
            .bind(&job.image_size)
            .bind(&job.batch)
            .bind(job.priority)
            .bind(job.run_at)
            .bind(&job.idempotency_key)
            .bind(job.max_attempts)
            .bind(&job.metadata)
            .bind(DEFAULT_ASPECT_RATIO)
            .bind(DEFAULT_MODEL)
            .bind(DEFAULT_PRIORITY)
            .bind(DEFAULT_MAX_ATTEMPTS)
            .bind(&job.callback_url)
            .bind(&job.renditions)
            .bind(&job.reference_images)
            .fetch_optional(&mut *tx)
            .await
            .map_err(item)?;
            if let Some(id) = inserted {
                ids.push((id, true));
                continue;
            }
            // The key exists (only a key conflict inserts nothing): the same job, or a misuse.
            let key = job.idempotency_key.clone().unwrap_or_default();
            let (id, same): (i64, bool) = sqlx::query_as(
                "SELECT id, (prompt = $2 AND aspect_ratio = COALESCE($3, $11) \
                     AND model = COALESCE($4, $12) AND image_size IS NOT DISTINCT FROM $5 \
                     AND batch IS NOT DISTINCT FROM $6 AND priority = COALESCE($7, $13) \
                     AND max_attempts = COALESCE($8, $14) \
                     AND metadata IS NOT DISTINCT FROM $9 \
                     AND ($10::timestamptz IS NULL OR run_at = $10) \
                     AND callback_url IS NOT DISTINCT FROM $15 AND renditions = $16 \
                     AND reference_images = $17) IS TRUE \
                 FROM imagegen.jobs WHERE idempotency_key = $1",
            )
            .bind(&key)
            .bind(&job.prompt)
            .bind(&job.aspect_ratio)
            .bind(&job.model)
            .bind(&job.image_size)
            .bind(&job.batch)
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(&job.metadata)
            .bind(job.run_at)
            .bind(DEFAULT_ASPECT_RATIO)
            .bind(DEFAULT_MODEL)
            .bind(DEFAULT_PRIORITY)
            .bind(DEFAULT_MAX_ATTEMPTS)
            .bind(&job.callback_url)
            .bind(&job.renditions)
            .bind(&job.reference_images)
            .fetch_one(&mut *tx)
            .await
            .map_err(item)?;
            if !same {
                return Err(SubmitError::KeyReused {
                    index,
                    key,
                    existing: id,
                });
            }
            ids.push((id, false));
        }
        let only: Vec<i64> = ids.iter().map(|(id, _)| *id).collect();
        let views = load_views(&mut tx, &only, self.keep_statements()).await?;
        tx.commit().await?;
        let by_id: HashMap<i64, JobView> = views.into_iter().map(|v| (v.id, v)).collect();
        Ok(ids
            .into_iter()
            .filter_map(|(id, created)| {
                by_id.get(&id).map(|v| Submitted {
                    job: v.clone(),
                    created,
                })
            })
            .collect())
    }

    /// Every batch that has jobs, by name.
    pub async fn batch_summaries(&self) -> Result<Vec<BatchSummary>> {
        let rows: Vec<BatchRow> = sqlx::query_as(&batch_sql("j.batch IS NOT NULL"))
            .fetch_all(self.db())
            .await?;
        Ok(rows.into_iter().map(BatchSummary::from).collect())
    }

    /// One batch; `None` when it has neither jobs nor a budget.
    pub async fn batch_summary(&self, batch: &str) -> Result<Option<BatchSummary>> {
        let row: Option<BatchRow> = sqlx::query_as(&batch_sql("j.batch = $1"))
            .bind(batch)
            .fetch_optional(self.db())
            .await?;
        if let Some(r) = row {
            return Ok(Some(r.into()));
        }
        Ok(self.batch_budget(batch).await?.map(|budget| {
            BatchRow {
                batch: batch.to_owned(),
                pending: 0,
                running: 0,
                succeeded: 0,
                failed: 0,
                cancelled: 0,
                cost_usd: Decimal::ZERO,
                recent: 0,
                first_created_at: None,
                last_finished_at: None,
                budget_usd: Some(budget),
            }
            .into()
        }))
    }

    /// The worker processes running now, with the jobs each holds.
    pub async fn worker_views(&self) -> Result<Vec<WorkerView>> {
        Ok(sqlx::query_as(
            "SELECT w.id, w.hostname, w.pid, w.started_at, w.heartbeat_at, \
                 (w.paused_until IS NOT NULL) AS paused, w.paused_until, w.pause_reason, \
                 (SELECT count(*) FROM imagegen.jobs j \
                     WHERE j.state = 'running' AND j.lease_owner = w.id) AS in_flight \
             FROM imagegen.workers w \
             WHERE w.stopped_at IS NULL \
               AND w.heartbeat_at > now() - $1 * interval '1 millisecond' \
             ORDER BY w.started_at, w.id",
        )
        .bind(super::millis(WORKER_FRESH))
        .fetch_all(self.db())
        .await?)
    }

    /// Counts, spend, today's spend per model and the last hour's throughput.
    pub async fn stats(&self) -> Result<Stats> {
        let counts = self.state_counts().await?;
        let (cost_usd,): (Decimal,) =
            sqlx::query_as("SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.jobs")
                .fetch_one(self.db())
                .await?;
        let spend_today_by_model: Vec<ModelSpend> = sqlx::query_as(&format!(
            "SELECT j.model, count(*) AS attempts, COALESCE(sum(a.cost_usd), 0) AS cost_usd \
             FROM imagegen.attempts a JOIN imagegen.jobs j ON j.id = a.job_id \
             WHERE a.finished_at >= {TODAY} GROUP BY j.model ORDER BY j.model"
        ))
        .fetch_all(self.db())
        .await?;
        let last_hour: Throughput = sqlx::query_as(
            "SELECT count(*) AS attempts, \
                 count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded, \
                 count(*) FILTER (WHERE outcome = 'failed') AS failed, \
                 COALESCE(sum(cost_usd), 0) AS cost_usd \
             FROM imagegen.attempts WHERE finished_at > now() - interval '1 hour'",
        )
        .fetch_one(self.db())
        .await?;
        let g = self.queue_gauges_with(counts.clone()).await?;
        let daily = self.settings().await?.daily_budget_usd;
        Ok(Stats {
            jobs: counts.total(),
            counts,
            cost_usd,
            spend_today_usd: g.spend_today_usd,
            daily_budget_usd: daily,
            daily_budget_remaining_usd: g.daily_remaining_usd,
            spend_today_by_model,
            last_hour,
            oldest_pending_seconds: (g.counts.pending > 0 && g.oldest_pending_seconds > 0.0)
                .then_some(g.oldest_pending_seconds),
        })
    }

    /// Jobs per state over the whole table.
    pub async fn state_counts(&self) -> Result<StateCounts> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM imagegen.jobs GROUP BY state")
                .fetch_all(self.db())
                .await?;
        let mut c = StateCounts::default();
        for (state, n) in rows {
            c.add(&state, n);
        }
        Ok(c)
    }

    /// The queue figures of `/metrics`.
    pub async fn queue_gauges(&self) -> Result<QueueGauges> {
        let counts = self.state_counts().await?;
        self.queue_gauges_with(counts).await
    }

    async fn queue_gauges_with(&self, counts: StateCounts) -> Result<QueueGauges> {
        #[derive(FromRow)]
        struct Row {
            oldest: Option<f64>,
            spend_today: Decimal,
            in_flight: Decimal,
            daily: Option<Decimal>,
            batch_remaining: Option<Decimal>,
        }
        let r: Row = sqlx::query_as(&format!(
            "SELECT \
                 (SELECT EXTRACT(EPOCH FROM now() - min(run_at))::float8 FROM imagegen.jobs \
                     WHERE state = 'pending' AND run_at <= now()) AS oldest, \
                 (SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.attempts \
                     WHERE finished_at >= {TODAY}) AS spend_today, \
                 (SELECT COALESCE(sum(reserved_usd), 0) FROM imagegen.jobs \
                     WHERE state = 'running') AS in_flight, \
                 (SELECT daily_budget_usd FROM imagegen.settings) AS daily, \
                 (SELECT min(greatest(b.budget_usd - COALESCE((SELECT sum(j.cost_usd) \
                         FROM imagegen.jobs j WHERE j.batch = b.batch), 0), 0)) \
                     FROM imagegen.batch_budgets b WHERE EXISTS (SELECT 1 FROM imagegen.jobs j \
                         WHERE j.batch = b.batch AND j.state IN ('pending', 'running'))) \
                     AS batch_remaining"
        ))
        .fetch_one(self.db())
        .await?;
        Ok(QueueGauges {
            counts,
            oldest_pending_seconds: r.oldest.unwrap_or(0.0).max(0.0),
            daily_remaining_usd: r
                .daily
                .map(|d| (d - r.spend_today - r.in_flight).max(Decimal::ZERO)),
            spend_today_usd: r.spend_today,
            batch_remaining_usd: r.batch_remaining,
        })
    }

    /// The installation-wide settings.
    pub async fn settings(&self) -> Result<Settings> {
        let daily: Option<Option<Decimal>> =
            sqlx::query_scalar("SELECT daily_budget_usd FROM imagegen.settings")
                .fetch_optional(self.db())
                .await?;
        Ok(Settings {
            daily_budget_usd: daily.flatten(),
        })
    }

    /// Sets (or with `None` removes) the daily budget every worker obeys.
    pub async fn set_daily_budget(&self, usd: Option<Decimal>) -> Result<()> {
        sqlx::query(
            "INSERT INTO imagegen.settings (singleton, daily_budget_usd) VALUES (true, $1) \
             ON CONFLICT (singleton) DO UPDATE SET daily_budget_usd = EXCLUDED.daily_budget_usd, \
                 updated_at = now()",
        )
        .bind(usd)
        .execute(self.db())
        .await?;
        Ok(())
    }

    /// The newest migration applied to this database, if any (readiness compares it with the
    /// binary's).
    pub async fn schema_version(&self) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT max(version) FROM public._sqlx_migrations WHERE success")
                .fetch_one(self.db())
                .await?,
        )
    }
}

fn batch_sql(condition: &str) -> String {
    format!(
        "SELECT j.batch, \
             count(*) FILTER (WHERE j.state = 'pending') AS pending, \
             count(*) FILTER (WHERE j.state = 'running') AS running, \
             count(*) FILTER (WHERE j.state = 'succeeded') AS succeeded, \
             count(*) FILTER (WHERE j.state = 'failed') AS failed, \
             count(*) FILTER (WHERE j.state = 'cancelled') AS cancelled, \
             COALESCE(sum(j.cost_usd), 0) AS cost_usd, \
             count(*) FILTER (WHERE j.finished_at > now() - {} * interval '1 second') AS recent, \
             min(j.created_at) AS first_created_at, max(j.finished_at) AS last_finished_at, \
             b.budget_usd \
         FROM imagegen.jobs j LEFT JOIN imagegen.batch_budgets b ON b.batch = j.batch \
         WHERE {condition} GROUP BY j.batch, b.budget_usd ORDER BY j.batch",
        ETA_WINDOW.as_secs()
    )
}

/// `persistent`: whether the statements may stay prepared on the server (not through a pooler).
async fn load_views(
    conn: &mut sqlx::PgConnection,
    ids: &[i64],
    persistent: bool,
) -> std::result::Result<Vec<JobView>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let bases: Vec<JobBase> = sqlx::query_as(&format!(
        "SELECT {JOB_VIEW_COLUMNS} FROM imagegen.jobs WHERE id = ANY($1)"
    ))
    .persistent(persistent)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let attempts: Vec<JobAttempt> = sqlx::query_as(
        "SELECT job_id, attempt, worker_id, started_at, finished_at, outcome, error, http_status, \
             prompt_tokens, completion_tokens, image_tokens, cost_usd, generation_id, duration_ms \
         FROM imagegen.attempts WHERE job_id = ANY($1) ORDER BY job_id, id",
    )
    .persistent(persistent)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let images: Vec<JobImage> = sqlx::query_as(
        "SELECT i.job_id, i.idx, i.key, i.url, i.content_type, i.bytes, i.width, i.height, \
             i.sha256, i.placeholder \
         FROM imagegen.images i JOIN imagegen.jobs j ON j.id = i.job_id \
             AND j.generation = i.generation \
         WHERE i.job_id = ANY($1) ORDER BY i.job_id, i.idx",
    )
    .persistent(persistent)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut attempts_of: HashMap<i64, Vec<AttemptView>> = HashMap::new();
    for a in attempts {
        attempts_of.entry(a.job_id).or_default().push(a.attempt);
    }
    let mut images_of: HashMap<i64, Vec<ImageView>> = HashMap::new();
    for i in images {
        images_of.entry(i.job_id).or_default().push(i.image);
    }
    let mut by_id: HashMap<i64, JobView> = bases
        .into_iter()
        .map(|b| {
            let view = JobView {
                id: b.id,
                state: b.state,
                prompt: b.prompt,
                aspect_ratio: b.aspect_ratio,
                model: b.model,
                image_size: b.image_size,
                batch: b.batch,
                priority: b.priority,
                run_at: b.run_at,
                idempotency_key: b.idempotency_key,
                attempts_used: b.attempts,
                max_attempts: b.max_attempts,
                metadata: b.metadata.map(|text| {
                    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
                }),
                last_error: b.last_error,
                image_urls: b.image_urls,
                images: images_of.remove(&b.id).unwrap_or_default(),
                renditions: b.renditions,
                rendition_urls: b.rendition_urls,
                rendition_errors: b.rendition_errors,
                attempts: attempts_of.remove(&b.id).unwrap_or_default(),
                prompt_tokens: b.prompt_tokens,
                completion_tokens: b.completion_tokens,
                cost_usd: b.cost_usd,
                created_at: b.created_at,
                started_at: b.started_at,
                finished_at: b.finished_at,
                updated_at: b.updated_at,
                lease_owner: b.lease_owner,
                lease_expires_at: b.lease_expires_at,
                reference_images: b.reference_images,
                generation: b.generation,
            };
            (view.id, view)
        })
        .collect();
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

/// Escapes `LIKE` wildcards so a search for `50%` finds the text `50%`.
pub(super) fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_are_escaped() {
        assert_eq!(escape_like("50%_off\\"), "50\\%\\_off\\\\");
        assert_eq!(escape_like("plain"), "plain");
    }
}
