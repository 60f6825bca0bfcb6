//! Worker output: lines come out on the primary's stdout and stderr with a
//! `[worker ID] ` prefix, whole, never mixed within a line; `--no-prefix`
//! passes them through; `--log-format json` makes the primary's own log
//! lines JSON.

use crate::util;

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::Proc;

fn primary(workers: usize, extra: &[&str], script: &str) -> Proc {
    let mut cmd = Command::new(util::bin());
    cmd.args(["-w", &workers.to_string(), "-l", "127.0.0.1:0"])
        .args(extra)
        .args(["--", "sh", "-c", script]);
    Proc::spawn(cmd)
}

#[test]
fn lines_are_prefixed_on_the_right_stream_and_a_last_partial_line_is_completed() {
    let script = r#"echo "out $DISTRIBUTOR_WORKER_ID"; echo "err $DISTRIBUTOR_WORKER_ID" >&2; printf tail; exec sleep 60"#;
    let mut p = primary(2, &[], script);
    for id in [1, 2] {
        p.stdout.wait_for(&format!("[worker {id}] out {id}"));
        p.stderr.wait_for(&format!("[worker {id}] err {id}"));
    }
    // Stop only once both have written their partial line and are `sleep`.
    // (The relay may pass a worker's first line before the primary logs
    // that worker's start: wait for both start lines.)
    let started = || -> Vec<u32> {
        p.stderr
            .snapshot()
            .iter()
            .filter_map(|l| util::parse_started(l))
            .map(|(_, pid)| pid)
            .collect()
    };
    assert!(
        util::poll_until(Duration::from_secs(20), || started().len() == 2),
        "stderr:\n{}",
        p.stderr.dump()
    );
    let pids = started();
    for pid in pids {
        assert!(util::poll_until(Duration::from_secs(20), || {
            util::proc_comm(pid).as_deref() == Some("sleep")
        }));
    }
    p.signal(Signal::SIGTERM);
    p.expect_exit(Duration::from_secs(20));
    for id in [1, 2] {
        p.stdout.wait_for(&format!("[worker {id}] tail"));
    }
    assert!(!p.stdout.contains("err "), "stderr lines stay on stderr");
}

#[test]
fn lines_from_many_workers_never_mix() {
    // Each worker writes 3000 lines of 300 copies of its own digit, fast.
    let script = r#"i=0; line=$(printf "%0300d" 0 | tr 0 "$DISTRIBUTOR_WORKER_ID"); while [ $i -lt 3000 ]; do echo "$line"; i=$((i+1)); done; exec sleep 60"#;
    let mut p = primary(3, &[], script);
    let done = util::poll_until(Duration::from_secs(60), || {
        p.stdout.snapshot().len() >= 9000
    });
    let lines = p.stdout.snapshot();
    assert!(done, "only {} of 9000 lines arrived", lines.len());
    for line in &lines {
        let rest = line
            .strip_prefix("[worker ")
            .unwrap_or_else(|| panic!("unprefixed line {line:?}"));
        let (id, body) = rest.split_once("] ").expect("a closed prefix");
        assert_eq!(body.len(), 300, "a whole line: {line:?}");
        assert!(
            body.chars().all(|c| c.to_string() == id),
            "mixed line: {line:?}"
        );
    }
    p.signal(Signal::SIGTERM);
    p.expect_exit(Duration::from_secs(20));
}

#[test]
fn no_prefix_passes_output_through() {
    let script = r#"echo "raw $DISTRIBUTOR_WORKER_ID"; exec sleep 60"#;
    let mut p = primary(1, &["--no-prefix"], script);
    let line = p.stdout.wait_for("raw 1");
    assert_eq!(line, "raw 1");
    p.signal(Signal::SIGTERM);
    p.expect_exit(Duration::from_secs(20));
}

#[test]
fn json_log_lines_are_json() {
    let mut cmd = Command::new(util::bin());
    cmd.args(["-w", "1", "-l", "127.0.0.1:0", "--log-format", "json"]);
    let mut p = Proc::spawn(cmd);
    p.stderr.wait_for(" ready: 1 of 1 slots ready");
    p.signal(Signal::SIGTERM);
    assert!(p.expect_exit(Duration::from_secs(20)).success());
    let lines = p.stderr.snapshot();
    assert!(lines.len() >= 4, "{lines:?}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}
