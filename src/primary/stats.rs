//! The primary's figures as the embedding program reads them through
//! [`crate::Handle::stats`], and as the metrics endpoint (`--metrics`)
//! renders them: both read the same [`Stats`], taken by the event loop.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::sched::Sched;

/// Where a worker process is in its life, as [`WorkerStats::state`] and the
/// metrics endpoint's `state` label say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerState {
    /// Started, has not said hello yet: gets no connections.
    Starting,
    /// Said hello (or, in a kernel mode, was taken as ready) and is not
    /// stopping: gets connections.
    Ready,
    /// Asked to stop, retiring after a reload or scale-down, or cut off
    /// (hung, broke the protocol, closed its channel): gets no more.
    Stopping,
}

impl WorkerState {
    /// Every state, in the order the metrics endpoint lists them.
    pub const ALL: [WorkerState; 3] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Stopping,
    ];

    /// `starting`, `ready` or `stopping`.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a slot's worker was replaced by a new one while the slot kept
/// serving (as opposed to a restart after a crash, which
/// [`SlotStats::restarts`] counts): the metrics endpoint's `reason` label
/// of `distributor_worker_replacements_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Replacement {
    /// A rolling reload (SIGHUP, [`crate::Handle::reload`]).
    Reload,
    /// It took `--max-requests` connections ([`crate::Builder::max_requests`]).
    MaxRequests,
    /// Its process tree used more than `--max-memory`.
    MaxMemory,
    /// It had run for `--max-age`.
    MaxAge,
    /// It said it is leaving: the protocol's RECYCLE
    /// ([`crate::WorkerListener::recycle`]), `STOPPING=1` on its notify
    /// socket, or, for Node apps, `cluster.worker.disconnect()` or closing
    /// its last server.
    Announced,
    /// It exited by itself with status 0 after it had been ready (a worker
    /// that recycles itself by exiting): replaced at once, without backoff.
    Exited,
}

impl Replacement {
    /// Every reason, in the order the metrics endpoint lists them.
    pub const ALL: [Replacement; 6] = [
        Replacement::Reload,
        Replacement::MaxRequests,
        Replacement::MaxMemory,
        Replacement::MaxAge,
        Replacement::Announced,
        Replacement::Exited,
    ];

    /// `reload`, `max-requests`, `max-memory`, `max-age`, `announced` or
    /// `exited`.
    pub fn name(self) -> &'static str {
        match self {
            Replacement::Reload => "reload",
            Replacement::MaxRequests => "max-requests",
            Replacement::MaxMemory => "max-memory",
            Replacement::MaxAge => "max-age",
            Replacement::Announced => "announced",
            Replacement::Exited => "exited",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Replacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One worker's figures, from [`crate::Handle::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The worker's id (1, 2, ...: new at every start).
    pub id: u64,
    /// Its process id.
    pub pid: u32,
    /// The worker's slot, from 1.
    pub slot: usize,
    /// Said hello (or, in a kernel mode, was taken as ready); it may be
    /// stopping since.
    pub ready: bool,
    /// Asked to stop, or cut off.
    pub stopping: bool,
    /// Starting, ready or stopping: what the two above mean together.
    pub state: WorkerState,
    /// Connections it took: acknowledged (rr), or accepted by itself and
    /// reported (kernel modes; 0 for programs that do not report).
    pub connections: u64,
    /// Connections sent to it and not yet acknowledged (in flight; always
    /// 0 in the kernel modes, where the primary sends none).
    pub unacknowledged: usize,
    /// Connections it holds: unacknowledged, plus acknowledged and not yet
    /// finished once it reports completions; what `least-conn` weighs.
    pub in_flight: u64,
    /// Connections it reported finished (a running total); `None` for a
    /// worker that does not report completions, and in the kernel modes,
    /// where the primary asks workers for no reports
    /// (`DISTRIBUTOR_REPORT_FINISHED=0`).
    pub finished: Option<u64>,
    /// Its slot's weight (`--weights`).
    pub weight: u32,
    /// How long it has been running.
    pub uptime: Duration,
}

/// One worker slot's figures, from [`crate::Handle::stats`]. A slot is a
/// place for one worker (`--workers N` makes N); it outlives its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotStats {
    /// From 1, as [`WorkerStats::slot`].
    pub slot: usize,
    /// False after a scale-down removed it (until a scale-up reuses it).
    pub active: bool,
    /// How many times the slot's worker was replaced because it exited or
    /// was cut off unexpectedly (crashed, killed, hung, broke the
    /// protocol): counted when the replacement is decided, so a
    /// crash-looping slot counts every crash. Reloads and scaling do not
    /// count.
    pub restarts: u64,
    /// How the slot's last worker to exit ended (`status 0`, `signal 9
    /// (SIGKILL)`), if one has.
    pub last_exit: Option<String>,
}

