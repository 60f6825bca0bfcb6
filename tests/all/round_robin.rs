//! Dispatch through the real binary and its built-in demo worker: exact
//! round-robin over new connections, and HTTP keep-alive on one connection
//! (a connection belongs to one worker for its whole life).

use crate::util;

use std::collections::BTreeMap;

use util::{HttpConn, Primary};

/// 400 sequential requests, each on a new connection, over 4 workers:
/// each worker answers exactly 100, and the pid each worker reports is the
/// one the primary logged for it.
#[test]
fn round_robin_is_exact_over_new_connections() {
    let primary = Primary::start(4, &[]);
    primary.wait_all_ready();
    let started: BTreeMap<u64, u32> = primary.started().into_iter().collect();
    assert_eq!(
        started.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "{}",
        primary.log().dump()
    );

    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for _ in 0..400 {
        let response = primary.get();
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("Connection"), Some("close"), "{response:?}");
        let (id, pid) = response.worker();
        assert_eq!(
            started.get(&id),
            Some(&pid),
            "worker {id} answered with pid {pid}"
        );
        assert_eq!(
            response.body,
            format!("Hello from worker {id} (pid {pid})\n")
        );
        *counts.entry(id).or_default() += 1;
        order.push(id);
    }
    let expected: BTreeMap<u64, usize> = (1..=4).map(|id| (id, 100)).collect();
    assert_eq!(counts, expected, "first answers: {:?}", &order[..16]);
    // Strict rotation, not just equal totals.
    for pair in order.windows(2) {
        assert_eq!(pair[1], pair[0] % 4 + 1, "order: {:?}", &order[..16]);
    }
}

/// Keep-alive follows HTTP/1.1 and 1.0 rules, and every request on one
/// connection goes to the worker that holds it.
#[test]
fn keep_alive_stays_with_one_worker() {
    let primary = Primary::start(2, &[]);
    primary.wait_all_ready();

    // HTTP/1.1: several requests on one connection, all answered by the
    // same worker, the connection staying open.
    let mut conn = HttpConn::connect(primary.addr).unwrap();
    let first = conn.get(false).unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("Connection"), Some("keep-alive"), "{first:?}");
    let worker = first.worker();
    for i in 0..5 {
        // Another connection in between must not move this one.
        let other = primary.get();
        assert_eq!(other.status, 200);
        let r = conn
            .get(false)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("Connection"), Some("keep-alive"), "{r:?}");
        assert_eq!(r.worker(), worker, "request {i} moved to another worker");
    }

    // Pipelined requests are answered in order, by the same worker.
    conn.send(&util::request(false).repeat(3)).unwrap();
    for i in 0..3 {
        let r = conn
            .read_response()
            .unwrap_or_else(|e| panic!("pipelined {i}: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.worker(), worker);
    }

    // `Connection: close` is answered in kind, and the server closes.
    let last = conn.get(true).unwrap();
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(last.header("Connection"), Some("close"), "{last:?}");
    assert_eq!(last.worker(), worker);
    conn.expect_eof()
        .expect("the server closes after Connection: close");

    // HTTP/1.0 without keep-alive: one response, then the server closes.
    let mut old = HttpConn::connect(primary.addr).unwrap();
    old.send("GET / HTTP/1.0\r\n\r\n").unwrap();
    let r = old.read_response().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("Connection"), Some("close"), "{r:?}");
    old.expect_eof()
        .expect("the server closes an HTTP/1.0 connection");

    // HTTP/1.0 asking for keep-alive stays open.
    let mut kept = HttpConn::connect(primary.addr).unwrap();
    let req = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    kept.send(req).unwrap();
    let a = kept.read_response().unwrap();
    assert_eq!(a.header("Connection"), Some("keep-alive"), "{a:?}");
    kept.send(req).unwrap();
    let b = kept.read_response().unwrap();
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(a.worker(), b.worker());
}

/// Many connections at once: all are accepted and answered, by both
/// workers, even though the primary accepts only while workers have room.
#[test]
fn many_concurrent_connections_are_all_served() {
    let primary = Primary::start(2, &[]);
    primary.wait_all_ready();
    // Connect all first, so that they wait in the backlog together.
    let mut conns: Vec<HttpConn> = (0..200)
        .map(|i| HttpConn::connect(primary.addr).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    for conn in &mut conns {
        conn.send(&util::request(true)).unwrap();
    }
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, conn) in conns.iter_mut().enumerate() {
        let r = conn
            .read_response()
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", primary.log().dump()));
        assert_eq!(r.status, 200, "{r:?}");
        *counts.entry(r.worker().0).or_default() += 1;
        conn.expect_eof().unwrap();
    }
    assert_eq!(counts.values().sum::<usize>(), 200);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        [1, 2],
        "{counts:?}"
    );
}

/// An IPv6 listener: the connection entries carry IPv6 peers (27-byte
/// entries in the protocol) and the demo worker serves them.
#[test]
fn an_ipv6_listener_serves() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        util::skip(&util::current_test(), "no IPv6 loopback here");
        return;
    }
    let primary = Primary::start_on("[::1]:0", 2, &[]);
    assert!(primary.addr.is_ipv6(), "{}", primary.addr);
    primary.wait_all_ready();
    let ids: Vec<u64> = (0..4).map(|_| primary.get().worker().0).collect();
    assert_eq!(ids, [1, 2, 1, 2]);
}
