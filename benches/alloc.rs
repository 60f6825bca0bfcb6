//! `cargo bench --bench alloc`: shows that the primary allocates nothing
//! per connection on its hot path (accept, hand-over, acknowledgement,
//! close).
//!
//! This process is the primary (the library's `Primary`, in `rr` with the
//! built-in demo workers of the `distributor` binary) under a counting
//! global allocator. The load comes from a child process (this bench
//! started again as the client), so its allocations are not counted. After
//! a warm-up that lets every reused buffer and table reach its size, it
//! counts the allocations this process makes (the primary's, the client
//! process being started beforehand) over many short connections,
//! then over as many kept-alive connections opened and closed, and prints
//! allocations per connection (the goal is 0; a figure above 0.001 fails
//! the bench with exit 1). Settings: `ALLOC_CONNECTIONS` (default 100000),
//! `ALLOC_WORKERS` (default 2), `ALLOC_CLIENTS` (client threads, default 32).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distributor::{Primary, Sched, WorkerCommand};

/// Counts every allocation and reallocation of this process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed through to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CLIENT_ENV: &str = "ALLOC_BENCH_CLIENT";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(CLIENT_ENV) {
        return client(&spec);
    }
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("alloc: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the client process does, as `ADDR,CONNECTIONS,THREADS,KEEPALIVE`.
fn client(spec: &str) -> ExitCode {
    let parts: Vec<&str> = spec.split(',').collect();
    let (Some(addr), Some(n), Some(threads), Some(keepalive)) = (
        parts.first().and_then(|a| a.parse::<SocketAddr>().ok()),
        parts.get(1).and_then(|n| n.parse::<usize>().ok()),
        parts.get(2).and_then(|n| n.parse::<usize>().ok()),
        parts.get(3).map(|k| *k == "1"),
    ) else {
        eprintln!("alloc client: bad spec {spec:?}");
        return ExitCode::FAILURE;
    };
    // Wait for the go (see `Client`).
    let mut go = [0u8; 1];
    if std::io::stdin().read_exact(&mut go).is_err() {
        eprintln!("alloc client: no go on standard input");
        return ExitCode::FAILURE;
    }
    let failed = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let count = n / threads + usize::from(t < n % threads);
            let failed = &failed;
            s.spawn(move || {
                for _ in 0..count {
                    if one_connection(addr, keepalive).is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("alloc client: {failed} of {n} connections failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// One connection: with `keepalive`, two requests on it, else one with
/// `Connection: close`; each answer must be a 200.
fn one_connection(addr: SocketAddr, keepalive: bool) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 1024];
    let rounds = if keepalive { 2 } else { 1 };
    for r in 0..rounds {
        let last = r + 1 == rounds;
        let req: &[u8] = if last {
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        };
        s.write_all(req)?;
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            // The demo's answers are small, with a Content-Length: done at
            // the end of the body.
            if let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&got[..head]);
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if got.len() >= head + 4 + len {
                    break;
                }
            }
        }
        if !got.starts_with(b"HTTP/1.1 200") {
            return Err(std::io::Error::other("not a 200"));
        }
    }
    Ok(())
}

/// A client process for `n` connections, started and waiting for its go
/// (a byte on its standard input): starting a process allocates in this
/// one, which is not the primary's doing.
struct Client(std::process::Child);

impl Client {
    fn start(
        addr: SocketAddr,
        n: usize,
        threads: usize,
        keepalive: bool,
    ) -> Result<Client, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        Command::new(exe)
            .env(
                CLIENT_ENV,
                format!("{addr},{n},{threads},{}", u8::from(keepalive)),
            )
            .stdin(Stdio::piped())
            .spawn()
            .map(Client)
            .map_err(|e| format!("client: {e}"))
    }

    /// Lets it go and waits for it to finish.
    fn run(mut self) -> Result<Duration, String> {
        let started = Instant::now();
        let mut stdin = self.0.stdin.take().ok_or("no stdin")?;
        stdin.write_all(b"g").map_err(|e| format!("client: {e}"))?;
        drop(stdin);
        let status = self.0.wait().map_err(|e| format!("client: {e}"))?;
        if !status.success() {
            return Err(format!("the client failed ({status})"));
        }
        Ok(started.elapsed())
    }
}

/// Runs a client process for `n` connections and waits for it.
fn load(addr: SocketAddr, n: usize, threads: usize, keepalive: bool) -> Result<Duration, String> {
    Client::start(addr, n, threads, keepalive)?.run()
}

/// One phase: a warm-up of `connections / 5` (tables and buffers grow to
/// the size this load needs), then `connections` counted. Returns the
/// allocations and bytes this process made meanwhile, and how long it took.
fn count(
    addr: SocketAddr,
    connections: usize,
    threads: usize,
    keepalive: bool,
) -> Result<(u64, u64, Duration), String> {
    load(addr, connections / 5, threads, keepalive)?;
    let client = Client::start(addr, connections, threads, keepalive)?;
    let (a0, b0) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    let took = client.run()?;
    let (a1, b1) = (
        ALLOCATIONS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    Ok((a1 - a0, b1 - b0, took))
}

fn run() -> Result<bool, String> {
    let connections = setting("ALLOC_CONNECTIONS", 100_000).max(1000);
    let workers = setting("ALLOC_WORKERS", 2).max(1);
    let threads = setting("ALLOC_CLIENTS", 32).max(1);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let demo = WorkerCommand::new(env!("CARGO_BIN_EXE_distributor"), Vec::<String>::new())
        .env(distributor::demo::DEMO_WORKER_ENV, "1");
    let primary = Primary::builder()
        .workers(workers)
        .listener(listener)
        .sched(Sched::RoundRobin)
        .command(demo)
        .handle_signals(false)
        .build()
        .map_err(|e| format!("primary: {e}"))?;
    let addr = primary.local_addr();
    let handle = primary.handle();
    let runner = std::thread::spawn(move || primary.run());

    println!("## Allocations of the primary per connection\n");
    println!(
        "{workers} demo workers, rr, {threads} client threads in another process, {connections} connections per phase after a warm-up of {} of each kind.\n",
        connections / 5
    );
    println!("| phase | connections | allocations | bytes | per connection | seconds |");
    println!("|---|---|---|---|---|---|");
    let phases = [
        ("short (one request each)", false),
        ("kept alive (two requests each)", true),
    ];
    let result: Result<Vec<bool>, String> = phases
        .into_iter()
        .map(|(name, keepalive)| {
            let (allocations, bytes, took) = count(addr, connections, threads, keepalive)?;
            let per = allocations as f64 / connections as f64;
            println!(
                "| {name} | {connections} | {allocations} | {bytes} | {per:.4} | {:.1} |",
                took.as_secs_f64()
            );
            Ok(per <= 0.001)
        })
        .collect();
    handle.shutdown().map_err(|e| format!("shutdown: {e}"))?;
    match runner.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("primary: {e}")),
        Err(_) => return Err("the primary's thread panicked".into()),
    }
    let ok = result?.iter().all(|&ok| ok);
    println!(
        "\nGoal: no allocation per connection (at most 0.001 per connection, for timers and logs): {}",
        if ok { "met" } else { "NOT met" }
    );
    Ok(ok)
}
