//! One contender's rounds: samples, their totals and medians.

use super::*;

/// One measured run.
pub(crate) struct Sample {
    pub(crate) result: load::LoadResult,
    /// The primary's CPU time over the run, µs.
    pub(crate) cpu_us: f64,
    /// Wall time of the run, from before the first request to after the
    /// drain.
    pub(crate) wall: Duration,
    /// CPU used meanwhile by processes that are neither this bench (the
    /// load generator) nor the contender's, in % of the whole machine.
    pub(crate) others_pct: f64,
}

/// The measured runs of one contender and load, pooled over rounds.
pub(crate) struct Total {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) wall: Duration,
    pub(crate) cpu_us: f64,
    pub(crate) latency_us: Histogram<u64>,
    /// Smallest and largest share of one worker in any round, %.
    pub(crate) share_min: f64,
    pub(crate) share_max: f64,
    /// Requests/s of each round, by round.
    pub(crate) rates: BTreeMap<usize, f64>,
    /// p50 latency of each round, µs.
    pub(crate) p50s: Vec<u64>,
    /// The most CPU other processes used during a round, % of the machine.
    pub(crate) others_pct: f64,
}

impl Total {
    pub(crate) fn new() -> Total {
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

    pub(crate) fn add(&mut self, round: usize, s: &Sample, workers: usize) {
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
    pub(crate) fn median_rate(&self) -> f64 {
        median(self.rates.values().copied().collect())
    }

    pub(crate) fn p50_us(&self) -> f64 {
        if self.latency_us.is_empty() {
            f64::NAN
        } else {
            self.latency_us.value_at_quantile(0.5) as f64
        }
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Starts `c`, measures each of its loads, stops it.
pub(crate) fn run_contender(
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
