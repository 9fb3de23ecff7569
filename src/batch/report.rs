//! The report of a batch: one row per job in file order with its key, the file's columns
//! (`row.` prefixed, so a column named `state` or `key` cannot collide), state, attempts, image
//! URLs, one column per rendition, size, cost and error; as CSV, JSON or a self-contained HTML
//! contact sheet whose thumbnails are embedded as `data:` URLs (past [`MAX_EMBEDDED`] jobs they
//! are linked instead, and the page says so). [`render`] is the one entry point: the CLI's
//! `imagegen batch report` and the dashboard's download call it.

use std::collections::BTreeSet;
use std::time::Duration;

use askama::Template as _;
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::template::value_text;
use crate::queue::batches::ReportRow;
use crate::queue::{Queue, QueueError};
use crate::storage::{Storage, StorageError};

/// Past this many jobs the HTML report links thumbnails instead of embedding them: a contact
/// sheet of 2,000 thumbnails of ~30 kB is already ~80 MB of HTML.
pub const MAX_EMBEDDED: usize = 2000;

/// Thumbnails read from storage at once for an HTML report.
const THUMB_READS: usize = 16;

/// The content types a thumbnail may be embedded as (what renditions are encoded to).
const EMBEDDABLE: [&str; 3] = ["image/webp", "image/png", "image/jpeg"];

/// The report's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Csv,
    Json,
    Html,
}

impl ReportFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ReportFormat::Csv => "text/csv; charset=utf-8",
            ReportFormat::Json => "application/json",
            ReportFormat::Html => "text/html; charset=utf-8",
        }
    }
}

/// How to make a report.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Write presigned URLs valid this long instead of the recorded ones (private buckets).
    pub presign: Option<Duration>,
    /// Embed thumbnails up to this many jobs (HTML).
    pub embed_limit: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            presign: None,
            embed_limit: MAX_EMBEDDED,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("batch {0:?} has no jobs")]
    NoJobs(String),
    #[error("--presign needs the storage the images are in (--storage)")]
    PresignWithoutStorage,
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot encode the report: {0}")]
    Encode(String),
}

/// One job as the report has it.
struct Line {
    key: String,
    id: i64,
    row: Map<String, Value>,
    state: String,
    attempts: i32,
    image_urls: Vec<String>,
    /// Spec -> one URL per image.
    renditions: Map<String, Value>,
    width: Option<i32>,
    height: Option<i32>,
    cost: Decimal,
    error: Option<String>,
    thumb_key: Option<String>,
    thumb_type: Option<String>,
}

/// The report of `batch` as bytes of `format`. `storage` (the one the images are in) is needed
/// to embed thumbnails and to presign; without it the HTML report links thumbnails.
pub async fn render(
    queue: &Queue,
    storage: Option<&Storage>,
    batch: &str,
    format: ReportFormat,
    opts: &ReportOptions,
) -> Result<Vec<u8>, ReportError> {
    let rows = queue.batch_report_rows(batch).await?;
    if rows.is_empty() {
        return Err(ReportError::NoJobs(batch.to_owned()));
    }
    let record = queue.batch_record(batch).await?;
    let mut lines: Vec<Line> = rows.into_iter().map(|r| line(batch, r)).collect();
    if let Some(d) = opts.presign {
        let storage = storage.ok_or(ReportError::PresignWithoutStorage)?;
        for l in &mut lines {
            presign(storage, l, d).await?;
        }
    }
    // The file's columns in file order, then any other metadata keys (jobs added otherwise).
    let mut columns: Vec<String> = record.map(|r| r.columns).unwrap_or_default();
    let mut extra = BTreeSet::new();
    let mut specs = BTreeSet::new();
    for l in &lines {
        for k in l.row.keys() {
            if !columns.contains(k) {
                extra.insert(k.clone());
            }
        }
        specs.extend(l.renditions.keys().cloned());
    }
    columns.extend(extra);
    let specs: Vec<String> = specs.into_iter().collect();
    match format {
        ReportFormat::Csv => csv(&lines, &columns, &specs),
        ReportFormat::Json => json(batch, &lines, &columns, &specs),
        ReportFormat::Html => html(storage, batch, &lines, opts).await,
    }
}

