//! The metrics endpoint (`--metrics ADDR`, [`crate::Builder::metrics`]): a
//! tiny HTTP/1.1 server inside the primary's event loop, serving
//! `GET /metrics` (the Prometheus text format, see `exposition.rs`) and
//! `GET /healthz` (200 while at least one worker is ready, else 503).
//!
//! It keeps the primary's invariants: it never blocks and never spins.
//!
//! - **One loop.** A non-blocking listener and each client connection are
//!   registered with the event loop's poller, edge-triggered, under tokens
//!   of their own (see [`owns`]); reads and writes go until `WouldBlock`,
//!   and a response that does not fit in the socket buffer is finished on
//!   the writable event.
//! - **Bounded, never starved.** At most [`MAX_CLIENTS`] clients at once.
//!   When all places are taken, a new client takes the place of the one
//!   that has waited longest without sending a whole request (idle or slow
//!   clients cannot keep a health check out); only when every client is
//!   being answered is the new one closed. A request head is at most
//!   [`MAX_HEAD`] bytes (else 431), parsed with `httparse`. One request per
//!   connection, answered with `Connection: close`; then the endpoint
//!   shuts its side and reads what the client still sends, for at most
//!   [`LINGER`], before it closes, so that a client still sending (a head
//!   too large) reads its 431 rather than a reset.
//! - **Timers.** A client has [`CLIENT_TIMEOUT`] from its accept to send a
//!   whole request head, and as long again to take the response, or it is
//!   closed; the deadlines feed the loop's poll timeout. An accept that
//!   fails for want of fds (`EMFILE`) is retried after [`ACCEPT_RETRY`].
//!
//! The figures are taken from the event loop ([`Stats`]) when a request is
//! complete: the endpoint and [`crate::Handle::stats`] always agree.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use super::source::Source;
use tracing::{debug, warn};

use super::exposition;
use super::stats::Stats;

/// The most clients served at once.
pub(super) const MAX_CLIENTS: usize = super::source::MAX_METRICS_CLIENTS;
/// The longest request head (request line and headers), in bytes.
pub(super) const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request, and then to take the response.
pub(super) const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client that has its response may still send (discarded)
/// before its connection is closed.
pub(super) const LINGER: Duration = Duration::from_secs(1);
/// The most a client may send after its response before it is closed.
const LINGER_BYTES: usize = 64 * 1024;
/// How long accepting pauses after an error such as `EMFILE`.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The listener's backlog: a scrape or probe at a time is the usual load.
const BACKLOG: i32 = 128;

/// The endpoint: its listener and its clients.
pub(crate) struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// Client `k` has token `Source::MetricsClient(k)`.
    clients: Vec<Option<Client>>,
    accept_retry_at: Option<Instant>,
}

struct Client {
    stream: TcpStream,
    /// The request as received so far.
    head: Vec<u8>,
    /// The response, once the request is read; `written` bytes of it sent.
    response: Option<Vec<u8>>,
    written: usize,
    /// The response is sent and this side shut: reading to its end.
    lingering: bool,
    /// Bytes read and dropped while lingering.
    lingered: usize,
    deadline: Instant,
}

impl MetricsServer {
    /// Binds `addr` (`SO_REUSEADDR`, close-on-exec, non-blocking).
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<MetricsServer> {
        MetricsServer::serve(super::server::bind(addr, BACKLOG, false)?)
    }

