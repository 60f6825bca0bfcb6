//! A contender's server: the distributor, nginx, Node's cluster primary
//! or the plain loop, started, made ready and stopped.

use super::*;

/// A running contender: its primary (nginx's master), in a process group of
/// its own.
pub(crate) struct Server {
    pub(crate) program: Program,
    pub(crate) workers: usize,
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    pub(crate) log: PathBuf,
    pub(crate) stopped: bool,
}

/// A minimal nginx configuration: `workers` processes, one `SO_REUSEPORT`
/// socket each, the fixed answer, everything it writes under `dir`.
pub(crate) fn nginx_conf(dir: &Path, workers: usize, port: u16) -> String {
    let d = dir.display();
    format!(
        "# Written by `cargo bench --bench perf`.
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    # As the demo worker: no limit on requests per kept-alive connection
    # (nginx closes after 1000 by default).
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location / {{ return 200 \"{NGINX_BODY}\"; }}
    }}
}}
"
    )
}

impl Server {
    pub(crate) fn start(
        s: &Settings,
        program: Program,
        workers: usize,
        log: &Path,
        dir: &Path,
    ) -> Result<Server, String> {
        let port = free_port()?;
        let n = workers.to_string();
        let mut cmd = match program {
            Program::Distributor {
                sched,
                node,
                baseline,
            } => {
                let binary = match (baseline, &s.baseline) {
                    (false, _) => PathBuf::from(DISTRIBUTOR),
                    (true, Some(b)) => b.clone(),
                    (true, None) => return Err("no PERF_BASELINE".into()),
                };
                let mut cmd = Command::new(binary);
                cmd.args(["--workers", &n]);
                if sched == STEERED {
                    cmd.args(["--sched", "reuseport", "--steer", "rr"]);
                } else if sched == STICKY_IP {
                    cmd.args(["--sched", "rr", "--sticky", "ip"]);
                } else if sched == STICKY_COOKIE {
                    cmd.args(["--sched", "rr", "--sticky", "cookie:sid"]);
                } else {
                    cmd.args(["--sched", sched]);
                }
                cmd.args(["--shutdown-timeout", "3s"]);
                if node {
                    // The app listens on PORT through the primary.
                    cmd.args(["--", "node", NODE_APP]);
                } else {
                    cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
                }
                cmd
            }
            Program::Nginx => {
                let nginx = s.nginx.as_ref().ok_or("no nginx")?;
                let stem = log.file_stem().unwrap_or_default().to_string_lossy();
                let home = dir.join(format!("nginx-{stem}"));
                std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
                let conf = home.join("nginx.conf");
                std::fs::write(&conf, nginx_conf(&home, workers, port))
                    .map_err(|e| format!("{}: {e}", conf.display()))?;
                let mut cmd = Command::new(nginx);
                cmd.arg("-p")
                    .arg(&home)
                    .arg("-c")
                    .arg(&conf)
                    .args(["-e", "stderr"]);
                cmd
            }
            Program::NodeCluster => {
                let mut cmd = Command::new("node");
                cmd.arg(CLUSTER_PRIMARY)
                    .arg(&n)
                    .env("NODE_CLUSTER_SCHED_POLICY", "rr");
                cmd
            }
            Program::PlainLoop { uring } => {
                let exe = std::env::current_exe().map_err(|e| format!("this bench: {e}"))?;
                let mut cmd = Command::new(exe);
                cmd.env(PLAIN_LOOP_ENV, &n)
                    .env(PLAIN_LOOP_URING_ENV, if uring { "1" } else { "0" });
                cmd
            }
        };
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.current_dir(ROOT)
            .env("PORT", port.to_string())
            .env_remove("NODE_UNIQUE_ID")
            .env_remove("NODE_CHANNEL_FD")
            .env_remove("DISTRIBUTOR_WORKERS")
            .env_remove("DISTRIBUTOR_SCHED")
            .env_remove("DISTRIBUTOR_LISTEN")
            .env_remove("DISTRIBUTOR_WEIGHTS")
            .env_remove("DISTRIBUTOR_MAX_UNACKED")
            .env_remove("DISTRIBUTOR_DEFER_ACCEPT")
            .env_remove("DISTRIBUTOR_METRICS")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if !matches!(program, Program::NodeCluster) {
            cmd.env_remove("NODE_CLUSTER_SCHED_POLICY");
        }
        own_group(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        Ok(Server {
            program,
            workers,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: log.to_path_buf(),
            stopped: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        format!("log {}:\n    {tail}", self.log.display())
    }

    /// Whether the log says that every worker serves.
    pub(crate) fn log_says_ready(&self) -> bool {
        let n = self.workers;
        let text = self.log_text();
        match self.program {
            // (`N/N ready` from builds before 2026-12.)
            Program::Distributor { .. } => {
                text.contains(&format!("{n} of {n} slots ready"))
                    || text.contains(&format!("{n}/{n} ready"))
            }
            // One line per worker; not "start worker processes".
            Program::Nginx => text.matches("start worker process ").count() >= n,
            Program::NodeCluster => text.contains(&format!("{n} workers listening on")),
            Program::PlainLoop { .. } => text.contains(&format!("plain loop: {n} workers ready")),
        }
    }

    /// Waits (bounded) until a request succeeds and every worker serves;
    /// then checks that the primary itself holds the listening socket.
    pub(crate) fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error;
        // Since when it has served with all its workers started, for when
        // the log does not say (its wording changed).
        let mut complete_since: Option<Instant> = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "exited before serving ({status}); {}",
                    self.log_tail()
                ));
            }
            match probe(self.addr) {
                Ok(_) => {
                    if self.log_says_ready() {
                        break;
                    }
                    if descendants(self.pid()).len() >= self.workers {
                        let since = *complete_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= LOG_SILENT_READY {
                            eprintln!(
                                "  warning: the log of pid {} does not say that all workers are \
                                 ready; going by its {} processes, serving for {LOG_SILENT_READY:?}",
                                self.pid(),
                                self.workers
                            );
                            break;
                        }
                    } else {
                        complete_since = None;
                    }
                    last_error = "serves, but the log does not say all workers are ready".into();
                }
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready within {READY_TIMEOUT:?} on {}: {last_error}; {}",
                    self.addr,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !holds_listener(self.pid(), self.addr.port()) {
            return Err(format!(
                "pid {} holds no socket listening on {}; {}",
                self.pid(),
                self.addr,
                self.log_tail()
            ));
        }
        let family = descendants(self.pid());
        if family.len() != self.workers {
            eprintln!(
                "  warning: {} processes under pid {}, {} workers expected",
                family.len(),
                self.pid(),
                self.workers
            );
        }
        Ok(())
    }

