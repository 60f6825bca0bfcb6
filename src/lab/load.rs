//! The lab's load generator: HTTP/1.1 `GET`s over loopback from a few
//! threads, each with its own `mio::Poll` and its share of the connections.
//!
//! It is event-driven so that it can keep hundreds of connections busy from
//! one or two threads and still leave CPU to the app it measures: the lab
//! runs 8 workers on 2 cores, and a thread per connection would compete with
//! them for the CPU and measure the scheduler instead of the app.
//!
//! Each connection runs one request at a time (no pipelining): connect
//! without blocking, write the request, parse the response head with
//! `httparse`, read the body by `Content-Length` (or to EOF when there is
//! none), record the latency, and go again until the deadline. At the
//! deadline no request is started any more; those in flight get
//! [`DRAIN_GRACE`] to finish. Errors never end the run: they are counted and
//! the connection starts over, after a backoff ([`ERROR_BACKOFF`], doubling
//! up to [`MAX_ERROR_BACKOFF`]) so that a refused port does not spin a core.
//!
//! # Short connections and `TIME_WAIT`
//!
//! With `keepalive: false` every request is a new connection, and the
//! generator closes it as soon as the response is in: the side that closes
//! first keeps the connection in `TIME_WAIT` for 60 s, so here the client's
//! ephemeral ports pile up (28 232 with the default
//! `net.ipv4.ip_local_port_range` of 32768–60999). Linux reuses them for
//! new outgoing connections when `net.ipv4.tcp_tw_reuse` is 1, or 2 (the
//! default since 4.20) and the peer is on loopback, with TCP timestamps on:
//! measured on Linux 6.18 with 2 cores, 5 s at about 32 000 connections a
//! second (160 000 connections, 126 000 sockets left in `TIME_WAIT` after
//! three such runs) gave no error. Where reuse is off, `connect` fails with
//! `EADDRNOTAVAIL` once the ports run out: that shows up as errors, not as a
//! crash. Closing with `SO_LINGER` 0 (a reset, no `TIME_WAIT`) would hide
//! the problem, and is not done.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

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
/// The largest response head accepted; a longer one is a parse error.
const MAX_HEAD: usize = 64 * 1024;
/// How much of each body is kept to look for `worker <ID>`.
const BODY_PREFIX: usize = 512;
/// How often connections are checked for [`REQUEST_TIMEOUT`].
const TIMEOUT_SCAN: Duration = Duration::from_millis(50);
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
}

/// A share of requests that go to another path, e.g. a slow endpoint.
#[derive(Debug, Clone)]
pub struct SlowShare {
    /// The path, e.g. `/work?ms=50`.
    pub path: String,
    /// The share in thousandths, e.g. 50 = 5 %; drawn at random per request.
    pub per_mille: u32,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests answered with a 2xx status.
    pub requests: u64,
    /// Refused, reset or timed-out connections, responses cut short by EOF,
    /// non-2xx statuses, unparsable responses, and requests still unanswered
    /// at the end of [`DRAIN_GRACE`].
    pub errors: u64,
    /// From the start to the deadline, or to the last request answered in
    /// the drain if later: the time `requests` were served in.
    pub elapsed: Duration,
    /// Latency of each 2xx request in µs: from `connect` for short
    /// connections, from its first byte written on kept-alive ones, to the
    /// last byte of the response. Values above an hour saturate.
    pub latency_us: Histogram<u64>,
    /// 2xx requests per worker id, read from bodies that contain
    /// `worker <ID>` (the demo worker's `Hello from worker 3 (pid 42)`) in
    /// their first 512 bytes; empty when no body does.
    pub per_worker: BTreeMap<u64, u64>,
}

