//! [`Stats`] in the Prometheus text exposition format (version 0.0.4), as
//! `GET /metrics` serves it: a `# HELP` and a `# TYPE` line per metric
//! family, names `distributor_*`, counters ending in `_total`, durations in
//! `_seconds`, label values escaped.
//!
//! Per-worker series carry `worker` (its id, new at every start), `pid` and
//! `slot`; a restarted worker is a new series, as a restarted process is
//! in Prometheus. `distributor_worker_up` adds the worker's `state`.

use std::fmt::Write;

use super::stats::{Replacement, Stats, WorkerState, WorkerStats};

/// The `Content-Type` of the text format.
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `stats` as a whole exposition, ending with a newline.
pub(super) fn render(stats: &Stats) -> String {
    let mut out = Exposition(String::with_capacity(1024 + 768 * stats.workers.len()));
    let version = env!("CARGO_PKG_VERSION");
    out.family(
        "distributor_info",
        "gauge",
        "The primary's scheduling mode (and kernel steering, if any) and version; always 1.",
    );
    let steer = [("steer", stats.steer.name())];
    let steered = if stats.steer == super::Steer::Off {
        &[][..]
    } else {
        &steer[..]
    };
    let labels: Vec<(&str, &str)> = [("sched", stats.sched.name())]
        .into_iter()
        .chain(steered.iter().copied())
        .chain([("version", version)])
        .collect();
    out.sample("distributor_info", &labels, 1);
    out.family(
        "distributor_uptime_seconds",
        "gauge",
        "Seconds since the primary started.",
    );
    out.seconds(
        "distributor_uptime_seconds",
        &[],
        stats.uptime.as_secs_f64(),
    );

    out.family(
        "distributor_workers",
        "gauge",
        "Worker processes alive, by state.",
    );
    for state in WorkerState::ALL {
        out.sample(
            "distributor_workers",
            &[("state", state.name())],
            stats.count(state) as u64,
        );
    }
    out.family(
        "distributor_ready_workers",
        "gauge",
        "Workers that get connections now; /healthz answers 200 while this is above 0.",
    );
    out.sample(
        "distributor_ready_workers",
        &[],
        stats.ready_workers() as u64,
    );
    out.family(
        "distributor_slots",
        "gauge",
        "Worker slots that want a worker (--workers, after scaling).",
    );
    out.sample("distributor_slots", &[], stats.active_slots() as u64);

    out.family(
        "distributor_worker_up",
        "gauge",
        "1 for each worker process alive, labelled with its state.",
    );
    for w in &stats.workers {
        let ids = Ids::of(w);
        let [worker, pid, slot] = ids.labels();
        let labels = [worker, pid, slot, ("state", w.state.name())];
        out.sample("distributor_worker_up", &labels, 1);
    }
    out.family(
        "distributor_worker_connections_total",
        "counter",
        "Connections the worker took: acknowledged (rr), or accepted by itself and reported (kernel modes).",
    );
    for w in &stats.workers {
        let ids = Ids::of(w);
        out.sample(
            "distributor_worker_connections_total",
            &ids.labels(),
            w.connections,
        );
    }
    out.family(
        "distributor_worker_in_flight",
        "gauge",
        "Connections the worker holds: sent and not yet acknowledged, plus acknowledged and not yet finished for workers that report completions.",
    );
    for w in &stats.workers {
        let ids = Ids::of(w);
        out.sample("distributor_worker_in_flight", &ids.labels(), w.in_flight);
    }
    out.family(
        "distributor_worker_uptime_seconds",
        "gauge",
        "Seconds since the worker process started.",
    );
    for w in &stats.workers {
        let ids = Ids::of(w);
        out.seconds(
            "distributor_worker_uptime_seconds",
            &ids.labels(),
            w.uptime.as_secs_f64(),
        );
    }

    out.family(
        "distributor_slot_restarts_total",
        "counter",
        "Times the slot's worker was replaced after it exited or was cut off unexpectedly.",
    );
    // A slot removed by a scale-down has no series until it is back.
    for s in stats.slots.iter().filter(|s| s.active) {
        let slot = s.slot.to_string();
        out.sample(
            "distributor_slot_restarts_total",
            &[("slot", &slot)],
            s.restarts,
        );
    }
    out.family(
        "distributor_worker_replacements_total",
        "counter",
        "Workers replaced by a new one while their slot kept serving: by a reload, a limit (max-requests, max-memory, max-age), or their own leaving (announced, exited with status 0).",
    );
    for why in Replacement::ALL {
        out.sample(
            "distributor_worker_replacements_total",
            &[("reason", why.name())],
            stats.replacements(why),
        );
    }

    out.family(
        "distributor_connections_total",
        "counter",
        "Connections taken by workers since the start, workers that exited included.",
    );
    out.sample(
        "distributor_connections_total",
        &[],
        stats.connections_total(),
    );
    out.family(
        "distributor_connections_held",
        "gauge",
        "Connections the primary accepted that no worker holds yet.",
    );
    out.sample(
        "distributor_connections_held",
        &[],
        stats.connections_held as u64,
    );
    if let Some(sticky) = stats.sticky {
        out.family(
            "distributor_sticky_connections_total",
            "counter",
            "With --sticky: connections placed on their key's slot, moved to a later slot by the load bound, or placed by the policy (fallback).",
        );
        for (placed, n) in [
            ("key", sticky.by_key),
            ("moved", sticky.moved),
            ("fallback", sticky.fallback),
        ] {
            out.sample(
                "distributor_sticky_connections_total",
                &[("placed", placed)],
                n,
            );
        }
    }
    out.0
}

