//! A worker's deadlines: one table indexed by [`Timer`], with one next
//! deadline, in place of an `Option<Instant>` field each.

use std::time::{Duration, Instant};

/// What a worker's deadline is for. The supervisor acts on those that are
/// due in this order, each at most once per turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// A successor that has not said hello by then is stopped and the
    /// replacement retried.
    GiveUp,
    /// It gave connections back (near its fd limit): it gets none until
    /// then, or until it reports one finished.
    FullPause,
    /// Taken as ready without a hello: at once with `--ready start` (on
    /// the next turn), or in a kernel mode after a short grace.
    Ready,
    /// A kernel mode: its first STATS is due (after HELLO).
    StatsDue,
    /// It closed its channel: cut off then if it still runs.
    CutOff,
    /// It reaches `--max-age`.
    Recycle,
    /// Say that it has not said hello (once).
    HelloWarn,
    /// SIGTERM, if it still runs.
    Term,
    /// SIGKILL, if it still runs.
    Kill,
    /// The next heartbeat, and the hang check.
    Ping,
}

impl Timer {
    /// Every timer, in the order they are acted on.
    pub const ALL: [Timer; 10] = [
        Timer::GiveUp,
        Timer::FullPause,
        Timer::Ready,
        Timer::StatsDue,
        Timer::CutOff,
        Timer::Recycle,
        Timer::HelloWarn,
        Timer::Term,
        Timer::Kill,
        Timer::Ping,
    ];
}

/// One deadline per [`Timer`], each set or not.
#[derive(Debug, Clone, Default)]
pub(crate) struct Timers([Option<Instant>; Timer::ALL.len()]);

impl Timers {
    /// Sets `t` to fire at `at`.
    pub fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }

    /// Sets `t` to `at`, or clears it.
    pub fn set_opt(&mut self, t: Timer, at: Option<Instant>) {
        self.0[t as usize] = at;
    }

    pub fn clear(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }

    pub fn is_set(&self, t: Timer) -> bool {
        self.0[t as usize].is_some()
    }

    /// Whether `t` is set and due at `now`.
    pub fn due(&self, t: Timer, now: Instant) -> bool {
        self.0[t as usize].is_some_and(|at| at <= now)
    }

    /// Clears `t` and returns true if it was due at `now`.
    pub fn fire(&mut self, t: Timer, now: Instant) -> bool {
        let due = self.due(t, now);
        if due {
            self.clear(t);
        }
        due
    }

    /// The earliest deadline set.
    pub fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

/// How often a ready worker is pinged: a quarter of the timeout, within
/// 10 ms and 5 s.
pub(crate) fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_timer_has_its_place_and_fires_once() {
        let now = Instant::now();
        let mut t = Timers::default();
        assert_eq!(t.next(), None);
        for (k, timer) in Timer::ALL.iter().enumerate() {
            assert_eq!(*timer as usize, k, "ALL is in declaration order");
            t.set(*timer, now + Duration::from_secs(10 + k as u64));
        }
        assert_eq!(t.next(), Some(now + Duration::from_secs(10)));
        t.set(Timer::Kill, now);
        assert_eq!(t.next(), Some(now));
        assert!(t.fire(Timer::Kill, now));
        assert!(!t.fire(Timer::Kill, now));
        assert!(!t.fire(Timer::Ping, now), "not due yet");
        assert!(t.is_set(Timer::Ping));
        t.set_opt(Timer::Ping, None);
        assert!(!t.is_set(Timer::Ping));
    }
}
