//! A Node worker's channel: one end of an `AF_UNIX` `SOCK_STREAM`
//! socketpair carrying JSON lines, fds riding as `SCM_RIGHTS` on the
//! `sendmsg` of their line (Node's `NODE_CHANNEL_FD`).
//!
//! A stream socket may take part of a line: the rest waits in `out` and
//! goes first when the socket is writable again, so lines never interleave.
//! Reads may hold part of a line or several: `inbuf` keeps what was read
//! until its newline arrives.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// The longest line read from a worker: an app's `process.send()` may be
/// large, but not without bound.
pub(crate) const MAX_LINE: usize = 16 << 20;
/// The most bytes waiting to be written to one worker: more is refused.
const MAX_QUEUED: usize = 16 << 20;

/// Bytes still to write, and the fd that goes with their first byte.
#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
}

#[derive(Debug)]
pub(crate) struct NodeLink {
    fd: OwnedFd,
    /// Read and not yet split into lines.
    pub(crate) inbuf: Vec<u8>,
    out: VecDeque<Outgoing>,
    queued: usize,
    /// Fds sent in `NODE_HANDLE` lines whose `NODE_HANDLE_ACK` (or NACK)
    /// has not come, oldest first: connection ids, 0 for a listening socket.
    pub(crate) handles: VecDeque<u64>,
}

/// What a read found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// Bytes were added to `inbuf`.
    Data,
    /// The worker closed its end.
    Closed,
}

impl NodeLink {
    /// A connected pair: the link, and the worker's end.
    pub(crate) fn pair() -> io::Result<(NodeLink, OwnedFd)> {
        let (ours, theirs) = sys::stream_pair()?;
        sys::set_nonblocking(ours.as_fd(), true)?;
        Ok((
            NodeLink {
                fd: ours,
                inbuf: Vec::new(),
                out: VecDeque::new(),
                queued: 0,
                handles: VecDeque::new(),
            },
            theirs,
        ))
    }

    /// Whether earlier lines still wait to be written.
    pub(crate) fn blocked(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes `line` (with its newline) and `fd` now if the socket takes
    /// some of it; else `WouldBlock` and nothing was sent or kept. For
    /// connections, which the caller would rather give another worker.
    pub(crate) fn send_now(&mut self, line: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if self.blocked() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let fds: &[BorrowedFd<'_>] = match &fd {
            Some(fd) => std::slice::from_ref(fd),
            None => &[],
        };
        let n = sys::send_with_fds(self.fd.as_fd(), line, fds, true)?;
        if n < line.len() {
            self.keep(line[n..].to_vec(), None);
        }
        Ok(())
    }

    /// Writes `line` and `fd`, keeping what the socket does not take for
    /// later (the fd duplicated). Fails only when the worker's channel is
    /// broken or more than [`MAX_QUEUED`] bytes wait already.
    pub(crate) fn send(&mut self, line: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if !self.blocked() {
            match self.send_now(line, fd) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
        if self.queued + line.len() > MAX_QUEUED {
            return Err(io::Error::other("more than 16 MiB wait to be written"));
        }
        let fd = fd.map(|f| f.try_clone_to_owned()).transpose()?;
        self.keep(line.to_vec(), fd);
        Ok(())
    }

    fn keep(&mut self, bytes: Vec<u8>, fd: Option<OwnedFd>) {
        self.queued += bytes.len();
        self.out.push_back(Outgoing { bytes, fd });
    }

    /// Writes what waits, as far as the socket takes it.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while let Some(o) = self.out.front_mut() {
            let fds: Vec<BorrowedFd<'_>> = o.fd.iter().map(AsFd::as_fd).collect();
            let n = match sys::send_with_fds(self.fd.as_fd(), &o.bytes, &fds, true) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                other => other?,
            };
            self.queued -= n;
            if n < o.bytes.len() {
                o.bytes.drain(..n);
                o.fd = None;
                return Ok(());
            }
            self.out.pop_front();
        }
        Ok(())
    }

    /// Reads once into `inbuf` (through `scratch`), fds onto `fds`;
    /// `WouldBlock` when nothing waits.
    pub(crate) fn read(&mut self, scratch: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<Read> {
        loop {
            let got = match sys::recv_with_fds(self.fd.as_fd(), scratch, fds, true) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Read::Closed),
                other => other?,
            };
            if got.len == 0 && fds.is_empty() {
                return Ok(Read::Closed);
            }
            if self.inbuf.len() + got.len > MAX_LINE && !scratch[..got.len].contains(&b'\n') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a line longer than 16 MiB",
                ));
            }
            self.inbuf.extend_from_slice(&scratch[..got.len]);
            return Ok(Read::Data);
        }
    }
}

impl AsFd for NodeLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn lines_cross_a_full_socket_whole_and_in_order() {
        let (mut link, theirs) = NodeLink::pair().unwrap();
        let mut peer = UnixStream::from(theirs);
        let line = vec![b'x'; 100_000];
        let mut sent = 0;
        // Fill the socket until a line is kept.
        while !link.blocked() {
            let mut l = line.clone();
            l.push(b'\n');
            link.send(&l, None).unwrap();
            sent += 1;
        }
        link.send(b"last\n", None).unwrap();
        assert!(matches!(
            link.send_now(b"conn\n", None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        ));
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut peer, &mut all).unwrap();
            all
        });
        while link.blocked() {
            link.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(link);
        let all = reader.join().unwrap();
        let lines: Vec<&[u8]> = all.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), sent + 2);
        assert!(lines[..sent].iter().all(|l| l.len() == 100_000));
        assert_eq!(lines[sent], b"last");
    }
}
