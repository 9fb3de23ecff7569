//! What a failed OpenRouter call means: the error the client returns, its kind and class, and the
//! reading of the provider's retry hints. Every verdict on an answer is made from here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;

use crate::error::{Classify, ErrorClass};
use crate::image::ImageError;

use super::Usage;

/// The longest provider text (error message, refusal, model chatter) an error message keeps.
pub const PROVIDER_TEXT_MAX_CHARS: usize = 160;

/// Where a call went wrong. Together with [`CallError::code`] it says what happened; the class
/// says what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallErrorKind {
    /// The request was refused before any call (bad aspect ratio, image size, empty prompt).
    InvalidRequest,
    /// The request could not be sent or no answer head came back (connect, TLS, reset).
    Transport,
    /// The whole call, body included, did not finish within its deadline.
    Deadline,
    /// The connection broke while the body was being read.
    BodyRead,
    /// The body grew past the configured cap.
    BodyTooLarge,
    /// A non-200 status; `code` holds the status.
    HttpStatus,
    /// A 200 whose body is a top-level error object instead of choices.
    ErrorInBody,
    /// A 200 whose first choice has `finish_reason: "error"`.
    ChoiceError,
    /// A 200 without an image, blocked by the model's safety filter.
    SafetyBlock,
    /// A 200 without an image and without a stated reason (text only).
    NoImage,
    /// A 200 whose body was only keep-alive padding: the upstream died before answering.
    EmptyBody,
    /// A 200 whose body is not the JSON expected (cut mid-JSON, or another shape).
    MalformedBody,
    /// The image in the answer is not a decodable image.
    BadImage,
}

/// A failed call: what happened, what it means for the job, and what the answer told us before
/// failing (billed usage, generation id).
///
/// The message is short and specific, and never contains the API key: provider text is truncated
/// and scrubbed of the key before it is kept.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    /// Where it went wrong.
    pub kind: CallErrorKind,
    /// What to do about it: retry (with the provider's requested delay, if any), give up on
    /// this job, or stop claiming jobs.
    pub class: ErrorClass,
    /// The HTTP status of the answer, when one arrived.
    pub http_status: Option<u16>,
    /// OpenRouter's error code (the HTTP status for non-200s; the code inside the body for
    /// errors carried by a 200).
    pub code: Option<i64>,
    /// Tokens and cost the answer reported: a failed call can still be billed.
    pub usage: Option<Usage>,
    /// The generation id from the body or the `X-Generation-Id` header.
    pub generation_id: Option<String>,
    pub(crate) message: String,
}

impl Classify for CallError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl CallError {
    pub(crate) fn new(kind: CallErrorKind, class: ErrorClass, message: impl Into<String>) -> Self {
        CallError {
            kind,
            class,
            http_status: None,
            code: None,
            usage: None,
            generation_id: None,
            message: message.into(),
        }
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(
            CallErrorKind::InvalidRequest,
            ErrorClass::Permanent,
            message,
        )
    }

    pub(crate) fn with_status(mut self, status: Option<u16>) -> Self {
        self.http_status = status;
        self
    }

    pub(crate) fn with_code(mut self, code: Option<i64>) -> Self {
        self.code = code;
        self
    }

    pub(crate) fn with_usage(mut self, usage: Option<Usage>) -> Self {
        self.usage = usage;
        self
    }

    pub(crate) fn with_generation_id(mut self, id: Option<String>) -> Self {
        self.generation_id = id;
        self
    }

    /// Removes every occurrence of `secret` from the message. Applied once to every error the
    /// client returns, so no path can forget it.
    pub(crate) fn redact(mut self, secret: &str) -> Self {
        if !secret.is_empty() && self.message.contains(secret) {
            self.message = self.message.replace(secret, REDACTED);
        }
        self
    }

    pub(crate) fn from_image(index: usize, err: &ImageError) -> Self {
        Self::new(
            CallErrorKind::BadImage,
            err.class(),
            format!("openrouter: image {index} of the answer: {err}"),
        )
    }
}

