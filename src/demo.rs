//! The built-in demo worker: a small HTTP/1.1 server on a mio event loop
//! that answers every request with `Hello from worker <ID> (pid <PID>)\n`.
//!
//! It is what `distributor` runs when no command is given, the worker the
//! benchmarks set against nginx, and an example of a non-blocking worker:
//! the [`WorkerListener`] and the connections are registered with one
//! `mio::Poll`. Requests are parsed with `httparse`; keep-alive follows
//! HTTP/1.1 (on unless `Connection: close`) and HTTP/1.0 (off unless
//! `Connection: keep-alive`), and pipelined requests are answered in order.
//!
//! # Hostile clients
//!
//! Every resource a client can make it spend is bounded (the figures are
//! the constants below; nginx's defaults beside them):
//!
//! | what | here | nginx |
//! |---|---|---|
//! | a request head, from its first byte | [`HEAD_TIMEOUT`] 10 s, then 408 | `client_header_timeout` 60 s |
//! | between two reads of a body | [`BODY_TIMEOUT`] 10 s | `client_body_timeout` 60 s |
//! | between two writes that move | [`SEND_TIMEOUT`] 10 s | `send_timeout` 60 s |
//! | an idle kept-alive connection | [`IDLE_TIMEOUT`] 75 s | `keepalive_timeout` 75 s |
//! | a request head | [`MAX_HEAD`] 64 KiB, then 431 | `large_client_header_buffers` 4 × 8 KiB |
//! | a body | discarded as it streams, any size | `client_max_body_size` 1 MiB, then 413 |
//!
//! - **Memory per connection** is bounded: at most [`MAX_HEAD`] of unparsed
//!   input (a body is discarded as it arrives), and a connection whose
//!   client does not read stops being read once [`OUTPUT_HIGH`] of answers
//!   wait to be sent.
//! - **Work per connection per turn** is bounded ([`READ_BUDGET`] bytes
//!   read, [`REQUESTS_PER_TURN`] requests answered): one client pipelining
//!   thousands of requests is served in turns with the others, and in
//!   linear time (the input is consumed by an offset, not shifted per
//!   request).
//! - **Fds**: near its fd limit the worker first closes its least useful
//!   connections (idle kept-alive ones, oldest first, then those still
//!   sending a head), so that a new client is served while slow ones hold
//!   the table; beyond that the library gives new connections back to the
//!   primary ([`crate::worker::fd_headroom`]). It never exits for want of fds.
//! - **Framing** is strict (RFC 9112): two different `Content-Length`s, one
//!   that is not all digits, `Transfer-Encoding` beside `Content-Length`,
//!   or a line ending in a bare LF is 400, and the connection is closed.
//!   A chunked body is 501.
//!
//! `GET /work?ms=N` holds the whole worker for N ms (at most 10 s) before
//! answering, as a slow handler would (`&cpu=1` spins instead of
//! sleeping): the lab's heterogeneous workload. It is off unless the
//! environment sets [`DEMO_WORK_ENV`] (`distributor compare` and the
//! benchmarks do); otherwise `/work` is answered like any path. Each
//! connection closed is reported to the primary
//! ([`WorkerListener::finished`]) for load-aware scheduling.
//!
//! On the stop message it drains: the next request on each kept-alive
//! connection is answered with `Connection: close` and the connection closed
//! only then, never under a request in flight; connections still idle
//! [`DRAIN_IDLE_GRACE`] after the stop are closed. It returns when none is
//! left.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::worker::{WorkerEvent, WorkerListener};

/// Set in a worker's environment to make the `distributor` binary run as
/// this demo worker (what the command does when given no program).
pub const DEMO_WORKER_ENV: &str = "DISTRIBUTOR_DEMO_WORKER";

/// Set to `1` (in the primary's environment, which workers inherit) to let
/// `GET /work?ms=N` hold a demo worker; off by default, since it is a sleep
/// knob on a public port.
pub const DEMO_WORK_ENV: &str = "DISTRIBUTOR_DEMO_WORK";

