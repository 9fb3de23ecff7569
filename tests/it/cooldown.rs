//! The provider's in-flight limit (402 `in_flight_budget_exhausted` with `Retry-After`): the
//! worker cools down, hands refused jobs back without spending their attempt, and settles its
//! in-flight ceiling just under the count the provider accepts, instead of halting.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, Queue};
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::Worker;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{fast_config, pool};

const KEY: &str = "sk-or-test-cooldown-key";
/// What the stand-in accepts at once.
const LIMIT: usize = 6;
/// What the worker would run at once without refusals.
const CONCURRENCY: usize = 24;
const JOBS: usize = 60;

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn the_worker_settles_under_the_provider_s_in_flight_limit_without_spending_attempts(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 8).await;
    let fake = FakeServer::start(FakeConfig {
        // Long against the worker's own work per job, so what is in flight at the worker is
        // what is in flight at the provider.
        latency: Duration::from_secs(1),
        pad_interval: Duration::from_millis(100),
        image_bytes: 20_000,
        api_key: Some(KEY.into()),
        in_flight_limit: Some(LIMIT),
        in_flight_retry_after: 1,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&StorageConfig::new(dir.path().to_str().unwrap()))
        .await
        .unwrap();
    let queue = Queue::new(db.clone());
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| NewJob {
            prompt: format!("a heron at dusk {i}"),
            // One attempt each: a refusal that spent the attempt would fail the job.
            max_attempts: Some(1),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();

    let client = Client::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    let mut config = PipelineConfig::default();
    config.renditions.no_auto_thumb = true;
    let pipeline = Pipeline::new(client, storage, queue.clone(), config);
    let worker = Worker::new(queue.clone(), pipeline, fast_config(CONCURRENCY));
    let mut status = worker.status();
    assert_eq!(status.borrow().ceiling, CONCURRENCY);

    // The ceiling right after each refusal, and whether the worker ever halted.
    let seen: Arc<Mutex<(Vec<usize>, bool)>> = Arc::default();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut refusals = 0;
            while status.changed().await.is_ok() {
                let s = status.borrow_and_update().clone();
                let mut seen = seen.lock().unwrap();
                if s.saturated > refusals {
                    refusals = s.saturated;
                    seen.0.push(s.ceiling);
                }
                if s.paused
                    .as_deref()
                    .is_some_and(|p| !p.contains("saturated"))
                {
                    seen.1 = true;
                }
            }
        })
    };
    tokio::time::timeout(
        Duration::from_secs(180),
        worker.run(CancellationToken::new()),
    )
    .await
    .expect("the worker finished the jobs in time")
    .unwrap();
    watcher.await.unwrap();

    let stats = fake.stats();
    assert!(
        stats.refused_in_flight > 0,
        "the stand-in refused calls beyond its limit"
    );
    assert!(stats.peak_in_flight <= LIMIT);

    // Every job succeeded on its one attempt: refusals gave theirs back.
    let (succeeded, max_attempts): (i64, i32) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), COALESCE(max(attempts), 0) \
         FROM imagegen.jobs",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(succeeded, JOBS as i64);
    assert_eq!(max_attempts, 1);
    // Each refusal is recorded as a free retry; nothing halted.
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM imagegen.attempts GROUP BY outcome ORDER BY outcome",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        outcomes,
        vec![
            ("retry".to_owned(), stats.refused_in_flight as i64),
            ("succeeded".to_owned(), JOBS as i64)
        ]
    );
    let (ceilings, halted) = seen.lock().unwrap().clone();
    assert!(
        !halted,
        "the worker never paused for anything but the cool-down"
    );

    // Settled just under the limit: once the first round's refusals brought it down, every
    // later refusal finds the ceiling within a step of what the stand-in accepts.
    let first_settled = ceilings
        .iter()
        .position(|c| *c <= LIMIT + 2)
        .expect("the ceiling came down to the limit");
    assert!(
        ceilings[first_settled..]
            .iter()
            .all(|c| (LIMIT * 3 / 4..=LIMIT + 2).contains(c)),
        "the ceiling after each refusal: {ceilings:?}"
    );
    // Without the ceiling every round would refuse all but LIMIT of CONCURRENCY calls (three
    // refusals per success); with it, refusals are the first round's plus one per climb.
    assert!(
        stats.refused_in_flight < JOBS as u64,
        "{} refusals for {JOBS} jobs",
        stats.refused_in_flight
    );
}
