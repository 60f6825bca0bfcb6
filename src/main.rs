//! The `distributor` command: runs any program (or the built-in demo
//! worker) as N workers behind one accepting primary.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use distributor::{Primary, Protocol, Ready, Sched, Steer, WorkerCommand, WorkerListener};

use distributor::demo::{DEMO_WORK_ENV, DEMO_WORKER_ENV};

/// One primary accepts connections and hands each, round-robin, to one of N
/// worker processes over a Unix socketpair (SCM_RIGHTS), as Node's cluster
/// does; workers that exit are replaced.
///
/// The workers run COMMAND, which must speak the distributor worker protocol
/// (docs/PROTOCOL.md), or be a Node app (`-- node app.js`: the primary
/// speaks Node's cluster protocol, docs/NODE.md); without COMMAND they run
/// the built-in HTTP demo worker.
///
/// Signals: SIGTERM or SIGINT stops gracefully (a second one kills the
/// workers at once); SIGHUP replaces the workers one by one (rolling reload,
/// no request lost); SIGTTIN adds a worker, SIGTTOU removes one; SIGUSR2
/// switches the policy (rr, least-conn, p2c in turn).
#[derive(Debug, Parser)]
#[command(name = "distributor", version, max_term_width = 100)]
struct Cli {
    /// Number of worker processes [default: available CPUs]
    #[arg(short, long, value_name = "N", env = "DISTRIBUTOR_WORKERS", value_parser = parse_workers)]
    workers: Option<usize>,

