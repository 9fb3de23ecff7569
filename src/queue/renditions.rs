//! The SQL of renditions: recording what was made (rows in `imagegen.renditions`, placeholders on
//! `imagegen.images`, `rendition_urls` and `rendition_errors` on the job), and finding the
//! succeeded jobs `imagegen renditions add` still has to do.

use serde::Serialize;
use sqlx::FromRow;

use super::{ImageRow, Lease, Queue, Result};

/// One stored rendition, for `imagegen.renditions`.
#[derive(Debug, Clone, PartialEq, FromRow, Serialize)]
pub struct RenditionRow {
    /// The original's index (`imagegen.images.idx`).
    #[sqlx(rename = "idx")]
    pub index: i32,
    /// The spec as written (the key of `rendition_urls`).
    pub spec: String,
    pub key: String,
    pub url: String,
    pub content_type: String,
    pub bytes: i64,
    pub width: i32,
    pub height: i32,
    pub sha256: String,
}

/// Everything one round of rendition work reports for one job.
#[derive(Debug, Clone, Default)]
pub struct RenditionRecord {
    /// The originals with their placeholders (`None`: the original could not be decoded).
    pub placeholders: Vec<(ImageRow, Option<String>)>,
    pub rows: Vec<RenditionRow>,
    /// Spec -> one URL per original, in order; merged into `rendition_urls`.
    pub urls: serde_json::Map<String, serde_json::Value>,
    /// Spec -> why it failed; merged into `rendition_errors` (a spec made now drops its old error).
    pub errors: serde_json::Map<String, serde_json::Value>,
    /// Specs to add to the job's `renditions` (what `renditions add` was asked for).
    pub add_specs: Vec<String>,
}

/// Which write may record: the worker that holds the running job, or (for `renditions add`)
/// anyone, on a succeeded job.
#[derive(Debug, Clone, Copy)]
pub enum Fence {
    Running(Lease),
    Succeeded,
}

/// Which succeeded jobs `renditions add` works on.
#[derive(Debug, Clone)]
pub enum Selection {
    Job(i64),
    Batch(String),
    All,
}

/// A succeeded job that lacks some of the asked renditions.
#[derive(Debug, Clone, FromRow)]
pub struct RenditionTarget {
    pub id: i64,
    pub batch: Option<String>,
    pub model: String,
    pub image_urls: Vec<String>,
    pub renditions: Vec<String>,
    pub rendition_urls: serde_json::Value,
    /// Which generation's originals the renditions are made of.
    pub generation: i32,
}

