//! The workers' `NOTIFY_SOCKET`: one datagram socket of the primary on
//! which workers send systemd notifications (`READY=1`, `STATUS=...`,
//! `STOPPING=1`, `WATCHDOG=1`). It is bound at a path in a directory of
//! the primary's own, mode 0700 (under `$XDG_RUNTIME_DIR`, else the
//! temporary directory), so that only the workers' user (and root) can
//! reach it: an abstract address would be open to every local user. The
//! directory goes when the primary stops (and, if it is killed, when its
//! guardian process does). The sender is told apart by its pid, which the
//! kernel attaches (`SO_PASSCRED`), as systemd does with
//! `NotifyAccess=main`: only the worker process itself counts, not its
//! children.

use std::ffi::CString;
use std::io;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

/// The longest socket path `sockaddr_un` holds (with its final NUL).
const MAX_PATH: usize = 107;

/// The primary's socket for workers' notifications.
pub(crate) struct NotifySocket {
    sock: UnixDatagram,
    /// The socket's path, and its directory.
    path: PathBuf,
    dir: PathBuf,
}

impl NotifySocket {
    pub(crate) fn bind() -> io::Result<NotifySocket> {
        let name = format!(
            "distributor-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        );
        let bases = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain([std::env::temp_dir(), PathBuf::from("/tmp")]);
        let mut last = io::Error::other("no directory for the notify socket");
        for base in bases {
            let dir = base.join(&name);
            let path = dir.join("notify");
            if path.as_os_str().len() > MAX_PATH {
                continue;
            }
            if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                last = e;
                continue;
            }
            match UnixDatagram::bind(&path) {
                Ok(sock) => {
                    sock.set_nonblocking(true)?;
                    setsockopt(&sock, sockopt::PassCred, &true).map_err(io::Error::from)?;
                    return Ok(NotifySocket { sock, path, dir });
                }
                Err(e) => {
                    let _ = std::fs::remove_dir(&dir);
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// The value of `NOTIFY_SOCKET` for a worker.
    pub(crate) fn env_value(&self) -> &Path {
        &self.path
    }

    /// The socket's path and its directory, as C strings, for a process
    /// that removes them if the primary cannot (its guardian).
    pub(crate) fn paths(&self) -> (CString, CString) {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("a path has no NUL");
        (c(&self.path), c(&self.dir))
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

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
