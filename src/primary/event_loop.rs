//! The primary's one event loop: acceptor, dispatcher, ledger, supervisor
//! and control, on one thread, never blocking and never spinning.
//!
//! - **Acceptor.** The listener is registered edge-triggered; on an event
//!   the loop accepts until `WouldBlock`, but only while some worker can
//!   take a connection. Otherwise it leaves connections in the kernel's
//!   backlog (and notes that it did) and resumes when a worker has room.
//!   Accept errors such as `EMFILE` pause accepting for a short timer.
//! - **Dispatcher.** Round-robin over the slots, skipping workers that are
//!   not ready, stopping, at their unacknowledged limit, or whose channel
//!   buffer is full. A connection no worker can take now is held in
//!   `pending` (at most a few, since accepting stops first).
//! - **Ledger.** The primary keeps its copy of every connection until the
//!   worker acknowledges it; when a worker's channel closes, its
//!   unacknowledged connections return to `pending` and go to another
//!   worker.
//! - **Supervisor.** SIGCHLD arrives through signal-hook's self-pipe; the
//!   loop then reaps each worker with `waitpid(pid, WNOHANG)` (never
//!   `waitpid(-1)`, which would steal an embedding program's children) and
//!   restarts the slot with backoff.
//! - **Timers** (restart, hello warning, SIGTERM, SIGKILL, accept retry)
//!   are deadlines; the poll timeout is the nearest one.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use super::backoff::Backoff;
use super::process::{Conn, WorkerCommand, WorkerProc, describe_exit};
use super::{Control, Event, Handle};
use crate::channel::Recv;
use crate::protocol::{self, Encoder, ToPrimary};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const FIRST_SLOT: usize = 3;

/// How long accepting pauses after an error such as `EMFILE`.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

pub(crate) struct Settings {
    pub workers: usize,
    pub command: WorkerCommand,
    pub shutdown_timeout: Duration,
    pub hello_timeout: Duration,
    pub max_unacked: usize,
    pub backoff: Backoff,
    pub handle_signals: bool,
}

/// A place for one worker: the worker running there, or when the next one
/// starts.
#[derive(Debug, Default)]
struct Slot {
    worker: Option<WorkerProc>,
    restart_at: Option<Instant>,
    quick_exits: u32,
}

pub(crate) struct EventLoop {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Signals,
    waker: Arc<Waker>,
    control_tx: Sender<Control>,
    control_rx: Receiver<Control>,
    events_tx: Option<Sender<Event>>,
    events_dropped: u64,
    settings: Settings,
    slots: Vec<Slot>,
    next_worker_id: u64,
    next_conn_id: u64,
    /// Round-robin position: the slot to try first.
    cursor: usize,
    /// Connections accepted that no worker holds.
    pending: VecDeque<Conn>,
    /// Connections may wait in the backlog that the loop chose not to accept.
    backlog_waiting: bool,
    accept_retry_at: Option<Instant>,
    shutdown_at: Option<Instant>,
    ready_count: usize,
    buf: Box<[u8]>,
    fds: Vec<OwnedFd>,
    enc: Encoder,
}

