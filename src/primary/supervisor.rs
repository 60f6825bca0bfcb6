//! The supervisor half of the event loop: starting, reaping and replacing
//! workers, rolling reloads, recycling, scaling, hang detection, graceful
//! shutdown, and the timers that drive them.
//!
//! - **Exits.** SIGCHLD arrives through signal-hook's self-pipe; each worker
//!   is then reaped with `waitpid(pid, WNOHANG)` (never `waitpid(-1)`,
//!   which would steal an embedding program's children), and what is left
//!   of its process group is killed. A slot's current worker is replaced:
//!   with backoff if it failed (a signal, a non-zero status, or status 0
//!   before it was ever ready), at once if it exited with status 0 after
//!   serving (it recycled itself).
//! - **Replacement beside the old worker** (a *successor*): a rolling
//!   reload (SIGHUP, [`crate::Handle::reload`]), a worker past a limit
//!   (`--max-requests`, `--max-memory`, `--max-age`), and a worker that
//!   says it is leaving (RECYCLE, `STOPPING=1`, Node's
//!   `cluster.worker.disconnect()`) each start a new worker for the slot;
//!   once it is ready it becomes the slot's current worker and the old one
//!   is asked to stop. Reloads and limits go one slot at a time (the queue
//!   in [`super::event_loop::Reload`]); a worker that is leaving gets its
//!   successor at once. A successor that cannot start leaves the old
//!   worker serving while it is retried with backoff.
//! - **Hang detection** (`worker_timeout`): a ready worker is pinged; one
//!   that sends nothing (no acknowledgement, no heartbeat answer) for the
//!   timeout is stopped, and its unacknowledged connections go elsewhere.
//! - **Timers**: each worker's deadlines are one table (`timers.rs`), acted
//!   on in one order by [`EventLoop::on_timer`]; the poll timeout is the
//!   nearest deadline of all.
//!
//! Stopping a worker, by who decides:
//!
//! | function | when | what the worker gets | its slot |
//! |---|---|---|---|
//! | `retire` | the primary asks (reload, recycle, scale-down, shutdown) | STOP (Node: `disconnect`; a program that never said hello: SIGTERM), then SIGTERM and SIGKILL on timers | not replaced by this (a successor took over, or the slot is gone) |
//! | `on_leaving` | the worker says it leaves (RECYCLE, `STOPPING=1`, Node's disconnect) | nothing more (after RECYCLE it keeps serving until its successor is ready) | its successor starts at once |
//! | `cut_off` | it broke the protocol, hung, or its channel closed while it held connections | its channel closed, its connections handed on, SIGTERM (SIGKILL at once if copies of handed-on connections wait in its channel) | replaced through `slot_lost_worker` |
//! | `on_exit` | it was reaped | nothing: its last messages are read, what it held is handed on | replaced through `slot_lost_worker` |
//!
//! `disconnect` and `close_channel` (acceptor.rs) are the mechanism under
//! `cut_off` and `on_exit`, not decisions. `slot_lost_worker` is the one
//! path by which a slot's current worker is replaced, and the only place a
//! restart is counted (an unexpected loss); a successor that fails is
//! retried beside the slot's current worker instead.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use std::os::fd::{AsFd, AsRawFd};
use tracing::{debug, error, info, warn};

use super::api::{Event, LAST_WORKER, Ready, Reply};
use super::event_loop::{EventLoop, Queued, Slot, Step};
use super::ids::{ServerIdx, SlotIdx, WorkerIdx};
use super::node::{self, wire};
use super::process::{Link, Phase, Protocol, Role, WorkerProc, describe_exit};
use super::stats::Replacement;
use super::timers::{Timer, ping_interval};

use crate::activation::Notice;

/// Why a command waited for has no outcome: the primary is stopping.
const STOPPING: &str = "the primary is stopping";

/// The longest wait before SIGKILL for a worker stopped because it hung or
/// broke the protocol.
const BROKEN_WORKER_GRACE: Duration = Duration::from_secs(5);

/// In a kernel mode, a program that has not said hello this long after it
/// started, and still runs, is taken as ready: it accepts on its socket by
/// itself, and one that does not speak the protocol never says hello.
/// Connections that come before it accepts wait in the socket's backlog.
pub(crate) const SILENT_READY_GRACE: Duration = Duration::from_millis(500);

/// How long a worker that closed its channel may take to exit before it
/// is taken for broken and cut off.
const CLOSED_CHANNEL_GRACE: Duration = Duration::from_millis(500);

/// How long after its HELLO a worker in a kernel mode has to send its
/// first STATS, which says it accepts on fd 3 itself.
const STATS_DUE: Duration = Duration::from_secs(1);

/// How often the workers' memory is measured (`--max-memory`).
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How a slot lost its current worker.
#[derive(Debug, Clone, Copy)]
enum Lost {
    /// It exited or was cut off unexpectedly, after running `uptime`;
    /// `served`: it had been ready and taken connections, so it is no
    /// crash loop and is replaced at once.
    Failed { uptime: Duration, served: bool },
    /// It said it was leaving, and left.
    Left,
    /// It exited with status 0 after it had been ready.
    Exited,
}

/// Whether a worker's other timers are looked at this turn, after one
/// fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Next,
    /// It became ready, was stopped, or is gone: the rest waits.
    Done,
}

