//! The `imagegen` command line: parse, set up tracing, dispatch to the library.

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use std::num::NonZeroU32;
use std::time::Duration;

mod cli;

use cli::{explain_constraint, shutdown_token};
use imagegen::db;
use imagegen::openrouter::Client;
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, Queue};
use imagegen::retry::RetryPolicy;
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::{Worker, WorkerConfig};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "imagegen",
    version,
    about = "Turns rows in imagegen.jobs into images in S3-compatible storage"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Postgres to use; the database is created if missing.
    #[arg(long, env = "DATABASE_URL", default_value = db::DEFAULT_DATABASE_URL, global = true,
        hide_env_values = true)]
    database_url: String,
    /// Log format.
    #[arg(
        long,
        env = "IMAGEGEN_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the schema (safe to run from several processes at once).
    Migrate,
    /// Add jobs: one from flags, or one per line of a file ('-' for standard input).
    Enqueue(EnqueueArgs),
    /// Counts per state (and per batch), cost so far, and the workers running.
    Status(StatusArgs),
    /// One job with its attempts.
    Show {
        id: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put a failed or cancelled job (or all failed jobs of a batch) back to pending.
    Retry {
        /// The job to retry.
        #[arg(required_unless_present = "failed")]
        id: Option<i64>,
        /// Retry every failed job (of --batch, if given).
        #[arg(long, conflicts_with = "id")]
        failed: bool,
        #[arg(long, requires = "failed")]
        batch: Option<String>,
    },
    /// Cancel a pending job, or every pending job of a batch.
    Cancel {
        #[arg(required_unless_present = "batch")]
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        batch: Option<String>,
    },
    /// Claim jobs and make images until stopped (SIGINT/SIGTERM drain gracefully).
    Worker(Box<WorkerArgs>),
    /// The whole pipeline against the local stand-in provider: a sample batch, live progress,
    /// and a table of results.
    Demo {
        #[command(flatten)]
        demo: imagegen::demo::DemoArgs,
        #[command(flatten)]
        storage: StorageConfig,
    },
    /// Check the database, the storage (write, read, delete a probe) and the provider settings.
    Doctor {
        #[command(flatten)]
        storage: StorageConfig,
        #[command(flatten)]
        provider: imagegen::openrouter::Config,
    },
    /// Print a URL for each image of a job: presigned (private buckets) or public.
    Url {
        id: i64,
        /// How long a presigned URL stays valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        expires: Duration,
        #[command(flatten)]
        storage: StorageConfig,
    },
    /// Spending limits per batch.
    #[command(subcommand)]
    Budget(BudgetCommand),
    /// Run the local stand-in for OpenRouter (development and benchmarks only).
    FakeOpenrouter(imagegen::openrouter::fake::FakeArgs),
    /// Benchmarks against the local Postgres and the stand-in, in their own database.
    Bench(imagegen::bench::BenchArgs),
    /// The HTTP API, health probes and Prometheus metrics, without a worker.
    Serve(Box<cli::serve::ServeArgs>),
    /// Renditions (OG card, thumbnail, WebP, custom sizes) of jobs that already succeeded.
    #[command(subcommand)]
    Renditions(cli::renditions::RenditionsCommand),
    /// Webhook deliveries: list them (`--failed`), or `redeliver ID`.
    Deliveries(cli::deliveries::DeliveriesArgs),
    /// Batches from CSV/JSONL files: submit, list, show, watch, retry-failed, cancel, budget,
    /// report.
    #[command(subcommand)]
    Batch(cli::batch::BatchCommand),
    /// Make a finished job again as a new generation (new image keys; the old images stay).
    Regenerate(cli::regenerate::RegenerateArgs),
    /// Delete jobs that finished before a date (and, with --objects, their stored images).
    Prune(Box<cli::prune::PruneArgs>),
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Set a batch's budget in USD: no call starts that could take its spend past it.
    Set { batch: String, usd: Decimal },
    /// Remove a batch's budget.
    Clear { batch: String },
    /// Every batch budget with its spend so far.
    List,
    /// The daily budget of the whole installation (kept in the database).
    #[command(subcommand)]
    Daily(cli::budget::DailyCommand),
}

