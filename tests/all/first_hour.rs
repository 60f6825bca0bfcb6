//! What a new user meets in the first hour with the command: the address
//! forms people type, the primary's pid (log line and `--pid-file`),
//! process names that `ps` tells apart, `--max-restarts` for an app that
//! cannot start, log lines that say each thing once and in order, and an
//! app that does not speak the protocol named within 2 s, in the log and
//! in /healthz.

use crate::util;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{DEADLINE, Primary, Proc, TempDir, bin, get_path, have_program, parse_metrics_on};

/// `-l 0`, `-l :0`, `-l *:0` (all interfaces), `-l localhost:0`,
/// `-l 127.0.0.1:0` and `-l [::1]:0` all listen and serve; `--metrics 0`
/// is the metrics endpoint on loopback.
#[test]
fn listen_and_metrics_take_the_forms_users_type() {
    let mut forms = vec!["0", ":0", "*:0", "localhost:0", "127.0.0.1:0"];
    if TcpListener::bind("[::1]:0").is_ok() {
        forms.push("[::1]:0");
    } else {
        util::skip(
            &util::current_test(),
            "no IPv6 loopback here: [::1]:0 untested",
        );
    }
    for form in forms {
        let mut p = Primary::start_on(form, 1, &["--metrics", "0"]);
        let listening = p.log().wait_for("listening on ");
        let expect_ip = match form {
            "0" | ":0" | "*:0" => "0.0.0.0:",
            "[::1]:0" => "[::1]:",
            _ => "127.0.0.1:",
        };
        assert!(
            listening.contains(&format!("listening on {expect_ip}")),
            "{form}: {listening}"
        );
        p.wait_all_ready();
        let to = match p.addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            }
            a => a,
        };
        let r = util::get_once(to).unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(r.status, 200, "{form}: {r:?}");
        let line = p.log().wait_for("metrics on ");
        let metrics = parse_metrics_on(&line).expect("an address");
        assert!(
            metrics.ip().is_loopback(),
            "--metrics 0 is loopback: {line}"
        );
        assert_eq!(get_path(metrics, "/healthz").unwrap().status, 200);
        p.terminate_promptly();
    }
}

/// The primary's pid is in its first line and in `--pid-file`, which is
/// removed when it exits; a pid file it cannot write is one line and exit
/// 1, before any worker starts.
#[test]
fn the_primary_says_its_pid_and_writes_the_pid_file() {
    let dir = TempDir::new("pid-file");
    let file = dir.path().join("distributor.pid");
    let mut p = Primary::start(1, &["--pid-file", file.to_str().unwrap()]);
    let first = &p.log().snapshot()[0];
    assert!(
        first.ends_with(&format!(
            "INFO distributor {} primary (pid {})",
            env!("CARGO_PKG_VERSION"),
            p.pid()
        )),
        "{first}"
    );
    p.wait_all_ready();
    let written = std::fs::read_to_string(&file).expect("the pid file");
    assert_eq!(written, format!("{}\n", p.pid()));
    p.signal(Signal::SIGTERM);
    assert_eq!(p.proc.expect_exit(DEADLINE).code(), Some(0));
    assert!(!file.exists(), "the pid file outlives the primary");

    let mut cmd = Command::new(bin());
    cmd.args(["-l", "127.0.0.1:0", "--pid-file"])
        .arg(dir.path().join("missing/distributor.pid"))
        .args(["--", "sleep", "120"]);
    let mut proc = Proc::spawn(cmd);
    assert_eq!(proc.expect_exit(DEADLINE).code(), Some(1));
    assert!(proc.stderr.wait_closed(DEADLINE));
    let lines = proc.stderr.snapshot();
    let last = lines.last().expect("a line");
    assert!(
        last.starts_with("error: cannot write the pid file ") && last.ends_with("(os error 2)"),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains(" started (pid ")),
        "a worker started: {lines:?}"
    );
}

/// `ps` tells them apart: the primary is `distributor`, the built-in demo
/// worker `distributor-wkr` (with `worker` in its command line), the
/// primary's guardian `distributor-gd`.
#[test]
fn processes_have_names_ps_tells_apart() {
    let mut p = Primary::start(1, &[]);
    p.wait_all_ready();
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string()
    };
    assert_eq!(comm(p.pid()), "distributor");
    let (_, worker) = p.started()[0];
    assert_eq!(comm(worker), "distributor-wkr");
    let cmdline = std::fs::read(format!("/proc/{worker}/cmdline")).unwrap();
    assert!(
        cmdline.split(|&b| b == 0).any(|arg| arg == b"worker"),
        "{:?}",
        String::from_utf8_lossy(&cmdline)
    );
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                let after = &s[s.rfind(')').map_or(0, |i| i + 2)..];
                after.split(' ').nth(1) == Some(&p.pid().to_string())
            })
        })
        .collect();
    let names: Vec<String> = children.iter().map(|&c| comm(c)).collect();
    assert!(
        names.iter().any(|n| n == "distributor-gd"),
        "the primary's children: {names:?}"
    );
    p.terminate_promptly();
}

