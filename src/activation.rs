//! systemd's conventions, for the primary and for workers alike:
//! socket activation (`LISTEN_FDS`, `LISTEN_PID`, fds from 3) and the
//! notify protocol (`NOTIFY_SOCKET`, `READY=1`, ...), see `sd_listen_fds(3)`
//! and `sd_notify(3)`.

use std::io;
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

/// Set once fd 3 has been taken as the activation socket.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening socket that socket activation passed to this very process
/// (`LISTEN_FDS` at least 1, `LISTEN_PID` unset or our pid): fd 3, set
/// close-on-exec. `None` when there is none, or it was taken already.
///
/// # Errors
/// When fd 3 is not a listening stream socket.
pub fn take_listener() -> io::Result<Option<TcpListener>> {
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
        .unwrap_or(0);
    if count == 0 {
        return Ok(None);
    }
    if let Ok(pid) = std::env::var("LISTEN_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(None);
        }
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let fd = sys::take_inherited_listener(sys::LISTEN_FD)?;
    sys::set_cloexec(fd.as_fd(), true)?;
    Ok(Some(TcpListener::from(fd)))
}

/// Sends `message` (lines of `KEY=VALUE`) to the `NOTIFY_SOCKET` of this
/// process's environment, if any, as `sd_notify(3)` does. Returns whether
/// one was sent. A path or an abstract address (`@name`) is accepted.
pub fn notify(message: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.to_string_lossy();
    let addr = match target.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes())?,
        None => UnixAddr::from_pathname(target.as_ref())?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(message.as_bytes(), &addr)?;
    Ok(true)
}

/// One notification a worker sent, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    Ready,
    Reloading,
    Stopping,
    Watchdog,
    Status(String),
}

/// The notices of one datagram; unknown keys are ignored, as systemd does.
pub(crate) fn parse(text: &str) -> impl Iterator<Item = Notice> + '_ {
    text.lines().filter_map(|line| {
        let (key, value) = line.split_once('=')?;
        match (key, value) {
            ("READY", "1") => Some(Notice::Ready),
            ("RELOADING", "1") => Some(Notice::Reloading),
            ("STOPPING", "1") => Some(Notice::Stopping),
            ("WATCHDOG", "1") => Some(Notice::Watchdog),
            ("STATUS", s) => Some(Notice::Status(s.to_string())),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_parsed_line_by_line() {
        let got: Vec<_> =
            parse("READY=1\nSTATUS=warming up\nMAINPID=3\nWATCHDOG=1\nREADY=0").collect();
        assert_eq!(
            got,
            [
                Notice::Ready,
                Notice::Status("warming up".into()),
                Notice::Watchdog
            ]
        );
    }
}
