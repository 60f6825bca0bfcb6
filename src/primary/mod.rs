//! The primary: owns the listening socket, starts and watches the workers,
//! and hands each accepted connection to one of them.
//!
//! Build one with [`Primary::builder`], take a [`Handle`] (commands in) and
//! an event receiver (events out) if you want them, then call
//! [`Primary::run`], which returns after a graceful shutdown.
//!
//! ```no_run
//! use distributor::{Primary, WorkerCommand};
//!
//! let primary = Primary::builder()
//!     .workers(4)
//!     .listen("127.0.0.1:8000".parse().unwrap())
//!     .command(WorkerCommand::new("python3", ["examples/python/hello.py"]))
//!     .build()?;
//! println!("serving on {}", primary.local_addr());
//! primary.run()?;
//! # Ok::<(), distributor::PrimaryError>(())
//! ```

mod acceptor;
mod api;
mod backoff;
pub mod control;
mod custody;
mod event_loop;
mod exposition;
mod guardian;
mod ids;
mod metrics;
pub(crate) mod node;
mod notify;
mod output;
mod peek;
pub mod policy;
mod privileges;
mod process;
mod sched;
mod server;
mod source;
mod stats;
mod steer;
mod sticky;
mod supervisor;
mod timers;
mod upgrade;

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use api::{Event, Events, EventsError, Handle, Ready};
pub use backoff::Backoff;
pub use process::{Protocol, WorkerCommand};
pub use sched::Sched;
pub use stats::StickyCounts;
pub use stats::{Replacement, SlotStats, Stats, WorkerState, WorkerStats};
pub use steer::Steer;
pub use sticky::Sticky;

/// Why the primary could not start or run.
#[derive(Debug)]
#[non_exhaustive]
pub enum PrimaryError {
    /// A setting is out of range.
    Config(String),
    /// The listening socket could not be bound.
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The metrics endpoint's socket ([`Builder::metrics`]) could not be
    /// bound.
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The worker command cannot be run.
    Command {
        /// The program, as given.
        program: String,
        /// Why it cannot run (not found, not executable, ...).
        reason: String,
    },
    /// An unexpected system error.
    Io(io::Error),
}

