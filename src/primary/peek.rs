//! Sticky keys in the first request (`--sticky header:NAME`,
//! `cookie:NAME`, `query:NAME`): connections the primary peeks at before
//! it places them.
//!
//! Owns the set of accepted connections whose key has not arrived: each is
//! registered for readability on its own token, and its first bytes are
//! read with `MSG_PEEK` (nothing consumed: the worker reads the request
//! whole), up to [`PEEK_BYTES`]. It leaves the set for the ledger's queue,
//! with its key or without one, when the request line (query) or the whole
//! head (header, cookie) is there, at end of file, past [`PEEK_BYTES`], or
//! after [`PEEK_TIMEOUT`]. The set holds at most [`MAX_PEEKING`]; beyond,
//! a connection is placed at once by the policy. Nothing here waits: the
//! event loop serves everyone else meanwhile.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::Interest;
use mio::unix::SourceFd;
use tracing::debug;

use super::event_loop::EventLoop;
use super::process::Conn;
use super::source::Source;
use super::sticky::{Peeked, peek_key};

/// The most connections waiting for their first bytes.
pub(crate) const MAX_PEEKING: usize = 1024;
/// How long a connection may take to send the start of its request.
pub(crate) const PEEK_TIMEOUT: Duration = Duration::from_millis(500);
/// The most bytes of a request looked at for its key.
pub(crate) const PEEK_BYTES: usize = 8192;

/// A connection waiting for its key.
#[derive(Debug)]
struct Waiting {
    conn: Conn,
    deadline: Instant,
}

/// The set (see the module), by token index.
#[derive(Debug, Default)]
pub(crate) struct PeekSet {
    slots: Vec<Option<Waiting>>,
    free: Vec<usize>,
    len: usize,
    buf: Vec<u8>,
}

impl PeekSet {
    /// The earliest deadline of a waiting connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        self.slots.iter().flatten().map(|w| w.deadline).min()
    }
}

impl EventLoop {
    /// With a key to peek for: the connection's key if its first bytes
    /// are there already (returned, to place now), else parked until they
    /// come (`None`). Without one, or with the set full: returned as is.
    pub(super) fn key_or_park(&mut self, mut conn: Conn) -> Option<Conn> {
        if !self.settings.sticky.as_ref().is_some_and(|s| s.peeks()) {
            return Some(conn);
        }
        match self.peek_now(&conn) {
            Peeked::Key(key) => {
                conn.key = Some(key);
                return Some(conn);
            }
            Peeked::NoKey => return Some(conn),
            Peeked::Incomplete => {}
        }
        let set = &mut self.accept.peeking;
        if set.len >= MAX_PEEKING {
            debug!(
                "sticky: {MAX_PEEKING} connections already wait for their key; placing one without"
            );
            return Some(conn);
        }
        let j = set.free.pop().unwrap_or_else(|| {
            set.slots.push(None);
            set.slots.len() - 1
        });
        if let Err(e) = self.io.poll.registry().register(
            &mut SourceFd(&conn.fd.as_raw_fd()),
            Source::Peek(j).token(),
            Interest::READABLE,
        ) {
            debug!("sticky: cannot watch a connection for its key: {e}");
            self.accept.peeking.free.push(j);
            return Some(conn);
        }
        let set = &mut self.accept.peeking;
        set.slots[j] = Some(Waiting {
            conn,
            deadline: self.now + PEEK_TIMEOUT,
        });
        set.len += 1;
        None
    }

    /// What the first bytes of `conn` say now.
    fn peek_now(&mut self, conn: &Conn) -> Peeked {
        let Some(sticky) = self.settings.sticky.as_ref() else {
            return Peeked::NoKey;
        };
        let buf = &mut self.accept.peeking.buf;
        buf.resize(PEEK_BYTES, 0);
        match crate::sys::recv_peek(conn.fd.as_fd(), buf) {
            Ok(0) => Peeked::NoKey,
            Ok(n) => match peek_key(sticky, &buf[..n]) {
                Peeked::Incomplete if n >= PEEK_BYTES => Peeked::NoKey,
                found => found,
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Peeked::Incomplete,
            Err(_) => Peeked::NoKey,
        }
    }

    /// Waiting connection `j` is readable: its key, if there now.
    pub(super) fn on_peek_readable(&mut self, j: usize) {
        // Out of the set for the look, back in after.
        let Some(w) = self.accept.peeking.slots.get_mut(j).and_then(Option::take) else {
            return;
        };
        let found = self.peek_now(&w.conn);
        self.accept.peeking.slots[j] = Some(w);
        match found {
            Peeked::Incomplete => {}
            Peeked::Key(key) => self.unpark(j, Some(key)),
            Peeked::NoKey => self.unpark(j, None),
        }
    }

    /// Waiting connection `j` leaves the set for the ledger's queue.
    fn unpark(&mut self, j: usize, key: Option<u64>) {
        let set = &mut self.accept.peeking;
        let Some(mut w) = set.slots.get_mut(j).and_then(Option::take) else {
            return;
        };
        set.free.push(j);
        set.len -= 1;
        let _ = self
            .io
            .poll
            .registry()
            .deregister(&mut SourceFd(&w.conn.fd.as_raw_fd()));
        w.conn.key = key;
        w.conn.sent = self.now;
        self.ledger.hold(w.conn);
    }

    /// Places the connections whose time is up, without a key.
    pub(super) fn peek_timers(&mut self) {
        let now = self.now;
        let late: Vec<usize> = self
            .accept
            .peeking
            .slots
            .iter()
            .enumerate()
            .filter_map(|(j, w)| w.as_ref().filter(|w| w.deadline <= now).map(|_| j))
            .collect();
        for j in late {
            debug!(
                "sticky: a connection sent no key within {PEEK_TIMEOUT:?}; placed by the policy"
            );
            self.unpark(j, None);
        }
    }

    /// Places every waiting connection as it is (shutdown, upgrade).
    pub(super) fn unpark_all(&mut self) {
        for j in 0..self.accept.peeking.slots.len() {
            if self.accept.peeking.slots[j].is_some() {
                self.unpark(j, None);
            }
        }
    }
}