const CHANNEL: Token = Token(usize::MAX);
/// The largest request head accepted; a longer one gets 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// How long a request head may take, from its first byte (or the
/// connection's start); then 408 and close.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may pause between two reads; then close.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer may wait for the client to read any of it; then close.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept-alive connection may stay idle between requests.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// The most bytes read from one connection in one turn of the loop.
pub const READ_BUDGET: usize = 64 * 1024;
/// The most requests answered on one connection in one turn of the loop.
pub const REQUESTS_PER_TURN: usize = 64;
/// A connection is not read while this much of its answers waits to be
/// sent (its client does not read).
pub const OUTPUT_HIGH: usize = 64 * 1024;
/// After a stop, how long an idle kept-alive connection may still bring
/// its next request (answered with `Connection: close`) before it is closed.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// After its last answer, how long a connection closed by the server
/// still has its input read and dropped (unless a declared body is being
/// discarded, which has the body timeout), and how much at most, so that
/// the close resets nothing the client has not read (nginx's
/// `lingering_time` 30 s).
pub const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 1 << 20;
/// How often the timeouts are checked: they fire up to this late.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Connections kept below the library's fd headroom, for the worker's own
/// fds (its poll, channel, listener, stdio) and a margin.
const FD_RESERVE: u64 = 32;

/// What a connection waits for, which decides its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The next request of a kept-alive connection.
    Idle,
    /// The rest of a request head.
    Head,
    /// More of a body to discard.
    Body,
    /// The client to read what is written.
    Send,
    /// The end of a connection closed after its last answer (see
    /// [`LINGER`]).
    Linger,
}

struct HttpConn {
    stream: TcpStream,
    /// Bytes read; those before `start` are consumed.
    input: Vec<u8>,
    start: usize,
    output: Vec<u8>,
    written: usize,
    /// Close once `output` is written.
    closing: bool,
    /// Bytes of a request body still to discard.
    body_left: u64,
    wait: Wait,
    /// When `wait` began, or last made progress (body, send): its timeout
    /// runs from here.
    since: Instant,
    /// On the list of connections with work left for the next turn.
    queued: bool,
    /// Bytes it may still send while lingering.
    linger_left: u64,
    /// Its last answer refused a request (4xx, 5xx): what the client still
    /// sends is read before the close (see [`LINGER`]).
    refused: bool,
}

impl HttpConn {
    fn new(stream: TcpStream, now: Instant) -> HttpConn {
        HttpConn {
            stream,
            input: Vec::with_capacity(1024),
            start: 0,
            output: Vec::with_capacity(256),
            written: 0,
            closing: false,
            body_left: 0,
            wait: Wait::Head,
            since: now,
            queued: false,
            linger_left: 0,
            refused: false,
        }
    }

    fn unparsed(&self) -> &[u8] {
        &self.input[self.start..]
    }

    /// Nothing buffered, nothing to write, no body coming: closing it
    /// loses no request.
    fn idle(&self) -> bool {
        self.unparsed().is_empty() && self.written == self.output.len() && self.body_left == 0
    }

    /// Whether its timeout has passed at `now`.
    fn expired(&self, now: Instant) -> bool {
        let limit = match self.wait {
            Wait::Idle => IDLE_TIMEOUT,
            Wait::Head => HEAD_TIMEOUT,
            Wait::Body => BODY_TIMEOUT,
            Wait::Send => SEND_TIMEOUT,
            Wait::Linger => LINGER,
        };
        now.saturating_duration_since(self.since) >= limit
    }

    /// Drops consumed input: once per turn, so pipelined requests cost
    /// linear time.
    fn compact(&mut self) {
        if self.start == self.input.len() {
            self.input.clear();
        } else if self.start > 0 {
            self.input.drain(..self.start);
        }
        self.start = 0;
    }
}

