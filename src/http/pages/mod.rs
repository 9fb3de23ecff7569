//! The dashboard: server-rendered pages at `/` on the same server and behind the same access
//! rules as the API. Overview, a batch's gallery, a job, and a search; forms to retry, cancel
//! and set budgets; images streamed through [`media`]. Templates are askama files under
//! `templates/dashboard/` (checked when the crate compiles, escaping everything they print);
//! the stylesheet and a small script are embedded ([`assets`]).
//!
//! Access ([`gate`]): with a token configured, a browser signs in once at `/signin` and holds an
//! HttpOnly, SameSite=Strict session cookie ([`session`]); a request with neither that cookie nor
//! a bearer token is sent to sign in (pages) or refused (everything else). Every changing form
//! carries the session's CSRF token, checked in constant time. `--read-only`, or a session made
//! with the read token, shows no action and refuses every change.
//!
//! Every answer carries a strict Content-Security-Policy: scripts and styles only from this
//! server's files, no inline script, no inline style, images from here (and `data:` for the
//! ThumbHash placeholders, and the public base URL when images are linked there).
//!
//! The overview's whole-table figures (counts and spend per batch: the one statement that reads
//! every row) are cached for [`TOTALS_FRESH`] and refreshed in the background, so at a million
//! jobs a page costs a few indexed statements.

mod assets;
mod handlers;
mod media;
mod session;
pub mod view;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::HttpState;
use super::auth::Access;
use crate::queue::QueueError;
use crate::queue::pages::TableTotals;
use session::{Kind, Session};

/// How long the overview's whole-table figures are served before a refresh is started.
pub const TOTALS_FRESH: Duration = Duration::from_secs(3);
/// How often pages poll for changes while visible (the script reads it from the page).
pub const POLL_MS: u64 = 4000;

/// The overview's cached whole-table figures.
#[derive(Clone, Default)]
pub struct TotalsCache(Arc<CacheInner>);

#[derive(Default)]
struct CacheInner {
    slot: Mutex<Option<(Instant, Arc<TableTotals>)>>,
    refreshing: std::sync::atomic::AtomicBool,
}

impl TotalsCache {
    /// The figures, at most [`TOTALS_FRESH`] plus one refresh old; the first call computes them.
    /// Returns them with their age.
    pub async fn get(
        &self,
        queue: &crate::queue::Queue,
    ) -> Result<(Arc<TableTotals>, Duration), QueueError> {
        use std::sync::atomic::Ordering;
        let cached = self.0.slot.lock().ok().and_then(|s| s.clone());
        if let Some((at, totals)) = cached {
            if at.elapsed() > TOTALS_FRESH && !self.0.refreshing.swap(true, Ordering::AcqRel) {
                let me = self.clone();
                let queue = queue.clone();
                tokio::spawn(async move {
                    match queue.table_totals().await {
                        Ok(t) => {
                            me.store(t);
                        }
                        Err(e) => tracing::warn!(error = %e, "refreshing the overview figures"),
                    }
                    me.0.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok((totals, at.elapsed()));
        }
        let t = queue.table_totals().await?;
        Ok((self.store(t), Duration::ZERO))
    }

    /// Forgets the figures (after a change made through the pages, so the next view shows it).
    pub fn invalidate(&self) {
        if let Ok(mut s) = self.0.slot.lock()
            && let Some((at, _)) = s.as_mut()
        {
            *at = Instant::now() - TOTALS_FRESH - Duration::from_secs(1);
        }
    }

    fn store(&self, t: TableTotals) -> Arc<TableTotals> {
        let t = Arc::new(t);
        if let Ok(mut s) = self.0.slot.lock() {
            *s = Some((Instant::now(), t.clone()));
        }
        t
    }
}

/// What the gate decided about a request, for handlers and templates.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Actions are shown and accepted.
    pub can_change: bool,
    /// The CSRF token of the session (empty for bearer-authenticated requests, which need none:
    /// a browser never adds an Authorization header on its own).
    pub csrf: String,
    session: Option<Session>,
    /// Signed in with a token (a sign-out button makes sense).
    pub signed_in: bool,
    pub read_only: bool,
}

impl Ctx {
    /// Whether a changing form carried this session's CSRF token.
    pub fn csrf_ok(&self, auth: &super::auth::Auth, presented: &str) -> bool {
        match &self.session {
            Some(s) => s.csrf_ok(auth, presented),
            None => true,
        }
    }
}

/// The frame every page shares.
#[derive(Clone, Debug)]
pub struct Chrome {
    pub title: String,
    pub css: String,
    pub js: String,
    pub icon: String,
    pub csrf: String,
    pub can_change: bool,
    pub read_only: bool,
    pub signed_in: bool,
    /// Which navigation entry is current.
    pub section: &'static str,
    pub poll_ms: u64,
    pub version: &'static str,
}

impl Chrome {
    pub fn new(title: impl Into<String>, section: &'static str, ctx: Option<&Ctx>) -> Chrome {
        Chrome {
            title: title.into(),
            css: assets::CSS.path.clone(),
            js: assets::JS.path.clone(),
            icon: assets::ICON.path.clone(),
            csrf: ctx.map(|c| c.csrf.clone()).unwrap_or_default(),
            can_change: ctx.is_some_and(|c| c.can_change),
            read_only: ctx.is_some_and(|c| c.read_only),
            signed_in: ctx.is_some_and(|c| c.signed_in),
            section,
            poll_ms: POLL_MS,
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// An error shown as a page.
#[derive(Template)]
#[template(path = "dashboard/error.html")]
pub struct ErrorPage {
    pub c: Chrome,
    pub status: u16,
    pub heading: String,
    pub detail: String,
}

/// A failure of a page handler, shown as [`ErrorPage`].
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub heading: String,
    pub detail: String,
}

impl PageError {
    pub fn new(status: StatusCode, heading: &str, detail: impl Into<String>) -> PageError {
        PageError {
            status,
            heading: heading.to_owned(),
            detail: detail.into(),
        }
    }
}

impl From<QueueError> for PageError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound(id) => PageError::new(
                StatusCode::NOT_FOUND,
                "Not found",
                format!("job {id} does not exist"),
            ),
            QueueError::WrongState { .. } => {
                PageError::new(StatusCode::CONFLICT, "Not possible now", e.to_string())
            }
            QueueError::Database(db) => {
                tracing::warn!(error = %db, "dashboard: database");
                PageError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The database did not answer",
                    "try again in a moment",
                )
            }
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            c: Chrome::new(self.heading.clone(), "", None),
            status: self.status.as_u16(),
            heading: self.heading,
            detail: self.detail,
        };
        (self.status, render(&page)).into_response()
    }
}