impl EventLoop {
    /// Spawns a worker for `slot` in `role`, registers its channel, and
    /// makes it the slot's current worker or successor.
    pub(super) fn start_worker(&mut self, slot: SlotIdx, role: Role) -> std::io::Result<WorkerIdx> {
        let id = self.sup.next_worker_id;
        self.sup.next_worker_id += 1;
        let now = self.now;
        let ms = |d: Duration| d.as_millis().to_string();
        let mut command = self
            .settings
            .command
            .clone()
            .env("NOTIFY_SOCKET", self.io.notify.env_value())
            .env(
                crate::protocol::ENV_WORKER_TIMEOUT,
                ms(self.settings.worker_timeout.unwrap_or_default()),
            )
            .env(
                crate::protocol::ENV_SHUTDOWN_TIMEOUT,
                ms(self.settings.shutdown_timeout),
            );
        let speaks = self.settings.protocol;
        if let Some(with_port) = node::inspect_port(&command, self.sup.inspect_offset + 1) {
            self.sup.inspect_offset += 1;
            command = with_port;
        }
        // Native workers inherit the one server's socket in the kernel
        // modes; Node workers ask for theirs.
        if speaks == Protocol::Native {
            self.ensure_slot_listener(ServerIdx(0), slot)?;
        }
        let listen = match speaks {
            Protocol::Native => self.slot_listener(ServerIdx(0), slot).map(|l| l.as_fd()),
            Protocol::Node => None,
        };
        let mut w = WorkerProc::spawn(
            &command,
            speaks,
            id,
            slot,
            role,
            listen,
            self.sup.output.as_ref(),
            now,
        )?;
        if let Some(g) = self.sup.guardian.as_mut() {
            g.watch(w.pid);
        }
        if speaks == Protocol::Native {
            w.servers = 1;
        }
        let i = self
            .sup
            .free
            .pop()
            .unwrap_or_else(|| self.workers.push(None));
        let channel = w.channel.as_ref().expect("a new worker has a channel");
        if let Err(e) =
            Self::register_channel(self.channel_registry(), channel.as_fd().as_raw_fd(), i)
        {
            self.sup.free.push(i);
            w.signal(Signal::SIGKILL);
            return Err(e);
        }
        w.timers
            .set(Timer::HelloWarn, now + self.settings.hello_timeout);
        w.timers.set_opt(
            Timer::Ready,
            match self.settings.ready {
                // On the next turn, once the caller has done its bookkeeping.
                Ready::Start => Some(now),
                Ready::Hello if self.settings.sched.is_kernel() && speaks == Protocol::Native => {
                    Some(now + SILENT_READY_GRACE)
                }
                _ => None,
            },
        );
        if role == Role::Successor {
            w.timers.set(Timer::GiveUp, now + self.candidate_timeout());
        }
        let limits = self.settings.limits;
        w.max_requests = limits
            .max_requests
            .map(|n| n.saturating_add(fastrand::u64(0..=limits.max_requests_jitter)));
        w.timers
            .set_opt(Timer::Recycle, limits.max_age.map(|age| now + age));
        info!(
            worker = id,
            pid = w.pid,
            "worker {id} started (pid {})",
            w.pid
        );
        self.emit(Event::WorkerStarted { id, pid: w.pid });
        self.workers[i] = Some(w);
        self.ledger.open(i);
        match role {
            Role::Current => self.sup.slots[slot].current = Some(i),
            Role::Successor => self.sup.slots[slot].successor = Some(i),
            Role::Retiring => {}
        }
        Ok(i)
    }

    /// Cuts off a live worker that is of no more use (it closed its
    /// channel, broke the protocol, hung, or its channel failed): its
    /// connections go to other workers, it gets SIGTERM and then SIGKILL,
    /// and its slot gets a new worker now (with backoff if it died young)
    /// rather than when it finally exits.
    pub(super) fn cut_off(&mut self, i: WorkerIdx) {
        self.cut_off_because(i, false);
    }

    /// [`EventLoop::cut_off`]; `gone` when the worker closed its channel,
    /// which is most often its exit seen before its SIGCHLD (a `kill -9`):
    /// one that was ready and served is then replaced at once, as its exit
    /// would have been, not with backoff.
    fn cut_off_because(&mut self, i: WorkerIdx, gone: bool) {
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        let served = gone && w.served && self.ledger.taken(i) > 0;
        let replace = !w.is_stopping() && w.role == Role::Current && self.sup.shutdown_at.is_none();
        let (slot, uptime) = (w.slot, self.now.saturating_duration_since(w.started));
        if replace {
            w.role = Role::Retiring;
        }
        let grace = self.settings.shutdown_timeout.min(BROKEN_WORKER_GRACE);
        // Its unacknowledged connections go to other workers, but copies
        // still wait in its end of the channel: it must not live to read
        // them, or a connection could be served twice.
        let handed_over = self.ledger.unacknowledged(i) > 0 && !w.exited;
        self.disconnect(i, grace);
        // (One that has exited meanwhile, not reaped yet, holds none.)
        let alive = |w: &mut WorkerProc| !w.has_exited();
        if handed_over && self.workers[i].as_mut().is_some_and(alive) {
            if let Some(w) = self.workers[i].as_ref() {
                warn!(
                    worker = w.id,
                    "worker {} (pid {}) still has copies of the connections given to other workers: SIGKILL, so that none is served twice",
                    w.id,
                    w.pid
                );
                w.signal(Signal::SIGKILL);
            }
        }
        if replace && self.sup.slots[slot].current == Some(i) {
            // Cut off (hung, broke the protocol): backoff, whatever it did.
            self.slot_lost_worker(slot, Lost::Failed { uptime, served });
        }
    }

    /// Worker `i`'s channel reached its end: most likely the worker is
    /// exiting, and its exit says what that means (a status 0 after
    /// serving is no failure). If it has exited already, that is handled
    /// now. Otherwise the channel is closed, and a worker that speaks the
    /// protocol gets no more connections and is cut off if it still runs
    /// after [`CLOSED_CHANNEL_GRACE`]; one that never spoke it (a program
    /// that closes the fds it does not know) is left alone. A worker that
    /// held unacknowledged connections is cut off at once: they go to
    /// other workers, and it must not live to serve copies of them.
    pub(super) fn on_channel_closed(&mut self, i: WorkerIdx) {
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        if w.exited {
            // Its exit is being handled: this is the channel's last read.
            self.close_channel(i);
            return;
        }
        if let Ok(Some(status)) = w.try_wait() {
            self.on_exit(i, status);
            return;
        }
        let holds = self.ledger.outstanding(i) > 0;
        if holds || w.is_stopping() {
            if !w.is_stopping() {
                warn!(
                    worker = w.id,
                    "worker {} (pid {}) closed its channel", w.id, w.pid
                );
            }
            self.cut_off_because(i, true);
            return;
        }
        if w.spoke {
            w.unready();
            w.timers.clear(Timer::Ping);
            w.timers.set(Timer::CutOff, self.now + CLOSED_CHANNEL_GRACE);
        } else {
            debug!(
                worker = w.id,
                "worker {} (pid {}) closed its channel, which it never used", w.id, w.pid
            );
        }
        self.close_channel(i);
    }

