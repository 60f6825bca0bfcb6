//! Chaos: workers SIGKILLed at random under continuous load. A request can
//! legitimately fail only when the worker that owned its connection (had
//! acknowledged it) dies before answering; so failures are bounded by what
//! the killed workers had in flight, connections are never refused, and
//! the primary keeps serving.

use crate::util;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use util::{DEADLINE, Load, Mode, Primary, signal_child_of};

/// At most this many kills...
const KILLS: u64 = 20;
/// ...one about every this long...
const KILL_EVERY: Duration = Duration::from_millis(300);
/// ...for at most this long.
const CHAOS_FOR: Duration = Duration::from_secs(8);

/// A small xorshift generator: no dependency, seed printed for reruns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Three demo workers, four client threads (two with a new connection per
/// request, two on kept-alive connections), and a worker SIGKILLed about
/// every 300 ms (20 kills at most, always leaving one worker alive).
/// Asserts: no connection refused and no bad status ever; failed requests
/// at most one per client thread per kill (each thread has one request in
/// flight, and only the killed worker's can fail); the primary never
/// exits and serves without failure once the chaos stops.
#[test]
fn random_worker_kills_under_load() {
    let mut primary = Primary::start(3, &[]);
    primary.wait_all_ready();
    let modes = [Mode::Fresh, Mode::Fresh, Mode::KeepAlive, Mode::KeepAlive];
    let load = Load::start(
        primary.addr,
        &modes,
        Duration::from_secs(40),
        Duration::from_secs(120),
    );
    assert!(load.wait_progress(100, DEADLINE), "no load");

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut rng = Rng(seed);
    let t0 = Instant::now();
    let mut kills = 0;
    let mut killed = Vec::new();
    while kills < KILLS && t0.elapsed() < CHAOS_FOR {
        std::thread::sleep(KILL_EVERY);
        let alive: Vec<(u64, u32)> = primary
            .alive_workers()
            .into_iter()
            .filter(|&(_, pid)| !util::pid_gone(pid))
            .collect();
        if alive.len() < 2 {
            continue;
        }
        let (id, pid) = alive[(rng.next() % alive.len() as u64) as usize];
        if signal_child_of(primary.pid(), pid, Signal::SIGKILL) {
            kills += 1;
            killed.push(id);
        }
    }
    primary.assert_running();
    // Serving goes on after the chaos.
    assert!(
        load.wait_progress(200, DEADLINE),
        "no progress after the chaos; log:\n{}",
        primary.log().dump()
    );
    let stats = load.stop();
    eprintln!(
        "chaos (seed {seed}): {kills} kills in {:?} (workers {killed:?}); {stats}",
        t0.elapsed()
    );

    assert!(kills >= 5, "only {kills} kills: {}", primary.log().dump());
    assert_eq!(stats.connect_failures, 0, "{stats}");
    assert_eq!(stats.bad_status, 0, "{stats}");
    let bound = kills * modes.len() as u64;
    assert!(
        stats.failures() <= bound,
        "{} failed requests for {kills} kills (at most {bound}): {stats}",
        stats.failures()
    );
    for id in &killed {
        assert_eq!(
            primary.wait_exited(*id),
            "signal 9 (SIGKILL)",
            "worker {id}"
        );
    }

    // Back to three workers, and not one failure on a quiet run.
    assert!(
        util::poll_until(DEADLINE, || primary.alive_workers().len() == 3),
        "{}",
        primary.log().dump()
    );
    assert!(
        util::poll_until(DEADLINE, || {
            primary.log().count(" ready: ") >= primary.log().count(" started (pid ")
        }),
        "a replacement never became ready: {}",
        primary.log().dump()
    );
    let quiet = Load::start(primary.addr, &modes, DEADLINE, Duration::from_secs(60));
    assert!(quiet.wait_progress(200, DEADLINE), "no progress when quiet");
    let quiet = quiet.stop();
    assert_eq!(quiet.failures(), 0, "{quiet}");
    primary.assert_running();
    primary.assert_no_panic();
}
