//! Regeneration: a finished job made again as its next generation. The job keeps its id, its
//! idempotency key and everything it was billed; its new images get new keys (see
//! `storage::key`), and the images, renditions and attempts of earlier generations stay as
//! history, each row carrying its generation.

use super::{Queue, QueueError, Result, notify};

/// One job put back for a new generation.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Regenerated {
    pub id: i64,
    /// The generation the next attempt makes.
    pub generation: i32,
    pub idempotency_key: Option<String>,
}

/// The SET list shared by both regenerate statements: a fresh set of attempts, the new prompt if
/// given (its constraints apply), and no renditions recorded yet for the new originals (the job's
/// `image_urls` keep pointing at the previous generation until the new one succeeds).
const REGENERATE_SET: &str = "generation = generation + 1, prompt = COALESCE($2, prompt), \
     state = 'pending', attempts = 0, run_at = now(), finished_at = NULL, last_error = NULL, \
     retry_pending = false, rendition_urls = '{}', rendition_errors = NULL, updated_at = now()";

/// States a job may be regenerated from: finished ones. A pending or running job is still
/// making its current generation.
const FINISHED: &str = "state IN ('succeeded', 'failed', 'cancelled')";

impl Queue {
    /// Puts a finished job back to pending as its next generation, with `new_prompt` if given,
    /// and wakes the workers. Returns the new generation.
    pub async fn regenerate(&self, job_id: i64, new_prompt: Option<&str>) -> Result<i32> {
        let mut tx = self.pool.begin().await?;
        let generation: Option<i32> = sqlx::query_scalar(&format!(
            "UPDATE imagegen.jobs SET {REGENERATE_SET} WHERE id = $1 AND {FINISHED} \
             RETURNING generation"
        ))
        .bind(job_id)
        .bind(new_prompt)
        .persistent(self.keep_statements())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(generation) = generation else {
            drop(tx);
            return Err(self
                .wrong_state(job_id, "only a finished job can be regenerated")
                .await);
        };
        notify(&mut tx, self.keep_statements()).await?;
        tx.commit().await?;
        Ok(generation)
    }

    /// [`Queue::regenerate`] for the finished jobs of `batch` whose idempotency keys are
    /// `idempotency_keys`, in one transaction. Keys that name no finished job of the batch are
    /// not in the answer.
    pub async fn regenerate_many(
        &self,
        batch: &str,
        idempotency_keys: &[String],
        new_prompt: Option<&str>,
    ) -> Result<Vec<Regenerated>> {
        let mut tx = self.pool.begin().await?;
        let done: Vec<Regenerated> = sqlx::query_as(&format!(
            "UPDATE imagegen.jobs SET {REGENERATE_SET} \
             WHERE batch = $1 AND idempotency_key = ANY($3::text[]) AND {FINISHED} \
             RETURNING id, generation, idempotency_key"
        ))
        .bind(batch)
        .bind(new_prompt)
        .bind(idempotency_keys)
        .persistent(self.keep_statements())
        .fetch_all(&mut *tx)
        .await?;
        if !done.is_empty() {
            notify(&mut tx, self.keep_statements()).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// The images of every generation of a job, oldest generation first: its history.
    pub async fn image_history(&self, job_id: i64) -> Result<Vec<(i32, super::ImageRow)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            generation: i32,
            #[sqlx(flatten)]
            image: super::ImageRow,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT generation, idx, key, url, content_type, bytes, width, height, sha256 \
             FROM imagegen.images WHERE job_id = $1 ORDER BY generation, idx",
        )
        .bind(job_id)
        .fetch_all(self.db())
        .await
        .map_err(QueueError::from)?;
        Ok(rows.into_iter().map(|r| (r.generation, r.image)).collect())
    }
}
