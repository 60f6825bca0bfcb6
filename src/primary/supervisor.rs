//! The supervisor half of the event loop: starting, reaping and replacing
//! workers, rolling reloads, scaling, hang detection, graceful shutdown,
//! and the timers that drive them.
//!
//! - **Exits.** SIGCHLD arrives through signal-hook's self-pipe; each worker
//!   is then reaped with `waitpid(pid, WNOHANG)` (never `waitpid(-1)`,
//!   which would steal an embedding program's children). A slot's current
//!   worker is replaced, with backoff if it died young.
//! - **Rolling reload** (SIGHUP, [`crate::Handle::reload`]): slot by slot,
//!   a *candidate* worker is started; once it says hello it becomes the
//!   slot's current worker and the old one is asked to stop. Capacity never
//!   drops below the number of slots, and a candidate that cannot start
//!   leaves the old worker serving while it is retried with backoff.
//! - **Hang detection** (`worker_timeout`): a ready worker is pinged; one
//!   that sends nothing (no acknowledgement, no heartbeat answer) for the
//!   timeout is stopped, and its unacknowledged connections go elsewhere.
//! - **Timers** are deadlines; the poll timeout is the nearest one.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use std::os::fd::{AsFd, AsRawFd};
use tracing::{debug, error, info, warn};

use super::event_loop::{EventLoop, Slot};
use super::node;
use super::process::{Link, Protocol, Role, WorkerProc, describe_exit};
use super::{Event, Ready};
use crate::activation::Notice;

/// The longest wait before SIGKILL for a worker stopped because it hung or
/// broke the protocol.
const BROKEN_WORKER_GRACE: Duration = Duration::from_secs(5);

impl EventLoop {
    /// Spawns a worker for `slot` and registers its channel.
    pub(super) fn start_worker(&mut self, slot: usize, role: Role) -> std::io::Result<usize> {
        let id = self.next_worker_id;
        self.next_worker_id += 1;
        let now = self.now;
        let command = self
            .settings
            .command
            .clone()
            .env("NOTIFY_SOCKET", self.notify.env_value());
        let speaks = self.settings.protocol;
        // Native workers inherit the one server's socket in the kernel
        // modes; Node workers ask for theirs.
        if speaks == Protocol::Native {
            self.ensure_slot_listener(0, slot)?;
        }
        let listen = match speaks {
            Protocol::Native => self.slot_listener(0, slot).map(|l| l.as_fd()),
            Protocol::Node => None,
        };
        let mut w = WorkerProc::spawn(
            &command,
            speaks,
            id,
            slot,
            role,
            listen,
            self.output.as_ref(),
            now,
        )?;
        if speaks == Protocol::Native {
            w.servers = 1;
        }
        let i = self.free.pop().unwrap_or_else(|| {
            self.workers.push(None);
            self.workers.len() - 1
        });
        let channel = w.channel.as_ref().expect("a new worker has a channel");
        if let Err(e) =
            Self::register_channel(self.channel_registry(), channel.as_fd().as_raw_fd(), i)
        {
            self.free.push(i);
            w.signal(Signal::SIGKILL);
            return Err(e);
        }
        w.hello_warn_at = Some(now + self.settings.hello_timeout);
        if role == Role::Candidate {
            w.give_up_at = Some(now + self.candidate_timeout());
        }
        info!(
            worker = id,
            pid = w.pid,
            "worker {id} started (pid {})",
            w.pid
        );
        self.emit(Event::WorkerStarted { id, pid: w.pid });
        self.workers[i] = Some(w);
        if role == Role::Current {
            self.slots[slot].current = Some(i);
        }
        if self.settings.ready == Ready::Start {
            self.become_ready(i);
        }
        Ok(i)
    }

