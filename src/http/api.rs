//! The JSON API under `/api/v1` and its OpenAPI 3.1 document (`GET /api/v1/openapi.json`),
//! generated from these handlers and the queue's types by utoipa, so the document cannot drift
//! from the code. Handlers parse and validate, call one queue function, and shape the answer.

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::HttpState;
use super::problem::{Problem, ProblemBody};
use crate::queue::NewJob;
use crate::queue::api::{
    AttemptView, BatchSummary, ImageView, JobFilter, JobOrder, JobView, MAX_PAGE, MAX_SUBMIT,
    ModelSpend, STATES, Settings, StateCounts, Stats, Throughput, WorkerView,
};

/// The page size when `limit` is not given.
pub const DEFAULT_PAGE: i64 = 50;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "imagegen",
        description = "Submit image jobs, follow them, and steer batches and budgets. Errors are \
                       RFC 9457 application/problem+json with a stable `type`. Money is a decimal \
                       string in USD.",
    ),
    paths(
        list_jobs, submit_jobs, get_job, retry_job, cancel_job, list_batches, get_batch,
        set_batch_budget, retry_failed, cancel_pending, list_workers, stats, get_daily_budget,
        set_daily_budget, super::events::stream_events
    ),
    components(schemas(
        JobView, ImageView, AttemptView, JobList, JobRequest, SubmitBody, SubmittedJob,
        SubmittedJobs, SubmitAnswer, ProblemBody, BatchSummary, BatchList, StateCounts, BudgetRequest,
        BatchChange, WorkerView, WorkerList, Stats, ModelSpend, Throughput, Settings
    )),
    modifiers(&BearerAuth),
    security((), ("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API routes (relative to `/api/v1`).
pub fn routes(state: HttpState) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/jobs", get(list_jobs).post(submit_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/batches", get(list_batches))
        .route("/batches/{batch}", get(get_batch))
        .route("/batches/{batch}/budget", put(set_batch_budget))
        .route("/batches/{batch}/retry-failed", post(retry_failed))
        .route("/batches/{batch}/cancel-pending", post(cancel_pending))
        .route("/workers", get(list_workers))
        .route("/stats", get(stats))
        .route("/budget/daily", get(get_daily_budget).put(set_daily_budget))
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(state)
}

async fn openapi() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(doc) => ([(header::CONTENT_TYPE, "application/json")], doc).into_response(),
        Err(e) => {
            Problem::internal(format!("the OpenAPI document failed to render: {e}")).into_response()
        }
    }
}

fn path_problem(e: PathRejection) -> Problem {
    Problem::invalid_parameter(e.body_text())
}

fn query_problem(e: QueryRejection) -> Problem {
    Problem::invalid_parameter(e.body_text())
}

