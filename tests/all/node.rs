//! Unmodified Node apps as workers: the primary speaks Node's cluster
//! protocol (`NODE_CHANNEL_FD` JSON lines, `NODE_UNIQUE_ID`), so a plain
//! `http.createServer(...).listen(PORT)` app (tests/fixtures/node/) runs in
//! N Node processes with no cluster code of its own.
//!
//! Real binary, real `node` workers, real TCP clients on 127.0.0.1. Each
//! test that needs Node skips with a note when `node` is not on PATH. The
//! fixtures read `PORT` (default 0), `HOST` (default none) and print
//! `port P` once listening; see tests/fixtures/node/README.md.

use crate::util;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use distributor::{Event, Protocol, WorkerCommand};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use util::node::{
    APP_ENV, announced, app_line, app_port, fixture, free_port, have_node, kill_and_fail,
    node_command, node_command_on, reachable, serve, start, started, stop_cleanly, wait_announced,
};
use util::{
    DEADLINE, HttpConn, Load, Mode, Primary, Proc, Scrape, bin, describe, get_once, get_path,
    have_program, kill_pid, parse_listening, parse_metrics_on, pid_gone, poll_until,
    refuses_connections, spawn_gets, wait_gone,
};

// ---------------------------------------------------------------------------
// Scheduling modes

/// rr: 30 requests on new connections to 3 Node workers give exactly 10
/// each, by the worker id in the body (`cluster.worker.id`, which is the
/// primary's worker id), from the pid the primary logged for that id.
#[test]
fn rr_hands_connections_round_robin_exactly() {
    if !have_node("rr_hands_connections_round_robin_exactly") {
        return;
    }
    let p = start(3, &["--sched", "rr"], "hello.js", &[]);
    p.wait_all_ready();
    let workers = started(&p);
    assert_eq!(
        workers.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3],
        "{}",
        p.log().dump()
    );
    let seen = serve(&p, p.addr, 30, &workers, "");
    assert_eq!(
        seen,
        BTreeMap::from([(1, 10), (2, 10), (3, 10)]),
        "{}",
        p.log().dump()
    );
    stop_cleanly(p);
}

/// The kernel modes: every request is answered by a worker the primary
/// started; no failures (no distribution is asserted: the kernel balances).
fn serves_in_kernel_mode(mode: &str) {
    let p = start(2, &["--sched", mode], "hello.js", &[]);
    p.wait_all_ready();
    let workers = started(&p);
    assert_eq!(workers.len(), 2, "{}", p.log().dump());
    let seen = serve(&p, p.addr, 40, &workers, "");
    assert_eq!(seen.values().sum::<u64>(), 40);
    stop_cleanly(p);
}

#[test]
fn shared_mode_serves_every_request() {
    if !have_node("shared_mode_serves_every_request") {
        return;
    }
    serves_in_kernel_mode("shared");
}

#[test]
fn reuseport_mode_serves_every_request() {
    if !have_node("reuseport_mode_serves_every_request") {
        return;
    }
    serves_in_kernel_mode("reuseport");
}

// ---------------------------------------------------------------------------
// Listeners: whose port, how many

/// Two port-0 servers in each of 2 workers: two listeners announced, the
/// first on the `--listen` address, the second on a fresh port; every
/// worker prints the same two ports, which are the announced ones; each
/// server answers from both workers with its own body.
#[test]
fn two_servers_per_worker() {
    if !have_node("two_servers_per_worker") {
        return;
    }
    let p = start(2, &[], "two_servers.js", &[]);
    p.wait_all_ready();
    let port_a = app_port(&p, 1, "port A ");
    let port_b = app_port(&p, 1, "port B ");
    assert_eq!(app_port(&p, 2, "port A "), port_a, "the same server A");
    assert_eq!(app_port(&p, 2, "port B "), port_b, "the same server B");
    assert_ne!(port_a, port_b);

    let listeners = wait_announced(&p, 2);
    assert_eq!(listeners.len(), 2, "{}", p.log().dump());
    assert_eq!(
        listeners[0],
        SocketAddr::from((Ipv4Addr::LOCALHOST, port_a)),
        "the first port-0 server gets --listen's address; log:\n{}",
        p.log().dump()
    );
    assert_eq!(listeners[1].port(), port_b, "{}", p.log().dump());
    assert_eq!(p.addr, listeners[0]);

    let workers = started(&p);
    for (name, addr) in [("A", listeners[0]), ("B", reachable(listeners[1]))] {
        // Worker 2 may report server B listening a moment after it printed
        // its port: ask (bounded) until both workers have answered.
        let mut seen = BTreeMap::new();
        let t0 = Instant::now();
        while seen.len() < 2 && t0.elapsed() < DEADLINE {
            for (id, n) in serve(&p, addr, 4, &workers, &format!(" on server {name}")) {
                *seen.entry(id).or_insert(0) += n;
            }
        }
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            [1, 2],
            "server {name} at {addr}: {seen:?}; log:\n{}",
            p.log().dump()
        );
    }
    stop_cleanly(p);
}

/// An app that listens on port 0 with `--listen 127.0.0.1:0`: the primary
/// binds 127.0.0.1 on an ephemeral port, announces it once, and the port
/// `server.address()` gives the app is that one, in every worker.
#[test]
fn an_app_listening_on_port_0_gets_the_listen_address() {
    if !have_node("an_app_listening_on_port_0_gets_the_listen_address") {
        return;
    }
    let p = start(2, &[], "hello.js", &[]);
    p.wait_all_ready();
    assert_eq!(p.addr.ip(), Ipv4Addr::LOCALHOST, "{}", p.log().dump());
    assert_ne!(p.addr.port(), 0);
    for id in [1, 2] {
        assert_eq!(
            app_port(&p, id, "port "),
            p.addr.port(),
            "worker {id}; stdout:\n{}",
            p.proc.stdout.dump()
        );
    }
    assert_eq!(announced(&p), [p.addr], "{}", p.log().dump());
    let seen = serve(&p, p.addr, 4, &started(&p), "");
    assert_eq!(seen.values().sum::<u64>(), 4);
    stop_cleanly(p);
}

