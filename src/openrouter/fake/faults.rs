//! The failures the stand-in can produce, and the prompt markers that ask for them.
//!
//! A marker is `[fault:SPEC]` anywhere in the prompt, `SPEC` being `KIND[xN] [key=value ...]`.
//! Without `xN` the fault happens on every call with that prompt; with it, on the first N calls,
//! after which the next marker applies, or success. So `[fault:503x2]` fails twice and then
//! succeeds, and `[fault:429x1 retry-after=3][fault:cutx1]` is rate limited once, then cut once,
//! then succeeds.

use std::time::Duration;

/// How a call goes wrong (or, for the quirks, differs from the plain answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP error status with OpenRouter's error body, at once (no padding). `retry_after`
    /// sets `Retry-After` (seconds); `reset_in` sets `X-RateLimit-Reset` to now plus that many
    /// seconds, in epoch milliseconds. Marker: the status number, e.g. `429 retry-after=3`.
    Status {
        code: u16,
        retry_after: Option<u64>,
        reset_in: Option<u64>,
    },
    /// A 503 whose error has no `code`, only `availability`. Marker: `unavailable`.
    Unavailable,
    /// A 400 whose message quotes the `Authorization` header, as a misbehaving proxy might; the
    /// client must scrub its key. Marker: `echo-key`.
    EchoKey,
    /// A 200, padding, then a top-level error object and no choices. Marker: `200-error`
    /// (`code=N`, default 429).
    ErrorIn200 {
        code: u16,
    },
    /// A 200 whose choice has `finish_reason: "error"`; prompt tokens are billed. Marker:
    /// `choice-error` (`code=N`, default 502).
    ChoiceError {
        code: u16,
    },
    /// A 200 without images, blocked by safety; prompt tokens are billed. Marker: `safety`
    /// (`reason=NATIVE_FINISH_REASON`, default IMAGE_SAFETY; with NO_IMAGE the finish_reason is
    /// "stop", otherwise "content_filter").
    Safety {
        reason: String,
    },
    /// A 200 with chatty text and no image; billed. Marker: `text-only`.
    TextOnly,
    /// A 200 with a preview image, then the final one. Marker: `two-images`.
    TwoImages,
    /// A 200 whose image is JPEG bytes labelled `data:image/png`. Marker: `jpeg-as-png`.
    JpegAsPng,
    /// A 200 whose image is not an image (an HTML page, base64-encoded, labelled PNG); billed.
    /// Marker: `not-an-image`.
    NotAnImage,
    /// A 200 whose JSON stops halfway (inside the image), then a clean end of body. Marker: `cut`.
    Cut,
    /// A 200, padding, then the end of the body with no JSON at all. Marker: `whitespace-eof`.
    WhitespaceEof,
    /// A 200, padding, part of the JSON, then the connection is dropped. Marker: `reset`.
    Reset,
    /// Works this long (padding meanwhile) instead of the configured latency, then answers.
    /// Marker: `slow=30s`.
    Slow(Duration),
    /// A 200 whose body is larger than [`super::FakeConfig::oversize_bytes`]; not billed.
    /// Marker: `oversize`.
    Oversize,
    /// Harmless quirks of real answers: `content` null, chatty text, or an array of parts; SSE
    /// comment lines as padding. Markers: `content-null`, `content-text`, `content-array`,
    /// `sse-comments`.
    ContentNull,
    ContentText,
    ContentArray,
    SseComments,
}

/// One marker: a fault, for how many calls (`None`: all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub fault: Fault,
    pub calls: Option<u64>,
}

/// The marker opener.
const OPEN: &str = "[fault:";

impl Step {
    /// Parses one marker's inside (`503x2`, `429 retry-after=3`, `slow=30s`): the syntax of the
    /// CLI's `--fault` too.
    pub fn parse(spec: &str) -> Result<Step, String> {
        parse_spec(spec)
    }
}

/// Every marker in the prompt, in order.
pub fn parse_markers(prompt: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let end = after
            .find(']')
            .ok_or_else(|| format!("unterminated fault marker {:?}", &rest[start..]))?;
        steps.push(parse_spec(&after[..end])?);
        rest = &after[end + 1..];
    }
    Ok(steps)
}

/// The fault for the `index`-th call (0-based) with a prompt carrying `steps`.
pub fn fault_for_call(steps: &[Step], mut index: u64) -> Option<Fault> {
    for step in steps {
        match step.calls {
            None => return Some(step.fault.clone()),
            Some(n) if index < n => return Some(step.fault.clone()),
            Some(n) => index -= n,
        }
    }
    None
}

