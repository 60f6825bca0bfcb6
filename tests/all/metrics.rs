//! The metrics endpoint (`--metrics ADDR`): `/metrics` in the Prometheus
//! text format agrees with what clients saw, `/healthz` follows the
//! workers' readiness, restarts are counted per slot, and the endpoint,
//! which lives in the primary's event loop, neither hangs on idle or many
//! clients nor holds up the main listener.

use crate::util;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::{
    DEADLINE, HttpConn, Primary, Proc, Response, Scrape, TempDir, bin, get_path, kill_pid,
    parse_metrics_on, proc_cpu_time,
};

/// Every family the endpoint serves, with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("distributor_info", "gauge"),
    ("distributor_uptime_seconds", "gauge"),
    ("distributor_workers", "gauge"),
    ("distributor_ready_workers", "gauge"),
    ("distributor_slots", "gauge"),
    ("distributor_worker_up", "gauge"),
    ("distributor_worker_connections_total", "counter"),
    ("distributor_worker_in_flight", "gauge"),
    ("distributor_worker_uptime_seconds", "gauge"),
    ("distributor_slot_restarts_total", "counter"),
    ("distributor_worker_replacements_total", "counter"),
    ("distributor_connections_total", "counter"),
    ("distributor_connections_held", "gauge"),
];

/// A primary with `--metrics 127.0.0.1:0` and its metrics address, read
/// from the `metrics on ADDR` line.
fn start(workers: usize, extra: &[&str]) -> (Primary, SocketAddr) {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let p = Primary::start(workers, &args);
    let metrics = metrics_addr(&p);
    (p, metrics)
}

fn metrics_addr(p: &Primary) -> SocketAddr {
    let line = p.log().wait_for("metrics on ");
    parse_metrics_on(&line).unwrap_or_else(|| panic!("no address in {line:?}"))
}

fn fetch(p: &Primary, addr: SocketAddr, path: &str) -> Response {
    get_path(addr, path).unwrap_or_else(|e| {
        panic!(
            "GET {path} from {addr} failed: {e}; log:\n{}",
            p.log().dump()
        )
    })
}

fn scrape(p: &Primary, addr: SocketAddr) -> Scrape {
    let r = fetch(p, addr, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    Scrape::parse(&r.body)
}

/// Scrapes until `cond` holds (bounded); returns the last scrape.
fn scrape_until(
    p: &Primary,
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&Scrape) -> bool,
) -> Scrape {
    util::scrape_until(what, || scrape(p, addr), cond, || p.log().dump())
}

