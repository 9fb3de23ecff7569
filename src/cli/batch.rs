//! `imagegen batch ...`: submit a CSV or JSONL file, list, show and watch batches, retry their
//! failures, cancel them, set their budget, and write their report. The older spellings
//! (`retry --failed --batch`, `cancel --batch`, `status --by-batch`, `budget set|clear`) call the
//! same functions here.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use imagegen::batch::report::{self, ReportFormat, ReportOptions};
use imagegen::batch::submit::{Progress, parse_time};
use imagegen::batch::{Format, RowDefaults, SubmitOptions, SubmitReport, plan};
use imagegen::queue::Queue;
use imagegen::queue::api::BatchSummary;
use imagegen::storage::{Storage, StorageConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;

use super::explain_constraint;

/// How often `batch watch` prints a line when its output is not a terminal.
pub const WATCH_LINE_EVERY: Duration = Duration::from_secs(10);
/// How often `batch watch` redraws its bar on a terminal.
const WATCH_REFRESH: Duration = Duration::from_secs(1);
/// Error groups `batch show` lists.
const FAILURE_GROUPS: i64 = 10;

#[derive(Subcommand)]
pub enum BatchCommand {
    /// Submit a CSV or JSONL file ('-' for standard input): one job per row, in one transaction.
    Submit(Box<SubmitArgs>),
    /// Every batch: jobs per state, spend, budget, ETA.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One batch: jobs per state, spend against budget, throughput, ETA, failures by error.
    Show {
        batch: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A live progress bar until the batch is finished (a line every 10 s when not a terminal).
    Watch { batch: String },
    /// Put every failed job of the batch back to pending.
    RetryFailed { batch: String },
    /// Cancel every pending job of the batch (running ones finish: their call is paid for).
    Cancel { batch: String },
    /// Show the batch's budget, set it (USD), or remove it (--clear).
    Budget {
        batch: String,
        usd: Option<Decimal>,
        #[arg(long, conflicts_with = "usd")]
        clear: bool,
    },
    /// Write the batch's report: one row per job in file order, with its URLs.
    Report(Box<ReportArgs>),
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The file: CSV with a header row, or JSONL (one object per line); '-' reads standard input.
    file: String,
    /// The file's format; by default from its extension (.csv, .jsonl, .ndjson).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The batch the jobs belong to.
    #[arg(long)]
    batch: String,
    /// The prompt, with {column} placeholders ({{ and }} for literal braces). Without a
    /// template, the `prompt` column is the prompt.
    #[arg(long, conflicts_with = "template_file")]
    template: Option<String>,
    /// Read the template from this file (used exactly, trailing newline included).
    #[arg(long)]
    template_file: Option<String>,
    /// The row's key, a template too (e.g. '{slug}'): the job's idempotency key is
    /// '{batch}:{key}'. Without it, a hash of the prompt and options.
    #[arg(long)]
    key: Option<String>,
    #[arg(long)]
    aspect_ratio: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// 1K, 2K or 4K (the Pro model honours it).
    #[arg(long)]
    image_size: Option<String>,
    /// Higher runs first (-1000..1000).
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Rendition specs, comma-separated (og, thumb, webp, WxH.fmt, Ww.fmt).
    #[arg(long)]
    renditions: Option<String>,
    #[arg(long)]
    max_attempts: Option<i32>,
    /// Not before this time (RFC 3339, e.g. 2026-12-24T22:00:00Z).
    #[arg(long, value_parser = parse_time)]
    run_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The batch's default callback URL: its jobs without one of their own POST here.
    #[arg(long)]
    callback_url: Option<String>,
    /// Print what would be submitted and its cost estimate; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Set the batch's budget (USD) and refuse to submit when the estimate would pass it.
    #[arg(long)]
    budget: Option<Decimal>,
    /// Submit even when the estimate passes the budget.
    #[arg(long)]
    force: bool,
    /// Generate rows whose prompt or options changed again (otherwise they are only reported).
    #[arg(long)]
    regenerate_changed: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    batch: String,
    /// By default from the extension of -o (.csv, .json, .html), else csv.
    #[arg(long, value_enum)]
    format: Option<ReportFormat>,
    /// Where to write it ('-' for standard output).
    #[arg(short = 'o', long = "output", default_value = "-")]
    output: String,
    /// Write presigned URLs valid this long (private buckets), e.g. 7d.
    #[arg(long, value_parser = humantime::parse_duration)]
    presign: Option<Duration>,
    #[command(flatten)]
    storage: StorageConfig,
}

pub async fn run(q: Queue, cmd: BatchCommand) -> anyhow::Result<()> {
    match cmd {
        BatchCommand::Submit(a) => submit(&q, *a).await,
        BatchCommand::List { json } => list(&q, json).await,
        BatchCommand::Show { batch, json } => show(&q, &batch, json).await,
        BatchCommand::Watch { batch } => watch(&q, &batch).await,
        BatchCommand::RetryFailed { batch } => retry_failed(&q, Some(&batch)).await,
        BatchCommand::Cancel { batch } => cancel(&q, &batch).await,
        BatchCommand::Budget { batch, usd, clear } => {
            if clear {
                set_budget(&q, &batch, None).await
            } else if let Some(usd) = usd {
                set_budget(&q, &batch, Some(usd)).await
            } else {
                match q.batch_budget(&batch).await? {
                    Some(b) => {
                        let spent = q.batch_outlook(&batch).await?.billed_usd;
                        println!(
                            "batch {batch:?}: ${} of ${b} budget spent",
                            spent.round_dp(4)
                        );
                    }
                    None => println!("batch {batch:?}: no budget"),
                }
                Ok(())
            }
        }
        BatchCommand::Report(a) => write_report(&q, *a).await,
    }
}

async fn submit(q: &Queue, a: SubmitArgs) -> anyhow::Result<()> {
    let format = match a.format.or_else(|| Format::from_path(&a.file)) {
        Some(f) => f,
        None => bail!(
            "cannot tell the format of {:?} from its name: give --format csv or --format jsonl",
            a.file
        ),
    };
    let template = match (&a.template, &a.template_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the template file {path}"))?,
        ),
        (None, None) => None,
    };
    let bytes = if a.file == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .context("reading standard input")?;
        buf
    } else {
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file))?
    };
    let opts = SubmitOptions {
        batch: a.batch,
        source_name: a.file,
        format,
        template,
        key: a.key,
        defaults: RowDefaults {
            aspect_ratio: a.aspect_ratio,
            model: a.model,
            image_size: a.image_size,
            priority: a.priority,
            renditions: a
                .renditions
                .as_deref()
                .map(plan::split_list)
                .unwrap_or_default(),
            max_attempts: a.max_attempts,
            run_at: a.run_at,
            callback_url: a.callback_url,
        },
        dry_run: a.dry_run,
        budget_usd: a.budget,
        force: a.force,
        regenerate_changed: a.regenerate_changed,
    };
    let mut bar = SubmitProgress::new();
    let report = imagegen::batch::submit(q, &bytes, &opts, &mut |p| bar.update(p)).await;
    bar.finish();
    let report = match report {
        Ok(r) => r,
        Err(imagegen::batch::SubmitError::Queue(e)) => return Err(explain_constraint(e)),
        Err(e) => return Err(e.into()),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_submit(&report);
    }
    Ok(())
}

