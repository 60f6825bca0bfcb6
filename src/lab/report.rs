//! The lab's figures and their three outputs: a plain-text table for the
//! terminal, a JSON document for scripts, and an SVG chart for people.
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
        }
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
}

impl Meta {
    /// One line naming the settings, shared by the table and the chart.
    fn settings(&self) -> String {
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
        rows.push([
            r.mode.clone(),
            format!("{:.0}", r.requests_per_sec),
            r.errors.to_string(),
            format_latency(r.p50_us, divisor),
            format_latency(r.p99_us, divisor),
            format_latency(r.p999_us, divisor),
            share,
            jain,
        ]);
    }
    let mut widths = [0usize; 8];
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
    out
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

/// Escapes the five XML special characters, for text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters of `s`, with `…` when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// A latency in µs, in the unit that suits it.
fn human_latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else if us < 100_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us < 1_000_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// A power of ten µs as an axis label: `100 µs`, `1 ms`, `10 s`.
fn decade(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.0} s", us / 1_000_000.0)
    }
}

/// A request rate, shortened: `980 req/s`, `12.3 k req/s`.
fn human_rate(rate: f64) -> String {
    if rate < 1000.0 {
        format!("{rate:.0} req/s")
    } else {
        format!("{:.1} k req/s", rate / 1000.0)
    }
}

/// A step of 1, 2 or 5 times a power of ten giving about `ticks` ticks
/// up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    step.max(f64::MIN_POSITIVE)
}

const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";
const MODE_COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#9c755f", "#edc948",
];
const LATENCY_COLORS: [(&str, &str); 3] =
    [("p50", "#9ecae1"), ("p99", "#4292c6"), ("p99.9", "#08306b")];

const WIDTH: f64 = 1200.0;
const HEIGHT: f64 = 570.0;
const PLOT_TOP: f64 = 120.0;
const PLOT_BOTTOM: f64 = 460.0;
/// Worker ids are written under bars at least this wide.
const ID_LABEL_MIN_BAR: f64 = 14.0;

/// Text anchored at (`x`, `y`).
fn text(out: &mut String, x: f64, y: f64, size: u32, anchor: &str, extra: &str, content: &str) {
    let _ = writeln!(
        out,
        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{anchor}\" {extra}>{}</text>",
        escape(content)
    );
}

fn rect(out: &mut String, x: f64, y: f64, w: f64, h: f64, fill: &str, title: &str) {
    let _ = writeln!(
        out,
        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\"><title>{}</title></rect>",
        escape(title)
    );
}

fn line(out: &mut String, x1: f64, y1: f64, x2: f64, y2: f64, style: &str) {
    let _ = writeln!(
        out,
        "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" {style}/>"
    );
}

/// The figures as a self-contained SVG chart: per-worker shares per mode
/// against the ideal `1/N` (left), latency percentiles per mode on a log
/// scale (right), the settings in the title. Every bar has a tooltip with
/// its exact value; all text is XML-escaped.
pub fn svg(meta: &Meta, reports: &[ModeReport]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" {FONT} fill=\"#222\">"
    );
    let _ = writeln!(
        out,
        "<title>{}</title>",
        escape(&format!("distributor compare: {}", meta.settings()))
    );
    rect(&mut out, 0.0, 0.0, WIDTH, HEIGHT, "#ffffff", "");
    let title = format!("distributor compare: {}", shorten(&meta.settings(), 120));
    // Bold sans glyphs average about 0.62 em: shrink a long title to fit.
    let fit = (WIDTH - 40.0) / (0.62 * title.chars().count() as f64);
    text(
        &mut out,
        WIDTH / 2.0,
        34.0,
        fit.clamp(12.0, 20.0) as u32,
        "middle",
        "font-weight=\"bold\"",
        &title,
    );
    text(
        &mut out,
        WIDTH / 2.0,
        58.0,
        13,
        "middle",
        "fill=\"#666\"",
        &format!(
            "machine: {}  ·  command: {}",
            shorten(&meta.machine, 60),
            shorten(&meta.command, 60)
        ),
    );
    shares_panel(&mut out, reports, 80.0, 560.0);
    latency_panel(&mut out, reports, 700.0, 1160.0);
    text(
        &mut out,
        WIDTH / 2.0,
        HEIGHT - 14.0,
        12,
        "middle",
        "fill=\"#666\"",
        "Share: each worker's part of the requests. Jain's index: 1 = all served as many, \
         1/N = one served all. Hover a bar for its exact value.",
    );
    out.push_str("</svg>\n");
    out
}

