//! Hot upgrade of the primary itself (SIGUSR2, `distributor ctl upgrade`,
//! [`crate::Handle::upgrade_and_wait`]): the running primary starts the
//! program at its own path with its own arguments, handing it every
//! listening socket, and stops only once the new one is ready.
//!
//! Owns both sides of the hand-over. The old primary ([`Upgrade`]) spawns
//! the new one with the sockets at fds 3, 4, ... (named in
//! `DISTRIBUTOR_UPGRADE`: `main=3,slot1=4,metrics=5,channel=6`) and a
//! stream socket to talk over. The new primary ([`Inherited`]) serves those
//! sockets instead of binding, starts its workers and, once all are ready,
//! writes `ready`. The old one then stops accepting and writes `go`; only
//! then does a new primary in rr start accepting (connections wait in the
//! backlog meanwhile: neither loses nor doubles one). The old one tells
//! systemd `MAINPID=` the new pid, stops its workers gracefully and exits
//! 0. A new primary that exits first, or is not ready within the upgrade
//! timeout, is killed with its process group, and the old one goes on.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Instant;

use crossbeam_channel::Sender;
use mio::Interest;
use mio::unix::SourceFd;
use tracing::{info, warn};

use super::event_loop::EventLoop;
use super::ids::ServerIdx;
use super::source::Source;
use crate::sys;

/// Names the fds a new primary inherits (see the module).
pub(crate) const ENV_UPGRADE: &str = "DISTRIBUTOR_UPGRADE";
/// The number of workers the new primary starts: the old one's active
/// slots (after any scaling), not the `--workers` of the command line.
pub(crate) const ENV_WORKERS: &str = "DISTRIBUTOR_UPGRADE_WORKERS";
/// Node apps: the keys of the servers handed over as `nodeK` (a JSON
/// array of strings, by K).
pub(crate) const ENV_NODE_KEYS: &str = "DISTRIBUTOR_UPGRADE_NODE_KEYS";

/// A Node app's server handed over: its key, its listener, and in
/// reuseport its slots' sockets.
#[derive(Debug)]
pub(crate) struct NodeServer {
    pub key: String,
    pub listener: TcpListener,
    pub slots: Vec<(usize, TcpListener)>,
}

/// The longest message either side writes.
const MAX_LINE: usize = 64;

/// How to start the new primary: found at start, so that a program file
/// replaced since is the one that runs.
#[derive(Debug, Clone)]
pub(crate) struct Program {
    pub path: PathBuf,
    pub args: Vec<OsString>,
}

impl Program {
    /// This process's program as its command line named it: a path
    /// (absolute, from the working directory at start), or a name found on
    /// `PATH`; `None` when neither resolves.
    pub fn own() -> Option<Program> {
        let mut argv = std::env::args_os();
        let argv0 = PathBuf::from(argv.next()?);
        let path = if argv0.as_os_str().as_encoded_bytes().contains(&b'/') {
            std::env::current_dir().ok()?.join(argv0)
        } else {
            let dirs = std::env::var_os("PATH")?;
            std::env::split_paths(&dirs)
                .map(|d| d.join(&argv0))
                .find(|p| p.is_file())?
        };
        Some(Program {
            path,
            args: argv.collect(),
        })
    }
}

/// What a new primary took over from the old one.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    /// The server's listening socket (slot 1's in reuseport).
    pub main: Option<TcpListener>,
    /// Reuseport: the sockets of the other slots, by slot index (from 1).
    pub slots: Vec<(usize, TcpListener)>,
    /// The metrics endpoint's listener.
    pub metrics: Option<TcpListener>,
    /// The stream to the old primary.
    pub parent: Option<UnixStream>,
    /// How many workers to start.
    pub workers: Option<usize>,
    /// `--steer`: the old primary's maps and program (see
    /// [`super::steer::Steering::fds`]).
    pub steer: Option<[std::os::fd::OwnedFd; 4]>,
    /// The old primary's control socket (served on if the path is the
    /// same: `--control PATH`).
    pub control: Option<std::os::unix::net::UnixListener>,
    /// Node apps: the servers the old primary's workers asked for.
    pub node: Vec<NodeServer>,
}

