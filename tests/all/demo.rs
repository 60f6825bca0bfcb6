//! The built-in demo worker's HTTP on a new connection, where it answers
//! before it watches the connection: a request in pieces, a client that
//! half-closes right after its request, and pipelined requests, each in rr
//! (the connection handed over) and in reuseport (accepted by the worker).

use crate::util;

use std::net::Shutdown;
use std::time::Duration;

use util::{HttpConn, Primary};

const MODES: [&str; 2] = ["rr", "reuseport"];

fn start(mode: &str) -> Primary {
    let primary = Primary::start(2, &["--sched", mode]);
    primary.wait_all_ready();
    primary
}

/// The head comes in two writes 100 ms apart: the first read takes a part,
/// and the rest must still be read and answered.
#[test]
fn a_request_in_two_pieces_is_answered() {
    for mode in MODES {
        let primary = start(mode);
        for _ in 0..4 {
            let mut c = HttpConn::connect(primary.addr).expect("connect");
            c.send("GET / HTTP/1.1\r\nHost: test\r\n").expect("send");
            std::thread::sleep(Duration::from_millis(100));
            c.send("Connection: close\r\n\r\n").expect("send");
            let r = c
                .read_response()
                .unwrap_or_else(|e| panic!("{mode}: {e}; log:\n{}", primary.log().dump()));
            assert_eq!(r.status, 200, "{mode}: {r:?}");
            c.expect_eof()
                .unwrap_or_else(|e| panic!("{mode}: not closed after the answer: {e}"));
        }
    }
}

/// A keep-alive request followed at once by the client's FIN, as the
/// first request of a connection and as a later one: the worker answers,
/// then sees the FIN and closes (it would keep the connection otherwise,
/// and the client would wait out its read timeout).
#[test]
fn a_client_that_half_closes_after_its_request_is_answered_and_closed() {
    for mode in MODES {
        let primary = start(mode);
        for earlier in 0..2 {
            let mut c = HttpConn::connect(primary.addr).expect("connect");
            for _ in 0..earlier {
                let r = c.get(false).expect("a kept-alive request");
                assert_eq!(r.status, 200, "{mode}: {r:?}");
            }
            c.send("GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .expect("send");
            c.stream.shutdown(Shutdown::Write).expect("shutdown");
            let r = c
                .read_response()
                .unwrap_or_else(|e| panic!("{mode}: {e}; log:\n{}", primary.log().dump()));
            assert_eq!(r.status, 200, "{mode}: {r:?}");
            assert_eq!(r.header("Connection"), Some("keep-alive"), "{mode}: {r:?}");
            c.expect_eof().unwrap_or_else(|e| {
                panic!("{mode}, after {earlier} requests: the worker did not close after the client's FIN: {e}")
            });
        }
    }
}

/// Two requests in one write, the second with `Connection: close`: two
/// answers in order, then the close.
#[test]
fn pipelined_requests_are_answered_in_order() {
    for mode in MODES {
        let primary = start(mode);
        let mut c = HttpConn::connect(primary.addr).expect("connect");
        c.send(
            "GET / HTTP/1.1\r\nHost: test\r\n\r\nGET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        )
        .expect("send");
        let first = c.read_response().expect("first answer");
        let second = c.read_response().expect("second answer");
        assert_eq!(first.status, 200, "{mode}: {first:?}");
        assert_eq!(first.header("Connection"), Some("keep-alive"), "{mode}");
        assert_eq!(second.status, 200, "{mode}: {second:?}");
        assert_eq!(second.header("Connection"), Some("close"), "{mode}");
        assert_eq!(
            first.worker(),
            second.worker(),
            "{mode}: one connection, one worker"
        );
        c.expect_eof().expect("closed after the second answer");
    }
}
