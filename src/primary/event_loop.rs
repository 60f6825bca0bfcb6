//! The primary's one event loop, on one thread, never blocking and never
//! spinning: [`EventLoop`] owns the primary's state, each piece with one
//! owner, and this file is the thin driver that polls and hands each event
//! to its owner.
//!
//! - Owned here: the driver's I/O ([`Io`]: the polls, signals, the waker,
//!   the read buffers), the commands in and events out ([`Outbox`]), the
//!   message writers, and the reading of the workers' channels (at most
//!   [`MAX_READS_PER_WAKE`] messages from one per turn, so a chatty worker
//!   waits for the others).
//! - `acceptor.rs`: accepting and the hand-over ([`Accept`]).
//! - `supervisor.rs`: the workers' lives, slots, reloads, timers
//!   ([`Supervision`]).
//! - `node/`: Node's cluster protocol.
//! - State owned elsewhere: every connection's custody
//!   ([`Ledger`](super::custody::Ledger)), placement
//!   ([`Dispatcher`](super::policy::Dispatcher)), each worker's phase and
//!   deadlines (`process.rs`, `timers.rs`), the tokens (`source.rs`).
//!
//! The workers' channels are in the main poll in rr with native workers;
//! with Node workers, and with least-conn and p2c, they are in a poll of
//! their own ([`Source::Channels`]) that can be read at once: after each
//! `accept` for placement by load, and, for Node workers while connections
//! arrive together ([`QUIET_TICK`]), once per turn instead of on every line.
//! Why, and what it measured: docs/performance.md.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Waker};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR2};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use super::api::{Control, Event, Handle};
use super::backoff::Backoff;
use super::custody::{Ledger, NotHeld};
use super::ids::{IndexVec, ServerIdx, SlotIdx, WorkerIdx};
use super::metrics::MetricsServer;
use super::node::link::Read as NodeRead;
use super::policy::Dispatcher;
use super::process::{Conn, Link, Phase, Protocol, Role, WorkerCommand, WorkerProc};
use super::sched::Sched;
use super::server::Server;
use super::source::Source;
use super::stats::{Replacement, SlotStats};
use super::stats::{Stats, WorkerStats};
use super::timers::Timer;
use crate::channel::Recv;
use crate::protocol::{self, Encoder, ToPrimary};

/// While a turn accepted two or more connections this recently, workers'
/// messages do not wake the primary by themselves; at most this late,
/// they are read.
pub(super) const QUIET_TICK: Duration = Duration::from_millis(1);

/// How long a worker that gave connections back (RETURN: near its fd
/// limit) gets none, unless one of its connections finishes sooner.
pub(super) const FULL_PAUSE: Duration = Duration::from_millis(250);

/// The most messages read from one channel before the others get a turn.
pub(super) const MAX_READS_PER_WAKE: usize = 64;

pub(crate) struct Settings {
    pub workers: usize,
    pub command: WorkerCommand,
    pub shutdown_timeout: Duration,
    pub hello_timeout: Duration,
    pub worker_timeout: Option<Duration>,
    pub max_unacked: usize,
    /// `TCP_DEFER_ACCEPT` on every listening socket; zero: off.
    pub defer_accept: Duration,
    pub backoff: Backoff,
    pub handle_signals: bool,
    pub sched: Sched,
    /// Kernel steering of reuseport (`--steer`).
    pub steer: crate::primary::Steer,
    pub backlog: i32,
    pub prefix_output: bool,
    pub ready: super::api::Ready,
    pub protocol: Protocol,
    /// Each slot's weight for the policies (1 beyond the list).
    pub weights: Vec<u32>,
    /// Recycling: a worker past one of these is replaced (its successor
    /// first), one slot at a time.
    pub limits: Limits,
    /// Leave the process dumpable (else it is made non-dumpable at run).
    pub dumpable: bool,
    /// Stop after this many quick failures in a row of one slot.
    pub max_restarts: Option<u32>,
    /// This primary's program and arguments, for an upgrade; `None` when
    /// they could not be found.
    pub program: Option<super::upgrade::Program>,
    /// How long a new primary of an upgrade has to be ready.
    pub upgrade_timeout: Duration,
    /// `--sticky`: what keys a client.
    pub sticky: Option<super::sticky::Sticky>,
    /// `--sticky-balance-factor`.
    pub sticky_balance_factor: f64,
}

/// When a worker is recycled (`--max-requests`, `--max-memory`,
/// `--max-age`); `None`: no such limit.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    /// Connections taken.
    pub max_requests: Option<u64>,
    /// Each worker's `max_requests` is raised by a random 0 to this many,
    /// so that workers started together do not all recycle together.
    pub max_requests_jitter: u64,
    /// Bytes of RSS of the worker's process tree.
    pub max_memory: Option<u64>,
    pub max_age: Option<Duration>,
}

