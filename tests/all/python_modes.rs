//! `examples/python/hello.py` in the kernel balancing modes: the script that
//! takes CONNECTION messages in rr accepts by itself on the socket-activated
//! listener (fd 3) under `--sched shared|reuseport`, and reports what it
//! accepted with STATS, so that the primary's per-worker figures match what
//! the clients saw: at exit, and while it runs.

use crate::util;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};

use distributor::{Sched, WorkerCommand};
use nix::sys::signal::Signal;
use util::{DEADLINE, Primary, exit_lines, get_once, have_program, repo_path};

/// Requests per test: enough that both workers almost surely get some.
const REQUESTS: u64 = 40;

/// The path of hello.py; `None` (with a note) when python3 is missing.
fn hello_py() -> Option<String> {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return None;
    }
    let script = repo_path("examples/python/hello.py");
    Some(script.to_str().expect("a UTF-8 path").to_string())
}

/// `REQUESTS` requests on new connections, each checked to come from one of
/// `workers` (id → pid), with hello.py's body; the count per worker id,
/// every worker present (0 for one the kernel gave nothing).
fn serve(
    addr: SocketAddr,
    workers: &BTreeMap<u64, u32>,
    log: &dyn Fn() -> String,
) -> BTreeMap<u64, u64> {
    let mut seen: BTreeMap<u64, u64> = workers.keys().map(|&id| (id, 0)).collect();
    for i in 0..REQUESTS {
        let r = get_once(addr).unwrap_or_else(|e| panic!("request {i}: {e}\n{}", log()));
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        let (id, pid) = r.worker();
        assert_eq!(r.body, format!("Hello from worker {id} (pid {pid})\n"));
        assert_eq!(
            workers.get(&id),
            Some(&pid),
            "worker {id} answered as pid {pid}; workers {workers:?}"
        );
        *seen.entry(id).or_default() += 1;
    }
    seen
}

/// `distributor -w 2 --sched MODE -- python3 hello.py`: serves, and after
/// SIGTERM each worker's `having taken N` is what the clients saw of it.
fn serves_and_reports_at_exit(mode: &str) {
    let Some(script) = hello_py() else {
        return;
    };
    let mut p = Primary::start(2, &["--sched", mode, "--", "python3", &script]);
    p.wait_all_ready();
    assert!(
        p.log().contains(&format!("({mode}:")),
        "the listening line names the mode:\n{}",
        p.log().dump()
    );
    let started: BTreeMap<u64, u32> = p.started().into_iter().collect();
    assert_eq!(started.len(), 2, "{}", p.log().dump());
    let seen = serve(p.addr, &started, &|| p.log().dump());
    assert_eq!(seen.values().sum::<u64>(), REQUESTS);

    p.signal(Signal::SIGTERM);
    let status = p.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", p.log().dump());
    p.log().wait_for("shutdown complete");
    // The workers accepted by themselves (no CONNECTION, no ACK): the
    // primary knows their counts only from their STATS messages.
    let expected: BTreeMap<u64, (u32, String, u64)> = seen
        .iter()
        .map(|(&id, &n)| (id, (started[&id], "status 0".to_string(), n)))
        .collect();
    assert_eq!(exit_lines(&p), expected, "{}", p.log().dump());
}

#[test]
fn python_worker_accepts_itself_and_reports_in_shared_mode() {
    serves_and_reports_at_exit("shared");
}

#[test]
fn python_worker_accepts_itself_and_reports_in_reuseport_mode() {
    serves_and_reports_at_exit("reuseport");
}

/// A listener with `SO_REUSEPORT`, as a reuseport primary requires.
fn reuseport_listener() -> TcpListener {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(128).expect("listen");
    socket.into()
}

/// The library's primary with hello.py workers and no heartbeats: the
/// figures of `Handle::stats` can then only come from the STATS messages a
/// worker sends by itself (at most every 100 ms while its total changes),
/// and must match what the clients saw before any stop.
fn reports_while_running(sched: Sched, listener: TcpListener) {
    let Some(script) = hello_py() else {
        return;
    };
    let util::Library {
        addr,
        events,
        handle,
        runner,
        ..
    } = util::run_library(
        distributor::Primary::builder()
            .workers(2)
            .listener(listener)
            .sched(sched)
            .command(WorkerCommand::new("python3", [script]))
            .worker_timeout(None),
    );

    let workers = util::wait_ready_events(&events, 2, true);
    let seen = serve(addr, &workers, &String::new);

    let figures = || -> BTreeMap<u64, u64> {
        handle
            .stats()
            .expect("stats")
            .workers
            .iter()
            .map(|w| (w.id, w.connections))
            .collect()
    };
    let ok = util::poll_until(DEADLINE, || figures() == seen);
    assert!(
        ok,
        "the primary's figures {:?} never matched what clients saw {seen:?}",
        figures()
    );
    util::shut_down(&handle, runner);
}

#[test]
fn python_worker_reports_while_running_in_shared_mode() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    reports_while_running(Sched::Shared, listener);
}

#[test]
fn python_worker_reports_while_running_in_reuseport_mode() {
    reports_while_running(Sched::ReusePort, reuseport_listener());
}
