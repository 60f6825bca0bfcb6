//! The markdown report: the tables, the targets and the notes.

use super::*;

/// µs with two decimals under 10, one above.
pub(crate) fn figure(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// KiB as `12 345 KiB`.
pub(crate) fn kib(v: u64) -> String {
    format!("{} KiB", thousands(v as f64))
}

/// One row of the targets table.
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) measured: String,
    pub(crate) goal: String,
    /// `None`: not measured (a contender missing or failed).
    pub(crate) met: Option<bool>,
    /// The rounds fall on both sides of the goal: within the noise.
    pub(crate) straddles: bool,
}

/// `a / b` of the median req/s of two contenders under one load, with the
/// range of the per-round ratios.
pub(crate) fn ratio(
    totals: &BTreeMap<(&str, Load), Total>,
    a: &str,
    b: &str,
    load: Load,
    goal: f64,
    what: &str,
) -> Target {
    let goal_text = format!("≥ {goal:.2}×");
    let (Some(ta), Some(tb)) = (totals.get(&(a, load)), totals.get(&(b, load))) else {
        let missing: Vec<&str> = [a, b]
            .into_iter()
            .filter(|k| !totals.contains_key(&(*k, load)))
            .collect();
        return Target {
            what: what.to_string(),
            measured: format!("not measured (no {})", missing.join(", no ")),
            goal: goal_text,
            met: None,
            straddles: false,
        };
    };
    let r = ta.median_rate() / tb.median_rate();
    let per_round: Vec<f64> = ta
        .rates
        .iter()
        .filter_map(|(round, ra)| tb.rates.get(round).map(|rb| ra / rb))
        .collect();
    let lo = per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = per_round.iter().copied().fold(0.0, f64::max);
    Target {
        what: what.to_string(),
        measured: format!(
            "**{r:.2}×** ({} vs {} req/s; rounds {lo:.2}–{hi:.2}×)",
            thousands(ta.median_rate()),
            thousands(tb.median_rate())
        ),
        goal: goal_text,
        met: Some(r >= goal),
        straddles: lo < goal && hi >= goal,
    }
}