    /// Who accepts and balances: rr (the primary, round-robin), least-conn
    /// (the primary, to the worker with the fewest connections in flight),
    /// p2c (the primary, the less loaded of two random workers), shared
    /// (every worker accepts on one socket; alias none), reuseport (one
    /// SO_REUSEPORT socket per worker). Kernel modes hand the socket over
    /// as fd 3 with LISTEN_FDS/LISTEN_PID (socket activation), so
    /// unmodified apps work. SIGUSR2 cycles rr, least-conn, p2c at runtime
    #[arg(
        short,
        long,
        value_name = "MODE",
        default_value = "rr",
        env = "DISTRIBUTOR_SCHED",
        value_parser = parse_sched
    )]
    sched: Sched,

    /// With --sched reuseport: rr steers the kernel's balancing with a BPF
    /// program in the primary's order (exact round-robin, weighted by
    /// --weights; a removed or stopped worker's queued connections move
    /// to the others), at no cost to the primary per connection. Needs
    /// root (or CAP_BPF and CAP_NET_ADMIN) and Linux 5.14 [default: off]
    #[arg(long, value_name = "HOW", env = "DISTRIBUTOR_STEER", value_parser = parse_steer)]
    steer: Option<Steer>,

    /// Sticky sessions: ip sends each client (by its address) to the same
    /// worker slot, by consistent hashing with bounded loads (with rr,
    /// least-conn, p2c), for socket.io's polling and in-memory sessions
    #[arg(long, value_name = "KEY", env = "DISTRIBUTOR_STICKY", value_parser = parse_sticky)]
    sticky: Option<distributor::Sticky>,

    /// With --sticky: how far above the average in flight a worker may go
    /// before a client's connection spills to the next slot on the ring
    #[arg(long, value_name = "E", default_value = "0.25", env = "DISTRIBUTOR_STICKY_BALANCE_FACTOR", value_parser = parse_balance_factor)]
    sticky_balance_factor: f64,

    /// Address to listen on: 8000 or :8000 (every interface),
    /// 127.0.0.1:8000, localhost:8000, [::1]:8000; port 0 picks a free
    /// port [default: 0.0.0.0:8000]. Node apps listen where their own
    /// listen() says; this address then serves the app's first server,
    /// which must ask for port 0 or this port
    #[arg(short, long, value_name = "ADDR", env = "DISTRIBUTOR_LISTEN", value_parser = parse_listen)]
    listen: Option<SocketAddr>,

    /// The workers' protocol: native (docs/PROTOCOL.md), node (Node's
    /// cluster protocol, for unmodified `node app.js`), or auto: node when
    /// the program is named node or nodejs, else native
    #[arg(
        long,
        value_name = "PROTOCOL",
        default_value = "auto",
        env = "DISTRIBUTOR_WORKER_PROTOCOL",
        value_parser = parse_protocol
    )]
    protocol: ProtocolArg,

    /// Weights of the worker slots, comma-separated (e.g. 2,1,1; missing
    /// ones are 1): weighted round-robin in rr, load relative to weight in
    /// least-conn and p2c
    #[arg(long, value_name = "W,W,...", env = "DISTRIBUTOR_WEIGHTS", value_parser = parse_weights)]
    weights: Option<Weights>,

    /// How long a graceful stop waits for workers before SIGKILL (e.g. 10s, 500ms)
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "10s",
        env = "DISTRIBUTOR_SHUTDOWN_TIMEOUT",
        value_parser = parse_duration
    )]
    shutdown_timeout: Duration,

    /// Stop and replace a ready worker that sends nothing (no acknowledgement,
    /// no heartbeat answer) for this long; 0 turns hang detection off
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "30s",
        env = "DISTRIBUTOR_WORKER_TIMEOUT",
        value_parser = parse_duration
    )]
    worker_timeout: Duration,

    /// The most connections a worker may hold unacknowledged; when every
    /// worker is at it, the primary stops accepting (the kernel backlog waits)
    #[arg(
        long,
        value_name = "N",
        default_value_t = distributor::primary::DEFAULT_MAX_UNACKED,
        env = "DISTRIBUTOR_MAX_UNACKED",
        value_parser = parse_max_unacked
    )]
    max_unacked: usize,

    /// TCP_DEFER_ACCEPT on the listening sockets: a connection is accepted
    /// only once its client has sent something, or this long after it
    /// connected if it sends nothing (whole seconds; 0, the default, is
    /// off). For protocols where the client speaks first, like HTTP; never
    /// for ones where the server does
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "0",
        env = "DISTRIBUTOR_DEFER_ACCEPT",
        value_parser = parse_duration
    )]
    defer_accept: Duration,

    /// What counts a worker ready: hello (its protocol HELLO), notify
    /// (READY=1 on the NOTIFY_SOCKET it is given, like systemd's
    /// Type=notify), start (as soon as it is started, for apps that speak
    /// neither)
    #[arg(long, value_name = "WHEN", default_value = "hello", env = "DISTRIBUTOR_READY", value_parser = parse_ready)]
    ready: Ready,

    /// Recycle a worker once it has taken N connections (gunicorn's
    /// max_requests): a new worker first, then a graceful stop, one slot at
    /// a time. The primary counts connections, not the requests on them
    /// (keep-alive clients send more); in the kernel modes, what workers
    /// that speak the protocol report [default: off]
    #[arg(long, value_name = "N", env = "DISTRIBUTOR_MAX_REQUESTS", value_parser = parse_max_requests)]
    max_requests: Option<u64>,

    /// Add a random 0 to N to each worker's --max-requests, so that workers
    /// started together are not recycled together
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        env = "DISTRIBUTOR_MAX_REQUESTS_JITTER"
    )]
    max_requests_jitter: u64,

    /// Recycle a worker whose process tree (it and what it started) has
    /// more than SIZE resident, checked every second, e.g. 512M, 1.5G
    /// (1024-based) [default: off]
    #[arg(long, value_name = "SIZE", env = "DISTRIBUTOR_MAX_MEMORY", value_parser = parse_size)]
    max_memory: Option<u64>,

    /// Recycle a worker once it has run this long, e.g. 1h, 30m [default: off]
    #[arg(long, value_name = "DURATION", env = "DISTRIBUTOR_MAX_AGE", value_parser = parse_positive_duration)]
    max_age: Option<Duration>,

    /// Let workers write to stdout and stderr directly, without the
    /// `[worker ID] ` prefix on each line
    #[arg(long, env = "DISTRIBUTOR_NO_PREFIX")]
    no_prefix: bool,

    /// Format of the distributor's own log lines on stderr
    #[arg(long, value_name = "FORMAT", default_value = "text", env = "DISTRIBUTOR_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: String,

    /// Run the primary and the workers as this user once the listening
    /// socket is bound (so port 80 works when started as root)
    #[arg(long, value_name = "NAME", env = "DISTRIBUTOR_USER")]
    user: Option<String>,

    /// Run as this group [default: the user's primary group]
    #[arg(long, value_name = "NAME", env = "DISTRIBUTOR_GROUP")]
    group: Option<String>,
    /// Serve GET /metrics (Prometheus text format) and GET /healthz (200
    /// while a worker is ready, else 503) on this address: 9090 (on
    /// 127.0.0.1), :9090 (every interface), 127.0.0.1:9090; off by
    /// default. No authentication: keep it on loopback or a private network
    #[arg(long, value_name = "ADDR", env = "DISTRIBUTOR_METRICS", value_parser = parse_metrics)]
    metrics: Option<SocketAddr>,

    /// Write the primary's pid to this file at start (removed at exit)
    #[arg(long, value_name = "FILE", env = "DISTRIBUTOR_PID_FILE")]
    pid_file: Option<PathBuf>,

    /// Stop (exit status 1) when a worker slot has failed this many times
    /// in a row, each within 5 s of its start (a crash loop), for a service
    /// manager's Restart= to act on, as PM2's max_restarts [default: off:
    /// retry forever, with backoff]
    #[arg(long, value_name = "N", env = "DISTRIBUTOR_MAX_RESTARTS", value_parser = parse_max_restarts)]
    max_restarts: Option<u32>,

    /// How long the new primary of an upgrade (SIGUSR2, `ctl upgrade`)
    /// has to get every worker ready before it is killed and this one goes
    /// on serving
    #[arg(long, value_name = "DURATION", default_value = "60s", env = "DISTRIBUTOR_UPGRADE_TIMEOUT", value_parser = parse_duration)]
    upgrade_timeout: Duration,

    /// The control socket for `distributor ctl`, mode 0600 [default: PID.sock
    /// in the runtime directory: $XDG_RUNTIME_DIR/distributor,
    /// /run/distributor for root, else /tmp/distributor-UID]; off to have
    /// none
    #[arg(long, value_name = "PATH|off", env = "DISTRIBUTOR_CONTROL")]
    control: Option<PathBuf>,

    /// The worker program and its arguments, after `--`
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,

    #[command(subcommand)]
    sub: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Compare the primary's round-robin with kernel balancing on an app:
    /// runs it under each mode in turn on a loopback port, drives it with a
    /// built-in load generator, and prints requests/s, latency percentiles,
    /// errors, per-worker share and Jain's fairness index
    Compare(CompareArgs),
    /// Talk to a running primary over its control socket: status [--json],
    /// reload, scale N|+N|-N, sched MODE, upgrade, stop. Each answers with
    /// its outcome once known
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
struct CtlArgs {
    /// The control socket [default: the only primary's in the runtime
    /// directory ($XDG_RUNTIME_DIR/distributor, /run/distributor for
    /// root, else /tmp/distributor-UID)]
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,