/// Drives `spec.addr` for `spec.duration` and returns what was measured.
///
/// Blocks for about `spec.duration` (plus at most [`DRAIN_GRACE`]), calling
/// `progress(elapsed, requests_so_far)` from the calling thread about every
/// [`PROGRESS_EVERY`] and once at the end.
///
/// # Errors
/// `InvalidInput` when `connections` or `threads` is 0; otherwise only when
/// a thread or its `Poll` cannot be created. Failed requests are counted in
/// [`LoadResult::errors`], never returned.
pub fn run_load(
    spec: &LoadSpec,
    progress: &(dyn Fn(Duration, u64) + Sync),
) -> io::Result<LoadResult> {
    if spec.connections == 0 || spec.threads == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a load needs at least one connection and one thread",
        ));
    }
    let threads = spec.threads.min(spec.connections);
    let completed = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let outcomes = std::thread::scope(|s| -> io::Result<Vec<io::Result<Stats>>> {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let conns = spec.connections / threads + usize::from(t < spec.connections % threads);
            let done_tx = done_tx.clone();
            let completed = &completed;
            let handle = std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn_scoped(s, move || {
                    // Dropped when the thread ends, even by a panic: the last
                    // one gone tells the caller's loop that all are done.
                    let _done = done_tx;
                    Driver::new(spec, conns, t as u64, completed)?.run(deadline)
                })?;
            handles.push(handle);
        }
        drop(done_tx);
        let mut next = start + PROGRESS_EVERY;
        // Nothing is ever sent: the channel disconnects when all are done.
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = done_rx.recv_deadline(next) {
            progress(start.elapsed(), completed.load(Ordering::Relaxed));
            // A late caller skips ticks rather than catching up in a burst.
            next = (next + PROGRESS_EVERY).max(Instant::now());
        }
        progress(start.elapsed(), completed.load(Ordering::Relaxed));
        Ok(handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a load thread panicked")))
            })
            .collect())
    })?;
    let mut result = LoadResult {
        requests: 0,
        errors: 0,
        elapsed: spec.duration,
        latency_us: new_histogram()?,
        per_worker: BTreeMap::new(),
    };
    let mut end = deadline;
    for stats in outcomes {
        let stats = stats?;
        result.requests += stats.requests;
        result.errors += stats.errors;
        result
            .latency_us
            .add(&stats.latency_us)
            .map_err(|e| io::Error::other(format!("merging latencies: {e:?}")))?;
        for (id, n) in stats.per_worker {
            *result.per_worker.entry(id).or_insert(0) += n;
        }
        end = end.max(stats.last_answer.unwrap_or(deadline));
    }
    result.elapsed = end.saturating_duration_since(start);
    Ok(result)
}

fn new_histogram() -> io::Result<Histogram<u64>> {
    Histogram::new_with_max(MAX_LATENCY_US, 3)
        .map_err(|e| io::Error::other(format!("latency histogram: {e:?}")))
}

/// One thread's counts.
struct Stats {
    requests: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    per_worker: BTreeMap<u64, u64>,
    last_answer: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting in the backoff queue to connect again.
    Backoff,
    /// `connect` started, not yet known to have succeeded.
    Connecting,
    /// Writing the request.
    Writing,
    /// Reading the response.
    Reading,
    /// Finished: no more requests on this slot.
    Done,
}

/// How the end of a response body is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Length(usize),
    Eof,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy)]
struct Head {
    status: u16,
    body: BodyEnd,
    close: bool,
}

/// A complete response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    status: u16,
    close: bool,
    worker: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    More,
    Done(Answer),
    Invalid,
}

/// The response being read on one connection; its buffer is reused.
#[derive(Debug, Default)]
struct ResponseReader {
    /// The head while incomplete, then the first [`BODY_PREFIX`] body bytes.
    buf: Vec<u8>,
    head: Option<Head>,
    body_read: usize,
}

impl ResponseReader {
    fn reset(&mut self) {
        self.buf.clear();
        self.head = None;
        self.body_read = 0;
    }

    /// Takes bytes just read.
    fn feed(&mut self, data: &[u8]) -> Feed {
        match self.head {
            None => {
                self.buf.extend_from_slice(data);
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                let head_len = match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) if self.buf.len() <= MAX_HEAD => {
                        return Feed::More;
                    }
                    Ok(httparse::Status::Partial) | Err(_) => return Feed::Invalid,
                };
                let Some(head) = parse_head(&resp) else {
                    return Feed::Invalid;
                };
                self.head = Some(head);
                self.body_read = self.buf.len() - head_len;
                self.buf.drain(..head_len);
                self.buf.truncate(BODY_PREFIX);
            }
            Some(_) => {
                self.body_read += data.len();
                let room = BODY_PREFIX.saturating_sub(self.buf.len());
                self.buf.extend_from_slice(&data[..room.min(data.len())]);
            }
        }
        match self.head {
            Some(Head {
                body: BodyEnd::Length(n),
                ..
            }) if self.body_read == n => Feed::Done(self.answer()),
            // Bytes beyond the body: nothing was asked for them.
            Some(Head {
                body: BodyEnd::Length(n),
                ..
            }) if self.body_read > n => Feed::Invalid,
            _ => Feed::More,
        }
    }

    /// The peer closed: complete when the body runs to EOF.
    fn eof(&self) -> Feed {
        match self.head {
            Some(Head {
                body: BodyEnd::Eof, ..
            }) => Feed::Done(self.answer()),
            _ => Feed::Invalid,
        }
    }

    fn answer(&self) -> Answer {
        let head = self.head.unwrap_or(Head {
            status: 0,
            body: BodyEnd::Eof,
            close: true,
        });
        Answer {
            status: head.status,
            close: head.close,
            worker: worker_id(&self.buf),
        }
    }
}

