//! A property test of the API from its own OpenAPI document: schemathesis (from PyPI, in the
//! venv `scripts/test` prepares and names in `IMAGEGEN_TEST_VENV`) generates requests for every
//! operation, valid and invalid, against a server with seeded data and a worker making images
//! through the stand-in. It must find no 5xx, and every answer must match the document (status,
//! content type, schema).

use std::process::Command;
use std::time::Duration;

use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, Queue};
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::Worker;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::{Server, succeed};
use crate::helpers::{fast_config, pool};

/// Test cases per operation and phase: enough to cover every operation's shapes, small enough to
/// keep the run around half a minute on a busy machine.
const MAX_EXAMPLES: &str = "25";

fn schemathesis() -> String {
    let venv = std::env::var("IMAGEGEN_TEST_VENV").expect(
        "IMAGEGEN_TEST_VENV names the tests' Python venv (run the tests with scripts/test)",
    );
    format!("{venv}/bin/st")
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn the_api_matches_its_openapi_document_under_generated_requests(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 10).await;
    let queue = Queue::new(db.clone());
    // Data of every shape: succeeded jobs with attempts and images, failed, pending, a batch with
    // a budget, a daily budget.
    let jobs: Vec<NewJob> = (0..30)
        .map(|i| NewJob {
            prompt: format!("seeded {i}"),
            batch: Some(if i % 2 == 0 { "site/a" } else { "b" }.to_owned()),
            metadata: Some(serde_json::json!({"slug": format!("s{i}")})),
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&jobs).await.unwrap();
    succeed(&queue, 10).await;
    sqlx::query(
        "UPDATE imagegen.jobs SET state = 'failed', last_error = 'seeded' WHERE id IN (11, 12)",
    )
    .execute(&db)
    .await
    .unwrap();
    queue
        .set_batch_budget("site/a", Some("5".parse().unwrap()))
        .await
        .unwrap();
    queue
        .set_daily_budget(Some("50".parse().unwrap()))
        .await
        .unwrap();

    let fake = FakeServer::start(FakeConfig {
        latency: Duration::from_millis(20),
        image_bytes: 10_000,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&StorageConfig::new(dir.path().to_string_lossy()))
        .await
        .unwrap();
    let client = Client::new(ClientConfig::new(fake.base_url(), "sk-or-schema")).unwrap();
    let pipeline = Pipeline::new(client, storage, queue.clone(), PipelineConfig::default());
    let stop = CancellationToken::new();
    let mut config = fast_config(4);
    config.exit_when_idle = false;
    let worker = tokio::spawn(Worker::new(queue.clone(), pipeline, config).run(stop.clone()));

    let s = Server::start(&db).await;
    let report = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let url = s.url("/api/v1/openapi.json");
        let st = schemathesis();
        let report = report.path().to_owned();
        move || {
            Command::new(&st)
                .args(["run", &url])
                .args([
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                ])
                .args(["--max-examples", MAX_EXAMPLES, "--seed", "20261203", "--no-shrink"])
                // One worker: Python 3.11's parser is not thread-safe under Hypothesis's lambda
                // introspection ("AST constructor recursion depth mismatch").
                .args(["--workers", "1", "--request-timeout", "30"])
                // The event stream never ends by itself (tests/it/push/stream.rs covers it).
                .args(["--exclude-path", "/api/v1/events"])
                .arg("--report-dir")
                .arg(&report)
                .current_dir(&report)
                .env("NO_COLOR", "1")
                .output()
                .unwrap_or_else(|e| panic!("run {st}: {e}"))
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("14 selected"),
        "every operation tested:\n{stdout}"
    );

    stop.cancel();
    worker.await.unwrap().unwrap();
    s.stop().await;
}
