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
    /// An HTTP/1.x request header of the first request (its first
    /// comma-separated element: `header:X-Forwarded-For` is the client
    /// behind a proxy), peeked at.
    Header(String),
    /// A cookie of the first request, peeked at.
    Cookie(String),
    /// A query parameter of the first request's target, peeked at.
    Query(String),
}

impl Sticky {
    /// Whether the key is in the first request, which the primary peeks
    /// at before it places the connection.
    pub fn peeks(&self) -> bool {
        !matches!(self, Sticky::Ip)
    }
}

impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::Ip => f.write_str("ip"),
            Sticky::Header(n) => write!(f, "header:{n}"),
            Sticky::Cookie(n) => write!(f, "cookie:{n}"),
            Sticky::Query(n) => write!(f, "query:{n}"),
        }
    }
}

impl std::str::FromStr for Sticky {
    type Err = String;
    fn from_str(s: &str) -> Result<Sticky, String> {
        let named = |kind: &str, name: &str| {
            let ok = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"=;,".contains(&b));
            if ok {
                Ok(name.to_string())
            } else {
                Err(format!(
                    "'{s}': a {kind} name after the colon, e.g. {kind}:sid"
                ))
            }
        };
        match s.split_once(':') {
            None if s == "ip" => Ok(Sticky::Ip),
            Some(("header", n)) => named("header", n).map(Sticky::Header),
            Some(("cookie", n)) => named("cookie", n).map(Sticky::Cookie),
            Some(("query", n)) => named("query", n).map(Sticky::Query),
            _ => Err(format!(
                "unknown sticky key '{s}' (expected ip, header:NAME, cookie:NAME or query:NAME)"
            )),
        }
    }
}

/// What the start of a request says about its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    /// The key's hash.
    Key(u64),
    /// The request has no such key (or is not HTTP/1.x): the policy places
    /// it.
    NoKey,
    /// Not enough bytes yet.
    Incomplete,
}

/// The key of `sticky` in `head`, the first bytes of a connection.
pub fn peek_key(sticky: &Sticky, head: &[u8]) -> Peeked {
    let line_end = match head.windows(2).position(|w| w == b"\r\n") {
        Some(at) => at,
        None => return Peeked::Incomplete,
    };
    let line = &head[..line_end];
    let mut parts = line.split(|&b| b == b' ');
    let (_, target, version) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with(b"HTTP/1.")) {
        return Peeked::NoKey;
    }
    let found = |v: Option<&[u8]>| v.map_or(Peeked::NoKey, |v| Peeked::Key(hash(v)));
    match sticky {
        Sticky::Ip => Peeked::NoKey,
        Sticky::Query(name) => {
            let target = target.unwrap_or_default();
            let query = match target.iter().position(|&b| b == b'?') {
                Some(at) => &target[at + 1..],
                None => return Peeked::NoKey,
            };
            let query = query.split(|&b| b == b'#').next().unwrap_or_default();
            found(
                query
                    .split(|&b| b == b'&')
                    .find_map(|pair| pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")),
            )
        }
        Sticky::Header(_) | Sticky::Cookie(_) => {
            // The whole head: headers end at an empty line.
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Peeked::Incomplete;
            };
            let headers = head[line_end + 2..end + 2].split(|&b| b == b'\n');
            let value_of = |want: &str| {
                headers.clone().find_map(|l| {
                    let l = l.strip_suffix(b"\r").unwrap_or(l);
                    let colon = l.iter().position(|&b| b == b':')?;
                    l[..colon]
                        .eq_ignore_ascii_case(want.as_bytes())
                        .then(|| l[colon + 1..].trim_ascii())
                })
            };
            match sticky {
                Sticky::Header(name) => found(
                    value_of(name)
                        .map(|v| {
                            v.split(|&b| b == b',')
                                .next()
                                .unwrap_or_default()
                                .trim_ascii()
                        })
                        .filter(|v| !v.is_empty()),
                ),
                Sticky::Cookie(name) => found(value_of("cookie").and_then(|v| {
                    v.split(|&b| b == b';').find_map(|pair| {
                        pair.trim_ascii()
                            .strip_prefix(name.as_bytes())?
                            .strip_prefix(b"=")
                    })
                })),
                _ => Peeked::NoKey,
            }
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

    /// Whether it was built of exactly `slots`, in order.
    pub fn is_of(&self, slots: impl Iterator<Item = SlotIdx>) -> bool {
        self.slots.iter().copied().eq(slots)
    }

    /// The slots in the order `key` tries them: clockwise from its hash,
    /// each once. `seen` is scratch space, reused so that a placement
    /// allocates nothing.
    pub fn order<'a>(
        &'a self,
        key: u64,
        seen: &'a mut Vec<bool>,
    ) -> impl Iterator<Item = SlotIdx> + 'a {
        let start = self.points.partition_point(|&(p, _)| p < key);
        let n = self.points.len();
        seen.clear();
        seen.resize(self.slots.last().map_or(0, |s| s.0 + 1), false);
        (0..n)
            .map(move |step| self.points[(start + step) % n].1)
            .filter(move |s| !std::mem::replace(&mut seen[s.0], true))
            .take(self.slots.len())
    }
}

