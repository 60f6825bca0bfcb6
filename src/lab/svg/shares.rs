//! The chart's left panel: each worker's share of the requests, one group
//! of bars per mode, against the ideal share `1/N`.

use super::{PLOT_BOTTOM, PLOT_TOP, axes, line, mode_name, panel_title, rect, slot_note, text};
use crate::lab::report::ModeReport;

const MODE_COLORS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#9c755f", "#edc948",
];
/// The mark of a worker's share of the connections (keep-alive runs).
const CONN_MARK: &str = "stroke=\"#111111\" stroke-width=\"3\"";
/// Worker ids are written under bars at least this wide.
const ID_LABEL_MIN_BAR: f64 = 14.0;

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

/// Left panel: one group of bars per mode, one bar per worker.
pub(super) fn shares_panel(out: &mut String, reports: &[ModeReport], left: f64, right: f64) {
    panel_title(out, left, "Requests served by each worker (%)");
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
    let conns = reports.iter().any(|r| r.conn_share_pct.is_some());
    if conns {
        let x = legend_x + 4.0;
        line(
            out,
            x,
            PLOT_TOP - 19.0,
            x + 20.0,
            PLOT_TOP - 19.0,
            CONN_MARK,
        );
        text(
            out,
            x + 30.0,
            PLOT_TOP - 15.0,
            12,
            "start",
            "",
            "share of connections",
        );
    }
    let max_share =
        reports
            .iter()
            .flat_map(|r| {
                let ideal = if r.per_worker.is_empty() {
                    0.0
                } else {
                    100.0 / r.per_worker.len() as f64
                };
                let total: u64 = r.per_worker.iter().filter_map(|w| w.connections).sum();
                r.per_worker
                    .iter()
                    .map(|w| w.share_pct)
                    .chain(r.per_worker.iter().filter_map(move |w| {
                        Some(w.connections? as f64 * 100.0 / total.max(1) as f64)
                    }))
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
    if !axes(out, reports, left, right, 46.0, "share of requests (%)") {
        return;
    }
    let slot = (right - left) / reports.len() as f64;
    for (m, r) in reports.iter().enumerate() {
        let color = MODE_COLORS[m % MODE_COLORS.len()];
        let x0 = left + slot * m as f64 + slot * 0.08;
        let inner = slot * 0.84;
        let center = x0 + inner / 2.0;
        mode_name(out, center, &r.mode);
        if !r.has_shares() {
            slot_note(out, center, "no per-worker data");
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
        if let Some((lo, hi)) = r.conn_share_pct {
            text(
                out,
                center,
                PLOT_BOTTOM + 88.0,
                12,
                "middle",
                "fill=\"#555\"",
                &format!("conns {lo:.0}–{hi:.0} %"),
            );
        }
        let conn_total: u64 = r.per_worker.iter().filter_map(|w| w.connections).sum();
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
            if let Some(c) = w.connections.filter(|_| conn_total > 0) {
                let pct = c as f64 * 100.0 / conn_total as f64;
                let cy = y_of(pct);
                let _ = std::fmt::Write::write_fmt(
                    out,
                    format_args!(
                        "<line x1=\"{:.1}\" y1=\"{cy:.1}\" x2=\"{:.1}\" y2=\"{cy:.1}\" {CONN_MARK}><title>{}</title></line>\n",
                        x,
                        x + bar,
                        super::escape(&format!(
                            "{}: worker {}: {c} connections, {pct:.1} %",
                            r.mode, w.id
                        ))
                    ),
                );
            }
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
