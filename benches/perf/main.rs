//! `cargo bench --bench perf`: the performance table in one command. The
//! `distributor` binary with its built-in demo worker in each mode, nginx
//! serving the same kind of response with the same number of workers, and
//! (when `node` is installed) Node's cluster primary against this one on
//! the same Node app, all in one run with the contenders alternating; then
//! the primary's memory. It prints markdown tables with the machine's
//! description, the settings, and each target with its ratio and whether
//! it was met.
//!
//! What it measures:
//!
//! - **Throughput**, one request per connection (`Connection: close`) and
//!   keep-alive: `distributor --workers N --sched MODE --listen ADDR` (no
//!   command: the demo worker) in every mode, and nginx (`worker_processes
//!   N`, `listen ... reuseport`, `return 200 "Hello from nginx\n"`, a
//!   minimal `nginx.conf` written next to the logs). Requests/s is the
//!   median of the rounds; the ratios (rr against reuseport, ours against
//!   nginx) are ratios of those medians, with the range of the per-round
//!   ratios beside them.
//! - **Added latency** at one connection at a time (short connections):
//!   the p50 of `rr` against the p50 of `reuseport`, pooled over rounds.
//! - **Primary CPU per dispatched connection**: `utime + stime` of the
//!   primary (`/proc/PID/stat`) over the short-connection runs, divided by
//!   the connections served, for `rr`, `least-conn` and `p2c` (pooled over
//!   rounds; flagged when fewer than 100 000), and over the long run below.
//! - **Primary memory** (`VmRSS` of `/proc/PID/status`), `rr` with 8
//!   workers: after a warm-up; after a long run of short connections
//!   (`PERF_LONG_CONNECTIONS`, in 1 s runs, RSS read after each: it should
//!   stay flat); with `PERF_IDLE_CONNECTIONS` kept-alive connections open
//!   (plain `TcpStream`s from this process, one request each so that every
//!   one is known served; the soft `RLIMIT_NOFILE` is raised, within the
//!   hard limit, when it is too low); and after they are closed.
//! - **The plain loop**: the reference the primary is measured against,
//!   this bench started again as the plainest primary (accept until
//!   `WouldBlock`; for each connection one `sendmsg` with `SCM_RIGHTS` to
//!   the next demo worker, blocking, and a `close` at once; no ledger, no
//!   policy, no supervision): its CPU per connection beside rr's.
//! - **The plain loop over io_uring** (`uring-loop`): the same loop with
//!   its accepts (one multishot accept), sends and closes (each send
//!   hard-linked to its close) going through one ring, completions reaped
//!   only when it waits ([`uring_loop`]): io_uring weighed as a lever, its
//!   CPU per connection against the plain loop's.
//! - **Node apps** (when `node` is on PATH): the unmodified
//!   [benches/node/app.js](node/app.js) under Node's cluster primary
//!   (`rr`) and under `distributor --sched rr`, short connections only.
//!   `cargo bench --bench node_cluster` has the full comparison.
//!
//! Process handling is shared with `benches/node_cluster.rs`
//! (`benches/common/procs.rs`): each contender gets a
//! fresh primary and workers on a free port, in a process group of its own,
//! with `PR_SET_PDEATHSIG` (SIGTERM) so that nothing outlives the bench; a
//! warm-up that is not counted before each measured run; SIGTERM, then
//! SIGKILL to the group and to anything it started that is still there.
//! Rounds alternate the order (A B C, then C B A) so that drift in the
//! machine hits every contender alike. The CPU that other processes use
//! during each run is measured (from `/proc/stat` less this bench's and the
//! contender's); a run where they took more than [`BUSY_PCT`] % of the
//! machine is measured again, and the table says so when they still did.
//!
//! On a small machine a run's figure also depends on where the scheduler
//! puts the load generator, the primary and the workers, and that holds for
//! the whole run: on a 2-core VM, rounds of the same contender spread by
//! 15 to 30 % (min to max). Many short rounds give the median more to work with than a
//! few long ones; the tables show the range of the rounds, and a target
//! whose per-round ratios fall on both sides of its goal says so.
//!
//! Nothing runs unless cargo passes `--bench`. nginx and Node contenders are
//! skipped, with a note, when their program is missing.
//!
//! Settings (environment):
//! - `PERF_WORKERS`: workers per contender (default: the CPUs);
//! - `PERF_CONNECTIONS`: concurrent connections (default 64);
//! - `PERF_SECONDS`: measured seconds per contender, load and round
//!   (default 1, fractions allowed);
//! - `PERF_ROUNDS`: rounds (default 6);
//! - `PERF_WARMUP_MS`: warm-up before each measured run (default 200; at
//!   least 500 for the Node contenders);
//! - `PERF_RETRIES`: how many times a run disturbed by other processes is
//!   measured again (default 1; the least disturbed counts);
//! - `PERF_IDLE_CONNECTIONS`: kept-alive connections held open for the
//!   memory figure (default 10000);
//! - `PERF_LONG_CONNECTIONS`: short connections of the memory phase's long
//!   run (default 200000);
//! - `PERF_NGINX`: the nginx binary (default: `nginx` on PATH, else
//!   `/usr/sbin/nginx`);
//! - `PERF_CONTENDERS`: a comma-separated subset of `dist-rr`,
//!   `dist-least-conn`, `dist-p2c`, `dist-shared`, `dist-reuseport`,
//!   `dist-steer` (`--sched reuseport --steer rr`; root only),
//!   `dist-sticky-ip`, `dist-sticky-cookie` (`--sticky`), `base-rr`, `base-reuseport`, `plain-loop`, `uring-loop`, `nginx`,
//!   `node-rr`, `dist-node-rr`, and `memory` (the memory phase);
//! - `PERF_BASELINE`: another `distributor` binary (an older build) that
//!   the `base-rr` and `base-reuseport` contenders run, side by side with
//!   this build's in the same rounds (skipped, with a note, without it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distributor::lab::{self, load};
use hdrhistogram::Histogram;

