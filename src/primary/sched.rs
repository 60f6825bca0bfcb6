//! [`Sched`]: who accepts connections, and so who balances them.

use std::fmt;

/// Who accepts connections, and so who balances them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Sched {
    /// The primary accepts and hands each connection to the next worker
    /// (Node's `SCHED_RR`).
    #[default]
    RoundRobin,
    /// The primary accepts and hands each connection to the worker with
    /// the fewest connections in flight (relative to its weight); ties go
    /// round-robin. Needs workers that report completions (the library's
    /// [`crate::WorkerListener::finished`], the demo worker); others are
    /// judged by their unacknowledged connections only.
    LeastConn,
    /// The primary accepts and hands each connection to the less loaded of
    /// two workers drawn at random ("power of two choices").
    PowerOfTwo,
    /// Every worker inherits the same listening socket and accepts itself;
    /// the kernel balances (Node's `SCHED_NONE`).
    Shared,
    /// One `SO_REUSEPORT` socket per worker slot, created and kept by the
    /// primary, so a slot's accept queue outlives its worker; the kernel
    /// balances by hashing the connection's addresses.
    ReusePort,
}

impl Sched {
    /// Every mode, in the order the lab runs them.
    pub const ALL: [Sched; 5] = [
        Sched::RoundRobin,
        Sched::LeastConn,
        Sched::PowerOfTwo,
        Sched::Shared,
        Sched::ReusePort,
    ];

    /// The mode's name on the command line: `rr`, `least-conn`, `p2c`,
    /// `shared`, `reuseport`.
    pub fn name(self) -> &'static str {
        match self {
            Sched::RoundRobin => "rr",
            Sched::LeastConn => "least-conn",
            Sched::PowerOfTwo => "p2c",
            Sched::Shared => "shared",
            Sched::ReusePort => "reuseport",
        }
    }

    /// Whether the workers accept by themselves (the kernel balances).
    pub fn is_kernel(self) -> bool {
        matches!(self, Sched::Shared | Sched::ReusePort)
    }

    /// Whether its placement reads the workers' load (connections in
    /// flight), and so wants their reports read before it places.
    pub(crate) fn reads_load(self) -> bool {
        matches!(self, Sched::LeastConn | Sched::PowerOfTwo)
    }
}

impl fmt::Display for Sched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Sched {
    type Err = String;
    fn from_str(s: &str) -> Result<Sched, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rr" | "round-robin" | "roundrobin" => Ok(Sched::RoundRobin),
            "least-conn" | "leastconn" | "lc" => Ok(Sched::LeastConn),
            "p2c" | "power-of-two" => Ok(Sched::PowerOfTwo),
            "shared" | "none" => Ok(Sched::Shared),
            "reuseport" | "reuse-port" => Ok(Sched::ReusePort),
            _ => Err(format!(
                "unknown scheduling mode `{s}` (rr, least-conn, p2c, shared or reuseport)"
            )),
        }
    }
}
