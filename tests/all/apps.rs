//! Apps nobody here wrote, on pinned third-party servers (tests/apps/):
//! Express 5, Fastify 5 and Koa 3 under Node's cluster protocol, uvicorn
//! and gunicorn under the kernel modes. Each test is a row of README's
//! "Your app" table: the command it gives serves, reloads under load
//! without a failed request, recycles, and stops at once, leaving nothing
//! behind.
//!
//! `.ci/run` installs the apps (`npm ci --prefix tests/apps/node`, `pip
//! install -r tests/apps/python/requirements.txt`); a test whose app is
//! missing is skipped with a note that shows in the output of `cargo test`.

use crate::util;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::node::{APP_ENV, kill_and_fail};
use util::{
    DEADLINE, Load, Mode, Primary, bin, have_program, poll_until, proc_ppid, repo_path, skip,
    wait_gone,
};

/// `node tests/apps/node/FILE` if node and the npm packages are there.
fn node_app(test: &str, file: &str) -> Option<String> {
    let modules = repo_path("tests/apps/node/node_modules");
    if !have_program("node", "--version") {
        skip(test, "node is not installed");
        return None;
    }
    if !modules.join("express").is_dir() {
        skip(
            test,
            "the Node apps are not installed (npm ci --prefix tests/apps/node)",
        );
        return None;
    }
    let path = repo_path(&format!("tests/apps/node/{file}"));
    Some(path.to_str().expect("a UTF-8 path").to_string())
}

/// Whether python3 can import `module`; a note for `test` if not.
fn have_python_module(test: &str, module: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(
            test,
            &format!(
                "python3 cannot import {module} (pip install -r tests/apps/python/requirements.txt)"
            ),
        );
    }
    ok
}

/// `distributor -w N -l 127.0.0.1:0 EXTRA... -- COMMAND...`, started, the
/// Node apps asking for port 0 (so `--listen` serves them).
fn start(workers: usize, extra: &[&str], command: &[&str]) -> Primary {
    let mut cmd = Command::new(bin());
    cmd.args(["-w", &workers.to_string(), "-l", "127.0.0.1:0"])
        .args(extra)
        .arg("--")
        .args(command);
    for var in APP_ENV {
        cmd.env_remove(var);
    }
    cmd.env("PORT", "0");
    Primary::start_command(cmd, workers)
}

/// Both workers answer, each exactly as often in rr, or at all in a kernel
/// mode; every answer comes from a worker the primary started.
fn serves(p: &Primary, rr: bool) {
    let started: BTreeSet<u64> = p.started().iter().map(|w| w.0).collect();
    let mut seen = std::collections::BTreeMap::new();
    let enough = poll_until(DEADLINE, || {
        let r = p.get();
        assert_eq!(r.status, 200, "{r:?}");
        *seen.entry(r.worker().0).or_insert(0u64) += 1;
        seen.len() == 2 && seen.values().sum::<u64>() >= 4
    });
    assert!(enough, "{seen:?}\n{}", p.log().dump());
    assert!(
        seen.keys().all(|id| started.contains(id)),
        "{seen:?} {started:?}"
    );
    if rr {
        let n: u64 = seen.values().sum();
        assert!(seen.values().all(|&c| c.abs_diff(n / 2) <= 1), "{seen:?}");
    }
}

/// SIGHUP under load (new connections): the reload completes, not one
/// request fails, the new workers serve; the old ones were stopped with no
/// SIGTERM at half the shutdown timeout (60 s here) or SIGKILL. A server
/// that resets connections it accepted as it stopped (uvicorn does: it
/// closes them unread, alone as well as here) may have `resets_per_stop`
/// such failures for each of the two old workers, and no other.
fn reloads_under_load(p: &Primary, resets_per_stop: u64) {
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::Fresh],
        DEADLINE,
        Duration::from_secs(90),
    );
    assert!(load.wait_progress(20, DEADLINE), "{}", p.log().dump());
    let mark = p.log().len();
    p.signal(Signal::SIGHUP);
    p.log().wait_for_from(mark, "reload complete");
    for id in [1, 2] {
        p.wait_exited(id);
    }
    assert!(load.wait_progress(40, DEADLINE), "{}", p.log().dump());
    let stats = load.stop();
    eprintln!("reload under load: {stats}");
    assert!(
        stats.fresh_resets <= 2 * resets_per_stop,
        "{stats}\n{}",
        p.log().dump()
    );
    assert_eq!(
        stats.failures() - stats.fresh_resets,
        0,
        "{stats}\n{}",
        p.log().dump()
    );
    assert!(stats.by_worker.keys().any(|&id| id > 2), "{stats}");
    for needle in ["is still running: SIGTERM", "did not stop in time"] {
        assert_eq!(p.log().count(needle), 0, "{}", p.log().dump());
    }
}

