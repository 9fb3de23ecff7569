//! `imagegen bench`: the benchmarks the project ships, against the local Postgres and the
//! stand-in provider, printing each figure beside its target (or one JSON object per scenario).
//!
//! Scenarios ([`Scenario`]):
//! - `queue`: N no-op jobs inserted in one statement, drained by one real [`Worker`] (the same
//!   claim, lease, attempt row and fenced completion as real jobs), at each concurrency.
//! - `growth`: the same drain with a million finished jobs (and their attempt rows) already in
//!   the tables, against the empty-table rate.
//! - `wakeup`: an idle worker and single `INSERT`s from another connection; the time from
//!   sending the `INSERT` to the handler holding the claimed job.
//! - `pipeline`: the stand-in at a fixed latency with full-size images, the real client, the
//!   real pipeline and local storage, at each concurrency: efficiency (achieved jobs/s over
//!   concurrency / latency), peak RSS and CPU seconds per job of the worker process.
//! - `api`: `GET /api/v1/jobs` with each filter, a cursor walk, stats and batches through the
//!   real router, with a million finished jobs in the table ([`api`]).
//! - `enqueue`: rows per second of a bulk enqueue through `imagegen enqueue --file` and through
//!   one SQL statement.
//! - `renditions`: CPU milliseconds per job of the image work (decode, placeholder, `thumb`, and
//!   `og` + `thumb`) from a 1344x768 and a 4K original ([`renditions`]).
//!
//! Benchmarks never touch the user's database: each measurement starts from a freshly created
//! database of their own ([`DEFAULT_BENCH_DATABASE`], on the server `DATABASE_URL` points at),
//! dropped at the end. Drains are timed after an uncounted warm-up drain on the same connections,
//! and repeated ([`DEFAULT_REPEAT`]) for a median: the machine they run on is usually shared.
//! The SQL in this module plays the application's side (plain `INSERT`s, as the README's
//! contract says) and builds fixtures (finished history); every worker-side transition goes
//! through [`crate::queue`].
//!
//! These are figures, not tests: nothing here asserts a time. A run checks only that every job
//! ended as it should (so a fast but wrong queue cannot post a figure).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::ValueEnum;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};
use sqlx::migrate::MigrateDatabase;
use sqlx::{ConnectOptions, PgPool, Postgres};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::db;

mod api;
mod batch;
mod pages;
mod prune;
pub mod renditions;
use crate::openrouter::fake::{DEFAULT_IMAGE_BYTES, FakeConfig, FakeServer};
use crate::openrouter::{Client, Config as ClientConfig, ImageRequest, models};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::queue::{Job, Queue};
use crate::storage::{Storage, StorageConfig};
use crate::worker::{Failure, FnHandler, Success, Worker, WorkerConfig};

/// The database the benchmarks create, drop and recreate. Names not starting with
/// [`BENCH_DATABASE_PREFIX`] are refused, so a typo cannot drop real data.
pub const DEFAULT_BENCH_DATABASE: &str = "imagegen_bench";
/// Every benchmark database name starts with this.
pub const BENCH_DATABASE_PREFIX: &str = "imagegen_bench";
/// No-op jobs per drain (queue and growth).
pub const DEFAULT_JOBS: u64 = 20_000;
/// Worker concurrencies of the queue and growth drains.
pub const DEFAULT_QUEUE_CONCURRENCY: [usize; 3] = [10, 50, 500];
/// Each drain runs this many times and the median is reported: the machine is shared and
/// single runs vary by tens of percent.
pub const DEFAULT_REPEAT: usize = 3;
/// Jobs of the uncounted drain that opens every measurement's pool, so connections, prepared
/// statements and caches are warm before anything is timed.
pub const WARMUP_JOBS: u64 = 1_000;
/// Finished jobs already in the table for the growth scenario.
pub const DEFAULT_HISTORY: u64 = 1_000_000;
/// Single `INSERT`s timed by the wake-up scenario.
pub const DEFAULT_WAKEUPS: usize = 200;
/// Pause between wake-up samples, so the worker is parked in its wait, not still finishing the
/// previous job, when the next row arrives.
pub const WAKEUP_GAP: Duration = Duration::from_millis(5);
/// The longest one wake-up sample may take before the scenario fails (a lost wake-up shows as
/// the poll interval, which is far below this).
const WAKEUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The stand-in's latency in the pipeline scenario.
pub const DEFAULT_LATENCY: Duration = Duration::from_secs(2);
/// Pipeline jobs per run, in multiples of the concurrency: every slot runs this many calls.
pub const DEFAULT_ROUNDS: usize = 3;
/// Prompts of the enqueue scenario.
pub const DEFAULT_ENQUEUE_ROWS: usize = 100_000;
/// How long the child stand-in may take to print its address.
const STAND_IN_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The API key the stand-in is told to accept (not a secret: it guards nothing).
const STAND_IN_KEY: &str = "bench-key-not-a-secret";
/// Batch label of the pipeline jobs (a batch makes each job read its budget, as real batches do).
const PIPELINE_BATCH: &str = "bench-pipeline";
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 per second on Linux.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// Throughput of graphile-worker on this kind of machine, no-op jobs, with batching on (local
/// queue of 500, batched completions): the figure the queue must beat.
pub const TARGET_QUEUE_JOBS_PER_S: f64 = 34_000.0;
/// graphile-worker with its defaults, for reference.
pub const GRAPHILE_DEFAULT_JOBS_PER_S: f64 = 2_350.0;
/// The drain with history must keep at least this share of the empty-table rate.
pub const TARGET_GROWTH_RATIO: f64 = 0.90;
/// Median insert-to-claim latency of an idle worker must stay under this.
pub const TARGET_WAKEUP_P50: Duration = Duration::from_millis(5);
/// Pipeline efficiency at 1,000 in flight and 20 s latency, answers in bursts.
pub const TARGET_EFFICIENCY_LONG: f64 = 0.97;
/// Pipeline efficiency at 256 in flight and 2 s latency (where CPU per image dominates).
pub const TARGET_EFFICIENCY_SHORT: f64 = 0.90;
/// Peak resident memory of the worker process with 1,000 flash calls (or 200 Pro 4K calls) in
/// flight, thumbnails on.
pub const TARGET_PEAK_RSS_MIB: f64 = 256.0;
/// Worker CPU per 1.2 MB image, renditions off.
pub const TARGET_CPU_MS_FLASH: f64 = 2.5;
/// Worker CPU per 7.9 MB Pro 4K image, renditions off.
pub const TARGET_CPU_MS_4K: f64 = 16.0;

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Drain N no-op jobs at each concurrency.
    Queue,
    /// The same drain with a million finished jobs in the table.
    Growth,
    /// Insert-to-claim latency of an idle worker.
    Wakeup,
    /// The real pipeline against the stand-in at a fixed latency.
    Pipeline,
    /// Bulk enqueue through the CLI and through SQL.
    Enqueue,
    /// GET /api/v1/jobs and the other reads with a million jobs in the table.
    Api,
    /// CPU per job of renditions (thumb; og + thumb) from 1344x768 and 4K originals.
    Renditions,
    /// `imagegen batch submit` of a 100,000-row CSV, and the same file again.
    Batch,
    /// `imagegen prune` over a million finished jobs, chunk by chunk.
    Prune,
    /// The dashboard's overview and batch pages with a million jobs in the table.
    Pages,
    /// Every scenario, in this order.
    All,
}

