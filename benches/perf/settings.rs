//! The bench's settings (`PERF_*` variables) and the tools it finds.

use super::*;

/// The key of the memory phase in `PERF_CONTENDERS`.
pub(crate) const MEMORY_KEY: &str = "memory";

pub(crate) struct Settings {
    pub(crate) workers: usize,
    pub(crate) connections: usize,
    pub(crate) seconds: f64,
    pub(crate) rounds: usize,
    pub(crate) warmup: Duration,
    pub(crate) retries: usize,
    pub(crate) idle_connections: usize,
    pub(crate) long_connections: u64,
    /// Those selected and runnable here.
    pub(crate) contenders: Vec<Contender>,
    pub(crate) memory: bool,
    pub(crate) nginx: Option<PathBuf>,
    pub(crate) node: Option<String>,
    /// `PERF_BASELINE`: an older `distributor` for the `base-*` contenders.
    pub(crate) baseline: Option<PathBuf>,
    /// Contenders selected but left out, and why.
    pub(crate) skipped: Vec<(Contender, String)>,
}

pub(crate) fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("perf: {name}={v:?} does not parse");
            std::process::exit(2);
        }),
    }
}

/// The nginx binary: `PERF_NGINX`, else `nginx` on PATH, else
/// `/usr/sbin/nginx` (not on a plain user's PATH); `None` when none runs.
pub(crate) fn find_nginx() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("PERF_NGINX") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![PathBuf::from("nginx"), PathBuf::from("/usr/sbin/nginx")],
    };
    candidates.into_iter().find(|p| {
        Command::new(p)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

pub(crate) fn node_version() -> Option<String> {
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        _ => None,
    }
}

impl Settings {
    pub(crate) fn from_env() -> Settings {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (selected, memory): (Vec<Contender>, bool) = match std::env::var("PERF_CONTENDERS") {
            Err(_) => (CONTENDERS.to_vec(), true),
            Ok(list) => {
                let keys: BTreeSet<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .collect();
                for k in &keys {
                    if *k != MEMORY_KEY && !CONTENDERS.iter().any(|c| c.key == *k) {
                        let mut known: Vec<&str> = CONTENDERS.iter().map(|c| c.key).collect();
                        known.push(MEMORY_KEY);
                        eprintln!(
                            "perf: unknown contender {k:?} in PERF_CONTENDERS; known: {}",
                            known.join(", ")
                        );
                        std::process::exit(2);
                    }
                }
                (
                    CONTENDERS
                        .iter()
                        .filter(|c| keys.contains(c.key))
                        .copied()
                        .collect(),
                    keys.contains(MEMORY_KEY),
                )
            }
        };
        // Steering loads BPF: root only (CAP_BPF); said, not failed.
        let mut selected = selected;
        if !nix::unistd::geteuid().is_root() && selected.iter().any(|c| c.key == "dist-steer") {
            eprintln!("perf: dist-steer not run: loading BPF needs root");
            selected.retain(|c| c.key != "dist-steer");
        }
        let needs_nginx = selected.iter().any(|c| c.program == Program::Nginx);
        let needs_node = selected.iter().any(|c| {
            matches!(
                c.program,
                Program::NodeCluster | Program::Distributor { node: true, .. }
            )
        });
        let nginx = if needs_nginx { find_nginx() } else { None };
        let baseline = std::env::var_os("PERF_BASELINE").map(PathBuf::from);
        let node = if needs_node { node_version() } else { None };
        let mut contenders = Vec::new();
        let mut skipped = Vec::new();
        for c in selected {
            match c.program {
                Program::Nginx if nginx.is_none() => skipped.push((
                    c,
                    match std::env::var("PERF_NGINX") {
                        Ok(p) => format!("PERF_NGINX={p:?} does not run (`-v`)"),
                        Err(_) => "nginx is not installed (not on PATH, not /usr/sbin/nginx; \
                                   PERF_NGINX names it)"
                            .to_string(),
                    },
                )),
                Program::NodeCluster | Program::Distributor { node: true, .. }
                    if node.is_none() =>
                {
                    skipped.push((c, "`node` is not on PATH (or does not run)".to_string()))
                }
                Program::Distributor { baseline: true, .. } if baseline.is_none() => {
                    skipped.push((
                        c,
                        "no baseline: PERF_BASELINE names an older distributor binary".to_string(),
                    ))
                }
                _ => contenders.push(c),
            }
        }
        let s = Settings {
            workers: setting("PERF_WORKERS", cores),
            connections: setting("PERF_CONNECTIONS", 64),
            seconds: setting("PERF_SECONDS", 1.0),
            rounds: setting("PERF_ROUNDS", 6),
            warmup: Duration::from_millis(setting("PERF_WARMUP_MS", 200)),
            retries: setting("PERF_RETRIES", 1),
            idle_connections: setting("PERF_IDLE_CONNECTIONS", 10_000),
            long_connections: setting("PERF_LONG_CONNECTIONS", 200_000),
            contenders,
            memory,
            nginx,
            node,
            baseline,
            skipped,
        };
        if s.workers == 0
            || s.connections == 0
            || s.rounds == 0
            || !(s.seconds > 0.0 && s.seconds.is_finite())
        {
            eprintln!("perf: workers, connections, seconds and rounds must not be 0");
            std::process::exit(2);
        }
        s
    }
}