impl Queue {
    /// Records renditions of one job in one statement, if `fence` still holds; returns whether it
    /// did. Placeholders go on the image rows, which are inserted if the completion has not
    /// written them yet (the completion then updates everything but the placeholder).
    pub async fn record_renditions(
        &self,
        job_id: i64,
        fence: Fence,
        record: &RenditionRecord,
    ) -> Result<bool> {
        let (worker, attempt) = match fence {
            Fence::Running(lease) => (Some(lease.worker), Some(lease.attempt)),
            Fence::Succeeded => (None, None),
        };
        let done: Vec<&str> = record.urls.keys().map(String::as_str).collect();
        let p = &record.placeholders;
        let r = &record.rows;
        let applied: Option<i64> = sqlx::query_scalar(
            "WITH job AS ( \
                 UPDATE imagegen.jobs j SET \
                     renditions = j.renditions || ARRAY(SELECT s FROM unnest($4::text[]) AS s \
                         WHERE NOT s = ANY(j.renditions)), \
                     rendition_urls = j.rendition_urls || $5::jsonb, \
                     rendition_errors = NULLIF((COALESCE(j.rendition_errors, '{}') - $6::text[]) \
                         || $7::jsonb, '{}'::jsonb), \
                     updated_at = now() \
                 WHERE j.id = $1 AND CASE WHEN $2::uuid IS NULL THEN j.state = 'succeeded' \
                     ELSE j.state = 'running' AND j.lease_owner = $2 AND j.attempts = $3 END \
                 RETURNING j.id, j.generation), \
             placed AS ( \
                 INSERT INTO imagegen.images (job_id, idx, key, url, content_type, bytes, width, \
                     height, sha256, placeholder, generation) \
                 SELECT job.id, p.*, job.generation FROM job, UNNEST($8::int[], $19::text[], $20::text[], \
                     $21::text[], $22::bigint[], $23::int[], $24::int[], $25::text[], \
                     $9::text[]) AS p(idx, key, url, content_type, bytes, width, height, sha256, \
                     placeholder) \
                 ON CONFLICT (job_id, generation, idx) DO UPDATE SET \
                     placeholder = COALESCE(EXCLUDED.placeholder, imagegen.images.placeholder)), \
             stored AS ( \
                 INSERT INTO imagegen.renditions (job_id, idx, spec, key, url, content_type, \
                     bytes, width, height, sha256, generation) \
                 SELECT job.id, r.*, job.generation FROM job, UNNEST($10::int[], $11::text[], $12::text[], \
                     $13::text[], $14::text[], $15::bigint[], $16::int[], $17::int[], \
                     $18::text[]) AS r(idx, spec, key, url, content_type, bytes, width, height, \
                     sha256) \
                 ON CONFLICT (job_id, generation, idx, spec) DO UPDATE SET key = EXCLUDED.key, \
                     url = EXCLUDED.url, content_type = EXCLUDED.content_type, \
                     bytes = EXCLUDED.bytes, width = EXCLUDED.width, height = EXCLUDED.height, \
                     sha256 = EXCLUDED.sha256, created_at = now()) \
             SELECT id FROM job",
        )
        .bind(job_id)
        .bind(worker)
        .bind(attempt)
        .bind(&record.add_specs)
        .bind(serde_json::Value::Object(record.urls.clone()))
        .bind(&done)
        .bind(serde_json::Value::Object(record.errors.clone()))
        .bind(p.iter().map(|(i, _)| i.index).collect::<Vec<_>>())
        .bind(p.iter().map(|(_, h)| h.as_deref()).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.index).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.spec.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.key.as_str()).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.url.as_str()).collect::<Vec<_>>())
        .bind(
            r.iter()
                .map(|r| r.content_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(r.iter().map(|r| r.bytes).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.width).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.height).collect::<Vec<_>>())
        .bind(r.iter().map(|r| r.sha256.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(i, _)| i.key.as_str()).collect::<Vec<_>>())
        .bind(p.iter().map(|(i, _)| i.url.as_str()).collect::<Vec<_>>())
        .bind(
            p.iter()
                .map(|(i, _)| i.content_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(p.iter().map(|(i, _)| i.bytes).collect::<Vec<_>>())
        .bind(p.iter().map(|(i, _)| i.width).collect::<Vec<_>>())
        .bind(p.iter().map(|(i, _)| i.height).collect::<Vec<_>>())
        .bind(p.iter().map(|(i, _)| i.sha256.as_str()).collect::<Vec<_>>())
        .fetch_optional(self.db())
        .await?;
        Ok(applied.is_some())
    }

    /// How many succeeded jobs of `selection` lack at least one of `specs` in `rendition_urls`.
    pub async fn count_needing_renditions(
        &self,
        selection: &Selection,
        specs: &[String],
    ) -> Result<i64> {
        let (job, batch, all) = selection_params(selection);
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM imagegen.jobs j \
             WHERE j.state = 'succeeded' AND NOT j.rendition_urls ?& $4::text[] \
               AND ($3 OR j.id = $1 OR j.batch = $2)",
        )
        .bind(job)
        .bind(batch)
        .bind(all)
        .bind(specs)
        .fetch_one(self.db())
        .await?)
    }

    /// The next `limit` succeeded jobs of `selection` after id `after` that lack at least one of
    /// `specs`, by id: a page of `renditions add`.
    pub async fn jobs_needing_renditions(
        &self,
        selection: &Selection,
        specs: &[String],
        after: i64,
        limit: i64,
    ) -> Result<Vec<RenditionTarget>> {
        let (job, batch, all) = selection_params(selection);
        Ok(sqlx::query_as(
            "SELECT j.id, j.batch, j.model, j.image_urls, j.renditions, j.rendition_urls, \
                 j.generation \
             FROM imagegen.jobs j \
             WHERE j.state = 'succeeded' AND NOT j.rendition_urls ?& $4::text[] \
               AND ($3 OR j.id = $1 OR j.batch = $2) AND j.id > $5 \
             ORDER BY j.id LIMIT $6",
        )
        .bind(job)
        .bind(batch)
        .bind(all)
        .bind(specs)
        .bind(after)
        .bind(limit)
        .fetch_all(self.db())
        .await?)
    }

    /// The rendition rows of one job, by original then spec.
    pub async fn job_renditions(&self, job_id: i64) -> Result<Vec<RenditionRow>> {
        Ok(sqlx::query_as(
            "SELECT r.idx, r.spec, r.key, r.url, r.content_type, r.bytes, r.width, r.height, \
                 r.sha256 \
             FROM imagegen.renditions r JOIN imagegen.jobs j ON j.id = r.job_id \
                 AND j.generation = r.generation \
             WHERE r.job_id = $1 ORDER BY r.idx, r.spec",
        )
        .bind(job_id)
        .fetch_all(self.db())
        .await?)
    }
}

fn selection_params(s: &Selection) -> (Option<i64>, Option<&str>, bool) {
    match s {
        Selection::Job(id) => (Some(*id), None, false),
        Selection::Batch(b) => (None, Some(b.as_str()), false),
        Selection::All => (None, None, true),
    }
}
