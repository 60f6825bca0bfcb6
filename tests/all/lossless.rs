//! Nothing in transit is lost to a dying or hung worker: the primary keeps
//! its copy of every connection until a worker acknowledges it, and hands
//! the unacknowledged ones to another worker when their worker is gone.
//! Each test makes a worker unable to acknowledge (SIGSTOP) or kills every
//! worker at once, with clients already waiting.

use crate::util;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, Primary, kill_pid, pid_gone, spawn_gets, stop_process};

/// Long enough for a client to wait through a worker's hang detection and
/// replacement on a busy machine.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Worker 1 is stopped (SIGSTOP), then 10 clients connect at once: the
/// primary sends every other one (5) to worker 1, which cannot acknowledge
/// them, and holds its copies (its fd count shows exactly 5 more). Then worker 1 is killed: the primary hands those to another
/// worker and every client gets its 200.
#[test]
fn connections_held_by_a_stopped_worker_survive_its_kill() {
    let primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    let one = primary.wait_started(1);
    let baseline = primary.fd_count();
    assert!(stop_process(one, DEADLINE), "worker 1 did not stop");

    let clients = spawn_gets(primary.addr, 10, CLIENT_TIMEOUT);
    assert!(
        clients.wait_sent(DEADLINE),
        "the clients did not all connect"
    );
    // Round-robin gives worker 1 every other connection; the primary keeps
    // a copy of each until it is acknowledged, so its fd count shows them:
    // worker 1's 5, none of worker 2's, which it acknowledges at once.
    let holding = util::poll_until(DEADLINE, || primary.fd_count() == baseline + 5);
    assert!(
        holding,
        "the primary does not hold exactly the stopped worker's 5 connections: {} fds, {baseline} \
         before; log:\n{}",
        primary.fd_count(),
        primary.log().dump()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        primary.fd_count(),
        baseline + 5,
        "fds held for the stopped worker"
    );

    let mark = primary.log().len();
    kill_pid(one, Signal::SIGKILL);
    let results = clients.join();
    let mut answered_by = BTreeSet::new();
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("client {i}: {e}; log:\n{}", primary.log().dump()));
        assert_eq!(r.status, 200, "client {i}: {r:?}");
        assert_ne!(r.worker().1, one, "answered by the stopped worker");
        answered_by.insert(r.worker().0);
    }
    // Worker 2 (or worker 3, the replacement, if it was ready in time).
    assert!(answered_by.contains(&2), "{answered_by:?}");
    assert!(answered_by.is_subset(&BTreeSet::from([2, 3])));
    let (_, line) = primary.log().wait_for_from(
        mark,
        "handing 5 unacknowledged connections of worker 1 to other workers",
    );
    assert!(line.contains(" INFO "), "{line}");
    let how = primary.wait_exited(1);
    assert_eq!(how, "signal 9 (SIGKILL)");
    assert!(pid_gone(one));
    // Nothing held any more: the copies were closed once acknowledged.
    primary.wait_worker_ready(3);
    assert!(
        util::poll_until(DEADLINE, || primary.fd_count() == baseline),
        "{} fds, {baseline} before",
        primary.fd_count()
    );
    primary.assert_no_panic();
}

/// Both workers killed at the same moment, and 20 clients connecting right
/// after: no worker can take them for a while, so they wait in the
/// listener's backlog (none refused, none reset) and are all answered by
/// the replacements, workers 3 and 4.
#[test]
fn all_workers_killed_at_once_lose_no_connection() {
    let mut primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    let pids = [primary.wait_started(1), primary.wait_started(2)];
    for pid in pids {
        kill_pid(pid, Signal::SIGKILL);
    }
    let results = spawn_gets(primary.addr, 20, CLIENT_TIMEOUT).join();
    let mut answered_by = BTreeSet::new();
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("client {i}: {e}; log:\n{}", primary.log().dump()));
        assert_eq!(r.status, 200, "client {i}: {r:?}");
        answered_by.insert(r.worker().0);
    }
    assert!(
        !answered_by.is_empty() && answered_by.is_subset(&BTreeSet::from([3, 4])),
        "answered by {answered_by:?}; log:\n{}",
        primary.log().dump()
    );
    for id in [1, 2] {
        assert_eq!(primary.wait_exited(id), "signal 9 (SIGKILL)");
    }
    primary.wait_worker_ready(3);
    primary.wait_worker_ready(4);
    // Both replacements serve.
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(primary.get().worker().0);
    }
    assert_eq!(seen, BTreeSet::from([3, 4]));
    primary.assert_running();
    primary.assert_no_panic();
}