/// `imagegen bench` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run.
    #[arg(value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// No-op jobs per drain (queue, growth).
    #[arg(long, default_value_t = DEFAULT_JOBS)]
    pub jobs: u64,
    /// Worker concurrency; repeat the flag or separate with commas for several runs. Default:
    /// 10,50,500 for queue and growth; for pipeline, the cases of the targets (see
    /// [`pipeline_cases`]), while a given concurrency runs one case each with the flags below.
    /// Given with `all`, it applies to all three.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Runs per drain (queue, growth); the median is reported.
    #[arg(long, default_value_t = DEFAULT_REPEAT)]
    pub repeat: usize,
    /// Finished jobs put in the table before the growth drains.
    #[arg(long, default_value_t = DEFAULT_HISTORY)]
    pub history: u64,
    /// Single inserts timed by the wake-up scenario.
    #[arg(long, default_value_t = DEFAULT_WAKEUPS)]
    pub wakeups: usize,
    /// How long each stand-in call works (pipeline).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Pipeline jobs per run, as a multiple of the concurrency.
    #[arg(long, default_value_t = DEFAULT_ROUNDS)]
    pub rounds: usize,
    /// Size of the stand-in's 1K 16:9 image in bytes (pipeline); other sizes scale with their
    /// pixels (the Pro model at 4K makes about 6.6 times this).
    #[arg(long, default_value_t = DEFAULT_IMAGE_BYTES)]
    pub image_bytes: usize,
    /// Model of the pipeline jobs, with --concurrency (e.g. google/gemini-3-pro-image-preview).
    #[arg(long, default_value = models::FLASH_IMAGE)]
    pub model: String,
    /// Image size of the pipeline jobs, with --concurrency (1K, 2K, 4K; the Pro model only).
    #[arg(long)]
    pub image_size: Option<String>,
    /// The stand-in answers each latency-long round's calls together (pipeline, with
    /// --concurrency), as real traffic after a restart arrives.
    #[arg(long)]
    pub burst: bool,
    /// No automatic thumbnail (pipeline, with --concurrency).
    #[arg(long)]
    pub no_thumbnail: bool,
    /// The stand-in refuses calls beyond this many in flight with 402
    /// `in_flight_budget_exhausted` (pipeline, with --concurrency); the bench prints where the
    /// worker's ceiling settled.
    #[arg(long)]
    pub in_flight_limit: Option<usize>,
    /// Where the pipeline stores images (a directory or s3://...). Default: a fresh directory
    /// under /dev/shm (tmpfs, so the disk's flushes are not what is measured), or the temporary
    /// directory where there is no /dev/shm. A directory made by the bench is removed after.
    #[arg(long)]
    pub storage: Option<String>,
    /// Answers the client buffers and decodes at once (pipeline); default: the client's own
    /// default, as `imagegen worker` runs.
    #[arg(long)]
    pub max_concurrent_bodies: Option<usize>,
    /// Run the stand-in inside this process instead of as a child `imagegen fake-openrouter`
    /// (then peak RSS and CPU include the stand-in's).
    #[arg(long)]
    pub in_process_stand_in: bool,
    /// Prompts in the bulk enqueue.
    #[arg(long, default_value_t = DEFAULT_ENQUEUE_ROWS)]
    pub enqueue_rows: usize,
    /// The `imagegen` binary used for the child stand-in and the CLI enqueue. Default: this
    /// executable.
    #[arg(long)]
    pub imagegen_bin: Option<PathBuf>,
    /// The database the benchmarks drop, recreate and finally drop, on the server of
    /// DATABASE_URL. Must start with `imagegen_bench`.
    #[arg(long, default_value = DEFAULT_BENCH_DATABASE)]
    pub bench_database: String,
    /// Print one JSON object per scenario (one per line) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Jobs per measurement of the renditions scenario at 1344x768 (4K runs an eighth).
    #[arg(long, default_value_t = renditions::DEFAULT_RENDITION_JOBS)]
    pub rendition_jobs: usize,
    /// The originals the renditions scenario measures from.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "1k,4k")]
    pub rendition_sources: Vec<renditions::RenditionSource>,
    /// Rows of the CSV the batch scenario submits.
    #[arg(long, default_value_t = batch::TARGET_ROWS)]
    pub batch_rows: usize,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            scenario: Scenario::All,
            jobs: DEFAULT_JOBS,
            concurrency: Vec::new(),
            repeat: DEFAULT_REPEAT,
            history: DEFAULT_HISTORY,
            wakeups: DEFAULT_WAKEUPS,
            latency: DEFAULT_LATENCY,
            rounds: DEFAULT_ROUNDS,
            image_bytes: DEFAULT_IMAGE_BYTES,
            model: models::FLASH_IMAGE.to_owned(),
            image_size: None,
            burst: false,
            no_thumbnail: false,
            in_flight_limit: None,
            storage: None,
            max_concurrent_bodies: None,
            in_process_stand_in: false,
            enqueue_rows: DEFAULT_ENQUEUE_ROWS,
            imagegen_bin: None,
            bench_database: DEFAULT_BENCH_DATABASE.to_owned(),
            json: false,
            rendition_jobs: renditions::DEFAULT_RENDITION_JOBS,
            rendition_sources: vec![
                renditions::RenditionSource::OneK,
                renditions::RenditionSource::FourK,
            ],
            batch_rows: batch::TARGET_ROWS,
        }
    }
}

/// One scenario's outcome: rows for the table and the JSON object.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: &'static str,
    /// What was run, in a line.
    pub title: String,
    pub rows: Vec<Row>,
    pub json: Value,
}

/// One figure beside its target.
#[derive(Debug, Clone)]
pub struct Row {
    pub measure: String,
    pub figure: String,
    /// Empty when the figure has no target.
    pub target: String,
    /// "met", "missed by ...", or empty without a target.
    pub verdict: String,
}

impl Row {
    fn info(measure: impl Into<String>, figure: impl Into<String>) -> Row {
        Row {
            measure: measure.into(),
            figure: figure.into(),
            target: String::new(),
            verdict: String::new(),
        }
    }
}

/// Runs the scenario(s) in `args` and prints each scenario's figures as it completes: a table,
/// or with `--json` one JSON object per line (the queue scenario's best median throughput under
/// `jobs_per_s`).
pub async fn run(database_url: &str, args: BenchArgs) -> anyhow::Result<()> {
    let machine = machine(database_url).await;
    if !args.json {
        println!("machine: {}", machine_line(&machine));
        if tracing::enabled!(target: "imagegen::worker", tracing::Level::INFO) {
            eprintln!(
                "note: info logs are on, so the worker logs a line per job and the figures \
                 include it; RUST_LOG=warn (as `just bench` sets) measures without"
            );
        }
    }
    measure(database_url, &args, |mut report| {
        if let Value::Object(o) = &mut report.json {
            o.insert("machine".into(), machine.clone());
        }
        if args.json {
            println!("{}", report.json);
        } else {
            println!("\n{}: {}", report.scenario, report.title);
            println!("{}", table(&report.rows));
        }
    })
    .await
}

/// Runs the scenario(s) and hands each report to `emit` as it completes. The bench database is
/// dropped at the end, whatever happened.
pub async fn measure(
    database_url: &str,
    args: &BenchArgs,
    mut emit: impl FnMut(Report),
) -> anyhow::Result<()> {
    ensure!(args.jobs > 0, "--jobs must be at least 1");
    ensure!(args.repeat > 0, "--repeat must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        args.concurrency.iter().all(|c| *c > 0),
        "--concurrency must be at least 1"
    );
    let bench = BenchDb::new(database_url, &args.bench_database)?;
    let result = scenarios(&bench, args, &mut emit).await;
    let dropped = bench.drop().await;
    result?;
    dropped
}

async fn scenarios(
    bench: &BenchDb,
    args: &BenchArgs,
    emit: &mut impl FnMut(Report),
) -> anyhow::Result<()> {
    let all = args.scenario == Scenario::All;
    let mut empty_rates = None;
    if all || args.scenario == Scenario::Queue {
        let (report, rates) = queue_scenario(bench, args).await?;
        empty_rates = Some(rates);
        emit(report);
    }
    if all || args.scenario == Scenario::Growth {
        emit(growth_scenario(bench, args, empty_rates).await?);
    }
    if all || args.scenario == Scenario::Wakeup {
        emit(wakeup_scenario(bench, args).await?);
    }
    if all || args.scenario == Scenario::Pipeline {
        emit(pipeline_scenario(bench, args).await?);
    }
    if all || args.scenario == Scenario::Enqueue {
        emit(enqueue_scenario(bench, args).await?);
    }
    if all || args.scenario == Scenario::Api {
        emit(api::api_scenario(bench, args).await?);
    }
    if all || args.scenario == Scenario::Renditions {
        // CPU-bound and single-threaded: off the async threads.
        let a = args.clone();
        emit(tokio::task::spawn_blocking(move || renditions::renditions_scenario(&a)).await??);
    }
    if all || args.scenario == Scenario::Batch {
        emit(batch::batch_scenario(bench, args).await?);
    }
    if all || args.scenario == Scenario::Prune {
        emit(prune::prune_scenario(bench, args).await?);
    }
    if all || args.scenario == Scenario::Pages {
        emit(pages::pages_scenario(bench, args).await?);
    }
    Ok(())
}

