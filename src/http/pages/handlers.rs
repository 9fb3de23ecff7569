//! The pages and their forms. Each handler reads through the queue, shapes a view of ready
//! strings (see [`super::view`]) and renders a template; each form checks the CSRF token, calls
//! one queue function and redirects back with a note of what it did (post, redirect, get).

use std::collections::HashMap;

use askama::Template;
use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::view::{self, Chart, RelTime, batch_href, enc};
use super::{Chrome, Ctx, PageError, media, render};
use crate::http::HttpState;
use crate::queue::api::{JobFilter, JobOrder, JobView, STATES, StateCounts, WorkerView};
use crate::queue::pages::{MAX_BULK, Tile, TileCursor, TileFilter};

/// Tiles on one gallery page.
pub const TILES_PER_PAGE: i64 = 60;
/// Tiles loaded at once (about two screens); the rest load as they scroll near.
const EAGER_TILES: usize = 24;
/// Rows on one search page.
pub const ROWS_PER_PAGE: i64 = 50;
/// Batches listed by spend on the overview.
const SPEND_ROWS: usize = 12;

type PageResult = Result<Response, PageError>;

fn bad_form() -> PageError {
    PageError::new(
        StatusCode::FORBIDDEN,
        "Form expired",
        "the form's security token does not match this session: reload the page and try again",
    )
}

// ---------------------------------------------------------------- overview

#[derive(Debug, Clone)]
pub struct StateCell {
    pub state: &'static str,
    pub count: String,
    pub href: String,
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub state: &'static str,
    pub x: String,
    pub w: String,
}

fn state_cells(c: &StateCounts, base: &str) -> Vec<StateCell> {
    c.pairs()
        .into_iter()
        .map(|(state, n)| StateCell {
            state,
            count: view::count(n),
            href: format!("{base}state={state}"),
        })
        .collect()
}

/// A stacked bar of states, as x/width percentages of an SVG (no inline style needed).
fn segments(c: &StateCounts) -> Vec<Segment> {
    let total = c.total();
    let mut x = 0.0;
    let mut out = Vec::new();
    if total == 0 {
        return out;
    }
    for (state, n) in [
        ("succeeded", c.succeeded),
        ("failed", c.failed),
        ("cancelled", c.cancelled),
        ("running", c.running),
        ("pending", c.pending),
    ] {
        if n == 0 {
            continue;
        }
        let w = n as f64 / total as f64 * 100.0;
        out.push(Segment {
            state,
            x: format!("{x:.3}"),
            w: format!("{w:.3}"),
        });
        x += w;
    }
    out
}

