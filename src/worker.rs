//! The worker side: a listener-like [`WorkerListener`] whose `accept` gives
//! the connections the primary hands over.
//!
//! A worker process finds its channel through the environment
//! ([`crate::protocol::ENV_FD`]), says hello (ready) once, then receives
//! connections, user messages and the stop request. Each connection is
//! acknowledged as soon as it is received, before the caller sees it, so the
//! primary can hand it elsewhere only while this worker never had it.
//!
//! # Blocking, mio and tokio
//!
//! By default `accept` blocks like [`std::net::TcpListener::accept`]. After
//! [`WorkerListener::set_nonblocking`] it returns `WouldBlock` instead, and
//! the listener can be registered with mio (it implements
//! [`mio::event::Source`]). On tokio, use `distributor::tokio` (the `tokio`
//! feature), which watches every fd the listener reads (the channel, and in
//! a kernel mode the inherited listening socket too, see
//! [`WorkerListener::listener_fd`]). Only receives are non-blocking:
//! acknowledgements and user messages are sent blocking, which waits only
//! while the primary's receive buffer is full.
//!
//! The streams handed out are blocking `std::net::TcpStream`s, as from
//! `accept(2)`; set them non-blocking (or convert them) for an event loop.
//!
//! # Kernel balancing modes
//!
//! In the `shared` and `reuseport` modes the primary does not accept: the
//! worker inherits a listening socket by socket activation (fd 3,
//! `LISTEN_FDS`, `LISTEN_PID`) and this listener accepts on it by itself,
//! while still reading the channel for stop, messages and heartbeats. The
//! same worker code runs in every mode. It reports how many connections it
//! accepted (a STATS message at most every 100 ms, and at stop), so the
//! primary has per-worker figures in every mode.
//!
//! # Fd headroom
//!
//! A worker never exits, or drops what it holds, for want of fds: it keeps
//! [`fd_headroom`] fds below its `RLIMIT_NOFILE`. Connections whose fds
//! land in that headroom (fds are numbered lowest-free-first, so a high
//! number means a nearly full table), or whose fds did not all arrive
//! (`MSG_CTRUNC`), are given back to the primary (the protocol's RETURN),
//! which hands them to other workers; in a kernel mode, accepting pauses
//! until an fd below the headroom is free ([`WorkerListener::accept_paused`]).
//! The rule is in docs/PROTOCOL.md, section 5, for workers in any
//! language. Bound how long idle clients hold fds too (the demo worker's
//! timeouts, `crate::demo`).
//!
//! # Liveness
//!
//! The primary pings ready workers; `accept` and `next_event` answer the
//! pings they read. A worker that does not read its channel for the
//! primary's worker timeout (default 30 s) is taken for hung and replaced,
//! so a worker that serves on the accepting thread must keep each request
//! shorter than that (or serve on other threads, as most do).

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::channel::{Channel, Recv};
use crate::protocol::{self, Encoder, ToWorker};
use crate::sys;

/// Set once the channel fd named by the environment has been taken.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Whether this process was started as a worker by a distributor primary
/// (its environment names a channel). The library's analogue of Node's
/// `cluster.isWorker`.
pub fn is_worker() -> bool {
    std::env::var_os(protocol::ENV_FD).is_some()
}

/// Whether this process is a primary: not started as a worker. The
/// analogue of Node's `cluster.isPrimary`.
pub fn is_primary() -> bool {
    !is_worker()
}

/// Why [`WorkerListener::from_env`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkerError {
    /// The environment names no channel: this process is not a worker.
    NotAWorker,
    /// The channel was already taken by an earlier `from_env`.
    AlreadyTaken,
    /// An environment variable has a value that makes no sense.
    BadEnvironment {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The protocol version offered is not one this crate speaks.
    Version(String),
    /// The fd named is not usable as a channel.
    Io(io::Error),
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerError::NotAWorker => write!(
                f,
                "not started by distributor ({} is unset)",
                protocol::ENV_FD
            ),
            WorkerError::AlreadyTaken => write!(f, "the worker channel was already taken"),
            WorkerError::BadEnvironment { var, value } => write!(f, "{var}={value:?} is not valid"),
            WorkerError::Version(v) => write!(
                f,
                "the primary speaks protocol version {v}, this worker speaks {}",
                protocol::VERSION
            ),
            WorkerError::Io(e) => write!(f, "worker channel unusable: {e}"),
        }
    }
}

