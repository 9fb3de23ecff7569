//! The SQL of the dashboard's pages: the overview's figures (one grouped scan of the jobs table
//! for counts and spend per batch, the last 24 hours of attempts by hour), a batch's gallery in
//! file order with keyset paging, the media rows the image route streams, and bulk retry and
//! cancel of chosen jobs. Rendering lives in `http::pages`; nothing here knows about HTML.
//!
//! At a million rows the grouped scan is the only statement that reads the whole table; the
//! pages cache its answer for a few seconds (see `http::pages`) rather than add an index that
//! every claim would have to write.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{FromRow, Postgres, QueryBuilder};

use super::api::{STATES, StateCounts};
use super::{Queue, Result, notify};

/// The most jobs one bulk action changes (a filter matching more is refused, not truncated).
pub const MAX_BULK: usize = 100_000;

/// Jobs and spend of one batch, from the overview's grouped scan.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchTotals {
    pub batch: String,
    pub counts: StateCounts,
    pub cost_usd: Decimal,
    pub budget_usd: Option<Decimal>,
}

/// The overview's whole-table figures (the expensive part, cached by the pages).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableTotals {
    pub counts: StateCounts,
    pub cost_usd: Decimal,
    /// Every batch, by spend (highest first), then name.
    pub batches: Vec<BatchTotals>,
}

/// One hour of the last day's attempts.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct HourBucket {
    pub hour: DateTime<Utc>,
    /// Attempts that succeeded (each made a job's images).
    pub succeeded: i64,
    /// Attempts that failed the job for good.
    pub failed: i64,
    /// Attempts that will be retried.
    pub retried: i64,
    pub cost_usd: Decimal,
}

/// Spend of today (UTC) and the daily budget.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Today {
    pub spend_usd: Decimal,
    pub daily_budget_usd: Option<Decimal>,
    /// Reserved by calls in flight now.
    pub in_flight_usd: Decimal,
}

/// One tile of a batch's gallery: the job and its first image's thumbnail and placeholder.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Tile {
    pub id: i64,
    pub state: String,
    pub prompt: String,
    pub idempotency_key: Option<String>,
    pub last_error: Option<String>,
    pub batch_seq: Option<i64>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub updated_at: DateTime<Utc>,
    /// The first original's size and ThumbHash.
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub placeholder: Option<String>,
    /// The first original's `thumb` rendition, if made.
    pub thumb_width: Option<i32>,
    pub thumb_height: Option<i32>,
    pub thumb_key: Option<String>,
    pub thumb_sha256: Option<String>,
}

/// Where a gallery page continues: after this job in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileCursor {
    pub batch_seq: Option<i64>,
    pub id: i64,
}

/// One page of a batch's gallery.
#[derive(Debug, Clone)]
pub struct TilePage {
    pub tiles: Vec<Tile>,
    pub next: Option<TileCursor>,
}

/// Which of a batch's jobs the gallery shows.
#[derive(Debug, Clone, Default)]
pub struct TileFilter {
    /// Any of these states (unknown states match nothing).
    pub states: Vec<String>,
    /// A case-insensitive substring of the prompt or the key.
    pub q: Option<String>,
}

/// A stored object the media route may stream: looked up by job, image and spec, never by a
/// path from the request.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct MediaObject {
    pub key: String,
    pub url: String,
    pub content_type: String,
    pub bytes: i64,
    pub sha256: String,
}

const TILE_COLUMNS: &str = "j.id, j.state, j.prompt, j.idempotency_key, j.last_error, \
    j.batch_seq, j.attempts, j.max_attempts, j.updated_at, \
    i.width, i.height, i.placeholder, r.width AS thumb_width, r.height AS thumb_height, \
    r.key AS thumb_key, r.sha256 AS thumb_sha256";

/// The current generation's first image and its thumbnail (earlier generations are history).
const TILE_JOINS: &str = "LEFT JOIN imagegen.images i ON i.job_id = j.id \
        AND i.generation = j.generation AND i.idx = 0 \
    LEFT JOIN imagegen.renditions r ON r.job_id = j.id AND r.generation = j.generation \
        AND r.idx = 0 AND r.spec = 'thumb'";

