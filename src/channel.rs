//! One end of a primary–worker channel: a `SOCK_SEQPACKET` socket that
//! carries one protocol message per datagram, with fds as `SCM_RIGHTS`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// One end of a channel. Owns its fd.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
}

/// What one receive gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Recv {
    /// A datagram of this many bytes (fds pushed to the caller's vector).
    Message(usize),
    /// A whole datagram of this many bytes whose fds did not all arrive
    /// (`MSG_CTRUNC`: no room for them in this process); those that did are
    /// on the caller's vector.
    FdsCut(usize),
    /// The peer closed its end.
    Closed,
}

impl Channel {
    /// A connected pair: the first end stays here, the second goes to the
    /// child. Both close-on-exec and blocking.
    pub(crate) fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        Ok((Channel { fd: ours }, theirs))
    }

    pub(crate) fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Sends one whole message; with `dontwait`, a full buffer is
    /// `WouldBlock` and nothing was sent.
    pub(crate) fn send(
        &self,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
        dontwait: bool,
    ) -> io::Result<()> {
        let n = sys::send_with_fds(self.fd.as_fd(), data, fds, dontwait)?;
        if n != data.len() {
            // A SOCK_SEQPACKET send is all or nothing; this is defensive.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short datagram send",
            ));
        }
        Ok(())
    }

    /// Receives one message into `buf`, fds onto `fds`. A datagram that did
    /// not fit is `InvalidData` (its fds, if any arrived, are closed by the
    /// caller dropping them).
    pub(crate) fn recv(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        dontwait: bool,
    ) -> io::Result<Recv> {
        loop {
            let got = match sys::recv_with_fds(self.fd.as_fd(), buf, fds, dontwait) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The peer closed with messages of ours unread: closed too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Recv::Closed),
                other => other?,
            };
            if got.fds_cut {
                return Ok(Recv::FdsCut(got.len));
            }
            if got.truncated {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message or its fds larger than the protocol allows",
                ));
            }
            if got.len == 0 && fds.is_empty() {
                return Ok(Recv::Closed);
            }
            return Ok(Recv::Message(got.len));
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
