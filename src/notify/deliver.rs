//! The delivery loop: sends the webhook outbox (`imagegen.deliveries`), signed, through the
//! guard, and retries failures with capped, jittered backoff until a day has passed.
//!
//! Deliveries are claimed like jobs (`FOR UPDATE SKIP LOCKED`, a lease, a fenced finish), so any
//! number of workers can run this loop and none sends a delivery another one holds; a worker that
//! dies mid-call leaves its deliveries due again once their lease is over. A delivery is thus
//! sent *at least* once: receivers drop repeats by `webhook-id`, which never changes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use super::guard::{Guard, GuardConfig, GuardError};
use super::sign::WebhookSecret;
use crate::queue::deliveries::{ClaimedDelivery, DELIVERIES_CHANNEL, DeliveryOutcome};
use crate::queue::{Queue, QueueError};
use crate::retry::RetryPolicy;

/// Settings of the delivery loop.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Ceiling of the first retry's delay (doubling per failure, full jitter).
    pub retry_base: Duration,
    /// No single retry waits longer than this.
    pub retry_cap: Duration,
    /// A delivery still failing this long after its job finished is marked failed.
    pub give_up_after: Duration,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// How often an idle loop looks for due deliveries without a notification (the only way,
    /// through a pooler).
    pub poll_interval: Duration,
    /// The outbound client's rules.
    pub guard: GuardConfig,
}

impl Default for DeliveryConfig {
    /// 5 s first retry, 1 h cap, 24 h in all (what receivers of Standard Webhooks senders
    /// expect), 8 calls at once.
    fn default() -> Self {
        DeliveryConfig {
            retry_base: Duration::from_secs(5),
            retry_cap: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(24 * 3600),
            concurrency: 8,
            poll_interval: Duration::from_secs(5),
            guard: GuardConfig::default(),
        }
    }
}

impl DeliveryConfig {
    /// How long a claim holds a delivery: past the call's timeout with room for the writes
    /// around it, so a live deliverer never loses a claim to a second one.
    pub fn lease(&self) -> Duration {
        self.guard.timeout * 2 + Duration::from_secs(2)
    }

    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            base: self.retry_base,
            cap: self.retry_cap,
        }
    }
}

/// After the `attempts`-th failed attempt of a delivery first due `age` ago: the delay before
/// the next one, or `None` to give up (the next attempt would fall past `give_up_after`).
pub fn next_retry(
    policy: &RetryPolicy,
    attempts: i32,
    age: Duration,
    give_up_after: Duration,
) -> Option<Duration> {
    let delay = policy.delay(u32::try_from(attempts).unwrap_or(1).max(1), None);
    (age + delay < give_up_after).then_some(delay)
}

/// The `webhook-id` of a delivery.
pub fn message_id(webhook_id: Uuid) -> String {
    format!("msg_{}", webhook_id.simple())
}

struct Shared {
    id: Uuid,
    queue: Queue,
    guard: Guard,
    secret: WebhookSecret,
    config: DeliveryConfig,
}

/// One process's delivery loop.
pub struct Deliverer {
    shared: Arc<Shared>,
}

impl Deliverer {
    pub fn new(
        queue: Queue,
        secret: WebhookSecret,
        config: DeliveryConfig,
    ) -> Result<Deliverer, GuardError> {
        let guard = Guard::new(config.guard)?;
        Ok(Deliverer {
            shared: Arc::new(Shared {
                id: Uuid::new_v4(),
                queue,
                guard,
                secret,
                config,
            }),
        })
    }

