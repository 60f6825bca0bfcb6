//! Soak: 300 000 short connections through the primary, then its fds and
//! memory must be what they were after a warm-up. Ignored by default: run
//! it in release mode,
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture
//! ```

use crate::util;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use util::{DEADLINE, Primary, get_once, proc_rss_kib};

const WARM_UP: u64 = 1_000;
const CONNECTIONS: u64 = 300_000;
const THREADS: u64 = 4;
/// The most the primary's resident memory may grow over the soak.
const RSS_GROWTH_KIB: u64 = 2 * 1024;

/// `total` requests, each on a new connection (`Connection: close`, the
/// server's close awaited), over [`THREADS`] threads; returns how many
/// failed and the first failure.
fn run_connections(primary: &Primary, total: u64) -> (u64, Option<String>) {
    let addr = primary.addr;
    let next = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let next = Arc::clone(&next);
            std::thread::spawn(move || {
                let (mut failed, mut first) = (0, None);
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    match get_once(addr) {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => {
                            failed += 1;
                            first.get_or_insert(format!("{r:?}"));
                        }
                        Err(e) => {
                            failed += 1;
                            first.get_or_insert(e.to_string());
                        }
                    }
                }
                (failed, first)
            })
        })
        .collect();
    let mut failed = 0;
    let mut first = None;
    for t in threads {
        let (f, e) = t.join().expect("a client thread panicked");
        failed += f;
        first = first.or(e);
    }
    (failed, first)
}

/// The primary's (fds, RSS in KiB), once its fd count has stayed the same
/// for a moment (connections just served may still be closing).
fn settled(primary: &Primary) -> (usize, u64) {
    let mut last = primary.fd_count();
    let deadline = Instant::now() + DEADLINE;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = primary.fd_count();
        if now == last || Instant::now() >= deadline {
            let rss = proc_rss_kib(primary.pid()).expect("the primary's VmRSS");
            return (now, rss);
        }
        last = now;
    }
}

/// 300 000 connections: none fails, and afterwards the primary has the
/// fds it had after a warm-up of 1 000 (±2) and its resident memory grew
/// by less than 2 MiB.
#[test]
#[ignore = "soak: about a minute; run in release mode with --ignored"]
fn hundreds_of_thousands_of_connections_leak_nothing() {
    if cfg!(debug_assertions) {
        eprintln!("NOTE: a debug build; the soak is meant for --release and will be slow");
    }
    let mut primary = Primary::start(2, &[]);
    primary.wait_all_ready();

    let (failed, first) = run_connections(&primary, WARM_UP);
    assert_eq!(failed, 0, "warm-up: first failure {first:?}");
    let (fds0, rss0) = settled(&primary);

    let t0 = Instant::now();
    let (failed, first) = run_connections(&primary, CONNECTIONS);
    let took = t0.elapsed();
    let (fds1, rss1) = settled(&primary);
    eprintln!(
        "soak: {CONNECTIONS} connections in {took:.1?} ({:.0}/s), {failed} failed; primary fds \
         {fds0} -> {fds1}, VmRSS {rss0} KiB -> {rss1} KiB ({:+} KiB)",
        CONNECTIONS as f64 / took.as_secs_f64(),
        rss1 as i64 - rss0 as i64
    );
    assert_eq!(failed, 0, "first failure: {first:?}");
    assert!(
        fds1.abs_diff(fds0) <= 2,
        "the primary's fds went from {fds0} to {fds1}: {:?}",
        util::proc_fds(primary.pid())
    );
    assert!(
        rss1 < rss0 + RSS_GROWTH_KIB,
        "the primary's VmRSS grew from {rss0} KiB to {rss1} KiB"
    );
    // Same workers throughout: none died or was replaced.
    assert_eq!(primary.started().len(), 2, "{}", primary.log().dump());
    primary.assert_running();
    primary.assert_no_panic();
}