    /// Slot `slot`'s current worker is gone (exited, or cut off): the
    /// successor starting beside it, if any, takes its place now; else a
    /// new worker is started, at once or, after a failure, with backoff.
    fn slot_lost_worker(&mut self, slot: SlotIdx, how: Lost) {
        let s = &mut self.sup.slots[slot];
        s.current = None;
        if !s.active || self.sup.shutdown_at.is_some() {
            return;
        }
        if matches!(how, Lost::Failed { .. }) {
            s.restarts += 1;
        }
        if let Some(n) = s.successor.take() {
            s.current = Some(n);
            if let Some(w) = self.workers[n].as_mut() {
                w.role = Role::Current;
                w.timers.clear(Timer::GiveUp);
            }
            self.count_replacement(slot);
            return;
        }
        match how {
            Lost::Failed { served: true, .. } => {
                // It became ready and served: not a crash loop.
                self.sup.slots[slot].quick_exits = 0;
                self.restart_slot(slot);
            }
            Lost::Failed { uptime, .. } => self.schedule_restart(slot, uptime),
            Lost::Left => {
                if self.sup.slots[slot].restart_at.is_none() {
                    self.restart_slot(slot);
                }
            }
            Lost::Exited => {
                self.sup.slots[slot].quick_exits = 0;
                self.sup.slots[slot].replacing = Some(Replacement::Exited);
                self.count_replacement(slot);
                self.restart_slot(slot);
            }
        }
    }

    /// The slot's worker was replaced: counted by why.
    fn count_replacement(&mut self, slot: SlotIdx) {
        if let Some(why) = self.sup.slots[slot].replacing.take() {
            self.sup.replaced[why.index()] += 1;
        }
    }

    /// Starts `slot`'s worker again (its current worker if it has none,
    /// else a successor that failed before), or schedules another try.
    fn restart_slot(&mut self, slot: SlotIdx) {
        self.sup.slots[slot].restart_at = None;
        if !self.sup.slots[slot].active || self.sup.shutdown_at.is_some() {
            return;
        }
        let role = match (self.sup.slots[slot].current, self.sup.slots[slot].successor) {
            (None, _) => Role::Current,
            (Some(_), None) => Role::Successor,
            (Some(_), Some(_)) => return,
        };
        if let Err(e) = self.start_worker(slot, role) {
            error!("cannot start a worker: {e}");
            self.schedule_restart(slot, Duration::ZERO);
        }
    }

    pub(super) fn schedule_restart(&mut self, slot: SlotIdx, uptime: Duration) {
        let backoff = self.settings.backoff;
        let s = &mut self.sup.slots[slot];
        let (delay, quick) = backoff.next(uptime, s.quick_exits);
        s.quick_exits = quick;
        if let Some(max) = self.settings.max_restarts.filter(|&max| quick >= max) {
            self.stop_for(format!(
                "worker slot {} failed {quick} times in a row, each within {:?} of its start (--max-restarts {max})",
                slot.number(),
                backoff.reset_after
            ));
            return;
        }
        if quick >= 3 {
            warn!(
                "worker slot {} is crash-looping: {quick} exits in a row within {:?} of starting; next start in {delay:.1?} (backoff caps at {:?})",
                slot.number(),
                backoff.reset_after,
                backoff.max
            );
        } else if !delay.is_zero() {
            info!("restarting worker slot {} in {delay:.1?}", slot.number());
        }
        if delay.is_zero() {
            self.restart_slot(slot);
        } else {
            self.sup.slots[slot].restart_at = Some(self.now + delay);
        }
    }

    /// Reaps every worker that has exited and decides what its exit means.
    pub(super) fn reap(&mut self) {
        for i in self.workers.indices() {
            let Some(w) = self.worker_mut(i) else {
                continue;
            };
            match w.try_wait() {
                Ok(Some(status)) => self.on_exit(i, status),
                Ok(None) => {}
                Err(e) => warn!(worker = w.id, "waitpid on worker {}: {e}", w.id),
            }
        }
    }

