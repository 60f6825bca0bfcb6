//! `cargo bench --bench node_cluster`: the same unmodified Node app
//! ([benches/node/app.js](node/app.js), a plain `http.createServer(...)
//! .listen(PORT)`) under Node's own cluster primary and under distributor,
//! same worker count, same load, alternating in one run:
//!
//! - Node cluster `rr` and `none` ([benches/node/cluster_primary.js](node/cluster_primary.js),
//!   `NODE_CLUSTER_SCHED_POLICY`);
//! - `distributor --workers N --sched rr|shared|reuseport -- node benches/node/app.js`;
//! - one plain `node benches/node/app.js` process, for reference.
//!
//! Each contender gets a fresh primary and workers on a free port, serves
//! one request per connection (`Connection: close`) and then keep-alive,
//! each after a warm-up that is not counted, and is stopped (SIGTERM, then
//! SIGKILL to whatever is left: no node process outlives it). Rounds
//! alternate the order (A B C, then C B A) so that drift in the machine
//! hits every contender alike. Requests/s is the median of the rounds
//! (their range is shown too); latencies, errors and CPU are pooled.
//!
//! The machine should be quiet: the bench measures the CPU that other
//! processes use during each run (from `/proc/stat` less its own and the
//! contender's), measures a run again when they took more than
//! [`BUSY_PCT`] % of it, and says so in the table when they still did.
//!
//! Besides requests/s, latency and errors it reports the primary's CPU per
//! request: `utime + stime` of the primary process (`/proc/PID/stat`)
//! over the measured run, divided by the requests served. With one request
//! per connection that is the cost of dispatching one connection.
//!
//! The output is a markdown table, ready for the README. Nothing runs
//! unless cargo passes `--bench`, and without `node` on PATH the bench says
//! so and exits 0.
//!
//! Settings (environment):
//! - `NODE_BENCH_WORKERS`: workers per contender (default: the CPUs);
//! - `NODE_BENCH_CONNECTIONS`: concurrent connections (default 64);
//! - `NODE_BENCH_SECONDS`: measured seconds per contender, load and round
//!   (default 2, fractions allowed);
//! - `NODE_BENCH_ROUNDS`: rounds (default 3);
//! - `NODE_BENCH_WARMUP_MS`: warm-up before each measured run (default 500);
//! - `NODE_BENCH_RETRIES`: how many times a run disturbed by other
//!   processes is measured again (default 2; the least disturbed counts);
//! - `NODE_BENCH_CONTENDERS`: a comma-separated subset of `node-rr`,
//!   `node-none`, `dist-rr`, `dist-shared`, `dist-reuseport`, `plain`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distributor::lab::{self, load};
use hdrhistogram::Histogram;

#[path = "common/procs.rs"]
mod procs;
use procs::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const APP: &str = "benches/node/app.js";
const CLUSTER_PRIMARY: &str = "benches/node/cluster_primary.js";
/// How long a contender may take to serve, all its workers listening.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Above this much CPU used by other processes during a run (% of the
/// machine), the figures are flagged.
const BUSY_PCT: f64 = 10.0;
/// Load generator threads, as in `benches/balance.rs`.
const LOAD_THREADS: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `node cluster_primary.js N` with this `NODE_CLUSTER_SCHED_POLICY`.
    Cluster(&'static str),
    /// `distributor --workers N --sched MODE -- node app.js`.
    Distributor(&'static str),
    /// One `node app.js`.
    Plain,
}

#[derive(Debug, Clone, Copy)]
struct Contender {
    /// For `NODE_BENCH_CONTENDERS`.
    key: &'static str,
    /// For the table.
    label: &'static str,
    kind: Kind,
}

/// In table order; a round runs them in this order or reversed.
const CONTENDERS: [Contender; 6] = [
    Contender {
        key: "node-rr",
        label: "Node cluster rr",
        kind: Kind::Cluster("rr"),
    },
    Contender {
        key: "node-none",
        label: "Node cluster none",
        kind: Kind::Cluster("none"),
    },
    Contender {
        key: "dist-rr",
        label: "distributor rr",
        kind: Kind::Distributor("rr"),
    },
    Contender {
        key: "dist-shared",
        label: "distributor shared",
        kind: Kind::Distributor("shared"),
    },
    Contender {
        key: "dist-reuseport",
        label: "distributor reuseport",
        kind: Kind::Distributor("reuseport"),
    },
    Contender {
        key: "plain",
        label: "plain node (1 process)",
        kind: Kind::Plain,
    },
];

struct Settings {
    workers: usize,
    connections: usize,
    seconds: f64,
    rounds: usize,
    warmup: Duration,
    retries: usize,
    contenders: Vec<Contender>,
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("node_cluster: {name}={v:?} does not parse");
            std::process::exit(2);
        }),
    }
}