/// SIGTERM: the primary exits 0 well before half the shutdown timeout
/// (60 s), and every process of the workers' groups is gone.
fn stops_at_once(mut p: Primary) {
    let pids = group_members(&p);
    p.terminate_promptly();
    kill_and_fail(&wait_gone(&pids, DEADLINE), "after SIGTERM");
}

/// Every process whose parent is a worker of `p` or one of those (two
/// levels: gunicorn's own workers), and the workers.
fn group_members(p: &Primary) -> Vec<u32> {
    let workers: Vec<u32> = p.alive_workers().iter().map(|w| w.1).collect();
    let mut all = workers.clone();
    for _ in 0..2 {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            break;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if !all.contains(&pid) && proc_ppid(pid).is_some_and(|pp| all.contains(&pp)) {
                all.push(pid);
            }
        }
    }
    all
}

// ---------------------------------------------------------------------------
// Node: Express, Fastify, Koa (rr, Node's protocol)

/// `distributor -w 2 -- node server.js` (Express 5), in rr and in shared:
/// exact rotation in rr, a reload under load without a failed request, a
/// stop at once.
#[test]
fn express_serves_reloads_and_stops() {
    let Some(app) = node_app("express_serves_reloads_and_stops", "server.js") else {
        return;
    };
    for sched in ["rr", "shared"] {
        let p = start(2, &["--sched", sched], &["node", &app]);
        p.wait_all_ready();
        serves(&p, sched == "rr");
        reloads_under_load(&p, 0);
        stops_at_once(p);
    }
}

/// Fastify 5 and Koa 3, unmodified, in rr and in reuseport.
#[test]
fn fastify_and_koa_serve() {
    for file in ["fastify.js", "koa.js"] {
        let Some(app) = node_app("fastify_and_koa_serve", file) else {
            return;
        };
        for sched in ["rr", "reuseport"] {
            let p = start(2, &["--sched", sched], &["node", &app]);
            p.wait_all_ready();
            serves(&p, sched == "rr");
            stops_at_once(p);
        }
    }
}

/// An Express app that recycles itself every 50 requests
/// (`cluster.worker.disconnect()`) under load: each worker's successor is
/// started at once, without backoff or a crash-loop warning, and no
/// request fails.
#[test]
fn express_recycling_itself_loses_nothing() {
    let Some(app) = node_app("express_recycling_itself_loses_nothing", "recycle.js") else {
        return;
    };
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "2", "-l", "127.0.0.1:0", "--", "node", &app])
        .env("PORT", "0")
        .env("RECYCLE_AFTER", "50");
    let p = Primary::start_command(cmd, 2);
    recycles_under_load(&p, 6, "Express recycling every 50 requests");
    for needle in ["restarting worker slot", "crash-looping", " WARN "] {
        assert_eq!(p.log().count(needle), 0, "{needle:?}:\n{}", p.log().dump());
    }
    stops_at_once(p);
}

/// Two clients on new connections until worker `last` is ready: not one
/// request fails (`what` names the run in the output).
fn recycles_under_load(p: &Primary, last: u64, what: &str) {
    p.wait_all_ready();
    let load = Load::start(
        p.addr,
        &[Mode::Fresh, Mode::Fresh],
        DEADLINE,
        Duration::from_secs(90),
    );
    p.wait_worker_ready(last);
    let stats = load.stop();
    eprintln!("{what}: {stats}");
    assert_eq!(stats.failures(), 0, "{stats}\n{}", p.log().dump());
}

/// `--max-requests 40` with Express under load: recycled by the primary,
/// one slot at a time, each successor ready before the old worker is
/// asked to stop; no request fails. (New connections: a stopping Node
/// server closes its idle kept-alive connections, and a request sent on
/// one at that moment meets a closed connection, which HTTP clients
/// retry.)
#[test]
fn express_with_max_requests_loses_nothing() {
    let Some(app) = node_app("express_with_max_requests_loses_nothing", "server.js") else {
        return;
    };
    let p = start(2, &["--max-requests", "40"], &["node", &app]);
    recycles_under_load(&p, 5, "Express with --max-requests 40");
    assert!(p.log().count("(max-requests)") >= 3, "{}", p.log().dump());
    stops_at_once(p);
}

// ---------------------------------------------------------------------------
// Python: uvicorn and gunicorn (kernel modes, socket activation)

