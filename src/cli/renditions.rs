//! `imagegen renditions add SPEC[,SPEC] (--batch B | --job ID | --all)`: makes renditions of jobs
//! that already succeeded, from their stored originals, with a progress bar. No model is called.
//! Jobs that already have every asked spec are not even read, so a re-run is a no-op.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use imagegen::image::renditions::{RenditionSettings, Spec};
use imagegen::queue::{Queue, Selection};
use imagegen::renditions::Renditions;
use imagegen::storage::{Storage, StorageConfig};

/// Jobs read per page: bounds memory for `--all` over millions of rows.
const PAGE: i64 = 200;

#[derive(Subcommand)]
pub enum RenditionsCommand {
    /// Make these renditions for succeeded jobs that lack them (e.g. `add og,thumb --batch b`;
    /// `add thumb --all` fills in jobs made before renditions existed).
    Add(AddArgs),
}

#[derive(Args)]
pub struct AddArgs {
    /// Comma-separated specs: og, thumb, webp, WxH.fmt, Ww.fmt (fmt jpg, jpeg, png, webp).
    #[arg(value_delimiter = ',', required = true)]
    specs: Vec<String>,
    /// The jobs of this batch.
    #[arg(long, conflicts_with_all = ["job", "all"], required_unless_present_any = ["job", "all"])]
    batch: Option<String>,
    /// This one job.
    #[arg(long, conflicts_with = "all")]
    job: Option<i64>,
    /// Every succeeded job.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    renditions: RenditionSettings,
    #[command(flatten)]
    storage: StorageConfig,
}

pub async fn run(queue: Queue, cmd: RenditionsCommand) -> anyhow::Result<()> {
    match cmd {
        RenditionsCommand::Add(a) => add(queue, a).await,
    }
}

async fn add(queue: Queue, a: AddArgs) -> anyhow::Result<()> {
    let texts: Vec<String> = a.specs.iter().map(|s| s.trim().to_owned()).collect();
    let specs = Spec::parse_list(&texts)?;
    let selection = match (a.job, a.batch, a.all) {
        (Some(id), _, _) => {
            let job = queue.job(id).await?;
            if job.state != "succeeded" {
                bail!(
                    "job {id} is {}: renditions are made from a succeeded job's images",
                    job.state
                );
            }
            Selection::Job(id)
        }
        (None, Some(b), _) => Selection::Batch(b),
        (None, None, true) => Selection::All,
        (None, None, false) => bail!("say which jobs: --batch, --job or --all"),
    };
    let storage = Storage::open(&a.storage).await?;
    let renditions = Renditions::new(a.renditions);
    let total = queue.count_needing_renditions(&selection, &texts).await?;
    if total == 0 {
        println!("nothing to do: every selected job has {}", texts.join(", "));
        return Ok(());
    }
    let bar = ProgressBar::new(u64::try_from(total).unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (mut made, mut failed_jobs, mut after) = (0u64, 0u64, 0i64);
    // Enough jobs at once to keep the pool busy while others upload.
    let parallel = renditions.pool().size() * 2;
    loop {
        let page = queue
            .jobs_needing_renditions(&selection, &texts, after, PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let results: Vec<_> = futures::stream::iter(page.iter())
            .map(|t| async {
                (
                    t.id,
                    renditions.add_to_job(&queue, &storage, t, &specs).await,
                )
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        for (id, result) in results {
            bar.inc(1);
            match result {
                Ok(added) if added.failed.is_empty() => made += added.made.len() as u64,
                Ok(added) => {
                    failed_jobs += 1;
                    made += added.made.len() as u64;
                    for (spec, why) in added.failed {
                        bar.println(format!("job {id}: {spec}: {why}"));
                    }
                }
                Err(e) => {
                    failed_jobs += 1;
                    bar.println(format!("job {id}: {e}"));
                }
            }
            bar.set_message(format!("{made} made, {failed_jobs} jobs with failures"));
        }
    }
    bar.finish();
    println!("{made} renditions made; {failed_jobs} jobs with failures (see rendition_errors)");
    if failed_jobs > 0 {
        return Err(anyhow::anyhow!("{failed_jobs} jobs had failures"))
            .context("some renditions could not be made");
    }
    Ok(())
}
