//! Client load for the "nothing lost" tests: threads that send requests in
//! a loop until told to stop, on new connections or on kept-alive ones,
//! and count every failure by kind. Also a helper for N requests at once.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::http::{HttpConn, Response};

/// How a load thread uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One request per connection, with `Connection: close`.
    Fresh,
    /// Requests on one kept-alive connection, a new one when the server
    /// answers `Connection: close` or after a failure.
    KeepAlive,
}

/// What the load threads saw, summed over threads.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    /// Requests attempted (connect failures included).
    pub requests: u64,
    /// Answered with status 200.
    pub ok: u64,
    /// Connects that failed (refused, reset, timed out).
    pub connect_failures: u64,
    /// Requests that failed on a new connection: sending failed, or the
    /// connection ended (or timed out) before a whole response.
    pub fresh_failures: u64,
    /// Of `fresh_failures`, those where not one byte of the response came.
    pub fresh_failures_no_byte: u64,
    /// Of those, the ones the server reset (`ECONNRESET`): what a server
    /// does that closes a connection it accepted without reading it.
    pub fresh_resets: u64,
    /// Requests that failed on a kept-alive connection that had already
    /// carried at least one whole response.
    pub reused_failures: u64,
    /// Whole responses with a status other than 200.
    pub bad_status: u64,
    /// Responses per worker id.
    pub by_worker: BTreeMap<u64, u64>,
    /// The first few failures, described, with when they happened.
    pub samples: Vec<String>,
}

impl LoadStats {
    /// Every failure of any kind.
    pub fn failures(&self) -> u64 {
        self.connect_failures + self.fresh_failures + self.reused_failures + self.bad_status
    }

    fn merge(&mut self, other: LoadStats) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.connect_failures += other.connect_failures;
        self.fresh_failures += other.fresh_failures;
        self.fresh_failures_no_byte += other.fresh_failures_no_byte;
        self.fresh_resets += other.fresh_resets;
        self.reused_failures += other.reused_failures;
        self.bad_status += other.bad_status;
        for (id, n) in other.by_worker {
            *self.by_worker.entry(id).or_default() += n;
        }
        let room = MAX_SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(other.samples.into_iter().take(room));
    }

    fn sample(&mut self, t0: Instant, what: &str, e: &dyn fmt::Display) {
        if self.samples.len() < MAX_SAMPLES {
            self.samples
                .push(format!("at {:.3?}: {what}: {e}", t0.elapsed()));
        }
    }
}

impl fmt::Display for LoadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} ok, {} failed (connect {}, fresh connection {} of which {} before any \
             byte ({} reset), kept-alive connection {}, bad status {}); by worker {:?}",
            self.requests,
            self.ok,
            self.failures(),
            self.connect_failures,
            self.fresh_failures,
            self.fresh_failures_no_byte,
            self.fresh_resets,
            self.reused_failures,
            self.bad_status,
            self.by_worker
        )?;
        for s in &self.samples {
            write!(f, "\n  {s}")?;
        }
        Ok(())
    }
}

const MAX_SAMPLES: usize = 20;

/// Load threads running until [`Load::stop`] (or `max` after the start,
/// or the guard's drop).
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<LoadStats>>,
}

impl Load {
    /// Starts one thread per entry of `modes`, each sending requests to
    /// `addr` with `io_timeout` on every connect, read and write; each
    /// stops by itself after `max`.
    pub fn start(addr: SocketAddr, modes: &[Mode], io_timeout: Duration, max: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = modes
            .iter()
            .map(|&mode| {
                let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
                std::thread::spawn(move || run(addr, mode, io_timeout, max, &stop, &ok))
            })
            .collect();
        Load { stop, ok, threads }
    }

    /// Requests answered with 200 so far, all threads together.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until `n` more requests than now have been
    /// answered; returns whether they were.
    pub fn wait_progress(&self, n: u64, timeout: Duration) -> bool {
        let target = self.ok_so_far() + n;
        super::poll_until(timeout, || self.ok_so_far() >= target)
    }

