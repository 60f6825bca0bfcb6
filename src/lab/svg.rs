//! The lab's SVG chart: per-worker shares per mode against the ideal `1/N`
//! (the left panel, [`shares`]) and latency percentiles per mode on a log
//! scale (the right panel, [`latency`]), with the settings in the title.
//!
//! The document is written by hand, element by element, with a few helpers
//! that XML-escape every text and attribute value: no dependency, and a
//! self-contained file that any browser shows.

mod latency;
mod shares;

use std::fmt::Write as _;

use super::report::{Meta, ModeReport, notes};
use latency::latency_panel;
use shares::shares_panel;

const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

const WIDTH: f64 = 1200.0;
/// The height without notes; each line of notes adds [`NOTE_LINE`].
const HEIGHT: f64 = 590.0;
const NOTE_LINE: f64 = 15.0;
/// Characters per line of notes (11 px sans).
const NOTE_WIDTH: usize = 180;
const PLOT_TOP: f64 = 120.0;
const PLOT_BOTTOM: f64 = 460.0;

/// The figures as a self-contained SVG chart: per-worker shares per mode
/// against the ideal `1/N` (left), latency percentiles per mode on a log
/// scale (right), the settings in the title. Every bar has a tooltip with
/// its exact value; all text is XML-escaped.
pub fn svg(meta: &Meta, reports: &[ModeReport]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let notes: Vec<String> = notes(meta, reports)
        .iter()
        .flat_map(|n| wrap(n, NOTE_WIDTH))
        .collect();
    let height = HEIGHT + NOTE_LINE * notes.len() as f64;
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" {FONT} fill=\"#222\">"
    );
    let _ = writeln!(
        out,
        "<title>{}</title>",
        escape(&format!("distributor compare: {}", meta.settings()))
    );
    rect(&mut out, 0.0, 0.0, WIDTH, height, "#ffffff", "");
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
    for (k, note) in notes.iter().enumerate() {
        text(
            &mut out,
            WIDTH / 2.0,
            HEIGHT - 14.0 + NOTE_LINE * (k + 1) as f64,
            11,
            "middle",
            "fill=\"#666\"",
            note,
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A panel's bold title, above its plot from `left`.
fn panel_title(out: &mut String, left: f64, title: &str) {
    text(
        out,
        left,
        PLOT_TOP - 34.0,
        15,
        "start",
        "font-weight=\"bold\"",
        title,
    );
}

/// What both panels draw alike under their ticks: the y-axis `label`,
/// rotated, `label_gap` left of the plot, then the two axes, and `no runs`
/// across the plot when there are no `reports`. Returns whether there are
/// reports left to draw.
fn axes(
    out: &mut String,
    reports: &[ModeReport],
    left: f64,
    right: f64,
    label_gap: f64,
    label: &str,
) -> bool {
    let _ = writeln!(
        out,
        "<text transform=\"translate({:.1} {:.1}) rotate(-90)\" font-size=\"13\" text-anchor=\"middle\">{}</text>",
        left - label_gap,
        (PLOT_TOP + PLOT_BOTTOM) / 2.0,
        escape(label)
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
        return false;
    }
    true
}

/// A mode's name in bold under its group of bars, centred on `center`.
fn mode_name(out: &mut String, center: f64, mode: &str) {
    text(
        out,
        center,
        PLOT_BOTTOM + 38.0,
        14,
        "middle",
        "font-weight=\"bold\"",
        mode,
    );
}

/// A grey note in the middle of a mode's group, in place of its bars.
fn slot_note(out: &mut String, center: f64, note: &str) {
    text(
        out,
        center,
        (PLOT_TOP + PLOT_BOTTOM) / 2.0,
        13,
        "middle",
        "fill=\"#888\"",
        note,
    );
}

/// About how wide `content` is at `size` px (sans glyphs average about
/// 0.6 em), for placing labels.
fn text_length(content: &str, size: u32) -> f64 {
    content.chars().count() as f64 * f64::from(size) * 0.6
}

/// Text that runs upwards from (`x`, `y`), centred on `x`: `anchor`
/// `start` puts its start at `y`, `end` its end.
fn upward_text(
    out: &mut String,
    x: f64,
    y: f64,
    size: u32,
    anchor: &str,
    extra: &str,
    content: &str,
) {
    // Rotated, the glyphs lie left of the baseline: shift by about half
    // their height to centre them on `x`.
    let _ = writeln!(
        out,
        "<text transform=\"translate({:.1} {y:.1}) rotate(-90)\" font-size=\"{size}\" text-anchor=\"{anchor}\" {extra}>{}</text>",
        x + f64::from(size) * 0.35,
        escape(content)
    );
}

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

/// `s` in lines of at most `width` characters, cut between words.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in s.split_whitespace() {
        let last = lines.last_mut().expect("one line at least");
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::report::fixtures::{meta, sample};

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

    /// The latency labels, which run upwards, never overlap one another
    /// and stay inside the chart, for 1 to 8 modes (the clipped `1.15 m`
    /// of horizontal labels on neighbouring bars).
    #[test]
    fn latency_labels_never_overlap() {
        let base = sample();
        for n in 1..=8 {
            let reports: Vec<ModeReport> = (0..n).map(|k| base[k % 2].clone()).collect();
            let doc = svg(&meta(), &reports);
            let height: f64 = doc
                .split("height=\"")
                .nth(1)
                .and_then(|h| h.split('"').next())
                .and_then(|h| h.parse().ok())
                .expect("a height");
            // (left, right, top, bottom) of each upward label.
            let mut boxes: Vec<(f64, f64, f64, f64)> = Vec::new();
            for el in doc.split("<text transform=\"translate(").skip(1) {
                if !el.contains("rotate(-90)\" font-size=\"1") || el.contains("font-size=\"13\"") {
                    continue; // the axis titles
                }
                let nums: Vec<f64> = el
                    .split(')')
                    .next()
                    .unwrap()
                    .split(' ')
                    .map(|v| v.parse().unwrap())
                    .collect();
                let (x, y) = (nums[0], nums[1]);
                let size: f64 = el.split("font-size=\"").nth(1).unwrap()[..2]
                    .parse()
                    .unwrap();
                let content = &el[el.find('>').unwrap() + 1..el.find("</text>").unwrap()];
                let len = text_length(content, size as u32);
                let (top, bottom) = if el.contains("text-anchor=\"end\"") {
                    (y, y + len)
                } else {
                    (y - len, y)
                };
                boxes.push((x - 0.8 * size, x + 0.2 * size, top, bottom));
            }
            assert_eq!(boxes.len(), 3 * n, "one label per latency bar");
            for (i, a) in boxes.iter().enumerate() {
                assert!(
                    a.0 >= 0.0 && a.1 <= WIDTH && a.2 >= 70.0 && a.3 <= height,
                    "{a:?}"
                );
                for b in &boxes[i + 1..] {
                    let apart = a.1 <= b.0 || b.1 <= a.0 || a.3 <= b.2 || b.3 <= a.2;
                    assert!(apart, "{n} modes: labels overlap: {a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn wrap_cuts_between_words() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("a", 5), ["a"]);
        assert_eq!(wrap("toolongword x", 4), ["toolongword", "x"]);
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