pub(crate) fn markdown(
    s: &Settings,
    totals: &BTreeMap<(&str, Load), Total>,
    failures: &BTreeMap<&str, String>,
    memory: Option<&Result<Memory, String>>,
    started: Instant,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## `cargo bench --bench perf`\n\n\
         Machine: {}.\n\n\
         Settings: {} workers, {} connections, {} rounds × {} s per contender and load \
         (order alternating between rounds, a {} ms warm-up before each run not counted; \
         req/s is the median of the rounds), load generator ({LOAD_THREADS} threads; 1 for \
         the one-connection latency) on the same machine. distributor {}; nginx: {}; Node: {}.",
        lab::machine_description(),
        s.workers,
        s.connections,
        s.rounds,
        s.seconds,
        s.warmup.as_millis(),
        env!("CARGO_PKG_VERSION"),
        nginx_version(s.nginx.as_deref()).unwrap_or_else(|| not_run(s, true)),
        s.node.clone().unwrap_or_else(|| not_run(s, false)),
    );
    let demo: Vec<&Contender> = s
        .contenders
        .iter()
        .filter(|c| {
            !matches!(
                c.program,
                Program::NodeCluster | Program::Distributor { node: true, .. }
            )
        })
        .collect();
    let node: Vec<&Contender> = s
        .contenders
        .iter()
        .filter(|c| !demo.iter().any(|d| d.key == c.key))
        .collect();

    // Throughput.
    for load in [Load::Close, Load::KeepAlive] {
        if demo.is_empty() {
            break;
        }
        let _ = writeln!(
            out,
            "\n### Throughput: {}, the demo worker and nginx\n",
            if load == Load::KeepAlive {
                "keep-alive"
            } else {
                "one request per connection (`Connection: close`)"
            }
        );
        throughput_table(&mut out, &demo, load, totals, failures);
    }

    // Latency at one connection.
    let single: Vec<&Contender> = demo
        .iter()
        .copied()
        .filter(|c| c.loads.contains(&Load::Single))
        .collect();
    if !single.is_empty() {
        let _ = writeln!(
            out,
            "\n### Latency, one connection at a time (one request per connection)\n\n\
             | contender | p50 µs | p50 of the rounds µs | p90 µs | p99 µs | req/s | errors |\n\
             |---|---|---|---|---|---|---|"
        );
        for c in &single {
            if let Some(e) = failures.get(c.key) {
                let _ = writeln!(out, "| {} | failed: {} | | | | | |", c.label, first(e));
                continue;
            }
            let Some(t) = totals.get(&(c.key, Load::Single)) else {
                continue;
            };
            let q = |q: f64| t.latency_us.value_at_quantile(q);
            let lo = t.p50s.iter().min().copied().unwrap_or(0);
            let hi = t.p50s.iter().max().copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {} | {lo}–{hi} | {} | {} | {} | {} |",
                c.label,
                q(0.5),
                q(0.9),
                q(0.99),
                thousands(t.median_rate()),
                t.errors
            );
        }
    }

    // Primary CPU per dispatched connection.
    let mut cpu_rows = Vec::new();
    for c in &demo {
        if !matches!(c.program, Program::Distributor { sched, .. } if ["rr", "least-conn", "p2c"].contains(&sched))
            && !matches!(c.program, Program::PlainLoop { .. })
        {
            continue;
        }
        for (load, how) in [
            (Load::Close, format!("{} connections", s.connections)),
            (Load::Single, "one connection at a time".to_string()),
        ] {
            if let Some(t) = totals.get(&(c.key, load)) {
                cpu_rows.push((
                    format!("{} ({} workers, {how}, rounds pooled)", c.label, s.workers),
                    t.requests,
                    t.cpu_us,
                    t.wall.as_secs_f64(),
                    load == Load::Close,
                ));
            }
        }
    }
    if let Some(Ok(m)) = memory {
        cpu_rows.push((
            format!(
                "distributor rr ({} workers, {} connections, the memory phase's long run)",
                m.workers, s.connections
            ),
            m.long_requests,
            m.long_cpu_us,
            m.long_secs,
            true,
        ));
    }
    if !cpu_rows.is_empty() {
        let _ = writeln!(
            out,
            "\n### Primary CPU per dispatched connection (one request per connection)\n\n\
             | contender | connections | primary CPU s | µs/connection | primary CPU % |\n\
             |---|---|---|---|---|"
        );
        for (label, n, cpu_us, wall, check) in &cpu_rows {
            let flag = if *check && *n < MIN_CPU_CONNECTIONS {
                " (fewer than 100 000: raise PERF_SECONDS or PERF_ROUNDS)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "| {label} | {}{flag} | {:.2} | {} | {:.0} |",
                thousands(*n as f64),
                cpu_us / 1e6,
                figure(cpu_us / (*n).max(1) as f64),
                100.0 * cpu_us / 1e6 / wall.max(1e-9)
            );
        }
    }

    // Memory.
    match memory {
        None => {}
        Some(Err(e)) => {
            let _ = writeln!(out, "\n### Primary memory\n\nFailed: {}", first(e));
        }
        Some(Ok(m)) => {
            let first_chunk = m.rss_chunks.first().copied().unwrap_or(m.rss_start);
            let last = m.rss_chunks.last().copied().unwrap_or(m.rss_start);
            let max = m.rss_chunks.iter().copied().max().unwrap_or(m.rss_start);
            let _ = writeln!(
                out,
                "\n### Primary memory (`--sched rr`, {} demo workers)\n\n\
                 | when | primary RSS | note |\n|---|---|---|\n\
                 | after the start and a warm-up | {} | |\n\
                 | after the first second of the long run | {} | |\n\
                 | after the long run: {} short connections in {:.1} s | {} | {:+} KiB since the first second, {:+} KiB since the warm-up; largest {}; {} errors |\n\
                 | with {} kept-alive connections open | {} | {} open fds in the primary; the workers' RSS together: {} |\n\
                 | after they closed | {} | |",
                m.workers,
                kib(m.rss_start),
                kib(first_chunk),
                thousands(m.long_requests as f64),
                m.long_secs,
                kib(last),
                last as i64 - first_chunk as i64,
                last as i64 - m.rss_start as i64,
                kib(max),
                m.long_errors,
                thousands(m.idle_open as f64),
                kib(m.rss_idle),
                m.fds_idle,
                kib(m.workers_rss_idle),
                kib(m.rss_after),
            );
            if m.idle_failed > 0 || m.idle_note.is_some() {
                let _ = writeln!(
                    out,
                    "\n{} of {} kept-alive connections could not be opened{}{}.",
                    m.idle_failed,
                    m.idle_wanted,
                    m.idle_error
                        .as_deref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default(),
                    m.idle_note
                        .as_deref()
                        .map(|n| format!("; {n}"))
                        .unwrap_or_default()
                );
            }
        }
    }

    // Node apps.
    if !node.is_empty() {
        let _ = writeln!(
            out,
            "\n### Node apps (the same unmodified `{NODE_APP}`), one request per connection\n"
        );
        throughput_table(&mut out, &node, Load::Close, totals, failures);
        let _ = writeln!(
            out,
            "\nNode's cluster primary against this one in every mode, keep-alive too: \
             `cargo bench --bench node_cluster`."
        );
    }

    // Targets.
    let mut targets = vec![
        ratio(
            totals,
            "dist-rr",
            "dist-reuseport",
            Load::Close,
            RR_VS_REUSEPORT_CLOSE,
            "rr / reuseport, req/s, one request per connection",
        ),
        ratio(
            totals,
            "dist-rr",
            "dist-reuseport",
            Load::KeepAlive,
            RR_VS_REUSEPORT_KEEPALIVE,
            "rr / reuseport, req/s, keep-alive",
        ),
    ];
    for (load, name) in [
        (Load::Close, "one request per connection"),
        (Load::KeepAlive, "keep-alive"),
    ] {
        targets.push(ratio(
            totals,
            "dist-reuseport",
            "nginx",
            load,
            REUSEPORT_VS_NGINX,
            &format!("ours reuseport / nginx reuseport, req/s, {name}"),
        ));
        targets.push(ratio(
            totals,
            "dist-rr",
            "nginx",
            load,
            RR_VS_NGINX,
            &format!("ours rr / nginx reuseport, req/s, {name}"),
        ));
    }
    if totals.contains_key(&("dist-steer", Load::Close)) {
        targets.push(ratio(
            totals,
            "dist-steer",
            "dist-reuseport",
            Load::Close,
            STEER_VS_REUSEPORT,
            "reuseport --steer rr / reuseport, req/s, one request per connection",
        ));
        targets.push(ratio(
            totals,
            "dist-steer",
            "dist-rr",
            Load::Close,
            STEER_VS_RR,
            "reuseport --steer rr / rr, req/s, one request per connection",
        ));
        let what = "reuseport --steer rr p50 − reuseport p50, one connection at a time".to_string();
        let goal = format!("≤ {STEER_LATENCY_US:.0} µs");
        targets.push(
            match (
                totals.get(&("dist-steer", Load::Single)),
                totals.get(&("dist-reuseport", Load::Single)),
            ) {
                (Some(st), Some(rp)) => {
                    let d = st.p50_us() - rp.p50_us();
                    Target {
                        what,
                        measured: format!(
                            "**{d:+.0} µs** ({:.0} vs {:.0} µs)",
                            st.p50_us(),
                            rp.p50_us()
                        ),
                        goal,
                        met: Some(d <= STEER_LATENCY_US),
                        straddles: false,
                    }
                }
                _ => Target {
                    what,
                    measured: "not measured".into(),
                    goal,
                    met: None,
                    straddles: false,
                },
            },
        );
    }
    let latency_what = "rr p50 − reuseport p50, one connection at a time".to_string();
    let latency_goal = format!("≤ {LATENCY_US:.0} µs");
    targets.push(
        match (
            totals.get(&("dist-rr", Load::Single)),
            totals.get(&("dist-reuseport", Load::Single)),
        ) {
            (Some(rr), Some(rp)) => {
                let d = rr.p50_us() - rp.p50_us();
                Target {
                    what: latency_what,
                    measured: format!(
                        "**{d:+.0} µs** ({:.0} vs {:.0} µs)",
                        rr.p50_us(),
                        rp.p50_us()
                    ),
                    goal: latency_goal,
                    met: Some(d <= LATENCY_US),
                    straddles: false,
                }
            }
            _ => Target {
                what: latency_what,
                measured: "not measured".into(),
                goal: latency_goal,
                met: None,
                straddles: false,
            },
        },
    );
    // The primary's CPU per connection (short connections, rounds pooled).
    let cpu = |key: &str| {
        totals
            .get(&(key, Load::Close))
            .filter(|t| t.requests > 0)
            .map(|t| t.cpu_us / t.requests as f64)
    };
    let rr_cpu_what = "primary CPU per connection, rr, one request per connection".to_string();
    let rr_cpu_goal = format!("≤ {RR_CPU_US:.0} µs");
    targets.push(match cpu("dist-rr") {
        Some(us) => Target {
            what: rr_cpu_what,
            measured: format!("**{us:.1} µs**"),
            goal: rr_cpu_goal,
            met: Some(us <= RR_CPU_US),
            straddles: false,
        },
        None => Target {
            what: rr_cpu_what,
            measured: "not measured".into(),
            goal: rr_cpu_goal,
            met: None,
            straddles: false,
        },
    });
    for (a, b, goal, what) in [
        (
            "dist-rr",
            "plain-loop",
            VS_PLAIN_LOOP,
            "primary CPU per connection, rr / the plain loop",
        ),
        (
            "dist-node-rr",
            "node-rr",
            VS_NODE_PRIMARY,
            "primary CPU per connection, ours / Node's primary (Node app)",
        ),
    ] {
        let goal_text = format!("≤ {goal:.2}×");
        targets.push(match (cpu(a), cpu(b)) {
            (Some(x), Some(y)) if y > 0.0 => Target {
                what: what.to_string(),
                measured: format!("**{:.2}×** ({x:.1} vs {y:.1} µs)", x / y),
                goal: goal_text,
                met: Some(x / y <= goal),
                straddles: false,
            },
            _ => Target {
                what: what.to_string(),
                measured: "not measured".into(),
                goal: goal_text,
                met: None,
                straddles: false,
            },
        });
    }
    if let Some(m) = memory {
        let what = "primary RSS flat over the long run of short connections".to_string();
        let goal = format!("≤ {FLAT_KIB:+} KiB after its first second");
        targets.push(match m {
            Ok(m) => {
                let first_chunk = m.rss_chunks.first().copied().unwrap_or(m.rss_start);
                let last = m.rss_chunks.last().copied().unwrap_or(m.rss_start);
                let d = last as i64 - first_chunk as i64;
                Target {
                    what,
                    measured: format!(
                        "**{d:+} KiB** ({} → {} over {} connections)",
                        kib(first_chunk),
                        kib(last),
                        thousands(m.long_requests as f64)
                    ),
                    goal,
                    met: Some(d <= FLAT_KIB),
                    straddles: false,
                }
            }
            Err(_) => Target {
                what,
                measured: "failed".into(),
                goal,
                met: None,
                straddles: false,
            },
        });
    }
    let _ = writeln!(
        out,
        "\n### Targets\n\n| target | measured | goal | met |\n|---|---|---|---|"
    );
    for t in &targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}{} |",
            t.what,
            t.measured,
            t.goal,
            match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            },
            if t.straddles {
                " (rounds on both sides)"
            } else {
                ""
            }
        );
    }

    // A lever weighed, not a target.
    if let (Some(u), Some(p)) = (cpu("uring-loop"), cpu("plain-loop")) {
        let _ = writeln!(
            out,
            "\nio_uring as a lever: the plain loop over io_uring costs **{:.2}×** the plain loop's primary CPU per connection ({u:.1} vs {p:.1} µs, 64 connections).",
            u / p
        );
    }

    // Notes.
    let n = s.workers;
    let _ = writeln!(
        out,
        "\n- distributor: `distributor --workers {n} --sched MODE --listen 127.0.0.1:PORT` \
         (the built-in demo worker, `Hello from worker <ID> (pid <PID>)`, 32 bytes); nginx: \
         `worker_processes {n}`, `listen 127.0.0.1:PORT reuseport`, `return 200 \
         \"{NGINX_BODY}\"` (17 bytes, `keepalive_requests 1000000`, `access_log off`; \
         its `nginx.conf` is next to the logs).\n\
         - share: each worker's part of the requests, the smallest and largest in any round \
         (ideal {:.1} %; nginx's answers do not name the worker).\n\
         - primary CPU: user + system time of the primary process (`/proc/PID/stat`, 10 ms \
         ticks) over the measured runs, per request served (with one request per connection, \
         per connection dispatched) and as % of one core. In the kernel modes the workers \
         accept, and the primary only reads what they report (the connections they took and \
         finished); nginx's master (in parentheses) takes no part in serving.",
        100.0 / n as f64
    );
    for (c, why) in &s.skipped {
        let _ = writeln!(out, "- {} skipped: {why}.", c.label_long());
    }
    if s.node.is_none() {
        let _ = writeln!(
            out,
            "- Node's cluster against this primary: `cargo bench --bench node_cluster` (needs `node`)."
        );
    }
    let mut others = totals.values().map(|t| t.others_pct).fold(0.0, f64::max);
    if let Some(Ok(m)) = memory {
        others = others.max(m.long_others_pct);
    }
    let _ = writeln!(
        out,
        "- Other processes on the machine used at most {others:.0} % of its CPU during a \
         measured run{}.\n- The whole bench took {:.0} s.",
        if others > BUSY_PCT {
            ": NOT QUIET, these figures are disturbed"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
    out
}

/// Why nginx (or Node) has no version in the header: it is missing, or no
/// contender needs it.
pub(crate) fn not_run(s: &Settings, nginx: bool) -> String {
    let missing = s.skipped.iter().any(|(c, _)| match c.program {
        Program::Nginx => nginx,
        Program::NodeCluster | Program::Distributor { node: true, .. } => !nginx,
        Program::Distributor { node: false, .. } | Program::PlainLoop { .. } => false,
    });
    if missing { "not installed" } else { "not run" }.to_string()
}

/// The first clause of an error (the log's tail is on stderr).
pub(crate) fn first(e: &str) -> String {
    e.split(';').next().unwrap_or("").replace('|', "\\|")
}

pub(crate) fn nginx_version(nginx: Option<&Path>) -> Option<String> {
    let out = Command::new(nginx?).arg("-v").output().ok()?;
    // `nginx version: nginx/1.22.1`, on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    Some(text.trim().rsplit(' ').next()?.to_string())
}

pub(crate) fn throughput_table(
    out: &mut String,
    contenders: &[&Contender],
    load: Load,
    totals: &BTreeMap<(&str, Load), Total>,
    failures: &BTreeMap<&str, String>,
) {
    let _ = writeln!(
        out,
        "| contender | req/s | rounds min–max | errors | p50 ms | p99 ms | share min–max % | primary CPU µs/req | primary CPU % |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for c in contenders {
        if let Some(e) = failures.get(c.key) {
            let _ = writeln!(out, "| {} | failed: {} | | | | | | | |", c.label, first(e));
            continue;
        }
        let Some(t) = totals.get(&(c.key, load)) else {
            continue;
        };
        let lo = t.rates.values().copied().fold(f64::INFINITY, f64::min);
        let hi = t.rates.values().copied().fold(0.0, f64::max);
        let ms = |q: f64| {
            if t.latency_us.is_empty() {
                "–".to_string()
            } else {
                format!("{:.2}", t.latency_us.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let share = if t.share_min.is_finite() {
            format!("{:.1}–{:.1}", t.share_min, t.share_max)
        } else {
            "–".to_string()
        };
        let per_req = figure(t.cpu_us / t.requests.max(1) as f64);
        let pct = format!(
            "{:.0}",
            100.0 * t.cpu_us / 1e6 / t.wall.as_secs_f64().max(1e-9)
        );
        let (per_req, pct) = if c.program == Program::Nginx {
            // Its master: no connection passes through it.
            (format!("({per_req})"), format!("({pct})"))
        } else {
            (per_req, pct)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}–{} | {} | {} | {} | {share} | {per_req} | {pct} |",
            c.label,
            thousands(t.median_rate()),
            thousands(lo),
            thousands(hi),
            t.errors,
            ms(0.5),
            ms(0.99),
        );
    }
}