/// The benchmark database: dropped and recreated per measurement, never the user's.
struct BenchDb {
    url: String,
}

impl BenchDb {
    fn new(database_url: &str, name: &str) -> anyhow::Result<BenchDb> {
        ensure!(
            name.starts_with(BENCH_DATABASE_PREFIX)
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "--bench-database must start with {BENCH_DATABASE_PREFIX} and contain only letters, \
             digits and underscores (it is dropped and recreated)"
        );
        let url = with_database(database_url, name)?;
        Ok(BenchDb { url })
    }

    /// An empty, migrated database and a pool of `max_connections` on it.
    async fn fresh(&self, max_connections: u32) -> anyhow::Result<PgPool> {
        self.drop().await?;
        let pool = db::connect(&self.url, max_connections).await?;
        db::migrate(&pool).await?;
        Ok(pool)
    }

    async fn drop(&self) -> anyhow::Result<()> {
        Postgres::force_drop_database(&self.url)
            .await
            .with_context(|| format!("dropping {}", db::describe(&self.url)))
    }
}

/// `url` with its database name replaced by `name` (user, password, host and query kept).
pub fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(scheme_end) = base.find("://") else {
        bail!("DATABASE_URL is not a URL (expected postgres://...)");
    };
    let authority_start = scheme_end + 3;
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// Pool size of a worker at `concurrency`, as `imagegen worker` sizes it: the claimer, the
/// completion writer, renewals, rescues and the listener need a few connections, never one per
/// job (no connection is held during a job).
fn worker_pool_size(concurrency: usize) -> u32 {
    u32::try_from(concurrency.clamp(4, 32)).unwrap_or(32)
}

fn concurrencies(args: &BenchArgs, default: &[usize]) -> Vec<usize> {
    if args.concurrency.is_empty() {
        default.to_vec()
    } else {
        args.concurrency.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Queue core and growth

/// One timed drain.
#[derive(Debug, Clone, Copy)]
struct DrainRun {
    seconds: f64,
    jobs_per_s: f64,
    worker_cpu_s: f64,
    postgres_cpu_s: f64,
    /// Claim statements that returned jobs.
    claims: u64,
    /// Completion transactions (attempt rows share their transaction's `now()`).
    completion_writes: i64,
}

/// The runs of one concurrency, and their median.
#[derive(Debug, Clone)]
struct DrainSeries {
    concurrency: usize,
    runs: Vec<DrainRun>,
}

impl DrainSeries {
    fn median(&self) -> f64 {
        median(self.runs.iter().map(|r| r.jobs_per_s).collect())
    }

    fn json(&self, jobs: u64) -> Value {
        let per_job =
            |f: fn(&DrainRun) -> f64| median(self.runs.iter().map(f).collect()) / jobs as f64 * 1e6;
        json!({
            "concurrency": self.concurrency,
            "jobs_per_s": round(self.median(), 0),
            "samples_jobs_per_s": self.runs.iter().map(|r| round(r.jobs_per_s, 0)).collect::<Vec<_>>(),
            "seconds": self.runs.iter().map(|r| round(r.seconds, 3)).collect::<Vec<_>>(),
            "worker_cpu_us_per_job": round(per_job(|r| r.worker_cpu_s), 1),
            "postgres_cpu_us_per_job": round(per_job(|r| r.postgres_cpu_s), 1),
            "jobs_per_claim": round(median(self.runs.iter().map(|r| jobs as f64 / r.claims.max(1) as f64).collect()), 1),
            "jobs_per_completion_write": round(median(self.runs.iter().map(|r| jobs as f64 / r.completion_writes.max(1) as f64).collect()), 1),
        })
    }
}

/// Inserts `n` no-op jobs in one statement, as an application's bulk insert would.
async fn insert_noop_jobs(pool: &PgPool, n: u64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt) \
         SELECT 'bench no-op job ' || g FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .execute(pool)
    .await
    .context("inserting the jobs")?;
    Ok(())
}

/// Jobs per state, and attempt rows: what a drain must change and nothing else.
async fn tally(pool: &PgPool) -> anyhow::Result<(HashMap<String, i64>, i64)> {
    let states = Queue::new(pool.clone())
        .counts(false, None)
        .await?
        .into_iter()
        .map(|c| (c.state, c.jobs))
        .collect();
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts")
        .fetch_one(pool)
        .await?;
    Ok((states, attempts))
}

/// Drains `n` freshly inserted no-op jobs with one worker at `concurrency`, timed from the
/// worker's start to its last completion written, then checks every job succeeded once with one
/// attempt row.
async fn drain(pool: &PgPool, n: u64, concurrency: usize) -> anyhow::Result<DrainRun> {
    insert_noop_jobs(pool, n).await?;
    let (before, attempts_before) = tally(pool).await?;
    let handler = FnHandler(|_job: Job| async { Ok::<_, Failure>(Success::default()) });
    let config = WorkerConfig {
        concurrency,
        exit_when_idle: true,
        ..WorkerConfig::default()
    };
    let worker = Worker::new(Queue::new(pool.clone()), handler, config);
    let mut status = worker.status();
    let cpu = CpuClock::start(None);
    let wall_start = chrono::Utc::now();
    let started = Instant::now();
    let run = tokio::spawn(worker.run(CancellationToken::new()));
    let finished = status.wait_for(|s| s.completed >= n).await.is_ok();
    let seconds = started.elapsed().as_secs_f64();
    let (worker_cpu_s, _, postgres_cpu_s) = cpu.elapsed();
    run.await.context("worker task")??;
    ensure!(finished, "the worker stopped before draining the queue");

    let claims = status.borrow().claims;
    let (after, attempts_after) = tally(pool).await?;
    let completion_writes: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT finished_at) FROM imagegen.attempts WHERE finished_at >= $1",
    )
    .bind(wall_start)
    .fetch_one(pool)
    .await?;
    let get = |m: &HashMap<String, i64>, s: &str| m.get(s).copied().unwrap_or(0);
    let succeeded = get(&after, "succeeded") - get(&before, "succeeded");
    ensure!(
        u64::try_from(succeeded).ok() == Some(n)
            && get(&after, "pending") == 0
            && get(&after, "running") == 0
            && u64::try_from(attempts_after - attempts_before).ok() == Some(n),
        "drain ended wrong: {succeeded} of {n} succeeded, {} attempt rows, states {after:?}",
        attempts_after - attempts_before
    );
    Ok(DrainRun {
        seconds,
        jobs_per_s: n as f64 / seconds,
        worker_cpu_s,
        postgres_cpu_s,
        claims,
        completion_writes,
    })
}

/// A warm-up drain, then `args.repeat` timed drains at `concurrency` on `pool`; with `empty`,
/// each on an empty table.
async fn drain_series(
    pool: &PgPool,
    args: &BenchArgs,
    concurrency: usize,
    scenario: &str,
    empty: bool,
) -> anyhow::Result<DrainSeries> {
    progress(
        args,
        format!("{scenario}: warm-up drain at concurrency {concurrency}"),
    );
    drain(pool, WARMUP_JOBS.min(args.jobs), concurrency).await?;
    let mut series = DrainSeries {
        concurrency,
        runs: Vec::new(),
    };
    for i in 1..=args.repeat {
        if empty {
            sqlx::query("TRUNCATE imagegen.jobs CASCADE")
                .execute(pool)
                .await
                .context("emptying the jobs table")?;
        }
        progress(
            args,
            format!(
                "{scenario}: drain {i}/{} of {} jobs at concurrency {concurrency}",
                args.repeat, args.jobs
            ),
        );
        series.runs.push(drain(pool, args.jobs, concurrency).await?);
    }
    Ok(series)
}

