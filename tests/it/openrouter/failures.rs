//! One test per row of the failure table in shared/openrouter.md, plus the ways a 200 fails.

use std::time::Duration;

use imagegen::error::{Classify, ErrorClass};
use imagegen::openrouter::fake::{FakeConfig, Fault};
use imagegen::openrouter::{CallErrorKind, Client, Config, Usage};
use rust_decimal::Decimal;

use super::{KEY, client, config, fail, fake, fake_with, request, succeed};

/// The flash model's input price per token, in USD.
fn flash_input_cost(tokens: i64) -> Decimal {
    Decimal::from(tokens) * Decimal::new(30, 2) / Decimal::from(1_000_000)
}

#[tokio::test]
async fn status_400_is_permanent() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:400]").await;
    assert_eq!(err.kind, CallErrorKind::HttpStatus);
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!((err.http_status, err.code), (Some(400), Some(400)));
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 400 bad request: Provider returned error; upstream answered 400"
    );
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn unknown_model_is_a_permanent_400() {
    let server = fake().await;
    let mut req = request("a lake");
    req.model = "google/gemini-9-imaginary".to_owned();
    let err = client(&server).generate(&req).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(err.http_status, Some(400));
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 400 bad request: google/gemini-9-imaginary is not a valid model ID"
    );
}

#[tokio::test]
async fn status_401_bad_key_halts_the_worker() {
    let server = fake().await;
    let wrong = "sk-or-v1-wrong-key-wrong-key-wrong-key";
    let client = Client::new(Config::new(server.base_url(), wrong)).unwrap();
    let err = client.generate(&request("a lake")).await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::HttpStatus);
    assert_eq!(err.class(), ErrorClass::Halt);
    assert_eq!(err.http_status, Some(401));
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 401 bad or disabled API key: User not found."
    );
    // The same server takes the right key.
    succeed(&server, "a lake").await;
}

#[tokio::test]
async fn status_402_out_of_credits_halts_the_worker() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:402]").await;
    assert_eq!(err.class(), ErrorClass::Halt);
    assert_eq!((err.http_status, err.code), (Some(402), Some(402)));
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 402 out of credits: Insufficient credits. Add more using \
         https://openrouter.ai/settings/credits"
    );
}

#[tokio::test]
async fn status_402_for_a_while_then_recovery() {
    let server = fake().await;
    server.inject(
        Fault::Status {
            code: 402,
            retry_after: None,
            reset_in: None,
        },
        2,
    );
    for prompt in ["first", "second"] {
        let err = fail(&server, prompt).await;
        assert_eq!(err.class(), ErrorClass::Halt, "{prompt}");
    }
    succeed(&server, "third").await;
    assert_eq!(server.calls(), 3);
    assert_eq!(server.successes(), 1);
}

#[tokio::test]
async fn status_403_moderation_is_permanent_with_its_reasons() {
    let server = fake().await;
    let err = fail(&server, "a duel [fault:403]").await;
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(err.http_status, Some(403));
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 403 moderation block: google/gemini-2.5-flash-image requires \
         moderation. Your input was flagged for \"violence\"; reasons: violence"
    );
}

#[tokio::test]
async fn statuses_408_and_524_are_timeouts_to_retry() {
    let server = fake().await;
    for (code, text) in [
        (
            408,
            "openrouter: HTTP 408 request timeout: Request timed out",
        ),
        (
            524,
            "openrouter: HTTP 524 provider timeout: Provider timed out",
        ),
    ] {
        let err = fail(&server, &format!("a lake [fault:{code}]")).await;
        assert_eq!(err.class(), ErrorClass::Transient { after: None }, "{code}");
        assert_eq!(err.http_status, Some(code));
        assert_eq!(err.usage, None);
        assert_eq!(err.to_string(), text);
    }
}

#[tokio::test]
async fn status_429_waits_as_told_by_retry_after() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:429 retry-after=3]").await;
    assert_eq!(err.kind, CallErrorKind::HttpStatus);
    assert_eq!(
        err.class(),
        ErrorClass::Transient {
            after: Some(Duration::from_secs(3))
        }
    );
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 429 rate limited: Rate limit exceeded: \
         limit_rpm/google/gemini-2.5-flash-image (retry after 3s)"
    );
    // Without hints the retry policy's own backoff applies.
    let err = fail(&server, "a lake [fault:429]").await;
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
}