    fn on_exit(&mut self, i: WorkerIdx, status: ExitStatus) {
        // Its last messages (acknowledgements, a final STATS) may still wait
        // in the channel: read them all, or an acknowledged connection
        // would be handed to another worker and served twice.
        if let Some(w) = self.workers[i].as_mut() {
            w.exited = true;
        }
        while self.read_channel(i) {}
        let w = self.workers[i].as_mut().expect("exited worker exists");
        let expected = w.asked_to_stop || self.sup.shutdown_at.is_some();
        let recycled = !expected && status.success() && w.served;
        // It is gone: no signal for it, only its connections to hand over.
        w.stop();
        self.disconnect(i, Duration::ZERO);
        let w = self.workers[i].take().expect("exited worker exists");
        let (taken, _) = self.ledger.close(i);
        self.sup.free.push(i);
        // Nothing it started outlives it.
        if w.kill_leftovers() {
            debug!(
                worker = w.id,
                "killed what worker {} left in its process group", w.id
            );
        }
        if let Some(g) = self.sup.guardian.as_mut() {
            g.forget(w.pid);
        }
        self.sup.exited_connections += taken;
        self.tell_if_gone(w.slot);
        let uptime = self.now.saturating_duration_since(w.started);
        let how = describe_exit(&status);
        if let Some(slot) = self.sup.slots.get_mut(w.slot) {
            slot.last_exit = Some(how.clone());
        }
        let text = format!(
            "worker {} (pid {}) exited with {how} after {uptime:.1?}, having taken {}",
            w.id,
            w.pid,
            crate::logging::count(taken as usize, "connection")
        );
        if expected {
            info!(worker = w.id, pid = w.pid, "{text}");
        } else if recycled {
            info!(
                worker = w.id,
                pid = w.pid,
                "{text}: it left by itself, so it is replaced at once"
            );
        } else if status.success() {
            warn!(
                worker = w.id,
                pid = w.pid,
                "{text}, before it was ever ready"
            );
        } else {
            warn!(worker = w.id, pid = w.pid, "{text}");
        }
        self.emit(Event::WorkerExited {
            id: w.id,
            pid: w.pid,
            status,
        });
        if self.sup.shutdown_at.is_some() {
            return;
        }
        if !expected && !w.node && !w.spoke && !self.settings.sched.is_kernel() {
            self.no_hello(w.id, w.pid, &format!("exited ({how}) before it said hello"));
        }
        match w.role {
            Role::Current if self.sup.slots[w.slot].current == Some(i) => {
                let how = if w.asked_to_stop {
                    Lost::Left
                } else if recycled {
                    Lost::Exited
                } else {
                    let served = w.served && taken > 0;
                    Lost::Failed { uptime, served }
                };
                self.slot_lost_worker(w.slot, how);
            }
            Role::Successor => {
                let slot = w.slot;
                self.sup.slots[slot].successor = None;
                let s = &mut self.sup.slots[slot];
                let (delay, quick) = self.settings.backoff.next(uptime, s.quick_exits);
                s.quick_exits = quick;
                warn!(
                    "the new worker for slot {} exited before it was ready; the old one keeps serving; retrying in {delay:.1?}",
                    slot.number()
                );
                self.sup.slots[slot].restart_at = Some(self.now + delay);
            }
            Role::Current | Role::Retiring => {}
        }
    }

    /// A worker said hello: it gets connections from now on. A reload's
    /// candidate takes over its slot, and the slot's old worker retires.
    /// `spoke`: it said hello; else, in a kernel mode, it is taken as ready
    /// without (and is not pinged, since it may not speak the protocol).
    pub(super) fn on_hello(&mut self, i: WorkerIdx, spoke: bool) {
        let w = self.workers[i].as_mut().expect("hello from a live worker");
        if spoke {
            // It speaks the protocol: it answers pings from now on, and in a
            // kernel mode says at once that it accepts on fd 3 (STATS).
            w.spoke = true;
            if self.settings.sched.is_kernel() {
                w.timers.set(Timer::StatsDue, self.now + STATS_DUE);
            }
            w.timers.set_opt(
                Timer::Ping,
                self.settings
                    .worker_timeout
                    .map(|t| self.now + ping_interval(t)),
            );
            if self.settings.ready != Ready::Hello || w.is_ready() {
                return;
            }
        }
        self.become_ready(i);
    }

    /// A READY=1 or WATCHDOG=1 (or other notice) on the workers' notify
    /// socket, from the worker with this pid.
    pub(super) fn on_notice(&mut self, pid: u32, notice: Notice) {
        let Some(i) = self
            .workers
            .iter_enumerated()
            .find(|(_, w)| w.as_ref().is_some_and(|w| w.pid == pid))
            .map(|(i, _)| i)
        else {
            return;
        };
        let now = self.now;
        let timeout = self.settings.worker_timeout;
        let kernel = self.settings.sched.is_kernel();
        let w = self.workers[i].as_mut().expect("found above");
        match notice {
            Notice::Ready => {
                // With --ready hello in a kernel mode, READY=1 is as good
                // as a hello from a program that does not speak the
                // protocol.
                let counts = match self.settings.ready {
                    Ready::Notify => true,
                    Ready::Hello => kernel && !w.node && !w.spoke,
                    Ready::Start => false,
                };
                if counts && w.phase == Phase::Starting {
                    self.become_ready(i);
                }
            }
            Notice::Watchdog => {
                // WATCHDOG=1 keeps it alive for hang detection, like systemd's
                // WatchdogSec; once sent, silence counts.
                w.last_seen = now;
                if !w.timers.is_set(Timer::Ping) && w.is_ready() {
                    w.timers
                        .set_opt(Timer::Ping, timeout.map(|t| now + ping_interval(t)));
                }
            }
            Notice::Stopping => {
                w.unready();
                self.on_leaving(i, "says it is stopping (STOPPING=1)", false);
            }
            Notice::Status(s) => {
                debug!(worker = w.id, "worker {} status: {s}", w.id);
                w.status = Some(s);
            }
            Notice::Reloading => {}
        }
    }

    /// Worker `i` said it is leaving (`what` it did): its exit is expected,
    /// not a failure, and its successor starts at once, without backoff.
    /// One still `serving` keeps getting connections until the successor
    /// is ready, and is then asked to stop; one that is not gets none from
    /// now on, SIGTERM if it still runs at half the shutdown timeout, and
    /// SIGKILL at the timeout.
    pub(super) fn on_leaving(&mut self, i: WorkerIdx, what: &str, serving: bool) {
        let (now, timeout) = (self.now, self.settings.shutdown_timeout);
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        if !serving && w.stop() {
            w.timers.set(Timer::Term, now + timeout / 2);
            w.timers.set(Timer::Kill, now + timeout);
        }
        if w.recycling || w.role != Role::Current || self.sup.shutdown_at.is_some() {
            return;
        }
        w.recycling = true;
        w.asked_to_stop = true;
        info!(
            worker = w.id,
            "worker {} (pid {}) {what}: starting its successor now", w.id, w.pid
        );
        let slot = w.slot;
        self.replace_now(slot, Replacement::Announced);
    }

    /// Starts a successor for `slot` now, out of turn (a worker said it is
    /// leaving); a queued replacement of that slot is dropped, since this
    /// one starts the program anew too.
    fn replace_now(&mut self, slot: SlotIdx, why: Replacement) {
        self.sup.reload.queue.retain(|q| q.slot != slot);
        if self.sup.slots[slot].successor.is_some() || self.sup.slots[slot].restart_at.is_some() {
            return;
        }
        self.sup.slots[slot].replacing = Some(why);
        if let Err(e) = self.start_worker(slot, Role::Successor) {
            error!("cannot start a worker: {e}");
            self.schedule_restart(slot, Duration::ZERO);
        }
    }