/// Without `--listen` the app's own port wins: `listen(PORT, cb)` gets
/// PORT (on `::`/`0.0.0.0`, as Node binds an address-less server),
/// announced as the one listener, printed by the app, and served.
#[test]
fn the_apps_own_port_wins() {
    if !have_node("the_apps_own_port_wins") {
        return;
    }
    let port = free_port();
    let env = [("PORT", port.to_string())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cmd = node_command_on(None, 2, &["--protocol", "node"], "hello.js", &env);
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    assert_eq!(p.addr.port(), port, "{}", p.log().dump());
    assert!(p.addr.ip().is_unspecified(), "{}", p.log().dump());
    assert_eq!(announced(&p), [p.addr], "{}", p.log().dump());
    for id in [1, 2] {
        assert_eq!(app_port(&p, id, "port "), port, "worker {id}");
    }
    let seen = serve(&p, reachable(p.addr), 4, &started(&p), "");
    assert_eq!(seen.len(), 2, "{seen:?}");
    stop_cleanly(p);
}

/// An explicit `--listen` is where the app is served, on that address
/// only: an app listening on port P of every interface, under `--listen
/// 127.0.0.1:P`, is served on 127.0.0.1:P and nothing else.
#[test]
fn listen_serves_the_app_on_its_address_only() {
    if !have_node("listen_serves_the_app_on_its_address_only") {
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cmd = node_command(
        2,
        &["--protocol", "node", "-l", &listen],
        "hello.js",
        &[("PORT", &port.to_string())],
    );
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    let addr: SocketAddr = listen.parse().unwrap();
    assert_eq!(announced(&p), [addr], "{}", p.log().dump());
    let seen = serve(&p, addr, 4, &started(&p), "");
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Not on every interface: another address of this host may still
    // bind the port.
    assert!(
        TcpListener::bind(("127.0.0.2", port)).is_ok(),
        "the app is served beyond 127.0.0.1; log:\n{}",
        p.log().dump()
    );
    stop_cleanly(p);
}

/// An app that listens on port X itself, under `--listen 127.0.0.1:Y`,
/// cannot be moved to Y (Node's worker checks that it got the port it
/// asked for): the primary says so in one line and stops with an error,
/// leaving neither port listening and no worker behind.
#[test]
fn a_listen_port_the_app_does_not_use_is_refused() {
    if !have_node("a_listen_port_the_app_does_not_use_is_refused") {
        return;
    }
    let (asked, wanted) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{wanted}");
    let cmd = node_command(
        2,
        &["--protocol", "node", "-l", &listen],
        "hello.js",
        &[("PORT", &asked.to_string())],
    );
    let mut p = Proc::spawn(cmd);
    let status = p.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(1), "{}", p.stderr.dump());
    let last = p.stderr.snapshot().last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("error: the app listens on port ")
            && last.contains(&format!("--listen asks for {listen}"))
            && last.contains("drop --listen"),
        "{last:?}; log:\n{}",
        p.stderr.dump()
    );
    for port in [asked, wanted] {
        assert!(refuses_connections(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            port
        ))));
    }
    let pids: Vec<u32> = p
        .stderr
        .snapshot()
        .iter()
        .filter_map(|l| util::parse_started(l))
        .map(|w| w.1)
        .collect();
    assert!(!pids.is_empty(), "{}", p.stderr.dump());
    kill_and_fail(&wait_gone(&pids, DEADLINE), "after a refused --listen");
}

/// The `--listen` socket is bound at start (a port in use is an error
/// then) but listens only once an app's server is served on it: while the
/// app has not listened, connections to it are refused, never accepted and
/// left unserved.
#[test]
fn the_listen_address_refuses_until_the_app_listens() {
    if !have_node("the_listen_address_refuses_until_the_app_listens") {
        return;
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "1", "-l", &listen, "--", "node", "-e"])
        .arg("setInterval(() => {}, 1000)");
    for var in APP_ENV {
        cmd.env_remove(var);
    }
    let p = Proc::spawn(cmd);
    p.stderr.wait_for("worker 1 started");
    p.stderr.wait_for(&format!(
        "the app's first server will be served on {listen}"
    ));
    let addr: SocketAddr = listen.parse().unwrap();
    assert!(refuses_connections(addr), "{}", p.stderr.dump());
    // Taken: another program cannot bind it meanwhile.
    assert!(TcpListener::bind(addr).is_err());
}

/// The `listen()` call forms, as `listen_forms.js` names them.
const LISTEN_FORMS: &[&str] = &[
    "port",
    "port_cb",
    "port_host",
    "port_host_cb",
    "port_undefined_cb",
    "port_host_backlog_cb",
    "port_backlog_cb",
    "options_cb",
    "no_args",
];

/// One `listen_forms.js` worker with `FORM=form`: `Ok` once it is ready and
/// answers a request with its body, else what went wrong (with the log).
fn try_listen_form(form: &str) -> Result<(), String> {
    let cmd = node_command(
        1,
        &["--protocol", "node"],
        "listen_forms.js",
        &[("FORM", form)],
    );
    let proc = Proc::spawn(cmd);
    let fail = |what: String| -> String {
        format!(
            "{what}; log:\n{}\nstdout:\n{}",
            proc.stderr.dump(),
            proc.stdout.dump()
        )
    };
    let outcome = proc.stderr.try_wait_from(0, DEADLINE, |l| {
        l.contains(" ready: 1 of 1 slots ready")
            || l.contains("broke the protocol")
            || l.contains(" exited with ")
    });
    match outcome {
        Some((_, l)) if l.contains(" ready: 1 of 1 slots ready") => {}
        Some((_, l)) => return Err(fail(format!("not ready: {l}"))),
        None => return Err(fail("not ready in time".into())),
    }
    let addr = proc
        .stderr
        .snapshot()
        .iter()
        .filter(|l| !l.starts_with("[worker "))
        .find_map(|l| parse_listening(l))
        .ok_or_else(|| fail("no `listening on` line".into()))?;
    let r = get_path(reachable(addr), "/").map_err(|e| fail(format!("GET {addr}: {e}")))?;
    let (id, pid) = util::parse_worker(&r.body).ok_or_else(|| fail(format!("{r:?}")))?;
    let want = format!("Hello from worker {id} (pid {pid}) via {form}\n");
    if r.status != 200 || r.body != want {
        return Err(fail(format!("answered {r:?}")));
    }
    Ok(())
}