    /// Cuts off a live worker that is of no more use (it closed its
    /// channel, broke the protocol, hung, or its channel failed): its
    /// connections go to other workers, it gets SIGTERM and then SIGKILL,
    /// and its slot gets a new worker now (with backoff if it died young)
    /// rather than when it finally exits.
    pub(super) fn cut_off(&mut self, i: usize) {
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        let replace = !w.stopping && w.role == Role::Current && self.shutdown_at.is_none();
        let (slot, uptime) = (w.slot, self.now.saturating_duration_since(w.started));
        if replace {
            w.role = Role::Retiring;
        }
        let grace = self.settings.shutdown_timeout.min(BROKEN_WORKER_GRACE);
        // Its unacknowledged connections go to other workers, but copies
        // still wait in its end of the channel: it must not live to read
        // them, or a connection could be served twice.
        let handed_over = !w.unacked.is_empty();
        self.disconnect(i, grace);
        if handed_over {
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
        if replace && self.slots[slot].current == Some(i) {
            self.slots[slot].current = None;
            if self.slots[slot].active {
                self.slots[slot].restarts += 1;
                self.schedule_restart(slot, uptime);
            }
        }
    }

    /// Starts `slot`'s current worker again, or schedules another try.
    fn restart_slot(&mut self, slot: usize) {
        self.slots[slot].restart_at = None;
        if !self.slots[slot].active || self.shutdown_at.is_some() {
            return;
        }
        if let Err(e) = self.start_worker(slot, Role::Current) {
            error!("cannot start a worker: {e}");
            self.schedule_restart(slot, Duration::ZERO);
        }
    }

    pub(super) fn schedule_restart(&mut self, slot: usize, uptime: Duration) {
        let backoff = self.settings.backoff;
        let s = &mut self.slots[slot];
        let (delay, quick) = backoff.next(uptime, s.quick_exits);
        s.quick_exits = quick;
        if quick >= 3 {
            warn!(
                "worker slot {} is crash-looping: {quick} exits in a row within {:?} of starting; next start in {delay:.1?} (backoff caps at {:?})",
                slot + 1,
                backoff.reset_after,
                backoff.max
            );
        } else if !delay.is_zero() {
            info!("restarting worker slot {} in {delay:.1?}", slot + 1);
        }
        if delay.is_zero() {
            self.restart_slot(slot);
        } else {
            self.slots[slot].restart_at = Some(self.now + delay);
        }
    }

    /// Reaps every worker that has exited and decides what its exit means.
    pub(super) fn reap(&mut self) {
        for i in 0..self.workers.len() {
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

    fn on_exit(&mut self, i: usize, status: ExitStatus) {
        // Its last messages (acknowledgements, a final STATS) may still wait
        // in the channel: read them all, or an acknowledged connection
        // would be handed to another worker and served twice.
        while self.read_channel(i) {}
        let w = self.workers[i].as_mut().expect("exited worker exists");
        let expected = w.asked_to_stop || self.shutdown_at.is_some();
        // It is gone: no signal for it, only its connections to hand over.
        w.stopping = true;
        self.disconnect(i, Duration::ZERO);
        let w = self.workers[i].take().expect("exited worker exists");
        self.free.push(i);
        self.exited_connections += w.taken;
        let uptime = self.now.saturating_duration_since(w.started);
        let how = describe_exit(&status);
        let plural = if w.taken == 1 { "" } else { "s" };
        let text = format!(
            "worker {} (pid {}) exited with {how} after {uptime:.1?}, having taken {} connection{plural}",
            w.id, w.pid, w.taken
        );
        if expected {
            info!(worker = w.id, pid = w.pid, "{text}");
        } else {
            warn!(worker = w.id, pid = w.pid, "{text}");
        }
        self.emit(Event::WorkerExited {
            id: w.id,
            pid: w.pid,
            status,
        });
        if self.shutdown_at.is_some() {
            return;
        }
        match w.role {
            Role::Current => {
                let slot = &mut self.slots[w.slot];
                if slot.current == Some(i) {
                    slot.current = None;
                    if slot.active {
                        slot.restarts += 1;
                        self.schedule_restart(w.slot, uptime);
                    }
                }
            }
            Role::Candidate => {
                self.reload.candidate = None;
                let s = &mut self.slots[w.slot];
                let (delay, quick) = self.settings.backoff.next(uptime, s.quick_exits);
                s.quick_exits = quick;
                warn!(
                    "reload: the new worker for slot {} exited before saying hello; the old one keeps serving; retrying in {delay:.1?}",
                    w.slot + 1
                );
                self.reload.queue.push_front(w.slot);
                self.reload.retry_at = Some(self.now + delay);
            }
            Role::Retiring => {}
        }
    }

    /// A worker said hello: it gets connections from now on. A reload's
    /// candidate takes over its slot, and the slot's old worker retires.
    /// `spoke`: it said hello; else, in a kernel mode, it is taken as ready
    /// without (and is not pinged, since it may not speak the protocol).
    pub(super) fn on_hello(&mut self, i: usize, spoke: bool) {
        let w = self.workers[i].as_mut().expect("hello from a live worker");
        if spoke {
            // It speaks the protocol: it answers pings from now on.
            w.spoke = true;
            w.ping_at = self
                .settings
                .worker_timeout
                .map(|t| self.now + ping_interval(t));
            if self.settings.ready != Ready::Hello || w.ready {
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
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| w.pid == pid))
        else {
            return;
        };
        let now = self.now;
        let timeout = self.settings.worker_timeout;
        let w = self.workers[i].as_mut().expect("found above");
        match notice {
            Notice::Ready => {
                if self.settings.ready == Ready::Notify && !w.ready && !w.stopping {
                    self.become_ready(i);
                }
            }
            Notice::Watchdog => {
                // WATCHDOG=1 keeps it alive for hang detection, like systemd's
                // WatchdogSec; once sent, silence counts.
                w.last_seen = now;
                if w.ping_at.is_none() && w.ready && !w.stopping {
                    w.ping_at = timeout.map(|t| now + ping_interval(t));
                }
            }
            Notice::Stopping => {
                info!(
                    worker = w.id,
                    "worker {} (pid {}) says it is stopping", w.id, w.pid
                );
                w.ready = false;
            }
            Notice::Status(s) => {
                debug!(worker = w.id, "worker {} status: {s}", w.id);
                w.status = Some(s);
            }
            Notice::Reloading => {}
        }
    }

    /// The worker may get connections from now on (it said hello, sent
    /// READY=1, or was started, per the readiness setting).
    fn become_ready(&mut self, i: usize) {
        let w = self.workers[i].as_mut().expect("a live worker");
        w.ready = true;
        w.hello_warn_at = None;
        w.give_up_at = None;
        let (id, pid, slot, role) = (w.id, w.pid, w.slot, w.role);
        if role == Role::Candidate {
            w.role = Role::Current;
            let old = self.slots[slot].current.replace(i);
            self.slots[slot].restart_at = None;
            self.reload.candidate = None;
            if let Some(old) = old {
                self.retire(old);
            }
        }
        let ready = self
            .workers
            .iter()
            .flatten()
            .filter(|w| w.ready && w.role == Role::Current)
            .count();
        let total = self.slots.iter().filter(|s| s.active).count();
        info!(
            worker = id,
            pid, "worker {id} (pid {pid}) ready, {ready}/{total} ready"
        );
        if ready == total && !self.told_systemd_ready {
            self.told_systemd_ready = true;
            tell_systemd(&format!("READY=1\nSTATUS={total} workers ready"));
        }
        self.emit(Event::WorkerReady { id, pid });
        if role == Role::Candidate {
            self.advance_reload();
        }
    }

    /// Asks worker `i` to finish and exit; it is not replaced.
    fn retire(&mut self, i: usize) {
        let timeout = self.settings.shutdown_timeout;
        let now = self.now;
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        w.role = Role::Retiring;
        w.hello_warn_at = None;
        w.ping_at = None;
        w.asked_to_stop = true;
        if w.stopping {
            return;
        }
        w.stopping = true;
        let seq = self.next_seq();
        let w = self.workers[i].as_mut().expect("checked above");
        let asked = w.ready
            && match w.channel.as_mut() {
                Some(Link::Native(c)) => c.send(self.enc.stop().as_bytes(), &[], true).is_ok(),
                Some(Link::Node(l)) => {
                    // Node closes its servers, lets their connections
                    // finish, closes the channel and exits.
                    self.line.clear();
                    node::wire::disconnect(&mut self.line, seq);
                    l.send(&self.line, None).is_ok()
                }
                None => false,
            };
        if !asked {
            w.signal(Signal::SIGTERM);
        }
        w.term_at = asked.then(|| now + timeout / 2);
        w.kill_at = Some(now + timeout);
    }

    pub(super) fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_none() {
            tell_systemd("STOPPING=1\nSTATUS=stopping");
        }
        if self.shutdown_at.is_some() {
            warn!("second stop request: killing the workers now");
            for w in self.workers.iter().flatten() {
                w.signal(Signal::SIGKILL);
            }
            return;
        }
        let timeout = self.settings.shutdown_timeout;
        let alive = self.workers.iter().flatten().count();
        info!("shutting down: stopping {alive} workers (timeout {timeout:?})");
        // Connections already accepted go to workers before they are asked
        // to stop; the backlog is refused with the listener's close.
        self.close_listeners();
        self.shutdown_at = Some(self.now + timeout);
        self.reload = Default::default();
        for slot in &mut self.slots {
            slot.restart_at = None;
        }
        for i in 0..self.workers.len() {
            self.retire(i);
        }
    }

    pub(super) fn begin_reload(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        let slots: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].active)
            .collect();
        info!("reloading: replacing {} workers one at a time", slots.len());
        tell_systemd(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            monotonic_usec()
        ));
        // A new reload starts over; a new worker of the last one that is
        // not ready yet is stopped (it may be stuck on what was just fixed).
        if let Some(c) = self.reload.candidate.take() {
            if self.workers[c].as_ref().is_some_and(|w| !w.ready) {
                self.retire(c);
            } else {
                self.reload.candidate = Some(c);
            }
        }
        self.reload.retry_at = None;
        self.reload.queue = slots.into();
        self.advance_reload();
    }

    /// Starts the next candidate of a rolling reload, if none is pending.
    fn advance_reload(&mut self) {
        if self.shutdown_at.is_some()
            || self.reload.candidate.is_some()
            || self.reload.retry_at.is_some()
        {
            return;
        }
        while let Some(slot) = self.reload.queue.pop_front() {
            if !self.slots[slot].active {
                continue;
            }
            match self.start_worker(slot, Role::Candidate) {
                Ok(i) => self.reload.candidate = Some(i),
                Err(e) => {
                    error!("reload: cannot start a worker: {e}; retrying");
                    self.reload.queue.push_front(slot);
                    self.reload.retry_at = Some(self.now + self.settings.backoff.max);
                }
            }
            return;
        }
        info!("reload complete");
        tell_systemd("READY=1\nSTATUS=reload complete");
    }

    /// Adds a slot and starts its worker (SIGTTIN).
    pub(super) fn add_worker(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        let slot = match self
            .slots
            .iter()
            .position(|s| !s.active && s.current.is_none())
        {
            Some(s) => s,
            None => {
                self.slots.push(Slot::default());
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Slot {
            active: true,
            restarts: self.slots[slot].restarts,
            ..Slot::default()
        };
        let total = self.slots.iter().filter(|s| s.active).count();
        info!("adding a worker: {total} workers");
        self.restart_slot(slot);
    }

    /// Retires the last slot's worker gracefully (SIGTTOU); keeps one.
    pub(super) fn remove_worker(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        let active: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].active)
            .collect();
        let Some(&slot) = active.last().filter(|_| active.len() > 1) else {
            warn!("not removing the last worker");
            return;
        };
        info!("removing a worker: {} workers", active.len() - 1);
        self.drop_slot_listener(slot);
        let s = &mut self.slots[slot];
        s.active = false;
        s.restart_at = None;
        if let Some(i) = s.current.take() {
            self.retire(i);
        }
        if let Some(c) = self.reload.candidate {
            if self.workers[c].as_ref().is_some_and(|w| w.slot == slot) {
                self.reload.candidate = None;
                self.retire(c);
                self.advance_reload();
            }
        }
    }

    pub(super) fn on_timers(&mut self) {
        let now = self.now;
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
        }
        if self.reload.retry_at.is_some_and(|t| t <= now) {
            self.reload.retry_at = None;
            self.advance_reload();
        }
        for s in 0..self.slots.len() {
            if self.slots[s].restart_at.is_some_and(|t| t <= now) {
                self.restart_slot(s);
            }
        }
        for i in 0..self.workers.len() {
            self.worker_timers(i, now);
        }
        if let Some(m) = self.metrics.as_mut() {
            m.on_timers(self.poll.registry(), now);
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

    fn worker_timers(&mut self, i: usize, now: Instant) {
        if self.workers[i]
            .as_ref()
            .is_some_and(|w| w.give_up_at.is_some_and(|t| t <= now))
        {
            self.give_up_candidate(i);
            return;
        }
        let worker_timeout = self.settings.worker_timeout;
        let sched = self.settings.sched;
        let ready_mode = self.settings.ready;
        let Some(w) = self.worker_mut(i) else {
            return;
        };
        if sched.is_kernel()
            && ready_mode == Ready::Hello
            && !w.node
            && w.hello_warn_at.is_some_and(|t| t <= now)
        {
            info!(
                worker = w.id,
                "worker {} (pid {}) has not said hello; in {sched} mode it accepts by itself, so it is taken as ready (without figures or hang detection)",
                w.id,
                w.pid
            );
            self.become_ready(i);
            return;
        }
        if w.hello_warn_at.is_some_and(|t| t <= now) {
            w.hello_warn_at = None;
            if ready_mode == Ready::Notify {
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
            } else {
                warn!(
                    worker = w.id,
                    "worker {} (pid {}) has not said hello: does it speak the distributor protocol? see docs/PROTOCOL.md",
                    w.id,
                    w.pid
                );
            }
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
        let Some(timeout) = worker_timeout else {
            return;
        };
        if w.ping_at.is_none_or(|t| t > now) {
            return;
        }
        // Node workers have no heartbeat: they are silent when idle, and
        // hung only when a connection waits for their answer too long.
        let silent = match w.node {
            true => Duration::ZERO,
            false => now.saturating_duration_since(w.last_seen),
        };
        let oldest_unacked = w.unacked.values().map(|c| c.sent).min();
        let stuck = oldest_unacked.map(|t| now.saturating_duration_since(t));
        if silent >= timeout || stuck.is_some_and(|s| s >= timeout) {
            let why = if silent >= timeout {
                format!("no acknowledgement or heartbeat for {silent:.1?}")
            } else {
                format!(
                    "{} connections unacknowledged for {:.1?}",
                    w.unacked.len(),
                    stuck.unwrap_or_default()
                )
            };
            error!(
                worker = w.id,
                "worker {} (pid {}) is hung: {why}; stopping it", w.id, w.pid
            );
            self.cut_off(i);
            return;
        }
        let n = self.next_ping;
        self.next_ping += 1;
        let w = self.workers[i].as_mut().expect("checked above");
        if let Some(Link::Native(channel)) = w.channel.as_ref().filter(|_| w.spoke) {
            // A full channel is no reason to wait: the next turn pings again.
            let _ = channel.send(self.enc.ping(n).as_bytes(), &[], true);
        }
        let next = (now + ping_interval(timeout)).min(w.last_seen + timeout);
        w.ping_at = Some(next.max(now + Duration::from_millis(1)));
    }

    /// A reload's new worker did not say hello in time: stop it, keep the
    /// old one serving, and retry that slot with backoff.
    fn give_up_candidate(&mut self, i: usize) {
        let Some(w) = self.workers[i].as_mut() else {
            return;
        };
        w.give_up_at = None;
        let (id, pid, slot) = (w.id, w.pid, w.slot);
        let uptime = self.now.saturating_duration_since(w.started);
        let s = &mut self.slots[slot];
        let (delay, quick) = self.settings.backoff.next(Duration::ZERO, s.quick_exits);
        s.quick_exits = quick;
        warn!(
            worker = id,
            "reload: the new worker {id} (pid {pid}) for slot {} has not said hello in {uptime:.1?}; stopping it, the old one keeps serving; retrying in {delay:.1?}",
            slot + 1
        );
        self.retire(i);
        if self.reload.candidate == Some(i) {
            self.reload.candidate = None;
            self.reload.queue.push_front(slot);
            self.reload.retry_at = Some(self.now + delay);
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let slots = self.slots.iter().map(|s| s.restart_at);
        let workers = self
            .workers
            .iter()
            .flatten()
            .flat_map(WorkerProc::deadlines);
        slots
            .chain(workers)
            .chain([self.accept_paused_until, self.reload.retry_at])
            .chain([self.metrics.as_ref().and_then(|m| m.next_deadline())])
            .flatten()
            .min()
    }
}

/// How often a ready worker is pinged: a quarter of the timeout, within
/// 10 ms and 5 s.
pub(super) fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

/// Tells the service manager, if the primary runs under one (`NOTIFY_SOCKET`).
fn tell_systemd(message: &str) {
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
