//! Restart delays for a worker slot whose worker keeps dying young.
//!
//! A worker that ran at least `reset_after` is restarted at once and its
//! slot's count of quick exits starts over. One that died sooner is
//! restarted after `initial * 2^(n-1)` for its n-th quick exit in a row,
//! capped at `max`, with ±20% jitter so that slots that crashed together do
//! not restart together. A crashing app so never becomes a fork storm.

use std::time::Duration;

/// The restart policy; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first quick exit.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A worker that stayed up this long is healthy: restart it at once.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            reset_after: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before the next start, given how long the worker ran and
    /// the slot's quick exits so far; returns the new count of quick exits.
    pub fn next(&self, uptime: Duration, quick_exits: u32) -> (Duration, u32) {
        if uptime >= self.reset_after {
            return (Duration::ZERO, 0);
        }
        let n = quick_exits.saturating_add(1);
        let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
        let base = self.initial.saturating_mul(factor).min(self.max);
        let jittered = base.mul_f64(0.8 + 0.4 * fastrand::f64());
        (jittered.min(self.max), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_bounded_jitter() {
        let b = Backoff::default();
        let mut n = 0;
        let mut last = Duration::ZERO;
        for i in 0..40 {
            let (d, next) = b.next(Duration::from_millis(10), n);
            n = next;
            assert!(d <= b.max, "step {i}: {d:?}");
            let base = b.initial.saturating_mul(1 << i.min(20)).min(b.max);
            assert!(d >= base.mul_f64(0.79), "step {i}: {d:?} < {base:?}");
            last = d;
        }
        assert_eq!(n, 40);
        assert!(last >= Duration::from_secs(8));
    }

    #[test]
    fn a_worker_that_stayed_up_resets_the_count() {
        let b = Backoff::default();
        assert_eq!(b.next(Duration::from_secs(6), 7), (Duration::ZERO, 0));
        let (d, n) = b.next(Duration::from_secs(1), 0);
        assert_eq!(n, 1);
        assert!(d >= Duration::from_millis(80) && d <= Duration::from_millis(120));
    }
}
