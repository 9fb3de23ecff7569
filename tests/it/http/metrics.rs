//! `/metrics` of a live `imagegen worker --http` process after it ran jobs against the stand-in:
//! `promtool check metrics` accepts it, and the counters match the jobs tables. Also the shipped
//! alert rules (`promtool check rules`) and Grafana dashboard, which must only name metrics the
//! binary exports.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use imagegen::openrouter::fake::{FakeConfig, FakeServer};
use imagegen::queue::{NewJob, Queue};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::{pool, wait_until};

const KEY: &str = "sk-or-test-metrics-key";

/// promtool: from `IMAGEGEN_PROMTOOL` (scripts/test sets it) or the PATH.
fn promtool() -> String {
    std::env::var("IMAGEGEN_PROMTOOL").unwrap_or_else(|_| "promtool".to_owned())
}

/// Samples of an exposition: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn value(s: &HashMap<String, String>, key: &str) -> Decimal {
    let v = s.get(key).unwrap_or_else(|| panic!("{key} missing"));
    v.parse().unwrap_or_else(|_| panic!("{key} = {v}"))
}

#[sqlx::test(migrator = "imagegen::MIGRATOR")]
async fn a_live_worker_exports_valid_metrics_that_match_the_tables(
    _p: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 5).await;
    let fake = FakeServer::start(FakeConfig {
        latency: Duration::from_millis(50),
        image_bytes: 20_000,
        api_key: Some(KEY.into()),
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    let mut jobs = Vec::new();
    for i in 0..12 {
        let marker = match i % 6 {
            0 => " [fault:503x1]",
            1 => " [fault:400]",
            _ => "",
        };
        jobs.push(NewJob {
            prompt: format!("metrics {i}{marker}"),
            ..NewJob::default()
        });
    }
    Queue::new(db.clone()).enqueue_many(&jobs).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://postgres@{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["worker", "--http", "127.0.0.1:0", "--concurrency", "4"])
        .args([
            "--poll-interval",
            "200ms",
            "--retry-base",
            "50ms",
            "--retry-cap",
            "100ms",
        ])
        .env("DATABASE_URL", &url)
        .env("OPENROUTER_BASE_URL", fake.base_url())
        .env("OPENROUTER_API_KEY", KEY)
        .env("IMAGEGEN_STORAGE", dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let base = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            if let Some(addr) = line.unwrap().strip_prefix("listening on ") {
                return addr.to_owned();
            }
        }
        panic!("the worker never said where it listens");
    })
    .await
    .unwrap();

    wait_until(Duration::from_secs(120), "every job to finish", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM imagegen.jobs WHERE state IN ('pending', 'running')",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        left == 0
    })
    .await;

    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let s = samples(&text);
    let flash = "google/gemini-2.5-flash-image";
    let outcomes: Vec<(String, i64)> =
        sqlx::query_as("SELECT outcome, count(*) FROM imagegen.attempts GROUP BY outcome")
            .fetch_all(&db)
            .await
            .unwrap();
    assert!(outcomes.iter().any(|(o, _)| o == "retry"), "{outcomes:?}");
    assert!(outcomes.iter().any(|(o, _)| o == "failed"), "{outcomes:?}");
    for (outcome, n) in &outcomes {
        let key = format!("imagegen_attempts_total{{model=\"{flash}\",outcome=\"{outcome}\"}}");
        assert_eq!(value(&s, &key), Decimal::from(*n), "{key}");
    }
    let billed: Decimal =
        sqlx::query_scalar("SELECT COALESCE(sum(cost_usd), 0) FROM imagegen.attempts")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(billed > Decimal::ZERO);
    assert_eq!(
        value(&s, &format!("imagegen_cost_usd_total{{model=\"{flash}\"}}")),
        billed
    );
    let images: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.images")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(value(&s, "imagegen_images_total"), Decimal::from(images));
    assert_eq!(images, 10);
    let calls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.attempts WHERE http_status IS NOT NULL")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(
        value(
            &s,
            &format!("imagegen_call_duration_seconds_count{{model=\"{flash}\"}}")
        ),
        Decimal::from(calls)
    );
    assert_eq!(value(&s, "imagegen_in_flight"), Decimal::ZERO);
    assert_eq!(value(&s, "imagegen_paused{reason=\"halt\"}"), Decimal::ZERO);
    assert_eq!(value(&s, "imagegen_storage_errors_total"), Decimal::ZERO);
    assert_eq!(
        value(
            &s,
            &format!(
                "imagegen_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Decimal::ONE
    );
    assert_eq!(
        value(&s, "imagegen_queue_jobs{state=\"succeeded\"}"),
        Decimal::from(10)
    );
    assert_eq!(
        value(&s, "imagegen_queue_jobs{state=\"failed\"}"),
        Decimal::from(2)
    );
    assert_eq!(value(&s, "imagegen_queue_spend_today_usd"), billed);
    assert!(!text.contains(KEY), "the API key leaked into /metrics");

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the worker and its server stop cleanly on SIGTERM"
    );
}

/// Metric names a text mentions (`imagegen_...`), without histogram suffixes.
fn names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("imagegen_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_count"))
            .or_else(|| name.strip_suffix("_sum"))
            .unwrap_or(name);
        // `imagegen_queue_*` in a comment names a family, not a metric.
        if !name.ends_with('_') {
            out.push(name.to_owned());
        }
        rest = &tail[end..];
    }
    out
}

const EXPORTED: &[&str] = &[
    imagegen::metrics::ATTEMPTS_TOTAL,
    imagegen::metrics::CALL_DURATION_SECONDS,
    imagegen::metrics::COST_USD_TOTAL,
    imagegen::metrics::IMAGES_TOTAL,
    imagegen::metrics::IN_FLIGHT,
    imagegen::metrics::PAUSED,
    imagegen::metrics::STORAGE_ERRORS_TOTAL,
    imagegen::metrics::BUILD_INFO,
    "imagegen_queue_jobs",
    "imagegen_queue_oldest_pending_seconds",
    "imagegen_queue_spend_today_usd",
    "imagegen_queue_budget_remaining_usd",
];

#[test]
fn the_shipped_alerts_and_dashboard_are_valid_and_name_real_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let rules = format!("{root}/deploy/prometheus/alerts.yml");
    let out = Command::new(promtool())
        .args(["check", "rules", &rules])
        .output()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let alerts = std::fs::read_to_string(&rules).unwrap();
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/imagegen.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard parses");
    assert!(!parsed["panels"].as_array().unwrap().is_empty());
    for (what, text) in [("alerts.yml", &alerts), ("imagegen.json", &dashboard)] {
        let names = names_in(text);
        assert!(!names.is_empty(), "{what} names no metric");
        for n in names {
            assert!(
                EXPORTED.contains(&n.as_str()),
                "{what} uses {n}, which is not exported"
            );
        }
    }
    for alert in [
        "ImagegenWorkerPaused",
        "ImagegenQueueLag",
        "ImagegenDailyBudgetNearlySpent",
        "ImagegenErrorRate",
    ] {
        assert!(alerts.contains(alert), "{alert} missing");
    }
}