#[path = "../common/procs.rs"]
mod procs;
use procs::*;
#[path = "../common/uring_loop.rs"]
mod uring_loop;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const DISTRIBUTOR: &str = env!("CARGO_BIN_EXE_distributor");
const NODE_APP: &str = "benches/node/app.js";
const CLUSTER_PRIMARY: &str = "benches/node/cluster_primary.js";
/// What nginx answers (`return 200 "..."`).
const NGINX_BODY: &str = "Hello from nginx\\n";
/// How long a contender may take to serve, all its workers ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a contender must have served with all its worker processes
/// started before it counts as ready when its log does not say so.
const LOG_SILENT_READY: Duration = Duration::from_secs(2);
/// Above this much CPU used by other processes during a run (% of the
/// machine), the run is measured again, then flagged.
const BUSY_PCT: f64 = 10.0;
/// The shortest warm-up of a Node contender (that of `benches/node_cluster.rs`).
const NODE_WARMUP: Duration = Duration::from_millis(500);
/// Load generator threads, as in `benches/balance.rs`.
const LOAD_THREADS: usize = 2;
/// The workers of the memory phase.
const MEMORY_WORKERS: usize = 8;
/// Short connections the CPU-per-connection figure should rest on.
const MIN_CPU_CONNECTIONS: u64 = 100_000;
/// The memory phase's long run goes in runs this long, RSS read after each.
const LONG_CHUNK: Duration = Duration::from_secs(1);
/// The long run stops here even if it has not reached its connections.
const LONG_CAP: Duration = Duration::from_secs(60);
/// "Flat": the primary's RSS after the long run may exceed its RSS after
/// the first second of it by at most this much, KiB.
const FLAT_KIB: i64 = 256;

/// The targets.
const RR_VS_REUSEPORT_CLOSE: f64 = 0.90;
const RR_VS_REUSEPORT_KEEPALIVE: f64 = 0.98;
const REUSEPORT_VS_NGINX: f64 = 0.95;
const RR_VS_NGINX: f64 = 0.85;
const LATENCY_US: f64 = 20.0;
/// Steered reuseport against plain reuseport, req/s, short connections.
const STEER_VS_REUSEPORT: f64 = 0.97;
/// Steered reuseport against the primary's rr, req/s, short connections.
const STEER_VS_RR: f64 = 1.0;
/// Steered p50 − plain reuseport p50, one connection at a time.
const STEER_LATENCY_US: f64 = 5.0;
/// Primary CPU per connection in rr, µs (the figure for a 2-core VM).
const RR_CPU_US: f64 = 8.0;
/// rr's primary CPU per connection against the plain loop's: half.
const VS_PLAIN_LOOP: f64 = 0.5;
/// Against Node's cluster primary on the same Node app: a sixth.
const VS_NODE_PRIMARY: f64 = 1.0 / 6.0;

