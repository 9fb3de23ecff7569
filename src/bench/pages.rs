//! The `pages` scenario: the dashboard's pages through the real router over a real socket, with
//! a million finished jobs in the table (the growth fixture: 100 batches of 10,000, 2 % failed),
//! each succeeded job with an image row and a `thumb` rendition row, so a gallery page joins what
//! it joins in production. Each page is timed over several requests (median and p95, measured at
//! the client over loopback, so a little above the server's own time).
//!
//! The overview's whole-table figures are cached for a few seconds and refreshed in the
//! background (see `http::pages`): the first overview pays the grouped scan, the others do not;
//! both are shown. No index is added for the pages, so claims are unchanged.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{BenchArgs, BenchDb, Report, Row, insert_history, ms, percentile, progress, thousands};
use crate::http::auth::Auth;
use crate::http::{self, HttpState};
use crate::queue::Queue;

/// Requests per timed page.
const SAMPLES: usize = 15;
/// The overview and a batch page must answer within this (median).
pub const TARGET_PAGE_P50: Duration = Duration::from_millis(200);

async fn get(client: &reqwest::Client, url: &str) -> anyhow::Result<(Duration, usize)> {
    let started = Instant::now();
    let body = client
        .get(url)
        .send()
        .await?
        .error_for_status()
        .with_context(|| url.to_owned())?
        .bytes()
        .await?;
    Ok((started.elapsed(), body.len()))
}

async fn time(client: &reqwest::Client, url: &str) -> anyhow::Result<(Duration, Duration, usize)> {
    get(client, url).await?;
    let mut took = Vec::with_capacity(SAMPLES);
    let mut size = 0;
    for _ in 0..SAMPLES {
        let (d, n) = get(client, url).await?;
        took.push(d);
        size = n;
    }
    took.sort();
    Ok((percentile(&took, 0.5), percentile(&took, 0.95), size))
}

/// Image rows and `thumb` rendition rows for every succeeded history job (bench fixture).
async fn insert_images(url: &str) -> anyhow::Result<()> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let mut conn = sqlx::ConnectOptions::connect(&options).await?;
    sqlx::query(
        "INSERT INTO imagegen.images (job_id, idx, key, url, content_type, bytes, width, height, \
             sha256, placeholder) \
         SELECT id, 0, 'history/' || id || '-0.png', 'file:///history/' || id || '-0.png', \
             'image/png', 1200000, 1344, 768, md5(id::text) || md5(id::text), \
             '3OcRJYB4d3h/iIeHeEh3eIhw+j3A' \
         FROM imagegen.jobs WHERE state = 'succeeded'",
    )
    .execute(&mut conn)
    .await
    .context("inserting image rows")?;
    sqlx::query(
        "INSERT INTO imagegen.renditions (job_id, idx, spec, key, url, content_type, bytes, \
             width, height, sha256) \
         SELECT job_id, 0, 'thumb', 'history/' || job_id || '-0.thumb.webp', \
             'file:///history/' || job_id || '-0.thumb.webp', 'image/webp', 12000, 480, 274, \
             md5(job_id::text || 't') || md5(job_id::text) \
         FROM imagegen.images",
    )
    .execute(&mut conn)
    .await
    .context("inserting rendition rows")?;
    for t in ["images", "renditions"] {
        sqlx::query(&format!("VACUUM (ANALYZE) imagegen.{t}"))
            .execute(&mut conn)
            .await?;
    }
    Ok(())
}

