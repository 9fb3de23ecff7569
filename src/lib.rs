//! imagegen: a background worker that turns rows in a Postgres jobs table into images in
//! S3-compatible storage.
//!
//! Other applications insert rows into `imagegen.jobs` with plain SQL; `imagegen worker` claims
//! them, calls OpenRouter's Gemini image models, stores the images and records URLs, tokens and
//! cost on the row.
//!
//! Layout:
//! - [`db`]: connecting (creating the database if missing) and migrating.
//! - [`error`]: the transient / permanent / halt classification every module uses.
//! - [`retry`]: the retry policy (exponential backoff with a cap and full jitter).
//! - [`queue`]: the only code that speaks SQL to the jobs tables; one function per state change.
//! - [`worker`]: slots, leases, heartbeats, pauses and shutdown around a pluggable job handler.
//! - [`openrouter`]: the provider client and its local stand-in server.
//! - [`image`]: data-URL decoding, format sniffing, dimensions.
//! - [`storage`]: S3 and local-directory backends and the object key scheme.
//! - [`notify`]: push to other applications: webhook signing, delivery and the outbound guard,
//!   and the event stream (the NOTIFY itself is the database's, see the push migration).
//! - [`pipeline`]: one job end to end: budget, provider call, storage, what to record.
//! - [`http`]: the HTTP server: JSON API with its OpenAPI document, health, `/metrics`, access.
//! - [`metrics`]: the process's Prometheus instruments (names, bounded labels, recording).
//! - [`renditions`]: a job's renditions: specs, the image pool, uploads, the record.
//! - [`batch`]: batches from CSV/JSONL files: templates, validation, submission, reports.
//! - [`prune`]: deleting old jobs and their objects, chunk by chunk.
//! - [`references`]: reference images: checked, stored, encoded once and shared by calls.
//! - [`demo`]: `imagegen demo`, the whole thing against the local stand-in.
//! - [`bench`]: `imagegen bench`, the benchmarks (queue, growth, wake-up, pipeline, enqueue).
//! - `migrations/`: plain SQL, run by [`MIGRATOR`].

pub mod batch;
pub mod bench;
pub mod db;
pub mod demo;
pub mod error;
pub mod http;
pub mod image;
pub mod metrics;
pub mod notify;
pub mod openrouter;
pub mod pipeline;
pub mod prune;
pub mod queue;
pub mod references;
pub mod renditions;
pub mod retry;
pub mod storage;
pub mod worker;

/// The schema migrations in `migrations/`, embedded in the binary. sqlx takes a Postgres advisory
/// lock while migrating, so several processes may run it at once.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
