//! The JSON OpenRouter's chat-completions route speaks, as serde types: the request the client
//! sends and the lenient view of an answer it reads. Nothing here decides what an answer means.

use std::borrow::Cow;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The body of `POST /chat/completions` for one image.
#[derive(Debug, Serialize)]
pub(crate) struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: [RequestMessage<'a>; 1],
    /// Without "image" here the model answers with text only.
    pub modalities: [&'static str; 2],
    pub image_config: ImageConfig<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct RequestMessage<'a> {
    pub role: &'static str,
    pub content: Content<'a>,
}

/// A plain prompt, or the prompt then reference images as parts (text first).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum Content<'a> {
    Text(&'a str),
    Parts(Vec<Part<'a>>),
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Part<'a> {
    Text { text: &'a str },
    ImageUrl { image_url: PartUrl<'a> },
}

#[derive(Debug, Serialize)]
pub(crate) struct PartUrl<'a> {
    pub url: &'a str,
}

#[derive(Debug, Serialize)]
pub(crate) struct ImageConfig<'a> {
    pub aspect_ratio: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<&'a str>,
}

/// An answer, success or error, borrowing the large strings (image data URLs) from the body so
/// that a multi-megabyte image is not copied before it is decoded. Every field is optional:
/// absence is judged by the client, not by serde.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatResponse<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, borrow)]
    pub choices: Option<Vec<Choice<'a>>>,
    #[serde(default, borrow)]
    pub usage: Option<WireUsage<'a>>,
    #[serde(default)]
    pub error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Choice<'a> {
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub native_finish_reason: Option<String>,
    #[serde(default, borrow)]
    pub message: Option<ChoiceMessage<'a>>,
    /// Set with `finish_reason: "error"` when the model failed after the 200 was sent.
    #[serde(default)]
    pub error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChoiceMessage<'a> {
    /// "", null, chatty text, or an array of parts: kept loose and only read for messages.
    #[serde(default)]
    pub content: Option<serde_json::Value>,
    #[serde(default)]
    pub refusal: Option<String>,
    #[serde(default, borrow)]
    pub images: Option<Vec<WireImage<'a>>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireImage<'a> {
    #[serde(default, borrow)]
    pub image_url: Option<ImageUrl<'a>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ImageUrl<'a> {
    /// Borrowed unless the JSON string has escapes (an encoder writing `\/`).
    #[serde(borrow)]
    pub url: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireUsage<'a> {
    #[serde(default)]
    pub prompt_tokens: Option<i64>,
    #[serde(default)]
    pub completion_tokens: Option<i64>,
    /// Kept as the JSON number's text so the dollar amount is exact (no trip through f64).
    #[serde(default, borrow)]
    pub cost: Option<&'a RawValue>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionTokensDetails {
    #[serde(default)]
    pub image_tokens: Option<i64>,
}

/// `{"code": 429, "message": "...", "metadata": {...}}`; `code` may be missing (availability
/// errors) or, from some providers, a string.
#[derive(Debug, Deserialize)]
pub(crate) struct WireError {
    #[serde(default)]
    pub code: Option<serde_json::Value>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

impl WireError {
    /// The numeric code, whether sent as a number or a numeric string.
    pub fn code(&self) -> Option<i64> {
        match self.code.as_ref()? {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// `metadata.reasons` of a moderation block, joined.
    pub fn reasons(&self) -> Option<String> {
        let reasons = self.metadata.as_ref()?.get("reasons")?.as_array()?;
        let words: Vec<&str> = reasons.iter().filter_map(|r| r.as_str()).collect();
        (!words.is_empty()).then(|| words.join(", "))
    }

    /// `metadata.raw`: the upstream provider's own error text, often the only specific part.
    pub fn raw(&self) -> Option<String> {
        match self.metadata.as_ref()?.get("raw")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    /// `metadata.error_type` of a choice-level error.
    pub fn error_type(&self) -> Option<&str> {
        self.metadata.as_ref()?.get("error_type")?.as_str()
    }
}

/// Parses a JSON number's text (`0.0387036`, `3.87e-2`, or the same in quotes) into an exact
/// decimal. `null` and non-numbers give `None`.
pub(crate) fn parse_cost(raw: &RawValue) -> Option<Decimal> {
    let text = raw.get().trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text)
            .or_else(|_| Decimal::from_str(text))
            .ok()
    }
}

/// The text of a message's `content`, whichever shape it came in.
pub(crate) fn content_text(content: Option<&serde_json::Value>) -> Option<String> {
    let text = match content? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .filter_map(|p| {
                p.get("text")
                    .and_then(|t| t.as_str())
                    .or_else(|| p.as_str())
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn cost_is_read_exactly_from_the_number_text() {
        assert_eq!(parse_cost(&raw("0.0387036")), Some(Decimal::new(387036, 7)));
        // 0.1 + 0.2 style values that f64 would not hold exactly.
        assert_eq!(
            parse_cost(&raw("0.30000000000000004441")),
            Some(Decimal::from_str("0.30000000000000004441").unwrap())
        );
        assert_eq!(
            parse_cost(&raw("3.87036e-2")),
            Some(Decimal::new(387036, 7))
        );
        assert_eq!(parse_cost(&raw("\"0.5\"")), Some(Decimal::new(5, 1)));
        assert_eq!(parse_cost(&raw("null")), None);
    }

    #[test]
    fn answers_parse_with_the_real_shape_and_its_variations() {
        let body = br#"{"id":"gen-1","choices":[{"finish_reason":"stop","native_finish_reason":"STOP","index":0,
            "message":{"role":"assistant","content":null,"refusal":null,"reasoning":null,
            "images":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"},"index":0}]}}],
            "usage":{"prompt_tokens":12,"completion_tokens":1290,"cost":0.0387036,
            "completion_tokens_details":{"reasoning_tokens":0,"image_tokens":1290}}}"#;
        let r: ChatResponse = serde_json::from_slice(body).unwrap();
        let images = r
            .choices
            .unwrap()
            .remove(0)
            .message
            .unwrap()
            .images
            .unwrap();
        assert!(matches!(
            images[0].image_url.as_ref().unwrap().url,
            Cow::Borrowed(_)
        ));
        let usage = r.usage.unwrap();
        assert_eq!(
            parse_cost(usage.cost.unwrap()),
            Some(Decimal::new(387036, 7))
        );

        let escaped = br#"{"choices":[{"message":{"images":[{"image_url":{"url":"data:image\/png;base64,AA"}}]}}]}"#;
        let r: ChatResponse = serde_json::from_slice(escaped).unwrap();
        let images = r
            .choices
            .unwrap()
            .remove(0)
            .message
            .unwrap()
            .images
            .unwrap();
        assert_eq!(
            images[0].image_url.as_ref().unwrap().url,
            "data:image/png;base64,AA"
        );
    }

    #[test]
    fn content_text_reads_every_shape() {
        use serde_json::json;
        assert_eq!(content_text(Some(&json!(""))), None);
        assert_eq!(content_text(Some(&json!(null))), None);
        assert_eq!(content_text(None), None);
        assert_eq!(
            content_text(Some(&json!("Here you go"))).as_deref(),
            Some("Here you go")
        );
        assert_eq!(
            content_text(Some(
                &json!([{"type":"text","text":"a"},{"type":"text","text":"b"}])
            ))
            .as_deref(),
            Some("a b")
        );
    }

    #[test]
    fn error_codes_come_as_numbers_or_strings() {
        let e: WireError = serde_json::from_str(r#"{"code":"429","message":"x"}"#).unwrap();
        assert_eq!(e.code(), Some(429));
        let e: WireError =
            serde_json::from_str(r#"{"message":"x","metadata":{"reasons":["violence","hate"]}}"#)
                .unwrap();
        assert_eq!(e.code(), None);
        assert_eq!(e.reasons().as_deref(), Some("violence, hate"));
    }
}
