//! One thread of the load generator: its share of the connections, its own
//! `mio::Poll`, and its counts.
//!
//! Each connection slot goes connect, write the request, read the response
//! (with [`ResponseReader`]), and again, until the deadline; after it, the
//! requests in flight get [`DRAIN_GRACE`]. Transport errors close the
//! connection and start it over after a backoff that doubles with each error
//! in a row. Events are edge-triggered: every step goes on until it would
//! block.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::response::{Answer, Feed, ResponseReader};
use super::spec::{
    DRAIN_GRACE, ERROR_BACKOFF, LoadSpec, MAX_ERROR_BACKOFF, REQUEST_TIMEOUT, new_histogram,
};

/// How often connections are checked for [`REQUEST_TIMEOUT`].
const TIMEOUT_SCAN: Duration = Duration::from_millis(50);

/// One thread's counts.
pub(super) struct Stats {
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) latency_us: Histogram<u64>,
    pub(super) per_worker: BTreeMap<u64, u64>,
    pub(super) last_answer: Option<Instant>,
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

/// One connection slot; its stream is replaced on every reconnect.
struct Conn {
    stream: Option<TcpStream>,
    phase: Phase,
    /// Whether the current request goes to the slow path.
    slow: bool,
    /// Whose connection it is (with sessions).
    client: Option<usize>,
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
pub(super) struct Driver<'a> {
    poll: Poll,
    conns: Vec<Conn>,
    /// Connections waiting out their backoff, the soonest due first.
    backoff: BinaryHeap<Reverse<(Instant, usize)>>,
    addr: SocketAddr,
    keepalive: bool,
    request: Vec<u8>,
    slow_request: Vec<u8>,
    slow_per_mille: u32,
    /// With sessions: each client's request.
    sessions: Vec<Vec<u8>>,
    /// The first `heavy` clients send a third of the connections.
    heavy: usize,
    rng: fastrand::Rng,
    /// Where reads land before being parsed; one per thread.
    scratch: Vec<u8>,
    stopping: bool,
    stats: Stats,
    completed: &'a AtomicU64,
}

impl<'a> Driver<'a> {
    pub(super) fn new(
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
        let session_for = |client: u32| {
            let close = if spec.keepalive {
                ""
            } else {
                "Connection: close\r\n"
            };
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: distributor-lab\r\nCookie: sid=c{client}\r\n{close}\r\n",
                spec.path, spec.addr
            )
            .into_bytes()
        };
        let sessions = spec.sessions.map_or_else(Vec::new, |s| {
            (0..s.clients.max(1)).map(session_for).collect()
        });
        let heavy = spec
            .sessions
            .map_or(0, |s| s.heavy.min(s.clients.max(1)) as usize);
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
                    client: None,
                    written: 0,
                    started: now,
                    timeout_at: now,
                    failures: 0,
                    reader: ResponseReader::with_capacity(1024),
                })
                .collect(),
            backoff: BinaryHeap::with_capacity(conns),
            addr: spec.addr,
            keepalive: spec.keepalive,
            request: request_for(&spec.path),
            slow_request,
            slow_per_mille,
            sessions,
            heavy,
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

    pub(super) fn run(mut self, deadline: Instant) -> io::Result<Stats> {
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
        let client = self.pick_client();
        let c = &mut self.conns[i];
        c.started = now;
        c.timeout_at = now + REQUEST_TIMEOUT;
        c.slow = slow;
        c.client = client;
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

    /// With sessions: a heavy client for a third of the connections, else
    /// one of the others.
    fn pick_client(&mut self) -> Option<usize> {
        let n = self.sessions.len();
        if n == 0 {
            return None;
        }
        let heavy = self.heavy.min(n);
        Some(if heavy > 0 && (heavy == n || self.rng.u32(0..3) == 0) {
            self.rng.usize(0..heavy)
        } else {
            self.rng.usize(heavy..n)
        })
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
                    let request = match (c.slow, c.client) {
                        (true, _) => &self.slow_request,
                        (false, Some(client)) => &self.sessions[client],
                        (false, None) => &self.request,
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
