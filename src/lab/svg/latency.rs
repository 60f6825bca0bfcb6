//! The chart's right panel: latency percentiles (p50, p99, p99.9) per mode,
//! on a log scale.

use super::{
    PLOT_BOTTOM, PLOT_TOP, axes, line, mode_name, panel_title, rect, slot_note, text, text_length,
    upward_text,
};
use crate::lab::report::ModeReport;

const LATENCY_COLORS: [(&str, &str); 3] =
    [("p50", "#9ecae1"), ("p99", "#4292c6"), ("p99.9", "#08306b")];

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

/// Right panel: one group per mode, bars for p50, p99 and p99.9 on a log
/// scale.
pub(super) fn latency_panel(out: &mut String, reports: &[ModeReport], left: f64, right: f64) {
    panel_title(out, left, "Latency (log scale)");
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
    if !axes(out, reports, left, right, 62.0, "latency per request") {
        return;
    }
    let slot = (right - left) / reports.len() as f64;
    for (m, r) in reports.iter().enumerate() {
        let x0 = left + slot * m as f64 + slot * 0.12;
        let inner = slot * 0.76;
        let center = x0 + inner / 2.0;
        mode_name(out, center, &r.mode);
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
            slot_note(out, center, "no requests");
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
            // Labels run upwards, one per bar, so that neighbours never
            // overlap however narrow the bars: inside a bar tall enough
            // (white), else above it.
            let label = human_latency(us);
            let size = if bar >= 20.0 { 11 } else { 10 };
            let inside = PLOT_BOTTOM - y >= text_length(&label, size) + 10.0;
            let (at, anchor, fill) = if inside {
                // Dark on the light p50 bar, white on the others.
                let fill = if k == 0 {
                    "fill=\"#08306b\""
                } else {
                    "fill=\"#ffffff\""
                };
                (y + 5.0, "end", fill)
            } else {
                (y - 4.0, "start", "")
            };
            upward_text(out, x + bar / 2.0, at, size, anchor, fill, &label);
        }
    }
}
