//! The protocol from another language: `examples/python/hello.py`, a
//! standard-library Python worker, run as `distributor -- python3 hello.py`.

use crate::util;

use std::collections::BTreeMap;

use nix::sys::signal::Signal;
use util::{DEADLINE, HttpConn, Primary, have_program, repo_path};

/// Two Python workers: they say hello, take connections round-robin
/// (exactly 10 each of 20), answer with their id and pid, keep a
/// connection alive, and exit 0 on the stop message.
#[test]
fn python_workers_serve_round_robin() {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let script = repo_path("examples/python/hello.py");
    let script = script.to_str().expect("a UTF-8 path");
    let mut primary = Primary::start(2, &["--", "python3", script]);
    primary.wait_all_ready();
    let started: BTreeMap<u64, u32> = primary.started().into_iter().collect();
    assert_eq!(started.len(), 2, "{}", primary.log().dump());

    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for i in 0..20 {
        let r = primary.get();
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        let (id, pid) = r.worker();
        assert_eq!(r.body, format!("Hello from worker {id} (pid {pid})\n"));
        assert_eq!(
            started.get(&id),
            Some(&pid),
            "worker {id} answered as pid {pid}"
        );
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!(counts, BTreeMap::from([(1, 10), (2, 10)]));

    // Keep-alive: three requests on one connection, one worker.
    let mut conn = HttpConn::connect(primary.addr).unwrap();
    let a = conn.get(false).unwrap();
    let b = conn.get(false).unwrap();
    let c = conn.get(true).unwrap();
    assert_eq!((a.status, b.status, c.status), (200, 200, 200));
    assert_eq!(a.worker(), b.worker());
    assert_eq!(a.worker(), c.worker());
    assert_eq!(c.header("Connection"), Some("close"), "{c:?}");
    conn.expect_eof().unwrap();

    primary.signal(Signal::SIGTERM);
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    for (id, pid) in started {
        primary.log().wait_for(&format!(
            "worker {id} (pid {pid}) exited with status 0 after "
        ));
    }
    primary.log().wait_for("shutdown complete");
}

/// Starts `distributor -w 2 -- python3 -c SOURCE hello.py`: worker 1 runs
/// `source`, the others (`DISTRIBUTOR_WORKER_ID` != 1) run hello.py.
/// `None` without python3.
fn start_with_misbehaving_worker_1(source: &str) -> Option<Primary> {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return None;
    }
    let hello = repo_path("examples/python/hello.py");
    let prelude = "import os, socket, sys, time\n\
        if os.environ['DISTRIBUTOR_WORKER_ID'] != '1':\n    \
            os.execv(sys.executable, [sys.executable, sys.argv[1]])\n\
        chan = socket.socket(fileno=int(os.environ['DISTRIBUTOR_FD']))\n";
    let program = format!("{prelude}{source}");
    let hello = hello.to_str().expect("a UTF-8 path");
    let primary = Primary::start(2, &["--", "python3", "-c", &program, hello]);
    primary.wait_all_ready();
    Some(primary)
}

/// Worker 1 takes a connection and dies before acknowledging it: the
/// primary, which kept its copy, hands it to worker 2, and the client is
/// answered as if nothing happened.
#[test]
fn an_unacknowledged_connection_goes_to_another_worker() {
    let source = "chan.send(b'\\x80\\x00\\x01')\n\
        data, fds, flags, _ = socket.recv_fds(chan, 65536, 64)\n\
        assert data[0] == 1, data\n\
        os._exit(7)\n";
    let Some(primary) = start_with_misbehaving_worker_1(source) else {
        return;
    };
    let one = primary.wait_started(1);
    let two = primary.wait_started(2);

    let r = primary.get();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.worker(), (2, two), "{}", primary.log().dump());
    let log = primary.log();
    log.wait_for("handing 1 unacknowledged connection of worker 1 to other workers");
    log.wait_for(&format!("worker 1 (pid {one}) exited with status 7 after "));

    // The replacement, worker 3, runs hello.py and joins the rotation.
    let three = primary.wait_started(3);
    primary.wait_worker_ready(3);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(primary.get().worker());
    }
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([(2, two), (3, three)])
    );
}

/// Worker 1 sends a message of unknown type: the primary reports the
/// protocol error, stops that worker (SIGTERM) and replaces it, and keeps
/// serving with the others.
#[test]
fn a_worker_that_breaks_the_protocol_is_stopped_and_replaced() {
    let source = "chan.send(b'\\x80\\x00\\x01')\n\
        chan.send(b'\\x99garbage')\n\
        time.sleep(120)\n";
    let Some(primary) = start_with_misbehaving_worker_1(source) else {
        return;
    };
    let one = primary.wait_started(1);
    let two = primary.wait_started(2);
    let log = primary.log();
    let broke = log.wait_for(&format!("worker 1 (pid {one}) broke the protocol ("));
    assert!(broke.contains("; stopping it"), "{broke}");
    log.wait_for(&format!(
        "worker 1 (pid {one}) exited with signal 15 (SIGTERM) after "
    ));
    let three = primary.wait_started(3);
    primary.wait_worker_ready(3);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = primary.get();
        assert_eq!(r.status, 200, "{r:?}");
        seen.insert(r.worker());
    }
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([(2, two), (3, three)])
    );
}