impl Queue {
    /// Jobs per state and spend, over the whole table and per batch, in one grouped scan.
    pub async fn table_totals(&self) -> Result<TableTotals> {
        #[derive(FromRow)]
        struct Group {
            batch: Option<String>,
            state: String,
            jobs: i64,
            cost_usd: Decimal,
        }
        let groups: Vec<Group> = sqlx::query_as(
            "SELECT batch, state, count(*) AS jobs, COALESCE(sum(cost_usd), 0) AS cost_usd \
             FROM imagegen.jobs GROUP BY batch, state",
        )
        .fetch_all(self.db())
        .await?;
        let budgets: Vec<(String, Decimal)> =
            sqlx::query_as("SELECT batch, budget_usd FROM imagegen.batch_budgets")
                .fetch_all(self.db())
                .await?;
        let mut totals = TableTotals::default();
        let mut by_batch: std::collections::BTreeMap<String, BatchTotals> = Default::default();
        for g in groups {
            totals.counts.add(&g.state, g.jobs);
            totals.cost_usd += g.cost_usd;
            if let Some(b) = g.batch {
                let entry = by_batch.entry(b.clone()).or_insert_with(|| BatchTotals {
                    batch: b,
                    counts: StateCounts::default(),
                    cost_usd: Decimal::ZERO,
                    budget_usd: None,
                });
                entry.counts.add(&g.state, g.jobs);
                entry.cost_usd += g.cost_usd;
            }
        }
        for (batch, budget) in budgets {
            if let Some(t) = by_batch.get_mut(&batch) {
                t.budget_usd = Some(budget);
            }
        }
        let mut batches: Vec<BatchTotals> = by_batch.into_values().collect();
        batches.sort_by(|a, b| b.cost_usd.cmp(&a.cost_usd).then(a.batch.cmp(&b.batch)));
        totals.batches = batches;
        Ok(totals)
    }

    /// The last 24 hours of attempts, one bucket per hour that had any, oldest first.
    pub async fn last_day_by_hour(&self) -> Result<Vec<HourBucket>> {
        Ok(sqlx::query_as(
            "SELECT date_trunc('hour', finished_at) AS hour, \
                 count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded, \
                 count(*) FILTER (WHERE outcome = 'failed') AS failed, \
                 count(*) FILTER (WHERE outcome = 'retry') AS retried, \
                 COALESCE(sum(cost_usd), 0) AS cost_usd \
             FROM imagegen.attempts \
             WHERE finished_at > date_trunc('hour', now()) - interval '23 hours' \
             GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(self.db())
        .await?)
    }

    /// Today's (UTC) spend, the daily budget and what calls in flight have reserved.
    pub async fn today(&self) -> Result<Today> {
        let (spend_usd, daily_budget_usd, in_flight_usd): (Decimal, Option<Decimal>, Decimal) =
            sqlx::query_as(
                "SELECT \
                     (SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.attempts \
                         WHERE finished_at >= (date_trunc('day', now() AT TIME ZONE 'UTC') \
                             AT TIME ZONE 'UTC')), \
                     (SELECT daily_budget_usd FROM imagegen.settings), \
                     (SELECT COALESCE(sum(reserved_usd), 0) FROM imagegen.jobs \
                         WHERE state = 'running')",
            )
            .fetch_one(self.db())
            .await?;
        Ok(Today {
            spend_usd,
            daily_budget_usd,
            in_flight_usd,
        })
    }

    /// A page of a batch's gallery in file order (`batch_seq`, then id for rows without one),
    /// continuing after `after`.
    pub async fn batch_tiles(
        &self,
        batch: &str,
        filter: &TileFilter,
        after: Option<TileCursor>,
        limit: i64,
    ) -> Result<TilePage> {
        let limit = limit.clamp(1, 500);
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
            "WITH page AS (SELECT j.id, j.batch_seq FROM imagegen.jobs j WHERE j.batch = ",
        );
        qb.push_bind(batch.to_owned());
        let states: Vec<&str> = filter
            .states
            .iter()
            .filter_map(|s| STATES.iter().find(|k| *k == s).copied())
            .collect();
        if !filter.states.is_empty() {
            if states.is_empty() {
                return Ok(TilePage {
                    tiles: Vec::new(),
                    next: None,
                });
            }
            let list: Vec<String> = states.iter().map(|s| format!("'{s}'")).collect();
            qb.push(format!(" AND j.state IN ({})", list.join(", ")));
        }
        if let Some(q) = filter.q.as_deref().filter(|q| !q.is_empty()) {
            let pattern = format!("%{}%", super::api::escape_like(q));
            qb.push(" AND (j.prompt ILIKE ")
                .push_bind(pattern.clone())
                .push(" OR j.idempotency_key ILIKE ")
                .push_bind(pattern)
                .push(")");
        }
        match after {
            Some(TileCursor {
                batch_seq: Some(seq),
                id,
            }) => {
                qb.push(" AND (j.batch_seq > ")
                    .push_bind(seq)
                    .push(" OR (j.batch_seq = ")
                    .push_bind(seq)
                    .push(" AND j.id > ")
                    .push_bind(id)
                    .push(") OR j.batch_seq IS NULL)");
            }
            Some(TileCursor {
                batch_seq: None,
                id,
            }) => {
                qb.push(" AND j.batch_seq IS NULL AND j.id > ")
                    .push_bind(id);
            }
            None => {}
        }
        qb.push(" ORDER BY j.batch_seq NULLS LAST, j.id LIMIT ")
            .push_bind(limit + 1)
            .push(format!(
                ") SELECT {TILE_COLUMNS} FROM page JOIN imagegen.jobs j ON j.id = page.id \
                 {TILE_JOINS} ORDER BY page.batch_seq NULLS LAST, page.id"
            ));
        let mut tiles: Vec<Tile> = qb.build_query_as().fetch_all(self.db()).await?;
        let more = tiles.len() as i64 > limit;
        tiles.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next = if more {
            tiles.last().map(|t| TileCursor {
                batch_seq: t.batch_seq,
                id: t.id,
            })
        } else {
            None
        };
        Ok(TilePage { tiles, next })
    }

