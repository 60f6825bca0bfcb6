//! Power of two random choices: two workers drawn at random, the less
//! loaded (relative to weight) wins. Near least-connections balance at a
//! constant cost, and no herd on the one idle worker when reports lag.

use super::{Candidate, Policy};

/// The p2c policy (see the module).
#[derive(Debug)]
pub struct PowerOfTwo {
    rng: fastrand::Rng,
}

impl Default for PowerOfTwo {
    fn default() -> Self {
        PowerOfTwo {
            rng: fastrand::Rng::new(),
        }
    }
}

impl PowerOfTwo {
    /// With a fixed seed, for tests and benchmarks.
    pub fn with_seed(seed: u64) -> Self {
        PowerOfTwo {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl Policy for PowerOfTwo {
    fn pick(&mut self, candidates: &[Candidate]) -> usize {
        let n = candidates.len();
        if n == 1 {
            return 0;
        }
        let a = self.rng.usize(0..n);
        let b = (a + 1 + self.rng.usize(0..n - 1)) % n;
        if candidates[b].lighter_than(&candidates[a]) {
            b
        } else {
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::cands;
    use super::*;

    #[test]
    fn never_picks_the_most_loaded_of_two_and_spreads_ties() {
        let mut p = PowerOfTwo::with_seed(7);
        let c = cands(&[(9, 1), (0, 1)]);
        assert!((0..100).all(|_| p.pick(&c) == 1));
        let idle = cands(&[(0, 1), (0, 1), (0, 1), (0, 1)]);
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[p.pick(&idle)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
