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
//!   `base-rr`, `base-reuseport`, `plain-loop`, `uring-loop`, `nginx`,
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

#[path = "common/procs.rs"]
mod procs;
use procs::*;
#[path = "common/uring_loop.rs"]
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
/// Primary CPU per connection in rr, µs (the figure for a 2-core VM).
const RR_CPU_US: f64 = 8.0;
/// rr's primary CPU per connection against the plain loop's: half.
const VS_PLAIN_LOOP: f64 = 0.5;
/// Against Node's cluster primary on the same Node app: a sixth.
const VS_NODE_PRIMARY: f64 = 1.0 / 6.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    /// `PERF_CONNECTIONS` connections, one request each (`Connection: close`).
    Close,
    /// `PERF_CONNECTIONS` kept-alive connections.
    KeepAlive,
    /// One connection at a time, one request each: latency.
    Single,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Close => "close",
            Load::KeepAlive => "keep-alive",
            Load::Single => "1 conn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    /// The demo worker (`distributor` with no command), or, with `node`,
    /// `distributor ... -- node app.js`; with `baseline`, the binary
    /// `PERF_BASELINE` names (an older build, measured side by side).
    Distributor {
        sched: &'static str,
        node: bool,
        baseline: bool,
    },
    /// nginx, `reuseport`.
    Nginx,
    /// `node cluster_primary.js N`, `NODE_CLUSTER_SCHED_POLICY=rr`.
    NodeCluster,
    /// The reference: this bench as a plain accept, sendmsg, close loop
    /// over N demo workers ([`plain_loop`]); with `uring`, over io_uring
    /// ([`uring_loop`]).
    PlainLoop { uring: bool },
}

#[derive(Debug, Clone, Copy)]
struct Contender {
    /// For `PERF_CONTENDERS`.
    key: &'static str,
    /// For the tables.
    label: &'static str,
    program: Program,
    loads: &'static [Load],
}

const DEMO_LOADS: &[Load] = &[Load::Close, Load::KeepAlive];
const LATENCY_LOADS: &[Load] = &[Load::Close, Load::KeepAlive, Load::Single];
const NODE_LOADS: &[Load] = &[Load::Close];
const PLAIN_LOADS: &[Load] = &[Load::Close, Load::Single];