impl std::error::Error for WorkerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WorkerError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Something the primary sent, as returned by [`WorkerListener::next_event`].
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkerEvent {
    /// A connection, already acknowledged, with its peer's address.
    Connection(TcpStream, SocketAddr),
    /// An opaque message from the primary's application.
    Message(Vec<u8>),
    /// Graceful stop: no more connections will come; finish and exit.
    Stop,
}

/// The worker's end of its channel to the primary, used like a listener.
///
/// End a connection with [`TcpStream::shutdown`] (`Shutdown::Write`) before
/// dropping it: the primary may still hold its copy of the connection (it
/// closes it when it reads the acknowledgement), and a drop alone sends no
/// FIN until that copy is closed, leaving the TCP teardown to the primary.
#[derive(Debug)]
pub struct WorkerListener {
    channel: Channel,
    id: u64,
    nonblocking: bool,
    said_hello: bool,
    stopping: bool,
    /// Events received but not yet returned (a CONNECTION can carry several).
    pending: VecDeque<WorkerEvent>,
    /// User messages set aside by `accept`.
    messages: VecDeque<Vec<u8>>,
    buf: Box<[u8]>,
    fds: Vec<OwnedFd>,
    /// Kernel modes: the inherited listening socket, non-blocking.
    listener: Option<std::net::TcpListener>,
    /// Connections accepted from `listener`, and the total last reported.
    accepted: u64,
    reported: u64,
    last_report: Instant,
    /// Connections finished (`finished`), and the total last reported.
    finished: u64,
    finished_reported: u64,
    /// The primary reads DONE reports (`DISTRIBUTOR_REPORT_FINISHED`).
    reports_wanted: bool,
    /// A new fd numbered this or higher means the fd table is nearly full
    /// (fds are numbered lowest-free first): see [`fd_headroom`].
    fd_threshold: RawFd,
    /// Kernel modes: not accepting until an fd below `fd_threshold` is free.
    accept_paused: bool,
}

/// How many fds a worker keeps free for itself below its `RLIMIT_NOFILE`:
/// a full CONNECTION message (64) and 32 more for its own needs, or a
/// quarter of a small limit. A worker whose new connections get fd numbers
/// in that headroom gives them back (RETURN) instead of taking them, or in
/// a kernel mode stops accepting, rather than run out of fds and exit.
pub fn fd_headroom(limit: u64) -> u64 {
    (protocol::MAX_FDS as u64 + 32).min(limit / 4)
}

/// The fd number from which a worker with this `RLIMIT_NOFILE` is near it.
fn fd_threshold(limit: u64) -> RawFd {
    limit
        .saturating_sub(fd_headroom(limit))
        .min(RawFd::MAX as u64) as RawFd
}

/// How long a worker in a kernel mode that stopped accepting near its fd
/// limit waits before it looks for room again, when nothing else wakes it.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How often at most a worker in a kernel mode reports its figures.
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// The listening socket of socket activation, if the environment offers
/// one to this very process; set non-blocking (every worker is the same
/// program, so the shared flag suits them all).
fn inherited_listener() -> Result<Option<std::net::TcpListener>, WorkerError> {
    let Some(listener) = crate::activation::take_listener().map_err(WorkerError::Io)? else {
        return Ok(None);
    };
    listener.set_nonblocking(true).map_err(WorkerError::Io)?;
    Ok(Some(listener))
}

