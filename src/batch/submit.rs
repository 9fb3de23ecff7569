//! `imagegen batch submit`: a file's rows checked, compared with the jobs their keys already
//! have, priced, checked against the budget, and written in one transaction (all rows or none).
//! Re-submitting a file adds only its new rows; rows whose prompt or options changed are
//! reported, never skipped silently, and regenerated when asked.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::RowError;
use super::plan::{self, Planned, Recipe, RowDefaults};
use super::source::{self, Format};
use super::template::{Template, TemplateError};
use crate::openrouter::models;
use crate::queue::batches::{BatchUpsert, ExistingJob, Regeneration};
use crate::queue::{Queue, QueueError};

/// How many rendered prompts a dry run shows.
pub const PREVIEW_PROMPTS: usize = 3;
/// How many changed keys a report names (the count is always whole).
pub const CHANGED_KEYS_SHOWN: usize = 10;

/// What to submit and how.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    pub batch: String,
    /// The file's name as given (`-` for standard input), recorded on the batch.
    pub source_name: String,
    pub format: Format,
    /// `None`: the `prompt` column as it is.
    pub template: Option<String>,
    /// `None`: a hash of the prompt and options.
    pub key: Option<String>,
    pub defaults: RowDefaults,
    pub dry_run: bool,
    /// Sets the batch's budget; the submission is refused when the estimate would pass it.
    pub budget_usd: Option<Decimal>,
    /// Submit even when the estimate passes the budget.
    pub force: bool,
    /// Generate changed rows again instead of only reporting them.
    pub regenerate_changed: bool,
}

/// What a submission did (or, in a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct SubmitReport {
    pub batch: String,
    pub dry_run: bool,
    /// Rows in the file.
    pub rows: usize,
    /// Rows whose key has no job yet.
    pub new_jobs: usize,
    /// Jobs inserted (0 in a dry run; fewer than `new_jobs` only if another submission of the
    /// same keys committed meanwhile).
    pub inserted: u64,
    /// Rows whose job exists with the same prompt and options.
    pub unchanged: usize,
    /// Rows whose job exists with another prompt or options.
    pub changed: Vec<ChangedRow>,
    /// Changed jobs put back to pending (with `regenerate_changed`).
    pub regenerated: u64,
    /// Existing jobs whose file position changed.
    pub moved: u64,
    pub first_prompts: Vec<String>,
    /// What the jobs this submission runs are expected to cost.
    pub estimate: Estimate,
    pub budget: Option<BudgetCheck>,
}

/// A row whose job exists but asks for something else now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangedRow {
    pub line: u64,
    pub key: String,
    pub job_id: i64,
    pub state: String,
    /// Which of prompt, aspect_ratio, model, image_size, renditions differ.
    pub fields: Vec<&'static str>,
}

/// The price table's expectation for a set of jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Estimate {
    pub jobs: usize,
    #[serde(with = "rust_decimal::serde::str")]
    pub total_usd: Decimal,
    pub lines: Vec<EstimateLine>,
}

/// Jobs of one model and size, and what each is expected to cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EstimateLine {
    pub model: String,
    pub image_size: Option<String>,
    pub jobs: usize,
    #[serde(with = "rust_decimal::serde::str")]
    pub each_usd: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub usd: Decimal,
}

/// The budget the submission was checked against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetCheck {
    #[serde(with = "rust_decimal::serde::str")]
    pub budget_usd: Decimal,
    /// Billed so far plus the expected cost of the batch's jobs still to run.
    #[serde(with = "rust_decimal::serde::str")]
    pub committed_usd: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub estimate_usd: Decimal,
    pub forced: bool,
}

impl BudgetCheck {
    pub fn exceeded(&self) -> bool {
        self.committed_usd + self.estimate_usd > self.budget_usd
    }
}

