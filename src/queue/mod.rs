//! The only code that speaks SQL to the jobs tables: enqueue, claim, renew, finish, rescue,
//! cancel, retry and the read-side queries for status. One documented function per state change.
//!
//! State machine of `imagegen.jobs.state`:
//!
//! ```text
//!   pending --claim--> running --complete(succeeded)--> succeeded
//!      ^  ^               |  \--complete(failed)------> failed
//!      |  |               |   \-rescue (lease expired, attempts left = no)--> failed
//!      |  \--complete(retry | released | halted)--/
//!      \----- rescue (lease expired, attempts left) --/
//!   pending --cancel--> cancelled;  failed | cancelled --retry--> pending
//! ```
//!
//! Split by what they own: `events.rs` the event log (the stream's source), `deliveries.rs` the
//! webhook outbox, `pooled.rs` how statements run through a transaction pooler. Every
//! statement runs on `self.db()`, never on the pool itself, so that mode stays correct.
//!
//! The fencing token of a running job is `(lease_owner, attempts)`: a claim bumps `attempts` and
//! sets `lease_owner`, and every write that finishes or renews a job checks both, so a worker whose
//! job was rescued and claimed again (even by the same worker) can never overwrite the new result.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::postgres::PgListener;
use sqlx::{FromRow, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::{Classify, ErrorClass};

pub mod api;
pub mod batches;
pub mod pages;
pub mod renditions;
pub use renditions::{Fence, RenditionRecord, RenditionRow, RenditionTarget, Selection};
pub mod deliveries;
pub mod events;
pub mod generations;
mod pooled;
pub mod prune;
pub use generations::Regenerated;
pub use prune::{PruneChunk, PruneCount, PruneFilter};

use pooled::Db;

/// The channel the insert trigger notifies (see the first migration).
pub const NOTIFY_CHANNEL: &str = "imagegen_jobs";

/// The most rows one claim statement takes, however many slots are free: bigger batches stop
/// paying for themselves and make one slow claim hold many row locks.
pub const MAX_CLAIM_BATCH: i64 = 500;

/// Errors from the queue. Database trouble is transient: the worker backs off and tries again.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database could not be reached or the statement failed for a transient reason.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A job the caller named does not exist.
    #[error("job {0} not found")]
    NotFound(i64),
    /// A state change that the job's current state does not allow.
    #[error("job {id} is {state}: {what}")]
    WrongState {
        id: i64,
        state: String,
        what: &'static str,
    },
}

impl Classify for QueueError {
    fn class(&self) -> ErrorClass {
        match self {
            QueueError::Database(sqlx::Error::Database(db)) if db.constraint().is_some() => {
                ErrorClass::Permanent
            }
            QueueError::Database(_) => ErrorClass::RETRY,
            QueueError::NotFound(_) | QueueError::WrongState { .. } => ErrorClass::Permanent,
        }
    }
}

type Result<T, E = QueueError> = std::result::Result<T, E>;

/// A job as a worker holds it after claiming it.
#[derive(Debug, Clone, FromRow)]
pub struct Job {
    pub id: i64,
    pub prompt: String,
    pub aspect_ratio: String,
    pub model: String,
    pub image_size: Option<String>,
    pub batch: Option<String>,
    pub priority: i32,
    /// The attempt this claim is, 1-based; part of the fencing token.
    pub attempts: i32,
    pub max_attempts: i32,
    pub metadata: Option<serde_json::Value>,
    pub lease_owner: Option<Uuid>,
    /// When this attempt was claimed.
    pub started_at: Option<DateTime<Utc>>,
    /// An earlier attempt paid for images it could not store (see `imagegen.paid_images`).
    pub has_paid_images: bool,
    /// The rendition specs the app asked for (checked by `jobs_renditions_valid`).
    pub renditions: Vec<String>,
    /// Reference images sent with the prompt: https URLs or storage keys
    /// (`jobs_reference_images_valid`).
    pub reference_images: Vec<String>,
    /// Which generation this attempt makes (1 until the job is regenerated); part of its keys.
    pub generation: i32,
}

impl Job {
    /// The fencing token of this claim.
    pub fn lease(&self) -> Lease {
        Lease {
            worker: self.lease_owner.unwrap_or_default(),
            attempt: self.attempts,
        }
    }
}

/// Which worker holds a job, for which attempt. Every finishing write must present it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub worker: Uuid,
    pub attempt: i32,
}

/// What an application (or the CLI) asks for. Defaults match the table's.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    pub prompt: String,
    pub aspect_ratio: Option<String>,
    pub model: Option<String>,
    pub image_size: Option<String>,
    pub batch: Option<String>,
    pub priority: Option<i32>,
    pub run_at: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
    pub max_attempts: Option<i32>,
    pub metadata: Option<serde_json::Value>,
    /// Where to POST the finished job (a signed webhook); http(s) only.
    pub callback_url: Option<String>,
    /// Rendition specs (`og`, `thumb`, `webp`, `WxH.fmt`, `Ww.fmt`; `jobs_renditions_valid`).
    pub renditions: Vec<String>,
    /// Up to 4 reference images: https URLs or storage keys (`jobs_reference_images_valid`).
    pub reference_images: Vec<String>,
}

/// What one attempt reported, whatever its outcome: billed failures are recorded too.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttemptRecord {
    pub http_status: Option<i32>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub image_tokens: i64,
    pub cost_usd: Decimal,
    pub generation_id: Option<String>,
}

/// One stored image of a succeeded job, for `imagegen.images`.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct ImageRow {
    #[sqlx(rename = "idx")]
    pub index: i32,
    pub key: String,
    pub url: String,
    pub content_type: String,
    pub bytes: i64,
    pub width: i32,
    pub height: i32,
    pub sha256: String,
}

