//! Process and /proc helpers shared by benches/node_cluster.rs and
//! benches/perf.rs (each includes this file as a module).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// How long a contender's primary may take to stop after SIGTERM before
/// SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long its workers may outlive it before they are SIGKILLed.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(2);

/// Makes `cmd` start in a process group of its own (so that the
/// contender's primary and its workers can be killed together) with
/// `PR_SET_PDEATHSIG` SIGTERM: if the bench dies (Ctrl-C reaches only its
/// own group), the primary gets SIGTERM and stops its workers.
pub fn own_group(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe and only sets an attribute of
    // the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Stops a contender started with [`own_group`]: SIGTERM to its primary,
/// SIGKILL to its group after [`STOP_TIMEOUT`], and SIGKILL to any process
/// it started that is still there after [`ORPHAN_GRACE`] (workers go with
/// their primary: distributor's by `PR_SET_PDEATHSIG`, nginx's and Node's
/// when their master stops them). Returns what went wrong, for the log.
pub fn stop_group(child: &mut Child) -> Vec<String> {
    let mut warnings = Vec::new();
    let pid = child.id();
    let family = descendants(pid);
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    let exited = loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break true,
            Ok(None) if Instant::now() >= deadline => break false,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    if !exited {
        warnings.push(format!(
            "pid {pid} still running {STOP_TIMEOUT:?} after SIGTERM: SIGKILL to its group"
        ));
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
    }
    let deadline = Instant::now() + ORPHAN_GRACE;
    let mut left = still_there(&family);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        left = still_there(&family);
    }
    for p in &left {
        warnings.push(format!(
            "process {} ({}) outlived the primary: SIGKILL",
            p.pid,
            p.comm.trim()
        ));
        let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
    }
    // Anything left in the group (Node's workers share it); ESRCH when
    // none is, as it should be.
    match killpg(Pid::from_raw(pid as i32), Signal::SIGKILL) {
        Ok(()) => warnings.push(format!("processes left in group {pid}: SIGKILL")),
        Err(Errno::ESRCH) => {}
        Err(e) => warnings.push(format!("killpg({pid}): {e}")),
    }
    warnings
}

/// The CPU a contender and the rest of the machine used over one run.
pub struct CpuUse {
    /// The primary's user + system time, µs.
    pub primary_us: f64,
    /// Its descendants' (the workers'), µs.
    pub workers_us: f64,
    /// What processes that are neither this bench nor the contender's
    /// used, in % of the whole machine.
    pub others_pct: f64,
    /// Wall time of the run.
    pub wall: Duration,
}

/// Runs `run` (the load) and measures, from `/proc`, the CPU time the
/// primary `pid`, its descendants, and other processes used meanwhile.
pub fn measure_cpu<T>(
    pid: u32,
    run: impl FnOnce() -> Result<T, String>,
) -> Result<(T, CpuUse), String> {
    let family: Vec<u32> = descendants(pid).iter().map(|p| p.pid).collect();
    let workers = || -> u64 { family.iter().filter_map(|&p| cpu_ticks(p)).sum() };
    let me = || cpu_ticks(std::process::id()).unwrap_or(0);
    let primary = || cpu_ticks(pid).ok_or("cannot read the primary's /proc/PID/stat");
    let machine_before = machine_busy_ticks();
    let (workers_before, me_before) = (workers(), me());
    let before = primary()?;
    let start = Instant::now();
    let result = run()?;
    let wall = start.elapsed();
    let after = primary()?;
    let (workers_after, me_after) = (workers(), me());
    let machine_after = machine_busy_ticks();
    let workers_ticks = workers_after.saturating_sub(workers_before);
    let primary_ticks = after.saturating_sub(before);
    let others_ticks = machine_after
        .saturating_sub(machine_before)
        .saturating_sub(workers_ticks)
        .saturating_sub(me_after.saturating_sub(me_before))
        .saturating_sub(primary_ticks);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let tick_us = 1e6 / clock_ticks_per_sec();
    Ok((
        result,
        CpuUse {
            primary_us: primary_ticks as f64 * tick_us,
            workers_us: workers_ticks as f64 * tick_us,
            others_pct: 100.0 * others_ticks as f64
                / clock_ticks_per_sec()
                / wall.as_secs_f64()
                / cores,
            wall,
        },
    ))
}

/// On an early return or a panic: SIGKILL to the contender's group, its
/// primary and anything it started, so that nothing survives the bench.
pub fn kill_group(child: &mut Child) {
    let family = descendants(child.id());
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
    for p in still_there(&family) {
        let _ = kill(Pid::from_raw(p.pid as i32), Signal::SIGKILL);
    }
}

/// A free port on 127.0.0.1: bound, read, released.
pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// One `GET /` on a new connection; the body when the status is 200.
pub fn probe(addr: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("unexpected response {response:?}")),
    }
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc/PID/stat`'s times (100).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as f64 } else { 100.0 }
}

/// The fields of `/proc/PID/stat` after the command name: index 0 is the
/// state (field 3 of proc(5)), 1 the parent pid, 11 utime, 12 stime, 19
/// the start time.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The CPU time the whole machine spent busy in processes, or lost to the
/// hypervisor (the first line of `/proc/stat`: user, nice, system, steal),
/// in clock ticks. Interrupt time is left out: the loopback traffic of the
/// bench itself is mostly softirq time, charged to no process.
pub fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    [0, 1, 2, 7].iter().filter_map(|&i| f.get(i)).sum()
}

/// `utime + stime` of process `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A process, told apart from a later one with the same pid by its start
/// time.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub start: String,
    pub comm: String,
}

/// Every live process below `root` (children, their children, ...).
pub fn descendants(root: u32) -> Vec<Proc> {
    let mut children: BTreeMap<u32, Vec<Proc>> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Some(f) = stat_fields(pid) else { continue };
        if matches!(f.first().map(String::as_str), Some("Z" | "X")) {
            continue;
        }
        let (Some(ppid), Some(start)) = (f.get(1).and_then(|p| p.parse().ok()), f.get(19)) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        children.entry(ppid).or_default().push(Proc {
            pid,
            start: start.clone(),
            comm,
        });
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children.remove(&p).unwrap_or_default() {
            todo.push(c.pid);
            out.push(c);
        }
    }
    out
}

/// Those of `procs` still alive (same pid, same start time, not a zombie).
pub fn still_there(procs: &[Proc]) -> Vec<Proc> {
    procs
        .iter()
        .filter(|p| {
            stat_fields(p.pid).is_some_and(|f| {
                !matches!(f.first().map(String::as_str), Some("Z" | "X"))
                    && f.get(19) == Some(&p.start)
            })
        })
        .cloned()
        .collect()
}

/// Whether process `pid` has an fd on a TCP socket listening on `port`
/// (`/proc/net/tcp{,6}`, state `0A`, matched by inode).
pub fn holds_listener(pid: u32, port: u16) -> bool {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
    })
}

/// `12345` → `12 345`, as the README writes figures.
pub fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(ch);
    }
    out
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (as far
/// as the hard limit allows); returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if limit.rlim_cur >= want {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: want.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(raised.rlim_cur)
}
