//! One job, end to end: budget check, provider call, decoded images, storage, and what to record.
//! No loop (the worker runs it) and no SQL of its own (the stash and spend reads go through the
//! queue).
//!
//! Money rule: once an image is paid for, it is never generated again.
//! - If the upload fails, the decoded images are stashed in `imagegen.paid_images` before the
//!   attempt ends; the next attempt stores them without calling the model.
//! - If the final write fails after the upload, the images are already in storage under the job's
//!   deterministic keys; the next attempt finds them there and records them.
//! - Only a crash between the provider's answer and the stash (or the upload) loses a paid image;
//!   that window is the length of one upload.
//!
//! Renditions are made after the originals are stored (see [`crate::renditions`]); they never
//! fail the job, and the recovery above takes only originals (by key structure), never a
//! rendition.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rust_decimal::Decimal;
use tracing::{info, warn};

use crate::error::{Classify, ErrorClass};
use crate::image::{DecodedImage, ImageFormat};
use crate::openrouter::{CallError, Client, Generation, ImageRequest, models};
use crate::queue::{AttemptRecord, ImageRow, Job, Queue, Reservation};
use crate::renditions::Renditions;
use crate::storage::{
    FIRST_GENERATION, ObjectMeta, Storage, StorageError, generation_key, parse_file_name,
};
use crate::worker::{CallSlot, Failure, Handler, Success};

/// Pipeline settings that are not the provider's or the storage's.
#[derive(Debug, Clone, Default)]
pub struct PipelineConfig {
    /// At most this many provider calls start per minute, across all jobs of this worker.
    pub requests_per_minute: Option<NonZeroU32>,
    /// How renditions are made (pool size, automatic thumbnail, qualities, decode limit).
    pub renditions: crate::image::renditions::RenditionSettings,
}

/// How long the daily budget read from the database is trusted: a changed budget reaches every
/// worker within this, and jobs do not each pay a read.
pub const SETTINGS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// The daily budget (`imagegen.settings`) and when it was read, shared by the pipeline's clones.
type DailyBudgetCache = Arc<tokio::sync::Mutex<Option<(std::time::Instant, Option<Decimal>)>>>;

/// The job body: implements [`Handler`] for the worker.
#[derive(Clone)]
pub struct Pipeline {
    client: Client,
    storage: Storage,
    queue: Queue,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    daily_budget: DailyBudgetCache,
    renditions: Renditions,
    references: Arc<crate::references::ReferenceCache>,
}

