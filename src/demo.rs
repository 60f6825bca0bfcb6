//! The built-in demo worker: a small HTTP/1.1 server on a mio event loop
//! that answers every request with `Hello from worker <ID> (pid <PID>)\n`.
//!
//! It is what `distributor` runs when no command is given, and an example
//! of a non-blocking worker: the [`WorkerListener`] and the connections are
//! registered with one `mio::Poll`. Requests are parsed with `httparse`;
//! keep-alive follows HTTP/1.1 (on unless `Connection: close`) and HTTP/1.0
//! (off unless `Connection: keep-alive`), and pipelined requests are
//! answered in order. Request bodies (`Content-Length`) are read and
//! discarded; a chunked body is refused with 501.
//!
//! `GET /work?ms=N` holds the whole worker for N ms (at most 10 s) before
//! answering, as a slow handler would: it serves nothing else meanwhile
//! (`&cpu=1` spins instead of sleeping). The lab uses it for a
//! heterogeneous workload. Each connection closed is reported to the
//! primary ([`WorkerListener::finished`]) for load-aware scheduling.
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

const CHANNEL: Token = Token(usize::MAX);
/// The largest request head accepted; a longer one gets 431.
const MAX_HEAD: usize = 64 * 1024;
/// After a stop, how long an idle kept-alive connection may still bring
/// its next request (answered with `Connection: close`) before it is closed.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

struct HttpConn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Close once `output` is written.
    closing: bool,
    /// Bytes of a request body still to discard.
    body_left: usize,
}

impl HttpConn {
    fn idle(&self) -> bool {
        self.input.is_empty() && self.written == self.output.len() && self.body_left == 0
    }
}

