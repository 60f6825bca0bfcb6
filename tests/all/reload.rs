//! Rolling reload (SIGHUP) under continuous load, and scaling (SIGTTIN,
//! SIGTTOU): workers come and go while clients keep sending requests, and
//! not one request fails.

use crate::util;

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, Load, Mode, Primary};

/// Two workers, four client threads (two with a new connection per
/// request, two on kept-alive connections that reconnect when answered
/// `Connection: close`), three rolling reloads one after another: not one
/// request fails (no refused or reset connection, no end of file before a
/// whole response, no status but 200), responses come from old and new
/// workers, and every replaced worker exits 0 without being killed.
#[test]
fn rolling_reloads_under_load_lose_no_request() {
    let primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    let load = Load::start(
        primary.addr,
        &[Mode::Fresh, Mode::Fresh, Mode::KeepAlive, Mode::KeepAlive],
        DEADLINE,
        Duration::from_secs(90),
    );
    let progress = |what: &str| load.assert_progress(what, primary.log());
    progress("before the reloads");
    for round in 1..=3 {
        let mark = primary.log().len();
        primary.signal(Signal::SIGHUP);
        primary
            .log()
            .wait_for_from(mark, "reloading: replacing 2 workers one at a time");
        primary.log().wait_for_from(mark, "reload complete");
        // Load on the new workers while the old ones drain.
        std::thread::sleep(Duration::from_millis(300));
        progress(&format!("after reload {round}"));
    }
    // The six replaced workers (1 to 6) drained and exited by themselves.
    for id in 1..=6 {
        assert_eq!(primary.wait_exited(id), "status 0", "worker {id}");
    }
    progress("after the old workers exited");
    let stats = load.stop();
    eprintln!("rolling reloads under load: {stats}");

    assert_eq!(
        stats.failures(),
        0,
        "{stats}\nlog:\n{}",
        primary.log().dump()
    );
    let ids: BTreeSet<u64> = stats.by_worker.keys().copied().collect();
    assert!(ids.len() >= 4, "answered only by workers {ids:?}");
    assert!(
        ids.iter().any(|&id| id <= 2),
        "no answer from an old worker: {ids:?}"
    );
    assert!(
        ids.contains(&7) && ids.contains(&8),
        "the last generation did not serve: {ids:?}"
    );
    assert_eq!(primary.log().count("did not stop in time"), 0);
    assert_eq!(primary.log().count(" WARN "), 0, "{}", primary.log().dump());
    primary.assert_no_panic();
}

/// The worker ids that answer `n` new connections.
fn answered_by(primary: &Primary, n: usize) -> BTreeSet<u64> {
    (0..n)
        .map(|_| {
            let r = primary.get();
            assert_eq!(r.status, 200, "{r:?}");
            r.worker().0
        })
        .collect()
}

/// Sends `sig` and waits for the line it should cause.
fn signal_and_wait(primary: &Primary, sig: Signal, line: &str) -> usize {
    let mark = primary.log().len();
    primary.signal(sig);
    primary.log().wait_for_from(mark, line).0
}

/// SIGTTIN twice: four workers, all serving. SIGTTOU: the newest retires
/// gracefully (exit status 0) and the other three serve. Down to one, a
/// further SIGTTOU is refused and the last worker keeps serving; SIGTTIN
/// then adds a new one again.
#[test]
fn scaling_up_and_down_with_signals() {
    let mut primary = Primary::start(2, &[]);
    primary.wait_all_ready();

    let mark = primary.log().len();
    signal_and_wait(&primary, Signal::SIGTTIN, "adding a worker: 3 workers");
    signal_and_wait(&primary, Signal::SIGTTIN, "adding a worker: 4 workers");
    primary.workers = 4;
    primary.wait_ready_from(mark);
    // Strict round-robin over 4 workers: 8 connections reach all of them.
    assert_eq!(answered_by(&primary, 8), BTreeSet::from([1, 2, 3, 4]));

    let four = primary.wait_started(4);
    signal_and_wait(&primary, Signal::SIGTTOU, "removing a worker: 3 workers");
    assert_eq!(primary.wait_exited(4), "status 0");
    let (_, exit) = primary
        .log()
        .wait_for_from(0, &format!("worker 4 (pid {four}) exited with "));
    assert!(exit.contains(" INFO "), "an expected exit: {exit}");
    assert_eq!(answered_by(&primary, 6), BTreeSet::from([1, 2, 3]));

    signal_and_wait(&primary, Signal::SIGTTOU, "removing a worker: 2 workers");
    signal_and_wait(&primary, Signal::SIGTTOU, "removing a worker: 1 worker");
    assert_eq!(primary.wait_exited(3), "status 0");
    assert_eq!(primary.wait_exited(2), "status 0");
    assert_eq!(answered_by(&primary, 3), BTreeSet::from([1]));

    signal_and_wait(&primary, Signal::SIGTTOU, "not removing the last worker");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(answered_by(&primary, 3), BTreeSet::from([1]));
    assert_eq!(primary.alive_workers().len(), 1, "{}", primary.log().dump());

    // Up again: a new worker (id 5) in a free slot.
    let mark = primary.log().len();
    signal_and_wait(&primary, Signal::SIGTTIN, "adding a worker: 2 workers");
    primary.workers = 2;
    primary.wait_ready_from(mark);
    assert_eq!(answered_by(&primary, 4), BTreeSet::from([1, 5]));
    // No worker was replaced or killed along the way: the only warning is
    // the refusal.
    let warnings = primary
        .log()
        .count_where(|l| l.contains(" WARN ") && !l.contains("not removing the last worker"));
    assert_eq!(warnings, 0, "{}", primary.log().dump());
    primary.assert_running();
    primary.assert_no_panic();
}

/// A reload whose new worker never says hello (here: it hangs at start
/// while a marker file exists) must not wedge reloads for good: once the
/// cause is fixed (the marker removed), a second SIGHUP, or the primary's
/// own retry, must complete a reload, and the new workers serve.
#[test]
fn a_reload_whose_new_worker_hangs_at_start_does_not_wedge_reloads() {
    let marks = util::TempDir::new("hanging-candidate");
    let marker = marks.path().join("hang");
    std::fs::write(&marker, b"").unwrap();
    // Workers 1 and 2 start normally; later ones hang while the marker
    // exists, and are the built-in demo worker otherwise.
    let mut cmd = std::process::Command::new(util::bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--", "sh", "-c"])
        .arg(
            "if [ \"$DISTRIBUTOR_WORKER_ID\" -gt 2 ] && [ -e \"$0\" ]; then exec sleep 120; fi; \
             exec \"$1\"",
        )
        .arg(&marker)
        .arg(util::bin())
        .env("DISTRIBUTOR_DEMO_WORKER", "1");
    let primary = Primary::start_command(cmd, 2);
    primary.wait_all_ready();

    let mark = primary.log().len();
    primary.signal(Signal::SIGHUP);
    primary.wait_started(3);
    std::thread::sleep(Duration::from_secs(1));
    // The old workers still serve meanwhile.
    assert_eq!(answered_by(&primary, 4), BTreeSet::from([1, 2]));

    std::fs::remove_file(&marker).unwrap();
    primary.signal(Signal::SIGHUP);
    primary.log().wait_for_from(mark, "reload complete");
    let ids = answered_by(&primary, 4);
    assert!(ids.iter().all(|&id| id > 3), "answered by {ids:?}");
    primary.assert_no_panic();
}