async fn queue_scenario(
    bench: &BenchDb,
    args: &BenchArgs,
) -> anyhow::Result<(Report, Vec<DrainSeries>)> {
    let mut all = Vec::new();
    for c in concurrencies(args, &DEFAULT_QUEUE_CONCURRENCY) {
        let pool = bench.fresh(worker_pool_size(c)).await?;
        let series = drain_series(&pool, args, c, "queue", true).await;
        pool.close().await;
        all.push(series?);
    }
    let best = all.iter().map(DrainSeries::median).fold(0.0, f64::max);
    let mut rows: Vec<Row> = all
        .iter()
        .map(|s| Row {
            measure: format!("drain, concurrency {}", s.concurrency),
            figure: format!("{} jobs/s", thousands(s.median())),
            target: format!("> {} jobs/s", thousands(TARGET_QUEUE_JOBS_PER_S)),
            verdict: verdict_at_least(s.median(), TARGET_QUEUE_JOBS_PER_S),
        })
        .collect();
    rows.push(Row::info(
        "graphile-worker, defaults / batched (reference)",
        format!(
            "{} / {} jobs/s",
            thousands(GRAPHILE_DEFAULT_JOBS_PER_S),
            thousands(TARGET_QUEUE_JOBS_PER_S)
        ),
    ));
    for s in &all {
        let j = s.json(args.jobs);
        rows.push(Row::info(
            format!("CPU per job, concurrency {}", s.concurrency),
            format!(
                "worker {} µs, postgres {} µs",
                j["worker_cpu_us_per_job"], j["postgres_cpu_us_per_job"]
            ),
        ));
    }
    let report = Report {
        scenario: "queue",
        title: format!(
            "{} no-op jobs inserted in one statement, drained by one worker; median of {} run(s) \
             on an empty table, after an uncounted warm-up drain",
            thousands(args.jobs as f64),
            args.repeat
        ),
        rows,
        json: json!({
            "scenario": "queue",
            "jobs": args.jobs,
            "repeat": args.repeat,
            "jobs_per_s": round(best, 0),
            "target_jobs_per_s": TARGET_QUEUE_JOBS_PER_S,
            "runs": all.iter().map(|s| s.json(args.jobs)).collect::<Vec<_>>(),
        }),
    };
    Ok((report, all))
}

/// Fills the tables with `n` finished jobs (one statement), one attempt row each (another), then
/// vacuums and analyzes, as a long-lived installation's autovacuum would have. On a connection of
/// its own that does not log these (expectedly) slow statements.
async fn insert_history(url: &str, n: u64) -> anyhow::Result<()> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let mut conn = options.disable_statement_logging().connect().await?;
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt, batch, state, attempts, image_urls, prompt_tokens, \
             completion_tokens, cost_usd, run_at, created_at, started_at, finished_at, \
             updated_at) \
         SELECT 'history job ' || g, 'history-' || (g % 100), \
             CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END, 1, \
             CASE WHEN g % 50 = 0 THEN '{}'::text[] \
                 ELSE ARRAY['file:///history/' || g || '.png'] END, \
             12, 1290, 0.0387, t, t, t, t + interval '20 seconds', t + interval '20 seconds' \
         FROM generate_series(1, $1::bigint) AS g, \
             LATERAL (SELECT now() - interval '30 days' + g * interval '2 seconds' AS t) AS ts",
    )
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .execute(&mut conn)
    .await
    .context("inserting finished jobs")?;
    sqlx::query(
        "INSERT INTO imagegen.attempts (job_id, attempt, worker_id, started_at, finished_at, \
             outcome, http_status, prompt_tokens, completion_tokens, image_tokens, cost_usd, \
             duration_ms) \
         SELECT id, 1, '00000000-0000-4000-8000-000000000000'::uuid, started_at, finished_at, \
             state, 200, prompt_tokens, completion_tokens, 1290, cost_usd, 20000 \
         FROM imagegen.jobs",
    )
    .execute(&mut conn)
    .await
    .context("inserting attempt rows")?;
    sqlx::query("VACUUM (ANALYZE) imagegen.jobs")
        .execute(&mut conn)
        .await?;
    sqlx::query("VACUUM (ANALYZE) imagegen.attempts")
        .execute(&mut conn)
        .await?;
    Ok(())
}

