//! Where decoded images go: S3-compatible object storage or a local directory, and the key scheme.
//!
//! One setting picks the backend ([`StorageConfig::location`], `IMAGEGEN_STORAGE`):
//! `s3://bucket/optional/prefix` for S3 and S3-compatible servers (MinIO, R2, Garage, ...), or a
//! directory path (default `./images`, also accepted as `file:///abs/path`).
//!
//! Keys (see [`key`]) are `[{batch}/]{job_id}-{index}.{ext}`, relative to the storage root: the
//! bucket prefix for S3, the directory for local storage. They are deterministic, so a retried
//! upload overwrites instead of duplicating. [`StoredObject::key`] is always that relative key;
//! it is what [`Storage::get`], [`Storage::presign_get`] and the other methods take.
//!
//! URLs recorded on a row: with `IMAGEGEN_PUBLIC_BASE_URL`, `{base}/{full key}`, where the full
//! key includes the bucket prefix (the base serves the bucket root; for local storage, the
//! directory). Otherwise the object's own S3 URL (path-style or virtual-hosted, as configured) or
//! a `file://` URL. Private buckets hand out presigned GET URLs on request
//! ([`Storage::presign_get`], the `imagegen url` command).
//!
//! Errors are classified where they are made (see [`StorageError`]): what time can fix is
//! transient; what would fail every job the same way (missing bucket, bad credentials, denied
//! access, a full or read-only disk) halts claiming, because by the time a job stores its images
//! it has already paid for them.

pub mod key;
pub mod local;
pub mod s3;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::ArgAction;

use crate::error::{Classify, ErrorClass};
use crate::image::{DecodedImage, ImageFormat};

pub use key::{
    FIRST_GENERATION, generation_key, object_key, parse_file_name, rendition_key, sanitize_batch,
    validate_key,
};
pub use local::LocalStorage;
pub use s3::S3Storage;

/// `IMAGEGEN_STORAGE`'s default: a directory where the worker runs, so a first-time user with
/// nothing set up still sees images land.
pub const DEFAULT_LOCATION: &str = "./images";

/// [`StorageConfig::cache_control`]'s default: keys are deterministic per picture and a new
/// picture gets new keys (see [`key`]), so an object never changes under its URL and may be cached
/// for a year.
pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// [`StorageConfig::s3_timeout`]'s default (the CLI's `60s`).
pub const DEFAULT_S3_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the startup probe writes its object, relative to the storage root. The leading dot keeps
/// it out of the way of image keys, which never have one.
pub const PROBE_DIR: &str = ".imagegen-probe";

/// Content type of objects that are not images (the startup probe).
const OCTET_STREAM: &str = "application/octet-stream";

/// The storage settings, parsed once by the CLI (or built with [`StorageConfig::new`] in tests).
/// Credentials are not here: S3 takes them from the AWS chain (environment, profile, instance
/// role), so this struct never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct StorageConfig {
    /// Where images go: `s3://bucket/optional/prefix`, or a directory (files are written to a
    /// temporary name, then renamed). The S3 endpoint, region and credentials follow the AWS
    /// conventions: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...
    #[arg(
        long = "storage",
        env = "IMAGEGEN_STORAGE",
        default_value = DEFAULT_LOCATION,
        value_name = "s3://BUCKET/PREFIX | DIR"
    )]
    pub location: String,

    /// Path-style S3 addressing (`endpoint/bucket/key` instead of `bucket.endpoint/key`); most
    /// self-hosted servers (MinIO, Garage, SeaweedFS) need it.
    #[arg(
        long = "s3-path-style",
        env = "IMAGEGEN_S3_PATH_STYLE",
        action = ArgAction::SetTrue,
        value_parser = parse_flag
    )]
    pub s3_path_style: bool,

    /// Base URL that serves the bucket (a CDN or a public bucket); recorded URLs become
    /// `{base}/{key}`. Without it the object's S3 (or file://) URL is recorded.
    #[arg(
        long = "public-base-url",
        env = "IMAGEGEN_PUBLIC_BASE_URL",
        value_name = "URL"
    )]
    pub public_base_url: Option<String>,

    /// How long one S3 request may take, body included, before it fails as transient (e.g.
    /// `60s`, `2m`). The default allows a few MB over a slow link.
    #[arg(
        long = "s3-timeout",
        env = "IMAGEGEN_S3_TIMEOUT",
        default_value = "60s",
        value_parser = humantime::parse_duration,
        value_name = "DURATION"
    )]
    pub s3_timeout: Duration,

    /// The `Cache-Control` stored with every image and rendition (S3 serves it back; a local
    /// directory has nowhere to keep it). Empty: none.
    #[arg(
        long = "cache-control",
        env = "IMAGEGEN_CACHE_CONTROL",
        default_value = DEFAULT_CACHE_CONTROL,
        value_name = "VALUE"
    )]
    pub cache_control: String,
}