fn print_submit(r: &SubmitReport) {
    println!(
        "batch {:?}: {} row(s): {} new, {} unchanged, {} changed",
        r.batch,
        r.rows,
        r.new_jobs,
        r.unchanged,
        r.changed.len()
    );
    if r.dry_run {
        println!("first prompts:");
        for (i, p) in r.first_prompts.iter().enumerate() {
            println!("  {}. {p}", i + 1);
        }
    }
    println!(
        "estimate: ${} for {} job(s)",
        r.estimate.total_usd, r.estimate.jobs
    );
    for l in &r.estimate.lines {
        println!(
            "  {} x {}{} at ${} = ${}",
            l.jobs,
            l.model,
            l.image_size
                .as_deref()
                .map(|s| format!(" {s}"))
                .unwrap_or_default(),
            l.each_usd,
            l.usd
        );
    }
    if let Some(b) = &r.budget {
        let verdict = if !b.exceeded() {
            "within budget"
        } else if b.forced {
            "OVER BUDGET (forced)"
        } else {
            "OVER BUDGET"
        };
        println!(
            "budget: ${}; already billed or still to run ${}; with this estimate ${}: {verdict}",
            b.budget_usd,
            b.committed_usd.round_dp(4),
            (b.committed_usd + b.estimate_usd).round_dp(4)
        );
    }
    if !r.changed.is_empty() {
        let shown: Vec<String> = r
            .changed
            .iter()
            .take(imagegen::batch::submit::CHANGED_KEYS_SHOWN)
            .map(|c| format!("{} (line {}: {})", c.key, c.line, c.fields.join(", ")))
            .collect();
        let more = r.changed.len().saturating_sub(shown.len());
        println!(
            "changed rows: {}{}",
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        );
        if r.dry_run || r.regenerated == 0 {
            println!("  (--regenerate-changed generates them again)");
        }
    }
    if r.dry_run {
        println!("dry run: nothing was written");
    } else {
        println!(
            "submitted {} job(s){}{}",
            r.inserted,
            if r.regenerated > 0 {
                format!(", regenerated {}", r.regenerated)
            } else {
                String::new()
            },
            if r.moved > 0 {
                format!(", {} moved to their new place in the file", r.moved)
            } else {
                String::new()
            }
        );
        let left = (r.changed.len() as u64).saturating_sub(r.regenerated);
        if r.regenerated > 0 && left > 0 {
            println!(
                "  {left} changed job(s) not regenerated: running, or holding paid-for images \
                 not stored yet"
            );
        }
    }
}

