//! The plain loop: accept and pass connections to workers with no ledger
//! (the floor the primary is measured against), over `sendmsg` or io_uring.

use super::*;

/// The environment variable that makes this bench the plain-loop
/// contender, with its number of workers.
pub(crate) const PLAIN_LOOP_ENV: &str = "PERF_PLAIN_LOOP";
/// With [`PLAIN_LOOP_ENV`]: `1` for the loop over io_uring.
pub(crate) const PLAIN_LOOP_URING_ENV: &str = "PERF_PLAIN_LOOP_URING";

/// The reference the issue measures the primary against: the plainest
/// primary there is. It starts `workers` demo workers (the `distributor`
/// binary, speaking the protocol), listens on 127.0.0.1:$PORT, and on
/// each readiness of the listener accepts until `WouldBlock`, sending
/// each connection at once to the next worker in turn (one CONNECTION
/// per connection, a blocking `sendmsg` with `SCM_RIGHTS`) and closing
/// its copy right away. It keeps no ledger (a worker that dies loses what
/// it was sent), has no policy, no supervision and no metrics; it reads
/// and drops what workers send so that they never block on it. Workers
/// are told to send no completion reports. With `uring`, the loop is
/// [`uring_loop::run`] over the same workers.
pub(crate) fn plain_loop(workers: usize, uring: bool) -> Result<(), String> {
    use distributor::__private::{send_with_fds, seqpacket_pair};
    use distributor::protocol::{Encoder, MAX_MESSAGE};
    use mio::net::TcpListener;
    use mio::{Events, Interest, Poll, Token};
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::{AsFd, AsRawFd};

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or("PORT is not set")?;
    let workers = workers.max(1);
    // Blocking until the mio loop takes it: io_uring waits for a
    // connection on a blocking listener rather than failing with EAGAIN.
    let std_listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| format!("bind: {e}"))?;
    let mut channels = Vec::with_capacity(workers);
    let mut children = Vec::with_capacity(workers);
    for id in 1..=workers {
        let (ours, theirs) = seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
        // Inherited by this worker only: close-on-exec is cleared for the
        // spawn and the parent's copy closed right after.
        fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| format!("fcntl: {e}"))?;
        let child = Command::new(DISTRIBUTOR)
            .env(distributor::demo::DEMO_WORKER_ENV, "1")
            .env("DISTRIBUTOR_FD", theirs.as_raw_fd().to_string())
            .env("DISTRIBUTOR_PROTOCOL", "1")
            .env("DISTRIBUTOR_WORKER_ID", id.to_string())
            .env("DISTRIBUTOR_REPORT_FINISHED", "0")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("worker: {e}"))?;
        children.push(child);
        drop(theirs);
        // Blocking: a send waits for room, as the plainest loop does;
        // receives use MSG_DONTWAIT.
        channels.push(ours);
    }
    if uring {
        // SIGTERM or SIGINT: a byte on this pair, which the ring polls.
        let (stop_rx, stop_tx) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        for sig in [libc::SIGTERM, libc::SIGINT] {
            signal_hook::low_level::pipe::register(
                sig,
                stop_tx.try_clone().map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("signals: {e}"))?;
        }
        let result = uring_loop::run(&std_listener, &channels, stop_rx.as_raw_fd(), port);
        drop(channels);
        for mut c in children {
            let _ = c.wait();
        }
        return result;
    }
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut listener = TcpListener::from_std(std_listener);
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    pub(crate) const LISTENER: Token = Token(usize::MAX);
    pub(crate) const SIGNALS: Token = Token(usize::MAX - 1);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    // SIGTERM: close the channels, so that the workers exit, and reap them.
    let mut signals = signal_hook_mio::v1_0::Signals::new([libc::SIGTERM, libc::SIGINT])
        .map_err(|e| format!("signals: {e}"))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    for (i, c) in channels.iter().enumerate() {
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&c.as_raw_fd()),
                Token(i),
                Interest::READABLE,
            )
            .map_err(|e| e.to_string())?;
    }
    let mut enc = Encoder::default();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let mut events = Events::with_capacity(256);
    let (mut next, mut id, mut hellos) = (0usize, 0u64, 0usize);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for event in events.iter() {
            if event.token() == SIGNALS {
                drop(channels);
                for mut c in children {
                    let _ = c.wait();
                }
                return Ok(());
            }
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            id += 1;
                            enc.connection().entry(id, peer);
                            let channel = channels[next].as_fd();
                            next = (next + 1) % channels.len();
                            send_with_fds(channel, enc.as_bytes(), &[stream.as_fd()], false)
                                .map_err(|e| format!("send: {e}"))?;
                            drop(stream);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                }
            } else {
                let channel = channels[event.token().0].as_fd();
                drain_channel(channel, &mut buf, &mut fds, &mut hellos, workers, port)?;
            }
        }
    }
}

/// What the plain loops do with what a worker sends: read all there is
/// (`WouldBlock` ends it) and drop it, counting HELLOs in `hellos` and
/// saying `plain loop: N workers ready` once all `workers` have said it.
/// An error when the worker closed its channel.
pub(crate) fn drain_channel(
    channel: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
    hellos: &mut usize,
    workers: usize,
    port: u16,
) -> Result<(), String> {
    loop {
        fds.clear();
        match distributor::__private::recv_with_fds(channel, buf, fds, true) {
            Ok(got) if got.len == 0 && fds.is_empty() => {
                return Err("a worker closed its channel".into());
            }
            Ok(got) => {
                if buf.first() == Some(&0x80) && got.len == 3 {
                    *hellos += 1;
                    if *hellos == workers {
                        eprintln!("plain loop: {workers} workers ready on 127.0.0.1:{port}");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
}