#[derive(Debug, Clone)]
pub struct BatchLine {
    pub name: String,
    pub href: String,
    pub jobs: String,
    pub done: String,
    pub percent: i64,
    pub failed: i64,
    pub cost: String,
    pub budget: Option<String>,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
pub struct WorkerLine {
    pub host: String,
    pub pid: i32,
    pub started: RelTime,
    pub heartbeat: RelTime,
    pub in_flight: i64,
    pub paused: bool,
    pub reason: String,
    pub until: Option<RelTime>,
}

#[derive(Debug, Clone)]
pub struct OverviewView {
    pub states: Vec<StateCell>,
    pub total: String,
    pub spend_today: String,
    pub budget: Option<String>,
    pub budget_percent: i64,
    pub budget_class: &'static str,
    pub in_flight: String,
    pub spend_all: String,
    pub by_spend: Vec<BatchLine>,
    pub more_batches: usize,
    pub active: Vec<BatchLine>,
    pub workers: Vec<WorkerLine>,
    pub paused: usize,
    pub charts: Vec<Chart>,
    pub age_secs: u64,
    pub now: RelTime,
}

fn batch_line(
    name: &str,
    counts: &StateCounts,
    cost: Decimal,
    budget: Option<Decimal>,
) -> BatchLine {
    let total = counts.total();
    let done = counts.succeeded + counts.failed + counts.cancelled;
    BatchLine {
        name: name.to_owned(),
        href: batch_href(name),
        jobs: view::count(total),
        done: view::count(done),
        percent: view::percent(done, total),
        failed: counts.failed,
        cost: view::usd(cost),
        budget: budget.map(view::usd),
        segments: segments(counts),
    }
}

fn worker_line(w: &WorkerView, now: DateTime<Utc>) -> WorkerLine {
    WorkerLine {
        host: w.hostname.clone(),
        pid: w.pid,
        started: RelTime::of(w.started_at, now),
        heartbeat: RelTime::of(w.heartbeat_at, now),
        in_flight: w.in_flight,
        paused: w.paused,
        reason: w
            .pause_reason
            .clone()
            .unwrap_or_else(|| "paused".to_owned()),
        until: w.paused_until.map(|t| RelTime::of(t, now)),
    }
}

async fn overview_view(s: &HttpState) -> Result<OverviewView, PageError> {
    let now = Utc::now();
    let (totals, age) = s.totals.get(&s.queue).await?;
    let today = s.queue.today().await?;
    let hours = s.queue.last_day_by_hour().await?;
    let workers = s.queue.worker_views().await?;
    let (budget, budget_percent, budget_class) = match today.daily_budget_usd {
        Some(b) => {
            let pct = if b > Decimal::ZERO {
                use rust_decimal::prelude::ToPrimitive as _;
                (today.spend_usd / b * Decimal::from(100))
                    .round()
                    .to_i64()
                    .unwrap_or(100)
            } else {
                100
            };
            let class = match pct {
                p if p >= 100 => "over",
                p if p >= 80 => "warn",
                _ => "ok",
            };
            (Some(view::usd(b)), pct.clamp(0, 100), class)
        }
        None => (None, 0, "ok"),
    };
    let by_spend: Vec<_> = totals
        .batches
        .iter()
        .take(SPEND_ROWS)
        .map(|b| batch_line(&b.batch, &b.counts, b.cost_usd, b.budget_usd))
        .collect();
    let mut active: Vec<_> = totals
        .batches
        .iter()
        .filter(|b| b.counts.pending + b.counts.running > 0)
        .map(|b| batch_line(&b.batch, &b.counts, b.cost_usd, b.budget_usd))
        .collect();
    active.sort_by(|a, b| a.name.cmp(&b.name));
    let charts = vec![
        view::chart(
            "Images made",
            "ok",
            &hours,
            now,
            |b| b.succeeded as f64,
            |v| view::count(v as i64),
        ),
        view::chart(
            "Failed attempts",
            "bad",
            &hours,
            now,
            |b| (b.failed + b.retried) as f64,
            |v| view::count(v as i64),
        ),
        view::chart(
            "Spend",
            "money",
            &hours,
            now,
            |b| b.cost_usd.try_into().unwrap_or(0.0),
            |v| view::usd(Decimal::try_from(v).unwrap_or_default()),
        ),
    ];
    let workers: Vec<WorkerLine> = workers.iter().map(|w| worker_line(w, now)).collect();
    Ok(OverviewView {
        states: state_cells(&totals.counts, "/jobs?"),
        total: view::count(totals.counts.total()),
        spend_today: view::usd(today.spend_usd),
        budget,
        budget_percent,
        budget_class,
        in_flight: view::usd(today.in_flight_usd),
        spend_all: view::usd(totals.cost_usd),
        more_batches: totals.batches.len().saturating_sub(SPEND_ROWS),
        by_spend,
        active,
        paused: workers.iter().filter(|w| w.paused).count(),
        workers,
        charts,
        age_secs: age.as_secs(),
        now: RelTime::of(now, now),
    })
}

#[derive(Template)]
#[template(path = "dashboard/overview.html")]
struct OverviewPage {
    c: Chrome,
    o: OverviewView,
}

#[derive(Template)]
#[template(path = "dashboard/_overview_live.html")]
struct OverviewLive {
    o: OverviewView,
}

pub async fn overview(State(s): State<HttpState>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let o = overview_view(&s).await?;
    Ok(render(&OverviewPage {
        c: Chrome::new("Overview", "overview", Some(&ctx)),
        o,
    }))
}

#[derive(serde::Serialize)]
struct LiveHtml {
    html: String,
}

pub async fn live_overview(State(s): State<HttpState>) -> PageResult {
    let o = overview_view(&s).await?;
    let html = OverviewLive { o }.render().map_err(render_failed)?;
    Ok(Json(LiveHtml { html }).into_response())
}

fn render_failed(e: askama::Error) -> PageError {
    tracing::error!(error = %e, "template failed to render");
    PageError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The page failed to render",
        "see the server log",
    )
}

// ---------------------------------------------------------------- batch gallery