/// Left panel: one group of bars per mode, one bar per worker.
fn shares_panel(out: &mut String, reports: &[ModeReport], left: f64, right: f64) {
    text(
        out,
        left,
        PLOT_TOP - 34.0,
        15,
        "start",
        "font-weight=\"bold\"",
        "Requests served by each worker (%)",
    );
    let legend_x = right - 150.0;
    line(
        out,
        legend_x,
        PLOT_TOP - 39.0,
        legend_x + 28.0,
        PLOT_TOP - 39.0,
        "stroke=\"#d62728\" stroke-width=\"2\" stroke-dasharray=\"6 4\"",
    );
    text(
        out,
        legend_x + 34.0,
        PLOT_TOP - 35.0,
        12,
        "start",
        "",
        "ideal share (1/N)",
    );
    let max_share = reports
        .iter()
        .flat_map(|r| {
            let ideal = if r.per_worker.is_empty() {
                0.0
            } else {
                100.0 / r.per_worker.len() as f64
            };
            r.per_worker
                .iter()
                .map(|w| w.share_pct)
                .chain([ideal * 1.5])
        })
        .fold(0.0, f64::max)
        .clamp(1.0, 100.0);
    let step = nice_step(max_share, 5.0);
    let top = (max_share / step).ceil() * step;
    let y_of = |v: f64| PLOT_BOTTOM - v / top * (PLOT_BOTTOM - PLOT_TOP);
    let mut tick = 0.0;
    while tick <= top + step / 2.0 {
        let y = y_of(tick);
        line(out, left, y, right, y, "stroke=\"#e5e5e5\"");
        text(
            out,
            left - 8.0,
            y + 4.0,
            12,
            "end",
            "",
            &format!("{tick:.0}"),
        );
        tick += step;
    }
    let _ = writeln!(
        out,
        "<text transform=\"translate({:.1} {:.1}) rotate(-90)\" font-size=\"13\" text-anchor=\"middle\">share of requests (%)</text>",
        left - 46.0,
        (PLOT_TOP + PLOT_BOTTOM) / 2.0
    );
    line(
        out,
        left,
        PLOT_BOTTOM,
        right,
        PLOT_BOTTOM,
        "stroke=\"#444\"",
    );
    line(out, left, PLOT_TOP, left, PLOT_BOTTOM, "stroke=\"#444\"");
    if reports.is_empty() {
        text(
            out,
            (left + right) / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0,
            14,
            "middle",
            "",
            "no runs",
        );
        return;
    }
    let slot = (right - left) / reports.len() as f64;
    for (m, r) in reports.iter().enumerate() {
        let color = MODE_COLORS[m % MODE_COLORS.len()];
        let x0 = left + slot * m as f64 + slot * 0.08;
        let inner = slot * 0.84;
        let center = x0 + inner / 2.0;
        text(
            out,
            center,
            PLOT_BOTTOM + 38.0,
            14,
            "middle",
            "font-weight=\"bold\"",
            &r.mode,
        );
        if !r.has_shares() {
            text(
                out,
                center,
                (PLOT_TOP + PLOT_BOTTOM) / 2.0,
                13,
                "middle",
                "fill=\"#888\"",
                "no per-worker data",
            );
            continue;
        }
        text(
            out,
            center,
            PLOT_BOTTOM + 56.0,
            12,
            "middle",
            "",
            &format!("Jain {:.3}", r.jain),
        );
        text(
            out,
            center,
            PLOT_BOTTOM + 72.0,
            12,
            "middle",
            "fill=\"#555\"",
            &format!("{:.1}–{:.1} %", r.share_min_pct, r.share_max_pct),
        );
        let n = r.per_worker.len() as f64;
        let bar = inner / n;
        // Label the first largest and the first smallest bar only, and
        // none when they hardly differ (the line below gives both).
        let labelled = r.share_max_pct - r.share_min_pct >= 1.0;
        let max_at = r
            .per_worker
            .iter()
            .position(|w| w.share_pct == r.share_max_pct);
        let min_at = r
            .per_worker
            .iter()
            .position(|w| w.share_pct == r.share_min_pct);
        for (k, w) in r.per_worker.iter().enumerate() {
            let x = x0 + bar * k as f64;
            let y = y_of(w.share_pct);
            rect(
                out,
                x + bar * 0.1,
                y,
                bar * 0.8,
                PLOT_BOTTOM - y,
                color,
                &format!(
                    "{}: worker {}: {} requests, {:.1} %",
                    r.mode, w.id, w.requests, w.share_pct
                ),
            );
            if bar >= ID_LABEL_MIN_BAR {
                text(
                    out,
                    x + bar / 2.0,
                    PLOT_BOTTOM + 16.0,
                    11,
                    "middle",
                    "fill=\"#555\"",
                    &w.id.to_string(),
                );
            }
            if labelled && (Some(k) == max_at || Some(k) == min_at) {
                let label = if bar >= 22.0 {
                    format!("{:.1}", w.share_pct)
                } else {
                    format!("{:.0}", w.share_pct)
                };
                text(
                    out,
                    x + bar / 2.0,
                    y - 5.0,
                    if bar >= 30.0 { 11 } else { 10 },
                    "middle",
                    "",
                    &label,
                );
            }
        }
        let ideal = y_of(100.0 / n);
        line(
            out,
            x0,
            ideal,
            x0 + inner,
            ideal,
            "stroke=\"#d62728\" stroke-width=\"2\" stroke-dasharray=\"6 4\"",
        );
    }
    if reports
        .iter()
        .any(|r| r.has_shares() && slot * 0.84 / r.per_worker.len() as f64 >= ID_LABEL_MIN_BAR)
    {
        text(
            out,
            left + 4.0,
            PLOT_BOTTOM + 16.0,
            11,
            "end",
            "fill=\"#555\"",
            "id",
        );
    }
}

