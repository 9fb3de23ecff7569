//! Renditions end to end, on real Postgres, the stand-in provider and the real S3 server: every
//! spec in its exact size and format (JPEG answers labelled PNG, two-image answers, portraits
//! included), each rendition the object its URL names; specs refused at INSERT by the named
//! constraint (with the same grammar as the Rust parser); a failing rendition that leaves the
//! job succeeded after one model call; a failed rendition upload that is finished later from
//! the original, never from a rendition; and `imagegen renditions add` on a finished batch.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use imagegen::image::ImageFormat;
use imagegen::image::renditions::{RenditionSettings, Spec, make_all};
use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{
    AttemptRecord, ClaimFilter, Completion, Finish, ImageRow, NewJob, Queue, RenditionRow,
};
use imagegen::storage::{DEFAULT_CACHE_CONTROL, ObjectMeta, Storage, StorageConfig};
use imagegen::worker::{CallSlot, Handler, Worker};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{fast_config, pool};
use crate::storage::fixture::{PrivateServer, S3, open_s3_at, random_png, sdk_config};

const KEY: &str = "sk-or-test-renditions-key";

fn s3_location() -> StorageConfig {
    StorageConfig::new(format!("s3://{}/t-{}", S3.bucket, uuid::Uuid::new_v4()))
        .with_path_style(S3.path_style)
}