/// What a slot can do with the connection being placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// No worker of it is ready: the key moves on.
    Nobody,
    /// A worker of it is ready but full for the moment: the connection
    /// waits for it.
    Busy,
    /// This worker of it can take the connection now.
    Take(super::ids::WorkerIdx),
}

/// Scratch space of a placement, reused (no allocation per connection).
#[derive(Debug, Default)]
pub struct Scratch {
    /// By slot index.
    pub picks: Vec<Pick>,
    /// By slot index: [`Ring::order`]'s.
    pub seen: Vec<bool>,
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
        let mut seen = Vec::new();
        for key in (0..200u64).map(|k| hash(&k.to_le_bytes())) {
            let order: Vec<SlotIdx> = ring.order(key, &mut seen).collect();
            assert_eq!(order.len(), 4);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 4, "{order:?}");
            assert_eq!(ring.order(key, &mut seen).next(), Some(order[0]));
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
        let mut seen = Vec::new();
        for &k in &keys {
            let a = before.order(k, &mut seen).next().unwrap();
            let b = after.order(k, &mut seen).next().unwrap();
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
        assert_eq!(
            "cookie:sid".parse::<Sticky>(),
            Ok(Sticky::Cookie("sid".into()))
        );
        assert_eq!(
            "header:X-Forwarded-For".parse::<Sticky>(),
            Ok(Sticky::Header("X-Forwarded-For".into()))
        );
        assert_eq!("query:u".parse::<Sticky>(), Ok(Sticky::Query("u".into())));
        for bad in ["mac", "cookie:", "query:a=b", "header:"] {
            assert!(bad.parse::<Sticky>().is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_come_from_the_first_request() {
        let req = b"GET /chat?room=1&user=ann#x HTTP/1.1\r\nHost: h\r\nCookie: a=1; sid=abc; z=2\r\nX-Forwarded-For: 10.0.0.7, 10.0.0.1\r\n\r\n";
        let key = |s: &str| peek_key(&s.parse().unwrap(), req);
        assert_eq!(key("query:user"), Peeked::Key(hash(b"ann")));
        assert_eq!(key("cookie:sid"), Peeked::Key(hash(b"abc")));
        assert_eq!(
            key("header:x-forwarded-for"),
            Peeked::Key(hash(b"10.0.0.7"))
        );
        assert_eq!(key("query:none"), Peeked::NoKey);
        assert_eq!(key("cookie:none"), Peeked::NoKey);
        // Not there yet, in pieces.
        assert_eq!(
            peek_key(&"query:user".parse().unwrap(), b"GET /chat?user=an"),
            Peeked::Incomplete
        );
        assert_eq!(
            peek_key(
                &"cookie:sid".parse().unwrap(),
                b"GET / HTTP/1.1\r\nCookie: sid=1\r\n"
            ),
            Peeked::Incomplete
        );
        // Query needs only the request line.
        assert_eq!(
            peek_key(
                &"query:user".parse().unwrap(),
                b"GET /?user=bo HTTP/1.1\r\nHo"
            ),
            Peeked::Key(hash(b"bo"))
        );
        // Not HTTP/1.x (TLS, HTTP/2's preface): the policy places it.
        assert_eq!(
            peek_key(&"cookie:sid".parse().unwrap(), b"\x16\x03\x01\x02\x00\r\n"),
            Peeked::NoKey
        );
        assert_eq!(
            peek_key(
                &"cookie:sid".parse().unwrap(),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            ),
            Peeked::NoKey
        );
    }
}
