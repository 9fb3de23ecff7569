//! The SQL of batches as things: the `imagegen.batches` row (source, templates, defaults,
//! budget, default callback URL), a file's jobs submitted in one transaction with their file
//! positions (`jobs.batch_seq`), and the read side of `imagegen batch` (failures grouped by error,
//! the report's rows in file order). Budgets are read and set in `mod.rs` (the worker's checks
//! use them); per-state counts and ETAs are the API's `batch_summary`.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::FromRow;

use super::{NewJob, Queue, Result};

/// Rows per INSERT statement of a submission: big enough that round trips do not matter, small
/// enough that one statement's parameters stay a few MB.
pub const SUBMIT_CHUNK: usize = 5_000;

/// Keys looked up per statement when checking which rows of a file exist already.
const LOOKUP_CHUNK: usize = 10_000;

/// A batch's own row.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct BatchRecord {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub source: Option<String>,
    pub template: Option<String>,
    pub key_template: Option<String>,
    pub defaults: serde_json::Value,
    pub columns: Vec<String>,
    pub budget_usd: Option<Decimal>,
    pub callback_url: Option<String>,
}

/// What a submission records about its batch. `budget_usd` and `callback_url` change the batch
/// only when given: a later submission without them keeps what an earlier one (or `imagegen
/// budget`) set.
#[derive(Debug, Clone)]
pub struct BatchUpsert<'a> {
    pub name: &'a str,
    pub source: &'a str,
    pub template: Option<&'a str>,
    pub key_template: Option<&'a str>,
    pub defaults: &'a serde_json::Value,
    /// The file's columns in order; added to the batch's (new ones at the end).
    pub columns: &'a [String],
    pub budget_usd: Option<Decimal>,
    pub callback_url: Option<&'a str>,
}

/// A job that already holds one of a file's idempotency keys: what the file's row is compared
/// with.
#[derive(Debug, Clone, FromRow)]
pub struct ExistingJob {
    pub id: i64,
    pub idempotency_key: String,
    pub batch: Option<String>,
    pub state: String,
    pub prompt: String,
    pub aspect_ratio: String,
    pub model: String,
    pub image_size: Option<String>,
    pub renditions: Vec<String>,
    pub reference_images: Vec<String>,
    pub batch_seq: Option<i64>,
}

/// A changed row to generate again: the job and what the file now asks for.
#[derive(Debug, Clone)]
pub struct Regeneration {
    pub job_id: i64,
    pub prompt: String,
    pub aspect_ratio: String,
    pub model: String,
    pub image_size: Option<String>,
    pub renditions: Vec<String>,
    pub reference_images: Vec<String>,
}

/// What one submission wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileSubmitted {
    /// New jobs inserted (a row whose key another submission inserted meanwhile is not).
    pub inserted: u64,
    /// Changed jobs that will be made with the file's prompt and options: finished ones as
    /// their next generation, pending ones (not made yet) changed in place.
    pub regenerated: u64,
    /// Existing jobs whose file position changed (an edited file moved or added rows).
    pub moved: u64,
}

/// Failed jobs of a batch sharing one error text.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct FailureGroup {
    pub error: Option<String>,
    pub jobs: i64,
    /// The lowest job id with this error, to look at with `imagegen show`.
    pub example_id: i64,
}

/// Spend so far and the jobs still to run of a batch, per model and size: what a budget check
/// adds a new submission's estimate to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutlook {
    pub billed_usd: Decimal,
    /// (model, image_size, pending or running jobs).
    pub unfinished: Vec<(String, Option<String>, i64)>,
}

/// One job of a batch as its report shows it.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct ReportRow {
    pub id: i64,
    pub idempotency_key: Option<String>,
    pub batch_seq: Option<i64>,
    pub metadata: Option<serde_json::Value>,
    pub state: String,
    pub attempts: i32,
    pub image_urls: Vec<String>,
    pub rendition_urls: serde_json::Value,
    pub cost_usd: Decimal,
    pub last_error: Option<String>,
    /// Of the first image of the newest generation that has images (what `image_urls` shows).
    pub width: Option<i32>,
    pub height: Option<i32>,
    /// The storage key and content type of the first image's `thumb` rendition.
    pub thumb_key: Option<String>,
    pub thumb_type: Option<String>,
}

