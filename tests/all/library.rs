//! The library API without the command: an already-bound listener, no
//! signals, a handle to steer it and stats to read, in this process.

use crate::util;

use std::net::TcpListener;
use std::time::Duration;

use distributor::{Primary, Sched, WorkerState};
use nix::sys::signal::Signal;
use util::{
    HttpConn, Library, Scrape, demo_command, get_once, get_path, kill_pid, parse_worker,
    run_library,
};

fn plain_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind")
}

fn stats_figures(sched: Sched, listener: TcpListener) {
    let Library {
        addr,
        events,
        handle,
        runner,
        ..
    } = run_library(
        Primary::builder()
            .workers(3)
            .listener(listener)
            .sched(sched)
            .command(demo_command()),
    );
    util::wait_ready_events(&events, 3, false);

    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let r = get_once(addr).expect("request");
        *seen
            .entry(parse_worker(&r.body).expect("demo body").0)
            .or_insert(0u64) += 1;
    }
    // Kernel-mode workers report at most every 100 ms, and at stop.
    let ok = util::poll_until(Duration::from_secs(10), || {
        let stats = handle.stats().expect("stats");
        assert_eq!(stats.sched, sched);
        assert_eq!(stats.local_addr, addr);
        assert_eq!(stats.workers.len(), 3);
        stats
            .workers
            .iter()
            .all(|w| w.connections == seen.get(&w.id).copied().unwrap_or(0))
    });
    assert!(
        ok,
        "stats {:?} never matched what clients saw {seen:?}",
        handle.stats()
    );
    if sched == Sched::RoundRobin {
        assert!(seen.values().all(|&n| n == 10), "rr is exact: {seen:?}");
        // The demo reports its finished connections where the primary
        // reads them...
        let ok = util::poll_until(Duration::from_secs(10), || {
            let stats = handle.stats().expect("stats");
            stats
                .workers
                .iter()
                .all(|w| w.finished == Some(w.connections) && w.in_flight == 0)
        });
        assert!(ok, "finished never caught up: {:?}", handle.stats());
    } else {
        // ...and sends none in the kernel modes, where no policy uses them.
        let stats = handle.stats().expect("stats");
        assert!(
            stats.workers.iter().all(|w| w.finished.is_none()),
            "{stats:?}"
        );
    }
    util::shut_down(&handle, runner);
    assert!(handle.stats().is_err(), "a stopped primary answers no more");
}

#[test]
fn stats_count_what_each_worker_took_in_rr() {
    stats_figures(Sched::RoundRobin, plain_listener());
}

/// A worker acknowledges a connection when it receives it, not when its
/// client speaks: a silent client's connection is acknowledged at once and
/// counted in flight, so that with room for one unacknowledged connection
/// the next clients are served while it stays silent; its close is then
/// reported finished.
#[test]
fn a_silent_client_is_acknowledged_without_waiting_for_it() {
    let Library {
        addr,
        events,
        handle,
        runner,
        ..
    } = run_library(
        Primary::builder()
            .workers(1)
            .listener(plain_listener())
            .sched(Sched::RoundRobin)
            .max_unacked(1)
            .command(demo_command()),
    );
    util::wait_ready_events(&events, 1, false);
    let silent = HttpConn::connect(addr).expect("connect");
    let ok = util::poll_until(util::DEADLINE, || {
        let w = &handle.stats().expect("stats").workers[0];
        w.connections == 1 && w.unacknowledged == 0 && w.in_flight == 1
    });
    assert!(
        ok,
        "the silent client's connection was never acknowledged: {:?}",
        handle.stats()
    );
    for i in 0..3 {
        let r = get_once(addr).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
    }
    drop(silent);
    let ok = util::poll_until(util::DEADLINE, || {
        let w = &handle.stats().expect("stats").workers[0];
        w.connections == 4 && w.finished == Some(4) && w.in_flight == 0
    });
    assert!(ok, "finished never caught up: {:?}", handle.stats());
    util::shut_down(&handle, runner);
}

#[test]
fn stats_count_what_each_worker_took_in_shared() {
    stats_figures(Sched::Shared, plain_listener());
}

#[test]
fn stats_count_what_each_worker_took_in_reuseport() {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    listener.set_reuse_port(true).expect("SO_REUSEPORT");
    listener
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .expect("bind");
    listener.listen(128).expect("listen");
    let listener: TcpListener = listener.into();
    // A reuseport primary needs SO_REUSEPORT on a listener it is given;
    // without it the builder says so.
    let plain = TcpListener::bind("127.0.0.1:0").expect("bind");
    let err = Primary::builder()
        .listener(plain)
        .sched(Sched::ReusePort)
        .command(demo_command())
        .build()
        .expect_err("a plain listener is refused in reuseport mode");
    assert!(err.to_string().contains("SO_REUSEPORT"), "{err}");
    stats_figures(Sched::ReusePort, listener);
}

