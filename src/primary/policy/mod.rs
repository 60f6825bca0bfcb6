//! How the primary chooses the worker for the next connection (the
//! primary-side modes of [`crate::Sched`]): one small trait, one file per
//! policy. Adding a policy is a file here, a [`crate::Sched`] variant and
//! its arm in [`for_sched`]; nothing else changes.
//!
//! The event loop hands a policy the workers that can take a connection
//! now (ready, not stopping, under their unacknowledged limit, channel not
//! full, holding the connection's server), in worker-index order, with
//! each one's connections in flight and weight. Policies are pure state
//! machines over that slice, so that they can be measured alone (`cargo
//! bench --bench dispatch`) and tested without processes.

mod least_conn;
mod p2c;
mod round_robin;

pub use least_conn::LeastConn;
pub use p2c::PowerOfTwo;
pub use round_robin::RoundRobin;

use super::ids::ServerIdx;
use crate::Sched;

/// A worker that can take the next connection, as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The worker's index in the event loop (stable while it lives).
    pub index: usize,
    /// Connections it holds: sent and not yet acknowledged, plus, for a
    /// worker that reports completions, acknowledged and not yet finished.
    pub in_flight: u64,
    /// Its weight (`--weights`), at least 1.
    pub weight: u32,
}

impl Candidate {
    /// Whether `self` is less loaded than `other` relative to their weights
    /// (`in_flight / weight`, compared without division).
    pub fn lighter_than(&self, other: &Candidate) -> bool {
        u128::from(self.in_flight) * u128::from(other.weight)
            < u128::from(other.in_flight) * u128::from(self.weight)
    }
}

/// A scheduling policy.
pub trait Policy: Send + std::fmt::Debug {
    /// Chooses one of `candidates` (never empty, by ascending index) and
    /// returns its position in the slice.
    fn pick(&mut self, candidates: &[Candidate]) -> usize;
}

/// The policy of a primary-side mode; `None` for the kernel modes.
pub fn for_sched(sched: Sched) -> Option<Box<dyn Policy>> {
    match sched {
        Sched::RoundRobin => Some(Box::new(RoundRobin::default())),
        Sched::LeastConn => Some(Box::new(LeastConn::default())),
        Sched::PowerOfTwo => Some(Box::new(PowerOfTwo::default())),
        Sched::Shared | Sched::ReusePort => None,
    }
}

/// The placement of connections: the policy in force, one rotation per
/// server (two servers whose connections alternate must not split the
/// workers between them), and the candidates' buffer. The event loop
/// offers it the workers that can take a connection now and gets one back;
/// it never reaches into a policy's state.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    sched: Sched,
    /// One per server, of `sched`'s kind.
    policies: Vec<Box<dyn Policy>>,
    /// The workers that can take the connection being placed (reused: no
    /// allocation per connection).
    candidates: Vec<Candidate>,
}

impl Dispatcher {
    /// Places by `sched`; round-robin for the kernel modes, where the
    /// primary places nothing (it still has a rotation per server, unused).
    pub fn new(sched: Sched) -> Dispatcher {
        Dispatcher {
            sched: if for_sched(sched).is_some() {
                sched
            } else {
                Sched::RoundRobin
            },
            policies: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The policy in force.
    pub fn sched(&self) -> Sched {
        self.sched
    }

    /// A rotation for server `k` (the next one).
    pub fn add_server(&mut self, k: ServerIdx) {
        while self.policies.len() <= k.0 {
            self.policies
                .push(for_sched(self.sched).expect("a primary-side mode"));
        }
    }

    /// Switches every server to `sched`'s policy; false (and nothing
    /// changes) for a kernel mode.
    pub fn switch(&mut self, sched: Sched) -> bool {
        if for_sched(sched).is_none() {
            return false;
        }
        self.sched = sched;
        for p in &mut self.policies {
            *p = for_sched(sched).expect("checked above");
        }
        true
    }

    /// The worker index the policy gives server `k`'s next connection to,
    /// among `candidates` (by ascending index); `None` when there are none.
    pub fn pick(
        &mut self,
        k: ServerIdx,
        candidates: impl Iterator<Item = Candidate>,
    ) -> Option<usize> {
        self.add_server(k);
        self.candidates.clear();
        self.candidates.extend(candidates);
        if self.candidates.is_empty() {
            return None;
        }
        Some(self.candidates[self.policies[k.0].pick(&self.candidates)].index)
    }
}

/// Round-robin: the first of `n` workers, starting at `cursor` and
/// wrapping, for which `can_take` holds. The caller moves its cursor past
/// the one chosen.
pub fn round_robin(cursor: usize, n: usize, can_take: impl Fn(usize) -> bool) -> Option<usize> {
    (0..n)
        .map(|step| (cursor + step) % n)
        .find(|&i| can_take(i))
}

/// The position in `candidates` of the first whose index is at least
/// `cursor`, wrapping to the first: round-robin over a sorted slice.
pub(crate) fn from_cursor(candidates: &[Candidate], cursor: usize) -> usize {
    candidates
        .iter()
        .position(|c| c.index >= cursor)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) fn cands(loads: &[(u64, u32)]) -> Vec<Candidate> {
    loads
        .iter()
        .enumerate()
        .map(|(index, &(in_flight, weight))| Candidate {
            index,
            in_flight,
            weight,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_turns_and_skips_those_that_cannot_take() {
        let mut cursor = 0;
        let mut order = Vec::new();
        for _ in 0..6 {
            let i = round_robin(cursor, 4, |i| i != 2).expect("someone can take");
            order.push(i);
            cursor = (i + 1) % 4;
        }
        assert_eq!(order, [0, 1, 3, 0, 1, 3]);
        assert_eq!(round_robin(1, 4, |_| false), None);
        assert_eq!(round_robin(0, 0, |_| true), None);
    }

    #[test]
    fn lighter_is_relative_to_weight() {
        let c = cands(&[(2, 2), (1, 1), (3, 1)]);
        assert!(!c[0].lighter_than(&c[1]));
        assert!(!c[1].lighter_than(&c[0]));
        assert!(c[0].lighter_than(&c[2]));
    }
}
