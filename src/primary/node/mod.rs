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

use super::api::Ready;
use super::event_loop::EventLoop;
use super::ids::{ServerIdx, WorkerIdx};
use super::process::{Link, Phase, Protocol, WorkerCommand};
use super::sched::Sched;
use super::server::{MAX_SERVERS, Server};
use crate::primary::timers::Timer;
use wire::{AddressType, FromWorker, Query, app_line};

/// Node's cluster gives each worker an inspector of its own: when the
/// primary runs with `--inspect` (or `--inspect-brk`, `--inspect-wait`,
/// `--inspect-port`), the `n`th worker it forks gets `--inspect-port=` the
/// primary's debug port (9229 unless the option says) plus `n`. This does
/// the same for a `node` worker command with such an option before its
/// script, or in `NODE_OPTIONS`: the command with `--inspect-port=PORT`
/// added after it, for the `n`th worker started (from 1). `None` for a
/// command without one.
pub(crate) fn inspect_port(cmd: &WorkerCommand, n: u32) -> Option<WorkerCommand> {
    if Protocol::detect(cmd) != Protocol::Node {
        return None;
    }
    // Node's own options come before the script; these take a value of
    // their own as the next argument.
    const WITH_VALUE: &[&str] = &[
        "-r",
        "--require",
        "--import",
        "--loader",
        "--experimental-loader",
        "-e",
        "--eval",
        "-p",
        "--print",
        "-C",
        "--conditions",
        "--title",
        "--env-file",
    ];
    let mut found: Option<(usize, Option<u16>)> = None;
    let mut skip = false;
    for (at, arg) in cmd.args.iter().enumerate() {
        let Some(arg) = arg.to_str() else {
            break;
        };
        if std::mem::take(&mut skip) {
            continue;
        }
        if !arg.starts_with('-') || arg == "--" {
            break;
        }
        if WITH_VALUE.contains(&arg) {
            skip = true;
        } else if let Some(port) = inspect_option(arg) {
            found = Some((at + 1, port.or(found.and_then(|f| f.1))));
        }
    }
    let from_env = || {
        let options = cmd
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "NODE_OPTIONS")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var_os("NODE_OPTIONS"))?;
        let options = options.to_str()?.to_string();
        let ports: Vec<Option<u16>> = options
            .split_whitespace()
            .filter_map(inspect_option)
            .collect();
        (!ports.is_empty()).then(|| (0, ports.into_iter().flatten().next_back()))
    };
    let (at, port) = found.or_else(from_env)?;
    let base = u32::from(port.unwrap_or(9229));
    let mut port = if base == 0 { 0 } else { base + n };
    // Node wraps past the last port to the first unprivileged one.
    while port > 65535 {
        port = port - 65535 + 1024 - 1;
    }
    let mut with_port = cmd.clone();
    with_port
        .args
        .insert(at, format!("--inspect-port={port}").into());
    Some(with_port)
}

/// Whether `arg` is one of Node's inspector options, and the port it names
/// if any (`--inspect=9230`, `--inspect=0.0.0.0:9230`).
fn inspect_option(arg: &str) -> Option<Option<u16>> {
    let (name, value) = match arg.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (arg, None),
    };
    if !matches!(
        name,
        "--inspect" | "--inspect-brk" | "--inspect-wait" | "--inspect-port" | "--debug-port"
    ) {
        return None;
    }
    Some(
        value
            .and_then(|v| v.rsplit(':').next())
            .and_then(|p| p.parse().ok()),
    )
}