async fn growth_scenario(
    bench: &BenchDb,
    args: &BenchArgs,
    empty: Option<Vec<DrainSeries>>,
) -> anyhow::Result<Report> {
    let cs = concurrencies(args, &DEFAULT_QUEUE_CONCURRENCY);
    let empty = match empty {
        Some(e) => e,
        None => queue_scenario(bench, args).await?.1,
    };
    progress(
        args,
        format!(
            "growth: inserting {} finished jobs and their attempts",
            thousands(args.history as f64)
        ),
    );
    let setup = Instant::now();
    bench.fresh(2).await?.close().await;
    insert_history(&bench.url, args.history).await?;
    let setup_s = setup.elapsed().as_secs_f64();
    let mut with_history = Vec::new();
    for &c in &cs {
        let pool = db::connect(&bench.url, worker_pool_size(c)).await?;
        let series = drain_series(&pool, args, c, "growth", false).await;
        pool.close().await;
        with_history.push(series?);
    }

    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for s in &with_history {
        let base = empty
            .iter()
            .find(|e| e.concurrency == s.concurrency)
            .map(DrainSeries::median);
        let rate = s.median();
        let ratio = base.map(|b| rate / b);
        rows.push(Row {
            measure: format!("drain with history, concurrency {}", s.concurrency),
            figure: match (base, ratio) {
                (Some(b), Some(r)) => format!(
                    "{} jobs/s ({:.0} % of {} empty)",
                    thousands(rate),
                    r * 100.0,
                    thousands(b)
                ),
                _ => format!("{} jobs/s", thousands(rate)),
            },
            target: format!(">= {:.0} % of empty", TARGET_GROWTH_RATIO * 100.0),
            verdict: ratio.map_or_else(String::new, |r| verdict_at_least(r, TARGET_GROWTH_RATIO)),
        });
        let mut j = s.json(args.jobs);
        if let Value::Object(o) = &mut j {
            o.insert("empty_jobs_per_s".into(), json!(base.map(|b| round(b, 0))));
            o.insert("ratio".into(), json!(ratio.map(|r| round(r, 3))));
        }
        runs.push(j);
    }
    rows.push(Row::info(
        "setup (insert, vacuum, analyze)",
        format!("{setup_s:.1} s"),
    ));
    let worst = with_history
        .iter()
        .filter_map(|s| {
            empty
                .iter()
                .find(|e| e.concurrency == s.concurrency)
                .map(|e| s.median() / e.median())
        })
        .fold(f64::INFINITY, f64::min);
    Ok(Report {
        scenario: "growth",
        title: format!(
            "the same drain with {} finished jobs and their attempt rows already in the tables \
             (vacuumed and analyzed), against the queue scenario's empty-table rate; median of {} \
             run(s)",
            thousands(args.history as f64),
            args.repeat
        ),
        rows,
        json: json!({
            "scenario": "growth",
            "jobs": args.jobs,
            "history": args.history,
            "repeat": args.repeat,
            "worst_ratio": if worst.is_finite() { json!(round(worst, 3)) } else { Value::Null },
            "target_ratio": TARGET_GROWTH_RATIO,
            "setup_s": round(setup_s, 1),
            "runs": runs,
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// Wake-up

async fn wakeup_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    ensure!(args.wakeups > 0, "--wakeups must be at least 1");
    progress(
        args,
        format!("wakeup: {} single inserts to an idle worker", args.wakeups),
    );
    let pool = bench.fresh(worker_pool_size(10)).await?;
    // The application: its own connection, not the worker's pool.
    let app = db::connect(&bench.url, 1).await?;
    let result = wakeups(&pool, &app, args.wakeups).await;
    app.close().await;
    pool.close().await;
    let mut lat = result?;
    lat.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = percentile(&lat, 0.50);
    let p99 = percentile(&lat, 0.99);
    let max = lat.last().copied().unwrap_or_default();
    let target_ms = ms(TARGET_WAKEUP_P50);
    Ok(Report {
        scenario: "wakeup",
        title: format!(
            "an idle worker (concurrency 10), {} single INSERTs from another connection; time \
             from sending the INSERT to the handler holding the job",
            args.wakeups
        ),
        rows: vec![
            Row {
                measure: "insert-to-claim p50".into(),
                figure: format!("{:.2} ms", ms(p50)),
                target: format!("< {target_ms:.0} ms"),
                verdict: verdict_at_most(ms(p50), target_ms),
            },
            Row::info("insert-to-claim p99", format!("{:.2} ms", ms(p99))),
            Row::info("insert-to-claim max", format!("{:.2} ms", ms(max))),
        ],
        json: json!({
            "scenario": "wakeup",
            "samples": lat.len(),
            "p50_ms": round(ms(p50), 3),
            "p90_ms": round(ms(percentile(&lat, 0.90)), 3),
            "p99_ms": round(ms(p99), 3),
            "max_ms": round(ms(max), 3),
            "target_p50_ms": target_ms,
        }),
    })
}

/// Times `n` single inserts from `app` until a worker on `pool` hands each to its handler.
async fn wakeups(pool: &PgPool, app: &PgPool, n: usize) -> anyhow::Result<Vec<Duration>> {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(i64, Instant)>();
    let handler = FnHandler(move |job: Job| {
        let _ = seen_tx.send((job.id, Instant::now()));
        async { Ok::<_, Failure>(Success::default()) }
    });
    let worker = Worker::new(
        Queue::new(pool.clone()),
        handler,
        WorkerConfig {
            concurrency: 10,
            ..WorkerConfig::default()
        },
    );
    let mut status = worker.status();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let result = async {
        let mut latencies = Vec::with_capacity(n);
        for i in 0..n {
            // Parked: idle with nothing in flight, and the previous job written.
            tokio::time::timeout(
                WAKEUP_TIMEOUT,
                status.wait_for(|s| s.idle && s.in_flight == 0 && s.completed >= i as u64),
            )
            .await
            .context("the worker did not go idle")?
            .context("the worker stopped")?;
            tokio::time::sleep(WAKEUP_GAP).await;
            let sent = Instant::now();
            let id: i64 =
                sqlx::query_scalar("INSERT INTO imagegen.jobs (prompt) VALUES ($1) RETURNING id")
                    .bind(format!("wake-up probe {i}"))
                    .fetch_one(app)
                    .await?;
            let claimed = tokio::time::timeout(WAKEUP_TIMEOUT, async {
                while let Some((job, at)) = seen_rx.recv().await {
                    if job == id {
                        return Some(at);
                    }
                }
                None
            })
            .await
            .context("the inserted job was not claimed")?
            .context("the worker stopped")?;
            latencies.push(claimed.saturating_duration_since(sent));
        }
        anyhow::Ok(latencies)
    }
    .await;
    stop.cancel();
    run.await.context("worker task")??;
    result
}

// ---------------------------------------------------------------------------------------------
// Pipeline

/// The stand-in, as a child process (preferred: the worker's memory and CPU are then its own)
/// or in this process.
enum StandIn {
    Child(tokio::process::Child),
    InProcess(FakeServer),
}

impl StandIn {
    async fn start(args: &BenchArgs, case: &Case) -> anyhow::Result<(StandIn, String)> {
        if args.in_process_stand_in {
            let server = FakeServer::start(FakeConfig {
                latency: case.latency,
                image_bytes: args.image_bytes,
                api_key: Some(STAND_IN_KEY.to_owned()),
                burst: case.burst,
                in_flight_limit: case.in_flight_limit,
                ..FakeConfig::default()
            })
            .await
            .context("starting the stand-in")?;
            let url = server.base_url();
            return Ok((StandIn::InProcess(server), url));
        }
        let bin = imagegen_bin(args)?;
        let mut command = tokio::process::Command::new(&bin);
        command
            .arg("fake-openrouter")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--latency")
            .arg(humantime::format_duration(case.latency).to_string())
            .arg("--image-bytes")
            .arg(args.image_bytes.to_string());
        if case.burst {
            command.arg("--burst");
        }
        if let Some(n) = case.in_flight_limit {
            command.arg("--in-flight-limit").arg(n.to_string());
        }
        let mut child = command
            .env("FAKE_OPENROUTER_API_KEY", STAND_IN_KEY)
            .env("RUST_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} fake-openrouter", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("the stand-in's standard output")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let url = tokio::time::timeout(STAND_IN_START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("OPENROUTER_BASE_URL=") {
                    return Ok(url.trim().to_owned());
                }
            }
            Err(anyhow::anyhow!(
                "the stand-in exited without printing its address"
            ))
        })
        .await
        .context("the stand-in did not start in time")??;
        Ok((StandIn::Child(child), url))
    }

    fn pid(&self) -> Option<u32> {
        match self {
            StandIn::Child(c) => c.id(),
            StandIn::InProcess(_) => None,
        }
    }

    async fn stop(self) {
        match self {
            StandIn::Child(mut c) => {
                let _ = c.kill().await;
            }
            StandIn::InProcess(s) => {
                let _ = s.stop().await;
            }
        }
    }
}

fn imagegen_bin(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    match &args.imagegen_bin {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("finding the imagegen executable"),
    }
}

/// One pipeline run's settings and the targets its figures are held to.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    latency: Duration,
    concurrency: usize,
    model: String,
    image_size: Option<String>,
    thumbnail: bool,
    burst: bool,
    in_flight_limit: Option<usize>,
    efficiency_target: Option<f64>,
    rss_target: Option<f64>,
    cpu_ms_target: Option<f64>,
}

/// The cases of the targets, or, with `--concurrency`, one case per concurrency with
/// the flags given.
fn pipeline_cases(args: &BenchArgs) -> Vec<Case> {
    let pro_4k = |c: &mut Case| {
        c.model = models::PRO_IMAGE.to_owned();
        c.image_size = Some("4K".to_owned());
    };
    let base = Case {
        name: String::new(),
        latency: args.latency,
        concurrency: 1,
        model: args.model.clone(),
        image_size: args.image_size.clone(),
        thumbnail: !args.no_thumbnail,
        burst: args.burst,
        in_flight_limit: args.in_flight_limit,
        efficiency_target: None,
        rss_target: None,
        cpu_ms_target: None,
    };
    if !args.concurrency.is_empty() {
        return args
            .concurrency
            .iter()
            .map(|&c| Case {
                name: format!("{c} in flight"),
                concurrency: c,
                ..base.clone()
            })
            .collect();
    }
    let short = Duration::from_secs(2);
    let long = Duration::from_secs(20);
    let mut cases = vec![
        Case {
            name: "1.2 MB, 2 s, 256 in flight, renditions off".into(),
            latency: short,
            concurrency: 256,
            thumbnail: false,
            efficiency_target: Some(TARGET_EFFICIENCY_SHORT),
            cpu_ms_target: Some(TARGET_CPU_MS_FLASH),
            ..base.clone()
        },
        Case {
            name: "1.2 MB, 2 s, 256 in flight, thumbnail on".into(),
            latency: short,
            concurrency: 256,
            thumbnail: true,
            ..base.clone()
        },
        Case {
            name: "1.2 MB, 20 s, 1,000 in flight, burst, thumbnail on".into(),
            latency: long,
            concurrency: 1000,
            thumbnail: true,
            burst: true,
            efficiency_target: Some(TARGET_EFFICIENCY_LONG),
            rss_target: Some(TARGET_PEAK_RSS_MIB),
            ..base.clone()
        },
        Case {
            name: "Pro 4K, 20 s, 200 in flight, burst, thumbnail on".into(),
            latency: long,
            concurrency: 200,
            thumbnail: true,
            burst: true,
            rss_target: Some(TARGET_PEAK_RSS_MIB),
            ..base.clone()
        },
        Case {
            name: "Pro 4K, 2 s, 64 in flight, renditions off".into(),
            latency: short,
            concurrency: 64,
            thumbnail: false,
            cpu_ms_target: Some(TARGET_CPU_MS_4K),
            ..base.clone()
        },
        Case {
            name: "1.2 MB, 2 s, 256 in flight, provider accepts 200".into(),
            latency: short,
            concurrency: 256,
            thumbnail: false,
            in_flight_limit: Some(200),
            ..base.clone()
        },
    ];
    pro_4k(&mut cases[3]);
    pro_4k(&mut cases[4]);
    cases
}

/// One pipeline run.
#[derive(Debug, Clone)]
struct PipelineRun {
    case: Case,
    jobs: u64,
    seconds: f64,
    jobs_per_s: f64,
    /// End to end: all jobs over the whole run, which includes the first calls' wait (nothing
    /// completes for one latency) and the last wave's processing after its answers arrive.
    efficiency: f64,
    /// The steady state: the jobs after the first wave (one per slot) over the time from that
    /// wave's last completion to the run's last. Both ends carry one wave's processing tail, so
    /// it cancels, and what is left is how many calls per latency the worker keeps going. This
    /// is the figure the efficiency targets are checked against; `None` for a single round.
    steady_jobs_per_s: Option<f64>,
    steady_efficiency: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// The worker's CPU per job, user and kernel time, with its page faults.
    usage_per_job: OwnUsage,
    stand_in_cpu_s_per_job: Option<f64>,
    failed: i64,
    /// The worker's in-flight ceiling at the end, and the calls refused as saturated.
    ceiling: usize,
    saturated: u64,
}

async fn pipeline_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    let (storage_location, made_dir) = match &args.storage {
        Some(s) => (s.clone(), None),
        None => {
            let root = if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let dir = root.join(format!("imagegen-bench-{}", std::process::id()));
            (dir.display().to_string(), Some(dir))
        }
    };
    let result = pipeline_runs(bench, args, &storage_location).await;
    if let Some(dir) = made_dir {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    let runs = result?;

    let mut rows = Vec::new();
    for r in &runs {
        let c = &r.case;
        let ideal = c.concurrency as f64 / c.latency.as_secs_f64();
        let (target, verdict) = match (c.efficiency_target, r.steady_efficiency) {
            (Some(t), Some(e)) => (format!(">= {t}"), verdict_at_least(e, t)),
            _ => (String::new(), String::new()),
        };
        rows.push(Row {
            measure: format!("efficiency (steady state), {}", c.name),
            figure: match (r.steady_efficiency, r.steady_jobs_per_s) {
                (Some(e), Some(j)) => format!("{e:.3} ({j:.1} of {ideal:.1} jobs/s)"),
                _ => "n/a (one round)".to_owned(),
            },
            target,
            verdict,
        });
        rows.push(Row {
            measure: format!("efficiency (end to end), {}", c.name),
            figure: format!(
                "{:.3} ({:.1} of {:.1} jobs/s, {} jobs in {:.1} s)",
                r.efficiency, r.jobs_per_s, ideal, r.jobs, r.seconds
            ),
            target: String::new(),
            verdict: String::new(),
        });
        let (target, verdict) = match (c.rss_target, r.peak_rss_mib) {
            (Some(t), Some(m)) => (format!("<= {t:.0} MiB"), verdict_at_most(m, t)),
            _ => (String::new(), String::new()),
        };
        rows.push(Row {
            measure: format!("peak RSS of the worker, {}", c.name),
            figure: r
                .peak_rss_mib
                .map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0} MiB")),
            target,
            verdict,
        });
        let cpu_ms = r.usage_per_job.cpu_s() * 1e3;
        let (target, verdict) = match c.cpu_ms_target {
            Some(t) => (format!("<= {t} ms"), verdict_at_most(cpu_ms, t)),
            None => (String::new(), String::new()),
        };
        rows.push(Row {
            measure: format!("worker CPU per image, {}", c.name),
            figure: format!(
                "{cpu_ms:.2} ms (user {:.2}, kernel {:.2}; {:.0} page faults)",
                r.usage_per_job.user_s * 1e3,
                r.usage_per_job.system_s * 1e3,
                r.usage_per_job.minor_faults
            ),
            target,
            verdict,
        });
        if c.in_flight_limit.is_some() || r.saturated > 0 {
            rows.push(Row::info(
                format!("in-flight ceiling at the end, {}", c.name),
                format!(
                    "{} ({} calls refused as saturated, handed back)",
                    r.ceiling, r.saturated
                ),
            ));
        }
        if r.failed > 0 {
            rows.push(Row::info(
                format!("jobs not succeeded, {}", c.name),
                r.failed.to_string(),
            ));
        }
    }
    // The thumbnail's cost: the same case with and without it.
    let same = |a: &Case, b: &Case| {
        a.latency == b.latency
            && a.concurrency == b.concurrency
            && a.model == b.model
            && a.image_size == b.image_size
            && a.in_flight_limit == b.in_flight_limit
    };
    for off in runs.iter().filter(|r| !r.case.thumbnail) {
        if let Some(on) = runs
            .iter()
            .find(|r| r.case.thumbnail && same(&r.case, &off.case))
        {
            rows.push(Row::info(
                format!("thumbnail's CPU per image, {}", on.case.name),
                format!(
                    "{:.2} ms ({:.2} with, {:.2} without)",
                    (on.usage_per_job.cpu_s() - off.usage_per_job.cpu_s()) * 1e3,
                    on.usage_per_job.cpu_s() * 1e3,
                    off.usage_per_job.cpu_s() * 1e3
                ),
            ));
        }
    }
    let where_ = if args.in_process_stand_in {
        "stand-in in this process (RSS and CPU include it)"
    } else {
        "stand-in in a child process (RSS and CPU are the worker's alone)"
    };
    Ok(Report {
        scenario: "pipeline",
        title: format!(
            "real client, pipeline and worker; {} KB images at 1K, {} jobs per slot; {where_}; \
             images to {storage_location}; CPU is getrusage of the worker's process",
            args.image_bytes / 1000,
            args.rounds
        ),
        rows,
        json: json!({
            "scenario": "pipeline",
            "image_bytes": args.image_bytes,
            "rounds": args.rounds,
            "stand_in": if args.in_process_stand_in { "in-process" } else { "child" },
            "max_concurrent_bodies": args.max_concurrent_bodies
                .unwrap_or(crate::openrouter::client::DEFAULT_MAX_CONCURRENT_BODIES),
            "storage": storage_location,
            "runs": runs.iter().map(|r| json!({
                "case": r.case.name,
                "concurrency": r.case.concurrency,
                "latency_s": r.case.latency.as_secs_f64(),
                "model": r.case.model,
                "image_size": r.case.image_size,
                "thumbnail": r.case.thumbnail,
                "burst": r.case.burst,
                "in_flight_limit": r.case.in_flight_limit,
                "jobs": r.jobs,
                "seconds": round(r.seconds, 3),
                "jobs_per_s": round(r.jobs_per_s, 1),
                "efficiency": round(r.efficiency, 4),
                "steady_efficiency": r.steady_efficiency.map(|e| round(e, 4)),
                "target_efficiency": r.case.efficiency_target,
                "peak_rss_mib": r.peak_rss_mib.map(|m| round(m, 1)),
                "target_peak_rss_mib": r.case.rss_target,
                "cpu_s_per_job": round(r.usage_per_job.cpu_s(), 6),
                "user_cpu_s_per_job": round(r.usage_per_job.user_s, 6),
                "kernel_cpu_s_per_job": round(r.usage_per_job.system_s, 6),
                "page_faults_per_job": round(r.usage_per_job.minor_faults, 1),
                "target_cpu_ms_per_job": r.case.cpu_ms_target,
                "stand_in_cpu_s_per_job": r.stand_in_cpu_s_per_job.map(|c| round(c, 6)),
                "ceiling": r.ceiling,
                "saturated": r.saturated,
                "not_succeeded": r.failed,
            })).collect::<Vec<_>>(),
        }),
    })
}

async fn pipeline_runs(
    bench: &BenchDb,
    args: &BenchArgs,
    storage_location: &str,
) -> anyhow::Result<Vec<PipelineRun>> {
    let storage = Storage::open(&StorageConfig::new(storage_location)).await?;
    storage
        .check()
        .await
        .with_context(|| format!("storage check failed for {}", storage.describe()))?;
    let mut runs = Vec::new();
    for case in pipeline_cases(args) {
        let (stand_in, base_url) = StandIn::start(args, &case).await?;
        let run = pipeline_case(bench, args, &storage, &stand_in, &base_url, &case).await;
        stand_in.stop().await;
        runs.push(run?);
    }
    Ok(runs)
}

async fn pipeline_case(
    bench: &BenchDb,
    args: &BenchArgs,
    storage: &Storage,
    stand_in: &StandIn,
    base_url: &str,
    case: &Case,
) -> anyhow::Result<PipelineRun> {
    // The real client with its defaults: the body permits bound memory, not concurrency.
    let mut config = ClientConfig::new(base_url, STAND_IN_KEY);
    if let Some(n) = args.max_concurrent_bodies {
        config.max_concurrent_bodies = n;
    }
    let client = Client::new(config)?;

    // One call first, so the stand-in has made its image before anything is timed.
    progress(
        args,
        format!("pipeline: warming the stand-in up ({})", case.name),
    );
    client
        .generate(&ImageRequest {
            model: case.model.clone(),
            prompt: "bench warm-up".to_owned(),
            aspect_ratio: "16:9".to_owned(),
            image_size: case.image_size.clone(),
            references: Vec::new(),
        })
        .await
        .context("warm-up call to the stand-in")?;

    let c = case.concurrency;
    let n = u64::try_from(c.saturating_mul(args.rounds)).unwrap_or(u64::MAX);
    progress(args, format!("pipeline: {n} jobs, {}", case.name));
    let pool = bench.fresh(worker_pool_size(c)).await?;
    let run = pipeline_run(&pool, &client, storage, stand_in, case, n).await;
    // Delete exactly the images and renditions this run stored (storage may be shared; tmpfs
    // is memory).
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT key FROM imagegen.images UNION ALL SELECT key FROM imagegen.renditions",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    pool.close().await;
    for k in keys {
        let _ = storage.delete(&k).await;
    }
    run
}

async fn pipeline_run(
    pool: &PgPool,
    client: &Client,
    storage: &Storage,
    stand_in: &StandIn,
    case: &Case,
    n: u64,
) -> anyhow::Result<PipelineRun> {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt, batch, model, image_size) \
         SELECT 'A calm mountain lake at dawn, soft mist, wide blog header, take ' || g, $2, $3, $4 \
         FROM generate_series(1, $1::bigint) AS g",
    )
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .bind(PIPELINE_BATCH)
    .bind(&case.model)
    .bind(&case.image_size)
    .execute(pool)
    .await
    .context("inserting the jobs")?;
    let queue = Queue::new(pool.clone());
    let mut config = PipelineConfig::default();
    config.renditions.no_auto_thumb = !case.thumbnail;
    let pipeline = Pipeline::new(client.clone(), storage.clone(), queue.clone(), config);
    let worker = Worker::new(
        queue.clone(),
        pipeline,
        WorkerConfig {
            concurrency: case.concurrency,
            exit_when_idle: true,
            ..WorkerConfig::default()
        },
    );
    let rss_reset = reset_peak_rss();
    let cpu = CpuClock::start(stand_in.pid());
    let usage = OwnUsage::now();
    let mut status = worker.status();
    let started = Instant::now();
    let run = tokio::spawn(worker.run(CancellationToken::new()));
    // When the first wave (one job per slot) had completed: the steady-state rate is measured
    // from there to the last completion (see `PipelineRun::steady_efficiency`).
    let wave = u64::try_from(case.concurrency).unwrap_or(u64::MAX).min(n);
    let mut first_wave_s = None;
    let finished = loop {
        let completed = status.borrow_and_update().completed;
        if first_wave_s.is_none() && completed >= wave {
            first_wave_s = Some(started.elapsed().as_secs_f64());
        }
        if completed >= n {
            break true;
        }
        if status.changed().await.is_err() {
            break false;
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let (_, stand_in_cpu_s, _) = cpu.elapsed();
    let usage = OwnUsage::now().per_job_since(usage, n);
    let peak = peak_rss_mib();
    let (ceiling, saturated) = {
        let s = status.borrow();
        (s.ceiling, s.saturated)
    };
    run.await.context("worker task")??;
    ensure!(finished, "the worker stopped before finishing the jobs");
    let counts = queue.counts(false, None).await?;
    let succeeded = counts
        .iter()
        .find(|c| c.state == "succeeded")
        .map_or(0, |c| c.jobs);
    let jobs_per_s = n as f64 / seconds;
    let ideal = case.concurrency as f64 / case.latency.as_secs_f64();
    let steady_jobs_per_s = first_wave_s
        .filter(|t| n > wave && seconds > *t)
        .map(|t| (n - wave) as f64 / (seconds - t));
    Ok(PipelineRun {
        case: case.clone(),
        jobs: n,
        seconds,
        jobs_per_s,
        efficiency: jobs_per_s / ideal,
        steady_jobs_per_s,
        steady_efficiency: steady_jobs_per_s.map(|r| r / ideal),
        // Without a reset the peak would be the whole process's so far: not this run's.
        peak_rss_mib: if rss_reset { peak } else { None },
        usage_per_job: usage,
        stand_in_cpu_s_per_job: stand_in_cpu_s.map(|s| s / n as f64),
        failed: i64::try_from(n).unwrap_or(i64::MAX) - succeeded,
        ceiling,
        saturated,
    })
}

// ---------------------------------------------------------------------------------------------
// Enqueue

async fn enqueue_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    let n = args.enqueue_rows;
    ensure!(n > 0, "--enqueue-rows must be at least 1");
    let prompts: Vec<String> = (0..n)
        .map(|i| format!("Isometric city block with tiny delivery drones, variation {i}"))
        .collect();

    progress(args, format!("enqueue: {n} prompts through the CLI"));
    let file =
        std::env::temp_dir().join(format!("imagegen-bench-prompts-{}.txt", std::process::id()));
    let mut text = prompts.join("\n");
    text.push('\n');
    tokio::fs::write(&file, text)
        .await
        .with_context(|| format!("writing {}", file.display()))?;
    let cli = async {
        let pool = bench.fresh(2).await?;
        let bin = imagegen_bin(args)?;
        let started = Instant::now();
        let out = tokio::process::Command::new(&bin)
            .arg("enqueue")
            .arg("--file")
            .arg(&file)
            .arg("--batch")
            .arg("bench-cli")
            .env("DATABASE_URL", &bench.url)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {} enqueue", bin.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        ensure!(
            out.status.success(),
            "imagegen enqueue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        ensure!(
            usize::try_from(rows).ok() == Some(n),
            "imagegen enqueue inserted {rows} of {n} rows"
        );
        anyhow::Ok(seconds)
    }
    .await;
    let _ = tokio::fs::remove_file(&file).await;
    let cli_s = cli?;

    progress(args, format!("enqueue: {n} prompts in one SQL statement"));
    let pool = bench.fresh(2).await?;
    let started = Instant::now();
    let inserted = sqlx::query(
        "INSERT INTO imagegen.jobs (prompt, batch) \
         SELECT p, 'bench-sql' FROM UNNEST($1::text[]) AS p",
    )
    .bind(&prompts)
    .execute(&pool)
    .await;
    let sql_s = started.elapsed().as_secs_f64();
    pool.close().await;
    let inserted = inserted.context("inserting through SQL")?.rows_affected();
    ensure!(
        usize::try_from(inserted).ok() == Some(n),
        "SQL inserted {inserted} of {n} rows"
    );

    let cli_rate = n as f64 / cli_s;
    let sql_rate = n as f64 / sql_s;
    Ok(Report {
        scenario: "enqueue",
        title: format!(
            "{} prompts into an empty table: `imagegen enqueue --file` (a whole process: start, \
             connect, chunks of 5,000), and one INSERT ... SELECT FROM UNNEST($1::text[])",
            thousands(n as f64)
        ),
        rows: vec![
            Row::info(
                "CLI (imagegen enqueue --file)",
                format!("{} rows/s ({cli_s:.2} s)", thousands(cli_rate)),
            ),
            Row::info(
                "SQL (one statement)",
                format!("{} rows/s ({sql_s:.2} s)", thousands(sql_rate)),
            ),
        ],
        json: json!({
            "scenario": "enqueue",
            "rows": n,
            "cli_rows_per_s": round(cli_rate, 0),
            "cli_seconds": round(cli_s, 3),
            "sql_rows_per_s": round(sql_rate, 0),
            "sql_seconds": round(sql_s, 3),
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// Measuring the process and the machine

/// CPU time of this process, of the stand-in child (if any) and of every Postgres process on the
/// machine, from one instant to another. Postgres includes other clients' work on a shared
/// server: read it as an upper bound.
struct CpuClock {
    own: f64,
    child: Option<(u32, f64)>,
    postgres: HashMap<u32, f64>,
}

impl CpuClock {
    fn start(child: Option<u32>) -> CpuClock {
        CpuClock {
            own: own_cpu_s(),
            child: child.map(|pid| (pid, process_cpu_s(&pid.to_string()).unwrap_or(0.0))),
            postgres: postgres_cpu(),
        }
    }

    /// (this process, the child, Postgres) in CPU seconds since [`CpuClock::start`].
    fn elapsed(&self) -> (f64, Option<f64>, f64) {
        let own = own_cpu_s() - self.own;
        let child = self
            .child
            .and_then(|(pid, t0)| process_cpu_s(&pid.to_string()).map(|t| t - t0));
        let postgres = postgres_cpu()
            .into_iter()
            .map(|(pid, t)| t - self.postgres.get(&pid).copied().unwrap_or(0.0))
            .filter(|d| *d > 0.0)
            .sum();
        (own, child, postgres)
    }
}

/// User plus system CPU seconds of this process, all threads, from `getrusage` (microseconds,
/// where `/proc` counts 10 ms ticks).
fn own_cpu_s() -> f64 {
    OwnUsage::now().cpu_s()
}

/// This process's CPU split into user and kernel time, and its minor page faults (each a page
/// the kernel had to map, and zero, on first touch): where CPU per image goes beyond the work
/// on the bytes themselves.
#[derive(Debug, Clone, Copy, Default)]
struct OwnUsage {
    user_s: f64,
    system_s: f64,
    minor_faults: f64,
}

impl OwnUsage {
    fn now() -> OwnUsage {
        // SAFETY: getrusage only writes the struct it is given; all-zero bytes are a valid rusage.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
                return OwnUsage::default();
            }
            usage
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        OwnUsage {
            user_s: secs(usage.ru_utime),
            system_s: secs(usage.ru_stime),
            minor_faults: usage.ru_minflt as f64,
        }
    }

    /// User plus kernel time.
    fn cpu_s(self) -> f64 {
        self.user_s + self.system_s
    }

    /// What was used since `earlier`, per job of `n`.
    fn per_job_since(self, earlier: OwnUsage, n: u64) -> OwnUsage {
        let n = n.max(1) as f64;
        OwnUsage {
            user_s: (self.user_s - earlier.user_s) / n,
            system_s: (self.system_s - earlier.system_s) / n,
            minor_faults: (self.minor_faults - earlier.minor_faults) / n,
        }
    }
}

/// User plus system CPU seconds of `/proc/<pid>`, all threads, plus reaped children (so a
/// Postgres backend that exits is still counted, in the postmaster).
fn process_cpu_s(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (field 3) ... utime (14), stime (15), cutime (16), cstime (17).
    let ticks: f64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    Some(ticks / CLOCK_TICKS_PER_S)
}

/// CPU seconds of every process named `postgres`, by pid.
fn postgres_cpu() -> HashMap<u32, f64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres"
            && let Some(t) = process_cpu_s(&pid.to_string())
        {
            out.insert(pid, t);
        }
    }
    out
}

/// Resets this process's peak RSS (VmHWM) to its current RSS. False where the kernel refuses.
fn reset_peak_rss() -> bool {
    release_free_memory();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Gives the allocator's free memory back to the system, so a case's peak RSS is its own and not
/// what earlier cases left in the arenas (the worker keeps up to 16 MB of free top per arena;
/// see `tune_allocator` in main.rs). Measured in one run of all the cases: the 4K case's peak
/// was 298 MiB after the others without this, 195 MiB in a process of its own.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system; it takes malloc's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// This process's peak RSS (VmHWM) in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Cores, memory, CPU model and Postgres version, for the record.
async fn machine(database_url: &str) -> Value {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| round(kib / 1024.0 / 1024.0, 1));
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
    });
    let postgres = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&with_database(database_url, "postgres").unwrap_or_default())
        .await
    {
        Ok(pool) => {
            let v: Option<String> = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await
                .ok();
            pool.close().await;
            v
        }
        Err(_) => None,
    };
    json!({
        "cores": cores,
        "memory_gib": mem_gib,
        "cpu": cpu,
        "postgres": postgres,
        "postgres_at": db::describe(database_url),
    })
}

