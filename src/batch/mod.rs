//! Batches from files: reading CSV and JSONL ([`source`]), prompt and key templates
//! ([`template`]), making rows into checked jobs ([`plan`]), submitting a file in one
//! transaction with its cost estimate and budget check ([`submit`]), and the batch report in
//! CSV, JSON or HTML ([`report`]). The SQL of all of it is `queue::batches`; nothing here speaks
//! to the database or the storage other than through `Queue` and `Storage`.

pub mod plan;
pub mod report;
pub mod source;
pub mod submit;
pub mod template;

pub use plan::RowDefaults;
pub use source::Format;
pub use submit::{SubmitError, SubmitOptions, SubmitReport, submit};

/// A row of a file that cannot be a job, named by the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub reason: String,
}

impl RowError {
    pub fn new(line: u64, reason: String) -> Self {
        RowError { line, reason }
    }
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}
