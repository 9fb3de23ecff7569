//! Signed webhooks from the outbox: retried until the receiver takes them, with the same id and
//! body, verifiable by the reference library; refused inner addresses; delivered after a crash.

use std::collections::HashSet;
use std::time::Duration;

use imagegen::notify::deliver::{Deliverer, DeliveryConfig};
use imagegen::notify::guard::GuardConfig;
use imagegen::notify::sign::WebhookSecret;
use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::queue::{NewJob, Queue};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::{
    Answer, Receiver, SECRET, WAIT, claim_and_finish, database_url, signal, spawn_worker,
    succeeded, verify_with_reference_library,
};
use crate::helpers::{pool as test_pool, wait_until};

fn quick(allow_private: bool) -> DeliveryConfig {
    DeliveryConfig {
        retry_base: Duration::from_millis(100),
        retry_cap: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        guard: GuardConfig {
            allow_private,
            timeout: Duration::from_secs(5),
        },
        ..DeliveryConfig::default()
    }
}

fn start(queue: &Queue, config: DeliveryConfig) -> CancellationToken {
    let stop = CancellationToken::new();
    let deliverer =
        Deliverer::new(queue.clone(), WebhookSecret::parse(SECRET).unwrap(), config).unwrap();
    tokio::spawn(deliverer.run(stop.clone()));
    stop
}