fn machine_line(m: &Value) -> String {
    let s = |k: &str| {
        m[k].as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{} cores ({}), {} GiB; Postgres {} at {}",
        m["cores"],
        s("cpu"),
        m["memory_gib"],
        s("postgres"),
        s("postgres_at")
    )
}

// ---------------------------------------------------------------------------------------------
// Formatting

fn progress(args: &BenchArgs, what: impl AsRef<str>) {
    if !args.json {
        eprintln!("bench {}", what.as_ref());
    }
}

fn table(rows: &[Row]) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(["measure", "figure", "target", "verdict"]);
    for r in rows {
        t.add_row([&r.measure, &r.figure, &r.target, &r.verdict]);
    }
    t
}

/// "met", or by how much a figure that should be at least `target` fell short.
fn verdict_at_least(figure: f64, target: f64) -> String {
    if figure >= target {
        "met".to_owned()
    } else {
        format!("missed by {:.0} %", (1.0 - figure / target) * 100.0)
    }
}

/// "met", or by how much a figure that should stay under `target` went over.
fn verdict_at_most(figure: f64, target: f64) -> String {
    if figure < target {
        "met".to_owned()
    } else {
        format!("missed by {:.0} %", (figure / target - 1.0) * 100.0)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// A duration in milliseconds, to a tenth.
fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0, 1)
}

/// 34000.4 -> "34,000".
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_database(
                "postgres://u:p@h:5432/app?sslmode=disable",
                "imagegen_bench"
            )
            .unwrap(),
            "postgres://u:p@h:5432/imagegen_bench?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h", "imagegen_bench").unwrap(),
            "postgres://h/imagegen_bench"
        );
        assert!(with_database("not a url", "x").is_err());
    }

    #[test]
    fn only_bench_databases_are_dropped() {
        assert!(BenchDb::new("postgres://h/app", "imagegen").is_err());
        assert!(BenchDb::new("postgres://h/app", "imagegen_bench; DROP").is_err());
        assert!(BenchDb::new("postgres://h/app", "imagegen_bench_x").is_ok());
    }

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict_at_least(40_000.0, 34_000.0), "met");
        assert_eq!(verdict_at_least(17_000.0, 34_000.0), "missed by 50 %");
        assert_eq!(verdict_at_most(3.0, 5.0), "met");
        assert_eq!(verdict_at_most(7.5, 5.0), "missed by 50 %");
    }

    #[test]
    fn percentiles_and_thousands() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