/// npm, yarn, pnpm and npx run the app as a child of their own, and being
/// Node programs themselves they take Node's cluster channel
/// (`NODE_CHANNEL_FD`) for their own process: the app would never be a
/// worker (it would bind the port itself, and outlive a stop). For such a
/// command, why it cannot work and the command that does: the script's own
/// command from `package.json` in the current directory when it can be
/// found.
pub(crate) fn package_runner_problem(cmd: &WorkerCommand) -> Option<String> {
    let program = std::path::Path::new(&cmd.program).file_name()?.to_str()?;
    let runner = match program {
        "npm" | "yarn" | "pnpm" | "npx" => program,
        _ => return None,
    };
    let args: Vec<&str> = cmd.args.iter().filter_map(|a| a.to_str()).collect();
    let shown = std::iter::once(runner)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let why = format!(
        "`{shown}` runs the app as a child of {runner}, which, a Node program itself, takes Node's cluster channel, so the app would not be a worker"
    );
    let script = script_name(runner, &args);
    let command = script.as_deref().and_then(|name| {
        let text = std::fs::read_to_string("package.json").ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        match json
            .pointer(&format!("/scripts/{name}"))
            .and_then(|s| s.as_str())
        {
            Some(s) => Some(s.to_string()),
            // npm's own default for `npm start`.
            None if name == "start" && std::path::Path::new("server.js").exists() => {
                Some("node server.js".into())
            }
            None => None,
        }
    });
    Some(match command {
        Some(command) => format!(
            "{why}: run the script's own command instead: `{}`",
            suggest(&command)
        ),
        None => format!("{why}: run the app's own command instead, e.g. `-- node app.js`"),
    })
}

/// The script `npm start`, `npm run X`, `yarn X`, `pnpm run X`... runs.
fn script_name(runner: &str, args: &[&str]) -> Option<String> {
    let mut words = args.iter().copied().filter(|a| !a.starts_with('-'));
    let first = words.next()?;
    match (runner, first) {
        ("npx", _) => None,
        (_, "run" | "run-script" | "rum" | "urn") => words.next().map(String::from),
        (_, "start" | "test" | "restart" | "stop") => Some(first.to_string()),
        ("npm", _) => None,
        // yarn and pnpm run a script by its name alone.
        _ => Some(first.to_string()),
    }
}