fn env_var(var: &'static str) -> Result<String, WorkerError> {
    std::env::var(var).map_err(|_| WorkerError::BadEnvironment {
        var,
        value: std::env::var_os(var)
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

impl WorkerListener {
    /// Takes the channel the primary left in this process's environment.
    /// Sets it close-on-exec again so this worker's own children do not
    /// inherit it. Can succeed once per process.
    ///
    /// # Errors
    /// [`WorkerError::NotAWorker`] when the process was not started as a
    /// worker; the other variants when the environment is inconsistent.
    pub fn from_env() -> Result<WorkerListener, WorkerError> {
        if !is_worker() {
            return Err(WorkerError::NotAWorker);
        }
        let fd_text = env_var(protocol::ENV_FD)?;
        let raw: RawFd =
            fd_text
                .parse()
                .ok()
                .filter(|fd| *fd >= 0)
                .ok_or(WorkerError::BadEnvironment {
                    var: protocol::ENV_FD,
                    value: fd_text.clone(),
                })?;
        let id_text = env_var(protocol::ENV_WORKER_ID)?;
        let id: u64 = id_text.parse().map_err(|_| WorkerError::BadEnvironment {
            var: protocol::ENV_WORKER_ID,
            value: id_text.clone(),
        })?;
        let version = env_var(protocol::ENV_PROTOCOL)?;
        if version != protocol::VERSION.to_string() {
            return Err(WorkerError::Version(version));
        }
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(WorkerError::AlreadyTaken);
        }
        let fd = sys::take_inherited_seqpacket(raw).map_err(WorkerError::Io)?;
        sys::set_cloexec(fd.as_fd(), true).map_err(WorkerError::Io)?;
        let listener = inherited_listener()?;
        Ok(WorkerListener {
            channel: Channel::from_fd(fd),
            id,
            nonblocking: false,
            said_hello: false,
            stopping: false,
            pending: VecDeque::new(),
            messages: VecDeque::new(),
            buf: vec![0; protocol::MAX_MESSAGE].into_boxed_slice(),
            fds: Vec::with_capacity(protocol::MAX_FDS),
            listener,
            accepted: 0,
            reported: 0,
            last_report: Instant::now(),
            finished: 0,
            finished_reported: 0,
            reports_wanted: std::env::var_os(protocol::ENV_REPORT_FINISHED)
                .is_none_or(|v| v != "0"),
            fd_threshold: fd_threshold(sys::fd_limit().unwrap_or(1024)),
            accept_paused: false,
        })
    }

    /// In a kernel mode, whether this worker has stopped accepting because
    /// it is near its fd limit (see [`fd_headroom`]). It accepts again once
    /// fds are free: an event loop that waits on the listener should call
    /// `accept` or `next_event` again within [`ACCEPT_RETRY`] meanwhile,
    /// since no new readiness may come for connections already queued.
    pub fn accept_paused(&self) -> bool {
        self.accept_paused
    }

    /// Whether an fd below the threshold is free again (a paused accept
    /// may resume).
    fn room_again(&mut self) -> bool {
        let free = sys::lowest_free_fd(self.channel.as_fd()).unwrap_or(RawFd::MAX);
        if free < self.fd_threshold {
            self.accept_paused = false;
        }
        !self.accept_paused
    }

    /// Gives connections back to the primary (RETURN), for other workers.
    fn give_back(&self, ids: impl IntoIterator<Item = u64>) -> io::Result<()> {
        let mut enc = Encoder::default();
        self.channel.send(enc.returned(ids).as_bytes(), &[], false)
    }

    /// This worker's id: 1, 2, 3, ... a new one for every worker started
    /// (Node's `worker.id`).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Tells the primary this worker is ready for connections. Called by the
    /// first `accept`, `next_event` or mio registration if not called
    /// before; call it yourself to say ready earlier. Idempotent.
    pub fn ready(&mut self) -> io::Result<()> {
        if !self.said_hello {
            let mut enc = Encoder::default();
            self.channel.send(enc.hello().as_bytes(), &[], false)?;
            self.said_hello = true;
            if self.listener.is_some() {
                // A kernel mode: "I accept on fd 3 myself".
                self.channel
                    .send(enc.stats(self.accepted).as_bytes(), &[], false)?;
                self.reported = self.accepted;
            }
        }
        Ok(())
    }

    /// Chooses whether receiving waits (the default) or returns `WouldBlock`.
    pub fn set_nonblocking(&mut self, nonblocking: bool) {
        self.nonblocking = nonblocking;
    }

    /// Whether the primary has asked this worker to stop.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Asks the primary to replace this worker, for a worker that recycles
    /// itself (a leak it cannot fix, a cache grown too large): the primary
    /// starts this worker's successor at once, without backoff, keeps
    /// giving this one connections until the successor is ready, and then
    /// sends it STOP ([`WorkerListener::is_stopping`], the end of
    /// [`WorkerListener::incoming`]), so capacity never drops. Until STOP,
    /// serve as usual. Asking again changes nothing.
    pub fn recycle(&mut self) -> io::Result<()> {
        let mut enc = Encoder::default();
        self.channel.send(enc.recycle().as_bytes(), &[], false)
    }

    /// Sends an opaque message to the primary's application (Node's
    /// `process.send`). At most [`protocol::MAX_PAYLOAD`] bytes.
    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let msg = protocol::encode_message(false, payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.channel.send(&msg, &[], false)
    }

    /// Tells the primary that one connection this worker took is finished
    /// (closed), so that load-aware scheduling (`--sched least-conn`,
    /// `p2c`) knows how many it is serving. Cheap: it counts, and the
    /// running total goes to the primary in one small DONE message the
    /// next time this listener receives (before it waits) or at
    /// [`WorkerListener::flush_reports`], so a burst of closes costs one
    /// message. For the best placement report before the close: call
    /// `finished` and [`WorkerListener::flush_reports`], then drop the
    /// stream, so a client that reconnects at once finds the primary
    /// knowing this worker is free (the demo worker does this once per
    /// turn of its event loop). Declare it first with
    /// [`WorkerListener::report_finished`];
    /// workers that do not are scheduled by what they have not yet
    /// acknowledged only.
    pub fn finished(&mut self) {
        self.finished += 1;
    }

    /// Declares that this worker calls [`WorkerListener::finished`] for
    /// every connection it takes: sends DONE(0) now, so that load-aware
    /// scheduling counts its acknowledged connections as in flight until
    /// reported finished. Call it once, before the first connection.
    ///
    /// In the kernel balancing modes the primary says it reads no reports
    /// (`DISTRIBUTOR_REPORT_FINISHED=0`): then this and
    /// [`WorkerListener::flush_reports`] send nothing.
    pub fn report_finished(&mut self) -> io::Result<()> {
        if !self.reports_wanted {
            return Ok(());
        }
        let mut enc = Encoder::default();
        self.channel
            .send(enc.done(self.finished).as_bytes(), &[], false)?;
        self.finished_reported = self.finished;
        Ok(())
    }

    /// Sends the DONE total now if it changed, and in a kernel mode the
    /// STATS total if it changed and 100 ms have passed since the last:
    /// for event loops that wait on their own (mio) rather than in
    /// `accept`/`next_event`; call it before waiting, and wait at most
    /// [`WorkerListener::report_timeout`].
    pub fn flush_reports(&mut self) -> io::Result<()> {
        if self.reports_wanted && self.finished != self.finished_reported {
            let mut enc = Encoder::default();
            self.channel
                .send(enc.done(self.finished).as_bytes(), &[], false)?;
            self.finished_reported = self.finished;
        }
        if self.stats_due().is_some_and(|t| t <= Instant::now()) {
            self.report()?;
        }
        Ok(())
    }

    /// In a kernel mode, with accepted connections not reported yet: how
    /// long an event loop that waits on its own may wait before it calls
    /// [`WorkerListener::flush_reports`] (or `accept`/`next_event`), so
    /// that the primary's figures lag at most 100 ms behind. `None` when
    /// there is nothing to report.
    pub fn report_timeout(&self) -> Option<Duration> {
        self.stats_due()
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// When the unreported STATS total is due (100 ms after the last
    /// STATS); `None` when the primary has the current total.
    fn stats_due(&self) -> Option<Instant> {
        (self.listener.is_some() && self.accepted != self.reported)
            .then(|| self.last_report + REPORT_EVERY)
    }

    /// Whether events already received wait to be taken: the next
    /// [`WorkerListener::next_event`] or [`WorkerListener::accept`] returns
    /// one without reading the channel (a CONNECTION carries up to
    /// [`protocol::MAX_FDS`] connections when the primary hands out a
    /// burst). An event loop can use it to report and close the
    /// connections it finished once per burst rather than once each.
    pub fn has_buffered(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A user message that `accept` set aside, oldest first.
    pub fn take_message(&mut self) -> Option<Vec<u8>> {
        self.messages.pop_front()
    }

    /// The next thing the primary sent: a connection, a message or stop.
    ///
    /// # Errors
    /// `WouldBlock` in non-blocking mode when nothing is there;
    /// `UnexpectedEof` once the primary has closed the channel (it is gone:
    /// exit); `InvalidData` for a message that breaks the protocol.
    pub fn next_event(&mut self) -> io::Result<WorkerEvent> {
        self.ready()?;
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            self.fill()?;
        }
    }

    /// Accepts the next connection, like [`std::net::TcpListener::accept`].
    /// User messages that arrive meanwhile are kept for
    /// [`WorkerListener::take_message`].
    ///
    /// # Errors
    /// As [`WorkerListener::next_event`], and `ConnectionAborted` once the
    /// primary has asked this worker to stop ([`WorkerListener::is_stopping`]).
    pub fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            if self.stopping && self.pending.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the primary asked this worker to stop",
                ));
            }
            match self.next_event()? {
                WorkerEvent::Connection(stream, peer) => return Ok((stream, peer)),
                WorkerEvent::Message(m) => self.messages.push_back(m),
                WorkerEvent::Stop => {}
            }
        }
    }

    /// An iterator over connections that ends when the primary asks this
    /// worker to stop, or has gone.
    pub fn incoming(&mut self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// Whether the worker accepts by itself (a kernel balancing mode).
    pub fn accepts_itself(&self) -> bool {
        self.listener.is_some()
    }

    /// In a kernel balancing mode, the inherited listening socket this
    /// listener accepts on (non-blocking), besides its channel
    /// ([`AsFd::as_fd`]); `None` in round-robin mode.
    ///
    /// An event loop that watches the listener through one fd must watch
    /// this one too: `accept` and `next_event` read both. The mio `Source`
    /// implementation registers both; `crate::tokio` (the `tokio` feature)
    /// watches both. Accept through this listener, not on the fd itself,
    /// so the primary's per-worker figures stay right.
    pub fn listener_fd(&self) -> Option<BorrowedFd<'_>> {
        self.listener.as_ref().map(|l| l.as_fd())
    }

    /// Gets at least one pending event: from the channel, or in a kernel
    /// mode from the listener too, waiting for either unless non-blocking.
    fn fill(&mut self) -> io::Result<()> {
        self.flush_reports()?;
        if self.listener.is_none() {
            return self.receive(self.nonblocking);
        }
        loop {
            match self.receive(true) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let may_accept = !self.stopping && (!self.accept_paused || self.room_again());
            let listener = self.listener.as_ref().expect("checked above");
            if may_accept {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        // Served, but the next waits for room (see
                        // `fd_headroom`).
                        self.accept_paused = stream.as_raw_fd() >= self.fd_threshold;
                        self.accepted += 1;
                        self.pending
                            .push_back(WorkerEvent::Connection(stream, peer));
                        if self.last_report.elapsed() >= REPORT_EVERY {
                            self.report()?;
                        }
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue;
                    }
                    // Out of fds: the connection waits in the backlog (for
                    // another worker, or for room here), never an exit.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                        self.accept_paused = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.nonblocking {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // Idle: the count reaches the primary within 100 ms.
            self.flush_reports()?;
            let report = self.report_timeout();
            let listener = self.listener.as_ref().expect("checked above");
            if self.stopping {
                sys::wait_readable(&[self.channel.as_fd()], None)?;
            } else if self.accept_paused {
                let wait = report.map_or(ACCEPT_RETRY, |r| r.min(ACCEPT_RETRY));
                sys::wait_readable(&[self.channel.as_fd()], Some(wait))?;
            } else {
                sys::wait_readable(&[self.channel.as_fd(), listener.as_fd()], report)?;
            }
        }
    }

    /// Sends the running total of connections accepted, if it changed.
    fn report(&mut self) -> io::Result<()> {
        if self.listener.is_some() && self.accepted != self.reported {
            let mut enc = Encoder::default();
            self.channel
                .send(enc.stats(self.accepted).as_bytes(), &[], false)?;
            self.reported = self.accepted;
            self.last_report = Instant::now();
        }
        Ok(())
    }

    /// Receives one datagram and turns it into pending events.
    fn receive(&mut self, dontwait: bool) -> io::Result<()> {
        self.fds.clear();
        let invalid = |e: protocol::DecodeError| io::Error::new(io::ErrorKind::InvalidData, e);
        let len = match self.channel.recv(&mut self.buf, &mut self.fds, dontwait)? {
            Recv::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the primary closed the channel",
                ));
            }
            Recv::Message(len) => len,
            Recv::FdsCut(len) => {
                // No room for their fds: the connections go back, and this
                // worker lives on.
                let entries =
                    protocol::cut_connection(&self.buf[..len], self.fds.len()).map_err(invalid)?;
                let ids: Vec<u64> = entries.map(|(id, _)| id).collect();
                self.fds.clear();
                return self.give_back(ids);
            }
        };
        let msg = ToWorker::decode(&self.buf[..len], self.fds.len()).map_err(invalid)?;
        match msg {
            ToWorker::Connection(entries) => {
                if self
                    .fds
                    .iter()
                    .any(|fd| fd.as_raw_fd() >= self.fd_threshold)
                {
                    // Near the fd limit: not taken (see `fd_headroom`).
                    self.fds.clear();
                    return self.give_back(entries.map(|(id, _)| id));
                }
                let mut enc = Encoder::default();
                enc.ack(entries.clone().map(|(id, _)| id));
                self.channel.send(enc.as_bytes(), &[], false)?;
                for ((_, peer), fd) in entries.zip(self.fds.drain(..)) {
                    self.pending
                        .push_back(WorkerEvent::Connection(TcpStream::from(fd), peer));
                }
            }
            ToWorker::Stop => {
                self.stopping = true;
                self.report()?;
                self.pending.push_back(WorkerEvent::Stop);
            }
            ToWorker::Message(m) => self.pending.push_back(WorkerEvent::Message(m.to_vec())),
            ToWorker::Ping(n) => {
                self.report()?;
                let mut enc = Encoder::default();
                self.channel.send(enc.pong(n).as_bytes(), &[], false)?;
            }
            ToWorker::Unknown(_) => {}
        }
        Ok(())
    }
}

