//! Processes seen through `/proc`: liveness, environment, open fds.

use std::io;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Whether process `pid` is gone: no `/proc/PID` any more, or a zombie
/// (dead, waiting for its new parent to reap it).
pub fn pid_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // The state follows the command name, which is in parentheses.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            matches!(state, Some("Z" | "X"))
        }
    }
}

/// Waits up to `timeout` for every one of `pids` to be gone; returns those
/// still there.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| !pid_gone(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs process `pid` (a worker, by the pid its primary logged).
pub fn kill_pid(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// The environment of process `pid`, from `/proc/PID/environ`.
pub fn proc_environ(pid: u32) -> io::Result<Vec<(String, String)>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .filter_map(|v| {
            let v = String::from_utf8_lossy(v);
            v.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect())
}

/// The open fds of process `pid` and where each points (`readlink`).
pub fn proc_fds(pid: u32) -> io::Result<Vec<(i32, String)>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let target = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_else(|e| format!("<{e}>"));
        fds.push((fd, target));
    }
    fds.sort();
    Ok(fds)
}

/// The command name of process `pid` (`/proc/PID/comm`).
pub fn proc_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The CPU time (user + system) process `pid` has used, from
/// `/proc/PID/stat`, whose figures are in clock ticks of 1/100 s
/// (`USER_HZ`, fixed at 100 for user space on Linux).
pub fn proc_cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (in parentheses): state is the first,
    // utime the 12th and stime the 13th.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| io::Error::other("no command name in /proc/PID/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad /proc/{pid}/stat: {stat}")))
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}
