//! The worker's in-flight ceiling: how many jobs it lets run at once when the provider says it
//! has too many of our calls in flight (OpenRouter's 402 `in_flight_budget_exhausted`).
//!
//! AIMD, as TCP does with a congestion window: a saturated answer lowers the ceiling to a fraction
//! of what was in flight when it came (multiplicative decrease), each call that is not refused
//! raises it by one per ceiling's worth of calls (additive increase: about one more call per
//! round), until it is back at `--concurrency`. So the worker settles just under the count the
//! provider accepts instead of hammering it, and recovers on its own once the balance allows
//! more. After a quiet spell without refusals the climb speeds up to one per call, so a limit
//! that was lifted (credits added) does not take hundreds of rounds of minute-long calls to use.

use std::time::{Duration, Instant};

/// The share of the calls in flight kept after a refusal. Close to 1: a refusal says the
/// provider's limit is right there, so the next round should be just under it.
pub const DECREASE_FACTOR: f64 = 0.9;
/// How long without a refusal before the ceiling climbs by one per call instead of one per round.
pub const QUIET_SPELL: Duration = Duration::from_secs(60);

/// The ceiling and what it was last told.
#[derive(Debug, Clone)]
pub struct Ceiling {
    max: usize,
    /// Fractional, so the additive increase of `1 / ceiling` per call adds up.
    value: f64,
    last_refusal: Option<Instant>,
}

impl Ceiling {
    /// A ceiling at `max` (the worker's `--concurrency`, at least 1).
    pub fn new(max: usize) -> Ceiling {
        let max = max.max(1);
        Ceiling {
            max,
            value: max as f64,
            last_refusal: None,
        }
    }

    /// How many jobs may be in flight now: at least 1, at most `max`.
    pub fn get(&self) -> usize {
        (self.value.floor() as usize).clamp(1, self.max)
    }

    /// A call was refused as saturated while `in_flight` jobs (this one included) were running.
    /// The ceiling becomes a fraction of the others, never higher than it was: several refusals
    /// of the same round each lower it at most to what the round really held.
    pub fn refused(&mut self, in_flight: usize, now: Instant) {
        let others = in_flight.saturating_sub(1).max(1) as f64;
        let lowered = (others * DECREASE_FACTOR).max(1.0);
        self.value = self.value.min(lowered);
        self.last_refusal = Some(now);
    }

    /// A call ended without being refused as saturated: climb toward `max`.
    pub fn passed(&mut self, now: Instant) {
        if self.value >= self.max as f64 {
            return;
        }
        let quiet = self
            .last_refusal
            .is_none_or(|at| now.duration_since(at) >= QUIET_SPELL);
        let step = if quiet {
            1.0
        } else {
            1.0 / self.value.max(1.0)
        };
        self.value = (self.value + step).min(self.max as f64);
    }

    /// Whether the ceiling is below `max`.
    pub fn lowered(&self) -> bool {
        self.get() < self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_lowers_to_just_under_what_was_accepted() {
        let now = Instant::now();
        let mut c = Ceiling::new(100);
        assert_eq!(c.get(), 100);
        // 41 in flight when refused: 40 others were accepted.
        c.refused(41, now);
        assert_eq!(c.get(), 36);
        // Later refusals of the same round, with fewer in flight, lower it further; a refusal
        // with more in flight never raises it.
        c.refused(30, now);
        assert_eq!(c.get(), 26);
        c.refused(90, now);
        assert_eq!(c.get(), 26);
        c.refused(1, now);
        assert_eq!(c.get(), 1);
    }

    #[test]
    fn it_climbs_one_per_round_then_one_per_call_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut c = Ceiling::new(50);
        c.refused(11, t0);
        assert_eq!(c.get(), 9);
        // A round's worth of calls passing adds one.
        for _ in 0..10 {
            c.passed(t0 + Duration::from_secs(1));
        }
        assert_eq!(c.get(), 10);
        // After a quiet spell, each call adds one, up to the maximum and no further.
        let later = t0 + QUIET_SPELL + Duration::from_secs(1);
        for _ in 0..5 {
            c.passed(later);
        }
        assert_eq!(c.get(), 15);
        for _ in 0..100 {
            c.passed(later);
        }
        assert_eq!(c.get(), 50);
        assert!(!c.lowered());
    }
}