impl Settings {
    fn from_env() -> Settings {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let contenders = match std::env::var("NODE_BENCH_CONTENDERS") {
            Err(_) => CONTENDERS.to_vec(),
            Ok(list) => {
                let keys: BTreeSet<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .collect();
                for k in &keys {
                    if !CONTENDERS.iter().any(|c| c.key == *k) {
                        let known: Vec<&str> = CONTENDERS.iter().map(|c| c.key).collect();
                        eprintln!(
                            "node_cluster: unknown contender {k:?} in NODE_BENCH_CONTENDERS; known: {}",
                            known.join(", ")
                        );
                        std::process::exit(2);
                    }
                }
                CONTENDERS
                    .iter()
                    .filter(|c| keys.contains(c.key))
                    .copied()
                    .collect()
            }
        };
        let s = Settings {
            workers: setting("NODE_BENCH_WORKERS", cores),
            connections: setting("NODE_BENCH_CONNECTIONS", 64),
            seconds: setting("NODE_BENCH_SECONDS", 2.0),
            rounds: setting("NODE_BENCH_ROUNDS", 3),
            warmup: Duration::from_millis(setting("NODE_BENCH_WARMUP_MS", 500)),
            retries: setting("NODE_BENCH_RETRIES", 2),
            contenders,
        };
        if s.workers == 0
            || s.connections == 0
            || s.rounds == 0
            || s.contenders.is_empty()
            || !(s.seconds > 0.0 && s.seconds.is_finite())
        {
            eprintln!(
                "node_cluster: workers, connections, seconds, rounds and contenders must not be 0"
            );
            std::process::exit(2);
        }
        s
    }

    fn workers_of(&self, kind: Kind) -> usize {
        if kind == Kind::Plain { 1 } else { self.workers }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let node_version = match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => {
            println!("node_cluster: `node` is not on PATH (or does not run): nothing to compare");
            return;
        }
    };
    let settings = Settings::from_env();
    let logs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("node_cluster");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        eprintln!("node_cluster: cannot create {}: {e}", logs.display());
        std::process::exit(1);
    }
    // Only this run's logs: an earlier run with more rounds left others.
    for entry in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    eprintln!(
        "node_cluster: {} contenders × 2 loads × {} rounds of {} s (+ {:?} warm-up); node {node_version}; logs in {}",
        settings.contenders.len(),
        settings.rounds,
        settings.seconds,
        settings.warmup,
        logs.display()
    );

    let mut totals: BTreeMap<(&str, bool), Total> = BTreeMap::new();
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
            match run_contender(&settings, c, &log) {
                Ok(samples) => {
                    for (keepalive, sample) in samples {
                        eprintln!(
                            "  round {} {:<24} {:<10} {:>8.0} req/s  errors {}  primary CPU {:.1} µs/req  others {:.0} %{}",
                            round + 1,
                            c.label,
                            load_name(keepalive),
                            sample.result.requests as f64 / sample.result.elapsed.as_secs_f64(),
                            sample.result.errors,
                            sample.cpu_us / sample.result.requests.max(1) as f64,
                            sample.others_pct,
                            if sample.others_pct > BUSY_PCT {
                                "  (the machine is not quiet)"
                            } else {
                                ""
                            }
                        );
                        totals
                            .entry((c.key, keepalive))
                            .or_insert_with(Total::new)
                            .add(&sample, settings.workers_of(c.kind));
                    }
                }
                Err(e) => {
                    eprintln!("  round {} {}: FAILED: {e}", round + 1, c.label);
                    failures.insert(c.key, e);
                }
            }
        }
    }
    println!("{}", markdown(&settings, &node_version, &totals, &failures));
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