#[derive(Debug, Clone)]
pub struct TileView {
    pub id: i64,
    pub href: String,
    pub state: String,
    pub label: String,
    pub prompt: String,
    pub error: Option<String>,
    pub thumb: Option<String>,
    pub placeholder: Option<String>,
    pub width: i32,
    pub height: i32,
    /// Succeeded, but made before thumbnails existed.
    pub no_thumb: bool,
    /// No more changes expected (live updates skip it).
    pub settled: bool,
    pub attempts: String,
    pub updated: RelTime,
    /// Far down the page: the browser loads it when scrolled near.
    pub lazy: bool,
}

fn tile_view(s: &HttpState, t: &Tile, now: DateTime<Utc>) -> TileView {
    let (width, height) = match (t.thumb_width, t.thumb_height, t.width, t.height) {
        (Some(w), Some(h), _, _) | (None, None, Some(w), Some(h)) => (w, h),
        _ => (400, 225),
    };
    let thumb = t.thumb_width.map(|_| thumb_src(s, t));
    TileView {
        id: t.id,
        href: format!("/jobs/{}", t.id),
        state: t.state.clone(),
        label: t
            .idempotency_key
            .clone()
            .unwrap_or_else(|| format!("#{}", t.id)),
        prompt: t.prompt.clone(),
        error: (t.state == "failed")
            .then(|| t.last_error.clone().unwrap_or_else(|| "failed".to_owned())),
        no_thumb: t.state == "succeeded" && thumb.is_none(),
        thumb,
        placeholder: t
            .placeholder
            .as_deref()
            .and_then(crate::image::placeholder::placeholder_data_url),
        width,
        height,
        settled: matches!(t.state.as_str(), "succeeded" | "failed" | "cancelled"),
        attempts: format!("{}/{}", t.attempts, t.max_attempts),
        updated: RelTime::of(t.updated_at, now),
        lazy: false,
    }
}

/// The thumbnail's link: the public URL when configured, else the media route. The digest in
/// the media link is the job's update time, which changes whenever a rendition is re-made.
fn thumb_src(s: &HttpState, t: &Tile) -> String {
    if let Some(st) = &s.storage
        && let Some(key) = &t.thumb_key
        && let Some(url) = st.public_url(key)
    {
        return url;
    }
    media::href(
        t.id,
        0,
        "thumb",
        t.thumb_sha256.as_deref().unwrap_or_default(),
    )
}

#[derive(Debug, Clone)]
pub struct BatchHead {
    pub name: String,
    pub href: String,
    pub line: BatchLine,
    pub states: Vec<StateCell>,
    pub budget_remaining: Option<String>,
    pub budget_input: String,
    pub eta: Option<String>,
    pub pending: i64,
    pub failed: i64,
    pub running: i64,
}

