//! The success path and the quirks of real answers the client must take in its stride.

use std::time::Duration;

use imagegen::image::ImageFormat;
use imagegen::openrouter::Generation;
use imagegen::openrouter::fake::FakeConfig;
use imagegen::openrouter::models::{self, ASPECT_RATIOS, FLASH_IMAGE, PRO_IMAGE};
use rust_decimal::Decimal;

use super::{client, fake, fake_with, request, sha256, succeed};

/// Per-token prices in USD from shared/openrouter.md.
fn per_million(usd: i64, scale: u32) -> Decimal {
    Decimal::new(usd, scale) / Decimal::from(1_000_000)
}

/// The image is what the stand-in served, byte for byte, and its cost what it billed.
fn assert_served(server: &imagegen::openrouter::fake::FakeServer, g: &Generation) {
    let served = server.served();
    let last = served.last().expect("the stand-in recorded the generation");
    let image = &g.images[0];
    assert_eq!(sha256(&image.bytes), last.sha256);
    assert_eq!(image.bytes.len(), last.bytes);
    assert_eq!(
        g.generation_id.as_deref(),
        Some(last.generation_id.as_str())
    );
    assert_eq!(g.usage.cost_usd, last.cost_usd);
}

#[tokio::test]
async fn a_success_carries_the_image_its_usage_and_its_id() {
    let server = fake().await;
    let g = succeed(&server, "A calm lake at dawn, blog header").await;
    assert_eq!(g.http_status, 200);
    assert_eq!((g.images.len(), g.discarded_images), (1, 0));
    let image = &g.images[0];
    assert_eq!(image.format, ImageFormat::Png);
    assert_eq!((image.width, image.height), (1344, 768));
    // About 1.2 MB, like a real flash image.
    assert!(
        (1_000_000..1_400_000).contains(&image.bytes.len()),
        "{}",
        image.bytes.len()
    );
    assert_eq!(g.usage.prompt_tokens, 8);
    assert_eq!(
        (g.usage.completion_tokens, g.usage.image_tokens),
        (1290, 1290)
    );
    assert_eq!(
        g.usage.cost_usd,
        Decimal::from(8) * per_million(30, 2) + Decimal::from(1290) * per_million(30, 0)
    );
    assert_served(&server, &g);
    assert_eq!(server.billed_usd(), g.usage.cost_usd);
}

#[tokio::test]
async fn each_answer_is_a_distinct_image() {
    let server = fake().await;
    let a = succeed(&server, "a lake").await;
    let b = succeed(&server, "a lake").await;
    assert_ne!(sha256(&a.images[0].bytes), sha256(&b.images[0].bytes));
    assert_eq!(server.calls_for("a lake"), 2);
}

#[tokio::test]
async fn every_aspect_ratio_has_its_pixel_size() {
    let server = fake_with(FakeConfig {
        image_bytes: 20_000,
        ..FakeConfig::default()
    })
    .await;
    let client = client(&server);
    let mut sizes = Vec::new();
    for ratio in ASPECT_RATIOS {
        let mut req = request("a lake");
        req.aspect_ratio = ratio.to_owned();
        let g = client.generate(&req).await.unwrap();
        sizes.push((g.images[0].width, g.images[0].height));
    }
    assert_eq!(
        sizes,
        [
            (1024, 1024),
            (832, 1248),
            (1248, 832),
            (864, 1184),
            (1184, 864),
            (896, 1152),
            (1152, 896),
            (768, 1344),
            (1344, 768),
            (1536, 672)
        ]
    );
}

#[tokio::test]
async fn the_pro_model_scales_with_image_size_and_is_priced_as_such() {
    let server = fake_with(FakeConfig {
        image_bytes: 20_000,
        ..FakeConfig::default()
    })
    .await;
    let client = client(&server);
    let mut req = request("A calm lake at dawn, blog header");
    req.model = PRO_IMAGE.to_owned();
    let mut got = Vec::new();
    for (size, image_tokens) in [("1K", 1120), ("2K", 1120), ("4K", 2000)] {
        req.image_size = Some(size.to_owned());
        let g = client.generate(&req).await.unwrap();
        let image = &g.images[0];
        got.push((image.width, image.height));
        // 240 reasoning tokens at the text price, the image at $120/M, the prompt at $2/M.
        assert_eq!(g.usage.image_tokens, image_tokens);
        assert_eq!(g.usage.completion_tokens, image_tokens + 240);
        assert_eq!(
            g.usage.cost_usd,
            Decimal::from(g.usage.prompt_tokens) * per_million(2, 0)
                + Decimal::from(240) * per_million(12, 0)
                + Decimal::from(image_tokens) * per_million(120, 0)
        );
        assert_served(&server, &g);
    }
    assert_eq!(got, [(1376, 768), (2752, 1536), (5504, 3072)]);
    // The flash model has no sizes: 4K is ignored, as the real one does.
    req.model = FLASH_IMAGE.to_owned();
    let g = client.generate(&req).await.unwrap();
    assert_eq!(
        Some((g.images[0].width, g.images[0].height)),
        models::dimensions(FLASH_IMAGE, "16:9", None)
    );
}