pub(super) async fn pages_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    progress(
        args,
        format!(
            "pages: inserting {} finished jobs, their attempts, images and thumbnails",
            thousands(args.history as f64)
        ),
    );
    bench.fresh(2).await?.close().await;
    insert_history(&bench.url, args.history).await?;
    insert_images(&bench.url).await?;
    let pool = crate::db::connect(&bench.url, 8).await?;
    let queue = Queue::new(pool.clone());

    // The grouped scan the overview caches, timed on its own.
    let started = Instant::now();
    queue.table_totals().await?;
    let scan = started.elapsed();

    let (listener, _) =
        http::bind("127.0.0.1:0".parse()?, &http::auth::AuthArgs::default()).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let router = http::router(HttpState::new(queue, None, Auth::open()));
    let server = tokio::spawn(http::serve(listener, router, stop.clone()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;

    let mut rows = Vec::new();
    let mut out = Vec::new();
    // The first overview of a fresh server computes the whole-table figures.
    progress(args, "pages: first overview");
    let (cold, _) = get(&client, &format!("{base}/")).await?;
    rows.push(Row::info(
        "GET / first (whole-table figures computed)",
        format!("{} ms", ms(cold)),
    ));
    rows.push(Row::info(
        "the grouped scan alone (counts, spend per batch)",
        format!("{} ms", ms(scan)),
    ));
    // A mid-batch cursor: the middle job of history-7 in file order (the 5,000th at full size).
    let batch_jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs WHERE batch = 'history-7'")
            .fetch_one(&pool)
            .await?;
    let mid: i64 = sqlx::query_scalar(
        "SELECT id FROM imagegen.jobs WHERE batch = 'history-7' ORDER BY batch_seq NULLS LAST, id \
         OFFSET $1 LIMIT 1",
    )
    .bind(batch_jobs / 2)
    .fetch_optional(&pool)
    .await?
    .context("the pages fixture holds no history-7 batch: --history must be at least 8")?;
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM imagegen.jobs WHERE batch = 'history-7' ORDER BY id LIMIT 60",
    )
    .fetch_all(&pool)
    .await?;
    let batch_label = format!(
        "GET /batches/history-7 ({} jobs, first 60 tiles)",
        thousands(batch_jobs as f64)
    );
    let pages: [(&str, String, bool); 8] = [
        ("GET / (overview, figures cached)", "/".to_owned(), true),
        (
            "GET /live/overview (its live update)",
            "/live/overview".to_owned(),
            false,
        ),
        (batch_label.as_str(), "/batches/history-7".to_owned(), true),
        (
            "GET /batches/history-7, page from the middle",
            format!("/batches/history-7?after=n-{mid}"),
            true,
        ),
        (
            "GET /batches/history-7?state=failed",
            "/batches/history-7?state=failed".to_owned(),
            true,
        ),
        (
            "GET /live/batches/history-7 (60 tiles)",
            format!("/live/batches/history-7?ids={}", ids.join(",")),
            false,
        ),
        ("GET /jobs (search, newest 50)", "/jobs".to_owned(), false),
        (
            "GET /jobs?state=failed",
            "/jobs?state=failed".to_owned(),
            false,
        ),
    ];
    for (label, path, target) in pages {
        progress(args, format!("pages: {label}"));
        let (p50, p95, size) = time(&client, &format!("{base}{path}")).await?;
        let (t, verdict) = if target {
            (
                format!("p50 <= {} ms", TARGET_PAGE_P50.as_millis()),
                super::verdict_at_most(ms(p50), ms(TARGET_PAGE_P50)),
            )
        } else {
            (String::new(), String::new())
        };
        rows.push(Row {
            measure: label.to_owned(),
            figure: format!(
                "p50 {} ms, p95 {} ms ({} KB)",
                ms(p50),
                ms(p95),
                size / 1000
            ),
            target: t,
            verdict,
        });
        out.push(
            json!({"page": label, "path": path, "p50_ms": ms(p50), "p95_ms": ms(p95),
            "bytes": size}),
        );
    }
    rows.push(Row::info(
        "indexes added on imagegen.jobs for the pages",
        "none (claims write no more than before)",
    ));
    stop.cancel();
    server.await??;
    pool.close().await;
    Ok(Report {
        scenario: "pages",
        title: format!(
            "Dashboard pages through the router over loopback with {} finished jobs in the table \
             (100 batches, 2 % failed, each succeeded job with an image and a thumbnail row); \
             median and p95 of {SAMPLES} requests each",
            thousands(args.history as f64)
        ),
        rows,
        json: json!({
            "scenario": "pages",
            "history": args.history,
            "first_overview_ms": ms(cold),
            "grouped_scan_ms": ms(scan),
            "pages": out,
        }),
    })
}
