//! The guardian: a small process the primary forks when it starts, which
//! knows every worker's process group and kills them all when the primary
//! dies, however it dies. `PR_SET_PDEATHSIG` kills the workers themselves
//! with the primary, but not what they started (npm's app, gunicorn's
//! workers, a shell's command): those would be left running, reparented to
//! init, holding their ports. The guardian learns of each group over a pipe
//! and sees the primary's death as the pipe's end (the kernel closes the
//! write end even after `SIGKILL`); see [`crate::sys::spawn_guardian`].
//!
//! It also removes the workers' notify socket and its directory, which the
//! primary removes itself when it stops.
//!
//! While the primary lives it kills leftovers itself, when a worker is
//! reaped ([`super::process::WorkerProc::kill_leftovers`]); the guardian is
//! for the death it cannot act on. A process that leaves its worker's
//! group (`setsid`, a daemon) is out of its reach; run under a service
//! manager (systemd kills a unit's whole cgroup) for that.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use tracing::warn;

/// The guardian process, from the primary's side.
#[derive(Debug)]
pub(crate) struct Guardian {
    pipe: Option<OwnedFd>,
    pid: Pid,
    /// A record could not be written (the guardian stopped reading): said once.
    warned: bool,
}

impl Guardian {
    /// Forks the guardian. When it ends, it also removes `remove` (a file)
    /// and then `remove_dir`: the notify socket and its directory.
    pub fn start(remove: &CStr, remove_dir: &CStr) -> io::Result<Guardian> {
        let (pipe, pid) = crate::sys::spawn_guardian(Some(remove), Some(remove_dir))?;
        Ok(Guardian {
            pipe: Some(pipe),
            pid: Pid::from_raw(pid),
            warned: false,
        })
    }

    /// The guardian kills process group `pgid` if the primary dies.
    pub fn watch(&mut self, pgid: u32) {
        self.write(pgid as i32);
    }

    /// The group is gone (its leader was reaped and the rest killed).
    pub fn forget(&mut self, pgid: u32) {
        self.write(-(pgid as i32));
    }

    fn write(&mut self, record: i32) {
        let Some(pipe) = &self.pipe else {
            return;
        };
        if let Err(e) = crate::sys::write_all_once(pipe.as_fd(), &record.to_ne_bytes()) {
            if !self.warned {
                self.warned = true;
                warn!(
                    "cannot tell the guardian process (pid {}) about a worker's process group: {e}",
                    self.pid
                );
            }
        }
    }
}

impl Drop for Guardian {
    /// Closes the pipe, so the guardian kills the groups it still watches
    /// (none after a graceful stop) and exits, and reaps it.
    fn drop(&mut self) {
        self.pipe = None;
        let _ = waitpid(self.pid, None);
    }
}