impl StorageConfig {
    /// Settings for `location` with virtual-hosted addressing and no public base URL.
    pub fn new(location: impl Into<String>) -> Self {
        StorageConfig {
            location: location.into(),
            s3_path_style: false,
            public_base_url: None,
            s3_timeout: DEFAULT_S3_TIMEOUT,
            cache_control: DEFAULT_CACHE_CONTROL.to_owned(),
        }
    }

    /// The same settings with another `Cache-Control` (empty for none).
    pub fn with_cache_control(mut self, value: impl Into<String>) -> Self {
        self.cache_control = value.into();
        self
    }

    /// The same settings with path-style addressing on or off.
    pub fn with_path_style(mut self, path_style: bool) -> Self {
        self.s3_path_style = path_style;
        self
    }

    /// The same settings with a public base URL.
    pub fn with_public_base_url(mut self, url: impl Into<String>) -> Self {
        self.public_base_url = Some(url.into());
        self
    }

    /// The same settings with another S3 request timeout.
    pub fn with_s3_timeout(mut self, timeout: Duration) -> Self {
        self.s3_timeout = timeout;
        self
    }

    /// Parses [`StorageConfig::location`] into a backend target.
    pub fn target(&self) -> Result<Target, StorageError> {
        parse_location(&self.location)
    }

    /// The validated public base URL without a trailing `/`, if one is set and not empty.
    pub fn public_base(&self) -> Result<Option<String>, StorageError> {
        let Some(raw) = self.public_base_url.as_deref().map(str::trim) else {
            return Ok(None);
        };
        if raw.is_empty() {
            return Ok(None);
        }
        if !(raw.starts_with("https://") || raw.starts_with("http://")) {
            return Err(StorageError::Config {
                setting: "IMAGEGEN_PUBLIC_BASE_URL",
                reason: format!("{raw:?} must start with https:// or http://"),
            });
        }
        Ok(Some(raw.trim_end_matches('/').to_owned()))
    }
}

/// Parses a boolean setting; an empty value (`IMAGEGEN_S3_PATH_STYLE=` in a compose file) is
/// false rather than an error.
fn parse_flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "f" | "no" | "n" | "off" => Ok(false),
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        other => Err(format!("{other:?} is neither true nor false")),
    }
}

/// A parsed storage location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory, as given (relative paths are resolved when the storage is opened).
    Local(PathBuf),
    /// A bucket and a key prefix (without leading or trailing `/`, possibly empty).
    S3 { bucket: String, prefix: String },
}

