//! The event stream, independent of its transport (the HTTP server serves it as SSE): a
//! process-wide [`EventHub`] holds one LISTEN connection and wakes every stream; each
//! [`EventStream`] reads the event log by position, so what it yields comes from the database,
//! in an order a reconnect with `Last-Event-ID` resumes without losing or repeating anything.
//!
//! Notifications only say "look again": a lost one (a reconnect of the listener, a pooler that
//! cannot LISTEN) costs at most one poll interval, never an event.

use std::collections::VecDeque;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::queue::events::{Event, EventCursor, FINISHED_CHANNEL};
use crate::queue::{Queue, QueueError};

/// Events read per query.
const PAGE: i64 = 200;
/// How soon a stream looks again after a wake-up that found nothing: the event's transaction
/// has committed, but an older one still running holds it back for a moment.
const RECHECK: Duration = Duration::from_millis(100);

/// One LISTEN connection for all the streams of a process.
#[derive(Debug, Clone)]
pub struct EventHub {
    queue: Queue,
    wake: watch::Receiver<u64>,
    /// Without a notification, streams look again this often.
    poll: Duration,
}

impl EventHub {
    /// Starts listening (unless the queue cannot) until `stop`. `poll` is how often streams
    /// read without a wake-up: the only way through a pooler, a safety net otherwise.
    pub fn start(queue: Queue, poll: Duration, stop: CancellationToken) -> EventHub {
        let (tx, wake) = watch::channel(0u64);
        if queue.listens() {
            tokio::spawn(listen_loop(queue.clone(), tx, stop));
        }
        EventHub { queue, wake, poll }
    }

    /// A stream of the events after `last_event_id` (a client's `Last-Event-ID`), or from now
    /// when `None`; only those of `batch`, if given.
    pub async fn subscribe(
        &self,
        last_event_id: Option<i64>,
        batch: Option<String>,
    ) -> Result<EventStream, QueueError> {
        let mut wake = self.wake.clone();
        // Mark what was announced so far as seen *before* reading, so anything announced after
        // the first read wakes the stream.
        wake.borrow_and_update();
        let cursor = self.queue.event_cursor(last_event_id).await?;
        Ok(EventStream {
            queue: self.queue.clone(),
            batch,
            cursor,
            buffered: VecDeque::new(),
            wake,
            poll: self.poll,
            recheck: false,
        })
    }
}

async fn listen_loop(queue: Queue, tx: watch::Sender<u64>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect_with(queue.pool()).await?;
            l.listen(FINISHED_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "event stream cannot listen; streams poll meanwhile");
                    let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            },
        };
        failures = 0;
        // Anything may have been missed while not listening.
        tx.send_modify(|n| *n += 1);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = listener.recv() => match got {
                    Ok(_) => {
                        while listener.next_buffered().is_some() {}
                        tx.send_modify(|n| *n += 1);
                    }
                    Err(e) => {
                        debug!(error = %e, "event listener lost; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

/// One client's events, in order, each once.
#[derive(Debug)]
pub struct EventStream {
    queue: Queue,
    batch: Option<String>,
    cursor: EventCursor,
    buffered: VecDeque<Event>,
    wake: watch::Receiver<u64>,
    poll: Duration,
    /// The last wake-up found nothing: look again soon.
    recheck: bool,
}

impl EventStream {
    /// The next event, waiting for one as long as it takes.
    pub async fn next(&mut self) -> Result<Event, QueueError> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                self.cursor = EventCursor::after(&e);
                return Ok(e);
            }
            let page = self
                .queue
                .events_after(self.cursor, self.batch.as_deref(), PAGE)
                .await?;
            if !page.is_empty() {
                self.recheck = false;
                self.buffered.extend(page);
                continue;
            }
            let wait = if self.recheck {
                RECHECK.min(self.poll)
            } else {
                self.poll
            };
            self.recheck = false;
            tokio::select! {
                changed = self.wake.changed() => {
                    if changed.is_ok() {
                        self.recheck = true;
                    } else {
                        // The hub is gone: poll.
                        tokio::time::sleep(wait).await;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The stream as a `futures::Stream`, for the SSE handler. It ends after the first error.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event, QueueError>> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut s = state?;
            match s.next().await {
                Ok(e) => Some((Ok(e), Some(s))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}
