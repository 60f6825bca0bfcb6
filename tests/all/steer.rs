//! `--sched reuseport --steer rr`: a BPF program steers the kernel's
//! balancing in the primary's order. Exact shares for the demo worker and
//! for an unmodified socket-activated app, weights, no failed request
//! through a stopped and killed worker, a removed slot and reloads, and
//! one clear line where the kernel or the capabilities say no. Loading BPF
//! needs root (CI runs as root): elsewhere these tests say they skip.

use crate::util;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, Load, Mode, Primary, get_once, have_program, kill_pid, repo_path};

/// The sockets process `pid` holds open.
fn sockets(pid: u32) -> usize {
    util::proc_fds(pid)
        .map(|fds| fds.iter().filter(|(_, t)| t.starts_with("socket:")).count())
        .unwrap_or(0)
}

/// Whether this process may load BPF (root); says so when it may not.
fn may_load_bpf() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    util::skip(
        &util::current_test(),
        "loading BPF needs root (or CAP_BPF and CAP_NET_ADMIN); CI runs as root",
    );
    false
}

/// `n` sequential requests, one connection each; how many each answer
/// (the response body) got.
fn shares(p: &Primary, n: usize, key: impl Fn(&str) -> String) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for _ in 0..n {
        let r = get_once(p.addr).unwrap_or_else(|e| panic!("{e}\n{}", p.log().dump()));
        assert_eq!(r.status, 200, "{r:?}");
        *by.entry(key(&r.body)).or_insert(0) += 1;
    }
    by
}

#[test]
fn four_demo_workers_get_exactly_a_hundred_each_of_four_hundred() {
    if !may_load_bpf() {
        return;
    }
    let mut p = Primary::start(4, &["--sched", "reuseport", "--steer", "rr"]);
    p.wait_all_ready();
    assert!(p.log().contains("reuseport, steered"), "{}", p.log().dump());
    let by = shares(&p, 400, |body| format!("{:?}", util::parse_worker(body)));
    assert_eq!(by.len(), 4, "{by:?}");
    assert!(by.values().all(|&n| n == 100), "not exact: {by:?}");
    p.signal(Signal::SIGTERM);
    assert!(p.proc.expect_exit(DEADLINE).success());
    p.assert_no_panic();
}

#[test]
fn an_unmodified_socket_activated_app_gets_exact_round_robin() {
    if !may_load_bpf() {
        return;
    }
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let mut cmd = Command::new(util::bin());
    cmd.args(["-w", "4", "-l", "127.0.0.1:0", "--sched", "reuseport"])
        .args(["--steer", "rr", "--ready", "start", "--"])
        .arg("python3")
        .arg(repo_path("tests/fixtures/socket_activated.py"));
    let mut p = Primary::start_command(cmd, 4);
    p.wait_all_ready();
    let by = shares(&p, 400, str::to_string);
    assert!(
        by.keys().all(|b| b.starts_with("plain app (pid ")),
        "{by:?}"
    );
    assert_eq!(by.len(), 4, "{by:?}");
    assert!(by.values().all(|&n| n == 100), "not exact: {by:?}");
    p.signal(Signal::SIGTERM);
    assert!(p.proc.expect_exit(DEADLINE).success());
}

#[test]
fn weights_three_to_one_give_three_hundred_and_a_hundred() {
    if !may_load_bpf() {
        return;
    }
    let mut p = Primary::start(
        2,
        &["--sched", "reuseport", "--steer", "rr", "--weights", "3,1"],
    );
    p.wait_all_ready();
    let by = shares(&p, 400, |body| {
        format!("worker {}", util::parse_worker(body).expect("demo body").0)
    });
    let counts: Vec<usize> = by.values().copied().collect();
    assert_eq!(counts, [300, 100], "{by:?}");
    p.signal(Signal::SIGTERM);
    assert!(p.proc.expect_exit(DEADLINE).success());
}

