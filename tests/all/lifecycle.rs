//! Worker lifecycles with programs that do not speak the protocol (a
//! socket-activated Python app, tests/fixtures/lifecycle_app.py), and
//! recycling: reloads in every readiness mode, workers that leave by
//! themselves, stops that do not wait on a channel nobody reads, nothing a
//! worker started outliving it, the slot a worker is told, and
//! `--max-requests`, `--max-memory`, `--max-age` under load.
//!
//! Real binary, real worker processes, real TCP clients on 127.0.0.1; every
//! wait bounded. Tests that need python3 say so and skip without it.

use crate::util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use distributor::{Event, Primary as Library, Replacement, Sched, WorkerCommand};
use nix::sys::signal::Signal;
use util::{
    DEADLINE, Load, LoadStats, Mode, Primary, Scrape, bin, example_bin, get_path, have_program,
    kill_pid, parse_metrics_on, pid_gone, poll_until, proc_environ, repo_path, run_library,
    shut_down, skip, wait_gone,
};

/// `python3 tests/fixtures/lifecycle_app.py`, or `None` (with a visible
/// note) without python3.
fn app(test: &str) -> Option<String> {
    if !have_program("python3", "--version") {
        skip(test, "python3 is not installed");
        return None;
    }
    let path = repo_path("tests/fixtures/lifecycle_app.py");
    Some(path.to_str().expect("a UTF-8 path").to_string())
}

/// `distributor -w N -l 127.0.0.1:0 --sched shared EXTRA... -- python3 APP`
/// with `env` for the app, started.
fn start_app(workers: usize, extra: &[&str], app: &str, env: &[(&str, &str)]) -> Primary {
    let mut cmd = Command::new(bin());
    cmd.args([
        "-w",
        &workers.to_string(),
        "-l",
        "127.0.0.1:0",
        "--sched",
        "shared",
    ])
    .args(extra)
    .args(["--", "python3", app]);
    for var in [
        "APP_EXIT_AFTER",
        "APP_STOPPING_AFTER",
        "APP_READY",
        "APP_READY_AFTER",
        "APP_CHILD",
        "APP_CHILD_MB",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    Primary::start_command(cmd, workers)
}

/// The pids the app printed as `child PID` on stdout (the workers'
/// stdout, relayed with a `[worker ID] ` prefix), waiting for `n`.
fn children(p: &Primary, n: usize) -> Vec<u32> {
    let found = poll_until(DEADLINE, || p.proc.stdout.count("] child ") >= n);
    assert!(found, "no {n} children; stdout:\n{}", p.proc.stdout.dump());
    p.proc
        .stdout
        .snapshot()
        .iter()
        .filter_map(|l| l.split("] child ").nth(1)?.trim().parse().ok())
        .collect()
}

/// The metrics endpoint's address (`--metrics 127.0.0.1:0`).
fn metrics_addr(p: &Primary) -> SocketAddr {
    let line = p.log().wait_for("metrics on ");
    parse_metrics_on(&line).unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// `distributor_worker_replacements_total{reason=WHY}` now.
fn replacements(p: &Primary, metrics: SocketAddr, why: &str) -> f64 {
    let r = get_path(metrics, "/metrics").expect("GET /metrics");
    Scrape::parse(&r.body)
        .value("distributor_worker_replacements_total", &[("reason", why)])
        .unwrap_or_else(|| panic!("no {why} replacements in:\n{}\n{}", r.body, p.log().dump()))
}

/// Asserts that the log shows no backoff, no crash loop and no warning.
fn assert_no_backoff(p: &Primary) {
    for needle in ["restarting worker slot", "crash-looping", " WARN "] {
        assert_eq!(
            p.log().count(needle),
            0,
            "{needle:?} in:\n{}",
            p.log().dump()
        );
    }
}

/// Asserts that `stats` saw no failure, naming `what`.
fn assert_no_failure(stats: &LoadStats, what: &str, p: &Primary) {
    eprintln!("{what}: {stats}");
    assert_eq!(
        stats.failures(),
        0,
        "{what}: {stats}\nlog:\n{}",
        p.log().dump()
    );
}

// ---------------------------------------------------------------------------
// Reloads

/// `--ready start` (a worker is ready once started): three SIGHUPs, each
/// replacing both workers (it used to do the first and then ignore every
/// later one), then the last two serve.
#[test]
fn every_sighup_reloads_with_ready_start() {
    let Some(app) = app("every_sighup_reloads_with_ready_start") else {
        return;
    };
    let p = start_app(2, &["--ready", "start"], &app, &[]);
    p.wait_all_ready();
    for round in 1..=3u64 {
        let mark = p.log().len();
        p.signal(Signal::SIGHUP);
        p.log()
            .wait_for_from(mark, "reloading: replacing 2 workers one at a time");
        p.log().wait_for_from(mark, "reload complete");
        for id in [2 * round + 1, 2 * round + 2] {
            p.wait_worker_ready(id);
        }
    }
    for id in 1..=6 {
        p.wait_exited(id);
    }
    // Both last workers answer (the kernel picks which; each accepts once
    // its program has started).
    let mut ids = std::collections::BTreeSet::new();
    let both = poll_until(DEADLINE, || {
        ids.insert(p.get().worker().0);
        ids.len() >= 2
    });
    assert!(both, "{ids:?}\n{}", p.log().dump());
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), [7, 8]);
    p.assert_no_panic();
}

