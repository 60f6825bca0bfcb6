//! Node's cluster protocol on the primary's side: unmodified Node apps run
//! as workers (`distributor -- node app.js`). More methods of
//! [`EventLoop`]; the wire format is in `wire.rs`, the channel in
//! `link.rs`, the exchange in docs/NODE.md.
//!
//! - A worker's `listen()` arrives as `queryServer`. The primary binds the
//!   address and port asked for (the app's port wins; `--listen` serves a
//!   server that asks for port 0), or reuses the server another worker
//!   asked for with the same key, and answers: in rr with the address
//!   only, in the kernel modes with the listening socket itself (a
//!   `NODE_HANDLE`; in reuseport the slot's own `SO_REUSEPORT` socket).
//! - A worker is ready when its first server is listening.
//! - rr: each connection goes as a `newconn` with its fd and stays the
//!   primary's until the worker answers `accepted: true`; `accepted:
//!   false` gives it to another worker, and one that every worker holding
//!   its server refused is closed (Node's `maxConnections`).
//! - Stopping: `disconnect` (Node closes its servers, lets their
//!   connections finish and exits); a worker's own
//!   `cluster.worker.disconnect()` is answered, and it is replaced.
//! - The app's `process.send()` messages are [`crate::Event::Message`]s
//!   (their JSON text); [`crate::Handle::send`] takes JSON text.
//! - A server's listener stays open until shutdown, also when its workers
//!   close it, so a worker's restart or reload never loses its backlog.

pub(crate) mod link;
pub(crate) mod wire;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsFd;

use tracing::{debug, info, warn};

use super::event_loop::EventLoop;
use super::process::{Link, Role};
use super::servers::{MAX_SERVERS, Server};
use super::{Event, Ready, Sched};
use wire::{AddressType, FromWorker, Query};

/// The embedding program's message as a line for Node workers: one JSON
/// value, written compactly (a line may hold no newline), that Node will
/// not take for one of its own (`cmd` starting with `NODE_`).
pub(crate) fn app_line(data: &[u8]) -> Result<Vec<u8>, String> {
    let value: serde_json::Value = serde_json::from_slice(data)
        .map_err(|e| format!("a message to Node workers must be JSON ({e})"))?;
    if value
        .get("cmd")
        .and_then(|c| c.as_str())
        .is_some_and(|c| c.starts_with("NODE_"))
    {
        return Err("a `cmd` starting with NODE_ is Node's own".into());
    }
    let mut line = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    Ok(line)
}

/// For the fuzz target: parses one line from a Node worker as the primary
/// does, and writes what it would answer to a query; `Err` for a line that
/// is not JSON. Panics where the per-connection fast path and the full
/// parse read a line differently.
pub fn fuzz_line(line: &[u8]) -> Result<Option<String>, String> {
    wire::assert_fast_path_agrees(line);
    match wire::parse(line).map_err(|e| e.to_string())? {
        FromWorker::QueryServer(q) => {
            let key = wire::server_key(&q);
            let mut out = Vec::new();
            let json = wire::json_string(&key);
            wire::reply_rr(
                &mut out,
                1,
                q.seq,
                &json,
                q.data.get(),
                "[::]:1".parse().expect("an address"),
            );
            wire::reply_handle(&mut out, 2, q.seq, &json, q.data.get());
            for reply in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                serde_json::from_slice::<serde::de::IgnoredAny>(reply)
                    .map_err(|e| format!("an answer that is not JSON: {e}"))
                    .expect("answers are JSON");
            }
            Ok(Some(key))
        }
        FromWorker::App => {
            // What a worker sends is passed on as it is; re-encoding it for
            // a worker may fail (a number beyond f64) but never panics.
            let _ = app_line(line);
            Ok(None)
        }
        _ => Ok(None),
    }
}