fn parse_location(raw: &str) -> Result<Target, StorageError> {
    let bad = |reason: String| StorageError::Config {
        setting: "IMAGEGEN_STORAGE",
        reason,
    };
    let s = raw.trim();
    if s.is_empty() {
        return Err(bad("empty; use s3://bucket/prefix or a directory".into()));
    }
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = !bucket.is_empty()
            && bucket.len() <= 255
            && bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !bucket_ok {
            return Err(bad(format!("{s:?}: bucket name {bucket:?} is not valid")));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            key::validate_path(prefix)
                .map_err(|why| bad(format!("{s:?}: prefix {prefix:?}: {why}")))?;
        }
        return Ok(Target::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        });
    }
    if let Some(rest) = s.strip_prefix("file://") {
        let path = key::percent_decode(rest)
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| bad(format!("{s:?}: a file:// URL needs an absolute path")))?;
        return Ok(Target::Local(PathBuf::from(path)));
    }
    if s.contains("://") {
        return Err(bad(format!(
            "{s:?}: unsupported scheme; use s3://bucket/prefix or a directory"
        )));
    }
    Ok(Target::Local(PathBuf::from(s)))
}

/// What goes with an object besides its bytes: S3 stores it as user metadata (`x-amz-meta-*`);
/// the local backend has nowhere to put it and ignores it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The job the image belongs to.
    pub job_id: i64,
    /// The model that made it.
    pub model: String,
    /// The job's batch label as given (not sanitised), if any.
    pub batch: Option<String>,
}

/// The outcome of a successful upload: what goes on the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// The key relative to the storage root, as passed to [`Storage::put`].
    pub key: String,
    /// The URL to record (see the module doc for which one).
    pub url: String,
    /// The content type stored with the object, from the sniffed format.
    pub content_type: &'static str,
    /// The object's size.
    pub bytes: u64,
}

/// What [`Storage::head`] reports about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The stored content type (for local files: from the extension).
    pub content_type: Option<String>,
    /// The object's size.
    pub bytes: u64,
    /// User metadata (S3 only; empty for local files).
    pub metadata: BTreeMap<String, String>,
    /// The stored `Cache-Control` (S3 only).
    pub cache_control: Option<String>,
}

/// An object's bytes as they arrive: what [`Storage::get_stream`] returns.
pub type ByteChunks = futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A storage backend, opened once and shared: cloning is a reference-count increment, and all
/// methods take `&self`, so hundreds of concurrent jobs can use one value.
#[derive(Debug, Clone)]
pub enum Storage {
    /// A local directory.
    Local(Arc<LocalStorage>),
    /// An S3 bucket (and prefix).
    S3(Arc<S3Storage>),
}

impl Storage {
    /// Opens the configured backend. For S3 this loads the AWS configuration chain (region,
    /// credentials, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, profiles); no request is made,
    /// so a wrong setting shows at [`Storage::check`] or the first upload. A local directory is
    /// created if missing.
    pub async fn open(cfg: &StorageConfig) -> Result<Storage, StorageError> {
        match cfg.target()? {
            Target::Local(dir) => Ok(Storage::Local(Arc::new(
                LocalStorage::open(&dir, cfg.public_base()?).await?,
            ))),
            Target::S3 { .. } => {
                let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .load()
                    .await;
                Self::open_with_sdk_config(cfg, &sdk).await
            }
        }
    }

    /// Like [`Storage::open`], with an AWS configuration built by the caller (explicit
    /// credentials or endpoint, as tests need). Ignored for local storage.
    pub async fn open_with_sdk_config(
        cfg: &StorageConfig,
        sdk: &aws_config::SdkConfig,
    ) -> Result<Storage, StorageError> {
        match cfg.target()? {
            Target::Local(dir) => Ok(Storage::Local(Arc::new(
                LocalStorage::open(&dir, cfg.public_base()?).await?,
            ))),
            Target::S3 { bucket, prefix } => Ok(Storage::S3(Arc::new(
                S3Storage::new(
                    sdk,
                    bucket,
                    prefix,
                    cfg.s3_path_style,
                    cfg.public_base()?,
                    cfg.s3_timeout,
                )
                .with_cache_control(&cfg.cache_control),
            ))),
        }
    }