async fn delivery_state(pool: &PgPool, job: i64) -> Option<String> {
    sqlx::query_scalar("SELECT state FROM imagegen.deliveries WHERE job_id = $1")
        .bind(job)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn job_with_callback(queue: &Queue, prompt: &str, url: String) -> i64 {
    queue
        .enqueue(&NewJob {
            prompt: prompt.into(),
            batch: Some("hooks".into()),
            callback_url: Some(url),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_receiver_failing_twice_gets_the_third_with_the_same_id_and_a_valid_signature(
    pool: PgPool,
) {
    let receiver = Receiver::start(|n| Answer::Status(if n < 2 { 500 } else { 204 })).await;
    let queue = Queue::new(pool.clone());
    let job = job_with_callback(&queue, "a lighthouse", receiver.url()).await;
    claim_and_finish(&queue, |_| succeeded()).await;
    let stop = start(&queue, quick(true));
    wait_until(WAIT, "the delivery to succeed", || async {
        delivery_state(&pool, job).await.as_deref() == Some("delivered")
    })
    .await;
    stop.cancel();

    let got = receiver.received();
    assert_eq!(got.len(), 3, "two failures, then the one taken");
    let ids: HashSet<&str> = got
        .iter()
        .map(|r| r.headers["webhook-id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1, "the same webhook-id on every attempt");
    assert!(ids.iter().all(|id| id.starts_with("msg_")));
    assert!(got.iter().all(|r| r.body == got[0].body), "the same body");
    for r in &got {
        verify_with_reference_library(r).expect("the reference library verifies the signature");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    // The verifier can fail: a changed body does not verify.
    let mut forged = got[2].clone();
    forged.body = forged.body.replace("succeeded", "failed");
    assert!(verify_with_reference_library(&forged).is_err());

    let body: serde_json::Value = serde_json::from_str(&got[2].body).unwrap();
    assert_eq!(body["id"], job);
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["image_urls"][0], "https://cdn.example/img.png");
    // The body is the job exactly as the API returns it.
    let server = crate::http::Server::start(&pool).await;
    let (status, view) = server.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(status, 200);
    assert_eq!(body, view, "webhook body = GET /api/v1/jobs/{{id}}");
    server.stop().await;
    let (attempts, status): (i32, Option<i32>) =
        sqlx::query_as("SELECT attempts, last_status FROM imagegen.deliveries WHERE job_id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempts, status), (3, Some(204)));
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_callback_to_loopback_is_refused_without_the_flag(pool: PgPool) {
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let queue = Queue::new(pool.clone());
    let port = receiver.addr.port();
    let literal = job_with_callback(&queue, "one", receiver.url()).await;
    let named = job_with_callback(&queue, "two", format!("http://localhost:{port}/hook")).await;
    claim_and_finish(&queue, |_| succeeded()).await;
    let stop = start(&queue, quick(false));
    for job in [literal, named] {
        wait_until(WAIT, "the delivery to be refused", || async {
            delivery_state(&pool, job).await.as_deref() == Some("failed")
        })
        .await;
    }
    stop.cancel();
    assert!(
        receiver.received().is_empty(),
        "no request reached loopback"
    );
    let errors: Vec<(i32, String)> =
        sqlx::query_as("SELECT attempts, last_error FROM imagegen.deliveries ORDER BY job_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(errors.len(), 2);
    for (attempts, error) in errors {
        assert_eq!(attempts, 1, "a refusal is not retried");
        assert!(
            error.contains("not a public address") || error.contains("non-public"),
            "{error}"
        );
        assert!(error.contains("--allow-private-callbacks"), "{error}");
    }

    // The same URLs are called with the flag (after a redelivery).
    let stop = start(&queue, quick(true));
    for job in [literal, named] {
        let id: i64 = sqlx::query_scalar("SELECT id FROM imagegen.deliveries WHERE job_id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
        queue.redeliver(id).await.unwrap();
        wait_until(WAIT, "the redelivery", || async {
            delivery_state(&pool, job).await.as_deref() == Some("delivered")
        })
        .await;
    }
    stop.cancel();
    assert_eq!(receiver.received().len(), 2);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_worker_killed_between_commit_and_delivery_delivers_after_restart(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = test_pool(&opts, 4).await;
    let fake = FakeServer::start(FakeConfig {
        api_key: Some(super::KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    // The first call never gets an answer: the worker is killed while it waits.
    let receiver = Receiver::start(|n| {
        if n == 0 {
            Answer::Hang
        } else {
            Answer::Status(200)
        }
    })
    .await;
    let queue = Queue::new(db.clone());
    let job = job_with_callback(&queue, "a crane at dawn", receiver.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().to_str().unwrap();
    let url = database_url(&opts);
    let flags = ["--allow-private-callbacks", "--webhook-timeout", "2s"];
    let mut victim = spawn_worker(&url, &fake, storage, &flags, &[]);
    wait_until(WAIT, "the first webhook call", || async {
        !receiver.received().is_empty()
    })
    .await;
    signal(&victim, "-KILL");
    victim.wait().unwrap();
    let (state, delivery): (String, Option<String>) = sqlx::query_as(
        "SELECT j.state, d.state FROM imagegen.jobs j \
         LEFT JOIN imagegen.deliveries d ON d.job_id = j.id WHERE j.id = $1",
    )
    .bind(job)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        state, "succeeded",
        "the result was committed before the call"
    );
    assert_eq!(delivery.as_deref(), Some("pending"));

    let mut survivor = spawn_worker(&url, &fake, storage, &flags, &[]);
    wait_until(WAIT, "the delivery after the restart", || async {
        delivery_state(&db, job).await.as_deref() == Some("delivered")
    })
    .await;
    signal(&survivor, "-TERM");
    assert!(survivor.wait().unwrap().success());

    let got = receiver.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].headers["webhook-id"], got[1].headers["webhook-id"]);
    assert_eq!(got[0].body, got[1].body);
    verify_with_reference_library(&got[1]).unwrap();
    // The job itself ran once: only the delivery was repeated.
    assert_eq!(fake.calls(), 1);
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts WHERE job_id = $1")
            .bind(job)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(attempts, 1);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_delivery_still_failing_after_a_day_is_marked_failed(pool: PgPool) {
    let receiver = Receiver::start(|_| Answer::Status(503)).await;
    let queue = Queue::new(pool.clone());
    let job = job_with_callback(&queue, "an old one", receiver.url()).await;
    claim_and_finish(&queue, |_| succeeded()).await;
    // As if it had been failing since yesterday.
    sqlx::query("UPDATE imagegen.deliveries SET created_at = now() - interval '25 hours'")
        .execute(&pool)
        .await
        .unwrap();
    let stop = start(&queue, quick(true));
    wait_until(WAIT, "the delivery to be given up", || async {
        delivery_state(&pool, job).await.as_deref() == Some("failed")
    })
    .await;
    stop.cancel();
    assert_eq!(receiver.received().len(), 1, "one last try, then no more");
    let (status, error): (Option<i32>, String) =
        sqlx::query_as("SELECT last_status, last_error FROM imagegen.deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, Some(503));
    assert!(error.starts_with("gave up after 1 attempts"), "{error}");
    let listed = queue.deliveries(true, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].job_id, job);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn imagegen_serve_delivers_webhooks_too(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = test_pool(&opts, 4).await;
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let queue = Queue::new(db.clone());
    let job = job_with_callback(&queue, "served, not worked", receiver.url()).await;
    claim_and_finish(&queue, |_| succeeded()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allow-private-callbacks",
        ])
        .args(["--webhook-retry-base", "100ms"])
        .env("DATABASE_URL", database_url(&opts))
        .env("IMAGEGEN_STORAGE", dir.path())
        .env("IMAGEGEN_WEBHOOK_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start imagegen serve");
    wait_until(WAIT, "imagegen serve to deliver", || async {
        delivery_state(&db, job).await.as_deref() == Some("delivered")
    })
    .await;
    signal(&serve, "-TERM");
    assert!(serve.wait().unwrap().success(), "serve stops cleanly");
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    verify_with_reference_library(&got[0]).unwrap();
    let body: serde_json::Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["id"], job);
}