    /// The primary to talk to, when several run
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,

    /// status as JSON
    #[arg(long)]
    json: bool,

    /// How long to wait for the outcome
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,

    /// status | reload | scale N|+N|-N | sched MODE | upgrade | stop
    #[arg(value_name = "COMMAND", required = true, num_args = 1..=2, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Number of worker processes [default: twice the available CPUs, so
    /// that workers compete for cores, where kernel balancing turns uneven]
    #[arg(short, long, value_name = "N", value_parser = parse_workers)]
    workers: Option<usize>,

    /// Modes to run, comma-separated: rr, least-conn, p2c, shared,
    /// reuseport, and reuseport+steer (reuseport steered in round-robin by
    /// BPF: root only)
    #[arg(
        short,
        long,
        value_name = "MODES",
        value_delimiter = ',',
        default_value = "rr,least-conn,p2c,shared,reuseport",
        value_parser = parse_lab_mode
    )]
    sched: Vec<distributor::lab::LabMode>,

    /// Measured time per mode (after a short warm-up)
    #[arg(short, long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    duration: Duration,

    /// Concurrent client connections
    #[arg(short, long, value_name = "N", default_value_t = 64, value_parser = parse_connections)]
    connections: usize,

    /// Many requests per connection (default: one request per connection,
    /// where the primary's work per connection shows most)
    #[arg(short, long)]
    keepalive: bool,

    /// The path to GET (HTTP/1.1)
    #[arg(long, value_name = "PATH", default_value = "/")]
    path: String,

    /// Load generator threads
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = parse_workers)]
    threads: usize,

    /// A heterogeneous workload: this share of requests goes to another
    /// path, e.g. `5%:/work?ms=50` (the demo worker holds itself 50 ms
    /// for those)
    #[arg(long, value_name = "SHARE:PATH", value_parser = parse_slow)]
    slow: Option<distributor::lab::load::SlowShare>,

    /// Clients with sessions: N:H is N clients, each connection carrying
    /// its client's `Cookie: sid=...`, of which H heavy ones send a third
    /// of the connections; compare rr with rr+sticky (--sticky cookie:sid)
    #[arg(long, value_name = "N:H", value_parser = parse_sessions)]
    sessions: Option<distributor::lab::load::Sessions>,

    /// Print one JSON document on stdout instead of the table
    #[arg(long)]
    json: bool,

    /// Also draw a chart (per-worker share and latency per mode) to FILE
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,

    /// The app and its arguments, after `--` [default: the built-in demo worker]
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// A whole number from 1 to `max`.
fn parse_count(s: &str, max: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) if n > max => Err(format!("must be at most {max}")),
        Ok(n) => Ok(n),
        Err(_) => Err("not a whole number".into()),
    }
}