fn parse_spec(spec: &str) -> Result<Step, String> {
    let mut words = spec.split_whitespace();
    let head = words.next().ok_or("empty fault marker")?;
    let (kind, calls) = match head.rsplit_once('x') {
        Some((kind, n))
            if !kind.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (kind, Some(n.parse::<u64>().map_err(|e| e.to_string())?))
        }
        _ => (head, None),
    };
    let mut options = Vec::new();
    for word in words {
        let (k, v) = word
            .split_once('=')
            .ok_or_else(|| format!("fault option {word:?} is not key=value"))?;
        options.push((k, v));
    }
    let option = |name: &str| options.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let number = |name: &str| -> Result<Option<u64>, String> {
        option(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{name}={v} is not a number"))
            })
            .transpose()
    };
    let code = |default: u16| -> Result<u16, String> {
        number("code")?
            .map_or(Ok(default), u16::try_from)
            .map_err(|e| e.to_string())
    };
    let fault = match kind {
        "unavailable" => Fault::Unavailable,
        "echo-key" => Fault::EchoKey,
        "200-error" => Fault::ErrorIn200 { code: code(429)? },
        "choice-error" => Fault::ChoiceError { code: code(502)? },
        "safety" => Fault::Safety {
            reason: option("reason").unwrap_or("IMAGE_SAFETY").to_owned(),
        },
        "text-only" => Fault::TextOnly,
        "two-images" => Fault::TwoImages,
        "jpeg-as-png" => Fault::JpegAsPng,
        "not-an-image" => Fault::NotAnImage,
        "cut" => Fault::Cut,
        "whitespace-eof" => Fault::WhitespaceEof,
        "reset" => Fault::Reset,
        "oversize" => Fault::Oversize,
        "content-null" => Fault::ContentNull,
        "content-text" => Fault::ContentText,
        "content-array" => Fault::ContentArray,
        "sse-comments" => Fault::SseComments,
        slow if slow.starts_with("slow=") => Fault::Slow(
            humantime::parse_duration(&slow["slow=".len()..])
                .map_err(|e| format!("{slow}: {e}"))?,
        ),
        status if status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()) => {
            let code: u16 = status.parse().map_err(|_| format!("bad status {status}"))?;
            if !(400..600).contains(&code) {
                return Err(format!("status fault {code} is not an error status"));
            }
            Fault::Status {
                code,
                retry_after: number("retry-after")?,
                reset_in: number("reset")?,
            }
        }
        other => return Err(format!("unknown fault {other:?}")),
    };
    Ok(Step { fault, calls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse_with_counts_and_options() {
        let steps =
            parse_markers("a lake [fault:503x2] then [fault:429 retry-after=3 reset=9]").unwrap();
        assert_eq!(
            steps,
            vec![
                Step {
                    fault: Fault::Status {
                        code: 503,
                        retry_after: None,
                        reset_in: None
                    },
                    calls: Some(2)
                },
                Step {
                    fault: Fault::Status {
                        code: 429,
                        retry_after: Some(3),
                        reset_in: Some(9)
                    },
                    calls: None
                },
            ]
        );
        let steps =
            parse_markers("[fault:slow=30sx1][fault:content-textx2][fault:200-error code=402]")
                .unwrap();
        assert_eq!(steps[0].fault, Fault::Slow(Duration::from_secs(30)));
        assert_eq!(steps[0].calls, Some(1));
        assert_eq!(steps[1].fault, Fault::ContentText);
        assert_eq!(steps[1].calls, Some(2));
        assert_eq!(steps[2].fault, Fault::ErrorIn200 { code: 402 });
    }

    #[test]
    fn bad_markers_are_reported() {
        assert!(parse_markers("[fault:nope]").is_err());
        assert!(parse_markers("[fault:503").is_err());
        assert!(parse_markers("[fault:200]").is_err());
        assert!(parse_markers("[fault:429 retry-after=soon]").is_err());
    }

    #[test]
    fn counted_steps_run_in_sequence_then_succeed() {
        let steps = parse_markers("[fault:503x2][fault:cutx1]").unwrap();
        let seq: Vec<Option<Fault>> = (0..5).map(|i| fault_for_call(&steps, i)).collect();
        let s503 = Some(Fault::Status {
            code: 503,
            retry_after: None,
            reset_in: None,
        });
        assert_eq!(seq, vec![s503.clone(), s503, Some(Fault::Cut), None, None]);
        let forever = parse_markers("[fault:safety]").unwrap();
        assert!(fault_for_call(&forever, 1000).is_some());
        assert_eq!(fault_for_call(&[], 0), None);
    }
}