/// Every form of `server.listen()` an app may use works: the primary
/// accepts the queryServer Node derives from it (`listen(port, host, cb)`
/// and `listen(port, undefined, cb)` send `"backlog": false`, the others a
/// number), the worker becomes ready and the server answers.
#[test]
fn every_listen_call_form_works() {
    if !have_node("every_listen_call_form_works") {
        return;
    }
    let failed: Vec<String> = LISTEN_FORMS
        .iter()
        .filter_map(|form| {
            try_listen_form(form)
                .err()
                .map(|e| format!("=== listen form {form}: {e}"))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} listen() forms failed:\n{}",
        failed.len(),
        LISTEN_FORMS.len(),
        failed.join("\n")
    );
}

/// A port in use: the bind error reaches the app as Node reports it, an
/// EADDRINUSE `error` on its server (the fixture prints its code); the
/// primary keeps running.
#[test]
fn a_port_in_use_reaches_the_app_as_eaddrinuse() {
    if !have_node("a_port_in_use_reaches_the_app_as_eaddrinuse") {
        return;
    }
    // The app asks for PORT on no address in particular (`::` or
    // `0.0.0.0`), which a listener on 127.0.0.1:PORT conflicts with.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port().to_string();
    let cmd = node_command_on(
        None,
        1,
        &["--protocol", "node"],
        "hello.js",
        &[("PORT", &port)],
    );
    let mut proc = Proc::spawn(cmd);
    let line = proc.stderr.wait_for("[worker 1] listen error ");
    assert!(
        line.ends_with("listen error EADDRINUSE"),
        "{line}; stderr:\n{}",
        proc.stderr.dump()
    );
    if let Some(status) = proc.try_status() {
        panic!(
            "the primary exited with {}:\n{}",
            describe(status),
            proc.stderr.dump()
        );
    }
    assert!(proc.stderr.count("panicked") == 0, "{}", proc.stderr.dump());
    drop(taken);
}

// ---------------------------------------------------------------------------
// Supervision

/// `kill -9` of a Node worker under a small continuous load (two clients,
/// a new connection per request): no connection is refused; at most the
/// one request each client had in flight on the killed worker fails; the
/// worker is replaced with a new id, and from its exit on, not one request
/// fails.
#[test]
fn a_killed_node_worker_is_replaced_and_no_new_connection_fails() {
    if !have_node("a_killed_node_worker_is_replaced_and_no_new_connection_fails") {
        return;
    }
    let mut p = start(2, &[], "hello.js", &[]);
    p.wait_all_ready();
    let clients = [Mode::Fresh, Mode::Fresh];
    let before = Load::start(p.addr, &clients, DEADLINE, Duration::from_secs(60));
    assert!(
        before.wait_progress(50, DEADLINE),
        "no progress before the kill; log:\n{}",
        p.log().dump()
    );

    let victim = p.wait_started(1);
    let mark = p.log().len();
    kill_pid(victim, Signal::SIGKILL);
    let (_, exit) = p
        .log()
        .wait_for_from(mark, &format!("worker 1 (pid {victim}) exited with "));
    assert!(exit.contains("exited with signal 9 (SIGKILL)"), "{exit}");

    // From here on the primary knows: nothing may fail.
    let after = Load::start(p.addr, &clients, DEADLINE, Duration::from_secs(60));
    let replacement = p.wait_started(3);
    assert_ne!(replacement, victim);
    p.wait_worker_ready(3);
    assert!(
        after.wait_progress(40, DEADLINE),
        "no progress after the replacement; log:\n{}",
        p.log().dump()
    );
    let before = before.stop();
    let after = after.stop();
    eprintln!("kill -9 of a Node worker: during {before}\nafter {after}");

    assert_eq!(before.connect_failures, 0, "refused: {before}");
    assert_eq!(before.bad_status, 0, "{before}");
    assert!(
        before.fresh_failures <= clients.len() as u64,
        "more failures than requests in flight at the kill: {before}\nlog:\n{}",
        p.log().dump()
    );
    assert_eq!(after.failures(), 0, "{after}\nlog:\n{}", p.log().dump());
    assert!(
        after.by_worker.get(&3).is_some_and(|&n| n > 0),
        "the replacement did not serve: {after}"
    );
    assert!(
        pid_gone(victim),
        "the killed worker {victim} is still there"
    );
    p.assert_running();
    p.assert_no_panic();
    stop_cleanly(p);
}

