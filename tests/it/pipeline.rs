//! Integration tests: the whole pipeline on real Postgres, the stand-in provider over HTTP and the
//! loopback S3 server: worker processes, outages, crashes, budgets and halts.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use imagegen::openrouter::fake::{FakeConfig, FakeServer, Fault};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, Queue};
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::Worker;
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{Proxy, fast_config, pool, wait_until};
use crate::storage::fixture::{S3, open_s3_at};

const KEY: &str = "sk-or-test-pipeline-key";
const WAIT: Duration = Duration::from_secs(180);

/// A fresh S3 location under the shared test bucket.
fn s3_location() -> StorageConfig {
    StorageConfig::new(format!("s3://{}/t-{}", S3.bucket, uuid::Uuid::new_v4()))
        .with_path_style(S3.path_style)
}

fn database_url(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().expect("test database name")
    )
}

async fn count_state(pool: &PgPool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs WHERE state = $1")
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn unfinished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs WHERE state IN ('pending', 'running')")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn total_cost(pool: &PgPool) -> Decimal {
    sqlx::query_scalar("SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.jobs")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn pipeline(fake: &FakeServer, storage: Storage, queue: Queue, config: PipelineConfig) -> Pipeline {
    let client = Client::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    Pipeline::new(client, storage, queue, config)
}

/// An `imagegen worker` process on the test database, the stand-in and `storage`.
fn spawn_worker(db: &str, fake: &FakeServer, storage: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .arg("worker")
        .args([
            "--concurrency",
            "12",
            "--poll-interval",
            "300ms",
            "--lease",
            "3s",
        ])
        .args([
            "--retry-base",
            "100ms",
            "--retry-cap",
            "400ms",
            "--grace",
            "20s",
        ])
        .args(["--halt-probe-interval", "300ms"])
        .args(extra)
        .env("DATABASE_URL", db)
        .env("OPENROUTER_BASE_URL", fake.base_url())
        .env("OPENROUTER_API_KEY", KEY)
        // Generous: a debug-build stand-in on two busy cores is slow, and a deadline that fires
        // after the stand-in delivered would (rightly) count as a billed but unrecorded call.
        .env("OPENROUTER_DEADLINE", "10s")
        .env("IMAGEGEN_STORAGE", storage)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start an imagegen worker process")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {}", child.id());
}

/// Each fault the stand-in can produce, with the state the job must end in, for jobs with
/// max_attempts = 3.
const MIX: &[(&str, &str)] = &[
    ("", "succeeded"),
    ("", "succeeded"),
    ("", "succeeded"),
    ("[fault:503x1]", "succeeded"),
    ("[fault:502x2]", "succeeded"),
    ("[fault:500x5]", "failed"),
    ("[fault:529x1]", "succeeded"),
    ("[fault:524x1]", "succeeded"),
    ("[fault:408x1]", "succeeded"),
    ("[fault:429x1 retry-after=1]", "succeeded"),
    ("[fault:unavailablex1]", "succeeded"),
    ("[fault:400]", "failed"),
    ("[fault:403]", "failed"),
    ("[fault:200-errorx1]", "succeeded"),
    ("[fault:choice-errorx1]", "succeeded"),
    ("[fault:safety]", "failed"),
    ("[fault:text-onlyx1]", "succeeded"),
    ("[fault:two-images]", "succeeded"),
    ("[fault:jpeg-as-png]", "succeeded"),
    ("[fault:cutx1]", "succeeded"),
    ("[fault:whitespace-eofx1]", "succeeded"),
    ("[fault:resetx1]", "succeeded"),
    ("[fault:slow=12sx1]", "succeeded"),
    ("[fault:oversize]", "failed"),
    ("[fault:content-null]", "succeeded"),
    ("[fault:content-array]", "succeeded"),
    ("[fault:sse-comments]", "succeeded"),
];

/// id, prompt, state, image_urls, last_error
type JobOutcome = (i64, String, String, Vec<String>, Option<String>);
/// job_id, prompt, key, content_type, width, height, generation_id
type StoredImage = (i64, String, String, String, i32, i32, String);