/// Runs the demo worker until the primary asks it to stop or goes away.
///
/// # Errors
/// When the process is not a worker, or the channel breaks the protocol.
pub fn run_demo_worker(mut listener: WorkerListener) -> io::Result<()> {
    let body = format!(
        "Hello from worker {} (pid {})\n",
        listener.id(),
        std::process::id()
    );
    let mut poll = Poll::new()?;
    listener.set_nonblocking(true);
    listener.report_finished()?;
    poll.registry()
        .register(&mut listener, CHANNEL, Interest::READABLE)?;
    let mut conns: Vec<Option<HttpConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut stopping = false;
    let mut close_idle_at: Option<Instant> = None;
    // Connections done this turn: reported finished before they close.
    let mut closing: Vec<HttpConn> = Vec::new();
    let mut events = Events::with_capacity(256);
    loop {
        if stopping && conns.iter().all(Option::is_none) {
            return Ok(());
        }
        if close_idle_at.is_some_and(|t| t <= Instant::now()) {
            close_idle_at = None;
            for (i, slot) in conns.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(HttpConn::idle) {
                    closing.extend(slot.take());
                    free.push(i);
                }
            }
            close_all(&mut listener, &mut closing)?;
            continue;
        }
        let timeout = close_idle_at.map(|t| t.saturating_duration_since(Instant::now()));
        listener.flush_reports()?;
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in events.iter() {
            if event.token() == CHANNEL {
                loop {
                    // Connections done free their fds before more arrive
                    // (once per CONNECTION message: a burst is one report).
                    if !listener.has_buffered() {
                        close_all(&mut listener, &mut closing)?;
                    }
                    match listener.next_event() {
                        Ok(WorkerEvent::Connection(stream, _peer)) => {
                            stream.set_nonblocking(true)?;
                            let mut conn = HttpConn {
                                stream: TcpStream::from_std(stream),
                                input: Vec::with_capacity(1024),
                                output: Vec::with_capacity(256),
                                written: 0,
                                closing: false,
                                body_left: 0,
                            };
                            // The request is usually there already: answer
                            // first, and watch only a connection that stays.
                            if !serve(&mut conn, &body, stopping, true).unwrap_or(false) {
                                closing.push(conn);
                                continue;
                            }
                            let i = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(
                                &mut conn.stream,
                                Token(i),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            conns[i] = Some(conn);
                        }
                        Ok(WorkerEvent::Message(_)) => {}
                        Ok(WorkerEvent::Stop) => {
                            stopping = true;
                            close_idle_at = Some(Instant::now() + DRAIN_IDLE_GRACE);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
            } else {
                let i = event.token().0;
                drive(&mut conns, &mut free, &mut closing, i, &body, stopping);
            }
        }
        close_all(&mut listener, &mut closing)?;
    }
}

/// Reads, answers and writes what connection `i` allows now; when it is
/// done, moves it to `closing`.
fn drive(
    conns: &mut [Option<HttpConn>],
    free: &mut Vec<usize>,
    closing: &mut Vec<HttpConn>,
    i: usize,
    body: &str,
    stopping: bool,
) {
    let Some(conn) = conns.get_mut(i).and_then(Option::as_mut) else {
        return;
    };
    if !serve(conn, body, stopping, false).unwrap_or(false) {
        closing.extend(conns[i].take());
        free.push(i);
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

/// Returns whether the connection stays open.
///
/// A `fresh` connection, not registered with the poll yet, stops reading
/// at a short read rather than at `WouldBlock`: a short read took all
/// there was, and its registration, if it stays open, reports whatever
/// came since (data or the peer's FIN). That is one `read` less per short
/// connection, as nginx does. A registered connection is edge-triggered
/// and reads on until `WouldBlock`, lest a FIN that came with the data go
/// unseen.
fn serve(conn: &mut HttpConn, body: &str, stopping: bool, fresh: bool) -> io::Result<bool> {
    let mut eof = false;
    let mut chunk = [0u8; 4096];
    while !conn.closing {
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) if fresh && n < chunk.len() => {
                conn.input.extend_from_slice(&chunk[..n]);
                break;
            }
            Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    answer(conn, body, stopping);
    while conn.written < conn.output.len() {
        match conn.stream.write(&conn.output[conn.written..]) {
            Ok(n) => conn.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    conn.output.clear();
    conn.written = 0;
    if conn.closing || eof {
        return Ok(false);
    }
    Ok(true)
}

/// Parses every complete request in `conn.input` and appends its response.
fn answer(conn: &mut HttpConn, body: &str, stopping: bool) {
    while !conn.closing {
        if conn.body_left > 0 {
            let n = conn.body_left.min(conn.input.len());
            conn.input.drain(..n);
            conn.body_left -= n;
            if conn.body_left > 0 {
                return;
            }
        }
        if conn.input.is_empty() {
            return;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&conn.input) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if conn.input.len() > MAX_HEAD => {
                respond(
                    conn,
                    "431 Request Header Fields Too Large",
                    "",
                    false,
                    false,
                );
                return;
            }
            Ok(httparse::Status::Partial) => return,
            Err(_) => {
                respond(conn, "400 Bad Request", "bad request\n", false, false);
                return;
            }
        };
        let http11 = req.version == Some(1);
        let mut keep_alive = http11;
        let mut body_len = 0usize;
        let mut chunked = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection") {
                let v = String::from_utf8_lossy(h.value);
                if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                    keep_alive = false;
                } else if v
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
                {
                    keep_alive = true;
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                match std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                {
                    Some(n) => body_len = n,
                    None => {
                        respond(
                            conn,
                            "400 Bad Request",
                            "bad content-length\n",
                            false,
                            false,
                        );
                        return;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        let head = req.method == Some("HEAD");
        let work = work_ms(req.path.unwrap_or("/"));
        conn.input.drain(..head_len);
        if chunked {
            respond(
                conn,
                "501 Not Implemented",
                "chunked bodies are not supported\n",
                false,
                false,
            );
            return;
        }
        conn.body_left = body_len;
        if let Some(work) = work {
            hold(work);
        }
        respond(conn, "200 OK", body, keep_alive && !stopping, head);
    }
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