/// How one turn on a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// Waiting for the client (readable or writable).
    Open,
    /// Its budget ran out with work left: again next turn.
    Again,
    /// Done: close it.
    Closed,
}

/// What the worker answers, and whether `/work` may hold it.
struct Site {
    body: String,
    work: bool,
    stopping: bool,
}

/// The connections, by token.
struct Conns {
    slots: Vec<Option<HttpConn>>,
    free: Vec<usize>,
    open: usize,
    /// More than this many open, the least useful is closed for a new one.
    cap: usize,
}

impl Conns {
    fn insert(&mut self, conn: HttpConn) -> usize {
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.slots[i] = Some(conn);
        self.open += 1;
        i
    }

    fn take(&mut self, i: usize) -> Option<HttpConn> {
        let conn = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        self.open -= 1;
        Some(conn)
    }

    /// The connection to close for a new one: one lingering after its last
    /// answer, else the idle kept-alive one waiting longest, else the one
    /// sending its head longest; never one with a request being answered
    /// or a body being read.
    fn least_useful(&self) -> Option<usize> {
        let rank = |c: &HttpConn| match c.wait {
            Wait::Linger => Some((0, c.since)),
            Wait::Idle if c.written == c.output.len() => Some((1, c.since)),
            Wait::Head if c.written == c.output.len() => Some((2, c.since)),
            _ => None,
        };
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((rank(c.as_ref()?)?, i)))
            .min()
            .map(|(_, i)| i)
    }
}