/// A bar on a terminal, plain lines otherwise.
struct SubmitProgress {
    bar: Option<ProgressBar>,
    terminal: bool,
}

impl SubmitProgress {
    fn new() -> Self {
        SubmitProgress {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, p: Progress) {
        match p {
            Progress::Checked { rows } => eprintln!("checked {rows} row(s)"),
            Progress::Writing { done, total } => {
                if !self.terminal {
                    eprintln!("written {done} of {total} new job(s)");
                    return;
                }
                let bar = self.bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(total);
                    if let Ok(style) = ProgressStyle::with_template(
                        "{bar:40} {pos}/{len} jobs written ({per_sec}, {eta} left)",
                    ) {
                        b.set_style(style);
                    }
                    b
                });
                bar.set_position(done);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// `batch list` and `status --by-batch`.
pub async fn list(q: &Queue, json: bool) -> anyhow::Result<()> {
    let batches = q.batch_summaries().await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "batches": batches }))?
        );
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header([
        "batch",
        "jobs",
        "pending",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "spent (USD)",
        "budget (USD)",
        "ETA",
    ]);
    for b in &batches {
        t.add_row([
            b.batch.clone(),
            b.jobs.to_string(),
            b.counts.pending.to_string(),
            b.counts.running.to_string(),
            b.counts.succeeded.to_string(),
            b.counts.failed.to_string(),
            b.counts.cancelled.to_string(),
            b.cost_usd.round_dp(4).to_string(),
            b.budget_usd.map(|b| b.to_string()).unwrap_or_default(),
            eta(b),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn eta(b: &BatchSummary) -> String {
    match b.eta_seconds {
        Some(s) => humantime::format_duration(Duration::from_secs(s.max(0) as u64)).to_string(),
        None if b.counts.pending + b.counts.running == 0 => "done".to_owned(),
        None => "-".to_owned(),
    }
}

async fn show(q: &Queue, batch: &str, json: bool) -> anyhow::Result<()> {
    let Some(s) = q.batch_summary(batch).await? else {
        bail!("no job and no budget has batch {batch:?}");
    };
    let record = q.batch_record(batch).await?;
    let failures = q.batch_failures(batch, FAILURE_GROUPS).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "summary": s, "batch": record, "failures": failures,
            }))?
        );
        return Ok(());
    }
    println!("batch {:?}: {} job(s)", s.batch, s.jobs);
    if let Some(r) = &record {
        if let Some(src) = &r.source {
            println!("  submitted from {src} (last at {})", r.updated_at);
        }
        if let Some(t) = &r.template {
            println!("  template: {t}");
        }
        if let Some(k) = &r.key_template {
            println!("  key: {k}");
        }
        if let Some(c) = &r.callback_url {
            println!("  callback URL: {c}");
        }
    }
    for (state, n) in s.counts.pairs() {
        println!("  {state:<10} {n}");
    }
    match s.budget_usd {
        Some(b) => println!(
            "spent ${} of ${b} budget (${} left)",
            s.cost_usd.round_dp(4),
            s.budget_remaining_usd.unwrap_or_default().round_dp(4)
        ),
        None => println!("spent ${} (no budget)", s.cost_usd.round_dp(4)),
    }
    println!(
        "throughput: {} job(s) finished in the last {} min; ETA {}",
        s.finished_recently,
        imagegen::queue::api::ETA_WINDOW.as_secs() / 60,
        eta(&s)
    );
    if !failures.is_empty() {
        println!("failures by error:");
        for f in failures {
            println!(
                "  {:>6} x {} (e.g. job {})",
                f.jobs,
                f.error.as_deref().unwrap_or("(no error recorded)"),
                f.example_id
            );
        }
    }
    Ok(())
}

