//! Overnight runs, reference images, regeneration and pruning, against real Postgres, the
//! stand-in provider and the loopback S3 server.

use std::process::Command;
use std::time::Duration;

use chrono::{Timelike, Utc};
use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, PruneFilter, Queue};
use imagegen::retry::RetryPolicy;
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::{Stopped, Window, Worker, WorkerConfig};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{fast_config, pool};
use crate::storage::fixture::{S3, open_s3_at};

const KEY: &str = "sk-or-test-overnight-key";

async fn fake() -> FakeServer {
    FakeServer::start(FakeConfig {
        image_bytes: 20_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap()
}

async fn s3() -> (Storage, StorageConfig) {
    let location = StorageConfig::new(format!("s3://{}/t-{}", S3.bucket, uuid::Uuid::new_v4()))
        .with_path_style(S3.path_style);
    (open_s3_at(&S3.endpoint, &location).await.unwrap(), location)
}

fn pipeline(fake: &FakeServer, storage: Storage, queue: &Queue) -> Pipeline {
    let client = Client::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    Pipeline::new(client, storage, queue.clone(), PipelineConfig::default())
}

fn database_url(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().expect("test database name")
    )
}

async fn run(queue: &Queue, pipeline: Pipeline, config: WorkerConfig) -> Stopped {
    Worker::new(queue.clone(), pipeline, config)
        .run(CancellationToken::new())
        .await
        .unwrap()
}

async fn states(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT state, count(*) FROM imagegen.jobs GROUP BY 1 ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn jobs(prompts: &[String], batch: &str) -> Vec<NewJob> {
    prompts
        .iter()
        .map(|p| NewJob {
            prompt: p.clone(),
            batch: Some(batch.into()),
            ..NewJob::default()
        })
        .collect()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn one_exit_when_idle_run_finishes_a_batch_whose_jobs_need_retries(pool: PgPool) {
    let fake = fake().await;
    let queue = Queue::new(pool.clone());
    let prompts: Vec<String> = (0..6)
        .map(|i| match i % 3 {
            0 => format!("night {i} [fault:503x2]"),
            1 => format!("night {i} [fault:429x1]"),
            _ => format!("night {i}"),
        })
        .collect();
    queue
        .enqueue_many(&jobs(&prompts, "overnight"))
        .await
        .unwrap();
    let storage = Storage::open(&StorageConfig::new(
        tempfile::tempdir().unwrap().keep().to_str().unwrap(),
    ))
    .await
    .unwrap();
    // Real backoff: every retry is scheduled for later, so the worker sees nothing due while
    // the retries wait. Before `retry_pending` it exited then, leaving the batch unfinished.
    let mut config = fast_config(6);
    config.retry = RetryPolicy {
        base: Duration::from_millis(400),
        cap: Duration::from_millis(800),
    };
    let stopped = run(&queue, pipeline(&fake, storage, &queue), config).await;
    assert_eq!(stopped, Stopped::Idle);
    assert_eq!(stopped.exit_code(), 0);
    assert_eq!(states(&pool).await, [("succeeded".to_owned(), 6)]);
    assert_eq!(fake.calls_for(&prompts[0]), 3, "two 503s, then success");
    assert_eq!(fake.calls_for(&prompts[1]), 2);
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs WHERE retry_pending")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(waiting, 0, "the flag is cleared once the retry is claimed");
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn jobs_scheduled_for_later_do_not_keep_the_worker_but_retries_do(pool: PgPool) {
    let queue = Queue::new(pool.clone());
    let later = NewJob {
        prompt: "tomorrow".into(),
        run_at: Some(Utc::now() + chrono::Duration::hours(6)),
        ..NewJob::default()
    };
    queue.enqueue(&later).await.unwrap();
    let left = queue.work_left(None, &[]).await.unwrap();
    assert_eq!((left.scheduled, left.soon()), (1, false));
    // The same row waiting for a retry is work left soon.
    sqlx::query("UPDATE imagegen.jobs SET retry_pending = true")
        .execute(&pool)
        .await
        .unwrap();
    let left = queue.work_left(None, &[]).await.unwrap();
    assert_eq!((left.retrying, left.soon()), (1, true));
    // A manual retry clears the flag along with the attempts.
    sqlx::query("UPDATE imagegen.jobs SET state = 'failed', finished_at = now()")
        .execute(&pool)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT id FROM imagegen.jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    queue.retry(id).await.unwrap();
    let flag: bool = sqlx::query_scalar("SELECT retry_pending FROM imagegen.jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!flag);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_window_in_the_past_claims_nothing(pool: PgPool) {
    let fake = fake().await;
    let queue = Queue::new(pool.clone());
    let prompts: Vec<String> = (0..3).map(|i| format!("windowed {i}")).collect();
    queue.enqueue_many(&jobs(&prompts, "w")).await.unwrap();
    let storage = Storage::open(&StorageConfig::new(
        tempfile::tempdir().unwrap().keep().to_str().unwrap(),
    ))
    .await
    .unwrap();
    let hour = |h: i64| (Utc::now() + chrono::Duration::hours(h)).hour();
    // From three hours ago to two hours ago, UTC: closed now, whatever the time of day.
    let past = Window::parse(
        &format!("{:02}:00-{:02}:00", hour(-3), hour(-2)),
        Some("UTC"),
    )
    .unwrap();
    assert!(!past.contains(Utc::now()));
    let mut config = fast_config(4);
    config.window = Some(past);
    let stopped = run(&queue, pipeline(&fake, storage.clone(), &queue), config).await;
    let Stopped::WorkLeft(reason) = &stopped else {
        panic!("expected to stop with work left, got {stopped:?}");
    };
    assert!(
        reason.contains("window") && reason.contains("3 job(s)"),
        "{reason}"
    );
    assert_eq!(stopped.exit_code(), 3);
    assert_eq!(fake.calls(), 0, "nothing was claimed");
    let unclaimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imagegen.jobs WHERE state = 'pending' AND attempts = 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(unclaimed, 3);

    // The same jobs inside an open window (an hour either side of now) are made.
    let open = Window::parse(
        &format!("{:02}:00-{:02}:00", hour(-1), hour(2)),
        Some("UTC"),
    )
    .unwrap();
    let mut config = fast_config(4);
    config.window = Some(open);
    assert_eq!(
        run(&queue, pipeline(&fake, storage, &queue), config).await,
        Stopped::Idle
    );
    assert_eq!(states(&pool).await, [("succeeded".to_owned(), 3)]);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn budget_and_halt_stop_with_work_left_and_hand_jobs_back(pool: PgPool) {
    let fake = fake().await;
    let queue = Queue::new(pool.clone());
    queue
        .set_batch_budget("capped", Some(Decimal::ZERO))
        .await
        .unwrap();
    let prompts: Vec<String> = (0..2).map(|i| format!("capped {i}")).collect();
    queue.enqueue_many(&jobs(&prompts, "capped")).await.unwrap();
    let storage = Storage::open(&StorageConfig::new(
        tempfile::tempdir().unwrap().keep().to_str().unwrap(),
    ))
    .await
    .unwrap();
    let stopped = run(
        &queue,
        pipeline(&fake, storage.clone(), &queue),
        fast_config(2),
    )
    .await;
    let Stopped::WorkLeft(reason) = &stopped else {
        panic!("expected to stop with work left, got {stopped:?}");
    };
    assert!(
        reason.contains("budget") && reason.contains("capped"),
        "{reason}"
    );
    assert_eq!(fake.calls(), 0);

    // A bad key halts every job: the run ends, the jobs wait with no attempt spent.
    queue.set_batch_budget("capped", None).await.unwrap();
    let client = Client::new(ClientConfig::new(fake.base_url(), "sk-or-wrong")).unwrap();
    let bad = Pipeline::new(client, storage, queue.clone(), PipelineConfig::default());
    let stopped = run(&queue, bad, fast_config(1)).await;
    let Stopped::WorkLeft(reason) = &stopped else {
        panic!("expected to stop with work left, got {stopped:?}");
    };
    assert!(
        reason.starts_with("halted") && reason.contains("401"),
        "{reason}"
    );
    let untouched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM imagegen.jobs WHERE state = 'pending' AND attempts = 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(untouched, 2, "handed back, never failed");
}

/// A small real PNG.
fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([seed, (x * 16) as u8, (y * 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_reference_image_reaches_the_stand_in_in_the_right_shape(pool: PgPool) {
    let fake = fake().await;
    let queue = Queue::new(pool.clone());
    let (storage, _) = s3().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("style.png");
    let bytes = png(7);
    std::fs::write(&file, &bytes).unwrap();
    let key = imagegen::references::store_reference(&storage, &file)
        .await
        .unwrap();
    assert!(
        key.starts_with("references/") && key.ends_with(".png"),
        "{key}"
    );
    // Stored once, whoever stores it again.
    assert_eq!(
        imagegen::references::store_reference(&storage, &file)
            .await
            .unwrap(),
        key
    );
    let url = "https://93.184.215.14/logo.png".to_owned();
    let with_refs: Vec<NewJob> = (0..3)
        .map(|i| NewJob {
            prompt: format!("styled {i}"),
            reference_images: vec![key.clone(), url.clone()],
            ..NewJob::default()
        })
        .collect();
    queue.enqueue_many(&with_refs).await.unwrap();
    // An object that is not an image fails its job before any call.
    storage
        .put_bytes(
            "references/notes.png",
            bytes::Bytes::from_static(b"not an image at all"),
            "image/png",
            None,
        )
        .await
        .unwrap();
    queue
        .enqueue(&NewJob {
            prompt: "bad reference".into(),
            reference_images: vec!["references/notes.png".into()],
            ..NewJob::default()
        })
        .await
        .unwrap();

    let p = pipeline(&fake, storage.clone(), &queue);
    // One encoded buffer, whoever asks for it while it is held.
    let cache = imagegen::references::ReferenceCache::default();
    let a = cache.data_url(&storage, &key).await.unwrap();
    let b = cache.data_url(&storage, &key).await.unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(cache.held(), 1);
    drop((a, b));
    assert_eq!(cache.held(), 0);

    let stopped = run(&queue, p, fast_config(3)).await;
    assert_eq!(stopped, Stopped::Idle);
    let rows: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT prompt, state, last_error FROM imagegen.jobs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (prompt, state, error) in &rows {
        let want = if prompt == "bad reference" {
            "failed"
        } else {
            "succeeded"
        };
        assert_eq!(state, want, "{prompt}: {error:?}");
    }
    let bad_error = rows[3].2.as_deref().unwrap_or_default();
    assert!(bad_error.contains("not a PNG"), "{bad_error}");
    assert_eq!(fake.calls_for("bad reference"), 0);

    let sha = hex::encode(Sha256::digest(&bytes));
    let received = fake.stats().references;
    assert_eq!(received.len(), 6, "{received:?}");
    for i in 0..3 {
        let prompt = format!("styled {i}");
        let mine: Vec<_> = received.iter().filter(|r| r.prompt == prompt).collect();
        assert_eq!(mine.len(), 2, "{prompt}");
        assert_eq!(mine[0].part, 1);
        assert_eq!(mine[0].sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(mine[0].bytes, bytes.len());
        assert_eq!(mine[1].part, 2);
        assert_eq!(mine[1].url.as_deref(), Some(url.as_str()));
    }
}

#[tokio::test]
async fn the_stand_in_refuses_malformed_reference_parts() {
    let fake = fake().await;
    let http = reqwest::Client::new();
    let send = |content: serde_json::Value| {
        let http = http.clone();
        let url = format!("{}/chat/completions", fake.base_url());
        async move {
            let r = http
                .post(url)
                .bearer_auth(KEY)
                .json(&serde_json::json!({
                    "model": "google/gemini-2.5-flash-image",
                    "messages": [{"role": "user", "content": content}],
                    "modalities": ["image", "text"]
                }))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let image = |url: &str| serde_json::json!({"type": "image_url", "image_url": {"url": url}});
    let text = serde_json::json!({"type": "text", "text": "a lake"});
    let cases = [
        (
            serde_json::json!([image("https://a.example/x.png"), text]),
            "first part must be the text",
        ),
        (
            serde_json::json!([text, image("http://a.example/x.png")]),
            "https:// or a data: URL",
        ),
        (
            serde_json::json!([text, image("data:image/png;base64,%%%")]),
            "not valid base64",
        ),
        (
            serde_json::json!([text, image("data:image/jpeg;base64,iVBORw0KGgo=")]),
            "not a image/jpeg image",
        ),
        (
            serde_json::json!([text, {"type": "image_url"}]),
            "needs image_url.url",
        ),
    ];
    for (content, want) in cases {
        let (status, body) = send(content).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(want), "{want:?} in {body}");
    }
    assert!(fake.stats().references.is_empty());
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn regenerate_keeps_history_under_new_keys(pool: PgPool) {
    let fake = fake().await;
    let queue = Queue::new(pool.clone());
    let (storage, _) = s3().await;
    let id = queue
        .enqueue(&NewJob {
            prompt: "first take".into(),
            batch: Some("regen".into()),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    assert!(matches!(
        queue.regenerate(id, None).await,
        Err(imagegen::queue::QueueError::WrongState { .. })
    ));
    run(
        &queue,
        pipeline(&fake, storage.clone(), &queue),
        fast_config(1),
    )
    .await;
    let first = queue.job(id).await.unwrap();
    assert_eq!(first.state, "succeeded");
    let first_key = format!("regen/{id}-0.png");
    assert!(
        first.image_urls[0].ends_with(&first_key),
        "{:?}",
        first.image_urls
    );
    let first_cost = first.cost_usd;

    // Paid images left over from generation 1 are never recovered into generation 2.
    queue.stash_images(id, 1, &[png(1)], None).await.unwrap();

    assert_eq!(queue.regenerate(id, Some("second take")).await.unwrap(), 2);
    run(
        &queue,
        pipeline(&fake, storage.clone(), &queue),
        fast_config(1),
    )
    .await;
    let second = queue.job(id).await.unwrap();
    assert_eq!(
        (second.state.as_str(), second.prompt.as_str()),
        ("succeeded", "second take")
    );
    let second_key = format!("regen/{id}-g2-0.png");
    assert_eq!(second.image_urls.len(), 1);
    assert!(
        second.image_urls[0].ends_with(&second_key),
        "{:?}",
        second.image_urls
    );
    assert_eq!(
        fake.calls_for("second take"),
        1,
        "made anew, not from the stash"
    );
    assert!(second.cost_usd > first_cost, "cost adds up");
    assert_eq!(second.cost_usd, fake.billed_usd());

    // History: both generations' rows and objects.
    let history = queue.image_history(id).await.unwrap();
    let keys: Vec<(i32, &str)> = history.iter().map(|(g, i)| (*g, i.key.as_str())).collect();
    assert_eq!(keys, [(1, first_key.as_str()), (2, second_key.as_str())]);
    assert_ne!(history[0].1.sha256, history[1].1.sha256);
    assert_eq!(
        storage.get(&first_key).await.unwrap().len() as i64,
        history[0].1.bytes
    );
    let current = queue.job_images(id).await.unwrap();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].key, second_key);
    let attempts: Vec<(i32, String)> = sqlx::query_as(
        "SELECT generation, outcome FROM imagegen.attempts WHERE job_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        attempts,
        [(1, "succeeded".to_owned()), (2, "succeeded".to_owned())]
    );
    // The thumbnail made for each generation is kept under that generation's key.
    let thumbs: Vec<(i32, String)> = sqlx::query_as(
        "SELECT generation, key FROM imagegen.renditions WHERE job_id = $1 ORDER BY generation",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(thumbs.len(), 2, "{thumbs:?}");
    assert!(
        thumbs[1].1.starts_with(&format!("regen/{id}-g2-0.")),
        "{thumbs:?}"
    );
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn prune_removes_rows_and_objects(_p: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 4).await;
    let fake = fake().await;
    let queue = Queue::new(db.clone());
    let (storage, location) = s3().await;
    let old: Vec<String> = (0..5).map(|i| format!("old {i}")).collect();
    let new: Vec<String> = (0..2).map(|i| format!("new {i}")).collect();
    queue.enqueue_many(&jobs(&old, "old")).await.unwrap();
    queue.enqueue_many(&jobs(&new, "new")).await.unwrap();
    run(
        &queue,
        pipeline(&fake, storage.clone(), &queue),
        fast_config(4),
    )
    .await;
    assert_eq!(states(&db).await, [("succeeded".to_owned(), 7)]);
    // One old job was regenerated: its history goes too.
    let regenerated: i64 =
        sqlx::query_scalar("SELECT min(id) FROM imagegen.jobs WHERE batch = 'old'")
            .fetch_one(&db)
            .await
            .unwrap();
    queue.regenerate(regenerated, None).await.unwrap();
    run(
        &queue,
        pipeline(&fake, storage.clone(), &queue),
        fast_config(4),
    )
    .await;
    sqlx::query(
        "UPDATE imagegen.jobs SET finished_at = now() - interval '10 days' WHERE batch = 'old'",
    )
    .execute(&db)
    .await
    .unwrap();
    let old_objects = storage.list("old/").await.unwrap();
    // Five originals, one more generation, and a thumbnail of each.
    assert_eq!(old_objects.len(), 12, "{old_objects:?}");
    let new_objects = storage.list("new/").await.unwrap();
    assert_eq!(new_objects.len(), 4, "{new_objects:?}");

    let cutoff = (Utc::now() - chrono::Duration::days(3))
        .format("%Y-%m-%d")
        .to_string();
    let cli = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
            .args(["prune", "--finished-before", &cutoff, "--chunk", "2"])
            .args(extra)
            .env("DATABASE_URL", database_url(&opts))
            .env("IMAGEGEN_STORAGE", &location.location)
            .env("IMAGEGEN_S3_PATH_STYLE", S3.path_style.to_string())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let dry = cli(&["--objects", "--dry-run"]);
    assert!(dry.contains("5 job(s) match, with 12 object(s)"), "{dry}");
    assert!(dry.contains("nothing deleted"), "{dry}");
    assert_eq!(storage.list("old/").await.unwrap().len(), 12);

    let done = cli(&["--objects"]);
    assert!(done.contains("deleted 5 job(s) and 12 object(s)"), "{done}");
    assert!(storage.list("old/").await.unwrap().is_empty());
    assert_eq!(storage.list("new/").await.unwrap(), new_objects);
    let left: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT batch, count(*) FROM imagegen.jobs GROUP BY 1")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(left, [(Some("new".to_owned()), 2)]);
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM imagegen.images) + (SELECT count(*) FROM imagegen.attempts) \
             + (SELECT count(*) FROM imagegen.renditions)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(orphans, 2 + 2 + 2, "only the new jobs' rows are left");

    // `batch delete` is the same code without a date: pending jobs of the batch go too.
    queue
        .enqueue(&NewJob {
            prompt: "not yet".into(),
            batch: Some("new".into()),
            run_at: Some(Utc::now() + chrono::Duration::days(1)),
            ..NewJob::default()
        })
        .await
        .unwrap();
    let whole = PruneFilter {
        finished_before: None,
        batch: Some("new".into()),
        include_pending: true,
    };
    assert_eq!(queue.prune_count(&whole).await.unwrap().jobs, 3);
    let p = imagegen::prune::prune(&queue, Some(&storage), &whole, 1, |_| {})
        .await
        .unwrap();
    assert_eq!((p.jobs, p.objects, p.chunks), (3, 4, 3));
    assert!(storage.list("new/").await.unwrap().is_empty());
}
