//! From rows to jobs: every row rendered (prompt, key), its overrides applied, and checked
//! against the rules the database enforces (the named constraints of `imagegen.jobs`), so a bad
//! file is refused with every bad row named before anything is written.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::RowError;
use super::source::{Format, Table};
use super::template::{Template, value_text};
use crate::image::renditions::Spec;
use crate::openrouter::models;
use crate::queue::NewJob;

/// The longest prompt (`jobs_prompt_max_length`).
pub const MAX_PROMPT_CHARS: usize = 8000;
/// The longest batch name (`jobs_batch_valid`).
pub const MAX_BATCH_CHARS: usize = 200;
/// The longest model id (`jobs_model_format`).
pub const MAX_MODEL_CHARS: usize = 200;
/// The longest callback URL (`jobs_callback_url_valid`).
pub const MAX_CALLBACK_CHARS: usize = 2000;
/// The column used as the prompt when there is no template.
pub const PROMPT_COLUMN: &str = "prompt";

/// Columns that override the submission's options for their row.
pub const OVERRIDE_COLUMNS: [&str; 9] = [
    "aspect_ratio",
    "model",
    "image_size",
    "priority",
    "renditions",
    "reference",
    "max_attempts",
    "run_at",
    "callback_url",
];

/// The options every row gets unless it overrides them; `None` is the table's default.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RowDefaults {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

impl RowDefaults {
    /// Checks the options themselves by the same rules as a row's values; `Err` names the
    /// option.
    pub fn check(&self) -> Result<(), String> {
        let named = |opt: &str, r: Result<(), String>| r.map_err(|e| format!("--{opt}: {e}"));
        if let Some(v) = &self.aspect_ratio {
            named("aspect-ratio", check_aspect_ratio(v))?;
        }
        if let Some(v) = &self.model {
            named("model", check_model(v))?;
        }
        if let Some(v) = &self.image_size {
            named("image-size", check_image_size(v))?;
        }
        if let Some(v) = self.priority {
            named("priority", check_priority(i64::from(v)))?;
        }
        named("renditions", check_renditions(&self.renditions))?;
        if let Some(v) = self.max_attempts {
            named("max-attempts", check_max_attempts(i64::from(v)))?;
        }
        if let Some(v) = &self.callback_url {
            named("callback-url", check_callback_url(v))?;
        }
        Ok(())
    }
}

/// How each row's job is made.
#[derive(Debug, Clone)]
pub struct Recipe<'a> {
    pub batch: &'a str,
    /// `None`: the row's `prompt` column, as it is.
    pub template: Option<&'a Template>,
    /// `None`: a hash of the prompt and the options is the key.
    pub key: Option<&'a Template>,
    pub defaults: &'a RowDefaults,
}

/// One row made into a job.
#[derive(Debug, Clone)]
pub struct Planned {
    pub line: u64,
    /// The row's key; the job's idempotency key is `{batch}:{key}`.
    pub key: String,
    /// With every option resolved (aspect ratio and model included), as it will be inserted.
    pub job: NewJob,
}

/// The idempotency key of a row's key in a batch.
pub fn idempotency_key(batch: &str, key: &str) -> String {
    format!("{batch}:{key}")
}

