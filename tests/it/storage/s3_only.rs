//! S3-only behaviour: verdicts for wrong credentials and a stopped server, metadata, the AWS
//! environment chain, and uploads that a server refusing aws-chunked bodies (Garage) accepts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use imagegen::error::{Classify, ErrorClass};
use imagegen::image::ImageFormat;
use imagegen::storage::{ObjectMeta, Storage, StorageConfig, StorageError};
use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::fixture::{Fixture, PrivateServer, S3, open_s3_at, random_png, sdk_config, small_png};

fn meta(job_id: i64) -> ObjectMeta {
    ObjectMeta {
        job_id,
        model: "google/gemini-2.5-flash-image".into(),
        batch: Some("Spring campaign ünïcode".into()),
    }
}

fn scratch_location() -> String {
    format!("s3://{}/t-{}", S3.bucket, uuid::Uuid::new_v4())
}

async fn open_with_credentials(access_key: &str, secret: &str) -> Storage {
    let cfg = StorageConfig::new(scratch_location()).with_path_style(S3.path_style);
    let sdk = sdk_config(&S3.endpoint, access_key, secret).await;
    Storage::open_with_sdk_config(&cfg, &sdk).await.unwrap()
}

fn assert_names_bucket_and_endpoint_but_no_secret(err: &StorageError, secrets: &[&str]) {
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(text.contains(&S3.bucket), "{text} must name the bucket");
        assert!(text.contains(&S3.endpoint), "{text} must name the endpoint");
        for s in secrets {
            assert!(!text.contains(s), "{text} leaks a secret");
        }
    }
}

#[tokio::test]
async fn a_wrong_secret_halts_with_a_message_naming_bucket_and_endpoint() {
    let wrong = "wrong-secret-3f9a7c1e";
    let storage = open_with_credentials(&S3.access_key, wrong).await;
    let key = storage.key_for(None, 1, 0, ImageFormat::Png);
    let err = storage
        .put(&key, &small_png(1), &meta(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Credentials { code, .. } if code == "SignatureDoesNotMatch"),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Halt);
    assert_names_bucket_and_endpoint_but_no_secret(&err, &[wrong, S3.secret.expose_secret()]);

    let err = storage.check().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Halt, "{err:?}");
    assert!(matches!(err, StorageError::Credentials { .. }), "{err:?}");
    assert_names_bucket_and_endpoint_but_no_secret(&err, &[wrong]);
}

#[tokio::test]
async fn an_unknown_access_key_halts() {
    let storage = open_with_credentials("no-such-key", S3.secret.expose_secret()).await;
    let err = storage.check().await.unwrap_err();
    assert!(matches!(err, StorageError::Credentials { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Halt);
    assert_names_bucket_and_endpoint_but_no_secret(&err, &[S3.secret.expose_secret()]);
}

#[tokio::test]
async fn credentials_that_cannot_be_loaded_halt() {
    // A real provider from the AWS chain, pointed at a profile that does not exist.
    let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
        .profile_name("imagegen-no-such-profile")
        .build();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&S3.endpoint)
        .region(aws_config::Region::new(S3.region.clone()))
        .credentials_provider(provider)
        .load()
        .await;
    let cfg = StorageConfig::new(scratch_location()).with_path_style(S3.path_style);
    let storage = Storage::open_with_sdk_config(&cfg, &sdk).await.unwrap();
    let err = storage.check().await.unwrap_err();
    assert!(matches!(err, StorageError::NoCredentials { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Halt);
    assert_names_bucket_and_endpoint_but_no_secret(&err, &[S3.secret.expose_secret()]);
}

#[tokio::test]
async fn the_startup_check_does_not_create_a_missing_bucket() {
    // s3s-fs, like some other servers, creates a bucket on upload; the check must not.
    let bucket = format!("imagegen-missing-{}", uuid::Uuid::new_v4().simple());
    let cfg = StorageConfig::new(format!("s3://{bucket}")).with_path_style(S3.path_style);
    let storage = open_s3_at(&S3.endpoint, &cfg).await.unwrap();
    for _ in 0..2 {
        let err = storage.check().await.unwrap_err();
        assert!(matches!(err, StorageError::NoSuchBucket { .. }), "{err:?}");
        assert_eq!(err.class(), ErrorClass::Halt);
    }
}

#[tokio::test]
async fn content_type_and_job_metadata_are_stored() {
    let fx = Fixture::s3().await;
    let key = fx.storage.key_for(Some("meta"), 77, 2, ImageFormat::Png);
    fx.storage
        .put(&key, &small_png(77), &meta(77))
        .await
        .unwrap();
    let info = fx.storage.head(&key).await.unwrap();
    assert_eq!(info.content_type.as_deref(), Some("image/png"));
    assert_eq!(info.metadata.get("job-id").map(String::as_str), Some("77"));
    assert_eq!(
        info.metadata.get("model").map(String::as_str),
        Some("google/gemini-2.5-flash-image")
    );
    assert_eq!(
        info.metadata.get("batch").map(String::as_str),
        Some("Spring campaign %C3%BCn%C3%AFcode")
    );
}

#[tokio::test]
async fn the_aws_environment_chain_is_honoured() {
    // Storage::open reads AWS_ENDPOINT_URL_S3, AWS_REGION and the credentials from the
    // environment that scripts/s3-server env exported, as the worker does.
    let cfg = StorageConfig::new(scratch_location()).with_path_style(S3.path_style);
    let storage = Storage::open(&cfg).await.unwrap();
    storage.check().await.unwrap();
    let described = storage.describe();
    assert!(described.contains(&S3.endpoint), "{described}");
    assert!(described.contains(&S3.bucket), "{described}");
    assert!(
        !described.contains(S3.secret.expose_secret()),
        "{described}"
    );
    assert!(!format!("{storage:?}").contains(S3.secret.expose_secret()));
}

#[tokio::test]
async fn presigned_urls_are_refused_beyond_seven_days() {
    let fx = Fixture::s3().await;
    let err = fx
        .storage
        .presign_get("a.png", Duration::from_secs(8 * 24 * 3600))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent, "{err}");
}

#[tokio::test]
async fn a_stopped_server_is_transient_and_named() {
    let mut server = PrivateServer::start().await;
    let sdk = sdk_config(&server.endpoint, &S3.access_key, S3.secret.expose_secret()).await;
    aws_sdk_s3::Client::new(&sdk)
        .create_bucket()
        .bucket("stopped")
        .send()
        .await
        .unwrap();
    let cfg = StorageConfig::new("s3://stopped/p").with_path_style(true);
    let storage = Storage::open_with_sdk_config(&cfg, &sdk).await.unwrap();
    let key = storage.key_for(None, 1, 0, ImageFormat::Png);
    storage.put(&key, &small_png(1), &meta(1)).await.unwrap();
    storage.check().await.unwrap();

    server.child.kill().await.unwrap();

    let err = storage
        .put(&key, &small_png(2), &meta(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unreachable { .. }), "{err:?}");
    assert!(err.class().is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains(&server.endpoint) && msg.contains("stopped"),
        "{msg}"
    );
    let err = storage.check().await.unwrap_err();
    assert!(err.class().is_transient(), "{err:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_as_transient() {
    // Accepts connections (and holds them open) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let cfg = StorageConfig::new(format!("s3://{}/p", S3.bucket))
        .with_path_style(true)
        .with_s3_timeout(Duration::from_millis(300));
    let storage = open_s3_at(&endpoint, &cfg).await.unwrap();
    let err = storage
        .put("1-0.png", &small_png(1), &meta(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Timeout { .. }), "{err:?}");
    assert!(err.class().is_transient());
    assert!(err.to_string().contains(&endpoint), "{err}");
}

/// A loopback TCP relay in front of the test server that refuses aws-chunked uploads the way
/// Garage does, and records whether it saw one. Bytes pass through unchanged otherwise, so
/// signatures (which cover the Host the client used, the relay's) still verify.
struct ChunkRefusingRelay {
    endpoint: String,
    saw_chunked: Arc<AtomicBool>,
}

impl ChunkRefusingRelay {
    async fn start(upstream: String) -> ChunkRefusingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let saw_chunked = Arc::new(AtomicBool::new(false));
        let saw = saw_chunked.clone();
        let upstream_addr = upstream.trim_start_matches("http://").to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream_addr = upstream_addr.clone();
                let saw = saw.clone();
                tokio::spawn(relay(client, upstream_addr, saw));
            }
        });
        ChunkRefusingRelay {
            endpoint,
            saw_chunked,
        }
    }
}

