//! The lab's figures and their three outputs: a plain-text table for the
//! terminal, a JSON document for scripts, and an SVG chart for people (drawn
//! in its own module, `lab::svg`).
//!
//! Fairness is shown two ways, because kernel balancing is uneven in ways a
//! mean hides: each worker's share of the requests (the table gives the
//! smallest and the largest, the chart every one against the ideal `1/N`),
//! and Jain's fairness index, one number from `1/N` (one worker served
//! everything) to 1 (all served as many).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde::Serialize;

use super::load::LoadResult;

/// The figures of one run (one scheduling mode).
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// The scheduling mode, e.g. `rr`, `shared`, `reuseport`.
    pub mode: String,
    /// How many workers were running.
    pub workers: usize,
    /// Requests answered with a 2xx status.
    pub requests: u64,
    /// Failed requests (see [`LoadResult::errors`]).
    pub errors: u64,
    /// `requests` over the measured wall time.
    pub requests_per_sec: f64,
    /// Median latency, µs (0 when no request succeeded).
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// One entry per worker, those that served nothing included, by id.
    pub per_worker: Vec<WorkerShare>,
    /// The smallest share of any worker, % (0 without per-worker data).
    pub share_min_pct: f64,
    /// The largest share of any worker, % (0 without per-worker data).
    pub share_max_pct: f64,
    /// Jain's fairness index over `per_worker` (see [`jain`]); 0 without
    /// per-worker data.
    pub jain: f64,
    /// With keep-alive: the smallest and largest share of the run's
    /// connections any worker took, % (from the primary's figures; see
    /// [`ModeReport::with_connections`]). A connection is placed once and
    /// then carries requests for the whole run, so this is how the mode
    /// balanced, and the request shares how fast each worker served its
    /// connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_share_pct: Option<(f64, f64)>,
}

/// What one worker served in a run.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerShare {
    /// The worker id, as its responses name it.
    pub id: u64,
    /// Requests it answered with a 2xx status.
    pub requests: u64,
    /// Its part of the requests attributed to a worker, %.
    pub share_pct: f64,
    /// Connections it took during the run, when known (keep-alive runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

impl ModeReport {
    /// The figures of `result`, a run of `workers` workers in `mode`.
    ///
    /// `worker_ids`: the workers that were running, so that one that got
    /// nothing counts, as 0. Ids seen in `result.per_worker` but not in
    /// `worker_ids` (a worker replaced during the run) are added too.
    ///
    /// Shares are of the requests attributed to a worker, which is all of
    /// them when every body names its worker. Without any per-worker data
    /// (bodies that never match `worker <ID>`), every share, the min, the
    /// max and Jain's index are 0: [`ModeReport::has_shares`] tells.
    pub fn new(mode: &str, workers: usize, result: &LoadResult, worker_ids: &[u64]) -> ModeReport {
        let ids: BTreeSet<u64> = worker_ids
            .iter()
            .copied()
            .chain(result.per_worker.keys().copied())
            .collect();
        let counts: Vec<(u64, u64)> = ids
            .iter()
            .map(|&id| (id, result.per_worker.get(&id).copied().unwrap_or(0)))
            .collect();
        let attributed: u64 = counts.iter().map(|&(_, n)| n).sum();
        let per_worker: Vec<WorkerShare> = counts
            .iter()
            .map(|&(id, requests)| WorkerShare {
                id,
                requests,
                share_pct: if attributed == 0 {
                    0.0
                } else {
                    requests as f64 * 100.0 / attributed as f64
                },
                connections: None,
            })
            .collect();
        let (share_min_pct, share_max_pct) = if attributed == 0 {
            (0.0, 0.0)
        } else {
            per_worker
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), w| {
                    (lo.min(w.share_pct), hi.max(w.share_pct))
                })
        };
        let counts: Vec<u64> = counts.iter().map(|&(_, n)| n).collect();
        let secs = result.elapsed.as_secs_f64();
        let quantile = |q: f64| {
            if result.latency_us.is_empty() {
                0.0
            } else {
                result.latency_us.value_at_quantile(q) as f64
            }
        };
        ModeReport {
            mode: mode.to_string(),
            workers,
            requests: result.requests,
            errors: result.errors,
            requests_per_sec: if secs > 0.0 {
                result.requests as f64 / secs
            } else {
                0.0
            },
            p50_us: quantile(0.5),
            p99_us: quantile(0.99),
            p999_us: quantile(0.999),
            per_worker,
            share_min_pct,
            share_max_pct,
            jain: jain(&counts),
            conn_share_pct: None,
        }
    }

    /// Adds the connections each worker took during the run (`counts`, by
    /// worker id; a worker missing from it took none) and their smallest
    /// and largest share. Nothing changes when no connection was counted.
    pub fn with_connections(mut self, counts: &std::collections::BTreeMap<u64, u64>) -> ModeReport {
        let total: u64 = counts.values().sum();
        if total == 0 || self.per_worker.is_empty() {
            return self;
        }
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for w in &mut self.per_worker {
            let n = counts.get(&w.id).copied().unwrap_or(0);
            w.connections = Some(n);
            let pct = n as f64 * 100.0 / total as f64;
            (lo, hi) = (lo.min(pct), hi.max(pct));
        }
        self.conn_share_pct = Some((lo, hi));
        self
    }

    /// Whether any request was attributed to a worker, i.e. whether the
    /// shares and Jain's index mean something.
    pub fn has_shares(&self) -> bool {
        self.per_worker.iter().any(|w| w.requests > 0)
    }
}