/// Makes every row into a job, or names every row that cannot be one.
pub fn plan(
    table: &Table,
    format: Format,
    recipe: &Recipe<'_>,
) -> Result<Vec<Planned>, Vec<RowError>> {
    let mut errors = Vec::new();
    let prompt_column = Template::field(PROMPT_COLUMN);
    let template = recipe.template.unwrap_or(&prompt_column);
    // A CSV's columns are known up front: a placeholder that is no column fails every row, so it
    // is named once, at the header.
    if format == Format::Csv {
        for (what, t) in [("template", Some(template)), ("key", recipe.key)] {
            let Some(t) = t else { continue };
            for f in t.fields() {
                if !table.columns.iter().any(|c| c == f) {
                    let reason = if recipe.template.is_none() && what == "template" {
                        format!(
                            "no {PROMPT_COLUMN:?} column and no --template (columns: {})",
                            table.columns.join(", ")
                        )
                    } else {
                        format!(
                            "the {what} names {{{f}}}, which is not a column (columns: {})",
                            table.columns.join(", ")
                        )
                    };
                    errors.push(RowError::new(1, reason));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
    }
    let mut planned = Vec::with_capacity(table.rows.len());
    let mut seen: HashMap<String, u64> = HashMap::with_capacity(table.rows.len());
    for row in &table.rows {
        let mut bad = |reason: String| errors.push(RowError::new(row.line, reason));
        let prompt = match template.render(&row.values) {
            Ok(p) => p,
            Err(field) => {
                bad(if recipe.template.is_none() {
                    format!("no {PROMPT_COLUMN:?} field and no --template")
                } else {
                    format!("no field {field:?} for the template's {{{field}}}")
                });
                continue;
            }
        };
        let job = match resolve(recipe, &row.values, prompt) {
            Ok(job) => job,
            Err(reasons) => {
                for r in reasons {
                    bad(r);
                }
                continue;
            }
        };
        let key = match recipe.key {
            Some(k) => match k.render(&row.values) {
                Ok(key) if key.trim().is_empty() => {
                    bad("the key is blank".to_owned());
                    continue;
                }
                Ok(key) => key,
                Err(field) => {
                    bad(format!("no field {field:?} for the key's {{{field}}}"));
                    continue;
                }
            },
            None => content_hash(&job),
        };
        if let Some(first) = seen.get(&key) {
            bad(format!("key {key:?} is also the key of line {first}"));
            continue;
        }
        seen.insert(key.clone(), row.line);
        planned.push(Planned {
            line: row.line,
            job: NewJob {
                idempotency_key: Some(idempotency_key(recipe.batch, &key)),
                ..job
            },
            key,
        });
    }
    if errors.is_empty() {
        Ok(planned)
    } else {
        Err(errors)
    }
}

/// The row's job with its overrides applied, or every reason it is refused.
fn resolve(
    recipe: &Recipe<'_>,
    row: &serde_json::Map<String, Value>,
    prompt: String,
) -> Result<NewJob, Vec<String>> {
    let d = recipe.defaults;
    let mut reasons = Vec::new();
    let mut note = |field: &str, r: Result<(), String>| {
        if let Err(e) = r {
            reasons.push(format!("{field}: {e}"));
        }
    };
    note("prompt", check_prompt(&prompt));
    let aspect_ratio = text(row, "aspect_ratio")
        .or_else(|| d.aspect_ratio.clone())
        .unwrap_or_else(|| "16:9".to_owned());
    note("aspect_ratio", check_aspect_ratio(&aspect_ratio));
    let model = text(row, "model")
        .or_else(|| d.model.clone())
        .unwrap_or_else(|| models::FLASH_IMAGE.to_owned());
    note("model", check_model(&model));
    let image_size = text(row, "image_size").or_else(|| d.image_size.clone());
    if let Some(s) = &image_size {
        note("image_size", check_image_size(s));
    }
    let priority = match integer(row, "priority") {
        Ok(Some(p)) => {
            note("priority", check_priority(p));
            i32::try_from(p).ok()
        }
        Ok(None) => d.priority,
        Err(e) => {
            note("priority", Err(e));
            None
        }
    };
    let max_attempts = match integer(row, "max_attempts") {
        Ok(Some(n)) => {
            note("max_attempts", check_max_attempts(n));
            i32::try_from(n).ok()
        }
        Ok(None) => d.max_attempts,
        Err(e) => {
            note("max_attempts", Err(e));
            None
        }
    };
    let renditions = match list(row, "renditions") {
        Ok(Some(r)) => r,
        Ok(None) => d.renditions.clone(),
        Err(e) => {
            note("renditions", Err(e));
            Vec::new()
        }
    };
    note("renditions", check_renditions(&renditions));
    let run_at = match text(row, "run_at") {
        Some(t) => match DateTime::parse_from_rfc3339(&t) {
            Ok(t) => Some(t.with_timezone(&Utc)),
            Err(e) => {
                note(
                    "run_at",
                    Err(format!("{t:?} is not an RFC 3339 time ({e})")),
                );
                None
            }
        },
        None => d.run_at,
    };
    let callback_url = text(row, "callback_url").or_else(|| d.callback_url.clone());
    if let Some(u) = &callback_url {
        note("callback_url", check_callback_url(u));
    }
    if text(row, "reference").is_some() {
        note(
            "reference",
            Err("reference images are not supported by this version of imagegen".to_owned()),
        );
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    Ok(NewJob {
        prompt,
        aspect_ratio: Some(aspect_ratio),
        model: Some(model),
        image_size,
        batch: Some(recipe.batch.to_owned()),
        priority,
        run_at,
        idempotency_key: None,
        max_attempts,
        metadata: Some(Value::Object(row.clone())),
        callback_url,
        renditions,
        reference_images: Vec::new(),
    })
}

/// The key of a row without `--key`: a hash of what makes its image (prompt and options), so
/// the same row submitted again finds its job and an edited one makes a new job.
pub fn content_hash(job: &NewJob) -> String {
    let mut h = Sha256::new();
    for part in [
        job.prompt.as_str(),
        job.aspect_ratio.as_deref().unwrap_or(""),
        job.model.as_deref().unwrap_or(""),
        job.image_size.as_deref().unwrap_or(""),
        &job.renditions.join(","),
    ] {
        h.update(part.as_bytes());
        // A separator no field holds, so ("ab", "c") and ("a", "bc") differ.
        h.update([0u8]);
    }
    let digest = h.finalize();
    hex::encode(&digest[..16])
}

/// A column's value as text; `None` when the row lacks it or it is empty or null (the
/// submission's option applies).
fn text(row: &serde_json::Map<String, Value>, column: &str) -> Option<String> {
    match row.get(column)? {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        v => Some(value_text(v)),
    }
}

fn integer(row: &serde_json::Map<String, Value>, column: &str) -> Result<Option<i64>, String> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("{s:?} is not a whole number")),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("{n} is not a whole number")),
        Some(other) => Err(format!("{other} is not a whole number")),
    }
}

