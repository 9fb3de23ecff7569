//! The worker runtime: slots, leases, heartbeats, pauses and shutdown around a pluggable handler.
//!
//! One [`Worker`] is one process's claimer. It claims only as many jobs as it has free slots,
//! runs each in its own task with no database connection held, renews the leases of everything in
//! flight on one timer, rescues jobs whose lease expired anywhere, and writes completions in
//! batches through one writer task. The handler decides nothing about the queue: it returns a
//! success or a classified failure, and [`decide`] turns that into the job's next state.
//!
//! [`ceiling`] lowers how many jobs run at once while the provider refuses calls as saturated
//! (too many in flight for the account's balance), and raises it back to `concurrency` after.

pub mod ceiling;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::error::ErrorClass;
use crate::queue::{
    AttemptRecord, ClaimFilter, Completion, Finish, ImageRow, Job, Queue, QueueError,
};
use crate::retry::RetryPolicy;

pub mod window;
pub use window::{Window, WindowError};

/// A finished attempt that produced its images.
#[derive(Debug, Clone, Default)]
pub struct Success {
    pub image_urls: Vec<String>,
    pub images: Vec<ImageRow>,
    pub record: AttemptRecord,
}

/// A failed attempt, classified where the error was made.
#[derive(Debug, Clone)]
pub struct Failure {
    pub class: ErrorClass,
    /// Short, specific, secret-free: it is stored on the row.
    pub message: String,
    /// What the attempt was billed, if anything.
    pub record: AttemptRecord,
    /// A transient failure that must not use up an attempt: the attempt already paid for its
    /// images and kept them, so the next one costs nothing (storage was down). Retried with the
    /// first-failure backoff until it succeeds or the error turns halting.
    pub free_retry: bool,
}

impl Failure {
    /// A failure with nothing billed.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Failure {
        Failure {
            class,
            message: message.into(),
            record: AttemptRecord::default(),
            free_retry: false,
        }
    }
}

/// The job body. Implementations must be cancel-safe: on shutdown past the grace period the
/// future is dropped and the job handed back.
///
/// `slot` is the job's call slot: a handler whose provider has answered calls
/// [`CallSlot::answered`] so the next call can start while it decodes and stores; one that
/// never does holds the slot until it returns.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        job: Job,
        slot: CallSlot,
    ) -> impl Future<Output = Result<Success, Failure>> + Send;
}

/// How many jobs a worker holds at most, per slot of `concurrency`: the calls in flight plus as
/// many answers already arrived and waiting for their turn to be read, decoded and stored.
/// Beyond that, a worker that cannot keep up claims only as fast as it finishes.
const HELD_PER_SLOT: usize = 2;

/// One job's claim on a call slot: `concurrency` bounds the provider calls in flight, not the
/// jobs being finished. The slot goes back when the provider's answer starts to arrive
/// ([`CallSlot::answered`]: the generation is done, and what is left is this process's reading,
/// decoding and storing, which the client's body permits and the image pool bound) or when the
/// job ends, whichever is first. So a burst of answers waiting for the CPU does not keep the
/// next calls from starting. Cheap to clone; giving it back twice is a no-op.
#[derive(Clone)]
pub struct CallSlot {
    inner: Arc<SlotInner>,
}

struct SlotInner {
    /// `Some` while the slot is held (the permit inside is `None` only if the claim found the
    /// semaphore short, which it never does).
    permit: Mutex<Option<Option<OwnedSemaphorePermit>>>,
    shared: Option<Arc<Shared>>,
}

impl CallSlot {
    /// A slot taken by a job of this worker: counted in `running` until given back.
    fn held(permit: Option<OwnedSemaphorePermit>, shared: Arc<Shared>) -> CallSlot {
        shared.running.fetch_add(1, Ordering::SeqCst);
        CallSlot {
            inner: Arc::new(SlotInner {
                permit: Mutex::new(Some(permit)),
                shared: Some(shared),
            }),
        }
    }

    /// A slot of no worker (a handler run by hand): giving it back does nothing.
    pub fn detached() -> CallSlot {
        CallSlot {
            inner: Arc::new(SlotInner {
                permit: Mutex::new(None),
                shared: None,
            }),
        }
    }

    /// The provider has answered this job's call: its slot goes to the next call.
    pub fn answered(&self) {
        self.give_back();
    }

    /// Whether this job still holds its slot.
    pub fn is_held(&self) -> bool {
        lock(&self.inner.permit).is_some()
    }

    fn give_back(&self) {
        self.inner.give_back();
    }
}

