//! Standard Webhooks signatures: the `webhook-id`, `webhook-timestamp` and `webhook-signature`
//! headers, with the secret in its `whsec_<base64>` form, so receivers verify with any Standard
//! Webhooks library (<https://www.standardwebhooks.com>).

use std::fmt;

use base64::Engine as _;
use base64::prelude::BASE64_STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

/// The environment variable holding the secret.
pub const SECRET_ENV: &str = "IMAGEGEN_WEBHOOK_SECRET";

/// The prefix of the secret's text form.
pub const SECRET_PREFIX: &str = "whsec_";

/// Shortest key accepted, in bytes: the spec asks for 24 to 64.
const MIN_KEY_BYTES: usize = 24;
/// Longest key accepted, in bytes.
const MAX_KEY_BYTES: usize = 64;

/// Why a secret was refused. Never contains the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("{SECRET_ENV} must start with {SECRET_PREFIX:?} followed by base64")]
    NoPrefix,
    #[error("{SECRET_ENV}: the part after {SECRET_PREFIX:?} is not valid base64")]
    NotBase64,
    #[error(
        "{SECRET_ENV}: the key is {0} bytes; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes"
    )]
    BadLength(usize),
}

/// The signing key. Prints as `WebhookSecret(..)`, never its bytes.
#[derive(Clone)]
pub struct WebhookSecret(SecretSlice<u8>);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

/// The three headers of one signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `webhook-id`: the same on every retry of one delivery, so receivers can drop repeats.
    pub id: String,
    /// `webhook-timestamp`: seconds since the epoch when this attempt was signed.
    pub timestamp: i64,
    /// `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub signature: String,
}

impl WebhookSecret {
    /// Parses `whsec_<base64 key>`.
    pub fn parse(text: &str) -> Result<WebhookSecret, SecretError> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::NoPrefix)?;
        let key = BASE64_STANDARD
            .decode(b64)
            .map_err(|_| SecretError::NotBase64)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(WebhookSecret(SecretSlice::from(key)))
    }

    /// The secret from `IMAGEGEN_WEBHOOK_SECRET`, if set.
    pub fn from_env() -> Result<Option<WebhookSecret>, SecretError> {
        match std::env::var(SECRET_ENV) {
            Ok(v) if !v.trim().is_empty() => WebhookSecret::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// The `v1,` signature of `body` sent as message `id` at `timestamp`.
    pub fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.0.expose_secret()) else {
            unreachable!("HMAC takes keys of any length");
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64_STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// The headers of one attempt to send `body` as message `id`, signed now.
    pub fn sign(&self, id: &str, body: &[u8]) -> SignedHeaders {
        let timestamp = chrono::Utc::now().timestamp();
        SignedHeaders {
            id: id.to_owned(),
            timestamp,
            signature: self.signature(id, timestamp, body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specification_example() {
        // The example of the Standard Webhooks specification.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn refuses_malformed_secrets_without_echoing_them() {
        assert_eq!(
            WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::NoPrefix
        );
        let e = WebhookSecret::parse("whsec_not*base64!").unwrap_err();
        assert_eq!(e, SecretError::NotBase64);
        assert!(!e.to_string().contains("not*base64"));
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::BadLength(5)
        );
    }

    #[test]
    fn never_prints_the_key() {
        let text = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let secret = WebhookSecret::parse(text).unwrap();
        let shown = format!("{secret:?}");
        assert_eq!(shown, "WebhookSecret(..)");
        assert!(!shown.contains(&text[SECRET_PREFIX.len()..]));
    }
}