#[tokio::test]
async fn status_429_waits_until_the_ratelimit_reset() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:429 reset=600]").await;
    let ErrorClass::Transient { after: Some(after) } = err.class() else {
        panic!("expected a requested delay, got {:?}", err.class());
    };
    // The reset is an absolute time ten minutes ahead; the wait is what is left of it.
    assert!(after <= Duration::from_secs(600), "{after:?}");
    assert!(after > Duration::from_secs(500), "{after:?}");
    assert!(err.to_string().starts_with(
        "openrouter: HTTP 429 rate limited: Rate limit exceeded: \
         limit_rpm/google/gemini-2.5-flash-image (retry after 9m"
    ));
}

#[tokio::test]
async fn statuses_500_502_503_529_are_provider_trouble_to_retry() {
    let server = fake().await;
    for (code, text) in [
        (
            500,
            "openrouter: HTTP 500 internal error: Internal Server Error",
        ),
        (
            502,
            "openrouter: HTTP 502 provider error: Provider returned error; upstream answered 502",
        ),
        (
            503,
            "openrouter: HTTP 503 no provider available: Service Unavailable",
        ),
        (
            529,
            "openrouter: HTTP 529 provider overloaded: Provider returned error: overloaded; upstream answered 529",
        ),
    ] {
        let err = fail(&server, &format!("a lake [fault:{code}]")).await;
        assert_eq!(err.kind, CallErrorKind::HttpStatus);
        assert_eq!(err.class(), ErrorClass::Transient { after: None }, "{code}");
        assert_eq!(
            (err.http_status, err.code),
            (Some(code), Some(i64::from(code)))
        );
        assert_eq!(err.usage, None);
        assert_eq!(err.to_string(), text);
    }
}

#[tokio::test]
async fn availability_error_without_code_is_retried() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:unavailable]").await;
    assert_eq!(err.class(), ErrorClass::RETRY);
    assert_eq!(err.http_status, Some(503));
    assert_eq!(
        err.to_string(),
        "openrouter: HTTP 503 no provider available: No allowed providers are available for \
         the selected model."
    );
}

#[tokio::test]
async fn a_200_with_a_top_level_error_is_classified_by_its_code() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:200-error]").await;
    assert_eq!(err.kind, CallErrorKind::ErrorInBody);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!((err.http_status, err.code), (Some(200), Some(429)));
    assert_eq!(err.usage, None);
    // No id in that body: it comes from the X-Generation-Id header.
    assert!(
        err.generation_id
            .as_deref()
            .is_some_and(|id| id.starts_with("gen-"))
    );
    assert_eq!(
        err.to_string(),
        "openrouter: error in a 200 answer (code 429 rate limited): Rate limit exceeded: \
         limit_rpm/google/gemini-2.5-flash-image"
    );
    let err = fail(&server, "a lake [fault:200-error code=402]").await;
    assert_eq!(err.class(), ErrorClass::Halt);
    assert_eq!(server.billed_usd(), Decimal::ZERO);
}

#[tokio::test]
async fn a_choice_level_error_is_retried_and_its_usage_recorded() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:choice-error]").await;
    assert_eq!(err.kind, CallErrorKind::ChoiceError);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!((err.http_status, err.code), (Some(200), Some(502)));
    let usage = err.usage.expect("a billed failure carries its usage");
    assert!(usage.prompt_tokens > 0);
    assert_eq!((usage.completion_tokens, usage.image_tokens), (0, 0));
    assert_eq!(usage.cost_usd, flash_input_cost(usage.prompt_tokens));
    assert_eq!(usage.cost_usd, server.billed_usd());
    assert!(err.generation_id.is_some());
    assert_eq!(
        err.to_string(),
        "openrouter: generation failed (code 502 provider error): Upstream error from Google AI \
         Studio: Provider returned error; error_type provider_error"
    );
}

