//! Reference images: what a job's `reference_images` name, checked and made ready for the call.
//!
//! - An `https://` URL is passed to the provider as is, which fetches it. It is checked first
//!   (scheme, no credentials, no private, loopback or link-local address, the host's addresses
//!   included), since it came from a row.
//! - Anything else is a storage key: the object is read from storage, sniffed (PNG, JPEG, WebP
//!   or GIF only, whatever its name says), capped at [`MAX_REFERENCE_BYTES`], and sent as a data
//!   URL built at call time. [`store_reference`] puts a local file there first.
//!
//! All of it happens before the call (and before any budget is reserved), so a bad reference
//! fails the job without paying for anything. A reference shared by many jobs (a batch's style
//! image) is held once while any call using it is in flight: [`ReferenceCache`] hands out one
//! shared encoded buffer, and the request body is assembled around it (see the client).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::{Classify, ErrorClass};
use crate::image::ImageFormat;
use crate::notify::guard::is_public;
use crate::openrouter::{DataUrl, ReferenceImage};
use crate::storage::{Storage, StorageError};

/// The largest reference image sent, in bytes (before base64).
pub const MAX_REFERENCE_BYTES: usize = 7 * 1024 * 1024;
/// Where [`store_reference`] puts files: content-addressed, so storing one twice is a no-op.
pub const REFERENCE_PREFIX: &str = "references";
/// How long a reference URL's host may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a reference cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// Retrying cannot help: the reference itself is unfit.
    #[error("reference image {reference}: {reason}")]
    Refused { reference: String, reason: String },
    /// Reading it from storage failed.
    #[error("reference image {key}: reading it from storage failed: {source}")]
    Storage {
        key: String,
        /// Boxed: storage errors are large and this path is cold.
        #[source]
        source: Box<StorageError>,
    },
    /// The URL's host could not be resolved now.
    #[error("reference image {url}: resolving its host failed: {reason}")]
    Resolve { url: String, reason: String },
    /// A local file given to `--reference` could not be read.
    #[error("reference image {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for ReferenceError {
    fn class(&self) -> ErrorClass {
        match self {
            ReferenceError::Refused { .. } | ReferenceError::File { .. } => ErrorClass::Permanent,
            ReferenceError::Storage { source, .. } => source.class(),
            ReferenceError::Resolve { .. } => ErrorClass::RETRY,
        }
    }
}

fn refused(reference: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::Refused {
        reference: short(reference),
        reason: reason.into(),
    }
}

/// Long URLs are cut in messages (they are stored on the row).
fn short(s: &str) -> String {
    if s.chars().count() <= 120 {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(120).collect();
        t.push('…');
        t
    }
}

/// Whether a reference is a URL (else it is a storage key).
pub fn is_url(reference: &str) -> bool {
    reference.starts_with("https://")
}

/// Checks image bytes: a format the provider takes, within the size cap.
pub fn check_image(reference: &str, bytes: &[u8]) -> Result<ImageFormat, ReferenceError> {
    if bytes.len() > MAX_REFERENCE_BYTES {
        return Err(refused(
            reference,
            format!(
                "{} bytes, over the {MAX_REFERENCE_BYTES}-byte cap",
                bytes.len()
            ),
        ));
    }
    match crate::image::sniff(bytes) {
        Some((format, _, _)) => Ok(format),
        None => Err(refused(
            reference,
            "not a PNG, JPEG, WebP or GIF image (judged by its bytes)",
        )),
    }
}

/// Checks a reference URL before it is handed on: https, no credentials, and only public
/// addresses (a literal, or every address the host resolves to).
pub async fn check_url(url: &str) -> Result<(), ReferenceError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| refused(url, format!("not a URL: {e}")))?;
    if parsed.scheme() != "https" {
        return Err(refused(url, "only https:// URLs are passed on"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refused(url, "a URL with credentials is not passed on"));
    }
    let Some(host) = parsed.host_str() else {
        return Err(refused(url, "no host"));
    };
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return public_or_refused(url, ip);
    }
    let host = host.to_owned();
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") || lower.ends_with(".internal") {
        return Err(refused(url, "a local host name"));
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| ReferenceError::Resolve {
            url: short(url),
            reason: format!("no answer within {RESOLVE_TIMEOUT:?}"),
        })?
        .map_err(|e| ReferenceError::Resolve {
            url: short(url),
            reason: e.to_string(),
        })?;
    let mut any = false;
    for a in addrs {
        any = true;
        public_or_refused(url, a.ip())?;
    }
    if !any {
        return Err(ReferenceError::Resolve {
            url: short(url),
            reason: "no addresses".into(),
        });
    }
    Ok(())
}

