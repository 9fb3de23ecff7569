//! `GET /metrics`: the Prometheus text exposition of this process's instruments (see
//! [`crate::metrics`]) followed by the queue's figures read from Postgres.
//!
//! The queue figures are the same on every instance (they describe the shared database, not the
//! process): aggregate them with `max`, not `sum`. They are read at most every
//! [`QUEUE_GAUGES_TTL`] however often and from however many places the server is scraped, and
//! written out by hand rather than kept as registered gauges, so a series that stops meaning
//! anything (the daily budget after it is cleared) disappears instead of repeating a stale value.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use tokio::sync::Mutex;

use crate::metrics::{CALL_BUCKETS, CALL_DURATION_SECONDS, COST_USD_TOTAL};
use crate::queue::Queue;
use crate::queue::api::QueueGauges;

/// How long the queue figures read from Postgres are reused.
pub const QUEUE_GAUGES_TTL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls return the same handle),
/// so everything [`crate::metrics`] records from then on is exported.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CALL_DURATION_SECONDS.to_owned()),
            &CALL_BUCKETS,
        )?
        .install_recorder()?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    crate::metrics::describe();
    Ok(handle)
}

/// The `/metrics` renderer: the process's handle and the cached queue figures.
#[derive(Clone)]
pub struct Exporter {
    handle: Option<PrometheusHandle>,
    queue: Queue,
    cache: Arc<Mutex<Option<(Instant, QueueGauges)>>>,
}

impl Exporter {
    /// `handle` is `None` when no recorder could be installed (another one was): only the queue
    /// figures are exported then.
    pub fn new(queue: Queue, handle: Option<PrometheusHandle>) -> Exporter {
        Exporter {
            handle,
            queue,
            cache: Arc::default(),
        }
    }

    /// The whole exposition.
    pub async fn render(&self) -> String {
        let mut out = match &self.handle {
            Some(h) => {
                h.run_upkeep();
                h.render()
            }
            None => String::new(),
        };
        write_costs(&mut out);
        if let Some(g) = self.gauges().await {
            write_queue(&mut out, &g);
        }
        out
    }

    async fn gauges(&self) -> Option<QueueGauges> {
        // Held across the read, so concurrent scrapes wait for one read instead of each making
        // their own.
        let mut cache = self.cache.lock().await;
        if let Some((at, g)) = &*cache
            && at.elapsed() < QUEUE_GAUGES_TTL
        {
            return Some(g.clone());
        }
        match self.queue.queue_gauges().await {
            Ok(g) => {
                *cache = Some((Instant::now(), g.clone()));
                Some(g)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the queue figures for /metrics failed");
                // Better absent than stale: an alert on absence catches a dead database.
                *cache = None;
                None
            }
        }
    }
}

fn usd(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

fn write_costs(out: &mut String) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "# HELP {COST_USD_TOTAL} USD billed by the provider for attempts this process recorded, by model"
    );
    let _ = writeln!(out, "# TYPE {COST_USD_TOTAL} counter");
    for (model, total) in crate::metrics::cost_totals() {
        let _ = writeln!(out, "{COST_USD_TOTAL}{{model=\"{model}\"}} {total}");
    }
}

fn write_queue(out: &mut String, g: &QueueGauges) {
    let _ = writeln!(
        out,
        "# HELP imagegen_queue_jobs Jobs in the queue per state (read from Postgres; the same on every instance)"
    );
    let _ = writeln!(out, "# TYPE imagegen_queue_jobs gauge");
    for (state, n) in g.counts.pairs() {
        let _ = writeln!(out, "imagegen_queue_jobs{{state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP imagegen_queue_oldest_pending_seconds Age of the oldest due pending job (0 when none waits)"
    );
    let _ = writeln!(out, "# TYPE imagegen_queue_oldest_pending_seconds gauge");
    let _ = writeln!(
        out,
        "imagegen_queue_oldest_pending_seconds {}",
        g.oldest_pending_seconds
    );
    let _ = writeln!(
        out,
        "# HELP imagegen_queue_spend_today_usd USD billed today (UTC) over the whole installation"
    );
    let _ = writeln!(out, "# TYPE imagegen_queue_spend_today_usd gauge");
    let _ = writeln!(
        out,
        "imagegen_queue_spend_today_usd {}",
        usd(g.spend_today_usd)
    );
    if g.daily_remaining_usd.is_some() || g.batch_remaining_usd.is_some() {
        let _ = writeln!(
            out,
            "# HELP imagegen_queue_budget_remaining_usd USD left: scope=daily for today's budget (after calls in flight), scope=batch for the tightest budget of a batch with unfinished jobs"
        );
        let _ = writeln!(out, "# TYPE imagegen_queue_budget_remaining_usd gauge");
        if let Some(d) = g.daily_remaining_usd {
            let _ = writeln!(
                out,
                "imagegen_queue_budget_remaining_usd{{scope=\"daily\"}} {}",
                usd(d)
            );
        }
        if let Some(b) = g.batch_remaining_usd {
            let _ = writeln!(
                out,
                "imagegen_queue_budget_remaining_usd{{scope=\"batch\"}} {}",
                usd(b)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_section_has_every_state_and_only_budgets_that_exist() {
        let mut out = String::new();
        let g = QueueGauges {
            daily_remaining_usd: Some(Decimal::new(125, 2)),
            ..QueueGauges::default()
        };
        write_queue(&mut out, &g);
        for s in crate::queue::api::STATES {
            assert!(out.contains(&format!("imagegen_queue_jobs{{state=\"{s}\"}} 0")));
        }
        assert!(out.contains("imagegen_queue_budget_remaining_usd{scope=\"daily\"} 1.25"));
        assert!(!out.contains("scope=\"batch\""));
        let mut none = String::new();
        write_queue(&mut none, &QueueGauges::default());
        assert!(!none.contains("imagegen_queue_budget_remaining_usd"));
    }
}