    /// Queues worker `i`'s replacement for `why` (`detail` says why in the
    /// log): one slot at a time, its successor first, as a reload does.
    fn recycle(&mut self, i: WorkerIdx, why: Replacement, detail: &str) {
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        if w.recycling
            || w.is_stopping()
            || w.role != Role::Current
            || self.sup.shutdown_at.is_some()
        {
            return;
        }
        w.recycling = true;
        w.timers.clear(Timer::Recycle);
        info!(
            worker = w.id,
            reason = why.name(),
            "worker {} (pid {}) {detail}: recycling it (a new worker first)",
            w.id,
            w.pid
        );
        let (slot, id) = (w.slot, w.id);
        self.sup.reload.queue.push_back(Queued {
            slot,
            why,
            worker: Some(id),
        });
        self.advance_reload();
    }

    /// Recycles worker `i` if it has taken its `--max-requests`.
    pub(super) fn check_max_requests(&mut self, i: WorkerIdx) {
        let Some(w) = self.workers[i].as_ref() else {
            return;
        };
        let taken = self.ledger.taken(i);
        if let Some(max) = w.max_requests.filter(|&max| taken >= max) {
            let detail = format!("has taken {taken} connections (--max-requests {max})");
            self.recycle(i, Replacement::MaxRequests, &detail);
        }
    }

    /// Recycles every worker whose process tree uses more than
    /// `--max-memory`.
    fn check_memory(&mut self, limit: u64) {
        for i in self.workers.indices() {
            let Some(w) = self.workers[i].as_ref() else {
                continue;
            };
            if w.role != Role::Current || !w.is_ready() || w.recycling {
                continue;
            }
            let Ok(rss) = super::process::tree_rss(w.pid) else {
                continue;
            };
            if rss > limit {
                let detail = format!(
                    "uses {} (the RSS of its process tree; --max-memory {})",
                    mebibytes(rss),
                    mebibytes(limit)
                );
                self.recycle(i, Replacement::MaxMemory, &detail);
            }
        }
    }

    /// The worker may get connections from now on (it said hello, sent
    /// READY=1, or was started, per the readiness setting). A successor
    /// takes over its slot, and the slot's old worker retires.
    fn become_ready(&mut self, i: WorkerIdx) {
        self.sup.problem = None;
        let w = self.workers[i].as_mut().expect("a live worker");
        w.phase = Phase::Ready;
        w.served = true;
        w.timers.clear(Timer::HelloWarn);
        w.timers.clear(Timer::GiveUp);
        w.timers.clear(Timer::Ready);
        let (id, pid, slot, role) = (w.id, w.pid, w.slot, w.role);
        if role == Role::Successor {
            w.role = Role::Current;
            let s = &mut self.sup.slots[slot];
            s.successor = None;
            s.restart_at = None;
            let old = s.current.replace(i);
            let why = s.replacing;
            self.count_replacement(slot);
            if let Some(old) = old {
                if let Some(o) = self.workers[old].as_ref() {
                    info!(
                        worker = id,
                        "worker {id} (pid {pid}) takes over slot {} from worker {} ({})",
                        slot.number(),
                        o.id,
                        why.map_or("replaced", Replacement::name)
                    );
                }
                self.retire(old);
            }
        }
        let (ready, total) = self.slots_ready();
        // Steered before it is said: a client that waits for the line
        // finds the kernel placing by the new schedule.
        self.refresh_steering();
        info!(
            worker = id,
            pid, "worker {id} (pid {pid}) ready: {ready} of {total} slots ready"
        );
        // The new primary of an upgrade is not the service's main process
        // until the old one releases it: it says READY=1 then.
        let main = self.sup.parent.as_ref().is_none_or(|p| p.released);
        if ready == total && !self.sup.told_systemd_ready && main {
            self.sup.told_systemd_ready = true;
            tell_systemd(&format!("READY=1\nSTATUS={total} workers ready"));
        }
        if ready == total {
            self.tell_parent_ready();
        }
        self.emit(Event::WorkerReady { id, pid });
        if self.sup.slots[slot].current == Some(i) {
            for tx in self.sup.slots[slot].ready_waiters.drain(..) {
                let _ = tx.try_send(Ok(id));
            }
        }
        let step_done = self.sup.reload.step.is_some_and(|step| {
            step.slot == slot && id >= step.first_id && self.sup.slots[slot].current == Some(i)
        });
        if step_done {
            self.sup.reload.step = None;
            self.advance_reload();
        }
    }

    /// Asks worker `i` to finish and exit; it is not replaced. A worker
    /// that speaks the protocol gets STOP (a Node worker Node's
    /// `disconnect`), and SIGTERM at half the shutdown timeout if it still
    /// runs; any other gets SIGTERM at once (its own graceful stop). All
    /// get SIGKILL at the timeout.
    fn retire(&mut self, i: WorkerIdx) {
        let timeout = self.settings.shutdown_timeout;
        let now = self.now;
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        w.role = Role::Retiring;
        w.timers.clear(Timer::HelloWarn);
        w.timers.clear(Timer::Ready);
        w.timers.clear(Timer::Recycle);
        w.timers.clear(Timer::Ping);
        w.asked_to_stop = true;
        if !w.stop() {
            return;
        }
        let seq = self.next_seq();
        let w = self.workers[i].as_mut().expect("checked above");
        let (spoke, was_ready) = (w.spoke, w.was_ready());
        let asked = match w.channel.as_mut() {
            Some(Link::Native(c)) if spoke => {
                c.send(self.writer.enc.stop().as_bytes(), &[], true).is_ok()
            }
            Some(Link::Node(l)) if was_ready => {
                // Node closes its servers, lets their connections
                // finish, closes the channel and exits.
                self.writer.line.clear();
                wire::disconnect(&mut self.writer.line, seq);
                l.send(&self.writer.line, None).is_ok()
            }
            _ => false,
        };
        if !asked {
            w.signal(Signal::SIGTERM);
        }
        w.timers
            .set_opt(Timer::Term, asked.then(|| now + timeout / 2));
        w.timers.set(Timer::Kill, now + timeout);
    }

