//! One worker process as the primary sees it ([`WorkerProc`]): the child,
//! its channel, its [`Phase`] (starting, ready, stopping) and its deadlines;
//! how workers are started ([`WorkerCommand`], [`Protocol`]). The
//! connections it holds are in the custody ledger, not here.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::ids::{ServerIdx, SlotIdx};
use super::node::link::NodeLink;
use super::output::{Relay, Stream};
use super::timers::Timers;
use crate::channel::Channel;
use crate::protocol;
use crate::sys;

/// How workers are started: a program, its arguments and extra environment.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub(crate) program: OsString,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
}

impl WorkerCommand {
    /// Runs `program` with `args` as each worker.
    pub fn new<P, I, A>(program: P, args: I) -> WorkerCommand
    where
        P: Into<OsString>,
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        WorkerCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
        }
    }

    /// Re-executes this very program with the same arguments, as Node's
    /// `cluster.fork()` does: the worker finds itself a worker through
    /// [`crate::is_worker`].
    pub fn current_exe() -> io::Result<WorkerCommand> {
        Ok(WorkerCommand::new(
            std::env::current_exe()?,
            std::env::args_os().skip(1),
        ))
    }

    /// Adds an environment variable for the workers.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The program, for messages.
    pub fn program(&self) -> &OsString {
        &self.program
    }
}

/// Sets `LISTEN_PID` to the shell's own pid, which the program keeps
/// through `exec`.
const LISTEN_PID_SHIM: &str = "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"";

/// A connection the primary accepted and still owns a copy of.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: u64,
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    /// The server (listener) it came in on.
    pub server: ServerIdx,
    /// When it was last sent to a worker (hang detection).
    pub sent: Instant,
    /// How many Node workers answered `accepted: false`.
    pub refusals: u32,
    /// `--sticky header:|cookie:|query:`: the key found in its first
    /// request.
    pub key: Option<u64>,
}

impl super::custody::Custody for Conn {
    fn id(&self) -> u64 {
        self.id
    }
    fn server(&self) -> ServerIdx {
        self.server
    }
}

/// Which protocol the workers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// This project's own (docs/PROTOCOL.md): the library's
    /// `WorkerListener`, examples/python/hello.py, or nothing at all in
    /// the kernel modes.
    #[default]
    Native,
    /// Node's cluster protocol: unmodified Node apps (`node app.js`) run
    /// as cluster workers of this primary (docs/NODE.md).
    Node,
}

impl Protocol {
    /// Node's when the program is `node` or `nodejs` (by its file name),
    /// or a Node package runner (`npm`, `yarn`, `pnpm`, `npx`, which
    /// [`crate::Builder::build`] then refuses with the command that works),
    /// else the native one.
    pub fn detect(cmd: &WorkerCommand) -> Protocol {
        let name = std::path::Path::new(&cmd.program).file_name();
        match name.and_then(|n| n.to_str()) {
            Some("node" | "nodejs" | "npm" | "yarn" | "pnpm" | "npx") => Protocol::Node,
            _ => Protocol::Native,
        }
    }

    /// The name on the command line: `native` or `node`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Native => "native",
            Protocol::Node => "node",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "native" | "distributor" => Ok(Protocol::Native),
            "node" | "nodejs" => Ok(Protocol::Node),
            _ => Err(format!("unknown protocol `{s}` (native or node)")),
        }
    }
}

/// A worker's channel, in the protocol it speaks.
#[derive(Debug)]
pub(crate) enum Link {
    Native(Channel),
    Node(NodeLink),
}

impl Link {
    /// Whether earlier messages still wait to be written (Node's stream
    /// channel; a native channel sends whole datagrams or nothing).
    pub fn blocked(&self) -> bool {
        match self {
            Link::Native(_) => false,
            Link::Node(l) => l.blocked(),
        }
    }
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Link::Native(c) => c.as_fd(),
            Link::Node(l) => l.as_fd(),
        }
    }
}

/// What a worker is for, which decides what its exit means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Its slot's worker: replaced when it exits.
    Current,
    /// Started beside its slot's current worker to take over from it once
    /// ready (a rolling reload, a recycle, a worker that said it is
    /// leaving); the old one is then asked to stop.
    Successor,
    /// Asked to stop (reload, scale-down, shutdown): not replaced.
    Retiring,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Started, not ready yet (no hello, per the readiness setting): gets
    /// no connections.
    Starting,
    /// Ready: gets connections.
    Ready,
    /// Asked to stop, leaving, or cut off: gets no more connections.
    /// `was_ready`: it was ready when it began to stop (a Node worker then
    /// gets `disconnect`; messages still reach it).
    Stopping { was_ready: bool },
}

impl From<Phase> for super::stats::WorkerState {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Starting => super::stats::WorkerState::Starting,
            Phase::Ready => super::stats::WorkerState::Ready,
            Phase::Stopping { .. } => super::stats::WorkerState::Stopping,
        }
    }
}

