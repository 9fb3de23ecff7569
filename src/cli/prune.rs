//! `imagegen prune` and `imagegen batch delete`: one code path (`imagegen::prune`), a count
//! first, a dry run, and chunked deletes.

use anyhow::{Context, bail};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use imagegen::prune::{self, DEFAULT_CHUNK};
use imagegen::queue::{PruneFilter, Queue};
use imagegen::storage::{Storage, StorageConfig};

#[derive(Args)]
pub struct PruneArgs {
    /// Delete jobs that finished (succeeded, failed or cancelled) before this time: a date
    /// (`2026-11-01`, midnight UTC) or an RFC 3339 time (`2026-11-01T06:00:00+01:00`).
    #[arg(long, value_parser = parse_cutoff)]
    pub finished_before: DateTime<Utc>,
    /// Only jobs of this batch.
    #[arg(long)]
    pub batch: Option<String>,
    #[command(flatten)]
    pub common: DeleteArgs,
}

/// What `prune` and `batch delete` share.
#[derive(Args)]
pub struct DeleteArgs {
    /// Also delete the jobs' objects from storage: originals, renditions, earlier generations.
    #[arg(long)]
    pub objects: bool,
    /// Count what would go, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Jobs per transaction.
    #[arg(long, default_value_t = DEFAULT_CHUNK, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub chunk: i64,
    #[command(flatten)]
    pub storage: StorageConfig,
}

fn parse_cutoff(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| format!("{s:?} is neither a date (YYYY-MM-DD) nor an RFC 3339 time"))
}

pub async fn run(q: Queue, a: PruneArgs) -> anyhow::Result<()> {
    let filter = PruneFilter {
        finished_before: Some(a.finished_before),
        batch: a.batch,
        include_pending: false,
    };
    delete(&q, &filter, &a.common).await
}

/// `imagegen batch delete B [--objects] [--dry-run]`: every job of the batch that is not
/// running, pending ones included.
#[allow(dead_code)] // `imagegen batch delete|regenerate` call it once the batch command lands
pub async fn batch_delete(q: Queue, batch: String, a: DeleteArgs) -> anyhow::Result<()> {
    let filter = PruneFilter {
        finished_before: None,
        batch: Some(batch),
        include_pending: true,
    };
    delete(&q, &filter, &a).await
}

async fn delete(q: &Queue, filter: &PruneFilter, a: &DeleteArgs) -> anyhow::Result<()> {
    let count = prune::count(q, filter).await?;
    let objects = count.images + count.renditions;
    if a.objects {
        println!(
            "{} job(s) match, with {objects} object(s) ({} images, {} renditions)",
            count.jobs, count.images, count.renditions
        );
    } else {
        println!(
            "{} job(s) match (their {objects} object(s) stay in storage; --objects deletes them)",
            count.jobs
        );
    }
    if count.running > 0 {
        println!("{} running job(s) left alone", count.running);
    }
    if a.dry_run {
        println!("dry run: nothing deleted");
        return Ok(());
    }
    if count.jobs == 0 {
        return Ok(());
    }
    let storage = if a.objects {
        let s = Storage::open(&a.storage).await?;
        s.reachable()
            .await
            .with_context(|| format!("storage {} is not reachable", s.describe()))?;
        Some(s)
    } else {
        None
    };
    let total = count.jobs;
    let done = prune::prune(q, storage.as_ref(), filter, a.chunk, |p| {
        eprintln!("deleted {}/{total} job(s), {} object(s)", p.jobs, p.objects);
    })
    .await;
    match done {
        Ok(p) => {
            println!("deleted {} job(s) and {} object(s)", p.jobs, p.objects);
            Ok(())
        }
        Err(e) => bail!("prune stopped: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cutoff;

    #[test]
    fn cutoffs_are_dates_or_times() {
        assert_eq!(
            parse_cutoff("2026-11-01").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_cutoff("2026-11-01T06:00:00+01:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-01T05:00:00+00:00"
        );
        assert!(parse_cutoff("yesterday").is_err());
    }
}
