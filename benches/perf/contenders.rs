//! What the bench runs: the loads, the programs, and the contenders (a
//! program under a load, labelled).

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Load {
    /// `PERF_CONNECTIONS` connections, one request each (`Connection: close`).
    Close,
    /// `PERF_CONNECTIONS` kept-alive connections.
    KeepAlive,
    /// One connection at a time, one request each: latency.
    Single,
}

impl Load {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Load::Close => "close",
            Load::KeepAlive => "keep-alive",
            Load::Single => "1 conn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Program {
    /// The demo worker (`distributor` with no command), or, with `node`,
    /// `distributor ... -- node app.js`; with `baseline`, the binary
    /// `PERF_BASELINE` names (an older build, measured side by side).
    Distributor {
        sched: &'static str,
        node: bool,
        baseline: bool,
    },
    /// nginx, `reuseport`.
    Nginx,
    /// `node cluster_primary.js N`, `NODE_CLUSTER_SCHED_POLICY=rr`.
    NodeCluster,
    /// The reference: this bench as a plain accept, sendmsg, close loop
    /// over N demo workers ([`plain_loop`]); with `uring`, over io_uring
    /// ([`uring_loop`]).
    PlainLoop { uring: bool },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Contender {
    /// For `PERF_CONTENDERS`.
    pub(crate) key: &'static str,
    /// For the tables.
    pub(crate) label: &'static str,
    pub(crate) program: Program,
    pub(crate) loads: &'static [Load],
}

pub(crate) const DEMO_LOADS: &[Load] = &[Load::Close, Load::KeepAlive];
pub(crate) const LATENCY_LOADS: &[Load] = &[Load::Close, Load::KeepAlive, Load::Single];
pub(crate) const NODE_LOADS: &[Load] = &[Load::Close];
pub(crate) const PLAIN_LOADS: &[Load] = &[Load::Close, Load::Single];

/// In table order; a round runs them in this order or reversed.
/// The `sched` of the steered contender: `--sched reuseport --steer rr`.
pub(crate) const STEERED: &str = "reuseport+steer";
/// `--sched rr --sticky ip`.
pub(crate) const STICKY_IP: &str = "rr+sticky-ip";
/// `--sched rr --sticky cookie:sid` (the bench's requests carry no such
/// cookie: each connection is peeked at, then placed by the policy).
pub(crate) const STICKY_COOKIE: &str = "rr+sticky-cookie";

pub(crate) const CONTENDERS: [Contender; 15] = [
    Contender {
        key: "dist-rr",
        label: "distributor rr",
        program: Program::Distributor {
            sched: "rr",
            node: false,
            baseline: false,
        },
        loads: LATENCY_LOADS,
    },
    Contender {
        key: "dist-least-conn",
        label: "distributor least-conn",
        program: Program::Distributor {
            sched: "least-conn",
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-p2c",
        label: "distributor p2c",
        program: Program::Distributor {
            sched: "p2c",
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-shared",
        label: "distributor shared",
        program: Program::Distributor {
            sched: "shared",
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-reuseport",
        label: "distributor reuseport",
        program: Program::Distributor {
            sched: "reuseport",
            node: false,
            baseline: false,
        },
        loads: LATENCY_LOADS,
    },
    Contender {
        key: "dist-steer",
        label: "distributor reuseport --steer rr",
        program: Program::Distributor {
            sched: STEERED,
            node: false,
            baseline: false,
        },
        loads: LATENCY_LOADS,
    },
    Contender {
        key: "dist-sticky-ip",
        label: "distributor rr --sticky ip",
        program: Program::Distributor {
            sched: STICKY_IP,
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "dist-sticky-cookie",
        label: "distributor rr --sticky cookie:sid",
        program: Program::Distributor {
            sched: STICKY_COOKIE,
            node: false,
            baseline: false,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "base-rr",
        label: "baseline rr",
        program: Program::Distributor {
            sched: "rr",
            node: false,
            baseline: true,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "base-reuseport",
        label: "baseline reuseport",
        program: Program::Distributor {
            sched: "reuseport",
            node: false,
            baseline: true,
        },
        loads: DEMO_LOADS,
    },
    Contender {
        key: "plain-loop",
        label: "plain loop (accept, sendmsg, close)",
        program: Program::PlainLoop { uring: false },
        loads: PLAIN_LOADS,
    },
    Contender {
        key: "uring-loop",
        label: "plain loop over io_uring",
        program: Program::PlainLoop { uring: true },
        loads: PLAIN_LOADS,
    },
    Contender {
        key: "nginx",
        label: "nginx reuseport",
        program: Program::Nginx,
        loads: DEMO_LOADS,
    },
    Contender {
        key: "node-rr",
        label: "Node cluster rr",
        program: Program::NodeCluster,
        loads: NODE_LOADS,
    },
    Contender {
        key: "dist-node-rr",
        label: "distributor rr",
        program: Program::Distributor {
            sched: "rr",
            node: true,
            baseline: false,
        },
        loads: NODE_LOADS,
    },
];

impl Contender {
    /// The label, with the app when it is not the demo worker.
    pub(crate) fn label_long(&self) -> String {
        match self.program {
            Program::NodeCluster | Program::Distributor { node: true, .. } => {
                format!("{} (Node app)", self.label)
            }
            _ => self.label.to_string(),
        }
    }
}
