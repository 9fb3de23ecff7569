//! The stand-in itself, seen through raw HTTP: it must behave like OpenRouter for the client's
//! tests to mean anything.

use std::time::Duration;

use imagegen::openrouter::fake::FakeConfig;
use imagegen::openrouter::{CallErrorKind, Usage};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::{KEY, client, fake, fake_with, request};

fn body(prompt: &str) -> Value {
    json!({
        "model": "google/gemini-2.5-flash-image",
        "messages": [{"role": "user", "content": prompt}],
        "modalities": ["image", "text"],
        "image_config": {"aspect_ratio": "1:1"}
    })
}

async fn post(base_url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base_url}/chat/completions"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn commits_200_early_pads_then_answers_with_the_real_shape() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(200),
        pad_interval: Duration::from_millis(10),
        image_bytes: 50_000,
        ..FakeConfig::default()
    })
    .await;
    let response = post(&server.base_url(), &body("a lake")).await;
    assert_eq!(response.status(), 200);
    let header_id = response.headers()["x-generation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let padding = text.len() - text.trim_start().len();
    assert!(
        padding >= 2,
        "expected keep-alive newlines first, got {padding}"
    );
    assert!(text[..padding].bytes().all(|b| b == b'\n'));
    assert!(!text.contains("system_fingerprint"));
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["id"], header_id);
    assert_eq!(answer["object"], "chat.completion");
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["content"], "");
    let url = choice["message"]["images"][0]["image_url"]["url"]
        .as_str()
        .unwrap();
    assert!(url.starts_with("data:image/png;base64,iVBORw0"));
    let image = imagegen::image::decode_data_url(url).unwrap();
    assert_eq!((image.width, image.height), (1024, 1024));
    assert!(answer["usage"]["cost"].is_number());
    assert_eq!(
        answer["usage"]["completion_tokens_details"]["image_tokens"],
        1290
    );
}

#[tokio::test]
async fn comment_padding_looks_like_openrouters() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(50),
        pad_interval: Duration::from_millis(10),
        image_bytes: 50_000,
        ..FakeConfig::default()
    })
    .await;
    let text = post(&server.base_url(), &body("a lake [fault:sse-comments]"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.starts_with(": OPENROUTER PROCESSING\n\n"),
        "{:?}",
        &text[..40]
    );
}

#[tokio::test]
async fn without_image_modality_the_answer_is_text_only() {
    let server = fake().await;
    let mut request = body("a lake");
    request.as_object_mut().unwrap().remove("modalities");
    let response = post(&server.base_url(), &request).await;
    assert_eq!(response.status(), 200);
    let answer: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let message = &answer["choices"][0]["message"];
    assert!(message.get("images").is_none());
    assert!(message["content"].as_str().unwrap().len() > 10);
    assert_eq!(server.successes(), 0);
}

#[tokio::test]
async fn rejects_bad_requests_as_openrouter_does() {
    let server = fake().await;
    let base = server.base_url();

    let mut bad_ratio = body("a lake");
    bad_ratio["image_config"]["aspect_ratio"] = json!("1.91:1");
    let response = post(&base, &bad_ratio).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], 400);
    assert_eq!(error["error"]["message"], "Provider returned error");
    assert!(
        error["error"]["metadata"]["raw"]
            .as_str()
            .unwrap()
            .contains("1.91:1")
    );

    let mut unknown = body("a lake");
    unknown["model"] = json!("openai/dall-e-3");
    let response = post(&base, &unknown).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "openai/dall-e-3 is not a valid model ID"
    );

    let response = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .json(&body("a lake"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["message"], "No auth credentials found");

    let response = post(&base, &body("a lake [fault:teapot]")).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        error["error"]["message"],
        "fake-openrouter: unknown fault \"teapot\""
    );

    // These models are not served on the images route.
    let response = reqwest::Client::new()
        .post(format!("{base}/images/generations"))
        .bearer_auth(KEY)
        .json(&body("a lake"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    assert_eq!(server.calls(), 4, "every chat-completions request counts");
    assert_eq!(server.billed_usd(), Decimal::ZERO);
}

#[tokio::test]
async fn the_billed_total_equals_what_the_client_recorded() {
    let server = fake().await;
    let client = client(&server);
    let prompts = [
        "one",
        "two [fault:choice-errorx1]",
        "three [fault:safety]",
        "four [fault:text-onlyx2]",
        "five [fault:503x1]",
        "six [fault:cutx1]",
        "seven [fault:two-images]",
    ];
    let mut recorded = Decimal::ZERO;
    let mut successes = 0;
    for prompt in prompts {
        for _ in 0..3 {
            let usage: Option<Usage> = match client.generate(&request(prompt)).await {
                Ok(g) => {
                    successes += 1;
                    Some(g.usage)
                }
                Err(e) => {
                    assert_ne!(e.kind, CallErrorKind::InvalidRequest);
                    e.usage
                }
            };
            recorded += usage.map_or(Decimal::ZERO, |u| u.cost_usd);
        }
    }
    assert_eq!(recorded, server.billed_usd());
    assert_eq!(successes, server.successes());
    assert_eq!(server.calls(), 21);
    assert_eq!(server.calls_for("four [fault:text-onlyx2]"), 3);
}

#[tokio::test]
async fn stopping_ends_answers_in_flight() {
    let server = fake_with(FakeConfig {
        pad_interval: Duration::from_millis(10),
        ..FakeConfig::default()
    })
    .await;
    // The 200 is committed at once, so once `send` returns the call is in flight.
    let mut response = post(&server.base_url(), &body("a lake [fault:slow=1h]")).await;
    assert_eq!(response.status(), 200);
    server.stop().await.unwrap();
    let mut read = Vec::new();
    let outcome = loop {
        match response.chunk().await {
            Ok(Some(chunk)) => read.extend_from_slice(&chunk),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(
        outcome.is_err(),
        "the body must end abruptly, not as a complete answer"
    );
    assert!(
        read.iter().all(u8::is_ascii_whitespace),
        "only padding was sent"
    );
}