/// Requests in flight on a worker's threads, counted, so that a worker
/// told to stop can wait for them before it exits: [`WorkerListener::incoming`]
/// ends at STOP, but the connections it handed out may still be serving.
///
/// ```no_run
/// use std::io::Write;
/// use std::time::Duration;
/// use distributor::{Drain, WorkerListener};
///
/// let mut listener = WorkerListener::from_env()?;
/// let drain = Drain::new();
/// for conn in listener.incoming() {
///     let (mut stream, _peer) = conn?;
///     let in_flight = drain.track();
///     std::thread::spawn(move || {
///         let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n");
///         drop(in_flight);
///     });
/// }
/// // Stopped: finish what is in flight (bounded), then exit 0.
/// drain.wait(Duration::from_secs(10));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Drain(std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>);

/// One thing in flight for a [`Drain`], until dropped.
#[derive(Debug)]
pub struct InFlight(Drain);

impl Drain {
    /// Nothing in flight yet.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Counts one more in flight, until the returned guard is dropped.
    pub fn track(&self) -> InFlight {
        *self.lock() += 1;
        InFlight(self.clone())
    }

    /// How many are in flight now.
    pub fn in_flight(&self) -> usize {
        *self.lock()
    }

    /// Waits until none is in flight, at most `timeout`; returns whether
    /// none is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .0
            .1
            .wait_timeout_while(guard, timeout, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.0
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
        self.0.0.1.notify_all();
    }
}

