//! A job's renditions end to end: which specs to make, making them in the bounded image pool,
//! uploading them under their keys, and recording them through the queue. The pipeline calls
//! [`Renditions::after_store`] once a job's originals are stored; `imagegen renditions add` calls
//! [`Renditions::add_to_job`] for jobs that already succeeded.
//!
//! Nothing here ever fails a job or calls the model: by the time renditions are made, the paid
//! originals are safe in storage. What goes wrong is recorded per spec in `rendition_errors` and
//! logged, and `renditions add` can make it later.

use bytes::Bytes;
use futures::future::join_all;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::image::DecodedImage;
use crate::image::pool::ImagePool;
use crate::image::renditions::{AUTO_THUMB, Made, RenditionSettings, Spec, make_all};
use crate::queue::{
    Fence, ImageRow, Job, Queue, QueueError, RenditionRecord, RenditionRow, RenditionTarget,
};
use crate::storage::{ObjectMeta, Storage, StorageError, rendition_key};
use crate::worker::Success;

/// The rendition maker: settings and the pool, shared by every job of a process.
#[derive(Debug, Clone)]
pub struct Renditions {
    settings: std::sync::Arc<RenditionSettings>,
    pool: ImagePool,
}

/// Whose renditions these are: what keys and object metadata are made from.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub job_id: i64,
    pub batch: Option<&'a str>,
    pub model: &'a str,
    pub generation: u32,
}

/// Why `renditions add` could not work on a job at all (its per-spec failures are recorded on
/// the job instead).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("reading original {key} failed: {source}")]
    Read {
        key: String,
        #[source]
        source: StorageError,
    },
    #[error("job {0} has no stored originals to derive renditions from")]
    NoOriginals(i64),
}

/// What `renditions add` did to one job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Added {
    /// Specs made (for every original) and recorded now.
    pub made: Vec<String>,
    /// Specs that failed, with why.
    pub failed: Vec<(String, String)>,
}

impl Renditions {
    pub fn new(settings: RenditionSettings) -> Self {
        let pool = ImagePool::new(settings.threads());
        Renditions {
            settings: std::sync::Arc::new(settings),
            pool,
        }
    }

    pub fn settings(&self) -> &RenditionSettings {
        &self.settings
    }

    pub fn pool(&self) -> &ImagePool {
        &self.pool
    }

    /// The specs to make for a job that asked for `asked`: those, plus the automatic thumbnail
    /// unless it is turned off. Specs the database accepted but this code cannot parse (the two
    /// grammars drifted) come back as errors instead.
    pub fn specs_for(
        &self,
        asked: &[String],
    ) -> (Vec<Spec>, serde_json::Map<String, serde_json::Value>) {
        let mut specs = Vec::new();
        let mut errors = serde_json::Map::new();
        for text in asked {
            match Spec::parse(text) {
                Ok(s) if !specs.contains(&s) => specs.push(s),
                Ok(_) => {}
                Err(e) => {
                    errors.insert(text.clone(), e.to_string().into());
                }
            }
        }
        if !self.settings.no_auto_thumb && !specs.iter().any(|s| s.text == AUTO_THUMB) {
            specs.extend(Spec::parse(AUTO_THUMB).ok());
        }
        (specs, errors)
    }

    /// Makes every spec of every original (each original decoded once, in the pool), uploads
    /// them, and says what to record. `originals` pairs each original's row with its bytes.
    pub async fn make(
        &self,
        storage: &Storage,
        owner: Owner<'_>,
        originals: &[(ImageRow, Bytes)],
        specs: &[Spec],
    ) -> RenditionRecord {
        let meta = ObjectMeta {
            job_id: owner.job_id,
            model: owner.model.to_owned(),
            batch: owner.batch.map(str::to_owned),
        };
        let per_original = join_all(originals.iter().map(|(row, bytes)| {
            let meta = &meta;
            async move {
                let made = self.make_one(bytes.clone(), specs).await;
                let uploads = specs
                    .iter()
                    .zip(made.renditions)
                    .map(|(spec, result)| async move {
                        let encoded = result.map_err(|e| e.to_string())?;
                        let index = usize::try_from(row.index).unwrap_or_default();
                        let key = rendition_key(
                            owner.batch,
                            owner.job_id,
                            owner.generation,
                            index,
                            &spec.key_token(),
                            encoded.format,
                        );
                        let digest: [u8; 32] = Sha256::digest(&encoded.bytes).into();
                        let sha256 = hex::encode(digest);
                        let stored = storage
                            .put_hashed(
                                &key,
                                Bytes::from(encoded.bytes),
                                digest,
                                encoded.format.content_type(),
                                Some(meta),
                            )
                            .await
                            .map_err(|e| format!("upload failed: {e}"))?;
                        Ok::<_, String>(RenditionRow {
                            index: row.index,
                            spec: spec.text.clone(),
                            key: stored.key,
                            url: stored.url,
                            content_type: stored.content_type.to_owned(),
                            bytes: i64::try_from(stored.bytes).unwrap_or(i64::MAX),
                            width: i32::try_from(encoded.width).unwrap_or(i32::MAX),
                            height: i32::try_from(encoded.height).unwrap_or(i32::MAX),
                            sha256,
                        })
                    });
                (row.clone(), made.placeholder, join_all(uploads).await)
            }
        }))
        .await;

        let mut record = RenditionRecord::default();
        let mut per_spec: Vec<Result<Vec<String>, String>> = vec![Ok(Vec::new()); specs.len()];
        for (row, placeholder, results) in per_original {
            for (slot, result) in per_spec.iter_mut().zip(results) {
                match (slot.as_mut(), result) {
                    (Ok(urls), Ok(r)) => {
                        urls.push(r.url.clone());
                        record.rows.push(r);
                    }
                    (Ok(_), Err(e)) => *slot = Err(format!("image {}: {e}", row.index)),
                    (Err(_), Ok(r)) => record.rows.push(r),
                    (Err(_), Err(_)) => {}
                }
            }
            record.placeholders.push((row, placeholder));
        }
        for (spec, result) in specs.iter().zip(per_spec) {
            match result {
                Ok(urls) => {
                    record.urls.insert(spec.text.clone(), urls.into());
                }
                Err(e) => {
                    warn!(job_id = owner.job_id, spec = %spec.text, error = %e, "rendition failed");
                    record.errors.insert(spec.text.clone(), e.into());
                }
            }
        }
        record
    }