#[derive(Args)]
struct WorkerArgs {
    /// Provider calls in flight at once.
    #[arg(long, env = "IMAGEGEN_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Claim even without a notification this often (the fallback for missed notifications).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// How long a claim holds a job without renewal; a crashed worker's jobs return after this.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// On SIGINT/SIGTERM, how long in-flight calls may finish before they are handed back.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// After a halting error (bad key, no credits, storage misconfigured), wait this long and
    /// then try one job.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    halt_probe_interval: Duration,
    /// Ceiling of the first retry's backoff (doubles per failure, full jitter).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    retry_base: Duration,
    /// No retry waits longer than this.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    retry_cap: Duration,
    /// Exit once nothing is left to do now or soon (for cron-driven runs): no job due, running or
    /// waiting for a retry. Exit code 0: nothing left; 3: stopped with work left (window closed,
    /// budget reached, halted by a 401/402; the jobs are handed back, never failed); 1: an error.
    #[arg(long)]
    exit_when_idle: bool,
    /// Claim only inside this daily window of wall-clock time, e.g. 22:00-06:00 (may cross
    /// midnight). Calls in flight when it closes finish and are recorded.
    #[arg(long, value_name = "HH:MM-HH:MM")]
    window: Option<String>,
    /// The window's timezone (IANA name, e.g. Europe/Berlin); default the machine's.
    #[arg(long, requires = "window")]
    timezone: Option<String>,
    /// Only claim jobs of this batch.
    #[arg(long)]
    batch: Option<String>,
    /// At most this many provider calls start per minute.
    #[arg(long, env = "IMAGEGEN_REQUESTS_PER_MINUTE")]
    requests_per_minute: Option<NonZeroU32>,
    /// Sets the installation's daily budget in the database (as `imagegen budget daily set`
    /// does): no call of any worker starts that could take today's (UTC) spend past it.
    #[arg(long, env = "IMAGEGEN_DAILY_BUDGET_USD")]
    daily_budget_usd: Option<Decimal>,
    /// Also serve the HTTP API and /metrics on this address (as `imagegen serve` does).
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    #[command(flatten)]
    http_auth: imagegen::http::auth::AuthArgs,
    #[command(flatten)]
    renditions: imagegen::image::renditions::RenditionSettings,
    /// DATABASE_URL goes through a transaction pooler (PgBouncer): no LISTEN (poll at
    /// --poll-interval), every statement unnamed in its own transaction, and no migrating (the
    /// schema is checked instead; run `imagegen migrate` on a direct URL).
    #[arg(long, visible_alias = "pgbouncer", env = "IMAGEGEN_NO_LISTEN")]
    no_listen: bool,
    #[command(flatten)]
    webhooks: cli::deliveries::WebhookArgs,
    #[command(flatten)]
    storage: StorageConfig,
    #[command(flatten)]
    provider: imagegen::openrouter::Config,
}

#[derive(Args)]
struct EnqueueArgs {
    /// The prompt (or use --file).
    #[arg(required_unless_present = "file")]
    prompt: Option<String>,
    /// A file with one prompt per line ('-' for standard input); blank lines are skipped.
    #[arg(long, conflicts_with = "prompt")]
    file: Option<String>,
    #[arg(long)]
    aspect_ratio: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// 1K, 2K or 4K (the Pro model honours it).
    #[arg(long)]
    image_size: Option<String>,
    #[arg(long)]
    batch: Option<String>,
    /// Higher runs first (-1000..1000).
    #[arg(long)]
    priority: Option<i32>,
    /// Makes re-running the same enqueue safe (single prompt only).
    #[arg(long, conflicts_with = "file")]
    idempotency_key: Option<String>,
    #[arg(long)]
    max_attempts: Option<i32>,
    /// JSON kept on the row untouched.
    #[arg(long)]
    metadata: Option<String>,
    /// POST the finished job here (a signed webhook; http or https).
    #[arg(long)]
    callback_url: Option<String>,
    /// A reference image sent with the prompt (up to 4): an https URL (passed on as is), a local
    /// PNG/JPEG/WebP/GIF file (stored once in --storage), or the key of an object in storage.
    #[arg(long = "reference", value_name = "URL|FILE|KEY")]
    references: Vec<String>,
    #[command(flatten)]
    storage: StorageConfig,
}