    /// Asserts that 100 more requests are answered within
    /// [`super::DEADLINE`]; the message names `what` and holds `log`.
    pub fn assert_progress(&self, what: &str, log: &super::Lines) {
        assert!(
            self.wait_progress(100, super::DEADLINE),
            "no progress {what}; log:\n{}",
            log.dump()
        );
    }

    /// Stops the threads and sums what they saw.
    pub fn stop(mut self) -> LoadStats {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = LoadStats::default();
        for t in self.threads.drain(..) {
            total.merge(t.join().expect("a load thread panicked"));
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run(
    addr: SocketAddr,
    mode: Mode,
    io_timeout: Duration,
    max: Duration,
    stop: &AtomicBool,
    ok: &AtomicU64,
) -> LoadStats {
    let t0 = Instant::now();
    let mut stats = LoadStats::default();
    // A kept-alive connection and how many responses it carried.
    let mut kept: Option<(HttpConn, u64)> = None;
    while !stop.load(Ordering::SeqCst) && t0.elapsed() < max {
        stats.requests += 1;
        let (mut conn, served) = match kept.take() {
            Some(k) => k,
            None => match HttpConn::connect_with_timeout(addr, io_timeout) {
                Ok(c) => (c, 0),
                Err(e) => {
                    stats.connect_failures += 1;
                    stats.sample(t0, "connect", &e);
                    // Do not spin on a closed port.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let close = mode == Mode::Fresh;
        match conn.get(close) {
            Ok(r) => {
                if r.status == 200 {
                    stats.ok += 1;
                    ok.fetch_add(1, Ordering::SeqCst);
                    if let Some((id, _)) = super::parse_worker(&r.body) {
                        *stats.by_worker.entry(id).or_default() += 1;
                    }
                } else {
                    stats.bad_status += 1;
                    stats.sample(t0, "status", &format!("{r:?}"));
                }
                let server_closes = r
                    .header("Connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                if mode == Mode::KeepAlive && !server_closes && r.status == 200 {
                    kept = Some((conn, served + 1));
                }
            }
            Err(e) => {
                if served > 0 {
                    stats.reused_failures += 1;
                    stats.sample(
                        t0,
                        &format!("kept-alive connection after {served} responses"),
                        &e,
                    );
                } else {
                    stats.fresh_failures += 1;
                    if conn.buffered() == 0 {
                        stats.fresh_failures_no_byte += 1;
                        if e.kind() == io::ErrorKind::ConnectionReset {
                            stats.fresh_resets += 1;
                        }
                    }
                    stats.sample(t0, "new connection", &e);
                }
            }
        }
    }
    stats
}

/// Clients started by [`spawn_gets`].
#[derive(Debug)]
pub struct Clients {
    handles: Vec<JoinHandle<io::Result<Response>>>,
    sent: Arc<AtomicU64>,
}

impl Clients {
    /// How many clients have connected and sent their request so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until every client has sent its request;
    /// returns whether they have.
    pub fn wait_sent(&self, timeout: Duration) -> bool {
        let n = self.handles.len() as u64;
        super::poll_until(timeout, || self.sent() >= n)
    }

    /// Each client's response (or error), in order.
    pub fn join(self) -> Vec<io::Result<Response>> {
        self.handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect()
    }
}

/// Starts `n` clients at once, each sending one `Connection: close`
/// request on its own connection with `io_timeout`; [`Clients::join`]
/// collects the answers.
pub fn spawn_gets(addr: SocketAddr, n: usize, io_timeout: Duration) -> Clients {
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let sent = Arc::new(AtomicU64::new(0));
    let handles = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let sent = Arc::clone(&sent);
            std::thread::spawn(move || {
                barrier.wait();
                // The response is framed by Content-Length; its end of file
                // is not waited for: a hung worker may still hold a copy of
                // a connection handed over to another worker, which delays
                // the close until the hung worker is killed.
                let mut conn = HttpConn::connect_with_timeout(addr, io_timeout)?;
                conn.send(&super::http::request(true))?;
                sent.fetch_add(1, Ordering::SeqCst);
                conn.read_response()
            })
        })
        .collect();
    Clients { handles, sent }
}