/// `--sessions 1000:2`.
fn parse_sessions(s: &str) -> Result<distributor::lab::load::Sessions, String> {
    let bad = || format!("'{s}' is not N:H (clients, heavy ones), e.g. 1000:2");
    let (n, h) = s.split_once(':').ok_or_else(bad)?;
    let clients: u32 = n.parse().map_err(|_| bad())?;
    let heavy: u32 = h.parse().map_err(|_| bad())?;
    if clients == 0 || clients > 100_000 || heavy > clients {
        return Err(bad());
    }
    Ok(distributor::lab::load::Sessions { clients, heavy })
}

/// `--slow 5%:/work?ms=50` (or `0.5%:...`, `5:...`).
fn parse_slow(s: &str) -> Result<distributor::lab::load::SlowShare, String> {
    let (share, path) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not SHARE:PATH (e.g. 5%:/work?ms=50)"))?;
    let pct: f64 = share
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("bad share `{share}` (a percentage, e.g. 5%)"))?;
    if !(0.1..=100.0).contains(&pct) {
        return Err(format!("share `{share}` is not between 0.1% and 100%"));
    }
    if !path.starts_with('/') {
        return Err(format!("path `{path}` does not start with /"));
    }
    Ok(distributor::lab::load::SlowShare {
        path: path.to_string(),
        per_mille: (pct * 10.0).round() as u32,
    })
}

fn parse_connections(s: &str) -> Result<usize, String> {
    parse_count(s, 10_000)
}

fn parse_workers(s: &str) -> Result<usize, String> {
    parse_count(s, 4096)
}

fn parse_max_unacked(s: &str) -> Result<usize, String> {
    parse_count(s, 1024)
}

fn parse_max_requests(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("not a whole number".into()),
    }
}

/// `--max-memory`: bytes, or a number with K, M, G or T (1024-based; `KB`,
/// `KiB`, `MB`... mean the same), e.g. `512M`, `1.5G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("bad unit in `{s}` (e.g. 512M or 1.5G)")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 512M or 1.5G)"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("`{s}` is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
}

fn parse_max_restarts(s: &str) -> Result<u32, String> {
    parse_count(s, 1_000_000).map(|n| n as u32)
}

