//! Helpers for the tests that run Node apps (tests/node.rs, tests/apps.rs):
//! the `distributor ... -- node APP` command line, the `listening on` and
//! app lines, requests checked against the workers started, a clean stop.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::signal::Signal;

use super::{
    DEADLINE, Primary, bin, get_path, have_program, parse_listening, poll_until, repo_path, skip,
    wait_gone,
};

/// Whether `node` runs here; prints a note naming `test` when it does not.
pub fn have_node(test: &str) -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    let have = *HAVE.get_or_init(|| have_program("node", "--version"));
    if !have {
        skip(test, "node is not installed");
    }
    have
}

/// The path of a fixture under tests/fixtures/node/.
pub fn fixture(name: &str) -> String {
    let path = repo_path(&format!("tests/fixtures/node/{name}"));
    assert!(path.exists(), "no fixture {}", path.display());
    path.to_str().expect("a UTF-8 path").to_string()
}

/// Variables the fixtures (or Node itself) read: removed from the
/// primary's environment unless a test sets them, so that the test
/// runner's own environment cannot change what an app does.
pub const APP_ENV: &[&str] = &[
    "PORT",
    "PORT2",
    "HOST",
    "NODE_OPTIONS",
    "NODE_UNIQUE_ID",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
];

/// `distributor -w N -l 127.0.0.1:0 EXTRA... -- node FIXTURE`, with `env`
/// set for the app (`-l` as EXTRA says, if it does).
pub fn node_command(workers: usize, extra: &[&str], app: &str, env: &[(&str, &str)]) -> Command {
    let explicit = extra.iter().any(|a| *a == "-l" || *a == "--listen");
    let listen = (!explicit).then_some("127.0.0.1:0");
    node_command_on(listen, workers, extra, app, env)
}

/// `distributor -w N [-l LISTEN] EXTRA... -- node FIXTURE`, with `env` set
/// for the app; without `listen`, the app's own port wins.
pub fn node_command_on(
    listen: Option<&str>,
    workers: usize,
    extra: &[&str],
    app: &str,
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("-w").arg(workers.to_string());
    if let Some(listen) = listen {
        cmd.args(["-l", listen]);
    }
    cmd.args(extra).arg("--").arg("node").arg(fixture(app));
    for var in APP_ENV {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// As [`node_command`] with `--protocol node`, started; waits for the
/// first `listening on` line (which comes once the first worker's
/// `listen()` reached the primary).
pub fn start(workers: usize, extra: &[&str], app: &str, env: &[(&str, &str)]) -> Primary {
    let mut args = vec!["--protocol", "node"];
    args.extend_from_slice(extra);
    Primary::start_command(node_command(workers, &args, app, env), workers)
}

/// Every address announced with `listening on ADDR` so far, in order.
pub fn announced(p: &Primary) -> Vec<SocketAddr> {
    p.log()
        .snapshot()
        .iter()
        .filter(|l| !l.starts_with("[worker "))
        .filter_map(|l| parse_listening(l))
        .collect()
}

/// Waits until `n` listeners have been announced; returns them.
pub fn wait_announced(p: &Primary, n: usize) -> Vec<SocketAddr> {
    let ok = poll_until(DEADLINE, || announced(p).len() >= n);
    assert!(
        ok,
        "{n} `listening on` lines never came; log:\n{}",
        p.log().dump()
    );
    announced(p)
}

/// Where a client reaches `addr`: loopback for an unspecified address
/// (`0.0.0.0`, or `::`, dual-stack).
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// Waits for the app line `[worker ID] TEXT...` on the primary's stdout
/// (the workers' stdout, prefixed); returns what follows TEXT.
pub fn app_line(p: &Primary, id: u64, text: &str) -> String {
    let needle = format!("[worker {id}] {text}");
    let line = p
        .proc
        .stdout
        .wait_from(0, &format!("{needle:?} on stdout"), DEADLINE, |l| {
            l.contains(&needle)
        });
    let line = line.1;
    line[line.find(&needle).expect("matched") + needle.len()..].to_string()
}

/// The port worker `id` printed after `text` (`port `, `port A `...).
pub fn app_port(p: &Primary, id: u64, text: &str) -> u16 {
    let rest = app_line(p, id, text);
    rest.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no port in {rest:?}; stdout:\n{}", p.proc.stdout.dump()))
}

/// The workers started so far: id → pid.
pub fn started(p: &Primary) -> BTreeMap<u64, u32> {
    p.started().into_iter().collect()
}

/// `n` requests on new connections to `addr` (`GET PATH`, `Connection:
/// close`); each must be answered 200 by one of `workers` (id → pid) with
/// `Hello from worker ID (pid PID)SUFFIX\n`. Returns the count per id.
pub fn serve(
    p: &Primary,
    addr: SocketAddr,
    n: usize,
    workers: &BTreeMap<u64, u32>,
    suffix: &str,
) -> BTreeMap<u64, u64> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let r = get_path(addr, "/").unwrap_or_else(|e| {
            panic!(
                "request {i} to {addr}: {e}; log:\n{}\nstdout:\n{}",
                p.log().dump(),
                p.proc.stdout.dump()
            )
        });
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        let (id, pid) = r.worker();
        assert_eq!(
            r.body,
            format!("Hello from worker {id} (pid {pid}){suffix}\n"),
            "request {i}"
        );
        assert_eq!(
            workers.get(&id),
            Some(&pid),
            "request {i} answered by worker {id} (pid {pid}); workers {workers:?}"
        );
        *seen.entry(id).or_default() += 1;
    }
    seen
}

/// SIGKILLs the processes in `left` (workers that outlived their
/// primary, so that a failure leaves nothing behind), then fails.
pub fn kill_and_fail(left: &[u32], what: &str) {
    if left.is_empty() {
        return;
    }
    for &pid in left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    panic!("worker processes {left:?} outlived the primary ({what})");
}

/// SIGTERM: the primary exits 0, each worker alive at the signal exits 0
/// (none is late: no SIGTERM or SIGKILL from the primary), and no worker
/// process is left.
pub fn stop_cleanly(mut p: Primary) {
    let alive = p.alive_workers();
    let pids: Vec<u32> = p.started().iter().map(|w| w.1).collect();
    p.signal(Signal::SIGTERM);
    let status = p.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", p.log().dump());
    p.log().wait_for("shutdown complete");
    for (id, pid) in alive {
        assert_eq!(
            p.wait_exited(id),
            "status 0",
            "worker {id} (pid {pid}); log:\n{}",
            p.log().dump()
        );
    }
    assert_eq!(
        p.log().count("did not stop in time"),
        0,
        "{}",
        p.log().dump()
    );
    kill_and_fail(&wait_gone(&pids, DEADLINE), "after SIGTERM");
    p.assert_no_panic();
}

/// A port nobody listens on right now (there is a small window in which
/// another program could take it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port()
}
