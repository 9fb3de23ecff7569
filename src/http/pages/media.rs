//! `GET /media/{job}/{index}/{original|spec}`: a job's stored image or rendition, found by the
//! database row (never a path from the request), streamed from S3 or the local directory as it
//! arrives. The ETag is the object's SHA-256 and pages link `?v=` with it, so the answer is
//! cached as immutable.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::http::HttpState;
use crate::http::problem::Problem;
use crate::storage::StorageError;

/// The longest spec name accepted in the path (specs are short: `thumb`, `1200x630.jpg`).
const MAX_SPEC_CHARS: usize = 32;

/// The link pages use for an object: the public URL when one is configured, else this route
/// with the digest as a cache key.
pub fn href(job: i64, index: i32, spec: &str, sha256: &str) -> String {
    let v: String = sha256.chars().take(12).collect();
    format!("/media/{job}/{index}/{}?v={v}", super::view::enc(spec))
}

pub async fn serve(
    State(s): State<HttpState>,
    Path((job, index, spec)): Path<(i64, i32, String)>,
    headers: HeaderMap,
) -> Response {
    if spec.is_empty()
        || spec.len() > MAX_SPEC_CHARS
        || !spec
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'x' | b'_' | b'-'))
    {
        return Problem::invalid_parameter("the last path part is `original` or a rendition spec")
            .into_response();
    }
    let Some(storage) = &s.storage else {
        return Problem::unavailable("this server has no storage configured to read images from")
            .into_response();
    };
    let object = match s.queue.media_object(job, index, &spec).await {
        Ok(Some(o)) => o,
        Ok(None) => {
            return Problem::not_found(format!("job {job} has no image {index} as {spec}"))
                .into_response();
        }
        Err(e) => return Problem::from(e).into_response(),
    };
    let etag = format!("\"{}\"", object.sha256);
    let cache = if s.auth.has_tokens() {
        "private, max-age=31536000, immutable"
    } else {
        "public, max-age=31536000, immutable"
    };
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if matches {
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag_value),
                (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
            ],
        )
            .into_response();
    }
    let stream = match storage.get_stream(&object.key).await {
        Ok(s) => s,
        Err(StorageError::NotFound { .. }) => {
            return Problem::not_found(format!(
                "image {index} of job {job} ({spec}) is recorded but missing from storage"
            ))
            .into_response();
        }
        Err(e) => {
            tracing::warn!(job, index, spec, error = %e, "media read failed");
            return Problem::unavailable("the storage did not return the image").into_response();
        }
    };
    let content_type = HeaderValue::from_str(&object.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    if let Ok(len) = HeaderValue::from_str(&object.bytes.to_string()) {
        h.insert(header::CONTENT_LENGTH, len);
    }
    h.insert(header::ETAG, etag_value);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}