impl fmt::Display for PrimaryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrimaryError::Config(s) => f.write_str(s),
            PrimaryError::Listen { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            PrimaryError::Metrics { addr, source } => {
                write!(f, "cannot serve metrics on {addr}: {source}")
            }
            PrimaryError::Command { program, reason } => {
                write!(f, "cannot run worker command `{program}`: {reason}")
            }
            PrimaryError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PrimaryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PrimaryError::Listen { source, .. } | PrimaryError::Metrics { source, .. } => {
                Some(source)
            }
            PrimaryError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for PrimaryError {
    fn from(e: io::Error) -> Self {
        PrimaryError::Io(e)
    }
}

/// Settings for a [`Primary`]; see each method.
#[derive(Debug)]
pub struct Builder {
    workers: usize,
    listener: Option<TcpListener>,
    listen: Option<SocketAddr>,
    backlog: i32,
    protocol: Option<Protocol>,
    weights: Vec<u32>,
    command: Option<WorkerCommand>,
    shutdown_timeout: Duration,
    hello_timeout: Duration,
    worker_timeout: Option<Duration>,
    max_unacked: usize,
    defer_accept: Duration,
    backoff: Backoff,
    handle_signals: bool,
    sched: Sched,
    steer: Steer,
    user: Option<String>,
    group: Option<String>,
    prefix_output: bool,
    ready: Ready,
    metrics: Option<SocketAddr>,
    limits: event_loop::Limits,
    dumpable: bool,
    max_restarts: Option<u32>,
    upgrade_timeout: Duration,
    control: Option<PathBuf>,
    sticky: Option<Sticky>,
    sticky_balance_factor: f64,
}

/// The default of [`Builder::max_unacked`].
pub const DEFAULT_MAX_UNACKED: usize = 16;

/// The default listening address, `0.0.0.0:8000`.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";

impl Default for Builder {
    fn default() -> Self {
        Builder {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            listener: None,
            listen: None,
            backlog: 1024,
            protocol: None,
            weights: Vec::new(),
            command: None,
            shutdown_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(2),
            worker_timeout: Some(Duration::from_secs(30)),
            max_unacked: DEFAULT_MAX_UNACKED,
            defer_accept: Duration::ZERO,
            backoff: Backoff::default(),
            handle_signals: true,
            sched: Sched::RoundRobin,
            steer: Steer::Off,
            user: None,
            group: None,
            prefix_output: true,
            ready: Ready::Hello,
            metrics: None,
            limits: event_loop::Limits::default(),
            dumpable: false,
            max_restarts: None,
            upgrade_timeout: Duration::from_secs(60),
            control: None,
            sticky: None,
            sticky_balance_factor: sticky::DEFAULT_BALANCE_FACTOR,
        }
    }
}

impl Builder {
    /// Number of workers (default: available parallelism). At least 1.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Address to bind (default `0.0.0.0:8000`); port 0 picks a free port.
    ///
    /// With Node workers ([`Protocol::Node`]) the app's own `listen()`
    /// calls say where to listen; this address, if given, is bound at start
    /// and serves the app's first server, on this address (not on every
    /// interface), when that server asks for port 0 or for this port. It
    /// listens only then: until then connections are refused, never
    /// accepted and left unserved. An app whose first server asks for
    /// another port cannot be moved there (Node's worker checks that it got
    /// the port it asked for): the primary then stops, and
    /// [`Primary::run`] fails saying so.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Weights of the worker slots, in slot order (missing ones are 1):
    /// weighted round-robin in `rr`, load relative to weight in
    /// `least-conn` and `p2c`. A slot's workers (restarts, reloads) keep
    /// its weight.
    pub fn weights(mut self, weights: Vec<u32>) -> Self {
        self.weights = weights;
        self
    }

    /// The protocol the workers speak (default: [`Protocol::detect`] from
    /// the command, so Node's for `node app.js`).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// Uses an already-bound listener instead of binding (tests, socket
    /// activation). It is set non-blocking.
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// The program the workers run (default: this program again, see
    /// [`WorkerCommand::current_exe`]).
    pub fn command(mut self, cmd: WorkerCommand) -> Self {
        self.command = Some(cmd);
        self
    }

    /// How long a graceful shutdown waits for workers before SIGKILL
    /// (default 10 s). Workers get the stop message at once and SIGTERM at
    /// half this time.
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// After how long a worker that has not said hello is reported in the
    /// log (default 2 s), with what to do. It keeps running; it only gets
    /// no connections.
    pub fn hello_timeout(mut self, t: Duration) -> Self {
        self.hello_timeout = t;
        self
    }

    /// A ready worker that sends nothing (no acknowledgement, no answer to
    /// the primary's heartbeat) for this long is hung: it is stopped
    /// (SIGTERM, then SIGKILL) and replaced, and its unacknowledged
    /// connections go to other workers. Default 30 s; `None` turns hang
    /// detection off. Like gunicorn's `timeout`, a worker that reads its
    /// channel only between requests must finish each within it.
    pub fn worker_timeout(mut self, t: Option<Duration>) -> Self {
        self.worker_timeout = t.filter(|t| !t.is_zero());
        self
    }

    /// The most connections one worker may hold unacknowledged (default 16).
    /// When every worker is at its limit the primary stops accepting and
    /// the kernel's backlog holds the wait.
    pub fn max_unacked(mut self, n: usize) -> Self {
        self.max_unacked = n.max(1);
        self
    }

    /// `TCP_DEFER_ACCEPT` on the listening sockets (default zero: off).
    /// The kernel then completes a connection, and the primary (or in the
    /// kernel modes a worker) accepts it, only once the client's first
    /// data has arrived, or, for a client that sends nothing, after about
    /// this long (whole seconds; the kernel counts in SYN-ACK
    /// retransmissions). For protocols where the client speaks first
    /// (HTTP): the worker finds the request there when it takes the
    /// connection, and fewer wake-ups are spent on connections that have
    /// nothing to read yet; the price is a little latency for each
    /// connection (the accept waits for the data rather than overlapping
    /// with it). Protocols where the server speaks first must leave it off.
    pub fn defer_accept(mut self, t: Duration) -> Self {
        self.defer_accept = t;
        self
    }

    /// The restart policy for workers that die young.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Whether the primary handles signals (default true): SIGTERM and
    /// SIGINT start a graceful shutdown, SIGHUP a rolling reload, SIGTTIN
    /// adds a worker and SIGTTOU removes one. Without, use the [`Handle`].
    /// SIGCHLD is always watched.
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.handle_signals = on;
        self
    }

    /// Who accepts and balances connections (default round-robin by the
    /// primary); see [`Sched`]. In the kernel modes each worker gets its
    /// listening socket by socket activation (fd 3, `LISTEN_FDS`).
    pub fn sched(mut self, sched: Sched) -> Self {
        self.sched = sched;
        self
    }

    /// Steers [`Sched::ReusePort`]'s kernel balancing (`--steer`): with
    /// [`Steer::RoundRobin`] a BPF program attached to the socket group
    /// gives each new connection to the next ready slot in the primary's
    /// order (weighted by [`Builder::weights`]), with no work of the
    /// primary per connection, and a removed slot's queued connections
    /// move to the others. Needs root (or `CAP_BPF` with `CAP_NET_ADMIN`)
    /// and Linux 5.14; without them the build fails with one line saying
    /// so. Native workers only.
    pub fn steer(mut self, steer: Steer) -> Self {
        self.steer = steer;
        self
    }

    /// Runs the primary and its workers as this user (a name or a number)
    /// once the listener is bound: start as root to bind port 80, serve as
    /// `www-data`. The group is the user's primary group unless
    /// [`Builder::group`] says otherwise.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Whether worker output is relayed line by line with a `[worker ID] `
    /// prefix (default true); false lets workers write to the primary's
    /// stdout and stderr directly.
    pub fn prefix_output(mut self, on: bool) -> Self {
        self.prefix_output = on;
        self
    }

    /// What counts a worker ready (default: its protocol hello); see
    /// [`Ready`]. Every worker gets a `NOTIFY_SOCKET` of the primary's, so
    /// `STATUS=`, `STOPPING=1` and `WATCHDOG=1` (which feeds hang
    /// detection) work whatever this is.
    pub fn ready(mut self, ready: Ready) -> Self {
        self.ready = ready;
        self
    }

    /// Recycles a worker once it has taken `n` connections (gunicorn's
    /// `max_requests`; `None`, the default: never): its slot gets a new
    /// worker, which is ready before the old one is asked to stop, one slot
    /// at a time. The primary counts connections, not the requests on
    /// them: behind keep-alive clients a worker serves more requests than
    /// that. In the kernel modes it counts what a worker reports (STATS),
    /// so only workers that speak the protocol are recycled by it.
    pub fn max_requests(mut self, n: Option<u64>) -> Self {
        self.limits.max_requests = n.filter(|&n| n > 0);
        self
    }

    /// Raises each worker's [`Builder::max_requests`] by a random 0 to `n`
    /// (gunicorn's `max_requests_jitter`), so that workers started together
    /// are not all recycled together. Default 0.
    pub fn max_requests_jitter(mut self, n: u64) -> Self {
        self.limits.max_requests_jitter = n;
        self
    }

    /// Recycles a worker whose process tree (the worker and everything it
    /// started) has more than `bytes` resident (RSS, as PM2's
    /// `max_memory_restart`), measured every second; `None`, the default:
    /// never. Applies in every mode.
    pub fn max_memory(mut self, bytes: Option<u64>) -> Self {
        self.limits.max_memory = bytes.filter(|&b| b > 0);
        self
    }

    /// Recycles a worker once it has run this long (uWSGI's
    /// `max-worker-lifetime`); `None`, the default: never. Applies in every
    /// mode.
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.limits.max_age = age.filter(|a| !a.is_zero());
        self
    }

    /// Serves the control socket at `path` (`distributor ctl` talks to it:
    /// status, reload, scale, sched, upgrade, stop), mode 0600; off by
    /// default in the library. [`control::default_path`] is where the
    /// command puts it.
    pub fn control(mut self, path: Option<PathBuf>) -> Self {
        self.control = path;
        self
    }

    /// Sticky sessions (`--sticky ip`): each client (by its address) goes
    /// to the same worker slot, by consistent hashing over the slots, as
    /// long as that worker holds at most `1 + factor` times the average in
    /// flight ([`Builder::sticky_balance_factor`]); else to the next slot
    /// on the ring. Primary-side modes only.
    pub fn sticky(mut self, sticky: Option<Sticky>) -> Self {
        self.sticky = sticky;
        self
    }

    /// How far above the average in flight a worker may go before a
    /// sticky key spills to the next slot (default 0.25: 125 %).
    pub fn sticky_balance_factor(mut self, factor: f64) -> Self {
        self.sticky_balance_factor = factor;
        self
    }

    /// How long the new primary of an upgrade (SIGUSR2,
    /// [`Handle::upgrade_and_wait`]) has to get every worker ready before
    /// it is killed and this one goes on serving (default 60 s).
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// Stops the primary ([`Primary::run`] fails) once a slot's worker has
    /// failed `n` times in a row, each within the backoff's reset time of
    /// its start (a crash loop), as PM2's `max_restarts`, so that a service
    /// manager's restart policy takes over. `None` (the default): retry
    /// forever, with backoff. A worker that was ready and served does not
    /// count.
    pub fn max_restarts(mut self, n: Option<u32>) -> Self {
        self.max_restarts = n.filter(|&n| n > 0);
        self
    }

    /// Whether the primary's process stays dumpable (default false). When
    /// it runs, the primary makes its process non-dumpable
    /// (`PR_SET_DUMPABLE`): no core dump, and no process of the same user
    /// (a compromised worker, say) can attach to it, read its memory or
    /// take its listening socket and channels (`pidfd_getfd`). Workers are
    /// not affected. Set true to debug the primary with a debugger as the
    /// same user.
    pub fn dumpable(mut self, on: bool) -> Self {
        self.dumpable = on;
        self
    }

    /// Runs as this group (a name or a number); see [`Builder::user`].
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Serves `GET /metrics` (Prometheus text format: per worker, per
    /// slot, totals, the mode) and `GET /healthz` (200 while at least one
    /// worker is ready, else 503) over HTTP on `addr`; off by default.
    /// Port 0 picks a free port ([`Primary::metrics_addr`] tells which).
    ///
    /// The endpoint is part of the primary's event loop: non-blocking, one
    /// request per connection, at most 64 clients at once (more are closed
    /// at once), each closed after 5 s without a whole request. It has no
    /// authentication: bind it to loopback or a private network.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Binds (unless given a listener), binds the metrics endpoint if
    /// asked, checks the worker command, and prepares the event loop.
    /// Starts no process yet.
    ///
    /// # Errors
    /// [`PrimaryError::Config`] for zero workers, [`PrimaryError::Listen`]
    /// when binding fails, [`PrimaryError::Metrics`] when binding the
    /// metrics endpoint fails, [`PrimaryError::Command`] when the program
    /// is not found or not executable.
    pub fn build(mut self) -> Result<Primary, PrimaryError> {
        // The new primary of an upgrade serves what the old one hands it.
        let inherited = upgrade::take_inherited()
            .map_err(|e| PrimaryError::Config(e.to_string()))?
            .unwrap_or_default();
        if let Some(n) = inherited.workers.filter(|&n| n > 0) {
            self.workers = n;
        }
        let upgrading = inherited.parent.is_some();
        if let Some(l) = inherited.main {
            self.listener = Some(l);
        }
        if self.workers == 0 {
            return Err(PrimaryError::Config(
                "the number of workers must be at least 1".into(),
            ));
        }
        let command = match self.command {
            Some(c) => c,
            None => WorkerCommand::current_exe()?,
        };
        let identity = privileges::resolve(self.user.as_deref(), self.group.as_deref())?;
        let protocol = self.protocol.unwrap_or_else(|| Protocol::detect(&command));
        if protocol == Protocol::Node {
            if let Some(reason) = node::package_runner_problem(&command) {
                return Err(PrimaryError::Command {
                    program: command.program.to_string_lossy().into_owned(),
                    reason,
                });
            }
        }
        let reuseport = self.sched == Sched::ReusePort;
        if self.sticky.is_some() && self.sched.is_kernel() {
            return Err(PrimaryError::Config(format!(
                "--sticky needs a primary-side mode (rr, least-conn, p2c): in {} mode the workers accept",
                self.sched
            )));
        }
        if !(self.sticky_balance_factor.is_finite() && self.sticky_balance_factor > 0.0) {
            return Err(PrimaryError::Config(
                "--sticky-balance-factor must be a number above 0 (e.g. 0.25)".into(),
            ));
        }
        if self.steer != Steer::Off {
            if !reuseport {
                return Err(PrimaryError::Config(format!(
                    "--steer {} needs --sched reuseport (it steers the kernel's balancing)",
                    self.steer
                )));
            }
            if protocol == Protocol::Node {
                return Err(PrimaryError::Config(
                    "--steer is not available for Node apps yet: use --sched reuseport alone, or rr"
                        .into(),
                ));
            }
        }
        let listen = match (self.listen, protocol) {
            (Some(addr), _) => Some(addr),
            (None, Protocol::Native) => {
                Some(DEFAULT_LISTEN.parse().expect("valid default address"))
            }
            // Node apps say where they listen.
            (None, Protocol::Node) => None,
        };
        // A Node app's new primary of an upgrade binds nothing: its
        // servers (and --listen's, if unused) are handed over.
        let listen = listen.filter(|_| !(upgrading && protocol == Protocol::Node));
        let listener = match (self.listener, listen) {
            (Some(l), _) => {
                if reuseport && !socket2::SockRef::from(&l).reuse_port()? {
                    return Err(PrimaryError::Config(
                        "reuseport mode needs a listener with SO_REUSEPORT set".into(),
                    ));
                }
                Some(l)
            }
            (None, Some(addr)) => {
                let bound = match protocol {
                    Protocol::Native => server::bind(addr, self.backlog, reuseport),
                    // Listens once the app's first server is served there.
                    Protocol::Node => server::reserve(addr, reuseport).map(TcpListener::from),
                };
                Some(bound.map_err(|source| PrimaryError::Listen { addr, source })?)
            }
            (None, None) => None,
        };
        if let Some(listener) = &listener {
            // The primary accepts without waiting in rr; in the kernel modes
            // workers get the socket as socket activation would, blocking.
            // Not for a socket handed over by an upgrade: the flag is the
            // open file's, shared with the old primary and its workers, and
            // already what they use; in a kernel mode clearing it under a
            // worker that made it non-blocking would leave it blocked in
            // accept(2).
            if !upgrading {
                listener.set_nonblocking(!self.sched.is_kernel())?;
            }
        }
        // Steering is attached while the primary may still load BPF.
        let steering = match (self.steer, &listener, inherited.steer) {
            (Steer::RoundRobin, Some(_), Some(fds)) => Some(steer::Steering::adopt(fds)),
            (Steer::RoundRobin, Some(l), None) => Some(
                steer::Steering::attach(std::os::fd::AsFd::as_fd(l))
                    .map_err(|e| PrimaryError::Config(e.to_string()))?,
            ),
            _ => None,
        };
        // Every socket is bound before root is given up.
        let inherited_control = inherited.control;
        let control = match self.control.as_deref() {
            None => None,
            // `--control PATH`, the same as the old primary's: take its
            // socket over rather than bind a second one there.
            Some(path)
                if inherited_control
                    .as_ref()
                    .and_then(|l| l.local_addr().ok())
                    .is_some_and(|a| a.as_pathname() == Some(path)) =>
            {
                let l = inherited_control.expect("checked above");
                Some(control::Bound::adopt(l, path))
            }
            Some(path) => {
                Some(control::bind(path).map_err(|e| PrimaryError::Config(e.to_string()))?)
            }
        };
        let handover = control
            .as_ref()
            .map(control::Bound::handover)
            .transpose()
            .map_err(|e| PrimaryError::Config(format!("control socket: {e}")))?;
        let handed_over = handover
            .as_ref()
            .map(|h| std::sync::Arc::clone(&h.handed_over));
        if let (Some(c), Some(id)) = (&control, &identity) {
            c.chown(id.uid.as_raw(), id.gid.as_raw())
                .map_err(|e| PrimaryError::Config(format!("control socket: {e}")))?;
        }
        let metrics = match (inherited.metrics, self.metrics) {
            (Some(l), Some(addr)) => Some(
                metrics::MetricsServer::serve(l)
                    .map_err(|source| PrimaryError::Metrics { addr, source })?,
            ),
            (_, addr) => addr
                .map(|addr| {
                    metrics::MetricsServer::bind(addr)
                        .map_err(|source| PrimaryError::Metrics { addr, source })
                })
                .transpose()?,
        };
        if let Some(id) = &identity {
            privileges::drop_to(id)?;
            tracing::info!(
                "running as user {} (uid {}, gid {})",
                id.user,
                id.uid,
                id.gid
            );
        }
        check_program(&command)?;
        let settings = event_loop::Settings {
            workers: self.workers,
            command,
            shutdown_timeout: self.shutdown_timeout,
            hello_timeout: self.hello_timeout,
            worker_timeout: self.worker_timeout,
            max_unacked: self.max_unacked,
            defer_accept: self.defer_accept,
            backoff: self.backoff,
            handle_signals: self.handle_signals,
            sched: self.sched,
            steer: self.steer,
            backlog: self.backlog,
            prefix_output: self.prefix_output,
            ready: self.ready,
            protocol,
            weights: self.weights,
            limits: self.limits,
            dumpable: self.dumpable,
            max_restarts: self.max_restarts,
            program: upgrade::Program::own(),
            upgrade_timeout: self.upgrade_timeout,
            sticky: self.sticky.clone(),
            sticky_balance_factor: self.sticky_balance_factor,
        };
        let inner = event_loop::EventLoop::new(
            listener,
            metrics,
            settings,
            event_loop::Handed {
                steering,
                slots: inherited.slots,
                parent: inherited.parent,
                control: handover,
                node: inherited.node,
            },
        )?;
        let control = control.map(|c| {
            let flag = handed_over.clone().unwrap_or_default();
            c.serve(inner.handle(), self.upgrade_timeout, flag)
        });
        Ok(Primary {
            inner,
            _control: control,
        })
    }
}

