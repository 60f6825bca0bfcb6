//! The primary's one event loop: acceptor, dispatcher, ledger and control,
//! on one thread, never blocking and never spinning. The supervisor (worker
//! lifecycle, timers) is in `supervisor.rs`, as more methods of the same
//! [`EventLoop`].
//!
//! - **Acceptor.** The listener is registered edge-triggered; on an event
//!   the loop accepts until `WouldBlock`, but only while some worker can
//!   take a connection. Otherwise it leaves connections in the kernel's
//!   backlog (and notes that it did) and resumes when a worker has room.
//!   Accept errors such as `EMFILE` pause accepting until an fd is freed
//!   (an acknowledgement closes the primary's copy) or a short timer fires.
//! - **Dispatcher.** Round-robin over the workers, skipping those that are
//!   not ready, stopping, at their unacknowledged limit, or whose channel
//!   buffer is full. A connection no worker can take now is held in
//!   `pending` (at most a few: accepting stops first).
//! - **Ledger.** The primary keeps its copy of every connection until the
//!   worker acknowledges it; when a worker's channel closes (it died, broke
//!   the protocol, or hung), its unacknowledged connections return to
//!   `pending` and go to another worker. A connection is acknowledged by
//!   one worker only, so none is served twice.
//! - **Fairness between workers.** At most [`MAX_READS_PER_WAKE`] messages
//!   are read from one channel per turn; a chatty worker is read again on
//!   the next turn, after the others.

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
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use super::backoff::Backoff;
use super::metrics::{self, MetricsServer};
use super::process::{Conn, Role, WorkerCommand, WorkerProc};
use super::stats::{SlotStats, WorkerState};
use super::{Control, Event, Handle, Sched, Stats, WorkerStats};
use crate::channel::Recv;
use crate::protocol::{self, Encoder, ToPrimary};

// Tokens: the listener, the waker and signals first, then one per worker
// process alive (`FIRST_WORKER + index`, indexes reused), then, far above
// any number of processes, the metrics endpoint's (`metrics::FIRST_TOKEN`
// and up, see `metrics::owns`).
const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
/// The workers' notify socket: far from the worker and metrics tokens.
const NOTIFY: Token = Token(usize::MAX - 1);
pub(super) const FIRST_WORKER: usize = 3;

/// How long accepting pauses after an error such as `EMFILE`, unless an fd
/// is freed sooner.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often at most an accept error is logged as a warning.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// The most messages read from one channel before the others get a turn.
pub(super) const MAX_READS_PER_WAKE: usize = 64;

pub(crate) struct Settings {
    pub workers: usize,
    pub command: WorkerCommand,
    pub shutdown_timeout: Duration,
    pub hello_timeout: Duration,
    pub worker_timeout: Option<Duration>,
    pub max_unacked: usize,
    pub backoff: Backoff,
    pub handle_signals: bool,
    pub sched: Sched,
    pub backlog: i32,
    pub prefix_output: bool,
    pub ready: super::Ready,
}

/// A place for one worker. Slots give restarts their backoff and rolling
/// reloads their order; a slot is inactive after a scale-down.
#[derive(Debug, Default)]
pub(super) struct Slot {
    pub active: bool,
    /// Index in `workers` of the slot's current worker.
    pub current: Option<usize>,
    pub restart_at: Option<Instant>,
    pub quick_exits: u32,
    /// Replacements after an unexpected exit or cut-off (for the stats).
    pub restarts: u64,
}

/// A rolling reload in progress: the slots still to replace, and the new
/// worker being waited for.
#[derive(Debug, Default)]
pub(super) struct Reload {
    pub queue: VecDeque<usize>,
    pub candidate: Option<usize>,
    pub retry_at: Option<Instant>,
}

