//! The one vocabulary every module uses to say what a failure means for the job that met it.
//!
//! Errors are classified where they are made (the provider client, storage, the queue); the worker
//! loop only reads the class and never inspects messages or status codes itself.

use std::time::Duration;

/// What a failure means for the job, and for the worker, decided where the error is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth another attempt later. `after` is a delay the other side asked for (a provider's
    /// `Retry-After`); without it the retry policy's backoff applies.
    Transient { after: Option<Duration> },
    /// Fails the same way every time for this job: no further attempt.
    Permanent,
    /// Fails the same way for every job (bad key, no credits, missing bucket): the worker stops
    /// claiming for a while and hands the job back without spending an attempt.
    Halt,
    /// Fails the same way for every job of this job's batch (its budget is spent): the worker
    /// stops claiming that batch for a while and hands the job back without spending an attempt.
    HaltBatch,
    /// The other side has too many of our calls in flight right now (OpenRouter's 402
    /// `in_flight_budget_exhausted`): a shared cool-down. The worker waits `after` (or a short
    /// default) before claiming again, hands the job back without spending an attempt, and lowers
    /// its in-flight ceiling until such answers stop.
    Saturated { after: Option<Duration> },
}

impl ErrorClass {
    /// A transient failure with no requested delay.
    pub const RETRY: ErrorClass = ErrorClass::Transient { after: None };

    /// True for the transient class, with or without a requested delay.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorClass::Transient { .. })
    }

    /// A short word for logs and the attempts table: `transient`, `permanent`, `halt`,
    /// `halt_batch` or `saturated`.
    pub fn word(self) -> &'static str {
        match self {
            ErrorClass::Transient { .. } => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Halt => "halt",
            ErrorClass::HaltBatch => "halt_batch",
            ErrorClass::Saturated { .. } => "saturated",
        }
    }
}

/// Implemented by every module-boundary error enum so callers can ask what to do about it.
pub trait Classify {
    /// The class this error was given where it was made.
    fn class(&self) -> ErrorClass;
}
