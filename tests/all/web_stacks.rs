//! The Rust web-stack examples, `examples/axum.rs` (axum's `serve` on the
//! worker listener) and `examples/hyper.rs` (plain hyper), run as real
//! processes: the primary, two workers, TCP on 127.0.0.1. Round-robin over
//! new connections, keep-alive, the JSON route, a graceful stop that
//! answers the request in flight, and the kernel modes, where the adapter
//! watches the inherited listening socket and the channel together.
//!
//! Both examples need the `tokio` feature: `cargo test --all-features`
//! builds them and runs these tests; without the feature this file is
//! empty.
#![cfg(feature = "tokio")]

use crate::util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use nix::sys::signal::Signal;
use util::{DEADLINE, HttpConn, Proc, Response, describe, example_bin, parse_listening};

/// A running example: its primary and the (id, pid) of its ready workers.
struct Stack {
    /// `axum` or `hyper`: the example, and the word in its greeting.
    name: &'static str,
    proc: Proc,
    addr: SocketAddr,
    workers: BTreeMap<u64, u32>,
}

impl Stack {
    /// Starts `examples/NAME --listen 127.0.0.1:0 --workers N --sched MODE`
    /// and waits until every worker is ready (the example prints `worker ID
    /// ready (pid PID)` for each), so round-robin is exact from then on.
    fn start(name: &'static str, workers: usize, sched: &str) -> Stack {
        let exe = example_bin(name);
        assert!(
            exe.exists(),
            "{} is missing: run `cargo test --all-features` without target filters \
             (the example needs the `tokio` feature)",
            exe.display()
        );
        let mut cmd = Command::new(&exe);
        cmd.args(["--listen", "127.0.0.1:0", "--workers"])
            .arg(workers.to_string())
            .args(["--sched", sched]);
        let proc = Proc::spawn(cmd);
        let line = proc.stdout.wait_for("listening on ");
        let addr = parse_listening(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
        assert!(line.ends_with(&format!("({sched})")), "{line:?}");
        let mut ready = BTreeMap::new();
        let mut from = 0;
        while ready.len() < workers {
            let (at, line) = proc
                .stdout
                .wait_from(from, "a worker ready", DEADLINE, |l| {
                    l.starts_with("worker ") && l.contains(" ready (pid ")
                });
            let (id, pid) = line["worker ".len()..]
                .strip_suffix(')')
                .and_then(|rest| rest.split_once(" ready (pid "))
                .unwrap_or_else(|| panic!("{line:?}"));
            ready.insert(id.parse().unwrap(), pid.parse().unwrap());
            from = at + 1;
        }
        Stack {
            name,
            proc,
            addr,
            workers: ready,
        }
    }

    fn connect(&self) -> HttpConn {
        HttpConn::connect(self.addr).unwrap_or_else(|e| panic!("connect to {}: {e}", self.addr))
    }

    /// `GET PATH` on a new connection with `Connection: close`; checks that
    /// the server closes it after the response.
    fn get_once(&self, path: &str) -> Response {
        let mut conn = self.connect();
        let r = get(&mut conn, path, true);
        conn.expect_eof().expect("closed after `Connection: close`");
        r
    }

    /// The worker id in a greeting, after checking the greeting's exact
    /// shape and that the pid is that worker's.
    fn served_by(&self, r: &Response) -> u64 {
        assert_eq!(r.status, 200, "{r:?}");
        let prefix = format!("Hello from {} worker ", self.name);
        let (id, pid) = r
            .body
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(")\n"))
            .and_then(|rest| rest.split_once(" (pid "))
            .unwrap_or_else(|| panic!("not a greeting: {r:?}"));
        let id: u64 = id.parse().unwrap_or_else(|_| panic!("{r:?}"));
        assert_eq!(
            self.workers.get(&id).map(|p| p.to_string()).as_deref(),
            Some(pid),
            "{r:?} from a worker not in {:?}",
            self.workers
        );
        id
    }

    /// SIGTERM, then [`Stack::expect_clean_exit`].
    fn stop(self) {
        self.proc.signal(Signal::SIGTERM);
        self.expect_clean_exit();
    }

    /// The primary exits 0 and every worker exited 0 (it stopped on STOP,
    /// not on the primary's later SIGTERM or SIGKILL).
    fn expect_clean_exit(mut self) {
        let status = self.proc.expect_exit(DEADLINE);
        assert_eq!(
            status.code(),
            Some(0),
            "primary: {}; stdout:\n{}",
            describe(status),
            self.proc.stdout.dump()
        );
        for id in self.workers.keys() {
            let exited = self.proc.stdout.wait_for(&format!("worker {id} (pid "));
            assert!(
                exited.ends_with("exited: exit status: 0"),
                "{exited:?}; stdout:\n{}",
                self.proc.stdout.dump()
            );
        }
    }
}