/// A place for one worker. Slots give restarts their backoff and rolling
/// reloads their order; a slot is inactive after a scale-down.
#[derive(Debug, Default)]
pub(super) struct Slot {
    pub active: bool,
    /// Index in `workers` of the slot's current worker.
    pub current: Option<WorkerIdx>,
    /// Index in `workers` of the worker starting beside the current one to
    /// take over from it once ready ([`Role::Successor`]).
    pub successor: Option<WorkerIdx>,
    /// Why the slot's worker is being replaced, while it is; counted when
    /// the new worker takes the slot over.
    pub replacing: Option<Replacement>,
    /// When to start the slot's worker again: its current worker if it has
    /// none, else its successor (a retry after one failed).
    pub restart_at: Option<Instant>,
    pub quick_exits: u32,
    /// Replacements after an unexpected exit or cut-off (for the stats).
    pub restarts: u64,
    /// How its last worker to exit ended ("status 0", "signal 9
    /// (SIGKILL)"), for `ctl status`.
    pub last_exit: Option<String>,
    /// Who waits for its worker to be ready (a slot added by
    /// [`crate::Handle::add_worker_and_wait`]).
    pub ready_waiters: Vec<Sender<Result<u64, String>>>,
    /// Who waits for its workers to be gone (a slot removed by
    /// [`crate::Handle::remove_worker_and_wait`]).
    pub gone_waiters: Vec<Sender<Result<(), String>>>,
}

/// Replacements one slot at a time: a rolling reload's slots, and workers
/// past a limit, each waiting for the one before to be ready.
#[derive(Debug, Default)]
pub(super) struct Reload {
    pub queue: VecDeque<Queued>,
    /// The replacement under way.
    pub step: Option<Step>,
    /// A reload (SIGHUP) is under way: "reload complete" comes when none of
    /// its slots is left.
    pub reloading: bool,
    /// Who waits for the reload to complete ([`crate::Handle::reload_and_wait`]).
    pub waiters: Vec<Sender<Result<(), String>>>,
}

/// A replacement waiting its turn.
#[derive(Debug, Clone, Copy)]
pub(super) struct Queued {
    pub slot: SlotIdx,
    pub why: Replacement,
    /// For a limit: the worker that reached it (skipped if it is no longer
    /// the slot's current worker by its turn).
    pub worker: Option<u64>,
}

/// The replacement under way: done once a worker of `slot` with an id of
/// at least `first_id` is the slot's ready current worker.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    pub slot: SlotIdx,
    pub first_id: u64,
}

pub(crate) struct EventLoop {
    /// The listening addresses: with the native protocol the one bound
    /// at start; with Node's, those the workers asked for.
    pub(super) servers: IndexVec<ServerIdx, Server>,
    /// The metrics endpoint, if asked for.
    pub(super) metrics: Option<MetricsServer>,
    pub(super) local_addr: SocketAddr,
    pub(super) started: Instant,
    pub(super) settings: Settings,
    /// Every worker process alive, by index; the index is its token.
    pub(super) workers: IndexVec<WorkerIdx, Option<WorkerProc>>,
    /// How connections are placed (primary-side modes; switchable).
    pub(super) dispatcher: Dispatcher,
    /// Custody of every accepted connection, and the workers' figures.
    pub(super) ledger: Ledger<Conn>,
    /// The time after the last poll; timers and liveness use it.
    pub(super) now: Instant,
    /// The thin mio driver's state: the polls, signals, the waker, and the buffers a read uses.
    pub(super) io: Io,
    /// Commands in from handles, events out to the embedding program.
    pub(super) outbox: Outbox,
    /// What messages to workers are written with.
    pub(super) writer: Writer,
    /// The acceptor's state (acceptor.rs).
    pub(super) accept: Accept,
    /// The supervisor's state (supervisor.rs): slots, reloads, shutdown, replacements, and what it tells.
    pub(super) sup: Supervision,
}

/// The thin mio driver's state: the polls, signals, the waker, and the buffers a read uses.
pub(crate) struct Io {
    pub(super) poll: Poll,
    /// The workers' channels' own poll (tokens `FIRST_WORKER + index`)
    /// while [`EventLoop::channels_nested`], watched by `poll` while
    /// `prompt` (always, for native workers), else read at the start of
    /// each turn. Otherwise the channels are in `poll`.
    pub(super) channels: Poll,
    /// What `channels` has ready (reused).
    pub(super) channel_events: Events,
    /// Whether a worker's message wakes the primary; see the module's
    /// "quiet channels".
    pub(super) prompt: bool,
    /// When a turn last accepted two or more connections.
    pub(super) last_burst: Option<Instant>,
    pub(super) signals: Signals,
    pub(super) waker: Arc<Waker>,
    /// Channels with more to read than one turn allows.
    pub(super) readable_again: Vec<WorkerIdx>,
    pub(super) buf: Box<[u8]>,
    pub(super) fds: Vec<OwnedFd>,
    /// The workers' `NOTIFY_SOCKET`.
    pub(super) notify: super::notify::NotifySocket,
}

/// Commands in from handles, events out to the embedding program.
pub(crate) struct Outbox {
    pub(super) control_tx: Sender<Control>,
    pub(super) control_rx: Receiver<Control>,
    pub(super) events_tx: Option<Sender<Event>>,
    pub(super) events_dropped: u64,
    /// A worker's message was logged at info once (no event receiver).
    pub(super) told_of_messages: bool,
}

/// What messages to workers are written with.
pub(crate) struct Writer {
    pub(super) enc: Encoder,
    /// A line to a Node worker being written.
    pub(super) line: Vec<u8>,
    /// The `seq` of the primary's other messages to Node workers.
    pub(super) next_seq: u64,
}

