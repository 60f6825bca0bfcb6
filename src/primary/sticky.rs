//! Sticky sessions (`--sticky ip`): the same client on the same worker
//! slot, with bounded loads, for socket.io's long-polling and apps with
//! sessions in memory.
//!
//! Owns the key of a connection and the placement by consistent hashing
//! with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018; HAProxy's
//! `hash-balance-factor`): each active slot has [`VNODES`] points on a
//! ring; a key goes to the first slot clockwise from its hash whose worker
//! can take a connection and holds fewer than `ceil(c · (m + 1) / n)` in
//! flight (`m` in flight over the `n` workers that can take one, `c = 1 +
//! e`, `--sticky-balance-factor e`), else to the next. A key keeps its slot
//! across restarts and reloads of that slot's worker (the ring is keyed by
//! slot), and adding a slot moves only the keys whose arc it takes (about
//! 1/N). The load is what workers report (DONE): a worker that reports
//! none (a Node app, a program without the protocol) is never over the
//! bound, so its keys move only when it cannot take a connection at all
//! (not ready, `--max-unacked` reached). No I/O: the acceptor asks
//! [`Ring::order`] and checks the bound.

use std::net::IpAddr;

use super::ids::SlotIdx;

/// Points per slot on the ring: enough that slots' arcs differ by a few
/// percent, few enough that a rebuild is nothing.
pub const VNODES: u64 = 160;

/// The default `--sticky-balance-factor`: a worker may hold 25 % more
/// than the average in flight before its keys spill to the next slot.
/// HAProxy suggests 125–150 % for `hash-balance-factor`; the lower end keeps
/// a hot key from doubling one worker's load, and the paper's bound on
/// moves (each key moves at most O(1/e²) times on an insert) stays small.
pub const DEFAULT_BALANCE_FACTOR: f64 = 0.25;

/// What identifies a client (`--sticky`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sticky {
    /// The peer address of the connection, from accept (no read).
    Ip,
}

impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::Ip => f.write_str("ip"),
        }
    }
}

impl std::str::FromStr for Sticky {
    type Err = String;
    fn from_str(s: &str) -> Result<Sticky, String> {
        match s {
            "ip" => Ok(Sticky::Ip),
            other => Err(format!(
                "unknown sticky key '{other}' (expected ip; header:NAME, cookie:NAME and query:NAME are not available yet)"
            )),
        }
    }
}

/// A 64-bit hash, stable across runs and builds (FNV-1a, then a
/// finalizer so that nearby inputs spread over the ring).
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of a client by its address.
pub fn ip_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash(&v4.octets()),
        // An IPv4 client of a dual-stack socket counts as itself.
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash(&v4.octets()),
            None => hash(&v6.octets()),
        },
    }
}

/// The ring of the active slots.
#[derive(Debug, Default)]
pub struct Ring {
    slots: Vec<SlotIdx>,
    points: Vec<(u64, SlotIdx)>,
}

impl Ring {
    /// A ring of `slots` (sorted, distinct).
    pub fn new(slots: &[SlotIdx]) -> Ring {
        let mut points: Vec<(u64, SlotIdx)> = slots
            .iter()
            .flat_map(|&s| {
                (0..VNODES).map(move |v| (mix(hash(&(s.0 as u64).to_le_bytes()) ^ v), s))
            })
            .collect();
        points.sort_unstable();
        Ring {
            slots: slots.to_vec(),
            points,
        }
    }

    /// The slots it was built of.
    pub fn slots(&self) -> &[SlotIdx] {
        &self.slots
    }

    /// The slots in the order `key` tries them: clockwise from its hash,
    /// each once.
    pub fn order(&self, key: u64) -> impl Iterator<Item = SlotIdx> + '_ {
        let start = self.points.partition_point(|&(p, _)| p < key);
        let n = self.points.len();
        let mut seen: Vec<SlotIdx> = Vec::with_capacity(self.slots.len());
        (0..n)
            .map(move |step| self.points[(start + step) % n].1)
            .filter(move |s| {
                if seen.contains(s) {
                    false
                } else {
                    seen.push(*s);
                    true
                }
            })
            .take(self.slots.len())
    }
}

/// A worker may always hold this many in flight and take one more: at low
/// load the average is below one, and a completion report that has not
/// reached the primary yet must not move a key.
pub const MIN_BOUND: u64 = 2;

/// The most a worker may hold in flight to take one more: `ceil(c · (m +
/// 1) / n)` for `m` in flight over `n` workers, `c = 1 + factor`, and at
/// least [`MIN_BOUND`].
pub fn bound(in_flight_total: u64, workers: usize, factor: f64) -> u64 {
    let n = workers.max(1) as f64;
    (((1.0 + factor) * (in_flight_total as f64 + 1.0) / n).ceil() as u64).max(MIN_BOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<SlotIdx> {
        (0..n).map(SlotIdx).collect()
    }

    #[test]
    fn a_key_keeps_its_slot_and_every_slot_is_tried_once() {
        let ring = Ring::new(&slots(4));
        for key in (0..200u64).map(|k| hash(&k.to_le_bytes())) {
            let order: Vec<SlotIdx> = ring.order(key).collect();
            assert_eq!(order.len(), 4);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 4, "{order:?}");
            assert_eq!(ring.order(key).next(), Some(order[0]));
        }
    }

    /// Adding a fifth slot to four moves at most 1.5/5 of 1,000 keys, and
    /// only to the new slot; the keys spread evenly enough.
    #[test]
    fn adding_a_slot_moves_about_one_nth_of_the_keys() {
        let before = Ring::new(&slots(4));
        let after = Ring::new(&slots(5));
        let keys: Vec<u64> = (0..1000u64).map(|k| hash(&k.to_le_bytes())).collect();
        let mut moved = 0;
        let mut per_slot = [0usize; 5];
        for &k in &keys {
            let (a, b) = (
                before.order(k).next().unwrap(),
                after.order(k).next().unwrap(),
            );
            per_slot[b.0] += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, SlotIdx(4), "a key moved between old slots");
            }
        }
        assert!(moved <= 300, "{moved} of 1000 keys moved");
        assert!(moved >= 100, "only {moved} keys moved to the new slot");
        assert!(
            per_slot.iter().all(|&n| (120..=280).contains(&n)),
            "{per_slot:?}"
        );
    }

    #[test]
    fn the_bound_is_c_times_the_average_rounded_up() {
        assert_eq!(bound(0, 4, 0.25), MIN_BOUND);
        assert_eq!(bound(39, 4, 0.25), 13);
        assert_eq!(bound(100, 1, 0.25), 127);
        assert_eq!(bound(7, 0, 0.25), 10);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let v4: IpAddr = "127.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(ip_key(v4), ip_key(mapped));
        assert_ne!(ip_key(v4), ip_key("127.0.0.3".parse().unwrap()));
    }

    #[test]
    fn keys_parse_and_unknown_ones_say_what_is_there() {
        assert_eq!("ip".parse::<Sticky>(), Ok(Sticky::Ip));
        let e = "cookie:sid".parse::<Sticky>().unwrap_err();
        assert!(e.contains("expected ip"), "{e}");
    }
}
