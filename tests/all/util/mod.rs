//! Shared helpers for the integration tests: a guard for the processes the
//! tests start, collectors for their output, a small HTTP/1.1 client, log
//! line parsers, `/proc` probes and per-test temporary directories.
//!
//! Every wait here is bounded: output waits take a timeout, sockets have
//! read and write timeouts, polling loops have deadlines. Timeouts are
//! generous (the suite must pass on a busy 2-core machine) and nothing
//! asserts on speed.

mod http;
mod lines;
mod load;
pub mod node;
mod procfs;
mod prom;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use distributor::Event;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use http::{HttpConn, Response, get_once, get_path, refuses_connections, request};
pub use lines::Lines;
pub use load::{Load, LoadStats, Mode, spawn_gets};
pub use procfs::{
    kill_pid, pid_gone, proc_comm, proc_cpu_ticks, proc_cpu_time, proc_environ, proc_fd_count,
    proc_fds, proc_peak_rss_kib, proc_ppid, proc_rss_kib, signal_child_of, stop_process, wait_gone,
};
pub use prom::{Scrape, scrape_until};

/// How long to wait for something that should happen "soon" (a log line,
/// a process exit). Generous on purpose.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Read and write timeout of test clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variables that would change the binary's behaviour if the
/// test runner's environment happened to set them: removed from children's
/// environments unless a test sets them explicitly.
const CLEARED_ENV: &[&str] = &[
    "DISTRIBUTOR_WORKERS",
    "DISTRIBUTOR_LISTEN",
    "DISTRIBUTOR_SHUTDOWN_TIMEOUT",
    "DISTRIBUTOR_FD",
    "DISTRIBUTOR_PROTOCOL",
    "DISTRIBUTOR_WORKER_PROTOCOL",
    "DISTRIBUTOR_WORKER_ID",
    "DISTRIBUTOR_DEMO_WORKER",
    "DISTRIBUTOR_METRICS",
    "DISTRIBUTOR_DEFER_ACCEPT",
    "RUST_LOG",
];

/// The `distributor` binary under test: this build's, or the one
/// `DISTRIBUTOR_TEST_BIN` names (to check that a test fails against an
/// older build, as it should).
pub fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var_os("DISTRIBUTOR_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_distributor")))
    })
}

/// A copy of the binary under test in a fresh directory that any user
/// may enter (mode 0755), for tests that run it as another user: the
/// build directory may be private (a clone under root's home, mode 0700),
/// where that user could not reach it. Gone with the returned directory.
pub fn bin_for_anyone() -> (TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("bin");
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir.path(), open.clone()).expect("chmod the directory");
    let copy = dir.path().join("distributor");
    std::fs::copy(bin(), &copy).expect("copy the binary");
    std::fs::set_permissions(&copy, open).expect("chmod the binary");
    (dir, copy)
}

/// An example binary built by `cargo test` next to the main binary
/// (`target/<profile>/examples/<name>`).
pub fn example_bin(name: &str) -> PathBuf {
    bin()
        .parent()
        .expect("the binary lives in a directory")
        .join("examples")
        .join(name)
}

/// A path inside the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

// ---------------------------------------------------------------------------
// Temporary directories

/// A fresh directory under the system temp dir, unique to this test
/// process and call, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("distributor-test-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create the test's temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A child process that is SIGKILLed and reaped when dropped, with its
/// stdout and stderr collected line by line.
///
/// The child starts with only fds 0, 1 and 2 (everything else the test
/// process has open is made close-on-exec for it), so that what its own
/// children inherit is what it chose to give them.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    status: Option<ExitStatus>,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        for var in CLEARED_ENV {
            // Unless the test set it on purpose.
            if !cmd.get_envs().any(|(k, v)| k == *var && v.is_some()) {
                cmd.env_remove(var);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = Lines::collect(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::collect(child.stderr.take().expect("piped stderr"));
        Proc {
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process (not to its workers).
    pub fn signal(&self, sig: Signal) {
        assert!(self.status.is_none(), "signalling a process already reaped");
        kill(Pid::from_raw(self.pid() as i32), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}): {e}", self.pid()));
    }

    /// The exit status if the process has exited by now.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waitpid");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit; panics with its
    /// stderr if it does not.
    pub fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "process {} still running after {timeout:?}; stderr:\n{}",
                self.pid(),
                self.stderr.dump()
            ),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Describes an exit status for assertion messages.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => format!("{status:?}"),
    }
}

