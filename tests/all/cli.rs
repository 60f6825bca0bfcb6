//! Bad input on the command line: one clear line on stderr, the right exit
//! status, no panic, and no process left behind.

use crate::util;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use util::{DEADLINE, Proc, TempDir, bin, describe};

/// Runs the binary with `args` in `dir`; returns its exit code and its one
/// stderr line, after checking that there is exactly one non-empty line,
/// no panic and nothing on stdout.
fn fails(args: &[&str], dir: &Path) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        // A panic would show its backtrace: make sure there is none.
        .env("RUST_BACKTRACE", "1");
    let mut proc = Proc::spawn(cmd);
    let status = proc.expect_exit(DEADLINE);
    // The pipes close at exit; wait for the collectors to see it all.
    let stderr = collected(&proc.stderr);
    let stdout = collected(&proc.stdout);
    let lines: Vec<&String> = stderr.iter().filter(|l| !l.trim().is_empty()).collect();
    let all = stderr.join("\n");
    assert!(!all.contains("panicked"), "panic: {all}");
    assert!(
        !all.to_lowercase().contains("backtrace"),
        "backtrace: {all}"
    );
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{all}");
    assert!(stdout.is_empty(), "unexpected stdout: {stdout:?}");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("killed: {}; stderr:\n{all}", describe(status)));
    (code, lines[0].clone())
}

/// Every line of a pipe whose writer has exited.
fn collected(lines: &util::Lines) -> Vec<String> {
    assert!(lines.wait_closed(DEADLINE), "the pipe stays open");
    lines.snapshot()
}

#[test]
fn zero_workers_is_a_usage_error() {
    let dir = TempDir::new("cli");
    let (code, line) = fails(&["--workers", "0", "-l", "127.0.0.1:0"], dir.path());
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("error: invalid value '0' for '--workers <N>'"),
        "{line}"
    );
    assert!(line.contains("at least 1"), "{line}");
}

#[test]
fn an_unparsable_listen_address_is_a_usage_error() {
    let dir = TempDir::new("cli");
    let (code, line) = fails(&["-w", "1", "-l", "banana"], dir.path());
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("error: invalid value 'banana' for '--listen <ADDR>'"),
        "{line}"
    );
    // The line shows the forms that parse.
    assert!(
        line.contains("(forms: 8000, :8000, 127.0.0.1:8000, localhost:8000, [::1]:8000)"),
        "{line}"
    );
    for bad in [
        "8000x",
        "localhost",
        "127.0.0.1:",
        ":",
        "70000",
        "[::1]",
        "no.such.host.invalid:80",
    ] {
        for flag in ["-l", "--metrics"] {
            let (code, line) = fails(&["-w", "1", flag, bad], dir.path());
            assert_eq!(code, 2, "{flag} {bad}: {line}");
            assert!(line.contains("forms: 8000, :8000"), "{flag} {bad}: {line}");
        }
    }
}

/// The two slips a new user makes first get the fix in their one line: a
/// program without `--` before it, an option spelled almost right.
#[test]
fn usage_slips_get_a_hint() {
    let dir = TempDir::new("cli");
    let (code, line) = fails(&["python3", "app.py"], dir.path());
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("unexpected argument 'python3'") && line.contains("put it after `--`"),
        "{line}"
    );
    for (typo, meant) in [
        ("--worker", "--workers"),
        ("--metric", "--metrics"),
        ("--listn", "--listen"),
    ] {
        let (code, line) = fails(&[typo, "4"], dir.path());
        assert_eq!(code, 2, "{line}");
        assert!(
            line.contains(&format!("did you mean `{meant}`?")),
            "{typo}: {line}"
        );
    }
}

#[test]
fn an_unparsable_shutdown_timeout_is_a_usage_error() {
    let dir = TempDir::new("cli");
    let (code, line) = fails(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--shutdown-timeout",
            "banana",
        ],
        dir.path(),
    );
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("error: invalid value 'banana' for '--shutdown-timeout <DURATION>'"),
        "{line}"
    );
}

#[test]
fn an_unparsable_defer_accept_is_a_usage_error() {
    let dir = TempDir::new("cli");
    let (code, line) = fails(
        &["-w", "1", "-l", "127.0.0.1:0", "--defer-accept", "soon"],
        dir.path(),
    );
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("error: invalid value 'soon' for '--defer-accept <DURATION>'"),
        "{line}"
    );
}

#[test]
fn a_port_in_use_is_an_error() {
    let dir = TempDir::new("cli");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, line) = fails(&["-w", "1", "-l", &addr], dir.path());
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with(&format!("error: cannot listen on {addr}: Address")),
        "{line}"
    );
    assert!(line.contains("in use"), "{line}");
    // Said once, not once per layer of the error.
    assert_eq!(line.matches("in use").count(), 1, "{line}");
}

