//! Local-directory details the suite cannot see through the storage API: temporary files, the
//! directory layout, `file://` locations.

use std::path::Path;

use imagegen::error::{Classify, ErrorClass};
use imagegen::image::ImageFormat;
use imagegen::storage::{ObjectMeta, Storage, StorageConfig};

use super::fixture::small_png;

/// Every entry under `dir`, hidden ones included, relative and sorted.
fn everything_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().to_str().unwrap().to_owned());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn writes_leave_only_the_final_files_in_a_nested_new_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("not/yet/there");
    let storage = Storage::open(&StorageConfig::new(root.to_str().unwrap()))
        .await
        .unwrap();
    let meta = ObjectMeta {
        job_id: 3,
        model: "m".into(),
        batch: Some("b".into()),
    };
    let key = storage.key_for(Some("b"), 3, 0, ImageFormat::Png);
    for seed in 0..3 {
        storage.put(&key, &small_png(seed), &meta).await.unwrap();
    }
    storage.check().await.unwrap();
    assert_eq!(
        everything_under(&root),
        vec![".imagegen-probe", "b", "b/3-0.png"]
    );
    assert_eq!(
        std::fs::read(root.join("b/3-0.png")).unwrap(),
        small_png(2).bytes
    );
}

#[tokio::test]
async fn a_file_url_location_is_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let loc = format!("file://{}/with%20space", dir.path().display());
    let storage = Storage::open(&StorageConfig::new(loc)).await.unwrap();
    let key = storage.key_for(None, 1, 0, ImageFormat::Png);
    let stored = storage
        .put(&key, &small_png(1), &ObjectMeta::default())
        .await
        .unwrap();
    assert!(dir.path().join("with space/1-0.png").is_file());
    assert!(
        stored.url.ends_with("/with%20space/1-0.png"),
        "{}",
        stored.url
    );
    assert_eq!(
        storage.key_from_url(&stored.url).as_deref(),
        Some("1-0.png")
    );
}

#[tokio::test]
async fn an_unsupported_scheme_halts_with_the_setting_named() {
    let err = Storage::open(&StorageConfig::new("gs://bucket/prefix"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Halt);
    assert!(err.to_string().contains("IMAGEGEN_STORAGE"), "{err}");
}