impl SlotInner {
    fn give_back(&self) {
        let Some(permit) = lock(&self.permit).take() else {
            return;
        };
        drop(permit);
        if let Some(shared) = &self.shared {
            shared.running.fetch_sub(1, Ordering::SeqCst);
            shared.slot_freed.notify_one();
        }
    }
}

impl Drop for SlotInner {
    /// A job task aborted at shutdown gives its slot back too.
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Settings of one worker process. Every field has a default fit for minute-long image calls.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs in flight at once.
    pub concurrency: usize,
    /// How often an idle worker claims even without a notification (the fallback for a lost
    /// NOTIFY, e.g. during a reconnect).
    pub poll_interval: Duration,
    /// How long a claim holds a job without renewal. A crashed worker's jobs return after this.
    pub lease: Duration,
    /// How often leases are renewed; well under `lease` so one missed renewal is harmless.
    pub renew_interval: Duration,
    /// How often this worker looks for expired leases of any worker.
    pub rescue_interval: Duration,
    /// On shutdown, how long in-flight jobs may run before they are handed back.
    pub grace: Duration,
    /// After a halting failure (bad key, no credits), how long claiming pauses before one probe job.
    pub halt_probe_interval: Duration,
    /// Backoff for transient failures.
    pub retry: RetryPolicy,
    /// Exit once nothing is left to do now or soon: no job due, running, or waiting for a
    /// retry (jobs scheduled for later and jobs of a batch stopped at its budget do not count).
    /// Also exit, with work left, when the window closes or claiming halts (see [`Stopped`]).
    pub exit_when_idle: bool,
    /// Claim only jobs of this batch (an overnight run of one batch, the demo).
    pub only_batch: Option<String>,
    /// Claim only inside this daily window (in-flight calls finish when it closes).
    pub window: Option<Window>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 16,
            poll_interval: Duration::from_secs(5),
            lease: Duration::from_secs(60),
            renew_interval: Duration::from_secs(20),
            rescue_interval: Duration::from_secs(15),
            grace: Duration::from_secs(30),
            halt_probe_interval: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            exit_when_idle: false,
            only_batch: None,
            window: None,
        }
    }
}

/// Why [`Worker::run`] returned. `imagegen worker` exits with [`Stopped::exit_code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to stop (SIGINT/SIGTERM, or the token cancelled).
    Shutdown,
    /// `exit_when_idle`: nothing left to do now or soon.
    Idle,
    /// `exit_when_idle`: stopped with work left (the window closed, a budget was reached,
    /// claiming halted on a 401/402). The jobs are pending, handed back, never failed.
    WorkLeft(String),
}

impl Stopped {
    /// 0 for nothing left (or a requested stop), 3 for work left. (1 is an error.)
    pub fn exit_code(&self) -> u8 {
        match self {
            Stopped::Shutdown | Stopped::Idle => 0,
            Stopped::WorkLeft(_) => 3,
        }
    }
}

/// What a worker is doing, published for tests, progress lines and the HTTP status page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Jobs in flight now.
    pub in_flight: usize,
    /// Claims that returned at least one job.
    pub claims: u64,
    /// Attempts whose completion was written.
    pub completed: u64,
    /// Waiting for work with free slots (nothing due).
    pub idle: bool,
    /// Why claiming is paused, if it is.
    pub paused: Option<String>,
    /// How many jobs may be in flight now: `concurrency`, unless the provider refused calls as
    /// saturated lately (see [`ceiling`]).
    pub ceiling: usize,
    /// Attempts refused as saturated and handed back without spending the attempt.
    pub saturated: u64,
}

/// The longest the claimer backs off after database errors.
const MAX_DB_BACKOFF: Duration = Duration::from_secs(30);
/// The most completions written in one transaction.
const MAX_COMPLETION_BATCH: usize = 512;
/// The most expired leases returned by one rescue statement.
const RESCUE_BATCH: i64 = 1000;
/// The cool-down after a saturated refusal that came without `Retry-After`.
pub const SATURATED_DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// Turns a handler's answer into how the attempt ends. Pure: the whole retry decision is here.
pub fn decide(job: &Job, result: &Result<Success, Failure>, policy: &RetryPolicy) -> Finish {
    match result {
        Ok(s) => Finish::Succeeded {
            image_urls: s.image_urls.clone(),
            images: s.images.clone(),
        },
        Err(f) => match f.class {
            ErrorClass::Permanent => Finish::Failed {
                error: f.message.clone(),
            },
            ErrorClass::Halt | ErrorClass::HaltBatch => Finish::Released {
                error: f.message.clone(),
                halted: true,
            },
            // Not this job's fault, and the call was refused before any work: the attempt is
            // given back, and the job waits out the provider's cool-down.
            ErrorClass::Saturated { after } => Finish::Retry {
                error: f.message.clone(),
                delay: policy.delay(1, Some(after.unwrap_or(SATURATED_DEFAULT_WAIT))),
                refund: true,
            },
            ErrorClass::Transient { after } if f.free_retry => Finish::Retry {
                error: f.message.clone(),
                delay: policy.delay(1, after),
                refund: true,
            },
            ErrorClass::Transient { after } => {
                if job.attempts >= job.max_attempts {
                    Finish::Failed {
                        error: format!("{} (gave up after {} attempts)", f.message, job.attempts),
                    }
                } else {
                    let failures = u32::try_from(job.attempts).unwrap_or(1);
                    Finish::Retry {
                        error: f.message.clone(),
                        delay: policy.delay(failures, after),
                        refund: false,
                    }
                }
            }
        },
    }
}