/// An address as users type it: a port alone (`8000`, on `host`), `:8000`
/// or `*:8000` (every interface), `IP:PORT`, `[IPv6]:PORT`, or
/// `NAME:PORT` (resolved now: `localhost:8000`).
fn parse_address(s: &str, host: std::net::IpAddr) -> Result<SocketAddr, String> {
    use std::net::{Ipv4Addr, ToSocketAddrs};
    let t = s.trim();
    let forms = "(forms: 8000, :8000, 127.0.0.1:8000, localhost:8000, [::1]:8000)";
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("`{s}`: `{p}` is not a port {forms}"))
    };
    if t.chars().all(|c| c.is_ascii_digit()) && !t.is_empty() {
        return Ok(SocketAddr::new(host, port(t)?));
    }
    if let Some(p) = t.strip_prefix(':').or_else(|| t.strip_prefix("*:")) {
        return Ok(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port(p)?));
    }
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((name, p)) = t.rsplit_once(':').filter(|(n, _)| !n.is_empty()) else {
        return Err(format!("`{s}` is not an address {forms}"));
    };
    let p = port(p)?;
    let found: Vec<SocketAddr> = (name, p)
        .to_socket_addrs()
        .map_err(|e| format!("`{s}`: cannot resolve `{name}`: {e} {forms}"))?
        .collect();
    // IPv4 first, as `localhost` is usually meant.
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("`{s}`: `{name}` has no address {forms}"))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    parse_address(s, std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// `--metrics 9090` stays on loopback: the endpoint has no authentication.
fn parse_metrics(s: &str) -> Result<SocketAddr, String> {
    parse_address(s, std::net::Ipv4Addr::LOCALHOST.into())
}

fn parse_ready(s: &str) -> Result<Ready, String> {
    s.parse()
}

fn parse_sched(s: &str) -> Result<Sched, String> {
    s.parse()
}

fn parse_steer(s: &str) -> Result<Steer, String> {
    s.parse()
}

fn parse_sticky(s: &str) -> Result<distributor::Sticky, String> {
    s.parse()
}

fn parse_balance_factor(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(e) if e.is_finite() && e > 0.0 && e <= 100.0 => Ok(e),
        _ => Err(format!(
            "'{s}' is not a balance factor: a number above 0, e.g. 0.25 (a worker may hold 125 % of the average)"
        )),
    }
}

fn parse_lab_mode(s: &str) -> Result<distributor::lab::LabMode, String> {
    s.parse()
}

/// `--weights`: one weight per slot, each 1..=1000.
#[derive(Debug, Clone)]
struct Weights(Vec<u32>);

fn parse_weights(s: &str) -> Result<Weights, String> {
    s.split(',')
        .map(|w| match w.trim().parse::<u32>() {
            Ok(n @ 1..=1000) => Ok(n),
            _ => Err(format!("bad weight `{}` (1 to 1000)", w.trim())),
        })
        .collect::<Result<Vec<u32>, String>>()
        .map(Weights)
}

/// `--protocol`: `auto` (`None`) is detected from the command.
#[derive(Debug, Clone, Copy)]
struct ProtocolArg(Option<Protocol>);

fn parse_protocol(s: &str) -> Result<ProtocolArg, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(ProtocolArg(None)),
        other => other
            .parse()
            .map(|p| ProtocolArg(Some(p)))
            .map_err(|_| format!("unknown protocol `{s}` (auto, native or node)")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (try 10s or 500ms)"))
}

