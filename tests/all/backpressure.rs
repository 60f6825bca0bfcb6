//! Backpressure: when no worker can take a connection the primary stops
//! accepting and the kernel's backlog holds the wait, so the primary's own
//! fds stay bounded by `--max-unacked` however many clients wait; and when
//! it does run out of fds (`EMFILE`), it pauses accepting without spinning,
//! keeps handling signals, and resumes once an acknowledgement frees one.

use crate::util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{
    DEADLINE, HttpConn, Primary, bin, have_program, kill_pid, proc_cpu_ticks, request, stop_process,
};

/// Long enough for a waiting client to outlast hang detection and a
/// replacement on a busy machine.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);

/// How many clients wait on the stopped worker.
const CLIENTS: usize = 200;

/// [`CLIENTS`], or fewer where the kernel caps the listener's backlog
/// (`net.core.somaxconn`, 128 before Linux 5.4) below what they need: a
/// client beyond the backlog would not get connected while it waits.
fn clients() -> usize {
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    // The primary's backlog is 1024, capped by somaxconn.
    let room = somaxconn.min(1024) + MAX_UNACKED;
    if room < CLIENTS + 8 {
        eprintln!(
            "NOTE: net.core.somaxconn is {somaxconn}: {} clients, not {CLIENTS}",
            room - 8
        );
        return room - 8;
    }
    CLIENTS
}

/// The default of `--max-unacked`.
const MAX_UNACKED: usize = 16;

/// Connects `n` clients and sends each one request (`Connection: close`);
/// they wait for their answers in the kernel's backlog or in the primary.
fn connect_waiting_clients(addr: SocketAddr, n: usize) -> Vec<HttpConn> {
    (0..n)
        .map(|i| {
            let mut c = HttpConn::connect_with_timeout(addr, CLIENT_TIMEOUT)
                .unwrap_or_else(|e| panic!("client {i}: connect: {e}"));
            c.send(&request(true))
                .unwrap_or_else(|e| panic!("client {i}: send: {e}"));
            c
        })
        .collect()
}

/// Reads every client's response; returns how many each worker answered.
fn read_all(primary: &Primary, clients: &mut [HttpConn]) -> BTreeMap<u64, usize> {
    let mut by_worker = BTreeMap::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let r = c.read_response().unwrap_or_else(|e| {
            panic!(
                "client {i}: {e}; the primary's log:\n{}",
                primary.log().dump()
            )
        });
        assert_eq!(r.status, 200, "client {i}: {r:?}");
        *by_worker.entry(r.worker().0).or_default() += 1;
    }
    by_worker
}

/// Samples the primary's fd count every 20 ms for `period`; returns the
/// largest.
fn max_fds_over(primary: &Primary, period: Duration) -> usize {
    let end = Instant::now() + period;
    let mut max = 0;
    while Instant::now() < end {
        max = max.max(primary.fd_count());
        std::thread::sleep(Duration::from_millis(20));
    }
    max
}

/// One stopped worker and 200 waiting clients: the primary takes only
/// `--max-unacked` (16) of them (its fds show it) and leaves the rest in
/// the backlog; after SIGCONT all 200 are served.
#[test]
fn a_stopped_worker_bounds_what_the_primary_holds() {
    let primary = Primary::start(1, &[]);
    primary.wait_all_ready();
    let pid = primary.wait_started(1);
    let baseline = primary.fd_count();
    assert!(stop_process(pid, DEADLINE), "the worker did not stop");

    let n = clients();
    let mut clients = connect_waiting_clients(primary.addr, n);
    // The primary fills the worker's quota of unacknowledged connections...
    assert!(
        util::poll_until(DEADLINE, || primary.fd_count() >= baseline + MAX_UNACKED),
        "the primary took fewer than {MAX_UNACKED} connections: {} fds, {baseline} before",
        primary.fd_count()
    );
    // ...and no more, however long the clients wait.
    let max = max_fds_over(&primary, Duration::from_secs(1));
    eprintln!("primary fds: {baseline} before, at most {max} with {n} clients waiting");
    assert!(
        max <= baseline + MAX_UNACKED + 8,
        "the primary holds {max} fds with {n} clients waiting ({baseline} before)"
    );

    kill_pid(pid, Signal::SIGCONT);
    let by_worker = read_all(&primary, &mut clients);
    assert_eq!(by_worker, BTreeMap::from([(1, n)]));
    primary.assert_no_panic();
}

