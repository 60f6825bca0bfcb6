//! How the primary chooses the worker for the next connection.
//!
//! Today one policy: round-robin, as Node's `SCHED_RR`. It is a pure
//! function of a cursor and a predicate, so that it can be measured alone
//! (`cargo bench --bench dispatch`) and tested without processes.

/// Round-robin: the first of `n` workers, starting at `cursor` and
/// wrapping, for which `can_take` holds. The caller moves its cursor past
/// the one chosen.
pub fn round_robin(cursor: usize, n: usize, can_take: impl Fn(usize) -> bool) -> Option<usize> {
    (0..n)
        .map(|step| (cursor + step) % n)
        .find(|&i| can_take(i))
}

#[cfg(test)]
mod tests {
    use super::round_robin;

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
}