#[test]
fn handle_scales_and_reloads() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let Library {
        addr,
        events,
        handle,
        runner,
        ..
    } = run_library(
        Primary::builder()
            .workers(1)
            .listener(listener)
            .command(demo_command()),
    );
    util::wait_ready_events(&events, 1, false);
    handle.add_worker().expect("add");
    util::wait_ready_events(&events, 1, false);
    let ids = |h: &distributor::Handle| -> Vec<u64> {
        h.stats()
            .expect("stats")
            .workers
            .iter()
            .map(|w| w.id)
            .collect()
    };
    assert_eq!(ids(&handle), [1, 2]);
    handle.reload().expect("reload");
    // Two new workers, each ready before an old one is stopped.
    util::wait_ready_events(&events, 2, false);
    let ok = util::poll_until(Duration::from_secs(20), || ids(&handle) == [3, 4]);
    assert!(ok, "after the reload: {:?}", ids(&handle));
    assert_eq!(get_once(addr).expect("request").status, 200);
    handle.remove_worker().expect("remove");
    let ok = util::poll_until(Duration::from_secs(20), || ids(&handle).len() == 1);
    assert!(ok, "after the removal: {:?}", ids(&handle));
    util::shut_down(&handle, runner);
}

/// The figures beyond the per-worker counts: states, per-slot restarts,
/// totals that outlive the workers; and the metrics endpoint, asked for
/// through the builder, serves the same.
#[test]
fn stats_show_states_restarts_and_totals_and_the_endpoint_agrees() {
    let Library {
        addr,
        metrics,
        events,
        handle,
        runner,
    } = run_library(
        Primary::builder()
            .workers(2)
            .listener(plain_listener())
            .metrics("127.0.0.1:0".parse().unwrap())
            .command(demo_command()),
    );
    let metrics = metrics.expect("a metrics address");
    assert_ne!(metrics.port(), 0, "the bound port, not the one asked");
    util::wait_ready_events(&events, 2, false);

    let stats = handle.stats().expect("stats");
    assert_eq!(stats.workers.len(), 2);
    assert!(
        stats.workers.iter().all(|w| w.state == WorkerState::Ready),
        "{stats:?}"
    );
    assert_eq!(stats.ready_workers(), 2);
    assert_eq!(stats.active_slots(), 2);
    assert_eq!(
        stats
            .slots
            .iter()
            .map(|s| (s.slot, s.active, s.restarts))
            .collect::<Vec<_>>(),
        [(1, true, 0), (2, true, 0)]
    );
    assert_eq!(stats.connections_total(), 0);
    assert_eq!(stats.connections_held, 0);
    assert!(stats.uptime > Duration::ZERO);

    for _ in 0..6 {
        assert_eq!(get_once(addr).expect("request").status, 200);
    }
    let ok = util::poll_until(Duration::from_secs(10), || {
        handle.stats().expect("stats").connections_total() == 6
    });
    assert!(ok, "{:?}", handle.stats());

    let victim = handle.stats().expect("stats").workers[0].clone();
    assert_eq!(victim.slot, 1);
    kill_pid(victim.pid, Signal::SIGKILL);
    let ok = util::poll_until(Duration::from_secs(20), || {
        let s = handle.stats().expect("stats");
        s.slots[0].restarts == 1
            && s.workers
                .iter()
                .any(|w| w.slot == 1 && w.id != victim.id && w.state == WorkerState::Ready)
    });
    let stats = handle.stats().expect("stats");
    assert!(ok, "slot 1 never restarted: {stats:?}");
    assert_eq!(stats.slots[1].restarts, 0);
    assert_eq!(stats.exited_connections, victim.connections);
    assert_eq!(stats.connections_total(), 6, "{stats:?}");

    let r = get_path(metrics, "/metrics").expect("scrape");
    assert_eq!(r.status, 200);
    let scrape = Scrape::parse(&r.body);
    assert_eq!(
        scrape.value("distributor_slot_restarts_total", &[("slot", "1")]),
        Some(1.0)
    );
    assert_eq!(
        scrape.value("distributor_connections_total", &[]),
        Some(6.0)
    );
    assert_eq!(get_path(metrics, "/healthz").expect("probe").status, 200);

    util::shut_down(&handle, runner);
}