/// Under continuous load of new connections: a worker
/// stopped (SIGSTOP) then killed, a slot removed (SIGTTOU: in plain
/// reuseport its queued connections are reset) and three rolling reloads.
/// Not one request fails.
#[test]
fn stop_kill_removal_and_reloads_under_load_fail_no_request() {
    if !may_load_bpf() {
        return;
    }
    let p = Primary::start(
        3,
        &[
            "--sched",
            "reuseport",
            "--steer",
            "rr",
            "--worker-timeout",
            "0",
        ],
    );
    p.wait_all_ready();
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::Fresh, Mode::Fresh],
        DEADLINE,
        Duration::from_secs(120),
    );
    let progress = |what: &str| load.assert_progress(what, p.log());
    progress("before anything");

    // A worker stops answering; its socket's queue fills for a second,
    // then it is killed: its replacement inherits the socket and the queue.
    // A connection the worker had already accepted dies with it, as with
    // any server killed: stop it between connections (it holds no more
    // sockets than when idle), so that what is counted is the queue.
    let (id1, pid1) = p.started()[0];
    let idle = sockets(pid1);
    let between = util::poll_until(DEADLINE, || {
        assert!(
            util::stop_process(pid1, DEADLINE),
            "worker {id1} never stopped"
        );
        if sockets(pid1) == idle {
            return true;
        }
        kill_pid(pid1, Signal::SIGCONT);
        false
    });
    assert!(between, "worker {id1} never stopped between connections");
    std::thread::sleep(Duration::from_secs(1));
    kill_pid(pid1, Signal::SIGKILL);
    p.wait_exited(id1);
    p.wait_ready_from(0);
    progress("after the kill");

    // A slot removed: it leaves the schedule at once; what queued on its
    // socket moves to the others when the socket closes.
    let mark = p.log().len();
    p.signal(Signal::SIGTTOU);
    p.log().wait_for_from(mark, "removing a worker");
    p.log().wait_for_from(mark, "exited with status 0");
    progress("after SIGTTOU");

    for round in 1..=3 {
        let mark = p.log().len();
        p.signal(Signal::SIGHUP);
        p.log().wait_for_from(mark, "reload complete");
        std::thread::sleep(Duration::from_millis(300));
        progress(&format!("after reload {round}"));
    }
    let stats = load.stop();
    eprintln!("steered reuseport through stop, kill, removal, reloads: {stats}");
    assert_eq!(stats.failures(), 0, "{stats}\nlog:\n{}", p.log().dump());
    p.assert_no_panic();
}

/// Without the capability to load BPF: one line that says what is
/// missing, a non-zero exit, no worker started.
#[test]
fn without_the_capability_it_is_one_clear_line() {
    if !may_load_bpf() {
        return;
    }
    if !have_program("setpriv", "--version") {
        util::skip(&util::current_test(), "setpriv is not installed");
        return;
    }
    let out = util::output_within(
        {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--inh-caps=-all", "--bounding-set=-all", "--"])
                .arg(util::bin())
                .args(["-w", "2", "-l", "127.0.0.1:0", "--sched", "reuseport"])
                .args(["--steer", "rr"]);
            cmd
        },
        util::DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--steer") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("started (pid"), "{stderr}");
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains("ERROR") || l.starts_with("error"))
            .count(),
        1,
        "{stderr}"
    );
}

/// `--steer` outside reuseport, an unknown value, or with a Node app: one
/// line and a non-zero exit.
#[test]
fn steer_without_reuseport_or_unknown_is_one_clear_line() {
    for (args, needle) in [
        (&["--steer", "rr"][..], "needs --sched reuseport"),
        (
            &["--sched", "reuseport", "--steer", "fastest"][..],
            "unknown steering",
        ),
        (
            &[
                "--sched",
                "reuseport",
                "--steer",
                "rr",
                "--",
                "node",
                "app.js",
            ][..],
            "not available for Node apps",
        ),
    ] {
        let out = util::output_within(
            {
                let mut cmd = Command::new(util::bin());
                cmd.args(["-w", "2", "-l", "127.0.0.1:0"]).args(args);
                cmd
            },
            util::DEADLINE,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `compare` runs the steered mode as `reuseport+steer`: its row is named
/// so and its shares are exact (new connections, 2 workers).
#[test]
fn compare_runs_the_steered_mode() {
    if !may_load_bpf() {
        return;
    }
    let out = util::output_within(
        {
            let mut cmd = Command::new(util::bin());
            cmd.arg("compare")
                .args(["-w", "2", "-d", "300ms", "-c", "8", "--json"])
                .args(["--sched", "reuseport,reuseport+steer"]);
            cmd
        },
        util::DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let modes = doc["modes"].as_array().expect("a `modes` array");
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["reuseport", "reuseport+steer-rr"]);
    let steered = &modes[1];
    assert_eq!(steered["errors"].as_u64(), Some(0), "{steered}");
    let per_worker = steered["per_worker"].as_array().expect("per_worker");
    let counts: Vec<u64> = per_worker
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(counts.len(), 2, "{steered}");
    assert!(
        counts[0] > 0 && counts[0].abs_diff(counts[1]) <= 8,
        "{counts:?}"
    );
}