impl EventLoop {
    pub(crate) fn new(listener: TcpListener, settings: Settings) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let local_addr = listener.local_addr()?;
        poll.registry().register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut wanted = vec![SIGCHLD];
        if settings.handle_signals {
            wanted.extend([SIGTERM, SIGINT]);
        }
        let mut signals = Signals::new(&wanted)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let slots = (0..settings.workers).map(|_| Slot::default()).collect();
        Ok(EventLoop {
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            waker,
            control_tx,
            control_rx,
            events_tx: None,
            events_dropped: 0,
            settings,
            slots,
            next_worker_id: 1,
            next_conn_id: 1,
            cursor: 0,
            pending: VecDeque::new(),
            backlog_waiting: false,
            accept_retry_at: None,
            shutdown_at: None,
            ready_count: 0,
            buf: vec![0; protocol::MAX_MESSAGE].into_boxed_slice(),
            fds: Vec::with_capacity(protocol::MAX_FDS),
            enc: Encoder::default(),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) fn handle(&self) -> Handle {
        Handle {
            tx: self.control_tx.clone(),
            waker: Arc::clone(&self.waker),
        }
    }

    pub(crate) fn events(&mut self) -> Receiver<Event> {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        self.events_tx = Some(tx);
        rx
    }

    pub(crate) fn run(mut self) -> io::Result<()> {
        info!("listening on {}", self.local_addr);
        info!(
            "starting {} workers: {}",
            self.settings.workers,
            self.settings.command.program().to_string_lossy()
        );
        let now = Instant::now();
        for i in 0..self.slots.len() {
            // A command that cannot start at all is an error of the
            // primary's start, not a restart loop.
            let worker = self.start_worker(i, now)?;
            self.slots[i].worker = Some(worker);
        }
        let mut events = Events::with_capacity(256);
        loop {
            if self.shutdown_at.is_some() && self.slots.iter().all(|s| s.worker.is_none()) {
                break;
            }
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.backlog_waiting = true,
                    WAKER => self.on_control(),
                    SIGNALS => self.on_signals(),
                    Token(t) => {
                        let i = t - FIRST_SLOT;
                        if event.is_writable() {
                            if let Some(w) = self.slots.get_mut(i).and_then(|s| s.worker.as_mut()) {
                                w.channel_full = false;
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_channel(i);
                        }
                    }
                }
            }
            self.on_timers(Instant::now());
            self.pump();
        }
        if !self.pending.is_empty() {
            warn!(
                "closing {} accepted connections that no worker could take before shutdown",
                self.pending.len()
            );
        }
        if self.events_dropped > 0 {
            warn!(
                "{} events were dropped: the event receiver fell behind",
                self.events_dropped
            );
        }
        info!("shutdown complete");
        Ok(())
    }

    /// Spawns a worker for slot `i` and registers its channel.
    fn start_worker(&mut self, i: usize, now: Instant) -> io::Result<WorkerProc> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let mut w = WorkerProc::spawn(&self.settings.command, id, now)?;
        let channel = w.channel.as_ref().expect("a new worker has a channel");
        self.poll.registry().register(
            &mut SourceFd(&channel.as_fd().as_raw_fd()),
            Token(FIRST_SLOT + i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        w.hello_warn_at = Some(now + self.settings.hello_timeout);
        info!(
            worker = id,
            pid = w.pid,
            "worker {id} started (pid {})",
            w.pid
        );
        self.emit(Event::WorkerStarted { id, pid: w.pid });
        Ok(w)
    }

    /// Starts slot `i` again after a backoff, or schedules another try.
    fn restart_slot(&mut self, i: usize, now: Instant) {
        self.slots[i].restart_at = None;
        match self.start_worker(i, now) {
            Ok(w) => self.slots[i].worker = Some(w),
            Err(e) => {
                error!("cannot start a worker: {e}");
                self.schedule_restart(i, Duration::ZERO, now);
            }
        }
    }

    fn schedule_restart(&mut self, i: usize, uptime: Duration, now: Instant) {
        let slot = &mut self.slots[i];
        let (delay, quick) = self.settings.backoff.next(uptime, slot.quick_exits);
        slot.quick_exits = quick;
        if quick >= 3 {
            warn!(
                "worker slot {} is crash-looping: {quick} exits in a row within {:?} of starting; next start in {delay:.1?} (backoff caps at {:?})",
                i + 1,
                self.settings.backoff.reset_after,
                self.settings.backoff.max
            );
        } else if !delay.is_zero() {
            info!("restarting worker slot {} in {delay:.1?}", i + 1);
        }
        if delay.is_zero() {
            self.restart_slot(i, now);
        } else {
            self.slots[i].restart_at = Some(now + delay);
        }
    }

    fn emit(&mut self, event: Event) {
        if let Some(tx) = &self.events_tx {
            match tx.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.events_dropped += 1,
                Err(TrySendError::Disconnected(_)) => self.events_tx = None,
            }
        }
    }