async fn relay(client: TcpStream, upstream_addr: String, saw: Arc<AtomicBool>) {
    let Ok(server) = TcpStream::connect(&upstream_addr).await else {
        return;
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        client_tx
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail = Vec::new();
    loop {
        let n = match client_rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Search across read boundaries: the last few bytes of the previous read plus this one.
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&buf[..n]);
        let lower = window.to_ascii_lowercase();
        let chunked = [&b"aws-chunked"[..], b"streaming-"]
            .iter()
            .any(|needle| lower.windows(needle.len()).any(|w| w == *needle));
        if chunked {
            saw.store(true, Ordering::SeqCst);
            drop(server_tx);
            let mut client_tx = back.await.unwrap();
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NotImplemented\
                        </Code><Message>aws-chunked uploads are not supported</Message></Error>";
            let resp = format!(
                "HTTP/1.1 501 Not Implemented\r\ncontent-type: application/xml\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client_tx.write_all(resp.as_bytes()).await;
            return;
        }
        tail = window[window.len().saturating_sub(16)..].to_vec();
        if server_tx.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    drop(server_tx);
    let _ = back.await;
}

#[tokio::test]
async fn uploads_work_against_a_server_that_refuses_aws_chunked_bodies() {
    let relay = ChunkRefusingRelay::start(S3.endpoint.clone()).await;
    let cfg = StorageConfig::new(scratch_location()).with_path_style(S3.path_style);
    let storage = open_s3_at(&relay.endpoint, &cfg).await.unwrap();
    let image = random_png(724, 9);
    let key = storage.key_for(Some("garage"), 9, 0, ImageFormat::Png);
    storage.put(&key, &image, &meta(9)).await.unwrap();
    assert!(storage.get(&key).await.unwrap() == image.bytes);
    storage.check().await.unwrap();
    assert!(!relay.saw_chunked.load(Ordering::SeqCst));

    // The relay does catch the SDK's defaults: a streaming body with checksums computed
    // whenever supported goes out aws-chunked and is refused.
    let sdk = sdk_config(&relay.endpoint, &S3.access_key, S3.secret.expose_secret()).await;
    let plain = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &image.bytes).unwrap();
    let body = ByteStream::from_path(file.path()).await.unwrap();
    let result = plain
        .put_object()
        .bucket(&S3.bucket)
        .key(format!("t-{}/default-sdk.png", uuid::Uuid::new_v4()))
        .body(body)
        .send()
        .await;
    assert!(
        result.is_err(),
        "the relay must refuse the SDK's default upload"
    );
    assert!(relay.saw_chunked.load(Ordering::SeqCst));
}