// ---------------------------------------------------------------------------
// The distributor binary

/// A running `distributor` primary, killed (with its workers, through
/// `PR_SET_PDEATHSIG`) when dropped.
#[derive(Debug)]
pub struct Primary {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub workers: usize,
}

impl Primary {
    /// `distributor -w WORKERS -l 127.0.0.1:0 EXTRA...`; waits for the
    /// `listening on` line and reads the port from it.
    pub fn start(workers: usize, extra: &[&str]) -> Primary {
        Primary::start_on("127.0.0.1:0", workers, extra)
    }

    /// `distributor -w WORKERS -l LISTEN EXTRA...`.
    pub fn start_on(listen: &str, workers: usize, extra: &[&str]) -> Primary {
        let mut cmd = Command::new(bin());
        cmd.arg("-w")
            .arg(workers.to_string())
            .arg("-l")
            .arg(listen)
            .args(extra);
        Primary::start_command(cmd, workers)
    }

    /// Starts `cmd`, a distributor primary that logs `listening on ADDR`
    /// on stderr.
    pub fn start_command(cmd: Command, workers: usize) -> Primary {
        let proc = Proc::spawn(cmd);
        // The primary's own line, not a worker's (Node's inspector says
        // "Debugger listening on ...").
        let (_, line) = proc
            .stderr
            .wait_from(0, "a `listening on` line", DEADLINE, |l| {
                !l.starts_with("[worker ") && l.contains("listening on ")
            });
        let addr = parse_listening(&line)
            .unwrap_or_else(|| panic!("no address in {line:?}; stderr:\n{}", proc.stderr.dump()));
        Primary {
            proc,
            addr,
            workers,
        }
    }

    pub fn log(&self) -> &Lines {
        &self.proc.stderr
    }

    /// Waits until all workers have said hello: the log says `N of N slots
    /// ready`.
    pub fn wait_all_ready(&self) {
        self.wait_ready_from(0);
    }

    /// Waits for an `N of N slots ready` line at log index `from` or later.
    pub fn wait_ready_from(&self, from: usize) -> usize {
        let n = self.workers;
        self.log()
            .wait_for_from(from, &format!(" ready: {n} of {n} slots ready"))
            .0
    }

    /// The (id, pid) of every worker started so far, in order.
    pub fn started(&self) -> Vec<(u64, u32)> {
        self.log()
            .snapshot()
            .iter()
            .filter_map(|l| parse_started(l))
            .collect()
    }

    /// Waits for the `worker ID started (pid PID)` line of worker `id`;
    /// returns its pid.
    pub fn wait_started(&self, id: u64) -> u32 {
        let (_, line) = self
            .log()
            .wait_from(0, &format!("worker {id} to start"), DEADLINE, |l| {
                parse_started(l).is_some_and(|(i, _)| i == id)
            });
        parse_started(&line).expect("matched").1
    }

    /// Waits for worker `id`'s `ready` line.
    pub fn wait_worker_ready(&self, id: u64) -> String {
        self.log()
            .wait_from(0, &format!("worker {id} to be ready"), DEADLINE, |l| {
                l.contains(&format!("worker {id} (pid ")) && l.contains(" ready: ")
            })
            .1
    }

    /// One request on a new connection with `Connection: close`.
    pub fn get(&self) -> Response {
        get_once(self.addr).unwrap_or_else(|e| {
            panic!(
                "request to {} failed: {e}; primary's log:\n{}",
                self.addr,
                self.log().dump()
            )
        })
    }

    pub fn signal(&self, sig: Signal) {
        self.proc.signal(sig)
    }