/// A worker's identifying labels, as text.
struct Ids {
    worker: String,
    pid: String,
    slot: String,
}

impl Ids {
    fn of(w: &WorkerStats) -> Ids {
        Ids {
            worker: w.id.to_string(),
            pid: w.pid.to_string(),
            slot: w.slot.to_string(),
        }
    }

    fn labels(&self) -> [(&str, &str); 3] {
        [
            ("worker", &self.worker),
            ("pid", &self.pid),
            ("slot", &self.slot),
        ]
    }
}

struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.name_and_labels(name, labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn seconds(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.name_and_labels(name, labels);
        let _ = writeln!(self.0, " {value:.3}");
    }

    fn name_and_labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.0.push_str(name);
        if labels.is_empty() {
            return;
        }
        self.0.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
        }
        self.0.push('}');
    }
}

/// A label value as the text format wants it: backslash, double quote and
/// line feed escaped as `\\`, `\"` and `\n`.
pub(super) fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A `# HELP` text: backslash and line feed escaped (quotes stay).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::primary::Sched;
    use crate::primary::stats::SlotStats;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("plain 1.0"), "plain 1.0");
        assert_eq!(escape_label(r"a\b"), r"a\\b");
        assert_eq!(escape_label("say \"hi\""), r#"say \"hi\""#);
        assert_eq!(escape_label("two\nlines"), r"two\nlines");
        assert_eq!(escape_label("\\\"\n"), r#"\\\"\n"#);
        assert_eq!(escape_label("é ✓"), "é ✓");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
    }

    fn worker(id: u64, slot: usize, state: WorkerState, connections: u64) -> WorkerStats {
        WorkerStats {
            id,
            pid: 1000 + id as u32,
            slot,
            ready: state == WorkerState::Ready,
            stopping: state == WorkerState::Stopping,
            state,
            connections,
            unacknowledged: id as usize,
            in_flight: id,
            finished: None,
            weight: 1,
            uptime: Duration::from_millis(1500 * id),
        }
    }

    fn sample_stats() -> Stats {
        let mut stats = Stats::empty(Sched::ReusePort, "127.0.0.1:8000".parse().unwrap());
        stats.uptime = Duration::from_millis(12_345);
        stats.workers = vec![
            worker(3, 1, WorkerState::Ready, 7),
            worker(2, 2, WorkerState::Stopping, 5),
            worker(4, 2, WorkerState::Starting, 0),
        ];
        stats.slots = vec![
            SlotStats {
                slot: 1,
                active: true,
                restarts: 2,
                last_exit: None,
            },
            SlotStats {
                slot: 2,
                active: true,
                restarts: 0,
                last_exit: None,
            },
            SlotStats {
                slot: 3,
                active: false,
                restarts: 4,
                last_exit: None,
            },
        ];
        stats.replaced[Replacement::MaxAge.index()] = 3;
        stats.exited_connections = 10;
        stats.connections_held = 1;
        stats
    }

    #[test]
    fn renders_every_family_with_help_type_and_samples() {
        let text = render(&sample_stats());
        let version = env!("CARGO_PKG_VERSION");
        for line in [
            format!("distributor_info{{sched=\"reuseport\",version=\"{version}\"}} 1"),
            "distributor_uptime_seconds 12.345".into(),
            "distributor_workers{state=\"starting\"} 1".into(),
            "distributor_workers{state=\"ready\"} 1".into(),
            "distributor_workers{state=\"stopping\"} 1".into(),
            "distributor_ready_workers 1".into(),
            "distributor_slots 2".into(),
            "distributor_worker_up{worker=\"3\",pid=\"1003\",slot=\"1\",state=\"ready\"} 1".into(),
            "distributor_worker_up{worker=\"2\",pid=\"1002\",slot=\"2\",state=\"stopping\"} 1"
                .into(),
            "distributor_worker_connections_total{worker=\"3\",pid=\"1003\",slot=\"1\"} 7".into(),
            "distributor_worker_in_flight{worker=\"4\",pid=\"1004\",slot=\"2\"} 4".into(),
            "distributor_worker_uptime_seconds{worker=\"2\",pid=\"1002\",slot=\"2\"} 3.000".into(),
            "distributor_slot_restarts_total{slot=\"1\"} 2".into(),
            "distributor_slot_restarts_total{slot=\"2\"} 0".into(),
            "distributor_worker_replacements_total{reason=\"max-age\"} 3".into(),
            "distributor_worker_replacements_total{reason=\"exited\"} 0".into(),
            "distributor_connections_total 22".into(),
            "distributor_connections_held 1".into(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(text.ends_with('\n'));
        // A slot removed by a scale-down has no restarts series.
        assert!(!text.contains("slot=\"3\""), "{text}");
    }

    /// The format's rules, checked line by line: every sample belongs to
    /// the family last announced by `# HELP` and `# TYPE`, names are
    /// valid, counters end in `_total`, and no family appears twice.
    #[test]
    fn the_exposition_is_well_formed() {
        let text = render(&sample_stats());
        let mut families = std::collections::BTreeSet::new();
        let mut current: Option<(String, String)> = None;
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                let ty = lines.next().expect("TYPE after HELP");
                let kind = ty
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("{ty:?} after HELP of {name}"));
                assert!(matches!(kind, "counter" | "gauge"), "{ty}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                assert!(name.starts_with("distributor_"), "{name}");
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                    "{name}"
                );
                assert!(families.insert(name.clone()), "{name} twice");
                current = Some((name, kind.to_string()));
                continue;
            }
            let (family, _) = current.as_ref().expect("a sample before any HELP");
            let name_end = line.find(['{', ' ']).expect("name then value");
            assert_eq!(&line[..name_end], family, "{line}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert_eq!(families.len(), 13, "{families:?}");
    }

    #[test]
    fn a_steered_primary_says_so_in_its_info() {
        let mut stats = sample_stats();
        let version = env!("CARGO_PKG_VERSION");
        let plain = render(&stats);
        assert!(!plain.contains("steer="), "{plain}");
        stats.steer = crate::primary::Steer::RoundRobin;
        let text = render(&stats);
        let line =
            format!("distributor_info{{sched=\"reuseport\",steer=\"rr\",version=\"{version}\"}} 1");
        assert!(text.contains(&line), "{text}");
    }

    #[test]
    fn an_empty_primary_still_renders_every_family() {
        let text = render(&Stats::empty(
            Sched::RoundRobin,
            "127.0.0.1:1".parse().unwrap(),
        ));
        assert_eq!(text.matches("# TYPE ").count(), 13, "{text}");
        assert!(text.contains("distributor_workers{state=\"ready\"} 0\n"));
        assert!(text.contains("distributor_connections_total 0\n"));
    }
}
