//! The process's instruments: metric names, their bounded labels, and one recording function per
//! event the worker and the pipeline report. Recording goes through the `metrics` facade, so it
//! costs next to nothing when no exporter is installed; `http::metrics` installs the Prometheus
//! one and adds the queue's figures at scrape time.
//!
//! No label takes unbounded values: no job id, prompt or batch; `model` only names models of the
//! price table (any other is `other`); `outcome` is the attempt outcome word; `reason` is `halt`
//! or `cooldown`.

use std::sync::Mutex;
use std::time::Duration;

use rust_decimal::Decimal;

use crate::openrouter::models;

pub const ATTEMPTS_TOTAL: &str = "imagegen_attempts_total";
pub const CALL_DURATION_SECONDS: &str = "imagegen_call_duration_seconds";
pub const COST_USD_TOTAL: &str = "imagegen_cost_usd_total";
pub const IMAGES_TOTAL: &str = "imagegen_images_total";
pub const IN_FLIGHT: &str = "imagegen_in_flight";
pub const PAUSED: &str = "imagegen_paused";
pub const STORAGE_ERRORS_TOTAL: &str = "imagegen_storage_errors_total";
pub const BUILD_INFO: &str = "imagegen_build_info";

/// Buckets of the call-duration histogram: image calls take 1 s to 5 min.
pub const CALL_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
];

/// The reasons a worker pauses claiming, the values of `imagegen_paused{reason}`.
pub const PAUSE_REASONS: [&str; 2] = ["halt", "cooldown"];

/// The `model` label of a model id: itself when it is in the price table, else `other`.
pub fn model_label(model: &str) -> &'static str {
    match model {
        models::FLASH_IMAGE => models::FLASH_IMAGE,
        models::PRO_IMAGE => models::PRO_IMAGE,
        _ => "other",
    }
}

/// Help texts for every process metric (shown in the exposition), and the series that should be
/// present from the start (zero), so alerts see a value before the first event.
pub fn describe() {
    metrics::describe_counter!(
        ATTEMPTS_TOTAL,
        "Attempts whose end this process recorded, by model and outcome"
    );
    metrics::describe_histogram!(
        CALL_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of provider calls (answered or failed), by model"
    );
    metrics::describe_counter!(IMAGES_TOTAL, "Images stored by succeeded attempts");
    metrics::describe_gauge!(IN_FLIGHT, "Jobs this process is working on now");
    metrics::describe_gauge!(
        PAUSED,
        "1 while this worker has paused claiming, by reason (halt: every job would fail; cooldown: the provider asked to wait)"
    );
    metrics::describe_counter!(
        STORAGE_ERRORS_TOTAL,
        "Failed storage operations (upload, read of earlier images)"
    );
    metrics::describe_gauge!(BUILD_INFO, "Always 1; the version of this binary");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(IN_FLIGHT).set(0.0);
    metrics::counter!(IMAGES_TOTAL).absolute(0);
    metrics::counter!(STORAGE_ERRORS_TOTAL).absolute(0);
    paused(None);
}

/// An attempt's end was written: counts it, its cost and its images.
pub fn attempt_recorded(model: &str, outcome: &'static str, cost_usd: Decimal, images: usize) {
    let model = model_label(model);
    metrics::counter!(ATTEMPTS_TOTAL, "model" => model, "outcome" => outcome).increment(1);
    let mut costs = COSTS.lock().unwrap_or_else(|p| p.into_inner());
    match costs.iter_mut().find(|(m, _)| *m == model) {
        Some((_, total)) => *total += cost_usd,
        None => costs.push((model, cost_usd)),
    }
    metrics::counter!(IMAGES_TOTAL).increment(images as u64);
}

/// USD billed per model label, summed exactly. The `metrics` facade has integer counters only,
/// so this counter is kept here and written out by the exporter.
static COSTS: Mutex<Vec<(&'static str, Decimal)>> = Mutex::new(Vec::new());

/// `imagegen_cost_usd_total` per model label so far (every model of the price table, from zero).
pub fn cost_totals() -> Vec<(&'static str, Decimal)> {
    let costs = COSTS.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<(&'static str, Decimal)> = [models::FLASH_IMAGE, models::PRO_IMAGE, "other"]
        .into_iter()
        .map(|m| {
            let total = costs.iter().find(|(k, _)| *k == m).map(|(_, t)| *t);
            (m, total.unwrap_or(Decimal::ZERO))
        })
        .collect();
    out.sort_by_key(|(m, _)| *m);
    out
}

/// A provider call ended, answered or not.
pub fn call_finished(model: &str, took: Duration) {
    metrics::histogram!(CALL_DURATION_SECONDS, "model" => model_label(model))
        .record(took.as_secs_f64());
}

/// A storage operation failed.
pub fn storage_error() {
    metrics::counter!(STORAGE_ERRORS_TOTAL).increment(1);
}

/// Claiming paused (`Some(probe)`: a halt when `probe`, else a cool-down) or resumed (`None`).
pub fn paused(state: Option<bool>) {
    let (halt, cooldown) = match state {
        Some(true) => (1.0, 0.0),
        Some(false) => (0.0, 1.0),
        None => (0.0, 0.0),
    };
    metrics::gauge!(PAUSED, "reason" => PAUSE_REASONS[0]).set(halt);
    metrics::gauge!(PAUSED, "reason" => PAUSE_REASONS[1]).set(cooldown);
}

/// Counts a job as in flight until dropped (also when its task is aborted at shutdown).
pub struct InFlightGuard(());

impl InFlightGuard {
    pub fn start() -> InFlightGuard {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        InFlightGuard(())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}