/// How an attempt ends, as the worker decided it.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// Done: the URLs go on the row, the images into `imagegen.images`.
    Succeeded {
        image_urls: Vec<String>,
        images: Vec<ImageRow>,
    },
    /// Back to pending, runnable again after `delay`. The attempt is spent unless `refund`
    /// (a retry that costs nothing: the images were paid for and kept).
    Retry {
        error: String,
        delay: Duration,
        refund: bool,
    },
    /// Failed for good (permanent error, or no attempts left).
    Failed { error: String },
    /// Back to pending at once without spending the attempt: the worker is shutting down
    /// (`halted = false`) or has paused claiming because every job would fail (`halted = true`).
    Released { error: String, halted: bool },
}

impl Finish {
    fn state(&self) -> &'static str {
        match self {
            Finish::Succeeded { .. } => "succeeded",
            Finish::Failed { .. } => "failed",
            Finish::Retry { .. } | Finish::Released { .. } => "pending",
        }
    }

    /// The word recorded in `imagegen.attempts.outcome`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Finish::Succeeded { .. } => "succeeded",
            Finish::Failed { .. } => "failed",
            Finish::Retry { .. } => "retry",
            Finish::Released { halted: true, .. } => "halted",
            Finish::Released { halted: false, .. } => "released",
        }
    }

    fn error(&self) -> Option<&str> {
        match self {
            Finish::Succeeded { .. } => None,
            Finish::Retry { error, .. }
            | Finish::Failed { error }
            | Finish::Released { error, .. } => Some(error),
        }
    }
}

/// Everything one finishing write needs: which claim, how it ended, what it cost.
#[derive(Debug, Clone)]
pub struct Completion {
    pub job_id: i64,
    pub lease: Lease,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub finish: Finish,
    pub record: AttemptRecord,
}

/// A job row as the status commands show it.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub prompt: String,
    pub aspect_ratio: String,
    pub model: String,
    pub image_size: Option<String>,
    pub batch: Option<String>,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub idempotency_key: Option<String>,
    pub max_attempts: i32,
    pub metadata: Option<serde_json::Value>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub image_urls: Vec<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: Decimal,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<Uuid>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub callback_url: Option<String>,
}

/// One row of `imagegen.attempts`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct AttemptRow {
    pub attempt: i32,
    pub worker_id: Uuid,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub outcome: String,
    pub error: Option<String>,
    pub http_status: Option<i32>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub image_tokens: i64,
    pub cost_usd: Decimal,
    pub generation_id: Option<String>,
    pub duration_ms: Option<i64>,
}

/// Counts and spend for one state (and batch, when grouped by batch).
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct StateCount {
    pub batch: Option<String>,
    pub state: String,
    pub jobs: i64,
    pub cost_usd: Decimal,
}

/// A worker process as it announced itself.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct WorkerRow {
    pub id: Uuid,
    pub hostname: String,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub paused_until: Option<DateTime<Utc>>,
    pub pause_reason: Option<String>,
}

/// A batch's budget and what the batch was billed so far.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct BatchBudget {
    pub batch: String,
    pub budget_usd: Decimal,
    pub spent_usd: Decimal,
}

/// Whether a call may start under the budgets that apply to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reservation {
    /// Within every budget; the expected cost is reserved on the job.
    Granted,
    /// The batch's budget would be passed.
    BatchOver {
        budget: Decimal,
        billed: Decimal,
        in_flight: Decimal,
    },
    /// Today's budget would be passed.
    DailyOver {
        budget: Decimal,
        billed: Decimal,
        in_flight: Decimal,
    },
    /// The job is no longer this worker's.
    LeaseLost,
}

/// Which jobs a claim may take.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    /// Only jobs of this batch.
    pub only: Option<String>,
    /// Never jobs of these batches (paused, e.g. their budget is spent).
    pub skip: Vec<String>,
}

/// What is left in the queue, for `worker --exit-when-idle` (see [`Queue::work_left`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromRow)]
pub struct WorkLeft {
    /// Pending and due now.
    pub due: i64,
    pub running: i64,
    /// Pending, waiting for a retry a transient failure scheduled.
    pub retrying: i64,
    /// Pending, scheduled for later by whoever enqueued them (`run_at`).
    pub scheduled: i64,
    /// Pending in a batch stopped at its budget.
    pub budget_stopped: i64,
}

impl WorkLeft {
    /// Something is due now or soon: a worker asked to exit when idle keeps running.
    pub fn soon(&self) -> bool {
        self.due > 0 || self.running > 0 || self.retrying > 0
    }
}

/// Whether an enqueue made a new row or found one with the same idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: i64,
    pub created: bool,
}

// RUNNING_BY_ID: statements that find running jobs by id write the state check as
// `(j.state = 'running') IS TRUE` (the same test: `state` is never null). A plain
// `state = 'running'` lets the planner drive the join from the partial index
// `jobs_running_lease_idx`, and when the statistics say few jobs run (they were gathered while the
// queue was quiet) it does, comparing every running job with every id in the batch: measured 130 ms
// to complete 500 jobs with 500 running, against 17 ms through the primary key.

const JOB_COLUMNS: &str = "id, prompt, aspect_ratio, model, image_size, batch, priority, attempts, \
                           max_attempts, metadata, lease_owner, started_at, renditions, \
                           reference_images, generation";

/// The queue: a handle on the pool, with one method per state change.
#[derive(Debug, Clone)]
pub struct Queue {
    pool: PgPool,
    /// The pool reaches Postgres through a transaction pooler (PgBouncer): no LISTEN (idle
    /// workers, the deliverer and event streams poll instead) and every statement pinned and
    /// unnamed (see `pooled`).
    pooled: bool,
}

impl Queue {
    pub fn new(pool: PgPool) -> Self {
        Queue {
            pool,
            pooled: false,
        }
    }

