//! The `api` scenario: `GET /api/v1/jobs` (and the other reads a dashboard or Prometheus makes)
//! through the real router over a real socket, with a million finished jobs in the table
//! (the growth scenario's fixture: 100 batches, 2 % failed). Each listing is timed over several
//! requests for a median and a p95; a walk follows the cursor through many pages.
//!
//! No index is added for the API: the figures show which listings the existing indexes serve
//! (state, batch, newest first) and which scan (a rare substring or metadata match over the whole
//! table), so a future index has a figure to beat.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{BenchArgs, BenchDb, Report, Row, insert_history, ms, percentile, progress, thousands};
use crate::http::auth::Auth;
use crate::http::{self, HttpState};
use crate::queue::Queue;

/// Requests per timed listing.
const SAMPLES: usize = 15;
/// Pages of the cursor walk.
const WALK_PAGES: usize = 100;
/// A listing served by an index should answer within this (median).
pub const TARGET_INDEXED_P50: Duration = Duration::from_millis(100);

struct Timing {
    p50: Duration,
    p95: Duration,
    jobs: usize,
}

async fn time(client: &reqwest::Client, url: &str, samples: usize) -> anyhow::Result<Timing> {
    let mut took = Vec::with_capacity(samples);
    let mut jobs = 0;
    // One uncounted request warms the connection and the plan cache.
    client.get(url).send().await?.error_for_status()?;
    for _ in 0..samples {
        let started = Instant::now();
        let body: Value = client
            .get(url)
            .send()
            .await?
            .error_for_status()
            .with_context(|| url.to_owned())?
            .json()
            .await?;
        took.push(started.elapsed());
        jobs = body["jobs"].as_array().map_or(0, Vec::len);
    }
    took.sort();
    Ok(Timing {
        p50: percentile(&took, 0.5),
        p95: percentile(&took, 0.95),
        jobs,
    })
}