    /// The deterministic key for image `index` of a job (see [`key::object_key`]); relative to
    /// the storage root, so the bucket prefix is not part of it.
    pub fn key_for(
        &self,
        batch: Option<&str>,
        job_id: i64,
        index: usize,
        format: ImageFormat,
    ) -> String {
        object_key(batch, job_id, index, format)
    }

    /// Stores an image under `key` (overwriting), with the content type of its sniffed format.
    /// The body is uploaded in memory, in one request.
    pub async fn put(
        &self,
        key: &str,
        image: &DecodedImage,
        meta: &ObjectMeta,
    ) -> Result<StoredObject, StorageError> {
        self.put_bytes(
            key,
            image.bytes.clone(),
            image.format.content_type(),
            Some(meta),
        )
        .await
    }

    /// Stores arbitrary bytes under `key` (overwriting). [`Storage::put`] is this with the
    /// image's content type.
    pub async fn put_bytes(
        &self,
        key: &str,
        body: Bytes,
        content_type: &'static str,
        meta: Option<&ObjectMeta>,
    ) -> Result<StoredObject, StorageError> {
        check_key(key)?;
        let bytes = body.len() as u64;
        match self {
            Storage::Local(l) => l.put(key, body).await?,
            Storage::S3(s) => s.put(key, body, content_type, meta).await?,
        }
        Ok(StoredObject {
            key: key.to_owned(),
            url: self.url_for(key),
            content_type,
            bytes,
        })
    }