#[test]
fn metrics_match_what_clients_saw_in_rr() {
    let (p, maddr) = start(2, &[]);
    p.wait_all_ready();
    const N: u64 = 20;
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for _ in 0..N {
        let r = p.get();
        assert_eq!(r.status, 200);
        *seen.entry(r.worker().0).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Acknowledgements may reach the primary after the responses.
    let s = scrape_until(&p, maddr, "per-worker counts as seen", |s| {
        seen.iter().all(|(id, n)| {
            let id = id.to_string();
            s.value("distributor_worker_connections_total", &[("worker", &id)]) == Some(*n as f64)
        })
    });
    let per_worker: f64 = s
        .all("distributor_worker_connections_total")
        .iter()
        .map(|x| x.value)
        .sum();
    assert_eq!(per_worker, N as f64, "{}", s.text);
    assert_eq!(
        s.value("distributor_connections_total", &[]),
        Some(N as f64)
    );
    assert_eq!(s.value("distributor_connections_held", &[]), Some(0.0));

    for (name, kind) in FAMILIES {
        assert_eq!(
            s.types.get(*name).map(String::as_str),
            Some(*kind),
            "{name}"
        );
        assert!(!s.help[*name].is_empty(), "{name} has no help");
        assert!(s.text.contains(&format!("# HELP {name} ")), "{name}");
        assert!(
            s.text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name}"
        );
    }
    let info = s.all("distributor_info");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].labels["sched"], "rr");
    assert_eq!(info[0].labels["version"], env!("CARGO_PKG_VERSION"));

    // One up line per worker, with its pid and slot, both ready.
    let started = p.started();
    assert_eq!(started.len(), 2);
    for (slot, (id, pid)) in started.iter().enumerate() {
        let (id, pid, slot) = (id.to_string(), pid.to_string(), (slot + 1).to_string());
        let labels = [
            ("worker", id.as_str()),
            ("pid", pid.as_str()),
            ("slot", slot.as_str()),
            ("state", "ready"),
        ];
        assert_eq!(
            s.value("distributor_worker_up", &labels),
            Some(1.0),
            "{}",
            s.text
        );
        assert_eq!(
            s.value("distributor_worker_in_flight", &labels[..3]),
            Some(0.0)
        );
        let uptime = s
            .value("distributor_worker_uptime_seconds", &labels[..3])
            .expect("worker uptime");
        assert!(uptime > 0.0 && uptime < 600.0, "{uptime}");
    }
    assert_eq!(s.all("distributor_worker_up").len(), 2);
    assert_eq!(
        s.value("distributor_workers", &[("state", "ready")]),
        Some(2.0)
    );
    assert_eq!(
        s.value("distributor_workers", &[("state", "starting")]),
        Some(0.0)
    );
    assert_eq!(
        s.value("distributor_workers", &[("state", "stopping")]),
        Some(0.0)
    );
    assert_eq!(s.value("distributor_ready_workers", &[]), Some(2.0));
    assert_eq!(s.value("distributor_slots", &[]), Some(2.0));
    assert_eq!(
        s.value("distributor_slot_restarts_total", &[("slot", "1")]),
        Some(0.0)
    );

    let h = fetch(&p, maddr, "/healthz");
    assert_eq!(h.status, 200, "{h:?}");
    assert_eq!(h.body, "ok: 2 of 2 workers ready\n");
    assert_eq!(h.header("connection"), Some("close"));
}

#[test]
fn healthz_is_503_while_no_worker_is_ready_and_the_environment_turns_it_on() {
    // `sleep` never says hello, so no worker ever gets ready.
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--", "sleep", "60"])
        .env("DISTRIBUTOR_METRICS", "127.0.0.1:0");
    let p = Primary::start_command(cmd, 2);
    let maddr = metrics_addr(&p);
    p.wait_started(2);
    let h = fetch(&p, maddr, "/healthz");
    assert_eq!(h.status, 503, "{h:?}");
    assert_eq!(h.body, "unavailable: 0 of 2 workers ready\n");
    let s = scrape(&p, maddr);
    assert_eq!(
        s.value("distributor_workers", &[("state", "starting")]),
        Some(2.0)
    );
    assert_eq!(s.value("distributor_ready_workers", &[]), Some(0.0));
    assert_eq!(
        s.all("distributor_worker_up")
            .iter()
            .filter(|x| x.labels["state"] == "starting")
            .count(),
        2,
        "{}",
        s.text
    );
}

#[test]
fn a_killed_worker_counts_as_a_restart_of_its_slot() {
    let (p, maddr) = start(2, &[]);
    p.wait_all_ready();
    for _ in 0..4 {
        assert_eq!(p.get().status, 200);
    }
    scrape_until(&p, maddr, "4 connections counted", |s| {
        s.value("distributor_connections_total", &[]) == Some(4.0)
    });
    let (id, pid) = p.started()[0];
    assert_eq!(id, 1);
    kill_pid(pid, Signal::SIGKILL);
    let s = scrape_until(&p, maddr, "slot 1 restarted and ready", |s| {
        s.value("distributor_slot_restarts_total", &[("slot", "1")]) == Some(1.0)
            && s.value(
                "distributor_worker_up",
                &[("worker", "3"), ("slot", "1"), ("state", "ready")],
            ) == Some(1.0)
    });
    assert_eq!(
        s.value("distributor_slot_restarts_total", &[("slot", "2")]),
        Some(0.0)
    );
    assert_eq!(
        s.value("distributor_worker_up", &[("worker", "1")]),
        None,
        "the killed worker is gone:\n{}",
        s.text
    );
    // Its connections still count in the total.
    assert_eq!(s.value("distributor_connections_total", &[]), Some(4.0));
    assert_eq!(fetch(&p, maddr, "/healthz").status, 200);
}