#[derive(Template)]
#[template(path = "dashboard/batch.html")]
struct BatchPage {
    c: Chrome,
    b: BatchHead,
    tiles: Vec<TileView>,
    state: String,
    q: String,
    next: Option<String>,
    states: [&'static str; 5],
    done: Option<String>,
    live: String,
    events: String,
}

impl BatchPage {
    fn is_state(&self, s: &str) -> bool {
        self.state == s
    }
}

#[derive(Template)]
#[template(path = "dashboard/_batch_head.html")]
struct BatchHeadLive {
    b: BatchHead,
}

#[derive(Template)]
#[template(path = "dashboard/_tile.html")]
struct TileLive {
    t: TileView,
}

#[derive(Debug, Deserialize, Default)]
pub struct BatchQuery {
    state: Option<String>,
    q: Option<String>,
    after: Option<String>,
    done: Option<String>,
}

fn parse_cursor(s: &str) -> Option<TileCursor> {
    let (seq, id) = s.split_once('-')?;
    let id = id.parse().ok()?;
    let batch_seq = match seq {
        "n" => None,
        s => Some(s.strip_prefix('s')?.parse().ok()?),
    };
    Some(TileCursor { batch_seq, id })
}

fn cursor_text(c: TileCursor) -> String {
    match c.batch_seq {
        Some(s) => format!("s{s}-{}", c.id),
        None => format!("n-{}", c.id),
    }
}

async fn batch_head(s: &HttpState, batch: &str) -> Result<BatchHead, PageError> {
    let Some(sum) = s.queue.batch_summary(batch).await? else {
        return Err(PageError::new(
            StatusCode::NOT_FOUND,
            "No such batch",
            format!("no job and no budget has batch {batch:?}"),
        ));
    };
    let href = batch_href(batch);
    Ok(BatchHead {
        name: batch.to_owned(),
        states: state_cells(&sum.counts, &format!("{href}?")),
        line: batch_line(batch, &sum.counts, sum.cost_usd, sum.budget_usd),
        href,
        budget_remaining: sum.budget_remaining_usd.map(view::usd),
        budget_input: sum
            .budget_usd
            .map(|b| b.normalize().to_string())
            .unwrap_or_default(),
        eta: sum.eta_seconds.map(|secs| {
            view::relative(Utc::now() - chrono::Duration::seconds(secs), Utc::now())
                .replace(" ago", "")
        }),
        pending: sum.counts.pending,
        failed: sum.counts.failed,
        running: sum.counts.running,
    })
}

pub async fn batch(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(batch): Path<String>,
    Query(q): Query<BatchQuery>,
) -> PageResult {
    let b = batch_head(&s, &batch).await?;
    let state = q
        .state
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_default();
    let text = q.q.clone().unwrap_or_default();
    let filter = TileFilter {
        states: if state.is_empty() {
            Vec::new()
        } else {
            vec![state.clone()]
        },
        q: Some(text.trim().to_owned()).filter(|t| !t.is_empty()),
    };
    let after = q.after.as_deref().and_then(parse_cursor);
    let page = s
        .queue
        .batch_tiles(&batch, &filter, after, TILES_PER_PAGE)
        .await?;
    let now = Utc::now();
    let tiles = page
        .tiles
        .iter()
        .enumerate()
        .map(|(i, t)| TileView {
            lazy: i >= EAGER_TILES,
            ..tile_view(&s, t, now)
        })
        .collect();
    let next = page.next.map(|c| {
        format!(
            "{}?state={}&q={}&after={}",
            b.href,
            enc(&state),
            enc(&text),
            cursor_text(c)
        )
    });
    Ok(render(&BatchPage {
        c: Chrome::new(format!("Batch {batch}"), "batches", Some(&ctx)),
        live: format!("/live/batches/{}", enc(&batch)),
        events: format!("/live/events?batch={}", enc(&batch)),
        b,
        tiles,
        state,
        q: text,
        next,
        states: STATES,
        done: q.done,
    }))
}

#[derive(Debug, Deserialize)]
pub struct LiveQuery {
    #[serde(default)]
    ids: String,
}

#[derive(serde::Serialize)]
struct LiveBatch {
    head: String,
    tiles: HashMap<i64, String>,
}

pub async fn live_batch(
    State(s): State<HttpState>,
    Path(batch): Path<String>,
    Query(q): Query<LiveQuery>,
) -> PageResult {
    let head = BatchHeadLive {
        b: batch_head(&s, &batch).await?,
    }
    .render()
    .map_err(render_failed)?;
    let ids: Vec<i64> = q
        .ids
        .split(',')
        .filter_map(|i| i.trim().parse().ok())
        .take(500)
        .collect();
    let now = Utc::now();
    let mut tiles = HashMap::new();
    if !ids.is_empty() {
        for t in s.queue.tiles(&batch, &ids).await? {
            let html = TileLive {
                t: tile_view(&s, &t, now),
            }
            .render()
            .map_err(render_failed)?;
            tiles.insert(t.id, html);
        }
    }
    Ok(Json(LiveBatch { head, tiles }).into_response())
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn batch_retry_failed(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(batch): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    if !ctx.csrf_ok(&s.auth, &f.csrf) {
        return Err(bad_form());
    }
    let n = s.queue.retry_failed(Some(&batch)).await?;
    s.totals.invalidate();
    Ok(back_to_batch(
        &batch,
        &format!("{n} failed job(s) pending again"),
    ))
}

pub async fn batch_cancel_pending(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(batch): Path<String>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    if !ctx.csrf_ok(&s.auth, &f.csrf) {
        return Err(bad_form());
    }
    let n = s.queue.cancel_batch(&batch).await?;
    s.totals.invalidate();
    Ok(back_to_batch(
        &batch,
        &format!("{n} pending job(s) cancelled"),
    ))
}

#[derive(Debug, Deserialize)]
pub struct BudgetForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    budget_usd: String,
}

pub async fn batch_budget(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(batch): Path<String>,
    Form(f): Form<BudgetForm>,
) -> PageResult {
    if !ctx.csrf_ok(&s.auth, &f.csrf) {
        return Err(bad_form());
    }
    let text = f.budget_usd.trim().trim_start_matches('$');
    let budget = if text.is_empty() {
        None
    } else {
        match text.parse::<Decimal>() {
            Ok(d) if d >= Decimal::ZERO => Some(d),
            _ => {
                return Err(PageError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Not a budget",
                    format!(
                        "{text:?} is not an amount in USD (e.g. 20 or 12.50); leave it empty to remove the budget"
                    ),
                ));
            }
        }
    };
    s.queue.set_batch_budget(&batch, budget).await?;
    s.totals.invalidate();
    let note = match budget {
        Some(b) => format!("budget set to {}", view::usd(b)),
        None => "budget removed".to_owned(),
    };
    Ok(back_to_batch(&batch, &note))
}