/// Hang detection: with `--worker-timeout 1s`, a stopped worker is reported
/// hung, cut off and replaced (the replacement becomes ready), then killed
/// when its grace runs out (it cannot act on SIGTERM while stopped);
/// requests sent throughout, some of them first given to the stopped
/// worker, are all answered.
#[test]
fn a_hung_worker_is_detected_replaced_and_killed() {
    let mut primary = Primary::start(2, &["--worker-timeout", "1s", "--shutdown-timeout", "2s"]);
    primary.wait_all_ready();
    let one = primary.wait_started(1);
    let mark = primary.log().len();
    assert!(stop_process(one, DEADLINE), "worker 1 did not stop");

    // Requests throughout, two at a time, until the hung worker is gone
    // and its replacement serves.
    let mut answered = 0;
    let mut by_replacement = 0;
    let mut rounds = 0;
    while !(pid_gone(one) && by_replacement > 0) {
        rounds += 1;
        assert!(
            rounds < 200,
            "the hung worker was not replaced and killed; log:\n{}",
            primary.log().dump()
        );
        for (i, r) in spawn_gets(primary.addr, 2, CLIENT_TIMEOUT)
            .join()
            .into_iter()
            .enumerate()
        {
            let r = r.unwrap_or_else(|e| {
                panic!(
                    "round {rounds} client {i}: {e}; log:\n{}",
                    primary.log().dump()
                )
            });
            assert_eq!(r.status, 200, "{r:?}");
            assert_ne!(r.worker().0, 1, "answered by the stopped worker");
            answered += 1;
            if r.worker().0 == 3 {
                by_replacement += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let log = primary.log();
    let (hung_at, hung) = log.wait_for_from(mark, &format!("worker 1 (pid {one}) is hung: "));
    assert!(
        hung.contains("no acknowledgement or heartbeat for") && hung.contains("; stopping it"),
        "{hung}"
    );
    let (started_at, _) = log.wait_for_from(mark, "worker 3 started (pid ");
    assert!(started_at > hung_at, "{}", log.dump());
    // The first round's connection to worker 1 waited for the hang
    // detection and was handed over.
    log.wait_for_from(mark, "of worker 1 to other workers");
    primary.wait_worker_ready(3);
    // It held connections now given to others: killed at once, so that it
    // cannot wake up and serve one of them too.
    log.wait_for_from(
        mark,
        &format!("worker 1 (pid {one}) still has copies of the connections given to other workers: SIGKILL"),
    );
    assert_eq!(primary.wait_exited(1), "signal 9 (SIGKILL)");
    assert!(answered >= 2);
    eprintln!(
        "{answered} requests answered while worker 1 hung, {by_replacement} by its replacement"
    );
    primary.assert_running();
    primary.assert_no_panic();
}

/// A rolling reload while worker 1 is stopped with connections it has not
/// acknowledged: its replacement takes over its slot; worker 1 cannot act
/// on the stop message, so it is killed when `--shutdown-timeout` (2 s)
/// runs out, and only then are its connections handed to the new workers.
/// Every client is answered, none by worker 1.
#[test]
fn a_reload_that_retires_a_stopped_worker_loses_nothing() {
    let primary = Primary::start(2, &["--shutdown-timeout", "2s"]);
    primary.wait_all_ready();
    let one = primary.wait_started(1);
    let baseline = primary.fd_count();
    assert!(stop_process(one, DEADLINE), "worker 1 did not stop");
    let clients = spawn_gets(primary.addr, 6, CLIENT_TIMEOUT);
    assert!(
        clients.wait_sent(DEADLINE),
        "the clients did not all connect"
    );
    assert!(
        util::poll_until(DEADLINE, || primary.fd_count() == baseline + 3),
        "the primary does not hold the stopped worker's 3 connections: {} fds, {baseline} before",
        primary.fd_count()
    );

    let mark = primary.log().len();
    primary.signal(Signal::SIGHUP);
    primary.log().wait_for_from(mark, "reload complete");
    let mut answered_by = BTreeSet::new();
    for (i, r) in clients.join().into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("client {i}: {e}; log:\n{}", primary.log().dump()));
        assert_eq!(r.status, 200, "client {i}: {r:?}");
        answered_by.insert(r.worker().0);
    }
    assert!(
        answered_by.is_subset(&BTreeSet::from([2, 3, 4])),
        "{answered_by:?}"
    );
    let log = primary.log();
    log.wait_for_from(
        mark,
        &format!("worker 1 (pid {one}) did not stop in time: SIGKILL"),
    );
    log.wait_for_from(
        mark,
        "handing 3 unacknowledged connections of worker 1 to other workers",
    );
    assert_eq!(primary.wait_exited(1), "signal 9 (SIGKILL)");
    assert_eq!(primary.wait_exited(2), "status 0");
    primary.assert_no_panic();
}