/// Renders a template to an HTML answer (a template that fails to render is a 500 page, never a
/// half page).
pub fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(body) => Html(body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

/// The dashboard's routes; [`super::router`] merges them at `/`.
pub fn routes(state: HttpState) -> Router {
    let gated = Router::new()
        .route("/", get(handlers::overview))
        .route("/batches/{batch}", get(handlers::batch))
        .route(
            "/batches/{batch}/retry-failed",
            post(handlers::batch_retry_failed),
        )
        .route(
            "/batches/{batch}/cancel-pending",
            post(handlers::batch_cancel_pending),
        )
        .route("/batches/{batch}/budget", post(handlers::batch_budget))
        .route(
            "/batches/{batch}/report.{format}",
            get(handlers::batch_report),
        )
        .route("/jobs", get(handlers::search))
        .route("/jobs/bulk", post(handlers::bulk))
        .route("/jobs/{id}", get(handlers::job))
        .route("/jobs/{id}/retry", post(handlers::job_retry))
        .route("/jobs/{id}/cancel", post(handlers::job_cancel))
        .route("/jobs/{id}/regenerate", post(handlers::job_regenerate))
        .route("/live/overview", get(handlers::live_overview))
        // The API's event stream behind the pages' access (EventSource cannot send a bearer
        // token; it sends the session cookie).
        .route("/live/events", get(super::events::stream_events))
        .route("/live/batches/{batch}", get(handlers::live_batch))
        .route("/media/{job}/{index}/{spec}", get(media::serve))
        .route("/signout", post(signout))
        .layer(middleware::from_fn_with_state(state.clone(), gate));
    Router::new()
        .route("/signin", get(signin_form).post(signin))
        .route("/static/{name}", get(assets::serve))
        .merge(gated)
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(state.clone())
        .layer(middleware::from_fn_with_state(state, security_headers))
}

/// The Content-Security-Policy of every page: nothing inline, nothing from elsewhere (but the
/// public image host when images are linked there).
pub fn csp(img_origin: Option<&str>) -> String {
    let extra = img_origin.map(|o| format!(" {o}")).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:{extra}; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
}

/// The origin (`scheme://host[:port]`) of a URL.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty() && !host.contains([' ', ';', '\'', '"']))
        .then(|| format!("{scheme}://{host}"))
}

async fn security_headers(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let img = s
        .storage
        .as_ref()
        .and_then(|st| st.public_url("k"))
        .and_then(|u| origin_of(&u));
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp(img.as_deref())) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    res
}

fn bearer(req: &Request) -> Option<&str> {
    let h = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .map(str::trim)
}