impl Queue {
    /// A batch's own row, if it has one (batches made by plain INSERTs into jobs have none).
    pub async fn batch_record(&self, name: &str) -> Result<Option<BatchRecord>> {
        Ok(sqlx::query_as(
            "SELECT name, created_at, updated_at, source, template, key_template, defaults, \
                 columns, budget_usd, callback_url \
             FROM imagegen.batches WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(self.db())
        .await?)
    }

    /// The jobs that hold any of `keys`, in no particular order.
    pub async fn jobs_by_keys(&self, keys: &[String]) -> Result<Vec<ExistingJob>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            let mut rows: Vec<ExistingJob> = sqlx::query_as(
                "SELECT j.id, j.idempotency_key, j.batch, j.state, j.prompt, j.aspect_ratio, \
                     j.model, j.image_size, j.renditions, j.reference_images, j.batch_seq \
                 FROM imagegen.jobs j JOIN UNNEST($1::text[]) AS k(key) \
                     ON j.idempotency_key = k.key",
            )
            .bind(chunk)
            .fetch_all(self.db())
            .await?;
            found.append(&mut rows);
        }
        Ok(found)
    }

    /// What a batch was billed and what it still has to run, for a budget check.
    pub async fn batch_outlook(&self, batch: &str) -> Result<BatchOutlook> {
        let billed_usd: Decimal = sqlx::query_scalar(
            "SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.jobs WHERE batch = $1",
        )
        .bind(batch)
        .fetch_one(self.db())
        .await?;
        let unfinished = sqlx::query_as(
            "SELECT model, image_size, count(*) FROM imagegen.jobs \
             WHERE batch = $1 AND state IN ('pending', 'running') GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(batch)
        .fetch_all(self.db())
        .await?;
        Ok(BatchOutlook {
            billed_usd,
            unfinished,
        })
    }

    /// Writes one file's submission in one transaction, all of it or nothing: the batch's row,
    /// the new jobs with their file positions (`seqs[i]` for `jobs[i]`), the new positions of
    /// existing jobs (`moves`: job id, position), and the regenerations of changed rows. Workers
    /// are woken once, by the insert trigger, when the transaction commits. `progress` is called
    /// with the number of new jobs written so far.
    pub async fn submit_file(
        &self,
        batch: &BatchUpsert<'_>,
        jobs: &[NewJob],
        seqs: &[i64],
        moves: &[(i64, i64)],
        regenerate: &[Regeneration],
        progress: &mut dyn FnMut(u64),
    ) -> Result<FileSubmitted> {
        let keep = self.keep_statements();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO imagegen.batches (name, source, template, key_template, defaults, \
                 columns, budget_usd, budget_updated_at, callback_url) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $7 IS NOT NULL THEN now() END, $8) \
             ON CONFLICT (name) DO UPDATE SET source = EXCLUDED.source, \
                 template = EXCLUDED.template, key_template = EXCLUDED.key_template, \
                 defaults = EXCLUDED.defaults, \
                 columns = imagegen.batches.columns || ARRAY(SELECT c FROM unnest(EXCLUDED.columns) \
                     WITH ORDINALITY AS t(c, n) \
                     WHERE NOT c = ANY(imagegen.batches.columns) ORDER BY n), \
                 budget_usd = COALESCE(EXCLUDED.budget_usd, imagegen.batches.budget_usd), \
                 budget_updated_at = CASE WHEN EXCLUDED.budget_usd IS NOT NULL THEN now() \
                     ELSE imagegen.batches.budget_updated_at END, \
                 callback_url = COALESCE(EXCLUDED.callback_url, imagegen.batches.callback_url), \
                 updated_at = now()",
        )
        .bind(batch.name)
        .bind(batch.source)
        .bind(batch.template)
        .bind(batch.key_template)
        .bind(batch.defaults)
        .bind(batch.columns)
        .bind(batch.budget_usd)
        .bind(batch.callback_url)
        .persistent(keep)
        .execute(&mut *tx)
        .await?;
        // The batch's default callback URL, filled in here so the per-row trigger (for plain
        // INSERTs) has nothing to do.
        let callback: Option<String> =
            sqlx::query_scalar("SELECT callback_url FROM imagegen.batches WHERE name = $1")
                .bind(batch.name)
                .persistent(keep)
                .fetch_one(&mut *tx)
                .await?;

        let mut done = FileSubmitted::default();
        for (chunk, seq_chunk) in jobs.chunks(SUBMIT_CHUNK).zip(seqs.chunks(SUBMIT_CHUNK)) {
            let cols = Columns::of(chunk, callback.as_deref());
            let inserted = sqlx::query(
                "INSERT INTO imagegen.jobs (prompt, aspect_ratio, model, image_size, batch, \
                     priority, run_at, idempotency_key, max_attempts, metadata, callback_url, \
                     renditions, batch_seq, reference_images) \
                 SELECT p, COALESCE(r, '16:9'), COALESCE(m, 'google/gemini-2.5-flash-image'), s, \
                     b, COALESCE(pr, 0), COALESCE(ra, now()), k, COALESCE(ma, 3), md, cb, \
                     COALESCE(string_to_array(NULLIF(rs, ''), ','), '{}'), sq, \
                     COALESCE(string_to_array(NULLIF(rf, ''), ' '), '{}') \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::int[], $7::timestamptz[], $8::text[], $9::int[], $10::jsonb[], \
                     $11::text[], $12::text[], $13::bigint[], $14::text[]) \
                     AS t(p, r, m, s, b, pr, ra, k, ma, md, cb, rs, sq, rf) \
                 ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(&cols.prompts)
            .bind(&cols.ratios)
            .bind(&cols.models)
            .bind(&cols.sizes)
            .bind(&cols.batches)
            .bind(&cols.priorities)
            .bind(&cols.run_at)
            .bind(&cols.keys)
            .bind(&cols.max_attempts)
            .bind(&cols.metadata)
            .bind(&cols.callbacks)
            .bind(&cols.renditions)
            .bind(seq_chunk)
            .bind(&cols.references)
            .persistent(keep)
            .execute(&mut *tx)
            .await?;
            done.inserted += inserted.rows_affected();
            progress(done.inserted);
        }

        if !moves.is_empty() {
            let (ids, positions): (Vec<i64>, Vec<i64>) = moves.iter().copied().unzip();
            done.moved = sqlx::query(
                "UPDATE imagegen.jobs j SET batch_seq = m.seq \
                 FROM UNNEST($1::bigint[], $2::bigint[]) AS m(id, seq) \
                 WHERE j.id = m.id AND j.batch_seq IS DISTINCT FROM m.seq",
            )
            .bind(&ids)
            .bind(&positions)
            .persistent(keep)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }

        // Changed rows: a finished job is regenerated (its next generation, the earlier ones
        // kept as history; the same SET list as `Queue::regenerate`), with the file's options;
        // a pending one has made nothing yet and is changed in place. A running job is left as
        // it is: its call is paid for.
        let regenerate_sql = format!(
            "UPDATE imagegen.jobs SET {}, aspect_ratio = $3, model = $4, image_size = $5, \
                 renditions = $6, reference_images = $7 \
             WHERE id = $1 AND {}",
            super::generations::REGENERATE_SET,
            super::generations::FINISHED
        );
        for r in regenerate {
            // Both statements take the row's new values as $1..$7.
            let with_values = |sql| {
                sqlx::query(sql)
                    .bind(r.job_id)
                    .bind(&r.prompt)
                    .bind(&r.aspect_ratio)
                    .bind(&r.model)
                    .bind(&r.image_size)
                    .bind(&r.renditions)
                    .bind(&r.reference_images)
                    .persistent(keep)
            };
            let changed = with_values(&regenerate_sql)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let changed = if changed == 1 {
                1
            } else {
                with_values(
                    "UPDATE imagegen.jobs SET prompt = $2, aspect_ratio = $3, model = $4, \
                         image_size = $5, renditions = $6, reference_images = $7, \
                         updated_at = now() \
                     WHERE id = $1 AND state = 'pending'",
                )
                .execute(&mut *tx)
                .await?
                .rows_affected()
            };
            done.regenerated += changed;
        }
        if done.regenerated > 0 {
            super::notify(&mut tx, keep).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Failed jobs of a batch grouped by their error, most frequent first.
    pub async fn batch_failures(&self, batch: &str, limit: i64) -> Result<Vec<FailureGroup>> {
        Ok(sqlx::query_as(
            "SELECT last_error AS error, count(*) AS jobs, min(id) AS example_id \
             FROM imagegen.jobs WHERE batch = $1 AND state = 'failed' \
             GROUP BY last_error ORDER BY 2 DESC, 3 LIMIT $2",
        )
        .bind(batch)
        .bind(limit)
        .fetch_all(self.db())
        .await?)
    }

    /// Every job of a batch in file order (`batch_seq`, then id for jobs without one), with its
    /// first image's size and thumbnail.
    pub async fn batch_report_rows(&self, batch: &str) -> Result<Vec<ReportRow>> {
        Ok(sqlx::query_as(
            "SELECT j.id, j.idempotency_key, j.batch_seq, j.metadata, j.state, j.attempts, \
                 j.image_urls, j.rendition_urls, j.cost_usd, j.last_error, i.width, i.height, \
                 t.key AS thumb_key, t.content_type AS thumb_type \
             FROM imagegen.jobs j \
             LEFT JOIN imagegen.images i ON i.job_id = j.id AND i.idx = 0 \
                 AND i.generation = j.generation \
             LEFT JOIN imagegen.renditions t ON t.job_id = j.id AND t.idx = 0 AND t.spec = 'thumb' \
                 AND t.generation = j.generation \
             WHERE j.batch = $1 \
             ORDER BY j.batch_seq NULLS LAST, j.id",
        )
        .bind(batch)
        .fetch_all(self.db())
        .await?)
    }
}

/// The new jobs of one statement, as columns for `UNNEST`.
struct Columns<'a> {
    prompts: Vec<&'a str>,
    ratios: Vec<Option<&'a str>>,
    models: Vec<Option<&'a str>>,
    sizes: Vec<Option<&'a str>>,
    batches: Vec<Option<&'a str>>,
    priorities: Vec<Option<i32>>,
    run_at: Vec<Option<DateTime<Utc>>>,
    keys: Vec<Option<&'a str>>,
    max_attempts: Vec<Option<i32>>,
    metadata: Vec<Option<&'a serde_json::Value>>,
    callbacks: Vec<Option<&'a str>>,
    // Comma-joined: Postgres arrays of arrays must be rectangular, and no spec holds a comma.
    renditions: Vec<String>,
    // Space-joined: no reference URL or key holds a space.
    references: Vec<String>,
}

impl<'a> Columns<'a> {
    fn of(jobs: &'a [NewJob], batch_callback: Option<&'a str>) -> Self {
        let n = jobs.len();
        let mut c = Columns {
            prompts: Vec::with_capacity(n),
            ratios: Vec::with_capacity(n),
            models: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            batches: Vec::with_capacity(n),
            priorities: Vec::with_capacity(n),
            run_at: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            max_attempts: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
            callbacks: Vec::with_capacity(n),
            renditions: Vec::with_capacity(n),
            references: Vec::with_capacity(n),
        };
        for j in jobs {
            c.prompts.push(&j.prompt);
            c.ratios.push(j.aspect_ratio.as_deref());
            c.models.push(j.model.as_deref());
            c.sizes.push(j.image_size.as_deref());
            c.batches.push(j.batch.as_deref());
            c.priorities.push(j.priority);
            c.run_at.push(j.run_at);
            c.keys.push(j.idempotency_key.as_deref());
            c.max_attempts.push(j.max_attempts);
            c.metadata.push(j.metadata.as_ref());
            c.callbacks
                .push(j.callback_url.as_deref().or(batch_callback));
            c.renditions.push(j.renditions.join(","));
            c.references.push(j.reference_images.join(" "));
        }
        c
    }
}