/// `GET PATH HTTP/1.1` on `conn`, then its response.
fn get(conn: &mut HttpConn, path: &str, close: bool) -> Response {
    let connection = if close { "Connection: close\r\n" } else { "" };
    conn.send(&format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\n{connection}\r\n"
    ))
    .expect("send a request");
    conn.read_response().expect("a response")
}

/// 20 requests on new connections alternate between the two workers:
/// exactly 10 each, never the same worker twice in a row.
fn round_robin(stack: &Stack) {
    let order: Vec<u64> = (0..20)
        .map(|_| stack.served_by(&stack.get_once("/")))
        .collect();
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "not round-robin: {order:?}");
    }
    for id in stack.workers.keys() {
        assert_eq!(
            order.iter().filter(|w| *w == id).count(),
            10,
            "worker {id}: {order:?}"
        );
    }
}

/// Five requests on one kept-alive connection: all answered, by one worker,
/// with the connection left open; then `Connection: close` closes it.
fn keep_alive(stack: &Stack) {
    let mut conn = stack.connect();
    let mut by = Vec::new();
    for _ in 0..5 {
        let r = get(&mut conn, "/", false);
        assert_ne!(r.header("connection"), Some("close"), "{r:?}");
        by.push(stack.served_by(&r));
    }
    let r = get(&mut conn, "/", true);
    by.push(stack.served_by(&r));
    conn.expect_eof().expect("closed after `Connection: close`");
    assert!(
        by.iter().all(|w| *w == by[0]),
        "one connection, one worker: {by:?}"
    );
}

/// SIGTERM while a request is in the handler (`/slow` answers after 1 s)
/// and another connection is idle: the request is answered, the idle
/// connection closed, and everyone exits 0.
fn drains_on_sigterm(stack: Stack) {
    let mut idle = stack.connect();
    stack.served_by(&get(&mut idle, "/", false));
    let mut busy = stack.connect();
    busy.send("GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    stack.proc.stdout.wait_for("/slow in flight");
    stack.proc.signal(Signal::SIGTERM);
    let r = busy
        .read_response()
        .expect("the request in flight is answered");
    stack.served_by(&r);
    idle.expect_eof()
        .expect("the idle kept-alive connection is closed");
    stack.expect_clean_exit();
}

/// In a kernel mode the workers accept by themselves: every request is
/// answered (the kernel balances, so no exact shares), and STOP still
/// reaches them through the channel.
///
/// A worker that watched only its channel would still accept, but only
/// when woken by the primary's heartbeat (every 5 s): 20 sequential
/// requests would take over a minute. Hence the (generous) bound.
fn kernel_mode(name: &'static str, sched: &str) {
    let stack = Stack::start(name, 2, sched);
    let started = Instant::now();
    for _ in 0..20 {
        stack.served_by(&stack.get_once("/"));
    }
    assert!(
        started.elapsed() < DEADLINE,
        "20 requests took {:?}: is the listening socket watched?",
        started.elapsed()
    );
    keep_alive(&stack);
    drains_on_sigterm(stack);
}

#[test]
fn axum_round_robin_keep_alive_json() {
    let stack = Stack::start("axum", 2, "rr");
    round_robin(&stack);
    keep_alive(&stack);

    let r = stack.get_once("/json");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let json: serde_json::Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    let id = json["worker"].as_u64().expect("a worker id");
    let pid = json["pid"].as_u64().expect("a pid");
    assert_eq!(json["stack"], "axum", "{json}");
    assert_eq!(stack.workers.get(&id).map(|p| u64::from(*p)), Some(pid));

    stack.stop();
}

#[test]
fn axum_drains_on_sigterm() {
    drains_on_sigterm(Stack::start("axum", 2, "rr"));
}

#[test]
fn axum_in_shared_mode() {
    kernel_mode("axum", "shared");
}

#[test]
fn hyper_round_robin_and_keep_alive() {
    let stack = Stack::start("hyper", 2, "rr");
    round_robin(&stack);
    keep_alive(&stack);
    let r = stack.get_once("/nowhere");
    assert_eq!(r.status, 404, "{r:?}");
    stack.stop();
}

#[test]
fn hyper_drains_on_sigterm() {
    drains_on_sigterm(Stack::start("hyper", 2, "rr"));
}

#[test]
fn hyper_in_reuseport_mode() {
    kernel_mode("hyper", "reuseport");
}