/// Runs the demo worker until the primary asks it to stop or goes away.
///
/// # Errors
/// When the process is not a worker, or the channel breaks the protocol.
pub fn run_demo_worker(mut listener: WorkerListener) -> io::Result<()> {
    // `top` and `ps -e` tell it from the primary (`distributor`).
    let _ = crate::sys::set_process_name(c"distributor-wkr");
    let mut site = Site {
        body: format!(
            "Hello from worker {} (pid {})\n",
            listener.id(),
            std::process::id()
        ),
        work: std::env::var_os(DEMO_WORK_ENV).is_some_and(|v| v == "1"),
        stopping: false,
    };
    let limit = crate::sys::fd_limit().unwrap_or(1024);
    let cap = limit
        .saturating_sub(crate::worker::fd_headroom(limit) + FD_RESERVE)
        .max(8);
    let mut conns = Conns {
        slots: Vec::new(),
        free: Vec::new(),
        open: 0,
        cap: usize::try_from(cap).unwrap_or(usize::MAX),
    };
    let mut poll = Poll::new()?;
    listener.set_nonblocking(true);
    listener.report_finished()?;
    poll.registry()
        .register(&mut listener, CHANNEL, Interest::READABLE)?;
    let mut close_idle_at: Option<Instant> = None;
    let mut sweep_at = Instant::now() + SWEEP_EVERY;
    // Connections with work left for the next turn.
    let mut again: Vec<usize> = Vec::new();
    // Connections done this turn: reported finished before they close.
    let mut closing: Vec<HttpConn> = Vec::new();
    let mut events = Events::with_capacity(256);
    loop {
        if site.stopping && conns.open == 0 {
            return Ok(());
        }
        let now = Instant::now();
        if close_idle_at.is_some_and(|t| t <= now) {
            close_idle_at = None;
            for i in 0..conns.slots.len() {
                if conns.slots[i].as_ref().is_some_and(HttpConn::idle) {
                    closing.extend(conns.take(i));
                }
            }
            close_all(&mut listener, &mut closing)?;
            continue;
        }
        if sweep_at <= now {
            sweep_at = now + SWEEP_EVERY;
            sweep(&mut conns, &mut closing, now);
            close_all(&mut listener, &mut closing)?;
        }
        let mut wake = sweep_at;
        if let Some(t) = close_idle_at {
            wake = wake.min(t);
        }
        if listener.accept_paused() {
            wake = wake.min(now + crate::worker::ACCEPT_RETRY);
        }
        listener.flush_reports()?;
        if let Some(report) = listener.report_timeout() {
            wake = wake.min(now + report);
        }
        let timeout = if again.is_empty() {
            wake.saturating_duration_since(now)
        } else {
            Duration::ZERO
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let now = Instant::now();
        let channel_ready = listener.accept_paused() || events.iter().any(|e| e.token() == CHANNEL);
        for event in events.iter() {
            if event.token() != CHANNEL {
                drive(
                    &mut conns,
                    &mut closing,
                    &mut again,
                    event.token().0,
                    &site,
                    now,
                );
            }
        }
        for i in std::mem::take(&mut again) {
            if let Some(c) = conns.slots.get_mut(i).and_then(Option::as_mut) {
                c.queued = false;
            }
            drive(&mut conns, &mut closing, &mut again, i, &site, now);
        }
        if channel_ready {
            loop {
                // Connections done free their fds before more arrive
                // (once per CONNECTION message: a burst is one report).
                if !listener.has_buffered() {
                    close_all(&mut listener, &mut closing)?;
                }
                match listener.next_event() {
                    Ok(WorkerEvent::Connection(stream, _peer)) => {
                        stream.set_nonblocking(true)?;
                        if conns.open >= conns.cap {
                            // Room for this one: the least useful goes.
                            if let Some(victim) = conns.least_useful() {
                                closing.extend(conns.take(victim));
                            }
                        }
                        let mut conn = HttpConn::new(TcpStream::from_std(stream), now);
                        // The request is usually there already: answer
                        // first, and watch only a connection that stays.
                        let turn = serve(&mut conn, &site, now, true);
                        if turn == Turn::Closed {
                            closing.push(conn);
                            continue;
                        }
                        let queue = turn == Turn::Again;
                        conn.queued = queue;
                        let i = conns.insert(conn);
                        let conn = conns.slots[i].as_mut().expect("just inserted");
                        poll.registry().register(
                            &mut conn.stream,
                            Token(i),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        if queue {
                            again.push(i);
                        }
                    }
                    Ok(WorkerEvent::Message(_)) => {}
                    Ok(WorkerEvent::Stop) => {
                        site.stopping = true;
                        close_idle_at = Some(now + DRAIN_IDLE_GRACE);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        close_all(&mut listener, &mut closing)?;
    }
}

/// Closes the connections whose timeout has passed: a head not finished
/// in time gets 408 first (written if the socket takes it at once).
fn sweep(conns: &mut Conns, closing: &mut Vec<HttpConn>, now: Instant) {
    for i in 0..conns.slots.len() {
        let Some(c) = conns.slots[i].as_mut().filter(|c| c.expired(now)) else {
            continue;
        };
        if c.wait == Wait::Head && c.written == c.output.len() {
            c.output.clear();
            c.written = 0;
            respond(c, "408 Request Timeout", "request timeout\n", false, false);
            let _ = c.stream.write(&c.output);
        }
        closing.extend(conns.take(i));
    }
}

/// One turn on connection `i`: when it is done, moves it to `closing`;
/// when its budget ran out, queues it on `again`.
fn drive(
    conns: &mut Conns,
    closing: &mut Vec<HttpConn>,
    again: &mut Vec<usize>,
    i: usize,
    site: &Site,
    now: Instant,
) {
    let Some(conn) = conns.slots.get_mut(i).and_then(Option::as_mut) else {
        return;
    };
    match serve(conn, site, now, false) {
        Turn::Open => {}
        Turn::Again if !conn.queued => {
            conn.queued = true;
            again.push(i);
        }
        Turn::Again => {}
        Turn::Closed => closing.extend(conns.take(i)),
    }
}

/// Reports the connections in `closing` finished (one DONE for them all),
/// then closes them: the primary knows a worker is free before its client
/// can see the close and come back. Each is shut down for writing first,
/// so that its FIN goes now: the primary may still hold its copy (until it
/// reads the ACK), and a close alone would leave the FIN, and the whole TCP
/// teardown, to the primary's close of that copy.
fn close_all(listener: &mut WorkerListener, closing: &mut Vec<HttpConn>) -> io::Result<()> {
    if closing.is_empty() {
        return Ok(());
    }
    for _ in closing.iter() {
        listener.finished();
    }
    listener.flush_reports()?;
    for c in closing.drain(..) {
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
    }
    Ok(())
}

/// One turn on a connection: write what waits, answer what is buffered,
/// read more, within the turn's budgets.
///
/// A `fresh` connection, not registered with the poll yet, stops reading
/// at a short read rather than at `WouldBlock`: a short read took all
/// there was, and its registration, if it stays open, reports whatever
/// came since (data or the peer's FIN). That is one `read` less per short
/// connection, as nginx does. A registered connection is edge-triggered
/// and reads on until `WouldBlock` (or its budget: then it is queued for
/// the next turn), lest a FIN that came with the data go unseen.
fn serve(conn: &mut HttpConn, site: &Site, now: Instant, fresh: bool) -> Turn {
    let mut read = 0usize;
    let mut answered = 0usize;
    // A fresh connection's short read took all there was.
    let mut drained = false;
    let mut chunk = [0u8; 16 * 1024];
    let turn = loop {
        // 1. Write what waits.
        match flush(conn, now) {
            Ok(true) => {}
            Ok(false) => break Turn::Open,
            Err(()) => break Turn::Closed,
        }
        if conn.closing {
            // The client may still be sending (a body, or what an error
            // cut short): read it out first, or the close would reset.
            let buffered = conn.unparsed().len() as u64;
            if conn.refused || conn.body_left > buffered || conn.wait == Wait::Linger {
                break linger(conn, now, &mut chunk, &mut read);
            }
            break Turn::Closed;
        }
        // 2. Answer what is buffered, within the turn's budget.
        let before = conn.output.len();
        answered += answer(conn, site, now, REQUESTS_PER_TURN - answered);
        if conn.output.len() > before {
            continue;
        }
        if drained {
            break Turn::Open;
        }
        // 3. Read more, within the turn's budget, and never more than a
        // head's worth ahead of what is answered.
        conn.compact();
        if answered >= REQUESTS_PER_TURN || read >= READ_BUDGET || conn.input.len() > MAX_HEAD {
            break Turn::Again;
        }
        match conn.stream.read(&mut chunk) {
            Ok(0) => break Turn::Closed,
            Ok(n) => {
                read += n;
                drained = fresh && n < chunk.len();
                take_input(conn, &chunk[..n], now);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Turn::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break Turn::Closed,
        }
    };
    if turn != Turn::Closed {
        conn.compact();
    }
    turn
}

/// After the last answer of a connection it closes: its side is shut (the
/// FIN goes), then what the client still sends, the rest of a declared
/// body (any size) or up to [`LINGER_BYTES`] of anything else, is read and
/// dropped until the client closes, so that closing resets nothing the
/// client has not read.
fn linger(conn: &mut HttpConn, now: Instant, chunk: &mut [u8], read: &mut usize) -> Turn {
    if conn.linger_left == 0 {
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        let buffered = conn.input.len().saturating_sub(conn.start) as u64;
        let body = conn.body_left > buffered;
        conn.linger_left = if body {
            conn.body_left - buffered
        } else {
            LINGER_BYTES
        };
        conn.wait = if body { Wait::Body } else { Wait::Linger };
        conn.since = now;
        conn.start = conn.input.len();
    }
    loop {
        if *read >= READ_BUDGET {
            return Turn::Again;
        }
        match conn.stream.read(chunk) {
            Ok(0) => return Turn::Closed,
            Ok(n) => {
                *read += n;
                if conn.wait == Wait::Body {
                    conn.since = now;
                }
                conn.linger_left = conn.linger_left.saturating_sub(n as u64);
                if conn.linger_left == 0 {
                    return Turn::Closed;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Turn::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Turn::Closed,
        }
    }
}

/// Takes bytes read: a body being discarded swallows what is its own
/// (never buffered); the rest is input to parse.
fn take_input(conn: &mut HttpConn, bytes: &[u8], now: Instant) {
    let mut rest = bytes;
    if conn.body_left > 0 && conn.unparsed().is_empty() {
        let take = (rest.len() as u64).min(conn.body_left);
        conn.body_left -= take;
        conn.since = now;
        rest = &rest[take as usize..];
    }
    if rest.is_empty() {
        return;
    }
    if conn.unparsed().is_empty() && conn.wait == Wait::Idle {
        conn.wait = Wait::Head;
        conn.since = now;
    }
    conn.input.extend_from_slice(rest);
}

/// Writes what waits: `Ok(true)` when all is written, `Ok(false)` when the
/// client must read first (its socket is full), `Err` when it is gone.
fn flush(conn: &mut HttpConn, now: Instant) -> Result<bool, ()> {
    while conn.written < conn.output.len() {
        match conn.stream.write(&conn.output[conn.written..]) {
            Ok(n) => {
                conn.written += n;
                if conn.wait == Wait::Send {
                    conn.since = now;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if conn.wait != Wait::Send {
                    conn.wait = Wait::Send;
                    conn.since = now;
                }
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    conn.output.clear();
    conn.written = 0;
    if conn.wait == Wait::Send {
        conn.wait = if conn.unparsed().is_empty() {
            Wait::Idle
        } else {
            Wait::Head
        };
        conn.since = now;
    }
    Ok(true)
}

/// Parses up to `budget` complete requests in the buffered input and
/// appends their answers, stopping early once [`OUTPUT_HIGH`] waits to be
/// sent; discards a body as far as it is buffered. Returns how many it
/// answered.
fn answer(conn: &mut HttpConn, site: &Site, now: Instant, budget: usize) -> usize {
    let mut answered = 0;
    while !conn.closing && answered < budget && conn.output.len() < OUTPUT_HIGH {
        if conn.body_left > 0 {
            let n = (conn.body_left).min(conn.unparsed().len() as u64);
            conn.start += n as usize;
            conn.body_left -= n;
            if conn.body_left > 0 {
                conn.wait = Wait::Body;
                return answered;
            }
        }
        if conn.unparsed().is_empty() {
            if conn.wait != Wait::Idle {
                conn.wait = Wait::Idle;
                conn.since = now;
            }
            return answered;
        }
        if conn.wait == Wait::Idle || conn.wait == Wait::Body {
            conn.wait = Wait::Head;
            conn.since = now;
        }
        match parse(conn.unparsed()) {
            Parsed::Partial if conn.unparsed().len() > MAX_HEAD => {
                respond(
                    conn,
                    "431 Request Header Fields Too Large",
                    "",
                    false,
                    false,
                );
            }
            Parsed::Partial => return answered,
            Parsed::Bad(status, why) => respond(conn, status, why, false, false),
            Parsed::Request(r) => {
                conn.start += r.head_len;
                conn.body_left = r.body_len;
                if r.chunked {
                    respond(
                        conn,
                        "501 Not Implemented",
                        "chunked bodies are not supported\n",
                        false,
                        false,
                    );
                    return answered;
                }
                if site.work {
                    if let Some(work) = r.work {
                        hold(work);
                    }
                }
                let keep_alive = r.keep_alive && !site.stopping;
                respond(conn, "200 OK", &site.body, keep_alive, r.head_only);
                answered += 1;
            }
        }
    }
    answered
}

/// A request head, read.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    head_len: usize,
    body_len: u64,
    chunked: bool,
    keep_alive: bool,
    head_only: bool,
    work: Option<(u64, bool)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Request(Head),
    /// Not all of a head yet.
    Partial,
    /// Refused: the status and a body.
    Bad(&'static str, &'static str),
}

/// Reads one request head at the start of `input`, strictly (RFC 9112):
/// lines end in CRLF, `Content-Length` is digits only and, if repeated,
/// the same, and not beside `Transfer-Encoding`.
fn parse(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad("431 Request Header Fields Too Large", "");
        }
        Err(_) => return Parsed::Bad("400 Bad Request", "bad request\n"),
    };
    let bad = |why| Parsed::Bad("400 Bad Request", why);
    if input[..head_len]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || input[i - 1] != b'\r'))
    {
        return bad("lines must end in CRLF\n");
    }
    let http11 = req.version == Some(1);
    let mut keep_alive = http11;
    let mut body_len: Option<u64> = None;
    let mut transfer_encoding = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let value = h.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return bad("bad content-length\n");
            }
            let Some(n) = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) else {
                return bad("bad content-length\n");
            };
            if body_len.is_some_and(|before| before != n) {
                return bad("conflicting content-length\n");
            }
            body_len = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(h.value);
        }
    }
    if transfer_encoding.is_some() && body_len.is_some() {
        return bad("transfer-encoding with content-length\n");
    }
    Parsed::Request(Head {
        head_len,
        body_len: body_len.unwrap_or(0),
        chunked: transfer_encoding.is_some(),
        keep_alive,
        head_only: req.method == Some("HEAD"),
        work: work_ms(req.path.unwrap_or("/")),
    })
}

/// The longest `/work?ms=N` honoured.
const MAX_WORK_MS: u64 = 10_000;

/// `GET /work?ms=N`: how long to hold the worker (at most [`MAX_WORK_MS`]);
/// `&cpu=1` burns CPU instead of sleeping.
fn work_ms(path: &str) -> Option<(u64, bool)> {
    let query = path.strip_prefix("/work")?;
    let query = query.strip_prefix('?').unwrap_or("");
    let mut ms = None;
    let mut cpu = false;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("ms", v)) => ms = v.parse::<u64>().ok(),
            Some(("cpu", v)) => cpu = v == "1" || v == "true",
            _ => {}
        }
    }
    Some((ms.unwrap_or(0).min(MAX_WORK_MS), cpu))
}

/// Holds the whole worker, as a slow handler would: it serves nothing else
/// meanwhile. Sleeps, or with `cpu` spins like a CPU-heavy handler.
fn hold((ms, cpu): (u64, bool)) {
    let d = Duration::from_millis(ms);
    if cpu {
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    } else {
        std::thread::sleep(d);
    }
}

fn respond(conn: &mut HttpConn, status: &str, body: &str, keep_alive: bool, head: bool) {
    conn.refused = !status.starts_with('2');
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(
        conn.output,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    if !head {
        conn.output.extend_from_slice(body.as_bytes());
    }
    if !keep_alive {
        conn.closing = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Parsed {
        parse(text.as_bytes())
    }

    #[test]
    fn framing_is_strict() {
        let ok = head("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n");
        assert!(
            matches!(ok, Parsed::Request(Head { body_len: 5, .. })),
            "{ok:?}"
        );
        let same = head("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert!(matches!(same, Parsed::Request(Head { body_len: 5, .. })));
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 30\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\n\n",
            "GET / HTTP/1.1\r\nHost: x\n\r\n",
        ] {
            assert!(
                matches!(head(bad), Parsed::Bad("400 Bad Request", _)),
                "{bad:?}: {:?}",
                head(bad)
            );
        }
        let chunked = head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(
            chunked,
            Parsed::Request(Head { chunked: true, .. })
        ));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(65));
        assert_eq!(
            head(&many),
            Parsed::Bad("431 Request Header Fields Too Large", "")
        );
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial);
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_header() {
        let ka = |t: &str| match head(t) {
            Parsed::Request(h) => h.keep_alive,
            other => panic!("{other:?}"),
        };
        assert!(ka("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n"));
    }
}