/// The acceptor's state (acceptor.rs).
pub(crate) struct Accept {
    /// Node: the socket bound at start for `--listen`, not listening yet:
    /// it serves the app's first server (whatever port that asks for) and
    /// listens only then, so that it never accepts what no worker serves.
    pub(super) spare: Option<TcpListener>,
    /// Node: servers handed over by the primary before an upgrade, served
    /// again when a worker asks for the same key.
    pub(super) inherited_node: Vec<super::upgrade::NodeServer>,
    /// `--sticky`: the ring of the active slots (rebuilt when they change).
    pub(super) ring: super::sticky::Ring,
    /// `--sticky`: how connections were placed.
    pub(super) sticky_counts: super::stats::StickyCounts,
    /// `--sticky`: a placement's scratch space.
    pub(super) sticky_scratch: super::sticky::Scratch,
    /// `--sticky header:|cookie:|query:`: connections waiting for their
    /// key (peek.rs).
    pub(super) peeking: super::peek::PeekSet,
    /// Workers whose staged batch is being sent (reused).
    pub(super) batched: Vec<WorkerIdx>,
    /// Accepting paused after an accept error, until then.
    pub(super) accept_paused_until: Option<Instant>,
    /// When an accept error was last logged as a warning.
    pub(super) accept_warned_at: Option<Instant>,
    /// The next connection id (increasing in accept order; also the `seq`
    /// of a Node worker's `newconn`, which it answers by that number).
    pub(super) next_conn_id: u64,
}

/// The supervisor's state (supervisor.rs): slots, reloads, shutdown, replacements, and what it tells.
pub(crate) struct Supervision {
    pub(super) slots: IndexVec<SlotIdx, Slot>,
    pub(super) free: Vec<WorkerIdx>,
    pub(super) next_worker_id: u64,
    pub(super) next_ping: u64,
    pub(super) reload: Reload,
    pub(super) shutdown_at: Option<Instant>,
    /// `READY=1` was sent to the primary's own service manager.
    pub(super) told_systemd_ready: bool,
    /// Relays worker output with a prefix, unless output passes through.
    pub(super) output: Option<super::output::Relay>,
    /// Kills the workers' process groups if the primary dies (started by
    /// `run`).
    pub(super) guardian: Option<super::guardian::Guardian>,
    /// Replacements so far, by [`Replacement::index`].
    pub(super) replaced: [u64; Replacement::ALL.len()],
    /// When to check the workers' memory next (`--max-memory`).
    pub(super) memory_check_at: Option<Instant>,
    /// Node workers started with an inspector so far (`node --inspect`):
    /// the next gets the base port plus this plus one, as Node's cluster.
    pub(super) inspect_offset: u32,
    /// Why the primary stopped by itself, a setting that cannot work:
    /// `run` fails with it once the workers are gone.
    pub(super) fatal: Option<String>,
    /// Why no worker gets ready, if known (for `/healthz`); cleared when one
    /// does.
    pub(super) problem: Option<String>,
    /// Connections taken by workers that have exited.
    pub(super) exited_connections: u64,
    /// An upgrade under way: the new primary this one started.
    pub(super) upgrade: Option<super::upgrade::Upgrade>,
    /// This primary is the new one of an upgrade: the old one.
    pub(super) parent: Option<super::upgrade::Parent>,
    /// An upgrade completed: the new primary's pid (this one is stopping).
    pub(super) upgraded_to: Option<u32>,
    /// The control socket, to hand over in an upgrade.
    pub(super) control: Option<super::control::Handover>,
}

/// What the builder hands the event loop beside the listener: the
/// steering of reuseport, and what an upgrade passed on.
#[derive(Debug, Default)]
pub(crate) struct Handed {
    pub steering: Option<super::steer::Steering>,
    /// Reuseport sockets of slots after the first, by slot index.
    pub slots: Vec<(usize, TcpListener)>,
    /// The stream to the primary this one takes over from.
    pub parent: Option<std::os::unix::net::UnixStream>,
    /// The control socket's hand-over side.
    pub control: Option<super::control::Handover>,
    /// Node apps: servers handed over, by key.
    pub node: Vec<super::upgrade::NodeServer>,
}

