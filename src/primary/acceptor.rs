//! The acceptor and the hand-over: more methods of [`EventLoop`], over its
//! servers ([`Server`]), the [`Dispatcher`](super::policy::Dispatcher) and
//! the custody [`Ledger`](super::custody::Ledger).
//!
//! - **Accepting.** Each listener is registered edge-triggered; on an
//!   event the loop accepts until `WouldBlock`, but only while some worker
//!   can take a connection of that server; otherwise connections wait in
//!   the kernel's backlog until a worker has room. Accept errors such as
//!   `EMFILE` pause accepting until an fd is freed (an acknowledgement
//!   closes the primary's copy) or a short timer fires.
//! - **Placing.** The dispatcher picks among the workers that hold the
//!   server and can take one now (ready, not stopping, under their
//!   unacknowledged limit, channel not full). A connection no worker can
//!   take is held in the ledger (a few at most: accepting stops first).
//! - **Sending.** A native worker's connections of one burst go in one
//!   CONNECTION message (up to 64 fds), a Node worker's one `newconn` each;
//!   the ledger records them sent, or takes them back if the send failed.
//!   Closing a worker's channel gives what it held back to the ledger.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use mio::Interest;
use mio::unix::SourceFd;
use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::event_loop::EventLoop;
use super::ids::{ServerIdx, SlotIdx, WorkerIdx};
use super::node::wire;
use super::policy::Candidate;
use super::process::{Conn, Link, Protocol};
use super::sched::Sched;
use super::server::{self, Server};
use super::source::Source;
use super::timers::Timer;
use crate::protocol::MAX_FDS;

/// How long accepting pauses after an error such as `EMFILE`, unless an fd
/// is freed sooner.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How often at most an accept error is logged as a warning.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// Slot `slot`'s weight in `weights` (1 beyond the list, and at least 1).
fn weight(weights: &[u32], slot: SlotIdx) -> u32 {
    weights.get(slot.0).copied().unwrap_or(1).max(1)
}

impl EventLoop {
    /// Adds a server, placed by the policy in force; in rr its listener is
    /// registered for accepting.
    pub(super) fn add_server(&mut self, server: Server) -> io::Result<ServerIdx> {
        let k = ServerIdx(self.servers.len());
        self.dispatcher.add_server(k);
        if let Some(l) = &server.listener {
            self.defer_accept(l)?;
        }
        // A new primary of an upgrade accepts once the old one released.
        let held_back = self.sup.parent.as_ref().is_some_and(|p| !p.released);
        if !self.settings.sched.is_kernel() && !held_back {
            if let Some(l) = &server.listener {
                l.set_nonblocking(true)?;
                self.io.poll.registry().register(
                    &mut SourceFd(&l.as_raw_fd()),
                    Source::Listener(k).token(),
                    Interest::READABLE,
                )?;
            }
        }
        let pushed = self.servers.push(server);
        debug_assert_eq!(pushed, k);
        self.ledger.add_server(k);
        Ok(k)
    }

    /// Hands held connections to workers, then accepts while workers have
    /// room; what a burst gave each worker goes in one message at the end.
    pub(super) fn pump(&mut self) {
        for k in self.servers.indices() {
            // A batch that found its worker's channel full comes back to
            // `pending` and that worker is marked full, so the next pass
            // gives it to the others: each pass but the last marks one.
            for _ in 0..=self.workers.len() {
                while let Some(conn) = self.ledger.next_held(k) {
                    if let Err(conn) = self.dispatch(conn) {
                        self.ledger.hand_back(conn);
                        break;
                    }
                }
                if self.ledger.held(k) == 0
                    && self.servers[k].backlog_waiting
                    && self.accept.accept_paused_until.is_none()
                    && !self.settings.sched.is_kernel()
                {
                    self.accept_loop(k);
                }
                self.send_batches();
                if self.ledger.held(k) == 0 || !self.can_place(k) {
                    break;
                }
            }
        }
    }

    fn accept_loop(&mut self, k: ServerIdx) {
        let accepted = self.accept_while_room(k);
        if !self.servers[k].backlog_waiting {
            // The backlog ran dry: how many arrived together.
            self.servers[k].lone = accepted <= 1;
        } else if !self.can_place(k) {
            // More wait than there was room for: a burst.
            self.servers[k].lone = false;
        }
    }