/// SIGTERM with a slow request in flight: the worker (told `disconnect`)
/// finishes it, then every worker exits 0, the primary exits 0, nothing is
/// left running and the port is closed.
#[test]
fn graceful_stop_finishes_a_slow_request() {
    if !have_node("graceful_stop_finishes_a_slow_request") {
        return;
    }
    // Long enough that nobody gets SIGTERM (at half) or SIGKILL for being
    // slow on a busy machine.
    let mut p = start(2, &["--shutdown-timeout", "40s"], "hello.js", &[]);
    p.wait_all_ready();
    let workers = started(&p);
    let pids: Vec<u32> = workers.values().copied().collect();
    let addr = p.addr;

    let slow = thread::spawn(move || get_path(addr, "/slow?ms=3000"));
    // The app prints `slow 3000` when the request reached it.
    let (_, line) = p
        .proc
        .stdout
        .wait_from(0, "the slow request to arrive", DEADLINE, |l| {
            l.ends_with("] slow 3000")
        });
    let mark = p.log().len();
    p.signal(Signal::SIGTERM);
    p.log().wait_for_from(mark, "SIGTERM received");

    let r = slow
        .join()
        .expect("the client thread does not panic")
        .unwrap_or_else(|e| {
            panic!(
                "the request in flight ({line}) failed: {e}; log:\n{}",
                p.log().dump()
            )
        });
    assert_eq!(r.status, 200, "{r:?}");
    let (id, pid) = r.worker();
    assert_eq!(workers.get(&id), Some(&pid), "{r:?}");
    assert!(
        line.starts_with(&format!("[worker {id}] ")),
        "{line} / {r:?}"
    );

    let status = p.proc.expect_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{}", p.log().dump());
    p.log().wait_for("shutdown complete");
    for (&id, &pid) in &workers {
        p.log().wait_for(&format!(
            "worker {id} (pid {pid}) exited with status 0 after "
        ));
    }
    assert_eq!(
        p.log().count("did not stop in time"),
        0,
        "{}",
        p.log().dump()
    );
    kill_and_fail(&wait_gone(&pids, DEADLINE), "after a graceful stop");
    assert!(refuses_connections(addr), "{addr} still accepts");
    p.assert_no_panic();
}

/// `accepted:false`: worker 1 refuses every connection it is handed
/// (`server.maxConnections` below its count), so each goes on to worker 2:
/// every request is answered, all by worker 2, and no worker is cut off
/// for refusing.
#[test]
fn a_refused_connection_goes_to_another_worker() {
    if !have_node("a_refused_connection_goes_to_another_worker") {
        return;
    }
    let p = start(2, &[], "refuse.js", &[]);
    p.wait_all_ready();
    app_line(&p, 1, "refusing");
    let workers = started(&p);
    let seen = serve(&p, p.addr, 20, &workers, "");
    assert_eq!(seen, BTreeMap::from([(2, 20)]), "{}", p.log().dump());
    assert_eq!(p.log().count(" exited with "), 0, "{}", p.log().dump());
    assert_eq!(p.alive_workers().len(), 2);
    stop_cleanly(p);
}

/// A connection that every worker holding its server refused is closed:
/// the client sees the end of the connection (or a reset) with no byte of
/// a response, not a hang; the worker is not cut off for it.
#[test]
fn a_connection_every_worker_refuses_is_closed() {
    if !have_node("a_connection_every_worker_refuses_is_closed") {
        return;
    }
    let p = start(1, &[], "refuse.js", &[]);
    p.wait_all_ready();
    app_line(&p, 1, "refusing");
    let mut conn = HttpConn::connect(p.addr).expect("connect");
    conn.send(&util::request(true)).expect("send");
    match conn.read_response() {
        Ok(r) => panic!("a refused connection was answered: {r:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ),
            "expected the connection closed, got {e} ({:?}); log:\n{}",
            e.kind(),
            p.log().dump()
        ),
    }
    assert_eq!(conn.buffered(), 0);
    assert_eq!(p.log().count(" exited with "), 0, "{}", p.log().dump());
    stop_cleanly(p);
}

// ---------------------------------------------------------------------------
// HTTPS

/// `curl -sk https://ADDR/`: the body, or the failure described.
fn curl_https(addr: SocketAddr) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sSk",
        "--max-time",
        "10",
        "-H",
        "Connection: close",
        &format!("https://{addr}/"),
    ]);
    let mut proc = Proc::spawn(cmd);
    let status = proc.expect_exit(DEADLINE);
    assert!(proc.stdout.wait_closed(DEADLINE) && proc.stderr.wait_closed(DEADLINE));
    if !status.success() {
        return Err(format!(
            "curl: {}: {}",
            describe(status),
            proc.stderr.dump()
        ));
    }
    Ok(proc
        .stdout
        .snapshot()
        .into_iter()
        .map(|l| l + "\n")
        .collect())
}

/// An HTTPS app under rr (the primary echoes the first query's `data`,
/// without which Node's TLS worker would crash): 6 requests on new
/// connections to 2 workers, 3 each, over TLS.
#[test]
fn https_app_under_rr() {
    if !have_node("https_app_under_rr") {
        return;
    }
    if !have_program("curl", "--version") {
        util::skip("https_app_under_rr", "curl is not installed");
        return;
    }
    let p = start(2, &["--sched", "rr"], "https.js", &[]);
    p.wait_all_ready();
    let workers = started(&p);
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..6 {
        let body = curl_https(p.addr)
            .unwrap_or_else(|e| panic!("request {i}: {e}; log:\n{}", p.log().dump()));
        let (id, pid) = util::parse_worker(&body).unwrap_or_else(|| panic!("{body:?}"));
        assert_eq!(
            body,
            format!("Hello from worker {id} (pid {pid}) over TLS\n")
        );
        assert_eq!(workers.get(&id), Some(&pid), "{body:?}");
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen, BTreeMap::from([(1, 3), (2, 3)]), "{}", p.log().dump());
    assert_eq!(p.log().count(" exited with "), 0, "{}", p.log().dump());
    stop_cleanly(p);
}

// ---------------------------------------------------------------------------
// Messages, through the library

/// Shuts the library's primary down when dropped (a failed assertion
/// included), so that its Node workers do not outlive the test.
struct ShutdownOnDrop(distributor::Handle);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// The next message from a worker as (id, JSON value), within [`DEADLINE`];
/// other events are skipped, but a worker exit fails.
fn next_message(events: &distributor::Events) -> (u64, Value) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::Message { id, data }) => {
                let value = serde_json::from_slice(&data).unwrap_or_else(|e| {
                    panic!(
                        "worker {id} sent {:?}, not JSON: {e}",
                        String::from_utf8_lossy(&data)
                    )
                });
                return (id, value);
            }
            Ok(Event::WorkerExited { id, status, .. }) => {
                panic!("worker {id} exited: {status:?}")
            }
            Ok(_) => {}
            Err(e) => panic!("no message from a worker: {e}"),
        }
    }
}