const RATIOS: [&str; 4] = ["16:9", "1:1", "9:16", "21:9"];

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn three_worker_processes_finish_a_mixed_batch_exactly_as_billed(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 5).await;
    let fake = FakeServer::start(FakeConfig {
        latency: Duration::from_millis(300),
        pad_interval: Duration::from_millis(100),
        image_bytes: 200_000,
        oversize_bytes: 80 * 1024 * 1024,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let location = s3_location();
    let storage = open_s3_at(&S3.endpoint, &location).await.unwrap();

    // A few hundred jobs: the mix repeated, with varied aspect ratios.
    let mut expected: HashMap<String, (&str, &str)> = HashMap::new();
    let mut jobs = Vec::new();
    for i in 0..(MIX.len() * 8) {
        let (marker, state) = MIX[i % MIX.len()];
        let ratio = RATIOS[i % RATIOS.len()];
        let prompt = format!("blog header {i} {marker}");
        expected.insert(prompt.clone(), (state, ratio));
        jobs.push(NewJob {
            prompt,
            aspect_ratio: Some(ratio.into()),
            batch: Some("site/2026 headers".into()),
            ..NewJob::default()
        });
    }
    Queue::new(db.clone()).enqueue_many(&jobs).await.unwrap();

    let url = database_url(&opts);
    let mut workers: Vec<Child> = (0..3)
        .map(|_| spawn_worker(&url, &fake, location.location.as_str(), &[]))
        .collect();
    wait_until(WAIT, "every job to finish", || async {
        unfinished(&db).await == 0
    })
    .await;
    for w in &workers {
        signal(w, "-TERM");
    }
    for w in &mut workers {
        let status = w.wait().unwrap();
        assert!(
            status.success(),
            "a worker exited with {status} after SIGTERM"
        );
    }

    // Every job is in the state its faults call for.
    let rows: Vec<JobOutcome> = sqlx::query_as(
        "SELECT id, prompt, state, image_urls, last_error FROM imagegen.jobs ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    for (id, prompt, state, urls, error) in &rows {
        let (want, _) = expected[prompt];
        assert_eq!(state, want, "job {id} {prompt:?}: {error:?}");
        assert_eq!(
            urls.len(),
            usize::from(state == "succeeded"),
            "job {id} urls {urls:?}"
        );
    }

    // The stand-in billed exactly one successful generation per succeeded job, and the rows
    // add up to everything it billed, failed-but-billed calls included.
    let succeeded = count_state(&db, "succeeded").await;
    assert_eq!(fake.successes() as i64, succeeded);
    assert_eq!(total_cost(&db).await, fake.billed_usd());

    // Each succeeded job's image is in S3, byte-identical to what the stand-in sent, with the
    // right size for its aspect ratio.
    let served: HashMap<String, _> = fake
        .served()
        .into_iter()
        .map(|s| (s.generation_id.clone(), s))
        .collect();
    let images: Vec<StoredImage> = sqlx::query_as(
        "SELECT i.job_id, j.prompt, i.key, i.content_type, i.width, i.height, \
             (SELECT generation_id FROM imagegen.attempts a \
              WHERE a.job_id = i.job_id AND a.outcome = 'succeeded') \
         FROM imagegen.images i JOIN imagegen.jobs j ON j.id = i.job_id ORDER BY i.job_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(images.len() as i64, succeeded);
    let mut seen_generations = HashSet::new();
    for (job_id, prompt, key, content_type, width, height, generation) in images {
        let sent = &served[&generation];
        assert!(seen_generations.insert(generation.clone()));
        let stored = storage.get(&key).await.unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&stored)),
            sent.sha256,
            "job {job_id}"
        );
        assert_eq!((width as u32, height as u32), (sent.width, sent.height));
        let (_, ratio) = expected[&prompt];
        let want = imagegen::openrouter::models::dimensions(
            imagegen::openrouter::models::FLASH_IMAGE,
            ratio,
            None,
        )
        .unwrap();
        assert_eq!((sent.width, sent.height), want, "job {job_id} {ratio}");
        let want_type = if prompt.contains("jpeg-as-png") {
            "image/jpeg"
        } else {
            "image/png"
        };
        assert_eq!(
            content_type, want_type,
            "job {job_id}: the sniffed type wins over the label"
        );
    }
    // No stashed image is left behind.
    let stash: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.paid_images")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stash, 0);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn an_s3_outage_mid_run_costs_no_extra_model_call(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 10).await;
    let fake = FakeServer::start(FakeConfig {
        image_bytes: 100_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    // S3 through a proxy that can cut it off.
    let s3_addr: std::net::SocketAddr = S3.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(s3_addr).await;
    let location = s3_location();
    let through_proxy = open_s3_at(&format!("http://{}", proxy.addr), &location)
        .await
        .unwrap();
    let direct = open_s3_at(&S3.endpoint, &location).await.unwrap();

    let n = 40;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob {
            prompt: format!("a harbour at dusk {i}"),
            ..NewJob::default()
        })
        .collect();
    let queue = Queue::new(db.clone());
    queue.enqueue_many(&jobs).await.unwrap();
    // One slot, so the outage lands mid-run.
    let worker = Worker::new(
        queue.clone(),
        pipeline(
            &fake,
            through_proxy,
            queue.clone(),
            PipelineConfig::default(),
        ),
        fast_config(2),
    );
    let run = tokio::spawn(worker.run(CancellationToken::new()));
    wait_until(WAIT, "a few jobs to succeed", || async {
        count_state(&db, "succeeded").await >= 5
    })
    .await;
    proxy.cut();
    wait_until(WAIT, "paid images to be kept while S3 is down", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(DISTINCT job_id) FROM imagegen.paid_images")
            .fetch_one(&db)
            .await
            .unwrap()
            >= 2
    })
    .await;
    proxy.restore();
    run.await.unwrap().unwrap();

    assert_eq!(count_state(&db, "succeeded").await, n);
    assert_eq!(fake.calls(), n as u64, "no model call was made twice");
    assert_eq!(total_cost(&db).await, fake.billed_usd());
    let stash: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.paid_images")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(stash, 0, "kept images are dropped once stored");
    // The outage shows in the attempts, without spending any: every job ends with attempts = 1.
    let (retried, max_attempts): (i64, i32) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM imagegen.attempts WHERE outcome = 'retry'), \
             (SELECT max(attempts) FROM imagegen.jobs)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(retried >= 2, "some uploads failed during the outage");
    assert_eq!(max_attempts, 1);
    let served: HashSet<String> = fake.served().into_iter().map(|s| s.sha256).collect();
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM imagegen.images")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(keys.len(), n as usize);
    for key in keys {
        let bytes = direct.get(&key).await.unwrap();
        assert!(
            served.contains(&hex::encode(Sha256::digest(&bytes))),
            "{key} is what was paid for"
        );
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_killed_worker_s_jobs_are_taken_over_and_finished(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 5).await;
    let fake = FakeServer::start(FakeConfig {
        latency: Duration::from_secs(1),
        pad_interval: Duration::from_millis(200),
        image_bytes: 50_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap().to_owned();
    let jobs: Vec<NewJob> = (0..60)
        .map(|i| NewJob {
            prompt: format!("a fox in snow {i}"),
            ..NewJob::default()
        })
        .collect();
    Queue::new(db.clone()).enqueue_many(&jobs).await.unwrap();
    let url = database_url(&opts);
    let mut victim = spawn_worker(&url, &fake, &location, &[]);
    // The victim holds jobs mid-call before the survivor starts.
    let victim_pid = victim.id() as i32;
    wait_until(WAIT, "the victim to hold jobs", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM imagegen.jobs j JOIN imagegen.workers w ON w.id = j.lease_owner \
             WHERE w.pid = $1 AND j.state = 'running'",
        )
        .bind(victim_pid)
        .fetch_one(&db)
        .await
        .unwrap()
            >= 5
    })
    .await;
    signal(&victim, "-KILL");
    victim.wait().unwrap();
    let mut survivor = spawn_worker(&url, &fake, &location, &[]);
    wait_until(WAIT, "every job to finish", || async {
        unfinished(&db).await == 0
    })
    .await;
    signal(&survivor, "-TERM");
    assert!(survivor.wait().unwrap().success());

    assert_eq!(count_state(&db, "succeeded").await, 60);
    let taken_over: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imagegen.attempts WHERE outcome = 'lease_expired'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(
        taken_over >= 5,
        "the killed worker's jobs were rescued ({taken_over})"
    );
    assert_eq!(total_cost(&db).await, fake.billed_usd());
    let files: Vec<String> =
        sqlx::query_scalar("SELECT url FROM imagegen.jobs, unnest(image_urls) url")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(files.len(), 60);
    for f in files {
        let path = f.trim_start_matches("file://");
        assert!(std::fs::metadata(path).unwrap().len() > 1000, "{path}");
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_batch_stops_at_its_budget(pool: PgPool) {
    let fake = FakeServer::start(FakeConfig {
        image_bytes: 20_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let queue = Queue::new(pool.clone());
    // Flash images cost about $0.0387 and are expected at $0.04: $0.10 pays for two.
    queue
        .set_batch_budget("capped", Some(Decimal::new(10, 2)))
        .await
        .unwrap();
    let jobs: Vec<NewJob> = (0..10)
        .map(|i| NewJob {
            prompt: format!("capped {i}"),
            batch: Some("capped".into()),
            ..NewJob::default()
        })
        .chain((0..3).map(|i| NewJob {
            prompt: format!("uncapped {i}"),
            batch: Some("free".into()),
            ..NewJob::default()
        }))
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    let storage = Storage::open(&StorageConfig::new(
        tempfile::tempdir().unwrap().keep().to_str().unwrap(),
    ))
    .await
    .unwrap();
    let mut config = fast_config(8);
    config.exit_when_idle = false;
    let worker = Worker::new(
        queue.clone(),
        pipeline(&fake, storage, queue.clone(), PipelineConfig::default()),
        config,
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    wait_until(
        WAIT,
        "the other batch to finish and the capped one to pause",
        || async {
            let halted: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM imagegen.attempts a JOIN imagegen.jobs j ON j.id = a.job_id \
             WHERE j.batch = 'capped' AND a.outcome = 'halted'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let free: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM imagegen.jobs WHERE batch = 'free' AND state = 'succeeded'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            halted >= 1 && free == 3 && count_state(&pool, "running").await == 0
        },
    )
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();

    let (done, spent): (i64, Decimal) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), sum(cost_usd) FROM imagegen.jobs \
         WHERE batch = 'capped'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(done, 2, "two calls fit the budget, the third could pass it");
    assert!(spent <= Decimal::new(10, 2), "spent {spent}");
    assert_eq!(fake.calls(), 5, "no call was started past the budget");
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imagegen.jobs WHERE batch = 'capped' AND state = 'pending' AND attempts = 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(pending, 8, "the rest wait, with no attempt spent");
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn out_of_credits_pauses_and_resumes_without_spending_attempts(pool: PgPool) {
    let fake = Arc::new(
        FakeServer::start(FakeConfig {
            image_bytes: 20_000,
            api_key: Some(KEY.into()),
            ..FakeConfig::default()
        })
        .await
        .unwrap(),
    );
    fake.inject(
        Fault::Status {
            code: 402,
            retry_after: None,
            reset_in: None,
        },
        3,
    );
    let queue = Queue::new(pool.clone());
    let jobs: Vec<NewJob> = (0..6)
        .map(|i| NewJob {
            prompt: format!("credits {i}"),
            max_attempts: Some(1),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    let storage = Storage::open(&StorageConfig::new(
        tempfile::tempdir().unwrap().keep().to_str().unwrap(),
    ))
    .await
    .unwrap();
    // A worker that exits when idle stops at a halt (exit code 3); this one waits it out.
    let mut config = fast_config(1);
    config.exit_when_idle = false;
    let worker = Worker::new(
        queue.clone(),
        pipeline(&fake, storage, queue.clone(), PipelineConfig::default()),
        config,
    );
    let mut status = worker.status();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    status
        .wait_for(|s| s.paused.as_deref().is_some_and(|p| p.contains("402")))
        .await
        .unwrap();
    wait_until(WAIT, "every job to succeed after the pause", || async {
        count_state(&pool, "succeeded").await == 6
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();

    // max_attempts is 1: had a 402 spent the attempt, the job would have failed.
    assert_eq!(count_state(&pool, "succeeded").await, 6);
    let halted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imagegen.attempts WHERE outcome = 'halted' AND http_status = 402",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(halted, 3);
    assert_eq!(fake.calls(), 9);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_lost_final_write_is_finished_from_storage_without_a_new_call(pool: PgPool) {
    use imagegen::queue::ClaimFilter;
    use imagegen::worker::{CallSlot, Handler};

    let fake = FakeServer::start(FakeConfig {
        image_bytes: 30_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let location = s3_location();
    let storage = open_s3_at(&S3.endpoint, &location).await.unwrap();
    let queue = Queue::new(pool.clone());
    queue
        .enqueue(&NewJob {
            prompt: "a paid image whose row was never written".into(),
            batch: Some("lost-writes".into()),
            ..NewJob::default()
        })
        .await
        .unwrap();
    let pipeline = pipeline(&fake, storage, queue.clone(), PipelineConfig::default());
    let lease = Duration::from_secs(60);

    // Attempt 1 calls the model and uploads, but its result never reaches the database (the
    // worker died before the write): the lease expires and the job is rescued.
    let first = queue
        .claim(uuid::Uuid::new_v4(), 1, lease, &ClaimFilter::default())
        .await
        .unwrap()
        .remove(0);
    let paid = pipeline
        .handle(first, CallSlot::detached())
        .await
        .expect("attempt 1 succeeds");
    assert_eq!(fake.calls(), 1);
    sqlx::query("UPDATE imagegen.jobs SET lease_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(queue.rescue_expired(10).await.unwrap(), 1);

    // Attempt 2 finds the images in storage and records them without calling the model.
    let second = queue
        .claim(uuid::Uuid::new_v4(), 1, lease, &ClaimFilter::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(second.attempts, 2);
    let recovered = pipeline
        .handle(second, CallSlot::detached())
        .await
        .expect("attempt 2 succeeds");
    assert_eq!(
        fake.calls(),
        1,
        "no second call for an image already paid for"
    );
    assert_eq!(recovered.image_urls, paid.image_urls);
    assert_eq!(recovered.images[0].sha256, paid.images[0].sha256);
    assert_eq!(
        recovered.record.cost_usd,
        Decimal::ZERO,
        "nothing billed twice"
    );
}