/// `GET /batches/{batch}/report.{csv|json|html}`: the batch report (see `crate::batch::report`)
/// as a download.
pub async fn batch_report(
    State(s): State<HttpState>,
    Path((batch, format)): Path<(String, String)>,
) -> PageResult {
    use crate::batch::report::{ReportError, ReportFormat, ReportOptions, render};
    let (fmt, ext) = match format.as_str() {
        "csv" => (ReportFormat::Csv, "csv"),
        "json" => (ReportFormat::Json, "json"),
        "html" => (ReportFormat::Html, "html"),
        _ => {
            return Err(PageError::new(
                StatusCode::NOT_FOUND,
                "No such report",
                "reports are .csv, .json or .html",
            ));
        }
    };
    // The report's future is not provably Send (a closure over borrowed lines inside it), so it
    // runs on a blocking thread of its own rather than on the server's tasks.
    let (queue, storage, name) = (s.queue.clone(), s.storage.clone(), batch.clone());
    let runtime = tokio::runtime::Handle::current();
    let made = tokio::task::spawn_blocking(move || {
        runtime.block_on(render(
            &queue,
            storage.as_ref(),
            &name,
            fmt,
            &ReportOptions::default(),
        ))
    })
    .await
    .map_err(|e| {
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The report could not be made",
            e.to_string(),
        )
    })?;
    let body = made.map_err(|e| match e {
        ReportError::NoJobs(_) => {
            PageError::new(StatusCode::NOT_FOUND, "No such batch", e.to_string())
        }
        ReportError::Queue(q) => q.into(),
        other => {
            tracing::warn!(error = %other, "batch report");
            PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The report could not be made",
                other.to_string(),
            )
        }
    })?;
    let name: String = batch
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let disposition = format!("attachment; filename=\"{name}-report.{ext}\"");
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                fmt.content_type().to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response())
}

fn back_to_batch(batch: &str, note: &str) -> Response {
    Redirect::to(&format!("{}?done={}", batch_href(batch), enc(note))).into_response()
}

// ---------------------------------------------------------------- job page

#[derive(Debug, Clone)]
pub struct RenditionLine {
    pub spec: String,
    pub url: String,
    pub open: String,
    pub size: String,
    pub bytes: String,
}

#[derive(Debug, Clone)]
pub struct ImageBlock {
    pub index: i32,
    pub src: String,
    pub url: String,
    pub width: i32,
    pub height: i32,
    pub bytes: String,
    pub content_type: String,
    pub sha256: String,
    pub placeholder: Option<String>,
    pub renditions: Vec<RenditionLine>,
}

#[derive(Debug, Clone)]
pub struct AttemptLine {
    pub n: i32,
    pub outcome: String,
    pub http: String,
    pub error: Option<String>,
    pub duration: String,
    pub cost: String,
    pub tokens: String,
    pub started: RelTime,
}

#[derive(Debug, Clone)]
pub struct JobDetail {
    pub id: i64,
    pub state: String,
    pub prompt: String,
    pub model: String,
    pub aspect_ratio: String,
    pub image_size: String,
    pub batch: Option<(String, String)>,
    pub key: Option<String>,
    pub priority: i32,
    pub attempts: String,
    pub prompt_tokens: String,
    pub completion_tokens: String,
    pub cost: String,
    pub created: RelTime,
    pub started: Option<RelTime>,
    pub finished: Option<RelTime>,
    pub run_at: RelTime,
    pub last_error: Option<String>,
    pub metadata: Option<String>,
    pub images: Vec<ImageBlock>,
    pub attempt_lines: Vec<AttemptLine>,
    pub rendition_errors: Vec<(String, String)>,
    pub no_thumb: bool,
    pub can_retry: bool,
    pub can_cancel: bool,
    pub can_regenerate: bool,
}