    pub(super) fn begin_shutdown(&mut self) {
        // After an upgrade the service goes on, in the new primary.
        if self.sup.shutdown_at.is_none() && self.sup.upgraded_to.is_none() {
            tell_systemd("STOPPING=1\nSTATUS=stopping");
        }
        if self.sup.upgrade.is_some() && self.sup.shutdown_at.is_none() {
            self.abandon_upgrade("this primary is stopping".into());
        }
        if self.sup.shutdown_at.is_some() {
            warn!("second stop request: killing the workers now");
            for w in self.workers.iter().flatten() {
                w.signal(Signal::SIGKILL);
            }
            return;
        }
        let timeout = self.settings.shutdown_timeout;
        let alive = self.workers.iter().flatten().count();
        info!(
            "shutting down: stopping {} (timeout {timeout:?})",
            crate::logging::count(alive, "worker")
        );
        // Connections already accepted go to workers before they are asked
        // to stop; the backlog is refused with the listener's close.
        self.close_listeners();
        self.sup.shutdown_at = Some(self.now + timeout);
        // Who waits for a reload or a new worker waits in vain now.
        for tx in std::mem::take(&mut self.sup.reload).waiters {
            let _ = tx.try_send(Err(STOPPING.into()));
        }
        for s in &mut self.sup.slots {
            for tx in s.ready_waiters.drain(..) {
                let _ = tx.try_send(Err(STOPPING.into()));
            }
        }
        self.sup.memory_check_at = None;
        for slot in &mut self.sup.slots {
            slot.restart_at = None;
        }
        for i in self.workers.indices() {
            self.retire(i);
        }
    }

    /// (Slots whose current worker is ready, slots that want a worker.)
    pub(super) fn slots_ready(&self) -> (usize, usize) {
        let ready = self
            .workers
            .iter()
            .flatten()
            .filter(|w| w.is_ready() && w.role == Role::Current)
            .count();
        (ready, self.sup.slots.iter().filter(|s| s.active).count())
    }

    /// The slots that want a worker now, in order.
    pub(super) fn active_slots(&self) -> Vec<SlotIdx> {
        self.sup
            .slots
            .indices()
            .filter(|&s| self.sup.slots[s].active)
            .collect()
    }

