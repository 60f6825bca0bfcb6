//! Hostile workers (`tests/fixtures/hostile_worker.py`): worker 1 breaks
//! the protocol in one way per test, usually while holding a connection it
//! has not acknowledged. The primary must name the problem in its log,
//! stop and replace that worker at once, give the connection to another
//! worker, leak no fd, never panic, and keep serving with the others.
//! Also: a worker that floods the primary with valid messages, one that
//! answers heartbeats but never acknowledges, and one that acknowledges and
//! exits while the primary is behind on its channel (the last two are
//! ignored: they show bugs in src/, see their reasons).

use crate::util;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, HttpConn, Primary, TempDir, have_program, repo_path};

/// Starts `distributor -w 2 --shutdown-timeout 2s EXTRA -- python3
/// hostile_worker.py MODE hello.py`; `None` without python3.
fn start(mode: &str, extra: &[&str]) -> Option<Primary> {
    start_with(mode, extra, &[])
}

/// As [`start`], with `more` arguments for the fixture after hello.py.
fn start_with(mode: &str, extra: &[&str], more: &[&str]) -> Option<Primary> {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return None;
    }
    let fixture = repo_path("tests/fixtures/hostile_worker.py");
    let hello = repo_path("examples/python/hello.py");
    let mut args = vec!["--shutdown-timeout", "2s"];
    args.extend(extra);
    args.extend([
        "--",
        "python3",
        fixture.to_str().expect("a UTF-8 path"),
        mode,
        hello.to_str().expect("a UTF-8 path"),
    ]);
    args.extend(more);
    Some(Primary::start(2, &args))
}

/// The worker ids that answer `n` new connections, each checked 200.
fn answered_by(primary: &Primary, n: usize) -> BTreeSet<u64> {
    (0..n)
        .map(|_| {
            let r = primary.get();
            assert_eq!(r.status, 200, "{r:?}");
            r.worker().0
        })
        .collect()
}

/// After worker 1 is gone: worker 3 replaced it, workers 2 and 3 serve,
/// the primary runs and never panicked.
fn check_replaced_and_serving(primary: &mut Primary) {
    primary.wait_worker_ready(3);
    assert_eq!(answered_by(primary, 4), BTreeSet::from([2, 3]));
    primary.assert_running();
    primary.assert_no_panic();
}

/// Worker 1 takes the first connection, keeps it unacknowledged and then
/// misbehaves as `mode` says. The primary must log `problem` (the text
/// after `worker 1 (pid PID) `), hand the connection to worker 2, which
/// answers it, see worker 1 exit as `exit`, replace it, and be back at its
/// fd count of before.
fn hostile_holding_a_connection(mode: &str, problem: &str, exit: &str) {
    let Some(mut primary) = start(mode, &[]) else {
        return;
    };
    primary.wait_all_ready();
    let one = primary.wait_started(1);
    let baseline = primary.fd_count();

    // Round-robin starts at worker 1. Not waiting for the end of file:
    // worker 1 holds a copy of the connection until it is killed.
    let mut client = HttpConn::connect(primary.addr).unwrap();
    let r = client
        .get(true)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", primary.log().dump()));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.worker().0, 2, "{r:?}");

    let log = primary.log();
    let (_, line) = log.wait_for_from(0, &format!("worker 1 (pid {one}) {problem}"));
    assert!(
        line.contains("; stopping it") || line.contains("closed its channel"),
        "{line}"
    );
    log.wait_for("handing 1 unacknowledged connection of worker 1 to other workers");
    assert_eq!(primary.wait_exited(1), exit, "{}", log.dump());
    check_replaced_and_serving(&mut primary);
    // Whatever worker 1 sent (fds included) was closed, its channel too.
    assert!(
        util::poll_until(DEADLINE, || primary.fd_count() == baseline),
        "the primary has {} fds, {baseline} before: {:?}",
        primary.fd_count(),
        util::proc_fds(primary.pid())
    );
}