#[derive(Template)]
#[template(path = "dashboard/job.html")]
struct JobPage {
    c: Chrome,
    j: JobDetail,
    done: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

fn job_detail(s: &HttpState, v: JobView, renditions: Vec<crate::queue::RenditionRow>) -> JobDetail {
    let now = Utc::now();
    let link = |key: &str, index: i32, spec: &str, sha: &str| -> String {
        s.storage
            .as_ref()
            .and_then(|st| st.public_url(key))
            .unwrap_or_else(|| media::href(v.id, index, spec, sha))
    };
    let images: Vec<ImageBlock> = v
        .images
        .iter()
        .map(|i| ImageBlock {
            index: i.index,
            src: link(&i.key, i.index, "original", &i.sha256),
            url: i.url.clone(),
            width: i.width,
            height: i.height,
            bytes: view::bytes(i.bytes),
            content_type: i.content_type.clone(),
            sha256: i.sha256.clone(),
            placeholder: i
                .placeholder
                .as_deref()
                .and_then(crate::image::placeholder::placeholder_data_url),
            renditions: renditions
                .iter()
                .filter(|r| r.index == i.index)
                .map(|r| RenditionLine {
                    spec: r.spec.clone(),
                    url: r.url.clone(),
                    open: link(&r.key, r.index, &r.spec, &r.sha256),
                    size: format!("{}×{}", r.width, r.height),
                    bytes: view::bytes(r.bytes),
                })
                .collect(),
        })
        .collect();
    let no_thumb = v.state == "succeeded"
        && !renditions
            .iter()
            .any(|r| r.index == 0 && r.spec == crate::image::renditions::AUTO_THUMB);
    let rendition_errors = v
        .rendition_errors
        .as_ref()
        .and_then(|e| e.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    JobDetail {
        id: v.id,
        can_retry: matches!(v.state.as_str(), "failed" | "cancelled"),
        can_cancel: v.state == "pending",
        can_regenerate: matches!(v.state.as_str(), "succeeded" | "failed" | "cancelled"),
        state: v.state.clone(),
        prompt: v.prompt.clone(),
        model: v.model.clone(),
        aspect_ratio: v.aspect_ratio.clone(),
        image_size: v.image_size.clone().unwrap_or_else(|| "default".to_owned()),
        batch: v.batch.as_ref().map(|b| (b.clone(), batch_href(b))),
        key: v.idempotency_key.clone(),
        priority: v.priority,
        attempts: format!("{} of {}", v.attempts_used, v.max_attempts),
        prompt_tokens: view::count(v.prompt_tokens),
        completion_tokens: view::count(v.completion_tokens),
        cost: view::usd(v.cost_usd),
        created: RelTime::of(v.created_at, now),
        started: v.started_at.map(|t| RelTime::of(t, now)),
        finished: v.finished_at.map(|t| RelTime::of(t, now)),
        run_at: RelTime::of(v.run_at, now),
        last_error: v.last_error.clone(),
        metadata: v
            .metadata
            .as_ref()
            .map(|m| serde_json::to_string_pretty(m).unwrap_or_else(|_| m.to_string())),
        attempt_lines: v
            .attempts
            .iter()
            .map(|a| AttemptLine {
                n: a.attempt,
                outcome: a.outcome.clone(),
                http: a.http_status.map(|h| h.to_string()).unwrap_or_default(),
                error: a.error.clone(),
                duration: a.duration_ms.map(view::millis).unwrap_or_default(),
                cost: view::usd(a.cost_usd),
                tokens: view::count(a.prompt_tokens + a.completion_tokens),
                started: RelTime::of(a.started_at, now),
            })
            .collect(),
        images,
        rendition_errors,
        no_thumb,
    }
}

pub async fn job(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Query(q): Query<DoneQuery>,
) -> PageResult {
    let v = s.queue.job_view(id).await?;
    let r = s.queue.job_renditions(id).await?;
    Ok(render(&JobPage {
        c: Chrome::new(format!("Job {id}"), "jobs", Some(&ctx)),
        j: job_detail(&s, v, r),
        done: q.done,
    }))
}

pub async fn job_retry(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    if !ctx.csrf_ok(&s.auth, &f.csrf) {
        return Err(bad_form());
    }
    s.queue.retry(id).await?;
    s.totals.invalidate();
    Ok(Redirect::to(&format!("/jobs/{id}?done={}", enc("pending again"))).into_response())
}

pub async fn job_cancel(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> PageResult {
    if !ctx.csrf_ok(&s.auth, &f.csrf) {
        return Err(bad_form());
    }
    s.queue.cancel(id).await?;
    s.totals.invalidate();
    Ok(Redirect::to(&format!("/jobs/{id}?done={}", enc("cancelled"))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct RegenerateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    prompt: String,
}

/// `POST /jobs/{id}/regenerate`: the finished job made again as its next generation, with the
/// edited prompt when it was changed.
pub async fn job_regenerate(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<i64>,
    Form(f): Form<RegenerateForm>,
) -> PageResult {
    if !ctx.csrf_ok(&s.auth, &f.csrf) {
        return Err(bad_form());
    }
    let current = s.queue.job_view(id).await?;
    // Browsers send textarea line ends as CRLF; the stored prompt has what was submitted.
    let edited = f.prompt.replace("\r\n", "\n");
    let new_prompt = (!edited.trim().is_empty() && edited != current.prompt).then_some(edited);
    let generation = s
        .queue
        .regenerate(id, new_prompt.as_deref())
        .await
        .map_err(|e| match e {
            crate::queue::QueueError::Database(db) => {
                // A refused prompt (blank, too long) names its constraint.
                PageError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Prompt refused",
                    crate::http::problem::Problem::database(&db).body().detail,
                )
            }
            other => other.into(),
        })?;
    s.totals.invalidate();
    let note = match new_prompt {
        Some(_) => format!("generation {generation} pending, with the edited prompt"),
        None => format!("generation {generation} pending"),
    };
    Ok(Redirect::to(&format!("/jobs/{id}?done={}", enc(&note))).into_response())
}

// ---------------------------------------------------------------- search

#[derive(Debug, Clone, Default)]
pub struct SearchForm {
    pub states: Vec<String>,
    pub batch: String,
    pub model: String,
    pub q: String,
    pub metadata: String,
}

impl SearchForm {
    fn from_pairs(pairs: &[(String, String)], prefix: &str) -> SearchForm {
        let mut f = SearchForm::default();
        for (k, v) in pairs {
            let Some(k) = k.strip_prefix(prefix) else {
                continue;
            };
            let v = v.trim().to_owned();
            match k {
                "state" if STATES.contains(&v.as_str()) && !f.states.contains(&v) => {
                    f.states.push(v)
                }
                "batch" => f.batch = v,
                "model" => f.model = v,
                "q" => f.q = v,
                "metadata" => f.metadata = v,
                _ => {}
            }
        }
        f
    }

    fn filter(&self) -> Result<JobFilter, String> {
        let metadata = if self.metadata.is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&self.metadata)
                    .map_err(|e| format!("metadata is not valid JSON: {e}"))?,
            )
        };
        let some = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
        Ok(JobFilter {
            states: self.states.clone(),
            batch: some(&self.batch),
            model: some(&self.model),
            q: some(&self.q),
            metadata,
            ..JobFilter::default()
        })
    }

    /// The filter as a query string (`prefix` names the fields, for the bulk form's copy).
    fn query(&self, prefix: &str) -> String {
        let mut parts: Vec<String> = self
            .states
            .iter()
            .map(|s| format!("{prefix}state={}", enc(s)))
            .collect();
        for (k, v) in [
            ("batch", &self.batch),
            ("model", &self.model),
            ("q", &self.q),
            ("metadata", &self.metadata),
        ] {
            if !v.is_empty() {
                parts.push(format!("{prefix}{k}={}", enc(v)));
            }
        }
        parts.join("&")
    }

    fn has(&self, state: &str) -> bool {
        self.states.iter().any(|s| s == state)
    }
}

#[derive(Debug, Clone)]
pub struct JobLine {
    pub id: i64,
    pub href: String,
    pub state: String,
    pub prompt: String,
    pub batch: Option<(String, String)>,
    pub model: String,
    pub cost: String,
    pub created: RelTime,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "dashboard/jobs.html")]
