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
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    parse_worker(body)
        .unwrap_or_else(|| panic!("no worker in {answer:?}"))
        .0
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

/// One hot address, 24 requests at once that each hold a worker 300 ms:
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
        .map(|_| std::thread::spawn(move || get_from(from, addr, "/work?ms=300")))
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
        (&["--sticky", "cookie:sid"][..], "unknown sticky key"),
        (
            &["--sticky", "ip", "--sticky-balance-factor", "0"][..],
            "not a balance factor",
        ),
        (
            &["--sticky", "ip", "--sticky-balance-factor", "x"][..],
            "not a balance factor",
        ),
    ] {
        let out = Command::new(util::bin())
            .args(["-w", "2", "-l", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