    /// A queue whose pool goes through a transaction pooler; see the `pooled` module.
    pub fn through_pooler(pool: PgPool) -> Self {
        Queue { pool, pooled: true }
    }

    /// False through a pooler: LISTEN needs a session of its own.
    pub fn listens(&self) -> bool {
        !self.pooled
    }

    /// Where this queue's statements run. All of them go through here.
    fn db(&self) -> Db<'_> {
        if self.pooled {
            Db::Pooled(&self.pool)
        } else {
            Db::Direct(&self.pool)
        }
    }

    /// Whether statements inside an explicit transaction may be kept prepared on the server
    /// (not through a pooler: the next client of that server would collide with them).
    fn keep_statements(&self) -> bool {
        !self.pooled
    }

    /// Wakes idle workers everywhere (after jobs became due other than by an insert).
    pub async fn wake_workers(&self) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(NOTIFY_CHANNEL)
            .execute(self.db())
            .await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A listener subscribed to new-job notifications. Callers must subscribe *before* their
    /// first claim, so a job inserted between the claim and the subscription is not missed.
    pub async fn listen(&self) -> Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }

    /// Inserts one job. With an idempotency key that already exists, nothing is inserted and the
    /// existing job's id is returned with `created: false`.
    pub async fn enqueue(&self, job: &NewJob) -> Result<Enqueued> {
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO imagegen.jobs (prompt, aspect_ratio, model, image_size, batch, priority, \
                 run_at, idempotency_key, max_attempts, metadata, callback_url, renditions, \
                 reference_images) \
             VALUES ($1, COALESCE($2, '16:9'), COALESCE($3, 'google/gemini-2.5-flash-image'), $4, \
                 $5, COALESCE($6, 0), COALESCE($7, now()), $8, COALESCE($9, 3), $10, $11, $12, \
                 $13) \
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
        .bind(&job.callback_url)
        .bind(&job.renditions)
        .bind(&job.reference_images)
        .fetch_optional(self.db())
        .await?;
        if let Some(id) = inserted {
            return Ok(Enqueued { id, created: true });
        }
        let id: i64 = sqlx::query_scalar("SELECT id FROM imagegen.jobs WHERE idempotency_key = $1")
            .bind(&job.idempotency_key)
            .fetch_one(self.db())
            .await?;
        Ok(Enqueued { id, created: false })
    }

    /// Inserts many jobs in one statement (one NOTIFY for all of them). Rows whose idempotency
    /// key exists already are skipped. Returns the number of rows inserted.
    pub async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<u64> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut prompts = Vec::with_capacity(jobs.len());
        let mut ratios = Vec::with_capacity(jobs.len());
        let mut models = Vec::with_capacity(jobs.len());
        let mut sizes = Vec::with_capacity(jobs.len());
        let mut batches = Vec::with_capacity(jobs.len());
        let mut priorities = Vec::with_capacity(jobs.len());
        let mut keys = Vec::with_capacity(jobs.len());
        let mut max_attempts = Vec::with_capacity(jobs.len());
        let mut metadata = Vec::with_capacity(jobs.len());
        let mut callbacks = Vec::with_capacity(jobs.len());
        // Comma-joined: Postgres arrays of arrays must be rectangular, and no spec holds a comma.
        let mut renditions = Vec::with_capacity(jobs.len());
        // Newline-joined, for the same reason: neither a URL nor a key holds one.
        let mut references = Vec::with_capacity(jobs.len());
        for j in jobs {
            prompts.push(j.prompt.clone());
            ratios.push(j.aspect_ratio.clone());
            models.push(j.model.clone());
            sizes.push(j.image_size.clone());
            batches.push(j.batch.clone());
            priorities.push(j.priority);
            keys.push(j.idempotency_key.clone());
            max_attempts.push(j.max_attempts);
            metadata.push(j.metadata.clone());
            callbacks.push(j.callback_url.clone());
            renditions.push(j.renditions.join(","));
            references.push(j.reference_images.join("\n"));
        }
        let done = sqlx::query(
            "INSERT INTO imagegen.jobs (prompt, aspect_ratio, model, image_size, batch, priority, \
                 idempotency_key, max_attempts, metadata, callback_url, renditions, \
                 reference_images) \
             SELECT p, COALESCE(r, '16:9'), COALESCE(m, 'google/gemini-2.5-flash-image'), s, b, \
                 COALESCE(pr, 0), k, COALESCE(ma, 3), md, cb, \
                 COALESCE(string_to_array(NULLIF(rs, ''), ','), '{}'), \
                 COALESCE(string_to_array(NULLIF(rf, ''), E'\\n'), '{}') \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], \
                 $7::text[], $8::int[], $9::jsonb[], $10::text[], $11::text[], $12::text[]) \
                 AS t(p, r, m, s, b, pr, k, ma, md, cb, rs, rf) \
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&prompts)
        .bind(&ratios)
        .bind(&models)
        .bind(&sizes)
        .bind(&batches)
        .bind(&priorities)
        .bind(&keys)
        .bind(&max_attempts)
        .bind(&metadata)
        .bind(&callbacks)
        .bind(&renditions)
        .bind(&references)
        .execute(self.db())
        .await?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` runnable jobs for `worker`, highest priority first, then oldest
    /// `run_at`, then id, in one statement. `SKIP LOCKED` lets any number of workers claim at once
    /// without waiting on each other; a claim bumps `attempts` and sets the lease.
    pub async fn claim(
        &self,
        worker: Uuid,
        limit: i64,
        lease: Duration,
        filter: &ClaimFilter,
    ) -> Result<Vec<Job>> {
        let limit = limit.clamp(0, MAX_CLAIM_BATCH);
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Batch conditions are written in only when the filter has them, never as
        // `$n IS NULL OR ...`: Postgres caches a generic plan for a prepared statement, and with
        // such conditions (or a batch equality) and no fresh statistics (a new table, or a burst
        // of inserts after a quiet spell) it picks a bitmap scan of every pending row plus a sort
        // over the ordered index scan: measured 8 ms a claim at 20,000 pending, growing with the
        // queue. Without them the only plan is the ordered scan of `jobs_pending_idx`.
        let mut conditions = String::new();
        let mut next_param = 4;
        if !filter.skip.is_empty() {
            conditions.push_str(&format!(
                " AND (batch IS NULL OR NOT batch = ANY(${next_param}::text[]))"
            ));
            next_param += 1;
        }
        if filter.only.is_some() {
            conditions.push_str(&format!(" AND batch = ${next_param}::text"));
        }
        let sql = format!(
            "WITH picked AS ( \
                 SELECT id FROM imagegen.jobs \
                 WHERE state = 'pending' AND run_at <= now(){conditions} \
                 ORDER BY priority DESC, run_at, id \
                 LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE imagegen.jobs j SET state = 'running', attempts = j.attempts + 1, \
                 lease_owner = $1, lease_expires_at = now() + $3 * interval '1 millisecond', \
                 started_at = now(), updated_at = now(), retry_pending = false \
             FROM picked WHERE j.id = picked.id \
             RETURNING {}, EXISTS (SELECT 1 FROM imagegen.paid_images p WHERE p.job_id = j.id \
                 AND p.generation = j.generation) AS has_paid_images",
            JOB_COLUMNS
                .split(", ")
                .map(|c| format!("j.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut query = sqlx::query_as(&sql)
            .bind(worker)
            .bind(limit)
            .bind(millis(lease));
        if !filter.skip.is_empty() {
            query = query.bind(&filter.skip);
        }
        if let Some(only) = &filter.only {
            query = query.bind(only);
        }
        let mut jobs: Vec<Job> = query.fetch_all(self.db()).await?;
        // RETURNING gives no order; hand jobs out in the order the claim chose them.
        jobs.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.id));
        Ok(jobs)
    }

    /// Extends the leases `worker` holds on `held` jobs. Returns the ids whose lease was renewed;
    /// a job missing from the answer was taken from this worker (its lease expired and another
    /// worker rescued it) and must not be finished by it.
    pub async fn renew(
        &self,
        worker: Uuid,
        held: &[(i64, i32)],
        lease: Duration,
    ) -> Result<Vec<i64>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = held.iter().copied().unzip();
        // No check on the expiry itself: as long as nobody rescued the job, this worker still
        // holds it, even if a database outage let the lease run past its time. `IS TRUE`: see
        // RUNNING_BY_ID. The rows are locked in id order first, as `complete` locks them: the
        // two run at once on the same jobs, and rows locked in two orders deadlock.
        let renewed = sqlx::query_scalar(
            "WITH held AS ( \
                 SELECT j.id FROM imagegen.jobs j \
                 JOIN UNNEST($2::bigint[], $3::int[]) AS h(id, attempt) \
                     ON j.id = h.id AND j.attempts = h.attempt \
                 WHERE j.lease_owner = $1 AND (j.state = 'running') IS TRUE \
                 ORDER BY j.id FOR UPDATE OF j) \
             UPDATE imagegen.jobs j SET lease_expires_at = now() + $4 * interval '1 millisecond' \
             FROM held WHERE j.id = held.id \
             RETURNING j.id",
        )
        .bind(worker)
        .bind(&ids)
        .bind(&attempts)
        .bind(millis(lease))
        .fetch_all(self.db())
        .await?;
        Ok(renewed)
    }

    /// Writes the end of many attempts in one transaction, each fenced by its lease: a completion
    /// whose lease is no longer held changes nothing. Returns, for each completion in order,
    /// whether it was applied.
    ///
    /// On the job: state, attempts (given back for a release), last error, URLs, and tokens and
    /// cost *added* to what earlier attempts billed. One `imagegen.attempts` row per applied
    /// completion, and the `imagegen.images` rows of succeeded ones.
    ///
    /// All of it is one statement (data-modifying CTEs), so it is atomic without an explicit
    /// transaction: one round trip and one commit per batch, which is what lets the completion
    /// writer keep up with thousands of short jobs a second.
    pub async fn complete(&self, completions: &[Completion]) -> Result<Vec<bool>> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let n = completions.len();
        let mut ids = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut outcomes = Vec::with_capacity(n);
        let mut refunds = Vec::with_capacity(n);
        let mut errors = Vec::with_capacity(n);
        let mut urls = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        let mut started = Vec::with_capacity(n);
        let mut durations = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut ptoks = Vec::with_capacity(n);
        let mut ctoks = Vec::with_capacity(n);
        let mut itoks = Vec::with_capacity(n);
        let mut costs = Vec::with_capacity(n);
        let mut gens = Vec::with_capacity(n);
        for c in completions {
            ids.push(c.job_id);
            workers.push(c.lease.worker);
            attempts.push(c.lease.attempt);
            states.push(c.finish.state());
            outcomes.push(c.finish.outcome());
            refunds.push(i32::from(matches!(
                c.finish,
                Finish::Released { .. } | Finish::Retry { refund: true, .. }
            )));
            errors.push(c.finish.error().map(truncate_error));
            urls.push(match &c.finish {
                Finish::Succeeded { image_urls, .. } => serde_json::json!(image_urls),
                _ => serde_json::Value::Null,
            });
            delays.push(match &c.finish {
                Finish::Retry { delay, .. } => millis(*delay),
                _ => 0,
            });
            started.push(c.started_at);
            durations.push(millis(c.duration));
            statuses.push(c.record.http_status);
            ptoks.push(c.record.prompt_tokens);
            ctoks.push(c.record.completion_tokens);
            itoks.push(c.record.image_tokens);
            costs.push(c.record.cost_usd);
            gens.push(c.record.generation_id.clone());
        }
        let images = ImageColumns::of(completions);
        // The fenced update; an attempts row, and the image rows, for exactly the jobs it changed.
        // `IS TRUE`: see RUNNING_BY_ID. The fenced rows are locked in id order before the update
        // (`fenced`), as `renew` locks them: the two run at once on the same jobs, and rows
        // locked in two orders deadlock.
        let applied: Vec<i64> = sqlx::query_scalar(
            "WITH c AS ( \
                 SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::int[], $4::text[], $5::text[], \
                     $6::int[], $7::text[], $8::jsonb[], $9::bigint[], $10::timestamptz[], \
                     $11::bigint[], $12::int[], $13::bigint[], $14::bigint[], $15::bigint[], \
                     $16::numeric[], $17::text[]) \
                 AS c(id, worker, attempt, state, outcome, refund, error, urls, delay_ms, started, \
                     duration_ms, status, ptok, ctok, itok, cost, gen)), \
             fenced AS ( \
                 SELECT j.id FROM imagegen.jobs j JOIN c ON j.id = c.id \
                 WHERE (j.state = 'running') IS TRUE AND j.lease_owner = c.worker \
                   AND j.attempts = c.attempt \
                 ORDER BY j.id FOR UPDATE OF j), \
             done AS ( \
                 UPDATE imagegen.jobs j SET \
                     state = c.state, \
                     attempts = j.attempts - c.refund, \
                     last_error = COALESCE(c.error, CASE WHEN c.state = 'succeeded' THEN NULL \
                         ELSE j.last_error END), \
                     image_urls = CASE WHEN c.state = 'succeeded' \
                         THEN ARRAY(SELECT jsonb_array_elements_text(c.urls)) ELSE j.image_urls END, \
                     prompt_tokens = j.prompt_tokens + c.ptok, \
                     completion_tokens = j.completion_tokens + c.ctok, \
                     cost_usd = j.cost_usd + c.cost, \
                     run_at = CASE WHEN c.state = 'pending' \
                         THEN now() + c.delay_ms * interval '1 millisecond' ELSE j.run_at END, \
                     finished_at = CASE WHEN c.state IN ('succeeded', 'failed') THEN now() END, \
                     lease_owner = NULL, lease_expires_at = NULL, reserved_usd = NULL, \
                     retry_pending = (c.outcome = 'retry'), updated_at = now() \
                 FROM c JOIN fenced f ON f.id = c.id \
                 WHERE j.id = f.id AND (j.state = 'running') IS TRUE \
                   AND j.lease_owner = c.worker \
                   AND j.attempts = c.attempt \
                 RETURNING j.id, j.generation), \
             logged AS ( \
                 INSERT INTO imagegen.attempts (job_id, attempt, worker_id, started_at, outcome, \
                     error, http_status, prompt_tokens, completion_tokens, image_tokens, cost_usd, \
                     generation_id, duration_ms, generation) \
                 SELECT c.id, c.attempt, c.worker, c.started, c.outcome, c.error, c.status, c.ptok, \
                     c.ctok, c.itok, c.cost, c.gen, c.duration_ms, done.generation \
                 FROM c JOIN done ON done.id = c.id), \
             stored AS ( \
                 INSERT INTO imagegen.images (job_id, idx, key, url, content_type, bytes, width, \
                     height, sha256, generation) \
                 SELECT i.*, done.generation FROM UNNEST($18::bigint[], $19::int[], $20::text[], \
                     $21::text[], $22::text[], $23::bigint[], $24::int[], $25::int[], $26::text[]) \
                     AS i(job_id, idx, key, url, content_type, bytes, width, height, sha256) \
                 JOIN done ON done.id = i.job_id \
                 ON CONFLICT (job_id, generation, idx) DO UPDATE SET key = EXCLUDED.key, url = EXCLUDED.url, \
                     content_type = EXCLUDED.content_type, bytes = EXCLUDED.bytes, \
                     width = EXCLUDED.width, height = EXCLUDED.height, sha256 = EXCLUDED.sha256) \
             SELECT id FROM done",
        )
        .bind(&ids)
        .bind(&workers)
        .bind(&attempts)
        .bind(&states)
        .bind(&outcomes)
        .bind(&refunds)
        .bind(&errors)
        .bind(&urls)
        .bind(&delays)
        .bind(&started)
        .bind(&durations)
        .bind(&statuses)
        .bind(&ptoks)
        .bind(&ctoks)
        .bind(&itoks)
        .bind(&costs)
        .bind(&gens)
        .bind(&images.job_ids)
        .bind(&images.idx)
        .bind(&images.keys)
        .bind(&images.urls)
        .bind(&images.types)
        .bind(&images.sizes)
        .bind(&images.widths)
        .bind(&images.heights)
        .bind(&images.hashes)
        .fetch_all(self.db())
        .await?;
        let applied: std::collections::HashSet<i64> = applied.into_iter().collect();
        Ok(completions
            .iter()
            .map(|c| applied.contains(&c.job_id))
            .collect())
    }

    /// Returns jobs whose lease expired (their worker crashed, hung or lost the database for
    /// longer than the lease) to pending, or to failed when that was their last attempt. The
    /// attempt stays spent, so a job that kills its worker cannot loop forever. Any worker may
    /// call this; `SKIP LOCKED` keeps two rescuers from fighting. Returns how many were rescued.
    pub async fn rescue_expired(&self, limit: i64) -> Result<u64> {
        let rescued: Vec<i64> = sqlx::query_scalar(
            "WITH expired AS ( \
                 SELECT id, lease_owner, started_at FROM imagegen.jobs \
                 WHERE state = 'running' AND lease_expires_at < now() \
                 ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED), \
             done AS ( \
                 UPDATE imagegen.jobs j SET \
                     state = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END, \
                     last_error = 'lease expired: the worker stopped renewing it during attempt ' \
                         || j.attempts || ' (crashed, killed or cut off)', \
                     finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END, \
                     run_at = now(), lease_owner = NULL, lease_expires_at = NULL, \
                     reserved_usd = NULL, retry_pending = false, updated_at = now() \
                 FROM expired e WHERE j.id = e.id \
                 RETURNING j.id, j.attempts, j.last_error), \
             logged AS ( \
                 INSERT INTO imagegen.attempts (job_id, attempt, worker_id, started_at, outcome, \
                     error) \
                 SELECT d.id, d.attempts, e.lease_owner, COALESCE(e.started_at, now()), \
                     'lease_expired', d.last_error \
                 FROM done d JOIN expired e ON e.id = d.id) \
             SELECT id FROM done",
        )
        .bind(limit)
        .fetch_all(self.db())
        .await?;
        Ok(rescued.len() as u64)
    }

    /// Cancels a pending job. A running job cannot be cancelled: its call is already paid for.
    pub async fn cancel(&self, id: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE imagegen.jobs SET state = 'cancelled', finished_at = now(), updated_at = now() \
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .execute(self.db())
        .await?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        Err(self
            .wrong_state(id, "only a pending job can be cancelled")
            .await)
    }

    /// Cancels every pending job of a batch. Returns how many were cancelled.
    pub async fn cancel_batch(&self, batch: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE imagegen.jobs SET state = 'cancelled', finished_at = now(), updated_at = now() \
             WHERE batch = $1 AND state = 'pending'",
        )
        .bind(batch)
        .execute(self.db())
        .await?;
        Ok(done.rows_affected())
    }

    /// Puts a failed or cancelled job back to pending with a fresh set of attempts, and wakes
    /// the workers. Its billed tokens and cost stay: they were spent.
    pub async fn retry(&self, id: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE imagegen.jobs SET state = 'pending', attempts = 0, run_at = now(), \
                 finished_at = NULL, retry_pending = false, updated_at = now() \
             WHERE id = $1 AND state IN ('failed', 'cancelled')",
        )
        .bind(id)
        .persistent(self.keep_statements())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            drop(tx);
            return Err(self
                .wrong_state(id, "only a failed or cancelled job can be retried")
                .await);
        }
        notify(&mut tx, self.keep_statements()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Puts every failed job of a batch (or of all batches) back to pending. Returns how many.
    pub async fn retry_failed(&self, batch: Option<&str>) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE imagegen.jobs SET state = 'pending', attempts = 0, run_at = now(), \
                 finished_at = NULL, retry_pending = false, updated_at = now() \
             WHERE state = 'failed' AND ($1::text IS NULL OR batch = $1)",
        )
        .bind(batch)
        .persistent(self.keep_statements())
        .execute(&mut *tx)
        .await?;
        notify(&mut tx, self.keep_statements()).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// One job, whole.
    pub async fn job(&self, id: i64) -> Result<JobRow> {
        sqlx::query_as("SELECT * FROM imagegen.jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db())
            .await?
            .ok_or(QueueError::NotFound(id))
    }

    /// The attempts of one job, oldest first.
    pub async fn attempts(&self, id: i64) -> Result<Vec<AttemptRow>> {
        Ok(sqlx::query_as(
            "SELECT attempt, worker_id, started_at, finished_at, outcome, error, http_status, \
                 prompt_tokens, completion_tokens, image_tokens, cost_usd, generation_id, \
                 duration_ms \
             FROM imagegen.attempts WHERE job_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(self.db())
        .await?)
    }

    /// The stored images of one job, in order.
    pub async fn job_images(&self, id: i64) -> Result<Vec<ImageRow>> {
        Ok(sqlx::query_as(
            "SELECT i.idx, i.key, i.url, i.content_type, i.bytes, i.width, i.height, i.sha256 \
             FROM imagegen.images i JOIN imagegen.jobs j ON j.id = i.job_id \
                 AND j.generation = i.generation \
             WHERE i.job_id = $1 ORDER BY i.idx",
        )
        .bind(id)
        .fetch_all(self.db())
        .await?)
    }

    /// The jobs of one batch, oldest first (for the demo's report and small batches).
    pub async fn batch_jobs(&self, batch: &str) -> Result<Vec<JobRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM imagegen.jobs WHERE batch = $1 ORDER BY id")
                .bind(batch)
                .fetch_all(self.db())
                .await?,
        )
    }

    /// Job counts and spend per state; per batch and state when `by_batch`, limited to one batch
    /// when `batch` is given.
    pub async fn counts(&self, by_batch: bool, batch: Option<&str>) -> Result<Vec<StateCount>> {
        Ok(sqlx::query_as(
            "SELECT CASE WHEN $1 THEN batch END AS batch, state, count(*) AS jobs, \
                 COALESCE(sum(cost_usd), 0) AS cost_usd \
             FROM imagegen.jobs WHERE ($2::text IS NULL OR batch = $2) \
             GROUP BY 1, 2 ORDER BY 1 NULLS FIRST, 2",
        )
        .bind(by_batch)
        .bind(batch)
        .fetch_all(self.db())
        .await?)
    }

    /// What is left to do (in `only`, if given), as `worker --exit-when-idle` judges it. Jobs of
    /// the `stopped` batches (their budget is spent) count apart: they keep no worker running.
    /// A job still leased by a dead worker counts as running: it will be rescued.
    pub async fn work_left(&self, only: Option<&str>, stopped: &[String]) -> Result<WorkLeft> {
        Ok(sqlx::query_as(
            "SELECT \
                 count(*) FILTER (WHERE state = 'pending' AND run_at <= now() AND NOT s) AS due, \
                 count(*) FILTER (WHERE state = 'running') AS running, \
                 count(*) FILTER (WHERE state = 'pending' AND retry_pending AND run_at > now() \
                     AND NOT s) AS retrying, \
                 count(*) FILTER (WHERE state = 'pending' AND NOT retry_pending \
                     AND run_at > now() AND NOT s) AS scheduled, \
                 count(*) FILTER (WHERE state = 'pending' AND s) AS budget_stopped \
             FROM (SELECT state, run_at, retry_pending, \
                       COALESCE(batch = ANY($2::text[]), false) AS s \
                   FROM imagegen.jobs WHERE state IN ('pending', 'running') \
                     AND ($1::text IS NULL OR batch = $1)) AS j",
        )
        .bind(only)
        .bind(stopped)
        .fetch_one(self.db())
        .await?)
    }

    /// When the next pending job becomes due, if any: an idle worker sleeps until then rather
    /// than a whole poll interval.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(
            sqlx::query_scalar("SELECT min(run_at) FROM imagegen.jobs WHERE state = 'pending'")
                .fetch_one(self.db())
                .await?,
        )
    }

    /// Announces a worker process.
    pub async fn register_worker(&self, id: Uuid, hostname: &str, pid: u32) -> Result<()> {
        sqlx::query("INSERT INTO imagegen.workers (id, hostname, pid) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(hostname)
            .bind(i32::try_from(pid).unwrap_or(i32::MAX))
            .execute(self.db())
            .await?;
        Ok(())
    }

    /// Records that a worker is alive, and whether (and why) it has paused claiming.
    pub async fn worker_heartbeat(
        &self,
        id: Uuid,
        paused_until: Option<DateTime<Utc>>,
        pause_reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE imagegen.workers SET heartbeat_at = now(), paused_until = $2, \
                 pause_reason = $3 WHERE id = $1",
        )
        .bind(id)
        .bind(paused_until)
        .bind(pause_reason)
        .execute(self.db())
        .await?;
        Ok(())
    }

    /// Records that a worker stopped cleanly.
    pub async fn worker_stopped(&self, id: Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE imagegen.workers SET stopped_at = now(), paused_until = NULL, \
                 pause_reason = NULL WHERE id = $1",
        )
        .bind(id)
        .execute(self.db())
        .await?;
        Ok(())
    }

    /// Workers that are running (not stopped, heartbeat within `fresh`).
    pub async fn live_workers(&self, fresh: Duration) -> Result<Vec<WorkerRow>> {
        Ok(sqlx::query_as(
            "SELECT id, hostname, pid, started_at, heartbeat_at, paused_until, pause_reason \
             FROM imagegen.workers \
             WHERE stopped_at IS NULL AND heartbeat_at > now() - $1 * interval '1 millisecond' \
             ORDER BY started_at",
        )
        .bind(millis(fresh))
        .fetch_all(self.db())
        .await?)
    }

    /// Keeps the decoded images of a paid generation whose upload failed, so a later attempt
    /// stores them instead of paying the model again.
    pub async fn stash_images(
        &self,
        job_id: i64,
        generation: i32,
        images: &[Vec<u8>],
        generation_id: Option<&str>,
    ) -> Result<()> {
        let idx: Vec<i32> = (0..images.len())
            .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
            .collect();
        sqlx::query(
            "INSERT INTO imagegen.paid_images (job_id, idx, data, generation_id, generation) \
             SELECT $1, i, d, $4, $5 FROM UNNEST($2::int[], $3::bytea[]) AS t(i, d) \
             ON CONFLICT (job_id, idx) DO UPDATE SET data = EXCLUDED.data, \
                 generation_id = EXCLUDED.generation_id, generation = EXCLUDED.generation, \
                 created_at = now()",
        )
        .bind(job_id)
        .bind(&idx)
        .bind(images)
        .bind(generation_id)
        .bind(generation)
        .execute(self.db())
        .await?;
        Ok(())
    }

    /// The images a previous attempt of this generation of this job paid for but did not store,
    /// in order. Another generation's are never returned: they belong to an older prompt.
    pub async fn stashed_images(&self, job_id: i64, generation: i32) -> Result<Vec<Vec<u8>>> {
        Ok(sqlx::query_scalar(
            "SELECT data FROM imagegen.paid_images WHERE job_id = $1 AND generation = $2 \
             ORDER BY idx",
        )
        .bind(job_id)
        .bind(generation)
        .fetch_all(self.db())
        .await?)
    }

    /// Forgets the stashed images of a job once they are stored.
    pub async fn drop_stash(&self, job_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM imagegen.paid_images WHERE job_id = $1")
            .bind(job_id)
            .execute(self.db())
            .await?;
        Ok(())
    }

    /// Lets a call start only if it fits every budget that applies, and if so reserves its
    /// expected cost on the job until the attempt ends. Billed spend plus the reservations of
    /// calls in flight plus this one must stay within the batch's budget (if it has one) and
    /// within `daily_budget` (today, UTC, the whole installation).
    ///
    /// Checks and reservations of one budget are serialised by a transaction-scoped advisory
    /// lock, so concurrent workers cannot both take the last dollar. Locks are always taken
    /// batch first, then daily, so two reservations cannot deadlock.
    pub async fn reserve(
        &self,
        job: &Job,
        expected: Decimal,
        daily_budget: Option<Decimal>,
    ) -> Result<Reservation> {
        let batch_budget = match &job.batch {
            Some(b) => self.batch_budget(b).await?,
            None => None,
        };
        if batch_budget.is_none() && daily_budget.is_none() {
            return Ok(Reservation::Granted);
        }
        let mut tx = self.pool.begin().await?;
        if let (Some(batch), Some(budget)) = (&job.batch, batch_budget) {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('imagegen.budget.batch:' || $1))")
                .bind(batch)
                .persistent(self.keep_statements())
                .execute(&mut *tx)
                .await?;
            let (billed, in_flight): (Decimal, Decimal) = sqlx::query_as(
                "SELECT COALESCE(sum(cost_usd), 0), \
                     COALESCE(sum(reserved_usd) FILTER (WHERE state = 'running'), 0) \
                 FROM imagegen.jobs WHERE batch = $1",
            )
            .bind(batch)
            .persistent(self.keep_statements())
            .fetch_one(&mut *tx)
            .await?;
            if billed + in_flight + expected > budget {
                return Ok(Reservation::BatchOver {
                    budget,
                    billed,
                    in_flight,
                });
            }
        }
        if let Some(budget) = daily_budget {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('imagegen.budget.daily'))")
                .persistent(self.keep_statements())
                .execute(&mut *tx)
                .await?;
            let (billed, in_flight): (Decimal, Decimal) = sqlx::query_as(
                "SELECT (SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.attempts \
                         WHERE finished_at >= date_trunc('day', now() AT TIME ZONE 'UTC') \
                             AT TIME ZONE 'UTC'), \
                     (SELECT COALESCE(sum(reserved_usd), 0) FROM imagegen.jobs \
                         WHERE state = 'running')",
            )
            .persistent(self.keep_statements())
            .fetch_one(&mut *tx)
            .await?;
            if billed + in_flight + expected > budget {
                return Ok(Reservation::DailyOver {
                    budget,
                    billed,
                    in_flight,
                });
            }
        }
        let lease = job.lease();
        let held = sqlx::query(
            "UPDATE imagegen.jobs SET reserved_usd = $4 \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND state = 'running'",
        )
        .bind(job.id)
        .bind(lease.worker)
        .bind(lease.attempt)
        .bind(expected)
        .persistent(self.keep_statements())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if held.rows_affected() == 1 {
            Ok(Reservation::Granted)
        } else {
            Ok(Reservation::LeaseLost)
        }
    }

    /// Sets (or with `None` removes) the budget of a batch.
    pub async fn set_batch_budget(&self, batch: &str, budget_usd: Option<Decimal>) -> Result<()> {
        match budget_usd {
            Some(b) => {
                sqlx::query(
                    "INSERT INTO imagegen.batch_budgets (batch, budget_usd) VALUES ($1, $2) \
                     ON CONFLICT (batch) DO UPDATE SET budget_usd = EXCLUDED.budget_usd, \
                         updated_at = now()",
                )
                .bind(batch)
                .bind(b)
                .execute(self.db())
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM imagegen.batch_budgets WHERE batch = $1")
                    .bind(batch)
                    .execute(self.db())
                    .await?;
            }
        }
        Ok(())
    }

    /// Every batch budget with what its batch has been billed so far.
    pub async fn batch_budgets(&self) -> Result<Vec<BatchBudget>> {
        Ok(sqlx::query_as(
            "SELECT b.batch, b.budget_usd, \
                 COALESCE((SELECT sum(cost_usd) FROM imagegen.jobs j WHERE j.batch = b.batch), 0) \
                     AS spent_usd \
             FROM imagegen.batch_budgets b ORDER BY b.batch",
        )
        .fetch_all(self.db())
        .await?)
    }

    /// The budget of one batch, if it has one.
    pub async fn batch_budget(&self, batch: &str) -> Result<Option<Decimal>> {
        Ok(
            sqlx::query_scalar("SELECT budget_usd FROM imagegen.batch_budgets WHERE batch = $1")
                .bind(batch)
                .fetch_optional(self.db())
                .await?,
        )
    }

    async fn wrong_state(&self, id: i64, what: &'static str) -> QueueError {
        match sqlx::query_scalar::<_, String>("SELECT state FROM imagegen.jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(self.db())
            .await
        {
            Ok(Some(state)) => QueueError::WrongState { id, state, what },
            Ok(None) => QueueError::NotFound(id),
            Err(e) => QueueError::Database(e),
        }
    }
}

/// The image rows of succeeded completions, as columns for `UNNEST`. The statement keeps only
/// those of completions it applied.
#[derive(Default)]
struct ImageColumns<'a> {
    job_ids: Vec<i64>,
    idx: Vec<i32>,
    keys: Vec<&'a str>,
    urls: Vec<&'a str>,
    types: Vec<&'a str>,
    sizes: Vec<i64>,
    widths: Vec<i32>,
    heights: Vec<i32>,
    hashes: Vec<&'a str>,
}

impl<'a> ImageColumns<'a> {
    fn of(completions: &'a [Completion]) -> Self {
        let mut cols = ImageColumns::default();
        for c in completions {
            if let Finish::Succeeded { images, .. } = &c.finish {
                for i in images {
                    cols.job_ids.push(c.job_id);
                    cols.idx.push(i.index);
                    cols.keys.push(&i.key);
                    cols.urls.push(&i.url);
                    cols.types.push(&i.content_type);
                    cols.sizes.push(i.bytes);
                    cols.widths.push(i.width);
                    cols.heights.push(i.height);
                    cols.hashes.push(&i.sha256);
                }
            }
        }
        cols
    }
}

async fn notify(tx: &mut Transaction<'_, Postgres>, keep: bool) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .persistent(keep)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The longest error text kept on a row: enough to say what happened, short enough to list.
pub const MAX_ERROR_CHARS: usize = 1000;

fn truncate_error(e: &str) -> String {
    if e.chars().count() <= MAX_ERROR_CHARS {
        e.to_owned()
    } else {
        let mut s: String = e.chars().take(MAX_ERROR_CHARS).collect();
        s.push('…');
        s
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