/// The library's primary with `Protocol::Node`: each worker's
/// `process.send()` arrives as `Event::Message` with the JSON text;
/// `Handle::send` and `Handle::broadcast` reach `process.on('message')`
/// (the fixture echoes them back); invalid JSON is dropped, not delivered
/// and not fatal; `Stats::listeners` names the listener the app got, which
/// serves.
#[test]
fn messages_both_ways_through_the_library() {
    if !have_node("messages_both_ways_through_the_library") {
        return;
    }
    let mut primary = distributor::Primary::builder()
        .workers(2)
        .listen("127.0.0.1:0".parse().expect("an address"))
        .protocol(Protocol::Node)
        .command(WorkerCommand::new("node", [fixture("messages.js")]).env("PORT", "0"))
        .handle_signals(false)
        .build()
        .expect("build");
    let events = primary.events();
    let handle = primary.handle();
    let guard = ShutdownOnDrop(handle.clone());
    let runner = thread::spawn(move || primary.run());

    // Each worker says hello (before it listens) and becomes ready.
    let deadline = Instant::now() + DEADLINE;
    let mut ready: BTreeMap<u64, u32> = BTreeMap::new();
    let mut hellos: BTreeMap<u64, Value> = BTreeMap::new();
    while ready.len() < 2 || hellos.len() < 2 {
        match events.recv_deadline(deadline) {
            Ok(Event::WorkerReady { id, pid }) => {
                ready.insert(id, pid);
            }
            Ok(Event::Message { id, data }) => {
                let value: Value = serde_json::from_slice(&data).unwrap_or_else(|e| {
                    panic!("not JSON: {:?}: {e}", String::from_utf8_lossy(&data))
                });
                assert!(hellos.insert(id, value).is_none(), "two hellos from {id}");
            }
            Ok(Event::WorkerExited { id, status, .. }) => {
                panic!("worker {id} exited: {status:?}")
            }
            Ok(_) => {}
            Err(e) => panic!("ready {ready:?}, hellos {hellos:?}: {e}"),
        }
    }
    assert_eq!(ready.keys().copied().collect::<Vec<_>>(), [1, 2]);
    for (&id, &pid) in &ready {
        assert_eq!(hellos[&id], json!({"hello": id, "pid": pid}), "worker {id}");
    }

    // One worker.
    handle
        .send(1, br#"{"ping":1}"#.to_vec())
        .expect("send to worker 1");
    assert_eq!(
        next_message(&events),
        (1, json!({"echo": {"ping": 1}, "from": 1}))
    );

    // Every worker.
    handle
        .broadcast(br#"{"all":true,"n":[1,2,"three"]}"#.to_vec())
        .expect("broadcast");
    let echoes: BTreeSet<(u64, String)> = (0..2)
        .map(|_| {
            let (id, v) = next_message(&events);
            (id, v.to_string())
        })
        .collect();
    let want: BTreeSet<(u64, String)> = [1, 2]
        .into_iter()
        .map(|id| {
            let v = json!({"echo": {"all": true, "n": [1, 2, "three"]}, "from": id});
            (id, v.to_string())
        })
        .collect();
    assert_eq!(echoes, want);

    // Not JSON: dropped; the next valid message still arrives, and it is
    // the next thing the worker echoes.
    handle
        .send(2, b"not json {".to_vec())
        .expect("send (dropped by the primary)");
    handle
        .send(2, br#""after""#.to_vec())
        .expect("send to worker 2");
    assert_eq!(
        next_message(&events),
        (2, json!({"echo": "after", "from": 2}))
    );

    // The listener the app got.
    let stats = handle.stats().expect("stats");
    assert_eq!(stats.listeners.len(), 1, "{:?}", stats.listeners);
    let addr = stats.listeners[0];
    assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST, "{addr}");
    assert_ne!(addr.port(), 0);
    let r = get_once(addr).expect("a request to the app");
    assert_eq!(r.status, 200, "{r:?}");
    let (id, pid) = r.worker();
    assert_eq!(ready.get(&id), Some(&pid), "{r:?}");
    assert_eq!(stats.workers.len(), 2, "{stats:?}");

    handle.shutdown().expect("shutdown");
    assert!(
        poll_until(DEADLINE, || runner.is_finished()),
        "the primary did not stop"
    );
    runner
        .join()
        .expect("the primary's thread does not panic")
        .expect("run ends cleanly");
    drop(guard);
    let pids: Vec<u32> = ready.values().copied().collect();
    kill_and_fail(&wait_gone(&pids, DEADLINE), "after Handle::shutdown");
}

// ---------------------------------------------------------------------------
// Workers leaving and being replaced

/// A worker that calls `cluster.worker.disconnect()` itself (after
/// answering GET /disconnect) gets its reply, exits 0 and is replaced;
/// meanwhile a continuous load loses nothing (connections it refuses on
/// the way out go to other workers).
#[test]
fn a_worker_that_disconnects_itself_is_replaced() {
    if !have_node("a_worker_that_disconnects_itself_is_replaced") {
        return;
    }
    let mut p = start(2, &[], "disconnects.js", &[]);
    p.wait_all_ready();
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::Fresh],
        DEADLINE,
        Duration::from_secs(60),
    );
    assert!(load.wait_progress(20, DEADLINE), "{}", p.log().dump());

    let r = get_path(p.addr, "/disconnect").expect("GET /disconnect");
    assert_eq!(r.status, 200, "{r:?}");
    let (id, pid) = r.worker();
    app_line(&p, id, "disconnecting");
    assert_eq!(
        p.wait_exited(id),
        "status 0",
        "worker {id} (pid {pid}); log:\n{}",
        p.log().dump()
    );
    let replacement = p.wait_started(3);
    p.wait_worker_ready(3);
    assert!(
        load.wait_progress(40, DEADLINE),
        "no progress after the replacement; log:\n{}",
        p.log().dump()
    );
    let stats = load.stop();
    eprintln!("a worker disconnecting itself, under load: {stats}");
    assert_eq!(stats.failures(), 0, "{stats}\nlog:\n{}", p.log().dump());
    assert!(
        stats.by_worker.get(&3).is_some_and(|&n| n > 0),
        "the replacement (pid {replacement}) did not serve: {stats}"
    );
    assert!(util::poll_until(DEADLINE, || pid_gone(pid)));
    p.assert_running();
    p.assert_no_panic();
    stop_cleanly(p);
}

