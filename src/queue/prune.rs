//! Deleting old jobs (`imagegen prune`, `imagegen batch delete`) in chunks: each chunk is its
//! own short transaction, so a table of a million finished rows is cleaned without one giant
//! transaction, and a stop halfway leaves whole jobs either deleted or untouched.
//!
//! A chunk's rows stay locked while the caller deletes their objects from storage, then the
//! rows go (attempts, images, renditions and stashed images with them, by cascade). Objects first:
//! a crash in between leaves rows whose objects are gone, which the next prune deletes; the
//! other order would leave objects no row names.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::{Queue, Result};

/// Which jobs a prune deletes. Running jobs never: their attempt is in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneFilter {
    /// Finished (succeeded, failed, cancelled) before this time.
    pub finished_before: Option<DateTime<Utc>>,
    /// Only this batch.
    pub batch: Option<String>,
    /// Pending jobs too (deleting a whole batch); otherwise finished ones only.
    pub include_pending: bool,
}

impl PruneFilter {
    fn states(&self) -> Vec<&'static str> {
        let mut states = vec!["succeeded", "failed", "cancelled"];
        if self.include_pending {
            states.push("pending");
        }
        states
    }
}

/// What a prune would delete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct PruneCount {
    pub jobs: i64,
    /// Image rows of every generation (each one object).
    pub images: i64,
    /// Rendition rows of every generation (each one object).
    pub renditions: i64,
    /// Running jobs the filter would otherwise take: left alone.
    pub running: i64,
}

/// One chunk of jobs to delete, locked until [`PruneChunk::delete`] or drop (which deletes
/// nothing).
pub struct PruneChunk {
    tx: Transaction<'static, Postgres>,
    pub ids: Vec<i64>,
    /// Every object key of these jobs: originals, renditions, all generations.
    pub keys: Vec<String>,
}

/// The filter's condition on `imagegen.jobs`, with `$1` the cut-off, `$2` the batch and `$3`
/// the states.
const PRUNE_WHERE: &str = "state = ANY($3::text[]) \
     AND ($1::timestamptz IS NULL OR (finished_at IS NOT NULL AND finished_at < $1)) \
     AND ($2::text IS NULL OR batch = $2)";

impl Queue {
    /// How many jobs (and objects) `filter` selects: the count shown before anything goes.
    pub async fn prune_count(&self, filter: &PruneFilter) -> Result<PruneCount> {
        Ok(sqlx::query_as(&format!(
            "WITH j AS (SELECT id FROM imagegen.jobs WHERE {PRUNE_WHERE}) \
             SELECT (SELECT count(*) FROM j) AS jobs, \
                 (SELECT count(*) FROM imagegen.images i JOIN j ON j.id = i.job_id) AS images, \
                 (SELECT count(*) FROM imagegen.renditions r JOIN j ON j.id = r.job_id) \
                     AS renditions, \
                 (SELECT count(*) FROM imagegen.jobs WHERE state = 'running' \
                     AND ($2::text IS NULL OR batch = $2) \
                     AND $1::timestamptz IS NULL) AS running"
        ))
        .bind(filter.finished_before)
        .bind(filter.batch.as_deref())
        .bind(filter.states())
        .fetch_one(self.db())
        .await?)
    }

    /// Locks the next `limit` jobs of `filter` (skipping rows other sessions hold) and reads
    /// their object keys. `None` when nothing is left.
    pub async fn prune_chunk(
        &self,
        filter: &PruneFilter,
        limit: i64,
    ) -> Result<Option<PruneChunk>> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM imagegen.jobs WHERE {PRUNE_WHERE} \
             ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED"
        ))
        .bind(filter.finished_before)
        .bind(filter.batch.as_deref())
        .bind(filter.states())
        .bind(limit.max(1))
        .persistent(self.keep_statements())
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            return Ok(None);
        }
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT key FROM imagegen.images WHERE job_id = ANY($1) \
             UNION SELECT key FROM imagegen.renditions WHERE job_id = ANY($1)",
        )
        .bind(&ids)
        .persistent(self.keep_statements())
        .fetch_all(&mut *tx)
        .await?;
        Ok(Some(PruneChunk { tx, ids, keys }))
    }
}

impl PruneChunk {
    /// Deletes the chunk's jobs (and, by cascade, their attempts, images, renditions and stash)
    /// and commits. Returns how many jobs went.
    async fn delete(mut self, keep_statements: bool) -> Result<u64> {
        let done = sqlx::query("DELETE FROM imagegen.jobs WHERE id = ANY($1)")
            .bind(&self.ids)
            .persistent(keep_statements)
            .execute(&mut *self.tx)
            .await?;
        self.tx.commit().await?;
        Ok(done.rows_affected())
    }
}

impl Queue {
    /// Deletes a chunk got from [`Queue::prune_chunk`].
    pub async fn prune_delete(&self, chunk: PruneChunk) -> Result<u64> {
        chunk.delete(self.keep_statements()).await
    }
}