/// In table order; a round runs them in this order or reversed.
const CONTENDERS: [Contender; 12] = [
    Contender {
        key: "dist-rr",
        label: "distributor rr",
        program: Program::Distributor {
            sched: "rr",
            node: false,
            baseline: false,
        },
        loads: LATENCY_LOADS,
    },
    Contender {
        key: "dist-least-conn",
        label: "distributor least-conn",
        program: Program::Distributor {
            sched: "least-conn",
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-p2c",
        label: "distributor p2c",
        program: Program::Distributor {
            sched: "p2c",
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-shared",
        label: "distributor shared",
        program: Program::Distributor {
            sched: "shared",
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-reuseport",
        label: "distributor reuseport",
        program: Program::Distributor {
            sched: "reuseport",
            node: false,
            baseline: false,
        },
        loads: LATENCY_LOADS,
    },
    Contender {
        key: "base-rr",
        label: "baseline rr",
        program: Program::Distributor {
            sched: "rr",
            node: false,
            baseline: true,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "base-reuseport",
        label: "baseline reuseport",
        program: Program::Distributor {
            sched: "reuseport",
            node: false,
            baseline: true,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "plain-loop",
        label: "plain loop (accept, sendmsg, close)",
        program: Program::PlainLoop { uring: false },
        loads: PLAIN_LOADS,
    },
    Contender {
        key: "uring-loop",
        label: "plain loop over io_uring",
        program: Program::PlainLoop { uring: true },
        loads: PLAIN_LOADS,
    },
    Contender {
        key: "nginx",
        label: "nginx reuseport",
        program: Program::Nginx,
        loads: DEMO_LOADS,
    },
    Contender {
        key: "node-rr",
        label: "Node cluster rr",
        program: Program::NodeCluster,
        loads: NODE_LOADS,
    },
    Contender {
        key: "dist-node-rr",
        label: "distributor rr",
        program: Program::Distributor {
            sched: "rr",
            node: true,
            baseline: false,
        },
        loads: NODE_LOADS,
    },
];

/// The key of the memory phase in `PERF_CONTENDERS`.
const MEMORY_KEY: &str = "memory";

struct Settings {
    workers: usize,
    connections: usize,
    seconds: f64,
    rounds: usize,
    warmup: Duration,
    retries: usize,
    idle_connections: usize,
    long_connections: u64,
    /// Those selected and runnable here.
    contenders: Vec<Contender>,
    memory: bool,
    nginx: Option<PathBuf>,
    node: Option<String>,
    /// `PERF_BASELINE`: an older `distributor` for the `base-*` contenders.
    baseline: Option<PathBuf>,
    /// Contenders selected but left out, and why.
    skipped: Vec<(Contender, String)>,
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("perf: {name}={v:?} does not parse");
            std::process::exit(2);
        }),
    }
}

/// The nginx binary: `PERF_NGINX`, else `nginx` on PATH, else
/// `/usr/sbin/nginx` (not on a plain user's PATH); `None` when none runs.
fn find_nginx() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("PERF_NGINX") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![PathBuf::from("nginx"), PathBuf::from("/usr/sbin/nginx")],
    };
    candidates.into_iter().find(|p| {
        Command::new(p)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn node_version() -> Option<String> {
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        _ => None,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (selected, memory): (Vec<Contender>, bool) = match std::env::var("PERF_CONTENDERS") {
            Err(_) => (CONTENDERS.to_vec(), true),
            Ok(list) => {
                let keys: BTreeSet<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .collect();
                for k in &keys {
                    if *k != MEMORY_KEY && !CONTENDERS.iter().any(|c| c.key == *k) {
                        let mut known: Vec<&str> = CONTENDERS.iter().map(|c| c.key).collect();
                        known.push(MEMORY_KEY);
                        eprintln!(
                            "perf: unknown contender {k:?} in PERF_CONTENDERS; known: {}",
                            known.join(", ")
                        );
                        std::process::exit(2);
                    }
                }
                (
                    CONTENDERS
                        .iter()
                        .filter(|c| keys.contains(c.key))
                        .copied()
                        .collect(),
                    keys.contains(MEMORY_KEY),
                )
            }
        };
        let needs_nginx = selected.iter().any(|c| c.program == Program::Nginx);
        let needs_node = selected.iter().any(|c| {
            matches!(
                c.program,
                Program::NodeCluster | Program::Distributor { node: true, .. }
            )
        });
        let nginx = if needs_nginx { find_nginx() } else { None };
        let baseline = std::env::var_os("PERF_BASELINE").map(PathBuf::from);
        let node = if needs_node { node_version() } else { None };
        let mut contenders = Vec::new();
        let mut skipped = Vec::new();
        for c in selected {
            match c.program {
                Program::Nginx if nginx.is_none() => skipped.push((
                    c,
                    match std::env::var("PERF_NGINX") {
                        Ok(p) => format!("PERF_NGINX={p:?} does not run (`-v`)"),
                        Err(_) => "nginx is not installed (not on PATH, not /usr/sbin/nginx; \
                                   PERF_NGINX names it)"
                            .to_string(),
                    },
                )),
                Program::NodeCluster | Program::Distributor { node: true, .. }
                    if node.is_none() =>
                {
                    skipped.push((c, "`node` is not on PATH (or does not run)".to_string()))
                }
                Program::Distributor { baseline: true, .. } if baseline.is_none() => {
                    skipped.push((
                        c,
                        "no baseline: PERF_BASELINE names an older distributor binary".to_string(),
                    ))
                }
                _ => contenders.push(c),
            }
        }
        let s = Settings {
            workers: setting("PERF_WORKERS", cores),
            connections: setting("PERF_CONNECTIONS", 64),
            seconds: setting("PERF_SECONDS", 1.0),
            rounds: setting("PERF_ROUNDS", 6),
            warmup: Duration::from_millis(setting("PERF_WARMUP_MS", 200)),
            retries: setting("PERF_RETRIES", 1),
            idle_connections: setting("PERF_IDLE_CONNECTIONS", 10_000),
            long_connections: setting("PERF_LONG_CONNECTIONS", 200_000),
            contenders,
            memory,
            nginx,
            node,
            baseline,
            skipped,
        };
        if s.workers == 0
            || s.connections == 0
            || s.rounds == 0
            || !(s.seconds > 0.0 && s.seconds.is_finite())
        {
            eprintln!("perf: workers, connections, seconds and rounds must not be 0");
            std::process::exit(2);
        }
        s
    }
}

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

impl Contender {
    /// The label, with the app when it is not the demo worker.
    fn label_long(&self) -> String {
        match self.program {
            Program::NodeCluster | Program::Distributor { node: true, .. } => {
                format!("{} (Node app)", self.label)
            }
            _ => self.label.to_string(),
        }
    }
}

/// One measured run.
struct Sample {
    result: load::LoadResult,
    /// The primary's CPU time over the run, µs.
    cpu_us: f64,
    /// Wall time of the run, from before the first request to after the
    /// drain.
    wall: Duration,
    /// CPU used meanwhile by processes that are neither this bench (the
    /// load generator) nor the contender's, in % of the whole machine.
    others_pct: f64,
}

/// The measured runs of one contender and load, pooled over rounds.
struct Total {
    requests: u64,
    errors: u64,
    wall: Duration,
    cpu_us: f64,
    latency_us: Histogram<u64>,
    /// Smallest and largest share of one worker in any round, %.
    share_min: f64,
    share_max: f64,
    /// Requests/s of each round, by round.
    rates: BTreeMap<usize, f64>,
    /// p50 latency of each round, µs.
    p50s: Vec<u64>,
    /// The most CPU other processes used during a round, % of the machine.
    others_pct: f64,
}

impl Total {
    fn new() -> Total {
        Total {
            requests: 0,
            errors: 0,
            wall: Duration::ZERO,
            cpu_us: 0.0,
            latency_us: Histogram::new_with_max(3_600_000_000, 3).expect("a valid histogram"),
            share_min: f64::INFINITY,
            share_max: 0.0,
            rates: BTreeMap::new(),
            p50s: Vec::new(),
            others_pct: 0.0,
        }
    }

    fn add(&mut self, round: usize, s: &Sample, workers: usize) {
        let r = &s.result;
        self.requests += r.requests;
        self.errors += r.errors;
        self.wall += s.wall;
        self.cpu_us += s.cpu_us;
        self.rates
            .insert(round, r.requests as f64 / r.elapsed.as_secs_f64().max(1e-9));
        if !r.latency_us.is_empty() {
            self.p50s.push(r.latency_us.value_at_quantile(0.5));
        }
        self.others_pct = self.others_pct.max(s.others_pct);
        let _ = self.latency_us.add(&r.latency_us);
        // The demo worker's bodies name the worker (`worker <ID>`).
        let named: u64 = r.per_worker.values().sum();
        if named > 0 {
            let max = r.per_worker.values().copied().max().unwrap_or(0);
            let min = if r.per_worker.len() < workers {
                0
            } else {
                r.per_worker.values().copied().min().unwrap_or(0)
            };
            self.share_min = self.share_min.min(100.0 * min as f64 / named as f64);
            self.share_max = self.share_max.max(100.0 * max as f64 / named as f64);
        }
    }

    /// The median of the rounds' requests/s.
    fn median_rate(&self) -> f64 {
        median(self.rates.values().copied().collect())
    }

    fn p50_us(&self) -> f64 {
        if self.latency_us.is_empty() {
            f64::NAN
        } else {
            self.latency_us.value_at_quantile(0.5) as f64
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Starts `c`, measures each of its loads, stops it.
fn run_contender(
    s: &Settings,
    c: Contender,
    log: &Path,
    dir: &Path,
) -> Result<Vec<(Load, Sample)>, String> {
    let mut server = Server::start(s, c.program, s.workers, log, dir)?;
    let mut samples = Vec::with_capacity(c.loads.len());
    let outcome = (|| {
        server.wait_ready()?;
        for &load in c.loads {
            // A run disturbed by other processes is measured again (the
            // warm-up too), up to `retries` times; the least disturbed
            // one counts.
            let mut best = server.measure(s, load)?;
            for _ in 0..s.retries {
                if best.others_pct <= BUSY_PCT {
                    break;
                }
                eprintln!(
                    "  {} {}: other processes took {:.0} % of the CPU: measuring again",
                    c.label_long(),
                    load.name(),
                    best.others_pct
                );
                let again = server.measure(s, load)?;
                if again.others_pct < best.others_pct {
                    best = again;
                }
            }
            samples.push((load, best));
        }
        Ok(())
    })();
    let warnings = server.stop();
    for w in &warnings {
        eprintln!("  {}: {w}", c.label_long());
    }
    outcome.map(|()| samples)
}

/// A running contender: its primary (nginx's master), in a process group of
/// its own.
struct Server {
    program: Program,
    workers: usize,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    stopped: bool,
}

/// A minimal nginx configuration: `workers` processes, one `SO_REUSEPORT`
/// socket each, the fixed answer, everything it writes under `dir`.
fn nginx_conf(dir: &Path, workers: usize, port: u16) -> String {
    let d = dir.display();
    format!(
        "# Written by `cargo bench --bench perf`.
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    # As the demo worker: no limit on requests per kept-alive connection
    # (nginx closes after 1000 by default).
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ return 200 \"{NGINX_BODY}\"; }}
    }}
}}
"
    )
}

impl Server {
    fn start(
        s: &Settings,
        program: Program,
        workers: usize,
        log: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        let port = free_port()?;
        let n = workers.to_string();
        let mut cmd = match program {
            Program::Distributor {
                sched,
                node,
                baseline,
            } => {
                let binary = match (baseline, &s.baseline) {
                    (false, _) => PathBuf::from(DISTRIBUTOR),
                    (true, Some(b)) => b.clone(),
                    (true, None) => return Err("no PERF_BASELINE".into()),
                };
                let mut cmd = Command::new(binary);
                cmd.args(["--workers", &n, "--sched", sched])
                    .args(["--shutdown-timeout", "3s"]);
                if node {
                    // The app listens on PORT through the primary.
                    cmd.args(["--", "node", NODE_APP]);
                } else {
                    cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
                }
                cmd
            }
            Program::Nginx => {
                let nginx = s.nginx.as_ref().ok_or("no nginx")?;
                let stem = log.file_stem().unwrap_or_default().to_string_lossy();
                let home = dir.join(format!("nginx-{stem}"));
                std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
                let conf = home.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&home, workers, port))
                    .map_err(|e| format!("{}: {e}", conf.display()))?;
                let mut cmd = Command::new(nginx);
                cmd.arg("-p")
                    .arg(&home)
                    .arg("-c")
                    .arg(&conf)
                    .args(["-e", "stderr"]);
                cmd
            }
            Program::NodeCluster => {
                let mut cmd = Command::new("node");
                cmd.arg(CLUSTER_PRIMARY)
                    .arg(&n)
                    .env("NODE_CLUSTER_SCHED_POLICY", "rr");
                cmd
            }
            Program::PlainLoop { uring } => {
                let exe = std::env::current_exe().map_err(|e| format!("this bench: {e}"))?;
                let mut cmd = Command::new(exe);
                cmd.env(PLAIN_LOOP_ENV, &n)
                    .env(PLAIN_LOOP_URING_ENV, if uring { "1" } else { "0" });
                cmd
            }
        };
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.current_dir(ROOT)
            .env("PORT", port.to_string())
            .env_remove("NODE_UNIQUE_ID")
            .env_remove("NODE_CHANNEL_FD")
            .env_remove("DISTRIBUTOR_WORKERS")
            .env_remove("DISTRIBUTOR_SCHED")
            .env_remove("DISTRIBUTOR_LISTEN")
            .env_remove("DISTRIBUTOR_WEIGHTS")
            .env_remove("DISTRIBUTOR_MAX_UNACKED")
            .env_remove("DISTRIBUTOR_DEFER_ACCEPT")
            .env_remove("DISTRIBUTOR_METRICS")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if !matches!(program, Program::NodeCluster) {
            cmd.env_remove("NODE_CLUSTER_SCHED_POLICY");
        }
        own_group(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        Ok(Server {
            program,
            workers,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: log.to_path_buf(),
            stopped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log, for error messages.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("log {}:\n    {tail}", self.log.display())
    }

    /// Whether the log says that every worker serves.
    fn log_says_ready(&self) -> bool {
        let n = self.workers;
        let text = self.log_text();
        match self.program {
            // (`N/N ready` from builds before 2026-12.)
            Program::Distributor { .. } => {
                text.contains(&format!("{n} of {n} slots ready"))
                    || text.contains(&format!("{n}/{n} ready"))
            }
            // One line per worker; not "start worker processes".
            Program::Nginx => text.matches("start worker process ").count() >= n,
            Program::NodeCluster => text.contains(&format!("{n} workers listening on")),
            Program::PlainLoop { .. } => text.contains(&format!("plain loop: {n} workers ready")),
        }
    }

    /// Waits (bounded) until a request succeeds and every worker serves;
    /// then checks that the primary itself holds the listening socket.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error;
        // Since when it has served with all its workers started, for when
        // the log does not say (its wording changed).
        let mut complete_since: Option<Instant> = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "exited before serving ({status}); {}",
                    self.log_tail()
                ));
            }
            match probe(self.addr) {
                Ok(_) => {
                    if self.log_says_ready() {
                        break;
                    }
                    if descendants(self.pid()).len() >= self.workers {
                        let since = *complete_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= LOG_SILENT_READY {
                            eprintln!(
                                "  warning: the log of pid {} does not say that all workers are \
                                 ready; going by its {} processes, serving for {LOG_SILENT_READY:?}",
                                self.pid(),
                                self.workers
                            );
                            break;
                        }
                    } else {
                        complete_since = None;
                    }
                    last_error = "serves, but the log does not say all workers are ready".into();
                }
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready within {READY_TIMEOUT:?} on {}: {last_error}; {}",
                    self.addr,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !holds_listener(self.pid(), self.addr.port()) {
            return Err(format!(
                "pid {} holds no socket listening on {}; {}",
                self.pid(),
                self.addr,
                self.log_tail()
            ));
        }
        let family = descendants(self.pid());
        if family.len() != self.workers {
            eprintln!(
                "  warning: {} processes under pid {}, {} workers expected",
                family.len(),
                self.pid(),
                self.workers
            );
        }
        Ok(())
    }

    fn spec(&self, s: &Settings, load: Load, duration: Duration) -> load::LoadSpec {
        let (connections, threads) = match load {
            Load::Single => (1, 1),
            Load::Close | Load::KeepAlive => (s.connections, LOAD_THREADS),
        };
        load::LoadSpec {
            addr: self.addr,
            connections,
            duration,
            keepalive: load == Load::KeepAlive,
            path: "/".into(),
            threads,
            slow: None,
        }
    }

    /// A warm-up, then the measured run with the CPU times read before and
    /// after.
    fn measure(&mut self, s: &Settings, load: Load) -> Result<Sample, String> {
        let warmup = match self.program {
            // Node's JIT needs longer than the demo worker and nginx.
            Program::NodeCluster | Program::Distributor { node: true, .. } => {
                s.warmup.max(NODE_WARMUP)
            }
            _ => s.warmup,
        };
        if !warmup.is_zero() {
            load::run_load(&self.spec(s, load, warmup), &|_, _| {})
                .map_err(|e| format!("load generator: {e}"))?;
        }
        let spec = self.spec(s, load, Duration::from_secs_f64(s.seconds));
        self.measure_spec(&spec)
    }

    /// One measured run of `spec`.
    fn measure_spec(&mut self, spec: &load::LoadSpec) -> Result<Sample, String> {
        let (result, cpu) = measure_cpu(self.pid(), || {
            load::run_load(spec, &|_, _| {}).map_err(|e| format!("load generator: {e}"))
        })?;
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "exited during a run ({status}); {}",
                self.log_tail()
            ));
        }
        Ok(Sample {
            result,
            cpu_us: cpu.primary_us,
            wall: cpu.wall,
            others_pct: cpu.others_pct,
        })
    }

    /// Stops it: see [`stop_group`]. Returns what went wrong, for the log.
    fn stop(&mut self) -> Vec<String> {
        self.stopped = true;
        stop_group(&mut self.child)
    }
}

