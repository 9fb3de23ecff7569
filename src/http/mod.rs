//! The HTTP server: `router(state) -> Router` with the JSON API under `/api/v1` ([`api`]), health
//! probes, `/metrics` ([`metrics`]), the access layer ([`auth`]), and the dashboard's pages at
//! `/` ([`pages`]). Handlers call the queue and hold no SQL; every error answer is a [`problem`].
//!
//! Limits on every request: bodies over [`MAX_BODY_BYTES`] are a 413, query strings over
//! [`MAX_QUERY_BYTES`] a 414, and a request that takes longer than [`REQUEST_TIMEOUT`] is a 503.

pub mod api;
pub mod auth;
pub mod events;
pub mod metrics;
pub mod pages;
pub mod problem;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::notify::events::EventHub;
use crate::queue::Queue;
use crate::storage::Storage;
use auth::{Auth, AuthArgs, AuthError};
use problem::Problem;

/// The largest request body accepted (a submission of 1,000 jobs with long prompts fits).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The longest query string accepted.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// The longest a request may take before it is answered 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a readiness check waits for storage.
pub const READY_STORAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often event streams read the log without a notification: the safety net for a missed
/// one, and the only way through a pooler (which cannot LISTEN).
pub const EVENT_POLL: Duration = Duration::from_secs(2);

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub queue: Queue,
    /// Checked by `/readyz` when set.
    pub storage: Option<Storage>,
    pub exporter: metrics::Exporter,
    pub auth: Auth,
    /// The event streams' shared listener (`GET /api/v1/events`).
    pub events: EventHub,
    /// How often an idle event stream sends a keep-alive comment.
    pub event_keep_alive: Duration,
    /// Cancelled when the server shuts down: ends the event streams, which would otherwise hold
    /// a graceful shutdown open for ever.
    streams: CancellationToken,
    /// Stops the hub's listener once the last clone of the state is gone.
    _hub: std::sync::Arc<tokio_util::sync::DropGuard>,
    /// The dashboard's cached whole-table figures.
    pub totals: pages::TotalsCache,
}

impl HttpState {
    /// State for a server on `queue`; installs the process's metrics recorder if none is yet.
    pub fn new(queue: Queue, storage: Option<Storage>, auth: Auth) -> HttpState {
        let handle = match metrics::install() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "no Prometheus recorder: /metrics shows the queue only");
                None
            }
        };
        let streams = CancellationToken::new();
        let events = EventHub::start(queue.clone(), EVENT_POLL, streams.child_token());
        HttpState {
            exporter: metrics::Exporter::new(queue.clone(), handle),
            queue,
            storage,
            auth,
            events,
            event_keep_alive: events::KEEP_ALIVE,
            _hub: std::sync::Arc::new(streams.clone().drop_guard()),
            streams,
            totals: pages::TotalsCache::default(),
        }
    }

    /// Ends the event streams (and the hub) when `shutdown` is cancelled: pass the token given
    /// to [`serve`], so the graceful shutdown does not wait for streams that never end.
    pub fn with_shutdown(self, shutdown: &CancellationToken) -> HttpState {
        let (shutdown, streams) = (shutdown.clone(), self.streams.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => streams.cancel(),
                _ = streams.cancelled() => {}
            }
        });
        self
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// Checks the access settings for `addr`, then binds it. Refuses (before binding) a
/// non-loopback address without a token or `--no-auth`.
pub async fn bind(addr: SocketAddr, args: &AuthArgs) -> Result<(TcpListener, Auth), HttpError> {
    let auth = Auth::new(args, addr)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    Ok((listener, auth))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets requests in progress
/// finish (each is bounded by [`REQUEST_TIMEOUT`]) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(HttpError::Serve)
}

/// The whole server: API, probes and metrics, behind the access layer and the request limits.
pub fn router(state: HttpState) -> Router {
    let auth = state.auth.clone();
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .layer(middleware::from_fn_with_state(
            auth.clone(),
            auth::require_probe,
        ));
    let dashboard = pages::routes(state.clone());
    let api = api::routes(state.clone())
        .route("/events", get(events::stream_events).with_state(state))
        .layer(middleware::from_fn_with_state(auth, auth::require));
    Router::new()
        .nest("/api/v1", api)
        .merge(probes)
        .merge(dashboard)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(limit_query))
        .layer(middleware::from_fn(common_headers))
        .layer(CompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_| {
            Problem::internal("the server failed answering this request").into_response()
        }))
}

/// A route that exists, asked with a method it does not have.
pub async fn method_not_allowed(req: Request) -> Problem {
    Problem::method_not_allowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

async fn not_found(req: Request) -> Problem {
    Problem::not_found(format!(
        "no such route: {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn limit_query(req: Request, next: Next) -> Response {
    if req.uri().query().is_some_and(|q| q.len() > MAX_QUERY_BYTES) {
        return Problem::uri_too_long(format!(
            "the query string may have at most {MAX_QUERY_BYTES} bytes"
        ))
        .into_response();
    }
    next.run(req).await
}

/// Answers are never cached by intermediaries and never sniffed as another type.
async fn common_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

/// The process lives.
async fn healthz() -> impl IntoResponse {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Postgres answers with the schema this binary expects, and the storage is reachable.
async fn readyz(State(s): State<HttpState>) -> Response {
    let want = crate::MIGRATOR.iter().map(|m| m.version).max();
    match s.queue.schema_version().await {
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database");
            return Problem::unavailable("the database does not answer").into_response();
        }
        Ok(have) if have != want => {
            return Problem::unavailable(format!(
                "the database schema is at migration {} but this binary expects {}: run \
                 `imagegen migrate` (or deploy the matching binary)",
                have.map_or("none".to_owned(), |v| v.to_string()),
                want.map_or("none".to_owned(), |v| v.to_string()),
            ))
            .into_response();
        }
        Ok(_) => {}
    }
    if let Some(storage) = &s.storage {
        match tokio::time::timeout(READY_STORAGE_TIMEOUT, storage.reachable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Problem::unavailable(format!("storage {}: {e}", storage.describe()))
                    .into_response();
            }
            Err(_) => {
                return Problem::unavailable(format!(
                    "storage {} did not answer within {READY_STORAGE_TIMEOUT:?}",
                    storage.describe()
                ))
                .into_response();
            }
        }
    }
    axum::Json(Health {
        status: "ready",
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
}

async fn metrics_text(State(s): State<HttpState>) -> Response {
    let body = s.exporter.render().await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}
