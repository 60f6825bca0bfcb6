//! The control socket (`--control`, on by default for the command) and
//! what `distributor ctl` says to it.
//!
//! Owns the Unix socket at `RUNTIME/distributor/PID.sock` (mode 0600, in a
//! 0700 directory; see [`runtime_dir`]) and a thread that serves it, apart
//! from the event loop: each client sends one line (`status [--json]`,
//! `reload`, `scale N|+N|-N`, `sched MODE`, `upgrade`, `stop`) and gets
//! `ok` or `error: WHY` on the first line, then the outcome, once it is
//! known (a reload when it completed, an upgrade when the new primary took
//! over). The thread talks to the primary through a [`Handle`], as an
//! embedding program would.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::api::Handle;
use super::sched::Sched;
use super::stats::{Stats, WorkerState};

/// The longest request line.
const MAX_REQUEST: usize = 1024;
/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once; more are answered `error: busy`.
const MAX_CLIENTS: usize = 8;
/// The longest a reload or scaling is waited for.
const LONG_WAIT: Duration = Duration::from_secs(600);

/// The machine-wide directory of control sockets: made by root with mode
/// 1777 (as `/tmp`: anyone may add a socket, only its owner may remove
/// it; each socket is 0600), so that a primary that gave up root
/// (`--user`) can still serve one, and so can the new primary of its
/// upgrade.
const SHARED_DIR: &str = "/run/distributor";

/// Where control sockets live: `$XDG_RUNTIME_DIR/distributor`; else
/// `/run/distributor` for root, or for anyone once root made it; else
/// `/tmp/distributor-UID`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("distributor");
    }
    let uid = nix::unistd::geteuid();
    let shared = Path::new(SHARED_DIR);
    let usable = || {
        use nix::unistd::{AccessFlags, access};
        access(shared, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
    };
    if uid.is_root() || usable() {
        shared.to_path_buf()
    } else {
        PathBuf::from(format!("/tmp/distributor-{uid}"))
    }
}

/// The default control socket of the primary with this pid.
pub fn default_path(pid: u32) -> PathBuf {
    runtime_dir().join(format!("{pid}.sock"))
}

/// A bound control socket, not served yet ([`Bound::serve`]).
#[derive(Debug)]
pub(crate) struct Bound {
    listener: UnixListener,
    path: PathBuf,
}

/// A served control socket; the file goes when this is dropped, unless
/// it was handed over to the new primary of an upgrade.
#[derive(Debug)]
pub(crate) struct ControlServer {
    path: PathBuf,
    handed_over: Arc<AtomicBool>,
    /// Clients whose answer is not written yet.
    answering: Arc<AtomicUsize>,
}

/// How long an exiting primary waits for the answers being written (an
/// upgrade's, say, which completes just before it exits).
const ANSWER_GRACE: Duration = Duration::from_secs(2);