    /// Reads an object back whole.
    pub async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        check_key(key)?;
        match self {
            Storage::Local(l) => l.get(key).await,
            Storage::S3(s) => s.get(key).await,
        }
    }

    /// Reads an object as a stream of chunks, so a server can pass it on without holding it
    /// whole. A missing object is [`StorageError::NotFound`] before the first chunk.
    pub async fn get_stream(&self, key: &str) -> Result<ByteChunks, StorageError> {
        check_key(key)?;
        match self {
            Storage::Local(l) => l.get_stream(key).await,
            Storage::S3(s) => s.get_stream(key).await,
        }
    }

    /// The public URL of `key` when a public base URL is configured (pages link it instead of
    /// passing the bytes through the server).
    pub fn public_url(&self, key: &str) -> Option<String> {
        let public = match self {
            Storage::Local(l) => l.has_public_base(),
            Storage::S3(s) => s.has_public_base(),
        };
        public.then(|| self.url_for(key))
    }

    /// An object's content type, size and metadata.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo, StorageError> {
        check_key(key)?;
        match self {
            Storage::Local(l) => l.head(key).await,
            Storage::S3(s) => s.head(key).await,
        }
    }

    /// Deletes an object; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        match self {
            Storage::Local(l) => l.delete(key).await,
            Storage::S3(s) => s.delete(key).await,
        }
    }

    /// All keys (relative to the root) that start with `prefix`, sorted. Meant for tests and
    /// operators, not for hot paths: it walks everything under the root.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut keys = match self {
            Storage::Local(l) => l.list(prefix).await?,
            Storage::S3(s) => s.list(prefix).await?,
        };
        keys.sort();
        Ok(keys)
    }

    /// The startup check: writes a probe object, reads it back and compares, then deletes it, so
    /// a wrong setting (or a server that corrupts uploads) is found before the first paid call.
    /// For S3 it first asks whether the bucket exists, because some servers create a missing
    /// bucket on upload instead of refusing it.
    pub async fn check(&self) -> Result<(), StorageError> {
        if let Storage::S3(s) = self {
            s.check_bucket().await?;
        }
        let id = uuid::Uuid::new_v4();
        let key = format!("{PROBE_DIR}/{id}.bin");
        let mut body = format!("imagegen storage probe {id}\n").into_bytes();
        // Bytes of every value, so a server that mangles binary or re-encodes text shows.
        body.extend((0..=255u8).cycle().take(4096));
        let body = Bytes::from(body);
        self.put_bytes(&key, body.clone(), OCTET_STREAM, None)
            .await?;
        let read = self.get(&key).await?;
        if read != body {
            // Best effort: the mismatch is the error worth reporting.
            let _ = self.delete(&key).await;
            return Err(StorageError::ProbeMismatch {
                location: self.describe(),
                wrote: body.len(),
                read: read.len(),
            });
        }
        self.delete(&key).await
    }

    /// A cheap readiness check that writes nothing: the bucket answers (S3), or the root
    /// directory exists (local).
    pub async fn reachable(&self) -> Result<(), StorageError> {
        match self {
            Storage::S3(s) => s.check_bucket().await,
            Storage::Local(l) => {
                tokio::fs::metadata(l.root())
                    .await
                    .map(|_| ())
                    .map_err(|source| StorageError::Io {
                        op: "stat",
                        path: l.root().to_owned(),
                        source,
                    })
            }
        }
    }

    /// A URL that lets anyone holding it read the object for `expires`: a presigned GET for S3
    /// (no request is made; at most 7 days), the `file://` URL for local storage. Neither checks
    /// that the object exists; call [`Storage::head`] first for that.
    pub async fn presign_get(&self, key: &str, expires: Duration) -> Result<String, StorageError> {
        check_key(key)?;
        match self {
            Storage::Local(l) => Ok(l.file_url(key)),
            Storage::S3(s) => s.presign_get(key, expires).await,
        }
    }

    /// Presigns the object behind a URL this storage recorded on a row: what `imagegen url ID`
    /// does for each of a job's URLs. Fails (permanent) for a URL that is not one of ours, such
    /// as one recorded under another `IMAGEGEN_STORAGE` or public base URL.
    pub async fn presign_recorded_url(
        &self,
        url: &str,
        expires: Duration,
    ) -> Result<String, StorageError> {
        let key = self
            .key_from_url(url)
            .ok_or_else(|| StorageError::InvalidRequest {
                reason: format!("{url} is not an object URL of {}", self.describe()),
            })?;
        self.presign_get(&key, expires).await
    }

    /// The URL recorded for `key` (see the module doc).
    pub fn url_for(&self, key: &str) -> String {
        match self {
            Storage::Local(l) => l.url_for(key),
            Storage::S3(s) => s.url_for(key),
        }
    }

    /// The key (relative to the root) of a URL this storage recorded, if it is one: lets the
    /// `imagegen url` command presign the images of a job from the URLs on its row.
    pub fn key_from_url(&self, url: &str) -> Option<String> {
        let key = match self {
            Storage::Local(l) => l.key_from_url(url),
            Storage::S3(s) => s.key_from_url(url),
        }?;
        validate_key(&key).ok().map(|()| key)
    }

    /// A one-line description for logs and messages, e.g. `s3://bucket/prefix at
    /// http://127.0.0.1:9311 (region us-east-1, path-style)`. Never contains a secret.
    pub fn describe(&self) -> String {
        match self {
            Storage::Local(l) => l.describe(),
            Storage::S3(s) => s.describe(),
        }
    }
}

