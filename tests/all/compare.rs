//! `distributor compare`: the lab runs the demo worker under every mode and
//! reports figures that add up, as a table, as JSON and as an SVG chart.

use crate::util;

use std::process::Command;

use util::TempDir;

fn compare(args: &[&str]) -> std::process::Output {
    Command::new(util::bin())
        .arg("compare")
        .args(["-w", "2", "-d", "300ms", "-c", "8"])
        .args(args)
        .output()
        .expect("run distributor compare")
}

#[test]
fn json_has_every_mode_with_figures_that_add_up() {
    let dir = TempDir::new("compare");
    let svg = dir.path().join("chart.svg");
    let out = compare(&["--json", "--svg", svg.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let modes = doc["modes"].as_array().expect("a `modes` array");
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["rr", "least-conn", "p2c", "shared", "reuseport"]);
    for m in modes {
        let requests = m["requests"].as_u64().expect("requests");
        assert!(requests > 0, "{m}");
        assert_eq!(m["errors"].as_u64(), Some(0), "{m}");
        assert!(m["requests_per_sec"].as_f64().unwrap() > 0.0, "{m}");
        let (p50, p99, p999) = (
            m["p50_us"].as_f64().unwrap(),
            m["p99_us"].as_f64().unwrap(),
            m["p999_us"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{m}");
        let per_worker = m["per_worker"].as_array().expect("per_worker");
        assert_eq!(per_worker.len(), 2, "one entry per worker: {m}");
        let sum: u64 = per_worker
            .iter()
            .map(|w| w["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, requests, "per-worker counts add up: {m}");
        let jain = m["jain"].as_f64().unwrap();
        assert!(
            (0.5..=1.0).contains(&jain),
            "Jain's index of 2 workers: {m}"
        );
    }
    // Round-robin over new connections is exact: each worker gets half.
    let rr = &modes[0]["per_worker"];
    let a = rr[0]["requests"].as_u64().unwrap();
    let b = rr[1]["requests"].as_u64().unwrap();
    assert!(a.abs_diff(b) <= 8, "rr shares {a} and {b}");
    let chart = std::fs::read_to_string(&svg).expect("the SVG was written");
    assert!(chart.trim_start().starts_with("<svg") || chart.starts_with("<?xml"));
    assert!(chart.trim_end().ends_with("</svg>"));
    for mode in ["rr", "shared", "reuseport"] {
        assert!(chart.contains(mode), "the chart names {mode}");
    }
}

#[test]
fn the_table_has_a_row_per_mode_asked() {
    let out = compare(&["--sched", "rr,reuseport", "--keepalive"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("rr ") || l.starts_with("reuseport ") || l.starts_with("shared "))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[0].starts_with("rr "), "{table}");
    assert!(rows[1].starts_with("reuseport "), "{table}");
    assert!(table.contains("Jain"), "{table}");
}

#[test]
fn a_bad_duration_is_one_clear_line() {
    let out = Command::new(util::bin())
        .args(["compare", "--duration", "soon"])
        .output()
        .expect("run distributor compare");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{stderr}"
    );
}

/// With keep-alive the report counts connections too: rr places them
/// exactly evenly (8 connections over 2 workers: 4 each), and the output
/// says how to read request shares then. Without `-w`, the default is two
/// workers per core, so that workers compete for cores.
#[test]
fn keepalive_reports_connection_shares_and_the_default_is_two_workers_per_core() {
    let out = compare(&["--sched", "rr,shared", "--keepalive", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rr = &doc["modes"][0];
    assert_eq!(rr["mode"], "rr");
    assert_eq!(
        rr["conn_share_pct"],
        serde_json::json!([50.0, 50.0]),
        "{rr}"
    );
    let conns: Vec<u64> = rr["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections"].as_u64().expect("connections"))
        .collect();
    assert_eq!(conns, [4, 4], "{rr}");
    let shared = &doc["modes"][1];
    let total: u64 = shared["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 8, "every connection counted once: {shared}");

    let table = compare(&["--sched", "rr", "--keepalive"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("conns min–max %"), "{text}");
    assert!(
        text.contains("keep-alive: each connection is placed once"),
        "{text}"
    );

    let out = Command::new(util::bin())
        .args(["compare", "-d", "200ms", "-c", "4", "-s", "rr", "--json"])
        .output()
        .expect("run distributor compare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert_eq!(doc["meta"]["workers"].as_u64(), Some(2 * cores), "{doc}");
    assert_eq!(doc["meta"]["cores"].as_u64(), Some(cores), "{doc}");
}