pub(super) async fn api_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    progress(
        args,
        format!(
            "api: inserting {} finished jobs and their attempts",
            thousands(args.history as f64)
        ),
    );
    bench.fresh(2).await?.close().await;
    insert_history(&bench.url, args.history).await?;
    let pool = crate::db::connect(&bench.url, 8).await?;
    let queue = Queue::new(pool.clone());
    let (listener, _) = http::bind(
        "127.0.0.1:0".parse()?,
        &crate::http::auth::AuthArgs::default(),
    )
    .await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let router = http::router(HttpState::new(queue, None, Auth::open()));
    let server = tokio::spawn(http::serve(listener, router, stop.clone()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;

    // (label, query, served by an index)
    let listings: [(&str, &str, bool); 12] = [
        (
            "newest first, first page of 50",
            "/api/v1/jobs?limit=50",
            true,
        ),
        ("newest first, page of 500", "/api/v1/jobs?limit=500", true),
        ("state=failed (2 %)", "/api/v1/jobs?state=failed", true),
        ("state=pending (none)", "/api/v1/jobs?state=pending", true),
        ("batch (10,000 jobs)", "/api/v1/jobs?batch=history-7", true),
        (
            "batch, order=batch",
            "/api/v1/jobs?batch=history-7&order=batch",
            true,
        ),
        ("batch + q", "/api/v1/jobs?batch=history-7&q=job%2099", true),
        ("q, common substring", "/api/v1/jobs?q=HISTORY", true),
        (
            "q, one match (whole-table scan)",
            "/api/v1/jobs?q=job%20777777%25",
            false,
        ),
        (
            "metadata, no match (whole-table scan)",
            "/api/v1/jobs?metadata=%7B%22slug%22%3A%22x%22%7D",
            false,
        ),
        (
            "state=cancelled, none (whole-table scan)",
            "/api/v1/jobs?state=cancelled",
            false,
        ),
        (
            "created_after, none newer (whole-table scan)",
            "/api/v1/jobs?created_after=2100-01-01T00:00:00Z",
            false,
        ),
    ];
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for (label, path, indexed) in listings {
        progress(args, format!("api: {label}"));
        let t = time(&client, &format!("{base}{path}"), SAMPLES).await?;
        let (target, verdict) = if indexed {
            (
                format!("p50 <= {} ms", TARGET_INDEXED_P50.as_millis()),
                super::verdict_at_most(ms(t.p50), ms(TARGET_INDEXED_P50)),
            )
        } else {
            (String::new(), String::new())
        };
        rows.push(Row {
            measure: format!("GET {label}"),
            figure: format!(
                "p50 {} ms, p95 {} ms ({} jobs)",
                ms(t.p50),
                ms(t.p95),
                t.jobs
            ),
            target,
            verdict,
        });
        out.push(json!({"listing": label, "path": path, "indexed": indexed,
            "p50_ms": ms(t.p50), "p95_ms": ms(t.p95), "jobs": t.jobs}));
    }

    // Follow the cursor: every page costs the same however deep.
    progress(args, "api: cursor walk");
    let mut url = format!("{base}/api/v1/jobs?limit=500");
    let mut pages = Vec::with_capacity(WALK_PAGES);
    let mut seen = 0usize;
    for _ in 0..WALK_PAGES {
        let started = Instant::now();
        let body: Value = client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        pages.push(started.elapsed());
        seen += body["jobs"].as_array().map_or(0, Vec::len);
        match body["next"].as_str() {
            Some(c) => url = format!("{base}/api/v1/jobs?limit=500&cursor={c}"),
            None => break,
        }
    }
    let last = *pages.last().unwrap_or(&Duration::ZERO);
    pages.sort();
    ensure!(seen > 0, "the walk saw no jobs");
    rows.push(Row {
        measure: format!("cursor walk, {} pages of 500", pages.len()),
        figure: format!(
            "p50 {} ms, p95 {} ms, last page {} ms ({} jobs)",
            ms(percentile(&pages, 0.5)),
            ms(percentile(&pages, 0.95)),
            ms(last),
            thousands(seen as f64)
        ),
        target: format!("p50 <= {} ms", TARGET_INDEXED_P50.as_millis()),
        verdict: super::verdict_at_most(ms(percentile(&pages, 0.5)), ms(TARGET_INDEXED_P50)),
    });

    // What a dashboard and Prometheus read.
    let mut others = Vec::new();
    for (label, path) in [
        ("GET /api/v1/stats", "/api/v1/stats"),
        ("GET /api/v1/batches (100 batches)", "/api/v1/batches"),
        ("GET /api/v1/batches/history-7", "/api/v1/batches/history-7"),
    ] {
        progress(args, format!("api: {label}"));
        let t = time(&client, &format!("{base}{path}"), 5).await?;
        rows.push(Row::info(
            label,
            format!("p50 {} ms, p95 {} ms", ms(t.p50), ms(t.p95)),
        ));
        others.push(json!({"what": label, "p50_ms": ms(t.p50), "p95_ms": ms(t.p95)}));
    }
    // /metrics reads the queue at most every few seconds; time the read itself.
    let started = Instant::now();
    Queue::new(pool.clone()).queue_gauges().await?;
    let gauges = started.elapsed();
    rows.push(Row::info(
        "queue figures of /metrics (one uncached read)",
        format!("{} ms", ms(gauges)),
    ));

    stop.cancel();
    server.await??;
    pool.close().await;
    Ok(Report {
        scenario: "api",
        title: format!(
            "GET /api/v1/jobs through the router over loopback with {} finished jobs in the \
             table (100 batches, 2 % failed); median and p95 of {SAMPLES} requests each",
            thousands(args.history as f64)
        ),
        rows,
        json: json!({
            "scenario": "api",
            "history": args.history,
            "listings": out,
            "walk_pages": pages.len(),
            "walk_p50_ms": ms(percentile(&pages, 0.5)),
            "others": others,
            "queue_gauges_ms": ms(gauges),
        }),
    })
}