impl EventLoop {
    /// `listener`: the bound address (native protocol: required, and
    /// listening; Node's: the `--listen` socket, if any, bound but not
    /// listening yet).
    pub(crate) fn new(
        listener: Option<TcpListener>,
        mut metrics: Option<MetricsServer>,
        settings: Settings,
        handed: Handed,
    ) -> io::Result<EventLoop> {
        let Handed {
            steering,
            slots: inherited_slots,
            parent,
            control,
            node,
        } = handed;
        let poll = Poll::new()?;
        let channels = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&channels.as_raw_fd()),
            Source::Channels.token(),
            Interest::READABLE,
        )?;
        if let Some(m) = metrics.as_mut() {
            m.register(poll.registry())?;
        }
        let local_addr = match &listener {
            Some(l) => l.local_addr()?,
            None => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        };
        let waker = Arc::new(Waker::new(poll.registry(), Source::Waker.token())?);
        let mut wanted = vec![SIGCHLD];
        if settings.handle_signals {
            wanted.extend([SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR2]);
        }
        let mut signals = Signals::new(&wanted)?;
        poll.registry()
            .register(&mut signals, Source::Signals.token(), Interest::READABLE)?;
        let (control_tx, control_rx) = crossbeam_channel::unbounded();
        let settings_prefix = settings.prefix_output;
        let dispatcher = Dispatcher::new(settings.sched);
        let notify = super::notify::NotifySocket::bind()?;
        poll.registry().register(
            &mut SourceFd(&notify.raw_fd()),
            Source::Notify.token(),
            Interest::READABLE,
        )?;
        let native = settings.protocol == Protocol::Native;
        let (listener, spare) = if native {
            (listener, None)
        } else {
            (None, listener)
        };
        let mut this = EventLoop {
            servers: IndexVec::new(),
            metrics,
            local_addr,
            started: Instant::now(),
            settings,
            workers: IndexVec::new(),
            dispatcher,
            ledger: Ledger::default(),
            now: Instant::now(),
            io: Io {
                poll,
                channels,
                channel_events: Events::with_capacity(256),
                prompt: true,
                last_burst: None,
                signals,
                waker,
                readable_again: Vec::new(),
                buf: vec![0; protocol::MAX_MESSAGE].into_boxed_slice(),
                fds: Vec::with_capacity(protocol::MAX_FDS),
                notify,
            },
            outbox: Outbox {
                control_tx,
                control_rx,
                events_tx: None,
                events_dropped: 0,
                told_of_messages: false,
            },
            writer: Writer {
                enc: Encoder::default(),
                line: Vec::with_capacity(256),
                next_seq: 1,
            },
            accept: Accept {
                spare,
                inherited_node: node,
                ring: super::sticky::Ring::default(),
                sticky_counts: super::stats::StickyCounts::default(),
                sticky_scratch: super::sticky::Scratch::default(),
                peeking: super::peek::PeekSet::default(),
                batched: Vec::new(),
                accept_paused_until: None,
                accept_warned_at: None,
                next_conn_id: 1,
            },
            sup: Supervision {
                slots: IndexVec::new(),
                free: Vec::new(),
                next_worker_id: 1,
                next_ping: 1,
                reload: Reload::default(),
                shutdown_at: None,
                told_systemd_ready: false,
                output: if settings_prefix {
                    Some(super::output::Relay::start()?)
                } else {
                    None
                },
                guardian: None,
                replaced: [0; Replacement::ALL.len()],
                memory_check_at: None,
                inspect_offset: 0,
                fatal: None,
                problem: None,
                exited_connections: 0,
                upgrade: None,
                parent: None,
                upgraded_to: None,
                control,
            },
        };
        if let Some(parent) = parent {
            let channel = super::upgrade::Parent::new(parent)?;
            this.io.poll.registry().register(
                &mut SourceFd(&channel.raw_fd()),
                Source::Upgrade.token(),
                Interest::READABLE,
            )?;
            this.sup.parent = Some(channel);
        }
        if native {
            let listener = listener.expect("the native protocol binds at start");
            let k = this.add_server(Server::new(String::new(), listener, local_addr))?;
            let server = &mut this.servers[k];
            server.steering = steering;
            // Inherited sockets are in the inherited steering's array.
            for (slot, l) in inherited_slots {
                if server.slot_listeners.len() < slot {
                    server.slot_listeners.resize_with(slot, || None);
                }
                server.slot_listeners[slot - 1] = Some(l);
            }
        }
        Ok(this)
    }

    /// The next connection id.
    pub(super) fn next_conn_id(&mut self) -> u64 {
        let n = self.accept.next_conn_id;
        self.accept.next_conn_id += 1;
        n
    }

    /// The `seq` of the next message to a Node worker that is not a
    /// connection.
    pub(super) fn next_seq(&mut self) -> u64 {
        let n = self.writer.next_seq;
        self.writer.next_seq += 1;
        n
    }

    /// The mode in force: the settings' kernel mode, or the policy placing
    /// connections now.
    pub(super) fn live_sched(&self) -> Sched {
        if self.settings.sched.is_kernel() {
            self.settings.sched
        } else {
            self.dispatcher.sched()
        }
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub(crate) fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    pub(crate) fn handle(&self) -> Handle {
        Handle::new(self.outbox.control_tx.clone(), Arc::clone(&self.io.waker))
    }

    pub(crate) fn events(&mut self) -> Receiver<Event> {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        self.outbox.events_tx = Some(tx);
        rx
    }

    pub(crate) fn run(mut self) -> io::Result<()> {
        info!(
            "distributor {} primary (pid {})",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        if self.settings.protocol == Protocol::Native {
            info!("listening on {} ({})", self.local_addr, self.mode_text());
        } else if self.accept.spare.is_some() {
            info!(
                "Node workers: the app's first server will be served on {} (--listen), whatever port it asks for; connections are refused until it listens",
                self.local_addr
            );
        } else {
            info!("Node workers: the primary listens where the app's servers ask");
        }
        if let Some(addr) = self.metrics_addr() {
            info!("metrics on {addr} (GET /metrics, GET /healthz)");
        }
        let n = self.settings.workers;
        info!(
            "starting {}: {}",
            crate::logging::count(n, "worker"),
            self.settings.command.program().to_string_lossy()
        );
        if !self.settings.dumpable {
            if let Err(e) = crate::sys::set_non_dumpable() {
                warn!("cannot make the primary non-dumpable: {e}");
            }
        }
        let (socket, dir) = self.io.notify.paths();
        match super::guardian::Guardian::start(&socket, &dir) {
            Ok(g) => self.sup.guardian = Some(g),
            Err(e) => warn!(
                "cannot start the guardian process: what workers start may outlive a primary killed with SIGKILL: {e}"
            ),
        }
        if self.settings.limits.max_memory.is_some() {
            self.sup.memory_check_at = Some(self.now);
        }
        for _ in 0..self.settings.workers {
            let s = self.sup.slots.push(Slot {
                active: true,
                ..Slot::default()
            });
            // A command that cannot start at all is an error of the
            // primary's start, not a restart loop.
            self.start_worker(s, Role::Current)?;
        }
        let mut events = Events::with_capacity(256);
        loop {
            if self.sup.shutdown_at.is_some() && self.workers.iter().all(Option::is_none) {
                break;
            }
            // One scan of every timer per turn: it sets the poll's timeout
            // and says whether any is due after it (a timer set during the
            // turn, already due, fires on the next turn, at once).
            let deadline = self.next_deadline();
            let timeout = if self.io.readable_again.is_empty() {
                let tick = self
                    .io
                    .last_burst
                    .filter(|_| !self.io.prompt)
                    .map(|t| t + QUIET_TICK);
                deadline
                    .into_iter()
                    .chain(tick)
                    .min()
                    .map(|d| d.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.io.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            let first_conn = self.accept.next_conn_id;
            // Workers' messages first, so that what follows (stats,
            // placement, timers) sees them.
            if !self.io.prompt || events.iter().any(|e| e.token() == Source::Channels.token()) {
                self.read_channels();
            }
            for event in events.iter() {
                match Source::of(event.token()) {
                    Source::Listener(k) => {
                        if let Some(s) = self.servers.get_mut(k) {
                            s.backlog_waiting = true;
                        }
                    }
                    Source::Waker => self.on_control(),
                    Source::Signals => self.on_signals(),
                    Source::Notify => self.read_notices(),
                    Source::Upgrade => self.on_upgrade_channel(),
                    Source::Peek(j) => self.on_peek_readable(j),
                    Source::MetricsListener | Source::MetricsClient(_) => self.on_metrics(event),
                    Source::Worker(i) => self.on_channel_event(i, event),
                    Source::Channels | Source::Unknown => {}
                }
            }
            for i in std::mem::take(&mut self.io.readable_again) {
                self.read_channel(i);
            }
            if deadline.is_some_and(|d| d <= self.now) {
                self.on_timers();
            }
            self.pump();
            self.watch_channels(first_conn);
            self.refresh_steering();
        }
        let held = self.ledger.held_total();
        if held > 0 {
            warn!("closing {held} accepted connections that no worker could take before shutdown");
        }
        if self.outbox.events_dropped > 0 {
            warn!(
                "{} events were dropped: the event receiver fell behind",
                self.outbox.events_dropped
            );
        }
        info!("shutdown complete");
        match self.sup.fatal.take() {
            Some(problem) => Err(io::Error::new(io::ErrorKind::InvalidInput, problem)),
            None => Ok(()),
        }
    }

    /// Stops gracefully because `problem` makes the settings unworkable (it
    /// would not fix itself): logged once, and `run` fails with it.
    pub(super) fn stop_for(&mut self, problem: String) {
        if self.sup.fatal.is_none() {
            error!("stopping: {problem}");
            self.sup.fatal = Some(problem);
        }
        self.begin_shutdown();
    }

    /// Worker `i`'s channel is ready.
    fn on_channel_event(&mut self, i: WorkerIdx, event: &mio::event::Event) {
        if event.is_writable() {
            self.on_writable(i);
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read_channel(i);
        }
    }

    /// The registry worker channels go in.
    pub(super) fn channel_registry(&self) -> &mio::Registry {
        if self.channels_nested() {
            self.io.channels.registry()
        } else {
            self.io.poll.registry()
        }
    }

    /// Whether the workers' channels are in their own poll: for Node
    /// workers (quiet channels), and where placement reads load (fresh
    /// counts); see the module's doc.
    pub(super) fn channels_nested(&self) -> bool {
        self.settings.protocol == Protocol::Node || self.dispatcher.sched().reads_load()
    }

    /// Watches worker `i`'s channel `fd` in `registry`.
    pub(super) fn register_channel(
        registry: &mio::Registry,
        fd: std::os::fd::RawFd,
        i: WorkerIdx,
    ) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&fd),
            Source::Worker(i).token(),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Moves every worker's channel to where it belongs now
    /// ([`EventLoop::channels_nested`]), after a switch of policy.
    fn move_channels(&mut self) {
        let (from, to) = if self.channels_nested() {
            (&self.io.poll, &self.io.channels)
        } else {
            (&self.io.channels, &self.io.poll)
        };
        let mut broken = Vec::new();
        for (i, w) in self.workers.iter_enumerated() {
            let Some(fd) = w
                .as_ref()
                .and_then(|w| w.channel.as_ref())
                .map(|c| c.as_fd().as_raw_fd())
            else {
                continue;
            };
            let _ = from.registry().deregister(&mut SourceFd(&fd));
            if let Err(e) = Self::register_channel(to.registry(), fd, i) {
                error!("cannot watch worker {i}'s channel: {e}");
                broken.push(i);
            }
        }
        for i in broken {
            self.cut_off(i);
        }
    }

    /// Acts on what the workers' channels have ready.
    pub(super) fn read_channels(&mut self) {
        // (Taken out for the loop: the handlers borrow `self`.)
        let mut events = std::mem::replace(&mut self.io.channel_events, Events::with_capacity(0));
        loop {
            if let Err(e) = self.io.channels.poll(&mut events, Some(Duration::ZERO)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("cannot poll the workers' channels: {e}");
                break;
            }
            for event in events.iter() {
                if let Source::Worker(i) = Source::of(event.token()) {
                    self.on_channel_event(i, event);
                }
            }
            if events.iter().count() < events.capacity() {
                break;
            }
        }
        self.io.channel_events = events;
    }

    /// Whether workers' messages must wake the primary now: unless
    /// connections arrive together and nothing waits on a worker's answer.
    fn prompt_wanted(&self) -> bool {
        let busy = self
            .io
            .last_burst
            .is_some_and(|t| self.now < t + QUIET_TICK);
        !busy
            || self.sup.shutdown_at.is_some()
            || self.sup.reload.step.is_some()
            || !self.sup.reload.queue.is_empty()
            || self.accept.accept_paused_until.is_some()
            || self.ledger.held_total() > 0
            || self.workers.iter().flatten().any(|w| {
                w.channel
                    .as_ref()
                    .is_some_and(|c| !w.is_ready() || w.channel_full || c.blocked())
            })
    }

    /// Watches the channels' poll, or stops watching it, as wanted after a
    /// turn whose first connection (if any) got id `first_conn`.
    fn watch_channels(&mut self, first_conn: u64) {
        if self.settings.protocol != Protocol::Node {
            return;
        }
        let fd = self.io.channels.as_raw_fd();
        if self.accept.next_conn_id >= first_conn + 2 {
            self.io.last_burst = Some(self.now);
        }
        let want = self.prompt_wanted();
        if want == self.io.prompt {
            return;
        }
        let done = if want {
            self.io.poll.registry().register(
                &mut SourceFd(&fd),
                Source::Channels.token(),
                Interest::READABLE,
            )
        } else {
            self.io.poll.registry().deregister(&mut SourceFd(&fd))
        };
        match done {
            Ok(()) if want => {
                debug!("workers' channels: each message wakes the primary");
                self.io.prompt = true;
            }
            Ok(()) => {
                debug!("workers' channels: read once per turn while connections arrive together");
                self.io.prompt = false;
            }
            Err(e) => warn!("cannot change how the workers' channels are watched: {e}"),
        }
    }

    /// Reads every notification waiting on the workers' notify socket.
    fn read_notices(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let (pid, text) = match self.io.notify.recv(&mut buf) {
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

    pub(super) fn worker_mut(&mut self, i: WorkerIdx) -> Option<&mut WorkerProc> {
        self.workers.get_mut(i).and_then(Option::as_mut)
    }

    /// A message from worker `i` to the primary's application (the
    /// protocol's MESSAGE, Node's `process.send()`): an [`Event::Message`].
    /// Without a receiver of events (the command), the first is logged at
    /// info, with what the primary does with it, and the rest at debug.
    pub(super) fn on_worker_message(&mut self, i: WorkerIdx, data: &[u8]) {
        let Some(id) = self.workers[i].as_ref().map(|w| w.id) else {
            return;
        };
        let shown = String::from_utf8_lossy(&data[..data.len().min(200)]).into_owned();
        let cut = if data.len() > 200 { "..." } else { "" };
        if self.outbox.events_tx.is_none() && !self.outbox.told_of_messages {
            self.outbox.told_of_messages = true;
            info!(
                worker = id,
                "worker {id} sent the primary a message: {shown}{cut} (this primary passes workers' messages to no one and sends none; the rest are logged at debug level)"
            );
        } else {
            debug!(worker = id, "message from worker {id}: {shown}{cut}");
        }
        self.emit(Event::Message {
            id,
            data: data.to_vec(),
        });
    }

    pub(super) fn emit(&mut self, event: Event) {
        if let Some(tx) = &self.outbox.events_tx {
            match tx.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => self.outbox.events_dropped += 1,
                Err(TrySendError::Disconnected(_)) => self.outbox.events_tx = None,
            }
        }
    }

    /// Worker `i`'s channel has room again: what waited goes first.
    fn on_writable(&mut self, i: WorkerIdx) {
        let Some(w) = self.worker_mut(i) else {
            return;
        };
        w.channel_full = false;
        if let Some(Link::Node(link)) = w.channel.as_mut() {
            if let Err(e) = link.flush() {
                warn!(worker = w.id, "cannot send to worker {}: {e}", w.id);
                self.cut_off(i);
            }
        }
    }

    /// The mode, as the listening line says it.
    pub(super) fn mode_text(&self) -> &'static str {
        match self.settings.sched {
            Sched::RoundRobin => "rr: the primary accepts and hands connections round-robin",
            Sched::LeastConn => {
                "least-conn: the primary accepts and hands each connection to the least loaded worker"
            }
            Sched::PowerOfTwo => {
                "p2c: the primary accepts and hands each connection to the less loaded of two random workers"
            }
            Sched::Shared => "shared: every worker accepts on this socket",
            Sched::ReusePort if self.settings.steer == crate::primary::Steer::RoundRobin => {
                "reuseport, steered: one SO_REUSEPORT socket per worker, each connection to the next in the primary's round-robin (BPF)"
            }
            Sched::ReusePort => "reuseport: one SO_REUSEPORT socket per worker",
        }
    }

    /// Reads the messages waiting on worker `i`'s channel, up to a turn's worth.
    /// Returns true when it stopped at the turn's limit: more may wait.
    pub(super) fn read_channel(&mut self, i: WorkerIdx) -> bool {
        let mut buf = std::mem::take(&mut self.io.buf);
        for _ in 0..MAX_READS_PER_WAKE {
            let Some(w) = self.workers.get_mut(i).and_then(Option::as_mut) else {
                break;
            };
            let Some(channel) = w.channel.as_mut() else {
                break;
            };
            self.io.fds.clear();
            // Some(len) of a native message, Some(0) for lines read from a
            // Node worker, None when the channel closed.
            let got = match channel {
                Link::Native(c) => c
                    .recv(&mut buf, &mut self.io.fds, true)
                    .and_then(|r| match r {
                        Recv::Message(len) => Ok(Some(len)),
                        Recv::FdsCut(_) => Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "fds attached to its message, more than the receive buffer holds",
                        )),
                        Recv::Closed => Ok(None),
                    }),
                Link::Node(l) => l.read(&mut buf, &mut self.io.fds).map(|r| match r {
                    NodeRead::Data => Some(0),
                    NodeRead::Closed => None,
                }),
            };
            let problem = match got {
                Ok(Some(_)) if w.node => {
                    // A Node worker sends no fds: any that came are closed.
                    self.io.fds.clear();
                    self.on_node_lines(i)
                }
                Ok(Some(len)) => match ToPrimary::decode(&buf[..len], self.io.fds.len()) {
                    Ok(msg) => self.on_message(i, msg),
                    Err(e) => Some(e.to_string()),
                },
                Ok(None) => {
                    self.on_channel_closed(i);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.io.fds.clear();
                    self.io.buf = buf;
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
            self.io.readable_again.push(i);
        }
        self.io.fds.clear();
        self.io.buf = buf;
        more
    }

    /// Acts on one well-formed message; returns a protocol problem, if any.
    fn on_message(&mut self, i: WorkerIdx, msg: ToPrimary<'_>) -> Option<String> {
        let now = self.now;
        let w = self.workers[i].as_mut().expect("reading a live worker");
        w.last_seen = now;
        match msg {
            ToPrimary::Hello { version } if version != protocol::VERSION => Some(format!(
                "it speaks protocol version {version}, this primary speaks {}",
                protocol::VERSION
            )),
            ToPrimary::Hello { .. } if w.spoke => Some("it said HELLO twice".into()),
            ToPrimary::Hello { .. } if w.phase != Phase::Starting => {
                // Taken as ready without it (a kernel mode), or leaving: it
                // speaks the protocol after all.
                w.spoke = true;
                w.timers.clear(Timer::StatsDue);
                None
            }
            ToPrimary::Hello { .. } => {
                self.on_hello(i, true);
                None
            }
            ToPrimary::Ack(ids) => self.acknowledged(i, ids).err(),
            ToPrimary::Message(data) => {
                self.on_worker_message(i, data);
                None
            }
            ToPrimary::Pong(n) if n == 0 || n > w.last_ping => Some(format!(
                "it answered heartbeat {n}, which it was never sent"
            )),
            ToPrimary::Pong(_) => None,
            ToPrimary::Stats(_) if !self.settings.sched.is_kernel() => Some(
                "it sent STATS, which only the kernel modes use (the primary counts in rr)".into(),
            ),
            ToPrimary::Stats(n) => {
                w.timers.clear(Timer::StatsDue);
                let limited = w.max_requests.is_some();
                self.ledger.report_taken(i, n);
                if limited {
                    self.check_max_requests(i);
                }
                None
            }
            ToPrimary::Recycle => {
                self.on_leaving(i, "asks to be recycled", true);
                None
            }
            ToPrimary::Return(ids) => {
                // It is near its fd limit: others take its share a moment.
                if !w.timers.is_set(Timer::FullPause) {
                    info!(
                        worker = w.id,
                        "worker {} (pid {}) is near its fd limit: it gave back {}, which go to other workers; it gets none for {FULL_PAUSE:?} or until one of its connections finishes",
                        w.id,
                        w.pid,
                        crate::logging::count(ids.clone().count(), "connection")
                    );
                }
                w.timers.set(Timer::FullPause, now + FULL_PAUSE);
                let mut back = Vec::new();
                for id in ids {
                    match self.ledger.take_back(i, id) {
                        Ok(conn) => back.push(conn),
                        Err(NotHeld(id)) => {
                            for conn in back.into_iter().rev() {
                                self.ledger.hand_back(conn);
                            }
                            return Some(format!(
                                "returned connection {id}, which it does not hold"
                            ));
                        }
                    }
                }
                for conn in back.into_iter().rev() {
                    self.ledger.hand_back(conn);
                }
                None
            }
            ToPrimary::Done(n) => {
                let bounded = !self.settings.sched.is_kernel();
                match self.ledger.report_finished(i, n, bounded) {
                    Err(problem) => Some(problem),
                    Ok(grew) => {
                        if grew {
                            // Its fds are freed: it may take connections again.
                            w.timers.clear(Timer::FullPause);
                        }
                        None
                    }
                }
            }
        }
    }

    /// Worker `i` acknowledged connections `ids` (the protocol's ACK, or a
    /// Node worker's `accepted: true`): the one path for both.
    pub(super) fn acknowledged(
        &mut self,
        i: WorkerIdx,
        ids: impl IntoIterator<Item = u64>,
    ) -> Result<(), String> {
        for id in ids {
            if let Err(NotHeld(id)) = self.ledger.ack(i, id) {
                return Err(format!(
                    "acknowledged connection {id}, which it does not hold"
                ));
            }
        }
        // The primary's copies are closed now: room for more, and fds for
        // an accept that ran out of them.
        self.accept.accept_paused_until = None;
        self.check_max_requests(i);
        Ok(())
    }

    fn on_signals(&mut self) {
        let signals: Vec<i32> = self.io.signals.pending().collect();
        for sig in signals {
            match sig {
                SIGCHLD => {
                    self.reap();
                    self.reap_upgrade();
                }
                SIGTERM | SIGINT => {
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    info!("{name} received");
                    self.begin_shutdown();
                }
                SIGHUP => self.begin_reload(),
                SIGTTIN => self.add_worker(None),
                SIGTTOU => self.remove_worker(None),
                SIGUSR2 => {
                    info!("SIGUSR2 received: upgrading the primary");
                    self.begin_upgrade(None);
                }
                _ => {}
            }
        }
    }

    fn on_control(&mut self) {
        while let Ok(c) = self.outbox.control_rx.try_recv() {
            match c {
                Control::Shutdown => self.begin_shutdown(),
                Control::Reload(reply) => match (reply, self.sup.shutdown_at) {
                    (Some(tx), Some(_)) => {
                        let _ = tx.try_send(Err("the primary is stopping".into()));
                    }
                    (reply, _) => {
                        self.sup.reload.waiters.extend(reply);
                        self.begin_reload();
                    }
                },
                Control::AddWorker(reply) => self.add_worker(reply),
                Control::RemoveWorker(reply) => self.remove_worker(reply),
                Control::Send { id, data } => self.send_user_message(id, &data),
                Control::Stats(reply) => {
                    let _ = reply.try_send(self.stats());
                }
                Control::SetSched(sched) => self.set_sched(sched),
                Control::Upgrade(reply) => self.begin_upgrade(reply),
            }
        }
    }

    /// Switches the policy (primary-side modes only).
    pub(super) fn set_sched(&mut self, sched: Sched) {
        let from = self.live_sched();
        if sched == from {
            return;
        }
        let nested = self.channels_nested();
        if self.settings.sched.is_kernel() || !self.dispatcher.switch(sched) {
            warn!(
                "cannot switch from {from} to {sched}: only rr, least-conn and p2c switch while running"
            );
            return;
        }
        info!("scheduling policy: {from} -> {sched}");
        if self.channels_nested() != nested {
            self.move_channels();
        }
    }

    fn on_metrics(&mut self, event: &mio::event::Event) {
        if let Some(mut m) = self.metrics.take() {
            m.on_event(self.io.poll.registry(), event, self.now, || self.stats());
            self.metrics = Some(m);
        }
    }

    /// A message of the embedding program's to one worker or (`None`) to
    /// every ready one: a protocol MESSAGE, or for Node workers one JSON
    /// line (`process.on('message')`), which it must be.
    fn send_user_message(&mut self, target: Option<u64>, data: &[u8]) {
        let Ok(msg) = protocol::encode_message(true, data) else {
            warn!(
                "a message of {} bytes to workers dropped: too large",
                data.len()
            );
            return;
        };
        let json = super::node::wire::app_line(data);
        for w in self.workers.iter_mut().filter_map(Option::as_mut) {
            let wanted = match target {
                Some(id) => w.id == id,
                None => w.was_ready(),
            };
            let Some(channel) = w.channel.as_mut().filter(|_| wanted) else {
                continue;
            };
            let sent = match (channel, &json) {
                (Link::Native(c), _) => c.send(&msg, &[], true),
                (Link::Node(l), Ok(line)) => l.send(line, None),
                (Link::Node(_), Err(e)) => {
                    Err(io::Error::new(io::ErrorKind::InvalidInput, e.clone()))
                }
            };
            if let Err(e) = sent {
                warn!(worker = w.id, "message to worker {} dropped: {e}", w.id);
            }
        }
    }

    fn stats(&self) -> Stats {
        let mut workers: Vec<WorkerStats> = self
            .workers
            .iter_enumerated()
            .filter_map(|(i, w)| Some((i, w.as_ref()?)))
            .map(|(i, w)| WorkerStats {
                id: w.id,
                pid: w.pid,
                slot: w.slot.number(),
                ready: w.was_ready(),
                stopping: w.is_stopping(),
                state: w.phase.into(),
                connections: self.ledger.taken(i),
                unacknowledged: self.ledger.unacknowledged(i),
                in_flight: self.ledger.in_flight(i),
                finished: self.ledger.finished(i),
                weight: self.weight(w.slot),
                uptime: Instant::now().saturating_duration_since(w.started),
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.id));
        let slots = self.sup.slots.iter_enumerated();
        Stats {
            sched: self.live_sched(),
            steer: self.settings.steer,
            sticky: self
                .settings
                .sticky
                .as_ref()
                .map(|_| self.accept.sticky_counts),
            local_addr: self.local_addr,
            uptime: Instant::now().saturating_duration_since(self.started),
            workers,
            slots: slots
                .map(|(s, slot)| SlotStats {
                    slot: s.number(),
                    active: slot.active,
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.clone(),
                })
                .collect(),
            exited_connections: self.sup.exited_connections,
            connections_held: self.ledger.held_total(),
            listeners: self
                .servers
                .iter()
                .filter(|s| s.listener.is_some())
                .map(|s| s.addr)
                .collect(),
            replaced: self.sup.replaced,
            problem: self.sup.problem.clone(),
        }
    }
}