/// `examples/python/minimal.py`, the worker of a few dozen lines that
/// PROTOCOL.md points to, does what the protocol asks: hello, round-robin
/// connections, PONGs fast enough for a 1 s worker timeout (pinged every
/// 250 ms, never taken for hung), a replacement after kill -9, a rolling
/// reload, and on SIGTERM it finishes a request that was still coming in
/// before it exits 0.
#[test]
fn the_minimal_python_worker_does_what_the_protocol_asks() {
    use std::io::{Read, Write};
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let script = repo_path("examples/python/minimal.py");
    let script = script.to_str().expect("a UTF-8 path");
    let mut primary = Primary::start(2, &["--worker-timeout", "1s", "--", "python3", script]);
    primary.wait_all_ready();
    let started: BTreeMap<u64, u32> = primary.started().into_iter().collect();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for i in 0..10 {
        let r = primary.get();
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        let (id, pid) = r.worker();
        assert_eq!(started.get(&id), Some(&pid), "{r:?}");
        *counts.entry(id).or_default() += 1;
    }
    assert_eq!(counts, BTreeMap::from([(1, 5), (2, 5)]));

    // Three worker timeouts pass: the PONGs keep both workers alive.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(primary.alive_workers().len(), 2, "{}", primary.log().dump());

    // kill -9: slot 1 gets worker 3, which serves.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(started[&1] as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    primary.wait_worker_ready(3);
    // A rolling reload: workers 4 and 5 replace 3 and 2.
    let from = primary.log().snapshot().len();
    primary.signal(Signal::SIGHUP);
    primary.log().wait_for_from(from, "reload complete");
    primary.wait_exited(2);
    primary.wait_exited(3);
    let now: std::collections::BTreeSet<u64> = primary
        .alive_workers()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        now,
        std::collections::BTreeSet::from([4, 5]),
        "{}",
        primary.log().dump()
    );
    let r = primary.get();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.worker().0 >= 4, "{r:?}");

    // A connection handed over before SIGTERM, its request sent after.
    let mut slow = std::net::TcpStream::connect(primary.addr).unwrap();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    // The server side of this connection, by its socket inode, in a
    // worker's fds: handed over.
    let inode = server_side_inode(primary.addr.port(), slow.local_addr().unwrap().port());
    let held = || {
        primary.alive_workers().iter().any(|(_, pid)| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy() == format!("socket:[{inode}]"))
                })
            })
        })
    };
    assert!(
        util::poll_until(DEADLINE, held),
        "the connection never reached a worker"
    );
    primary.signal(Signal::SIGTERM);
    primary.log().wait_for("shutting down");
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    let log = primary.log().dump();
    assert!(
        !log.contains("hung") && !log.contains("broke the protocol"),
        "{log}"
    );
}

/// What the primary used to take silently is a protocol error now: a
/// second HELLO, a PONG for a heartbeat it never sent, STATS in rr (where
/// the primary counts). Each gets the worker stopped and replaced, with
/// the reason in the log.
#[test]
fn a_second_hello_a_stray_pong_and_stats_in_rr_are_protocol_errors() {
    let cases = [
        ("chan.send(b'\\x80\\x00\\x01')\n", "it said HELLO twice"),
        (
            "chan.send(b'\\x84' + (7).to_bytes(8, 'big'))\n",
            "it answered heartbeat 7, which it was never sent",
        ),
        (
            "chan.send(b'\\x82' + (0).to_bytes(8, 'big'))\n",
            "it sent STATS, which only the kernel modes use",
        ),
    ];
    for (misstep, reason) in cases {
        let source = format!("chan.send(b'\\x80\\x00\\x01')\n{misstep}time.sleep(120)\n");
        let Some(primary) = start_with_misbehaving_worker_1(&source) else {
            return;
        };
        let one = primary.wait_started(1);
        let broke = primary
            .log()
            .wait_for(&format!("worker 1 (pid {one}) broke the protocol ("));
        assert!(broke.contains(reason), "{broke}");
        primary.wait_worker_ready(3);
        assert_eq!(primary.get().status, 200);
    }
}

/// In a kernel mode a worker that says HELLO and then only waits on its
/// channel would leave its share of clients waiting: the log says so
/// (STATS 0 right after HELLO is how a worker says it accepts on fd 3),
/// while hello.py, which does, gets no such line.
#[test]
fn a_kernel_mode_worker_that_never_reports_is_named() {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let source = "import os, socket, time\n\
        chan = socket.socket(fileno=int(os.environ['DISTRIBUTOR_FD']))\n\
        chan.send(b'\\x80\\x00\\x01')\n\
        time.sleep(120)\n";
    let mut silent = Primary::start(
        1,
        &[
            "--sched",
            "shared",
            "--shutdown-timeout",
            "2s",
            "--",
            "python3",
            "-c",
            source,
        ],
    );
    let pid = silent.wait_started(1);
    let line = silent.log().wait_for("said HELLO but no STATS");
    assert!(
        line.contains(&format!(
            "worker 1 (pid {pid}) said HELLO but no STATS: in shared mode"
        )),
        "{line}"
    );
    // It reads no STOP: SIGTERM at half the shutdown timeout ends it.
    silent.signal(Signal::SIGTERM);
    assert_eq!(silent.proc.expect_exit(DEADLINE).code(), Some(0));

    let hello = repo_path("examples/python/hello.py");
    let mut good = Primary::start(
        1,
        &[
            "--sched",
            "shared",
            "--",
            "python3",
            hello.to_str().unwrap(),
        ],
    );
    good.wait_all_ready();
    assert_eq!(good.get().status, 200);
    // Past the 1 s in which STATS 0 is due.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(good.log().count("no STATS"), 0, "{}", good.log().dump());
    good.terminate_promptly();
}

/// The inode of the accepted socket of the IPv4 loopback connection
/// between `server` port and `client` port, from /proc/net/tcp.
fn server_side_inode(server: u16, client: u16) -> u64 {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
            if port(f[1]) == server && port(f[2]) == client && f[9] != "0" {
                return f[9].parse().unwrap();
            }
        }
        assert!(std::time::Instant::now() < deadline, "no such connection");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
