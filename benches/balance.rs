//! `cargo bench --bench balance`: the lab with fixed settings. Runs the
//! built-in demo worker under every mode, 8 workers (more than the cores of
//! a small machine, where kernel imbalance shows), with new connections per
//! request and then keep-alive, and prints the tables.
//!
//! Settings can be changed through the environment: `BALANCE_WORKERS`,
//! `BALANCE_CONNECTIONS`, `BALANCE_SECONDS`.

use std::time::Duration;

use distributor::lab::{self, CompareOptions, report};
use distributor::{Sched, WorkerCommand};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // useful either: this is a benchmark, run it only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let workers = setting("BALANCE_WORKERS", 8) as usize;
    let connections = setting("BALANCE_CONNECTIONS", 64) as usize;
    let seconds = setting("BALANCE_SECONDS", 3);
    let demo = WorkerCommand::new(env!("CARGO_BIN_EXE_distributor"), Vec::<String>::new())
        .env(distributor::demo::DEMO_WORKER_ENV, "1");
    for keepalive in [false, true] {
        let opts = CompareOptions {
            workers,
            scheds: Sched::ALL.iter().map(|&s| s.into()).collect(),
            duration: Duration::from_secs(seconds),
            connections,
            keepalive,
            path: "/".into(),
            threads: 2,
            slow: None,
            sessions: None,
            command: demo.clone(),
        };
        let reports = match lab::compare(&opts, &mut |_| {}) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("balance: {e}");
                std::process::exit(1);
            }
        };
        let meta = report::Meta {
            machine: lab::machine_description(),
            command: "the built-in demo worker (cargo bench --bench balance)".into(),
            workers,
            connections,
            duration_s: seconds as f64,
            keepalive,
            path: "/".into(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        };
        println!("{}", report::table(&meta, &reports));
    }
}
