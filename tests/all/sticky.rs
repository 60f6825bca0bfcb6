//! `--sticky ip`: each client address stays on one worker slot, across a
//! kill -9 and a rolling reload of that slot's worker; a hot key spills to
//! the next slots within the load bound; the metrics count how connections
//! were placed; bad settings are one line.

use crate::util;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;

use nix::sys::signal::Signal;
use util::{IO_TIMEOUT, Primary, kill_pid, parse_worker};

/// One `GET path` with `Connection: close` from source address `from`;
/// the worker id in the demo's answer.
fn get_from(from: IpAddr, addr: SocketAddr, path: &str) -> u64 {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    socket
        .connect_timeout(&addr.into(), IO_TIMEOUT)
        .expect("connect");
    let answer = ask(socket.into(), path);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    parse_worker(body)
        .unwrap_or_else(|| panic!("no worker in {answer:?}"))
        .0
}

/// `GET path` with `Connection: close` on `stream`: the whole answer,
/// which must be a 200.
fn ask(mut stream: TcpStream, path: &str) -> String {
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// Worker id → slot, from `ctl status --json`.
fn slots_of(p: &Primary) -> BTreeMap<u64, u64> {
    let (ok, out, err) = p.ctl(&["status", "--json"]);
    assert!(ok, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    doc["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| (w["id"].as_u64().unwrap(), w["slot"].as_u64().unwrap()))
        .collect()
}

fn sources() -> Vec<IpAddr> {
    (1..=6).map(|n| IpAddr::from([127, 0, 0, n])).collect()
}

/// The slot each source reaches, 5 requests each: one slot per source.
fn slot_per_source(p: &Primary) -> BTreeMap<IpAddr, u64> {
    let slots = slots_of(p);
    sources()
        .into_iter()
        .map(|from| {
            let reached: BTreeSet<u64> = (0..5)
                .map(|_| {
                    let id = get_from(from, p.addr, "/");
                    *slots
                        .get(&id)
                        .unwrap_or_else(|| panic!("worker {id} not in {slots:?}"))
                })
                .collect();
            assert_eq!(
                reached.len(),
                1,
                "{from} reached slots {reached:?}\n{}",
                p.log().dump()
            );
            (from, reached.into_iter().next().unwrap())
        })
        .collect()
}

#[test]
fn each_client_address_stays_on_its_slot_across_a_kill_and_a_reload() {
    let p = Primary::start(4, &["--sticky", "ip"]);
    p.wait_all_ready();
    let before = slot_per_source(&p);
    let used: BTreeSet<u64> = before.values().copied().collect();
    assert!(used.len() >= 2, "six addresses all on one slot: {before:?}");

    // kill -9 the worker of the first source's slot: its replacement
    // serves the same addresses.
    let slot = before[&sources()[0]];
    let slots = slots_of(&p);
    let (&victim, _) = slots.iter().find(|(_, s)| **s == slot).expect("a worker");
    let pid = p
        .started()
        .into_iter()
        .find(|(id, _)| *id == victim)
        .expect("its pid")
        .1;
    let mark = p.log().len();
    kill_pid(pid, Signal::SIGKILL);
    p.wait_ready_from(mark);
    assert_eq!(
        slot_per_source(&p),
        before,
        "after kill -9 of worker {victim}"
    );

    let mark = p.log().len();
    p.signal(Signal::SIGHUP);
    p.log().wait_for_from(mark, "reload complete");
    assert_eq!(slot_per_source(&p), before, "after a reload");

    let scrape = {
        let (ok, out, _) = p.ctl(&["status", "--json"]);
        assert!(ok);
        out
    };
    assert!(scrape.contains("\"workers\""));
    p.assert_no_panic();
}

/// One hot address, 24 requests at once that each hold a worker 600 ms
/// (so that all are in flight together, even on a busy machine; a worker
/// serves them one after the other):
/// its slot takes what the bound allows and the rest spill to the next
/// slots; no worker holds more than ceil(1.25 × 24 / 4) = 8; the metrics
/// count connections placed by key and moved by the bound.
#[test]
fn a_hot_key_spills_within_the_bound() {
    let port = util::node::free_port();
    let mut cmd = Command::new(util::bin());
    cmd.env(distributor::demo::DEMO_WORK_ENV, "1")
        .args(["-w", "4", "-l", "127.0.0.1:0", "--sticky", "ip"])
        .args(["--metrics", &format!("127.0.0.1:{port}")]);
    let p = Primary::start_command(cmd, 4);
    p.wait_all_ready();
    let addr = p.addr;
    let from = IpAddr::from([127, 0, 0, 9]);
    let clients: Vec<_> = (0..24)
        .map(|_| std::thread::spawn(move || get_from(from, addr, "/work?ms=600")))
        .collect();
    let mut per_worker: BTreeMap<u64, usize> = BTreeMap::new();
    for c in clients {
        *per_worker.entry(c.join().expect("client")).or_insert(0) += 1;
    }
    let busiest = per_worker.values().copied().max().unwrap_or(0);
    assert!(
        busiest <= 8,
        "a worker took {busiest} of 24: {per_worker:?}"
    );
    assert!(per_worker.len() >= 3, "{per_worker:?}");
    let metrics =
        util::get_path(SocketAddr::from(([127, 0, 0, 1], port)), "/metrics").expect("metrics");
    let count = |placed: &str| -> u64 {
        let line = format!("distributor_sticky_connections_total{{placed=\"{placed}\"}} ");
        metrics
            .body
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in {}", metrics.body))
            .trim()
            .parse()
            .expect("a number")
    };
    assert!(count("key") >= 1, "{}", metrics.body);
    assert!(count("moved") >= 1, "{}", metrics.body);
    assert_eq!(
        count("key") + count("moved") + count("fallback"),
        24,
        "{}",
        metrics.body
    );
    p.assert_no_panic();
}

#[test]
fn sticky_settings_that_cannot_work_are_one_line() {
    for (args, needle) in [
        (
            &["--sticky", "ip", "--sched", "reuseport"][..],
            "--sticky needs a primary-side mode",
        ),
        (&["--sticky", "mac"][..], "unknown sticky key"),
        (
            &["--sticky", "cookie:"][..],
            "a cookie name after the colon",
        ),
        (
            &["--sticky", "ip", "--sticky-balance-factor", "0"][..],
            "not a balance factor",
        ),
        (
            &["--sticky", "ip", "--sticky-balance-factor", "x"][..],
            "not a balance factor",
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
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// One request with `Connection: close` whose head is `head` (the request
/// line and headers, without the final empty line), sent in two segments
/// 30 ms apart; the worker id of the answer.
fn get_split(addr: SocketAddr, head: &str) -> u64 {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let whole = format!("{head}\r\nConnection: close\r\n\r\n");
    let (a, b) = whole.split_at(whole.len() / 2);
    stream.write_all(a.as_bytes()).expect("send");
    std::thread::sleep(std::time::Duration::from_millis(30));
    stream.write_all(b.as_bytes()).expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    parse_worker(body)
        .unwrap_or_else(|| panic!("no worker in {answer:?}"))
        .0
}

/// `cookie:sid` and `query:user`: each value on one slot, with requests
/// split over two TCP segments; meanwhile a client that connects and sends
/// nothing holds up nobody, and is placed (without a key) after the
/// timeout: its request, sent late, is answered.
#[test]
fn cookie_and_query_keys_are_peeked_from_split_requests() {
    for (flag, head) in [
        (
            "cookie:sid",
            "GET / HTTP/1.1\r\nHost: t\r\nCookie: theme=dark; sid={}",
        ),
        ("query:user", "GET /?lang=en&user={} HTTP/1.1\r\nHost: t"),
    ] {
        let p = Primary::start(4, &["--sticky", flag]);
        p.wait_all_ready();
        let silent = TcpStream::connect_timeout(&p.addr, IO_TIMEOUT).expect("a silent client");
        let started = std::time::Instant::now();
        let slots = slots_of(&p);
        let mut used = BTreeSet::new();
        for value in ["ann", "bob", "cy", "dee", "eve", "fay"] {
            let head = head.replace("{}", value);
            let reached: BTreeSet<u64> = (0..4).map(|_| slots[&get_split(p.addr, &head)]).collect();
            assert_eq!(reached.len(), 1, "{flag}={value} reached slots {reached:?}");
            used.extend(reached);
        }
        assert!(used.len() >= 2, "{flag}: six values all on one slot");
        // The others were not held up by the silent one.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // The silent client, placed after the timeout, is served.
        std::thread::sleep(std::time::Duration::from_millis(700));
        ask(silent, "/");
        p.assert_no_panic();
    }
}

/// `header:X-Forwarded-For` through the real HAProxy (`option forwardfor`,
/// one connection to the distributor per request): six client addresses,
/// all reaching the distributor from HAProxy's one address, each stay on
/// one slot.
#[test]
fn forwarded_for_through_haproxy_keeps_each_client_on_its_slot() {
    if !util::have_program("haproxy", "-v") {
        util::skip(
            &util::current_test(),
            "haproxy is not installed (apt-get install haproxy)",
        );
        return;
    }
    let p = Primary::start(4, &["--sticky", "header:X-Forwarded-For"]);
    p.wait_all_ready();
    let front = util::node::free_port();
    let dir = util::TempDir::new("sticky-haproxy");
    let cfg = format!(
        "global\n    maxconn 256\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n    option forwardfor\n    option http-server-close\nfrontend web\n    bind 127.0.0.1:{front}\n    default_backend d\nbackend d\n    server one {}\n",
        p.addr
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write the config");
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let haproxy = util::Proc::spawn(cmd);
    let front = SocketAddr::from(([127, 0, 0, 1], front));
    let up = util::poll_until(util::DEADLINE, || {
        TcpStream::connect_timeout(&front, IO_TIMEOUT).is_ok()
    });
    assert!(up, "haproxy did not listen: {}", haproxy.stderr.dump());
    let slots = slots_of(&p);
    let mut used = BTreeSet::new();
    for from in sources() {
        let reached: BTreeSet<u64> = (0..5).map(|_| slots[&get_from(from, front, "/")]).collect();
        assert_eq!(reached.len(), 1, "{from} reached slots {reached:?}");
        used.extend(reached);
    }
    assert!(used.len() >= 2, "six clients all on one slot: {used:?}");
    drop(haproxy);
    p.assert_no_panic();
}

/// `compare --sessions N:H` sends each connection as one of N clients
/// (`Cookie: sid=...`), H heavy ones; the `rr+sticky` mode runs
/// `--sticky cookie:sid` and serves them all without an error.
#[test]
fn compare_sets_sticky_sessions_against_rr() {
    let out = util::output_within(
        {
            let mut cmd = Command::new(util::bin());
            cmd.arg("compare")
                .args(["-w", "4", "-d", "300ms", "-c", "8", "--json"])
                .args(["--sessions", "200:2", "--sched", "rr,rr+sticky"]);
            cmd
        },
        util::DEADLINE,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let modes = doc["modes"].as_array().expect("modes");
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["rr", "rr+sticky"]);
    for m in modes {
        assert_eq!(m["errors"].as_u64(), Some(0), "{m}");
        assert!(m["requests"].as_u64().unwrap() > 0, "{m}");
    }
    let bad = util::output_within(
        {
            let mut cmd = Command::new(util::bin());
            cmd.args(["compare", "--sessions", "5:9"]);
            cmd
        },
        util::DEADLINE,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not N:H"));
}
