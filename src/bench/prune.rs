//! The `prune` scenario: deleting a million finished jobs (the growth scenario's fixture, each
//! with an attempt row and an image row) with `imagegen prune`'s code, chunk by chunk, without
//! one giant transaction. The figures are the whole run's rate and the slowest chunk, which is
//! how long any one transaction holds its rows. Objects are not deleted here (their cost is the
//! storage's, one request per object, 16 in flight).

use std::time::{Duration, Instant};

use anyhow::ensure;
use serde_json::json;

use super::{BenchArgs, BenchDb, Report, Row, insert_history, progress, round, thousands};
use crate::prune::DEFAULT_CHUNK;
use crate::queue::{PruneFilter, Queue};

/// The slowest chunk (one transaction) must commit within this.
pub const TARGET_CHUNK_MAX: Duration = Duration::from_secs(2);

pub(super) async fn prune_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    progress(
        args,
        format!(
            "prune: inserting {} finished jobs, their attempts and images",
            thousands(args.history as f64)
        ),
    );
    bench.fresh(2).await?.close().await;
    insert_history(&bench.url, args.history).await?;
    let pool = crate::db::connect(&bench.url, 4).await?;
    sqlx::query(
        "INSERT INTO imagegen.images (job_id, idx, key, url, content_type, bytes, width, height, \
             sha256) \
         SELECT id, 0, 'history/' || id || '-0.png', image_urls[1], 'image/png', 1200000, 1344, \
             768, md5(id::text) FROM imagegen.jobs WHERE state = 'succeeded'",
    )
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM (ANALYZE) imagegen.images")
        .execute(&pool)
        .await?;
    let queue = Queue::new(pool.clone());
    let filter = PruneFilter {
        finished_before: Some(chrono::Utc::now()),
        batch: None,
        include_pending: false,
    };
    let count = queue.prune_count(&filter).await?;
    progress(
        args,
        format!("prune: deleting {} jobs", thousands(count.jobs as f64)),
    );
    let started = Instant::now();
    let mut last = Instant::now();
    let mut slowest = Duration::ZERO;
    let done = crate::prune::prune(&queue, None, &filter, DEFAULT_CHUNK, |_| {
        slowest = slowest.max(last.elapsed());
        last = Instant::now();
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM imagegen.jobs) + (SELECT count(*) FROM imagegen.images) \
             + (SELECT count(*) FROM imagegen.attempts)",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    ensure!(
        i64::try_from(done.jobs).ok() == Some(count.jobs) && left == 0,
        "prune deleted {} of {} jobs, {left} rows left",
        done.jobs,
        count.jobs
    );
    let rate = done.jobs as f64 / seconds.max(1e-9);
    let rows = vec![
        Row::info(
            "jobs deleted (with attempts and images)",
            format!(
                "{} in {seconds:.1} s ({} jobs/s, {} chunks of {DEFAULT_CHUNK})",
                thousands(done.jobs as f64),
                thousands(rate),
                done.chunks
            ),
        ),
        Row {
            measure: "slowest chunk (one transaction)".into(),
            figure: format!("{} ms", slowest.as_millis()),
            target: format!("< {} ms", TARGET_CHUNK_MAX.as_millis()),
            verdict: super::verdict_at_most(slowest.as_secs_f64(), TARGET_CHUNK_MAX.as_secs_f64()),
        },
    ];
    Ok(Report {
        scenario: "prune",
        title: format!(
            "imagegen prune over {} finished jobs, {DEFAULT_CHUNK} per transaction",
            thousands(args.history as f64)
        ),
        rows,
        json: json!({
            "scenario": "prune",
            "jobs": done.jobs,
            "seconds": round(seconds, 2),
            "jobs_per_s": round(rate, 0),
            "chunks": done.chunks,
            "slowest_chunk_ms": slowest.as_millis() as u64,
            "target_slowest_chunk_ms": TARGET_CHUNK_MAX.as_millis() as u64,
        }),
    })
}