    /// Hands held connections to workers, then accepts while workers have room.
    fn pump(&mut self) {
        while let Some(conn) = self.pending.pop_front() {
            if let Err(conn) = self.dispatch(conn) {
                self.pending.push_front(conn);
                return;
            }
        }
        if self.backlog_waiting && self.accept_retry_at.is_none() && self.shutdown_at.is_none() {
            self.accept_loop();
        }
    }

    fn accept_loop(&mut self) {
        while self.pick().is_some() {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match socket2::SockRef::from(listener).accept() {
                Ok((socket, addr)) => {
                    let peer = addr
                        .as_socket()
                        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
                    let conn = Conn {
                        id: self.next_conn_id,
                        fd: OwnedFd::from(socket),
                        peer,
                    };
                    self.next_conn_id += 1;
                    if let Err(conn) = self.dispatch(conn) {
                        self.pending.push_back(conn);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.backlog_waiting = false;
                    return;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => {
                        debug!("accept: {e}")
                    }
                    _ => {
                        warn!("accept failed: {e}; pausing accepts for {ACCEPT_RETRY:?}");
                        self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                        return;
                    }
                },
            }
        }
    }

    /// The slot that round-robin would give the next connection to.
    fn pick(&self) -> Option<usize> {
        let n = self.slots.len();
        (0..n).map(|step| (self.cursor + step) % n).find(|&i| {
            self.slots[i]
                .worker
                .as_ref()
                .is_some_and(|w| w.can_take(self.settings.max_unacked))
        })
    }

    /// Sends `conn` to the next worker that takes it; gives it back if none can.
    fn dispatch(&mut self, conn: Conn) -> Result<(), Conn> {
        while let Some(i) = self.pick() {
            self.enc.connection().entry(conn.id, conn.peer);
            let w = self.slots[i]
                .worker
                .as_mut()
                .expect("picked slots hold a worker");
            let channel = w.channel.as_ref().expect("picked workers have a channel");
            match channel.send(self.enc.as_bytes(), &[conn.fd.as_fd()], true) {
                Ok(()) => {
                    w.unacked.insert(conn.id, conn);
                    self.cursor = (i + 1) % self.slots.len();
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.channel_full = true,
                Err(e) => {
                    warn!(worker = w.id, "cannot send to worker {}: {e}", w.id);
                    self.disconnect(i);
                }
            }
        }
        Err(conn)
    }

    /// Closes slot `i`'s channel: its unacknowledged connections go back to
    /// `pending`; the worker, unless already stopping, is stopped.
    fn disconnect(&mut self, i: usize) {
        let Some(w) = self.slots[i].worker.as_mut() else {
            return;
        };
        if let Some(channel) = w.channel.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&channel.as_fd().as_raw_fd()));
        }
        if !w.unacked.is_empty() {
            info!(
                worker = w.id,
                "handing {} unacknowledged connections of worker {} to other workers",
                w.unacked.len(),
                w.id
            );
            let mut held: Vec<Conn> = w.unacked.drain().map(|(_, c)| c).collect();
            held.sort_unstable_by_key(|c| c.id);
            self.pending.extend(held);
        }
        if w.ready {
            w.ready = false;
            self.ready_count -= 1;
        }
        if !w.stopping {
            w.stopping = true;
            w.signal(Signal::SIGTERM);
            w.kill_at = Some(Instant::now() + self.settings.shutdown_timeout);
        }
    }

    /// Reads every message waiting on slot `i`'s channel.
    fn read_channel(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Some(w) = self.slots.get_mut(i).and_then(|s| s.worker.as_mut()) {
            let Some(channel) = w.channel.as_ref() else {
                break;
            };
            self.fds.clear();
            let problem = match channel.recv(&mut buf, &mut self.fds, true) {
                Ok(Recv::Message(len)) => match ToPrimary::decode(&buf[..len], self.fds.len()) {
                    Ok(msg) => self.on_message(i, msg),
                    Err(e) => Some(e.to_string()),
                },
                Ok(Recv::Closed) => {
                    if !w.stopping {
                        warn!(
                            worker = w.id,
                            "worker {} (pid {}) closed its channel", w.id, w.pid
                        );
                    }
                    self.disconnect(i);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => Some(e.to_string()),
            };
            if let Some(problem) = problem {
                let w = self.slots[i].worker.as_ref().expect("still there");
                error!(
                    worker = w.id,
                    "worker {} (pid {}) broke the protocol ({problem}); stopping it", w.id, w.pid
                );
                self.disconnect(i);
                break;
            }
        }
        self.fds.clear();
        self.buf = buf;
    }

    /// Acts on one well-formed message; returns a protocol problem, if any.
    fn on_message(&mut self, i: usize, msg: ToPrimary<'_>) -> Option<String> {
        let total = self.settings.workers;
        let w = self.slots[i].worker.as_mut().expect("reading a live slot");
        match msg {
            ToPrimary::Hello { version } if version != protocol::VERSION => Some(format!(
                "it speaks protocol version {version}, this primary speaks {}",
                protocol::VERSION
            )),
            ToPrimary::Hello { .. } if w.ready || w.stopping => None,
            ToPrimary::Hello { .. } => {
                w.ready = true;
                w.hello_warn_at = None;
                self.ready_count += 1;
                let (id, pid) = (w.id, w.pid);
                info!(
                    worker = id,
                    pid, "worker {id} (pid {pid}) ready, {}/{total} ready", self.ready_count
                );
                self.backlog_waiting = true;
                self.emit(Event::WorkerReady { id, pid });
                None
            }
            ToPrimary::Ack(ids) => {
                for id in ids {
                    if w.unacked.remove(&id).is_none() {
                        return Some(format!(
                            "acknowledged connection {id}, which it does not hold"
                        ));
                    }
                    w.taken += 1;
                }
                self.backlog_waiting = true;
                None
            }
            ToPrimary::Message(data) => {
                let event = Event::Message {
                    id: w.id,
                    data: data.to_vec(),
                };
                self.emit(event);
                None
            }
        }
    }

    fn on_signals(&mut self) {
        let signals: Vec<i32> = self.signals.pending().collect();
        for sig in signals {
            match sig {
                SIGCHLD => self.reap(),
                SIGTERM | SIGINT => {
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    info!("{name} received");
                    self.begin_shutdown();
                }
                _ => {}
            }
        }
    }

    fn on_control(&mut self) {
        while let Ok(c) = self.control_rx.try_recv() {
            match c {
                Control::Shutdown => self.begin_shutdown(),
                Control::Send { id, data } => self.send_user_message(id, &data),
            }
        }
    }

    fn send_user_message(&mut self, target: Option<u64>, data: &[u8]) {
        let Ok(msg) = protocol::encode_message(true, data) else {
            return;
        };
        for w in self.slots.iter_mut().filter_map(|s| s.worker.as_mut()) {
            let wanted = match target {
                Some(id) => w.id == id,
                None => w.ready,
            };
            let Some(channel) = w.channel.as_ref().filter(|_| wanted) else {
                continue;
            };
            if let Err(e) = channel.send(&msg, &[], true) {
                warn!(worker = w.id, "message to worker {} dropped: {e}", w.id);
            }
        }
    }

    /// Reaps every worker that has exited, and replaces it unless shutting down.
    fn reap(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Some(w) = self.slots[i].worker.as_mut() else {
                continue;
            };
            let status = match w.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    warn!(worker = w.id, "waitpid on worker {}: {e}", w.id);
                    continue;
                }
            };
            let expected = w.stopping;
            w.stopping = true;
            self.disconnect(i);
            let w = self.slots[i].worker.take().expect("just reaped");
            let uptime = now.saturating_duration_since(w.started);
            let how = describe_exit(&status);
            if expected {
                info!(
                    worker = w.id,
                    pid = w.pid,
                    "worker {} (pid {}) exited with {how} after {uptime:.1?}, having taken {} connections",
                    w.id,
                    w.pid,
                    w.taken
                );
            } else {
                warn!(
                    worker = w.id,
                    pid = w.pid,
                    "worker {} (pid {}) exited with {how} after {uptime:.1?}, having taken {} connections",
                    w.id,
                    w.pid,
                    w.taken
                );
            }
            self.emit(Event::WorkerExited {
                id: w.id,
                pid: w.pid,
                status,
            });
            if self.shutdown_at.is_none() {
                self.schedule_restart(i, uptime, now);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        let now = Instant::now();
        if self.shutdown_at.is_some() {
            warn!("second stop request: killing the workers now");
            for w in self.slots.iter_mut().filter_map(|s| s.worker.as_mut()) {
                w.signal(Signal::SIGKILL);
            }
            return;
        }
        let timeout = self.settings.shutdown_timeout;
        let alive = self.slots.iter().filter(|s| s.worker.is_some()).count();
        info!("shutting down: stopping {alive} workers (timeout {timeout:?})");
        if let Some(listener) = self.listener.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&listener.as_raw_fd()));
        }
        // Connections already accepted go to workers before they are asked
        // to stop; the backlog is refused with the listener's close.
        self.pump();
        self.shutdown_at = Some(now + timeout);
        for slot in &mut self.slots {
            slot.restart_at = None;
            let Some(w) = slot.worker.as_mut() else {
                continue;
            };
            let asked = w.ready
                && w.channel
                    .as_ref()
                    .is_some_and(|c| c.send(self.enc.stop().as_bytes(), &[], true).is_ok());
            if !asked {
                w.signal(Signal::SIGTERM);
            }
            w.stopping = true;
            w.hello_warn_at = None;
            w.term_at = asked.then(|| now + timeout / 2);
            w.kill_at = Some(now + timeout);
        }
    }

    fn on_timers(&mut self, now: Instant) {
        if self.accept_retry_at.is_some_and(|t| t <= now) {
            self.accept_retry_at = None;
            self.backlog_waiting = true;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].restart_at.is_some_and(|t| t <= now) {
                self.restart_slot(i, now);
            }
            let Some(w) = self.slots[i].worker.as_mut() else {
                continue;
            };
            if w.hello_warn_at.is_some_and(|t| t <= now) {
                w.hello_warn_at = None;
                warn!(
                    worker = w.id,
                    "worker {} (pid {}) has not said hello: does it speak the distributor protocol? see docs/PROTOCOL.md",
                    w.id,
                    w.pid
                );
            }
            if w.term_at.is_some_and(|t| t <= now) {
                w.term_at = None;
                info!(
                    worker = w.id,
                    "worker {} (pid {}) is still running: SIGTERM", w.id, w.pid
                );
                w.signal(Signal::SIGTERM);
            }
            if w.kill_at.is_some_and(|t| t <= now) {
                w.kill_at = None;
                warn!(
                    worker = w.id,
                    "worker {} (pid {}) did not stop in time: SIGKILL", w.id, w.pid
                );
                w.signal(Signal::SIGKILL);
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let workers = self.slots.iter().flat_map(|s| {
            let w = s.worker.as_ref();
            [
                s.restart_at,
                w.and_then(|w| w.hello_warn_at),
                w.and_then(|w| w.term_at),
                w.and_then(|w| w.kill_at),
            ]
        });
        workers.chain([self.accept_retry_at]).flatten().min()
    }
}