/// An app that exits at once: each exit is followed by the hint (it never
/// said hello), in order (`exited`, then `restarting`), and with
/// `--max-restarts 3` the primary gives up after the third quick failure,
/// with one error line and exit status 1.
#[test]
fn max_restarts_gives_up_on_an_app_that_cannot_start() {
    let mut cmd = Command::new(bin());
    cmd.args([
        "-w",
        "2",
        "-l",
        "127.0.0.1:0",
        "--max-restarts",
        "3",
        "--",
        "false",
    ]);
    let mut proc = Proc::spawn(cmd);
    assert_eq!(
        proc.expect_exit(DEADLINE).code(),
        Some(1),
        "{}",
        proc.stderr.dump()
    );
    assert!(proc.stderr.wait_closed(DEADLINE));
    let lines = proc.stderr.snapshot();
    let last = lines.last().expect("a line");
    assert!(
        last.starts_with("error: worker slot ")
            && last.ends_with(
                " failed 3 times in a row, each within 5s of its start (--max-restarts 3)"
            ),
        "{last}"
    );
    // Exits before the primary gave up each get the hint (once it stops,
    // the other slot's last exit is just logged).
    let gave_up = lines
        .iter()
        .position(|l| l.contains("stopping: worker slot "))
        .expect("the stop line");
    let exits: Vec<usize> = (0..gave_up)
        .filter(|&i| lines[i].contains(" exited with status 1 after "))
        .collect();
    assert!(exits.len() >= 3, "{lines:#?}");
    for &i in &exits {
        assert!(
            lines[i + 1].contains(
                "exited (status 1) before it said hello: does it speak the distributor protocol?"
            ),
            "no hint after {}: {lines:#?}",
            lines[i]
        );
    }
    // Every `restarting worker slot N` comes right after the exit (and
    // its hint) that caused it.
    let restarts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("restarting worker slot "))
        .collect();
    assert!(!restarts.is_empty(), "{lines:#?}");
    for i in restarts {
        assert!(lines[i - 1].contains(" exited "), "{lines:#?}");
    }
    assert!(!lines.iter().any(|l| l.contains("panicked")));
}

/// Text log lines say each thing once: no `key=value` fields after the
/// message, `1 worker` in the singular, and a reload of 2 slots never
/// claims more ready slots than there are.
#[test]
fn text_logs_say_each_thing_once() {
    let mut p = Primary::start(1, &[]);
    p.wait_all_ready();
    let mark = p.log().len();
    p.signal(Signal::SIGTTIN);
    p.workers = 2;
    p.wait_ready_from(mark);
    let mark = p.log().len();
    p.signal(Signal::SIGHUP);
    p.log().wait_for_from(mark, "reload complete");
    p.wait_exited(1);
    p.wait_exited(2);
    p.signal(Signal::SIGTERM);
    assert_eq!(p.proc.expect_exit(DEADLINE).code(), Some(0));
    assert!(p.log().wait_closed(DEADLINE));
    let lines = p.log().snapshot();
    let fields = ["worker=", "pid=", "slot=", "server=", "reason="];
    for l in &lines {
        assert!(
            !fields.iter().any(|f| l.contains(f)),
            "a field repeated: {l}"
        );
        if let Some(at) = l.find(" ready: ") {
            let mut it = l[at + 8..].split(' ');
            let ready: usize = it.next().unwrap().parse().unwrap();
            assert_eq!(it.next(), Some("of"), "{l}");
            let total: usize = it.next().unwrap().parse().unwrap();
            assert!(ready <= total, "{l}");
        }
    }
    let text = lines.join("\n");
    assert!(text.contains("starting 1 worker: "), "{text}");
    assert!(text.contains("adding a worker: 2 workers"), "{text}");
    assert!(
        text.contains("reloading: replacing 2 workers one at a time"),
        "{text}"
    );
    assert!(text.contains("shutting down: stopping 2 workers"), "{text}");
}

/// A server that knows nothing of the protocol, run in the default mode:
/// within 2 s (and a margin) the log says what is wrong and what to do,
/// and /healthz says it in its 503 body.
#[test]
fn an_app_that_does_not_speak_the_protocol_is_named_in_the_log_and_healthz() {
    if !have_program("python3", "--version") {
        util::skip(&util::current_test(), "python3 is not installed");
        return;
    }
    let started = Instant::now();
    let mut p = Primary::start(
        1,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--",
            "python3",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
        ],
    );
    let line = p.log().wait_for("has not said hello after 2s");
    assert!(
        line.contains("does it speak the distributor protocol?")
            && line.contains("--sched reuseport or shared")
            && line.contains("--ready start"),
        "{line}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let metrics = parse_metrics_on(&p.log().wait_for("metrics on ")).unwrap();
    let r = get_path(metrics, "/healthz").unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body
            .contains("has not said hello after 2s: does it speak the distributor protocol?")
            && r.body.contains("--sched reuseport --ready start"),
        "{r:?}"
    );
    p.terminate_promptly();
}