impl EventLoop {
    /// Acts on every whole line read from Node worker `i`; returns a
    /// protocol problem, if any.
    pub(super) fn on_node_lines(&mut self, i: usize) -> Option<String> {
        let Some(Link::Node(link)) = self.workers[i].as_mut().and_then(|w| w.channel.as_mut())
        else {
            return None;
        };
        let mut lines = std::mem::take(&mut link.inbuf);
        let mut done = 0;
        let mut problem = None;
        while let Some(n) = lines[done..].iter().position(|&b| b == b'\n') {
            let line = &lines[done..done + n];
            done += n + 1;
            if line.is_empty() {
                continue;
            }
            problem = match wire::parse(line) {
                Ok(msg) => self.on_node_message(i, msg, line),
                Err(e) => Some(e.to_string()),
            };
            let open = self.workers[i]
                .as_ref()
                .is_some_and(|w| w.channel.is_some());
            if problem.is_some() || !open {
                break;
            }
        }
        if let Some(Link::Node(link)) = self.workers[i].as_mut().and_then(|w| w.channel.as_mut()) {
            lines.drain(..done);
            link.inbuf = lines;
        }
        problem
    }

    fn on_node_message(&mut self, i: usize, msg: FromWorker<'_>, line: &[u8]) -> Option<String> {
        let now = self.now;
        let w = self.workers[i].as_mut().expect("reading a live worker");
        w.last_seen = now;
        let Some(Link::Node(link)) = w.channel.as_mut() else {
            return None;
        };
        match msg {
            FromWorker::Accepted { ack, accepted } => {
                let Some(mut conn) = w.unacked.remove(&ack) else {
                    return Some(format!(
                        "answered for connection {ack}, which it does not hold"
                    ));
                };
                if accepted {
                    w.taken += 1;
                    drop(conn);
                } else {
                    // A worker on its way out, or one that closed this
                    // server, refuses for that reason: it does not count.
                    let k = conn.server;
                    if !w.stopping && w.servers & (1 << k) != 0 {
                        conn.refusals += 1;
                    }
                    let holders = self
                        .workers
                        .iter()
                        .flatten()
                        .filter(|w| w.servers & (1 << k) != 0 && !w.stopping)
                        .count();
                    if conn.refusals > 0 && conn.refusals as usize >= holders {
                        info!(
                            "closing a connection from {}: every worker serving {} refused it",
                            conn.peer, self.servers[k].addr
                        );
                    } else {
                        debug!("connection {} refused by a worker: to another", conn.id);
                        self.hand_back(conn);
                    }
                }
                self.accept_paused_until = None;
            }
            FromWorker::HandleAck => {
                link.handles.pop_front();
            }
            FromWorker::HandleNack => {
                // The fd did not arrive with its line: the connection goes
                // to another worker (Node's own primary would resend it).
                let id = link.handles.pop_front();
                let worker = w.id;
                match id.and_then(|id| w.unacked.remove(&id)) {
                    Some(conn) => self.hand_back(conn),
                    None => warn!(worker, "worker {worker} did not receive a listening socket"),
                }
            }
            FromWorker::Online => debug!(worker = w.id, "worker {} online", w.id),
            FromWorker::QueryServer(q) => self.on_query(i, &q),
            FromWorker::Listening => {
                if w.ping_at.is_none() && !w.stopping {
                    // Hang detection: a connection unanswered too long.
                    w.ping_at = self
                        .settings
                        .worker_timeout
                        .map(|t| now + super::supervisor::ping_interval(t));
                }
                if !w.ready && !w.stopping && self.settings.ready == Ready::Hello {
                    self.on_hello(i, false);
                }
            }
            FromWorker::Close { key } => {
                if let Some(k) = self.servers.iter().position(|s| s.key == key) {
                    w.servers &= !(1 << k);
                }
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                let reply = self.next_seq();
                self.on_worker_disconnect(i, reply, seq);
            }
            FromWorker::OtherInternal => {}
            FromWorker::App => {
                let event = Event::Message {
                    id: w.id,
                    data: line.to_vec(),
                };
                self.emit(event);
            }
        }
        None
    }