/// The distributor arguments after which `script` (a package.json script)
/// runs as a worker: the command itself when it is a plain `node ...`, else
/// through `sh -c`, which passes Node's channel on to the app.
fn suggest(script: &str) -> String {
    let plain = !script.contains(|c: char| "&|;<>()$`\\'\"*?=\n".contains(c));
    if plain && script.split_whitespace().next() == Some("node") {
        format!("-- {script}")
    } else {
        format!(
            "--protocol node -- sh -c '{}'",
            script.replace('\'', "'\\''")
        )
    }
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
    pub(super) fn on_node_lines(&mut self, i: WorkerIdx) -> Option<String> {
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

    /// Node worker `i` answered `accepted: false` for connection `id`: it
    /// goes to another worker, or is closed once every worker serving its
    /// server has refused it.
    fn refused(&mut self, i: WorkerIdx, id: u64) -> Result<(), String> {
        let Ok(mut conn) = self.ledger.take_back(i, id) else {
            return Err(format!("refused connection {id}, which it does not hold"));
        };
        let w = self.workers[i].as_ref().expect("reading a live worker");
        // A worker on its way out, or one that closed this server, refuses
        // for that reason: it does not count.
        let k = conn.server;
        if !w.is_stopping() && w.servers & (1 << k.0) != 0 {
            conn.refusals += 1;
        }
        let holders = self
            .workers
            .iter()
            .flatten()
            .filter(|w| w.servers & (1 << k.0) != 0 && !w.is_stopping())
            .count();
        if conn.refusals > 0 && conn.refusals as usize >= holders {
            info!(
                "closing a connection from {}: every worker serving {} refused it",
                conn.peer, self.servers[k].addr
            );
        } else {
            debug!("connection {} refused by a worker: to another", conn.id);
            self.ledger.hand_back(conn);
        }
        self.accept.accept_paused_until = None;
        Ok(())
    }

    fn on_node_message(
        &mut self,
        i: WorkerIdx,
        msg: FromWorker<'_>,
        line: &[u8],
    ) -> Option<String> {
        let now = self.now;
        let w = self.workers[i].as_mut().expect("reading a live worker");
        w.last_seen = now;
        let Some(Link::Node(link)) = w.channel.as_mut() else {
            return None;
        };
        match msg {
            FromWorker::Accepted {
                ack,
                accepted: true,
            } => {
                return self.acknowledged(i, [ack]).err();
            }
            FromWorker::Accepted {
                ack,
                accepted: false,
            } => return self.refused(i, ack).err(),
            FromWorker::HandleAck => {
                link.handles.pop_front();
            }
            FromWorker::HandleNack => {
                // The fd did not arrive with its line: the connection goes
                // to another worker (Node's own primary would resend it).
                let id = link.handles.pop_front();
                let worker = w.id;
                match id.and_then(|id| self.ledger.take_back(i, id).ok()) {
                    Some(conn) => self.ledger.hand_back(conn),
                    None => warn!(worker, "worker {worker} did not receive a listening socket"),
                }
            }
            FromWorker::Online => debug!(worker = w.id, "worker {} online", w.id),
            FromWorker::QueryServer(q) => self.on_query(i, &q),
            FromWorker::Listening => {
                if !w.timers.is_set(Timer::Ping) && !w.is_stopping() {
                    // Hang detection: a connection unanswered too long.
                    w.timers.set_opt(
                        Timer::Ping,
                        self.settings
                            .worker_timeout
                            .map(|t| now + super::timers::ping_interval(t)),
                    );
                }
                if w.phase == Phase::Starting && self.settings.ready == Ready::Hello {
                    self.on_hello(i, false);
                }
            }
            FromWorker::Close { key } => {
                if let Some(k) = self.servers.iter().position(|s| s.key == key) {
                    w.servers &= !(1 << k);
                }
                if w.servers == 0 && w.is_ready() {
                    // A worker without a server serves nothing: it is
                    // leaving (cluster.worker.disconnect() closes the
                    // servers first), or of no more use.
                    self.on_leaving(i, "closed its last server", false);
                }
            }
            FromWorker::ExitedAfterDisconnect { seq } => {
                let reply = self.next_seq();
                self.on_worker_disconnect(i, reply, seq);
            }
            FromWorker::OtherInternal => {}
            FromWorker::App => self.on_worker_message(i, line),
        }
        None
    }

    /// The worker called `cluster.worker.disconnect()`: it is answered (or
    /// it would wait forever), gets no more connections, has the shutdown
    /// timeout to finish, and its slot gets a new worker now.
    fn on_worker_disconnect(&mut self, i: WorkerIdx, seq: u64, ack: u64) {
        let w = self.workers[i].as_mut().expect("a live worker");
        self.writer.line.clear();
        wire::reply(&mut self.writer.line, seq, ack);
        if let Some(Link::Node(link)) = w.channel.as_mut() {
            let _ = link.send(&self.writer.line, None);
        }
        self.on_leaving(
            i,
            "disconnects by itself (cluster.worker.disconnect())",
            false,
        );
    }

    /// Answers a worker's `listen()`.
    fn on_query(&mut self, i: WorkerIdx, q: &Query<'_>) {
        let Some(w) = self.workers[i].as_ref() else {
            return;
        };
        if w.is_stopping() {
            // As Node's primary: a worker on its way out gets no server.
            return;
        }
        let (slot, id) = (w.slot, w.id);
        let seq = self.next_seq();
        let key = wire::server_key(q);
        let found = self
            .servers
            .iter_enumerated()
            .find(|(_, s)| s.key == key)
            .map(|(k, _)| k);
        let k = match found {
            Some(k) if self.servers[k].listener.is_some() => Ok(k),
            Some(_) => Err(-libc::ECANCELED),
            None => self.open_server(id, q, key.clone()),
        };
        let k = match k {
            Ok(k) => k,
            Err(errno) => {
                self.writer.line.clear();
                wire::reply_error(
                    &mut self.writer.line,
                    seq,
                    q.seq,
                    &wire::json_string(&key),
                    errno,
                );
                self.send_line(i, None);
                return;
            }
        };
        let server = &mut self.servers[k];
        if server.data == "null" {
            server.data = q.data.get().to_string();
        }
        self.writer.line.clear();
        let fd = if !self.settings.sched.is_kernel() {
            wire::reply_rr(
                &mut self.writer.line,
                seq,
                q.seq,
                &server.key_json,
                &server.data,
                server.addr,
            );
            None
        } else {
            wire::reply_handle(
                &mut self.writer.line,
                seq,
                q.seq,
                &server.key_json,
                &server.data,
            );
            let listener = self.ensure_slot_listener(k, slot).and_then(|()| {
                self.slot_listener(k, slot)
                    .ok_or_else(|| io::Error::other("closed"))?
                    .try_clone()
            });
            match listener {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!(worker = id, "no listening socket for worker {id}: {e}");
                    self.writer.line.clear();
                    let errno = -e.raw_os_error().unwrap_or(libc::EINVAL);
                    let key_json = self.servers[k].key_json.clone();
                    wire::reply_error(&mut self.writer.line, seq, q.seq, &key_json, errno);
                    self.send_line(i, None);
                    return;
                }
            }
        };
        if self.send_line(i, fd.as_ref()) {
            let w = self.workers[i].as_mut().expect("a live worker");
            w.servers |= 1 << k.0;
            if let (Some(_), Some(Link::Node(link))) = (&fd, w.channel.as_mut()) {
                link.handles.push_back(0);
            }
        }
    }

    /// Sends `self.writer.line` (and `fd`) to Node worker `i`; a broken channel
    /// cuts the worker off.
    fn send_line(&mut self, i: WorkerIdx, fd: Option<&TcpListener>) -> bool {
        let Some(w) = self.workers[i].as_mut() else {
            return false;
        };
        let Some(Link::Node(link)) = w.channel.as_mut() else {
            return false;
        };
        match link.send(&self.writer.line, fd.map(|l| l.as_fd())) {
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
    fn open_server(&mut self, id: u64, q: &Query<'_>, key: String) -> Result<ServerIdx, i32> {
        let unsupported = match &q.address_type {
            AddressType::V4 | AddressType::V6 => q.fd.filter(|fd| *fd >= 0).map(|_| "an fd"),
            AddressType::Other(kind) if kind == "-1" => Some("a Unix socket"),
            AddressType::Other(kind) if kind.starts_with("udp") => Some("a UDP socket"),
            AddressType::Other(_) => Some("this kind of server"),
        };
        if let Some(what) = unsupported {
            warn!(
                worker = id,
                "worker {id} asked to listen on {what} ({}): only TCP servers are served for Node workers",
                listen_call(q)
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
        let asked = SocketAddr::new(ip.unwrap_or(Ipv6Addr::UNSPECIFIED.into()), port);
        let listen = self.local_addr();
        // Handed over by the primary before an upgrade: served as it was.
        if let Some(at) = self.accept.inherited_node.iter().position(|n| n.key == key) {
            let n = self.accept.inherited_node.swap_remove(at);
            let errno = |e: io::Error| -e.raw_os_error().unwrap_or(libc::EINVAL);
            let addr = n.listener.local_addr().map_err(errno)?;
            let k = self
                .add_server(Server::new(key, n.listener, addr))
                .map_err(errno)?;
            let server = &mut self.servers[k];
            for (slot, l) in n.slots {
                if server.slot_listeners.len() < slot {
                    server.slot_listeners.resize_with(slot, || None);
                }
                server.slot_listeners[slot - 1] = Some(l);
            }
            info!(
                "serving {addr} ({}) for the app's {}, handed over by the previous primary",
                self.mode_text(),
                listen_call(q)
            );
            return Ok(k);
        }
        let bound = match self.accept.spare.take() {
            // --listen serves the app's first server, on its address, when
            // the port agrees: Node's worker checks that its server got the
            // port it asked for.
            Some(spare) if port == 0 || port == listen.port() => {
                let call = listen_call(q);
                info!("the app's {call} is served on {listen} (--listen)");
                socket2::SockRef::from(&spare)
                    .listen(backlog)
                    .map(|()| spare)
            }
            Some(_) => {
                let problem = format!(
                    "the app listens on port {port} itself, but --listen asks for {listen}: a Node app cannot be moved to another port (it checks that it got the port it asked for); drop --listen (the app's port wins), or have the app listen on port 0 or {}",
                    listen.port()
                );
                self.stop_for(problem);
                return Err(-libc::EADDRINUSE);
            }
            None => bind_for_node(ip, port, backlog, reuseport),
        };
        let listener = bound.map_err(|e| {
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
            "listening on {addr} ({}) for the app's {}",
            self.mode_text(),
            listen_call(q)
        );
        Ok(k)
    }
}

/// A worker's `listen()` as the app wrote it, for the log: `listen(3000)`,
/// `listen(3000, '127.0.0.1')`, `listen(0)`, with which of its listens on
/// that address it is when not the first (Node's key, `null:3000:4:...`,
/// says the same less plainly).
fn listen_call(q: &Query<'_>) -> String {
    let mut call = match &q.address {
        None => format!("listen({})", q.port),
        Some(a) => format!("listen({}, '{a}')", q.port),
    };
    if q.index > 0 {
        call.push_str(&format!(" (its listen number {} there)", q.index + 1));
    }
    call
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
        return super::server::bind(SocketAddr::new(ip, port), backlog, reuseport);
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
            super::server::bind(
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

    fn args(cmd: &WorkerCommand) -> Vec<String> {
        cmd.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn inspector_ports_follow_nodes_cluster() {
        let node = |a: &[&str]| WorkerCommand::new("/usr/bin/node", a.iter().copied());
        let with = |a: &[&str], n| inspect_port(&node(a), n).map(|c| args(&c));
        assert_eq!(
            with(&["--inspect", "app.js"], 1).unwrap(),
            ["--inspect", "--inspect-port=9230", "app.js"]
        );
        assert_eq!(
            with(
                &["-r", "x", "--inspect=0.0.0.0:9300", "app.js", "--inspect"],
                2
            )
            .unwrap(),
            [
                "-r",
                "x",
                "--inspect=0.0.0.0:9300",
                "--inspect-port=9302",
                "app.js",
                "--inspect"
            ]
        );
        assert_eq!(
            with(&["--inspect-brk=0", "app.js"], 3).unwrap(),
            ["--inspect-brk=0", "--inspect-port=0", "app.js"]
        );
        // Past the last port, Node wraps to the first unprivileged one.
        assert_eq!(
            with(&["--inspect=65535", "app.js"], 1).unwrap()[1],
            "--inspect-port=1024"
        );
        // The app's own arguments, and programs other than node, are not
        // Node's options.
        assert_eq!(with(&["app.js", "--inspect"], 1), None);
        assert_eq!(with(&["app.js"], 1), None);
        let python = WorkerCommand::new("python3", ["--inspect", "app.py"]);
        assert!(inspect_port(&python, 1).is_none());
        let options =
            node(&["app.js"]).env("NODE_OPTIONS", "--max-old-space-size=100 --inspect=9400");
        assert_eq!(
            args(&inspect_port(&options, 1).unwrap()),
            ["--inspect-port=9401", "app.js"]
        );
    }

    #[test]
    fn package_scripts_become_commands() {
        assert_eq!(script_name("npm", &["start"]).as_deref(), Some("start"));
        assert_eq!(
            script_name("npm", &["run", "dev", "--", "-x"]).as_deref(),
            Some("dev")
        );
        assert_eq!(script_name("npm", &["install"]), None);
        assert_eq!(script_name("yarn", &["dev"]).as_deref(), Some("dev"));
        assert_eq!(
            script_name("pnpm", &["--silent", "start"]).as_deref(),
            Some("start")
        );
        assert_eq!(script_name("npx", &["serve"]), None);
        assert_eq!(suggest("node server.js"), "-- node server.js");
        assert_eq!(
            suggest("node a.js && node b.js"),
            "--protocol node -- sh -c 'node a.js && node b.js'"
        );
        assert_eq!(
            suggest("echo 'hi' | node x.js"),
            "--protocol node -- sh -c 'echo '\\''hi'\\'' | node x.js'"
        );
        assert_eq!(
            suggest("nodemon app.js"),
            "--protocol node -- sh -c 'nodemon app.js'"
        );
    }

    #[test]
    fn app_lines_are_compact_json_and_not_nodes_own() {
        assert_eq!(app_line(b"{ \"a\" :\n 1 }").unwrap(), b"{\"a\":1}\n");
        assert_eq!(app_line(b"\"hi\"").unwrap(), b"\"hi\"\n");
        assert!(app_line(b"not json").is_err());
        assert!(app_line(br#"{"cmd":"NODE_CLUSTER"}"#).is_err());
        assert!(app_line(br#"{"cmd":"mine"}"#).is_ok());
    }
}
