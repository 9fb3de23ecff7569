//! `imagegen demo`: the whole pipeline on one machine with nothing but Postgres. It starts the
//! local stand-in provider in-process, enqueues a batch of blog-header prompts (a few with injected
//! faults, so retries and failures show), runs a real worker on that batch with a live progress
//! line, prints what every job became and where the images are, and ends by serving the
//! dashboard on that batch until Ctrl-C (at once with `--exit`, or when not on a terminal).
//!
//! A newcomer may have Postgres installed but not running: when nothing answers at the default
//! address, [`ensure_postgres`] starts the machine's installed cluster the way `.ci/run` does
//! (and says so), or says in one line how to.

use std::time::Duration;

use anyhow::Context;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

use crate::openrouter::fake::{FakeConfig, FakeServer};
use crate::openrouter::{Client, Config as ClientConfig};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::queue::{NewJob, Queue};
use crate::retry::RetryPolicy;
use crate::storage::{Storage, StorageConfig};
use crate::worker::{Worker, WorkerConfig};

/// `imagegen demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How long each stand-in call "works" (real calls take 8-30 s).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 6)]
    pub concurrency: usize,
    /// End after the summary instead of serving the dashboard (also the case when stdin or
    /// stdout is not a terminal).
    #[arg(long)]
    pub exit: bool,
    /// Where the dashboard listens at the end (loopback; a busy port falls back to a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
}

/// The address `DATABASE_URL` points at by default.
const DEFAULT_PG: &str = "127.0.0.1:5432";

/// When `database_url` is the default local address and nothing answers there, starts the
/// installed Postgres cluster (`pg_ctlcluster`, as `.ci/run` does) and waits for it; otherwise
/// leaves everything alone. Fails with one line on how to start it when it cannot.
pub async fn ensure_postgres(database_url: &str) -> anyhow::Result<()> {
    let local = [
        "@127.0.0.1:5432/",
        "@localhost:5432/",
        "@127.0.0.1/",
        "@localhost/",
    ]
    .iter()
    .any(|h| database_url.contains(h));
    if !local || answers().await {
        return Ok(());
    }
    let how = "start Postgres (e.g. `sudo pg_ctlcluster <version> main start`, or `sudo service                postgresql start`) or point DATABASE_URL at a running server";
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("main").is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Some(version) = versions.into_iter().max() else {
        anyhow::bail!("nothing answers at {DEFAULT_PG} and no installed cluster was found: {how}");
    };
    println!(
        "nothing answers at {DEFAULT_PG}: starting the installed Postgres cluster {version}/main          (pg_ctlcluster)"
    );
    let started = tokio::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "start"])
        .status()
        .await;
    match started {
        Ok(s) if s.success() => {}
        Ok(s) => anyhow::bail!("pg_ctlcluster {version} main start failed ({s}): {how}"),
        Err(e) => anyhow::bail!("could not run pg_ctlcluster ({e}): {how}"),
    }
    for _ in 0..60 {
        if answers().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("Postgres {version}/main started but does not answer at {DEFAULT_PG}: {how}")
}

async fn answers() -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(DEFAULT_PG)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Serves the dashboard on `listen` (or a free port when it is taken) until Ctrl-C.
async fn serve_dashboard(
    queue: Queue,
    storage: Storage,
    listen: std::net::SocketAddr,
    batch: &str,
) -> anyhow::Result<()> {
    use crate::http::{self, HttpState, auth::AuthArgs};
    let args = AuthArgs::default();
    let (listener, auth) = match http::bind(listen, &args).await {
        Ok(b) => b,
        Err(_) => http::bind(std::net::SocketAddr::new(listen.ip(), 0), &args).await?,
    };
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let router = http::router(HttpState::new(queue, Some(storage), auth));
    let server = tokio::spawn(http::serve(listener, router, stop.clone()));
    println!();
    println!(
        "dashboard: http://{addr}/batches/{}   (overview: http://{addr}/)",
        crate::http::pages::view::enc(batch)
    );
    println!("press Ctrl-C to stop");
    tokio::signal::ctrl_c().await.ok();
    stop.cancel();
    server.await??;
    Ok(())
}