    /// Tiles of those of `ids` in `batch` (live updates of a gallery), in no particular order.
    pub async fn tiles(&self, batch: &str, ids: &[i64]) -> Result<Vec<Tile>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {TILE_COLUMNS} FROM imagegen.jobs j {TILE_JOINS} \
             WHERE j.id = ANY($1) AND j.batch = $2"
        ))
        .bind(ids)
        .bind(batch)
        .fetch_all(self.db())
        .await?)
    }

    /// The stored original (`spec` = `original`) or rendition of image `index` of a job.
    pub async fn media_object(
        &self,
        job_id: i64,
        index: i32,
        spec: &str,
    ) -> Result<Option<MediaObject>> {
        let sql = if spec == "original" {
            "SELECT i.key, i.url, i.content_type, i.bytes, i.sha256 FROM imagegen.images i \
             JOIN imagegen.jobs j ON j.id = i.job_id AND j.generation = i.generation \
             WHERE i.job_id = $1 AND i.idx = $2"
        } else {
            "SELECT r.key, r.url, r.content_type, r.bytes, r.sha256 FROM imagegen.renditions r \
             JOIN imagegen.jobs j ON j.id = r.job_id AND j.generation = r.generation \
             WHERE r.job_id = $1 AND r.idx = $2 AND r.spec = $3"
        };
        Ok(sqlx::query_as(sql)
            .bind(job_id)
            .bind(index)
            .bind(spec)
            .fetch_optional(self.db())
            .await?)
    }

    /// Puts those of `ids` that are failed or cancelled back to pending (as [`Queue::retry`]
    /// does one), and wakes the workers. Returns how many.
    pub async fn retry_jobs(&self, ids: &[i64]) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE imagegen.jobs SET state = 'pending', attempts = 0, run_at = now(), \
                 finished_at = NULL, updated_at = now() \
             WHERE id = ANY($1) AND state IN ('failed', 'cancelled')",
        )
        .bind(ids)
        .persistent(self.keep_statements())
        .execute(&mut *tx)
        .await?;
        notify(&mut tx, self.keep_statements()).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Cancels those of `ids` that are pending. Returns how many.
    pub async fn cancel_jobs(&self, ids: &[i64]) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE imagegen.jobs SET state = 'cancelled', finished_at = now(), updated_at = now() \
             WHERE id = ANY($1) AND state = 'pending'",
        )
        .bind(ids)
        .execute(self.db())
        .await?;
        Ok(done.rows_affected())
    }
}
