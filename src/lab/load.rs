//! The lab's load generator: HTTP/1.1 `GET`s over loopback from a few
//! threads, each with its own `mio::Poll` and its share of the connections.
//!
//! It is event-driven so that it can keep hundreds of connections busy from
//! one or two threads and still leave CPU to the app it measures: the lab
//! runs 8 workers on 2 cores, and a thread per connection would compete with
//! them for the CPU and measure the scheduler instead of the app.
//!
//! Each connection runs one request at a time (no pipelining): connect
//! without blocking, write the request, parse the response head with
//! `httparse`, read the body by `Content-Length` (or to EOF when there is
//! none), record the latency, and go again until the deadline. At the
//! deadline no request is started any more; those in flight get
//! [`DRAIN_GRACE`] to finish. Errors never end the run: they are counted and
//! the connection starts over, after a backoff ([`ERROR_BACKOFF`], doubling
//! up to [`MAX_ERROR_BACKOFF`]) so that a refused port does not spin a core.
//!
//! # Short connections and `TIME_WAIT`
//!
//! With `keepalive: false` every request is a new connection, and the
//! generator closes it as soon as the response is in: the side that closes
//! first keeps the connection in `TIME_WAIT` for 60 s, so here the client's
//! ephemeral ports pile up (28 232 with the default
//! `net.ipv4.ip_local_port_range` of 32768–60999). Linux reuses them for
//! new outgoing connections when `net.ipv4.tcp_tw_reuse` is 1, or 2 (the
//! default since 4.20) and the peer is on loopback, with TCP timestamps on:
//! measured on Linux 6.18 with 2 cores, 5 s at about 32 000 connections a
//! second (160 000 connections, 126 000 sockets left in `TIME_WAIT` after
//! three such runs) gave no error. Where reuse is off, `connect` fails with
//! `EADDRNOTAVAIL` once the ports run out: that shows up as errors, not as a
//! crash. Closing with `SO_LINGER` 0 (a reset, no `TIME_WAIT`) would hide
//! the problem, and is not done.
//!
//! The generator is four files: this one, the run that joins the threads;
//! `spec.rs`, what a run is asked to do and its limits; `driver.rs`, one thread's event loop over its connections;
//! `response.rs`, the incremental response parser.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::driver::{Driver, Stats};
use super::spec::new_histogram;
pub use super::spec::{
    DRAIN_GRACE, ERROR_BACKOFF, LoadSpec, MAX_ERROR_BACKOFF, PROGRESS_EVERY, REQUEST_TIMEOUT,
    Sessions, SlowShare,
};

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests answered with a 2xx status.
    pub requests: u64,
    /// Refused, reset or timed-out connections, responses cut short by EOF,
    /// non-2xx statuses, unparsable responses, and requests still unanswered
    /// at the end of [`DRAIN_GRACE`].
    pub errors: u64,
    /// From the start to the deadline, or to the last request answered in
    /// the drain if later: the time `requests` were served in.
    pub elapsed: Duration,
    /// Latency of each 2xx request in µs: from `connect` for short
    /// connections, from its first byte written on kept-alive ones, to the
    /// last byte of the response. Values above an hour saturate.
    pub latency_us: Histogram<u64>,
    /// 2xx requests per worker id, read from bodies that contain
    /// `worker <ID>` (the demo worker's `Hello from worker 3 (pid 42)`) in
    /// their first 512 bytes; empty when no body does.
    pub per_worker: BTreeMap<u64, u64>,
}