fn list(row: &serde_json::Map<String, Value>, column: &str) -> Result<Option<Vec<String>>, String> {
    match row.get(column) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(split_list(s))),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("{other} is not a spec")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(format!("{other} is not a list of specs")),
    }
}

/// `og,thumb` or `og thumb` into specs.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `jobs_prompt_not_blank`, `jobs_prompt_max_length`.
pub fn check_prompt(p: &str) -> Result<(), String> {
    if p.trim().is_empty() {
        return Err("the prompt is blank".to_owned());
    }
    let n = p.chars().count();
    if n > MAX_PROMPT_CHARS {
        return Err(format!(
            "the prompt has {n} characters, more than {MAX_PROMPT_CHARS}"
        ));
    }
    Ok(())
}

/// `jobs_aspect_ratio_valid`.
pub fn check_aspect_ratio(r: &str) -> Result<(), String> {
    if models::is_valid_aspect_ratio(r) {
        Ok(())
    } else {
        Err(format!(
            "{r:?} is not one of {}",
            models::ASPECT_RATIOS.join(", ")
        ))
    }
}

/// `jobs_model_format`: `vendor/model`, letters, digits and `._-` (and `:` after the slash).
pub fn check_model(m: &str) -> Result<(), String> {
    let ok = m.chars().count() <= MAX_MODEL_CHARS
        && m.split_once('/').is_some_and(|(vendor, name)| {
            !vendor.is_empty()
                && !name.is_empty()
                && vendor
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{m:?} is not a model id like {:?}",
            models::FLASH_IMAGE
        ))
    }
}

/// `jobs_image_size_valid`.
pub fn check_image_size(s: &str) -> Result<(), String> {
    if models::is_valid_image_size(s) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not one of {}",
            models::IMAGE_SIZES.join(", ")
        ))
    }
}

/// `jobs_priority_range`.
pub fn check_priority(p: i64) -> Result<(), String> {
    if (-1000..=1000).contains(&p) {
        Ok(())
    } else {
        Err(format!("{p} is outside -1000..1000"))
    }
}

/// `jobs_max_attempts_range`.
pub fn check_max_attempts(n: i64) -> Result<(), String> {
    if (1..=25).contains(&n) {
        Ok(())
    } else {
        Err(format!("{n} is outside 1..25"))
    }
}