#[test]
fn garbage_from_a_worker() {
    hostile_holding_a_connection(
        "garbage",
        "broke the protocol (unknown message type 0x99); stopping it",
        "signal 15 (SIGTERM)",
    );
}

#[test]
fn an_oversized_datagram_from_a_worker() {
    hostile_holding_a_connection(
        "oversized",
        "broke the protocol (message or its fds larger than the protocol allows); stopping it",
        "signal 15 (SIGTERM)",
    );
}

#[test]
fn a_truncated_ack() {
    hostile_holding_a_connection(
        "short_ack",
        "broke the protocol (ACK message of bad length 4); stopping it",
        "signal 15 (SIGTERM)",
    );
}

#[test]
fn an_fd_attached_by_a_worker() {
    hostile_holding_a_connection(
        "fd",
        "broke the protocol (0 connection entries came with 1 fds); stopping it",
        "signal 15 (SIGTERM)",
    );
}

/// 200 fds on one message: more than the primary's ancillary buffer holds
/// (the kernel truncates it); those that did arrive must be closed.
#[test]
fn a_flood_of_fds_attached_by_a_worker() {
    hostile_holding_a_connection(
        "many_fds",
        "broke the protocol (fds attached to its message, more than the receive buffer holds); stopping it",
        "signal 15 (SIGTERM)",
    );
}

#[test]
fn an_ack_for_a_connection_the_worker_was_never_given() {
    hostile_holding_a_connection(
        "foreign_ack",
        "broke the protocol (acknowledged connection 999999, which it does not hold); stopping it",
        "signal 15 (SIGTERM)",
    );
}

/// The channel closed while the process lives on and ignores SIGTERM: its
/// connection goes elsewhere, a replacement starts at once (not when the
/// process finally exits), and SIGKILL comes after the grace.
#[test]
fn a_channel_closed_while_holding_a_connection() {
    hostile_holding_a_connection("close_holding", "closed its channel", "signal 9 (SIGKILL)");
}

/// The channel closed right after HELLO, the process alive and ignoring
/// SIGTERM: replaced at once, killed after the grace.
#[test]
fn a_channel_closed_right_after_hello() {
    let Some(mut primary) = start("close_after_hello", &[]) else {
        return;
    };
    let one = primary.wait_started(1);
    let log = primary.log();
    let (closed_at, line) =
        log.wait_for_from(0, &format!("worker 1 (pid {one}) closed its channel"));
    assert!(line.contains(" WARN "), "{line}");
    // The replacement does not wait for the old process to exit.
    let (started_at, _) = log.wait_for_from(0, "worker 3 started (pid ");
    let (killed_at, _) = log.wait_for_from(
        0,
        &format!("worker 1 (pid {one}) did not stop in time: SIGKILL"),
    );
    assert!(
        closed_at < started_at && started_at < killed_at,
        "{}",
        log.dump()
    );
    assert_eq!(primary.wait_exited(1), "signal 9 (SIGKILL)");
    check_replaced_and_serving(&mut primary);
}

/// HELLO with another protocol version: refused, stopped, replaced; it
/// never gets a connection.
#[test]
fn a_hello_with_another_protocol_version() {
    let Some(mut primary) = start("bad_version", &[]) else {
        return;
    };
    let one = primary.wait_started(1);
    primary.log().wait_for(&format!(
        "worker 1 (pid {one}) broke the protocol (it speaks protocol version 2, this primary \
         speaks 1); stopping it"
    ));
    assert_eq!(primary.wait_exited(1), "signal 15 (SIGTERM)");
    let ready = primary
        .log()
        .count_where(|l| l.contains("worker 1 (pid ") && l.contains(" ready: "));
    assert_eq!(ready, 0, "{}", primary.log().dump());
    check_replaced_and_serving(&mut primary);
}