/// A SIGHUP during a reload starts it over, and says so: the new worker of
/// the first reload that is not ready yet is stopped, and the reload that
/// completes replaces both slots with workers started after the second
/// SIGHUP.
#[test]
fn a_sighup_during_a_reload_starts_it_over() {
    let Some(app) = app("a_sighup_during_a_reload_starts_it_over") else {
        return;
    };
    // Ready one second after start (READY=1): time for a second SIGHUP.
    let env = [("APP_READY", "1"), ("APP_READY_AFTER", "1")];
    let p = start_app(2, &["--ready", "notify"], &app, &env);
    p.wait_all_ready();
    p.signal(Signal::SIGHUP);
    p.wait_started(3);
    let mark = p.log().len();
    p.signal(Signal::SIGHUP);
    p.log()
        .wait_for_from(mark, "reloading: a reload was under way; starting over");
    p.log().wait_for_from(mark, "reload complete");
    assert_eq!(p.log().count("reload complete"), 1, "{}", p.log().dump());
    // Worker 3 (the first reload's) was stopped before it was ready.
    p.wait_exited(3);
    let mut alive: Vec<u64> = p.alive_workers().iter().map(|w| w.0).collect();
    alive.sort();
    assert!(
        poll_until(DEADLINE, || {
            alive = p.alive_workers().iter().map(|w| w.0).collect();
            alive.len() == 2
        }),
        "{alive:?}\n{}",
        p.log().dump()
    );
    assert!(
        alive.iter().all(|&id| id >= 4),
        "{alive:?}\n{}",
        p.log().dump()
    );
    p.assert_no_panic();
}

// ---------------------------------------------------------------------------
// Programs that do not speak the protocol

/// In a kernel mode a program that never says hello is ready soon after
/// it starts (it accepts by itself): not after the hello timeout, which is
/// a minute here.
#[test]
fn silent_programs_are_ready_soon_in_kernel_modes() {
    let Some(app) = app("silent_programs_are_ready_soon_in_kernel_modes") else {
        return;
    };
    for sched in [Sched::Shared, Sched::ReusePort] {
        let lib = run_library(
            Library::builder()
                .workers(2)
                .listen("127.0.0.1:0".parse().unwrap())
                .sched(sched)
                .hello_timeout(Duration::from_secs(60))
                .command(WorkerCommand::new("python3", [&app])),
        );
        let ready = util::wait_ready_events(&lib.events, 2, true);
        assert_eq!(ready.len(), 2, "{sched}");
        let r = util::get_once(lib.addr).expect("a request");
        assert_eq!(r.status, 200, "{sched}: {r:?}");
        shut_down(&lib.handle, lib.runner);
    }
}

/// SIGTERM to the primary: a program that never said hello gets SIGTERM
/// at once (its own graceful stop), not after half the shutdown timeout
/// (30 s here) behind a STOP message it never reads.
#[test]
fn silent_programs_stop_at_once() {
    let Some(app) = app("silent_programs_stop_at_once") else {
        return;
    };
    let mut p = start_app(2, &["--shutdown-timeout", "60s"], &app, &[]);
    p.wait_all_ready();
    assert_eq!(p.get().status, 200);
    p.terminate_promptly();
    for id in [1, 2] {
        let how = p.wait_exited(id);
        assert!(
            how == "status 0" || how == "signal 15 (SIGTERM)",
            "worker {id}: {how}"
        );
    }
}

// ---------------------------------------------------------------------------
// Workers that leave by themselves

