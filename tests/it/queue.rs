//! Integration tests: the jobs table contract and the worker runtime, on the real Postgres.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use imagegen::error::ErrorClass;
use imagegen::queue::{AttemptRecord, ClaimFilter, Completion, Finish, NewJob, Queue};
use imagegen::retry::RetryPolicy;
use imagegen::worker::{CallSlot, Failure, FnHandler, Handler, Success, Worker, decide};
use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{Proxy, fast_config, pg_addr, pool, via_proxy, wait_until};

const WAIT: Duration = Duration::from_secs(60);

async fn insert_n(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt) SELECT 'job ' || g FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn count_state(pool: &PgPool, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs WHERE state = $1")
        .bind(state)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[allow(
    clippy::result_large_err,
    reason = "the handler's own result type, as the worker takes it"
)]
fn ok_success() -> Result<Success, Failure> {
    Ok(Success {
        image_urls: vec!["file:///tmp/x.png".into()],
        images: vec![],
        record: AttemptRecord {
            cost_usd: Decimal::new(39, 3),
            ..Default::default()
        },
    })
}

fn failure(class: ErrorClass, msg: &str) -> Failure {
    Failure {
        class,
        message: msg.into(),
        record: AttemptRecord::default(),
        free_retry: false,
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn every_bad_row_is_refused_by_its_named_constraint(pool: PgPool) {
    let long = "x".repeat(8001);
    let cases: Vec<(&str, String, &str)> = vec![
        ("prompt", "''".into(), "jobs_prompt_not_blank"),
        ("prompt", "E' \\n\\t '".into(), "jobs_prompt_not_blank"),
        ("prompt", format!("'{long}'"), "jobs_prompt_max_length"),
        ("aspect_ratio", "'1.91:1'".into(), "jobs_aspect_ratio_valid"),
        (
            "aspect_ratio",
            "'1200x630'".into(),
            "jobs_aspect_ratio_valid",
        ),
        ("image_size", "'8K'".into(), "jobs_image_size_valid"),
        ("image_size", "'2k'".into(), "jobs_image_size_valid"),
        ("max_attempts", "0".into(), "jobs_max_attempts_range"),
        ("max_attempts", "26".into(), "jobs_max_attempts_range"),
        ("model", "'not a model'".into(), "jobs_model_format"),
        ("batch", "'   '".into(), "jobs_batch_valid"),
        ("priority", "5000".into(), "jobs_priority_range"),
        ("state", "'done'".into(), "jobs_state_valid"),
        (
            "idempotency_key",
            "''".into(),
            "jobs_idempotency_key_not_blank",
        ),
    ];
    for (column, value, constraint) in cases {
        let sql = if column == "prompt" {
            format!("INSERT INTO imagegen.jobs (prompt) VALUES ({value})")
        } else {
            format!("INSERT INTO imagegen.jobs (prompt, {column}) VALUES ('a cat', {value})")
        };
        let err = sqlx::query(&sql).execute(&pool).await.expect_err(&sql);
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.constraint(), Some(constraint), "{column} = {value}");
    }
    // Null prompt is refused too (NOT NULL), and a running state without a lease.
    let err = sqlx::query("INSERT INTO imagegen.jobs (prompt) VALUES (NULL)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("23502")
    );
    let err = sqlx::query("INSERT INTO imagegen.jobs (prompt, state) VALUES ('a', 'running')")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().constraint(),
        Some("jobs_lease_matches_state")
    );
    // Every valid aspect ratio and size goes in.
    for ar in [
        "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
    ] {
        for size in ["1K", "2K", "4K"] {
            sqlx::query("INSERT INTO imagegen.jobs (prompt, aspect_ratio, image_size) VALUES ('ok', $1, $2)")
                .bind(ar)
                .bind(size)
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    assert_eq!(count_state(&pool, "pending").await, 30);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn defaults_and_idempotency_key(pool: PgPool) {
    let id: i64 = sqlx::query_scalar("INSERT INTO imagegen.jobs (prompt) VALUES ($1) RETURNING id")
        .bind("A calm lake at dawn")
        .fetch_one(&pool)
        .await
        .unwrap();
    let q = Queue::new(pool.clone());
    let job = q.job(id).await.unwrap();
    assert_eq!(job.aspect_ratio, "16:9");
    assert_eq!(job.model, "google/gemini-2.5-flash-image");
    assert_eq!(
        (job.state.as_str(), job.attempts, job.max_attempts),
        ("pending", 0, 3)
    );

    for _ in 0..3 {
        sqlx::query(
            "INSERT INTO imagegen.jobs (prompt, idempotency_key, metadata) VALUES ('p', 'post-42', '{\"post\": 42}') \
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs WHERE idempotency_key = 'post-42'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 1);
    let again = q
        .enqueue(&NewJob {
            prompt: "p".into(),
            idempotency_key: Some("post-42".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!again.created);
    let job = q.job(again.id).await.unwrap();
    assert_eq!(job.metadata, Some(serde_json::json!({"post": 42})));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn concurrent_claimers_take_each_job_exactly_once(_p: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 20).await;
    insert_n(&pool, 3000).await;
    let seen: Arc<Mutex<HashMap<i64, u32>>> = Arc::default();
    let mut runs = Vec::new();
    for _ in 0..6 {
        let seen = seen.clone();
        let handler = FnHandler(move |job: imagegen::queue::Job| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap().entry(job.id).or_default() += 1;
                tokio::task::yield_now().await;
                ok_success()
            }
        });
        let worker = Worker::new(Queue::new(pool.clone()), handler, fast_config(25));
        runs.push(tokio::spawn(worker.run(CancellationToken::new())));
    }
    for r in runs {
        r.await.unwrap().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3000, "every job handled");
    assert!(seen.values().all(|&n| n == 1), "no job handled twice");
    assert_eq!(count_state(&pool, "succeeded").await, 3000);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, 3000);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn raw_claims_from_many_connections_never_overlap(pool: PgPool) {
    insert_n(&pool, 2000).await;
    let q = Queue::new(pool.clone());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let me = Uuid::new_v4();
            let mut mine = Vec::new();
            loop {
                let jobs = q
                    .claim(me, 37, Duration::from_secs(60), &ClaimFilter::default())
                    .await
                    .unwrap();
                if jobs.is_empty() {
                    return mine;
                }
                mine.extend(jobs.iter().map(|j| j.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!((n, all.len()), (2000, 2000));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn claims_follow_priority_then_run_at_then_id(pool: PgPool) {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt, priority, run_at) VALUES \
         ('low-old', 0, now() - interval '2 hours'), ('high', 5, now() - interval '1 minute'), \
         ('low-new', 0, now() - interval '1 hour'), ('future', 9, now() + interval '1 hour')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let q = Queue::new(pool);
    let jobs = q
        .claim(
            Uuid::new_v4(),
            10,
            Duration::from_secs(60),
            &ClaimFilter::default(),
        )
        .await
        .unwrap();
    let prompts: Vec<&str> = jobs.iter().map(|j| j.prompt.as_str()).collect();
    assert_eq!(
        prompts,
        ["high", "low-old", "low-new"],
        "not yet due jobs are not claimed"
    );
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn expired_lease_is_taken_over_and_the_late_completion_refused(pool: PgPool) {
    insert_n(&pool, 1).await;
    let q = Queue::new(pool.clone());
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let job_a = q
        .claim(a, 1, Duration::from_secs(60), &ClaimFilter::default())
        .await
        .unwrap()
        .remove(0);
    // Worker A goes silent: its lease runs out.
    sqlx::query("UPDATE imagegen.jobs SET lease_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(q.rescue_expired(100).await.unwrap(), 1);
    let row = q.job(job_a.id).await.unwrap();
    assert_eq!(
        (row.state.as_str(), row.attempts),
        ("pending", 1),
        "the attempt stays spent"
    );
    assert!(row.last_error.unwrap().contains("lease expired"));

    let job_b = q
        .claim(b, 1, Duration::from_secs(60), &ClaimFilter::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job_b.attempts, 2);
    // A wakes up and tries to renew and finish: both refused.
    assert!(
        q.renew(a, &[(job_a.id, 1)], Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    let late = Completion {
        job_id: job_a.id,
        lease: job_a.lease(),
        started_at: Utc::now(),
        duration: Duration::from_secs(1),
        finish: Finish::Succeeded {
            image_urls: vec!["s3://stale".into()],
            images: vec![],
        },
        record: AttemptRecord::default(),
    };
    assert_eq!(q.complete(&[late]).await.unwrap(), [false]);
    // Even the same worker id with the old attempt number is refused.
    let stale_same_worker = Completion {
        job_id: job_b.id,
        lease: imagegen::queue::Lease {
            worker: b,
            attempt: 1,
        },
        started_at: Utc::now(),
        duration: Duration::ZERO,
        finish: Finish::Failed {
            error: "stale".into(),
        },
        record: AttemptRecord::default(),
    };
    assert_eq!(q.complete(&[stale_same_worker]).await.unwrap(), [false]);
    let good = Completion {
        job_id: job_b.id,
        lease: job_b.lease(),
        started_at: Utc::now(),
        duration: Duration::from_secs(1),
        finish: Finish::Succeeded {
            image_urls: vec!["s3://fresh".into()],
            images: vec![],
        },
        record: AttemptRecord::default(),
    };
    assert_eq!(q.complete(&[good]).await.unwrap(), [true]);
    let row = q.job(job_b.id).await.unwrap();
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.image_urls, ["s3://fresh"]);
    let outcomes: Vec<String> = q
        .attempts(job_b.id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, ["lease_expired", "succeeded"]);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_job_that_kills_its_worker_every_time_ends_failed(pool: PgPool) {
    sqlx::query("INSERT INTO imagegen.jobs (prompt, max_attempts) VALUES ('poison', 2)")
        .execute(&pool)
        .await
        .unwrap();
    let q = Queue::new(pool.clone());
    for _ in 0..2 {
        let claimed = q
            .claim(
                Uuid::new_v4(),
                1,
                Duration::from_secs(60),
                &ClaimFilter::default(),
            )
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        sqlx::query("UPDATE imagegen.jobs SET lease_expires_at = now() - interval '1 second'")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(q.rescue_expired(10).await.unwrap(), 1);
    }
    assert!(
        q.claim(
            Uuid::new_v4(),
            1,
            Duration::from_secs(60),
            &ClaimFilter::default()
        )
        .await
        .unwrap()
        .is_empty()
    );
    assert_eq!(count_state(&pool, "failed").await, 1);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn backoff_follows_the_policy_and_honours_a_requested_delay(pool: PgPool) {
    insert_n(&pool, 2).await;
    let q = Queue::new(pool.clone());
    let policy = RetryPolicy {
        base: Duration::from_secs(10),
        cap: Duration::from_secs(600),
    };
    let jobs = q
        .claim(
            Uuid::new_v4(),
            2,
            Duration::from_secs(60),
            &ClaimFilter::default(),
        )
        .await
        .unwrap();
    let jittered = Err(failure(ErrorClass::RETRY, "HTTP 503"));
    let asked = Err(failure(
        ErrorClass::Transient {
            after: Some(Duration::from_secs(42)),
        },
        "HTTP 429",
    ));
    let completions: Vec<Completion> = jobs
        .iter()
        .zip([&jittered, &asked])
        .map(|(job, result)| Completion {
            job_id: job.id,
            lease: job.lease(),
            started_at: Utc::now(),
            duration: Duration::from_millis(5),
            finish: decide(job, result, &policy),
            record: AttemptRecord::default(),
        })
        .collect();
    assert_eq!(q.complete(&completions).await.unwrap(), [true, true]);
    // run_at and updated_at come from the same statement's now(): their difference is the delay.
    let delays: Vec<(String, f64)> = sqlx::query_as(
        "SELECT last_error, extract(epoch FROM run_at - updated_at)::float8 FROM imagegen.jobs ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(delays[0].0, "HTTP 503");
    assert!(
        (0.0..=10.0).contains(&delays[0].1),
        "first retry within [0, base]: {}",
        delays[0].1
    );
    assert_eq!(delays[1].0, "HTTP 429");
    assert!(
        (delays[1].1 - 42.0).abs() < 0.01,
        "requested delay honoured: {}",
        delays[1].1
    );
    // The ceiling doubles per failure and stops at the cap.
    assert_eq!(policy.ceiling(3), Duration::from_secs(40));
    assert_eq!(policy.ceiling(20), Duration::from_secs(600));
    for _ in 0..100 {
        assert!(policy.delay(3, None) <= Duration::from_secs(40));
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn max_attempts_ends_in_failed_with_the_last_error(pool: PgPool) {
    sqlx::query("INSERT INTO imagegen.jobs (prompt, max_attempts) VALUES ('flaky', 3)")
        .execute(&pool)
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let handler = FnHandler(move |_job| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Err(failure(ErrorClass::RETRY, &format!("HTTP 503 on call {n}"))) }
    });
    Worker::new(Queue::new(pool.clone()), handler, fast_config(4))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let q = Queue::new(pool.clone());
    let id: i64 = sqlx::query_scalar("SELECT id FROM imagegen.jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    let job = q.job(id).await.unwrap();
    assert_eq!((job.state.as_str(), job.attempts), ("failed", 3));
    let err = job.last_error.unwrap();
    assert!(
        err.contains("HTTP 503 on call 3") && err.contains("gave up after 3 attempts"),
        "{err}"
    );
    let outcomes: Vec<String> = q
        .attempts(id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, ["retry", "retry", "failed"]);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn permanent_errors_fail_at_once_and_costs_add_up(pool: PgPool) {
    insert_n(&pool, 1).await;
    let handler = FnHandler(|_job| async {
        Err(Failure {
            class: ErrorClass::Permanent,
            message: "blocked by the provider's safety filter".into(),
            record: AttemptRecord {
                http_status: Some(200),
                prompt_tokens: 12,
                completion_tokens: 1290,
                image_tokens: 1290,
                cost_usd: Decimal::new(387036, 7),
                generation_id: Some("gen-1".into()),
            },
            free_retry: false,
        })
    });
    Worker::new(Queue::new(pool.clone()), handler, fast_config(2))
        .run(CancellationToken::new())
        .await
        .unwrap();
    let row: (String, i32, i64, Decimal) =
        sqlx::query_as("SELECT state, attempts, completion_tokens, cost_usd FROM imagegen.jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(row, ("failed".into(), 1, 1290, Decimal::new(387036, 7)));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_plain_insert_wakes_an_idle_worker_before_the_poll_interval(pool: PgPool) {
    let handled = Arc::new(tokio::sync::Notify::new());
    let h = handled.clone();
    let handler = FnHandler(move |_job| {
        let h = h.clone();
        async move {
            h.notify_one();
            ok_success()
        }
    });
    let mut cfg = fast_config(2);
    cfg.poll_interval = Duration::from_secs(3600);
    cfg.exit_when_idle = false;
    let worker = Worker::new(Queue::new(pool.clone()), handler, cfg);
    let mut status = worker.status();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    // Wait until the worker has claimed, found nothing, and is waiting.
    status.wait_for(|s| s.idle).await.unwrap();
    sqlx::query("INSERT INTO imagegen.jobs (prompt) VALUES ('wake up')")
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), handled.notified())
        .await
        .expect("the insert woke the worker (the poll interval is an hour)");
    wait_until(WAIT, "the job to succeed", || async {
        count_state(&pool, "succeeded").await == 1
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn shutdown_lets_quick_jobs_finish_and_hands_the_rest_back(pool: PgPool) {
    sqlx::query(
        "INSERT INTO imagegen.jobs (prompt) VALUES ('quick'), ('stuck'), ('stuck'), ('later')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let release_quick = Arc::new(tokio::sync::Semaphore::new(0));
    let r = release_quick.clone();
    let handler = FnHandler(move |job: imagegen::queue::Job| {
        let r = r.clone();
        async move {
            if job.prompt == "quick" {
                let _permit = r.acquire().await;
                ok_success()
            } else {
                std::future::pending().await
            }
        }
    });
    let mut cfg = fast_config(3);
    cfg.exit_when_idle = false;
    cfg.grace = Duration::from_millis(500);
    let worker = Worker::new(Queue::new(pool.clone()), handler, cfg);
    let mut status = worker.status();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    status.wait_for(|s| s.in_flight == 3).await.unwrap();
    stop.cancel();
    release_quick.add_permits(1); // the quick job finishes inside the grace period
    run.await.unwrap().unwrap();

    let rows: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT prompt, state, attempts FROM imagegen.jobs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("quick".into(), "succeeded".into(), 1),
            ("stuck".into(), "pending".into(), 0),
            ("stuck".into(), "pending".into(), 0),
            ("later".into(), "pending".into(), 0),
        ],
        "unfinished jobs handed back without spending an attempt; nothing new claimed"
    );
    let released: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts WHERE outcome = 'released'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(released, 2);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_halting_error_pauses_claiming_without_spending_attempts(pool: PgPool) {
    insert_n(&pool, 5).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let handler = FnHandler(move |_job| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(failure(ErrorClass::Halt, "HTTP 402: out of credits"))
            } else {
                ok_success()
            }
        }
    });
    // One slot, so the halt is seen before anything else is claimed. Not exiting when idle:
    // that stops at a halt (exit code 3), and this worker is to wait it out.
    let mut cfg = fast_config(1);
    cfg.exit_when_idle = false;
    let worker = Worker::new(Queue::new(pool.clone()), handler, cfg);
    let mut status = worker.status();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    status.wait_for(|s| s.paused.is_some()).await.unwrap();
    wait_until(Duration::from_secs(60), "every job to succeed", || async {
        count_state(&pool, "succeeded").await == 5
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(count_state(&pool, "succeeded").await, 5);
    let max_attempts: i32 = sqlx::query_scalar("SELECT max(attempts) FROM imagegen.jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(max_attempts, 1, "the halted attempt was given back");
    let halted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts WHERE outcome = 'halted'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(halted, 1);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn losing_the_database_mid_run_loses_nothing(_p: PgPoolOptions, opts: PgConnectOptions) {
    let direct = pool(&opts, 4).await;
    insert_n(&direct, 300).await;
    let proxy = Proxy::start(pg_addr(&opts).await).await;
    let through = pool(&via_proxy(&opts, &proxy), 10).await;
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    let handler = FnHandler(move |_job| {
        let d = d.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            d.fetch_add(1, Ordering::SeqCst);
            ok_success()
        }
    });
    let worker = Worker::new(Queue::new(through), handler, fast_config(8));
    let run = tokio::spawn(worker.run(CancellationToken::new()));
    wait_until(WAIT, "a third of the jobs to run", || async {
        done.load(Ordering::SeqCst) >= 100
    })
    .await;
    proxy.cut();
    // Stay down until the worker has visibly tried to reach the database and failed.
    wait_until(WAIT, "the worker to hit the outage", || async {
        proxy.refused.load(Ordering::SeqCst) >= 3
    })
    .await;
    proxy.restore();
    run.await.unwrap().unwrap();
    assert_eq!(
        count_state(&direct, "succeeded").await,
        300,
        "every job finished"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imagegen.jobs j WHERE NOT EXISTS \
         (SELECT 1 FROM imagegen.attempts a WHERE a.job_id = j.id AND a.outcome = 'succeeded')",
    )
    .fetch_one(&direct)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "every success has its attempt row");
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn cancel_and_retry(pool: PgPool) {
    insert_n(&pool, 2).await;
    let q = Queue::new(pool.clone());
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM imagegen.jobs ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    q.cancel(ids[0]).await.unwrap();
    assert_eq!(q.job(ids[0]).await.unwrap().state, "cancelled");
    let running = q
        .claim(
            Uuid::new_v4(),
            1,
            Duration::from_secs(60),
            &ClaimFilter::default(),
        )
        .await
        .unwrap();
    assert_eq!(running[0].id, ids[1]);
    let err = q.cancel(ids[1]).await.unwrap_err();
    assert!(err.to_string().contains("running"), "{err}");
    q.retry(ids[0]).await.unwrap();
    let job = q.job(ids[0]).await.unwrap();
    assert_eq!((job.state.as_str(), job.attempts), ("pending", 0));
    assert!(
        q.retry(ids[0]).await.is_err(),
        "a pending job cannot be retried"
    );
    assert!(matches!(
        q.job(999_999).await,
        Err(imagegen::queue::QueueError::NotFound(_))
    ));
}

#[sqlx::test(migrations = false)]
async fn migrations_are_safe_from_several_processes_at_once(pool: PgPool) {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(
            async move { imagegen::MIGRATOR.run(&pool).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, imagegen::MIGRATOR.iter().count() as i64);
}

/// A handler that counts the jobs it has started, gives its call slot back at once when
/// `answers` (as the pipeline does when the provider's answer arrives), then waits at `gate`.
struct Gated {
    answers: bool,
    started: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Handler for Gated {
    async fn handle(&self, _job: imagegen::queue::Job, slot: CallSlot) -> Result<Success, Failure> {
        self.started.fetch_add(1, Ordering::SeqCst);
        assert!(slot.is_held(), "a job starts holding its slot");
        if self.answers {
            slot.answered();
            assert!(!slot.is_held());
            slot.answered(); // twice is a no-op
        }
        if let Ok(p) = self.gate.acquire().await {
            p.forget();
        }
        ok_success()
    }
}

/// Starts a worker of concurrency 2 over 8 jobs whose handler waits at a gate, and returns how
/// many jobs were running at once before any ended, and after one ended.
async fn gated_run(pool: &PgPool, answers: bool) -> (usize, usize) {
    insert_n(pool, 8).await;
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = Gated {
        answers,
        started: started.clone(),
        gate: gate.clone(),
    };
    let run = tokio::spawn(
        Worker::new(Queue::new(pool.clone()), handler, fast_config(2))
            .run(CancellationToken::new()),
    );
    let expected = if answers { 4 } else { 2 };
    wait_until(WAIT, "the first jobs to start", || async {
        started.load(Ordering::SeqCst) >= expected
    })
    .await;
    // Several poll intervals (200 ms): a worker that would claim more has had its chance.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = started.load(Ordering::SeqCst);
    gate.add_permits(1);
    wait_until(WAIT, "a job to start after one ended", || async {
        started.load(Ordering::SeqCst) > before
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = started.load(Ordering::SeqCst);
    gate.add_permits(100);
    run.await.unwrap().unwrap();
    assert_eq!(count_state(pool, "succeeded").await, 8);
    (before, after)
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn an_answered_call_gives_its_slot_to_the_next_call_within_twice_the_concurrency(
    pool: PgPool,
) {
    // Answered jobs free their call slots: 2 calls in flight plus 2 answered, and no more (the
    // holds bound what a worker that cannot keep up takes on).
    assert_eq!(gated_run(&pool, true).await, (4, 5));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_job_that_never_answers_holds_its_slot_until_it_ends(pool: PgPool) {
    assert_eq!(gated_run(&pool, false).await, (2, 3));
}

/// The completion writer and the lease renewer update the same rows at the same time, in
/// whatever order their batches list them: both lock in id order, so neither deadlocks (a
/// deadlock is an error after Postgres's `deadlock_timeout`, and costs the writer a retry).
#[sqlx::test(migrations = "./migrations")]
async fn renewal_and_completion_of_the_same_jobs_never_deadlock(pool: PgPool) {
    let q = Queue::new(pool.clone());
    let me = Uuid::new_v4();
    let policy = RetryPolicy::default();
    for round in 0..8 {
        insert_n(&pool, 300).await;
        let jobs = q
            .claim(me, 300, Duration::from_secs(60), &ClaimFilter::default())
            .await
            .unwrap();
        assert_eq!(jobs.len(), 300);
        let completions: Vec<Completion> = jobs
            .iter()
            .map(|job| Completion {
                job_id: job.id,
                lease: job.lease(),
                started_at: Utc::now(),
                duration: Duration::from_millis(5),
                finish: decide(job, &ok_success(), &policy),
                record: AttemptRecord::default(),
            })
            .collect();
        // The renewal lists them the other way round.
        let held: Vec<(i64, i32)> = jobs.iter().rev().map(|j| (j.id, j.attempts)).collect();
        let (renewed, completed) = tokio::join!(
            q.renew(me, &held, Duration::from_secs(60)),
            q.complete(&completions)
        );
        let renewed = renewed.unwrap_or_else(|e| panic!("round {round}: renewal failed: {e}"));
        let completed =
            completed.unwrap_or_else(|e| panic!("round {round}: completion failed: {e}"));
        // Every completion applies (the renewal changes no fence), and the renewal saw each job
        // either still running or already finished.
        assert!(completed.iter().all(|&applied| applied), "round {round}");
        assert!(renewed.len() <= 300);
    }
    assert_eq!(count_state(&pool, "succeeded").await, 8 * 300);
}