/// A running worker process.
#[derive(Debug)]
pub(crate) struct WorkerProc {
    pub id: u64,
    pub pid: u32,
    /// The slot it belongs to.
    pub slot: SlotIdx,
    pub role: Role,
    child: Child,
    /// `None` once the channel closed or was closed by the primary.
    pub channel: Option<Link>,
    /// The servers it may get connections for, one bit per server index.
    pub servers: u64,
    /// A Node worker (`Link::Node`), even after its channel is gone.
    pub node: bool,
    /// Where it is in its life: starting, ready, stopping.
    pub phase: Phase,
    /// Was ready at some point: an exit with status 0 after that is the
    /// worker's own choice (recycling itself), not a failure to start.
    pub served: bool,
    /// Its `--max-requests` limit (jitter included).
    pub max_requests: Option<u64>,
    /// It has been reaped: its exit is being handled.
    pub exited: bool,
    /// The number of the last heartbeat sent to it.
    pub last_ping: u64,
    /// Its replacement is decided (a limit reached, or it said it is
    /// leaving): no second one is queued.
    pub recycling: bool,
    /// The primary asked it to stop (shutdown, reload, scale-down): its
    /// exit is expected, not a failure.
    pub asked_to_stop: bool,
    /// The last send found the channel's buffer full; cleared on writable.
    pub channel_full: bool,
    pub started: Instant,
    /// Its deadlines (hello warning, readiness, heartbeat, SIGTERM and
    /// SIGKILL, ...).
    pub timers: Timers,
    /// When the worker last sent anything (hang detection).
    pub last_seen: Instant,
    /// It said hello: it speaks the protocol and answers pings.
    pub spoke: bool,
    /// The last `STATUS=` it sent to its notify socket.
    pub status: Option<String>,
}