#[tokio::test]
async fn keep_alive_padding_before_the_json_is_skipped() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(200),
        pad_interval: Duration::from_millis(5),
        ..FakeConfig::default()
    })
    .await;
    let g = succeed(&server, "a lake").await;
    assert_served(&server, &g);
}

#[tokio::test]
async fn sse_comment_lines_before_the_json_are_skipped() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(100),
        pad_interval: Duration::from_millis(5),
        ..FakeConfig::default()
    })
    .await;
    let g = succeed(&server, "a lake [fault:sse-comments]").await;
    assert_served(&server, &g);
}

#[tokio::test]
async fn content_may_be_empty_null_text_or_an_array() {
    let server = fake().await;
    for quirk in [
        "",
        "[fault:content-null]",
        "[fault:content-text]",
        "[fault:content-array]",
    ] {
        let g = succeed(&server, &format!("a lake {quirk}")).await;
        assert_eq!(g.images[0].format, ImageFormat::Png, "{quirk}");
        assert_served(&server, &g);
    }
}

#[tokio::test]
async fn two_images_keep_the_last_one() {
    let server = fake().await;
    let g = succeed(&server, "a lake [fault:two-images]").await;
    assert_eq!((g.images.len(), g.discarded_images), (1, 1));
    // The stand-in records the final image (the preview differs from it).
    assert_served(&server, &g);
}

#[tokio::test]
async fn jpeg_bytes_labelled_png_are_taken_as_jpeg() {
    let server = fake().await;
    let g = succeed(&server, "a lake [fault:jpeg-as-png]").await;
    let image = &g.images[0];
    assert_eq!(image.format, ImageFormat::Jpeg);
    assert_eq!((image.width, image.height), (1344, 768));
    assert_eq!(server.served()[0].format, ImageFormat::Jpeg);
    assert_served(&server, &g);
}

#[tokio::test]
async fn one_client_serves_many_concurrent_calls() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(100),
        pad_interval: Duration::from_millis(20),
        image_bytes: 100_000,
        ..FakeConfig::default()
    })
    .await;
    let client = client(&server);
    let calls = (0..64).map(|i| {
        let client = client.clone();
        async move { client.generate(&request(&format!("lake {i}"))).await }
    });
    let results = futures::future::join_all(calls).await;
    let mut ids: Vec<String> = results
        .into_iter()
        .map(|r| r.unwrap().generation_id.unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 64);
    assert_eq!(server.successes(), 64);
}

/// `generate_held`'s `answered` runs when the answer proper starts, after the keep-alive
/// padding and before the body permit is waited for (so the worker's call slot goes back while
/// the answer waits for memory), and never for an error answer.
#[tokio::test]
async fn answered_runs_when_the_answer_starts_not_when_its_body_is_read() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(300),
        pad_interval: Duration::from_millis(50),
        ..FakeConfig::default()
    })
    .await;
    let mut config = super::config(&server);
    config.max_concurrent_bodies = 1;
    let client = imagegen::openrouter::Client::new(config).unwrap();

    // The first answer keeps the only body permit while it is held.
    let first = client
        .generate_held(&request("a heron"), || {})
        .await
        .unwrap();
    assert!(first.body_permit.is_some());
    let answered = Arc::new(AtomicBool::new(false));
    let second = {
        let (client, answered) = (client.clone(), answered.clone());
        tokio::spawn(async move {
            client
                .generate_held(&request("a crane"), move || {
                    answered.store(true, Ordering::SeqCst)
                })
                .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !answered.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second answer started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second answer waits for the body permit the first holds"
    );
    drop(first);
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.images.len(), 1);
    // The second answer's permit goes back too, or the error answer below waits for it.
    drop(second);

    let errored = Arc::new(AtomicBool::new(false));
    let e = errored.clone();
    let err = client
        .generate_held(&request("a lake [fault:500]"), move || {
            e.store(true, Ordering::SeqCst)
        })
        .await
        .unwrap_err();
    assert_eq!(err.http_status, Some(500));
    assert!(!errored.load(Ordering::SeqCst), "an error is no answer");
}

/// An answer that has started is paid for: the time it then waits for a body permit (other
/// answers hold them all) is this process's queue, not the provider's, and must not run out the
/// call's deadline, or the image is thrown away and paid for again.
#[tokio::test]
async fn waiting_for_a_body_permit_does_not_run_out_the_deadline() {
    let server = fake_with(FakeConfig {
        latency: Duration::from_millis(200),
        ..FakeConfig::default()
    })
    .await;
    let mut config = super::config(&server);
    config.max_concurrent_bodies = 1;
    config.deadline = Duration::from_secs(1);
    let client = imagegen::openrouter::Client::new(config).unwrap();

    let first = client
        .generate_held(&request("a heron"), || {})
        .await
        .unwrap();
    let second = {
        let client = client.clone();
        tokio::spawn(async move { client.generate_held(&request("a crane"), || {}).await })
    };
    // Held for twice the deadline: the second answer arrives and waits all that time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !second.is_finished(),
        "the second answer waits for the permit"
    );
    drop(first);
    let second = second.await.unwrap();
    let second = second.unwrap_or_else(|e| panic!("the waiting answer was dropped: {e}"));
    assert_eq!(second.images.len(), 1);
    assert_eq!(server.successes(), 2, "each image paid for once");
}