pub(crate) struct EventLoop {
    pub(super) poll: Poll,
    /// The bound listener: accepted from in rr, inherited by every worker
    /// in shared, slot 1's socket in reuseport.
    pub(super) listener: Option<TcpListener>,
    /// Reuseport: the socket of each slot after the first.
    pub(super) slot_listeners: Vec<Option<TcpListener>>,
    /// Connections taken by workers that have exited.
    pub(super) exited_connections: u64,
    /// The metrics endpoint, if asked for.
    pub(super) metrics: Option<MetricsServer>,
    local_addr: SocketAddr,
    started: Instant,
    signals: Signals,
    waker: Arc<Waker>,
    control_tx: Sender<Control>,
    control_rx: Receiver<Control>,
    events_tx: Option<Sender<Event>>,
    events_dropped: u64,
    pub(super) settings: Settings,
    pub(super) slots: Vec<Slot>,
    /// Every worker process alive, by index; the index is its token.
    pub(super) workers: Vec<Option<WorkerProc>>,
    pub(super) free: Vec<usize>,
    pub(super) next_worker_id: u64,
    next_conn_id: u64,
    pub(super) next_ping: u64,
    /// Round-robin position: the worker index to try first.
    cursor: usize,
    /// Connections accepted that no worker holds.
    pending: VecDeque<Conn>,
    /// Connections may wait in the backlog that the loop chose not to accept.
    pub(super) backlog_waiting: bool,
    /// Accepting paused after an accept error, until then.
    pub(super) accept_paused_until: Option<Instant>,
    /// When an accept error was last logged as a warning.
    accept_warned_at: Option<Instant>,
    pub(super) reload: Reload,
    pub(super) shutdown_at: Option<Instant>,
    /// The time after the last poll; timers and liveness use it.
    pub(super) now: Instant,
    /// Channels with more to read than one turn allows.
    readable_again: Vec<usize>,
    buf: Box<[u8]>,
    fds: Vec<OwnedFd>,
    pub(super) enc: Encoder,
    /// The workers' `NOTIFY_SOCKET`.
    pub(super) notify: super::notify::NotifySocket,
    /// `READY=1` was sent to the primary's own service manager.
    pub(super) told_systemd_ready: bool,
    /// Relays worker output with a prefix, unless output passes through.
    pub(super) output: Option<super::output::Relay>,
}

