//! Bursts: connections that arrive together go to a worker in one
//! CONNECTION message (one `sendmsg`, up to 64 fds, never more than the
//! worker may hold unacknowledged), and the primary tells workers whether
//! it reads completion reports. The worker is
//! `tests/fixtures/burst_worker.py`, which records every message's number
//! of connections and holds its HELLO until the test says go, so that the
//! burst waits in the backlog first.

use crate::util;

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, Primary, TempDir, have_program, kill_pid, poll_until, repo_path, spawn_gets};

/// `distributor -w 1 EXTRA -- python3 burst_worker.py DIR`; `None` without
/// python3.
fn start(dir: &Path, extra: &[&str]) -> Option<Primary> {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return None;
    }
    let fixture = repo_path("tests/fixtures/burst_worker.py");
    let mut args = extra.to_vec();
    args.extend([
        "--",
        "python3",
        fixture.to_str().expect("a UTF-8 path"),
        dir.to_str().expect("a UTF-8 path"),
    ]);
    Some(Primary::start(1, &args))
}

/// The connections of each CONNECTION message worker `id` received.
fn batches(dir: &Path, id: u64) -> Vec<usize> {
    std::fs::read_to_string(dir.join(format!("batches-{id}")))
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().expect("a count per line"))
        .collect()
}

/// `n` clients connect and send while the worker is not ready yet; then it
/// says hello and every client must get its answer. Returns the messages'
/// sizes.
fn burst(extra: &[&str], n: usize) -> Option<Vec<usize>> {
    let dir = TempDir::new("burst");
    let p = start(dir.path(), extra)?;
    let clients = spawn_gets(p.addr, n, DEADLINE);
    assert!(
        clients.wait_sent(DEADLINE),
        "only {} of {n} clients sent",
        clients.sent()
    );
    std::fs::write(dir.path().join("go"), "").expect("go file");
    for r in clients.join() {
        let r = r.expect("every client is answered");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "burst worker 1\n");
    }
    let got = batches(dir.path(), 1);
    assert_eq!(got.iter().sum::<usize>(), n, "{got:?}");
    Some(got)
}

#[test]
fn a_burst_goes_to_the_worker_in_messages_of_up_to_64() {
    // The 70 wait in the backlog until the worker is ready; then the
    // primary accepts them all and sends 64 (the most one message carries
    // and, here, the unacknowledged limit) in one message, and the 6 left
    // once those are acknowledged.
    let Some(got) = burst(&["--max-unacked", "64"], 70) else {
        return;
    };
    assert_eq!(got, vec![64, 6]);
}

#[test]
fn a_burst_respects_the_unacknowledged_limit() {
    // The default limit is 16 connections not yet acknowledged per worker:
    // no message may carry more, and the first carries that many.
    let Some(got) = burst(&[], 40) else {
        return;
    };
    assert_eq!(got[0], 16, "{got:?}");
    assert!(got.iter().all(|&b| b <= 16), "{got:?}");
}

/// A ready worker (the go file written), then `n` requests one after the
/// other, waiting until the worker has recorded `n` messages; `None`
/// without python3.
fn lone_requests(dir: &Path, n: usize) -> Option<Primary> {
    let p = start(dir, &[])?;
    std::fs::write(dir.join("go"), "").expect("go file");
    for _ in 0..n {
        let r = p.get();
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(poll_until(DEADLINE, || batches(dir, 1).len() == n));
    Some(p)
}

#[test]
fn one_connection_at_a_time_goes_alone() {
    let dir = TempDir::new("burst-single");
    if lone_requests(dir.path(), 5).is_none() {
        return;
    }
    assert_eq!(batches(dir.path(), 1), vec![1; 5]);
}

/// After connections that came one at a time, the first connection of the
/// next accept loop goes out alone and at once, before the `accept` that
/// ends the loop (the worker starts on it while the primary makes that
/// call); the others that waited meanwhile follow in one message. The ten
/// wait in the backlog while the primary is stopped (SIGSTOP), so that
/// one accept loop finds them all.
#[test]
fn after_lone_connections_the_first_of_the_next_loop_goes_at_once() {
    let dir = TempDir::new("burst-lone");
    let Some(p) = lone_requests(dir.path(), 3) else {
        return;
    };
    kill_pid(p.pid(), Signal::SIGSTOP);
    let clients = spawn_gets(p.addr, 10, DEADLINE);
    let sent = clients.wait_sent(DEADLINE);
    kill_pid(p.pid(), Signal::SIGCONT);
    assert!(
        sent,
        "the clients could not send while the primary was stopped"
    );
    for r in clients.join() {
        let r = r.expect("an answer");
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(poll_until(DEADLINE, || batches(dir.path(), 1)
        .iter()
        .sum::<usize>()
        == 13));
    assert_eq!(batches(dir.path(), 1), vec![1, 1, 1, 1, 9]);
}

#[test]
fn workers_are_told_whether_the_primary_reads_completion_reports() {
    for (sched, wanted) in [
        ("rr", "1"),
        ("least-conn", "1"),
        ("shared", "0"),
        ("reuseport", "0"),
    ] {
        let dir = TempDir::new("burst-env");
        let Some(p) = start(dir.path(), &["--sched", sched]) else {
            return;
        };
        let env = dir.path().join("env-1");
        assert!(
            poll_until(Duration::from_secs(10), || std::fs::read_to_string(&env)
                .is_ok_and(|v| !v.is_empty())),
            "worker 1 never started under {sched}; log:\n{}",
            p.log().dump()
        );
        assert_eq!(
            std::fs::read_to_string(&env).expect("env file"),
            wanted,
            "DISTRIBUTOR_REPORT_FINISHED under --sched {sched}"
        );
    }
}