fn uvicorn() -> Vec<String> {
    let dir = repo_path("tests/apps/python");
    [
        "python3",
        "-m",
        "uvicorn",
        "--app-dir",
        dir.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .chain(["asgi_app:app", "--fd", "3"].map(String::from))
    .collect()
}

fn gunicorn() -> Vec<String> {
    let dir = repo_path("tests/apps/python");
    [
        "python3",
        "-m",
        "gunicorn",
        "--chdir",
        dir.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .chain(["-w", "2", "--no-control-socket", "wsgi_app:app"].map(String::from))
    .collect()
}

/// One Python server in both kernel modes, with default options but
/// `--sched`: it serves, reloads under load without a failed request (but
/// for `resets_per_stop`, see [`reloads_under_load`]), and stops at once.
fn python_server(command: &[String], resets_per_stop: u64) {
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    for sched in ["shared", "reuseport"] {
        let p = start(
            2,
            &["--sched", sched, "--shutdown-timeout", "60s"],
            &command,
        );
        p.wait_all_ready();
        serves(&p, false);
        reloads_under_load(&p, resets_per_stop);
        stops_at_once(p);
    }
}

#[test]
fn uvicorn_serves_reloads_and_stops() {
    // uvicorn 0.55 resets the connections it has accepted and not read
    // when SIGTERM stops it, alone as well as here: 0 to 2 per stop under
    // two clients (tests/apps/README.md).
    if have_python_module("uvicorn_serves_reloads_and_stops", "uvicorn") {
        python_server(&uvicorn(), 2);
    }
}

/// gunicorn (a master and its own two workers per slot): the same, and its
/// workers, which the primary did not start, die with the primary even
/// when it is killed with SIGKILL.
#[test]
fn gunicorn_serves_reloads_and_stops() {
    if !have_python_module("gunicorn_serves_reloads_and_stops", "gunicorn") {
        return;
    }
    python_server(&gunicorn(), 0);
    let command = gunicorn();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let p = start(2, &["--sched", "reuseport"], &command);
    p.wait_all_ready();
    serves(&p, false);
    let mut pids = Vec::new();
    let all = poll_until(DEADLINE, || {
        pids = group_members(&p);
        pids.len() >= 6
    });
    assert!(all, "not 2 masters and 4 workers: {pids:?}");
    p.signal(Signal::SIGKILL);
    kill_and_fail(&wait_gone(&pids, DEADLINE), "after SIGKILL of the primary");
}

/// socket.io 4.8 (pinned), its default first transport, HTTP long-polling,
/// on 4 workers. In rr a session's next request reaches another worker,
/// which answers 400 `Session ID unknown`; real socket.io clients fail.
/// With `--sticky ip`, 50 clients, each from its own loopback address,
/// exchange 5 messages each without an error.
#[test]
fn socketio_polling_works_with_sticky_sessions_and_not_without() {
    let test = "socketio_polling_works_with_sticky_sessions_and_not_without";
    let Some(app) = node_app(test, "socketio.js") else {
        return;
    };
    if !repo_path("tests/apps/node/node_modules/socket.io").is_dir() {
        skip(
            test,
            "socket.io is not installed (npm ci --prefix tests/apps/node)",
        );
        return;
    }
    let clients = |p: &Primary| -> serde_json::Value {
        let out = util::output_within(
            {
                let mut cmd = Command::new("node");
                cmd.arg(repo_path("tests/apps/node/socketio_clients.js"))
                    .arg(format!("http://127.0.0.1:{}", p.addr.port()))
                    .args(["50", "5"]);
                cmd
            },
            util::DEADLINE,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)))
    };

    let p = start(4, &[], &["node", &app]);
    p.wait_all_ready();
    // A handshake, then the session's first poll on a new connection.
    let mut unknown = 0;
    for _ in 0..4 {
        let hello =
            util::get_path(p.addr, "/socket.io/?EIO=4&transport=polling").expect("handshake");
        assert_eq!(hello.status, 200, "{hello:?}");
        let sid = hello
            .body
            .split("\"sid\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no sid in {:?}", hello.body))
            .to_string();
        // Read whole to the close (the 400 comes chunked).
        let mut stream =
            std::net::TcpStream::connect_timeout(&p.addr, util::IO_TIMEOUT).expect("connect");
        stream
            .set_read_timeout(Some(util::IO_TIMEOUT))
            .expect("timeout");
        write!(
            stream,
            "GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut poll = String::new();
        stream.read_to_string(&mut poll).expect("read");
        if poll.starts_with("HTTP/1.1 400") && poll.contains("Session ID unknown") {
            unknown += 1;
        }
    }
    assert!(unknown > 0, "rr never split a session");
    let rr = clients(&p);
    eprintln!("socket.io in rr: {rr}");
    assert!(
        rr["ok"].as_u64().unwrap() < 50,
        "every client worked in rr: {rr}"
    );
    assert!(!rr["errors"].as_array().unwrap().is_empty(), "{rr}");
    stops_at_once(p);

    let p = start(4, &["--sticky", "ip"], &["node", &app]);
    p.wait_all_ready();
    let sticky = clients(&p);
    eprintln!("socket.io with --sticky ip: {sticky}");
    assert_eq!(
        sticky["ok"].as_u64(),
        Some(50),
        "{sticky}\n{}",
        p.log().dump()
    );
    assert!(sticky["errors"].as_array().unwrap().is_empty(), "{sticky}");
    stops_at_once(p);
}