/// A worker that exits with status 0 after it has served (recycling
/// itself, as apps do after N requests) is replaced at once, without
/// backoff and without a crash-loop warning, however often it happens; no
/// request fails (what waits in the shared socket's backlog is the next
/// worker's), and the metrics count the replacements.
#[test]
fn a_worker_that_exits_0_after_serving_is_replaced_at_once() {
    let Some(app) = app("a_worker_that_exits_0_after_serving_is_replaced_at_once") else {
        return;
    };
    // READY=1 once it serves (which counts as a hello for a program that
    // does not speak the protocol): its exits come after it was ready.
    let p = start_app(
        1,
        &["--metrics", "127.0.0.1:0"],
        &app,
        &[("APP_EXIT_AFTER", "5"), ("APP_READY", "1")],
    );
    let metrics = metrics_addr(&p);
    p.wait_all_ready();
    let load = Load::start(p.addr, &[Mode::Fresh], DEADLINE, Duration::from_secs(60));
    // Five workers in a row leave (each within a second of starting: a
    // crash loop, had they failed).
    p.wait_started(6);
    assert!(load.wait_progress(5, DEADLINE), "{}", p.log().dump());
    let stats = load.stop();
    assert_no_failure(&stats, "workers exiting 0 after 5 requests", &p);
    for id in 1..=5 {
        assert_eq!(p.wait_exited(id), "status 0");
    }
    assert_eq!(
        p.log()
            .count("it left by itself, so it is replaced at once"),
        p.log().count(" exited with "),
        "{}",
        p.log().dump()
    );
    assert_no_backoff(&p);
    assert!(replacements(&p, metrics, "exited") >= 5.0);
    p.assert_no_panic();
}

/// A worker that exits with status 0 before it was ever ready did not
/// recycle itself: it failed to start, and its restarts back off (no fork
/// storm).
#[test]
fn a_worker_that_exits_0_before_it_was_ready_backs_off() {
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "1", "-l", "127.0.0.1:0", "--", "true"]);
    let p = Primary::start_command(cmd, 1);
    p.log().wait_for("before it was ever ready");
    let (_, line) = p.log().wait_from(0, "a backoff", DEADLINE, |l| {
        l.contains("restarting worker slot 1 in ") || l.contains("crash-looping")
    });
    assert!(!line.contains(" 0ns"), "{line}");
}

/// A worker that says it is stopping (`STOPPING=1` on its notify socket)
/// gets its successor started at once, before it has exited, without
/// backoff; no request fails.
#[test]
fn a_worker_that_says_it_is_stopping_gets_its_successor_first() {
    let Some(app) = app("a_worker_that_says_it_is_stopping_gets_its_successor_first") else {
        return;
    };
    let p = start_app(1, &[], &app, &[("APP_STOPPING_AFTER", "5")]);
    p.wait_all_ready();
    let load = Load::start(p.addr, &[Mode::Fresh], DEADLINE, Duration::from_secs(60));
    // (A successor accepts from the shared socket as soon as it runs.)
    p.wait_started(3);
    assert!(load.wait_progress(5, DEADLINE), "{}", p.log().dump());
    let stats = load.stop();
    assert_no_failure(&stats, "workers saying STOPPING=1 after 5 requests", &p);
    p.wait_exited(2);
    let lines = p.log().snapshot();
    for id in [1u64, 2] {
        let said = lines.iter().position(|l| {
            l.contains(&format!("worker {id} (pid "))
                && l.contains("says it is stopping (STOPPING=1)")
        });
        let (successor, exit) = (p.started_at(id + 1), p.exited_at(id));
        assert!(
            matches!((said, successor, exit), (Some(a), Some(b), Some(c)) if a < b && b < c),
            "worker {id}: said {said:?}, successor {successor:?}, exit {exit:?}:\n{}",
            p.log().dump()
        );
    }
    assert_no_backoff(&p);
}

