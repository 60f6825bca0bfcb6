//! The primary as supervisor: replacing workers killed with SIGKILL (new
//! id, new pid, no lost requests), backing off a crash loop, and taking
//! its workers down with it when it is killed itself.

use crate::util;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{DEADLINE, Primary, kill_pid, pid_gone, wait_gone};

/// A worker killed with SIGKILL: the exit is logged as such, the survivor
/// serves every request meanwhile, and a replacement with a new id and a
/// new pid joins the rotation.
#[test]
fn a_killed_worker_is_replaced_and_requests_keep_being_served() {
    let mut primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    let first = primary.get();
    assert_eq!(first.worker().0, 1, "{first:?}");
    let victim = first.worker().1;
    assert_eq!(primary.wait_started(1), victim);
    let survivor = primary.wait_started(2);

    let mark = primary.log().len();
    kill_pid(victim, Signal::SIGKILL);

    // Served throughout: by the survivor until the replacement is ready.
    for i in 0..10 {
        let r = primary.get();
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_ne!(
            r.worker().1,
            victim,
            "request {i} answered by the killed worker"
        );
    }

    let (_, exited) = primary
        .log()
        .wait_for_from(mark, &format!("worker 1 (pid {victim}) exited with "));
    assert!(
        exited.contains("exited with signal 9 (SIGKILL) after "),
        "{exited}"
    );
    // "1 connection" or "1 connections": either wording.
    assert!(exited.contains("having taken 1 connection"), "{exited}");

    let replacement = primary.wait_started(3);
    assert_ne!(replacement, victim);
    assert_ne!(replacement, survivor);
    assert!(
        primary
            .wait_worker_ready(3)
            .contains(" ready: 2 of 2 slots ready"),
        "{}",
        primary.log().dump()
    );
    assert!(
        pid_gone(victim),
        "the killed worker {victim} is still there"
    );

    // Both slots serve again: the survivor and the replacement alternate.
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        let r = primary.get();
        assert_eq!(r.status, 200, "{r:?}");
        seen.insert(r.worker());
    }
    assert_eq!(
        seen,
        BTreeSet::from([(2, survivor), (3, replacement)]),
        "{}",
        primary.log().dump()
    );
    assert!(primary.proc.try_status().is_none(), "the primary died");
}

/// Every start gets the next id, replacements included, and the worker's
/// own view of its id (DISTRIBUTOR_WORKER_ID, echoed by the demo worker)
/// agrees with the primary's log.
#[test]
fn replacements_get_the_next_ids() {
    let primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    assert_eq!(
        primary.started().iter().map(|w| w.0).collect::<Vec<_>>(),
        [1, 2]
    );

    // Kill worker 2: its replacement is worker 3.
    let two = primary.wait_started(2);
    kill_pid(two, Signal::SIGKILL);
    let three = primary.wait_started(3);
    primary.wait_worker_ready(3);

    // Kill worker 1: its replacement is worker 4, not 3 again nor 1.
    let one = primary.wait_started(1);
    kill_pid(one, Signal::SIGKILL);
    let four = primary.wait_started(4);
    primary.wait_worker_ready(4);

    let ids: Vec<u64> = primary.started().iter().map(|w| w.0).collect();
    assert_eq!(ids, [1, 2, 3, 4], "{}", primary.log().dump());
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(primary.get().worker());
    }
    assert_eq!(seen, BTreeSet::from([(3, three), (4, four)]));
}

/// A worker command that exits at once is restarted with backoff, not in
/// a fork storm; the crash loop is reported; the primary stays up and
/// still stops cleanly on SIGTERM.
#[test]
fn a_crash_loop_backs_off() {
    let t0 = Instant::now();
    let mut primary = Primary::start(1, &["--", "sh", "-c", "exit 3"]);
    primary
        .log()
        .wait_for("worker slot 1 is crash-looping: 3 exits in a row");
    let exit = primary.log().wait_for(") exited with status 3 after ");
    assert!(exit.contains("worker 1 (pid "), "{exit}");

    // Watch for about 3 s in all.
    let watch = Duration::from_secs(3);
    if let Some(left) = watch.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    let starts = primary.log().count(" started (pid ");
    // Backoff from 100 ms, doubling: about 5 starts in 3 s. Without it,
    // thousands.
    assert!(
        (3..=12).contains(&starts),
        "{starts} starts in {:?}:\n{}",
        t0.elapsed(),
        primary.log().dump()
    );
    assert!(primary.proc.try_status().is_none(), "the primary died");

    primary.signal(Signal::SIGTERM);
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", primary.log().dump());
    primary.log().wait_for("shutdown complete");
}

/// SIGKILL of the primary takes every worker with it
/// (`PR_SET_PDEATHSIG`): no orphan keeps running. The workers run `sleep`,
/// which never reads its channel, so only the death signal can stop them
/// (the demo worker would also exit on its channel's end of file).
#[test]
fn killing_the_primary_leaves_no_orphan() {
    let mut primary = Primary::start(3, &["--", "sleep", "120"]);
    let pids: Vec<u32> = (1..=3).map(|id| primary.wait_started(id)).collect();
    for &pid in &pids {
        assert!(
            util::poll_until(DEADLINE, || util::proc_comm(pid).as_deref()
                == Some("sleep")),
            "worker {pid} never ran sleep"
        );
    }

    primary.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let status = primary.proc.expect_exit(DEADLINE);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let left = wait_gone(&pids, Duration::from_secs(5));
    reap_orphans_and_fail(&left);
    eprintln!(
        "workers gone {:?} after the primary's SIGKILL",
        killed.elapsed()
    );
    assert!(util::refuses_connections(primary.addr));
}

/// Kills the workers that outlived their primary (so that a failure
/// leaves nothing behind), then fails.
fn reap_orphans_and_fail(left: &[u32]) {
    if left.is_empty() {
        return;
    }
    for &pid in left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    panic!("workers {left:?} outlived the primary");
}

/// The same with demo workers serving: nothing is left of them either.
#[test]
fn killing_the_primary_takes_serving_workers_along() {
    let mut primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    let pids: Vec<u32> = primary.started().iter().map(|w| w.1).collect();
    assert_eq!(pids.len(), 2);
    // One worker holds an open keep-alive connection.
    let mut conn = util::HttpConn::connect(primary.addr).unwrap();
    assert_eq!(conn.get(false).unwrap().status, 200);

    primary.signal(Signal::SIGKILL);
    primary.proc.expect_exit(DEADLINE);
    let left = wait_gone(&pids, Duration::from_secs(5));
    reap_orphans_and_fail(&left);
    conn.expect_eof()
        .expect("the held connection closes with its worker");
}

/// A worker that dies without being asked is a warning in the log, not
/// routine information: the exit line is at WARN level.
#[test]
fn an_unexpected_death_is_logged_as_a_warning() {
    let primary = Primary::start(1, &[]);
    primary.wait_all_ready();
    let pid = primary.wait_started(1);
    kill_pid(pid, Signal::SIGKILL);
    let (_, line) = primary
        .log()
        .wait_for_from(0, &format!("worker 1 (pid {pid}) exited with signal 9"));
    assert!(line.contains(" WARN "), "{line}");
}
