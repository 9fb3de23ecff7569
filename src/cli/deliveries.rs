//! `imagegen deliveries` (list, redeliver) and the webhook settings of `imagegen worker`, which
//! runs the delivery loop beside the job loop.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use imagegen::notify::deliver::{Deliverer, DeliveryConfig};
use imagegen::notify::guard::GuardConfig;
use imagegen::notify::sign::{SECRET_ENV, WebhookSecret};
use imagegen::queue::Queue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Webhook settings of `imagegen worker`.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Ceiling of the first webhook retry's delay (doubles per failure, full jitter, capped at
    /// 1 h; a delivery still failing 24 h after its job finished is marked failed).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub webhook_retry_base: Duration,
    /// How long one webhook call may take, connect to answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,
    /// Allow callbacks to private, loopback and link-local addresses (development, receivers
    /// inside your own network on purpose). Off: such URLs are refused.
    #[arg(long, env = "IMAGEGEN_ALLOW_PRIVATE_CALLBACKS")]
    pub allow_private_callbacks: bool,
    /// Events (the stream's log) and finished webhook deliveries older than this are pruned,
    /// hourly. A stream resuming from a pruned event gets 410 Gone.
    #[arg(long, env = "IMAGEGEN_PUSH_RETENTION", default_value = "7d",
        value_parser = humantime::parse_duration)]
    pub push_retention: Duration,
}

/// Starts the hourly pruning of old events and finished deliveries (see
/// `imagegen::notify::retention`).
pub fn spawn_pruner(
    queue: &Queue,
    args: &WebhookArgs,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(imagegen::notify::retention::run(
        queue.clone(),
        args.push_retention,
        imagegen::notify::retention::PRUNE_INTERVAL,
        shutdown,
    ))
}

/// Starts the delivery loop for the worker, if a secret is set (unsigned webhooks are never
/// sent: deliveries wait, and `imagegen deliveries` shows them pending).
pub async fn spawn_deliverer(
    queue: &Queue,
    args: &WebhookArgs,
    poll_interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(secret) = WebhookSecret::from_env()? else {
        // Loud only when it matters: some job asked for a webhook.
        if queue.next_delivery_due().await?.is_some() {
            tracing::warn!(
                "{SECRET_ENV} is not set: webhook deliveries wait unsent until a worker has it"
            );
        } else {
            tracing::info!("{SECRET_ENV} is not set: this worker sends no webhooks");
        }
        return Ok(None);
    };
    let config = DeliveryConfig {
        retry_base: args.webhook_retry_base,
        poll_interval,
        guard: GuardConfig {
            allow_private: args.allow_private_callbacks,
            timeout: args.webhook_timeout,
        },
        ..DeliveryConfig::default()
    };
    let deliverer = Deliverer::new(queue.clone(), secret, config).context("webhook client")?;
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = deliverer.run(shutdown).await {
            tracing::error!(error = %e, "webhook delivery stopped");
        }
    })))
}

#[derive(Args)]
pub struct DeliveriesArgs {
    #[command(subcommand)]
    command: Option<DeliveriesCommand>,
    /// Only deliveries that failed for good.
    #[arg(long)]
    failed: bool,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum DeliveriesCommand {
    /// Send a delivery again (same webhook-id and body), now, with a fresh 24 h of retries.
    Redeliver { id: i64 },
}

pub async fn run(q: Queue, a: DeliveriesArgs) -> anyhow::Result<()> {
    if let Some(DeliveriesCommand::Redeliver { id }) = a.command {
        q.redeliver(id).await?;
        println!("delivery {id} is due again");
        return Ok(());
    }
    let rows = q.deliveries(a.failed, a.limit.clamp(1, 10_000)).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header([
        "id",
        "job",
        "state",
        "attempts",
        "status",
        "next / done",
        "url",
        "error",
    ]);
    for d in rows {
        let when = match (&d.state[..], d.delivered_at) {
            ("delivered", Some(at)) => at.to_string(),
            ("pending", _) => d.next_attempt_at.to_string(),
            _ => String::new(),
        };
        t.add_row([
            d.id.to_string(),
            d.job_id.to_string(),
            d.state,
            d.attempts.to_string(),
            d.last_status.map(|s| s.to_string()).unwrap_or_default(),
            when,
            redact_userinfo(&d.url),
            d.last_error.unwrap_or_default(),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// A URL without its `user:password@`, for printing.
fn redact_userinfo(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