/// The class of an OpenRouter error code (an HTTP status, or the code of an error inside a 200),
/// following OpenRouter's documented meanings. `after` is the delay the provider asked for.
pub fn class_for_code(code: i64, after: Option<Duration>) -> ErrorClass {
    match code {
        // A bad or disabled key, or no credits: every job would fail the same way.
        401 | 402 => ErrorClass::Halt,
        408 | 429 => ErrorClass::Transient { after },
        // Provider or router trouble, including 502, 503, 524 and 529.
        500..=599 => ErrorClass::Transient { after },
        // 400 bad parameters, 403 moderation, 404 no such model or endpoint, and the rest.
        _ => ErrorClass::Permanent,
    }
}

/// `metadata.reason` of the 402 that means "too many paid calls in flight for the balance right
/// now": it clears as calls finish, so it is a shared cool-down, not "out of credits".
pub const IN_FLIGHT_BUDGET_EXHAUSTED: &str = "in_flight_budget_exhausted";

/// The class of an error answer: [`class_for_code`], except that a 402 whose `metadata.reason`
/// is [`IN_FLIGHT_BUDGET_EXHAUSTED`] is [`ErrorClass::Saturated`]. A plain 402 and
/// `weight_exceeds_budget` (a single call the balance cannot cover) stay halting.
pub fn class_for_error(code: i64, reason: Option<&str>, after: Option<Duration>) -> ErrorClass {
    match (code, reason) {
        (402, Some(IN_FLIGHT_BUDGET_EXHAUSTED)) => ErrorClass::Saturated { after },
        _ => class_for_code(code, after),
    }
}

/// A short name for an error code, for messages.
pub(crate) fn code_meaning(code: i64) -> &'static str {
    match code {
        400 => "bad request",
        401 => "bad or disabled API key",
        402 => "out of credits",
        403 => "moderation block",
        404 => "not found",
        408 => "request timeout",
        429 => "rate limited",
        500 => "internal error",
        502 => "provider error",
        503 => "no provider available",
        524 => "provider timeout",
        529 => "provider overloaded",
        405..=499 => "client error",
        501..=599 => "server error",
        _ => "unexpected status",
    }
}