    pub(crate) fn spec(&self, s: &Settings, load: Load, duration: Duration) -> load::LoadSpec {
        let (connections, threads) = match load {
            Load::Single => (1, 1),
            Load::Close | Load::KeepAlive => (s.connections, LOAD_THREADS),
        };
        load::LoadSpec {
            addr: self.addr,
            connections,
            duration,
            keepalive: load == Load::KeepAlive,
            path: "/".into(),
            threads,
            slow: None,
            sessions: None,
        }
    }

    /// A warm-up, then the measured run with the CPU times read before and
    /// after.
    pub(crate) fn measure(&mut self, s: &Settings, load: Load) -> Result<Sample, String> {
        let warmup = match self.program {
            // Node's JIT needs longer than the demo worker and nginx.
            Program::NodeCluster | Program::Distributor { node: true, .. } => {
                s.warmup.max(NODE_WARMUP)
            }
            _ => s.warmup,
        };
        if !warmup.is_zero() {
            load::run_load(&self.spec(s, load, warmup), &|_, _| {})
                .map_err(|e| format!("load generator: {e}"))?;
        }
        let spec = self.spec(s, load, Duration::from_secs_f64(s.seconds));
        self.measure_spec(&spec)
    }

    /// One measured run of `spec`.
    pub(crate) fn measure_spec(&mut self, spec: &load::LoadSpec) -> Result<Sample, String> {
        let (result, cpu) = measure_cpu(self.pid(), || {
            load::run_load(spec, &|_, _| {}).map_err(|e| format!("load generator: {e}"))
        })?;
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!(
                "exited during a run ({status}); {}",
                self.log_tail()
            ));
        }
        Ok(Sample {
            result,
            cpu_us: cpu.primary_us,
            wall: cpu.wall,
            others_pct: cpu.others_pct,
        })
    }

    /// Stops it: see [`stop_group`]. Returns what went wrong, for the log.
    pub(crate) fn stop(&mut self) -> Vec<String> {
        self.stopped = true;
        stop_group(&mut self.child)
    }
}

impl Drop for Server {
    /// On an early return or a panic: nothing survives the bench.
    fn drop(&mut self) {
        if !self.stopped {
            kill_group(&mut self.child);
        }
    }
}