/// Jain's fairness index of `counts`: `(Σx)² / (n·Σx²)`.
///
/// 1.0 when all are equal, `1/n` when one has everything; `k/n` when `k`
/// share equally and the rest get nothing. For no counts or all zeros the
/// index is undefined (0/0); this returns 0.0 then, a value no real
/// distribution gives, so that it reads as "no data" rather than as fair.
pub fn jain(counts: &[u64]) -> f64 {
    let sum: f64 = counts.iter().map(|&x| x as f64).sum();
    let squares: f64 = counts.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if counts.is_empty() || squares == 0.0 {
        return 0.0;
    }
    sum * sum / (counts.len() as f64 * squares)
}

/// The settings of a comparison, printed above the figures.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// The machine, e.g. `Linux 6.8, 2 CPUs` (free text).
    pub machine: String,
    /// The app command that was run (free text).
    pub command: String,
    /// Workers per run.
    pub workers: usize,
    /// Concurrent connections of the load generator.
    pub connections: usize,
    /// Load duration per mode, seconds.
    pub duration_s: f64,
    /// Kept-alive connections (`true`) or one request per connection.
    pub keepalive: bool,
    /// The request path.
    pub path: String,
    /// CPU cores of the machine (0 when unknown).
    pub cores: usize,
}

impl Meta {
    /// One line naming the settings, shared by the table and the chart.
    pub(super) fn settings(&self) -> String {
        format!(
            "{} workers, {} connections, {} s per mode, {}, GET {}",
            self.workers,
            self.connections,
            self.duration_s,
            if self.keepalive {
                "keep-alive"
            } else {
                "new connection per request"
            },
            self.path
        )
    }
}

/// Latencies are shown in µs while they are small, in ms otherwise.
fn latency_unit(reports: &[ModeReport]) -> (&'static str, f64) {
    let max = reports.iter().map(|r| r.p999_us).fold(0.0, f64::max);
    if max < 10_000.0 {
        ("µs", 1.0)
    } else {
        ("ms", 1000.0)
    }
}

fn format_latency(us: f64, divisor: f64) -> String {
    if divisor == 1.0 {
        format!("{us:.0}")
    } else {
        format!("{:.2}", us / divisor)
    }
}