/// A job in flight, as the renewal timer and shutdown see it.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    attempt: i32,
    started_at: DateTime<Utc>,
    started: Instant,
    /// Its result is queued for the completion writer: a renewal that misses it has most
    /// likely raced with the write, not lost the lease (the writer reports a real loss), and
    /// shutdown must not also queue a release for it (one statement cannot apply two
    /// completions of the same job in a known order).
    finishing: bool,
}

type Ack = oneshot::Sender<Result<bool, QueueError>>;

/// Why claiming is paused and until when.
#[derive(Debug, Clone)]
struct Pause {
    until: Instant,
    until_wall: DateTime<Utc>,
    reason: String,
    /// After a halt only one job is claimed until one ends without halting.
    probe: bool,
}

struct Shared {
    id: Uuid,
    queue: Queue,
    config: WorkerConfig,
    in_flight: Mutex<HashMap<i64, InFlight>>,
    pause: Mutex<Option<Pause>>,
    /// Batches not to claim until the given instant (their budget is spent).
    paused_batches: Mutex<HashMap<String, Instant>>,
    /// Batches that met their budget during this run and have not succeeded a job since: with
    /// `exit_when_idle`, their pending jobs keep no worker running.
    budget_stopped: Mutex<HashSet<String>>,
    /// Wakes the heartbeat early, so a pause shows in `imagegen status` at once.
    heartbeat_now: tokio::sync::Notify,
    /// The in-flight ceiling (see [`ceiling`]).
    ceiling: Mutex<ceiling::Ceiling>,
    /// Told whenever a job gives its call slot or its hold back, for a claimer held by the
    /// ceiling or by the holds rather than by the slots.
    slot_freed: tokio::sync::Notify,
    /// Jobs holding a call slot: spawned, and neither answered nor handed to the completion
    /// writer (the calls in flight at the provider).
    running: AtomicUsize,
    status: watch::Sender<WorkerStatus>,
}

impl Shared {
    fn held(&self) -> Vec<(i64, i32)> {
        lock(&self.in_flight)
            .iter()
            .map(|(id, f)| (*id, f.attempt))
            .collect()
    }

    /// Which jobs the next claim may take: the configured batch, minus paused batches.
    fn claim_filter(&self) -> ClaimFilter {
        let now = Instant::now();
        let mut paused = lock(&self.paused_batches);
        paused.retain(|_, until| *until > now);
        ClaimFilter {
            only: self.config.only_batch.clone(),
            skip: paused.keys().cloned().collect(),
        }
    }

