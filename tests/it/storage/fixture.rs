//! Per-test storage roots on either backend, the loopback S3 server's settings, and test images.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::LazyLock;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use bytes::Bytes;
use imagegen::image::{DecodedImage, ImageFormat};
use imagegen::storage::{Storage, StorageConfig, StorageError};
use secrecy::{ExposeSecret, SecretString};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The loopback S3 server's settings, as `scripts/s3-server env` exports them.
pub struct S3Env {
    pub endpoint: String,
    pub access_key: String,
    pub secret: SecretString,
    pub region: String,
    pub bucket: String,
    pub path_style: bool,
    /// The s3s-fs binary, for tests that run a private server.
    pub s3s_bin: Option<PathBuf>,
}

pub static S3: LazyLock<S3Env> = LazyLock::new(|| {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: the storage tests need the loopback S3 server. Run them with \
                 scripts/test, or: scripts/s3-server up && eval \"$(scripts/s3-server env)\" && \
                 cargo nextest run"
            )
        })
    };
    S3Env {
        endpoint: var("AWS_ENDPOINT_URL_S3"),
        access_key: var("AWS_ACCESS_KEY_ID"),
        secret: SecretString::from(var("AWS_SECRET_ACCESS_KEY")),
        region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        bucket: var("IMAGEGEN_TEST_S3_BUCKET"),
        path_style: var("IMAGEGEN_S3_PATH_STYLE") == "true",
        s3s_bin: std::env::var_os("IMAGEGEN_TEST_S3S_BIN").map(PathBuf::from),
    }
});

/// An AWS configuration with explicit endpoint and credentials, so a test can use wrong ones
/// without touching the process environment.
pub async fn sdk_config(endpoint: &str, access_key: &str, secret: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(S3.region.clone()))
        .credentials_provider(Credentials::new(
            access_key,
            secret,
            None,
            None,
            "imagegen-tests",
        ))
        .load()
        .await
}

/// Opens an S3 location on `endpoint` with the loopback server's credentials.
pub async fn open_s3_at(endpoint: &str, cfg: &StorageConfig) -> Result<Storage, StorageError> {
    let sdk = sdk_config(endpoint, &S3.access_key, S3.secret.expose_secret()).await;
    Storage::open_with_sdk_config(cfg, &sdk).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3,
    Local,
}

/// A fresh storage root for one test, and its parent, to see whatever lands outside the root.
pub struct Fixture {
    pub kind: Kind,
    /// The storage under test, rooted at `{parent}/inside`.
    pub storage: Storage,
    /// The same backend rooted one level up.
    pub outer: Storage,
    /// The settings `storage` was opened with.
    pub config: StorageConfig,
    /// A prefix (S3) or directory (local) no other test uses.
    scratch: String,
    _dir: Option<TempDir>,
}

impl Fixture {
    /// A root under a unique prefix in the shared test bucket.
    pub async fn s3() -> Fixture {
        let scratch = format!("t-{}", uuid::Uuid::new_v4());
        let loc = |p: &str| format!("s3://{}/{p}", S3.bucket);
        let config =
            StorageConfig::new(loc(&format!("{scratch}/inside"))).with_path_style(S3.path_style);
        let outer_cfg = StorageConfig::new(loc(&scratch)).with_path_style(S3.path_style);
        Fixture {
            kind: Kind::S3,
            storage: open_s3_at(&S3.endpoint, &config).await.unwrap(),
            outer: open_s3_at(&S3.endpoint, &outer_cfg).await.unwrap(),
            config,
            scratch,
            _dir: None,
        }
    }