/// The figures as an aligned plain-text table: a few lines naming the
/// settings, a header row with units, one row per mode, a note on reading
/// it. Header and mode rows are all the same width (in characters).
///
/// Shares read `min–max`; `n/a` when no body named its worker.
pub fn table(meta: &Meta, reports: &[ModeReport]) -> String {
    let (unit, divisor) = latency_unit(reports);
    let header = [
        "mode".to_string(),
        "req/s".to_string(),
        "errors".to_string(),
        format!("p50 {unit}"),
        format!("p99 {unit}"),
        format!("p99.9 {unit}"),
        "share min–max %".to_string(),
        "Jain".to_string(),
    ];
    let conns = reports.iter().any(|r| r.conn_share_pct.is_some());
    let mut header = header.to_vec();
    if conns {
        header.push("conns min–max %".to_string());
    }
    let mut rows = vec![header];
    for r in reports {
        let (share, jain) = if r.has_shares() {
            (
                format!("{:.1}–{:.1}", r.share_min_pct, r.share_max_pct),
                format!("{:.3}", r.jain),
            )
        } else {
            ("n/a".to_string(), "n/a".to_string())
        };
        let mut row = vec![
            r.mode.clone(),
            format!("{:.0}", r.requests_per_sec),
            r.errors.to_string(),
            format_latency(r.p50_us, divisor),
            format_latency(r.p99_us, divisor),
            format_latency(r.p999_us, divisor),
            share,
            jain,
        ];
        if conns {
            let cell = r
                .conn_share_pct
                .map_or("n/a".to_string(), |(lo, hi)| format!("{lo:.1}–{hi:.1}"));
            row.push(cell);
        }
        rows.push(row);
    }
    let mut widths = vec![0usize; rows[0].len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = format!(
        "distributor compare: {}\nmachine: {}\ncommand: {}\n\n",
        meta.settings(),
        meta.machine,
        meta.command
    );
    for row in &rows {
        for (k, (cell, &w)) in row.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            if k == 0 {
                // The mode, left-aligned; the numbers, right-aligned.
                let _ = write!(out, "{cell}{pad}");
            } else {
                let _ = write!(out, "  {pad}{cell}");
            }
        }
        out.push('\n');
    }
    let ideal = if meta.workers > 0 {
        format!(" (ideal {:.1} % each)", 100.0 / meta.workers as f64)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "\nshare: each worker's part of the requests{ideal}; \
         Jain: 1 = all served as many, 1/N = one served all."
    );
    for note in notes(meta, reports) {
        let _ = writeln!(out, "{note}");
    }
    out
}

/// What the figures cannot say by themselves, for the table and the chart:
/// how keep-alive shares read, and why every mode may come out even.
pub(super) fn notes(meta: &Meta, reports: &[ModeReport]) -> Vec<String> {
    let mut notes = Vec::new();
    if meta.keepalive {
        notes.push(
            "keep-alive: each connection is placed once and carries requests for the whole run, \
             so `conns` shows how a mode balanced (rr: exactly even) and `share` how fast each \
             worker served its connections (the CPU it got), not the balancing."
                .to_string(),
        );
    }
    let measured: Vec<&ModeReport> = reports.iter().filter(|r| r.has_shares()).collect();
    // Even: by requests, and by connections where they were counted.
    let even = |r: &&ModeReport| {
        let conns: Vec<u64> = r.per_worker.iter().filter_map(|w| w.connections).collect();
        r.jain >= 0.98 && (conns.is_empty() || jain(&conns) >= 0.98)
    };
    if measured.len() > 1 && measured.iter().all(even) {
        let why = if meta.cores > 0 && meta.workers <= meta.cores {
            format!(
                "{} workers on {} cores: every worker has a core and is kept busy",
                meta.workers, meta.cores
            )
        } else {
            "every worker was kept busy".to_string()
        };
        notes.push(format!(
            "every mode came out even here ({why}); kernel balancing turns uneven with more \
             workers than cores (-w {}) or with idle workers (fewer connections, -c, or a \
             slower app).",
            (meta.cores * 4).max(8)
        ));
    }
    notes
}

#[derive(Serialize)]
struct Document<'a> {
    meta: &'a Meta,
    modes: &'a [ModeReport],
}

/// The figures as one pretty-printed JSON document,
/// `{"meta": {...}, "modes": [{...}, ...]}`, with the field names of
/// [`Meta`] and [`ModeReport`]. A non-finite number (none is expected)
/// would be written as `null`.
///
/// # Panics
/// Never: these types serialize without error.
pub fn json(meta: &Meta, reports: &[ModeReport]) -> String {
    serde_json::to_string_pretty(&Document {
        meta,
        modes: reports,
    })
    .expect("plain structs with string keys always serialize")
}

/// Sample figures for the tests of the table, the JSON and the chart.
#[cfg(test)]
pub(super) mod fixtures {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::{LoadResult, Meta, ModeReport};

