//! The protocol from another language: `examples/python/hello.py`, a
//! standard-library Python worker, run as `distributor -- python3 hello.py`.

mod util;

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
    log.wait_for("handing 1 unacknowledged connections of worker 1 to other workers");
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