/// The demo's prompts: blog headers for a small site. Markers ask the stand-in for faults.
const PROMPTS: [&str; 12] = [
    "A calm mountain lake at dawn, soft mist, wide blog header",
    "Flat illustration of a developer at a desk with two monitors, warm colours",
    "Abstract network of glowing nodes on a dark blue background [fault:503x1]",
    "A cosy reading nook with a rain-streaked window, watercolour style",
    "Isometric city block with tiny delivery drones [fault:429x1 retry-after=1]",
    "Minimalist line art of a coffee cup and a notebook",
    "Close-up of hands planting a seedling in rich soil [fault:jpeg-as-png]",
    "Retro-futuristic train station at sunset, synthwave palette [fault:two-images]",
    "A lighthouse on a rocky coast in a storm [fault:cutx1]",
    "Paper-cut style forest with layered greens [fault:whitespace-eofx1]",
    "Forbidden content example (the stand-in blocks it) [fault:safety]",
    "Bold geometric shapes spelling out motion and speed, poster style",
];

/// Runs the demo against `queue`, storing images per `storage`.
pub async fn run(queue: Queue, storage: &StorageConfig, args: DemoArgs) -> anyhow::Result<()> {
    let key = "demo-key-not-a-secret";
    let fake = FakeServer::start(FakeConfig {
        latency: args.latency,
        api_key: Some(key.to_owned()),
        ..FakeConfig::default()
    })
    .await
    .context("starting the local stand-in provider")?;
    println!(
        "stand-in provider (development only) at {}; nothing real is called or billed",
        fake.base_url()
    );

    let storage = Storage::open(storage).await?;
    storage.check().await?;
    println!("images go to {}", storage.describe());

    let client = Client::new(ClientConfig::new(fake.base_url(), key))?;
    let pipeline = Pipeline::new(
        client,
        storage.clone(),
        queue.clone(),
        PipelineConfig::default(),
    );

    let batch = format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let jobs: Vec<NewJob> = PROMPTS
        .iter()
        .map(|p| NewJob {
            prompt: (*p).to_owned(),
            batch: Some(batch.clone()),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await?;
    println!("enqueued {} jobs in batch {batch}", jobs.len());

    let config = WorkerConfig {
        concurrency: args.concurrency,
        poll_interval: Duration::from_secs(1),
        exit_when_idle: true,
        only_batch: Some(batch.clone()),
        retry: RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(5),
        },
        grace: Duration::from_secs(10),
        ..WorkerConfig::default()
    };
    let worker = Worker::new(queue.clone(), pipeline, config);
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            signal.cancel();
        }
    });
    let run = tokio::spawn(worker.run(stop.clone()));

    let bar = ProgressBar::new(PROMPTS.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    while !run.is_finished() {
        if let Ok(counts) = queue.counts(false, Some(&batch)).await {
            let get = |s: &str| counts.iter().find(|c| c.state == s).map_or(0, |c| c.jobs);
            let cost: Decimal = counts.iter().map(|c| c.cost_usd).sum();
            let finished = get("succeeded") + get("failed") + get("cancelled");
            bar.set_position(u64::try_from(finished).unwrap_or(0));
            bar.set_message(format!(
                "succeeded {} · failed {} · running {} · pending {} · ${}",
                get("succeeded"),
                get("failed"),
                get("running"),
                get("pending"),
                cost.round_dp(4)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish();
    run.await.context("worker task")??;

    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    table.set_header([
        "job",
        "state",
        "attempts",
        "image / error",
        "tokens",
        "cost (USD)",
    ]);
    let mut total = Decimal::ZERO;
    for job in queue.batch_jobs(&batch).await? {
        total += job.cost_usd;
        let where_ = match (job.image_urls.first(), &job.last_error) {
            (Some(url), _) => url.clone(),
            (None, Some(e)) => e.clone(),
            (None, None) => String::new(),
        };
        table.add_row([
            job.id.to_string(),
            job.state,
            job.attempts.to_string(),
            where_,
            (job.prompt_tokens + job.completion_tokens).to_string(),
            job.cost_usd.to_string(),
        ]);
    }
    println!("{table}");
    println!(
        "total billed by the stand-in: ${} over {} calls; recorded on the rows: ${total}",
        fake.billed_usd(),
        fake.calls()
    );
    println!("images: {}", storage.describe());
    println!("inspect with: imagegen status --batch {batch}   or   imagegen show ID");
    fake.stop().await.ok();
    use std::io::IsTerminal as _;
    if args.exit || !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Ok(());
    }
    serve_dashboard(queue, storage, args.listen, &batch).await
}
