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
    /// Plain round-robin's next index to try, per server: with equal
    /// weights the dispatcher stops at the first worker from there that
    /// can take the connection instead of listing them all (the same
    /// choice as [`RoundRobin`]'s, in O(1) for a healthy pool of any size).
    cursors: Vec<usize>,
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
            cursors: Vec::new(),
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
            self.cursors.push(0);
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
    /// among worker indexes `0..n`: `candidate(i)` says whether worker `i`
    /// can take it now, and its figures; `None` when none can.
    /// `equal_weights`: every worker weighs the same (plain round-robin
    /// then asks `candidate` only until one can take it).
    pub fn pick(
        &mut self,
        k: ServerIdx,
        n: usize,
        equal_weights: bool,
        candidate: impl FnMut(usize) -> Option<Candidate>,
    ) -> Option<usize> {
        self.add_server(k);
        if equal_weights && self.sched == Sched::RoundRobin {
            let cursor = &mut self.cursors[k.0];
            // Past the last index (the pool shrank): wrap to the first.
            let start = if *cursor < n { *cursor } else { 0 };
            let (found, _) = round_robin(start, n, candidate)?;
            *cursor = found + 1;
            return Some(found);
        }
        self.candidates.clear();
        self.candidates.extend((0..n).filter_map(candidate));
        if self.candidates.is_empty() {
            return None;
        }
        Some(self.candidates[self.policies[k.0].pick(&self.candidates)].index)
    }
}

/// Round-robin: the first of `n` workers, starting at `cursor` and
/// wrapping, for which `take` gives something, with what it gave. The
/// caller moves its cursor past the one chosen.
pub fn round_robin<T>(
    cursor: usize,
    n: usize,
    mut take: impl FnMut(usize) -> Option<T>,
) -> Option<(usize, T)> {
    (0..n)
        .map(|step| (cursor + step) % n)
        .find_map(|i| take(i).map(|t| (i, t)))
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

    /// Plain round-robin's short path (stop at the first that can take)
    /// places exactly as the policy over the full list does.
    #[test]
    fn the_dispatchers_round_robin_short_path_matches_the_policy() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (mut short, mut full) = (Dispatcher::new(Sched::RoundRobin), RoundRobin::default());
        for _ in 0..2000 {
            let n = rng.usize(0..9);
            let can: Vec<bool> = (0..n).map(|_| rng.u8(..4) != 0).collect();
            let candidate = |i: usize| {
                can[i].then_some(Candidate {
                    index: i,
                    in_flight: 0,
                    weight: 1,
                })
            };
            let got = short.pick(ServerIdx(0), n, true, candidate);
            let list: Vec<Candidate> = (0..n).filter_map(candidate).collect();
            let want = (!list.is_empty()).then(|| list[full.pick(&list)].index);
            assert_eq!(got, want, "{can:?}");
        }
    }

    #[test]
    fn takes_turns_and_skips_those_that_cannot_take() {
        let mut cursor = 0;
        let mut order = Vec::new();
        for _ in 0..6 {
            let (i, ()) = round_robin(cursor, 4, |i| (i != 2).then_some(())).expect("someone can");
            order.push(i);
            cursor = (i + 1) % 4;
        }
        assert_eq!(order, [0, 1, 3, 0, 1, 3]);
        assert_eq!(round_robin(1, 4, |_| None::<()>), None);
        assert_eq!(round_robin(0, 0, |_| Some(())), None);
    }

    #[test]
    fn lighter_is_relative_to_weight() {
        let c = cands(&[(2, 2), (1, 1), (3, 1)]);
        assert!(!c[0].lighter_than(&c[1]));
        assert!(!c[1].lighter_than(&c[0]));
        assert!(c[0].lighter_than(&c[2]));
    }
}