/// A slot removed by SIGTTOU has no restarts series any more (it kept one
/// forever); one added back by SIGTTIN has it again. A reload counts as
/// replacements for reason `reload`, not as restarts.
#[test]
fn a_removed_slot_has_no_series_and_reloads_count_as_replacements() {
    let (p, maddr) = start(2, &[]);
    p.wait_all_ready();
    let s = scrape(&p, maddr);
    assert!(
        s.value("distributor_slot_restarts_total", &[("slot", "2")])
            .is_some()
    );
    p.signal(Signal::SIGTTOU);
    let s = scrape_until(&p, maddr, "slot 2 gone", |s| {
        s.value("distributor_slots", &[]) == Some(1.0)
    });
    assert_eq!(
        s.value("distributor_slot_restarts_total", &[("slot", "2")]),
        None,
        "{}",
        s.text
    );
    assert_eq!(
        s.value("distributor_slot_restarts_total", &[("slot", "1")]),
        Some(0.0)
    );
    p.signal(Signal::SIGTTIN);
    scrape_until(&p, maddr, "slot 2 back", |s| {
        s.value("distributor_slot_restarts_total", &[("slot", "2")]) == Some(0.0)
    });
    p.wait_worker_ready(3);
    p.signal(Signal::SIGHUP);
    let s = scrape_until(&p, maddr, "two reload replacements", |s| {
        s.value(
            "distributor_worker_replacements_total",
            &[("reason", "reload")],
        ) == Some(2.0)
    });
    for why in [
        "max-requests",
        "max-memory",
        "max-age",
        "announced",
        "exited",
    ] {
        assert_eq!(
            s.value("distributor_worker_replacements_total", &[("reason", why)]),
            Some(0.0),
            "{why}"
        );
    }
    assert_eq!(
        s.value("distributor_slot_restarts_total", &[("slot", "1")]),
        Some(0.0)
    );
}

/// During a graceful stop the workers are stopping, so a load balancer
/// sees 503 and stops sending, while the endpoint serves until the end.
#[test]
fn healthz_is_503_during_a_graceful_stop() {
    let (mut p, maddr) = start(2, &["--shutdown-timeout", "20s"]);
    p.wait_all_ready();
    assert_eq!(fetch(&p, maddr, "/healthz").status, 200);
    // A stopped worker cannot exit: the stop lasts until it is continued.
    let (_, pid) = p.started()[0];
    kill_pid(pid, Signal::SIGSTOP);
    let mark = p.log().len();
    p.signal(Signal::SIGTERM);
    p.log().wait_for_from(mark, "shutting down");
    let h = fetch(&p, maddr, "/healthz");
    assert_eq!(h.status, 503, "{h:?}");
    let s = scrape(&p, maddr);
    let pid = pid.to_string();
    assert_eq!(
        s.value(
            "distributor_worker_up",
            &[("pid", &pid), ("state", "stopping")]
        ),
        Some(1.0),
        "{}",
        s.text
    );
    assert_eq!(s.value("distributor_ready_workers", &[]), Some(0.0));
    kill_pid(pid.parse().expect("a pid"), Signal::SIGCONT);
    let status = p.proc.expect_exit(DEADLINE);
    assert!(status.success(), "{status:?}\n{}", p.log().dump());
}