/// Why nothing was submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// An option is refused by the rules the database enforces.
    #[error("{0}")]
    Option(String),
    #[error("--template: {0}")]
    Template(TemplateError),
    #[error("--key: {0}")]
    Key(TemplateError),
    /// Rows that cannot be jobs: every one, by line. Nothing was written.
    #[error("{} bad row(s); nothing was submitted:\n{}", .0.len(), list(.0))]
    Invalid(Vec<RowError>),
    #[error("the file has no rows")]
    Empty,
    /// The estimate would take the batch past its budget. Nothing was written.
    #[error(
        "the estimate ${} plus ${} already billed or still to run passes the budget of ${}; \
         nothing was submitted (--force submits anyway)",
        .0.estimate_usd, .0.committed_usd.round_dp(4), .0.budget_usd
    )]
    OverBudget(BudgetCheck),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

fn list(errors: &[RowError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where a submission is, for a progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The file is read and checked: this many rows.
    Checked { rows: usize },
    /// New jobs written so far, of `total`.
    Writing { done: u64, total: u64 },
}

/// Submits a file's bytes. See the module doc.
pub async fn submit(
    queue: &Queue,
    bytes: &[u8],
    opts: &SubmitOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SubmitReport, SubmitError> {
    plan::check_batch(&opts.batch).map_err(|e| SubmitError::Option(format!("--batch: {e}")))?;
    opts.defaults.check().map_err(SubmitError::Option)?;
    if let Some(b) = opts.budget_usd
        && b < Decimal::ZERO
    {
        return Err(SubmitError::Option(format!("--budget: {b} is negative")));
    }
    let template = opts
        .template
        .as_deref()
        .map(Template::parse)
        .transpose()
        .map_err(SubmitError::Template)?;
    let key = opts
        .key
        .as_deref()
        .map(Template::parse)
        .transpose()
        .map_err(SubmitError::Key)?;

    let (table, mut errors) = source::read(bytes, opts.format);
    let planned = match plan::plan(
        &table,
        opts.format,
        &Recipe {
            batch: &opts.batch,
            template: template.as_ref(),
            key: key.as_ref(),
            defaults: &opts.defaults,
        },
    ) {
        Ok(p) => p,
        Err(mut more) => {
            errors.append(&mut more);
            Vec::new()
        }
    };
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(SubmitError::Invalid(errors));
    }
    if planned.is_empty() {
        return Err(SubmitError::Empty);
    }
    progress(Progress::Checked {
        rows: planned.len(),
    });

    let keys: Vec<String> = planned
        .iter()
        .filter_map(|p| p.job.idempotency_key.clone())
        .collect();
    let existing: HashMap<String, ExistingJob> = queue
        .jobs_by_keys(&keys)
        .await?
        .into_iter()
        .map(|j| (j.idempotency_key.clone(), j))
        .collect();

    let mut new_jobs = Vec::new();
    let mut seqs = Vec::new();
    let mut moves = Vec::new();
    let mut changed = Vec::new();
    let mut regenerate = Vec::new();
    let mut unchanged = 0;
    for (seq, p) in planned.iter().enumerate() {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        let Some(job) = p.job.idempotency_key.as_ref().and_then(|k| existing.get(k)) else {
            new_jobs.push(p.job.clone());
            seqs.push(seq);
            continue;
        };
        if job.batch.as_deref() != Some(opts.batch.as_str()) {
            errors.push(RowError::new(
                p.line,
                format!(
                    "key {:?} is the idempotency key of job {} of another batch ({})",
                    p.key,
                    job.id,
                    job.batch.as_deref().unwrap_or("none")
                ),
            ));
            continue;
        }
        if job.batch_seq != Some(seq) {
            moves.push((job.id, seq));
        }
        let fields = differences(p, job);
        if fields.is_empty() {
            unchanged += 1;
            continue;
        }
        if opts.regenerate_changed {
            regenerate.push(Regeneration {
                job_id: job.id,
                prompt: p.job.prompt.clone(),
                aspect_ratio: p.job.aspect_ratio.clone().unwrap_or_default(),
                model: p.job.model.clone().unwrap_or_default(),
                image_size: p.job.image_size.clone(),
                renditions: p.job.renditions.clone(),
            });
        }
        changed.push(ChangedRow {
            line: p.line,
            key: p.key.clone(),
            job_id: job.id,
            state: job.state.clone(),
            fields,
        });
    }
    if !errors.is_empty() {
        return Err(SubmitError::Invalid(errors));
    }

    let regenerated_models = regenerate
        .iter()
        .map(|r| (Some(r.model.clone()), r.image_size.clone()));
    let estimate = estimate(
        new_jobs
            .iter()
            .map(|j| (j.model.clone(), j.image_size.clone()))
            .chain(regenerated_models),
    );

    let budget_usd = match opts.budget_usd {
        Some(b) => Some(b),
        None => queue.batch_budget(&opts.batch).await?,
    };
    let budget = match budget_usd {
        Some(budget_usd) => {
            let outlook = queue.batch_outlook(&opts.batch).await?;
            let to_run: Decimal = outlook
                .unfinished
                .iter()
                .map(|(m, s, n)| models::expected_cost(m, s.as_deref()) * Decimal::from(*n))
                .sum();
            Some(BudgetCheck {
                budget_usd,
                committed_usd: outlook.billed_usd + to_run,
                estimate_usd: estimate.total_usd,
                forced: opts.force,
            })
        }
        None => None,
    };

    let mut report = SubmitReport {
        batch: opts.batch.clone(),
        dry_run: opts.dry_run,
        rows: planned.len(),
        new_jobs: new_jobs.len(),
        inserted: 0,
        unchanged,
        changed,
        regenerated: 0,
        moved: 0,
        first_prompts: planned
            .iter()
            .take(PREVIEW_PROMPTS)
            .map(|p| p.job.prompt.clone())
            .collect(),
        estimate,
        budget,
    };
    if opts.dry_run {
        return Ok(report);
    }
    if let Some(b) = &report.budget
        && b.exceeded()
        && !opts.force
    {
        return Err(SubmitError::OverBudget(b.clone()));
    }

    let defaults = serde_json::to_value(&opts.defaults).unwrap_or_default();
    let total = new_jobs.len() as u64;
    let written = queue
        .submit_file(
            &BatchUpsert {
                name: &opts.batch,
                source: &opts.source_name,
                template: opts.template.as_deref(),
                key_template: opts.key.as_deref(),
                defaults: &defaults,
                columns: &table.columns,
                budget_usd: opts.budget_usd,
                callback_url: opts.defaults.callback_url.as_deref(),
            },
            &new_jobs,
            &seqs,
            &moves,
            &regenerate,
            &mut |done| progress(Progress::Writing { done, total }),
        )
        .await?;
    report.inserted = written.inserted;
    report.regenerated = written.regenerated;
    report.moved = written.moved;
    Ok(report)
}

/// What the file's row asks for that its job does not.
fn differences(p: &Planned, job: &ExistingJob) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if p.job.prompt != job.prompt {
        fields.push("prompt");
    }
    if p.job.aspect_ratio.as_deref() != Some(job.aspect_ratio.as_str()) {
        fields.push("aspect_ratio");
    }
    if p.job.model.as_deref() != Some(job.model.as_str()) {
        fields.push("model");
    }
    if p.job.image_size != job.image_size {
        fields.push("image_size");
    }
    if p.job.renditions != job.renditions {
        fields.push("renditions");
    }
    fields
}

/// Prices jobs by model and size with the price table's expected cost per call.
pub fn estimate(jobs: impl Iterator<Item = (Option<String>, Option<String>)>) -> Estimate {
    let mut groups: Vec<((String, Option<String>), usize)> = Vec::new();
    let mut count = 0;
    for (model, size) in jobs {
        count += 1;
        let model = model.unwrap_or_else(|| models::FLASH_IMAGE.to_owned());
        // Only the pro model has sizes; the others cost the same whatever is asked.
        let size = size.filter(|_| models::has_image_sizes(&model));
        let k = (model, size);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, n)) => *n += 1,
            None => groups.push((k, 1)),
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let lines: Vec<EstimateLine> = groups
        .into_iter()
        .map(|((model, image_size), jobs)| {
            let each_usd = models::expected_cost(&model, image_size.as_deref());
            EstimateLine {
                usd: each_usd * Decimal::from(jobs),
                model,
                image_size,
                jobs,
                each_usd,
            }
        })
        .collect();
    Estimate {
        jobs: count,
        total_usd: lines.iter().map(|l| l.usd).sum(),
        lines,
    }
}

/// A time given on the command line (`--run-at`): RFC 3339.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-12-24T22:00:00Z ({e})"))
}