    /// The worker called `cluster.worker.disconnect()`: it is answered (or
    /// it would wait forever), gets no more connections, has the shutdown
    /// timeout to finish, and its slot gets a new worker now.
    fn on_worker_disconnect(&mut self, i: usize, seq: u64, ack: u64) {
        let (now, timeout) = (self.now, self.settings.shutdown_timeout);
        let w = self.workers[i].as_mut().expect("a live worker");
        self.line.clear();
        wire::reply(&mut self.line, seq, ack);
        if let Some(Link::Node(link)) = w.channel.as_mut() {
            let _ = link.send(&self.line, None);
        }
        if w.stopping {
            return;
        }
        info!(
            worker = w.id,
            "worker {} (pid {}) disconnects by itself; it is replaced", w.id, w.pid
        );
        w.stopping = true;
        w.asked_to_stop = true;
        w.term_at = Some(now + timeout / 2);
        w.kill_at = Some(now + timeout);
        let (slot, role, uptime) = (w.slot, w.role, now.saturating_duration_since(w.started));
        w.role = Role::Retiring;
        if role == Role::Current
            && self.slots[slot].current == Some(i)
            && self.shutdown_at.is_none()
        {
            self.slots[slot].current = None;
            if self.slots[slot].active {
                self.schedule_restart(slot, uptime);
            }
        }
    }

