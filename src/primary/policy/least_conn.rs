//! Least connections: the worker with the fewest connections in flight
//! relative to its weight. Ties go round-robin, weighted when the tied
//! workers' weights differ (as nginx's `least_conn`), so idle workers
//! still take turns in their shares.

use super::{Candidate, Policy, RoundRobin};

/// The least-conn policy (see the module).
#[derive(Debug, Default)]
pub struct LeastConn {
    /// Breaks ties.
    turns: RoundRobin,
    /// The tied candidates of a pick, reused.
    tied: Vec<Candidate>,
}

impl Policy for LeastConn {
    fn pick(&mut self, candidates: &[Candidate]) -> usize {
        let mut least = candidates[0];
        for c in &candidates[1..] {
            if c.lighter_than(&least) {
                least = *c;
            }
        }
        self.tied.clear();
        self.tied.extend(
            candidates
                .iter()
                .filter(|c| !least.lighter_than(c) && !c.lighter_than(&least)),
        );
        let chosen = self.tied[self.turns.pick(&self.tied)].index;
        candidates
            .iter()
            .position(|c| c.index == chosen)
            .expect("a tied candidate is a candidate")
    }
}

#[cfg(test)]
mod tests {
    use super::super::cands;
    use super::*;

    #[test]
    fn the_least_loaded_wins_and_ties_take_turns() {
        let mut p = LeastConn::default();
        assert_eq!(p.pick(&cands(&[(3, 1), (1, 1), (2, 1)])), 1);
        let idle = cands(&[(0, 1), (0, 1), (0, 1)]);
        let order: Vec<usize> = (0..4).map(|_| p.pick(&idle)).collect();
        assert_eq!(order, [2, 0, 1, 2]);
    }

    #[test]
    fn weights_scale_the_load_and_share_the_ties() {
        let mut p = LeastConn::default();
        // 3 of weight 4 is lighter than 1 of weight 1.
        assert_eq!(p.pick(&cands(&[(1, 1), (3, 4)])), 1);
        // Idle workers of weights 3 and 1 share 3:1.
        let idle = cands(&[(0, 3), (0, 1)]);
        let picks: Vec<usize> = (0..8).map(|_| p.pick(&idle)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6, "{picks:?}");
    }
}