fn load_name(keepalive: bool) -> &'static str {
    if keepalive { "keep-alive" } else { "close" }
}

/// One measured run.
struct Sample {
    result: load::LoadResult,
    /// The primary's CPU time over the run, µs.
    cpu_us: f64,
    /// The workers' CPU time over the run, all together, µs.
    workers_cpu_us: f64,
    /// Wall time of the run, from before the first request to after the
    /// drain.
    wall: Duration,
    /// CPU used meanwhile by processes that are neither this bench (the
    /// load generator) nor the contender's, in % of the whole machine:
    /// how far from quiet the machine was.
    others_pct: f64,
}

/// The measured runs of one contender and load, pooled over rounds.
struct Total {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    wall: Duration,
    cpu_us: f64,
    workers_cpu_us: f64,
    latency_us: Histogram<u64>,
    /// Smallest and largest share of one worker in any round, %.
    share_min: f64,
    share_max: f64,
    /// Requests/s of each round.
    rates: Vec<f64>,
    /// The most CPU other processes used during a round, % of the machine.
    others_pct: f64,
}

impl Total {
    fn new() -> Total {
        Total {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            wall: Duration::ZERO,
            cpu_us: 0.0,
            workers_cpu_us: 0.0,
            latency_us: Histogram::new_with_max(3_600_000_000, 3).expect("a valid histogram"),
            share_min: f64::INFINITY,
            share_max: 0.0,
            rates: Vec::new(),
            others_pct: 0.0,
        }
    }

    fn add(&mut self, s: &Sample, workers: usize) {
        let r = &s.result;
        self.requests += r.requests;
        self.errors += r.errors;
        self.elapsed += r.elapsed;
        self.wall += s.wall;
        self.cpu_us += s.cpu_us;
        self.workers_cpu_us += s.workers_cpu_us;
        self.rates
            .push(r.requests as f64 / r.elapsed.as_secs_f64().max(1e-9));
        self.others_pct = self.others_pct.max(s.others_pct);
        let _ = self.latency_us.add(&r.latency_us);
        // The bodies name the process that answered (`worker <pid>`).
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
        let mut r = self.rates.clone();
        r.sort_by(f64::total_cmp);
        match r.len() {
            0 => 0.0,
            n if n % 2 == 1 => r[n / 2],
            n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
        }
    }
}

/// Starts `c`, measures short connections then keep-alive, stops it.
fn run_contender(s: &Settings, c: Contender, log: &Path) -> Result<Vec<(bool, Sample)>, String> {
    let mut server = Server::start(s, c, log)?;
    let mut samples = Vec::with_capacity(2);
    let outcome = (|| {
        server.wait_ready()?;
        for keepalive in [false, true] {
            // A run disturbed by other processes is measured again (the
            // warm-up too), up to `retries` times; the least disturbed
            // one counts.
            let mut best = server.measure(s, keepalive)?;
            for _ in 0..s.retries {
                if best.others_pct <= BUSY_PCT {
                    break;
                }
                eprintln!(
                    "  {} {}: other processes took {:.0} % of the CPU: measuring again",
                    c.label,
                    load_name(keepalive),
                    best.others_pct
                );
                let again = server.measure(s, keepalive)?;
                if again.others_pct < best.others_pct {
                    best = again;
                }
            }
            samples.push((keepalive, best));
        }
        Ok(())
    })();
    let warnings = server.stop();
    for w in &warnings {
        eprintln!("  {}: {w}", c.label);
    }
    outcome.map(|()| samples)
}