/// The protocol's RECYCLE (`WorkerListener::recycle`, the cluster example
/// with `--recycle-after`): one worker, under load; each worker's
/// successor is ready before the old one exits (capacity never drops),
/// nothing fails, and the figures count the replacements.
#[test]
fn a_worker_that_asks_to_be_recycled_is_replaced_by_a_ready_one() {
    let lib = run_library(
        Library::builder()
            .workers(1)
            .listen("127.0.0.1:0".parse().unwrap())
            .command(WorkerCommand::new(
                example_bin("cluster"),
                ["--recycle-after", "20"],
            )),
    );
    let load = Load::start(
        lib.addr,
        &[Mode::Fresh, Mode::KeepAlive],
        DEADLINE,
        Duration::from_secs(60),
    );
    let mut order = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while order
        .iter()
        .filter(|e| matches!(e, Event::WorkerExited { .. }))
        .count()
        < 3
    {
        match lib.events.recv_deadline(deadline) {
            Ok(e @ (Event::WorkerReady { .. } | Event::WorkerExited { .. })) => order.push(e),
            Ok(_) => {}
            Err(e) => panic!("three recycles did not happen: {e}; events {order:?}"),
        }
    }
    let stats = load.stop();
    eprintln!("recycling by RECYCLE under load: {stats}");
    assert_eq!(stats.failures(), 0, "{stats}");
    // Worker N exits only after worker N+1 is ready.
    for id in 1..=3u64 {
        let ready_next = order
            .iter()
            .position(|e| matches!(e, Event::WorkerReady { id: i, .. } if *i == id + 1));
        let exit = order
            .iter()
            .position(|e| matches!(e, Event::WorkerExited { id: i, .. } if *i == id));
        assert!(
            matches!((ready_next, exit), (Some(r), Some(x)) if r < x),
            "worker {id}: {order:?}"
        );
        let Some(Event::WorkerExited { status, .. }) = exit.map(|x| &order[x]) else {
            unreachable!()
        };
        assert!(status.success(), "worker {id}: {status:?}");
    }
    let figures = lib.handle.stats().expect("stats");
    assert!(
        figures.replacements(Replacement::Announced) >= 3,
        "{figures:?}"
    );
    assert!(figures.slots.iter().all(|s| s.restarts == 0), "{figures:?}");
    shut_down(&lib.handle, lib.runner);
}

// ---------------------------------------------------------------------------
// Nothing a worker started outlives it

/// Each worker starts a child that ignores SIGTERM. The primary is killed
/// with SIGKILL: the workers die with it (`PR_SET_PDEATHSIG`), and their
/// children, which it cannot reach, are killed by its guardian process.
#[test]
fn nothing_a_worker_started_outlives_the_primary_killed() {
    let Some(app) = app("nothing_a_worker_started_outlives_the_primary_killed") else {
        return;
    };
    let p = start_app(2, &[], &app, &[("APP_CHILD", "1")]);
    p.wait_all_ready();
    let kids = children(&p, 2);
    let workers: Vec<u32> = p.started().iter().map(|w| w.1).collect();
    p.signal(Signal::SIGKILL);
    let left = wait_gone(&kids, DEADLINE);
    for &pid in &left {
        kill_pid(pid, Signal::SIGKILL);
    }
    assert!(left.is_empty(), "children {left:?} outlived the primary");
    assert!(wait_gone(&workers, DEADLINE).is_empty());
}

/// The same at a graceful stop, and at a reload: the old workers'
/// children are gone once the old workers exit; the new workers' are not.
#[test]
fn nothing_a_worker_started_outlives_a_stop_or_a_reload() {
    let Some(app) = app("nothing_a_worker_started_outlives_a_stop_or_a_reload") else {
        return;
    };
    let mut p = start_app(2, &[], &app, &[("APP_CHILD", "1")]);
    p.wait_all_ready();
    let old = children(&p, 2);
    p.signal(Signal::SIGHUP);
    p.log().wait_for("reload complete");
    p.wait_exited(1);
    p.wait_exited(2);
    let left = wait_gone(&old, DEADLINE);
    assert!(
        left.is_empty(),
        "children {left:?} of replaced workers live"
    );
    let new = children(&p, 4);
    let new: Vec<u32> = new.into_iter().filter(|c| !old.contains(c)).collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(new.iter().all(|&c| !pid_gone(c)));
    p.signal(Signal::SIGTERM);
    assert_eq!(p.proc.expect_exit(DEADLINE).code(), Some(0));
    let left = wait_gone(&new, DEADLINE);
    for &pid in &left {
        kill_pid(pid, Signal::SIGKILL);
    }
    assert!(
        left.is_empty(),
        "children {left:?} outlived a graceful stop"
    );
}

// ---------------------------------------------------------------------------
// The slot a worker is told