fn line(batch: &str, r: ReportRow) -> Line {
    let prefix = format!("{batch}:");
    let key = match &r.idempotency_key {
        Some(k) => k.strip_prefix(&prefix).unwrap_or(k).to_owned(),
        None => String::new(),
    };
    let row = match r.metadata {
        Some(Value::Object(m)) => m,
        Some(other) => Map::from_iter([("metadata".to_owned(), other)]),
        None => Map::new(),
    };
    let renditions = match r.rendition_urls {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Line {
        key,
        id: r.id,
        row,
        state: r.state,
        attempts: r.attempts,
        image_urls: r.image_urls,
        renditions,
        width: r.width,
        height: r.height,
        cost: r.cost_usd,
        error: r.last_error,
        thumb_key: r.thumb_key,
        thumb_type: r.thumb_type,
    }
}

async fn presign(storage: &Storage, l: &mut Line, d: Duration) -> Result<(), ReportError> {
    for u in &mut l.image_urls {
        *u = storage.presign_recorded_url(u, d).await?;
    }
    for urls in l.renditions.values_mut() {
        if let Value::Array(items) = urls {
            for item in items {
                if let Value::String(u) = item {
                    *u = storage.presign_recorded_url(u, d).await?;
                }
            }
        }
    }
    Ok(())
}

fn rendition_urls(l: &Line, spec: &str) -> Vec<String> {
    match l.renditions.get(spec) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn header(columns: &[String], specs: &[String]) -> Vec<String> {
    let mut h = vec!["key".to_owned(), "job_id".to_owned()];
    h.extend(columns.iter().map(|c| format!("row.{c}")));
    h.extend(
        ["state", "attempts", "image_url", "image_urls"]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    h.extend(specs.iter().map(|s| format!("rendition.{s}")));
    h.extend(
        ["width", "height", "cost_usd", "error"]
            .iter()
            .map(|s| (*s).to_owned()),
    );
    h
}

fn csv(lines: &[Line], columns: &[String], specs: &[String]) -> Result<Vec<u8>, ReportError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let enc = |e: csv::Error| ReportError::Encode(e.to_string());
    w.write_record(header(columns, specs)).map_err(enc)?;
    for l in lines {
        let mut rec: Vec<String> = vec![l.key.clone(), l.id.to_string()];
        rec.extend(
            columns
                .iter()
                .map(|c| l.row.get(c).map(value_text).unwrap_or_default()),
        );
        rec.push(l.state.clone());
        rec.push(l.attempts.to_string());
        rec.push(l.image_urls.first().cloned().unwrap_or_default());
        // URLs hold no spaces, so a space separates them.
        rec.push(l.image_urls.join(" "));
        rec.extend(specs.iter().map(|s| rendition_urls(l, s).join(" ")));
        rec.push(l.width.map(|w| w.to_string()).unwrap_or_default());
        rec.push(l.height.map(|h| h.to_string()).unwrap_or_default());
        rec.push(l.cost.to_string());
        rec.push(l.error.clone().unwrap_or_default());
        w.write_record(&rec).map_err(enc)?;
    }
    w.into_inner()
        .map_err(|e| ReportError::Encode(e.to_string()))
}

fn json(
    batch: &str,
    lines: &[Line],
    columns: &[String],
    specs: &[String],
) -> Result<Vec<u8>, ReportError> {
    let jobs: Vec<Value> = lines
        .iter()
        .map(|l| {
            let mut o = Map::new();
            o.insert("key".into(), Value::from(l.key.clone()));
            o.insert("job_id".into(), Value::from(l.id));
            for c in columns {
                o.insert(
                    format!("row.{c}"),
                    l.row.get(c).cloned().unwrap_or(Value::Null),
                );
            }
            o.insert("state".into(), Value::from(l.state.clone()));
            o.insert("attempts".into(), Value::from(l.attempts));
            o.insert(
                "image_url".into(),
                l.image_urls
                    .first()
                    .cloned()
                    .map_or(Value::Null, Value::from),
            );
            o.insert("image_urls".into(), Value::from(l.image_urls.clone()));
            for s in specs {
                o.insert(format!("rendition.{s}"), Value::from(rendition_urls(l, s)));
            }
            o.insert("width".into(), l.width.map_or(Value::Null, Value::from));
            o.insert("height".into(), l.height.map_or(Value::Null, Value::from));
            o.insert("cost_usd".into(), Value::from(l.cost.to_string()));
            o.insert(
                "error".into(),
                l.error.clone().map_or(Value::Null, Value::from),
            );
            Value::Object(o)
        })
        .collect();
    let doc = serde_json::json!({
        "batch": batch,
        "columns": header(columns, specs),
        "jobs": jobs,
    });
    serde_json::to_vec_pretty(&doc).map_err(|e| ReportError::Encode(e.to_string()))
}

#[derive(askama::Template)]
#[template(path = "batch_report.html")]
struct Sheet<'a> {
    batch: &'a str,
    total: usize,
    counts: Vec<(&'static str, usize)>,
    cost: String,
    generated: String,
    note: Option<String>,
    cards: Vec<Card>,
}

struct Card {
    key: String,
    job_id: i64,
    state: String,
    failed: bool,
    attempts: i32,
    cost: String,
    error: Option<String>,
    /// A `data:` URL, or the thumbnail's URL past the embedding cap.
    thumb: Option<String>,
    /// Why there is no thumbnail.
    missing: String,
    fields: Vec<(String, String)>,
    /// (label, URL): only http(s) and file URLs become links.
    links: Vec<(String, String)>,
}

/// Only these may be an `href` or `src`: nothing a row could turn into script.
fn linkable(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://") || lower.starts_with("file://")
}

async fn html(
    storage: Option<&Storage>,
    batch: &str,
    lines: &[Line],
    opts: &ReportOptions,
) -> Result<Vec<u8>, ReportError> {
    let embed = storage.is_some() && lines.len() <= opts.embed_limit;
    let note = if lines.len() > opts.embed_limit {
        Some(format!(
            "This batch has {} jobs, more than {}: thumbnails are linked, not embedded, so this \
             page shows them only while their URLs can be reached.",
            lines.len(),
            opts.embed_limit
        ))
    } else if storage.is_none() {
        Some(
            "No storage was given: thumbnails are linked, not embedded, so this page shows \
             them only while their URLs can be reached."
                .to_owned(),
        )
    } else {
        None
    };
    let thumbs: Vec<Option<String>> = match storage {
        Some(s) if embed => {
            futures::stream::iter(lines.iter().map(|l| embedded_thumb(s, l)))
                .buffered(THUMB_READS)
                .try_collect()
                .await?
        }
        _ => lines
            .iter()
            .map(|l| rendition_urls(l, "thumb").into_iter().next())
            .collect(),
    };
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for state in crate::queue::api::STATES {
        let n = lines.iter().filter(|l| l.state == state).count();
        if n > 0 {
            counts.push((state, n));
        }
    }
    let cards = lines
        .iter()
        .zip(thumbs)
        .map(|(l, thumb)| {
            let thumb = thumb.filter(|t| t.starts_with("data:image/") || linkable(t));
            let missing = match l.state.as_str() {
                "succeeded" => "no thumbnail",
                "failed" => "failed",
                "cancelled" => "cancelled",
                _ => "not made yet",
            }
            .to_owned();
            let mut links = Vec::new();
            for (i, u) in l.image_urls.iter().enumerate() {
                links.push((format!("image {}", i + 1), u.clone()));
            }
            for (spec, _) in l.renditions.iter() {
                for (i, u) in rendition_urls(l, spec).into_iter().enumerate() {
                    let label = if l.image_urls.len() > 1 {
                        format!("{spec} {}", i + 1)
                    } else {
                        spec.clone()
                    };
                    links.push((label, u));
                }
            }
            links.retain(|(_, u)| linkable(u));
            Card {
                key: l.key.clone(),
                job_id: l.id,
                failed: l.state == "failed",
                state: l.state.clone(),
                attempts: l.attempts,
                cost: l.cost.round_dp(4).to_string(),
                error: l.error.clone().filter(|_| l.state != "succeeded"),
                thumb,
                missing,
                fields: l
                    .row
                    .iter()
                    .map(|(k, v)| (k.clone(), value_text(v)))
                    .collect(),
                links,
            }
        })
        .collect();
    let sheet = Sheet {
        batch,
        total: lines.len(),
        counts,
        cost: lines
            .iter()
            .map(|l| l.cost)
            .sum::<Decimal>()
            .round_dp(4)
            .to_string(),
        generated: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        note,
        cards,
    };
    sheet
        .render()
        .map(String::into_bytes)
        .map_err(|e| ReportError::Encode(e.to_string()))
}

/// The job's thumbnail read from storage as a `data:` URL; `None` when it has none.
async fn embedded_thumb(storage: &Storage, l: &Line) -> Result<Option<String>, ReportError> {
    let (Some(key), Some(ty)) = (&l.thumb_key, &l.thumb_type) else {
        return Ok(None);
    };
    if !EMBEDDABLE.contains(&ty.as_str()) {
        return Ok(None);
    }
    let bytes = storage.get(key).await?;
    Ok(Some(format!(
        "data:{ty};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    )))
}
