//! What the load generator is asked to do ([`LoadSpec`]) and the limits
//! every run keeps: shared by the run (`load.rs`) and its threads
//! (`driver.rs`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;

/// How long one request may take, from `connect` (or, on a kept-alive
/// connection, from its first byte written) to its last byte read; a slower
/// one is counted as an error and its connection closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long requests in flight at the deadline may still take; those still
/// unanswered after it are counted as errors.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long a connection waits after a transport error (refused, reset,
/// timeout, cut short) before it connects again. It doubles with each
/// error in a row, up to [`MAX_ERROR_BACKOFF`], and starts over after a
/// response: a refused port costs a few hundred attempts a second per
/// connection instead of a busy core, and a short outage still recovers
/// within milliseconds.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(1);
/// The longest wait between attempts after errors in a row.
pub const MAX_ERROR_BACKOFF: Duration = Duration::from_millis(64);
/// How often `progress` is called.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// The largest latency the histogram holds (larger ones saturate), in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// What load to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where the app listens.
    pub addr: SocketAddr,
    /// Concurrent connections (at least 1), each with one request at a time.
    pub connections: usize,
    /// How long requests are started for.
    pub duration: Duration,
    /// `true`: many requests per connection (HTTP/1.1 keep-alive); `false`:
    /// one request per connection, sent with `Connection: close`, so each
    /// request also measures `connect` and the app's accept path. See the
    /// module docs about `TIME_WAIT`.
    pub keepalive: bool,
    /// The path of every `GET` (but those of [`LoadSpec::slow`]), e.g. `/`.
    pub path: String,
    /// Generator threads (at least 1; more than `connections` are not
    /// started); the connections are spread evenly over them.
    pub threads: usize,
    /// A share of the requests sent to another path, for a mixed workload.
    pub slow: Option<SlowShare>,
    /// Clients with sessions: each connection is one client's, with its
    /// `Cookie: sid=...` (for `--sticky cookie:sid`).
    pub sessions: Option<Sessions>,
}

/// Many clients, a few heavy ones: who each connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sessions {
    /// Clients in all (at least 1).
    pub clients: u32,
    /// Of them, how many are heavy: together they send a third of the
    /// connections.
    pub heavy: u32,
}

/// A share of requests that go to another path, e.g. a slow endpoint.
#[derive(Debug, Clone)]
pub struct SlowShare {
    /// The path, e.g. `/work?ms=50`.
    pub path: String,
    /// The share in thousandths, e.g. 50 = 5 %; drawn at random per request.
    pub per_mille: u32,
}

pub(super) fn new_histogram() -> io::Result<Histogram<u64>> {
    Histogram::new_with_max(MAX_LATENCY_US, 3)
        .map_err(|e| io::Error::other(format!("latency histogram: {e:?}")))
}
