//! The S3 backend (AWS S3 and S3-compatible servers) through aws-sdk-s3, and the classification
//! of its errors.
//!
//! Configuration follows the AWS conventions users already have: region, the credentials chain,
//! `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (env or profile) for S3-compatible servers. Bodies
//! are uploaded in memory, in one request, and checksums are computed only when an operation
//! requires them: servers such as Garage reject the SDK's default streaming `aws-chunked` uploads
//! with trailing checksums, and some (s3rver) store the framing as data. An image upload instead
//! carries the image's SHA-256 (computed once, while the answer was decoded) as
//! `x-amz-checksum-sha256`, a signed header the server checks the body against, and is sent
//! with an unsigned payload so SigV4 does not hash the body again.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_types::service_config::ServiceConfigKey;
use bytes::Bytes;

use super::{ObjectInfo, ObjectMeta, StorageError};

/// How long to wait for a TCP (and TLS) connection. Loopback and cloud endpoints connect in
/// milliseconds; a few seconds separates "down" from "slow".
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts per operation inside the SDK. Kept modest: the worker's retry policy retries
/// transient storage errors itself, with backoff measured in seconds to minutes.
pub const SDK_MAX_ATTEMPTS: u32 = 2;

/// The ceiling of the SDK's backoff between its attempts.
pub const SDK_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The region used when the AWS chain has none. S3-compatible servers mostly ignore the region
/// but SigV4 needs one, and a first-time MinIO user rarely sets it.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The longest presigned URL SigV4 allows.
pub const MAX_PRESIGN_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The longest user-metadata value stored, in bytes; S3 allows 2 KB of metadata in total.
const MAX_META_VALUE: usize = 256;

/// What an operation touches, which decides what a bare 404 means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// HeadBucket, ListObjectsV2: a 404 is a missing bucket.
    Bucket,
    /// GetObject, HeadObject: a 404 is a missing object.
    Read,
    /// PutObject, DeleteObject: a 404 is a missing bucket.
    Write,
}

/// The meaning of an S3 error response, from its code or, when there is none (HEAD responses
/// have no body), its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    NoSuchBucket,
    Credentials,
    AccessDenied,
    NotFound,
    Unavailable,
    Rejected,
}

/// Classifies an S3 error response. Codes are AWS's, plus the ones S3-compatible servers use.
pub(crate) fn verdict(op: Op, status: u16, code: Option<&str>) -> Verdict {
    match code {
        Some("NoSuchBucket") => Verdict::NoSuchBucket,
        Some("NoSuchKey") => Verdict::NotFound,
        Some(
            "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "NotSignedUp"
            | "InvalidToken"
            | "ExpiredToken"
            | "TokenRefreshRequired"
            | "InvalidSecurity"
            | "AuthorizationHeaderMalformed"
            | "InvalidClientTokenId",
        ) => Verdict::Credentials,
        Some("AccessDenied" | "AllAccessDisabled" | "AccountProblem" | "Forbidden") => {
            Verdict::AccessDenied
        }
        Some(
            "SlowDown"
            | "InternalError"
            | "ServiceUnavailable"
            | "RequestTimeout"
            | "Throttling"
            | "ThrottlingException"
            | "TooManyRequests"
            | "RequestLimitExceeded"
            | "OperationAborted",
        ) => Verdict::Unavailable,
        // A server without a feature we use lacks it for every job.
        Some("NotImplemented") => Verdict::Rejected,
        _ => match status {
            404 if op == Op::Read => Verdict::NotFound,
            404 => Verdict::NoSuchBucket,
            401 => Verdict::Credentials,
            403 => Verdict::AccessDenied,
            501 => Verdict::Rejected,
            408 | 429 | 500..=599 => Verdict::Unavailable,
            _ => Verdict::Rejected,
        },
    }
}