fn public_or_refused(url: &str, ip: IpAddr) -> Result<(), ReferenceError> {
    if is_public(ip) {
        Ok(())
    } else {
        Err(refused(url, format!("{ip} is not a public address")))
    }
}

/// Stores a local image file as a reference and returns its storage key, for
/// `batch submit --reference FILE` and `enqueue --reference FILE`. The key is made from the
/// content, so a file stored twice is one object.
pub async fn store_reference(
    storage: &Storage,
    path: &std::path::Path,
) -> Result<String, ReferenceError> {
    let shown = path.display().to_string();
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| ReferenceError::File {
            path: shown.clone(),
            source,
        })?;
    let format = check_image(&shown, &bytes)?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let key = format!(
        "{REFERENCE_PREFIX}/{}.{}",
        &digest[..32],
        format.extension()
    );
    storage
        .put_bytes(&key, Bytes::from(bytes), format.content_type(), None)
        .await
        .map_err(|source| ReferenceError::Storage {
            key: key.clone(),
            source: Box::new(source),
        })?;
    Ok(key)
}

/// The encoded references of calls in flight, by storage key. Entries live as long as some
/// request holds them (weak here), so memory follows what is in flight, not what was seen.
#[derive(Debug, Default)]
pub struct ReferenceCache {
    entries: Mutex<HashMap<String, Weak<DataUrl>>>,
    /// Misses are fetched one at a time: sixteen jobs of a batch starting together fetch its
    /// shared reference once.
    fetching: tokio::sync::Mutex<()>,
}

impl ReferenceCache {
    fn lookup(&self, key: &str) -> Option<Arc<DataUrl>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key).and_then(Weak::upgrade)
    }

    /// How many references are held now (for tests and the benchmark).
    pub fn held(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.values().filter(|w| w.strong_count() > 0).count()
    }

    /// The encoded form of the object at `key`, shared with every call holding it now.
    pub async fn data_url(
        &self,
        storage: &Storage,
        key: &str,
    ) -> Result<Arc<DataUrl>, ReferenceError> {
        if let Some(hit) = self.lookup(key) {
            return Ok(hit);
        }
        let _one = self.fetching.lock().await;
        if let Some(hit) = self.lookup(key) {
            return Ok(hit);
        }
        let bytes = storage
            .get(key)
            .await
            .map_err(|source| ReferenceError::Storage {
                key: key.to_owned(),
                source: Box::new(source),
            })?;
        let format = check_image(key, &bytes)?;
        let data = Arc::new(DataUrl::new(&bytes, format));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, w| w.strong_count() > 0);
        entries.insert(key.to_owned(), Arc::downgrade(&data));
        Ok(data)
    }

    /// Every reference of a job, checked and ready for the request, in order.
    pub async fn resolve(
        &self,
        storage: &Storage,
        references: &[String],
    ) -> Result<Vec<ReferenceImage>, ReferenceError> {
        if references.len() > crate::openrouter::MAX_REFERENCES {
            return Err(refused(
                &references.join(" "),
                format!(
                    "at most {} reference images",
                    crate::openrouter::MAX_REFERENCES
                ),
            ));
        }
        let mut out = Vec::with_capacity(references.len());
        for r in references {
            if is_url(r) {
                check_url(r).await?;
                out.push(ReferenceImage::Url(r.clone()));
            } else {
                crate::storage::validate_key(r)
                    .map_err(|why| refused(r, format!("not a storage key: {why}")))?;
                out.push(ReferenceImage::Data(self.data_url(storage, r).await?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_are_checked_before_they_are_passed_on() {
        for bad in [
            "http://example.com/a.png",
            "https://user:pw@93.184.215.14/a.png",
            "https://127.0.0.1/a.png",
            "https://10.1.2.3/a.png",
            "https://[::1]/a.png",
            "https://169.254.169.254/latest/meta-data",
            "https://localhost/a.png",
            "https://metadata.google.internal/a.png",
        ] {
            let e = check_url(bad).await.unwrap_err();
            assert_eq!(e.class(), ErrorClass::Permanent, "{bad}: {e}");
        }
        check_url("https://93.184.215.14/style.png").await.unwrap();
    }

    #[test]
    fn only_capped_images_pass() {
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert_eq!(check_image("g", gif).unwrap(), ImageFormat::Gif);
        let e = check_image("x", b"<html>not an image</html>").unwrap_err();
        assert!(e.to_string().contains("not a PNG"), "{e}");
        let mut big = b"\x89PNG\r\n\x1a\n".to_vec();
        big.resize(MAX_REFERENCE_BYTES + 1, 0);
        let e = check_image("big", &big).unwrap_err();
        assert!(e.to_string().contains("cap"), "{e}");
    }
}