    /// Serves on `listener`, already listening (one handed over by the
    /// primary before an upgrade).
    pub(crate) fn serve(listener: std::net::TcpListener) -> io::Result<MetricsServer> {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        Ok(MetricsServer {
            listener: TcpListener::from_std(listener),
            local_addr,
            clients: (0..MAX_CLIENTS).map(|_| None).collect(),
            accept_retry_at: None,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its listening socket (to hand over in an upgrade).
    pub(crate) fn listener_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// Stops accepting: deregisters and closes the listener's registration
    /// (the socket itself lives on in the primary that took over).
    pub(super) fn stop_listening(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        self.accept_retry_at = None;
    }

    pub(super) fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(
            &mut self.listener,
            Source::MetricsListener.token(),
            Interest::READABLE,
        )
    }

    /// Handles an event for one of the endpoint's tokens; `stats` is
    /// called only when a request for the figures is complete.
    pub(super) fn on_event(
        &mut self,
        registry: &Registry,
        event: &Event,
        now: Instant,
        stats: impl FnOnce() -> Stats,
    ) {
        let k = match Source::of(event.token()) {
            Source::MetricsClient(k) => k,
            _ => {
                self.accept(registry, now);
                return;
            }
        };
        let Some(client) = self.clients.get_mut(k).and_then(Option::as_mut) else {
            return;
        };
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        if client.response.is_none() && readable {
            match client.read_request() {
                Ok(None) => return,
                Ok(Some(request)) => {
                    client.response = Some(respond(&request, stats));
                    client.deadline = now + CLIENT_TIMEOUT;
                }
                Err(e) => {
                    debug!("metrics: closing a client that sent no whole request: {e}");
                    self.close(registry, k);
                    return;
                }
            }
        }
        if client.lingering {
            if readable && client.drain() {
                self.close(registry, k);
            }
            return;
        }
        if client.response.is_some() {
            match client.write_response() {
                Ok(false) => {}
                Ok(true) => {
                    // Whatever it still sends is read and dropped, so that
                    // the close resets nothing it has not read.
                    let _ = client.stream.shutdown(std::net::Shutdown::Write);
                    client.lingering = true;
                    client.deadline = now + LINGER;
                    if client.drain() {
                        self.close(registry, k);
                    }
                }
                Err(e) => {
                    debug!("metrics: cannot send a response: {e}");
                    self.close(registry, k);
                }
            }
        }
    }

    /// The nearest deadline: a client's, or the accept retry.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let clients = self.clients.iter().flatten().map(|c| c.deadline);
        clients.chain(self.accept_retry_at).min()
    }

    /// Closes the clients whose time is up; retries a paused accept.
    pub(super) fn on_timers(&mut self, registry: &Registry, now: Instant) {
        for k in 0..self.clients.len() {
            if self.clients[k].as_ref().is_some_and(|c| c.deadline <= now) {
                debug!("metrics: closing a client after {CLIENT_TIMEOUT:?}");
                self.close(registry, k);
            }
        }
        if self.accept_retry_at.is_some_and(|t| t <= now) {
            self.accept(registry, now);
        }
    }

    /// Accepts until `WouldBlock`: a free place gets a client, and a
    /// connection beyond [`MAX_CLIENTS`] is closed at once.
    fn accept(&mut self, registry: &Registry, now: Instant) {
        self.accept_retry_at = None;
        loop {
            let (mut stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => continue,
                    _ => {
                        warn!("metrics: accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                        self.accept_retry_at = Some(now + ACCEPT_RETRY);
                        return;
                    }
                },
            };
            let k = match self.clients.iter().position(Option::is_none) {
                Some(k) => k,
                None => match self.longest_waiting() {
                    Some(k) => {
                        debug!(
                            "metrics: {MAX_CLIENTS} clients; closing the one waiting longest without a request for the one from {peer}"
                        );
                        self.close(registry, k);
                        k
                    }
                    None => {
                        debug!(
                            "metrics: {MAX_CLIENTS} clients being answered; closing the one from {peer}"
                        );
                        continue;
                    }
                },
            };
            let token = Source::MetricsClient(k).token();
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = registry.register(&mut stream, token, interest) {
                warn!("metrics: cannot watch a client: {e}");
                continue;
            }
            self.clients[k] = Some(Client {
                stream,
                head: Vec::new(),
                response: None,
                written: 0,
                lingering: false,
                lingered: 0,
                deadline: now + CLIENT_TIMEOUT,
            });
        }
    }

    /// The client that has waited longest without a whole request (its
    /// deadline is the earliest), or that lingers after its response.
    fn longest_waiting(&self) -> Option<usize> {
        self.clients
            .iter()
            .enumerate()
            .filter_map(|(k, c)| Some((c.as_ref()?, k)))
            .filter(|(c, _)| c.response.is_none() || c.lingering)
            .min_by_key(|(c, _)| (!c.lingering, c.deadline))
            .map(|(_, k)| k)
    }

    fn close(&mut self, registry: &Registry, k: usize) {
        if let Some(mut client) = self.clients[k].take() {
            let _ = registry.deregister(&mut client.stream);
        }
    }
}

impl Client {
    /// Reads until `WouldBlock`; the request once its head is whole (or
    /// known to be bad), `None` while more is needed, an error at end of
    /// file or on a failed read.
    fn read_request(&mut self) -> io::Result<Option<Request>> {
        let mut chunk = [0u8; 2048];
        loop {
            // `parse` answers 431 once the head is full, so there is room.
            let room = (MAX_HEAD - self.head.len()).min(chunk.len());
            match (&self.stream).read(&mut chunk[..room]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.head.extend_from_slice(&chunk[..n]);
                    if let Some(request) = parse(&self.head) {
                        return Ok(Some(request));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and drops what a client sends after its response; `true` at
    /// its end (or on an error): time to close.
    fn drain(&mut self) -> bool {
        let mut chunk = [0u8; 2048];
        loop {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) if self.lingered + n > LINGER_BYTES => return true,
                Ok(n) => self.lingered += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// Writes until done (`true`) or `WouldBlock` (`false`).
    fn write_response(&mut self) -> io::Result<bool> {
        let Some(response) = self.response.as_ref() else {
            return Ok(false);
        };
        while self.written < response.len() {
            match (&self.stream).write(&response[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET` (or `HEAD`, without the body) of a path, query removed.
    Get { path: String, head_only: bool },
    /// A request that gets an error status (bad syntax, too large, a
    /// method other than `GET` and `HEAD`).
    Reject(u16),
}

/// Parses a request head; `None` while it is incomplete.
fn parse(head: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => {
            return Some(Request::Reject(431));
        }
        Ok(httparse::Status::Partial) => return None,
        Err(httparse::Error::TooManyHeaders) => return Some(Request::Reject(431)),
        Err(_) => return Some(Request::Reject(400)),
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Some(Request::Reject(400));
    };
    if method != "GET" && method != "HEAD" {
        return Some(Request::Reject(405));
    }
    let path = path
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_string();
    Some(Request::Get {
        path,
        head_only: method == "HEAD",
    })
}

/// The whole response to `request`.
fn respond(request: &Request, stats: impl FnOnce() -> Stats) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (path, head_only) = match request {
        Request::Get { path, head_only } => (path.as_str(), *head_only),
        Request::Reject(status) => {
            let body = format!("{}\n", reason(*status));
            return response(*status, TEXT, &body, false);
        }
    };
    match path {
        "/metrics" => {
            let body = exposition::render(&stats());
            response(200, exposition::CONTENT_TYPE, &body, head_only)
        }
        "/healthz" => {
            let stats = stats();
            let (ready, slots) = (stats.ready_workers(), stats.active_slots());
            let (status, word) = if ready > 0 {
                (200, "ok")
            } else {
                (503, "unavailable")
            };
            let body = match &stats.problem {
                Some(problem) if ready == 0 => {
                    format!("{word}: {ready} of {slots} workers ready; {problem}\n")
                }
                _ => format!("{word}: {ready} of {slots} workers ready\n"),
            };
            response(status, TEXT, &body, head_only)
        }
        _ => response(
            404,
            TEXT,
            "not found: try /metrics or /healthz\n",
            head_only,
        ),
    }
}

fn response(status: u16, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::Sched;

    fn get(path: &str) -> Option<Request> {
        Some(Request::Get {
            path: path.into(),
            head_only: false,
        })
    }

    #[test]
    fn parses_whole_heads_only() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            get("/metrics")
        );
        assert_eq!(
            parse(b"GET /healthz?full=1 HTTP/1.0\r\n\r\n"),
            get("/healthz")
        );
        assert_eq!(
            parse(b"HEAD /healthz HTTP/1.1\r\n\r\n"),
            Some(Request::Get {
                path: "/healthz".into(),
                head_only: true
            })
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Request::Reject(405))
        );
        assert_eq!(
            parse(b"\x00\x01 nonsense\r\n\r\n"),
            Some(Request::Reject(400))
        );
    }

    #[test]
    fn a_head_too_large_or_with_too_many_headers_is_431() {
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse(&big), Some(Request::Reject(431)));
        assert_eq!(parse(&big[..MAX_HEAD - 1]), None);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(40));
        assert_eq!(parse(many.as_bytes()), Some(Request::Reject(431)));
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    fn stats() -> Stats {
        Stats::empty(Sched::RoundRobin, "127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn routes_and_frames_responses() {
        let r = text(respond(&get("/metrics").unwrap(), stats));
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(&format!("Content-Type: {}\r\n", exposition::CONTENT_TYPE)));
        assert!(r.contains("Connection: close\r\n"));
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(body.contains("# TYPE distributor_info gauge\n"));

        // No worker ready: unhealthy.
        let r = text(respond(&get("/healthz").unwrap(), stats));
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(
            r.ends_with("\r\n\r\nunavailable: 0 of 0 workers ready\n"),
            "{r}"
        );

        let r = text(respond(&get("/nope").unwrap(), || unreachable!()));
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        let r = text(respond(&Request::Reject(405), || unreachable!()));
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{r}");

        let head_only = Request::Get {
            path: "/metrics".into(),
            head_only: true,
        };
        let r = text(respond(&head_only, stats));
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");
        assert!(!r.contains("Content-Length: 0\r\n"), "{r}");
    }
}
