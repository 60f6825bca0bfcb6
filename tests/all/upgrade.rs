//! Hot upgrade of the primary (SIGUSR2, `distributor ctl upgrade`): under
//! continuous load of new and kept-alive connections, three upgrades in a
//! row lose, refuse and fail nothing, the primary's pid changes each time
//! and the old workers go; a broken new binary (one that exits at once,
//! one that never gets ready) is rolled back with nothing left behind; a
//! second upgrade during one is refused; under the systemd simulator the
//! main pid moves and the service never stops.

use crate::util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{
    DEADLINE, Load, Mode, Primary, Proc, TempDir, ctl_pid, get_once, have_program, kill_pid,
    parse_started, repo_path, wait_gone,
};

/// The primaries an upgrade started (not children of the test): stopped
/// when the test ends, passed or failed, so that none outlives it.
#[derive(Default)]
struct Upgraded(std::sync::Mutex<Vec<u32>>);

impl Upgraded {
    fn add(&self, pid: u32) -> u32 {
        self.0.lock().expect("lock").push(pid);
        pid
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        for &pid in self.0.lock().expect("lock").iter() {
            if !util::pid_gone(pid) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// A copy of the binary in a directory of its own, so that a test can
/// replace the file the primary will upgrade to.
fn own_copy(dir: &TempDir) -> PathBuf {
    let path = dir.path().join("distributor");
    std::fs::copy(util::bin(), &path).expect("copy the binary");
    path
}

/// Replaces `path` with `contents` (a new file moved into place, as a
/// package manager does: the running program keeps its own).
fn replace(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The pid in `upgraded: the new primary is pid N; ...`.
fn new_pid(answer: &str) -> u32 {
    let rest = answer
        .split("the new primary is pid ")
        .nth(1)
        .unwrap_or_else(|| panic!("no new pid in {answer:?}"));
    rest.split(';')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("a pid")
}

/// The pid in an upgrade's log line: `... the new primary ... (pid N) ...`.
fn pid_in(line: &str) -> Option<u32> {
    let (_, rest) = line.split_once("(pid ")?;
    rest.split_once(')')?.0.parse().ok()
}

/// Every worker pid the log has shown started.
fn worker_pids(p: &Primary) -> Vec<u32> {
    p.log()
        .snapshot()
        .iter()
        .filter_map(|l| parse_started(l).map(|(_, pid)| pid))
        .collect()
}

/// What the workers run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum App {
    Demo,
    /// A Node app (tests/fixtures/node/hello.js), unmodified.
    Node,
}

fn three_upgrades_under_load(mode: &str, app: App) {
    let dir = TempDir::new("upgrade");
    let bin = own_copy(&dir);
    let mut cmd = Command::new(&bin);
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--sched", mode]);
    if app == App::Node {
        cmd.arg("--")
            .arg("node")
            .arg(util::node::fixture("hello.js"));
        for var in ["PORT", "HOST", "NODE_OPTIONS"] {
            cmd.env_remove(var);
        }
    }
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    // Node's own graceful stop closes idle kept-alive connections (Node
    // 19+), which races a client's next request on one, as in any Node
    // reload: for a Node app the load is new connections only, as in the
    // Node reload tests.
    let modes: &[Mode] = match app {
        App::Demo => &[Mode::Fresh, Mode::Fresh, Mode::KeepAlive, Mode::KeepAlive],
        App::Node => &[Mode::Fresh, Mode::Fresh, Mode::Fresh],
    };
    let load = Load::start(p.addr, modes, DEADLINE, Duration::from_secs(120));
    let progress = |what: &str| load.assert_progress(what, p.log());
    progress("before the upgrades");
    let upgraded = Upgraded::default();
    let mut pid = p.pid();
    let mut primaries = vec![pid];
    for round in 1..=3 {
        let before = worker_pids(&p);
        let mark = p.log().len();
        let next = if round == 2 {
            // By signal, as nginx and gunicorn take it.
            kill_pid(pid, Signal::SIGUSR2);
            let (_, line) = p
                .log()
                .wait_for_from(mark, "is ready and takes over; stopping this one's workers");
            pid_in(&line)
                .map(|n| upgraded.add(n))
                .expect("the new pid in the log")
        } else {
            let (ok, out, err) = ctl_pid(pid, &["upgrade"]);
            assert!(ok, "ctl upgrade: {err}\n{}", p.log().dump());
            upgraded.add(new_pid(&out))
        };
        assert_ne!(next, pid, "the primary's pid did not change");
        // The old primary's control socket went with the upgrade (ctl finds
        // only the new one while the old drains); the new one answers.
        let old_socket = distributor::primary::control::default_path(pid);
        assert!(
            !old_socket.exists(),
            "{} is still there",
            old_socket.display()
        );
        let (ok, out, err) = ctl_pid(next, &["status"]);
        assert!(
            ok && out.starts_with(&format!("primary pid {next},")),
            "{out}{err}"
        );
        // The old primary and its workers are gone; the new one serves.
        let left = wait_gone(&[pid], DEADLINE);
        assert!(
            left.is_empty(),
            "round {round}: the old primary {pid} is still there"
        );
        let left = wait_gone(&before, DEADLINE);
        assert!(
            left.is_empty(),
            "round {round}: old workers {left:?} still run"
        );
        pid = next;
        primaries.push(pid);
        std::thread::sleep(Duration::from_millis(300));
        progress(&format!("after upgrade {round}"));
    }
    let stats = load.stop();
    eprintln!("three upgrades under load ({mode}, {app:?}): {stats}");
    assert_eq!(stats.failures(), 0, "{stats}\nlog:\n{}", p.log().dump());
    assert_eq!(stats.connect_failures, 0, "{stats}");
    // Stopped through ctl: the last primary and every worker ever started
    // are gone, no orphan.
    let (ok, out, err) = ctl_pid(pid, &["stop"]);
    assert!(ok, "ctl stop: {err}");
    assert!(out.ends_with("stopped\n"), "{out}");
    let mut all = worker_pids(&p);
    all.extend(&primaries);
    let left = wait_gone(&all, DEADLINE);
    assert!(left.is_empty(), "left behind: {left:?}\n{}", p.log().dump());
    assert_eq!(p.log().count("upgrade failed"), 0, "{}", p.log().dump());
    p.assert_no_panic();
}

#[test]
fn three_upgrades_in_a_row_in_rr_lose_nothing() {
    three_upgrades_under_load("rr", App::Demo);
}

#[test]
fn three_upgrades_in_a_row_in_reuseport_lose_nothing() {
    three_upgrades_under_load("reuseport", App::Demo);
}

/// A Node app's servers (bound by the primary when its workers listen)
/// are handed over by key.
#[test]
fn three_upgrades_in_a_row_with_a_node_app_lose_nothing() {
    if !util::node::have_node(&util::current_test()) {
        return;
    }
    three_upgrades_under_load("rr", App::Node);
}

/// A new binary that exits at once, then one that never gets ready: each
/// is rolled back (the second killed at `--upgrade-timeout`), the old
/// primary keeps its pid and serves without one failed request, nothing
/// is left behind; a second upgrade during one is refused with a line;
/// the good binary back, the upgrade goes through.
#[test]
fn a_broken_new_binary_is_rolled_back_with_nothing_left_behind() {
    let dir = TempDir::new("upgrade-broken");
    let bin = own_copy(&dir);
    let good = std::fs::read(&bin).expect("read the binary");
    let mut cmd = Command::new(&bin);
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--upgrade-timeout", "2s"]);
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::KeepAlive],
        DEADLINE,
        Duration::from_secs(120),
    );
    let progress = |what: &str| load.assert_progress(what, p.log());
    progress("before");

    replace(&bin, b"#!/bin/sh\nexit 1\n");
    let (ok, _, err) = p.ctl(&["upgrade"]);
    assert!(!ok, "an upgrade to a binary that exits 1 succeeded");
    assert!(
        err.contains("exited with status 1 before it was ready"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    progress("after the first rollback");

    // One that never gets ready; a second upgrade meanwhile is refused.
    replace(&bin, b"#!/bin/sh\nexec sleep 600\n");
    let mark = p.log().len();
    let pid = p.pid();
    let waiting = std::thread::spawn(move || ctl_pid(pid, &["upgrade"]));
    let (_, line) = p
        .log()
        .wait_for_from(mark, "upgrade: started the new primary");
    let stuck = pid_in(&line).expect("the new pid");
    p.signal(Signal::SIGUSR2);
    p.log()
        .wait_for_from(mark, "upgrade refused: an upgrade is under way");
    let (ok, _, err) = waiting.join().expect("ctl thread");
    assert!(!ok);
    assert!(err.contains("was not ready within 2s"), "{err}");
    assert!(
        wait_gone(&[stuck], DEADLINE).is_empty(),
        "the stuck new primary {stuck} is still there"
    );
    progress("after the second rollback");
    assert_eq!(p.pid(), pid);
    assert!(!util::pid_gone(pid), "the old primary stopped");

    // The good binary back: the upgrade goes through.
    replace(&bin, &good);
    let upgraded = Upgraded::default();
    let (ok, out, err) = p.ctl(&["upgrade"]);
    assert!(ok, "{err}\n{}", p.log().dump());
    let next = upgraded.add(new_pid(&out));
    progress("after the good upgrade");
    let stats = load.stop();
    eprintln!("rollbacks under load: {stats}");
    assert_eq!(stats.failures(), 0, "{stats}\nlog:\n{}", p.log().dump());
    let (ok, _, err) = ctl_pid(next, &["stop"]);
    assert!(ok, "{err}");
    let mut all = worker_pids(&p);
    all.push(next);
    assert!(wait_gone(&all, DEADLINE).is_empty(), "{}", p.log().dump());
    p.assert_no_panic();
}

/// Under the systemd simulator (socket activation, Type=notify with
/// NotifyAccess=main): the main pid moves to the new primary, its READY=1
/// comes from the main process, nothing is rejected, and the service never
/// stops until it is told to.
#[test]
fn under_systemd_the_main_pid_moves_and_the_service_never_stops() {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let dir = TempDir::new("upgrade-systemd");
    let notify = dir.path().join("notify");
    let mut cmd = Command::new("python3");
    cmd.arg(repo_path("tests/fixtures/systemd_sim.py"))
        .arg(&notify)
        .arg("--")
        .arg(util::bin())
        .args(["-w", "2", "-l", "127.0.0.1:1"]);
    let mut sim = Proc::spawn(cmd);
    let port: u16 = sim.stdout.wait_for("port ")["port ".len()..]
        .trim()
        .parse()
        .expect("port");
    let pid: u32 = sim.stdout.wait_for("pid ")["pid ".len()..]
        .trim()
        .parse()
        .expect("pid");
    sim.stdout.wait_for("notify READY=1");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(get_once(addr).expect("served").status, 200);

    let upgraded = Upgraded::default();
    let (ok, out, err) = ctl_pid(pid, &["upgrade"]);
    assert!(ok, "{err}\n{}", sim.stderr.dump());
    let next = upgraded.add(new_pid(&out));
    sim.stdout.wait_for(&format!("mainpid {next}"));
    let (at, _) = sim
        .stdout
        .wait_for_from(0, "notify STATUS=2 workers ready (upgraded)");
    assert!(at > 0);
    assert!(
        wait_gone(&[pid], DEADLINE).is_empty(),
        "the old primary is still there"
    );
    assert_eq!(get_once(addr).expect("served after").status, 200);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sim.stdout.count("notify STOPPING=1"),
        0,
        "{}",
        sim.stdout.dump()
    );
    assert_eq!(sim.stdout.count("exit "), 0, "{}", sim.stdout.dump());
    assert_eq!(sim.stdout.count("rejected "), 0, "{}", sim.stdout.dump());

    kill_pid(next, Signal::SIGTERM);
    sim.stdout.wait_for("notify STOPPING=1");
    sim.stdout.wait_for("exit 0");
    sim.expect_exit(DEADLINE);
}

/// `ctl` for every command, and its errors: one line and a non-zero exit.
#[test]
fn ctl_answers_every_command_with_its_outcome() {
    let dir = TempDir::new("ctl");
    let p = Primary::start(2, &[]);
    p.wait_all_ready();

    let (ok, out, err) = p.ctl(&["status"]);
    assert!(ok, "{err}");
    let rows: Vec<&str> = out.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().all(|r| r.contains(" ready ")), "{out}");
    assert!(
        out.starts_with(&format!("primary pid {}, rr", p.pid())),
        "{out}"
    );

    let (ok, out, _) = p.ctl(&["status", "--json"]);
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(doc["pid"].as_u64(), Some(u64::from(p.pid())));
    assert_eq!(doc["workers"].as_array().map(Vec::len), Some(2), "{doc}");
    assert!(
        doc["workers"][0]["rss_bytes"].as_u64().unwrap_or(0) > 0,
        "{doc}"
    );

    let (ok, out, err) = p.ctl(&["scale", "+1"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "3 workers (was 2)");
    let (ok, out, _) = p.ctl(&["scale", "2"]);
    assert!(ok);
    assert_eq!(out.trim(), "2 workers (was 3)");
    let (ok, out, _) = p.ctl(&["reload"]);
    assert!(ok);
    assert_eq!(out.trim(), "reload complete");
    let (ok, out, _) = p.ctl(&["sched", "p2c"]);
    assert!(ok);
    assert_eq!(out.trim(), "policy: rr -> p2c");

    for (args, needle) in [
        (&["bogus"][..], "unknown command"),
        (&["scale", "x"][..], "scale takes N, +N or -N"),
        (&["scale", "0"][..], "at least one worker stays"),
        (
            &["scale", "-5"][..],
            "cannot remove more than the 2 workers",
        ),
        (&["sched", "fastest"][..], "unknown"),
        (
            &["sched", "reuseport"][..],
            "cannot switch from p2c to reuseport",
        ),
    ] {
        let (ok, _, err) = p.ctl(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // No primary there; a socket nobody may open.
    let out = util::output_within(
        {
            let mut cmd = Command::new(util::bin());
            cmd.args(["ctl", "--control"])
                .arg(dir.path().join("none.sock"))
                .arg("status");
            cmd
        },
        util::DEADLINE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no control socket at"),
        "{err}"
    );
    if have_program("setpriv", "--version") {
        let out = util::output_within(
            {
                let mut cmd = Command::new("setpriv");
                cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                    .arg(util::bin())
                    .args(["ctl", "--pid", &p.pid().to_string(), "status"]);
                cmd
            },
            util::DEADLINE,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("permission denied") || err.contains("no control socket"),
            "{err}"
        );
    } else {
        util::skip(
            &util::current_test(),
            "setpriv is not installed: permission case not run",
        );
    }

    // stop answers once the primary has exited.
    let mut p = p;
    let (ok, out, err) = p.ctl(&["stop"]);
    assert!(ok, "{err}");
    assert_eq!(out, "stopping: 2 workers\nstopped\n");
    assert!(p.proc.expect_exit(DEADLINE).success());
}

/// With two primaries in one runtime directory, `ctl` asks which.
#[test]
fn ctl_asks_which_when_several_primaries_run() {
    let dir = TempDir::new("ctl-several");
    let start = || {
        let mut cmd = Command::new(util::bin());
        cmd.env("XDG_RUNTIME_DIR", dir.path())
            .args(["-w", "1", "-l", "127.0.0.1:0"]);
        let p = Primary::start_command(cmd, 1);
        p.wait_all_ready();
        p
    };
    let a = start();
    let ctl = || {
        util::output_within(
            {
                let mut cmd = Command::new(util::bin());
                cmd.env("XDG_RUNTIME_DIR", dir.path())
                    .args(["ctl", "status"]);
                cmd
            },
            util::DEADLINE,
        )
    };
    let out = ctl();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = start();
    let out = ctl();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("several primaries run") && err.contains(&a.pid().to_string()),
        "{err}"
    );
    assert!(err.contains(&b.pid().to_string()), "{err}");
    drop(b);
    drop(a);
}

/// With `--control PATH` the new primary of an upgrade takes the socket
/// over: the same path answers before and after, with the new pid, and
/// the file is there as long as a primary is.
#[test]
fn an_explicit_control_path_is_handed_over() {
    let dir = TempDir::new("upgrade-control");
    let sock = dir.path().join("ctl.sock");
    let ctl = |args: &[&str]| {
        let out = util::output_within(
            {
                let mut cmd = Command::new(util::bin());
                cmd.arg("ctl").arg("--control").arg(&sock).args(args);
                cmd
            },
            util::DEADLINE,
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut cmd = Command::new(util::bin());
    cmd.args(["-w", "1", "-l", "127.0.0.1:0", "--control"])
        .arg(&sock);
    let p = Primary::start_command(cmd, 1);
    p.wait_all_ready();
    let (ok, out, err) = ctl(&["status"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("primary pid {},", p.pid())),
        "{out}"
    );
    let upgraded = Upgraded::default();
    let (ok, out, err) = ctl(&["upgrade"]);
    assert!(ok, "{err}\n{}", p.log().dump());
    let next = upgraded.add(new_pid(&out));
    assert!(wait_gone(&[p.pid()], DEADLINE).is_empty());
    assert!(
        sock.exists(),
        "the old primary removed the socket it handed over"
    );
    let (ok, out, err) = ctl(&["status"]);
    assert!(ok, "{err}");
    assert!(out.starts_with(&format!("primary pid {next},")), "{out}");
    let (ok, out, _) = ctl(&["stop"]);
    assert!(ok && out.ends_with("stopped\n"), "{out}");
    assert!(!sock.exists(), "the socket outlived the last primary");
}