/// Takes what the old primary handed over, when this process is a new
/// primary of an upgrade (`DISTRIBUTOR_UPGRADE` set); `None` otherwise.
/// Each fd is checked and set close-on-exec.
///
/// # Errors
/// A malformed variable, or an fd that is not open.
pub(crate) fn take_inherited() -> io::Result<Option<Inherited>> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(spec) = std::env::var_os(ENV_UPGRADE) else {
        return Ok(None);
    };
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{ENV_UPGRADE}: {what}"),
        )
    };
    let spec = spec.into_string().map_err(|_| bad("not UTF-8"))?;
    let mut steer: [Option<std::os::fd::OwnedFd>; 4] = Default::default();
    let keys: Vec<String> = match std::env::var(ENV_NODE_KEYS) {
        Ok(json) => serde_json::from_str(&json).map_err(|_| bad("node keys"))?,
        Err(_) => Vec::new(),
    };
    // By K: the server's listener and its slots' sockets.
    type Handed = (usize, Option<TcpListener>, Vec<(usize, TcpListener)>);
    let mut node: Vec<Handed> = Vec::new();
    let mut got = Inherited {
        workers: std::env::var(ENV_WORKERS).ok().and_then(|n| n.parse().ok()),
        ..Inherited::default()
    };
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        let (name, fd) = item.split_once('=').ok_or_else(|| bad(item))?;
        let fd: RawFd = fd.parse().map_err(|_| bad(item))?;
        if fd < sys::LISTEN_FD {
            return Err(bad(item));
        }
        let owned = sys::take_inherited_fd(fd).map_err(|e| bad(&format!("{item}: {e}")))?;
        match name {
            "main" => got.main = Some(TcpListener::from(owned)),
            "metrics" => got.metrics = Some(TcpListener::from(owned)),
            "channel" => got.parent = Some(UnixStream::from(owned)),
            "control" => got.control = Some(std::os::unix::net::UnixListener::from(owned)),
            "steer_socks" => steer[0] = Some(owned),
            "steer_schedule" => steer[1] = Some(owned),
            "steer_counter" => steer[2] = Some(owned),
            "steer_prog" => steer[3] = Some(owned),
            n if n.starts_with("node") => {
                // nodeK, or nodeK_slotN in reuseport.
                let rest = &n["node".len()..];
                let (k, slot) = match rest.split_once("_slot") {
                    Some((k, s)) => (k, Some(s)),
                    None => (rest, None),
                };
                let k: usize = k.parse().map_err(|_| bad(item))?;
                let at = match node.iter().position(|(kk, _, _)| *kk == k) {
                    Some(at) => at,
                    None => {
                        node.push((k, None, Vec::new()));
                        node.len() - 1
                    }
                };
                match slot {
                    None => node[at].1 = Some(TcpListener::from(owned)),
                    Some(s) => {
                        let s: usize = s.parse().map_err(|_| bad(item))?;
                        node[at].2.push((s, TcpListener::from(owned)));
                    }
                }
            }
            slot => {
                let n: usize = slot
                    .strip_prefix("slot")
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| bad(item))?;
                got.slots.push((n, TcpListener::from(owned)));
            }
        }
    }
    if let [Some(a), Some(b), Some(c), Some(d)] = steer {
        got.steer = Some([a, b, c, d]);
    }
    for (k, listener, slots) in node {
        let (Some(key), Some(listener)) = (keys.get(k), listener) else {
            return Err(bad("a Node server without its key or listener"));
        };
        got.node.push(NodeServer {
            key: key.clone(),
            listener,
            slots,
        });
    }
    Ok(Some(got))
}

/// An upgrade under way, on the old primary's side.
#[derive(Debug)]
pub(crate) struct Upgrade {
    child: Child,
    pid: u32,
    channel: UnixStream,
    /// What the new primary wrote so far.
    buf: Vec<u8>,
    /// The new primary must be ready by then.
    pub deadline: Instant,
    /// Who waits for the outcome: the new pid, or why it failed.
    waiters: Vec<Sender<Result<u32, String>>>,
}

/// The other primary of an upgrade, on the new primary's side.
#[derive(Debug)]
pub(crate) struct Parent {
    channel: UnixStream,
    buf: Vec<u8>,
    /// `ready` was written.
    pub told_ready: bool,
    /// `go` came: the old primary no longer accepts.
    pub released: bool,
}