    fn pause_for(&self, d: Duration, reason: String, probe: bool) {
        let mut pause = lock(&self.pause);
        let until = Instant::now() + d;
        if pause.as_ref().is_some_and(|p| p.until >= until) {
            return;
        }
        let until_wall = Utc::now() + chrono::Duration::from_std(d).unwrap_or_default();
        self.status
            .send_modify(|s| s.paused = Some(format!("{reason} (until {until_wall})")));
        crate::metrics::paused(Some(probe));
        *pause = Some(Pause {
            until,
            until_wall,
            reason,
            probe,
        });
        self.heartbeat_now.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind, still consistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A worker process's claimer. Build it, then [`Worker::run`] it until the token is cancelled.
pub struct Worker<H: Handler> {
    shared: Arc<Shared>,
    handler: Arc<H>,
    status_rx: watch::Receiver<WorkerStatus>,
}

impl<H: Handler> Worker<H> {
    pub fn new(queue: Queue, handler: H, config: WorkerConfig) -> Self {
        let concurrency = config.concurrency;
        let (status, status_rx) = watch::channel(WorkerStatus {
            ceiling: concurrency.max(1),
            ..WorkerStatus::default()
        });
        Worker {
            shared: Arc::new(Shared {
                id: Uuid::new_v4(),
                queue,
                config,
                in_flight: Mutex::new(HashMap::new()),
                pause: Mutex::new(None),
                paused_batches: Mutex::new(HashMap::new()),
                budget_stopped: Mutex::new(HashSet::new()),
                heartbeat_now: tokio::sync::Notify::new(),
                ceiling: Mutex::new(ceiling::Ceiling::new(concurrency)),
                slot_freed: tokio::sync::Notify::new(),
                running: AtomicUsize::new(0),
                status,
            }),
            handler: Arc::new(handler),
            status_rx,
        }
    }

    /// This process's lease owner id.
    pub fn id(&self) -> Uuid {
        self.shared.id
    }

    /// A live view of what the worker is doing.
    pub fn status(&self) -> watch::Receiver<WorkerStatus> {
        self.status_rx.clone()
    }

    /// Runs until `shutdown` is cancelled (or, with `exit_when_idle`, until nothing is left to
    /// do or it stops with work left), then stops claiming and lets in-flight jobs finish. On a
    /// requested shutdown they have the grace period, and the rest is handed back without
    /// spending their attempt; otherwise (window closed, halted, idle) they run to the end.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Stopped, QueueError> {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let host = hostname();
        shared
            .queue
            .register_worker(shared.id, &host, std::process::id())
            .await?;
        info!(worker = %shared.id, concurrency = cfg.concurrency, "worker started");

        // Register interest in notifications before the first claim, so a job inserted in
        // between is not missed: either the claim sees it or the notification arrives.
        // Through a transaction pooler (no LISTEN) the worker polls at `poll_interval`.
        let mut listener = match shared.queue.listens() {
            false => None,
            true => match shared.queue.listen().await {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!(error = %e, "cannot listen for new jobs; polling only until reconnected");
                    None
                }
            },
        };

        let background = CancellationToken::new();
        let (done_tx, done_rx) = mpsc::channel::<(Completion, Ack)>(MAX_COMPLETION_BATCH * 2);
        let writer = tokio::spawn(completion_writer(shared.clone(), done_rx));
        let renewer = tokio::spawn(renew_loop(shared.clone(), background.clone()));
        let rescuer = tokio::spawn(rescue_loop(shared.clone(), background.clone()));

        let mut tasks: JoinSet<()> = JoinSet::new();
        // One permit per call slot. A job holds its permit while its call is in flight and gives
        // it back when the answer arrives (see `CallSlot`) or, at the latest, once its result is
        // queued for the completion writer, not when the write commits: the lease (still renewed
        // until the write) keeps the job fenced meanwhile. So the next claim overlaps the
        // previous batch's write, and the writer's queue (bounded) is what pushes back if the
        // database falls behind. `holds` bounds the jobs held in all, answered ones included.
        let slots = Arc::new(Semaphore::new(cfg.concurrency));
        let holds = Arc::new(Semaphore::new(
            cfg.concurrency.saturating_mul(HELD_PER_SLOT),
        ));
        let mut db_failures: u32 = 0;
        let mut stopped = Stopped::Shutdown;

        'claiming: loop {
            if shutdown.is_cancelled() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            // Outside the claiming window?
            if let Some(window) = &cfg.window
                && !window.contains(Utc::now())
            {
                if cfg.exit_when_idle {
                    // The same rule as idle: jobs scheduled for later are not work left.
                    stopped = match shared.queue.work_left(cfg.only_batch.as_deref(), &[]).await {
                        Ok(w) if w.due + w.retrying == 0 => Stopped::Idle,
                        Ok(w) => Stopped::WorkLeft(format!(
                            "window {window} closed with {} job(s) due or waiting for a retry",
                            w.due + w.retrying
                        )),
                        Err(e) => {
                            warn!(error = %e, "could not count what is left");
                            Stopped::WorkLeft(format!("window {window} closed"))
                        }
                    };
                    break 'claiming;
                }
                shared
                    .status
                    .send_modify(|s| s.paused = Some(format!("outside the window {window}")));
                tokio::select! {
                    _ = shutdown.cancelled() => break 'claiming,
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
                if cfg.window.as_ref().is_some_and(|w| w.contains(Utc::now())) {
                    shared.status.send_modify(|s| s.paused = None);
                    info!(window = %window, "window open; claiming");
                }
                continue;
            }
            // Paused (halt or provider cool-down)?
            let pause = lock(&shared.pause).clone();
            let free = slots.available_permits();
            let ceiling = lock(&shared.ceiling).get();
            // Below the ceiling as well as within the free slots and holds.
            let mut limit = free
                .min(ceiling.saturating_sub(cfg.concurrency - free))
                .min(holds.available_permits());
            if let Some(p) = &pause {
                if p.probe && cfg.exit_when_idle {
                    // Every job would halt the same way: a cron run ends here, jobs handed back.
                    stopped = Stopped::WorkLeft(format!("halted: {}", p.reason));
                    break 'claiming;
                }
                if p.until > Instant::now() {
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'claiming,
                        _ = tokio::time::sleep_until(p.until.into()) => {}
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    }
                    continue;
                }
                if p.probe {
                    // One probe job at a time until one ends without halting again.
                    limit = limit.min(1).min(usize::from(tasks.is_empty()));
                } else {
                    *lock(&shared.pause) = None;
                    shared.status.send_modify(|s| s.paused = None);
                    crate::metrics::paused(None);
                    info!("cool-down over; claiming again");
                }
            }
            if limit == 0 {
                // All slots busy, or the ceiling reached: wait for one to free up. A probe waits
                // for its job to end instead: its slot is free as soon as the result is queued.
                tokio::select! {
                    _ = shutdown.cancelled() => break 'claiming,
                    _ = slots.acquire(), if slots.available_permits() == 0 => {}
                    _ = shared.slot_freed.notified(), if free > 0 => {}
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                }
                continue;
            }
            if limit < cfg.concurrency && pause.is_none() {
                // Let the other jobs finishing right now give their slots back too, so the next
                // claim takes them all in one statement instead of a few rows each.
                let free = settle(&slots).await;
                let ceiling = lock(&shared.ceiling).get();
                limit = free
                    .min(ceiling.saturating_sub(cfg.concurrency - free))
                    .min(holds.available_permits());
                if limit == 0 {
                    continue;
                }
            }
            // Only this loop takes permits, so all `limit` are free.
            let n = u32::try_from(limit).unwrap_or(u32::MAX);
            let (Ok(mut permits), Ok(mut held)) = (
                slots.clone().try_acquire_many_owned(n),
                holds.clone().try_acquire_many_owned(n),
            ) else {
                continue;
            };

            let claimed = match shared
                .queue
                .claim(
                    shared.id,
                    i64::try_from(limit).unwrap_or(i64::MAX),
                    cfg.lease,
                    &shared.claim_filter(),
                )
                .await
            {
                Ok(jobs) => {
                    if db_failures > 0 {
                        info!("database reachable again");
                    }
                    db_failures = 0;
                    jobs
                }
                Err(e) => {
                    db_failures += 1;
                    let delay = db_backoff(db_failures);
                    warn!(error = %e, retry_in = ?delay, "claim failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'claiming,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            let got = claimed.len();
            if got > 0 {
                shared.status.send_modify(|s| {
                    s.claims += 1;
                    s.idle = false;
                });
            }
            for job in claimed {
                let (permit, hold) = (permits.split(1), held.split(1));
                self.spawn_job(&mut tasks, job, permit, hold, done_tx.clone());
            }
            drop((permits, held)); // the slots this claim found no job for
            shared.status.send_modify(|s| s.in_flight = tasks.len());
            if got == limit {
                continue; // Maybe more is due: claim again while slots are free.
            }

            // Nothing more due now. Exit if asked and nothing is left now or soon.
            if cfg.exit_when_idle && tasks.is_empty() {
                let mut skip: Vec<String> = lock(&shared.budget_stopped).iter().cloned().collect();
                skip.extend(shared.claim_filter().skip);
                skip.sort();
                skip.dedup();
                match shared
                    .queue
                    .work_left(cfg.only_batch.as_deref(), &skip)
                    .await
                {
                    Ok(w) if w.soon() => {}
                    Ok(w) if w.budget_stopped > 0 => {
                        stopped = Stopped::WorkLeft(format!(
                            "budget reached: {} job(s) of batch(es) {} left",
                            w.budget_stopped,
                            skip.join(", ")
                        ));
                        break 'claiming;
                    }
                    Ok(_) => {
                        stopped = Stopped::Idle;
                        break 'claiming;
                    }
                    Err(e) => warn!(error = %e, "idle check failed"),
                }
            }
            let wait = match shared.queue.next_due().await {
                Ok(Some(due)) => (due - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(cfg.poll_interval),
                _ => cfg.poll_interval,
            };
            if wait.is_zero() && got > 0 {
                continue;
            }
            let wait = wait.max(Duration::from_millis(5));
            if listener.is_none() && shared.queue.listens() {
                listener = shared.queue.listen().await.ok();
            }
            shared.status.send_modify(|s| s.idle = tasks.is_empty());
            tokio::select! {
                _ = shutdown.cancelled() => break 'claiming,
                _ = tokio::time::sleep(wait) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                ok = recv(&mut listener) => if !ok {
                    // Rebuilt before the next wait; the poll covers what was missed meanwhile.
                    listener = None;
                },
            }
            shared.status.send_modify(|s| {
                s.idle = false;
                s.in_flight = tasks.len();
            });
        }

        // Not asked to stop (window closed, halted, idle): the calls in flight finish and are
        // recorded, however long they take, unless a stop is asked for meanwhile.
        if stopped != Stopped::Shutdown && !tasks.is_empty() {
            info!(
                in_flight = tasks.len(),
                "claiming ended: letting in-flight jobs finish"
            );
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = tasks.join_next() => if next.is_none() { break },
                }
            }
        }
        // Shutdown: stop claiming, let in-flight jobs finish within the grace period.
        if !tasks.is_empty() {
            info!(in_flight = tasks.len(), grace = ?cfg.grace, "stopping: waiting for in-flight jobs");
            let deadline = tokio::time::sleep(cfg.grace);
            tokio::pin!(deadline);
            while !tasks.is_empty() {
                tokio::select! {
                    _ = &mut deadline => break,
                    _ = tasks.join_next() => {}
                }
            }
            if !tasks.is_empty() {
                warn!(
                    handed_back = tasks.len(),
                    "grace period over: handing unfinished jobs back"
                );
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                release_unfinished(&shared, &done_tx).await;
            }
        }
        drop(done_tx);
        if let Err(e) = writer.await {
            error!(error = %e, "completion writer panicked");
        }
        background.cancel();
        let _ = renewer.await;
        let _ = rescuer.await;
        if let Err(e) = shared.queue.worker_stopped(shared.id).await {
            warn!(error = %e, "could not record worker stop");
        }
        info!(worker = %shared.id, ?stopped, "worker stopped");
        Ok(stopped)
    }

    fn spawn_job(
        &self,
        tasks: &mut JoinSet<()>,
        job: Job,
        permit: Option<OwnedSemaphorePermit>,
        hold: Option<OwnedSemaphorePermit>,
        done: mpsc::Sender<(Completion, Ack)>,
    ) {
        let shared = self.shared.clone();
        let handler = self.handler.clone();
        let started = Instant::now();
        let started_at = job.started_at.unwrap_or_else(Utc::now);
        let slot = CallSlot::held(permit, shared.clone());
        lock(&shared.in_flight).insert(
            job.id,
            InFlight {
                attempt: job.attempts,
                started_at,
                started,
                finishing: false,
            },
        );
        let span = info_span!("job", job_id = job.id, batch = job.batch.as_deref().unwrap_or(""),
            model = %job.model, attempt = job.attempts);
        tasks.spawn(
            async move {
                let _in_flight = crate::metrics::InFlightGuard::start();
                let lease = job.lease();
                let result = handler.handle(job.clone(), slot.clone()).await;
                let finish = decide(&job, &result, &shared.config.retry);
                let record = match &result {
                    Ok(s) => s.record.clone(),
                    Err(f) => f.record.clone(),
                };
                match &result {
                    Err(f) if f.class == ErrorClass::Halt => {
                        error!(error = %f.message,
                            "every job would fail like this: pausing claiming, job handed back");
                        shared.pause_for(
                            shared.config.halt_probe_interval,
                            f.message.clone(),
                            true,
                        );
                    }
                    Err(f) if f.class == ErrorClass::HaltBatch => {
                        let batch = job.batch.clone().unwrap_or_default();
                        warn!(error = %f.message, "pausing this batch; job handed back");
                        lock(&shared.budget_stopped).insert(batch.clone());
                        lock(&shared.paused_batches)
                            .insert(batch, Instant::now() + shared.config.halt_probe_interval);
                    }
                    Err(f) if matches!(f.class, ErrorClass::Saturated { .. }) => {
                        let after = match f.class {
                            ErrorClass::Saturated { after } => after,
                            _ => None,
                        };
                        // Jobs running, this one included: it has not given its slot back.
                        let in_flight = shared.running.load(Ordering::SeqCst);
                        let ceiling = {
                            let mut c = lock(&shared.ceiling);
                            c.refused(in_flight, Instant::now());
                            c.get()
                        };
                        shared.status.send_modify(|s| {
                            s.ceiling = ceiling;
                            s.saturated += 1;
                        });
                        warn!(error = %f.message, ceiling,
                            "provider has too many calls in flight: cooling down, job handed back, ceiling lowered");
                        shared.pause_for(
                            after.unwrap_or(SATURATED_DEFAULT_WAIT),
                            format!("provider saturated: {}", f.message),
                            false,
                        );
                        probe_passed(&shared);
                    }
                    Err(f) => {
                        if let ErrorClass::Transient { after: Some(d) } = f.class {
                            // The provider asked everyone to slow down, not just this job.
                            shared.pause_for(d, format!("provider asked to wait: {}", f.message), false);
                        }
                        ceiling_passed(&shared);
                        probe_passed(&shared);
                    }
                    Ok(_) => {
                        if let Some(b) = &job.batch {
                            lock(&shared.budget_stopped).remove(b);
                        }
                        ceiling_passed(&shared);
                        probe_passed(&shared)
                    }
                }
                let completion = Completion {
                    job_id: job.id,
                    lease,
                    started_at,
                    duration: started.elapsed(),
                    finish,
                    record,
                };
                let (outcome, duration_ms) = (completion.finish.outcome(), completion.duration.as_millis());
                let images = match &completion.finish {
                    Finish::Succeeded { images, .. } => images.len(),
                    _ => 0,
                };
                let billed = completion.record.clone();
                let (ack_tx, ack_rx) = oneshot::channel();
                let queued = done.send((completion, ack_tx)).await;
                if queued.is_ok() {
                    // No await between the send and this mark: an abort at shutdown sees
                    // either an unsent result (released) or a queued one (written).
                    if let Some(f) = lock(&shared.in_flight).get_mut(&job.id) {
                        f.finishing = true;
                    }
                }
                slot.give_back();
                drop(hold);
                shared.slot_freed.notify_one();
                if queued.is_err() {
                    error!("completion writer gone; the lease will expire and the job be rescued");
                    return;
                }
                match ack_rx.await {
                    Ok(Ok(true)) => {
                        crate::metrics::attempt_recorded(&job.model, outcome, billed.cost_usd, images);
                        info!(
                            outcome,
                            duration_ms,
                            prompt_tokens = billed.prompt_tokens,
                            completion_tokens = billed.completion_tokens,
                            cost_usd = %billed.cost_usd,
                            "attempt finished"
                        )
                    }
                    Ok(Ok(false)) => warn!(
                        "lease lost before the result was written (another worker took the job over); result dropped"
                    ),
                    Ok(Err(e)) => error!(error = %e,
                        "could not write the result; the lease will expire and the job be rescued"),
                    Err(_) => error!("completion writer stopped before answering"),
                }
                lock(&shared.in_flight).remove(&job.id);
                shared.status.send_modify(|s| s.completed += 1);
            }
            .instrument(span),
        );
    }
}

/// Yields while jobs keep giving slots back, and returns how many are free. Bounded: each round
/// needs another slot freed.
async fn settle(slots: &Semaphore) -> usize {
    let mut free = slots.available_permits();
    loop {
        tokio::task::yield_now().await;
        let now = slots.available_permits();
        if now == free {
            return free;
        }
        free = now;
    }
}

/// A job ended without a saturated refusal: the in-flight ceiling climbs back toward
/// `concurrency`.
fn ceiling_passed(shared: &Shared) {
    let ceiling = {
        let mut c = lock(&shared.ceiling);
        if !c.lowered() {
            return;
        }
        c.passed(Instant::now());
        c.get()
    };
    shared.status.send_modify(|s| {
        if s.ceiling != ceiling {
            s.ceiling = ceiling;
        }
    });
}

/// A job ended without halting: a pending probe passed, so claiming goes back to full speed.
fn probe_passed(shared: &Shared) {
    let mut pause = lock(&shared.pause);
    if pause
        .as_ref()
        .is_some_and(|p| p.probe && p.until <= Instant::now())
    {
        *pause = None;
        shared.status.send_modify(|s| s.paused = None);
        crate::metrics::paused(None);
        info!("probe passed; claiming resumes");
    }
}

async fn release_unfinished(shared: &Shared, done: &mpsc::Sender<(Completion, Ack)>) {
    let unfinished: Vec<(i64, InFlight)> = lock(&shared.in_flight)
        .drain()
        .filter(|(_, f)| !f.finishing)
        .collect();
    for (id, f) in unfinished {
        let (ack, rx) = oneshot::channel();
        let completion = Completion {
            job_id: id,
            lease: crate::queue::Lease {
                worker: shared.id,
                attempt: f.attempt,
            },
            started_at: f.started_at,
            duration: f.started.elapsed(),
            finish: Finish::Released {
                error: "worker shut down before the attempt finished".into(),
                halted: false,
            },
            record: AttemptRecord::default(),
        };
        if done.send((completion, ack)).await.is_ok() {
            match rx.await {
                Ok(Ok(true)) => debug!(job_id = id, "handed back"),
                Ok(Ok(false)) => debug!(job_id = id, "already taken over"),
                Ok(Err(e)) => {
                    warn!(job_id = id, error = %e, "could not hand back; lease will expire")
                }
                Err(_) => {}
            }
        }
    }
}

/// Writes completions in batches: whatever has queued up while the last write ran goes into the
/// next transaction, so load batches itself and a quiet worker writes at once. Database errors are
/// retried with backoff: a result is only dropped if its lease is lost meanwhile.
async fn completion_writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<(Completion, Ack)>) {
    let mut batch: Vec<(Completion, Ack)> = Vec::with_capacity(MAX_COMPLETION_BATCH);
    while rx.recv_many(&mut batch, MAX_COMPLETION_BATCH).await > 0 {
        let (completions, acks): (Vec<Completion>, Vec<Ack>) = batch.drain(..).unzip();
        let mut failures = 0;
        let applied = loop {
            match shared.queue.complete(&completions).await {
                Ok(applied) => break Ok(applied),
                Err(e) => {
                    failures += 1;
                    // Keep the leases alive meanwhile (the renewer does) and try again; after a
                    // long outage, give up on this batch: the leases expire and the jobs are
                    // rescued, so nothing is lost, only an attempt spent.
                    if failures > 12 {
                        break Err(e);
                    }
                    let delay = db_backoff(failures);
                    warn!(error = %e, retry_in = ?delay, jobs = completions.len(),
                        "writing results failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        match applied {
            Ok(applied) => {
                for (ack, ok) in acks.into_iter().zip(applied) {
                    let _ = ack.send(Ok(ok));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for ack in acks {
                    let _ = ack.send(Err(QueueError::Database(sqlx::Error::Protocol(
                        msg.clone(),
                    ))));
                }
            }
        }
    }
}

/// Renews the leases of everything in flight, and the worker's heartbeat, on one timer (and at
/// once when claiming pauses).
async fn renew_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.renew_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = shared.heartbeat_now.notified() => {}
        }
        let held = shared.held();
        match shared
            .queue
            .renew(shared.id, &held, shared.config.lease)
            .await
        {
            Ok(renewed) if renewed.len() < held.len() => {
                let lost: Vec<i64> = held
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| !renewed.contains(id))
                    .collect();
                // Finished jobs race with this renewal; only leases of jobs still running are
                // lost (a job whose result is being written reports its own loss, if any).
                let still: Vec<i64> = {
                    let in_flight = lock(&shared.in_flight);
                    lost.into_iter()
                        .filter(|id| in_flight.get(id).is_some_and(|f| !f.finishing))
                        .collect()
                };
                if !still.is_empty() {
                    warn!(jobs = ?still, "leases lost: another worker took these jobs over");
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "lease renewal failed; will retry"),
        }
        let pause = lock(&shared.pause).clone();
        let (until, reason) = match &pause {
            Some(p) if p.until > Instant::now() || p.probe => {
                (Some(p.until_wall), Some(p.reason.as_str()))
            }
            _ => (None, None),
        };
        if let Err(e) = shared
            .queue
            .worker_heartbeat(shared.id, until, reason)
            .await
        {
            debug!(error = %e, "heartbeat failed");
        }
    }
}

/// Returns expired leases of any worker to pending on a timer.
async fn rescue_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.rescue_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.queue.rescue_expired(RESCUE_BATCH).await {
            Ok(0) => {}
            Ok(n) => {
                warn!(
                    jobs = n,
                    "rescued jobs whose worker stopped renewing their lease"
                );
                // Wake this worker's claimer through the same path as an insert.
                let _ = shared.queue.wake_workers().await;
            }
            Err(e) => debug!(error = %e, "rescue failed; will retry"),
        }
    }
}

/// Waits for a notification. Returns true on one, false if the listener is absent or failed.
async fn recv(listener: &mut Option<sqlx::postgres::PgListener>) -> bool {
    match listener {
        Some(l) => match l.recv().await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "notification listener failed; reconnecting");
                false
            }
        },
        None => std::future::pending().await,
    }
}

fn db_backoff(failures: u32) -> Duration {
    let policy = RetryPolicy {
        base: Duration::from_millis(200),
        cap: MAX_DB_BACKOFF,
    };
    // Never zero: a tight loop against a dead database helps nobody.
    policy.delay(failures, None).max(Duration::from_millis(50))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A handler made from a closure, for small handlers and tests.
pub struct FnHandler<F>(pub F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Success, Failure>> + Send,
{
    fn handle(
        &self,
        job: Job,
        _slot: CallSlot,
    ) -> impl Future<Output = Result<Success, Failure>> + Send {
        (self.0)(job)
    }
}