    async fn make_one(&self, bytes: Bytes, specs: &[Spec]) -> Made {
        let owned = specs.to_vec();
        let settings = self.settings.clone();
        match self
            .pool
            .run(move || make_all(&bytes, &owned, &settings))
            .await
        {
            Ok(made) => made,
            Err(e) => Made {
                placeholder: None,
                renditions: specs
                    .iter()
                    .map(|_| {
                        Err(crate::image::renditions::RenditionError::Decode(
                            e.to_string(),
                        ))
                    })
                    .collect(),
            },
        }
    }

    /// The pipeline's step after a job's originals are stored: makes its renditions and
    /// placeholders and records them while this worker still holds the job. Never fails.
    pub async fn after_store(
        &self,
        queue: &Queue,
        storage: &Storage,
        job: &Job,
        images: &[DecodedImage],
        success: &Success,
    ) {
        let (specs, unparsed) = self.specs_for(&job.renditions);
        // Nothing asked and the automatic thumbnail off: no image work at all, so the original
        // is not even decoded (and gets no placeholder; `renditions add thumb` makes both).
        if specs.is_empty() && unparsed.is_empty() {
            return;
        }
        let originals: Vec<(ImageRow, Bytes)> = success
            .images
            .iter()
            .cloned()
            .zip(images.iter().map(|i| i.bytes.clone()))
            .collect();
        let owner = Owner {
            job_id: job.id,
            batch: job.batch.as_deref(),
            model: &job.model,
            generation: u32::try_from(job.generation).unwrap_or(crate::storage::FIRST_GENERATION),
        };
        let mut record = self.make(storage, owner, &originals, &specs).await;
        record.errors.extend(unparsed);
        match queue
            .record_renditions(job.id, Fence::Running(job.lease()), &record)
            .await
        {
            Ok(true) => {}
            Ok(false) => warn!("the job was taken over before its renditions were recorded"),
            Err(e) => warn!(error = %e,
                "renditions stored but not recorded; `imagegen renditions add` can record them"),
        }
    }

    /// `renditions add` for one succeeded job: reads its originals back from storage and makes
    /// the `specs` it lacks (no model call). Specs already in `rendition_urls` are skipped, so a
    /// re-run does nothing.
    pub async fn add_to_job(
        &self,
        queue: &Queue,
        storage: &Storage,
        target: &RenditionTarget,
        specs: &[Spec],
    ) -> Result<Added, AddError> {
        let have = target.rendition_urls.as_object();
        let missing: Vec<Spec> = specs
            .iter()
            .filter(|s| !have.is_some_and(|m| m.contains_key(&s.text)))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(Added::default());
        }
        let rows = queue.job_images(target.id).await?;
        if rows.is_empty() {
            return Err(AddError::NoOriginals(target.id));
        }
        let mut originals = Vec::with_capacity(rows.len());
        for row in rows {
            let bytes = storage
                .get(&row.key)
                .await
                .map_err(|source| AddError::Read {
                    key: row.key.clone(),
                    source,
                })?;
            originals.push((row, bytes));
        }
        let owner = Owner {
            job_id: target.id,
            batch: target.batch.as_deref(),
            model: &target.model,
            generation: u32::try_from(target.generation)
                .unwrap_or(crate::storage::FIRST_GENERATION),
        };
        let mut record = self.make(storage, owner, &originals, &missing).await;
        // The automatic thumbnail is not an ask: `renditions` keeps only what was asked for.
        record.add_specs = specs
            .iter()
            .filter(|s| s.text != AUTO_THUMB)
            .map(|s| s.text.clone())
            .collect();
        queue
            .record_renditions(target.id, Fence::Succeeded, &record)
            .await?;
        Ok(Added {
            made: record.urls.keys().cloned().collect(),
            failed: record
                .errors
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
        })
    }
}
