//! `--user`/`--group`: bind as root first, then run the primary and the
//! workers as an ordinary user; refuse clearly when that cannot be done.

use crate::util;

use std::net::TcpListener;
use std::process::Command;

use util::Primary;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The real, effective, saved and fs uids of `pid`.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("a Uid line");
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().expect("a uid"))
        .collect()
}

/// A privileged port (below 1024) that is free right now.
fn free_privileged_port() -> Option<u16> {
    let start = 600 + (std::process::id() % 300) as u16;
    (start..1000)
        .chain(600..start)
        .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

#[test]
fn binds_as_root_then_serves_as_nobody() {
    let test = "binds_as_root_then_serves_as_nobody";
    if !is_root() {
        util::skip(test, "not root");
        return;
    }
    let Some(port) = free_privileged_port() else {
        util::skip(test, "no free privileged port");
        return;
    };
    let listen = format!("127.0.0.1:{port}");
    // nobody must reach the binary (its workers are this binary again),
    // wherever the build lives.
    let (_dir, binary) = util::bin_for_anyone();
    let mut cmd = Command::new(&binary);
    cmd.args(["-w", "2", "-l", &listen, "--user", "nobody"]);
    let p = Primary::start_command(cmd, 2);
    p.wait_all_ready();
    // nobody could not have bound a port below 1024: the bind came first.
    assert_eq!(p.addr.port(), port);
    let r = p.get();
    assert_eq!(r.status, 200);
    assert_eq!(uids(p.proc.pid()), [65534; 4], "the primary runs as nobody");
    for (_, pid) in p.started() {
        assert_eq!(uids(pid), [65534; 4], "worker {pid} runs as nobody");
    }
    assert!(
        p.log().contains("running as user nobody (uid 65534"),
        "{}",
        p.log().dump()
    );
}

fn one_line_failure(args: &[&str], expect: &str) {
    let out = Command::new(util::bin())
        .args(["-l", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run distributor");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(expect), "{stderr}");
}

#[test]
fn an_unknown_user_or_group_is_one_clear_line() {
    one_line_failure(
        &["--user", "no-such-user-here"],
        "no such user `no-such-user-here`",
    );
    one_line_failure(
        &["--group", "no-such-group-here"],
        "no such group `no-such-group-here`",
    );
}

#[test]
fn a_non_root_primary_refuses_to_switch_users() {
    if !is_root() || !util::have_program("setpriv", "--version") {
        util::skip(
            "a_non_root_primary_refuses_to_switch_users",
            "needs root and setpriv",
        );
        return;
    }
    let (_dir, binary) = util::bin_for_anyone();
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&binary)
        .args(["-l", "127.0.0.1:0", "--user", "root"])
        .output()
        .expect("run setpriv");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("need root to switch users (running as uid 65534)"),
        "{stderr}"
    );
}

/// A program this user cannot reach is named as such, not as missing: run
/// as nobody, a command in a directory of mode 0700 is "permission denied"
/// (it used to say "no such file"), and one without execute bits "not
/// executable".
#[test]
fn an_unreachable_program_says_why() {
    let test = "an_unreachable_program_says_why";
    if !is_root() || !util::have_program("setpriv", "--version") {
        util::skip(test, "needs root and setpriv");
        return;
    }
    let (dir, binary) = util::bin_for_anyone();
    use std::os::unix::fs::PermissionsExt;
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = private.join("app");
    std::fs::write(&hidden, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = |program: &std::path::Path| {
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(&binary)
            .args(["-w", "1", "-l", "127.0.0.1:0", "--"])
            .arg(program)
            .current_dir("/")
            .output()
            .expect("run setpriv");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    assert_eq!(
        run(&hidden),
        format!(
            "error: cannot run worker command `{0}`: permission denied: uid 65534 cannot reach {0} (a directory on the way is not searchable)",
            hidden.display()
        )
    );
    assert_eq!(
        run(&plain),
        format!(
            "error: cannot run worker command `{0}`: {0} is not executable by uid 65534",
            plain.display()
        )
    );
}
