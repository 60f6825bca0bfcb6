//! The library embedded in one program that is both primary and worker:
//! `examples/cluster.rs`, which `cargo test` builds next to the binary.
//! Messages go both ways: the primary greets each ready worker, and each
//! worker reports every connection it takes.

use crate::util;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use util::{DEADLINE, Proc, example_bin, parse_listening, parse_worker};

/// Starts `examples/cluster --listen 127.0.0.1:0 --workers N`; returns it
/// and the address it printed.
fn start_cluster(workers: usize) -> (Proc, SocketAddr) {
    let exe = example_bin("cluster");
    // Plain `cargo test` (and nextest) build every example; `cargo test
    // --test all` alone does not.
    assert!(
        exe.exists(),
        "{} is missing: run `cargo test` without target filters, or `cargo build --examples` first",
        exe.display()
    );
    let mut cmd = Command::new(&exe);
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--workers")
        .arg(workers.to_string());
    let proc = Proc::spawn(cmd);
    let line = proc.stdout.wait_for("listening on ");
    let addr = parse_listening(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
    (proc, addr)
}

/// Both workers get the primary's greeting and answer with it; each
/// reports the connections it takes to the primary.
#[test]
fn cluster_example_exchanges_messages() {
    let (proc, addr) = start_cluster(2);

    // The greeting arrives some time after each worker is ready: retry,
    // bounded, until both workers use it.
    let deadline = Instant::now() + DEADLINE;
    let mut greeted = std::collections::BTreeSet::new();
    let mut last = String::new();
    while greeted.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no `Howdy` from both workers; last answer {last:?}; stdout:\n{}\nstderr:\n{}",
            proc.stdout.dump(),
            proc.stderr.dump()
        );
        let r = util::get_once(addr).expect("a request to the example");
        assert_eq!(r.status, 200, "{r:?}");
        let (id, pid) = parse_worker(&r.body).unwrap_or_else(|| panic!("{r:?}"));
        assert!(
            r.body == format!("Howdy from worker {id} (pid {pid})\n")
                || r.body == format!("Hello from worker {id} (pid {pid})\n"),
            "{r:?}"
        );
        if r.body.starts_with("Howdy") {
            greeted.insert(id);
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        last = r.body;
    }
    assert_eq!(
        greeted.into_iter().collect::<Vec<_>>(),
        [1, 2],
        "{}",
        proc.stdout.dump()
    );

    // Each worker told the primary about the connections it took.
    for id in [1, 2] {
        let needle = format!("worker {id} says: took a connection from 127.0.0.1:");
        let report = proc.stdout.wait_for(&needle);
        let port = &report[report.find(&needle).unwrap() + needle.len()..];
        assert!(port.parse::<u16>().is_ok(), "{report:?}");
    }
}

/// SIGTERM to the example's primary: a request in flight is still
/// answered before the worker exits (PROTOCOL.md, STOP), and the primary
/// exits 0.
#[test]
fn cluster_example_drains_on_sigterm() {
    let (mut proc, addr) = start_cluster(1);
    let mut conn = util::HttpConn::connect(addr).unwrap();
    assert_eq!(conn.get(false).unwrap().status, 200);
    conn.send("GET / HTTP/1.1\r\nHost: test\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    conn.send("\r\n").unwrap();
    let r = conn
        .read_response()
        .expect("the request in flight is answered");
    assert_eq!(r.status, 200, "{r:?}");
    let status = proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", proc.stdout.dump());
}