fn check_key(key: &str) -> Result<(), StorageError> {
    validate_key(key).map_err(|reason| StorageError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

/// Everything that can go wrong in storage, classified where it is made. Messages name the
/// bucket and endpoint (or the directory), never a secret.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A setting is malformed: halt, nothing works until it is fixed.
    #[error("invalid storage setting {setting}: {reason}")]
    Config {
        setting: &'static str,
        reason: String,
    },

    /// A key is not a safe relative key (see [`key`]): permanent, the same key fails every time.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    /// A request this storage refuses to make, such as a presign expiry beyond the maximum:
    /// permanent.
    #[error("invalid storage request: {reason}")]
    InvalidRequest { reason: String },

    /// The endpoint could not be reached (refused, reset, DNS, TLS): transient.
    #[error("cannot reach S3 endpoint {endpoint} (bucket {bucket}) for {op}: {detail}")]
    Unreachable {
        op: &'static str,
        bucket: String,
        endpoint: String,
        detail: String,
    },

    /// A connect, attempt or operation timeout: transient.
    #[error("S3 {op} on bucket {bucket} at {endpoint} timed out: {detail}")]
    Timeout {
        op: &'static str,
        bucket: String,
        endpoint: String,
        detail: String,
    },

    /// The server answered 5xx, 429, 408 or a throttling code: transient.
    #[error(
        "S3 endpoint {endpoint} is unavailable for {op} on bucket {bucket}: \
         HTTP {status} {code}: {message}"
    )]
    Unavailable {
        op: &'static str,
        bucket: String,
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },

    /// The bucket does not exist: halt.
    #[error("bucket {bucket} does not exist at {endpoint}: create it or fix IMAGEGEN_STORAGE")]
    NoSuchBucket { bucket: String, endpoint: String },

    /// The server rejected the credentials (unknown key, wrong secret, expired token): halt.
    #[error(
        "S3 endpoint {endpoint} rejected the credentials for bucket {bucket} ({code}): check \
         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and AWS_REGION"
    )]
    Credentials {
        bucket: String,
        endpoint: String,
        code: String,
    },

    /// The AWS credentials chain found nothing usable: halt.
    #[error("no S3 credentials for bucket {bucket} at {endpoint}: {detail}")]
    NoCredentials {
        bucket: String,
        endpoint: String,
        detail: String,
    },

    /// The credentials are valid but not allowed to do this: halt.
    #[error("access denied for {op} on bucket {bucket} at {endpoint} ({code}): {message}")]
    AccessDenied {
        op: &'static str,
        bucket: String,
        endpoint: String,
        code: String,
        message: String,
    },

    /// The object does not exist: permanent.
    #[error("object {key} not found in {location}")]
    NotFound { key: String, location: String },

    /// Any other refusal (4xx) or an answer that is not S3's: halt, because the same request
    /// shape fails for every job (a server that refuses our uploads, a skewed clock, an endpoint
    /// that is not S3).
    #[error(
        "S3 endpoint {endpoint} rejected {op} on bucket {bucket}: HTTP {status} {code}: {message}"
    )]
    Rejected {
        op: &'static str,
        bucket: String,
        endpoint: String,
        status: u16,
        code: String,
        message: String,
    },

    /// A local file-system operation failed; the class follows the I/O error kind (see
    /// [`io_class`]).
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The startup probe read back other bytes than it wrote: halt, the storage corrupts data.
    #[error(
        "storage probe at {location} read back {read} bytes that differ from the {wrote} written \
         (a server that mangles uploads, e.g. one that keeps aws-chunked framing)"
    )]
    ProbeMismatch {
        location: String,
        wrote: usize,
        read: usize,
    },
}

impl Classify for StorageError {
    fn class(&self) -> ErrorClass {
        match self {
            StorageError::Unreachable { .. }
            | StorageError::Timeout { .. }
            | StorageError::Unavailable { .. } => ErrorClass::RETRY,
            StorageError::InvalidKey { .. }
            | StorageError::InvalidRequest { .. }
            | StorageError::NotFound { .. } => ErrorClass::Permanent,
            StorageError::Config { .. }
            | StorageError::NoSuchBucket { .. }
            | StorageError::Credentials { .. }
            | StorageError::NoCredentials { .. }
            | StorageError::AccessDenied { .. }
            | StorageError::Rejected { .. }
            | StorageError::ProbeMismatch { .. } => ErrorClass::Halt,
            StorageError::Io { source, .. } => io_class(source.kind()),
        }
    }
}

