//! The lab: runs an app under each scheduling mode in turn on a loopback
//! port, drives it with the built-in load generator, and reports requests
//! per second, latency percentiles, errors, each worker's share and Jain's
//! fairness index, so that round-robin and kernel balancing can be compared
//! on the user's own app and workload.
//!
//! Each mode gets a fresh primary (this library, in this process, on its
//! own thread) and fresh workers, a short warm-up that is not counted, then
//! the measured run. Per-worker shares come from the response bodies when
//! they name the worker (the demo worker's `Hello from worker <ID>`), else
//! from the primary's own figures (connections per worker: counted by the
//! primary in rr, reported by workers that speak the protocol in the
//! kernel modes).
//!
//! - [`load`]: the load generator (mio, a few threads, keep-alive or one
//!   request per connection).
//!   - `driver`: one generator thread, its connections and its `Poll`.
//!   - `response`: the incremental HTTP/1.1 response parser.
//! - [`report`]: the figures, and the table and JSON outputs.
//!   - `svg`: the SVG chart.

mod driver;
pub mod load;
pub mod report;
mod response;
mod spec;
mod svg;

pub use svg::svg;

use std::fmt;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use crate::primary::{Event, Primary, PrimaryError, Sched, Steer, WorkerCommand};
use load::{LoadSpec, SlowShare};
use report::ModeReport;

/// A mode the lab runs: a [`Sched`], and for reuseport its kernel
/// steering. Named as `compare --sched` takes it: the sched's name, or
/// `reuseport+steer` (alias `steer`) for `--sched reuseport --steer rr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabMode {
    /// Who accepts and balances.
    pub sched: Sched,
    /// Kernel steering (reuseport only).
    pub steer: Steer,
    /// `--sticky cookie:sid` (the lab's sessions send that cookie).
    pub sticky: bool,
}

impl From<Sched> for LabMode {
    fn from(sched: Sched) -> LabMode {
        LabMode {
            sched,
            steer: Steer::Off,
            sticky: false,
        }
    }
}

impl std::fmt::Display for LabMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.sched.name())?;
        if self.steer != Steer::Off {
            write!(f, "+steer-{}", self.steer)?;
        }
        if self.sticky {
            f.write_str("+sticky")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LabMode {
    type Err = String;
    fn from_str(s: &str) -> Result<LabMode, String> {
        match s {
            "steer" | "reuseport+steer" | "reuseport+steer-rr" => Ok(LabMode {
                sched: Sched::ReusePort,
                steer: Steer::RoundRobin,
                sticky: false,
            }),
            s if s.ends_with("+sticky") => {
                let sched: Sched = s.trim_end_matches("+sticky").parse()?;
                if sched.is_kernel() {
                    return Err(format!("'{s}': sticky sessions need rr, least-conn or p2c"));
                }
                Ok(LabMode {
                    sched,
                    steer: Steer::Off,
                    sticky: true,
                })
            }
            _ => s.parse::<Sched>().map(LabMode::from).map_err(|e| {
                format!("{e}; or reuseport+steer (reuseport steered by BPF, root only)")
            }),
        }
    }
}

/// What to compare, and how hard to drive it.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Worker processes per mode.
    pub workers: usize,
    /// The modes to run, in order.
    pub scheds: Vec<LabMode>,
    /// Measured time per mode.
    pub duration: Duration,
    /// Concurrent client connections.
    pub connections: usize,
    /// Many requests per connection (else one each).
    pub keepalive: bool,
    /// The path to GET.
    pub path: String,
    /// Load generator threads.
    pub threads: usize,
    /// A share of requests sent to another path (a heterogeneous workload).
    pub slow: Option<SlowShare>,
    /// Clients with sessions (`Cookie: sid=...`), a few heavy ones.
    pub sessions: Option<load::Sessions>,
    /// The app the workers run.
    pub command: WorkerCommand,
}

/// Where a mode's run stands, for a progress display.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// Starting the workers of this mode.
    Starting {
        /// The mode.
        mode: LabMode,
    },
    /// Measuring: time elapsed and requests completed so far.
    Running {
        /// The mode.
        mode: LabMode,
        /// Measured so far.
        elapsed: Duration,
        /// To measure in all.
        total: Duration,
        /// Requests completed so far.
        requests: u64,
    },
    /// The mode is done.
    Done {
        /// Its figures.
        report: &'a ModeReport,
    },
}

/// Why a comparison could not run.
#[derive(Debug)]
#[non_exhaustive]
pub enum LabError {
    /// The primary could not start (bad command, no port, ...).
    Primary(PrimaryError),
    /// The workers did not become ready in time.
    NotReady {
        /// The mode.
        mode: LabMode,
        /// Workers that became ready.
        ready: usize,
        /// Workers started.
        wanted: usize,
    },
    /// The load generator failed to run at all.
    Io(std::io::Error),
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LabError::Primary(e) => write!(f, "{e}"),
            LabError::NotReady {
                mode,
                ready,
                wanted,
            } => write!(
                f,
                "in {mode} mode only {ready} of {wanted} workers became ready within {READY_TIMEOUT:?}"
            ),
            LabError::Io(e) => write!(f, "load generator: {e}"),
        }
    }
}

impl std::error::Error for LabError {}