impl Parent {
    pub fn raw_fd(&self) -> RawFd {
        self.channel.as_raw_fd()
    }

    pub fn new(channel: UnixStream) -> io::Result<Parent> {
        channel.set_nonblocking(true)?;
        Ok(Parent {
            channel,
            buf: Vec::new(),
            told_ready: false,
            released: false,
        })
    }
}

/// Reads what waits on `channel` into `buf`; true at end of file.
fn read_some(channel: &mut UnixStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; MAX_LINE];
    loop {
        match channel.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) if buf.len() + n <= MAX_LINE => buf.extend_from_slice(&chunk[..n]),
            // A peer that writes more than any message is not one.
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Spawns `program` as the new primary with `fds` (name, fd) at 3, 4, ...
/// and a channel after them; returns it and our end of the channel.
fn spawn(
    program: &Program,
    fds: &[(String, BorrowedFd<'_>)],
    workers: usize,
    node_keys: &str,
) -> io::Result<(Child, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    raw.push(theirs.as_raw_fd());
    let mut names: Vec<String> = fds
        .iter()
        .enumerate()
        .map(|(at, (name, _))| format!("{name}={}", sys::LISTEN_FD + at as RawFd))
        .collect();
    names.push(format!("channel={}", sys::LISTEN_FD + fds.len() as RawFd));
    let mut cmd = Command::new(&program.path);
    cmd.args(&program.args)
        .env(ENV_UPGRADE, names.join(","))
        .env(ENV_WORKERS, workers.to_string())
        .env(ENV_NODE_KEYS, node_keys)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES");
    sys::configure_inherit(&mut cmd, raw)?;
    let child = cmd.spawn()?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    Ok((child, ours))
}

impl EventLoop {
    /// Starts an upgrade (SIGUSR2, `ctl upgrade`, the handle); `reply`
    /// gets the outcome. Refused, with a log line, during another upgrade,
    /// a shutdown, for Node apps, or when the program cannot be found.
    pub(super) fn begin_upgrade(&mut self, reply: Option<Sender<Result<u32, String>>>) {
        let refuse = |why: String, reply: Option<Sender<Result<u32, String>>>| {
            warn!("upgrade refused: {why}");
            if let Some(tx) = reply {
                let _ = tx.try_send(Err(why));
            }
        };
        if let Some(u) = self.sup.upgrade.as_mut() {
            let why = format!("an upgrade is under way (new primary pid {})", u.pid);
            return refuse(why, reply);
        }
        if self.sup.shutdown_at.is_some() {
            return refuse("the primary is stopping".into(), reply);
        }
        if self.sup.parent.as_ref().is_some_and(|p| !p.released) {
            return refuse(
                "this primary is itself taking over from another; not yet released".into(),
                reply,
            );
        }
        let Some(program) = self.settings.program.clone() else {
            return refuse("this primary's program path is unknown".into(), reply);
        };
        let mut fds: Vec<(String, BorrowedFd<'_>)> = Vec::new();
        let node = self.settings.protocol == super::Protocol::Node;
        let mut node_keys: Vec<&str> = Vec::new();
        if node {
            // Node apps: every server a worker asked for, by key, and the
            // --listen socket not yet taken by one.
            if let Some(spare) = &self.accept.spare {
                fds.push(("main".into(), spare.as_fd()));
            }
            for s in &self.servers {
                let Some(l) = &s.listener else { continue };
                let k = node_keys.len();
                node_keys.push(&s.key);
                fds.push((format!("node{k}"), l.as_fd()));
                for (at, l) in s.slot_listeners.iter().enumerate() {
                    if let Some(l) = l {
                        fds.push((format!("node{k}_slot{}", at + 1), l.as_fd()));
                    }
                }
            }
        }
        if let Some(s) = self.servers.get(ServerIdx(0)).filter(|_| !node) {
            if let Some(l) = &s.listener {
                fds.push(("main".into(), l.as_fd()));
            }
            for (at, l) in s.slot_listeners.iter().enumerate() {
                if let Some(l) = l {
                    fds.push((format!("slot{}", at + 1), l.as_fd()));
                }
            }
            if let Some(steering) = &s.steering {
                let names = [
                    "steer_socks",
                    "steer_schedule",
                    "steer_counter",
                    "steer_prog",
                ];
                for (name, fd) in names.into_iter().zip(steering.fds()) {
                    fds.push((name.into(), fd));
                }
            }
        }
        if let Some(m) = &self.metrics {
            fds.push(("metrics".into(), m.listener_fd()));
        }
        if let Some(c) = &self.sup.control {
            fds.push(("control".into(), c.listener.as_fd()));
        }
        let workers = self.sup.slots.iter().filter(|s| s.active).count().max(1);
        if fds.len() + 1 > sys::MAX_INHERITED {
            drop(fds);
            return refuse("too many sockets to hand over".into(), reply);
        }
        let keys = serde_json::to_string(&node_keys).unwrap_or_else(|_| "[]".into());
        let spawned = spawn(&program, &fds, workers, &keys);
        drop(fds);
        let (child, channel) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                return refuse(
                    format!("cannot start {}: {e}", program.path.display()),
                    reply,
                );
            }
        };
        let pid = child.id();
        // Until it takes over, the new primary and its group die with this
        // one, however this one dies.
        if let Some(g) = self.sup.guardian.as_mut() {
            g.watch(pid);
        }
        if let Err(e) = self.io.poll.registry().register(
            &mut SourceFd(&channel.as_raw_fd()),
            Source::Upgrade.token(),
            Interest::READABLE,
        ) {
            warn!("upgrade: cannot watch the new primary's channel: {e}");
        }
        info!(
            "upgrade: started the new primary {} (pid {pid}); this one serves until it is ready (timeout {:?})",
            program.path.display(),
            self.settings.upgrade_timeout
        );
        self.sup.upgrade = Some(Upgrade {
            child,
            pid,
            channel,
            buf: Vec::new(),
            deadline: self.now + self.settings.upgrade_timeout,
            waiters: reply.into_iter().collect(),
        });
    }

    /// The upgrade channel is readable: on the old side, the new primary
    /// is ready (or gone); on the new side, the old one released.
    pub(super) fn on_upgrade_channel(&mut self) {
        if let Some(u) = self.sup.upgrade.as_mut() {
            let eof = read_some(&mut u.channel, &mut u.buf);
            if u.buf.starts_with(b"ready\n") {
                self.complete_upgrade();
            } else if eof {
                // It closed its end: it exited or is about to; the exit
                // (SIGCHLD) says how.
                let _ = self
                    .io
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&u.channel.as_raw_fd()));
            }
            return;
        }
        if let Some(p) = self.sup.parent.as_mut() {
            let eof = read_some(&mut p.channel, &mut p.buf);
            if p.buf.starts_with(b"go\n") && !p.released {
                p.released = true;
                info!("upgrade: the previous primary released its sockets; accepting");
                self.start_accepting();
                self.tell_systemd_ready_after_release();
                for s in &mut self.servers {
                    if let Some(steering) = s.steering.as_mut() {
                        steering.forget_written();
                    }
                }
            } else if eof && !p.released {
                // The old primary gave up on this one (or died): it was
                // told to stop, or will be; nothing to take over.
                warn!("upgrade: the previous primary closed the channel before releasing");
                self.start_accepting();
                if let Some(p) = self.sup.parent.as_mut() {
                    p.released = true;
                }
            }
        }
    }

    /// New side: every slot is ready; says so once.
    pub(super) fn tell_parent_ready(&mut self) {
        let Some(p) = self.sup.parent.as_mut() else {
            return;
        };
        if p.told_ready {
            return;
        }
        p.told_ready = true;
        if let Err(e) = p.channel.write_all(b"ready\n") {
            warn!("upgrade: cannot tell the previous primary: {e}; accepting anyway");
            p.released = true;
            self.start_accepting();
            return;
        }
        info!("upgrade: every worker is ready; waiting for the previous primary to release");
    }

    /// Old side: the new primary is ready. Stop accepting, release it,
    /// hand systemd the new main pid, stop the workers, exit.
    fn complete_upgrade(&mut self) {
        let Some(mut u) = self.sup.upgrade.take() else {
            return;
        };
        // It outlives this primary from now on.
        if let Some(g) = self.sup.guardian.as_mut() {
            g.forget(u.pid);
        }
        let _ = self
            .io
            .poll
            .registry()
            .deregister(&mut SourceFd(&u.channel.as_raw_fd()));
        // Held connections go to this primary's workers first; then its
        // listeners close (the sockets live on in the new primary).
        self.close_listeners();
        if let Some(m) = self.metrics.as_mut() {
            m.stop_listening(self.io.poll.registry());
        }
        // The control socket: this primary stops answering on it before it
        // says anything, so that whoever hears of the upgrade finds only the
        // new one.
        if let Some(c) = &self.sup.control {
            c.release();
        }
        // The service's main process moves first, so that the new one's
        // READY=1 after `go` comes from the main process.
        super::supervisor::tell_systemd(&format!(
            "MAINPID={}\nSTATUS=upgraded: the new primary is pid {}",
            u.pid, u.pid
        ));
        if let Err(e) = u.channel.write_all(b"go\n") {
            warn!("upgrade: cannot release the new primary: {e}");
        }
        info!(
            "upgrade: the new primary (pid {}) is ready and takes over; stopping this one's workers",
            u.pid
        );
        for tx in u.waiters.drain(..) {
            let _ = tx.try_send(Ok(u.pid));
        }
        self.sup.upgraded_to = Some(u.pid);
        // The child lives on; dropping the handle neither kills nor waits.
        drop(u);
        self.begin_shutdown();
    }

    /// Old side: the new primary exited, or its time is up. Kills it with
    /// its process group and goes on serving.
    pub(super) fn abandon_upgrade(&mut self, why: String) {
        let Some(mut u) = self.sup.upgrade.take() else {
            return;
        };
        let _ = self
            .io
            .poll
            .registry()
            .deregister(&mut SourceFd(&u.channel.as_raw_fd()));
        // Its workers die with it (parent-death signal); anything else in
        // its group goes now.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(u.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = u.child.kill();
        let _ = u.child.wait();
        if let Some(g) = self.sup.guardian.as_mut() {
            g.forget(u.pid);
        }
        warn!("upgrade failed: {why}; this primary goes on serving");
        for tx in u.waiters.drain(..) {
            let _ = tx.try_send(Err(why.clone()));
        }
    }

    /// Old side, on SIGCHLD: whether the new primary exited.
    pub(super) fn reap_upgrade(&mut self) {
        let Some(u) = self.sup.upgrade.as_mut() else {
            return;
        };
        if let Ok(Some(status)) = u.child.try_wait() {
            let pid = u.pid;
            let how = super::process::describe_exit(&status);
            self.abandon_upgrade(format!(
                "the new primary (pid {pid}) exited with {how} before it was ready"
            ));
        }
    }

    /// Old side, on a timer: the new primary is late.
    pub(super) fn upgrade_timers(&mut self) {
        let late = self
            .sup
            .upgrade
            .as_ref()
            .is_some_and(|u| u.deadline <= self.now);
        if late {
            let (pid, timeout) = (
                self.sup.upgrade.as_ref().map_or(0, |u| u.pid),
                self.settings.upgrade_timeout,
            );
            self.abandon_upgrade(format!(
                "the new primary (pid {pid}) was not ready within {timeout:?}; it was killed"
            ));
        }
    }

    /// New side, released: now the service's main process, it says
    /// READY=1 (held back until now) if its workers are all ready.
    fn tell_systemd_ready_after_release(&mut self) {
        let (ready, active) = self.slots_ready();
        if ready == active && !self.sup.told_systemd_ready {
            self.sup.told_systemd_ready = true;
            super::supervisor::tell_systemd(&format!(
                "READY=1\nSTATUS={active} workers ready (upgraded)"
            ));
        }
    }

    /// New side: registers the listeners for accepting (rr), once the old
    /// primary released them.
    fn start_accepting(&mut self) {
        if self.settings.sched.is_kernel() {
            return;
        }
        for k in self.servers.indices() {
            if let Some(l) = &self.servers[k].listener {
                if let Err(e) = self.io.poll.registry().register(
                    &mut SourceFd(&l.as_raw_fd()),
                    Source::Listener(k).token(),
                    Interest::READABLE,
                ) {
                    warn!("upgrade: cannot accept on the inherited listener: {e}");
                }
            }
            self.servers[k].backlog_waiting = true;
        }
    }
}