/// Connections until stop; see [`WorkerListener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a mut WorkerListener,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<(TcpStream, SocketAddr)>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.listener.accept() {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof
                ) =>
            {
                None
            }
            other => Some(other),
        }
    }
}

impl AsFd for WorkerListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }
}

impl AsRawFd for WorkerListener {
    fn as_raw_fd(&self) -> RawFd {
        self.channel.as_fd().as_raw_fd()
    }
}

/// Registers the channel for readable events; says ready if not done yet.
/// Call `accept` or `next_event` until `WouldBlock` on each event.
impl mio::event::Source for WorkerListener {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        self.ready()?;
        if let Some(l) = &self.listener {
            mio::unix::SourceFd(&l.as_raw_fd()).register(registry, token, interests)?;
        }
        mio::unix::SourceFd(&self.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        if let Some(l) = &self.listener {
            mio::unix::SourceFd(&l.as_raw_fd()).reregister(registry, token, interests)?;
        }
        mio::unix::SourceFd(&self.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        if let Some(l) = &self.listener {
            mio::unix::SourceFd(&l.as_raw_fd()).deregister(registry)?;
        }
        mio::unix::SourceFd(&self.as_raw_fd()).deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::Drain;
    use std::time::{Duration, Instant};

    /// `wait` returns false while something is in flight (after the
    /// timeout, not before), and true as soon as the last guard, dropped on
    /// another thread, is gone.
    #[test]
    fn drain_waits_for_what_is_in_flight() {
        let drain = Drain::new();
        assert!(drain.wait(Duration::ZERO));
        let (a, b) = (drain.track(), drain.track());
        assert_eq!(drain.in_flight(), 2);
        let t = Instant::now();
        assert!(!drain.wait(Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
        drop(a);
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(b);
        });
        assert!(drain.wait(Duration::from_secs(30)));
        assert_eq!(drain.in_flight(), 0);
        late.join().unwrap();
    }
}