/// `jobs_renditions_valid`, through the same parser the worker uses.
pub fn check_renditions(specs: &[String]) -> Result<(), String> {
    Spec::parse_list(specs)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// `jobs_batch_valid`.
pub fn check_batch(b: &str) -> Result<(), String> {
    if b.trim().is_empty() {
        return Err("the batch name is blank".to_owned());
    }
    if b.chars().count() > MAX_BATCH_CHARS {
        return Err(format!(
            "the batch name is longer than {MAX_BATCH_CHARS} characters"
        ));
    }
    Ok(())
}

/// `jobs_callback_url_valid` (http or https, a host, no spaces), and a URL that parses; the
/// deliverer checks the resolved address again before each call.
pub fn check_callback_url(u: &str) -> Result<(), String> {
    let lower = u.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    let host_ok = rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty()
    });
    if !host_ok
        || u.chars().any(char::is_whitespace)
        || u.chars().count() > MAX_CALLBACK_CHARS
        || reqwest::Url::parse(u).is_err()
    {
        return Err(format!(
            "{:?} is not an http(s) URL with a host (at most {MAX_CALLBACK_CHARS} characters, no spaces)",
            u.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::source::read;

    fn recipe<'a>(
        t: Option<&'a Template>,
        k: Option<&'a Template>,
        d: &'a RowDefaults,
    ) -> Recipe<'a> {
        Recipe {
            batch: "b",
            template: t,
            key: k,
            defaults: d,
        }
    }

    #[test]
    fn rows_override_options_and_keep_their_columns() {
        let (table, _) = read(
            b"slug,title,aspect_ratio,priority,renditions\na,One,,,\nb,Two,1:1,7,\"og, webp\"\n",
            Format::Csv,
        );
        let t = Template::parse("Header: {title}").unwrap();
        let k = Template::parse("{slug}").unwrap();
        let d = RowDefaults {
            aspect_ratio: Some("3:2".into()),
            renditions: vec!["thumb".into()],
            ..Default::default()
        };
        let p = plan(&table, Format::Csv, &recipe(Some(&t), Some(&k), &d)).unwrap();
        assert_eq!(p[0].job.aspect_ratio.as_deref(), Some("3:2"));
        assert_eq!(p[0].job.renditions, ["thumb"]);
        assert_eq!(p[0].job.idempotency_key.as_deref(), Some("b:a"));
        assert_eq!(p[1].job.aspect_ratio.as_deref(), Some("1:1"));
        assert_eq!(p[1].job.priority, Some(7));
        assert_eq!(p[1].job.renditions, ["og", "webp"]);
        assert_eq!(p[1].job.prompt, "Header: Two");
        assert_eq!(p[1].job.metadata.as_ref().unwrap()["title"], "Two");
    }

    #[test]
    fn every_bad_row_is_named_with_its_reason() {
        let (table, _) = read(
            b"slug,prompt,aspect_ratio,max_attempts,model\na,ok,,,\nb,  ,,,\nc,x,7:3,,\nd,x,,99,\na,x,,,\ne,x,,,nomodel\n",
            Format::Csv,
        );
        let k = Template::parse("{slug}").unwrap();
        let d = RowDefaults::default();
        let errors = plan(&table, Format::Csv, &recipe(None, Some(&k), &d)).unwrap_err();
        let got: Vec<(u64, bool)> = errors
            .iter()
            .map(|e| (e.line, !e.reason.is_empty()))
            .collect();
        assert_eq!(got, [(3, true), (4, true), (5, true), (6, true), (7, true)]);
        assert!(errors[0].reason.contains("blank"), "{}", errors[0]);
        assert!(errors[1].reason.contains("aspect_ratio"), "{}", errors[1]);
        assert!(errors[2].reason.contains("max_attempts"), "{}", errors[2]);
        assert!(errors[3].reason.contains("line 2"), "{}", errors[3]);
        assert!(errors[4].reason.contains("model"), "{}", errors[4]);
    }

    #[test]
    fn unknown_placeholders_of_a_csv_are_named_at_the_header() {
        let (table, _) = read(b"slug,title\na,b\n", Format::Csv);
        let t = Template::parse("{title}: {summary}").unwrap();
        let d = RowDefaults::default();
        let errors = plan(&table, Format::Csv, &recipe(Some(&t), None, &d)).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 1);
        assert!(errors[0].reason.contains("{summary}"));
    }

    #[test]
    fn hash_keys_follow_the_content() {
        let (table, _) = read(b"prompt\nsame\nother\n", Format::Csv);
        let d = RowDefaults::default();
        let p = plan(&table, Format::Csv, &recipe(None, None, &d)).unwrap();
        assert_ne!(p[0].key, p[1].key);
        assert_eq!(p[0].key.len(), 32);
        let (dup, _) = read(b"prompt\nsame\nsame\n", Format::Csv);
        let errors = plan(&dup, Format::Csv, &recipe(None, None, &d)).unwrap_err();
        assert_eq!(errors[0].line, 3);
    }

    #[test]
    fn callback_urls_are_checked_like_the_database_does() {
        assert!(check_callback_url("https://example.com/hook?x=1").is_ok());
        assert!(check_callback_url("HTTP://example.com").is_ok());
        assert!(check_callback_url("ftp://example.com").is_err());
        assert!(check_callback_url("https:///path").is_err());
        assert!(check_callback_url("https://exa mple.com").is_err());
        assert!(check_model("google/gemini-3-pro-image-preview").is_ok());
        assert!(check_model("a/b:free").is_ok());
        assert!(check_model("a:b/c").is_err());
    }
}
