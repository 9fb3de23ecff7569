//! `imagegen regenerate ID [--prompt TEXT]` and `imagegen batch regenerate B --keys k1,k2`: a
//! new generation of finished jobs (see `queue::generations`).

use anyhow::bail;
use clap::Args;
use imagegen::queue::Queue;

use super::explain_constraint;

#[derive(Args)]
pub struct RegenerateArgs {
    /// The finished job to make again.
    pub id: i64,
    /// A new prompt (the job keeps its old one otherwise).
    #[arg(long)]
    pub prompt: Option<String>,
}

pub async fn run(q: Queue, a: RegenerateArgs) -> anyhow::Result<()> {
    let generation = q
        .regenerate(a.id, a.prompt.as_deref())
        .await
        .map_err(explain_constraint)?;
    println!(
        "job {} is pending again as generation {generation} (earlier images stay as history)",
        a.id
    );
    Ok(())
}

/// The row keys of a batch (as `batch submit --key` made them) to regenerate, with a new
/// prompt for all of them if given. Keys naming no finished job of the batch are an error,
/// after the others were regenerated.
#[allow(dead_code)] // `imagegen batch delete|regenerate` call it once the batch command lands
pub async fn batch(
    q: Queue,
    batch: &str,
    keys: &[String],
    prompt: Option<&str>,
) -> anyhow::Result<()> {
    // `batch submit` makes a row's idempotency key `{batch}:{key}`.
    let full: Vec<String> = keys.iter().map(|k| format!("{batch}:{k}")).collect();
    let done = q
        .regenerate_many(batch, &full, prompt)
        .await
        .map_err(explain_constraint)?;
    for r in &done {
        println!("job {} pending again as generation {}", r.id, r.generation);
    }
    let found: std::collections::HashSet<&str> = done
        .iter()
        .filter_map(|r| r.idempotency_key.as_deref())
        .collect();
    let missing: Vec<&str> = keys
        .iter()
        .zip(&full)
        .filter(|(_, f)| !found.contains(f.as_str()))
        .map(|(k, _)| k.as_str())
        .collect();
    println!("{} job(s) of batch {batch:?} regenerated", done.len());
    if !missing.is_empty() {
        bail!(
            "no finished job of batch {batch:?} with key(s): {}",
            missing.join(", ")
        );
    }
    Ok(())
}