/// The same, but the worker stays stopped: hang detection (`--worker-timeout
/// 2s`) cuts it off and its replacement serves all 200 clients; the
/// primary's fds stay bounded throughout.
#[test]
fn a_hung_worker_s_waiting_clients_go_to_its_replacement() {
    let mut primary = Primary::start(1, &["--worker-timeout", "2s"]);
    primary.wait_all_ready();
    let pid = primary.wait_started(1);
    let baseline = primary.fd_count();
    assert!(stop_process(pid, DEADLINE), "the worker did not stop");

    let n = clients();
    let mut clients = connect_waiting_clients(primary.addr, n);
    // Sample the fds until the replacement is ready (and a little after).
    let mut max = primary.fd_count();
    assert!(
        util::poll_until(DEADLINE, || {
            max = max.max(primary.fd_count());
            primary
                .log()
                .count_where(|l| l.contains("worker 2 (pid ") && l.contains(" ready: "))
                > 0
        }),
        "no replacement became ready; log:\n{}",
        primary.log().dump()
    );
    max = max.max(max_fds_over(&primary, Duration::from_millis(200)));
    eprintln!("primary fds: {baseline} before, at most {max} with {n} clients waiting");
    // One more fd for the replacement's channel.
    assert!(
        max <= baseline + MAX_UNACKED + 8,
        "the primary held {max} fds ({baseline} before)"
    );

    let by_worker = read_all(&primary, &mut clients);
    assert_eq!(
        by_worker,
        BTreeMap::from([(2, n)]),
        "{}",
        primary.log().dump()
    );
    primary
        .log()
        .wait_for(&format!("worker 1 (pid {pid}) is hung: "));
    primary.log().wait_for(&format!(
        "handing {MAX_UNACKED} unacknowledged connections of worker 1 to other workers"
    ));
    assert_eq!(primary.wait_exited(1), "signal 9 (SIGKILL)");
    primary.assert_running();
    primary.assert_no_panic();
}

/// The fd limit the primary runs under in the EMFILE test.
const NOFILE: usize = 40;

/// Starts the primary with `RLIMIT_NOFILE` at [`NOFILE`]: through
/// `prlimit` if installed, else through the shell's `ulimit`.
fn start_with_fd_limit(workers: usize, extra: &[&str]) -> Primary {
    let mut args: Vec<String> = vec![
        bin().to_str().expect("a UTF-8 path").into(),
        "-w".into(),
        workers.to_string(),
        "-l".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let cmd = if have_program("prlimit", "--version") {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={NOFILE}:{NOFILE}")).arg("--");
        cmd.args(&args);
        cmd
    } else {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {NOFILE} && exec \"$@\""))
            .arg("sh")
            .args(&args);
        cmd
    };
    Primary::start_command(cmd, workers)
}

/// The primary runs out of fds: its only worker is stopped and
/// `--max-unacked` is larger than the fds it has left, so accepting fails
/// with EMFILE. It says so and pauses accepting without spinning (its CPU
/// time barely grows), it still acts on signals (SIGTTIN adds a worker,
/// logged), and after SIGCONT every client is served and the added worker
/// starts too, once fds are free again.
#[test]
fn running_out_of_fds_pauses_accepting_without_spinning() {
    let mut primary = start_with_fd_limit(1, &["--max-unacked", "100"]);
    primary.wait_all_ready();
    let pid = primary.wait_started(1);
    let limit = std::fs::read_to_string(format!("/proc/{}/limits", primary.pid())).unwrap();
    assert!(
        limit
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(&format!(" {NOFILE} "))),
        "the fd limit did not take: {limit}"
    );
    let baseline = primary.fd_count();
    assert!(baseline < NOFILE, "{baseline} fds open already");
    assert!(stop_process(pid, DEADLINE), "the worker did not stop");

    // More clients than the primary has fds left.
    let n = NOFILE + 20;
    let mut clients = connect_waiting_clients(primary.addr, n);
    let (paused_at, line) = primary.log().wait_for_from(0, "accept failed: ");
    assert!(
        line.contains("Too many open files") && line.contains("; pausing accepts"),
        "{line}"
    );
    // Every fd number below the limit is in use (fds inherited above it,
    // such as a test runner's, do not count).
    let below_limit = || {
        util::proc_fds(primary.pid())
            .map(|fds| fds.iter().filter(|(fd, _)| *fd < NOFILE as i32).count())
            .unwrap_or(0)
    };
    assert!(
        util::poll_until(DEADLINE, || below_limit() == NOFILE),
        "{} fds below the limit {NOFILE} open: {:?}",
        below_limit(),
        util::proc_fds(primary.pid())
    );

    // Paused, not spinning: little CPU over 2 s.
    let ticks = || proc_cpu_ticks(primary.pid()).expect("the primary's /proc/PID/stat");
    let (cpu0, t0) = (ticks(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (cpu1, t1) = (ticks(), Instant::now());
    let pauses = primary.log().count("accept failed: ");
    eprintln!(
        "while paused: {} CPU ticks in {:?}; {pauses} 'accept failed' lines so far (first at \
         log line {paused_at})",
        cpu1 - cpu0,
        t1 - t0
    );
    assert!(
        cpu1 - cpu0 < 20,
        "the primary used {} CPU ticks in {:?} while out of fds",
        cpu1 - cpu0,
        t1 - t0
    );

    // Signals still work: SIGTTIN adds a worker (which cannot start until
    // fds are free).
    let mark = primary.log().len();
    primary.signal(Signal::SIGTTIN);
    primary
        .log()
        .wait_for_from(mark, "adding a worker: 2 workers");
    primary.assert_running();

    kill_pid(pid, Signal::SIGCONT);
    let by_worker = read_all(&primary, &mut clients);
    assert_eq!(by_worker.values().sum::<usize>(), n, "{by_worker:?}");
    // The added worker started once fds were free, and both serve.
    primary.workers = 2;
    primary.wait_ready_from(mark);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(primary.get().worker().0);
    }
    assert_eq!(seen.len(), 2, "{seen:?}; log:\n{}", primary.log().dump());
    assert!(seen.contains(&1), "{seen:?}");
    primary.assert_running();
    primary.assert_no_panic();
}