async fn stand_in() -> FakeServer {
    FakeServer::start(FakeConfig {
        image_bytes: 60_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap()
}

fn pipeline(fake: &FakeServer, storage: Storage, queue: Queue, r: RenditionSettings) -> Pipeline {
    let client = Client::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    Pipeline::new(
        client,
        storage,
        queue,
        PipelineConfig {
            renditions: r,
            ..PipelineConfig::default()
        },
    )
}

fn database_url(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().expect("test database name")
    )
}

async fn enqueue(queue: &Queue, prompt: &str, ratio: &str, batch: &str, specs: &[&str]) -> i64 {
    queue
        .enqueue(&NewJob {
            prompt: prompt.into(),
            aspect_ratio: Some(ratio.into()),
            batch: Some(batch.into()),
            renditions: specs.iter().map(|s| (*s).to_owned()).collect(),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id
}

/// A spec with the size and format its rendition must have.
type Want = (&'static str, (u32, u32), ImageFormat);

/// (state, image_urls, renditions, rendition_urls, rendition_errors, last_error)
type JobRow = (
    String,
    Vec<String>,
    Vec<String>,
    serde_json::Value,
    Option<serde_json::Value>,
    Option<String>,
);

async fn job_row(pool: &PgPool, id: i64) -> JobRow {
    sqlx::query_as(
        "SELECT state, image_urls, renditions, rendition_urls, rendition_errors, last_error \
         FROM imagegen.jobs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Reads the rendition back through its URL's key and checks it is what its row says: the
/// bytes (sha256, length), a decodable image of `want` size in `format`, with its content type
/// and the long cache lifetime. Returns the bytes.
async fn check_object(
    storage: &Storage,
    row: &RenditionRow,
    want: (u32, u32),
    format: ImageFormat,
) -> bytes::Bytes {
    let what = format!("{} of image {}", row.spec, row.index);
    let key = storage
        .key_from_url(&row.url)
        .unwrap_or_else(|| panic!("{what}: {} names no object of this storage", row.url));
    assert_eq!(key, row.key, "{what}: the URL names the row's key");
    let bytes = storage.get(&key).await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), row.sha256, "{what}");
    assert_eq!(bytes.len() as i64, row.bytes, "{what}");
    let (sniffed, w, h) = imagegen::image::sniff(&bytes).expect("an image");
    assert_eq!(sniffed, format, "{what}: format");
    let decoded =
        image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{what} does not decode: {e}"));
    assert_eq!((decoded.width(), decoded.height()), want, "{what}: size");
    assert_eq!((w, h), want);
    assert_eq!((row.width as u32, row.height as u32), want);
    assert!(
        key.ends_with(&format!(".{}", format.extension())),
        "{what}: {key}"
    );
    assert_eq!(row.content_type, format.content_type());
    let info = storage.head(&key).await.unwrap();
    assert_eq!(info.content_type.as_deref(), Some(format.content_type()));
    assert_eq!(info.cache_control.as_deref(), Some(DEFAULT_CACHE_CONTROL));
    bytes
}

/// The rendition rows of a job by spec (one original each).
async fn rows_by_spec(queue: &Queue, id: i64) -> BTreeMap<String, RenditionRow> {
    queue
        .job_renditions(id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.spec.clone(), r))
        .collect()
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn every_spec_comes_out_in_its_exact_size_and_format(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 6).await;
    let fake = stand_in().await;
    let storage = open_s3_at(&S3.endpoint, &s3_location()).await.unwrap();
    let queue = Queue::new(db.clone());
    let b = "site/headers";
    // Sources: 1344x768 PNGs, JPEG bytes labelled PNG, a two-image answer, a 768x1344 portrait.
    let jobs: Vec<(i64, Vec<Want>)> = vec![
        (
            enqueue(
                &queue,
                "a harbour",
                "16:9",
                b,
                &["og", "thumb", "webp", "800x800.png", "640w.jpg"],
            )
            .await,
            vec![
                ("og", (1200, 630), ImageFormat::Jpeg),
                ("thumb", (480, 274), ImageFormat::Webp),
                ("webp", (1344, 768), ImageFormat::Webp),
                ("800x800.png", (800, 800), ImageFormat::Png),
                ("640w.jpg", (640, 366), ImageFormat::Jpeg),
            ],
        ),
        (
            enqueue(
                &queue,
                "a mill [fault:jpeg-as-png]",
                "16:9",
                b,
                &["og", "300x200.webp"],
            )
            .await,
            vec![
                ("og", (1200, 630), ImageFormat::Jpeg),
                ("300x200.webp", (300, 200), ImageFormat::Webp),
                ("thumb", (480, 274), ImageFormat::Webp),
            ],
        ),
        (
            enqueue(
                &queue,
                "a kite [fault:two-images]",
                "16:9",
                b,
                &["400w.webp"],
            )
            .await,
            vec![
                ("400w.webp", (400, 229), ImageFormat::Webp),
                ("thumb", (480, 274), ImageFormat::Webp),
            ],
        ),
        (
            enqueue(
                &queue,
                "a tower",
                "9:16",
                b,
                &["og", "1200x630.jpeg", "100w.png"],
            )
            .await,
            vec![
                ("og", (1200, 630), ImageFormat::Jpeg),
                ("1200x630.jpeg", (1200, 630), ImageFormat::Jpeg),
                ("100w.png", (100, 175), ImageFormat::Png),
                ("thumb", (480, 840), ImageFormat::Webp),
            ],
        ),
    ];
    let p = pipeline(
        &fake,
        storage.clone(),
        queue.clone(),
        RenditionSettings::default(),
    );
    Worker::new(queue.clone(), p, fast_config(4))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(fake.calls(), 4, "one model call per job");

    let served: BTreeMap<String, String> = fake
        .served()
        .into_iter()
        .map(|s| (s.generation_id.clone(), s.sha256))
        .collect();
    for (id, want) in &jobs {
        let (state, urls, asked, rendition_urls, errors, last_error) = job_row(&db, *id).await;
        assert_eq!(state, "succeeded", "job {id}: {last_error:?}");
        assert_eq!(errors, None, "job {id}");
        assert_eq!(
            urls.len(),
            1,
            "job {id}: one original (a two-image answer keeps the last)"
        );
        assert!(!asked.contains(&"thumb".to_owned()) || *id == jobs[0].0);
        // The original is stored as sent, with its sniffed type and a placeholder.
        let (key, content_type, sha, placeholder): (String, String, String, Option<String>) =
            sqlx::query_as(
                "SELECT key, content_type, sha256, placeholder FROM imagegen.images \
                 WHERE job_id = $1 AND idx = 0",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
        assert!(
            served.values().any(|s| *s == sha),
            "job {id}: the paid image is the original"
        );
        let want_type = if *id == jobs[1].0 {
            "image/jpeg"
        } else {
            "image/png"
        };
        assert_eq!(
            content_type, want_type,
            "job {id}: the bytes win over the label"
        );
        assert!(
            placeholder
                .as_deref()
                .is_some_and(|p| (20..60).contains(&p.len())),
            "job {id}: a ThumbHash placeholder, got {placeholder:?}"
        );
        let original = storage.get(&key).await.unwrap();
        assert_eq!(hex::encode(Sha256::digest(&original)), sha);

        let rows = rows_by_spec(&queue, *id).await;
        let specs: Vec<&str> = rows.keys().map(String::as_str).collect();
        let mut want_specs: Vec<&str> = want.iter().map(|(s, _, _)| *s).collect();
        want_specs.sort();
        assert_eq!(
            specs, want_specs,
            "job {id}: what was asked, plus the automatic thumb"
        );
        let map = rendition_urls.as_object().unwrap();
        assert_eq!(map.len(), want.len(), "job {id}: {rendition_urls}");
        for (spec, size, format) in want {
            let row = &rows[*spec];
            assert_eq!(map[*spec], serde_json::json!([row.url]), "job {id} {spec}");
            check_object(&storage, row, *size, *format).await;
        }
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_bad_spec_is_refused_at_insert_by_the_named_constraint(pool: PgPool) {
    let insert = |specs: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO imagegen.jobs (prompt, renditions) VALUES ('a', $1::text[])")
                .bind(specs)
                .execute(&pool)
                .await
        }
    };
    assert!(
        insert("{og,thumb,webp,1200x630.jpg,800w.webp}")
            .await
            .is_ok()
    );
    for bad in [
        "{og,100x100.gif}",
        "{og,og}",
        "{15w.png}",
        "{100x4097.png}",
        "{16w.png,17w.png,18w.png,19w.png,20w.png,21w.png,22w.png,23w.png,24w.png}",
        "{NULL}",
    ] {
        let err = insert(bad).await.expect_err(bad);
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.constraint(), Some("jobs_renditions_valid"), "{bad}");
        assert!(
            db.message().contains("jobs_renditions_valid"),
            "{bad}: {}",
            db.message()
        );
    }

    // The SQL grammar and the Rust parser agree, spec by spec.
    for spec in [
        "og",
        "thumb",
        "webp",
        "OG",
        "thumb ",
        "16x16.png",
        "4096x4096.webp",
        "15x100.png",
        "100x4097.png",
        "0100x100.png",
        "100x100",
        "100x100.gif",
        "100w",
        "w.png",
        "x100.png",
        "100x.png",
        "1e3x100.png",
        "-16w.png",
        "100x100.png.png",
        "99999w.png",
        "800w.jpeg",
        "1200x630.jpg",
        "1200X630.jpg",
        "16w.PNG",
        "",
    ] {
        let sql: bool = sqlx::query_scalar("SELECT imagegen.renditions_valid(ARRAY[$1])")
            .bind(spec)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(sql, Spec::parse(spec).is_ok(), "{spec:?}");
    }
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_failing_rendition_leaves_the_job_succeeded_after_one_call(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 6).await;
    let fake = stand_in().await;
    let storage = open_s3_at(&S3.endpoint, &s3_location()).await.unwrap();
    let queue = Queue::new(db.clone());
    let id = enqueue(&queue, "a bridge", "16:9", "b", &["og"]).await;
    // Originals over this many pixels are not decoded: every rendition of the job fails.
    let settings = RenditionSettings {
        max_decode_pixels: 100_000,
        ..RenditionSettings::default()
    };
    let p = pipeline(&fake, storage.clone(), queue.clone(), settings);
    Worker::new(queue.clone(), p, fast_config(1))
        .run(CancellationToken::new())
        .await
        .unwrap();

    let (state, urls, _, rendition_urls, errors, last_error) = job_row(&db, id).await;
    assert_eq!(state, "succeeded");
    assert_eq!(last_error, None, "a rendition failure is not a job failure");
    assert_eq!(fake.calls(), 1, "the model was called once");
    assert_eq!(urls.len(), 1);
    let images = queue.job_images(id).await.unwrap();
    let original = storage.get(&images[0].key).await.unwrap();
    assert_eq!(
        fake.served()[0].sha256,
        hex::encode(Sha256::digest(&original))
    );
    assert_eq!(rendition_urls, serde_json::json!({}));
    let errors = errors.expect("the failures are recorded per spec");
    for spec in ["og", "thumb"] {
        let why = errors[spec].as_str().unwrap();
        assert!(why.contains("pixels"), "{spec}: {why}");
    }
    assert!(queue.job_renditions(id).await.unwrap().is_empty());
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts WHERE job_id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(attempts, 1);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_failed_rendition_upload_is_finished_from_the_original_never_a_rendition(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 6).await;
    let fake = stand_in().await;
    // A server of this test's own, so an object path can be blocked on its disk.
    let server = PrivateServer::start().await;
    let sdk = sdk_config(&server.endpoint, &S3.access_key, S3.secret.expose_secret()).await;
    aws_sdk_s3::Client::new(&sdk)
        .create_bucket()
        .bucket("renditions")
        .send()
        .await
        .unwrap();
    let location = "s3://renditions/p";
    let cfg = StorageConfig::new(location).with_path_style(true);
    let storage = Storage::open_with_sdk_config(&cfg, &sdk).await.unwrap();
    let queue = Queue::new(db.clone());
    let id = enqueue(&queue, "a lighthouse", "16:9", "blocked", &["og"]).await;
    // A directory where the thumbnail's object would go: its upload fails, the rest succeeds.
    let thumb_key =
        imagegen::storage::rendition_key(Some("blocked"), id, 0, 0, "thumb", ImageFormat::Webp);
    let blocker = server.data.path().join("renditions/p").join(&thumb_key);
    std::fs::create_dir_all(&blocker).unwrap();

    let p = pipeline(
        &fake,
        storage.clone(),
        queue.clone(),
        RenditionSettings::default(),
    );
    let lease = Duration::from_secs(60);
    // Attempt 1: paid, original and og stored, thumb refused; then its final write is lost.
    let first = queue
        .claim(uuid::Uuid::new_v4(), 1, lease, &ClaimFilter::default())
        .await
        .unwrap()
        .remove(0);
    let paid = p
        .handle(first, CallSlot::detached())
        .await
        .expect("attempt 1 stores the original");
    assert_eq!(fake.calls(), 1);
    let (_, _, _, urls, errors, _) = job_row(&db, id).await;
    assert!(urls.get("og").is_some(), "{urls}");
    let why = errors
        .as_ref()
        .and_then(|e| e["thumb"].as_str())
        .unwrap_or_default();
    assert!(why.contains("upload failed"), "{errors:?}");
    let mut listed = storage.list("blocked/").await.unwrap();
    listed.sort();
    assert!(
        listed
            .iter()
            .any(|k| k.ends_with(&format!("{id}-0.og.jpg"))),
        "{listed:?}"
    );
    sqlx::query("UPDATE imagegen.jobs SET lease_expires_at = now() - interval '1 second'")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(queue.rescue_expired(10).await.unwrap(), 1);

    // Attempt 2 (a real worker) finds the paid original among the job's objects, next to its
    // og JPEG, and finishes from it without a call.
    let p2 = pipeline(
        &fake,
        storage.clone(),
        queue.clone(),
        RenditionSettings::default(),
    );
    Worker::new(queue.clone(), p2, fast_config(1))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(fake.calls(), 1, "no second call for a paid image");
    let (state, image_urls, _, _, errors, _) = job_row(&db, id).await;
    assert_eq!(state, "succeeded");
    assert_eq!(image_urls, paid.image_urls, "the original, not a rendition");
    let images = queue.job_images(id).await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].content_type, "image/png");
    assert_eq!((images[0].width, images[0].height), (1344, 768));
    assert_eq!(images[0].sha256, fake.served()[0].sha256);
    assert!(
        errors.is_some_and(|e| e.get("thumb").is_some()),
        "still blocked"
    );

    // Unblocked, `renditions add` makes the thumb from the stored original.
    std::fs::remove_dir(&blocker).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["renditions", "add", "thumb", "--job", &id.to_string()])
        .env("DATABASE_URL", database_url(&opts))
        .env("IMAGEGEN_STORAGE", location)
        .env("IMAGEGEN_S3_PATH_STYLE", "true")
        .env("AWS_ENDPOINT_URL_S3", &server.endpoint)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, _, _, urls, errors, _) = job_row(&db, id).await;
    assert_eq!(errors, None, "the thumb's error is gone once it is made");
    let rows = rows_by_spec(&queue, id).await;
    assert_eq!(urls["thumb"], serde_json::json!([rows["thumb"].url]));
    // 480x274 follows the original's 1344x768; from the og card it would be 480x252. And it is
    // byte for byte the thumbnail of the original.
    let thumb = check_object(&storage, &rows["thumb"], (480, 274), ImageFormat::Webp).await;
    let original = storage.get(&images[0].key).await.unwrap();
    let thumb_spec = Spec::parse_list(&["thumb"]).unwrap();
    let from_original = make_all(&original, &thumb_spec, &RenditionSettings::default());
    let expected = from_original.renditions[0].as_ref().unwrap();
    assert_eq!(&thumb[..], &expected.bytes[..]);
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn renditions_add_on_a_finished_batch_calls_no_model(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 6).await;
    let fake = stand_in().await;
    let location = s3_location();
    let storage = open_s3_at(&S3.endpoint, &location).await.unwrap();
    let queue = Queue::new(db.clone());
    let mut posts = Vec::new();
    for i in 0..3 {
        posts.push(enqueue(&queue, &format!("post {i}"), "16:9", "posts", &[]).await);
    }
    let other = enqueue(&queue, "elsewhere", "16:9", "other", &[]).await;
    // Made before renditions existed, as it were: no automatic thumb.
    let no_thumb = RenditionSettings {
        no_auto_thumb: true,
        ..RenditionSettings::default()
    };
    let p = pipeline(&fake, storage.clone(), queue.clone(), no_thumb);
    Worker::new(queue.clone(), p, fast_config(4))
        .run(CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(fake.calls(), 4);
    // With nothing asked and the thumbnail off, no image work was done: no rendition, and the
    // original was not decoded for a placeholder either.
    let (renditions, placeholders): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM imagegen.renditions), \
                (SELECT count(placeholder) FROM imagegen.images)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((renditions, placeholders), (0, 0));

    // A job of the batch with two originals (512x512 and 320x320), in order.
    let two = queue
        .enqueue(&NewJob {
            prompt: "a diptych".into(),
            batch: Some("posts".into()),
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    let job = queue
        .claim(
            uuid::Uuid::new_v4(),
            1,
            Duration::from_secs(60),
            &ClaimFilter::default(),
        )
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job.id, two);
    let meta = ObjectMeta {
        job_id: two,
        model: job.model.clone(),
        batch: Some("posts".into()),
    };
    let mut images = Vec::new();
    for (index, side) in [(0usize, 512u32), (1, 320)] {
        let img = random_png(side, index as u64);
        let key = imagegen::storage::object_key(Some("posts"), two, index, ImageFormat::Png);
        let stored = storage.put(&key, &img, &meta).await.unwrap();
        images.push(ImageRow {
            index: index as i32,
            key: stored.key,
            url: stored.url,
            content_type: stored.content_type.to_owned(),
            bytes: stored.bytes as i64,
            width: side as i32,
            height: side as i32,
            sha256: hex::encode(Sha256::digest(&img.bytes)),
        });
    }
    let applied = queue
        .complete(&[Completion {
            job_id: two,
            lease: job.lease(),
            started_at: chrono::Utc::now(),
            duration: Duration::from_millis(5),
            finish: Finish::Succeeded {
                image_urls: images.iter().map(|i| i.url.clone()).collect(),
                images: images.clone(),
            },
            record: AttemptRecord::default(),
        }])
        .await
        .unwrap();
    assert_eq!(applied, vec![true]);
    posts.push(two);

    let add = || {
        Command::new(env!("CARGO_BIN_EXE_imagegen"))
            .args(["renditions", "add", "og,thumb", "--batch", "posts"])
            .env("DATABASE_URL", database_url(&opts))
            .env("IMAGEGEN_STORAGE", &location.location)
            .env("IMAGEGEN_S3_PATH_STYLE", "true")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = add();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fake.calls(), 4, "no model call");

    for id in &posts {
        let (state, image_urls, asked, urls, errors, _) = job_row(&db, *id).await;
        assert_eq!(state, "succeeded");
        assert_eq!(errors, None, "job {id}");
        assert_eq!(
            asked,
            ["og"],
            "job {id}: the asked spec is recorded (thumb is automatic, not asked)"
        );
        let rows = queue.job_renditions(*id).await.unwrap();
        assert_eq!(rows.len(), 2 * image_urls.len(), "job {id}");
        let missing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM imagegen.images WHERE job_id = $1 AND placeholder IS NULL",
        )
        .bind(*id)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(
            missing, 0,
            "job {id}: `renditions add` gives every original its placeholder"
        );
        for spec in ["og", "thumb"] {
            let mine: Vec<&RenditionRow> = rows.iter().filter(|r| r.spec == spec).collect();
            let want: Vec<&str> = mine.iter().map(|r| r.url.as_str()).collect();
            assert_eq!(
                urls[spec],
                serde_json::json!(want),
                "job {id} {spec}: in image order"
            );
            for (i, r) in mine.iter().enumerate() {
                assert_eq!(r.index, i as i32);
                let size = match (spec, *id == two) {
                    ("og", _) => (1200, 630),
                    // Both originals of the diptych are square.
                    ("thumb", true) => (480, 480),
                    _ => (480, 274),
                };
                check_object(
                    &storage,
                    r,
                    size,
                    if spec == "og" {
                        ImageFormat::Jpeg
                    } else {
                        ImageFormat::Webp
                    },
                )
                .await;
            }
        }
    }
    let (_, _, asked, urls, _, _) = job_row(&db, other).await;
    assert!(
        asked.is_empty() && urls == serde_json::json!({}),
        "another batch is untouched"
    );

    // Running it again does nothing: the rows (and their objects) are not rewritten.
    let before: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT key, created_at FROM imagegen.renditions ORDER BY key")
            .fetch_all(&db)
            .await
            .unwrap();
    let again = add();
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let after: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT key, created_at FROM imagegen.renditions ORDER BY key")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_eq!(fake.calls(), 4);
}