    pub(crate) fn result(per_worker: &[(u64, u64)], latencies: &[u64]) -> LoadResult {
        let mut hist = hdrhistogram::Histogram::new_with_max(3_600_000_000, 3).unwrap();
        for &l in latencies {
            hist.record(l).unwrap();
        }
        let per_worker: BTreeMap<u64, u64> = per_worker.iter().copied().collect();
        LoadResult {
            requests: per_worker.values().sum::<u64>().max(latencies.len() as u64),
            errors: 2,
            elapsed: Duration::from_secs(2),
            latency_us: hist,
            per_worker,
        }
    }

    pub(crate) fn meta() -> Meta {
        Meta {
            machine: "Linux 6.8 <x86_64> & 2 CPUs".to_string(),
            command: "distributor --workers 8".to_string(),
            workers: 4,
            connections: 64,
            duration_s: 5.0,
            keepalive: true,
            path: "/?a=1&b=\"2\"".to_string(),
            cores: 2,
        }
    }

    pub(crate) fn sample() -> Vec<ModeReport> {
        let ids = [0, 1, 2, 3];
        vec![
            ModeReport::new(
                "rr",
                4,
                &result(&[(0, 250), (1, 250), (2, 251), (3, 249)], &[100, 200, 900]),
                &ids,
            ),
            ModeReport::new(
                "shared",
                4,
                &result(&[(0, 700), (1, 250), (3, 50)], &[150, 2000, 40000]),
                &ids,
            ),
            ModeReport::new("reuseport", 4, &result(&[], &[]), &ids),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{meta, result, sample};
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn jain_on_known_inputs() {
        assert!(close(jain(&[1, 1, 1, 1]), 1.0));
        assert!(close(jain(&[1, 0, 0, 0]), 0.25));
        assert!(close(jain(&[5, 5, 0, 0]), 0.5));
        assert!(close(jain(&[7]), 1.0));
        // (1+2+3)² / (3·(1+4+9)) = 36/42
        assert!(close(jain(&[1, 2, 3]), 36.0 / 42.0));
        assert!(close(jain(&[]), 0.0));
        assert!(close(jain(&[0, 0, 0]), 0.0));
        assert!(close(jain(&[u64::MAX / 2, u64::MAX / 2]), 1.0));
    }

    #[test]
    fn shares_include_workers_that_got_nothing() {
        let r = ModeReport::new(
            "shared",
            4,
            &result(&[(0, 60), (1, 30), (3, 10), (9, 0)], &[10]),
            &[0, 1, 2, 3],
        );
        let ids: Vec<u64> = r.per_worker.iter().map(|w| w.id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 9]);
        let shares: Vec<f64> = r.per_worker.iter().map(|w| w.share_pct).collect();
        assert_eq!(shares, [60.0, 30.0, 0.0, 10.0, 0.0]);
        assert!(close(r.share_min_pct, 0.0));
        assert!(close(r.share_max_pct, 60.0));
        assert!(close(r.jain, jain(&[60, 30, 0, 10, 0])));
        assert!(close(r.requests_per_sec, 50.0));
        assert!(r.has_shares());
    }

    #[test]
    fn shares_and_latencies_of_an_even_run() {
        let r = &sample()[0];
        assert!(close(r.share_min_pct, 24.9));
        assert!(close(r.share_max_pct, 25.1));
        assert!(r.jain > 0.999);
        assert!((r.p50_us - 200.0).abs() < 1.0);
        assert!((r.p999_us - 900.0).abs() < 1.0);
    }

    #[test]
    fn no_per_worker_data_gives_zeros() {
        let r = ModeReport::new("rr", 2, &result(&[], &[5, 6]), &[0, 1]);
        assert!(!r.has_shares());
        assert_eq!(r.per_worker.len(), 2);
        assert!(r.per_worker.iter().all(|w| w.share_pct == 0.0));
        assert_eq!((r.share_min_pct, r.share_max_pct, r.jain), (0.0, 0.0, 0.0));
        let empty = ModeReport::new("rr", 0, &result(&[], &[]), &[]);
        assert!(empty.per_worker.is_empty());
        assert_eq!((empty.p50_us, empty.p99_us, empty.p999_us), (0.0, 0.0, 0.0));
    }

    #[test]
    fn table_columns_are_aligned() {
        let t = table(&meta(), &sample());
        let lines: Vec<&str> = t.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("mode"))
            .expect("a header row");
        let rows = &lines[header..header + 4];
        let width = rows[0].chars().count();
        for row in rows {
            assert_eq!(row.chars().count(), width, "{row:?}");
        }
        // Right-aligned numbers: every Jain cell ends the line.
        assert!(rows[0].ends_with("Jain"));
        assert!(rows[1].starts_with("rr ") && rows[1].ends_with("1.000"));
        assert!(rows[2].contains("0.0–70.0"));
        assert!(rows[3].starts_with("reuseport") && rows[3].ends_with("n/a"));
        // Latency over 10 ms: shown in ms.
        assert!(rows[0].contains("p99.9 ms"));
        assert!(t.contains("4 workers, 64 connections, 5 s per mode, keep-alive"));
    }