/// SIGHUP under continuous load (two clients, new connections): the Node
/// workers are replaced one at a time (the old ones told `disconnect`,
/// exiting 0), not one request fails, and the new workers serve.
#[test]
fn rolling_reload_under_load_loses_nothing() {
    if !have_node("rolling_reload_under_load_loses_nothing") {
        return;
    }
    let p = start(2, &[], "hello.js", &[]);
    p.wait_all_ready();
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::Fresh],
        DEADLINE,
        Duration::from_secs(60),
    );
    assert!(load.wait_progress(40, DEADLINE), "{}", p.log().dump());
    let mark = p.log().len();
    p.signal(Signal::SIGHUP);
    p.log()
        .wait_for_from(mark, "reloading: replacing 2 workers one at a time");
    p.log().wait_for_from(mark, "reload complete");
    for id in [1, 2] {
        assert_eq!(p.wait_exited(id), "status 0", "{}", p.log().dump());
    }
    assert!(
        load.wait_progress(40, DEADLINE),
        "no progress after the reload; log:\n{}",
        p.log().dump()
    );
    let stats = load.stop();
    eprintln!("rolling reload of Node workers under load: {stats}");
    assert_eq!(stats.failures(), 0, "{stats}\nlog:\n{}", p.log().dump());
    assert!(
        stats.by_worker.contains_key(&3) && stats.by_worker.contains_key(&4),
        "the new workers did not serve: {stats}"
    );
    assert_eq!(
        p.log().count("did not stop in time"),
        0,
        "{}",
        p.log().dump()
    );
    p.assert_no_panic();
    stop_cleanly(p);
}

// ---------------------------------------------------------------------------
// Metrics

/// `--metrics` counts what Node workers accepted (`accepted:true`): after
/// 10 requests to 2 workers under rr, 5 each.
#[test]
fn metrics_count_what_node_workers_accepted() {
    if !have_node("metrics_count_what_node_workers_accepted") {
        return;
    }
    let p = start(2, &["--metrics", "127.0.0.1:0"], "hello.js", &[]);
    let line = p.log().wait_for("metrics on ");
    let maddr = parse_metrics_on(&line).unwrap_or_else(|| panic!("no address in {line:?}"));
    p.wait_all_ready();
    let seen = serve(&p, p.addr, 10, &started(&p), "");
    assert_eq!(seen, BTreeMap::from([(1, 5), (2, 5)]));
    // Acceptances may reach the primary after the responses: scrape until
    // the counts match (bounded).
    let mut last = String::new();
    let ok = poll_until(DEADLINE, || {
        let r = get_path(maddr, "/metrics").expect("GET /metrics");
        assert_eq!(r.status, 200, "{r:?}");
        let s = Scrape::parse(&r.body);
        last = r.body.clone();
        seen.iter().all(|(id, n)| {
            let id = id.to_string();
            s.value("distributor_worker_connections_total", &[("worker", &id)]) == Some(*n as f64)
        })
    });
    assert!(ok, "counts never matched {seen:?}; last scrape:\n{last}");
    let health = get_path(maddr, "/healthz").expect("GET /healthz");
    assert_eq!(health.status, 200, "{health:?}");
    stop_cleanly(p);
}

// ---------------------------------------------------------------------------
// Quiet channels: while connections arrive together, the two lines a Node
// worker writes for each (`NODE_HANDLE_ACK`, `accepted`) are read once per
// turn of the primary's loop rather than each waking it, and a 1 ms tick
// reads what is left (docs/performance.md).

/// The primary's debug lines when its workers' channels stop waking it,
/// and when they wake it again.
const QUIET: &str = "workers' channels: read once per turn";
const PROMPT: &str = "workers' channels: each message wakes the primary";

/// Eight clients connecting at once make a turn that dispatches several
/// connections: the channels go quiet. Then nothing else comes, and no
/// heartbeats are asked for: the tick alone must read what is left, close
/// the primary's copies of the connections (its fds are back to what they
/// were before) and make each line wake the primary again.
#[test]
fn channels_go_quiet_while_connections_arrive_together_and_the_tick_reads_the_rest() {
    if !have_node("channels_go_quiet_while_connections_arrive_together") {
        return;
    }
    let mut cmd = node_command(
        2,
        &["--protocol", "node", "--worker-timeout", "0"],
        "hello.js",
        &[],
    );
    cmd.env("RUST_LOG", "distributor=debug");
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    let fds_before = p.fd_count();
    // A burst lands in one turn of the primary unless the machine splits
    // it: try again, bounded.
    let mut quiet_at = None;
    for _ in 0..50 {
        let from = p.log().len();
        for r in spawn_gets(p.addr, 8, DEADLINE).join() {
            let r = r.expect("an answer");
            assert_eq!(r.status, 200, "{r:?}");
        }
        quiet_at = p
            .log()
            .try_wait_from(from, Duration::from_millis(200), |l| l.contains(QUIET))
            .map(|(at, _)| at);
        if quiet_at.is_some() {
            break;
        }
    }
    let at = quiet_at.unwrap_or_else(|| {
        panic!(
            "50 bursts of 8 connections never made the channels quiet; log:\n{}",
            p.log().dump()
        )
    });
    p.log().wait_for_from(at, PROMPT);
    let ok = poll_until(DEADLINE, || p.fd_count() == fds_before);
    assert!(
        ok,
        "the primary holds {} fds after the load, {fds_before} before; log:\n{}",
        p.fd_count(),
        p.log().dump()
    );
    stop_cleanly(p);
}