struct JobsPage {
    c: Chrome,
    f: SearchForm,
    rows: Vec<JobLine>,
    next: Option<String>,
    error: Option<String>,
    done: Option<String>,
    states: [&'static str; 5],
}

pub async fn search(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> PageResult {
    let f = SearchForm::from_pairs(&pairs, "");
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let after = value("after").and_then(|a| a.parse::<i64>().ok());
    let done = value("done");
    let now = Utc::now();
    let (rows, next, error) = match f.filter() {
        Err(e) => (Vec::new(), None, Some(e)),
        Ok(filter) => {
            match s
                .queue
                .list_jobs(&filter, JobOrder::Newest, after, ROWS_PER_PAGE)
                .await
            {
                Ok(page) => {
                    let rows = page
                        .jobs
                        .into_iter()
                        .map(|j| JobLine {
                            id: j.id,
                            href: format!("/jobs/{}", j.id),
                            state: j.state,
                            prompt: view::short(&j.prompt, 140),
                            batch: j.batch.as_ref().map(|b| (b.clone(), batch_href(b))),
                            model: j.model,
                            cost: view::usd(j.cost_usd),
                            created: RelTime::of(j.created_at, now),
                            error: j.last_error.map(|e| view::short(&e, 160)),
                        })
                        .collect();
                    let q = f.query("");
                    let next = page.next_after.map(|a| {
                        if q.is_empty() {
                            format!("/jobs?after={a}")
                        } else {
                            format!("/jobs?{q}&after={a}")
                        }
                    });
                    (rows, next, None)
                }
                Err(crate::queue::QueueError::Database(e)) => {
                    tracing::warn!(error = %e, "dashboard search");
                    (
                        Vec::new(),
                        None,
                        Some(
                            "the search took too long or was refused: narrow it (a state or a \
                             batch makes it fast)"
                                .to_owned(),
                        ),
                    )
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(render(&JobsPage {
        c: Chrome::new("Jobs", "jobs", Some(&ctx)),
        f,
        rows,
        next,
        error,
        done,
        states: STATES,
    }))
}

/// `POST /jobs/bulk`: retry or cancel the ticked jobs, or every job the filter (carried as
/// `f_*` fields) matches.
pub async fn bulk(
    State(s): State<HttpState>,
    Extension(ctx): Extension<Ctx>,
    Form(pairs): Form<Vec<(String, String)>>,
) -> PageResult {
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if !ctx.csrf_ok(&s.auth, value("csrf").unwrap_or_default()) {
        return Err(bad_form());
    }
    let action = value("action").unwrap_or_default();
    if !matches!(action, "retry" | "cancel") {
        return Err(PageError::new(
            StatusCode::BAD_REQUEST,
            "Unknown action",
            "choose Retry or Cancel",
        ));
    }
    let f = SearchForm::from_pairs(&pairs, "f_");
    let ids: Vec<i64> = if value("scope") == Some("matching") {
        let filter = f
            .filter()
            .map_err(|e| PageError::new(StatusCode::BAD_REQUEST, "Bad filter", e))?;
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let page = s
                .queue
                .list_jobs(
                    &filter,
                    JobOrder::Newest,
                    after,
                    crate::queue::api::MAX_PAGE,
                )
                .await?;
            ids.extend(page.jobs.iter().map(|j| j.id));
            if ids.len() > MAX_BULK {
                return Err(PageError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Too many jobs",
                    format!(
                        "the filter matches more than {MAX_BULK} jobs: narrow it, or use \
                         `imagegen retry --failed --batch` for a whole batch"
                    ),
                ));
            }
            match page.next_after {
                Some(a) => after = Some(a),
                None => break,
            }
        }
        ids
    } else {
        pairs
            .iter()
            .filter(|(k, _)| k == "id")
            .filter_map(|(_, v)| v.parse().ok())
            .take(MAX_BULK)
            .collect()
    };
    let n = if action == "retry" {
        s.queue.retry_jobs(&ids).await?
    } else {
        s.queue.cancel_jobs(&ids).await?
    };
    s.totals.invalidate();
    let note = if action == "retry" {
        format!(
            "{n} of {} job(s) pending again (only failed and cancelled ones can be)",
            ids.len()
        )
    } else {
        format!(
            "{n} of {} job(s) cancelled (only pending ones can be)",
            ids.len()
        )
    };
    let q = f.query("");
    let sep = if q.is_empty() { "" } else { "&" };
    Ok(Redirect::to(&format!("/jobs?{q}{sep}done={}", enc(&note))).into_response())
}