    #[test]
    fn table_in_microseconds_for_small_latencies() {
        let t = table(&meta(), &sample()[..1]);
        assert!(t.contains("p50 µs"), "{t}");
    }

    #[test]
    fn connection_shares_with_keepalive() {
        let counts = std::collections::BTreeMap::from([(0, 48), (1, 16)]);
        let r = ModeReport::new(
            "shared",
            4,
            &result(&[(0, 50), (1, 50)], &[10]),
            &[0, 1, 2, 3],
        )
        .with_connections(&counts);
        let conns: Vec<Option<u64>> = r.per_worker.iter().map(|w| w.connections).collect();
        assert_eq!(conns, [Some(48), Some(16), Some(0), Some(0)]);
        assert_eq!(r.conn_share_pct, Some((0.0, 75.0)));
        let none = ModeReport::new("rr", 2, &result(&[(0, 1)], &[10]), &[0, 1])
            .with_connections(&std::collections::BTreeMap::new());
        assert_eq!(none.conn_share_pct, None);
        // The table grows a column, after Jain, and says how to read it.
        let mut m = meta();
        let t = table(&m, std::slice::from_ref(&r));
        assert!(
            t.lines().any(|l| l.ends_with("Jain  conns min–max %")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("shared") && l.ends_with("0.0–75.0")),
            "{t}"
        );
        assert!(
            t.contains("keep-alive: each connection is placed once"),
            "{t}"
        );
        // Requests even but connections not: no claim that all came out even.
        assert!(!t.contains("every mode came out even"), "{t}");
        m.keepalive = false;
        assert!(!table(&m, &[r]).contains("keep-alive:"));
    }

    #[test]
    fn an_even_run_says_why_it_is_even() {
        let mut m = meta();
        m.keepalive = false;
        let even = vec![sample()[0].clone(), sample()[0].clone()];
        m.workers = 2;
        let t = table(&m, &even);
        assert!(
            t.contains(
                "every mode came out even here (2 workers on 2 cores: every worker has a core"
            ),
            "{t}"
        );
        assert!(t.contains("(-w 8)"), "{t}");
        m.workers = 4;
        assert!(table(&m, &even).contains("(every worker was kept busy)"));
        // One uneven mode: no such note.
        assert!(!table(&m, &sample()).contains("came out even"));
    }

    #[test]
    fn json_parses_back_with_all_fields() {
        let doc: serde_json::Value = serde_json::from_str(&json(&meta(), &sample())).unwrap();
        assert_eq!(doc["meta"]["workers"], 4);
        assert_eq!(doc["meta"]["path"], "/?a=1&b=\"2\"");
        let modes = doc["modes"].as_array().unwrap();
        assert_eq!(modes.len(), 3);
        for field in [
            "mode",
            "workers",
            "requests",
            "errors",
            "requests_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
            "per_worker",
            "share_min_pct",
            "share_max_pct",
            "jain",
        ] {
            assert!(modes[0].get(field).is_some(), "missing {field}");
        }
        assert_eq!(modes[1]["mode"], "shared");
        assert_eq!(modes[1]["per_worker"][2]["id"], 2);
        assert_eq!(modes[1]["per_worker"][2]["requests"], 0);
        assert_eq!(modes[1]["share_max_pct"], 70.0);
    }
}