#[tokio::test]
async fn a_safety_block_is_permanent_and_billed() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:safety]").await;
    assert_eq!(err.kind, CallErrorKind::SafetyBlock);
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(err.http_status, Some(200));
    let usage = err.usage.expect("safety blocks are billed");
    assert_eq!(usage.cost_usd, flash_input_cost(usage.prompt_tokens));
    assert!(usage.cost_usd > Decimal::ZERO);
    assert_eq!(
        err.to_string(),
        "openrouter: safety block (finish_reason content_filter, native_finish_reason \
         IMAGE_SAFETY)"
    );
    // NO_IMAGE comes with finish_reason "stop" and is still a safety block.
    let err = fail(&server, "a lake [fault:safety reason=NO_IMAGE]").await;
    assert_eq!(err.kind, CallErrorKind::SafetyBlock);
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(
        err.to_string(),
        "openrouter: safety block (finish_reason stop, native_finish_reason NO_IMAGE)"
    );
    assert_eq!(
        server.billed_usd(),
        err.usage.unwrap().cost_usd + usage.cost_usd
    );
}

#[tokio::test]
async fn text_only_is_retried_and_billed() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:text-only]").await;
    assert_eq!(err.kind, CallErrorKind::NoImage);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    let usage = err.usage.unwrap();
    assert_eq!((usage.completion_tokens, usage.image_tokens), (42, 0));
    // Text out is $2.50/M on the flash model.
    let text_cost = Decimal::from(42) * Decimal::new(250, 2) / Decimal::from(1_000_000);
    assert_eq!(
        usage.cost_usd,
        flash_input_cost(usage.prompt_tokens) + text_cost
    );
    assert_eq!(usage.cost_usd, server.billed_usd());
    assert_eq!(
        err.to_string(),
        "openrouter: no image in the answer (finish_reason stop, native_finish_reason STOP): I \
         can describe the image instead: a calm, wide scene in soft morning light, with muted \
         colours and a clear horizon."
    );
}

#[tokio::test]
async fn whitespace_then_eof_is_retried() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(50),
        pad_interval: Duration::from_millis(5),
        ..FakeConfig::default()
    })
    .await;
    let err = fail(&server, "a lake [fault:whitespace-eof]").await;
    assert_eq!(err.kind, CallErrorKind::EmptyBody);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!(err.http_status, Some(200));
    assert_eq!(err.usage, None);
    assert!(err.generation_id.is_some(), "the header carried it");
    assert_eq!(
        err.to_string(),
        "openrouter: the answer ended after keep-alive padding, with no JSON (upstream died)"
    );
}

#[tokio::test]
async fn an_image_that_is_not_an_image_is_retried_and_billed() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:not-an-image]").await;
    assert_eq!(err.kind, CallErrorKind::BadImage);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!(err.http_status, Some(200));
    let usage = err.usage.expect("the answer carried its usage");
    assert_eq!(usage.image_tokens, 1290);
    assert_eq!(usage.cost_usd, server.billed_usd());
    assert!(err.generation_id.is_some());
    assert_eq!(
        err.to_string(),
        "openrouter: image 1 of the answer: image bytes are not PNG, JPEG, WebP or GIF (they \
         start with 3c68746d6c3e3c62), labelled image/png"
    );
    assert_eq!(server.successes(), 0);
}

#[tokio::test]
async fn a_body_cut_mid_json_is_retried() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:cut]").await;
    assert_eq!(err.kind, CallErrorKind::MalformedBody);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!(err.http_status, Some(200));
    assert_eq!(err.usage, None);
    let text = err.to_string();
    assert!(text.starts_with("openrouter: malformed answer ("), "{text}");
    assert!(
        text.contains(" bytes): EOF while parsing a string at line 1 column "),
        "{text}"
    );
    assert_eq!(server.billed_usd(), Decimal::ZERO);
}

#[tokio::test]
async fn a_connection_dropped_mid_body_is_retried() {
    let server = fake().await;
    let err = fail(&server, "a lake [fault:reset]").await;
    assert_eq!(err.kind, CallErrorKind::BodyRead);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!(err.http_status, Some(200));
    assert!(err.generation_id.is_some());
    assert!(
        err.to_string()
            .starts_with("openrouter: connection broke while reading the answer: "),
        "{err}"
    );
}