impl Drop for Server {
    /// On an early return or a panic: nothing survives the bench.
    fn drop(&mut self) {
        if !self.stopped {
            kill_group(&mut self.child);
        }
    }
}

/// What the memory phase measured: the primary's RSS (KiB) at each step.
struct Memory {
    workers: usize,
    /// After the start and a warm-up.
    rss_start: u64,
    /// After each second of the long run.
    rss_chunks: Vec<u64>,
    /// Short connections served in the long run, errors, seconds.
    long_requests: u64,
    long_errors: u64,
    long_secs: f64,
    /// The primary's CPU over the long run, µs.
    long_cpu_us: f64,
    /// The most CPU other processes used during the long run, %.
    long_others_pct: f64,
    /// Kept-alive connections asked for, and those opened and answered.
    idle_wanted: usize,
    idle_open: usize,
    /// The first failure opening them, if any, and how many failed.
    idle_error: Option<String>,
    idle_failed: usize,
    /// Why fewer were asked for than `PERF_IDLE_CONNECTIONS`.
    idle_note: Option<String>,
    /// With them open: the primary's RSS and open fds, the workers' RSS
    /// all together (KiB).
    rss_idle: u64,
    fds_idle: usize,
    workers_rss_idle: u64,
    /// After they were closed.
    rss_after: u64,
}

