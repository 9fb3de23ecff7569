//! `imagegen bench` end to end at toy sizes: every scenario runs against the real Postgres, the
//! real binary (child stand-in, CLI enqueue) and local storage, reports its figures, checks its
//! own outcome, and leaves no database behind. No timing is asserted: benchmarks are not tests.

use std::path::PathBuf;
use std::time::Duration;

use imagegen::bench::{BenchArgs, Report, Scenario, measure};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_at_toy_sizes_and_cleans_up() {
    let images = tempfile::tempdir().unwrap();
    let bench_database = format!("imagegen_bench_test_{}", std::process::id());
    let args = BenchArgs {
        scenario: Scenario::All,
        jobs: 300,
        concurrency: vec![4],
        repeat: 1,
        history: 2_000,
        wakeups: 5,
        latency: Duration::from_millis(100),
        rounds: 2,
        image_bytes: 20_000,
        model: imagegen::openrouter::models::FLASH_IMAGE.to_owned(),
        image_size: None,
        burst: true,
        no_thumbnail: false,
        in_flight_limit: None,
        storage: Some(images.path().display().to_string()),
        max_concurrent_bodies: None,
        in_process_stand_in: false,
        enqueue_rows: 1_000,
        imagegen_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_imagegen"))),
        bench_database: bench_database.clone(),
        json: true,
        rendition_jobs: 1,
        // A 4K source takes seconds per job in a debug build; the scenario is the same code.
        rendition_sources: vec![imagegen::bench::renditions::RenditionSource::OneK],
        batch_rows: 1_000,
    };
    let mut reports: Vec<Report> = Vec::new();
    measure(&database_url(), &args, |r| reports.push(r))
        .await
        .unwrap();

    let names: Vec<&str> = reports.iter().map(|r| r.scenario).collect();
    assert_eq!(
        names,
        [
            "queue",
            "growth",
            "wakeup",
            "pipeline",
            "enqueue",
            "api",
            "renditions",
            "batch",
            "prune",
            "pages"
        ]
    );
    let json = |name: &str| &reports.iter().find(|r| r.scenario == name).unwrap().json;

    // The documented key, a positive rate (each drain also checked every job succeeded once).
    assert!(json("queue")["jobs_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(json("queue")["runs"][0]["concurrency"], 4);
    assert!(json("growth")["runs"][0]["ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(json("wakeup")["samples"], 5);
    let pipeline = &json("pipeline")["runs"][0];
    assert_eq!(pipeline["jobs"], 8);
    assert_eq!(pipeline["not_succeeded"], 0);
    assert!(pipeline["efficiency"].as_f64().unwrap() > 0.0);
    assert!(
        pipeline["stand_in_cpu_s_per_job"].is_number(),
        "stand-in ran as a child"
    );
    assert!(json("enqueue")["cli_rows_per_s"].as_f64().unwrap() > 0.0);
    assert!(json("enqueue")["sql_rows_per_s"].as_f64().unwrap() > 0.0);
    // The API walk reads every one of the 2,000 history jobs, 500 a page.
    assert_eq!(json("api")["walk_pages"], 4);
    assert_eq!(json("api")["listings"].as_array().unwrap().len(), 12);
    // Both jobs, each a positive CPU figure, the second costing more than half the first.
    let renditions = json("renditions")["results"].as_array().unwrap();
    assert_eq!(renditions.len(), 1);
    assert_eq!(renditions[0]["width"], 1344);
    for r in renditions {
        assert!(r["thumb_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["og_thumb_ms"].as_f64().unwrap() > r["thumb_ms"].as_f64().unwrap() * 0.5);
    }
    assert_eq!(json("batch")["rows"], 1_000);
    assert!(json("batch")["submit_seconds"].as_f64().unwrap() > 0.0);
    for r in &reports {
        assert!(!r.rows.is_empty(), "{} printed no figures", r.scenario);
    }

    // Its own database is gone, and the images it stored where it was told are deleted.
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&bench_database)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the bench database must be dropped at the end");
    assert_eq!(
        files_under(images.path()),
        0,
        "the run's images are deleted after it"
    );
}

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { files_under(&p) } else { 1 })
        .sum()
}

#[tokio::test]
async fn a_database_that_is_not_a_bench_database_is_refused() {
    let args = BenchArgs {
        scenario: Scenario::Queue,
        bench_database: "imagegen".to_owned(),
        ..BenchArgs::default()
    };
    let err = measure(&database_url(), &args, |_| {}).await.unwrap_err();
    assert!(
        err.to_string().contains("must start with imagegen_bench"),
        "{err}"
    );
}