/// A bucket (and key prefix) on AWS S3 or an S3-compatible server.
pub struct S3Storage {
    /// Cheap to clone and safe to share: the SDK client is a handle to a connection pool.
    client: Client,
    bucket: String,
    /// Prepended to every key with a `/`; empty for the bucket root. Validated like a key.
    prefix: String,
    /// The custom endpoint (without trailing `/`), or `None` for AWS S3.
    endpoint: Option<String>,
    region: String,
    path_style: bool,
    /// `IMAGEGEN_PUBLIC_BASE_URL` without its trailing `/`, if set.
    public_base: Option<String>,
    /// Sent with every image upload (not the probe); `None` for none.
    cache_control: Option<String>,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client's config holds the credentials provider; keep it out of Debug output.
        f.debug_struct("S3Storage")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint_name())
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("public_base", &self.public_base)
            .finish_non_exhaustive()
    }
}

impl S3Storage {
    /// Builds the client from an AWS configuration (normally `aws_config::defaults(..).load()`),
    /// with this crate's timeouts, retries and checksum behaviour. `attempt_timeout` bounds one
    /// request, body included ([`super::StorageConfig::s3_timeout`]). Makes no request.
    pub fn new(
        sdk: &SdkConfig,
        bucket: String,
        prefix: String,
        path_style: bool,
        public_base: Option<String>,
        attempt_timeout: Duration,
    ) -> Self {
        let endpoint = resolve_endpoint(sdk);
        let region = sdk
            .region()
            .map(|r| r.as_ref().to_owned())
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let mut builder = aws_sdk_s3::config::Builder::from(sdk)
            .region(Region::new(region.clone()))
            .force_path_style(path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(attempt_timeout)
                    // Every attempt may use its full time, plus the backoff between them.
                    .operation_timeout((attempt_timeout + SDK_MAX_BACKOFF) * SDK_MAX_ATTEMPTS)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(SDK_MAX_ATTEMPTS)
                    .with_max_backoff(SDK_MAX_BACKOFF),
            );
        // Set explicitly so the endpoint used is exactly the one named in messages.
        builder.set_endpoint_url(endpoint.clone());
        S3Storage {
            client: Client::from_conf(builder.build()),
            bucket,
            prefix,
            endpoint,
            region,
            path_style,
            public_base,
            cache_control: None,
        }
    }

    /// The same storage, sending `value` as `Cache-Control` with every image (empty: none).
    pub fn with_cache_control(mut self, value: &str) -> Self {
        let value = value.trim();
        self.cache_control = (!value.is_empty()).then(|| header_safe(value));
        self
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix inside the bucket (no leading or trailing `/`; empty for the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The endpoint requests go to, for messages: the custom one, or AWS's regional endpoint.
    pub fn endpoint_name(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("https://s3.{}.amazonaws.com", self.region),
        }
    }

    /// The object key inside the bucket for a key relative to the prefix.
    pub fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn relative_key<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    pub(super) async fn put(
        &self,
        key: &str,
        body: Bytes,
        sha256: &[u8; 32],
        content_type: &'static str,
        meta: Option<&ObjectMeta>,
    ) -> Result<(), StorageError> {
        use base64::Engine as _;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .content_type(content_type)
            .content_length(body.len() as i64)
            // The hash the caller already has: sent as a header (signed), checked by the server.
            .checksum_sha256(base64::prelude::BASE64_STANDARD.encode(sha256))
            // In memory: the SDK sends it as a plain body, never aws-chunked.
            .body(ByteStream::from(body));
        if let Some(meta) = meta {
            req = req
                .metadata("job-id", meta.job_id.to_string())
                .metadata("model", header_safe(&meta.model));
            if let Some(batch) = &meta.batch {
                req = req.metadata("batch", header_safe(batch));
            }
            req = req.set_cache_control(self.cache_control.clone());
        }
        // The body is covered by the checksum header, which the signature covers: signing the
        // payload too would hash every image a second time (SigV4's x-amz-content-sha256).
        req.customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|e| self.error("PutObject", Op::Write, key, e))?;
        Ok(())
    }