#[derive(Args)]
struct StatusArgs {
    /// Break the counts down per batch.
    #[arg(long)]
    by_batch: bool,
    /// Only this batch.
    #[arg(long)]
    batch: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Rows per INSERT statement when enqueueing from a file.
const ENQUEUE_CHUNK: usize = 5000;

/// glibc's malloc raises its mmap threshold to the largest block freed so far (up to 32 MB); from
/// then on, multi-megabyte image buffers (answers, decoded pixels) come from the heap arenas and
/// the process keeps their pages after use. Held at 4 MB, such buffers get mappings of their own,
/// returned to the system when freed: the 4K bench's peak RSS went from 264 to 176 MiB.
///
/// Below that, glibc gives an arena's free top back to the system once it passes 128 KB, so the
/// next image's buffer is fresh memory the kernel must map and zero page by page: with renditions
/// off that was 146 page faults and about a tenth of the CPU per 1.2 MB image. Kept up to 16 MB,
/// the pages are reused (14 faults per image; CPU per image 2.6 -> 2.3 ms, peak RSS at 1,000 in
/// flight 141 -> 187 MiB, both measured with the pipeline bench). A `MALLOC_MMAP_THRESHOLD_` or
/// `MALLOC_TRIM_THRESHOLD_` in the environment still wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    const MMAP_THRESHOLD: libc::c_int = 4 * 1024 * 1024;
    const TRIM_THRESHOLD: libc::c_int = 16 * 1024 * 1024;
    for (var, param, value) in [
        (
            "MALLOC_MMAP_THRESHOLD_",
            libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
        ),
        (
            "MALLOC_TRIM_THRESHOLD_",
            libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
        ),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: mallopt only sets a malloc parameter; it runs once, before any other thread.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_tracing(cli.global.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,aws_config=warn,aws_smithy_runtime=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn open_queue(g: &Global, max_connections: u32) -> anyhow::Result<Queue> {
    let pool = db::connect(&g.database_url, max_connections).await?;
    db::migrate(&pool).await?;
    Ok(Queue::new(pool))
}

/// Runs the command; the answer is the process's exit code (see `worker --exit-when-idle`).
async fn run(cli: Cli) -> anyhow::Result<u8> {
    let g = &cli.global;
    match cli.command {
        Command::Migrate => {
            let pool = db::connect(&g.database_url, 2).await?;
            db::migrate(&pool).await?;
            println!("migrated {}", db::describe(&g.database_url));
        }
        Command::Enqueue(a) => enqueue(open_queue(g, 2).await?, a).await?,
        Command::Status(a) => status(open_queue(g, 2).await?, a).await?,
        Command::Show { id, json } => show(open_queue(g, 2).await?, id, json).await?,
        Command::Retry { id, failed, batch } => {
            let q = open_queue(g, 2).await?;
            if let Some(id) = id {
                q.retry(id).await?;
                println!("job {id} is pending again");
            } else if failed {
                cli::batch::retry_failed(&q, batch.as_deref()).await?;
            }
        }
        Command::Worker(a) => return worker(g, *a).await,
        Command::Regenerate(a) => cli::regenerate::run(open_queue(g, 2).await?, a).await?,
        Command::Prune(a) => cli::prune::run(open_queue(g, 4).await?, *a).await?,
        Command::Demo { demo, storage } => {
            imagegen::demo::ensure_postgres(&g.database_url).await?;
            imagegen::demo::run(open_queue(g, 10).await?, &storage, demo).await?
        }
        Command::Doctor { storage, provider } => doctor(g, storage, provider).await?,
        Command::Url {
            id,
            expires,
            storage,
        } => {
            let q = open_queue(g, 2).await?;
            let images = q.job_images(id).await?;
            if images.is_empty() {
                bail!("job {id} has no stored images");
            }
            let storage = Storage::open(&storage).await?;
            for image in images {
                println!("{}", storage.presign_get(&image.key, expires).await?);
            }
        }
        Command::Budget(cmd) => {
            let q = open_queue(g, 2).await?;
            match cmd {
                BudgetCommand::Set { batch, usd } => {
                    cli::batch::set_budget(&q, &batch, Some(usd)).await?
                }
                BudgetCommand::Clear { batch } => cli::batch::set_budget(&q, &batch, None).await?,
                BudgetCommand::Daily(cmd) => cli::budget::daily(q, cmd).await?,
                BudgetCommand::List => {
                    let mut t = Table::new();
                    t.load_style(UTF8_FULL_CONDENSED);
                    t.set_header(["batch", "budget (USD)", "spent (USD)"]);
                    for b in q.batch_budgets().await? {
                        t.add_row([
                            b.batch,
                            b.budget_usd.to_string(),
                            b.spent_usd.round_dp(4).to_string(),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        Command::FakeOpenrouter(args) => imagegen::openrouter::fake::run(args).await?,
        Command::Bench(args) => imagegen::bench::run(&g.database_url, args).await?,
        Command::Serve(a) => {
            // The access check comes first: a refused configuration fails before anything opens.
            let bound = imagegen::http::bind(a.listen, &a.auth).await?;
            cli::serve::run(open_queue(g, 8).await?, *a, bound).await?
        }
        Command::Renditions(cmd) => cli::renditions::run(open_queue(g, 4).await?, cmd).await?,
        Command::Deliveries(a) => cli::deliveries::run(open_queue(g, 2).await?, a).await?,
        Command::Cancel { id, batch } => {
            let q = open_queue(g, 2).await?;
            if let Some(id) = id {
                q.cancel(id).await?;
                println!("job {id} cancelled");
            } else if let Some(b) = batch {
                cli::batch::cancel(&q, &b).await?;
            }
        }
        Command::Batch(cmd) => cli::batch::run(open_queue(g, 4).await?, cmd).await?,
    }
    Ok(0)
}

async fn enqueue(q: Queue, a: EnqueueArgs) -> anyhow::Result<()> {
    let metadata = match &a.metadata {
        Some(m) => Some(serde_json::from_str(m).context("--metadata is not valid JSON")?),
        None => None,
    };
    let template = NewJob {
        prompt: String::new(),
        aspect_ratio: a.aspect_ratio,
        model: a.model,
        image_size: a.image_size,
        batch: a.batch,
        priority: a.priority,
        run_at: None,
        idempotency_key: a.idempotency_key,
        max_attempts: a.max_attempts,
        metadata,
        callback_url: a.callback_url,
        renditions: Vec::new(),
        reference_images: cli::references(&a.references, &a.storage).await?,
    };
    if let Some(prompt) = a.prompt {
        let job = NewJob { prompt, ..template };
        let e = q.enqueue(&job).await.map_err(explain_constraint)?;
        if e.created {
            println!("{}", e.id);
        } else {
            println!("{} (already enqueued with this idempotency key)", e.id);
        }
        return Ok(());
    }
    let Some(path) = a.file else {
        bail!("give a prompt or --file");
    };
    let reader: Box<dyn BufRead> = if path == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?,
        ))
    };
    let mut chunk = Vec::with_capacity(ENQUEUE_CHUNK);
    let mut total = 0u64;
    for line in reader.lines() {
        let line = line.context("reading prompts")?;
        if line.trim().is_empty() {
            continue;
        }
        chunk.push(NewJob {
            prompt: line,
            ..template.clone()
        });
        if chunk.len() == ENQUEUE_CHUNK {
            total += q.enqueue_many(&chunk).await.map_err(explain_constraint)?;
            chunk.clear();
        }
    }
    total += q.enqueue_many(&chunk).await.map_err(explain_constraint)?;
    println!("enqueued {total} job(s)");
    Ok(())
}

async fn status(q: Queue, a: StatusArgs) -> anyhow::Result<()> {
    if a.by_batch && !a.json && a.batch.is_none() {
        // The same table as `imagegen batch list`.
        return cli::batch::list(&q, false).await;
    }
    let counts = q.counts(a.by_batch, a.batch.as_deref()).await?;
    let workers = q.live_workers(std::time::Duration::from_secs(120)).await?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"counts": counts, "workers": workers})
            )?
        );
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    if a.by_batch {
        t.set_header(["batch", "state", "jobs", "cost (USD)"]);
    } else {
        t.set_header(["state", "jobs", "cost (USD)"]);
    }
    let mut total = rust_decimal::Decimal::ZERO;
    for c in &counts {
        total += c.cost_usd;
        let mut row = Vec::new();
        if a.by_batch {
            row.push(c.batch.clone().unwrap_or_else(|| "(none)".into()));
        }
        row.extend([
            c.state.clone(),
            c.jobs.to_string(),
            c.cost_usd.round_dp(4).to_string(),
        ]);
        t.add_row(row);
    }
    println!("{t}");
    println!("total cost so far: ${}", total.round_dp(4));
    for b in q.batch_budgets().await? {
        if a.batch.as_ref().is_none_or(|only| *only == b.batch) {
            let note = if b.spent_usd >= b.budget_usd {
                "  (budget reached: paused)"
            } else {
                ""
            };
            println!(
                "batch {:?}: ${} of ${} budget spent{note}",
                b.batch,
                b.spent_usd.round_dp(4),
                b.budget_usd
            );
        }
    }
    if workers.is_empty() {
        println!("no worker running");
    }
    for w in workers {
        match (&w.paused_until, &w.pause_reason) {
            (Some(until), Some(reason)) => println!(
                "worker {} on {} (pid {}): PAUSED until {until}: {reason}",
                w.id, w.hostname, w.pid
            ),
            _ => println!(
                "worker {} on {} (pid {}): running, last heartbeat {}",
                w.id, w.hostname, w.pid, w.heartbeat_at
            ),
        }
    }
    Ok(())
}

async fn show(q: Queue, id: i64, json: bool) -> anyhow::Result<()> {
    if json {
        // The API's shape of a job (GET /api/v1/jobs/{id}).
        println!("{}", serde_json::to_string_pretty(&q.job_view(id).await?)?);
        return Ok(());
    }
    let job = q.job(id).await?;
    let attempts = q.attempts(id).await?;
    println!(
        "job {}  [{}]  attempts {}/{}",
        job.id, job.state, job.attempts, job.max_attempts
    );
    println!("prompt:   {}", job.prompt);
    println!(
        "model:    {}  aspect {}  size {}",
        job.model,
        job.aspect_ratio,
        job.image_size.as_deref().unwrap_or("-")
    );
    if let Some(b) = &job.batch {
        println!("batch:    {b}");
    }
    println!(
        "tokens:   {} prompt, {} completion; cost ${}",
        job.prompt_tokens, job.completion_tokens, job.cost_usd
    );
    println!("created:  {}", job.created_at);
    if let Some(f) = job.finished_at {
        println!("finished: {f}");
    }
    if let Some(e) = &job.last_error {
        println!("error:    {e}");
    }
    for u in &job.image_urls {
        println!("image:    {u}");
    }
    if !attempts.is_empty() {
        let mut t = Table::new();
        t.load_style(UTF8_FULL_CONDENSED);
        t.set_header(["#", "outcome", "http", "ms", "cost", "error"]);
        for a in attempts {
            t.add_row([
                a.attempt.to_string(),
                a.outcome,
                a.http_status.map(|s| s.to_string()).unwrap_or_default(),
                a.duration_ms.map(|d| d.to_string()).unwrap_or_default(),
                a.cost_usd.to_string(),
                a.error.unwrap_or_default(),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

async fn worker(g: &Global, a: WorkerArgs) -> anyhow::Result<u8> {
    let window = match &a.window {
        Some(w) => Some(imagegen::worker::Window::parse(w, a.timezone.as_deref())?),
        None => None,
    };
    // A refused HTTP configuration fails before anything else starts.
    let http = match a.http {
        Some(addr) => Some(imagegen::http::bind(addr, &a.http_auth).await?),
        None => None,
    };
    let pool_size = u32::try_from(a.concurrency.clamp(4, 32)).unwrap_or(32);
    let queue = if a.no_listen {
        let pool = db::connect_through_pooler(&g.database_url, pool_size).await?;
        db::check_schema(&pool, &g.database_url).await?;
        Queue::through_pooler(pool)
    } else {
        open_queue(g, pool_size).await?
    };
    if let Some(usd) = a.daily_budget_usd {
        queue
            .set_daily_budget(Some(usd))
            .await
            .map_err(explain_constraint)?;
        tracing::info!(daily_budget_usd = %usd, "daily budget set for every worker");
    }
    if a.provider.base_url != imagegen::openrouter::DEFAULT_BASE_URL {
        tracing::warn!(base_url = %a.provider.base_url, "provider is not OpenRouter itself");
    }
    let client = Client::new(a.provider).context("provider settings")?;
    let storage = Storage::open(&a.storage).await?;
    storage
        .check()
        .await
        .with_context(|| format!("storage check failed for {}", storage.describe()))?;
    tracing::info!(storage = %storage.describe(), "storage check passed");
    let pipeline = Pipeline::new(
        client,
        storage,
        queue.clone(),
        PipelineConfig {
            requests_per_minute: a.requests_per_minute,
            renditions: a.renditions,
        },
    );
    // The HTTP server outlives the drain, so /metrics and /readyz answer while jobs finish.
    let http_stop = CancellationToken::new();
    let http_task = match http {
        Some((listener, auth)) => Some(cli::serve::start(
            queue.clone(),
            Some(pipeline.storage().clone()),
            listener,
            auth,
            http_stop.clone(),
        )?),
        None => None,
    };
    let config = WorkerConfig {
        concurrency: a.concurrency.max(1),
        poll_interval: a.poll_interval,
        lease: a.lease,
        renew_interval: a.lease / 3,
        rescue_interval: (a.lease / 4).max(Duration::from_secs(1)),
        grace: a.grace,
        halt_probe_interval: a.halt_probe_interval,
        retry: RetryPolicy {
            base: a.retry_base,
            cap: a.retry_cap,
        },
        exit_when_idle: a.exit_when_idle,
        only_batch: a.batch,
        window,
    };
    let shutdown = shutdown_token();
    let stop_deliveries = CancellationToken::new();
    let deliverer = cli::deliveries::spawn_deliverer(
        &queue,
        &a.webhooks,
        a.poll_interval,
        stop_deliveries.clone(),
    )
    .await?;
    let pruner = cli::deliveries::spawn_pruner(&queue, &a.webhooks, stop_deliveries.clone());
    let ran = Worker::new(queue, pipeline, config).run(shutdown).await;
    // After the jobs (whose completions write deliveries): calls in flight end, the rest waits
    // in the outbox for the next worker.
    stop_deliveries.cancel();
    if let Some(d) = deliverer {
        let _ = d.await;
    }
    let _ = pruner.await;
    http_stop.cancel();
    if let Some(task) = http_task {
        task.await.context("the HTTP server task failed")??;
    }
    let stopped = ran?;
    if let imagegen::worker::Stopped::WorkLeft(reason) = &stopped {
        eprintln!("stopped with work left: {reason}");
    }
    Ok(stopped.exit_code())
}

async fn doctor(
    g: &Global,
    storage: StorageConfig,
    provider: imagegen::openrouter::Config,
) -> anyhow::Result<()> {
    let mut failed = false;
    match open_queue(g, 2).await {
        Ok(q) => {
            let counts = q.counts(false, None).await?;
            let jobs: i64 = counts.iter().map(|c| c.jobs).sum();
            println!(
                "ok    database {} (migrated, {jobs} jobs)",
                db::describe(&g.database_url)
            );
        }
        Err(e) => {
            failed = true;
            println!("FAIL  database: {e:#}");
        }
    }
    match Storage::open(&storage).await {
        Ok(s) => match s.check().await {
            Ok(()) => println!(
                "ok    storage {} (probe written, read back, deleted)",
                s.describe()
            ),
            Err(e) => {
                failed = true;
                println!("FAIL  storage {}: {e}", s.describe());
            }
        },
        Err(e) => {
            failed = true;
            println!("FAIL  storage: {e}");
        }
    }
    let base = provider.base_url.clone();
    match Client::new(provider) {
        Ok(_) => println!("ok    provider {base} (key set; not called, calls cost money)"),
        Err(e) => {
            failed = true;
            println!("FAIL  provider {base}: {e}");
        }
    }
    if failed {
        bail!("some checks failed");
    }
    Ok(())
}