/// A worker that answers every heartbeat but never acknowledges the
/// connections it is given. Its clients must not wait for ever: with
/// `--worker-timeout 1s`, the connection should go to another worker.
#[test]
fn a_worker_that_answers_heartbeats_but_never_acknowledges() {
    let Some(mut primary) = start("pong_no_ack", &["--worker-timeout", "1s"]) else {
        return;
    };
    primary.wait_all_ready();
    let mut client = HttpConn::connect_with_timeout(primary.addr, Duration::from_secs(15)).unwrap();
    let r = client.get(true).unwrap_or_else(|e| {
        panic!(
            "the client of the non-acknowledging worker was never served: {e}; log:\n{}",
            primary.log().dump()
        )
    });
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.worker().0, 2, "{r:?}");
    primary
        .log()
        .wait_for("handing 1 unacknowledged connection of worker 1 to other workers");
    primary.assert_running();
    primary.assert_no_panic();
}

/// Worker 1 serves well but floods the primary with (valid) MESSAGEs from
/// three child processes, as fast as the channel takes them. The primary
/// reads a bounded number of messages per channel per turn, so it keeps
/// accepting: 40 connections are answered in strict rotation, 20 by each
/// worker, and the flooder, which breaks no rule, is not stopped. (Without
/// the per-turn bound the primary still gets through here, only slower:
/// this checks that a flood breaks nothing, not the bound itself.)
#[test]
fn a_flooding_worker_does_not_starve_the_others() {
    let Some(mut primary) = start("flood", &[]) else {
        return;
    };
    primary.wait_all_ready();
    // The flood starts 0.2 s after the start.
    std::thread::sleep(Duration::from_millis(500));
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let r = primary.get();
        assert_eq!(r.status, 200, "{r:?}");
        *counts.entry(r.worker().0).or_insert(0) += 1;
    }
    assert_eq!(counts, std::collections::BTreeMap::from([(1, 20), (2, 20)]));
    assert_eq!(primary.log().count("broke the protocol"), 0);
    assert_eq!(primary.started().len(), 2, "{}", primary.log().dump());
    primary.assert_running();
    primary.assert_no_panic();
}

/// Worker 1 acknowledges its connection, answers the request itself and
/// exits 0 at once, while the primary is behind on reading its channel
/// (more than one turn's worth of messages, 64, come before the ACK; the
/// primary is held with SIGSTOP meanwhile to make that certain). The
/// primary must read what the worker sent before it died: the connection
/// is worker 1's, taken and answered, so it must not be handed to another
/// worker (which would serve it a second time, or here hold it open so
/// that the client never sees the end of it).
#[test]
fn an_acknowledged_connection_is_not_handed_over_after_the_worker_exits() {
    let marks = TempDir::new("burst-ack-exit");
    let dir = marks.path().to_str().expect("a UTF-8 path");
    let Some(mut primary) = start_with("burst_ack_exit", &[], &[dir]) else {
        return;
    };
    primary.wait_all_ready();
    let one = primary.wait_started(1);

    let mut client = HttpConn::connect(primary.addr).unwrap();
    client.send(&util::request(true)).unwrap();
    assert!(
        util::poll_until(DEADLINE, || marks.path().join("got").exists()),
        "worker 1 never got the connection; log:\n{}",
        primary.log().dump()
    );
    // Hold the primary while worker 1 sends its burst, acknowledges,
    // answers and exits.
    assert!(
        util::stop_process(primary.pid(), DEADLINE),
        "the primary did not stop"
    );
    std::fs::write(marks.path().join("go"), b"").unwrap();
    let gone = util::poll_until(DEADLINE, || util::pid_gone(one));
    primary.signal(Signal::SIGCONT);
    assert!(gone, "worker 1 did not exit");

    let r = client.read_response().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.worker().0, 1, "{r:?}");
    let exit = primary
        .log()
        .wait_for(&format!("worker 1 (pid {one}) exited with status 0"));
    let eof = client.expect_eof();
    assert_eq!(
        primary.log().count("of worker 1 to other workers"),
        0,
        "worker 1's acknowledged connection was handed over; log:\n{}",
        primary.log().dump()
    );
    assert!(exit.contains("having taken 1 connection"), "{exit}");
    eof.expect("the connection ends once worker 1 has closed it");
    primary.assert_running();
    primary.assert_no_panic();
}
