//! What a worker process inherits: its environment (`DISTRIBUTOR_FD`,
//! `DISTRIBUTOR_PROTOCOL`, `DISTRIBUTOR_WORKER_ID`) and exactly four fds:
//! stdin (`/dev/null`), the primary's stdout and stderr, and its own end of
//! its channel. Not the listening socket, not another worker's channel,
//! nothing else of the primary's (close-on-exec everywhere else).
//!
//! The workers here run `sleep`, which never speaks the protocol: the test
//! reads their fds and environment through `/proc`, and checks that the
//! primary reports workers that never say hello.

use crate::util;

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{DEADLINE, Primary, kill_pid, poll_until, proc_comm, proc_environ, proc_fds};

/// The `Type` column of `/proc/net/unix` for the socket with this inode
/// (`0005` is `SOCK_SEQPACKET`).
fn unix_socket_type(inode: &str) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.get(6) == Some(&inode)).then(|| cols[4].to_string())
    })
}

/// Checks worker `id` (pid `pid`) of `slot`: environment and the exact fd
/// set.
fn check_worker(primary: &Primary, id: u64, pid: u32, slot: usize) {
    // Wait for the exec: before it, the child is still a copy of the primary.
    assert!(
        poll_until(DEADLINE, || proc_comm(pid).as_deref() == Some("sleep")),
        "worker {id} (pid {pid}) never became `sleep`: {:?}",
        proc_comm(pid)
    );
    let env: BTreeMap<String, String> = proc_environ(pid)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("DISTRIBUTOR_"))
        .collect();
    assert_eq!(
        env.get("DISTRIBUTOR_WORKER_ID").map(String::as_str),
        Some(id.to_string().as_str()),
        "{env:?}"
    );
    assert_eq!(
        env.get("DISTRIBUTOR_PROTOCOL").map(String::as_str),
        Some("1"),
        "{env:?}"
    );
    // rr: the primary reads completion reports.
    assert_eq!(
        env.get("DISTRIBUTOR_REPORT_FINISHED").map(String::as_str),
        Some("1"),
        "{env:?}"
    );
    // The timeouts a worker must respect (the defaults: 30 s, 10 s).
    assert_eq!(
        env.get("DISTRIBUTOR_WORKER_TIMEOUT_MS").map(String::as_str),
        Some("30000")
    );
    assert_eq!(
        env.get("DISTRIBUTOR_SHUTDOWN_TIMEOUT_MS")
            .map(String::as_str),
        Some("10000")
    );
    // The slot, which a slot's next worker is told too.
    assert_eq!(
        env.get("DISTRIBUTOR_SLOT"),
        Some(&slot.to_string()),
        "{env:?}"
    );
    let channel: i32 = env
        .get("DISTRIBUTOR_FD")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no DISTRIBUTOR_FD in {env:?}"));
    assert!(channel > 2, "the channel is fd {channel}");
    assert_eq!(
        env.keys().collect::<Vec<_>>(),
        [
            "DISTRIBUTOR_FD",
            "DISTRIBUTOR_PROTOCOL",
            "DISTRIBUTOR_REPORT_FINISHED",
            "DISTRIBUTOR_SHUTDOWN_TIMEOUT_MS",
            "DISTRIBUTOR_SLOT",
            "DISTRIBUTOR_WORKER_ID",
            "DISTRIBUTOR_WORKER_TIMEOUT_MS"
        ],
        "unexpected DISTRIBUTOR_* variables"
    );

    let mut expected = vec![0, 1, 2, channel];
    expected.sort();
    // Right after the exec the dynamic loader briefly holds a library open:
    // wait (bounded) for the fd set to settle. A leaked fd never goes away.
    let mut fds = Vec::new();
    poll_until(DEADLINE, || {
        fds = proc_fds(pid).unwrap();
        fds.iter().map(|f| f.0).eq(expected.iter().copied())
    });
    let numbers: Vec<i32> = fds.iter().map(|f| f.0).collect();
    assert_eq!(
        numbers, expected,
        "worker {id} inherited more (or less) than stdio and its channel: {fds:?}"
    );
    let target = |fd: i32| fds.iter().find(|f| f.0 == fd).unwrap().1.clone();
    assert_eq!(target(0), "/dev/null");
    // Output goes through the primary's relay: stdout and stderr are two
    // distinct pipes that the primary itself does not have as its 1 and 2.
    let primary_fds = proc_fds(primary.proc.pid()).unwrap();
    assert!(target(1).starts_with("pipe:[") && target(2).starts_with("pipe:["));
    assert_ne!(target(1), target(2), "stdout and stderr are separate pipes");
    for fd in [1, 2] {
        let theirs = primary_fds.iter().find(|f| f.0 == fd).map(|f| f.1.clone());
        assert_ne!(Some(target(fd)), theirs, "fd {fd} is the primary's own");
    }
    let socket = target(channel);
    let inode = socket
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("the channel fd {channel} is {socket:?}, not a socket"));
    assert_eq!(
        unix_socket_type(inode).as_deref(),
        Some("0005"),
        "the channel is not a Unix SOCK_SEQPACKET socket"
    );
}

#[test]
fn workers_inherit_only_stdio_and_their_channel() {
    let primary = Primary::start(2, &["--", "sleep", "120"]);
    let one = primary.wait_started(1);
    let two = primary.wait_started(2);
    check_worker(&primary, 1, one, 1);
    // Worker 2 started while worker 1's channel was open in the primary.
    check_worker(&primary, 2, two, 2);

    // A replacement, started while both other channels exist, too.
    kill_pid(one, Signal::SIGKILL);
    let three = primary.wait_started(3);
    check_worker(&primary, 3, three, 1);

    // Workers that never say hello are reported (after 2 s by default),
    // with what to do.
    for (id, pid) in [(2, two), (3, three)] {
        let warning = format!(
            "worker {id} (pid {pid}) has not said hello after 2s: does it speak the distributor protocol? Under --sched rr"
        );
        primary
            .log()
            .wait_from(0, &warning, Duration::from_secs(30), |l| {
                l.contains(&warning)
            });
    }
    assert_eq!(
        primary.log().count(" ready: "),
        0,
        "{}",
        primary.log().dump()
    );
}