async fn watch(q: &Queue, batch: &str) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    loop {
        let Some(s) = q.batch_summary(batch).await? else {
            bail!("no job and no budget has batch {batch:?}");
        };
        let finished = s.counts.succeeded + s.counts.failed + s.counts.cancelled;
        let rate =
            s.finished_recently as f64 / (imagegen::queue::api::ETA_WINDOW.as_secs_f64() / 60.0);
        let status = format!(
            "{finished}/{} done, {} failed, ${} spent{}, {rate:.1}/min, ETA {}",
            s.jobs,
            s.counts.failed,
            s.cost_usd.round_dp(4),
            s.budget_usd
                .map(|b| format!(" of ${b}"))
                .unwrap_or_default(),
            eta(&s)
        );
        let done = s.counts.pending + s.counts.running == 0;
        if terminal {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(s.jobs.max(0) as u64);
                if let Ok(style) = ProgressStyle::with_template("{bar:40} {msg}") {
                    b.set_style(style);
                }
                b
            });
            b.set_length(s.jobs.max(0) as u64);
            b.set_position(finished.max(0) as u64);
            b.set_message(status.clone());
            if done {
                b.finish();
            }
        } else {
            println!("{}: {status}", chrono::Utc::now().format("%H:%M:%S"));
            let _ = std::io::stdout().flush();
        }
        if done {
            println!("batch {batch:?} finished: {status}");
            return Ok(());
        }
        tokio::time::sleep(if terminal {
            WATCH_REFRESH
        } else {
            WATCH_LINE_EVERY
        })
        .await;
    }
}

/// `batch retry-failed B` and `retry --failed [--batch B]`.
pub async fn retry_failed(q: &Queue, batch: Option<&str>) -> anyhow::Result<()> {
    let n = q.retry_failed(batch).await?;
    match batch {
        Some(b) => println!("{n} failed job(s) of batch {b:?} pending again"),
        None => println!("{n} failed job(s) pending again"),
    }
    Ok(())
}

/// `batch cancel B` and `cancel --batch B`.
pub async fn cancel(q: &Queue, batch: &str) -> anyhow::Result<()> {
    let n = q.cancel_batch(batch).await?;
    println!("{n} pending job(s) of batch {batch:?} cancelled");
    Ok(())
}

/// `batch budget B USD|--clear` and `budget set|clear`.
pub async fn set_budget(q: &Queue, batch: &str, usd: Option<Decimal>) -> anyhow::Result<()> {
    q.set_batch_budget(batch, usd)
        .await
        .map_err(explain_constraint)?;
    match usd {
        Some(usd) => println!("batch {batch:?}: budget ${usd}"),
        None => println!("batch {batch:?}: no budget"),
    }
    Ok(())
}

async fn write_report(q: &Queue, a: ReportArgs) -> anyhow::Result<()> {
    let format = a.format.unwrap_or_else(|| {
        let lower = a.output.to_ascii_lowercase();
        if lower.ends_with(".html") || lower.ends_with(".htm") {
            ReportFormat::Html
        } else if lower.ends_with(".json") {
            ReportFormat::Json
        } else {
            ReportFormat::Csv
        }
    });
    // The storage is read only for thumbnails and presigned URLs.
    let storage = if format == ReportFormat::Html || a.presign.is_some() {
        Some(Storage::open(&a.storage).await?)
    } else {
        None
    };
    let bytes = report::render(
        q,
        storage.as_ref(),
        &a.batch,
        format,
        &ReportOptions {
            presign: a.presign,
            ..ReportOptions::default()
        },
    )
    .await?;
    if a.output == "-" {
        std::io::stdout().write_all(&bytes)?;
    } else {
        std::fs::write(&a.output, &bytes).with_context(|| format!("cannot write {}", a.output))?;
        eprintln!("wrote {} ({} bytes)", a.output, bytes.len());
    }
    Ok(())
}