    /// A rolling reload: every slot's worker is replaced, one slot at a
    /// time, each by a new worker that is ready before the old one is
    /// asked to stop. One asked for during a reload starts over.
    pub(super) fn begin_reload(&mut self) {
        if self.sup.shutdown_at.is_some() {
            return;
        }
        let slots = self.active_slots();
        if self.sup.reload.reloading {
            info!("reloading: a reload was under way; starting over");
        }
        info!(
            "reloading: replacing {} one at a time",
            crate::logging::count(slots.len(), "worker")
        );
        tell_systemd(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            monotonic_usec()
        ));
        // Every slot gets a worker started from now on: a new worker not
        // ready yet (of an earlier reload, a recycle, or a worker that is
        // leaving) is stopped; it may be stuck on what was just fixed.
        for &s in &slots {
            if self.sup.slots[s].current.is_none() {
                continue;
            }
            if let Some(c) = self.sup.slots[s].successor.take() {
                self.retire(c);
            }
            self.sup.slots[s].restart_at = None;
        }
        self.sup.reload.step = None;
        self.sup.reload.reloading = true;
        self.sup.reload.queue = slots
            .into_iter()
            .map(|slot| Queued {
                slot,
                why: Replacement::Reload,
                worker: None,
            })
            .collect();
        self.advance_reload();
    }

    /// Starts the next queued replacement, unless one is under way.
    fn advance_reload(&mut self) {
        if self.sup.shutdown_at.is_some() || self.sup.reload.step.is_some() {
            return;
        }
        while let Some(q) = self.sup.reload.queue.pop_front() {
            let s = &self.sup.slots[q.slot];
            let Some(current) = s.current.filter(|_| s.active && s.successor.is_none()) else {
                // Gone, or its next worker is new anyway.
                continue;
            };
            let current_id = self.workers[current].as_ref().map(|w| w.id);
            if q.worker.is_some_and(|id| Some(id) != current_id) {
                continue;
            }
            self.sup.reload.step = Some(Step {
                slot: q.slot,
                first_id: self.sup.next_worker_id,
            });
            self.sup.slots[q.slot].replacing = Some(q.why);
            if let Err(e) = self.start_worker(q.slot, Role::Successor) {
                error!("cannot start a worker: {e}; retrying");
                self.sup.slots[q.slot].restart_at = Some(self.now + self.settings.backoff.max);
            }
            return;
        }
        if self.sup.reload.reloading {
            self.sup.reload.reloading = false;
            for tx in self.sup.reload.waiters.drain(..) {
                let _ = tx.try_send(Ok(()));
            }
            info!("reload complete");
            tell_systemd("READY=1\nSTATUS=reload complete");
        }
    }

    /// Adds a slot and starts its worker (SIGTTIN).
    /// Adds a slot and starts its worker (SIGTTIN); `reply` is told the
    /// worker's id once it is ready.
    pub(super) fn add_worker(&mut self, reply: Reply<u64>) {
        if self.sup.shutdown_at.is_some() {
            if let Some(tx) = reply {
                let _ = tx.try_send(Err(STOPPING.into()));
            }
            return;
        }
        let free = self
            .sup
            .slots
            .iter_enumerated()
            .find(|(_, s)| !s.active && s.current.is_none() && s.successor.is_none())
            .map(|(s, _)| s);
        let slot = match free {
            Some(s) => s,
            None => self.sup.slots.push(Slot::default()),
        };
        self.sup.slots[slot] = Slot {
            active: true,
            restarts: self.sup.slots[slot].restarts,
            ready_waiters: reply.into_iter().collect(),
            ..Slot::default()
        };
        let total = self.sup.slots.iter().filter(|s| s.active).count();
        info!(
            "adding a worker: {}",
            crate::logging::count(total, "worker")
        );
        self.restart_slot(slot);
    }

    /// Retires the last slot's worker gracefully (SIGTTOU); keeps one.
    /// `reply` is told once the slot's workers are gone.
    pub(super) fn remove_worker(&mut self, reply: Reply<()>) {
        let refuse = |why: &str, reply: Reply<()>| {
            if let Some(tx) = reply {
                let _ = tx.try_send(Err(why.into()));
            }
        };
        if self.sup.shutdown_at.is_some() {
            return refuse(STOPPING, reply);
        }
        let active: Vec<SlotIdx> = self
            .sup
            .slots
            .indices()
            .filter(|&s| self.sup.slots[s].active)
            .collect();
        let Some(&slot) = active.last().filter(|_| active.len() > 1) else {
            warn!("{LAST_WORKER}");
            return refuse(LAST_WORKER, reply);
        };
        info!(
            "removing a worker: {}",
            crate::logging::count(active.len() - 1, "worker")
        );
        self.drop_slot_listener(slot);
        let s = &mut self.sup.slots[slot];
        s.active = false;
        s.restart_at = None;
        s.replacing = None;
        s.gone_waiters.extend(reply);
        let workers = [s.current.take(), s.successor.take()];
        for i in workers.into_iter().flatten() {
            self.retire(i);
        }
        if self.sup.reload.step.is_some_and(|step| step.slot == slot) {
            self.sup.reload.step = None;
            self.advance_reload();
        }
        self.tell_if_gone(slot);
    }

    /// Tells who waits for removed slot `slot` to be empty, once it is.
    fn tell_if_gone(&mut self, slot: SlotIdx) {
        let s = &self.sup.slots[slot];
        if s.active || s.gone_waiters.is_empty() {
            return;
        }
        if self.workers.iter().flatten().any(|w| w.slot == slot) {
            return;
        }
        for tx in self.sup.slots[slot].gone_waiters.drain(..) {
            let _ = tx.try_send(Ok(()));
        }
    }

    pub(super) fn on_timers(&mut self) {
        let now = self.now;
        if self.accept.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept.accept_paused_until = None;
        }
        for s in self.sup.slots.indices() {
            if self.sup.slots[s].restart_at.is_some_and(|t| t <= now) {
                self.restart_slot(s);
            }
        }
        for i in self.workers.indices() {
            self.worker_timers(i, now);
        }
        if let (Some(at), Some(limit)) = (self.sup.memory_check_at, self.settings.limits.max_memory)
        {
            if at <= now {
                self.sup.memory_check_at = Some(now + MEMORY_CHECK_EVERY);
                self.check_memory(limit);
            }
        }
        self.upgrade_timers();
        self.peek_timers();
        if let Some(m) = self.metrics.as_mut() {
            m.on_timers(self.io.poll.registry(), now);
        }
    }

    /// How long a reload waits for its new worker's hello: the worker
    /// timeout, or a minute without one, and never less than twice the
    /// hello timeout.
    fn candidate_timeout(&self) -> Duration {
        let t = self
            .settings
            .worker_timeout
            .unwrap_or(Duration::from_secs(60));
        t.max(self.settings.hello_timeout * 2)
    }

    /// Acts on worker `i`'s timers that are due, in [`Timer::ALL`]'s
    /// order, until one ends its turn (it became ready, was stopped or is
    /// gone).
    fn worker_timers(&mut self, i: WorkerIdx, now: Instant) {
        for t in Timer::ALL {
            let Some(w) = self.workers.get_mut(i).and_then(Option::as_mut) else {
                return;
            };
            if !w.timers.fire(t, now) {
                continue;
            }
            if self.on_timer(i, t, now) == Turn::Done {
                return;
            }
        }
    }

    /// Worker `i`'s timer `t` fired (and is cleared).
    fn on_timer(&mut self, i: WorkerIdx, t: Timer, now: Instant) -> Turn {
        let sched = self.settings.sched;
        let w = self.workers[i].as_mut().expect("a live worker's timer");
        match t {
            Timer::GiveUp => {
                self.give_up_candidate(i);
                return Turn::Done;
            }
            // Its pause is over: it may take connections again.
            Timer::FullPause => {}
            Timer::Ready if w.phase == Phase::Starting => {
                if self.settings.ready == Ready::Hello {
                    info!(
                        worker = w.id,
                        "worker {} (pid {}) has not said hello and runs; in {sched} mode it accepts by itself, so it is taken as ready (without figures or hang detection)",
                        w.id,
                        w.pid
                    );
                }
                self.become_ready(i);
                return Turn::Done;
            }
            Timer::Ready => {}
            Timer::StatsDue => warn!(
                worker = w.id,
                "worker {} (pid {}) said HELLO but no STATS: in {sched} mode a worker accepts on its listening socket, fd 3, itself and says so (STATS 0 right after HELLO); one that waits for connections over its channel gets none (docs/PROTOCOL.md, section 7)",
                w.id,
                w.pid
            ),
            Timer::CutOff => {
                warn!(
                    worker = w.id,
                    "worker {} (pid {}) closed its channel and still runs", w.id, w.pid
                );
                self.cut_off(i);
                return Turn::Done;
            }
            Timer::Recycle => {
                let age = self.settings.limits.max_age.unwrap_or_default();
                let detail = format!("has run for {age:.1?} (--max-age)");
                self.recycle(i, Replacement::MaxAge, &detail);
            }
            Timer::HelloWarn => self.hello_overdue(i),
            Timer::Term | Timer::Kill => {
                // Gone already? Then its exit is what to say, not a signal.
                if let Ok(Some(status)) = w.try_wait() {
                    self.on_exit(i, status);
                    return Turn::Done;
                }
                if t == Timer::Term {
                    info!(
                        worker = w.id,
                        "worker {} (pid {}) is still running: SIGTERM", w.id, w.pid
                    );
                    w.signal(Signal::SIGTERM);
                } else {
                    warn!(
                        worker = w.id,
                        "worker {} (pid {}) did not stop in time: SIGKILL", w.id, w.pid
                    );
                    w.signal(Signal::SIGKILL);
                }
            }
            Timer::Ping => return self.heartbeat(i, now),
        }
        Turn::Next
    }

    /// Worker `i` is past the hello timeout: say so, in the words of the
    /// readiness setting.
    fn hello_overdue(&mut self, i: WorkerIdx) {
        let w = self.workers[i].as_ref().expect("a live worker");
        if self.settings.ready == Ready::Notify {
            warn!(
                worker = w.id,
                "worker {} (pid {}) has not sent READY=1 to its NOTIFY_SOCKET (--ready notify)",
                w.id,
                w.pid
            );
        } else if w.node {
            warn!(
                worker = w.id,
                "Node worker {} (pid {}) has no server listening yet: does the app call listen()? see docs/NODE.md",
                w.id,
                w.pid
            );
        } else if !w.was_ready() {
            let (id, pid) = (w.id, w.pid);
            let after = self.settings.hello_timeout;
            self.no_hello(id, pid, &format!("has not said hello after {after:?}"));
        }
    }

    /// Worker `i`'s heartbeat is due: it is hung if it has been silent, or
    /// sat on a connection, for the worker timeout; else it is pinged (a
    /// native worker that speaks the protocol) and the next one set.
    fn heartbeat(&mut self, i: WorkerIdx, now: Instant) -> Turn {
        let Some(timeout) = self.settings.worker_timeout else {
            return Turn::Next;
        };
        let w = self.workers[i].as_ref().expect("a live worker");
        // Node workers have no heartbeat: they are silent when idle, and
        // hung only when a connection waits for their answer too long.
        let silent = match w.node {
            true => Duration::ZERO,
            false => now.saturating_duration_since(w.last_seen),
        };
        let oldest_unacked = self.ledger.sent_to(i).map(|c| c.sent).min();
        let stuck = oldest_unacked.map(|t| now.saturating_duration_since(t));
        if silent >= timeout || stuck.is_some_and(|s| s >= timeout) {
            let why = if silent >= timeout {
                format!("no acknowledgement or heartbeat for {silent:.1?}")
            } else {
                format!(
                    "{} unacknowledged for {:.1?}",
                    crate::logging::count(self.ledger.unacknowledged(i), "connection"),
                    stuck.unwrap_or_default()
                )
            };
            error!(
                worker = w.id,
                "worker {} (pid {}) is hung: {why}; stopping it", w.id, w.pid
            );
            self.cut_off(i);
            return Turn::Done;
        }
        let n = self.sup.next_ping;
        self.sup.next_ping += 1;
        let w = self.workers[i].as_mut().expect("checked above");
        if let Some(Link::Native(channel)) = w.channel.as_ref().filter(|_| w.spoke) {
            // A full channel is no reason to wait: the next turn pings again.
            if channel
                .send(self.writer.enc.ping(n).as_bytes(), &[], true)
                .is_ok()
            {
                w.last_ping = n;
            }
        }
        let next = (now + ping_interval(timeout)).min(w.last_seen + timeout);
        w.timers
            .set(Timer::Ping, next.max(now + Duration::from_millis(1)));
        Turn::Next
    }

    /// Worker `id` has not said hello (`what`: not yet, or it exited):
    /// said in one line with what to do, every time (each restart of its
    /// slot again), and kept for `/healthz` while no worker is ready.
    fn no_hello(&mut self, id: u64, pid: u32, what: &str) {
        warn!(
            worker = id,
            "worker {id} (pid {pid}) {what}: does it speak the distributor protocol? Under --sched rr the primary hands connections over the protocol (docs/PROTOCOL.md); a server that listens by itself runs under --sched reuseport or shared, taking its listening socket as fd 3 (socket activation: uvicorn --fd 3, gunicorn, any LISTEN_FDS program; add --ready start if it never speaks the protocol), and a Node app as `-- node app.js`"
        );
        self.sup.problem = Some(format!(
            "worker {id} {what}: does it speak the distributor protocol? (--sched reuseport --ready start for a server that listens by itself on fd 3; see the log)"
        ));
    }

    /// A successor was not ready in time: stop it, keep the old worker
    /// serving, and retry that slot with backoff.
    fn give_up_candidate(&mut self, i: WorkerIdx) {
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        w.timers.clear(Timer::GiveUp);
        let (id, pid, slot) = (w.id, w.pid, w.slot);
        let uptime = self.now.saturating_duration_since(w.started);
        let s = &mut self.sup.slots[slot];
        let (delay, quick) = self.settings.backoff.next(Duration::ZERO, s.quick_exits);
        s.quick_exits = quick;
        warn!(
            worker = id,
            "the new worker {id} (pid {pid}) for slot {} is not ready after {uptime:.1?}; stopping it, the old one keeps serving; retrying in {delay:.1?}",
            slot.number()
        );
        self.retire(i);
        if self.sup.slots[slot].successor == Some(i) {
            self.sup.slots[slot].successor = None;
            self.sup.slots[slot].restart_at = Some(self.now + delay);
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let slots = self.sup.slots.iter().map(|s| s.restart_at);
        let workers = self.workers.iter().flatten().map(|w| w.timers.next());
        slots
            .chain(workers)
            .chain([self.accept.accept_paused_until, self.sup.memory_check_at])
            .chain([self.sup.upgrade.as_ref().map(|u| u.deadline)])
            .chain([self.accept.peeking.next_deadline()])
            .chain([self.metrics.as_ref().and_then(|m| m.next_deadline())])
            .flatten()
            .min()
    }
}

/// Bytes as MiB, for the log.
fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Tells the service manager, if the primary runs under one (`NOTIFY_SOCKET`).
pub(super) fn tell_systemd(message: &str) {
    if let Err(e) = crate::activation::notify(message) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `RELOADING=1` wants it.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}