    /// `distributor ctl --pid PID ARGS...` against this primary (its
    /// default control socket), bounded: (exit success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        ctl_pid(self.pid(), args)
    }

    /// The primary's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// How many fds the primary has open now.
    pub fn fd_count(&self) -> usize {
        proc_fd_count(self.pid()).unwrap_or_else(|e| panic!("cannot list the primary's fds: {e}"))
    }

    /// The workers started and not (yet) logged as exited: (id, pid).
    pub fn alive_workers(&self) -> Vec<(u64, u32)> {
        let lines = self.log().snapshot();
        let exited: Vec<u64> = lines
            .iter()
            .filter_map(|l| parse_exited(l))
            .map(|e| e.0)
            .collect();
        lines
            .iter()
            .filter_map(|l| parse_started(l))
            .filter(|(id, _)| !exited.contains(id))
            .collect()
    }

    /// Waits for worker `id`'s exit line; returns how it exited
    /// (`signal 9 (SIGKILL)`, `status 0`...).
    pub fn wait_exited(&self, id: u64) -> String {
        let (_, line) = self
            .log()
            .wait_from(0, &format!("worker {id} to exit"), DEADLINE, |l| {
                parse_exited(l).is_some_and(|e| e.0 == id)
            });
        parse_exited(&line).expect("matched").2
    }

    /// The log index of worker `id`'s start line, if logged yet.
    pub fn started_at(&self, id: u64) -> Option<usize> {
        self.log()
            .snapshot()
            .iter()
            .position(|l| parse_started(l).is_some_and(|(i, _)| i == id))
    }

    /// The log index of worker `id`'s exit line, if logged yet.
    pub fn exited_at(&self, id: u64) -> Option<usize> {
        self.log()
            .snapshot()
            .iter()
            .position(|l| parse_exited(l).is_some_and(|e| e.0 == id))
    }

    /// SIGTERM: the primary exits 0 within [`DEADLINE`], without having to
    /// send any worker SIGTERM at half the shutdown timeout (a worker that
    /// never reads a STOP gets its SIGTERM at once).
    pub fn terminate_promptly(&mut self) {
        self.signal(Signal::SIGTERM);
        let status = self.proc.expect_exit(DEADLINE);
        assert_eq!(status.code(), Some(0), "{}", self.log().dump());
        assert_eq!(
            self.log().count("is still running: SIGTERM"),
            0,
            "{}",
            self.log().dump()
        );
    }

    /// Panics if the log (the primary's stderr, which its workers share)
    /// shows a panic.
    pub fn assert_no_panic(&self) {
        let panics = self.log().count("panicked");
        assert_eq!(panics, 0, "a panic in the log:\n{}", self.log().dump());
    }

    /// Panics if the primary has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.try_status() {
            panic!(
                "the primary exited with {}; its log:\n{}",
                describe(status),
                self.log().dump()
            );
        }
    }
}

