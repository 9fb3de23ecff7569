//! Errors as RFC 9457 `application/problem+json`: a stable `type` per kind of problem (clients
//! switch on it), a `title` per type, and a `detail` for a person. Every error the server answers
//! goes through [`Problem`], so no answer leaks an internal error format or a secret.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::queue::QueueError;
use crate::queue::api::SubmitError;

/// The prefix of every problem `type`. A URN: stable, and it does not pretend to be a page.
pub const TYPE_PREFIX: &str = "urn:imagegen:problem:";

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProblemBody {
    /// Stable identifier of the kind of problem, e.g. `urn:imagegen:problem:not-found`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem (the same for every answer of one type).
    pub title: String,
    pub status: u16,
    /// What happened in this case, for a person.
    pub detail: String,
    /// The database constraint that refused a row (422 `constraint-violation`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub constraint: Option<String>,
    /// The position of the refused job in a submitted array (0-based).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub index: Option<usize>,
}

/// An error answer. Build one with a constructor per kind.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    constraint: Option<String>,
    index: Option<usize>,
    /// `WWW-Authenticate` for a 401.
    challenge: bool,
}

impl Problem {
    fn new(status: StatusCode, slug: &'static str, title: &'static str, detail: String) -> Self {
        Problem {
            status,
            slug,
            title,
            detail,
            constraint: None,
            index: None,
            challenge: false,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable type of this problem.
    pub fn kind(&self) -> String {
        format!("{TYPE_PREFIX}{}", self.slug)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            detail.into(),
        )
    }

    pub fn method_not_allowed(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "The route does not have this method",
            detail.into(),
        )
    }

    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "The body is not valid JSON",
            detail.into(),
        )
    }

    pub fn invalid_parameter(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "A path or query parameter is invalid",
            detail.into(),
        )
    }

    pub fn invalid_body(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-body",
            "The body does not have the expected shape",
            detail.into(),
        )
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "The body is too large",
            detail.into(),
        )
    }

    pub fn uri_too_long(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::URI_TOO_LONG,
            "query-too-long",
            "The query string is too long",
            detail.into(),
        )
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "The body must be application/json",
            detail.into(),
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Problem {
            challenge: true,
            ..Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "A valid bearer token is required",
                detail.into(),
            )
        }
    }

    pub fn read_only(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::FORBIDDEN,
            "read-only",
            "This server or token may not change anything",
            detail.into(),
        )
    }

    pub fn key_reused(detail: impl Into<String>, index: usize) -> Self {
        Problem {
            index: Some(index),
            ..Problem::new(
                StatusCode::CONFLICT,
                "idempotency-key-reused",
                "The idempotency key was used for a different job",
                detail.into(),
            )
        }
    }

    pub fn wrong_state(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::CONFLICT,
            "wrong-state",
            "The job's state does not allow this",
            detail.into(),
        )
    }

    pub fn too_many(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too-many-jobs",
            "Too many jobs in one request",
            detail.into(),
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "A service this answer needs is unavailable",
            detail.into(),
        )
    }

    /// What the client asks to resume from is no longer kept (an event pruned from the log).
    pub fn gone(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::GONE,
            "gone",
            "No longer available",
            detail.into(),
        )
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail.into(),
        )
    }

    /// A database error, mapped to what it means for the client. A constraint violation is a
    /// 422 naming the constraint in the database's own words.
    pub fn database(e: &sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = e {
            if let Some(c) = db.constraint() {
                return Problem {
                    constraint: Some(c.to_owned()),
                    ..Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "constraint-violation",
                        "The database refused the row",
                        format!("rejected by the database: {c} ({})", db.message()),
                    )
                };
            }
            let code = db.code().unwrap_or_default();
            // Class 22: data exceptions (a NUL byte in text, a number out of range, bad JSON).
            if code.starts_with("22") {
                return Problem::invalid_value(format!(
                    "rejected by the database: {}",
                    db.message()
                ));
            }
            if code == "57014" {
                return Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "query-timeout",
                    "The query took too long",
                    "the listing took too long and was cancelled; narrow it with a batch or \
                     state filter"
                        .to_owned(),
                );
            }
        }
        tracing::warn!(error = %e, "database error answering a request");
        Problem::unavailable("the database could not answer; try again")
    }

    pub fn invalid_value(detail: impl Into<String>) -> Self {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-value",
            "A value is malformed or out of range",
            detail.into(),
        )
    }

    /// For errors caused by a path or query parameter: a value the database refused (a NUL
    /// byte) is a 400 about the parameter, not a 422 about a body.
    pub fn from_parameter(e: QueueError) -> Self {
        let p = Problem::from(e);
        if p.slug == "invalid-value" {
            return Problem::invalid_parameter(p.detail);
        }
        p
    }

    /// The same problem, about the job at `index` of a submitted array.
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    fn with_index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self.detail = format!("job {index}: {}", self.detail);
        self
    }

    pub fn body(&self) -> ProblemBody {
        ProblemBody {
            kind: self.kind(),
            title: self.title.to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            constraint: self.constraint.clone(),
            index: self.index,
        }
    }
}

impl From<QueueError> for Problem {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotFound(id) => Problem::not_found(format!("job {id} does not exist")),
            QueueError::WrongState { .. } => Problem::wrong_state(e.to_string()),
            QueueError::Database(db) => Problem::database(&db),
        }
    }
}

impl From<SubmitError> for Problem {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Item { index, source } => Problem::database(&source).with_index(index),
            SubmitError::Database(db) => Problem::database(&db),
            SubmitError::KeyReused { index, .. } => Problem::key_reused(e.to_string(), index),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut res = (self.status, body).into_response();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"imagegen\""),
            );
        }
        res
    }
}