/// `Handle::*_and_wait` return when what they asked for is done, not
/// before: the added worker is ready, the removed one has exited (its pid
/// is gone), a reload has every slot on a new, ready worker. A timeout is
/// `TimedOut` (the reload goes on and completes), the last worker is
/// `InvalidInput`, and a stopped primary is an error, never a hang. Each
/// worker takes 0.3 s to start, so that a reload of two cannot complete
/// within the 1 ms wait however late this thread runs.
#[test]
fn a_program_can_wait_for_a_reload_or_a_scale_to_finish() {
    use std::io::ErrorKind;
    let slow_demo = distributor::WorkerCommand::new(
        "sh",
        [
            "-c".into(),
            "sleep 0.3; exec \"$0\"".into(),
            util::bin().as_os_str().to_owned(),
        ],
    )
    .env(distributor::demo::DEMO_WORKER_ENV, "1");
    let Library {
        addr,
        events,
        handle,
        runner,
        ..
    } = run_library(
        Primary::builder()
            .workers(2)
            .listener(plain_listener())
            .command(slow_demo),
    );
    util::wait_ready_events(&events, 2, true);
    let states = |h: &distributor::Handle| -> Vec<(u64, u32, WorkerState)> {
        let s = h.stats().expect("stats");
        s.workers.iter().map(|w| (w.id, w.pid, w.state)).collect()
    };

    let id = handle.add_worker_and_wait(util::DEADLINE).expect("added");
    assert_eq!(id, 3);
    let now = states(&handle);
    assert!(
        now.iter()
            .any(|&(i, _, s)| i == 3 && s == WorkerState::Ready),
        "worker 3 not ready when add_worker_and_wait returned: {now:?}"
    );

    let removed = now.iter().find(|w| w.0 == 3).expect("worker 3").1;
    handle
        .remove_worker_and_wait(util::DEADLINE)
        .expect("removed");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(removed as i32), None).is_err(),
        "worker 3 (pid {removed}) still exists when remove_worker_and_wait returned"
    );
    assert_eq!(states(&handle).len(), 2);

    handle.reload_and_wait(util::DEADLINE).expect("reloaded");
    let now = states(&handle);
    let ready: Vec<u64> = now
        .iter()
        .filter(|w| w.2 == WorkerState::Ready)
        .map(|w| w.0)
        .collect();
    assert_eq!(ready.len(), 2, "{now:?}");
    assert!(
        ready.iter().all(|&i| i > 3),
        "old workers still serving: {now:?}"
    );
    let r = get_once(addr).expect("served after the reload");
    assert!(parse_worker(&r.body).expect("demo body").0 > 3, "{r:?}");

    // Too short a wait: TimedOut, and the reload still completes.
    let e = handle
        .reload_and_wait(Duration::from_millis(1))
        .expect_err("a reload in 1 ms");
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    handle
        .reload_and_wait(util::DEADLINE)
        .expect("the reload completes");

    handle
        .remove_worker_and_wait(util::DEADLINE)
        .expect("down to 1");
    let e = handle
        .remove_worker_and_wait(util::DEADLINE)
        .expect_err("the last worker stays");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(states(&handle).len(), 1);

    util::shut_down(&handle, runner);
    let e = handle
        .add_worker_and_wait(util::DEADLINE)
        .expect_err("the primary has stopped");
    assert_eq!(e.kind(), ErrorKind::NotConnected, "{e}");
}

/// In a kernel mode a worker accepts by itself and reports its count: an
/// idle worker reports within 100 ms, not at the next heartbeat (5 s with
/// the default 30 s worker timeout), so `Handle::stats` is current soon
/// after a burst ends.
#[test]
fn kernel_mode_counts_reach_the_primary_soon_after_a_burst() {
    let Library {
        addr,
        events,
        handle,
        runner,
        ..
    } = run_library(
        Primary::builder()
            .workers(1)
            .listener(plain_listener())
            .sched(Sched::Shared)
            .command(demo_command()),
    );
    util::wait_ready_events(&events, 1, true);
    // Past the STATS sent after HELLO: the next one is not held back by
    // the 100 ms spacing.
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        assert_eq!(get_once(addr).expect("request").status, 200);
    }
    let counted = || handle.stats().expect("stats").workers[0].connections;
    let reported = util::poll_until(Duration::from_millis(2500), || counted() == 3);
    assert!(reported, "the count is {} after 2.5 s, not 3", counted());
    util::shut_down(&handle, runner);
}