#[tokio::test]
async fn a_call_outlasting_the_deadline_fails_though_padding_keeps_coming() {
    let server = fake_with(FakeConfig {
        pad_interval: Duration::from_millis(10),
        ..FakeConfig::default()
    })
    .await;
    let client = Client::new(Config {
        deadline: Duration::from_millis(300),
        ..config(&server)
    })
    .unwrap();
    let err = client
        .generate(&request("a lake [fault:slow=1h]"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Deadline);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!(err.http_status, Some(200), "the 200 came early");
    assert!(err.generation_id.is_some());
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: no complete answer within the 300ms deadline"
    );
    assert_eq!(server.successes(), 0);
}

#[tokio::test]
async fn the_pro_model_gets_the_slow_deadline() {
    let server = fake().await;
    let client = Client::new(Config {
        deadline: Duration::from_millis(200),
        slow_deadline: Duration::from_secs(600),
        ..config(&server)
    })
    .unwrap();
    let mut req = request("a lake [fault:slow=400ms]");
    req.model = imagegen::openrouter::models::PRO_IMAGE.to_owned();
    let generation = client.generate(&req).await.unwrap();
    assert_eq!(generation.images.len(), 1);
    req.model = imagegen::openrouter::models::FLASH_IMAGE.to_owned();
    let err = client.generate(&req).await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Deadline);
}

#[tokio::test]
async fn an_oversized_body_fails_cleanly_and_permanently() {
    let server = fake_with(FakeConfig {
        oversize_bytes: 3 * 1024 * 1024,
        ..FakeConfig::default()
    })
    .await;
    let client = Client::new(Config {
        max_body_bytes: 2 * 1024 * 1024,
        ..config(&server)
    })
    .unwrap();
    let err = client
        .generate(&request("a lake [fault:oversize]"))
        .await
        .unwrap_err();
    assert_eq!(err.kind, CallErrorKind::BodyTooLarge);
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(err.http_status, Some(200));
    assert_eq!(err.usage, None);
    assert_eq!(
        err.to_string(),
        "openrouter: answer larger than the 2097152-byte cap (OPENROUTER_MAX_BODY_BYTES)"
    );
    // The same client still works for answers under the cap.
    client.generate(&request("a lake")).await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::new(Config::new(format!("http://{addr}/api/v1"), KEY)).unwrap();
    let err = client.generate(&request("a lake")).await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::Transport);
    assert_eq!(err.class(), ErrorClass::Transient { after: None });
    assert_eq!((err.http_status, err.usage), (None, None));
    assert!(
        err.to_string()
            .starts_with("openrouter: could not connect: "),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_aspect_ratio_is_refused_before_any_call() {
    let server = fake().await;
    let mut req = request("a lake");
    req.aspect_ratio = "1.91:1".to_owned();
    let err = client(&server).generate(&req).await.unwrap_err();
    assert_eq!(err.kind, CallErrorKind::InvalidRequest);
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!((err.http_status, err.usage), (None, None));
    assert_eq!(
        err.to_string(),
        "openrouter: aspect ratio \"1.91:1\" is not one of 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, \
         9:16, 16:9, 21:9"
    );
    assert_eq!(server.calls(), 0, "nothing was sent");
}

#[tokio::test]
async fn failing_twice_then_succeeding_bills_each_attempt_once() {
    let server = fake().await;
    let prompt = "a lake [fault:choice-errorx2]";
    let client = client(&server);
    let mut recorded = Decimal::ZERO;
    for _ in 0..2 {
        let err = client.generate(&request(prompt)).await.unwrap_err();
        assert_eq!(err.kind, CallErrorKind::ChoiceError);
        recorded += err.usage.map_or(Decimal::ZERO, |u: Usage| u.cost_usd);
    }
    let generation = client.generate(&request(prompt)).await.unwrap();
    recorded += generation.usage.cost_usd;
    assert_eq!(server.calls_for(prompt), 3);
    assert_eq!(server.successes(), 1);
    assert_eq!(recorded, server.billed_usd());
}

#[tokio::test]
async fn every_status_fault_works_in_the_counted_form() {
    let server = fake().await;
    let client = client(&server);
    for code in [400, 401, 402, 403, 408, 429, 500, 502, 503, 524, 529] {
        let prompt = format!("a lake [fault:{code}x1]");
        let err = client.generate(&request(&prompt)).await.unwrap_err();
        assert_eq!(err.http_status, Some(code));
        client.generate(&request(&prompt)).await.unwrap();
        assert_eq!(server.calls_for(&prompt), 2);
    }
}