    /// Accepts and places until `WouldBlock`, no room, or an error;
    /// returns how many it accepted.
    fn accept_while_room(&mut self, k: ServerIdx) -> usize {
        let mut accepted = 0usize;
        while self.can_place(k) {
            let Some(listener) = self.servers[k].listener.as_ref() else {
                return accepted;
            };
            match socket2::SockRef::from(listener).accept() {
                Ok((socket, addr)) => {
                    let peer = addr
                        .as_socket()
                        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
                    if self.dispatcher.sched().reads_load() {
                        // What workers reported before this connection
                        // came (a client's previous one finished) counts.
                        self.read_channels();
                    }
                    let conn = Conn {
                        id: self.next_conn_id(),
                        fd: OwnedFd::from(socket),
                        peer,
                        server: k,
                        sent: self.now,
                        refusals: 0,
                        key: None,
                    };
                    // A key in the first request: looked for now, or the
                    // connection waits for it apart (see peek.rs).
                    let Some(conn) = self.key_or_park(conn) else {
                        accepted += 1;
                        continue;
                    };
                    if let Err(conn) = self.dispatch(conn) {
                        self.ledger.hold(conn);
                        return accepted;
                    }
                    accepted += 1;
                    if accepted == 1 && self.servers[k].lone {
                        self.send_batches();
                    }
                    if self.ledger.held(k) > 0 {
                        // A full batch met a full channel: those go first.
                        return accepted;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.servers[k].backlog_waiting = false;
                    return accepted;
                }
                Err(e) => {
                    match e.raw_os_error() {
                        Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => {
                            debug!("accept: {e}")
                        }
                        _ => {
                            // Said once per episode, not on every retry.
                            let now = self.now;
                            if self.accept.accept_warned_at.is_none_or(|t| {
                                now.saturating_duration_since(t) >= ACCEPT_WARN_EVERY
                            }) {
                                warn!(
                                    "accept failed: {e}; pausing accepts until an fd is freed or {ACCEPT_RETRY:?} pass"
                                );
                                self.accept.accept_warned_at = Some(now);
                            } else {
                                debug!("accept failed again: {e}");
                            }
                            self.accept.accept_paused_until = Some(now + ACCEPT_RETRY);
                            return accepted;
                        }
                    }
                }
            }
        }
        accepted
    }

    /// Whether some worker can take a connection of server `k` now.
    fn can_place(&self, k: ServerIdx) -> bool {
        let max = self.settings.max_unacked;
        self.workers.indices().any(|i| self.can_take(i, k, max))
    }

    /// Whether worker `i` can take a connection of server `k` now.
    fn can_take(&self, i: WorkerIdx, k: ServerIdx, max: usize) -> bool {
        self.workers[i]
            .as_ref()
            .is_some_and(|w| w.can_take(k) && self.ledger.outstanding(i) < max)
    }

    /// With `--sticky` and a key: the worker of the first slot on the
    /// ring, from the key's hash, that can take the connection within the
    /// load bound (see [`super::sticky`]); counted as placed by key, or
    /// moved by the bound. Without a key, or when no slot can: the policy.
    fn pick_for(&mut self, k: ServerIdx, key: Option<u64>) -> Option<WorkerIdx> {
        let Some(key) = key else {
            let picked = self.pick(k);
            if picked.is_some() && self.settings.sticky.is_some() {
                // No key (none in the request, or not in time).
                self.accept.sticky_counts.fallback += 1;
            }
            return picked;
        };
        use super::sticky::{Pick, Ring, bound};
        let max = self.settings.max_unacked;
        let active = self
            .sup
            .slots
            .indices()
            .filter(|&s| self.sup.slots[s].active);
        if !self.accept.ring.is_of(active) {
            self.accept.ring = Ring::new(&self.active_slots());
        }
        // One pass over the workers: the load of those that can take the
        // connection, and what each slot can do with it (its worker that
        // can take it, its current one or during a reload its successor;
        // or one ready but full for the moment).
        let (workers, ledger, accept) = (&self.workers, &self.ledger, &mut self.accept);
        let picks = &mut accept.sticky_scratch.picks;
        picks.clear();
        picks.resize(self.sup.slots.len(), Pick::Nobody);
        let (mut total, mut able) = (0u64, 0usize);
        for (i, w) in workers.iter_enumerated() {
            let Some(w) = w else { continue };
            let pick = &mut picks[w.slot.0];
            if w.can_take(k) && ledger.outstanding(i) < max {
                total += ledger.in_flight(i);
                able += 1;
                if !matches!(pick, Pick::Take(_)) {
                    *pick = Pick::Take(i);
                }
            } else if w.is_ready() && *pick == Pick::Nobody {
                *pick = Pick::Busy;
            }
        }
        if able > 0 {
            let bound = bound(total, able, self.settings.sticky_balance_factor);
            let picks = &accept.sticky_scratch.picks;
            let order = accept.ring.order(key, &mut accept.sticky_scratch.seen);
            for (nth, slot) in order.enumerate() {
                match picks[slot.0] {
                    // Ready but full for the moment (`--max-unacked`, its
                    // channel): the connection waits for room there rather
                    // than break its client's session elsewhere.
                    Pick::Busy => return None,
                    Pick::Nobody => {
                        debug!("sticky: slot {} has no ready worker", slot.number());
                    }
                    Pick::Take(i) => {
                        // A worker that reports no completions (a Node app,
                        // a program without the protocol) has no load to
                        // bound: its keys stay unless it cannot take one.
                        let reports = ledger.finished(i).is_some();
                        if !reports || ledger.in_flight(i) < bound {
                            if nth == 0 {
                                accept.sticky_counts.by_key += 1;
                            } else {
                                debug!(
                                    "sticky: a key moved to slot {} (in flight {}, bound {bound})",
                                    slot.number(),
                                    ledger.in_flight(i)
                                );
                                accept.sticky_counts.moved += 1;
                            }
                            return Some(i);
                        }
                    }
                }
            }
        }
        let picked = self.pick(k);
        if picked.is_some() {
            self.accept.sticky_counts.fallback += 1;
        }
        picked
    }

    /// The worker the policy gives server `k`'s next connection to.
    fn pick(&mut self, k: ServerIdx) -> Option<WorkerIdx> {
        let max = self.settings.max_unacked;
        let (workers, ledger, weights) = (&self.workers, &self.ledger, &self.settings.weights);
        // Round-robin does not read the load: spare the lookups.
        let load = self.dispatcher.sched().reads_load();
        let equal_weights = weights.iter().all(|&w| w.max(1) == 1);
        let candidate = |index: usize| {
            let i = WorkerIdx(index);
            let w = workers[i].as_ref()?;
            (w.can_take(k) && ledger.outstanding(i) < max).then(|| Candidate {
                index,
                in_flight: if load { ledger.in_flight(i) } else { 0 },
                weight: weight(weights, w.slot),
            })
        };
        self.dispatcher
            .pick(k, workers.len(), equal_weights, candidate)
            .map(WorkerIdx)
    }

    /// Slot `slot`'s weight (`--weights`; 1 beyond the list).
    pub(super) fn weight(&self, slot: SlotIdx) -> u32 {
        weight(&self.settings.weights, slot)
    }

    /// Gives `conn` to the worker the policy picks: a native worker's goes
    /// into its batch (sent by [`EventLoop::send_batches`] at the end of
    /// the burst, or now if the batch is full), a Node worker's is sent at
    /// once (Node's `newconn` carries one). Gives it back if no worker can
    /// take it.
    fn dispatch(&mut self, mut conn: Conn) -> Result<(), Conn> {
        conn.sent = self.now;
        let k = conn.server;
        let key = match &self.settings.sticky {
            Some(super::sticky::Sticky::Ip) => Some(super::sticky::ip_key(conn.peer.ip())),
            Some(_) => conn.key,
            None => None,
        };
        while let Some(i) = self.pick_for(k, key) {
            let w = self.workers[i].as_mut().expect("picked workers exist");
            let sent = match w.channel.as_mut().expect("picked workers have a channel") {
                Link::Native(_) => {
                    if self.ledger.stage(i, conn) == MAX_FDS {
                        self.send_batch(i);
                    }
                    return Ok(());
                }
                Link::Node(link) => {
                    self.writer.line.clear();
                    wire::newconn(&mut self.writer.line, conn.id, &self.servers[k].key_json);
                    let sent = link.send_now(&self.writer.line, Some(conn.fd.as_fd()));
                    if sent.is_ok() {
                        link.handles.push_back(conn.id);
                    }
                    sent
                }
            };
            match sent {
                Ok(()) => {
                    self.ledger.sent(i, conn);
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

    /// Sends every batch staged this turn.
    fn send_batches(&mut self) {
        let mut batched = std::mem::take(&mut self.accept.batched);
        self.ledger.take_staged_workers(&mut batched);
        for i in batched.drain(..) {
            self.send_batch(i);
        }
        self.accept.batched = batched;
    }

    /// Sends worker `i`'s batch as one CONNECTION message, its fds in one
    /// `SCM_RIGHTS`. If the channel is full, the batch goes back to the
    /// front of `pending`, in order, and the worker is marked full; if the
    /// channel is broken, the worker is cut off and the batch goes back too.
    fn send_batch(&mut self, i: WorkerIdx) {
        let Some(w) = self.workers.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let batch = self.ledger.staged(i);
        if batch.is_empty() {
            return;
        }
        let sent = match w.channel.as_ref() {
            Some(Link::Native(channel)) => {
                let enc = self.writer.enc.connection();
                let mut fds = [channel.as_fd(); MAX_FDS];
                for (fd, c) in fds.iter_mut().zip(batch) {
                    enc.entry(c.id, c.peer);
                    *fd = c.fd.as_fd();
                }
                channel.send(self.writer.enc.as_bytes(), &fds[..batch.len()], true)
            }
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        };
        match sent {
            Ok(()) => self.ledger.commit(i),
            Err(e) => {
                self.ledger.abort(i);
                if e.kind() == io::ErrorKind::WouldBlock {
                    w.channel_full = true;
                } else {
                    warn!(worker = w.id, "cannot send to worker {}: {e}", w.id);
                    self.cut_off(i);
                }
            }
        }
    }

    /// Closes worker `i`'s channel: its unacknowledged connections go back
    /// to `pending`; the worker, unless already stopping, gets SIGTERM and,
    /// after `grace`, SIGKILL.
    pub(super) fn disconnect(&mut self, i: WorkerIdx, grace: Duration) {
        let now = self.now;
        self.close_channel(i);
        let Some(w) = self.workers.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        w.unready();
        w.timers.clear(Timer::Ping);
        if w.stop() {
            w.signal(Signal::SIGTERM);
            w.timers.set(Timer::Kill, now + grace);
        }
    }

    /// Closes worker `i`'s channel, and gives its unacknowledged
    /// connections back to `pending`, for other workers.
    pub(super) fn close_channel(&mut self, i: WorkerIdx) {
        let channel = self
            .workers
            .get_mut(i)
            .and_then(Option::as_mut)
            .and_then(|w| w.channel.take());
        if let Some(channel) = channel {
            let _ = self
                .channel_registry()
                .deregister(&mut SourceFd(&channel.as_fd().as_raw_fd()));
        }
        let Some(w) = self.workers.get(i).and_then(Option::as_ref) else {
            return;
        };
        let n = self.ledger.release(i);
        if n > 0 {
            info!(
                worker = w.id,
                "handing {} of worker {} to other workers",
                crate::logging::count(n, "unacknowledged connection"),
                w.id
            );
        }
    }

    /// Stops accepting for good: the primary's listeners are closed, so
    /// the backlog is refused once no worker holds a copy either;
    /// connections already accepted still go to workers.
    pub(super) fn close_listeners(&mut self) {
        // Connections still waiting for a sticky key are placed as they are.
        self.unpark_all();
        for k in self.servers.indices() {
            self.close_server(k);
        }
        self.accept.spare = None;
        self.pump();
    }

    /// Closes server `k`'s listeners.
    pub(super) fn close_server(&mut self, k: ServerIdx) {
        if let Some(listener) = self.servers[k].listener.take() {
            if !self.settings.sched.is_kernel() {
                let _ = self
                    .io
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&listener.as_raw_fd()));
            }
        }
        self.servers[k].slot_listeners.clear();
        self.servers[k].backlog_waiting = false;
    }

    /// Creates, in reuseport, the own `SO_REUSEPORT` socket of `slot`
    /// for server `k` the first time (slot 1 uses the server's listener).
    pub(super) fn ensure_slot_listener(&mut self, k: ServerIdx, slot: SlotIdx) -> io::Result<()> {
        // Slot 1 uses the server's listener; slot n+1 its n-th own socket.
        let slot = slot.0;
        let backlog = self.settings.backlog;
        let s = &mut self.servers[k];
        if self.settings.sched != Sched::ReusePort || slot == 0 || s.listener.is_none() {
            return Ok(());
        }
        if s.slot_listeners.len() < slot {
            s.slot_listeners.resize_with(slot, || None);
        }
        if s.slot_listeners[slot - 1].is_none() {
            let l = server::bind(s.addr, backlog, true)?;
            self.defer_accept(&l)?;
            let s = &mut self.servers[k];
            // Native workers get it by socket activation, blocking, as
            // systemd does; Node's libuv needs it non-blocking.
            l.set_nonblocking(self.settings.protocol == Protocol::Node)?;
            if let Some(steering) = &s.steering {
                steering.add_socket(slot, l.as_fd())?;
            }
            s.slot_listeners[slot - 1] = Some(l);
        }
        Ok(())
    }

    /// Sets `TCP_DEFER_ACCEPT` on a listening socket, when asked for.
    fn defer_accept(&self, l: &TcpListener) -> io::Result<()> {
        let seconds = self.settings.defer_accept.as_secs_f64().ceil() as u32;
        if seconds == 0 {
            return Ok(());
        }
        crate::sys::set_tcp_defer_accept(l.as_fd(), seconds)
    }

    /// The listening socket a worker of `slot` gets for server `k`: none in
    /// rr; the shared one; or the slot's own (see
    /// [`EventLoop::ensure_slot_listener`], to call first).
    pub(super) fn slot_listener(&self, k: ServerIdx, slot: SlotIdx) -> Option<&TcpListener> {
        // Slot 1 uses the server's listener; slot n+1 its n-th own socket.
        let slot = slot.0;
        let s = &self.servers[k];
        match self.settings.sched {
            Sched::RoundRobin | Sched::LeastConn | Sched::PowerOfTwo => None,
            Sched::Shared => s.listener.as_ref(),
            Sched::ReusePort if slot == 0 => s.listener.as_ref(),
            Sched::ReusePort => s.slot_listeners.get(slot - 1).and_then(Option::as_ref),
        }
    }

    /// Closes a removed slot's own sockets (reuseport); connections queued
    /// on them are lost once its worker exits too, a limit of `SO_REUSEPORT`.
    pub(super) fn drop_slot_listener(&mut self, slot: SlotIdx) {
        // Slot 1 uses the server's listener; slot n+1 its n-th own socket.
        let slot = slot.0;
        if slot == 0 {
            return;
        }
        for s in &mut self.servers {
            if let Some(steering) = &s.steering {
                steering.remove_socket(slot);
            }
            if let Some(l) = s.slot_listeners.get_mut(slot - 1) {
                *l = None;
            }
        }
    }

    /// With `--steer`: writes each steered server's schedule when the
    /// ready slots changed. A slot is in it while it is active and one of
    /// its workers is ready and not stopping; weighted by `--weights`.
    pub(super) fn refresh_steering(&mut self) {
        if self.settings.steer == crate::primary::Steer::Off {
            return;
        }
        // In an upgrade one primary writes the schedule at a time: the old
        // one until it releases, then the new one.
        let released = self.sup.parent.as_ref().is_none_or(|p| p.released);
        if !released || self.sup.upgraded_to.is_some() {
            return;
        }
        let mut ready: Vec<(u32, u32)> = self
            .workers
            .iter()
            .flatten()
            .filter(|w| w.is_ready() && self.sup.slots[w.slot].active)
            .map(|w| (w.slot.0 as u32, weight(&self.settings.weights, w.slot)))
            .collect();
        ready.sort_unstable();
        ready.dedup_by_key(|&mut (slot, _)| slot);
        let order = super::steer::schedule(&ready);
        for s in &mut self.servers {
            let Some(steering) = s.steering.as_mut() else {
                continue;
            };
            match steering.set_schedule(&order) {
                Ok(true) => debug!("steering: schedule {:?}", steering.written()),
                Ok(false) => {}
                Err(e) => warn!("{e}"),
            }
        }
    }
}
