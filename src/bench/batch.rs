//! The `batch` scenario: `imagegen batch submit` of a CSV of posts (slug, title, summary with a
//! comma and quotes) with a template, a key and renditions, as a whole process (start, read,
//! check every row, one transaction), into an empty table; then the same file again (every key
//! found, nothing added), which is what a nightly re-run costs.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::json;

use super::{
    BenchArgs, BenchDb, Report, Row, imagegen_bin, progress, round, thousands, verdict_at_most,
};

/// A file of this many rows must be submitted within [`TARGET_SUBMIT`].
pub const TARGET_ROWS: usize = 100_000;
pub const TARGET_SUBMIT: Duration = Duration::from_secs(10);

async fn submit(bench: &BenchDb, args: &BenchArgs, file: &std::path::Path) -> anyhow::Result<f64> {
    let bin = imagegen_bin(args)?;
    let started = Instant::now();
    let out = tokio::process::Command::new(&bin)
        .arg("batch")
        .arg("submit")
        .arg(file)
        .args([
            "--batch",
            "bench-posts",
            "--key",
            "{slug}",
            "--renditions",
            "og",
        ])
        .args([
            "--template",
            "Header image for the post \"{title}\": {summary}. No text.",
        ])
        .env("DATABASE_URL", &bench.url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} batch submit", bin.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "imagegen batch submit failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(seconds)
}

pub(super) async fn batch_scenario(bench: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    let n = args.batch_rows;
    ensure!(n > 0, "--batch-rows must be at least 1");
    let mut text = String::from("slug,title,summary\n");
    for i in 0..n {
        text.push_str(&format!(
            "post-{i},Post number {i},\"A short summary, with \"\"quotes\"\", of post {i}\"\n"
        ));
    }
    let file =
        std::env::temp_dir().join(format!("imagegen-bench-posts-{}.csv", std::process::id()));
    tokio::fs::write(&file, text)
        .await
        .with_context(|| format!("writing {}", file.display()))?;
    let pool = bench.fresh(2).await?;
    let run = async {
        progress(args, format!("batch: submit {n} rows"));
        let first = submit(bench, args, &file).await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs")
            .fetch_one(&pool)
            .await?;
        ensure!(
            usize::try_from(rows).ok() == Some(n),
            "batch submit inserted {rows} of {n} rows"
        );
        progress(args, format!("batch: submit the same {n} rows again"));
        let again = submit(bench, args, &file).await?;
        let rows_after: i64 = sqlx::query_scalar("SELECT count(*) FROM imagegen.jobs")
            .fetch_one(&pool)
            .await?;
        ensure!(rows_after == rows, "the re-submit added jobs");
        anyhow::Ok((first, again))
    }
    .await;
    pool.close().await;
    let _ = tokio::fs::remove_file(&file).await;
    let (first, again) = run?;
    // The target is stated for 100,000 rows; other sizes are scaled to it.
    let scaled = first * TARGET_ROWS as f64 / n as f64;
    let target = TARGET_SUBMIT.as_secs_f64();
    Ok(Report {
        scenario: "batch",
        title: format!(
            "`imagegen batch submit` of a {}-row CSV (template, key, renditions) into an empty \
             table, as a whole process, then the same file again",
            thousands(n as f64)
        ),
        rows: vec![
            Row {
                measure: "first submit".to_owned(),
                figure: format!("{first:.2} s ({} rows/s)", thousands(n as f64 / first)),
                target: format!("< {target:.0} s for {}", thousands(TARGET_ROWS as f64)),
                verdict: verdict_at_most(scaled, target),
            },
            Row::info("re-submit (adds nothing)", format!("{again:.2} s")),
        ],
        json: json!({
            "scenario": "batch",
            "rows": n,
            "submit_seconds": round(first, 3),
            "resubmit_seconds": round(again, 3),
            "target_seconds_per_100k": target,
        }),
    })
}
