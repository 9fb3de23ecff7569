//! `GET /api/v1/events`: finished jobs as Server-Sent Events, read from the event log through the
//! process's [`EventHub`] (one LISTEN connection for every stream). The SSE `id` of each event is
//! its id in `imagegen.events`, so a client that reconnects with `Last-Event-ID` (browsers'
//! `EventSource` does by itself) resumes right after the last event it got: nothing lost, nothing
//! twice, whichever server process it reaches.
//!
//! A stream is long-lived by design. The request timeout of the router bounds only the time to
//! the response head, which a stream sends at once, so it never cuts a stream; a comment line
//! every [`KEEP_ALIVE`] keeps proxies from closing an idle one. Streams end when the server
//! shuts down (see [`HttpState::with_shutdown`]), so a graceful shutdown never waits on them.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use super::HttpState;
use super::problem::Problem;
use crate::queue::QueueError;

/// How often an idle stream sends a keep-alive comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The SSE event name of a finished job.
pub const EVENT_NAME: &str = "job_finished";
/// The longest batch name a filter may give (batch names are far shorter).
const MAX_BATCH_FILTER: usize = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Only events of this batch.
    pub batch: Option<String>,
    /// Resume after this event id, for clients that cannot send the `Last-Event-ID` header
    /// (the header wins when both are given).
    pub last_event_id: Option<i64>,
}

/// Streams job events: one `job_finished` event per job reaching succeeded, failed or cancelled,
/// `id` = the event id, `data` = `{"id", "job_id", "state", "batch", "created_at"}`. Without
/// `Last-Event-ID`, from now on.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventParams,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event id (sent by EventSource on reconnect)")),
    responses(
        (status = 200, description = "A stream of job events (text/event-stream, never ends by itself)", content_type = "text/event-stream", body = String),
        (status = 400, description = "A parameter is invalid", body = super::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 410, description = "The event to resume after is no longer in the log (pruned) or never was", body = super::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The database could not answer", body = super::problem::ProblemBody, content_type = "application/problem+json"),
    ))]
pub async fn stream_events(
    State(s): State<HttpState>,
    headers: HeaderMap,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(p) = params.map_err(|e| Problem::invalid_parameter(e.body_text()))?;
    let header = match headers.get("last-event-id") {
        None => None,
        Some(v) => {
            let text = v.to_str().unwrap_or("").trim();
            match text.parse::<i64>() {
                Ok(id) => Some(id),
                // An empty Last-Event-ID means "no id" to an EventSource.
                Err(_) if text.is_empty() => None,
                Err(_) => {
                    return Err(Problem::invalid_parameter(
                        "Last-Event-ID must be an event id (an integer)",
                    ));
                }
            }
        }
    };
    let last = header.or(p.last_event_id);
    if p.batch.as_ref().is_some_and(|b| b.len() > MAX_BATCH_FILTER) {
        return Err(Problem::invalid_parameter(format!(
            "batch may have at most {MAX_BATCH_FILTER} bytes"
        )));
    }
    let stream = match s.events.subscribe(last, p.batch).await {
        Ok(stream) => stream,
        Err(QueueError::NotFound(id)) => {
            return Err(Problem::gone(format!(
                "event {id} is not in the event log (pruned after the retention period, or never \
                 written): reconnect without Last-Event-ID and read the jobs that changed meanwhile"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let stop = s.streams.clone();
    let events = stream
        .into_stream()
        .map(|item| {
            Ok::<_, Infallible>(match item {
                Ok(e) => SseEvent::default()
                    .id(e.id.to_string())
                    .event(EVENT_NAME)
                    .data(serde_json::to_string(&e).unwrap_or_default()),
                // The stream ends after this; the client reconnects with its Last-Event-ID.
                Err(e) => {
                    tracing::warn!(error = %e, "event stream: database error; ending the stream");
                    SseEvent::default()
                        .event("error")
                        .data("the database did not answer; reconnect to resume")
                }
            })
        })
        .take_until(stop.cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(s.event_keep_alive))
        .into_response())
}
