//! `cargo bench --bench scale`: the primary's CPU per connection as the
//! number of workers grows. For each primary-side policy (rr, least-conn,
//! p2c) and each number of workers (2, 64 and 256 by default), it starts
//! `distributor --workers N --sched MODE` with the built-in demo worker,
//! drives it with the lab's load generator (64 connections, one request
//! each), and reads the primary's CPU time from `/proc/PID/stat`. The
//! numbers of workers alternate within each round, and the medians of the
//! rounds are compared: the goal is that at 256 workers a connection costs
//! the primary at most 1.25× what it costs at 2 (the placement looks at
//! every worker that can take one; this says what that costs).
//!
//! Settings: `SCALE_WORKERS` (comma-separated, default `2,64,256`),
//! `SCALE_MODES` (default `rr,least-conn,p2c`), `SCALE_SECONDS` (measured
//! seconds per run, default 3), `SCALE_ROUNDS` (default 3),
//! `SCALE_CONNECTIONS` (default 64), `SCALE_BASELINE` (another
//! `distributor` binary, an older build, run as the same contenders in the
//! same rounds, labelled `base`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use distributor::lab::load::{self, LoadSpec};

#[path = "common/procs.rs"]
mod procs;
use procs::*;

const DISTRIBUTOR: &str = env!("CARGO_BIN_EXE_distributor");
/// At most this much more CPU per connection at the largest number of
/// workers than at the smallest.
const GOAL: f64 = 1.25;

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A primary with `workers` demo workers in `mode`, ready.
struct Primary {
    child: Child,
    addr: SocketAddr,
}

impl Primary {
    fn start(bin: &str, workers: usize, mode: &str) -> Result<Primary, String> {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--workers", &workers.to_string(), "--sched", mode])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        own_group(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let all = format!(" ready: {workers} of {workers} slots ready");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(&all) {
                    let _ = tx.send(());
                }
            }
        });
        let mut primary = Primary {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            primary.stop();
            return Err(format!("{workers} workers were not ready in 120 s"));
        }
        Ok(primary)
    }

    fn stop(&mut self) {
        for w in stop_group(&mut self.child) {
            eprintln!("scale: {w}");
        }
    }
}

/// The primary's CPU per connection over one run, µs.
fn run(primary: &Primary, seconds: u64, connections: usize) -> Result<(f64, u64), String> {
    let spec = |duration| LoadSpec {
        addr: primary.addr,
        connections,
        duration,
        keepalive: false,
        path: "/".into(),
        threads: 2,
        slow: None,
        sessions: None,
    };
    load::run_load(&spec(Duration::from_millis(500)), &|_, _| {}).map_err(|e| e.to_string())?;
    let (result, cpu) = measure_cpu(primary.child.id(), || {
        load::run_load(&spec(Duration::from_secs(seconds)), &|_, _| {}).map_err(|e| e.to_string())
    })?;
    if result.requests == 0 {
        return Err("no request was answered".into());
    }
    Ok((cpu.primary_us / result.requests as f64, result.requests))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let workers: Vec<usize> = setting("SCALE_WORKERS", "2,64,256")
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    let mut modes: Vec<String> = setting("SCALE_MODES", "rr,least-conn,p2c")
        .split(',')
        .map(|m| m.trim().to_string())
        .collect();
    // `base MODE`: the same mode, run by the baseline build.
    let baseline = std::env::var("SCALE_BASELINE").ok();
    if baseline.is_some() {
        // Each mode beside its baseline, so that both see the same minutes.
        modes = modes
            .into_iter()
            .flat_map(|m| [format!("base {m}"), m])
            .collect();
    }
    let seconds: u64 = setting("SCALE_SECONDS", "3").parse().unwrap_or(3);
    let rounds: usize = setting("SCALE_ROUNDS", "3").parse().unwrap_or(3);
    let connections: usize = setting("SCALE_CONNECTIONS", "64").parse().unwrap_or(64);
    let most = workers.iter().copied().max().unwrap_or(2);
    if let Err(e) = raise_nofile((most as u64) * 8 + 4096) {
        eprintln!("scale: cannot raise the fd limit: {e}");
    }
    let started = Instant::now();
    // (mode, workers) -> µs per connection, one per round.
    let mut per_conn: BTreeMap<(String, usize), Vec<f64>> = BTreeMap::new();
    let mut served: BTreeMap<(String, usize), u64> = BTreeMap::new();
    for round in 0..rounds {
        for mode in &modes {
            // Alternate the order of the sizes from one round to the next.
            let mut order = workers.clone();
            if round % 2 == 1 {
                order.reverse();
            }
            for &n in &order {
                let (bin, sched) = match mode.strip_prefix("base ") {
                    Some(m) => (baseline.as_deref().expect("set above"), m),
                    None => (DISTRIBUTOR, mode.as_str()),
                };
                let mut primary = match Primary::start(bin, n, sched) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("scale: {mode} with {n} workers: {e}");
                        std::process::exit(1);
                    }
                };
                let outcome = run(&primary, seconds, connections);
                primary.stop();
                match outcome {
                    Ok((us, requests)) => {
                        eprintln!(
                            "scale: round {}, {mode}, {n} workers: {us:.1} µs per connection",
                            round + 1
                        );
                        per_conn.entry((mode.clone(), n)).or_default().push(us);
                        *served.entry((mode.clone(), n)).or_default() += requests;
                    }
                    Err(e) => {
                        eprintln!("scale: {mode} with {n} workers: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("## The primary's CPU per connection by number of workers\n");
    println!(
        "{connections} connections, one request each, {seconds} s per run, {rounds} rounds \
         (medians; sizes alternating), the built-in demo worker, {cores} cores.\n"
    );
    print!("| mode |");
    for n in &workers {
        print!(" {n} workers, µs/conn |");
    }
    println!(" {most} / {} workers | goal ≤ {GOAL:.2}× |", workers[0]);
    print!("|---|");
    for _ in &workers {
        print!("---|");
    }
    println!("---|---|");
    let mut all_met = true;
    for mode in &modes {
        print!("| {mode} |");
        let med = |n: usize| {
            median(
                per_conn
                    .get(&(mode.clone(), n))
                    .cloned()
                    .unwrap_or_default(),
            )
        };
        for &n in &workers {
            let rounds = per_conn
                .get(&(mode.clone(), n))
                .map(|v| {
                    v.iter()
                        .map(|x| format!("{x:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            print!(" **{:.1}** ({rounds}) |", med(n));
        }
        let ratio = med(most) / med(workers[0]);
        let met = ratio <= GOAL;
        all_met &= met;
        println!(
            " {ratio:.2}× | {} |",
            if met { "met" } else { "**not met**" }
        );
    }
    println!(
        "\n{} connections served in all; the whole bench took {:.0} s.",
        served.values().sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    if !all_met {
        println!("\nNot met: see the rounds; this VM's figures drift by tens of percent.");
    }
}
