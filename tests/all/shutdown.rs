//! Graceful stop on SIGTERM and SIGINT: the listener closes at once, a
//! request in flight is still answered (with `Connection: close`), the
//! workers exit 0 and so does the primary.

use crate::util;

use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, HttpConn, Primary, refuses_connections};

/// SIGTERM while a request is half sent: the worker waits for the rest,
/// answers it with `Connection: close` and closes; meanwhile and afterwards
/// new connections are refused; everyone exits 0.
#[test]
fn sigterm_drains_a_request_in_flight() {
    let mut primary = Primary::start(1, &[]);
    primary.wait_all_ready();

    // A full request first, so that the worker surely holds the connection
    // (one still in the listener's backlog at SIGTERM would be refused).
    let mut conn = HttpConn::connect(primary.addr).unwrap();
    let first = conn.get(false).unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    let (id, pid) = first.worker();

    // Half a request: the request line and one header, no blank line.
    conn.send("GET /slow HTTP/1.1\r\nHost: test\r\n").unwrap();
    // Let the worker read it, so that the connection is not idle at STOP.
    std::thread::sleep(Duration::from_millis(500));

    let mark = primary.log().len();
    primary.signal(Signal::SIGTERM);
    primary.log().wait_for_from(mark, "SIGTERM received");
    primary
        .log()
        .wait_for_from(mark, "shutting down: stopping 1 worker ");
    std::thread::sleep(Duration::from_millis(300));

    // Draining: still running for the request in flight, listener closed.
    assert!(
        primary.proc.try_status().is_none(),
        "the primary exited with a request in flight:\n{}",
        primary.log().dump()
    );
    assert!(
        refuses_connections(primary.addr),
        "new connections are accepted while draining"
    );

    conn.send("X-Late: yes\r\n\r\n").unwrap();
    let r = conn
        .read_response()
        .expect("the request in flight is answered");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    assert_eq!(r.worker(), (id, pid));
    conn.expect_eof()
        .expect("the worker closes after the last answer");

    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    primary.log().wait_for("shutdown complete");
    primary.log().wait_for(&format!(
        "worker {id} (pid {pid}) exited with status 0 after "
    ));
    assert_eq!(
        primary.log().count("did not stop in time"),
        0,
        "{}",
        primary.log().dump()
    );
    assert!(util::wait_gone(&[pid], DEADLINE).is_empty());
    assert!(refuses_connections(primary.addr));
}

/// SIGINT stops as SIGTERM does.
#[test]
fn sigint_stops_gracefully() {
    let mut primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    assert_eq!(primary.get().status, 200);
    let pids: Vec<u32> = primary.started().iter().map(|w| w.1).collect();

    primary.signal(Signal::SIGINT);
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    primary.log().wait_for("SIGINT received");
    primary.log().wait_for("shutdown complete");
    for (id, pid) in primary.started() {
        primary.log().wait_for(&format!(
            "worker {id} (pid {pid}) exited with status 0 after "
        ));
    }
    assert!(util::wait_gone(&pids, DEADLINE).is_empty());
    assert!(refuses_connections(primary.addr));
}

/// A worker that ignores SIGTERM (and never says hello) is SIGKILLed when
/// `--shutdown-timeout` runs out; the primary still exits 0.
#[test]
fn a_stubborn_worker_is_killed_after_the_shutdown_timeout() {
    let stubborn = [
        "--shutdown-timeout",
        "1s",
        "--",
        "sh",
        "-c",
        "trap '' TERM; exec sleep 120",
    ];
    let mut primary = Primary::start(1, &stubborn);
    let pid = primary.wait_started(1);
    // Wait for the exec: the ignored SIGTERM is inherited by `sleep`.
    assert!(util::poll_until(DEADLINE, || {
        util::proc_comm(pid).as_deref() == Some("sleep")
    }));

    primary.signal(Signal::SIGTERM);
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    let log = primary.log();
    log.wait_for(&format!(
        "worker 1 (pid {pid}) did not stop in time: SIGKILL"
    ));
    log.wait_for(&format!(
        "worker 1 (pid {pid}) exited with signal 9 (SIGKILL) after "
    ));
    log.wait_for("shutdown complete");
    assert!(util::wait_gone(&[pid], DEADLINE).is_empty());
}

/// A second SIGTERM during a graceful stop kills the workers at once,
/// without waiting for the (here very long) shutdown timeout.
#[test]
fn a_second_signal_kills_the_workers_at_once() {
    let stubborn = [
        "--shutdown-timeout",
        "1h",
        "--",
        "sh",
        "-c",
        "trap '' TERM; exec sleep 120",
    ];
    let mut primary = Primary::start(2, &stubborn);
    let pids: Vec<u32> = (1..=2).map(|id| primary.wait_started(id)).collect();
    for &pid in &pids {
        assert!(util::poll_until(DEADLINE, || {
            util::proc_comm(pid).as_deref() == Some("sleep")
        }));
    }

    primary.signal(Signal::SIGTERM);
    primary.log().wait_for("shutting down: stopping 2 workers");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        primary.proc.try_status().is_none(),
        "the primary did not wait for its workers:\n{}",
        primary.log().dump()
    );
    primary.signal(Signal::SIGINT);
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    primary
        .log()
        .wait_for("second stop request: killing the workers now");
    for (id, pid) in primary.started() {
        primary.log().wait_for(&format!(
            "worker {id} (pid {pid}) exited with signal 9 (SIGKILL)"
        ));
    }
    assert!(util::wait_gone(&pids, DEADLINE).is_empty());
}