    pub(super) async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("GetObject", Op::Read, key, e))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StorageError::Unreachable {
                op: "GetObject (reading the body)",
                bucket: self.bucket.clone(),
                endpoint: self.endpoint_name(),
                detail: error_chain(&e),
            })?;
        Ok(body.into_bytes())
    }

    pub(super) async fn get_stream(&self, key: &str) -> Result<super::ByteChunks, StorageError> {
        use futures::StreamExt as _;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("GetObject", Op::Read, key, e))?;
        Ok(futures::stream::unfold(out.body, |mut body| async move {
            body.next()
                .await
                .map(|chunk| (chunk.map_err(std::io::Error::other), body))
        })
        .boxed())
    }

    pub(super) fn has_public_base(&self) -> bool {
        self.public_base.is_some()
    }

    pub(super) async fn head(&self, key: &str) -> Result<ObjectInfo, StorageError> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("HeadObject", Op::Read, key, e))?;
        Ok(ObjectInfo {
            content_type: out.content_type().map(str::to_owned),
            cache_control: out.cache_control().map(str::to_owned),
            bytes: out
                .content_length()
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0),
            metadata: out
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_else(BTreeMap::new),
        })
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.error("DeleteObject", Op::Write, key, e))?;
        Ok(())
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("ListObjectsV2", Op::Bucket, prefix, e))?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| self.relative_key(k))
                    .map(str::to_owned),
            );
            match (out.is_truncated(), out.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(keys)
    }

    /// Asks whether the bucket exists. A 403 is not conclusive (credentials may be allowed to
    /// write objects but not to list or head the bucket), so only the probe decides then.
    pub(super) async fn check_bucket(&self) -> Result<(), StorageError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => match self.error("HeadBucket", Op::Bucket, "", e) {
                StorageError::AccessDenied { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    pub(super) async fn presign_get(
        &self,
        key: &str,
        expires: Duration,
    ) -> Result<String, StorageError> {
        if expires.is_zero() || expires > MAX_PRESIGN_EXPIRY {
            return Err(StorageError::InvalidRequest {
                reason: format!(
                    "a presigned URL must expire within 1 s to {} (got {})",
                    humantime::format_duration(MAX_PRESIGN_EXPIRY),
                    humantime::format_duration(expires)
                ),
            });
        }
        let cfg =
            PresigningConfig::expires_in(expires).map_err(|e| StorageError::InvalidRequest {
                reason: format!("presign expiry: {e}"),
            })?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .presigned(cfg)
            .await
            .map_err(|e| self.error("presign GetObject", Op::Read, key, e))?;
        Ok(req.uri().to_owned())
    }

    /// The URL prefix objects are addressed under: `{this}/{full key}` is an object's URL.
    fn object_base(&self) -> String {
        match (&self.endpoint, self.path_style) {
            (Some(e), true) => format!("{e}/{}", self.bucket),
            (Some(e), false) => match e.split_once("://") {
                Some((scheme, rest)) => format!("{scheme}://{}.{rest}", self.bucket),
                None => format!("{e}/{}", self.bucket),
            },
            (None, true) => format!("https://s3.{}.amazonaws.com/{}", self.region, self.bucket),
            (None, false) => format!("https://{}.s3.{}.amazonaws.com", self.bucket, self.region),
        }
    }

    pub(super) fn url_for(&self, key: &str) -> String {
        // Keys and the prefix contain only URL-safe characters (see `key`), so no encoding.
        let full = self.full_key(key);
        match &self.public_base {
            Some(base) => format!("{base}/{full}"),
            None => format!("{}/{full}", self.object_base()),
        }
    }

    pub(super) fn key_from_url(&self, url: &str) -> Option<String> {
        let url = url.split(['?', '#']).next()?;
        let bases = self.public_base.iter().cloned().chain([self.object_base()]);
        for base in bases {
            if let Some(full) = url
                .strip_prefix(base.as_str())
                .and_then(|r| r.strip_prefix('/'))
                && let Some(key) = self.relative_key(full)
            {
                return Some(key.to_owned());
            }
        }
        None
    }

    pub(super) fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        let at = match &self.endpoint {
            Some(e) => e.clone(),
            None => "AWS S3".to_owned(),
        };
        s.push_str(&format!(" at {at} (region {}", self.region));
        if self.path_style {
            s.push_str(", path-style");
        }
        s.push(')');
        s
    }

    /// Turns an SDK error into a classified [`StorageError`] naming the bucket and endpoint.
    /// The SDK's messages never contain the secret key; the access key id does not appear
    /// either, because only codes and server messages are kept for service errors.
    fn error<E>(
        &self,
        op: &'static str,
        kind: Op,
        key: &str,
        err: SdkError<E, HttpResponse>,
    ) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let bucket = self.bucket.clone();
        let endpoint = self.endpoint_name();
        let detail = || error_chain(&err);
        if mentions_credentials(&err) {
            return StorageError::NoCredentials {
                bucket,
                endpoint,
                detail: detail(),
            };
        }
        match &err {
            SdkError::TimeoutError(_) => StorageError::Timeout {
                op,
                bucket,
                endpoint,
                detail: detail(),
            },
            SdkError::DispatchFailure(d) if d.is_timeout() => StorageError::Timeout {
                op,
                bucket,
                endpoint,
                detail: detail(),
            },
            SdkError::DispatchFailure(d) if d.is_user() => StorageError::Config {
                setting: "the S3 endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)",
                reason: format!("{op} on bucket {bucket} at {endpoint}: {}", detail()),
            },
            SdkError::ConstructionFailure(_) => StorageError::Config {
                setting: "the S3 client settings",
                reason: format!("{op} on bucket {bucket} at {endpoint}: {}", detail()),
            },
            SdkError::ResponseError(r) => {
                let status = r.raw().status().as_u16();
                let message = format!("the answer is not an S3 response: {}", detail());
                if matches!(status, 408 | 429 | 500..=599) {
                    StorageError::Unavailable {
                        op,
                        bucket,
                        endpoint,
                        status,
                        code: String::new(),
                        message,
                    }
                } else {
                    StorageError::Rejected {
                        op,
                        bucket,
                        endpoint,
                        status,
                        code: String::new(),
                        message,
                    }
                }
            }
            SdkError::ServiceError(s) => {
                let status = s.raw().status().as_u16();
                let e = s.err();
                let code = e.code().unwrap_or("").to_owned();
                let message = match e.message() {
                    Some(m) if !m.is_empty() => m.to_owned(),
                    _ if code.is_empty() => "no error code (HEAD responses carry none)".to_owned(),
                    _ => String::new(),
                };
                match verdict(kind, status, e.code()) {
                    Verdict::NoSuchBucket => StorageError::NoSuchBucket { bucket, endpoint },
                    Verdict::Credentials => StorageError::Credentials {
                        bucket,
                        endpoint,
                        code: if code.is_empty() {
                            format!("HTTP {status}")
                        } else {
                            code
                        },
                    },
                    Verdict::AccessDenied => StorageError::AccessDenied {
                        op,
                        bucket,
                        endpoint,
                        code: if code.is_empty() {
                            format!("HTTP {status}")
                        } else {
                            code
                        },
                        message,
                    },
                    Verdict::NotFound => StorageError::NotFound {
                        key: key.to_owned(),
                        location: self.describe(),
                    },
                    Verdict::Unavailable => StorageError::Unavailable {
                        op,
                        bucket,
                        endpoint,
                        status,
                        code,
                        message,
                    },
                    Verdict::Rejected => StorageError::Rejected {
                        op,
                        bucket,
                        endpoint,
                        status,
                        code,
                        message,
                    },
                }
            }
            // Connection refused or reset, DNS, TLS, and variants added to the SDK later: only
            // time (or an operator) fixes these, and the attempt limit bounds the cost.
            _ => StorageError::Unreachable {
                op,
                bucket,
                endpoint,
                detail: detail(),
            },
        }
    }
}