/// `rr`, [`MEMORY_WORKERS`] demo workers: RSS after a warm-up, over a long
/// run of short connections, with many kept-alive connections open, and
/// after they close.
fn memory_phase(s: &Settings, log: &Path) -> Result<Memory, String> {
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

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (as far
/// as the hard limit allows); returns the soft limit now in force.
fn raise_nofile(want: u64) -> Result<u64, String> {
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

/// A new connection with one keep-alive `GET /` answered on it, left open.
fn open_kept_alive(addr: SocketAddr) -> Result<TcpStream, String> {
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
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// µs with two decimals under 10, one above.
fn figure(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// KiB as `12 345 KiB`.
fn kib(v: u64) -> String {
    format!("{} KiB", thousands(v as f64))
}

/// One row of the targets table.
struct Target {
    what: String,
    measured: String,
    goal: String,
    /// `None`: not measured (a contender missing or failed).
    met: Option<bool>,
    /// The rounds fall on both sides of the goal: within the noise.
    straddles: bool,
}

/// `a / b` of the median req/s of two contenders under one load, with the
/// range of the per-round ratios.
fn ratio(
    totals: &BTreeMap<(&str, Load), Total>,
    a: &str,
    b: &str,
    load: Load,
    goal: f64,
    what: &str,
) -> Target {
    let goal_text = format!("≥ {goal:.2}×");
    let (Some(ta), Some(tb)) = (totals.get(&(a, load)), totals.get(&(b, load))) else {
        let missing: Vec<&str> = [a, b]
            .into_iter()
            .filter(|k| !totals.contains_key(&(*k, load)))
            .collect();
        return Target {
            what: what.to_string(),
            measured: format!("not measured (no {})", missing.join(", no ")),
            goal: goal_text,
            met: None,
            straddles: false,
        };
    };
    let r = ta.median_rate() / tb.median_rate();
    let per_round: Vec<f64> = ta
        .rates
        .iter()
        .filter_map(|(round, ra)| tb.rates.get(round).map(|rb| ra / rb))
        .collect();
    let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per_round.iter().copied().fold(0.0, f64::max);
    Target {
        what: what.to_string(),
        measured: format!(
            "**{r:.2}×** ({} vs {} req/s; rounds {lo:.2}–{hi:.2}×)",
            thousands(ta.median_rate()),
            thousands(tb.median_rate())
        ),
        goal: goal_text,
        met: Some(r >= goal),
        straddles: lo < goal && hi >= goal,
    }
}

fn markdown(
    s: &Settings,
    totals: &BTreeMap<(&str, Load), Total>,
    failures: &BTreeMap<&str, String>,
    memory: Option<&Result<Memory, String>>,
    started: Instant,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## `cargo bench --bench perf`\n\n\
         Machine: {}.\n\n\
         Settings: {} workers, {} connections, {} rounds × {} s per contender and load \
         (order alternating between rounds, a {} ms warm-up before each run not counted; \
         req/s is the median of the rounds), load generator ({LOAD_THREADS} threads; 1 for \
         the one-connection latency) on the same machine. distributor {}; nginx: {}; Node: {}.",
        lab::machine_description(),
        s.workers,
        s.connections,
        s.rounds,
        s.seconds,
        s.warmup.as_millis(),
        env!("CARGO_PKG_VERSION"),
        nginx_version(s.nginx.as_deref()).unwrap_or_else(|| not_run(s, true)),
        s.node.clone().unwrap_or_else(|| not_run(s, false)),
    );
    let demo: Vec<&Contender> = s
        .contenders
        .iter()
        .filter(|c| {
            !matches!(
                c.program,
                Program::NodeCluster | Program::Distributor { node: true, .. }
            )
        })
        .collect();
    let node: Vec<&Contender> = s
        .contenders
        .iter()
        .filter(|c| !demo.iter().any(|d| d.key == c.key))
        .collect();

    // Throughput.
    for load in [Load::Close, Load::KeepAlive] {
        if demo.is_empty() {
            break;
        }
        let _ = writeln!(
            out,
            "\n### Throughput: {}, the demo worker and nginx\n",
            if load == Load::KeepAlive {
                "keep-alive"
            } else {
                "one request per connection (`Connection: close`)"
            }
        );
        throughput_table(&mut out, &demo, load, totals, failures);
    }

    // Latency at one connection.
    let single: Vec<&Contender> = demo
        .iter()
        .copied()
        .filter(|c| c.loads.contains(&Load::Single))
        .collect();
    if !single.is_empty() {
        let _ = writeln!(
            out,
            "\n### Latency, one connection at a time (one request per connection)\n\n\
             | contender | p50 µs | p50 of the rounds µs | p90 µs | p99 µs | req/s | errors |\n\
             |---|---|---|---|---|---|---|"
        );
        for c in &single {
            if let Some(e) = failures.get(c.key) {
                let _ = writeln!(out, "| {} | failed: {} | | | | | |", c.label, first(e));
                continue;
            }
            let Some(t) = totals.get(&(c.key, Load::Single)) else {
                continue;
            };
            let q = |q: f64| t.latency_us.value_at_quantile(q);
            let lo = t.p50s.iter().min().copied().unwrap_or(0);
            let hi = t.p50s.iter().max().copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {} | {lo}–{hi} | {} | {} | {} | {} |",
                c.label,
                q(0.5),
                q(0.9),
                q(0.99),
                thousands(t.median_rate()),
                t.errors
            );
        }
    }

    // Primary CPU per dispatched connection.
    let mut cpu_rows = Vec::new();
    for c in &demo {
        if !matches!(c.program, Program::Distributor { sched, .. } if ["rr", "least-conn", "p2c"].contains(&sched))
            && !matches!(c.program, Program::PlainLoop { .. })
        {
            continue;
        }
        for (load, how) in [
            (Load::Close, format!("{} connections", s.connections)),
            (Load::Single, "one connection at a time".to_string()),
        ] {
            if let Some(t) = totals.get(&(c.key, load)) {
                cpu_rows.push((
                    format!("{} ({} workers, {how}, rounds pooled)", c.label, s.workers),
                    t.requests,
                    t.cpu_us,
                    t.wall.as_secs_f64(),
                    load == Load::Close,
                ));
            }
        }
    }
    if let Some(Ok(m)) = memory {
        cpu_rows.push((
            format!(
                "distributor rr ({} workers, {} connections, the memory phase's long run)",
                m.workers, s.connections
            ),
            m.long_requests,
            m.long_cpu_us,
            m.long_secs,
            true,
        ));
    }
    if !cpu_rows.is_empty() {
        let _ = writeln!(
            out,
            "\n### Primary CPU per dispatched connection (one request per connection)\n\n\
             | contender | connections | primary CPU s | µs/connection | primary CPU % |\n\
             |---|---|---|---|---|"
        );
        for (label, n, cpu_us, wall, check) in &cpu_rows {
            let flag = if *check && *n < MIN_CPU_CONNECTIONS {
                " (fewer than 100 000: raise PERF_SECONDS or PERF_ROUNDS)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| {label} | {}{flag} | {:.2} | {} | {:.0} |",
                thousands(*n as f64),
                cpu_us / 1e6,
                figure(cpu_us / (*n).max(1) as f64),
                100.0 * cpu_us / 1e6 / wall.max(1e-9)
            );
        }
    }

    // Memory.
    match memory {
        None => {}
        Some(Err(e)) => {
            let _ = writeln!(out, "\n### Primary memory\n\nFailed: {}", first(e));
        }
        Some(Ok(m)) => {
            let first_chunk = m.rss_chunks.first().copied().unwrap_or(m.rss_start);
            let last = m.rss_chunks.last().copied().unwrap_or(m.rss_start);
            let max = m.rss_chunks.iter().copied().max().unwrap_or(m.rss_start);
            let _ = writeln!(
                out,
                "\n### Primary memory (`--sched rr`, {} demo workers)\n\n\
                 | when | primary RSS | note |\n|---|---|---|\n\
                 | after the start and a warm-up | {} | |\n\
                 | after the first second of the long run | {} | |\n\
                 | after the long run: {} short connections in {:.1} s | {} | {:+} KiB since the first second, {:+} KiB since the warm-up; largest {}; {} errors |\n\
                 | with {} kept-alive connections open | {} | {} open fds in the primary; the workers' RSS together: {} |\n\
                 | after they closed | {} | |",
                m.workers,
                kib(m.rss_start),
                kib(first_chunk),
                thousands(m.long_requests as f64),
                m.long_secs,
                kib(last),
                last as i64 - first_chunk as i64,
                last as i64 - m.rss_start as i64,
                kib(max),
                m.long_errors,
                thousands(m.idle_open as f64),
                kib(m.rss_idle),
                m.fds_idle,
                kib(m.workers_rss_idle),
                kib(m.rss_after),
            );
            if m.idle_failed > 0 || m.idle_note.is_some() {
                let _ = writeln!(
                    out,
                    "\n{} of {} kept-alive connections could not be opened{}{}.",
                    m.idle_failed,
                    m.idle_wanted,
                    m.idle_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default(),
                    m.idle_note
                        .as_deref()
                        .map(|n| format!("; {n}"))
                        .unwrap_or_default()
                );
            }
        }
    }

    // Node apps.
    if !node.is_empty() {
        let _ = writeln!(
            out,
            "\n### Node apps (the same unmodified `{NODE_APP}`), one request per connection\n"
        );
        throughput_table(&mut out, &node, Load::Close, totals, failures);
        let _ = writeln!(
            out,
            "\nNode's cluster primary against this one in every mode, keep-alive too: \
             `cargo bench --bench node_cluster`."
        );
    }

    // Targets.
    let mut targets = vec![
        ratio(
            totals,
            "dist-rr",
            "dist-reuseport",
            Load::Close,
            RR_VS_REUSEPORT_CLOSE,
            "rr / reuseport, req/s, one request per connection",
        ),
        ratio(
            totals,
            "dist-rr",
            "dist-reuseport",
            Load::KeepAlive,
            RR_VS_REUSEPORT_KEEPALIVE,
            "rr / reuseport, req/s, keep-alive",
        ),
    ];
    for (load, name) in [
        (Load::Close, "one request per connection"),
        (Load::KeepAlive, "keep-alive"),
    ] {
        targets.push(ratio(
            totals,
            "dist-reuseport",
            "nginx",
            load,
            REUSEPORT_VS_NGINX,
            &format!("ours reuseport / nginx reuseport, req/s, {name}"),
        ));
        targets.push(ratio(
            totals,
            "dist-rr",
            "nginx",
            load,
            RR_VS_NGINX,
            &format!("ours rr / nginx reuseport, req/s, {name}"),
        ));
    }
    let latency_what = "rr p50 − reuseport p50, one connection at a time".to_string();
    let latency_goal = format!("≤ {LATENCY_US:.0} µs");
    targets.push(
        match (
            totals.get(&("dist-rr", Load::Single)),
            totals.get(&("dist-reuseport", Load::Single)),
        ) {
            (Some(rr), Some(rp)) => {
                let d = rr.p50_us() - rp.p50_us();
                Target {
                    what: latency_what,
                    measured: format!(
                        "**{d:+.0} µs** ({:.0} vs {:.0} µs)",
                        rr.p50_us(),
                        rp.p50_us()
                    ),
                    goal: latency_goal,
                    met: Some(d <= LATENCY_US),
                    straddles: false,
                }
            }
            _ => Target {
                what: latency_what,
                measured: "not measured".into(),
                goal: latency_goal,
                met: None,
                straddles: false,
            },
        },
    );
    // The primary's CPU per connection (short connections, rounds pooled).
    let cpu = |key: &str| {
        totals
            .get(&(key, Load::Close))
            .filter(|t| t.requests > 0)
            .map(|t| t.cpu_us / t.requests as f64)
    };
    let rr_cpu_what = "primary CPU per connection, rr, one request per connection".to_string();
    let rr_cpu_goal = format!("≤ {RR_CPU_US:.0} µs");
    targets.push(match cpu("dist-rr") {
        Some(us) => Target {
            what: rr_cpu_what,
            measured: format!("**{us:.1} µs**"),
            goal: rr_cpu_goal,
            met: Some(us <= RR_CPU_US),
            straddles: false,
        },
        None => Target {
            what: rr_cpu_what,
            measured: "not measured".into(),
            goal: rr_cpu_goal,
            met: None,
            straddles: false,
        },
    });
    for (a, b, goal, what) in [
        (
            "dist-rr",
            "plain-loop",
            VS_PLAIN_LOOP,
            "primary CPU per connection, rr / the plain loop",
        ),
        (
            "dist-node-rr",
            "node-rr",
            VS_NODE_PRIMARY,
            "primary CPU per connection, ours / Node's primary (Node app)",
        ),
    ] {
        let goal_text = format!("≤ {goal:.2}×");
        targets.push(match (cpu(a), cpu(b)) {
            (Some(x), Some(y)) if y > 0.0 => Target {
                what: what.to_string(),
                measured: format!("**{:.2}×** ({x:.1} vs {y:.1} µs)", x / y),
                goal: goal_text,
                met: Some(x / y <= goal),
                straddles: false,
            },
            _ => Target {
                what: what.to_string(),
                measured: "not measured".into(),
                goal: goal_text,
                met: None,
                straddles: false,
            },
        });
    }
    if let Some(m) = memory {
        let what = "primary RSS flat over the long run of short connections".to_string();
        let goal = format!("≤ {FLAT_KIB:+} KiB after its first second");
        targets.push(match m {
            Ok(m) => {
                let first_chunk = m.rss_chunks.first().copied().unwrap_or(m.rss_start);
                let last = m.rss_chunks.last().copied().unwrap_or(m.rss_start);
                let d = last as i64 - first_chunk as i64;
                Target {
                    what,
                    measured: format!(
                        "**{d:+} KiB** ({} → {} over {} connections)",
                        kib(first_chunk),
                        kib(last),
                        thousands(m.long_requests as f64)
                    ),
                    goal,
                    met: Some(d <= FLAT_KIB),
                    straddles: false,
                }
            }
            Err(_) => Target {
                what,
                measured: "failed".into(),
                goal,
                met: None,
                straddles: false,
            },
        });
    }
    let _ = writeln!(
        out,
        "\n### Targets\n\n| target | measured | goal | met |\n|---|---|---|---|"
    );
    for t in &targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}{} |",
            t.what,
            t.measured,
            t.goal,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            },
            if t.straddles {
                " (rounds on both sides)"
            } else {
                ""
            }
        );
    }

    // A lever weighed, not a target.
    if let (Some(u), Some(p)) = (cpu("uring-loop"), cpu("plain-loop")) {
        let _ = writeln!(
            out,
            "\nio_uring as a lever: the plain loop over io_uring costs **{:.2}×** the plain loop's primary CPU per connection ({u:.1} vs {p:.1} µs, 64 connections).",
            u / p
        );
    }

    // Notes.
    let n = s.workers;
    let _ = writeln!(
        out,
        "\n- distributor: `distributor --workers {n} --sched MODE --listen 127.0.0.1:PORT` \
         (the built-in demo worker, `Hello from worker <ID> (pid <PID>)`, 32 bytes); nginx: \
         `worker_processes {n}`, `listen 127.0.0.1:PORT reuseport`, `return 200 \
         \"{NGINX_BODY}\"` (17 bytes, `keepalive_requests 1000000`, `access_log off`; \
         its `nginx.conf` is next to the logs).\n\
         - share: each worker's part of the requests, the smallest and largest in any round \
         (ideal {:.1} %; nginx's answers do not name the worker).\n\
         - primary CPU: user + system time of the primary process (`/proc/PID/stat`, 10 ms \
         ticks) over the measured runs, per request served (with one request per connection, \
         per connection dispatched) and as % of one core. In the kernel modes the workers \
         accept, and the primary only reads what they report (the connections they took and \
         finished); nginx's master (in parentheses) takes no part in serving.",
        100.0 / n as f64
    );
    for (c, why) in &s.skipped {
        let _ = writeln!(out, "- {} skipped: {why}.", c.label_long());
    }
    if s.node.is_none() {
        let _ = writeln!(
            out,
            "- Node's cluster against this primary: `cargo bench --bench node_cluster` (needs `node`)."
        );
    }
    let mut others = totals.values().map(|t| t.others_pct).fold(0.0, f64::max);
    if let Some(Ok(m)) = memory {
        others = others.max(m.long_others_pct);
    }
    let _ = writeln!(
        out,
        "- Other processes on the machine used at most {others:.0} % of its CPU during a \
         measured run{}.\n- The whole bench took {:.0} s.",
        if others > BUSY_PCT {
            ": NOT QUIET, these figures are disturbed"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
    out
}

/// Why nginx (or Node) has no version in the header: it is missing, or no
/// contender needs it.
fn not_run(s: &Settings, nginx: bool) -> String {
    let missing = s.skipped.iter().any(|(c, _)| match c.program {
        Program::Nginx => nginx,
        Program::NodeCluster | Program::Distributor { node: true, .. } => !nginx,
        Program::Distributor { node: false, .. } | Program::PlainLoop { .. } => false,
    });
    if missing { "not installed" } else { "not run" }.to_string()
}

/// The first clause of an error (the log's tail is on stderr).
fn first(e: &str) -> String {
    e.split(';').next().unwrap_or("").replace('|', "\\|")
}

fn nginx_version(nginx: Option<&Path>) -> Option<String> {
    let out = Command::new(nginx?).arg("-v").output().ok()?;
    // `nginx version: nginx/1.22.1`, on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    Some(text.trim().rsplit(' ').next()?.to_string())
}

fn throughput_table(
    out: &mut String,
    contenders: &[&Contender],
    load: Load,
    totals: &BTreeMap<(&str, Load), Total>,
    failures: &BTreeMap<&str, String>,
) {
    let _ = writeln!(
        out,
        "| contender | req/s | rounds min–max | errors | p50 ms | p99 ms | share min–max % | primary CPU µs/req | primary CPU % |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for c in contenders {
        if let Some(e) = failures.get(c.key) {
            let _ = writeln!(out, "| {} | failed: {} | | | | | | | |", c.label, first(e));
            continue;
        }
        let Some(t) = totals.get(&(c.key, load)) else {
            continue;
        };
        let lo = t.rates.values().copied().fold(f64::INFINITY, f64::min);
        let hi = t.rates.values().copied().fold(0.0, f64::max);
        let ms = |q: f64| {
            if t.latency_us.is_empty() {
                "–".to_string()
            } else {
                format!("{:.2}", t.latency_us.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let share = if t.share_min.is_finite() {
            format!("{:.1}–{:.1}", t.share_min, t.share_max)
        } else {
            "–".to_string()
        };
        let per_req = figure(t.cpu_us / t.requests.max(1) as f64);
        let pct = format!(
            "{:.0}",
            100.0 * t.cpu_us / 1e6 / t.wall.as_secs_f64().max(1e-9)
        );
        let (per_req, pct) = if c.program == Program::Nginx {
            // Its master: no connection passes through it.
            (format!("({per_req})"), format!("({pct})"))
        } else {
            (per_req, pct)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}–{} | {} | {} | {} | {share} | {per_req} | {pct} |",
            c.label,
            thousands(t.median_rate()),
            thousands(lo),
            thousands(hi),
            t.errors,
            ms(0.5),
            ms(0.99),
        );
    }
}

/// The environment variable that makes this bench the plain-loop
/// contender, with its number of workers.
const PLAIN_LOOP_ENV: &str = "PERF_PLAIN_LOOP";
/// With [`PLAIN_LOOP_ENV`]: `1` for the loop over io_uring.
const PLAIN_LOOP_URING_ENV: &str = "PERF_PLAIN_LOOP_URING";

/// The reference the issue measures the primary against: the plainest
/// primary there is. It starts `workers` demo workers (the `distributor`
/// binary, speaking the protocol), listens on 127.0.0.1:$PORT, and on
/// each readiness of the listener accepts until `WouldBlock`, sending
/// each connection at once to the next worker in turn (one CONNECTION
/// per connection, a blocking `sendmsg` with `SCM_RIGHTS`) and closing
/// its copy right away. It keeps no ledger (a worker that dies loses what
/// it was sent), has no policy, no supervision and no metrics; it reads
/// and drops what workers send so that they never block on it. Workers
/// are told to send no completion reports. With `uring`, the loop is
/// [`uring_loop::run`] over the same workers.
fn plain_loop(workers: usize, uring: bool) -> Result<(), String> {
    use distributor::__private::{send_with_fds, seqpacket_pair};
    use distributor::protocol::{Encoder, MAX_MESSAGE};
    use mio::net::TcpListener;
    use mio::{Events, Interest, Poll, Token};
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::{AsFd, AsRawFd};

    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or("PORT is not set")?;
    let workers = workers.max(1);
    // Blocking until the mio loop takes it: io_uring waits for a
    // connection on a blocking listener rather than failing with EAGAIN.
    let std_listener = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| format!("bind: {e}"))?;
    let mut channels = Vec::with_capacity(workers);
    let mut children = Vec::with_capacity(workers);
    for id in 1..=workers {
        let (ours, theirs) = seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
        // Inherited by this worker only: close-on-exec is cleared for the
        // spawn and the parent's copy closed right after.
        fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| format!("fcntl: {e}"))?;
        let child = Command::new(DISTRIBUTOR)
            .env(distributor::demo::DEMO_WORKER_ENV, "1")
            .env("DISTRIBUTOR_FD", theirs.as_raw_fd().to_string())
            .env("DISTRIBUTOR_PROTOCOL", "1")
            .env("DISTRIBUTOR_WORKER_ID", id.to_string())
            .env("DISTRIBUTOR_REPORT_FINISHED", "0")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("worker: {e}"))?;
        children.push(child);
        drop(theirs);
        // Blocking: a send waits for room, as the plainest loop does;
        // receives use MSG_DONTWAIT.
        channels.push(ours);
    }
    if uring {
        // SIGTERM or SIGINT: a byte on this pair, which the ring polls.
        let (stop_rx, stop_tx) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        for sig in [libc::SIGTERM, libc::SIGINT] {
            signal_hook::low_level::pipe::register(
                sig,
                stop_tx.try_clone().map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("signals: {e}"))?;
        }
        let result = uring_loop::run(&std_listener, &channels, stop_rx.as_raw_fd(), port);
        drop(channels);
        for mut c in children {
            let _ = c.wait();
        }
        return result;
    }
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut listener = TcpListener::from_std(std_listener);
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    const LISTENER: Token = Token(usize::MAX);
    const SIGNALS: Token = Token(usize::MAX - 1);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    // SIGTERM: close the channels, so that the workers exit, and reap them.
    let mut signals = signal_hook_mio::v1_0::Signals::new([libc::SIGTERM, libc::SIGINT])
        .map_err(|e| format!("signals: {e}"))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    for (i, c) in channels.iter().enumerate() {
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&c.as_raw_fd()),
                Token(i),
                Interest::READABLE,
            )
            .map_err(|e| e.to_string())?;
    }
    let mut enc = Encoder::default();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let mut events = Events::with_capacity(256);
    let (mut next, mut id, mut hellos) = (0usize, 0u64, 0usize);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for event in events.iter() {
            if event.token() == SIGNALS {
                drop(channels);
                for mut c in children {
                    let _ = c.wait();
                }
                return Ok(());
            }
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            id += 1;
                            enc.connection().entry(id, peer);
                            let channel = channels[next].as_fd();
                            next = (next + 1) % channels.len();
                            send_with_fds(channel, enc.as_bytes(), &[stream.as_fd()], false)
                                .map_err(|e| format!("send: {e}"))?;
                            drop(stream);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                }
            } else {
                let channel = channels[event.token().0].as_fd();
                drain_channel(channel, &mut buf, &mut fds, &mut hellos, workers, port)?;
            }
        }
    }
}

/// What the plain loops do with what a worker sends: read all there is
/// (`WouldBlock` ends it) and drop it, counting HELLOs in `hellos` and
/// saying `plain loop: N workers ready` once all `workers` have said it.
/// An error when the worker closed its channel.
fn drain_channel(
    channel: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
    hellos: &mut usize,
    workers: usize,
    port: u16,
) -> Result<(), String> {
    loop {
        fds.clear();
        match distributor::__private::recv_with_fds(channel, buf, fds, true) {
            Ok(got) if got.len == 0 && fds.is_empty() => {
                return Err("a worker closed its channel".into());
            }
            Ok(got) => {
                if buf.first() == Some(&0x80) && got.len == 3 {
                    *hellos += 1;
                    if *hellos == workers {
                        eprintln!("plain loop: {workers} workers ready on 127.0.0.1:{port}");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
}