/// How long a mode's workers may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs every mode of `opts.scheds` in turn; one report per mode.
///
/// # Errors
/// When a mode's primary cannot start, its workers do not become ready, or
/// the generator cannot run. Request errors are counted, not fatal.
pub fn compare(
    opts: &CompareOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<ModeReport>, LabError> {
    let mut reports = Vec::with_capacity(opts.scheds.len());
    for &mode in &opts.scheds {
        progress(Progress::Starting { mode });
        let report = run_mode(opts, mode, progress)?;
        progress(Progress::Done { report: &report });
        reports.push(report);
    }
    Ok(reports)
}

fn run_mode(
    opts: &CompareOptions,
    mode: LabMode,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ModeReport, LabError> {
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut primary = Primary::builder()
        .workers(opts.workers)
        .listen(listen)
        .sched(mode.sched)
        .steer(mode.steer)
        .sticky(
            mode.sticky
                .then(|| crate::primary::Sticky::Cookie("sid".into())),
        )
        .command(opts.command.clone())
        .handle_signals(false)
        .shutdown_timeout(Duration::from_secs(3))
        .hello_timeout(Duration::from_secs(3))
        .build()
        .map_err(LabError::Primary)?;
    let addr = primary.local_addr();
    let events = primary.events();
    let handle = primary.handle();
    let runner = thread::spawn(move || primary.run());
    let stop = |handle: &crate::Handle| {
        let _ = handle.shutdown();
    };

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut ready = 0;
    while ready < opts.workers {
        match events.recv_deadline(deadline) {
            Ok(Event::WorkerReady { .. }) => ready += 1,
            Ok(_) => {}
            Err(_) => {
                stop(&handle);
                let _ = runner.join();
                return Err(LabError::NotReady {
                    mode,
                    ready,
                    wanted: opts.workers,
                });
            }
        }
    }

    // Node apps listen where they say: drive the first listener the
    // primary bound for them (loopback if they asked for any address).
    let addr = match handle
        .stats()
        .ok()
        .and_then(|s| s.listeners.first().copied())
    {
        Some(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        Some(a) => a,
        None => addr,
    };
    let mut spec = LoadSpec {
        addr,
        connections: opts.connections,
        duration: (opts.duration / 5).min(Duration::from_millis(500)),
        keepalive: opts.keepalive,
        path: opts.path.clone(),
        threads: opts.threads,
        slow: opts.slow.clone(),
        sessions: opts.sessions,
    };
    // Warm-up, not counted: connections, caches and the workers' first
    // allocations.
    let warm = load::run_load(&spec, &|_, _| {}).map_err(LabError::Io);
    if let Err(e) = warm {
        stop(&handle);
        let _ = runner.join();
        return Err(e);
    }
    // In the kernel modes workers report what they accept within 100 ms:
    // let the figures settle before each snapshot.
    let settle = || {
        if mode.sched.is_kernel() {
            thread::sleep(Duration::from_millis(250));
        }
    };
    settle();
    let before = handle.stats().ok();
    spec.duration = opts.duration;
    let total = opts.duration;
    let (tx, rx) = crossbeam_channel::unbounded();
    let result = thread::scope(|scope| {
        let generator = scope.spawn(|| {
            load::run_load(&spec, &|elapsed, requests| {
                let _ = tx.send((elapsed, requests));
            })
        });
        while !generator.is_finished() {
            if let Ok((elapsed, requests)) = rx.recv_timeout(Duration::from_millis(200)) {
                progress(Progress::Running {
                    mode,
                    elapsed,
                    total,
                    requests,
                });
            }
        }
        generator.join().expect("the load generator does not panic")
    });
    settle();
    let after = handle.stats().ok();
    stop(&handle);
    let _ = runner.join();
    let mut result = result.map_err(LabError::Io)?;

    let after = after.unwrap_or_else(|| crate::Stats::empty(mode.sched, addr));
    let ids: Vec<u64> = after
        .workers
        .iter()
        .filter(|w| !w.stopping)
        .map(|w| w.id)
        .collect();
    // Connections each worker took during the measured run, from the
    // primary's figures.
    let mut connections = std::collections::BTreeMap::new();
    for w in &after.workers {
        let earlier = before
            .as_ref()
            .and_then(|b| b.workers.iter().find(|x| x.id == w.id))
            .map_or(0, |x| x.connections);
        let n = w.connections.saturating_sub(earlier);
        if n > 0 {
            connections.insert(w.id, n);
        }
    }
    if result.per_worker.is_empty() {
        // The bodies do not name workers: shares of connections, not of
        // requests.
        result.per_worker = connections.clone();
    }
    let report = ModeReport::new(&mode.to_string(), opts.workers, &result, &ids);
    Ok(if opts.keepalive {
        report.with_connections(&connections)
    } else {
        report
    })
}

/// A line naming this machine: CPU model, cores, kernel.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}")
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    #[test]
    fn lab_modes_parse_and_print_as_compare_takes_them() {
        for name in [
            "rr",
            "least-conn",
            "p2c",
            "shared",
            "reuseport",
            "reuseport+steer-rr",
            "rr+sticky",
            "p2c+sticky",
        ] {
            let mode: LabMode = name.parse().unwrap();
            assert_eq!(mode.to_string(), name);
        }
        let steer: LabMode = "steer".parse().unwrap();
        assert_eq!(
            (steer.sched, steer.steer),
            (Sched::ReusePort, Steer::RoundRobin)
        );
        let e = "fast".parse::<LabMode>().unwrap_err();
        assert!(e.contains("reuseport+steer"), "{e}");
    }
}