/// Decides who the request is, refuses it or sends it to sign in, and hands handlers a [`Ctx`].
async fn gate(State(s): State<HttpState>, mut req: Request, next: Next) -> Response {
    let auth = &s.auth;
    let session = Session::from_headers(auth, req.headers());
    let mut set_cookie = None;
    let (access, session) = if auth.has_tokens() {
        match session.filter(|s| s.kind != Kind::Open) {
            Some(sess) => {
                let a = if sess.kind == Kind::Full {
                    Access::Full
                } else {
                    Access::Read
                };
                (a, Some(sess))
            }
            None => match bearer(&req).and_then(|t| auth.token_access(t)) {
                Some(a) => (a, None),
                None => return sign_in_first(&req),
            },
        }
    } else {
        let sess = match session.filter(|s| s.kind == Kind::Open) {
            Some(sess) => sess,
            None => {
                let (sess, cookie) = Session::issue(auth, Kind::Open);
                set_cookie = Some(cookie);
                sess
            }
        };
        (Access::Full, Some(sess))
    };
    let can_change = access == Access::Full && !auth.is_read_only();
    let changing = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changing && !can_change {
        let why = if auth.is_read_only() {
            "this server is read-only (--read-only): it changes nothing"
        } else {
            "you signed in with the read token, which may not change anything"
        };
        return PageError::new(StatusCode::FORBIDDEN, "Read-only", why).into_response();
    }
    let ctx = Ctx {
        can_change,
        csrf: session.as_ref().map(|s| s.csrf(auth)).unwrap_or_default(),
        signed_in: auth.has_tokens() && session.is_some(),
        read_only: !can_change,
        session,
    };
    req.extensions_mut().insert(ctx);
    let mut res = next.run(req).await;
    if let Some(c) = set_cookie {
        res.headers_mut().append(header::SET_COOKIE, c);
    }
    res
}

/// A page asked without a session: the sign-in form (after which the browser comes back here);
/// anything else (live updates, images, forms) a 401.
fn sign_in_first(req: &Request) -> Response {
    let page = req.method() == Method::GET
        && !req.uri().path().starts_with("/live/")
        && !req.uri().path().starts_with("/media/");
    if page {
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        return Redirect::to(&format!("/signin?next={}", view::enc(next))).into_response();
    }
    let mut res = PageError::new(
        StatusCode::UNAUTHORIZED,
        "Sign in first",
        "this server needs a token: sign in at /signin, or send Authorization: Bearer <token>",
    )
    .into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// Where to go after signing in: only a path on this server.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

#[derive(Template)]
#[template(path = "dashboard/signin.html")]
struct SignInPage {
    c: Chrome,
    next: String,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct SignInQuery {
    next: Option<String>,
}

async fn signin_form(
    State(s): State<HttpState>,
    axum::extract::Query(q): axum::extract::Query<SignInQuery>,
) -> Response {
    if !s.auth.has_tokens() {
        return Redirect::to("/").into_response();
    }
    render(&SignInPage {
        c: Chrome::new("Sign in", "", None),
        next: safe_next(q.next.as_deref()),
        error: None,
    })
}

#[derive(serde::Deserialize)]
struct SignInForm {
    token: String,
    next: Option<String>,
}

async fn signin(State(s): State<HttpState>, axum::Form(f): axum::Form<SignInForm>) -> Response {
    let next = safe_next(f.next.as_deref());
    if !s.auth.has_tokens() {
        return Redirect::to(&next).into_response();
    }
    match s.auth.token_access(&f.token) {
        Some(access) => {
            let (_, cookie) = Session::issue(&s.auth, Kind::of(access));
            let mut res = Redirect::to(&next).into_response();
            res.headers_mut().append(header::SET_COOKIE, cookie);
            res
        }
        None => (
            StatusCode::UNAUTHORIZED,
            render(&SignInPage {
                c: Chrome::new("Sign in", "", None),
                next,
                error: Some("That token is not valid.".to_owned()),
            }),
        )
            .into_response(),
    }
}

async fn signout() -> Response {
    let mut res = Redirect::to("/signin").into_response();
    res.headers_mut()
        .append(header::SET_COOKIE, Session::clear());
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_nothing_inline() {
        let p = csp(None);
        assert!(p.starts_with("default-src 'none'; script-src 'self'; style-src 'self';"));
        assert!(!p.contains("unsafe"));
        assert!(
            csp(Some("https://cdn.example.com"))
                .contains("img-src 'self' data: https://cdn.example.com;")
        );
        assert_eq!(
            origin_of("https://cdn.example.com/a/b.png").as_deref(),
            Some("https://cdn.example.com")
        );
        assert_eq!(origin_of("https://x.y;evil/a"), None);
    }

    #[test]
    fn sign_in_returns_only_to_this_server() {
        assert_eq!(safe_next(Some("/batches/a")), "/batches/a");
        assert_eq!(safe_next(Some("//evil.example")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