fn main() -> ExitCode {
    if std::env::var_os(DEMO_WORKER_ENV).is_some() && distributor::is_worker() {
        return demo_worker();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    if cli.max_requests_jitter > 0 && cli.max_requests.is_none() {
        eprintln!("error: --max-requests-jitter needs --max-requests (see --help)");
        return ExitCode::from(2);
    }
    let quiet = matches!(cli.sub, Some(Sub::Compare(_) | Sub::Ctl(_)));
    distributor::init_logging(
        if quiet { "warn" } else { "info" },
        if cli.log_format == "json" {
            distributor::LogFormat::Json
        } else {
            distributor::LogFormat::Text
        },
    );
    let result = match cli.sub {
        Some(Sub::Compare(args)) => compare(args),
        Some(Sub::Ctl(args)) => ctl(args),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout with success; any other parse error is
/// one line on stderr and exit status 2.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    use clap::error::{ContextKind, ContextValue};
    let text = e.to_string();
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    let hint = match e.kind() {
        ErrorKind::UnknownArgument => match (
            context(ContextKind::SuggestedArg),
            context(ContextKind::InvalidArg),
        ) {
            (Some(similar), _) => format!(": did you mean `{similar}`?"),
            (None, Some(arg)) if !arg.starts_with('-') => format!(
                ": to run a program as the workers, put it after `--`, e.g. `distributor -w 4 -- {arg} ...`"
            ),
            _ => String::new(),
        },
        _ => String::new(),
    };
    eprintln!("{line}{hint} (see --help)");
    ExitCode::from(2)
}

/// An error and its causes in one line, each said once: a cause whose
/// text the line already holds is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The workers' command: the one given, or this program as the demo worker
/// (with `work`, one whose `GET /work?ms=N` holds it, for the lab).
fn worker_command(command: &[OsString], work: bool) -> anyhow::Result<WorkerCommand> {
    Ok(match command.split_first() {
        Some((program, args)) => WorkerCommand::new(program, args),
        None => {
            // `worker` (ignored) tells it from the primary in `ps`.
            let demo = WorkerCommand::new(
                std::env::current_exe()
                    .context("cannot find this program to run the demo worker")?,
                ["worker"],
            )
            .env(DEMO_WORKER_ENV, "1");
            if work {
                demo.env(DEMO_WORK_ENV, "1")
            } else {
                demo
            }
        }
    })
}

fn compare(args: CompareArgs) -> anyhow::Result<()> {
    use distributor::lab::{self, CompareOptions, Progress, report};
    let command = worker_command(&args.command, true)?;
    let shown = if args.command.is_empty() {
        "the built-in demo worker".to_string()
    } else {
        args.command
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = CompareOptions {
        workers: args.workers.unwrap_or(2 * cores),
        scheds: args.sched,
        duration: args.duration,
        connections: args.connections,
        keepalive: args.keepalive,
        path: args.path,
        threads: args.threads,
        slow: args.slow.clone(),
        sessions: args.sessions,
        command,
    };
    let tty = std::io::stderr().is_terminal();
    let mut progress = |p: Progress<'_>| {
        if !tty {
            return;
        }
        match p {
            Progress::Starting { mode } => eprint!("\r\x1b[K{mode}: starting workers"),
            Progress::Running {
                mode,
                elapsed,
                total,
                requests,
            } => eprint!(
                "\r\x1b[K{mode}: {:.1}/{:.1} s, {requests} requests",
                elapsed.as_secs_f64(),
                total.as_secs_f64()
            ),
            Progress::Done { report } => eprintln!(
                "\r\x1b[K{}: {:.0} req/s, {} errors",
                report.mode, report.requests_per_sec, report.errors
            ),
            _ => {}
        }
    };
    let reports = lab::compare(&opts, &mut progress)?;
    let meta = report::Meta {
        machine: lab::machine_description(),
        command: shown,
        workers: opts.workers,
        connections: opts.connections,
        duration_s: opts.duration.as_secs_f64(),
        keepalive: opts.keepalive,
        cores,
        path: match &opts.slow {
            Some(slow) => format!(
                "{}, {:.1}% GET {}",
                opts.path,
                f64::from(slow.per_mille) / 10.0,
                slow.path
            ),
            None => opts.path.clone(),
        },
    };
    if args.json {
        println!("{}", report::json(&meta, &reports));
    } else {
        print!("{}", report::table(&meta, &reports));
    }
    if let Some(path) = args.svg {
        std::fs::write(&path, lab::svg(&meta, &reports))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = worker_command(&cli.command, false)?;
    let mut builder = Primary::builder().sched(cli.sched);
    if let Some(steer) = cli.steer {
        builder = builder.steer(steer);
    }
    builder = builder
        .sticky(cli.sticky)
        .sticky_balance_factor(cli.sticky_balance_factor);
    if let Some(addr) = cli.listen {
        builder = builder.listen(addr);
    }
    if let Some(Weights(weights)) = cli.weights {
        builder = builder.weights(weights);
    }
    if let ProtocolArg(Some(protocol)) = cli.protocol {
        builder = builder.protocol(protocol);
    }
    let mut builder = builder
        .command(command)
        .shutdown_timeout(cli.shutdown_timeout)
        .worker_timeout(Some(cli.worker_timeout))
        .max_unacked(cli.max_unacked)
        .defer_accept(cli.defer_accept);
    if let Some(n) = cli.workers {
        builder = builder.workers(n);
    }
    builder = builder
        .prefix_output(!cli.no_prefix)
        .ready(cli.ready)
        .max_requests(cli.max_requests)
        .max_requests_jitter(cli.max_requests_jitter)
        .max_memory(cli.max_memory)
        .max_age(cli.max_age);
    // Started by socket activation: serve the socket given, not --listen.
    if let Some(listener) = distributor::activation::take_listener()
        .context("the socket-activation fd 3 is not a listening socket")?
    {
        builder = builder.listener(listener);
    }
    if let Some(user) = cli.user {
        builder = builder.user(user);
    }
    if let Some(group) = cli.group {
        builder = builder.group(group);
    }
    if let Some(addr) = cli.metrics {
        builder = builder.metrics(addr);
    }
    let control = match cli.control {
        Some(p) if p.as_os_str() == "off" => None,
        Some(p) => Some(p),
        None => Some(distributor::primary::control::default_path(
            std::process::id(),
        )),
    };
    let primary = builder
        .control(control)
        .max_restarts(cli.max_restarts)
        .upgrade_timeout(cli.upgrade_timeout)
        .build()?;
    let pid_file = cli.pid_file.map(PidFile::write).transpose()?;
    let outcome = primary.run();
    drop(pid_file);
    outcome?;
    Ok(())
}

/// `distributor ctl`: finds the primary's control socket, sends the
/// command, prints the outcome.
fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    use distributor::primary::control;
    let path = match (args.control, args.pid) {
        (Some(path), _) => path,
        (None, Some(pid)) => control::default_path(pid),
        (None, None) => {
            let dir = control::runtime_dir();
            let found = control::running(&dir);
            match found.as_slice() {
                [] => anyhow::bail!(
                    "no primary is running (no control socket in {}; one started with --control PATH: pass --control PATH)",
                    dir.display()
                ),
                [(_, path)] => path.clone(),
                several => anyhow::bail!(
                    "several primaries run (pids {}): say which with --pid PID",
                    several
                        .iter()
                        .map(|(pid, _)| pid.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    let mut request = args.command.join(" ");
    if args.json {
        if args.command.first().map(String::as_str) != Some("status") {
            anyhow::bail!("--json goes with status");
        }
        request.push_str(" --json");
    }
    let answer =
        control::request(&path, &request, args.timeout).map_err(|why| anyhow::anyhow!(why))?;
    print!("{}", answer.body);
    if args.command.first().map(String::as_str) == Some("stop") {
        if !answer.ended {
            anyhow::bail!("the primary did not stop within {:?}", args.timeout);
        }
        println!("stopped");
    }
    Ok(())
}

/// `--pid-file`: the primary's pid, written at start and removed at exit.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> anyhow::Result<PidFile> {
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the pid file {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    /// Removes the file if it still names this process: after an upgrade
    /// it names the new primary, which wrote it since.
    fn drop(&mut self) {
        let ours = format!("{}\n", std::process::id());
        if std::fs::read_to_string(&self.0).is_ok_and(|s| s == ours) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn demo_worker() -> ExitCode {
    let result = WorkerListener::from_env()
        .map_err(anyhow::Error::from)
        .and_then(|l| distributor::demo::run_demo_worker(l).map_err(anyhow::Error::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Never an empty reason: an error without text shows its kind.
            let text = format!("{e:#}");
            if text.trim().is_empty() {
                eprintln!("distributor demo worker: {e:?}");
            } else {
                eprintln!("distributor demo worker: {text}");
            }
            ExitCode::FAILURE
        }
    }
}
