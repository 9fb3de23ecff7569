//! The storage suite: each function is one test, run against both backends by `suite_tests!`.

use std::time::Duration;

use imagegen::error::{Classify, ErrorClass};
use imagegen::image::ImageFormat;
use imagegen::storage::{ObjectMeta, StorageError, validate_key};

use super::fixture::{Fixture, Kind, S3, fetch, random_png, small_png};

fn meta(job_id: i64) -> ObjectMeta {
    ObjectMeta {
        job_id,
        model: "google/gemini-2.5-flash-image".into(),
        batch: Some("round trip".into()),
    }
}

pub async fn a_2mb_png_round_trips_byte_identical_with_its_content_type(fx: Fixture) {
    let image = random_png(724, 1);
    assert!(image.bytes.len() >= 2_000_000, "{}", image.bytes.len());
    let key = fx
        .storage
        .key_for(Some("round trip"), 7, 0, ImageFormat::Png);
    assert_eq!(key, "round-trip/7-0.png");

    let stored = fx.storage.put(&key, &image, &meta(7)).await.unwrap();
    assert_eq!(stored.key, key);
    assert_eq!(stored.bytes, image.bytes.len() as u64);
    assert_eq!(stored.content_type, "image/png");

    let back = fx.storage.get(&key).await.unwrap();
    assert!(back == image.bytes, "read-back differs");

    let info = fx.storage.head(&key).await.unwrap();
    assert_eq!(info.content_type.as_deref(), Some("image/png"));
    assert_eq!(info.bytes, image.bytes.len() as u64);

    // The URL the `imagegen url` command hands out serves the same bytes.
    let presigned = fx
        .storage
        .presign_get(&key, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(
        fetch(&presigned).await == image.bytes,
        "presigned read differs"
    );
    let from_row = fx
        .storage
        .presign_recorded_url(&stored.url, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        fetch(&from_row).await == image.bytes,
        "presigned read differs"
    );

    let full = fx.full_key(&key);
    match fx.kind {
        Kind::S3 => assert_eq!(
            stored.url,
            format!("{}/{}/{full}", S3.endpoint, S3.bucket),
            "path-style object URL"
        ),
        Kind::Local => {
            assert!(stored.url.starts_with("file:///"), "{}", stored.url);
            assert!(stored.url.ends_with(&full), "{}", stored.url);
            assert!(fetch(&stored.url).await == image.bytes);
        }
    }
    assert_eq!(fx.storage.key_from_url(&stored.url).as_deref(), Some(&*key));
}

pub async fn the_same_job_uploaded_twice_leaves_one_object(fx: Fixture) {
    let key = fx.storage.key_for(Some("retry"), 11, 0, ImageFormat::Png);
    let first = small_png(1);
    let second = small_png(2);
    assert_ne!(first.bytes, second.bytes);
    fx.storage.put(&key, &first, &meta(11)).await.unwrap();
    // The retry computes the same key and overwrites.
    let again = fx.storage.key_for(Some("retry"), 11, 0, ImageFormat::Png);
    assert_eq!(again, key);
    fx.storage.put(&again, &second, &meta(11)).await.unwrap();

    assert_eq!(
        fx.outer.list("").await.unwrap(),
        vec![format!("inside/{key}")]
    );
    assert_eq!(fx.storage.get(&key).await.unwrap(), second.bytes);
}

pub async fn keys_from_hostile_batch_names_stay_inside_the_prefix(fx: Fixture) {
    let hostile = [
        "../../../../etc",
        "..",
        "/absolute/path",
        "a/../../b",
        "..\\..\\windows",
        "%2e%2e%2f%2e%2e",
        "x\0y",
        "line\nbreak",
        "😀 emoji",
        "名前",
        "a//b///c",
        "7-0.png",
        "   ",
        "",
        &"long/".repeat(100),
    ];
    let mut keys = Vec::new();
    for (i, batch) in hostile.iter().enumerate() {
        let job_id = i as i64 + 1;
        let key = fx.storage.key_for(Some(batch), job_id, 0, ImageFormat::Png);
        assert!(validate_key(&key).is_ok(), "{batch:?} gave {key:?}");
        assert!(
            key.ends_with(&format!("{job_id}-0.png")),
            "{batch:?} gave {key:?}"
        );
        fx.storage
            .put(&key, &small_png(job_id as u64), &meta(job_id))
            .await
            .unwrap();
        keys.push(key);
    }

    // Everything that landed under the parent landed inside the root, under its own key.
    let outside = fx.outer.list("").await.unwrap();
    assert_eq!(outside.len(), hostile.len(), "{outside:?}");
    for k in &outside {
        assert!(k.starts_with("inside/"), "{k} escaped the root");
    }
    let mut inside = fx.storage.list("").await.unwrap();
    inside.sort();
    keys.sort();
    assert_eq!(inside, keys);
}

pub async fn invalid_keys_are_refused_before_touching_storage(fx: Fixture) {
    for key in [
        "../escape.png",
        "/abs.png",
        "a//b.png",
        "a/./b.png",
        "sp ace.png",
        "",
    ] {
        let err = fx
            .storage
            .put(key, &small_png(3), &meta(3))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidKey { .. }),
            "{key:?}: {err}"
        );
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert!(fx.storage.get(key).await.is_err());
    }
    assert_eq!(fx.outer.list("").await.unwrap(), Vec::<String>::new());
}