/// Status, body length and whether the server closes, from a parsed head;
/// `None` for a chunked body (not supported) or a bad `Content-Length`.
fn parse_head(resp: &httparse::Response<'_, '_>) -> Option<Head> {
    let status = resp.code?;
    let mut close = resp.version != Some(1);
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyEnd::Length(0)
    } else {
        match length {
            Some(n) => BodyEnd::Length(n),
            None => BodyEnd::Eof,
        }
    };
    if body == BodyEnd::Eof {
        close = true;
    }
    Some(Head {
        status,
        body,
        close,
    })
}

/// The number after the first `worker ` in `body`, if any.
fn worker_id(body: &[u8]) -> Option<u64> {
    const NEEDLE: &[u8] = b"worker ";
    let at = body.windows(NEEDLE.len()).position(|w| w == NEEDLE)? + NEEDLE.len();
    let digits = &body[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

/// One connection slot; its stream is replaced on every reconnect.
struct Conn {
    stream: Option<TcpStream>,
    phase: Phase,
    /// Whether the current request goes to the slow path.
    slow: bool,
    written: usize,
    /// Where the current request's latency counts from.
    started: Instant,
    /// When the current connect or request times out.
    timeout_at: Instant,
    /// Transport errors since the last response, for the backoff.
    failures: u32,
    reader: ResponseReader,
}

/// One generator thread: its connections, its `Poll`, its counts.
struct Driver<'a> {
    poll: Poll,
    conns: Vec<Conn>,
    /// Connections waiting out their backoff, the soonest due first.
    backoff: BinaryHeap<Reverse<(Instant, usize)>>,
    addr: SocketAddr,
    keepalive: bool,
    request: Vec<u8>,
    slow_request: Vec<u8>,
    slow_per_mille: u32,
    rng: fastrand::Rng,
    /// Where reads land before being parsed; one per thread.
    scratch: Vec<u8>,
    stopping: bool,
    stats: Stats,
    completed: &'a AtomicU64,
}

impl<'a> Driver<'a> {
    fn new(
        spec: &LoadSpec,
        conns: usize,
        seed: u64,
        completed: &'a AtomicU64,
    ) -> io::Result<Driver<'a>> {
        let now = Instant::now();
        let request_for = |path: &str| {
            let close = if spec.keepalive {
                ""
            } else {
                "Connection: close\r\n"
            };
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: distributor-lab\r\n{close}\r\n",
                spec.addr
            )
            .into_bytes()
        };
        let (slow_request, slow_per_mille) = match &spec.slow {
            Some(slow) => (request_for(&slow.path), slow.per_mille.min(1000)),
            None => (Vec::new(), 0),
        };
        Ok(Driver {
            poll: Poll::new()?,
            conns: (0..conns)
                .map(|_| Conn {
                    stream: None,
                    phase: Phase::Backoff,
                    slow: false,
                    written: 0,
                    started: now,
                    timeout_at: now,
                    failures: 0,
                    reader: ResponseReader {
                        buf: Vec::with_capacity(1024),
                        ..ResponseReader::default()
                    },
                })
                .collect(),
            backoff: BinaryHeap::with_capacity(conns),
            addr: spec.addr,
            keepalive: spec.keepalive,
            request: request_for(&spec.path),
            slow_request,
            slow_per_mille,
            rng: fastrand::Rng::with_seed(0x6c61_625f_6c6f_6164 ^ seed),
            scratch: vec![0; 16 * 1024],
            stopping: false,
            stats: Stats {
                requests: 0,
                errors: 0,
                latency_us: new_histogram()?,
                per_worker: BTreeMap::new(),
                last_answer: None,
            },
            completed,
        })
    }

    fn run(mut self, deadline: Instant) -> io::Result<Stats> {
        let mut events = Events::with_capacity(1024);
        for i in 0..self.conns.len() {
            self.connect(i);
        }
        let mut next_scan = Instant::now() + TIMEOUT_SCAN;
        let mut grace_end = deadline + DRAIN_GRACE;
        loop {
            let now = Instant::now();
            if !self.stopping && now >= deadline {
                self.stop();
                grace_end = now + DRAIN_GRACE;
            }
            if self.stopping {
                if self.conns.iter().all(|c| c.phase == Phase::Done) {
                    break;
                }
                if now >= grace_end {
                    for i in 0..self.conns.len() {
                        if self.conns[i].phase != Phase::Done {
                            self.fail(i);
                        }
                    }
                    break;
                }
            }
            while let Some(&Reverse((due, i))) = self.backoff.peek() {
                if due > now {
                    break;
                }
                self.backoff.pop();
                self.connect(i);
            }
            if now >= next_scan {
                next_scan = now + TIMEOUT_SCAN;
                for i in 0..self.conns.len() {
                    let c = &self.conns[i];
                    if matches!(c.phase, Phase::Connecting | Phase::Writing | Phase::Reading)
                        && c.timeout_at <= now
                    {
                        self.fail(i);
                    }
                }
            }
            let mut wake = next_scan.min(if self.stopping { grace_end } else { deadline });
            if let Some(&Reverse((due, _))) = self.backoff.peek() {
                wake = wake.min(due);
            }
            let timeout = wake.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                self.drive(event.token().0);
            }
        }
        Ok(self.stats)
    }

    /// At the deadline: slots between requests are done; those in flight
    /// finish their request first.
    fn stop(&mut self) {
        self.stopping = true;
        self.backoff.clear();
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            let idle = match c.phase {
                Phase::Backoff => true,
                // A kept-alive connection still connecting has no request yet.
                Phase::Connecting => self.keepalive,
                _ => false,
            };
            if idle {
                self.close(i);
                self.conns[i].phase = Phase::Done;
            }
        }
    }

    /// Starts a new connection on slot `i`, or marks it done when stopping.
    fn connect(&mut self, i: usize) {
        if self.stopping {
            self.conns[i].phase = Phase::Done;
            return;
        }
        let now = Instant::now();
        let keepalive = self.keepalive;
        let slow = !keepalive && self.pick_slow();
        let c = &mut self.conns[i];
        c.started = now;
        c.timeout_at = now + REQUEST_TIMEOUT;
        c.slow = slow;
        c.written = 0;
        c.reader.reset();
        let mut stream = match TcpStream::connect(self.addr) {
            Ok(stream) => stream,
            Err(_) => return self.fail(i),
        };
        if self
            .poll
            .registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return self.fail(i);
        }
        c.stream = Some(stream);
        c.phase = Phase::Connecting;
    }

    fn pick_slow(&mut self) -> bool {
        self.slow_per_mille > 0 && self.rng.u32(0..1000) < self.slow_per_mille
    }

    /// Makes what progress slot `i` allows now. Edge-triggered: every step
    /// goes on until it would block, and a stale or spurious event is
    /// harmless.
    fn drive(&mut self, i: usize) {
        loop {
            let Some(c) = self.conns.get_mut(i) else {
                return;
            };
            let Some(stream) = c.stream.as_mut() else {
                return;
            };
            match c.phase {
                Phase::Backoff | Phase::Done => return,
                Phase::Connecting => {
                    match stream.take_error() {
                        Ok(None) => {}
                        Ok(Some(_)) | Err(_) => return self.fail(i),
                    }
                    match stream.peer_addr() {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                        Err(_) => return self.fail(i),
                    }
                    c.phase = Phase::Writing;
                    if self.keepalive {
                        self.begin_request(i);
                    }
                }
                Phase::Writing => {
                    let request = if c.slow {
                        &self.slow_request
                    } else {
                        &self.request
                    };
                    match stream.write(&request[c.written..]) {
                        Ok(n) => {
                            c.written += n;
                            if c.written == request.len() {
                                c.phase = Phase::Reading;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return self.fail(i),
                    }
                }
                Phase::Reading => {
                    let feed = match stream.read(&mut self.scratch) {
                        Ok(0) => c.reader.eof(),
                        Ok(n) => c.reader.feed(&self.scratch[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => return self.fail(i),
                    };
                    match feed {
                        Feed::More => {}
                        Feed::Invalid => return self.fail(i),
                        Feed::Done(answer) => {
                            self.record(i, answer);
                            if !self.keepalive || answer.close {
                                self.close(i);
                                self.connect(i);
                                return;
                            }
                            if self.stopping {
                                self.close(i);
                                self.conns[i].phase = Phase::Done;
                                return;
                            }
                            self.begin_request(i);
                            self.conns[i].phase = Phase::Writing;
                        }
                    }
                }
            }
        }
    }

    /// A new request on the kept-alive connection of slot `i`.
    fn begin_request(&mut self, i: usize) {
        let now = Instant::now();
        let slow = self.pick_slow();
        let c = &mut self.conns[i];
        c.slow = slow;
        c.written = 0;
        c.started = now;
        c.timeout_at = now + REQUEST_TIMEOUT;
        c.reader.reset();
    }

    fn record(&mut self, i: usize, answer: Answer) {
        self.conns[i].failures = 0;
        if !(200..300).contains(&answer.status) {
            self.stats.errors += 1;
            return;
        }
        let now = Instant::now();
        let micros = now
            .saturating_duration_since(self.conns[i].started)
            .as_micros();
        self.stats
            .latency_us
            .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
        self.stats.requests += 1;
        self.stats.last_answer = Some(now);
        if let Some(id) = answer.worker {
            *self.stats.per_worker.entry(id).or_insert(0) += 1;
        }
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an error on slot `i`, closes it, and connects again after
    /// its backoff (or marks it done when stopping).
    fn fail(&mut self, i: usize) {
        self.stats.errors += 1;
        self.close(i);
        let c = &mut self.conns[i];
        if self.stopping {
            c.phase = Phase::Done;
        } else {
            let wait = (ERROR_BACKOFF * 2u32.pow(c.failures.min(16))).min(MAX_ERROR_BACKOFF);
            c.failures = c.failures.saturating_add(1);
            c.phase = Phase::Backoff;
            self.backoff.push(Reverse((Instant::now() + wait, i)));
        }
    }

    fn close(&mut self, i: usize) {
        if let Some(mut stream) = self.conns[i].stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// A tiny blocking HTTP server, a thread per connection, answering
    /// `Hello from worker 7 (pid 1)`; stops accepting when dropped.
    struct TestServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
    }

    impl TestServer {
        fn start() -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            listener.set_nonblocking(true).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            std::thread::spawn(move || serve(stream));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            });
            TestServer { addr, stop }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Answers by path: `/` as worker 7, `/slow` as worker 8, `/close`
    /// as worker 7 with `Connection: close`, anything else 404.
    fn serve(stream: std::net::TcpStream) {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = io::BufReader::new(stream);
        loop {
            let mut close = false;
            let mut line = String::new();
            let mut request_line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == "\r\n" {
                    break;
                }
                if request_line.is_empty() {
                    request_line = line.clone();
                }
                if line.eq_ignore_ascii_case("connection: close\r\n") {
                    close = true;
                }
            }
            let (status, body) = match request_line.split(' ').nth(1) {
                Some("/") => ("200 OK", "Hello from worker 7 (pid 1)\n"),
                Some("/slow") => ("200 OK", "Hello from worker 8 (pid 1)\n"),
                Some("/close") => {
                    close = true;
                    ("200 OK", "Hello from worker 7 (pid 1)\n")
                }
                _ => ("404 Not Found", "no\n"),
            };
            let connection = if close { "close" } else { "keep-alive" };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            );
            if writer.write_all(response.as_bytes()).is_err() || close {
                return;
            }
        }
    }

    fn spec(addr: SocketAddr, keepalive: bool) -> LoadSpec {
        LoadSpec {
            addr,
            connections: 4,
            duration: Duration::from_millis(300),
            keepalive,
            path: "/".to_string(),
            threads: 2,
            slow: None,
        }
    }

    fn check_against_test_server(keepalive: bool) {
        let server = TestServer::start();
        let calls = AtomicU64::new(0);
        let started = Instant::now();
        let result = run_load(&spec(server.addr, keepalive), &|_, _| {
            calls.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(result.requests > 0);
        assert_eq!(result.errors, 0);
        assert_eq!(result.per_worker, BTreeMap::from([(7, result.requests)]));
        assert_eq!(result.latency_us.len(), result.requests);
        assert!(result.elapsed >= Duration::from_millis(300));
        assert!(calls.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn keepalive_against_a_real_server() {
        check_against_test_server(true);
    }

    #[test]
    fn short_connections_against_a_real_server() {
        check_against_test_server(false);
    }

    #[test]
    fn server_closing_kept_alive_connections_means_reconnect() {
        let server = TestServer::start();
        let mut s = spec(server.addr, true);
        s.path = "/close".to_string();
        let result = run_load(&s, &|_, _| {}).unwrap();
        assert!(result.requests > 0);
        assert_eq!(result.errors, 0);
        assert_eq!(result.per_worker, BTreeMap::from([(7, result.requests)]));
    }

    #[test]
    fn slow_share_goes_to_its_path() {
        let server = TestServer::start();
        for keepalive in [true, false] {
            let mut s = spec(server.addr, keepalive);
            s.slow = Some(SlowShare {
                path: "/slow".to_string(),
                per_mille: 250,
            });
            let result = run_load(&s, &|_, _| {}).unwrap();
            assert_eq!(result.errors, 0);
            let slow = result.per_worker.get(&8).copied().unwrap_or(0);
            let fast = result.per_worker.get(&7).copied().unwrap_or(0);
            assert_eq!(slow + fast, result.requests);
            let share = slow as f64 / result.requests as f64;
            assert!(
                result.requests > 200 && (0.1..0.4).contains(&share),
                "{slow} of {}",
                result.requests
            );
        }
    }

    #[test]
    fn non_2xx_responses_are_errors() {
        let server = TestServer::start();
        let mut s = spec(server.addr, true);
        s.path = "/missing".to_string();
        let result = run_load(&s, &|_, _| {}).unwrap();
        assert_eq!(result.requests, 0);
        assert!(result.errors > 0);
        assert!(result.latency_us.is_empty());
    }

    #[test]
    fn unanswered_requests_end_with_the_grace_as_errors() {
        // Accepted by the kernel's backlog, never answered.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let result = run_load(&spec(listener.local_addr().unwrap(), true), &|_, _| {}).unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) + DRAIN_GRACE, "{took:?}");
        assert!(took < Duration::from_millis(300) + DRAIN_GRACE + Duration::from_secs(1));
        assert_eq!(result.requests, 0);
        assert_eq!(result.errors, 4);
        // Nothing answered in the drain: the run lasted its duration.
        assert!(result.elapsed < Duration::from_millis(400));
        drop(listener);
    }

    #[test]
    fn closed_port_counts_errors_and_ends_in_time() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        for keepalive in [true, false] {
            let started = Instant::now();
            let result = run_load(&spec(addr, keepalive), &|_, _| {}).unwrap();
            assert!(started.elapsed() < Duration::from_secs(3));
            assert!(result.errors > 0);
            assert_eq!(result.requests, 0);
            assert!(result.per_worker.is_empty());
        }
    }

    #[test]
    fn zero_connections_is_invalid() {
        let mut s = spec("127.0.0.1:1".parse().unwrap(), true);
        s.connections = 0;
        let err = run_load(&s, &|_, _| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn reader_handles_split_heads_bodies_and_eof() {
        let mut r = ResponseReader::default();
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\nHello from worker 12 (pid 3)";
        for (k, b) in resp.iter().enumerate() {
            let feed = r.feed(std::slice::from_ref(b));
            if k + 1 < resp.len() {
                assert_eq!(feed, Feed::More, "at byte {k}");
            } else {
                assert_eq!(
                    feed,
                    Feed::Done(Answer {
                        status: 200,
                        close: false,
                        worker: Some(12)
                    })
                );
            }
        }
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\nworker x"),
            Feed::More
        );
        assert_eq!(
            r.eof(),
            Feed::Done(Answer {
                status: 503,
                close: true,
                worker: None
            })
        );
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc"),
            Feed::Invalid
        );
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"),
            Feed::More
        );
        assert_eq!(r.eof(), Feed::Invalid);
        r.reset();
        assert_eq!(
            r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Feed::Invalid
        );
        r.reset();
        assert_eq!(r.feed(b"garbage\r\n\r\n"), Feed::Invalid);
    }

    #[test]
    fn worker_ids_from_bodies() {
        assert_eq!(worker_id(b"Hello from worker 3 (pid 42)\n"), Some(3));
        assert_eq!(worker_id(b"worker 10"), Some(10));
        assert_eq!(worker_id(b"worker x"), None);
        assert_eq!(worker_id(b"hello"), None);
    }
}