/// Quiet channels still deliver: each worker's `process.send()` for every
/// request reaches the library's app during the load, not after it, and
/// the stats count the connections as they are accepted.
#[test]
fn node_messages_arrive_while_connections_keep_coming() {
    if !have_node("node_messages_arrive_while_connections_keep_coming") {
        return;
    }
    let util::Library {
        events,
        handle,
        runner,
        ..
    } = util::run_library(
        distributor::Primary::builder()
            .workers(2)
            .listen("127.0.0.1:0".parse().expect("an address"))
            .protocol(Protocol::Node)
            .command(
                WorkerCommand::new("node", [fixture("messages.js")])
                    .env("PORT", "0")
                    .env("REQUEST_MESSAGES", "1"),
            ),
    );
    let guard = ShutdownOnDrop(handle.clone());
    let ready = util::wait_ready_events(&events, 2, true);
    assert_eq!(ready.len(), 2);
    let addr = handle.stats().expect("stats").listeners[0];
    let load = Load::start(addr, &[Mode::Fresh; 8], DEADLINE, DEADLINE);
    const WANTED: usize = 200;
    let mut requests = 0;
    while requests < WANTED {
        let (_, value) = next_message(&events);
        if value.get("request").is_some() {
            requests += 1;
        }
    }
    let taken: u64 = handle
        .stats()
        .expect("stats")
        .workers
        .iter()
        .map(|w| w.connections)
        .sum();
    // Still going: the load threads stop by themselves after DEADLINE.
    let still_loading = load.wait_progress(1, Duration::from_secs(5));
    let seen = load.stop();
    assert_eq!(seen.failures(), 0, "{seen}");
    assert!(
        still_loading,
        "{WANTED} messages came only after the load ended ({seen})"
    );
    assert!(
        taken >= WANTED as u64,
        "the stats counted {taken} connections accepted after {WANTED} requests were answered"
    );
    drop(guard);
    runner
        .join()
        .expect("the primary's thread does not panic")
        .expect("run ends cleanly");
}

// ---------------------------------------------------------------------------
// Choosing the protocol

/// Every line of a pipe whose writer has exited.
fn collected(lines: &util::Lines) -> Vec<String> {
    assert!(lines.wait_closed(DEADLINE), "the pipe stays open");
    lines.snapshot()
}

/// Runs the binary; returns its exit code and its one stderr line, after
/// checking there is exactly one non-empty line, no panic, nothing on
/// stdout.
fn fails(mut cmd: Command) -> (i32, String) {
    cmd.env("RUST_BACKTRACE", "1");
    let mut proc = Proc::spawn(cmd);
    let status = proc.expect_exit(DEADLINE);
    let stderr = collected(&proc.stderr);
    let stdout = collected(&proc.stdout);
    let all = stderr.join("\n");
    let lines: Vec<&String> = stderr.iter().filter(|l| !l.trim().is_empty()).collect();
    assert!(!all.contains("panicked"), "panic: {all}");
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{all}");
    assert!(stdout.is_empty(), "unexpected stdout: {stdout:?}");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("killed: {}; stderr:\n{all}", describe(status)));
    (code, lines[0].clone())
}

/// An unknown `--protocol` (or `DISTRIBUTOR_WORKER_PROTOCOL`): one line
/// naming the value, exit status 2, no worker started.
#[test]
fn an_unknown_protocol_is_a_usage_error() {
    // No Node needed: the value is refused before anything starts.
    let mut flag = Command::new(bin());
    flag.args(["-w", "1", "-l", "127.0.0.1:0", "--protocol", "banana"])
        .args(["--", "node", "app.js"]);
    let (code, line) = fails(flag);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("banana"), "{line}");
    assert!(line.contains("protocol"), "{line}");

    let mut env = Command::new(bin());
    env.args(["-w", "1", "-l", "127.0.0.1:0", "--", "node", "app.js"])
        .env("DISTRIBUTOR_WORKER_PROTOCOL", "banana");
    let (code, line) = fails(env);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("banana"), "{line}");
}

/// No `--protocol`, program `node`: the Node protocol is chosen by itself
/// (auto), and the app serves, round-robin.
#[test]
fn node_is_detected_without_a_protocol_flag() {
    if !have_node("node_is_detected_without_a_protocol_flag") {
        return;
    }
    let p = Primary::start_command(node_command(2, &[], "hello.js", &[]), 2);
    p.wait_all_ready();
    let seen = serve(&p, p.addr, 4, &started(&p), "");
    assert_eq!(seen, BTreeMap::from([(1, 2), (2, 2)]), "{}", p.log().dump());
    stop_cleanly(p);
}

/// `DISTRIBUTOR_WORKER_PROTOCOL=node` chooses the Node protocol for a
/// program not named node (`sh -c 'exec node APP'`, which auto would run
/// as a native worker); the app serves.
#[test]
fn the_protocol_from_the_environment() {
    if !have_node("the_protocol_from_the_environment") {
        return;
    }
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--", "sh", "-c"])
        .arg("exec node \"$0\"")
        .arg(fixture("hello.js"))
        .env("DISTRIBUTOR_WORKER_PROTOCOL", "node");
    for var in APP_ENV {
        cmd.env_remove(var);
    }
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    let seen = serve(&p, p.addr, 4, &started(&p), "");
    assert_eq!(seen, BTreeMap::from([(1, 2), (2, 2)]), "{}", p.log().dump());
    stop_cleanly(p);
}