/// The address in `listening on ADDR`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The address in `metrics on ADDR`.
pub fn parse_metrics_on(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("metrics on ")? + "metrics on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// `(id, pid)` from `worker ID started (pid PID)`.
pub fn parse_started(line: &str) -> Option<(u64, u32)> {
    let rest = &line[line.find("worker ")? + "worker ".len()..];
    let (id, rest) = rest.split_once(" started (pid ")?;
    let (pid, _) = rest.split_once(')')?;
    Some((id.parse().ok()?, pid.parse().ok()?))
}

/// `(id, pid, how)` from `worker ID (pid PID) exited with HOW after ...`.
pub fn parse_exited(line: &str) -> Option<(u64, u32, String)> {
    let rest = &line[line.find("worker ")? + "worker ".len()..];
    let (id, rest) = rest.split_once(" (pid ")?;
    let (pid, rest) = rest.split_once(") exited with ")?;
    let (how, _) = rest.split_once(" after ")?;
    Some((id.parse().ok()?, pid.parse().ok()?, how.to_string()))
}

/// Every exit line in `p`'s log, `worker ID (pid PID) exited with HOW
/// after T, having taken N connection(s)`: ID → (PID, HOW, N). Panics on an
/// exit line without its `having taken N`.
pub fn exit_lines(p: &Primary) -> BTreeMap<u64, (u32, String, u64)> {
    let mut exits = BTreeMap::new();
    for line in p.log().snapshot() {
        let Some(at) = line.find("worker ") else {
            continue;
        };
        let rest = &line[at + "worker ".len()..];
        let Some((id, rest)) = rest.split_once(" (pid ") else {
            continue;
        };
        let Some((pid, rest)) = rest.split_once(") exited with ") else {
            continue;
        };
        let (how, rest) = rest.split_once(" after ").expect("an uptime");
        let taken = rest
            .split_once("having taken ")
            .and_then(|(_, n)| n.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `having taken N` in {line:?}"));
        let id: u64 = id.parse().expect("a worker id");
        let pid: u32 = pid.parse().expect("a pid");
        exits.insert(id, (pid, how.to_string(), taken));
    }
    exits
}

/// The built-in demo worker (this crate's binary) as a library
/// primary's command.
pub fn demo_command() -> distributor::WorkerCommand {
    distributor::WorkerCommand::new(bin(), Vec::<String>::new())
        .env(distributor::demo::DEMO_WORKER_ENV, "1")
}

/// A library primary running on a thread of the test.
pub struct Library {
    /// Where it accepts.
    pub addr: SocketAddr,
    /// Its metrics endpoint, if it has one.
    pub metrics: Option<SocketAddr>,
    pub events: distributor::Events,
    pub handle: distributor::Handle,
    pub runner: std::thread::JoinHandle<Result<(), distributor::PrimaryError>>,
}

/// Builds `builder` with the process's signals left to the test
/// (`handle_signals(false)`) and runs it on its own thread.
pub fn run_library(builder: distributor::Builder) -> Library {
    let mut primary = builder.handle_signals(false).build().expect("build");
    let (addr, metrics) = (primary.local_addr(), primary.metrics_addr());
    let events = primary.events();
    let handle = primary.handle();
    let runner = std::thread::spawn(move || primary.run());
    Library {
        addr,
        metrics,
        events,
        handle,
        runner,
    }
}

/// Shuts a [`run_library`] primary down and joins its thread (the
/// primary's shutdown timeout bounds the wait); panics unless its run
/// ended cleanly.
pub fn shut_down(
    handle: &distributor::Handle,
    runner: std::thread::JoinHandle<Result<(), distributor::PrimaryError>>,
) {
    handle.shutdown().expect("shutdown");
    runner
        .join()
        .expect("the primary's thread does not panic")
        .expect("run ends cleanly");
}

/// Waits up to [`DEADLINE`] for `n` `Event::WorkerReady` on `events` from
/// the library's primary, and returns their ID → PID. Other events are
/// skipped, except that with `exit_fails` a `WorkerExited` panics (a worker
/// exited before it was ready); panics too when the deadline passes first.
pub fn wait_ready_events(
    events: &distributor::Events,
    n: usize,
    exit_fails: bool,
) -> BTreeMap<u64, u32> {
    let deadline = Instant::now() + DEADLINE;
    let mut ready = BTreeMap::new();
    while ready.len() < n {
        match events.recv_deadline(deadline) {
            Ok(Event::WorkerReady { id, pid }) => {
                ready.insert(id, pid);
            }
            Ok(Event::WorkerExited { id, status, .. }) if exit_fails => {
                panic!("worker {id} exited before it was ready: {status:?}")
            }
            Ok(_) => {}
            Err(e) => panic!("only {} of {n} workers ready ({ready:?}): {e}", ready.len()),
        }
    }
    ready
}

/// `(id, pid)` from any text containing `from worker ID (pid PID)`, as the
/// demo and example workers answer.
pub fn parse_worker(text: &str) -> Option<(u64, u32)> {
    let rest = &text[text.find("from worker ")? + "from worker ".len()..];
    let (id, rest) = rest.split_once(" (pid ")?;
    let (pid, _) = rest.split_once(')')?;
    Some((id.parse().ok()?, pid.parse().ok()?))
}

/// Waits up to `timeout` for `cond`, polling; returns whether it held.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The name of the test running on this thread (the harness names each
/// test's thread after it).
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string()
}

/// Says that `test` is skipped and why, where it shows: straight on the
/// test process's stderr, which the test harness does not capture (its
/// capture takes only what `println!`/`eprintln!` print), so the note is
/// in the output of `cargo test` even for a test that passes.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Whether `program` can be run at all (e.g. `python3 --version`), within
/// [`DEADLINE`].
pub fn have_program(program: &str, arg: &str) -> bool {
    let Ok(child) = Command::new(program)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let mut child = KillOnDrop(child);
    let mut status = None;
    poll_until(DEADLINE, || {
        status = child.0.try_wait().ok().flatten();
        status.is_some()
    });
    status.is_some_and(|s| s.success())
}

/// A plain child process killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `distributor ctl --pid PID ARGS...`, bounded by a two-minute `--timeout`:
/// (exit success, stdout, stderr).
pub fn ctl_pid(pid: u32, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["ctl", "--timeout", "2m", "--pid", &pid.to_string()])
        .args(args);
    let out = output_within(cmd, Duration::from_secs(150));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` to its end, as `Command::output`, but for at most `timeout`:
/// past it the process is killed and the test fails (a command that
/// should have refused to start and did not must not hang the suite).
pub fn output_within(mut cmd: Command, timeout: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("{cmd:?} still running after {timeout:?}; stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}