impl WorkerProc {
    /// Starts one worker with a fresh channel. With `listen` (the kernel
    /// balancing modes) the worker also gets that listening socket by
    /// systemd's socket-activation convention: fd 3, `LISTEN_FDS=1`, and
    /// `LISTEN_PID` set to its own pid by a `/bin/sh` that then `exec`s the
    /// program (the pid is not known before the fork).
    ///
    /// A Node worker gets Node's environment instead: `NODE_UNIQUE_ID` (its
    /// id), `NODE_CHANNEL_FD` (a stream channel) and JSON serialisation;
    /// it asks for its listeners over the channel.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        cmd: &WorkerCommand,
        speaks: Protocol,
        id: u64,
        slot: SlotIdx,
        role: Role,
        listen: Option<BorrowedFd<'_>>,
        output: Option<&Relay>,
        now: Instant,
    ) -> io::Result<WorkerProc> {
        let (ours, theirs) = match speaks {
            Protocol::Native => {
                let (ours, theirs) = Channel::pair()?;
                sys::set_nonblocking(ours.as_fd(), true)?;
                (Link::Native(ours), theirs)
            }
            Protocol::Node => {
                let (ours, theirs) = NodeLink::pair()?;
                (Link::Node(ours), theirs)
            }
        };
        let listen = listen.filter(|_| speaks == Protocol::Native);
        let mut command = match listen {
            None => Command::new(&cmd.program),
            Some(_) => {
                let mut sh = Command::new("/bin/sh");
                sh.args(["-c", LISTEN_PID_SHIM, "distributor-worker"])
                    .arg(&cmd.program);
                sh
            }
        };
        command
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .env_remove("NODE_UNIQUE_ID")
            .env_remove("NODE_CHANNEL_FD")
            .env_remove("NODE_CHANNEL_SERIALIZATION_MODE")
            .env_remove(super::upgrade::ENV_UPGRADE)
            .env_remove(super::upgrade::ENV_WORKERS)
            .env_remove(super::upgrade::ENV_NODE_KEYS)
            .stdin(Stdio::null())
            .process_group(0);
        if listen.is_some() {
            command
                .env("LISTEN_FDS", "1")
                .env("LISTEN_FDNAMES", "distributor");
        }
        // The slot, which a worker's replacements keep: from 1 as in the
        // logs and metrics, and from 0 under PM2's name.
        command
            .env(protocol::ENV_SLOT, slot.number().to_string())
            .env("NODE_APP_INSTANCE", slot.0.to_string());
        let child_channel = sys::configure_worker_command(
            &mut command,
            theirs.as_raw_fd(),
            listen.map(|l| l.as_raw_fd()),
        );
        match speaks {
            Protocol::Native => {
                command
                    .env(protocol::ENV_PROTOCOL, protocol::VERSION.to_string())
                    .env(protocol::ENV_WORKER_ID, id.to_string())
                    .env(protocol::ENV_FD, child_channel.to_string())
                    // In a kernel mode (a listening socket to share) no
                    // policy reads completion reports: spare them.
                    .env(
                        protocol::ENV_REPORT_FINISHED,
                        if listen.is_some() { "0" } else { "1" },
                    );
            }
            Protocol::Node => {
                command
                    .env("NODE_UNIQUE_ID", id.to_string())
                    .env("NODE_CHANNEL_FD", child_channel.to_string())
                    .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
            }
        }
        if output.is_some() {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = command.spawn()?;
        if let Some(relay) = output {
            let pipes = [
                (Stream::Stdout, child.stdout.take().map(OwnedFd::from)),
                (Stream::Stderr, child.stderr.take().map(OwnedFd::from)),
            ];
            for (stream, pipe) in pipes {
                if let Some(pipe) = pipe {
                    sys::set_nonblocking(pipe.as_fd(), true)?;
                    relay.add(id, stream, pipe);
                }
            }
        }
        drop(theirs);
        Ok(WorkerProc {
            id,
            pid: child.id(),
            slot,
            role,
            child,
            channel: Some(ours),
            servers: 0,
            node: speaks == Protocol::Node,
            phase: Phase::Starting,
            served: false,
            max_requests: None,
            exited: false,
            last_ping: 0,
            recycling: false,
            asked_to_stop: false,
            channel_full: false,
            started: now,
            timers: Timers::default(),
            last_seen: now,
            spoke: false,
            status: None,
        })
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Whether the process has exited (it is reaped now if so; the status
    /// stays for [`WorkerProc::try_wait`]).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends `signal` to the worker's process group (it leads one of its
    /// own), so that what it started (npm's app, gunicorn's workers, a
    /// shell's command) gets it too, as a terminal or systemd's
    /// control-group stop would send it; to the worker alone if it left its
    /// group. A process already gone (but not yet reaped) is fine.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.pid as i32);
        if kill(Pid::from_raw(-pid.as_raw()), signal).is_err() {
            let _ = kill(pid, signal);
        }
    }

    /// Kills what is left of the worker's process group once the worker
    /// itself has exited and been reaped: nothing it started outlives it.
    /// Returns whether anything was left (zombies not yet reaped by their
    /// own parent count too).
    pub fn kill_leftovers(&self) -> bool {
        kill(Pid::from_raw(-(self.pid as i32)), Signal::SIGKILL).is_ok()
    }

    /// Ready: it gets connections.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// Ready, or stopping after it was ready.
    pub fn was_ready(&self) -> bool {
        matches!(
            self.phase,
            Phase::Ready | Phase::Stopping { was_ready: true }
        )
    }

    /// It begins to stop; returns false if it already was stopping.
    pub fn stop(&mut self) -> bool {
        let was_ready = match self.phase {
            Phase::Stopping { .. } => return false,
            Phase::Ready => true,
            Phase::Starting => false,
        };
        self.phase = Phase::Stopping { was_ready };
        true
    }

    /// It no longer counts as ready (it closed its channel, or said it is
    /// stopping), whether it stops or not.
    pub fn unready(&mut self) {
        self.phase = match self.phase {
            Phase::Stopping { .. } => Phase::Stopping { was_ready: false },
            _ => Phase::Starting,
        };
    }

    /// Whether the primary may send it a connection of `server` now, as
    /// far as the worker itself says (its room under `--max-unacked` is the
    /// ledger's to say).
    pub fn can_take(&self, server: ServerIdx) -> bool {
        self.is_ready()
            && !self.channel_full
            && !self.timers.is_set(super::timers::Timer::FullPause)
            && self.servers & (1 << server.0) != 0
            && self.channel.as_ref().is_some_and(|c| !c.blocked())
    }
}

/// Describes an exit status for the log: "status 1" or "signal 9 (SIGKILL)".
pub(crate) fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("status {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        }
    } else {
        format!("{status}")
    }
}

/// The resident memory of process `pid` and all its descendants, in bytes:
/// what a worker's whole process tree uses (npm's app, gunicorn's
/// workers). Reads `/proc/PID/task/TID/children` and `/proc/PID/statm`;
/// at most [`TREE_LIMIT`] processes are counted. A descendant that exits
/// meanwhile is skipped.
///
/// # Errors
/// When `pid` itself cannot be read (it has exited).
pub(crate) fn tree_rss(pid: u32) -> io::Result<u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut total = resident_pages(pid)? * page;
    let mut todo = vec![pid];
    let mut seen = 1usize;
    while let Some(p) = todo.pop() {
        for child in children(p) {
            if seen >= TREE_LIMIT {
                return Ok(total);
            }
            seen += 1;
            total += resident_pages(child).unwrap_or(0) * page;
            todo.push(child);
        }
    }
    Ok(total)
}

/// The most processes of one tree [`tree_rss`] reads.
const TREE_LIMIT: usize = 4096;

/// Resident pages of one process (`statm`'s second field).
fn resident_pages(pid: u32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    text.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable statm"))
}

/// The children of every thread of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}
