//! docs/haproxy.cfg, for real: HAProxy in front of two distributors on
//! loopback, health-checking each one's /healthz. Stop one: once the check
//! has noticed, every request is served by the other, none fails.

use crate::util;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::{Primary, Proc, TempDir, get_once, have_program, repo_path};

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn metrics_addr(p: &Primary) -> SocketAddr {
    let line = p.log().wait_for("metrics on ");
    util::parse_metrics_on(&line).expect("an address in the metrics line")
}

/// The pid in a demo body, which tells the two instances apart.
fn pid_of(body: &str) -> u32 {
    util::parse_worker(body).expect("a demo body").1
}

#[test]
fn haproxy_routes_around_a_stopped_distributor() {
    if !have_program("haproxy", "-v") {
        util::skip(
            &util::current_test(),
            "haproxy is not installed (apt-get install haproxy)",
        );
        return;
    }
    let a = Primary::start(2, &["--metrics", "127.0.0.1:0"]);
    let b = Primary::start(2, &["--metrics", "127.0.0.1:0"]);
    a.wait_all_ready();
    b.wait_all_ready();
    let (am, bm) = (metrics_addr(&a), metrics_addr(&b));
    let pids_b: BTreeSet<u32> = b.started().iter().map(|(_, pid)| *pid).collect();

    let front = free_port();
    let cfg = std::fs::read_to_string(repo_path("docs/haproxy.cfg")).expect("docs/haproxy.cfg");
    let cfg = cfg
        .replace("bind *:80", &format!("bind 127.0.0.1:{front}"))
        .replace("inter 1s", "inter 100ms")
        .replace(
            "10.0.0.1:8000 check port 9100",
            &format!("{} check port {}", a.addr, am.port()),
        )
        .replace(
            "10.0.0.2:8000 check port 9100",
            &format!("{} check port {}", b.addr, bm.port()),
        );
    let dir = TempDir::new("haproxy");
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write the config");
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .expect("haproxy -c");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let haproxy = Proc::spawn(cmd);
    let front: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();

    // Both instances serve through HAProxy.
    let mut served = BTreeSet::new();
    let ok = util::poll_until(Duration::from_secs(20), || {
        if let Ok(r) = get_once(front) {
            if r.status == 200 {
                served.insert(pids_b.contains(&pid_of(&r.body)));
            }
        }
        served.len() == 2
    });
    assert!(
        ok,
        "HAProxy did not reach both instances: {served:?}\n{}",
        haproxy.stderr.dump()
    );

    // Stop instance A (SIGSTOP: it still accepts in the kernel but answers
    // nothing, the way a hung machine does; HAProxy's retries cannot help
    // with that). Wait until the health check has noticed (a run of answers
    // all from B), then not one request may fail.
    a.signal(Signal::SIGSTOP);
    let quick = |addr| -> std::io::Result<util::Response> {
        let mut conn = util::HttpConn::connect_with_timeout(addr, Duration::from_secs(1))?;
        conn.get(true)
    };
    let mut in_a_row = 0;
    let noticed = util::poll_until(Duration::from_secs(30), || {
        match quick(front) {
            Ok(r) if r.status == 200 && pids_b.contains(&pid_of(&r.body)) => in_a_row += 1,
            _ => in_a_row = 0,
        }
        in_a_row >= 10
    });
    assert!(noticed, "HAProxy kept sending to the stopped instance");
    for i in 0..100 {
        let r = get_once(front).unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert!(
            pids_b.contains(&pid_of(&r.body)),
            "request {i} reached the stopped instance"
        );
    }
    a.signal(Signal::SIGCONT);
}