impl Drop for ControlServer {
    /// Lets the answers under way go out, then removes the socket file,
    /// unless the new primary of an upgrade took it over (the same path)
    /// and answers there now.
    fn drop(&mut self) {
        let until = std::time::Instant::now() + ANSWER_GRACE;
        while self.answering.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let taken_over =
            self.handed_over.load(Ordering::SeqCst) && UnixStream::connect(&self.path).is_ok();
        if !taken_over {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The event loop's side of the control socket: a copy of it to hand
/// over in an upgrade, and the flag that stops this primary serving it.
#[derive(Debug)]
pub(crate) struct Handover {
    pub listener: UnixListener,
    pub handed_over: Arc<AtomicBool>,
    pub path: PathBuf,
}

impl Handover {
    /// The upgrade completed: this primary stops answering, and a socket
    /// named after its pid (the default) goes at once, so that `ctl` finds
    /// only the new primary's while this one drains.
    pub(crate) fn release(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
        let own = format!("{}.sock", std::process::id());
        if self.path.file_name().is_some_and(|n| n == own.as_str()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket at `path` (mode 0600; its directory is made
/// 0700 if missing), replacing a stale one nobody answers on.
pub(crate) fn bind(path: &Path) -> io::Result<Bound> {
    let fail = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("control socket {}: {what}: {e}", path.display()),
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| fail("cannot create its directory", e))?;
            let mode = if dir == Path::new(SHARED_DIR) {
                0o1777
            } else {
                0o700
            };
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| fail("cannot set its directory's mode", e))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(fail(
                "in use",
                io::Error::new(io::ErrorKind::AddrInUse, "another primary answers there"),
            ));
        }
        std::fs::remove_file(path).map_err(|e| fail("cannot remove the stale socket", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail("cannot bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| fail("cannot restrict", e))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
    })
}

impl Bound {
    /// Serves `listener`, a control socket handed over by the primary
    /// before an upgrade, at `path`.
    pub(crate) fn adopt(listener: UnixListener, path: &Path) -> Bound {
        Bound {
            listener,
            path: path.to_path_buf(),
        }
    }

    /// Gives the socket file to `uid`/`gid` (the user the primary runs
    /// as after `--user`), so that it can remove it at exit.
    pub(crate) fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::chown(&self.path, Some(uid), Some(gid))
    }

    /// What the event loop keeps to hand the socket over in an upgrade.
    pub(crate) fn handover(&self) -> io::Result<Handover> {
        Ok(Handover {
            listener: self.listener.try_clone()?,
            handed_over: Arc::new(AtomicBool::new(false)),
            path: self.path.clone(),
        })
    }

    /// Serves the socket on a thread of its own, through `handle`, until
    /// `handed_over` is set.
    pub(crate) fn serve(
        self,
        handle: Handle,
        upgrade_timeout: Duration,
        handed_over: Arc<AtomicBool>,
    ) -> ControlServer {
        let path = self.path.clone();
        let busy = Arc::new(AtomicUsize::new(0));
        let answering = Arc::new(AtomicUsize::new(0));
        let listener = self.listener;
        let stop = Arc::clone(&handed_over);
        let answering_in_thread = Arc::clone(&answering);
        let spawned = std::thread::Builder::new()
            .name("distributor-control".into())
            .spawn(move || {
                // A blocking accept(2) takes an fd number before it waits:
                // wait with poll(2) instead, and accept without blocking,
                // so that the thread holds no fd the primary may need (out
                // of fds, the primary accepts into every free one).
                if listener.set_nonblocking(true).is_err() {
                    return;
                }
                loop {
                    use std::os::fd::AsFd;
                    // Checked every 100 ms: once the socket was handed to
                    // the new primary of an upgrade, it answers alone.
                    let wait = crate::sys::wait_readable(
                        &[listener.as_fd()],
                        Some(Duration::from_millis(100)),
                    );
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if wait.is_err() {
                        continue;
                    }
                    let mut stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        // Out of fds, say: try again later, without spinning.
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    if stream.set_nonblocking(false).is_err() {
                        continue;
                    }
                    if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        busy.fetch_sub(1, Ordering::SeqCst);
                        let _ = stream.write_all(b"error: busy: too many control clients\n");
                        continue;
                    }
                    let (handle, busy) = (handle.clone(), Arc::clone(&busy));
                    let answering = Arc::clone(&answering_in_thread);
                    answering.fetch_add(1, Ordering::SeqCst);
                    let _ = std::thread::Builder::new()
                        .name("distributor-control-client".into())
                        .spawn(move || {
                            serve_client(stream, &handle, upgrade_timeout, &answering);
                            busy.fetch_sub(1, Ordering::SeqCst);
                        });
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot start its thread: {e}");
        }
        ControlServer {
            path,
            handed_over,
            answering,
        }
    }
}

/// Reads one request line (bounded in size and time).
fn read_request(stream: &UnixStream) -> io::Result<String> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    reader.read_line(&mut line)?;
    if line.len() > MAX_REQUEST || !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a request is one line of at most {MAX_REQUEST} bytes"),
        ));
    }
    Ok(line.trim().to_string())
}

fn serve_client(
    mut stream: UnixStream,
    handle: &Handle,
    upgrade_timeout: Duration,
    answering: &AtomicUsize,
) {
    let answer = match read_request(&stream) {
        Ok(request) => run(&request, handle, upgrade_timeout),
        Err(e) => Err(e.to_string()),
    };
    let stop = matches!(answer, Ok(Answer::Stopping(_)));
    let text = match answer {
        Ok(Answer::Done(body) | Answer::Stopping(body)) => format!("ok\n{body}"),
        Err(why) => format!("error: {why}\n"),
    };
    let _ = stream.write_all(text.as_bytes());
    answering.fetch_sub(1, Ordering::SeqCst);
    if stop {
        // The client waits for the end of the file: the primary's exit.
        let mut sink = [0u8; 64];
        let _ = stream.set_read_timeout(None);
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    }
}

/// What a command did.
enum Answer {
    Done(String),
    /// Stopping: the connection stays open until the primary exits.
    Stopping(String),
}

fn run(request: &str, handle: &Handle, upgrade_timeout: Duration) -> Result<Answer, String> {
    let words: Vec<&str> = request.split_whitespace().collect();
    let io = |e: io::Error| e.to_string();
    match words.as_slice() {
        ["status"] => Ok(Answer::Done(status_table(&handle.stats().map_err(io)?))),
        ["status", "--json"] => Ok(Answer::Done(status_json(&handle.stats().map_err(io)?))),
        ["reload"] => {
            handle
                .reload_and_wait(LONG_WAIT)
                .map_err(|e| format!("reload: {e}"))?;
            Ok(Answer::Done("reload complete\n".into()))
        }
        ["scale", n] => scale(handle, n).map(Answer::Done),
        ["sched", mode] => sched(handle, mode).map(Answer::Done),
        ["upgrade"] => {
            let pid = handle
                .upgrade_and_wait(upgrade_timeout + Duration::from_secs(30))
                .map_err(|e| format!("upgrade failed: {e}"))?;
            Ok(Answer::Done(format!(
                "upgraded: the new primary is pid {pid}; this one is stopping\n"
            )))
        }
        ["stop"] => {
            let workers = handle.stats().map(|s| s.workers.len()).unwrap_or(0);
            handle.shutdown().map_err(io)?;
            Ok(Answer::Stopping(format!(
                "stopping: {}\n",
                crate::logging::count(workers, "worker")
            )))
        }
        [] => Err("empty request".into()),
        _ => Err(format!(
            "unknown command '{request}' (status [--json], reload, scale N|+N|-N, sched MODE, upgrade, stop)"
        )),
    }
}

/// `scale N`, `+N`, `-N`: adds or removes workers one at a time, each
/// waited for.
fn scale(handle: &Handle, arg: &str) -> Result<String, String> {
    let bad = || format!("scale takes N, +N or -N (a number of workers), not '{arg}'");
    let now = handle.stats().map_err(|e| e.to_string())?.active_slots();
    let target = if let Some(n) = arg.strip_prefix('+') {
        now + n.parse::<usize>().map_err(|_| bad())?
    } else if let Some(n) = arg.strip_prefix('-') {
        now.checked_sub(n.parse::<usize>().map_err(|_| bad())?)
            .ok_or_else(|| format!("cannot remove more than the {now} workers there are"))?
    } else {
        arg.parse::<usize>().map_err(|_| bad())?
    };
    if target == 0 {
        return Err("at least one worker stays (use stop to stop)".into());
    }
    if target > 4096 {
        return Err(format!("{target} workers is more than this allows (4096)"));
    }
    for _ in now..target {
        handle
            .add_worker_and_wait(LONG_WAIT)
            .map_err(|e| format!("adding a worker: {e}"))?;
    }
    for _ in target..now {
        handle
            .remove_worker_and_wait(LONG_WAIT)
            .map_err(|e| format!("removing a worker: {e}"))?;
    }
    Ok(format!(
        "{} (was {now})\n",
        crate::logging::count(target, "worker")
    ))
}

/// `sched MODE`: switches among the primary-side policies; refused in the
/// kernel modes.
fn sched(handle: &Handle, mode: &str) -> Result<String, String> {
    let to: Sched = mode.parse()?;
    let from = handle.stats().map_err(|e| e.to_string())?.sched;
    if from.is_kernel() || to.is_kernel() {
        return Err(format!(
            "cannot switch from {from} to {to}: who accepts cannot change while running; only rr, least-conn and p2c switch"
        ));
    }
    handle.set_sched(to).map_err(|e| e.to_string())?;
    let now = handle.stats().map_err(|e| e.to_string())?.sched;
    if now != to {
        return Err(format!("the policy is still {now}"));
    }
    Ok(format!("policy: {from} -> {to}\n"))
}

/// Resident memory of `pid` in bytes (`/proc/PID/statm`).
fn rss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Starting => "starting",
        WorkerState::Ready => "ready",
        WorkerState::Stopping => "stopping",
    }
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `status`: a table of the workers, as `pm2 ls` has it.
fn status_table(stats: &Stats) -> String {
    let mut out = String::new();
    let steer = match stats.steer {
        super::Steer::Off => String::new(),
        s => format!(" --steer {s}"),
    };
    let _ = writeln!(
        out,
        "primary pid {}, {}{steer}, {}, up {}, {} of {} ready",
        std::process::id(),
        stats.sched,
        stats
            .listeners
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        uptime(stats.uptime),
        stats.ready_workers(),
        crate::logging::count(stats.active_slots(), "slot"),
    );
    let _ = writeln!(
        out,
        "{:>4}  {:>6}  {:>8}  {:<8}  {:>8}  {:>8}  {:>9}  {:>9}  {:>8}  LAST EXIT",
        "SLOT", "WORKER", "PID", "STATE", "UPTIME", "TAKEN", "IN FLIGHT", "RSS", "RESTARTS"
    );
    for slot in &stats.slots {
        let workers: Vec<_> = stats
            .workers
            .iter()
            .filter(|w| w.slot == slot.slot)
            .collect();
        let last = slot.last_exit.as_deref().unwrap_or("-");
        if workers.is_empty() {
            if slot.active {
                let _ = writeln!(
                    out,
                    "{:>4}  {:>6}  {:>8}  {:<8}  {:>8}  {:>8}  {:>9}  {:>9}  {:>8}  {last}",
                    slot.slot, "-", "-", "down", "-", "-", "-", "-", slot.restarts
                );
            }
            continue;
        }
        for w in workers {
            let rss = rss(w.pid).map_or("-".into(), |b| {
                format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
            });
            let _ = writeln!(
                out,
                "{:>4}  {:>6}  {:>8}  {:<8}  {:>8}  {:>8}  {:>9}  {:>9}  {:>8}  {last}",
                w.slot,
                w.id,
                w.pid,
                state_name(w.state),
                uptime(w.uptime),
                w.connections,
                w.in_flight,
                rss,
                slot.restarts
            );
        }
    }
    out
}

