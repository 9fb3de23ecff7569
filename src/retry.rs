//! The retry policy: exponential backoff with a cap and full jitter, as a small `Copy` value.

use std::time::Duration;

/// How long to wait before attempt `n + 1` after attempt `n` failed transiently.
///
/// The delay for the n-th failure (1-based) is drawn uniformly from `[0, min(cap, base * 2^(n-1))]`
/// ("full jitter"), so that many jobs failing together do not retry together. A delay the other
/// side asked for (a `Retry-After`) wins over the policy, but is still capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// No delay, computed or requested, exceeds this.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// 10 s base and a 10 min cap: provider outages last minutes, and a job's calls are already
    /// long, so retrying sooner than seconds only burns attempts.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the jittered delay after the `failures`-th failure (1-based).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base
            .checked_mul(1u32 << exp)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The delay before the next attempt: the requested one if any (capped), else full jitter.
    pub fn delay(&self, failures: u32, requested: Option<Duration>) -> Duration {
        match requested {
            Some(d) => d.min(self.cap),
            None => {
                let ceiling = self.ceiling(failures);
                ceiling.mul_f64(fastrand::f64())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_until_the_cap() {
        let p = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(10),
        };
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(4), Duration::from_secs(8));
        assert_eq!(p.ceiling(5), Duration::from_secs(10));
        assert_eq!(p.ceiling(1000), Duration::from_secs(10));
    }

    #[test]
    fn jittered_delay_stays_within_the_ceiling_and_varies() {
        let p = RetryPolicy::default();
        let delays: Vec<Duration> = (0..200).map(|_| p.delay(3, None)).collect();
        assert!(delays.iter().all(|d| *d <= p.ceiling(3)));
        let first = delays[0];
        assert!(delays.iter().any(|d| *d != first), "full jitter must vary");
    }

    #[test]
    fn requested_delay_wins_but_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(42))),
            Duration::from_secs(42)
        );
        assert_eq!(p.delay(1, Some(Duration::from_secs(100_000))), p.cap);
    }
}
