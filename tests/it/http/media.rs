//! `GET /media/{job}/{index}/{original|spec}` over the real S3 server: the dashboard's images are
//! the stored objects, found by the job's rows (never a path from the request), streamed with
//! their content type, an ETag that is their SHA-256 and a long cache lifetime; a matching
//! `If-None-Match` costs no body; anything the rows do not name is a 404, anything that is not a
//! spec a 400; with a token, no image leaves without it.

use imagegen::http::auth::AuthArgs;
use imagegen::http::{self, HttpState};
use imagegen::image::renditions::RenditionSettings;
use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::openrouter::{Client, Config as ClientConfig};
use imagegen::pipeline::{Pipeline, PipelineConfig};
use imagegen::queue::{NewJob, Queue};
use imagegen::storage::{Storage, StorageConfig};
use imagegen::worker::Worker;
use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::fast_config;
use crate::storage::fixture::{S3, open_s3_at};

const KEY: &str = "sk-or-test-media-key";
const TOKEN: &str = "media-token-0123456789";

/// One succeeded job with an `og` rendition (and the automatic thumbnail), made by the real
/// pipeline from the stand-in into a fresh prefix of the S3 server.
async fn made_job(pool: &PgPool) -> (Queue, Storage, i64) {
    let location = StorageConfig::new(format!("s3://{}/media-{}", S3.bucket, uuid::Uuid::new_v4()))
        .with_path_style(S3.path_style);
    let storage = open_s3_at(&S3.endpoint, &location).await.unwrap();
    let fake = FakeServer::start(FakeConfig {
        image_bytes: 60_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let queue = Queue::new(pool.clone());
    let id = queue
        .enqueue(&NewJob {
            prompt: "a lighthouse at dusk".into(),
            aspect_ratio: Some("16:9".into()),
            renditions: vec!["og".into()],
            ..NewJob::default()
        })
        .await
        .unwrap()
        .id;
    let client = Client::new(ClientConfig::new(fake.base_url(), KEY)).unwrap();
    let pipeline = Pipeline::new(
        client,
        storage.clone(),
        queue.clone(),
        PipelineConfig {
            renditions: RenditionSettings::default(),
            ..PipelineConfig::default()
        },
    );
    Worker::new(queue.clone(), pipeline, fast_config(1))
        .run(CancellationToken::new())
        .await
        .unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM imagegen.jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(state, "succeeded");
    (queue, storage, id)
}

/// Serves the router with `storage`; the server stops with the returned token.
async fn serve(queue: Queue, storage: Storage, args: AuthArgs) -> (String, CancellationToken) {
    let (listener, auth) = http::bind("127.0.0.1:0".parse().unwrap(), &args)
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let state = HttpState::new(queue, Some(storage), auth);
    tokio::spawn(http::serve(listener, http::router(state), stop.clone()));
    (base, stop)
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn media_streams_the_object_its_row_names_from_s3(pool: PgPool) {
    let (queue, storage, id) = made_job(&pool).await;
    let images = queue.job_images(id).await.unwrap();
    let renditions = queue.job_renditions(id).await.unwrap();
    assert_eq!(images.len(), 1);
    let (base, stop) = serve(queue, storage.clone(), AuthArgs::default()).await;
    let http = reqwest::Client::new();

    // The original: the stored bytes, its type, its digest as the ETag, cached for good.
    let res = http
        .get(format!("{base}/media/{id}/0/original"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers().clone();
    let body = res.bytes().await.unwrap();
    let original = &images[0];
    assert_eq!(body.len() as i64, original.bytes);
    assert_eq!(sha_hex(&body), original.sha256);
    assert_eq!(body, storage.get(&original.key).await.unwrap());
    assert_eq!(h[CONTENT_TYPE], original.content_type.as_str());
    assert_eq!(h[ETAG], format!("\"{}\"", original.sha256).as_str());
    let cache = h[CACHE_CONTROL].to_str().unwrap();
    assert!(
        cache.contains("immutable") && cache.starts_with("public"),
        "{cache}"
    );

    // A browser that has it sends the ETag back and gets no body.
    let res = http
        .get(format!("{base}/media/{id}/0/original"))
        .header(IF_NONE_MATCH, format!("\"{}\"", original.sha256))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert!(res.bytes().await.unwrap().is_empty());

    // Each rendition is its own object, with its own type; the thumbnail is there unasked.
    let mut specs: Vec<&str> = renditions.iter().map(|r| r.spec.as_str()).collect();
    specs.sort_unstable();
    assert_eq!(specs, ["og", "thumb"]);
    for r in &renditions {
        let res = http
            .get(format!("{base}/media/{id}/0/{}", r.spec))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{}", r.spec);
        assert_eq!(res.headers()[CONTENT_TYPE], r.content_type.as_str());
        let body = res.bytes().await.unwrap();
        assert_eq!(sha_hex(&body), r.sha256, "{}", r.spec);
        let img = image::load_from_memory(&body).unwrap();
        assert_eq!(
            (img.width() as i32, img.height() as i32),
            (r.width, r.height)
        );
    }
    assert_eq!(
        renditions
            .iter()
            .find(|r| r.spec == "og")
            .map(|r| (r.width, r.height)),
        Some((1200, 630))
    );

    // What the rows do not name is not found, whatever the storage holds.
    for path in [
        format!("/media/{id}/0/webp"),
        format!("/media/{id}/1/original"),
        format!("/media/{}/0/original", id + 1000),
        // The object's own key is no way in either: only the rows' specs are.
        format!("/media/{id}/0/{}", original.key.replace('/', "%2F")),
    ] {
        let res = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            res.headers()[CONTENT_TYPE],
            "application/problem+json",
            "{path}"
        );
    }
    // A key-like or traversing last part is refused before any lookup.
    for spec in ["..%2F..%2Fetc%2Fpasswd", "thumb%2F..%2F..%2F", "a%00b"] {
        let res = http
            .get(format!("{base}/media/{id}/0/{spec}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{spec}");
    }

    // A recorded object that is gone from storage is a clear 404, not a hang or a 500.
    storage.delete(&original.key).await.unwrap();
    let res = http
        .get(format!("{base}/media/{id}/0/original"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let problem: serde_json::Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("missing from storage"), "{problem}");
    stop.cancel();
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn with_a_token_no_image_leaves_without_it(pool: PgPool) {
    let (queue, storage, id) = made_job(&pool).await;
    let sha = queue.job_images(id).await.unwrap()[0].sha256.clone();
    let args = AuthArgs {
        token: Some(SecretString::from(TOKEN)),
        ..AuthArgs::default()
    };
    let (base, stop) = serve(queue, storage, args).await;
    let http = reqwest::Client::new();
    let url = format!("{base}/media/{id}/0/original");

    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_ne!(sha_hex(&res.bytes().await.unwrap()), sha);
    let res = http
        .get(&url)
        .bearer_auth("media-token-wrong-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    let res = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Behind a token the image may be cached by the browser, never by a shared cache.
    let cache = res.headers()[CACHE_CONTROL].to_str().unwrap().to_owned();
    assert!(cache.starts_with("private"), "{cache}");
    assert_eq!(sha_hex(&res.bytes().await.unwrap()), sha);
    stop.cancel();
}
