//! systemd's conventions: the primary started by socket activation serves
//! the socket it is given and tells its service manager READY=1,
//! RELOADING=1 and STOPPING=1; workers get a NOTIFY_SOCKET whose READY=1
//! (`--ready notify`) and WATCHDOG=1 count; `--ready start`; the example
//! units in docs/ pass `systemd-analyze verify`.

use crate::util;

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{Primary, Proc, TempDir, get_once, have_program, kill_pid, repo_path};

fn python() -> bool {
    let ok = have_program("python3", "--version");
    if !ok {
        util::skip(&util::current_test(), "python3 is not installed");
    }
    ok
}

/// The value after `prefix ` on the simulator's first such line.
fn sim_value(sim: &Proc, prefix: &str) -> u32 {
    let line = sim.stdout.wait_for(&format!("{prefix} "));
    line[prefix.len() + 1..].trim().parse().expect("a number")
}

#[test]
fn activated_and_notifying_like_a_systemd_service() {
    if !python() {
        return;
    }
    let dir = TempDir::new("systemd");
    let notify = dir.path().join("notify");
    let mut cmd = Command::new("python3");
    cmd.arg(repo_path("tests/fixtures/systemd_sim.py"))
        .arg(&notify)
        .arg("--")
        .arg(util::bin())
        // --listen is ignored: the activated socket is served.
        .args(["-w", "2", "-l", "127.0.0.1:1"]);
    let mut sim = Proc::spawn(cmd);
    let port = sim_value(&sim, "port");
    let pid = sim_value(&sim, "pid");
    sim.stdout.wait_for("notify READY=1");
    sim.stdout.wait_for("notify STATUS=2 workers ready");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = get_once(addr).expect("the activated socket is served");
    assert_eq!(r.status, 200);

    kill_pid(pid, Signal::SIGHUP);
    let (at, _) = sim.stdout.wait_for_from(0, "notify RELOADING=1");
    let usec = sim.stdout.wait_for_from(at, "notify MONOTONIC_USEC=").1;
    assert!(
        usec["notify MONOTONIC_USEC=".len()..]
            .parse::<u64>()
            .is_ok(),
        "{usec}"
    );
    sim.stdout
        .wait_for_from(at, "notify STATUS=reload complete");
    assert_eq!(get_once(addr).expect("served after the reload").status, 200);

    kill_pid(pid, Signal::SIGTERM);
    sim.stdout.wait_for("notify STOPPING=1");
    sim.stdout.wait_for("exit 0");
    sim.expect_exit(Duration::from_secs(20));
}

#[test]
fn ready_notify_waits_for_ready_1_and_watchdog_feeds_hang_detection() {
    if !python() {
        return;
    }
    let app = repo_path("tests/fixtures/notify_app.py");
    let mut cmd = Command::new(util::bin());
    cmd.args([
        "-w",
        "1",
        "-l",
        "127.0.0.1:0",
        "-s",
        "shared",
        "--ready",
        "notify",
    ])
    .args(["--worker-timeout", "1s", "--"])
    .arg("python3")
    .arg(&app)
    .env("NOTIFY_APP_WATCHDOG", "once");
    let p = Primary::start_command(cmd, 1);
    // READY=1 comes half a second after start: that is when it is ready,
    // not at the kernel mode's hello timeout.
    p.wait_all_ready();
    assert!(!p.log().contains("taken as ready"), "{}", p.log().dump());
    let r = p.get();
    assert!(r.body.starts_with("notify app (pid "), "{}", r.body);
    // It sent WATCHDOG=1 once, then nothing: hung after the timeout.
    p.log().wait_for("worker 1 (pid ");
    p.log()
        .wait_for("is hung: no acknowledgement or heartbeat for");
    p.log().wait_for("worker 2 started (pid ");
}

#[test]
fn a_worker_that_never_sends_ready_is_reported() {
    let p = Primary::start(1, &["--ready", "notify", "--", "sleep", "60"]);
    p.log().wait_for("worker 1 (pid ").contains("started");
    p.log()
        .wait_for("has not sent READY=1 to its NOTIFY_SOCKET");
    assert!(!p.log().contains(" ready: "));
}

#[test]
fn ready_start_counts_a_worker_ready_once_started() {
    let p = Primary::start(2, &["--ready", "start", "--", "sleep", "60"]);
    p.wait_all_ready();
    assert!(
        !p.log().contains("has not said hello"),
        "{}",
        p.log().dump()
    );
}

#[test]
fn the_example_units_verify() {
    if !have_program("systemd-analyze", "--version") {
        util::skip(&util::current_test(), "systemd-analyze is not installed");
        return;
    }
    let dir = TempDir::new("units");
    for unit in ["distributor.socket", "distributor.service"] {
        let text = std::fs::read_to_string(repo_path(&format!("docs/{unit}"))).expect("unit");
        // verify checks that ExecStart's program exists (in systemd's
        // search path, for a bare name): point it at ours.
        assert!(unit.ends_with(".socket") || text.contains("\nExecStart=distributor "));
        let text = text.replace(
            "\nExecStart=distributor ",
            &format!("\nExecStart={} ", util::bin().display()),
        );
        std::fs::write(dir.path().join(unit), text).expect("write unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("distributor.socket"))
        .arg(dir.path().join("distributor.service"))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    assert!(!stderr.contains("Unknown"), "{stderr}");
}
