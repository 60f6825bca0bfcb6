//! The workers' `NOTIFY_SOCKET`: one datagram socket of the primary, at an
//! abstract address, on which any worker can send systemd notifications
//! (`READY=1`, `STATUS=...`, `STOPPING=1`, `WATCHDOG=1`). The sender is
//! told apart by its pid, which the kernel attaches (`SO_PASSCRED`), as
//! systemd does with `NotifyAccess=main`: only the worker process itself
//! counts, not its children.

use std::io;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

/// The primary's socket for workers' notifications.
pub(crate) struct NotifySocket {
    sock: UnixDatagram,
    name: String,
}

impl NotifySocket {
    pub(crate) fn bind() -> io::Result<NotifySocket> {
        let name = format!(
            "distributor/{}/{:016x}",
            std::process::id(),
            fastrand::u64(..)
        );
        let sock = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
        sock.set_nonblocking(true)?;
        setsockopt(&sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
        Ok(NotifySocket { sock, name })
    }

    /// The value of `NOTIFY_SOCKET` for a worker.
    pub(crate) fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    /// One datagram and its sender's pid; `None` when nothing waits.
    pub(crate) fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<Option<(u32, &'b str)>> {
        let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let (len, pid) = {
            let mut iov = [IoSliceMut::new(buf)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut pid = 0;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmCredentials(cred) = c {
                    pid = cred.pid() as u32;
                }
            }
            (msg.bytes, pid)
        };
        Ok(Some((pid, std::str::from_utf8(&buf[..len]).unwrap_or(""))))
    }
}