/// With `--sticky`: how the primary placed connections since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StickyCounts {
    /// On the first slot of their key's ring.
    pub by_key: u64,
    /// On a later slot: the first was over the load bound (or could not
    /// take one).
    pub moved: u64,
    /// By the policy: it had no key (none in its first request, or not
    /// within the peek's time or size), or no slot on the ring could take
    /// it.
    pub fallback: u64,
}

/// The primary's figures, from [`crate::Handle::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// The mode in force (after any switch).
    pub sched: Sched,
    /// The kernel steering of reuseport (`--steer`); `Off` otherwise.
    pub steer: super::Steer,
    /// With `--sticky`: how connections were placed.
    pub sticky: Option<StickyCounts>,
    /// The address the primary was given (see `listeners` for Node apps).
    pub local_addr: SocketAddr,
    /// How long the primary has been running.
    pub uptime: Duration,
    /// Every worker process alive, by slot then id.
    pub workers: Vec<WorkerStats>,
    /// Every slot there has been, by slot.
    pub slots: Vec<SlotStats>,
    /// Connections taken by workers that have exited since the start.
    pub exited_connections: u64,
    /// Connections the primary accepted that no worker holds now (rr only:
    /// waiting for a worker with room, or handed back by one that died).
    pub connections_held: usize,
    /// The addresses the primary listens on for the workers: the one it
    /// was given, or with Node workers those their servers asked for.
    pub listeners: Vec<SocketAddr>,
    /// Replacements so far, by [`Replacement::index`]; see
    /// [`Stats::replacements`].
    pub(crate) replaced: [u64; Replacement::ALL.len()],
    /// Why no worker gets ready, when the primary can tell (a program that
    /// does not speak the protocol under `rr`): what `/healthz` says.
    pub problem: Option<String>,
}

impl Stats {
    /// Connections taken by workers since the start, those of workers that
    /// have exited included.
    pub fn connections_total(&self) -> u64 {
        self.exited_connections + self.workers.iter().map(|w| w.connections).sum::<u64>()
    }

    /// How many times since the start a slot's worker was replaced for
    /// `why` (counted when the new worker takes its slot over).
    pub fn replacements(&self, why: Replacement) -> u64 {
        self.replaced[why.index()]
    }

    /// How many workers are ready (get connections now).
    pub fn ready_workers(&self) -> usize {
        self.count(WorkerState::Ready)
    }

    /// How many workers alive are in `state`.
    pub fn count(&self, state: WorkerState) -> usize {
        self.workers.iter().filter(|w| w.state == state).count()
    }

    /// Slots that want a worker now (`--workers`, after scaling).
    pub fn active_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.active).count()
    }

    /// Empty figures (no worker, no slot), for a primary that has stopped.
    #[cfg(any(test, feature = "lab"))]
    pub(crate) fn empty(sched: Sched, local_addr: SocketAddr) -> Stats {
        Stats {
            sched,
            steer: super::Steer::Off,
            sticky: None,
            local_addr,
            uptime: Duration::ZERO,
            workers: Vec::new(),
            slots: Vec::new(),
            exited_connections: 0,
            connections_held: 0,
            listeners: Vec::new(),
            replaced: [0; Replacement::ALL.len()],
            problem: None,
        }
    }
}