/// Finds the program as `exec` would (a path, or a name on `PATH`) and
/// checks that it is an executable file, so that a typo is one clear error
/// at start rather than a restart loop. The reason says what is wrong: no
/// such file, a directory on the way this user may not search, a file this
/// user may not execute.
fn check_program(cmd: &WorkerCommand) -> Result<(), PrimaryError> {
    let program = Path::new(&cmd.program);
    let fail = |reason: String| PrimaryError::Command {
        program: program.display().to_string(),
        reason,
    };
    if cmd.program.is_empty() {
        return Err(fail("empty program name".into()));
    }
    let on_path = !program.as_os_str().as_encoded_bytes().contains(&b'/');
    let candidates: Vec<PathBuf> = if on_path {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .collect()
    } else {
        vec![program.to_path_buf()]
    };
    let user = || match nix::unistd::getuid().as_raw() {
        0 => "root".to_string(),
        uid => format!("uid {uid}"),
    };
    // The first reason other than "missing" found, if no candidate runs.
    let mut problem: Option<String> = None;
    for c in &candidates {
        let reason = match std::fs::metadata(c) {
            Ok(m) if m.is_file() => {
                match nix::unistd::access(c.as_path(), nix::unistd::AccessFlags::X_OK) {
                    Ok(()) => return Ok(()),
                    Err(_) => format!("{} is not executable by {}", c.display(), user()),
                }
            }
            Ok(_) => format!("{} is not a file", c.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => format!(
                "permission denied: {} cannot reach {} (a directory on the way is not searchable)",
                user(),
                c.display()
            ),
            Err(e) => format!("{}: {e}", c.display()),
        };
        problem.get_or_insert(reason);
    }
    Err(fail(match problem {
        Some(reason) => reason,
        None if on_path => "not found on PATH".into(),
        None => "no such file".into(),
    }))
}

/// A primary ready to run; see the module docs.
pub struct Primary {
    inner: event_loop::EventLoop,
    /// Served while the primary lives; its file goes with it.
    _control: Option<control::ControlServer>,
}

impl fmt::Debug for Primary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Primary")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// Settings with their defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The address the listener is bound to (the real port if 0 was asked).
    /// With Node workers and no [`Builder::listen`] address, the app binds
    /// once it runs: `0.0.0.0:0` here, and [`Stats::listeners`] later.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    /// The address the metrics endpoint is bound to, if
    /// [`Builder::metrics`] asked for one (the real port if 0 was asked).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.inner.metrics_addr()
    }

    /// A handle for commands from other threads.
    pub fn handle(&self) -> Handle {
        self.inner.handle()
    }

    /// A receiver of [`Event`]s. Events are dropped, never queued without
    /// bound, if the receiver falls more than 1024 behind.
    pub fn events(&mut self) -> Events {
        Events(self.inner.events())
    }

    /// Starts the workers and serves until a graceful shutdown completes.
    ///
    /// Workers are started from the calling thread and are killed
    /// (`PR_SET_PDEATHSIG`) when that thread ends; since `run` returns only
    /// after the workers are gone, any thread will do.
    ///
    /// # Errors
    /// Only for failures of the primary itself (its event loop); worker
    /// failures are logged, reported as events, and repaired.
    pub fn run(self) -> Result<(), PrimaryError> {
        let Primary { inner, _control } = self;
        let outcome = inner.run().map_err(PrimaryError::Io);
        drop(_control);
        outcome
    }
}