#[test]
fn a_missing_worker_command_is_an_error() {
    let dir = TempDir::new("cli");
    let (code, line) = fails(
        &["-w", "1", "-l", "127.0.0.1:0", "--", "./nope"],
        dir.path(),
    );
    assert_eq!(code, 1, "{line}");
    assert_eq!(
        line,
        "error: cannot run worker command `./nope`: no such file"
    );

    let name = format!("distributor-test-no-such-program-{}", std::process::id());
    let (code, line) = fails(&["-w", "1", "-l", "127.0.0.1:0", "--", &name], dir.path());
    assert_eq!(code, 1, "{line}");
    assert_eq!(
        line,
        format!("error: cannot run worker command `{name}`: not found on PATH")
    );

    let script = dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = ["-w", "1", "-l", "127.0.0.1:0", "--", "./not-executable"];
    let (code, line) = fails(&args, dir.path());
    assert_eq!(code, 1, "{line}");
    assert_eq!(
        line,
        "error: cannot run worker command `./not-executable`: ./not-executable is not executable by root"
    );
}

/// `--help` and `--version` print to stdout and succeed.
#[test]
fn help_and_version_succeed() {
    for (arg, expected) in [
        ("--help", "Usage: distributor"),
        ("--version", "distributor "),
    ] {
        let mut proc = Proc::spawn({
            let mut cmd = Command::new(bin());
            cmd.arg(arg);
            cmd
        });
        let status = proc.expect_exit(DEADLINE);
        assert_eq!(status.code(), Some(0), "{arg}");
        assert!(proc.stdout.wait_closed(DEADLINE));
        let out = proc.stdout.dump();
        assert!(out.contains(expected), "{arg}: {out}");
        assert!(proc.stderr.wait_closed(DEADLINE));
        assert!(proc.stderr.is_empty(), "{arg}: {}", proc.stderr.dump());
    }
}

/// The settings can come from the environment: `DISTRIBUTOR_WORKERS` and
/// `DISTRIBUTOR_LISTEN`.
#[test]
fn settings_from_the_environment() {
    let mut cmd = Command::new(bin());
    cmd.env("DISTRIBUTOR_WORKERS", "3")
        .env("DISTRIBUTOR_LISTEN", "127.0.0.1:0");
    let mut primary = util::Primary::start_command(cmd, 3);
    primary.wait_all_ready();
    assert_eq!(primary.started().len(), 3, "{}", primary.log().dump());
    primary.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(primary.proc.expect_exit(DEADLINE).code(), Some(0));
}

/// `npm start` (and yarn, pnpm, npx) would run the app as a child of npm,
/// which takes Node's cluster channel for itself: refused at start, in one
/// line that gives the start script's own command from package.json; a
/// script with shell syntax goes through `sh -c` with `--protocol node`.
#[test]
fn package_runners_are_refused_with_the_command_that_works() {
    let dir = TempDir::new("npm");
    std::fs::write(
        dir.path().join("package.json"),
        r#"{"scripts": {"start": "node server.js --port 3000", "dev": "NODE_ENV=dev node app.js"}}"#,
    )
    .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["npm", "start"], "`-- node server.js --port 3000`"),
        (&["npm", "run", "start"], "`-- node server.js --port 3000`"),
        (&["yarn", "start"], "`-- node server.js --port 3000`"),
        (&["pnpm", "start"], "`-- node server.js --port 3000`"),
        (
            &["npm", "run", "dev"],
            "`--protocol node -- sh -c 'NODE_ENV=dev node app.js'`",
        ),
        (
            &["yarn", "dev"],
            "`--protocol node -- sh -c 'NODE_ENV=dev node app.js'`",
        ),
        (&["npx", "serve"], "e.g. `-- node app.js`"),
    ];
    for (command, hint) in cases {
        let mut args = vec!["-w", "2", "-l", "127.0.0.1:0", "--"];
        args.extend_from_slice(command);
        let (code, line) = fails(&args, dir.path());
        assert_eq!(code, 1, "{command:?}: {line}");
        let shown = command.join(" ");
        assert!(
            line.starts_with(&format!(
                "error: cannot run worker command `{}`: `{shown}` runs the app as a child of",
                command[0]
            )),
            "{command:?}: {line}"
        );
        assert!(line.ends_with(hint), "{command:?}: {line}");
    }
    // With the native protocol asked for, npm passes the channel on to
    // the app: it runs (here a stand-in named npm).
    let npm = dir.path().join("npm");
    std::fs::write(&npm, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&npm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["-w", "1", "-l", "127.0.0.1:0", "--protocol", "native"])
        .args(["--", "./npm", "start"])
        .current_dir(dir.path());
    let p = Proc::spawn(cmd);
    p.stderr.wait_for("worker 1 started");
}