/// `status --json`: the same, for scripts.
fn status_json(stats: &Stats) -> String {
    let restarts = |slot: usize| {
        stats
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .map_or(0, |s| s.restarts)
    };
    let last_exit = |slot: usize| {
        stats
            .slots
            .iter()
            .find(|s| s.slot == slot)
            .and_then(|s| s.last_exit.clone())
    };
    let workers: Vec<serde_json::Value> = stats
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "slot": w.slot,
                "id": w.id,
                "pid": w.pid,
                "state": state_name(w.state),
                "uptime_s": w.uptime.as_secs_f64(),
                "connections": w.connections,
                "in_flight": w.in_flight,
                "rss_bytes": rss(w.pid),
                "restarts": restarts(w.slot),
                "last_exit": last_exit(w.slot),
            })
        })
        .collect();
    let slots: Vec<serde_json::Value> = stats
        .slots
        .iter()
        .map(|s| {
            serde_json::json!({
                "slot": s.slot,
                "active": s.active,
                "restarts": s.restarts,
                "last_exit": s.last_exit,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "pid": std::process::id(),
        "sched": stats.sched.name(),
        "steer": stats.steer.name(),
        "listeners": stats.listeners.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "uptime_s": stats.uptime.as_secs_f64(),
        "ready": stats.ready_workers(),
        "active_slots": stats.active_slots(),
        "workers": workers,
        "slots": slots,
    });
    format!("{doc}\n")
}

/// The client side (`distributor ctl`): finds the socket, sends
/// `request`, and returns the answer's body, or the error's line.
///
/// `wait` bounds how long an answer may take.
pub fn request(path: &Path, request: &str, wait: Duration) -> Result<Answered, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => format!(
            "permission denied on {}: run ctl as the primary's user (or root)",
            path.display()
        ),
        Some(libc::ECONNREFUSED) => {
            format!("no primary answers on {} (a stale socket)", path.display())
        }
        Some(libc::ENOENT) => format!("no control socket at {}", path.display()),
        _ => format!("cannot connect to {}: {e}", path.display()),
    })?;
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("cannot send to {}: {e}", path.display()))?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader
        .read_line(&mut first)
        .map_err(|e| format!("no answer from {}: {e}", path.display()))?;
    if let Some(why) = first.strip_prefix("error: ") {
        return Err(why.trim_end().to_string());
    }
    if first.trim_end() != "ok" {
        return Err(format!("unexpected answer: {}", first.trim_end()));
    }
    let mut body = String::new();
    let ended = match reader.read_to_string(&mut body) {
        Ok(_) => true,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => return Err(e.to_string()),
    };
    Ok(Answered { body, ended })
}

/// An answer of the primary.
#[derive(Debug)]
pub struct Answered {
    /// What it said after `ok`.
    pub body: String,
    /// The connection ended within the wait (after `stop`: the primary
    /// exited).
    pub ended: bool,
}

/// The control sockets in `dir` whose primary runs and answers, by pid.
pub fn running(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid: u32 = name.strip_suffix(".sock")?.parse().ok()?;
            // A socket left by a primary that was killed may name a pid
            // reused since: only one that answers counts.
            let probe = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None);
            let alive = probe.is_ok() || probe == Err(nix::errno::Errno::EPERM);
            let answers = || UnixStream::connect(e.path()).is_ok();
            (alive && answers()).then(|| (pid, e.path()))
        })
        .collect();
    found.sort();
    found
}