impl Pipeline {
    pub fn new(client: Client, storage: Storage, queue: Queue, config: PipelineConfig) -> Self {
        let limiter = config
            .requests_per_minute
            .map(|rpm| Arc::new(RateLimiter::direct(Quota::per_minute(rpm))));
        Pipeline {
            client,
            storage,
            queue,
            limiter,
            daily_budget: Arc::default(),
            renditions: Renditions::new(config.renditions),
            references: Arc::default(),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The reference images held for calls in flight.
    pub fn references(&self) -> &crate::references::ReferenceCache {
        &self.references
    }

    /// The installation's daily budget, read at most every [`SETTINGS_TTL`].
    async fn daily_budget(&self) -> Result<Option<Decimal>, crate::queue::QueueError> {
        let mut cached = self.daily_budget.lock().await;
        if let Some((at, budget)) = *cached
            && at.elapsed() < SETTINGS_TTL
        {
            return Ok(budget);
        }
        let budget = self.queue.settings().await?.daily_budget_usd;
        *cached = Some((std::time::Instant::now(), budget));
        Ok(budget)
    }

    /// Refuses to start a call that could take a budget past its limit; otherwise reserves
    /// the call's expected cost until the attempt ends.
    async fn check_budgets(&self, job: &Job) -> Result<(), Failure> {
        let expected = models::expected_cost(&job.model, job.image_size.as_deref());
        let daily = match self.daily_budget().await {
            Ok(d) => d,
            Err(e) => return Err(Failure::new(e.class(), format!("budget check failed: {e}"))),
        };
        let reservation = self
            .queue
            .reserve(job, expected, daily)
            .await
            .map_err(|e| Failure {
                class: e.class(),
                message: format!("budget check failed: {e}"),
                record: AttemptRecord::default(),
                free_retry: false,
            })?;
        let (class, message) = match reservation {
            Reservation::Granted => return Ok(()),
            Reservation::BatchOver {
                budget,
                billed,
                in_flight,
            } => (
                ErrorClass::HaltBatch,
                format!(
                    "batch {:?} paused at its budget of ${budget}: ${} billed, ${in_flight} in flight, next call ~${expected}",
                    job.batch.as_deref().unwrap_or_default(),
                    billed.round_dp(4)
                ),
            ),
            Reservation::DailyOver {
                budget,
                billed,
                in_flight,
            } => (
                ErrorClass::Halt,
                format!(
                    "daily budget of ${budget} reached: ${} billed today (UTC), ${in_flight} in flight, next call ~${expected}",
                    billed.round_dp(4)
                ),
            ),
            Reservation::LeaseLost => (
                ErrorClass::RETRY,
                "lease lost before the call started".to_owned(),
            ),
        };
        Err(Failure {
            class,
            message,
            record: AttemptRecord::default(),
            free_retry: false,
        })
    }

    /// Images an earlier attempt of this job paid for: stashed after a failed upload, or already
    /// uploaded before a failed final write (which always spends the attempt, so only later
    /// attempts look in storage).
    async fn paid_earlier(&self, job: &Job) -> Result<Option<Vec<DecodedImage>>, Failure> {
        if job.has_paid_images {
            let stashed = self
                .queue
                .stashed_images(job.id, job.generation)
                .await
                .map_err(|e| Failure {
                    class: e.class(),
                    message: format!("reading stashed images failed: {e}"),
                    record: AttemptRecord::default(),
                    free_retry: true,
                })?;
            let images = stashed
                .into_iter()
                .filter_map(|b| decoded(bytes::Bytes::from(b)))
                .collect::<Vec<_>>();
            if !images.is_empty() {
                return Ok(Some(images));
            }
        }
        if job.attempts <= 1 {
            return Ok(None);
        }
        let generation = key_generation(job);
        let probe = generation_key(
            job.batch.as_deref(),
            job.id,
            generation,
            0,
            ImageFormat::Png,
        );
        let prefix = match probe.rfind('-') {
            Some(i) => &probe[..=i],
            None => return Ok(None),
        };
        let keys = self.storage.list(prefix).await.map_err(storage_failure)?;
        let mut images = Vec::new();
        for key in originals_of(job.id, generation, &keys) {
            let bytes = self.storage.get(key).await.map_err(storage_failure)?;
            if let Some(img) = decoded(bytes) {
                images.push(img);
            }
        }
        Ok(Some(images).filter(|i| !i.is_empty()))
    }

    /// Uploads each image under the job's deterministic key, and describes what was stored.
    async fn store(&self, job: &Job, images: &[DecodedImage]) -> Result<Success, StorageError> {
        let meta = ObjectMeta {
            job_id: job.id,
            model: job.model.clone(),
            batch: job.batch.clone(),
        };
        let mut success = Success::default();
        for (index, image) in images.iter().enumerate() {
            let key = generation_key(
                job.batch.as_deref(),
                job.id,
                key_generation(job),
                index,
                image.format,
            );
            let stored = self.storage.put(&key, image, &meta).await?;
            success.image_urls.push(stored.url.clone());
            success.images.push(ImageRow {
                index: i32::try_from(index).unwrap_or(i32::MAX),
                key: stored.key,
                url: stored.url,
                content_type: stored.content_type.to_owned(),
                bytes: i64::try_from(stored.bytes).unwrap_or(i64::MAX),
                width: i32::try_from(image.width).unwrap_or(i32::MAX),
                height: i32::try_from(image.height).unwrap_or(i32::MAX),
                sha256: image.sha256_hex(),
            });
        }
        // The originals are safe now; renditions never fail the job.
        self.renditions
            .after_store(&self.queue, &self.storage, job, images, &success)
            .await;
        Ok(success)
    }

    async fn run(&self, job: Job, slot: CallSlot) -> Result<Success, Failure> {
        if let Some(images) = self.paid_earlier(&job).await? {
            info!(
                images = images.len(),
                "finishing from images an earlier attempt paid for"
            );
            let success = self.store(&job, &images).await.map_err(|e| Failure {
                free_retry: true,
                ..storage_failure(e)
            })?;
            self.forget_stash(job.id).await;
            return Ok(success);
        }
        // Before any budget is reserved: a bad reference fails the job without costing anything.
        let references = self
            .references
            .resolve(&self.storage, &job.reference_images)
            .await
            .map_err(|e| Failure::new(e.class(), e.to_string()))?;
        self.check_budgets(&job).await?;
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        let request = ImageRequest {
            model: job.model.clone(),
            prompt: job.prompt.clone(),
            aspect_ratio: job.aspect_ratio.clone(),
            image_size: job.image_size.clone(),
            references,
        };
        let call_started = std::time::Instant::now();
        // The body permit is held until the images are stored (end of this function): see
        // `generate_held`. The call slot goes back as soon as the answer starts to arrive.
        let generation = self
            .client
            .generate_held(&request, || slot.answered())
            .await;
        crate::metrics::call_finished(&job.model, call_started.elapsed());
        let generation = generation.map_err(call_failure)?;
        let record = record_of(&generation);
        match self.store(&job, &generation.images).await {
            Ok(mut success) => {
                success.record = record;
                Ok(success)
            }
            Err(e) => {
                crate::metrics::storage_error();
                self.stash(&job, &generation).await;
                Err(Failure {
                    class: e.class(),
                    message: format!(
                        "image paid for but not stored (kept for the next attempt): {e}"
                    ),
                    record,
                    // Retrying costs nothing now: the next attempt stores the kept images.
                    free_retry: true,
                })
            }
        }
    }

    /// Keeps paid images in the database after a failed upload. If even that fails, the images
    /// are lost and the next attempt pays again: said loudly.
    async fn stash(&self, job: &Job, generation: &Generation) {
        let images: Vec<Vec<u8>> = generation.images.iter().map(|i| i.bytes.to_vec()).collect();
        let mut failures = 0;
        loop {
            match self
                .queue
                .stash_images(
                    job.id,
                    job.generation,
                    &images,
                    generation.generation_id.as_deref(),
                )
                .await
            {
                Ok(()) => return,
                Err(e) if failures < STASH_TRIES => {
                    failures += 1;
                    warn!(error = %e, "stashing paid images failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500) * failures).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, generation_id = generation.generation_id.as_deref().unwrap_or(""),
                        "paid images could not be stored or stashed; the next attempt pays again");
                    return;
                }
            }
        }
    }

    async fn forget_stash(&self, job_id: i64) {
        if let Err(e) = self.queue.drop_stash(job_id).await {
            // Harmless: the stash is only read when a job is attempted again.
            warn!(error = %e, "could not drop the stash of a stored job");
        }
    }
}

/// How often a stash write is tried before the paid images are given up.
const STASH_TRIES: u32 = 5;

impl Handler for Pipeline {
    fn handle(
        &self,
        job: Job,
        slot: CallSlot,
    ) -> impl Future<Output = Result<Success, Failure>> + Send {
        self.run(job, slot)
    }
}

/// The job's generation as its keys carry it.
fn key_generation(job: &Job) -> u32 {
    u32::try_from(job.generation).unwrap_or(FIRST_GENERATION)
}

/// The keys among `keys` (one listing of the job's prefix) that are this job's originals of
/// `generation`, by index: never a rendition, another generation or another job's object,
/// whatever else the prefix holds. One key per index (the first listed).
fn originals_of(job_id: i64, generation: u32, keys: &[String]) -> Vec<&str> {
    let mut found: Vec<(usize, &str)> = keys
        .iter()
        .filter_map(|k| {
            let name = parse_file_name(k.rsplit('/').next().unwrap_or(k))?;
            let ours =
                name.job_id == job_id && name.generation == generation && name.rendition.is_none();
            ours.then_some((name.index, k.as_str()))
        })
        .collect();
    found.sort_by_key(|(i, _)| *i);
    found.dedup_by_key(|(i, _)| *i);
    found.into_iter().map(|(_, k)| k).collect()
}

fn decoded(bytes: bytes::Bytes) -> Option<DecodedImage> {
    let (format, width, height) = crate::image::sniff(&bytes)?;
    Some(DecodedImage::new(bytes, format, width, height))
}

fn record_of(g: &Generation) -> AttemptRecord {
    AttemptRecord {
        http_status: Some(i32::from(g.http_status)),
        prompt_tokens: g.usage.prompt_tokens,
        completion_tokens: g.usage.completion_tokens,
        image_tokens: g.usage.image_tokens,
        cost_usd: g.usage.cost_usd,
        generation_id: g.generation_id.clone(),
    }
}

fn call_failure(e: CallError) -> Failure {
    let usage = e.usage.unwrap_or_default();
    Failure {
        class: e.class(),
        message: e.to_string(),
        record: AttemptRecord {
            http_status: e.http_status.map(i32::from),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            image_tokens: usage.image_tokens,
            cost_usd: usage.cost_usd,
            generation_id: e.generation_id.clone(),
        },
        free_retry: false,
    }
}

fn storage_failure(e: StorageError) -> Failure {
    crate::metrics::storage_error();
    Failure {
        class: e.class(),
        message: e.to_string(),
        record: AttemptRecord::default(),
        free_retry: false,
    }
}

#[cfg(test)]
mod tests {
    use super::originals_of;

    #[test]
    fn recovery_takes_only_this_job_s_originals() {
        let keys: Vec<String> = [
            "b/42-0.og.jpg",
            "b/42-1.png",
            "b/42-0.thumb.webp",
            "b/42-0.png",
            "b/42-g2-0.png",
            "b/42-0.1200x630-png.png",
            "b/420-0.png",
            "b/.42-0.png.1234.tmp",
            "b/42-1.jpg",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(originals_of(42, 1, &keys), ["b/42-0.png", "b/42-1.png"]);
        let later: Vec<String> = [
            "b/42-0.png",
            "b/42-g2-0.png",
            "b/42-g2-0.og.jpg",
            "b/42-g3-0.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(originals_of(42, 2, &later), ["b/42-g2-0.png"]);
    }
}
