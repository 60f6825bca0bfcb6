//! Least connections: the worker with the fewest connections in flight
//! relative to its weight; ties go round-robin, so idle workers still
//! take turns.

use super::{Candidate, Policy, from_cursor};

#[derive(Debug, Default)]
pub struct LeastConn {
    cursor: usize,
}

impl Policy for LeastConn {
    fn pick(&mut self, candidates: &[Candidate]) -> usize {
        let start = from_cursor(candidates, self.cursor);
        let n = candidates.len();
        let mut best = start;
        for step in 1..n {
            let at = (start + step) % n;
            if candidates[at].lighter_than(&candidates[best]) {
                best = at;
            }
        }
        self.cursor = candidates[best].index + 1;
        best
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
    fn weights_scale_the_load() {
        let mut p = LeastConn::default();
        // 3 of weight 4 is lighter than 1 of weight 1.
        assert_eq!(p.pick(&cands(&[(1, 1), (3, 4)])), 1);
    }
}
