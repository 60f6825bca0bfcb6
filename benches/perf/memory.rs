//! The memory phase: the primary's RSS with kept-alive connections open
//! and over many short ones.

use super::*;

/// What the memory phase measured: the primary's RSS (KiB) at each step.
pub(crate) struct Memory {
    pub(crate) workers: usize,
    /// After the start and a warm-up.
    pub(crate) rss_start: u64,
    /// After each second of the long run.
    pub(crate) rss_chunks: Vec<u64>,
    /// Short connections served in the long run, errors, seconds.
    pub(crate) long_requests: u64,
    pub(crate) long_errors: u64,
    pub(crate) long_secs: f64,
    /// The primary's CPU over the long run, µs.
    pub(crate) long_cpu_us: f64,
    /// The most CPU other processes used during the long run, %.
    pub(crate) long_others_pct: f64,
    /// Kept-alive connections asked for, and those opened and answered.
    pub(crate) idle_wanted: usize,
    pub(crate) idle_open: usize,
    /// The first failure opening them, if any, and how many failed.
    pub(crate) idle_error: Option<String>,
    pub(crate) idle_failed: usize,
    /// Why fewer were asked for than `PERF_IDLE_CONNECTIONS`.
    pub(crate) idle_note: Option<String>,
    /// With them open: the primary's RSS and open fds, the workers' RSS
    /// all together (KiB).
    pub(crate) rss_idle: u64,
    pub(crate) fds_idle: usize,
    pub(crate) workers_rss_idle: u64,
    /// After they were closed.
    pub(crate) rss_after: u64,
}

/// `rr`, [`MEMORY_WORKERS`] demo workers: RSS after a warm-up, over a long
/// run of short connections, with many kept-alive connections open, and
/// after they close.
pub(crate) fn memory_phase(s: &Settings, log: &Path) -> Result<Memory, String> {
    // Every kept-alive connection is an fd here (and one in a worker): raise
    // the soft limit first, so that the primary and workers inherit it.
    let wanted = s.idle_connections;
    let (idle_wanted, idle_note) = match raise_nofile(wanted as u64 + 256) {
        Ok(limit) if limit >= wanted as u64 + 256 => (wanted, None),
        Ok(limit) => {
            let n = (limit as usize).saturating_sub(256);
            (
                n,
                Some(format!(
                    "RLIMIT_NOFILE's hard limit is {limit}: {n} connections instead of {wanted}"
                )),
            )
        }
        Err(e) => (wanted, Some(format!("setrlimit: {e}"))),
    };
    let program = Program::Distributor {
        sched: "rr",
        node: false,
        baseline: false,
    };
    let dir = log.parent().unwrap_or(Path::new("."));
    let mut server = Server::start(s, program, MEMORY_WORKERS, log, dir)?;
    let outcome = (|| -> Result<Memory, String> {
        server.wait_ready()?;
        let pid = server.pid();
        let rss = || vm_rss_kib(pid).ok_or("cannot read the primary's /proc/PID/status");
        // Warm-up: both loads, so that what grows once has grown.
        for load in [Load::Close, Load::KeepAlive] {
            let mut spec = server.spec(s, load, s.warmup.max(Duration::from_millis(300)));
            spec.threads = LOAD_THREADS;
            load::run_load(&spec, &|_, _| {}).map_err(|e| format!("load generator: {e}"))?;
        }
        std::thread::sleep(Duration::from_millis(100));
        let rss_start = rss()?;
        eprintln!("  primary RSS after the warm-up: {rss_start} KiB");

        // The long run, one second at a time.
        let mut rss_chunks = Vec::new();
        let (mut long_requests, mut long_errors) = (0u64, 0u64);
        let (mut long_secs, mut long_cpu_us, mut long_others_pct) = (0.0, 0.0, 0.0f64);
        let long_start = Instant::now();
        while long_requests < s.long_connections && long_start.elapsed() < LONG_CAP {
            let spec = server.spec(s, Load::Close, LONG_CHUNK);
            let sample = server.measure_spec(&spec)?;
            long_requests += sample.result.requests;
            long_errors += sample.result.errors;
            long_secs += sample.wall.as_secs_f64();
            long_cpu_us += sample.cpu_us;
            long_others_pct = long_others_pct.max(sample.others_pct);
            rss_chunks.push(rss()?);
        }
        eprintln!(
            "  long run: {long_requests} short connections in {long_secs:.1} s, {long_errors} errors; primary RSS {} KiB after the first second, {} KiB at the end",
            rss_chunks.first().copied().unwrap_or(0),
            rss_chunks.last().copied().unwrap_or(0)
        );

        // Kept-alive connections, opened one by one, each answered once.
        let mut open = Vec::with_capacity(idle_wanted);
        let mut idle_error = None;
        let mut idle_failed = 0;
        for _ in 0..idle_wanted {
            match open_kept_alive(server.addr) {
                Ok(stream) => open.push(stream),
                Err(e) => {
                    idle_failed += 1;
                    idle_error.get_or_insert(e);
                    if idle_failed >= 100 {
                        break;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let rss_idle = rss()?;
        let fds_idle = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let workers_rss_idle = descendants(pid)
            .iter()
            .filter_map(|p| vm_rss_kib(p.pid))
            .sum();
        let idle_open = open.len();
        eprintln!(
            "  {idle_open} kept-alive connections open ({idle_failed} failed): primary RSS {rss_idle} KiB, {fds_idle} fds"
        );
        drop(open);
        std::thread::sleep(Duration::from_millis(500));
        let rss_after = rss()?;
        Ok(Memory {
            workers: MEMORY_WORKERS,
            rss_start,
            rss_chunks,
            long_requests,
            long_errors,
            long_secs,
            long_cpu_us,
            long_others_pct,
            idle_wanted,
            idle_open,
            idle_error,
            idle_failed,
            idle_note,
            rss_idle,
            fds_idle,
            workers_rss_idle,
            rss_after,
        })
    })();
    for w in server.stop() {
        eprintln!("  memory phase: {w}");
    }
    outcome
}

/// A new connection with one keep-alive `GET /` answered on it, left open.
pub(crate) fn open_kept_alive(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf)));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("unexpected response {text:?}"));
        }
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
        if body.len() >= length {
            return Ok(stream);
        }
    }
}

/// `VmRSS` of `/proc/PID/status`, KiB.
pub(crate) fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