/// Reads a JSON body: 415 without a JSON content type, 400 when it does not parse, 413 over
/// the cap.
fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Value, Problem> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large(format!(
                "the body may have at most {} bytes",
                super::MAX_BODY_BYTES
            ))
        } else {
            Problem::malformed_json(e.body_text())
        }
    })?;
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|t| {
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        });
    if !json_type {
        return Err(Problem::unsupported_media_type(
            "send the body with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| Problem::malformed_json(e.to_string()))
}

fn shaped<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T, Problem> {
    serde_json::from_value(v).map_err(|e| Problem::invalid_body(format!("{what}: {e}")))
}

/// Filters and paging of `GET /jobs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// One state or several separated by commas (pending, running, succeeded, failed,
    /// cancelled).
    #[param(example = "failed,cancelled")]
    pub state: Option<String>,
    /// Only jobs of this batch.
    pub batch: Option<String>,
    /// Only jobs of this model.
    pub model: Option<String>,
    /// Case-insensitive substring of the prompt.
    pub q: Option<String>,
    /// JSON the job's metadata must contain, e.g. `{"slug":"why-postgres"}`.
    pub metadata: Option<String>,
    /// Created after this time (RFC 3339).
    pub created_after: Option<DateTime<Utc>>,
    /// Created before this time (RFC 3339).
    pub created_before: Option<DateTime<Utc>>,
    /// `newest` (default) or `batch`: the batch's file order; needs `batch`.
    #[param(example = "newest")]
    pub order: Option<String>,
    /// Jobs per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next` of the previous page, with the same filters.
    pub cursor: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` (with the same filters) for the next page; null on the last page.
    pub next: Option<String>,
}

/// A fingerprint of the filters and order, carried in the cursor so a cursor used with other
/// filters is refused instead of silently skipping or repeating jobs.
fn fingerprint(f: &JobFilter, order: JobOrder) -> String {
    let mut states = f.states.clone();
    states.sort();
    let canon = serde_json::json!([
        states,
        f.batch,
        f.model,
        f.q,
        f.metadata.as_ref().map(|m| m.to_string()),
        f.created_after.map(|t| t.to_rfc3339()),
        f.created_before.map(|t| t.to_rfc3339()),
        order == JobOrder::Batch,
    ]);
    hex::encode(&Sha256::digest(canon.to_string().as_bytes())[..6])
}

fn encode_cursor(after: i64, print: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("1:{after}:{print}"))
}

fn decode_cursor(cursor: &str, print: &str) -> Result<i64, Problem> {
    let bad = || Problem::invalid_parameter("cursor is not one this server made");
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = raw.splitn(3, ':');
    let (Some("1"), Some(id), Some(p)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let id: i64 = id.parse().map_err(|_| bad())?;
    if p != print {
        return Err(Problem::invalid_parameter(
            "cursor belongs to a listing with other filters or order: repeat the filters of \
             the first page",
        ));
    }
    Ok(id)
}

fn filter_of(p: &ListParams) -> Result<(JobFilter, JobOrder), Problem> {
    let mut states = Vec::new();
    if let Some(s) = &p.state {
        for st in s.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !STATES.contains(&st) {
                return Err(Problem::invalid_parameter(format!(
                    "state {st:?} is not one of {}",
                    STATES.join(", ")
                )));
            }
            states.push(st.to_owned());
        }
    }
    let metadata =
        match &p.metadata {
            Some(m) => Some(serde_json::from_str(m).map_err(|e| {
                Problem::invalid_parameter(format!("metadata is not valid JSON: {e}"))
            })?),
            None => None,
        };
    let order = match p.order.as_deref() {
        None | Some("newest") => JobOrder::Newest,
        Some("batch") => JobOrder::Batch,
        Some(o) => {
            return Err(Problem::invalid_parameter(format!(
                "order {o:?} is neither newest nor batch"
            )));
        }
    };
    if order == JobOrder::Batch && p.batch.is_none() {
        return Err(Problem::invalid_parameter(
            "order=batch needs a batch filter",
        ));
    }
    let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    Ok((
        JobFilter {
            states,
            batch: p.batch.clone(),
            model: nonempty(&p.model),
            q: nonempty(&p.q),
            metadata,
            created_after: p.created_after,
            created_before: p.created_before,
        },
        order,
    ))
}

/// List jobs, newest first (or in a batch's file order), with filters and a cursor.
#[utoipa::path(get, path = "/api/v1/jobs", params(ListParams), tag = "jobs",
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 400, description = "A parameter is invalid", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The database could not answer in time", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn list_jobs(
    State(s): State<HttpState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<JobList>, Problem> {
    let Query(p) = params.map_err(query_problem)?;
    let limit = p.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::invalid_parameter(format!(
            "limit must be 1 to {MAX_PAGE}"
        )));
    }
    let (filter, order) = filter_of(&p)?;
    let print = fingerprint(&filter, order);
    let after = match &p.cursor {
        Some(c) => Some(decode_cursor(c, &print)?),
        None => None,
    };
    let page = s
        .queue
        .list_jobs(&filter, order, after, limit)
        .await
        .map_err(Problem::from_parameter)?;
    Ok(Json(JobList {
        next: page.next_after.map(|a| encode_cursor(a, &print)),
        jobs: page.jobs,
    }))
}

/// The largest magnitude of a number in `metadata`: Postgres keeps any, but prints them in full,
/// and near the limits of a double that text no longer reads back as one.
pub const MAX_METADATA_NUMBER: f64 = 1e300;

fn numbers_fit(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.as_f64().is_some_and(|f| f.abs() < MAX_METADATA_NUMBER),
        serde_json::Value::Array(a) => a.iter().all(numbers_fit),
        serde_json::Value::Object(o) => o.values().all(numbers_fit),
        _ => true,
    }
}

/// A job to submit: the same fields and defaults as the `imagegen.jobs` table.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// 1 to 8,000 characters, not blank (`jobs_prompt_not_blank`, `jobs_prompt_max_length`).
    #[schema(
        example = "A calm lake at dawn, blog header",
        min_length = 1,
        max_length = 8000,
        pattern = r"\S"
    )]
    pub prompt: String,
    /// Default 16:9 (`jobs_aspect_ratio_valid`).
    #[schema(pattern = r"^(1:1|2:3|3:2|3:4|4:3|4:5|5:4|9:16|16:9|21:9)$")]
    pub aspect_ratio: Option<String>,
    /// Default google/gemini-2.5-flash-image (`jobs_model_format`).
    #[schema(pattern = r"^[A-Za-z0-9._-]+/[A-Za-z0-9._:-]+$", max_length = 200)]
    pub model: Option<String>,
    /// 1K, 2K or 4K (`jobs_image_size_valid`).
    #[schema(pattern = r"^(1K|2K|4K)$")]
    pub image_size: Option<String>,
    /// Up to 200 characters, not blank (`jobs_batch_valid`).
    #[schema(pattern = r"\S", max_length = 200)]
    pub batch: Option<String>,
    /// -1000 to 1000, higher first (default 0; `jobs_priority_range`).
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i32>,
    /// Not before this time (default now).
    pub run_at: Option<DateTime<Utc>>,
    /// A repeat with the same key and the same job returns the existing job.
    #[schema(pattern = r"\S")]
    pub idempotency_key: Option<String>,
    /// 1 to 25 (default 3; `jobs_max_attempts_range`).
    #[schema(minimum = 1, maximum = 25)]
    pub max_attempts: Option<i32>,
    /// Any JSON, kept untouched.
    pub metadata: Option<serde_json::Value>,
    /// Where to POST the finished job as a signed webhook (http or https; `jobs_callback_url_valid`).
    #[schema(max_length = 2000, pattern = r"^[hH][tT][tT][pP][sS]?://")]
    pub callback_url: Option<String>,
    /// Renditions to make of each image: `og`, `thumb`, `webp`, `WxH.fmt`, `Ww.fmt` (fmt jpg,
    /// jpeg, png or webp; at most 8; `jobs_renditions_valid`). `thumb` is made anyway.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub renditions: Vec<String>,
    /// Up to 4 reference images sent with the prompt (style, logo, product photo): https URLs,
    /// or keys of objects in the worker's storage. PNG, JPEG, WebP or GIF, 7 MB each
    /// (`jobs_reference_images_valid`; format and size are checked before the call).
    #[serde(default)]
    #[schema(max_items = 4)]
    pub reference_images: Vec<String>,
}

impl From<JobRequest> for NewJob {
    fn from(r: JobRequest) -> NewJob {
        NewJob {
            prompt: r.prompt,
            aspect_ratio: r.aspect_ratio,
            model: r.model,
            image_size: r.image_size,
            batch: r.batch,
            priority: r.priority,
            run_at: r.run_at,
            idempotency_key: r.idempotency_key,
            max_attempts: r.max_attempts,
            metadata: r.metadata,
            callback_url: r.callback_url,
            renditions: r.renditions,
            reference_images: r.reference_images,
        }
    }
}

/// One job, or an array of up to 1,000 submitted in one transaction.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Only describes the body in the document; the handler reads it by hand.
#[allow(clippy::large_enum_variant)] // A schema descriptor only: never built at run time.
pub enum SubmitBody {
    One(JobRequest),
    Many(Vec<JobRequest>),
}

/// A submitted job: the job, and whether this request created it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmittedJob {
    pub created: bool,
    pub job: JobView,
}

/// The answer to an array submission, in the order of the array.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubmittedJobs {
    pub jobs: Vec<SubmittedJob>,
}

/// A single submission is answered with one [`SubmittedJob`], an array with [`SubmittedJobs`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SubmitAnswer {
    One(Box<SubmittedJob>),
    Many(SubmittedJobs),
}

/// Submit one job or an array of jobs: all or nothing. 201 when anything was created, 200 when
/// every job existed already under its idempotency key.
#[utoipa::path(post, path = "/api/v1/jobs", request_body = SubmitBody, tag = "jobs",
    responses(
        (status = 201, description = "Created (a single job: SubmittedJob; an array: SubmittedJobs)", body = SubmitAnswer),
        (status = 200, description = "Nothing created: every job existed under its idempotency key", body = SubmitAnswer),
        (status = 400, description = "The body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "An idempotency key was used for a different job", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "The body is over 1 MiB", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "The body is not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "A job was refused (the detail names the constraint)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The database could not answer", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn submit_jobs(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, Problem> {
    let value = json_body(&headers, body)?;
    let (many, requests): (bool, Vec<JobRequest>) = match value {
        serde_json::Value::Array(items) => {
            if items.is_empty() {
                return Err(Problem::invalid_body("the array is empty"));
            }
            if items.len() > MAX_SUBMIT {
                return Err(Problem::too_many(format!(
                    "{} jobs: at most {MAX_SUBMIT} per request",
                    items.len()
                )));
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(shaped(item, &format!("job {i}"))?);
            }
            (true, out)
        }
        one => (false, vec![shaped(one, "job")?]),
    };
    for (i, r) in requests.iter().enumerate() {
        if let Some(m) = &r.metadata
            && !numbers_fit(m)
        {
            let p = Problem::invalid_value(format!(
                "job {i}: metadata numbers must lie within ±{MAX_METADATA_NUMBER:e}"
            ));
            return Err(if many { p.at(i) } else { p });
        }
    }
    let jobs: Vec<NewJob> = requests.into_iter().map(NewJob::from).collect();
    let submitted = s.queue.submit(&jobs).await?;
    let any_created = submitted.iter().any(|x| x.created);
    let status = if any_created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let items: Vec<SubmittedJob> = submitted
        .into_iter()
        .map(|x| SubmittedJob {
            created: x.created,
            job: x.job,
        })
        .collect();
    let answer = if many {
        SubmitAnswer::Many(SubmittedJobs { jobs: items })
    } else {
        match items.into_iter().next() {
            Some(one) => SubmitAnswer::One(Box::new(one)),
            None => return Err(Problem::internal("the submitted job was not found again")),
        }
    };
    Ok((status, Json(answer)).into_response())
}

const NOT_FOUND: &str = "No such job";

/// One job with its attempts and images.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "The id is not a number", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = NOT_FOUND, body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn get_job(
    State(s): State<HttpState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<JobView>, Problem> {
    let Path(id) = id.map_err(path_problem)?;
    Ok(Json(s.queue.job_view(id).await?))
}

/// Put a failed or cancelled job back to pending with fresh attempts.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, pending again", body = JobView),
        (status = 400, description = "The id is not a number", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = NOT_FOUND, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "The job is neither failed nor cancelled", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn retry_job(
    State(s): State<HttpState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<JobView>, Problem> {
    let Path(id) = id.map_err(path_problem)?;
    s.queue.retry(id).await?;
    Ok(Json(s.queue.job_view(id).await?))
}

/// Cancel a pending job (a running job's call is already paid for).
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job, cancelled", body = JobView),
        (status = 400, description = "The id is not a number", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = NOT_FOUND, body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "The job is not pending", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn cancel_job(
    State(s): State<HttpState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<JobView>, Problem> {
    let Path(id) = id.map_err(path_problem)?;
    s.queue.cancel(id).await?;
    Ok(Json(s.queue.job_view(id).await?))
}

/// Every batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchList {
    pub batches: Vec<BatchSummary>,
}

/// Every batch that has jobs: counts per state, spend, budget, ETA.
#[utoipa::path(get, path = "/api/v1/batches", tag = "batches",
    responses((status = 200, description = "The batches, by name", body = BatchList)))]
async fn list_batches(State(s): State<HttpState>) -> Result<Json<BatchList>, Problem> {
    Ok(Json(BatchList {
        batches: s.queue.batch_summaries().await?,
    }))
}

const BATCH_PARAM: &str = "Batch name, percent-encoded (it may hold `/`)";

/// One batch.
#[utoipa::path(get, path = "/api/v1/batches/{batch}", tag = "batches",
    params(("batch" = String, Path, description = BATCH_PARAM)),
    responses(
        (status = 200, description = "The batch", body = BatchSummary),
        (status = 400, description = "The name is not valid UTF-8", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No job and no budget has this batch", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn get_batch(
    State(s): State<HttpState>,
    batch: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchSummary>, Problem> {
    let Path(batch) = batch.map_err(path_problem)?;
    match s
        .queue
        .batch_summary(&batch)
        .await
        .map_err(Problem::from_parameter)?
    {
        Some(b) => Ok(Json(b)),
        None => Err(Problem::not_found(format!(
            "no job and no budget has batch {batch:?}"
        ))),
    }
}

/// A budget in USD; null removes it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {
    #[schema(value_type = Option<String>, example = "20.00", pattern = r"^[0-9]{1,12}(\.[0-9]{1,8})?$")]
    pub budget_usd: Option<Decimal>,
}

/// Set (or with null remove) a batch's budget: no call starts that could take its spend past it.
#[utoipa::path(put, path = "/api/v1/batches/{batch}/budget", tag = "batches",
    params(("batch" = String, Path, description = BATCH_PARAM)),
    request_body = BudgetRequest,
    responses(
        (status = 200, description = "The batch with its new budget", body = BatchSummary),
        (status = 400, description = "The body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "The budget was removed and the batch has no jobs", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "The body is not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "The budget was refused (the detail names the constraint)", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn set_batch_budget(
    State(s): State<HttpState>,
    batch: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<BatchSummary>, Problem> {
    let Path(batch) = batch.map_err(path_problem)?;
    let req: BudgetRequest = shaped(json_body(&headers, body)?, "budget")?;
    s.queue
        .set_batch_budget(&batch, req.budget_usd)
        .await
        .map_err(Problem::from_parameter)?;
    match s.queue.batch_summary(&batch).await? {
        Some(b) => Ok(Json(b)),
        None => Err(Problem::not_found(format!(
            "batch {batch:?} has no jobs and now no budget"
        ))),
    }
}

/// How many jobs a batch action changed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchChange {
    pub batch: String,
    pub jobs: u64,
}

/// Put every failed job of a batch back to pending.
#[utoipa::path(post, path = "/api/v1/batches/{batch}/retry-failed", tag = "batches",
    params(("batch" = String, Path, description = BATCH_PARAM)),
    responses(
        (status = 200, description = "How many jobs are pending again", body = BatchChange),
        (status = 400, description = "The name is not valid UTF-8", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn retry_failed(
    State(s): State<HttpState>,
    batch: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchChange>, Problem> {
    let Path(batch) = batch.map_err(path_problem)?;
    let jobs = s
        .queue
        .retry_failed(Some(&batch))
        .await
        .map_err(Problem::from_parameter)?;
    Ok(Json(BatchChange { batch, jobs }))
}

/// Cancel every pending job of a batch.
#[utoipa::path(post, path = "/api/v1/batches/{batch}/cancel-pending", tag = "batches",
    params(("batch" = String, Path, description = BATCH_PARAM)),
    responses(
        (status = 200, description = "How many jobs were cancelled", body = BatchChange),
        (status = 400, description = "The name is not valid UTF-8", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn cancel_pending(
    State(s): State<HttpState>,
    batch: Result<Path<String>, PathRejection>,
) -> Result<Json<BatchChange>, Problem> {
    let Path(batch) = batch.map_err(path_problem)?;
    let jobs = s
        .queue
        .cancel_batch(&batch)
        .await
        .map_err(Problem::from_parameter)?;
    Ok(Json(BatchChange { batch, jobs }))
}

/// The running workers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

/// Who runs, since when, paused and why, and how many jobs each holds.
#[utoipa::path(get, path = "/api/v1/workers", tag = "workers",
    responses((status = 200, description = "Workers with a recent heartbeat", body = WorkerList)))]
async fn list_workers(State(s): State<HttpState>) -> Result<Json<WorkerList>, Problem> {
    Ok(Json(WorkerList {
        workers: s.queue.worker_views().await?,
    }))
}

/// Totals, spend today and per model, the daily budget, and the last hour's throughput.
#[utoipa::path(get, path = "/api/v1/stats", tag = "stats",
    responses((status = 200, description = "The installation at a glance", body = Stats)))]
async fn stats(State(s): State<HttpState>) -> Result<Json<Stats>, Problem> {
    Ok(Json(s.queue.stats().await?))
}

/// The daily budget every worker obeys.
#[utoipa::path(get, path = "/api/v1/budget/daily", tag = "stats",
    responses((status = 200, description = "The settings", body = Settings)))]
async fn get_daily_budget(State(s): State<HttpState>) -> Result<Json<Settings>, Problem> {
    Ok(Json(s.queue.settings().await?))
}

/// Set (or with null remove) the daily budget (UTC day, the whole installation).
#[utoipa::path(put, path = "/api/v1/budget/daily", tag = "stats", request_body = BudgetRequest,
    responses(
        (status = 200, description = "The settings", body = Settings),
        (status = 400, description = "The body is not JSON", body = ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "The body is not application/json", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "The budget was refused (the detail names the constraint)", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn set_daily_budget(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Settings>, Problem> {
    let req: BudgetRequest = shaped(json_body(&headers, body)?, "budget")?;
    s.queue.set_daily_budget(req.budget_usd).await?;
    Ok(Json(s.queue.settings().await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_is_bound_to_its_filters() {
        let f = JobFilter {
            batch: Some("b".into()),
            ..JobFilter::default()
        };
        let print = fingerprint(&f, JobOrder::Newest);
        let c = encode_cursor(42, &print);
        assert_eq!(decode_cursor(&c, &print).unwrap(), 42);
        let other = fingerprint(&JobFilter::default(), JobOrder::Newest);
        assert_ne!(print, other);
        assert_eq!(decode_cursor(&c, &other).unwrap_err().status(), 400);
        assert!(decode_cursor("not a cursor", &print).is_err());
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().unwrap()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for p in [
            "/api/v1/jobs",
            "/api/v1/jobs/{id}",
            "/api/v1/batches/{batch}/budget",
            "/api/v1/stats",
        ] {
            assert!(doc["paths"][p].is_object(), "{p} missing");
        }
    }
}