pub async fn the_startup_check_passes_and_leaves_nothing_behind(fx: Fixture) {
    fx.storage.check().await.unwrap();
    fx.storage.check().await.unwrap();
    assert_eq!(fx.outer.list("").await.unwrap(), Vec::<String>::new());
}

pub async fn the_startup_check_catches_a_bad_location(fx: Fixture) {
    let (name, outcome) = fx.open_and_check_a_bad_location().await;
    let err = outcome.expect_err("a bad location must fail the startup check");
    assert_eq!(err.class(), ErrorClass::Halt, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&name), "{msg} must name {name}");
    assert!(
        msg.contains(&fx.where_()),
        "{msg} must name {}",
        fx.where_()
    );
    if fx.kind == Kind::S3 {
        assert!(matches!(err, StorageError::NoSuchBucket { .. }), "{err:?}");
    }
}

pub async fn a_public_base_url_is_recorded_and_maps_back_to_the_key(fx: Fixture) {
    let storage = fx
        .reopen(
            fx.config
                .clone()
                .with_public_base_url("https://cdn.example.com/img/"),
        )
        .await;
    let key = storage.key_for(None, 5, 1, ImageFormat::Png);
    assert_eq!(key, "5-1.png");
    let stored = storage.put(&key, &small_png(5), &meta(5)).await.unwrap();
    assert_eq!(
        stored.url,
        format!("https://cdn.example.com/img/{}", fx.full_key(&key))
    );
    assert_eq!(
        storage.key_from_url(&stored.url).as_deref(),
        Some("5-1.png")
    );
    assert_eq!(
        storage.key_from_url("https://elsewhere.example/5-1.png"),
        None
    );
    let err = storage
        .presign_recorded_url("https://elsewhere.example/5-1.png", Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent);
}

pub async fn a_missing_object_is_permanent_not_found(fx: Fixture) {
    for err in [
        fx.storage.get("nothing/1-0.png").await.unwrap_err(),
        fx.storage.head("nothing/1-0.png").await.unwrap_err(),
    ] {
        assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
        assert_eq!(err.class(), ErrorClass::Permanent);
    }
    // Deleting what is not there is not an error (a retried cleanup must succeed).
    fx.storage.delete("nothing/1-0.png").await.unwrap();
}

pub async fn concurrent_uploads_through_one_shared_storage_all_land(fx: Fixture) {
    const JOBS: i64 = 32;
    let uploads = (0..JOBS).map(|job| {
        let storage = fx.storage.clone();
        tokio::spawn(async move {
            let key = storage.key_for(Some("many"), job, 0, ImageFormat::Png);
            storage.put(&key, &small_png(job as u64), &meta(job)).await
        })
    });
    for r in futures::future::join_all(uploads).await {
        r.unwrap().unwrap();
    }
    assert_eq!(fx.storage.list("many/").await.unwrap().len(), JOBS as usize);
}