/// Drives `spec.addr` for `spec.duration` and returns what was measured.
///
/// Blocks for about `spec.duration` (plus at most [`DRAIN_GRACE`]), calling
/// `progress(elapsed, requests_so_far)` from the calling thread about every
/// [`PROGRESS_EVERY`] and once at the end.
///
/// # Errors
/// `InvalidInput` when `connections` or `threads` is 0; otherwise only when
/// a thread or its `Poll` cannot be created. Failed requests are counted in
/// [`LoadResult::errors`], never returned.
pub fn run_load(
    spec: &LoadSpec,
    progress: &(dyn Fn(Duration, u64) + Sync),
) -> io::Result<LoadResult> {
    if spec.connections == 0 || spec.threads == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a load needs at least one connection and one thread",
        ));
    }
    let threads = spec.threads.min(spec.connections);
    let completed = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let outcomes = std::thread::scope(|s| -> io::Result<Vec<io::Result<Stats>>> {
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let conns = spec.connections / threads + usize::from(t < spec.connections % threads);
            let done_tx = done_tx.clone();
            let completed = &completed;
            let handle = std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn_scoped(s, move || {
                    // Dropped when the thread ends, even by a panic: the last
                    // one gone tells the caller's loop that all are done.
                    let _done = done_tx;
                    Driver::new(spec, conns, t as u64, completed)?.run(deadline)
                })?;
            handles.push(handle);
        }
        drop(done_tx);
        let mut next = start + PROGRESS_EVERY;
        // Nothing is ever sent: the channel disconnects when all are done.
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = done_rx.recv_deadline(next) {
            progress(start.elapsed(), completed.load(Ordering::Relaxed));
            // A late caller skips ticks rather than catching up in a burst.
            next = (next + PROGRESS_EVERY).max(Instant::now());
        }
        progress(start.elapsed(), completed.load(Ordering::Relaxed));
        Ok(handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a load thread panicked")))
            })
            .collect())
    })?;
    let mut result = LoadResult {
        requests: 0,
        errors: 0,
        elapsed: spec.duration,
        latency_us: new_histogram()?,
        per_worker: BTreeMap::new(),
    };
    let mut end = deadline;
    for stats in outcomes {
        let stats = stats?;
        result.requests += stats.requests;
        result.errors += stats.errors;
        result
            .latency_us
            .add(&stats.latency_us)
            .map_err(|e| io::Error::other(format!("merging latencies: {e:?}")))?;
        for (id, n) in stats.per_worker {
            *result.per_worker.entry(id).or_insert(0) += n;
        }
        end = end.max(stats.last_answer.unwrap_or(deadline));
    }
    result.elapsed = end.saturating_duration_since(start);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::net::SocketAddr;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// A tiny blocking HTTP server, a thread per connection, answering
    /// `Hello from worker 7 (pid 1)`; stops accepting when dropped.
    struct TestServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
    }

    impl TestServer {
        fn start() -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            listener.set_nonblocking(true).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            std::thread::spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            std::thread::spawn(move || serve(stream));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            });
            TestServer { addr, stop }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    /// Answers by path: `/` as worker 7, `/slow` as worker 8, `/close`
    /// as worker 7 with `Connection: close`, anything else 404.
    fn serve(stream: std::net::TcpStream) {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = io::BufReader::new(stream);
        loop {
            let mut close = false;
            let mut line = String::new();
            let mut request_line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == "\r\n" {
                    break;
                }
                if request_line.is_empty() {
                    request_line = line.clone();
                }
                if line.eq_ignore_ascii_case("connection: close\r\n") {
                    close = true;
                }
            }
            let (status, body) = match request_line.split(' ').nth(1) {
                Some("/") => ("200 OK", "Hello from worker 7 (pid 1)\n"),
                Some("/slow") => ("200 OK", "Hello from worker 8 (pid 1)\n"),
                Some("/close") => {
                    close = true;
                    ("200 OK", "Hello from worker 7 (pid 1)\n")
                }
                _ => ("404 Not Found", "no\n"),
            };
            let connection = if close { "close" } else { "keep-alive" };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            );
            if writer.write_all(response.as_bytes()).is_err() || close {
                return;
            }
        }
    }

    fn spec(addr: SocketAddr, keepalive: bool) -> LoadSpec {
        LoadSpec {
            addr,
            connections: 4,
            duration: Duration::from_millis(300),
            keepalive,
            path: "/".to_string(),
            threads: 2,
            slow: None,
            sessions: None,
        }
    }

    fn check_against_test_server(keepalive: bool) {
        let server = TestServer::start();
        let calls = AtomicU64::new(0);
        let started = Instant::now();
        let result = run_load(&spec(server.addr, keepalive), &|_, _| {
            calls.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(result.requests > 0);
        assert_eq!(result.errors, 0);
        assert_eq!(result.per_worker, BTreeMap::from([(7, result.requests)]));
        assert_eq!(result.latency_us.len(), result.requests);
        assert!(result.elapsed >= Duration::from_millis(300));
        assert!(calls.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn keepalive_against_a_real_server() {
        check_against_test_server(true);
    }

    #[test]
    fn short_connections_against_a_real_server() {
        check_against_test_server(false);
    }

    #[test]
    fn server_closing_kept_alive_connections_means_reconnect() {
        let server = TestServer::start();
        let mut s = spec(server.addr, true);
        s.path = "/close".to_string();
        let result = run_load(&s, &|_, _| {}).unwrap();
        assert!(result.requests > 0);
        assert_eq!(result.errors, 0);
        assert_eq!(result.per_worker, BTreeMap::from([(7, result.requests)]));
    }

    #[test]
    fn slow_share_goes_to_its_path() {
        let server = TestServer::start();
        for keepalive in [true, false] {
            let mut s = spec(server.addr, keepalive);
            s.slow = Some(SlowShare {
                path: "/slow".to_string(),
                per_mille: 250,
            });
            let result = run_load(&s, &|_, _| {}).unwrap();
            assert_eq!(result.errors, 0);
            let slow = result.per_worker.get(&8).copied().unwrap_or(0);
            let fast = result.per_worker.get(&7).copied().unwrap_or(0);
            assert_eq!(slow + fast, result.requests);
            let share = slow as f64 / result.requests as f64;
            assert!(
                result.requests > 200 && (0.1..0.4).contains(&share),
                "{slow} of {}",
                result.requests
            );
        }
    }

    #[test]
    fn non_2xx_responses_are_errors() {
        let server = TestServer::start();
        let mut s = spec(server.addr, true);
        s.path = "/missing".to_string();
        let result = run_load(&s, &|_, _| {}).unwrap();
        assert_eq!(result.requests, 0);
        assert!(result.errors > 0);
        assert!(result.latency_us.is_empty());
    }

    #[test]
    fn unanswered_requests_end_with_the_grace_as_errors() {
        // Accepted by the kernel's backlog, never answered.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let result = run_load(&spec(listener.local_addr().unwrap(), true), &|_, _| {}).unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) + DRAIN_GRACE, "{took:?}");
        assert!(took < Duration::from_millis(300) + DRAIN_GRACE + Duration::from_secs(1));
        assert_eq!(result.requests, 0);
        assert_eq!(result.errors, 4);
        // Nothing answered in the drain: the run lasted its duration.
        assert!(result.elapsed < Duration::from_millis(400));
        drop(listener);
    }

    #[test]
    fn closed_port_counts_errors_and_ends_in_time() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        for keepalive in [true, false] {
            let started = Instant::now();
            let result = run_load(&spec(addr, keepalive), &|_, _| {}).unwrap();
            assert!(started.elapsed() < Duration::from_secs(3));
            assert!(result.errors > 0);
            assert_eq!(result.requests, 0);
            assert!(result.per_worker.is_empty());
        }
    }

    #[test]
    fn zero_connections_is_invalid() {
        let mut s = spec("127.0.0.1:1".parse().unwrap(), true);
        s.connections = 0;
        let err = run_load(&s, &|_, _| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