/// Right panel: one group per mode, bars for p50, p99 and p99.9 on a log
/// scale.
fn latency_panel(out: &mut String, reports: &[ModeReport], left: f64, right: f64) {
    text(
        out,
        left,
        PLOT_TOP - 34.0,
        15,
        "start",
        "font-weight=\"bold\"",
        "Latency (log scale)",
    );
    for (k, (name, color)) in LATENCY_COLORS.iter().enumerate() {
        let x = right - 190.0 + 66.0 * k as f64;
        rect(out, x, PLOT_TOP - 48.0, 14.0, 14.0, color, name);
        text(out, x + 19.0, PLOT_TOP - 36.0, 12, "start", "", name);
    }
    let values: Vec<f64> = reports
        .iter()
        .flat_map(|r| [r.p50_us, r.p99_us, r.p999_us])
        .filter(|&v| v > 0.0)
        .collect();
    let lo_exp = values
        .iter()
        .fold(f64::INFINITY, |a, &v| a.min(v))
        .log10()
        .floor();
    let hi_exp = values.iter().fold(0.0f64, |a, &v| a.max(v)).log10().ceil();
    let (lo_exp, hi_exp) = if values.is_empty() {
        (1.0, 4.0)
    } else {
        let lo = lo_exp.max(0.0);
        (lo, hi_exp.max(lo + 1.0))
    };
    let y_of = |us: f64| {
        let e = us.max(10f64.powf(lo_exp)).log10();
        PLOT_BOTTOM - (e - lo_exp) / (hi_exp - lo_exp) * (PLOT_BOTTOM - PLOT_TOP)
    };
    let mut e = lo_exp;
    while e <= hi_exp + 0.5 {
        let v = 10f64.powf(e);
        let y = y_of(v);
        line(out, left, y, right, y, "stroke=\"#cccccc\"");
        text(out, left - 8.0, y + 4.0, 12, "end", "", &decade(v));
        if e + 0.5 < hi_exp {
            for m in 2..10 {
                let y = y_of(v * f64::from(m));
                line(out, left, y, right, y, "stroke=\"#ebebeb\"");
            }
        }
        e += 1.0;
    }
    let _ = writeln!(
        out,
        "<text transform=\"translate({:.1} {:.1}) rotate(-90)\" font-size=\"13\" text-anchor=\"middle\">latency per request</text>",
        left - 62.0,
        (PLOT_TOP + PLOT_BOTTOM) / 2.0
    );
    line(
        out,
        left,
        PLOT_BOTTOM,
        right,
        PLOT_BOTTOM,
        "stroke=\"#444\"",
    );
    line(out, left, PLOT_TOP, left, PLOT_BOTTOM, "stroke=\"#444\"");
    if reports.is_empty() {
        text(
            out,
            (left + right) / 2.0,
            (PLOT_TOP + PLOT_BOTTOM) / 2.0,
            14,
            "middle",
            "",
            "no runs",
        );
        return;
    }
    let slot = (right - left) / reports.len() as f64;
    for (m, r) in reports.iter().enumerate() {
        let x0 = left + slot * m as f64 + slot * 0.12;
        let inner = slot * 0.76;
        let center = x0 + inner / 2.0;
        text(
            out,
            center,
            PLOT_BOTTOM + 38.0,
            14,
            "middle",
            "font-weight=\"bold\"",
            &r.mode,
        );
        text(
            out,
            center,
            PLOT_BOTTOM + 56.0,
            12,
            "middle",
            "",
            &human_rate(r.requests_per_sec),
        );
        if r.errors > 0 {
            text(
                out,
                center,
                PLOT_BOTTOM + 72.0,
                12,
                "middle",
                "fill=\"#c00\"",
                &format!("{} errors", r.errors),
            );
        }
        if r.requests == 0 {
            text(
                out,
                center,
                (PLOT_TOP + PLOT_BOTTOM) / 2.0,
                13,
                "middle",
                "fill=\"#888\"",
                "no requests",
            );
            continue;
        }
        let bar = inner / 3.0;
        for (k, ((name, color), us)) in LATENCY_COLORS
            .iter()
            .zip([r.p50_us, r.p99_us, r.p999_us])
            .enumerate()
        {
            let x = x0 + bar * k as f64;
            let y = y_of(us);
            rect(
                out,
                x + bar * 0.08,
                y,
                bar * 0.84,
                PLOT_BOTTOM - y,
                color,
                &format!("{}: {name} {}", r.mode, human_latency(us)),
            );
            // On narrow bars the middle label goes a line higher, so that
            // neighbours of about the same height do not overlap.
            let lift = if bar < 56.0 && k == 1 { 16.0 } else { 5.0 };
            text(
                out,
                x + bar / 2.0,
                y - lift,
                if bar >= 44.0 { 11 } else { 10 },
                "middle",
                "",
                &human_latency(us),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn result(per_worker: &[(u64, u64)], latencies: &[u64]) -> LoadResult {
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

    fn meta() -> Meta {
        Meta {
            machine: "Linux 6.8 <x86_64> & 2 CPUs".to_string(),
            command: "distributor --workers 8".to_string(),
            workers: 4,
            connections: 64,
            duration_s: 5.0,
            keepalive: true,
            path: "/?a=1&b=\"2\"".to_string(),
        }
    }

    fn sample() -> Vec<ModeReport> {
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

    /// Checks that every tag is closed in order and every `&` starts an
    /// entity: enough to tell a well-formed document from a broken one here.
    fn assert_well_formed(doc: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = doc;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            check_entities(text);
            let end = rest[open..].find('>').expect("an unclosed tag") + open;
            let tag = &rest[open + 1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.trim()), "mismatched </{name}>");
                continue;
            }
            assert!(!tag.contains('<'), "'<' in a tag: {tag}");
            check_entities(tag);
            let self_closing = tag.ends_with('/');
            let name = tag
                .trim_end_matches('/')
                .split_whitespace()
                .next()
                .expect("a tag name");
            // Attribute quotes balance.
            assert_eq!(tag.matches('"').count() % 2, 0, "{tag}");
            if !self_closing {
                stack.push(name);
            }
            if stack.is_empty() {
                assert!(rest.trim().is_empty(), "content after the root");
            }
        }
        check_entities(rest);
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    fn check_entities(s: &str) {
        for (i, _) in s.match_indices('&') {
            let after = &s[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| after.starts_with(e)),
                "raw & in {s:?}"
            );
        }
        assert!(!s.contains('>') || s.is_empty(), "raw > in {s:?}");
    }

    #[test]
    fn svg_is_well_formed_and_escaped() {
        let doc = svg(&meta(), &sample());
        assert!(doc.starts_with("<svg "));
        assert!(doc.trim_end().ends_with("</svg>"));
        assert_well_formed(&doc);
        assert_eq!(doc.matches("<text").count(), doc.matches("</text>").count());
        assert!(doc.contains("&lt;x86_64&gt; &amp; 2 CPUs"));
        assert!(doc.contains("GET /?a=1&amp;b=&quot;2&quot;"));
        assert!(!doc.contains("<x86_64>"));
        assert!(doc.contains("no per-worker data"));
        assert!(doc.contains("stroke-dasharray"));
        let empty = svg(&meta(), &[]);
        assert_well_formed(&empty);
        assert!(empty.contains("no runs"));
    }

    #[test]
    fn escape_covers_the_special_characters() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(escape("µs – ok"), "µs – ok");
    }

    #[test]
    fn the_well_formedness_check_catches_breakage() {
        for broken in ["<svg><text>a</svg>", "<svg>a & b</svg>", "<svg><g></svg>"] {
            let caught = std::panic::catch_unwind(|| assert_well_formed(broken)).is_err();
            assert!(caught, "{broken}");
        }
    }
}