/// Each listening address has its own rotation: requests alternating
/// between an app's two servers (A, B, A, B...) reach both workers on
/// each server, exactly in turn (one shared rotation sent all of A's to
/// one worker and all of B's to the other).
#[test]
fn each_server_has_its_own_rotation() {
    if !have_node("each_server_has_its_own_rotation") {
        return;
    }
    let p = start(2, &[], "two_servers.js", &[]);
    p.wait_all_ready();
    let listeners = wait_announced(&p, 2);
    let (a, b) = (listeners[0], reachable(listeners[1]));
    // Both workers hold both servers before the count starts.
    let workers = started(&p);
    assert!(
        poll_until(DEADLINE, || {
            serve(&p, b, 2, &workers, " on server B").len() == 2
                && serve(&p, a, 2, &workers, " on server A").len() == 2
        }),
        "{}",
        p.log().dump()
    );
    let mut per_server: BTreeMap<&str, BTreeMap<u64, u64>> = BTreeMap::new();
    for _ in 0..8 {
        for (name, addr) in [("A", a), ("B", b)] {
            let seen = serve(&p, addr, 1, &workers, &format!(" on server {name}"));
            for (id, n) in seen {
                *per_server.entry(name).or_default().entry(id).or_default() += n;
            }
        }
    }
    let even = BTreeMap::from([(1, 4), (2, 4)]);
    assert_eq!(per_server["A"], even, "{per_server:?}");
    assert_eq!(per_server["B"], even, "{per_server:?}");
    stop_cleanly(p);
}

/// The command's primary has no receiver for workers' messages: the first
/// one a worker sends (`process.send()`) is logged at info, with what the
/// primary does with such messages; later ones at debug, so never silently.
#[test]
fn the_command_logs_what_workers_send() {
    if !have_node("the_command_logs_what_workers_send") {
        return;
    }
    let p = start(2, &[], "messages.js", &[]);
    p.wait_all_ready();
    let line = p.log().wait_for("sent the primary a message: {\"hello\":");
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("sends none"), "{line}");
    assert_eq!(
        p.log().count("sent the primary a message"),
        1,
        "only the first at info; log:\n{}",
        p.log().dump()
    );
    stop_cleanly(p);

    // With RUST_LOG=debug the second worker's is logged too.
    let p = start(2, &[], "messages.js", &[("RUST_LOG", "debug")]);
    p.wait_all_ready();
    p.log().wait_for("sent the primary a message: {\"hello\":");
    p.log().wait_for("message from worker ");
    stop_cleanly(p);
}

/// `cluster.worker.disconnect()` (a worker recycling itself) is not a
/// crash: three workers in a row leave by themselves, and each one's
/// successor is started at once, before it has even exited (its servers
/// close first), with no backoff and no crash-loop warning; no request
/// fails meanwhile.
#[test]
fn workers_that_leave_by_themselves_are_replaced_without_backoff() {
    if !have_node("workers_that_leave_by_themselves_are_replaced_without_backoff") {
        return;
    }
    let p = start(1, &[], "disconnects.js", &[]);
    p.wait_all_ready();
    let load = Load::start(p.addr, &[Mode::Fresh], DEADLINE, Duration::from_secs(60));
    for id in 1..=3u64 {
        p.wait_worker_ready(id);
        assert!(load.wait_progress(5, DEADLINE), "{}", p.log().dump());
        // The load may reach the worker first: ask until it is this one.
        let asked = poll_until(DEADLINE, || {
            get_path(p.addr, "/disconnect").is_ok_and(|r| r.worker().0 == id)
        });
        assert!(asked, "worker {id} never answered /disconnect");
        assert_eq!(p.wait_exited(id), "status 0", "{}", p.log().dump());
        let (successor, exit) = (p.started_at(id + 1), p.exited_at(id));
        assert!(
            matches!((successor, exit), (Some(s), Some(e)) if s < e),
            "worker {}'s start should come before worker {id}'s exit:\n{}",
            id + 1,
            p.log().dump()
        );
    }
    p.wait_worker_ready(4);
    assert!(load.wait_progress(20, DEADLINE), "{}", p.log().dump());
    let stats = load.stop();
    assert_eq!(stats.failures(), 0, "{stats}\n{}", p.log().dump());
    for needle in ["restarting worker slot", "crash-looping", " WARN "] {
        assert_eq!(p.log().count(needle), 0, "{needle:?}:\n{}", p.log().dump());
    }
    stop_cleanly(p);
}

/// `node --inspect`: as Node's cluster does, each worker gets its own
/// inspector port, the option's port plus 1, 2, ... in start order, so
/// that the workers do not collide on one; each inspector listens.
#[test]
fn each_worker_gets_its_own_inspector_port() {
    if !have_node("each_worker_gets_its_own_inspector_port") {
        return;
    }
    // Three free ports in a row are likely below the ephemeral range.
    let base = (20000..30000)
        .step_by(7)
        .find(|&b| (b..=b + 2).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()))
        .expect("three free ports in a row");
    let inspect = format!("--inspect=127.0.0.1:{base}");
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--", "node", &inspect])
        .arg(fixture("hello.js"));
    for var in APP_ENV {
        cmd.env_remove(var);
    }
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    for (id, pid) in started(&p) {
        let port = base + id as u16;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(
            args.contains(&format!("--inspect-port={port}")),
            "worker {id}: {args:?}"
        );
        assert!(
            poll_until(DEADLINE, || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "worker {id}'s inspector does not listen on {port}; log:\n{}",
            p.log().dump()
        );
    }
    assert_eq!(serve(&p, p.addr, 2, &started(&p), "").len(), 2);
    stop_cleanly(p);
}

/// The fixture directory holds what the suite needs (a cheap guard against
/// a rename breaking every test at once with a less clear message).
#[test]
fn fixtures_are_present() {
    for name in [
        "hello.js",
        "two_servers.js",
        "https.js",
        "refuse.js",
        "messages.js",
        "disconnects.js",
        "listen_forms.js",
        "test-only-cert.pem",
        "test-only-key.pem",
    ] {
        assert!(
            Path::new(&fixture(name)).is_file(),
            "tests/fixtures/node/{name}"
        );
    }
}
