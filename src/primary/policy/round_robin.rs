//! Round-robin (Node's `SCHED_RR`), weighted when weights differ: smooth
//! weighted round-robin (nginx's), which spreads a heavier worker's turns
//! through the cycle instead of bunching them.

use super::{Candidate, Policy, from_cursor};

/// The round-robin policy (see the module).
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// The worker index to try first.
    cursor: usize,
    /// Smooth weighted round-robin: each worker's current weight.
    current: Vec<i64>,
}

impl Policy for RoundRobin {
    fn pick(&mut self, candidates: &[Candidate]) -> usize {
        let first = candidates[0].weight;
        if candidates.iter().all(|c| c.weight == first) {
            let at = from_cursor(candidates, self.cursor);
            self.cursor = candidates[at].index + 1;
            return at;
        }
        let top = candidates.iter().map(|c| c.index).max().unwrap_or(0);
        if self.current.len() <= top {
            self.current.resize(top + 1, 0);
        }
        let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
        let mut best = 0;
        for (at, c) in candidates.iter().enumerate() {
            self.current[c.index] += i64::from(c.weight);
            if self.current[c.index] > self.current[candidates[best].index] {
                best = at;
            }
        }
        self.current[candidates[best].index] -= total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::super::cands;
    use super::*;

    #[test]
    fn equal_weights_take_turns() {
        let mut p = RoundRobin::default();
        let c = cands(&[(0, 1), (5, 1), (9, 1)]);
        let order: Vec<usize> = (0..6).map(|_| p.pick(&c)).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_give_their_shares_spread_out() {
        let mut p = RoundRobin::default();
        let c = cands(&[(0, 5), (0, 1), (0, 1)]);
        let order: Vec<usize> = (0..7).map(|_| p.pick(&c)).collect();
        assert_eq!(order.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(order, [0, 0, 1, 0, 2, 0, 0]);
    }
}