    /// Sends due deliveries until `shutdown`, then lets calls in flight end (each is bounded by
    /// the guard's timeout) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), QueueError> {
        let shared = self.shared;
        let cfg = &shared.config;
        // Interest first, then the first claim: a delivery written in between is either claimed
        // or announced.
        let mut listener = listen(&shared.queue).await;
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut failures: u32 = 0;
        info!(deliverer = %shared.id, "webhook delivery started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            let free = cfg.concurrency.saturating_sub(tasks.len());
            let mut claimed = 0;
            if free > 0 {
                match shared
                    .queue
                    .claim_deliveries(shared.id, i64::try_from(free).unwrap_or(1), cfg.lease())
                    .await
                {
                    Ok(ds) => {
                        failures = 0;
                        claimed = ds.len();
                        for d in ds {
                            let span = info_span!(
                                "delivery",
                                delivery_id = d.id,
                                job_id = d.job_id,
                                attempt = d.attempts
                            );
                            tasks.spawn(deliver_one(shared.clone(), d).instrument(span));
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "claiming webhook deliveries failed");
                    }
                }
            }
            if claimed > 0 && claimed == free {
                continue;
            }
            let wait = if failures > 0 {
                Duration::from_millis(200)
                    .saturating_mul(2u32.saturating_pow(failures.min(8)))
                    .min(Duration::from_secs(30))
            } else {
                match shared.queue.next_delivery_due().await {
                    Ok(Some(due)) => (due - Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .min(cfg.poll_interval),
                    _ => cfg.poll_interval,
                }
            };
            let wait = wait.max(Duration::from_millis(5));
            if listener.is_none() {
                listener = listen(&shared.queue).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                ok = recv(&mut listener) => if !ok { listener = None; },
            }
        }
        if !tasks.is_empty() {
            debug!(
                in_flight = tasks.len(),
                "waiting for webhook calls in flight"
            );
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

async fn listen(queue: &Queue) -> Option<sqlx::postgres::PgListener> {
    if !queue.listens() {
        return None;
    }
    let mut l = match sqlx::postgres::PgListener::connect_with(queue.pool()).await {
        Ok(l) => l,
        Err(e) => {
            debug!(error = %e, "cannot listen for deliveries; polling");
            return None;
        }
    };
    l.listen(DELIVERIES_CHANNEL).await.ok().map(|_| l)
}

async fn recv(listener: &mut Option<sqlx::postgres::PgListener>) -> bool {
    match listener {
        Some(l) => {
            let ok = l.recv().await.is_ok();
            // One wake-up is enough for any number of deliveries written meanwhile.
            while l.next_buffered().is_some() {}
            ok
        }
        None => std::future::pending().await,
    }
}

/// One attempt at one delivery, recorded whatever happens (or left to its lease if the
/// database is gone, which sends it again later: at least once).
async fn deliver_one(shared: Arc<Shared>, d: ClaimedDelivery) {
    let outcome = attempt(&shared, &d).await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(AttemptError::LeaseLost) => return,
        Err(AttemptError::Queue(e)) => {
            warn!(error = %e, "could not prepare the webhook; it is sent again after its lease");
            return;
        }
    };
    match &outcome {
        DeliveryOutcome::Delivered { status } => info!(status, "webhook delivered"),
        DeliveryOutcome::Retry {
            status,
            error,
            delay,
        } => {
            warn!(status, error = %error, retry_in = ?delay, "webhook delivery failed; will retry")
        }
        DeliveryOutcome::Failed { status, error } => {
            warn!(status, error = %error, "webhook delivery failed for good")
        }
    }
    match shared.queue.finish_delivery(&d, shared.id, &outcome).await {
        Ok(true) => {}
        Ok(false) => debug!("delivery taken over before its outcome was recorded"),
        Err(e) => warn!(error = %e, "could not record the webhook outcome; it is sent again later"),
    }
}

enum AttemptError {
    LeaseLost,
    Queue(QueueError),
}

async fn attempt(shared: &Shared, d: &ClaimedDelivery) -> Result<DeliveryOutcome, AttemptError> {
    let body = match &d.body {
        Some(b) => b.clone(),
        None => {
            let built = match super::webhook_body(&shared.queue, d.job_id).await {
                Ok(b) => b,
                Err(QueueError::NotFound(_)) => {
                    return Ok(DeliveryOutcome::Failed {
                        status: None,
                        error: "the job no longer exists".into(),
                    });
                }
                Err(e) => return Err(AttemptError::Queue(e)),
            };
            match shared.queue.fix_delivery_body(d, shared.id, &built).await {
                Ok(Some(b)) => b,
                Ok(None) => return Err(AttemptError::LeaseLost),
                Err(e) => return Err(AttemptError::Queue(e)),
            }
        }
    };
    let signed = shared
        .secret
        .sign(&message_id(d.webhook_id), body.as_bytes());
    let headers = [
        ("webhook-id", signed.id),
        ("webhook-timestamp", signed.timestamp.to_string()),
        ("webhook-signature", signed.signature),
    ];
    let (status, error) = match shared.guard.post(&d.url, &headers, body).await {
        Ok(a) if (200..300).contains(&a.status) => {
            return Ok(DeliveryOutcome::Delivered { status: a.status });
        }
        Ok(a) => (
            Some(a.status),
            format!("HTTP {}: {}", a.status, a.body.trim()),
        ),
        Err(e @ GuardError::Refused(_)) => {
            return Ok(DeliveryOutcome::Failed {
                status: None,
                error: e.to_string(),
            });
        }
        Err(e @ GuardError::Request(_)) => (None, e.to_string()),
    };
    let age = (Utc::now() - d.created_at).to_std().unwrap_or_default();
    let cfg = &shared.config;
    Ok(
        match next_retry(&cfg.policy(), d.attempts, age, cfg.give_up_after) {
            Some(delay) => DeliveryOutcome::Retry {
                status,
                error,
                delay,
            },
            None => DeliveryOutcome::Failed {
                status,
                error: format!(
                    "gave up after {} attempts over {}: {error}",
                    d.attempts,
                    humantime::format_duration(Duration::from_secs(age.as_secs()))
                ),
            },
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_within_the_cap_and_stop_after_a_day() {
        let cfg = DeliveryConfig::default();
        let policy = cfg.policy();
        let day = cfg.give_up_after;
        for attempts in 1..40 {
            let d = next_retry(&policy, attempts, Duration::ZERO, day).unwrap();
            assert!(d <= policy.ceiling(attempts as u32));
            assert!(d <= cfg.retry_cap);
        }
        assert!(next_retry(&policy, 1, Duration::from_secs(1), day).unwrap() <= cfg.retry_base);
        // A day old: the next attempt would fall past the window.
        assert_eq!(next_retry(&policy, 30, day, day), None);
        assert_eq!(
            next_retry(&policy, 2, day + Duration::from_secs(1), day),
            None
        );
    }

    #[test]
    fn the_lease_outlasts_the_call() {
        let cfg = DeliveryConfig::default();
        assert!(cfg.lease() > cfg.guard.timeout * 2);
    }
}