/// The class of a local I/O failure. Whatever a person must fix (permissions, a read-only or
/// full disk, a quota, a file where a directory should be) halts: every job would fail the same
/// way after paying for its images. The rest (interrupted calls, I/O errors, a directory removed
/// under us) is transient, and the attempt limit bounds it.
pub fn io_class(kind: io::ErrorKind) -> ErrorClass {
    use io::ErrorKind as K;
    match kind {
        K::PermissionDenied
        | K::ReadOnlyFilesystem
        | K::StorageFull
        | K::QuotaExceeded
        | K::NotADirectory
        | K::IsADirectory
        | K::AlreadyExists
        | K::DirectoryNotEmpty
        | K::InvalidFilename
        | K::FileTooLarge
        | K::Unsupported => ErrorClass::Halt,
        _ => ErrorClass::RETRY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        storage: StorageConfig,
    }

    #[test]
    fn locations_parse() {
        let t = |s: &str| StorageConfig::new(s).target();
        assert_eq!(t("./images").unwrap(), Target::Local("./images".into()));
        assert_eq!(
            t("file:///var/lib/my%20images").unwrap(),
            Target::Local("/var/lib/my images".into())
        );
        assert_eq!(
            t("s3://bucket").unwrap(),
            Target::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            t("s3://my-bucket.x/gen/images/").unwrap(),
            Target::S3 {
                bucket: "my-bucket.x".into(),
                prefix: "gen/images".into()
            }
        );
        for bad in [
            "",
            "s3://",
            "s3:///prefix",
            "s3://b/../x",
            "s3://b/a//b",
            "s3://b/a b",
            "gs://bucket",
            "file://relative",
        ] {
            let err = t(bad).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Halt, "{bad:?}: {err}");
            assert!(err.to_string().contains("IMAGEGEN_STORAGE"), "{err}");
        }
    }

    #[test]
    fn public_base_is_validated_and_trimmed() {
        let c = StorageConfig::new("x").with_public_base_url("https://cdn.example.com/img/");
        assert_eq!(
            c.public_base().unwrap().as_deref(),
            Some("https://cdn.example.com/img")
        );
        assert_eq!(
            StorageConfig::new("x")
                .with_public_base_url("  ")
                .public_base()
                .unwrap(),
            None
        );
        let err = StorageConfig::new("x")
            .with_public_base_url("cdn.example.com")
            .public_base()
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Halt);
    }

    #[test]
    fn cli_flags_parse() {
        let cli = Cli::try_parse_from([
            "x",
            "--storage",
            "s3://b/p",
            "--s3-path-style",
            "--public-base-url",
            "https://cdn",
            "--s3-timeout",
            "60s",
        ])
        .unwrap();
        assert_eq!(
            cli.storage,
            StorageConfig::new("s3://b/p")
                .with_path_style(true)
                .with_public_base_url("https://cdn")
        );
    }

    #[test]
    fn the_cli_default_timeout_is_the_constant() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "s3_timeout")
            .unwrap();
        let default = arg.get_default_values()[0].to_str().unwrap();
        assert_eq!(humantime::parse_duration(default), Ok(DEFAULT_S3_TIMEOUT));
    }

    #[test]
    fn flags_parse_like_booleans() {
        for (s, want) in [
            ("true", true),
            ("YES", true),
            ("1", true),
            ("", false),
            ("off", false),
        ] {
            assert_eq!(parse_flag(s), Ok(want), "{s:?}");
        }
        assert!(parse_flag("ture").is_err());
    }

    #[test]
    fn io_errors_that_need_a_person_halt() {
        assert_eq!(io_class(io::ErrorKind::StorageFull), ErrorClass::Halt);
        assert_eq!(io_class(io::ErrorKind::PermissionDenied), ErrorClass::Halt);
        assert_eq!(
            io_class(io::ErrorKind::ReadOnlyFilesystem),
            ErrorClass::Halt
        );
        assert_eq!(io_class(io::ErrorKind::Interrupted), ErrorClass::RETRY);
        assert_eq!(io_class(io::ErrorKind::NotFound), ErrorClass::RETRY);
    }
}