/// The delay the provider asked for: the larger of `Retry-After` (seconds or an HTTP date) and
/// `X-RateLimit-Reset` (a Unix time in milliseconds), measured from `now`. A time already
/// passed asks for no wait (zero).
pub fn retry_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after = text("retry-after").and_then(|v| parse_retry_after(v, now));
    let reset = text("x-ratelimit-reset").and_then(|v| parse_reset(v, now));
    match (retry_after, reset) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `Retry-After`: delta-seconds (fractions tolerated) or an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let when = UNIX_EPOCH + Duration::from_millis(u64::try_from(when.timestamp_millis()).ok()?);
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Values below this are taken as Unix seconds rather than milliseconds (it is March 1973 in
/// milliseconds), since some gateways send seconds.
const RESET_SECONDS_BELOW: u64 = 100_000_000_000;

/// `X-RateLimit-Reset`: when the window resets, as a Unix time in milliseconds.
fn parse_reset(value: &str, now: SystemTime) -> Option<Duration> {
    let n: u64 = value.parse().ok()?;
    let when = if n < RESET_SECONDS_BELOW {
        UNIX_EPOCH + Duration::from_secs(n)
    } else {
        UNIX_EPOCH + Duration::from_millis(n)
    };
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What stands in for the key wherever it would have appeared.
const REDACTED: &str = "[redacted]";

/// Text from the answer (error messages, refusals, a proxy's page) made fit for an error
/// message: the key removed *before* truncating, since a cut could leave part of it behind
/// where [`CallError::redact`] no longer recognises it.
pub(crate) fn provider_text(text: &str, secret: &str) -> String {
    if !secret.is_empty() && text.contains(secret) {
        short_text(&text.replace(secret, REDACTED))
    } else {
        short_text(text)
    }
}

/// Text made fit for an error message: whitespace collapsed, at most
/// [`PROVIDER_TEXT_MAX_CHARS`] characters.
pub(crate) fn short_text(text: &str) -> String {
    let mut out = String::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    if out.chars().count() > PROVIDER_TEXT_MAX_CHARS {
        let cut: String = out.chars().take(PROVIDER_TEXT_MAX_CHARS - 1).collect();
        out = format!("{}…", cut.trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn codes_map_to_the_documented_verdicts() {
        let after = Some(Duration::from_secs(3));
        assert_eq!(class_for_code(400, after), ErrorClass::Permanent);
        assert_eq!(class_for_code(401, after), ErrorClass::Halt);
        assert_eq!(class_for_code(402, after), ErrorClass::Halt);
        assert_eq!(class_for_code(403, after), ErrorClass::Permanent);
        assert_eq!(class_for_code(404, None), ErrorClass::Permanent);
        for code in [408, 429, 500, 502, 503, 524, 529] {
            assert_eq!(class_for_code(code, after), ErrorClass::Transient { after });
        }
    }

    #[test]
    fn only_the_in_flight_402_is_a_cooldown() {
        let after = Some(Duration::from_secs(2));
        assert_eq!(
            class_for_error(402, Some(IN_FLIGHT_BUDGET_EXHAUSTED), after),
            ErrorClass::Saturated { after }
        );
        assert_eq!(
            class_for_error(402, Some("weight_exceeds_budget"), after),
            ErrorClass::Halt
        );
        assert_eq!(class_for_error(402, None, after), ErrorClass::Halt);
        // The reason only means this on a 402.
        assert_eq!(
            class_for_error(429, Some(IN_FLIGHT_BUDGET_EXHAUSTED), after),
            ErrorClass::Transient { after }
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_hint(&headers(&[("retry-after", "3")]), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_hint(&headers(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        // 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT.
        assert_eq!(
            retry_hint(
                &headers(&[("retry-after", "Tue, 14 Nov 2023 22:13:50 GMT")]),
                now
            ),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_hint(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_hint(&HeaderMap::new(), now), None);
    }

    #[test]
    fn ratelimit_reset_is_epoch_millis_and_the_longer_wait_wins() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let reset = "1700000007500";
        assert_eq!(
            retry_hint(&headers(&[("x-ratelimit-reset", reset)]), now),
            Some(Duration::from_millis(7500))
        );
        assert_eq!(
            retry_hint(&headers(&[("x-ratelimit-reset", "1700000004")]), now),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            retry_hint(&headers(&[("x-ratelimit-reset", "1600000000000")]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_hint(
                &headers(&[("retry-after", "2"), ("x-ratelimit-reset", reset)]),
                now
            ),
            Some(Duration::from_millis(7500))
        );
    }

    #[test]
    fn provider_text_is_collapsed_and_truncated() {
        assert_eq!(short_text("  a\n\n b  "), "a b");
        let long = "é".repeat(500);
        let short = short_text(&long);
        assert_eq!(short.chars().count(), PROVIDER_TEXT_MAX_CHARS);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn provider_text_loses_the_secret_before_it_is_cut() {
        let secret = "sk-0123456789abcdefghij";
        let text = format!("{}{secret} tail", "x".repeat(PROVIDER_TEXT_MAX_CHARS - 10));
        let short = provider_text(&text, secret);
        assert!(!short.contains("sk-0123"), "{short}");
        assert!(short.chars().count() <= PROVIDER_TEXT_MAX_CHARS);
    }

    #[test]
    fn redaction_removes_the_secret_everywhere() {
        let e = CallError::new(
            CallErrorKind::HttpStatus,
            ErrorClass::Permanent,
            "k=sk-1 again sk-1",
        )
        .redact("sk-1");
        assert_eq!(e.to_string(), "k=[redacted] again [redacted]");
    }
}