#[test]
fn unknown_paths_and_methods_get_errors_and_bad_requests_are_closed() {
    let (p, maddr) = start(1, &[]);
    let r = fetch(&p, maddr, "/nope");
    assert_eq!(r.status, 404, "{r:?}");
    let r = fetch(&p, maddr, "/metrics/extra");
    assert_eq!(r.status, 404, "{r:?}");

    let mut conn = HttpConn::connect(maddr).expect("connect");
    conn.send("DELETE /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
        .expect("send");
    let r = conn.read_response().expect("a response");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    conn.expect_eof().expect("closed after the response");

    let mut conn = HttpConn::connect(maddr).expect("connect");
    conn.send("GET /metrics HTTP/1.1\r\nX: ").expect("send");
    conn.send(&"a".repeat(9000)).expect("send");
    let r = conn.read_response().expect("a response");
    assert_eq!(r.status, 431, "a head over 8 KiB");

    let mut conn = HttpConn::connect(maddr).expect("connect");
    conn.send("\x01\x02 garbage\r\n\r\n").expect("send");
    assert_eq!(conn.read_response().expect("a response").status, 400);

    // Still serving.
    assert_eq!(fetch(&p, maddr, "/metrics").status, 200);
}

/// Reads `stream` until end of file (or a reset); returns how long that
/// took, or the error if it came first (a timeout: the server hung).
fn time_to_close(mut stream: TcpStream, from: Instant) -> io::Result<Duration> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(from.elapsed()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "unexpected bytes {:?}",
                    String::from_utf8_lossy(&buf[..n])
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(from.elapsed()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn an_idle_client_does_not_hold_up_others_and_is_closed_after_5s() {
    let (p, maddr) = start(1, &[]);
    p.wait_all_ready();
    let start = Instant::now();
    let idle = TcpStream::connect(maddr).expect("connect");
    let mut partial = HttpConn::connect(maddr).expect("connect");
    partial.send("GET /metrics HTTP/1.1\r\nHost").expect("send");
    let partial = partial.stream;
    let (tx, rx) = mpsc::channel();
    for stream in [idle, partial] {
        let tx = tx.clone();
        thread::spawn(move || tx.send(time_to_close(stream, start)));
    }
    // Others are served meanwhile, by the endpoint and the main listener.
    for _ in 0..5 {
        assert_eq!(fetch(&p, maddr, "/healthz").status, 200);
        assert_eq!(p.get().status, 200);
    }
    for _ in 0..2 {
        let took = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the reader thread answers")
            .expect("closed by the server, not a timeout");
        assert!(
            took >= Duration::from_secs(4) && took <= Duration::from_secs(5 + 5),
            "closed after {took:?}, expected about 5 s"
        );
    }
}

#[test]
fn many_clients_at_once_are_all_served_or_closed() {
    let (p, maddr) = start(2, &[]);
    p.wait_all_ready();
    let (tx, rx) = mpsc::channel();
    for _ in 0..100 {
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send(get_path(maddr, "/metrics"));
        });
    }
    drop(tx);
    // The main listener keeps serving during it.
    for _ in 0..10 {
        assert_eq!(p.get().status, 200);
    }
    let (mut served, mut closed) = (0, 0);
    for _ in 0..100 {
        match rx.recv_timeout(DEADLINE).expect("every client finishes") {
            Ok(r) => {
                assert_eq!(r.status, 200);
                Scrape::parse(&r.body);
                served += 1;
            }
            // Beyond the table's 64 places: closed at once, never left hanging.
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    ),
                    "a client got {e} (kind {:?})",
                    e.kind()
                );
                closed += 1;
            }
        }
    }
    assert_eq!(served + closed, 100);
    assert!(served >= 64, "{served} served, {closed} closed");
    assert_eq!(fetch(&p, maddr, "/healthz").status, 200);
}

/// 100 clients that send nothing, and health checks meanwhile: every new
/// client beyond the 64 places takes the place of the one that has waited
/// longest without a request, so the health checks are answered (they
/// were refused while idle clients held the table); the 36 or 37 oldest
/// idle clients are closed at once, the other 64 by the timer; the primary
/// serves the main listener meanwhile and does not spin.
#[test]
fn idle_clients_cannot_keep_a_health_check_out() {
    let (p, maddr) = start(1, &[]);
    p.wait_all_ready();
    let cpu_before = proc_cpu_time(p.proc.pid()).expect("cpu time");
    let (tx, rx) = mpsc::channel();
    for _ in 0..100 {
        let stream = TcpStream::connect(maddr).expect("connect");
        let tx = tx.clone();
        let start = Instant::now();
        thread::spawn(move || tx.send(time_to_close(stream, start)));
    }
    drop(tx);
    for _ in 0..10 {
        assert_eq!(p.get().status, 200);
    }
    let health = fetch(&p, maddr, "/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    let mut times: Vec<Duration> = (0..100)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(40))
                .expect("the reader thread answers")
                .expect("closed by the server, not a timeout")
        })
        .collect();
    times.sort();
    let early = times
        .iter()
        .filter(|t| **t < Duration::from_secs(3))
        .count();
    assert!((36..=37).contains(&early), "closed at once: {times:?}");
    for t in &times[early..] {
        assert!(
            *t >= Duration::from_secs(4) && *t <= Duration::from_secs(15),
            "an idle client closed after {t:?}: {times:?}"
        );
    }
    let cpu = proc_cpu_time(p.proc.pid()).expect("cpu time") - cpu_before;
    assert!(
        cpu < Duration::from_millis(1500),
        "the primary used {cpu:?} of CPU in 5 s of waiting: spinning?"
    );
    assert_eq!(fetch(&p, maddr, "/metrics").status, 200);
}