    /// A root in a fresh temporary directory.
    pub async fn local() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().to_str().unwrap().to_owned();
        let config = StorageConfig::new(format!("{scratch}/inside"));
        Fixture {
            kind: Kind::Local,
            storage: Storage::open(&config).await.unwrap(),
            outer: Storage::open(&StorageConfig::new(&scratch)).await.unwrap(),
            config,
            scratch,
            _dir: Some(dir),
        }
    }

    /// Opens the same root with changed settings.
    pub async fn reopen(&self, cfg: StorageConfig) -> Storage {
        match self.kind {
            Kind::S3 => open_s3_at(&S3.endpoint, &cfg).await.unwrap(),
            Kind::Local => Storage::open(&cfg).await.unwrap(),
        }
    }

    /// The object key inside the bucket (S3) or the path inside the directory (local) of `key`.
    pub fn full_key(&self, key: &str) -> String {
        match self.kind {
            Kind::S3 => format!("{}/inside/{key}", self.scratch),
            Kind::Local => key.to_owned(),
        }
    }

    /// Opens a location that cannot work (a bucket that does not exist; a directory below a
    /// regular file) and runs the startup check, as `imagegen worker` does. Returns what the
    /// error must name, and the outcome.
    pub async fn open_and_check_a_bad_location(&self) -> (String, Result<(), StorageError>) {
        match self.kind {
            Kind::S3 => {
                let bucket = format!("imagegen-missing-{}", &uuid::Uuid::new_v4().simple());
                let cfg =
                    StorageConfig::new(format!("s3://{bucket}/p")).with_path_style(S3.path_style);
                let storage = open_s3_at(&S3.endpoint, &cfg).await.unwrap();
                (bucket, storage.check().await)
            }
            Kind::Local => {
                let blocker = Path::new(&self.scratch).join("blocker");
                std::fs::write(&blocker, b"a file where a directory should be").unwrap();
                let path = blocker.join("images");
                let cfg = StorageConfig::new(path.to_str().unwrap());
                let outcome = match Storage::open(&cfg).await {
                    Ok(s) => s.check().await,
                    Err(e) => Err(e),
                };
                (blocker.to_str().unwrap().to_owned(), outcome)
            }
        }
    }

    /// Where errors must say the storage is: the endpoint for S3, the directory for local.
    pub fn where_(&self) -> String {
        match self.kind {
            Kind::S3 => S3.endpoint.clone(),
            Kind::Local => self.scratch.clone(),
        }
    }
}

/// A PNG of random pixels (so it does not compress) of about `4 * side²` bytes.
pub fn random_png(side: u32, seed: u64) -> DecodedImage {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pixels = vec![0u8; (side * side * 4) as usize];
    rng.fill(&mut pixels);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side, side);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&pixels).unwrap();
    }
    DecodedImage {
        bytes: Bytes::from(out),
        format: ImageFormat::Png,
        width: side,
        height: side,
    }
}

/// A small image, for tests where the content does not matter.
pub fn small_png(seed: u64) -> DecodedImage {
    random_png(8, seed)
}

/// Reads a URL the storage handed out: over HTTP for S3, from the file for `file://`.
pub async fn fetch(url: &str) -> Bytes {
    if let Some(path) = url.strip_prefix("file://") {
        Bytes::from(tokio::fs::read(percent_decode(path)).await.unwrap())
    } else {
        let resp = reqwest::get(url).await.unwrap();
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.bytes().await.unwrap()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// An s3s-fs of the test's own on a port the OS picks, stopped when dropped.
pub struct PrivateServer {
    pub child: tokio::process::Child,
    pub endpoint: String,
    /// Where the server keeps objects: `{data}/{bucket}/{key}`.
    pub data: tempfile::TempDir,
}

impl PrivateServer {
    pub async fn start() -> PrivateServer {
        let bin = S3.s3s_bin.clone().expect(
            "IMAGEGEN_TEST_S3S_BIN is not set: run via scripts/test or \
             eval \"$(scripts/s3-server env)\"",
        );
        let data = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", "0", "--access-key"])
            .arg(&S3.access_key)
            .arg("--secret-key")
            .arg(S3.secret.expose_secret())
            .arg(data.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // s3s-fs logs the address it bound; waiting for that line is the readiness signal.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let find_address = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some((_, rest)) = line.split_once("server is running at ") {
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
            }
            panic!("s3s-fs exited before it was running");
        };
        let endpoint = tokio::time::timeout(Duration::from_secs(30), find_address)
            .await
            .expect("s3s-fs did not start within 30 s");
        // Keep draining its log so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        PrivateServer {
            child,
            endpoint,
            data,
        }
    }
}
