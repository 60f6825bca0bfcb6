//! The kernel balancing modes (`--sched shared|reuseport`): the same demo
//! worker serves in every mode; an app that knows nothing of distributor
//! works through socket activation; a reuseport slot's queue survives its
//! worker; per-worker figures are reported in every mode.

use crate::util;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{Primary, exit_lines, get_once, have_program, kill_pid, parse_worker, repo_path};

fn serves_and_reports(mode: &str) {
    let mut p = Primary::start(3, &["--sched", mode]);
    p.wait_all_ready();
    assert!(
        p.log().contains(&format!("({mode}:")),
        "the listening line names the mode:\n{}",
        p.log().dump()
    );
    let mut by_worker: BTreeMap<u64, u64> = BTreeMap::new();
    for _ in 0..60 {
        let r = p.get();
        assert_eq!(r.status, 200);
        *by_worker.entry(r.worker().0).or_default() += 1;
    }
    assert_eq!(by_worker.values().sum::<u64>(), 60);
    p.signal(Signal::SIGTERM);
    let status = p.proc.expect_exit(Duration::from_secs(20));
    assert!(status.success(), "exit: {status:?}\n{}", p.log().dump());
    // Each worker accepted by itself and reported its count before exiting:
    // the primary's figures match what the clients saw.
    let reported: BTreeMap<u64, u64> = exit_lines(&p)
        .into_iter()
        .map(|(id, (_, _, taken))| (id, taken))
        .collect();
    for (id, n) in &by_worker {
        assert_eq!(
            reported.get(id),
            Some(n),
            "worker {id} served {n}; primary's figures {reported:?}\n{}",
            p.log().dump()
        );
    }
}

#[test]
fn shared_mode_serves_with_the_same_worker_and_reports_figures() {
    serves_and_reports("shared");
}

#[test]
fn reuseport_mode_serves_with_the_same_worker_and_reports_figures() {
    serves_and_reports("reuseport");
}

#[test]
fn none_is_an_alias_of_shared_and_the_environment_sets_the_mode() {
    let mut cmd = Command::new(util::bin());
    cmd.args(["-w", "1", "-l", "127.0.0.1:0"])
        .env("DISTRIBUTOR_SCHED", "none");
    let p = Primary::start_command(cmd, 1);
    p.wait_all_ready();
    assert!(p.log().contains("(shared:"), "{}", p.log().dump());
    assert_eq!(p.get().status, 200);
}

fn unmodified_app(mode: &str) {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let app = repo_path("tests/fixtures/socket_activated.py");
    let mut cmd = Command::new(util::bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--sched", mode, "--"])
        .arg("python3")
        .arg(&app);
    let mut p = Primary::start_command(cmd, 2);
    let mut pids = BTreeMap::new();
    // Served by plain processes: the app refuses to start unless LISTEN_PID
    // is its own pid and fd 3 is a blocking listening socket.
    let served = util::poll_until(Duration::from_secs(20), || {
        if let Ok(r) = get_once(p.addr) {
            assert_eq!(r.status, 200);
            assert!(r.body.starts_with("plain app (pid "), "{}", r.body);
            *pids.entry(r.body.clone()).or_insert(0) += 1;
        }
        pids.values().sum::<u32>() >= 20
    });
    assert!(served, "not served:\n{}", p.log().dump());
    assert!(
        !p.log().contains("exited with status"),
        "the app exited, bad activation environment?\n{}",
        p.log().dump()
    );
    // It never says hello, so the primary takes it as ready after a while.
    p.log()
        .wait_for("it accepts by itself, so it is taken as ready");
    p.signal(Signal::SIGTERM);
    assert!(p.proc.expect_exit(Duration::from_secs(20)).success());
}

#[test]
fn an_unmodified_socket_activated_app_works_in_shared_mode() {
    unmodified_app("shared");
}

#[test]
fn an_unmodified_socket_activated_app_works_in_reuseport_mode() {
    unmodified_app("reuseport");
}

/// Stop a worker, let connections queue on its own SO_REUSEPORT socket,
/// kill it: its replacement inherits the same socket and serves them all.
#[test]
fn a_reuseport_queue_survives_its_worker() {
    let p = Primary::start(2, &["--sched", "reuseport", "--worker-timeout", "0"]);
    p.wait_all_ready();
    let (id1, pid1) = p.started()[0];
    kill_pid(pid1, Signal::SIGSTOP);
    let (tx, rx) = mpsc::channel();
    let addr = p.addr;
    for _ in 0..24 {
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send(get_once(addr));
        });
    }
    drop(tx);
    // Some are served by the other worker now; the rest wait in worker 1's
    // queue (the kernel hashes each connection to one socket).
    let mut served = 0;
    while let Ok(r) = rx.recv_timeout(Duration::from_secs(2)) {
        let r = r.expect("a request failed while worker 1 was stopped");
        assert_ne!(r.worker().0, id1, "a stopped worker answered");
        served += 1;
    }
    assert!(
        served < 24,
        "no connection was queued on the stopped worker's socket"
    );
    kill_pid(pid1, Signal::SIGKILL);
    let mut by_replacement = 0;
    for _ in served..24 {
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a queued connection was never answered")
            .expect("a queued connection failed");
        assert_eq!(r.status, 200);
        let (id, _) = parse_worker(&r.body).expect("demo body");
        assert!(id > 2, "answered by worker {id}, not the replacement");
        by_replacement += 1;
    }
    assert_eq!(served + by_replacement, 24);
}

#[test]
fn an_unknown_mode_is_one_clear_line() {
    let out = Command::new(util::bin())
        .args(["--sched", "fastest"])
        .output()
        .expect("run distributor");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("unknown scheduling mode `fastest`"),
        "{stderr}"
    );
}