/// A request head over the limit is answered 431, readable by a client
/// that is still sending it (the endpoint reads the rest before it closes),
/// not reset.
#[test]
fn an_oversized_request_gets_431_not_a_reset() {
    let (_p, maddr) = start(1, &[]);
    let mut stream = TcpStream::connect(maddr).expect("connect");
    stream
        .set_read_timeout(Some(util::IO_TIMEOUT))
        .expect("timeout");
    let mut head = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 40 * 1024));
    // All of it goes (the endpoint keeps reading), then the answer.
    stream.write_all(&head).expect("the whole head is taken");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("the answer, then an orderly close");
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer:?}"
    );
}

/// Runs the binary; returns its exit code and its one stderr line.
fn fails(args: &[&str], dir: &Path) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).current_dir(dir);
    let mut proc = Proc::spawn(cmd);
    let status = proc.expect_exit(DEADLINE);
    assert!(proc.stderr.wait_closed(DEADLINE), "stderr stays open");
    let lines: Vec<String> = proc
        .stderr
        .snapshot()
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {lines:?}");
    (status.code().expect("an exit code"), lines[0].clone())
}

#[test]
fn a_metrics_port_in_use_is_one_line_and_exit_1() {
    let dir = TempDir::new("metrics");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let (code, line) = fails(
        &["-w", "1", "-l", "127.0.0.1:0", "--metrics", &addr],
        dir.path(),
    );
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with(&format!("error: cannot serve metrics on {addr}: Address")),
        "{line}"
    );
    assert!(line.contains("in use"), "{line}");
}

#[test]
fn an_unparsable_metrics_address_is_exit_2() {
    let dir = TempDir::new("metrics");
    let (code, line) = fails(
        &["-w", "1", "-l", "127.0.0.1:0", "--metrics", "banana"],
        dir.path(),
    );
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("error: invalid value 'banana' for '--metrics <ADDR>'"),
        "{line}"
    );
}

/// `--defer-accept`: a client that connects and sends nothing is not handed
/// to a worker (the kernel keeps it until its first data), while one that
/// sends its request is served; once the first sends, it is served too.
/// Without the option the silent client is handed over at once: the worker
/// holds it in flight, and two connections are counted, not one.
#[test]
fn defer_accept_hands_over_a_connection_once_its_client_has_sent() {
    for defer in [true, false] {
        let extra: &[&str] = if defer {
            &["--defer-accept", "30s"]
        } else {
            &[]
        };
        let (p, maddr) = start(1, extra);
        p.wait_all_ready();
        let mut silent = HttpConn::connect(p.addr).expect("connect");
        let r = p.get();
        assert_eq!(r.status, 200, "{r:?}");
        let total = |s: &Scrape| s.value("distributor_connections_total", &[]).unwrap_or(0.0);
        let in_flight = |s: &Scrape| {
            s.all("distributor_worker_in_flight")
                .iter()
                .map(|x| x.value)
                .sum::<f64>()
        };
        if defer {
            // The request's connection taken and finished, and nothing else.
            let s = scrape_until(&p, maddr, "the request counted and finished", |s| {
                total(s) >= 1.0 && in_flight(s) == 0.0
            });
            assert_eq!(
                total(&s),
                1.0,
                "the silent client was handed over:\n{}",
                s.text
            );
        } else {
            scrape_until(&p, maddr, "the silent client handed over", |s| {
                total(s) >= 2.0 && in_flight(s) == 1.0
            });
        }
        let r = silent.get(true).expect("the silent client's request");
        assert_eq!(r.status, 200, "{r:?}");
        scrape_until(&p, maddr, "both counted", |s| total(s) >= 2.0);
    }
}