impl EventLoop {
    pub(crate) fn new(
        listener: TcpListener,
        mut metrics: Option<MetricsServer>,
        settings: Settings,
    ) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        if let Some(m) = metrics.as_mut() {
            m.register(poll.registry())?;
        }
        let local_addr = listener.local_addr()?;
        if settings.sched == Sched::RoundRobin {
            poll.registry().register(
                &mut SourceFd(&listener.as_raw_fd()),
                LISTENER,
                Interest::READABLE,
            )?;
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut wanted = vec![SIGCHLD];
        if settings.handle_signals {
            wanted.extend([SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU]);
        }
        let mut signals = Signals::new(&wanted)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let settings_prefix = settings.prefix_output;
        let notify = super::notify::NotifySocket::bind()?;
        poll.registry()
            .register(&mut SourceFd(&notify.raw_fd()), NOTIFY, Interest::READABLE)?;
        Ok(EventLoop {
            poll,
            listener: Some(listener),
            slot_listeners: Vec::new(),
            exited_connections: 0,
            metrics,
            local_addr,
            started: Instant::now(),
            signals,
            waker,
            control_tx,
            control_rx,
            events_tx: None,
            events_dropped: 0,
            settings,
            slots: Vec::new(),
            workers: Vec::new(),
            free: Vec::new(),
            next_worker_id: 1,
            next_conn_id: 1,
            next_ping: 1,
            cursor: 0,
            pending: VecDeque::new(),
            backlog_waiting: false,
            accept_paused_until: None,
            accept_warned_at: None,
            reload: Reload::default(),
            shutdown_at: None,
            now: Instant::now(),
            readable_again: Vec::new(),
            buf: vec![0; protocol::MAX_MESSAGE].into_boxed_slice(),
            fds: Vec::with_capacity(protocol::MAX_FDS),
            enc: Encoder::default(),
            notify,
            told_systemd_ready: false,
            output: if settings_prefix {
                Some(super::output::Relay::start()?)
            } else {
                None
            },
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
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
        info!(
            "listening on {} ({})",
            self.local_addr,
            match self.settings.sched {
                Sched::RoundRobin => "rr: the primary accepts and hands connections round-robin",
                Sched::Shared => "shared: every worker accepts on this socket",
                Sched::ReusePort => "reuseport: one SO_REUSEPORT socket per worker",
            }
        );
        if let Some(addr) = self.metrics_addr() {
            info!("metrics on {addr} (GET /metrics, GET /healthz)");
        }
        info!(
            "starting {} workers: {}",
            self.settings.workers,
            self.settings.command.program().to_string_lossy()
        );
        for s in 0..self.settings.workers {
            self.slots.push(Slot {
                active: true,
                ..Slot::default()
            });
            // A command that cannot start at all is an error of the
            // primary's start, not a restart loop.
            self.start_worker(s, Role::Current)?;
        }
        let mut events = Events::with_capacity(256);
        loop {
            if self.shutdown_at.is_some() && self.workers.iter().all(Option::is_none) {
                break;
            }
            let timeout = if self.readable_again.is_empty() {
                self.next_deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.backlog_waiting = true,
                    WAKER => self.on_control(),
                    SIGNALS => self.on_signals(),
                    NOTIFY => self.read_notices(),
                    t if metrics::owns(t) => self.on_metrics(event),
                    Token(t) => {
                        let i = t - FIRST_WORKER;
                        if event.is_writable() {
                            if let Some(w) = self.worker_mut(i) {
                                w.channel_full = false;
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_channel(i);
                        }
                    }
                }
            }
            for i in std::mem::take(&mut self.readable_again) {
                self.read_channel(i);
            }
            self.on_timers();
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

    /// Reads every notification waiting on the workers' notify socket.
    fn read_notices(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let (pid, text) = match self.notify.recv(&mut buf) {
                Ok(Some((pid, text))) => (pid, text.to_string()),
                Ok(None) => return,
                Err(e) => {
                    debug!("notify socket: {e}");
                    return;
                }
            };
            for notice in crate::activation::parse(&text) {
                self.on_notice(pid, notice);
            }
        }
    }

    pub(super) fn worker_mut(&mut self, i: usize) -> Option<&mut WorkerProc> {
        self.workers.get_mut(i).and_then(Option::as_mut)
    }

    pub(super) fn emit(&mut self, event: Event) {
        if let Some(tx) = &self.events_tx {
            match tx.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.events_dropped += 1,
                Err(TrySendError::Disconnected(_)) => self.events_tx = None,
            }
        }
    }

    /// Hands held connections to workers, then accepts while workers have room.
    pub(super) fn pump(&mut self) {
        while let Some(conn) = self.pending.pop_front() {
            if let Err(conn) = self.dispatch(conn) {
                self.pending.push_front(conn);
                return;
            }
        }
        if self.backlog_waiting
            && self.accept_paused_until.is_none()
            && self.settings.sched == Sched::RoundRobin
        {
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
                        sent: self.now,
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
                        // Said once per episode, not on every retry.
                        let now = self.now;
                        if self
                            .accept_warned_at
                            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_WARN_EVERY)
                        {
                            warn!(
                                "accept failed: {e}; pausing accepts until an fd is freed or {ACCEPT_RETRY:?} pass"
                            );
                            self.accept_warned_at = Some(now);
                        } else {
                            debug!("accept failed again: {e}");
                        }
                        self.accept_paused_until = Some(now + ACCEPT_RETRY);
                        return;
                    }
                },
            }
        }
    }

    /// The worker that round-robin would give the next connection to.
    fn pick(&self) -> Option<usize> {
        super::policy::round_robin(self.cursor, self.workers.len(), |i| {
            self.workers[i]
                .as_ref()
                .is_some_and(|w| w.can_take(self.settings.max_unacked))
        })
    }

    /// Sends `conn` to the next worker that takes it; gives it back if none can.
    fn dispatch(&mut self, mut conn: Conn) -> Result<(), Conn> {
        conn.sent = self.now;
        while let Some(i) = self.pick() {
            self.enc.connection().entry(conn.id, conn.peer);
            let w = self.workers[i].as_mut().expect("picked workers exist");
            let channel = w.channel.as_ref().expect("picked workers have a channel");
            match channel.send(self.enc.as_bytes(), &[conn.fd.as_fd()], true) {
                Ok(()) => {
                    w.unacked.insert(conn.id, conn);
                    self.cursor = (i + 1) % self.workers.len();
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.channel_full = true,
                Err(e) => {
                    warn!(worker = w.id, "cannot send to worker {}: {e}", w.id);
                    self.cut_off(i);
                }
            }
        }
        Err(conn)
    }

    /// Closes worker `i`'s channel: its unacknowledged connections go back
    /// to `pending`; the worker, unless already stopping, gets SIGTERM and,
    /// after `grace`, SIGKILL.
    pub(super) fn disconnect(&mut self, i: usize, grace: Duration) {
        let now = self.now;
        let Some(w) = self.workers.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        if let Some(channel) = w.channel.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&channel.as_fd().as_raw_fd()));
        }
        w.ready = false;
        w.ping_at = None;
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
        if !w.stopping {
            w.stopping = true;
            w.signal(Signal::SIGTERM);
            w.kill_at = Some(now + grace);
        }
    }

    /// Reads the messages waiting on worker `i`'s channel, up to a turn's worth.
    /// Returns true when it stopped at the turn's limit: more may wait.
    pub(super) fn read_channel(&mut self, i: usize) -> bool {
        let mut buf = std::mem::take(&mut self.buf);
        for _ in 0..MAX_READS_PER_WAKE {
            let Some(w) = self.workers.get_mut(i).and_then(Option::as_mut) else {
                break;
            };
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
                    self.cut_off(i);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.fds.clear();
                    self.buf = buf;
                    return false;
                }
                Err(e) => Some(e.to_string()),
            };
            if let Some(problem) = problem {
                let w = self.workers[i].as_ref().expect("still there");
                error!(
                    worker = w.id,
                    "worker {} (pid {}) broke the protocol ({problem}); stopping it", w.id, w.pid
                );
                self.cut_off(i);
                break;
            }
        }
        let more = self.worker_mut(i).is_some_and(|w| w.channel.is_some());
        if more {
            self.readable_again.push(i);
        }
        self.fds.clear();
        self.buf = buf;
        more
    }

    /// Acts on one well-formed message; returns a protocol problem, if any.
    fn on_message(&mut self, i: usize, msg: ToPrimary<'_>) -> Option<String> {
        let now = self.now;
        let w = self.workers[i].as_mut().expect("reading a live worker");
        w.last_seen = now;
        match msg {
            ToPrimary::Hello { version } if version != protocol::VERSION => Some(format!(
                "it speaks protocol version {version}, this primary speaks {}",
                protocol::VERSION
            )),
            ToPrimary::Hello { .. } if w.ready || w.stopping => None,
            ToPrimary::Hello { .. } => {
                self.on_hello(i, true);
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
                // The primary's copies are closed now: room for more, and
                // fds for an accept that ran out of them.
                self.backlog_waiting = true;
                self.accept_paused_until = None;
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
            ToPrimary::Pong(_) => None,
            ToPrimary::Stats(n) => {
                w.taken = w.taken.max(n);
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
                SIGHUP => self.begin_reload(),
                SIGTTIN => self.add_worker(),
                SIGTTOU => self.remove_worker(),
                _ => {}
            }
        }
    }

    fn on_control(&mut self) {
        while let Ok(c) = self.control_rx.try_recv() {
            match c {
                Control::Shutdown => self.begin_shutdown(),
                Control::Reload => self.begin_reload(),
                Control::AddWorker => self.add_worker(),
                Control::RemoveWorker => self.remove_worker(),
                Control::Send { id, data } => self.send_user_message(id, &data),
                Control::Stats(reply) => {
                    let _ = reply.try_send(self.stats());
                }
            }
        }
    }

    fn on_metrics(&mut self, event: &mio::event::Event) {
        if let Some(mut m) = self.metrics.take() {
            m.on_event(self.poll.registry(), event, self.now, || self.stats());
            self.metrics = Some(m);
        }
    }

    fn send_user_message(&mut self, target: Option<u64>, data: &[u8]) {
        let Ok(msg) = protocol::encode_message(true, data) else {
            return;
        };
        for w in self.workers.iter_mut().filter_map(Option::as_mut) {
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

    /// Stops accepting for good: the primary's listeners are closed, so
    /// the backlog is refused once no worker holds a copy either;
    /// connections already accepted still go to workers.
    pub(super) fn close_listener(&mut self) {
        if let Some(listener) = self.listener.take() {
            if self.settings.sched == Sched::RoundRobin {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&listener.as_raw_fd()));
            }
        }
        self.slot_listeners.clear();
        self.pump();
    }

    /// The listening socket a worker of `slot` inherits: none in rr; the
    /// shared one; or the slot's own `SO_REUSEPORT` socket, created here
    /// the first time (slot 1 uses the bound listener).
    pub(super) fn ensure_slot_listener(&mut self, slot: usize) -> io::Result<()> {
        if self.settings.sched != Sched::ReusePort || slot == 0 {
            return Ok(());
        }
        if self.slot_listeners.len() < slot {
            self.slot_listeners.resize_with(slot, || None);
        }
        if self.slot_listeners[slot - 1].is_none() {
            let l = super::bind(self.local_addr, self.settings.backlog, true)?;
            self.slot_listeners[slot - 1] = Some(l);
        }
        Ok(())
    }

    /// See [`EventLoop::ensure_slot_listener`]; call that first.
    pub(super) fn slot_listener(&self, slot: usize) -> Option<&TcpListener> {
        match self.settings.sched {
            Sched::RoundRobin => None,
            Sched::Shared => self.listener.as_ref(),
            Sched::ReusePort if slot == 0 => self.listener.as_ref(),
            Sched::ReusePort => self.slot_listeners.get(slot - 1).and_then(Option::as_ref),
        }
    }

    /// Closes a removed slot's own socket (reuseport); connections queued
    /// on it are lost once its worker exits too, a limit of `SO_REUSEPORT`.
    pub(super) fn drop_slot_listener(&mut self, slot: usize) {
        if slot > 0 {
            if let Some(l) = self.slot_listeners.get_mut(slot - 1) {
                *l = None;
            }
        }
    }

    fn stats(&self) -> Stats {
        let mut workers: Vec<WorkerStats> = self
            .workers
            .iter()
            .flatten()
            .map(|w| WorkerStats {
                id: w.id,
                pid: w.pid,
                slot: w.slot + 1,
                ready: w.ready,
                stopping: w.stopping,
                state: WorkerState::of(w.ready, w.stopping),
                connections: w.taken,
                unacknowledged: w.unacked.len(),
                uptime: self.now.saturating_duration_since(w.started),
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.id));
        let slots = self.slots.iter().enumerate();
        Stats {
            sched: self.settings.sched,
            local_addr: self.local_addr,
            uptime: self.now.saturating_duration_since(self.started),
            workers,
            slots: slots
                .map(|(s, slot)| SlotStats {
                    slot: s + 1,
                    active: slot.active,
                    restarts: slot.restarts,
                })
                .collect(),
            exited_connections: self.exited_connections,
            connections_held: self.pending.len(),
        }
    }
}