mod contenders;
mod memory;
mod plain_loop;
mod report;
mod run;
mod server;
mod settings;
use contenders::*;
use memory::*;
use plain_loop::*;
use report::*;
use run::*;
use server::*;
use settings::*;

fn main() {
    if let Ok(n) = std::env::var(PLAIN_LOOP_ENV) {
        // Started by this bench as the plain-loop contender.
        let uring = std::env::var_os(PLAIN_LOOP_URING_ENV).is_some_and(|v| v == "1");
        match plain_loop(n.parse().unwrap_or(1), uring) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("plain loop: {e}");
                std::process::exit(1);
            }
        }
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let started = Instant::now();
    let settings = Settings::from_env();
    let logs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("perf");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        eprintln!("perf: cannot create {}: {e}", logs.display());
        std::process::exit(1);
    }
    // Only this run's logs and nginx files.
    for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let _ = std::fs::remove_file(&path);
        } else if path.is_dir() && entry.file_name().to_string_lossy().starts_with("nginx") {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    for (c, why) in &settings.skipped {
        eprintln!("perf: skipping {} ({}): {why}", c.label, c.key);
    }
    let runs: usize = settings.contenders.iter().map(|c| c.loads.len()).sum();
    eprintln!(
        "perf: {} contenders, {runs} runs per round × {} rounds of {} s (+ {:?} warm-up){}; logs in {}",
        settings.contenders.len(),
        settings.rounds,
        settings.seconds,
        settings.warmup,
        if settings.memory {
            ", then the memory phase"
        } else {
            ""
        },
        logs.display()
    );

    let mut totals: BTreeMap<(&str, Load), Total> = BTreeMap::new();
    let mut failures: BTreeMap<&str, String> = BTreeMap::new();
    for round in 0..settings.rounds {
        let mut order = settings.contenders.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for c in order {
            if failures.contains_key(c.key) {
                continue;
            }
            let log = logs.join(format!("{}-round{}.log", c.key, round + 1));
            match run_contender(&settings, c, &log, &logs) {
                Ok(samples) => {
                    for (load, sample) in samples {
                        let r = &sample.result;
                        eprintln!(
                            "  round {} {:<34} {:<10} {:>8.0} req/s  errors {}  p50 {} µs  primary CPU {:.1} µs/req  others {:.0} %{}",
                            round + 1,
                            c.label_long(),
                            load.name(),
                            r.requests as f64 / r.elapsed.as_secs_f64(),
                            r.errors,
                            if r.latency_us.is_empty() {
                                0
                            } else {
                                r.latency_us.value_at_quantile(0.5)
                            },
                            sample.cpu_us / r.requests.max(1) as f64,
                            sample.others_pct,
                            if sample.others_pct > BUSY_PCT {
                                "  (the machine is not quiet)"
                            } else {
                                ""
                            }
                        );
                        totals.entry((c.key, load)).or_insert_with(Total::new).add(
                            round,
                            &sample,
                            settings.workers,
                        );
                    }
                }
                Err(e) => {
                    eprintln!("  round {} {}: FAILED: {e}", round + 1, c.label_long());
                    failures.insert(c.key, e);
                }
            }
        }
    }
    let memory = if settings.memory {
        eprintln!("perf: memory phase");
        let log = logs.join("memory.log");
        let m = memory_phase(&settings, &log);
        if let Err(e) = &m {
            eprintln!("  memory phase: FAILED: {e}");
        }
        Some(m)
    } else {
        None
    };
    println!(
        "{}",
        markdown(&settings, &totals, &failures, memory.as_ref(), started)
    );
    if !failures.is_empty() || memory.as_ref().is_some_and(|m| m.is_err()) {
        std::process::exit(1);
    }
}