    /// Answers a worker's `listen()`.
    fn on_query(&mut self, i: usize, q: &Query<'_>) {
        let Some(w) = self.workers[i].as_ref() else {
            return;
        };
        if w.stopping {
            // As Node's primary: a worker on its way out gets no server.
            return;
        }
        let (slot, id) = (w.slot, w.id);
        let seq = self.next_seq();
        let key = wire::server_key(q);
        let found = self.servers.iter().position(|s| s.key == key);
        let k = match found {
            Some(k) if self.servers[k].listener.is_some() => Ok(k),
            Some(_) => Err(-libc::ECANCELED),
            None => self.open_server(id, q, key.clone()),
        };
        let k = match k {
            Ok(k) => k,
            Err(errno) => {
                self.line.clear();
                wire::reply_error(&mut self.line, seq, q.seq, &wire::json_string(&key), errno);
                self.send_line(i, None);
                return;
            }
        };
        let server = &mut self.servers[k];
        if server.data == "null" {
            server.data = q.data.get().to_string();
        }
        self.line.clear();
        let fd = if !self.settings.sched.is_kernel() {
            wire::reply_rr(
                &mut self.line,
                seq,
                q.seq,
                &server.key_json,
                &server.data,
                server.addr,
            );
            None
        } else {
            wire::reply_handle(&mut self.line, seq, q.seq, &server.key_json, &server.data);
            let listener = self.ensure_slot_listener(k, slot).and_then(|()| {
                self.slot_listener(k, slot)
                    .ok_or_else(|| io::Error::other("closed"))?
                    .try_clone()
            });
            match listener {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!(worker = id, "no listening socket for worker {id}: {e}");
                    self.line.clear();
                    let errno = -e.raw_os_error().unwrap_or(libc::EINVAL);
                    let key_json = self.servers[k].key_json.clone();
                    wire::reply_error(&mut self.line, seq, q.seq, &key_json, errno);
                    self.send_line(i, None);
                    return;
                }
            }
        };
        if self.send_line(i, fd.as_ref()) {
            let w = self.workers[i].as_mut().expect("a live worker");
            w.servers |= 1 << k;
            if let (Some(_), Some(Link::Node(link))) = (&fd, w.channel.as_mut()) {
                link.handles.push_back(0);
            }
        }
    }

    /// Sends `self.line` (and `fd`) to Node worker `i`; a broken channel
    /// cuts the worker off.
    fn send_line(&mut self, i: usize, fd: Option<&TcpListener>) -> bool {
        let Some(w) = self.workers[i].as_mut() else {
            return false;
        };
        let Some(Link::Node(link)) = w.channel.as_mut() else {
            return false;
        };
        match link.send(&self.line, fd.map(|l| l.as_fd())) {
            Ok(()) => true,
            Err(e) => {
                warn!(worker = w.id, "cannot send to worker {}: {e}", w.id);
                self.cut_off(i);
                false
            }
        }
    }

    /// Binds a new server for worker `id`'s query; a failure is the
    /// negative errno Node's worker turns into its server's `error`.
    fn open_server(&mut self, id: u64, q: &Query<'_>, key: String) -> Result<usize, i32> {
        let unsupported = match &q.address_type {
            AddressType::V4 | AddressType::V6 => q.fd.filter(|fd| *fd >= 0).map(|_| "an fd"),
            AddressType::Other(kind) if kind == "-1" => Some("a Unix socket"),
            AddressType::Other(kind) if kind.starts_with("udp") => Some("a UDP socket"),
            AddressType::Other(_) => Some("this kind of server"),
        };
        if let Some(what) = unsupported {
            warn!(
                worker = id,
                "worker {id} asked to listen on {what} ({key}): only TCP servers are served for Node workers"
            );
            return Err(-libc::EAFNOSUPPORT);
        }
        if self.servers.len() >= MAX_SERVERS {
            warn!(
                worker = id,
                "worker {id} asked for more than {MAX_SERVERS} servers"
            );
            return Err(-libc::EMFILE);
        }
        let port = u16::try_from(q.port).map_err(|_| -libc::EINVAL)?;
        let ip: Option<IpAddr> = match &q.address {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| {
                warn!(
                    worker = id,
                    "worker {id} asked to listen on `{a}`, not an IP address"
                );
                -libc::EINVAL
            })?),
        };
        let backlog = if q.backlog > 0 {
            q.backlog
        } else {
            self.settings.backlog
        };
        let reuseport = self.settings.sched == Sched::ReusePort;
        let spare_port = self
            .spare
            .as_ref()
            .and_then(|s| s.local_addr().ok())
            .map(|a| a.port());
        let bound = match spare_port {
            Some(p) if port == 0 || port == p => Ok(self.spare.take().expect("checked")),
            _ => {
                if let Some(p) = spare_port {
                    info!(
                        "the app listens on port {port} itself; --listen (port {p}) serves only a server that asks for port 0"
                    );
                }
                bind_for_node(ip, port, backlog, reuseport)
            }
        };
        let listener = bound.map_err(|e| {
            let asked = SocketAddr::new(ip.unwrap_or(Ipv6Addr::UNSPECIFIED.into()), port);
            warn!(worker = id, "cannot listen on {asked} for worker {id}: {e}");
            -e.raw_os_error().unwrap_or(libc::EINVAL)
        })?;
        // Non-blocking in every mode: in the kernel modes the workers get
        // this very socket, and libuv accepts once per wake-up relying on
        // it (a blocking one would freeze the worker that lost the race).
        let errno = |e: io::Error| -e.raw_os_error().unwrap_or(libc::EINVAL);
        listener.set_nonblocking(true).map_err(errno)?;
        let addr = listener.local_addr().map_err(errno)?;
        let server = Server::new(key.clone(), listener, addr);
        let k = self
            .add_server(server)
            .map_err(|e| -e.raw_os_error().unwrap_or(libc::EINVAL))?;
        info!(
            "listening on {addr} ({}) for the app's server {key}",
            self.mode_text()
        );
        Ok(k)
    }
}

/// Binds as Node would for `listen(port, ip)`: no address means `::`
/// dual-stack, or `0.0.0.0` where IPv6 is not available.
fn bind_for_node(
    ip: Option<IpAddr>,
    port: u16,
    backlog: i32,
    reuseport: bool,
) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    if let Some(ip) = ip {
        return super::bind(SocketAddr::new(ip, port), backlog, reuseport);
    }
    let dual = (|| {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        if reuseport {
            socket.set_reuse_port(true)?;
        }
        socket.bind(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port).into())?;
        socket.listen(backlog)?;
        Ok::<_, io::Error>(TcpListener::from(socket))
    })();
    match dual {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            super::bind(
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                backlog,
                reuseport,
            )
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_lines_are_compact_json_and_not_nodes_own() {
        assert_eq!(app_line(b"{ \"a\" :\n 1 }").unwrap(), b"{\"a\":1}\n");
        assert_eq!(app_line(b"\"hi\"").unwrap(), b"\"hi\"\n");
        assert!(app_line(b"not json").is_err());
        assert!(app_line(br#"{"cmd":"NODE_CLUSTER"}"#).is_err());
        assert!(app_line(br#"{"cmd":"mine"}"#).is_ok());
    }
}