/// `DISTRIBUTOR_SLOT` (from 1) and `NODE_APP_INSTANCE` (PM2's, from 0):
/// a slot's next worker is told the same slot as the one it replaces.
#[test]
fn a_slots_workers_are_told_its_number() {
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--sched", "shared"])
        .args(["--ready", "start", "--", "sleep", "300"]);
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    let slot_of = |pid: u32| {
        let env: BTreeMap<String, String> =
            proc_environ(pid).expect("environ").into_iter().collect();
        (
            env.get("DISTRIBUTOR_SLOT").cloned(),
            env.get("NODE_APP_INSTANCE").cloned(),
        )
    };
    let pids: BTreeMap<u64, u32> = p.started().into_iter().collect();
    assert_eq!(slot_of(pids[&1]), (Some("1".into()), Some("0".into())));
    assert_eq!(slot_of(pids[&2]), (Some("2".into()), Some("1".into())));
    kill_pid(pids[&2], Signal::SIGKILL);
    let replacement = p.wait_started(3);
    assert_eq!(slot_of(replacement), (Some("2".into()), Some("1".into())));
}

// ---------------------------------------------------------------------------
// Recycling by limits

/// Runs the demo worker with `limits` under load (new and kept-alive
/// connections) until `n` workers were replaced for `why`; no request
/// fails, and each replaced worker exited 0 after its successor was ready.
fn recycles_under_load(limits: &[&str], why: &str, n: f64) -> Primary {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(limits);
    let p = Primary::start(2, &args);
    let metrics = metrics_addr(&p);
    p.wait_all_ready();
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::KeepAlive],
        DEADLINE,
        Duration::from_secs(90),
    );
    let done = poll_until(DEADLINE * 2, || replacements(&p, metrics, why) >= n);
    assert!(
        done,
        "fewer than {n} {why} replacements:\n{}",
        p.log().dump()
    );
    assert!(load.wait_progress(50, DEADLINE), "{}", p.log().dump());
    let stats = load.stop();
    assert_no_failure(&stats, &format!("recycling by {why}"), &p);
    let exits = util::exit_lines(&p);
    assert!(exits.len() >= n as usize, "{exits:?}");
    for (id, (_, how, _)) in &exits {
        assert_eq!(how, "status 0", "worker {id}:\n{}", p.log().dump());
    }
    assert!(
        p.log().count(&format!("({why})")) >= n as usize,
        "no takeover lines:\n{}",
        p.log().dump()
    );
    assert_no_backoff(&p);
    p
}

/// `--max-requests 30 --max-requests-jitter 10`: each worker is recycled
/// after 30 to 40 connections, one slot at a time, its successor first.
#[test]
fn max_requests_recycles_under_load_and_loses_nothing() {
    let p = recycles_under_load(
        &["--max-requests", "30", "--max-requests-jitter", "10"],
        "max-requests",
        4.0,
    );
    for line in p.log().snapshot() {
        if let Some(rest) = line.split("(--max-requests ").nth(1) {
            let limit: u64 = rest.split(')').next().unwrap().parse().unwrap();
            assert!((30..=40).contains(&limit), "{line}");
        }
    }
}

/// `--max-age 1s`: every worker is recycled once it has run a second.
#[test]
fn max_age_recycles_under_load_and_loses_nothing() {
    recycles_under_load(&["--max-age", "1s"], "max-age", 3.0);
}

/// `--max-memory 1M`: the demo worker uses more than that, so workers are
/// recycled one after the other; the reason names the figure.
#[test]
fn max_memory_recycles_under_load_and_loses_nothing() {
    let p = recycles_under_load(&["--max-memory", "1M"], "max-memory", 3.0);
    assert!(
        p.log()
            .contains("(the RSS of its process tree; --max-memory 1.0 MiB)"),
        "{}",
        p.log().dump()
    );
}

/// `--max-memory` counts the worker's whole process tree: a worker that
/// is small itself but whose child holds 64 MiB is recycled under a
/// 48 MiB limit.
#[test]
fn max_memory_counts_what_the_worker_started() {
    let Some(app) = app("max_memory_counts_what_the_worker_started") else {
        return;
    };
    let p = start_app(1, &["--max-memory", "48M"], &app, &[("APP_CHILD_MB", "64")]);
    p.wait_all_ready();
    let kids = children(&p, 1);
    let (_, line) = p.log().wait_from(0, "a max-memory recycle", DEADLINE, |l| {
        l.contains("worker 1 (pid ") && l.contains("--max-memory 48.0 MiB")
    });
    assert!(line.contains("recycling it"), "{line}");
    p.wait_exited(1);
    assert!(wait_gone(&kids[..1], DEADLINE).is_empty());
}