/// A running contender: its primary (or the one plain process), in a
/// process group of its own.
struct Server {
    contender: Contender,
    workers: usize,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    stopped: bool,
}

impl Server {
    fn start(s: &Settings, c: Contender, log: &Path) -> Result<Server, String> {
        let port = free_port()?;
        let workers = s.workers_of(c.kind);
        let mut cmd = match c.kind {
            Kind::Cluster(policy) => {
                let mut cmd = Command::new("node");
                cmd.arg(CLUSTER_PRIMARY)
                    .arg(workers.to_string())
                    .env("NODE_CLUSTER_SCHED_POLICY", policy);
                cmd
            }
            Kind::Distributor(sched) => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_distributor"));
                cmd.args(["--workers", &workers.to_string(), "--sched", sched])
                    .args(["--shutdown-timeout", "3s", "--", "node", APP])
                    .env_remove("NODE_CLUSTER_SCHED_POLICY");
                cmd
            }
            Kind::Plain => {
                let mut cmd = Command::new("node");
                cmd.arg(APP).env_remove("NODE_CLUSTER_SCHED_POLICY");
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
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        own_group(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        Ok(Server {
            contender: c,
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

    /// What the log says once every worker serves.
    fn ready_marker(&self) -> Option<String> {
        let n = self.workers;
        match self.contender.kind {
            Kind::Cluster(_) => Some(format!("{n} workers listening on")),
            Kind::Distributor(_) => Some(format!("{n} of {n} slots ready")),
            Kind::Plain => None,
        }
    }

    /// Waits (bounded) until a request succeeds and every worker serves;
    /// then checks that the primary itself holds the listening socket,
    /// i.e. that the app's `listen(PORT)` went through the primary.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let marker = self.ready_marker();
        let mut last_error;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "exited before serving ({status}); {}",
                    self.log_tail()
                ));
            }
            match probe(self.addr) {
                Ok(_) => {
                    if marker.as_ref().is_none_or(|m| self.log_text().contains(m)) {
                        break;
                    }
                    last_error = format!(
                        "serves, but the log has no {:?} yet",
                        marker.as_deref().unwrap_or_default()
                    );
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
            std::thread::sleep(Duration::from_millis(50));
        }
        if !holds_listener(self.pid(), self.addr.port()) {
            return Err(format!(
                "pid {} holds no socket listening on {}: the app did not listen through it; {}",
                self.pid(),
                self.addr,
                self.log_tail()
            ));
        }
        let family = descendants(self.pid());
        if self.contender.kind != Kind::Plain && family.len() != self.workers {
            eprintln!(
                "  {}: warning: {} processes under the primary, {} workers expected",
                self.contender.label,
                family.len(),
                self.workers
            );
        }
        Ok(())
    }

    /// A warm-up, then the measured run with the primary's CPU time read
    /// before and after.
    fn measure(&mut self, s: &Settings, keepalive: bool) -> Result<Sample, String> {
        let mut spec = load::LoadSpec {
            addr: self.addr,
            connections: s.connections,
            duration: s.warmup,
            keepalive,
            path: "/".into(),
            threads: LOAD_THREADS,
            slow: None,
            sessions: None,
        };
        if !s.warmup.is_zero() {
            load::run_load(&spec, &|_, _| {}).map_err(|e| format!("load generator: {e}"))?;
        }
        spec.duration = Duration::from_secs_f64(s.seconds);
        let (result, cpu) = measure_cpu(self.pid(), || {
            load::run_load(&spec, &|_, _| {}).map_err(|e| format!("load generator: {e}"))
        })?;
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "exited during the {} run ({status}); {}",
                load_name(keepalive),
                self.log_tail()
            ));
        }
        Ok(Sample {
            result,
            cpu_us: cpu.primary_us,
            workers_cpu_us: cpu.workers_us,
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

fn markdown(
    s: &Settings,
    node_version: &str,
    totals: &BTreeMap<(&str, bool), Total>,
    failures: &BTreeMap<&str, String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured with `cargo bench --bench node_cluster` on {}, Node {node_version}: \
         {} workers, {} connections, {} rounds × {} s per contender and load (order \
         alternating between rounds, a {} ms warm-up before each run not counted; \
         req/s is the median of the rounds), load generator ({LOAD_THREADS} threads) \
         on the same machine.",
        lab::machine_description(),
        s.workers,
        s.connections,
        s.rounds,
        s.seconds,
        s.warmup.as_millis()
    );
    for keepalive in [false, true] {
        let _ = writeln!(
            out,
            "\n{}:\n",
            if keepalive {
                "Keep-alive"
            } else {
                "One request per connection (`Connection: close`)"
            }
        );
        let _ = writeln!(
            out,
            "| contender | req/s | rounds min–max | errors | p50 ms | p99 ms | share min–max % | primary CPU µs/req | primary CPU % | workers CPU µs/req |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for c in &s.contenders {
            if let Some(e) = failures.get(c.key) {
                // The first clause: the log's tail is on stderr.
                let first = e.split(';').next().unwrap_or("");
                let _ = writeln!(
                    out,
                    "| {} | failed: {} | | | | | | | | |",
                    c.label,
                    first.replace('|', "\\|")
                );
                continue;
            }
            let Some(t) = totals.get(&(c.key, keepalive)) else {
                continue;
            };
            let lo = t.rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = t.rates.iter().copied().fold(0.0, f64::max);
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
            let per_req = t.cpu_us / t.requests.max(1) as f64;
            let pct = 100.0 * t.cpu_us / 1e6 / t.wall.as_secs_f64().max(1e-9);
            let figure = |v: f64| {
                if v < 10.0 {
                    format!("{v:.2}")
                } else {
                    format!("{v:.1}")
                }
            };
            let per_req = figure(per_req);
            let workers_per_req = if c.kind == Kind::Plain {
                "–".to_string()
            } else {
                figure(t.workers_cpu_us / t.requests.max(1) as f64)
            };
            let (per_req, pct) = if c.kind == Kind::Plain {
                // No primary: the process that serves, for comparison.
                (format!("({per_req})"), format!("({pct:.0})"))
            } else {
                (per_req, format!("{pct:.0}"))
            };
            let _ = writeln!(
                out,
                "| {} | {} | {}–{} | {} | {} | {} | {share} | {per_req} | {pct} | {workers_per_req} |",
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
    let n = s.workers;
    let _ = writeln!(
        out,
        "\n- Node cluster: `NODE_CLUSTER_SCHED_POLICY=rr|none node {CLUSTER_PRIMARY} {n}`; \
         distributor: `distributor --workers {n} --sched rr|shared|reuseport -- node {APP}`; \
         plain: `node {APP}`. The same unmodified app everywhere, `PORT` a free port.\n\
         - share: each worker process's part of the requests, the smallest and largest in any \
         round (ideal {:.1} % each).\n\
         - primary CPU: user + system time of the primary process (`/proc/PID/stat`, 10 ms \
         ticks) over the measured run, per request served (with `Connection: close`, per \
         connection dispatched) and as % of one core. In parentheses for the plain process: \
         its own CPU, serving included. workers CPU: the same for all the worker processes \
         together.",
        100.0 / n as f64
    );
    let others = totals.values().map(|t| t.others_pct).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "- Other processes on the machine used at most {others:.0} % of its CPU during a \
         measured run{}.",
        if others > BUSY_PCT {
            ": NOT QUIET, these figures are disturbed"
        } else {
            ""
        }
    );
    out
}
