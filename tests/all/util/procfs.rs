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

/// The fields of `/proc/PID/stat` after the command name: index 0 is the
/// state (field 3 of proc(5)), 1 the parent pid, 11 utime, 12 stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The state letter of process `pid` (`R`, `S`, `T` for stopped, `Z`...).
pub fn proc_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The parent pid of process `pid`.
pub fn proc_ppid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The CPU time process `pid` has used, user plus system, in clock ticks
/// (`utime + stime` of `/proc/PID/stat`; usually 100 ticks a second).
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// How many fds process `pid` has open.
pub fn proc_fd_count(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The resident set size of process `pid` in KiB (`VmRSS` of
/// `/proc/PID/status`).
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The peak resident set size of process `pid` in KiB (`VmHWM` of
/// `/proc/PID/status`): the most it has held at once.
pub fn proc_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Stops process `pid` with SIGSTOP and waits (up to `timeout`) until the
/// kernel shows it stopped; returns whether it did.
pub fn stop_process(pid: u32, timeout: Duration) -> bool {
    kill_pid(pid, Signal::SIGSTOP);
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(proc_state(pid), Some('T' | 't')) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `sig` to `pid` only if it is still a child of `parent` (so that a
/// pid freed and reused meanwhile is left alone); returns whether it was
/// sent.
pub fn signal_child_of(parent: u32, pid: u32, sig: Signal) -> bool {
    if proc_ppid(pid) != Some(parent) || pid_gone(pid) {
        return false;
    }
    kill(Pid::from_raw(pid as i32), sig).is_ok()
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