/// True when the failure is the credentials chain finding nothing (not a rejection by the
/// server, which is a service error).
fn mentions_credentials<E, R>(err: &SdkError<E, R>) -> bool
where
    E: std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    if matches!(err, SdkError::ServiceError(_)) {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

/// An error and its sources as one line, `outer: inner: innermost`, skipping a source whose
/// message the previous one already includes. Display text only: the SDK's Debug output is long
/// and not meant for operators.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut last = out.clone();
    let mut source = err.source();
    while let Some(e) = source {
        let msg = e.to_string();
        if !msg.is_empty() && !last.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        last = msg;
        source = e.source();
    }
    out
}

/// The endpoint the SDK would use, resolved the way aws-sdk-s3 does it: an endpoint set in code,
/// else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` or the profile's, else none (AWS S3).
fn resolve_endpoint(sdk: &SdkConfig) -> Option<String> {
    let url = if sdk.get_origin("endpoint_url").is_client_config() {
        sdk.endpoint_url().map(str::to_owned)
    } else {
        let key = ServiceConfigKey::builder()
            .service_id("S3")
            .env("AWS_ENDPOINT_URL")
            .profile("endpoint_url")
            .build()
            .ok();
        sdk.service_config()
            .zip(key)
            .and_then(|(conf, key)| conf.load_config(key))
            .or_else(|| sdk.endpoint_url().map(str::to_owned))
    };
    url.map(|u| u.trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
}

/// Makes a value safe for an HTTP header (S3 user metadata): printable ASCII stays, everything
/// else (and `%`) is percent-encoded, and the result is cut to [`MAX_META_VALUE`] bytes.
fn header_safe(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
        if out.len() >= MAX_META_VALUE {
            break;
        }
    }
    out.truncate(MAX_META_VALUE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_verdicts() {
        use Verdict as V;
        let cases = [
            (Op::Write, 404, Some("NoSuchBucket"), V::NoSuchBucket),
            (Op::Read, 404, Some("NoSuchBucket"), V::NoSuchBucket),
            (Op::Read, 404, Some("NoSuchKey"), V::NotFound),
            (Op::Read, 404, None, V::NotFound),
            (Op::Bucket, 404, None, V::NoSuchBucket),
            (Op::Write, 404, None, V::NoSuchBucket),
            (
                Op::Write,
                403,
                Some("SignatureDoesNotMatch"),
                V::Credentials,
            ),
            (Op::Write, 403, Some("InvalidAccessKeyId"), V::Credentials),
            (Op::Write, 403, Some("NotSignedUp"), V::Credentials),
            (Op::Write, 400, Some("ExpiredToken"), V::Credentials),
            (Op::Write, 403, Some("AccessDenied"), V::AccessDenied),
            (Op::Bucket, 403, None, V::AccessDenied),
            (Op::Write, 503, Some("SlowDown"), V::Unavailable),
            (Op::Write, 500, Some("InternalError"), V::Unavailable),
            (Op::Write, 502, None, V::Unavailable),
            (Op::Write, 429, None, V::Unavailable),
            (Op::Write, 400, Some("RequestTimeout"), V::Unavailable),
            (Op::Write, 400, Some("InvalidArgument"), V::Rejected),
            (
                Op::Write,
                403,
                Some("RequestTimeTooSkewed"),
                V::AccessDenied,
            ),
            (Op::Write, 301, Some("PermanentRedirect"), V::Rejected),
            (Op::Write, 501, Some("NotImplemented"), V::Rejected),
            (Op::Write, 501, None, V::Rejected),
        ];
        for (op, status, code, want) in cases {
            assert_eq!(verdict(op, status, code), want, "{op:?} {status} {code:?}");
        }
    }

    #[test]
    fn metadata_values_are_header_safe() {
        assert_eq!(
            header_safe("google/gemini-2.5-flash-image"),
            "google/gemini-2.5-flash-image"
        );
        assert_eq!(header_safe("café\n100%"), "caf%C3%A9%0A100%25");
        assert!(header_safe(&"é".repeat(1000)).len() <= MAX_META_VALUE);
    }
}
