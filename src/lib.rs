//! `distributor`: one primary process accepts connections and hands each to
//! one of N worker processes over a Unix socketpair with `SCM_RIGHTS`,
//! round-robin, as Node's `cluster` module does; it watches the workers and
//! replaces those that exit.
//!
//! Use it as a command (`distributor --workers 8 -- ./app`), or embed it: one
//! binary that is both primary and worker, the role decided at start.
//!
//! ```no_run
//! use std::io::Write;
//! use distributor::{Primary, WorkerListener};
//!
//! if distributor::is_primary() {
//!     // The primary logs through `tracing`: this shows it on stderr.
//!     distributor::init_logging("info", distributor::LogFormat::Text);
//!     // Re-executes this program as each worker.
//!     Primary::builder().workers(4).build()?.run()?;
//! } else {
//!     let mut listener = WorkerListener::from_env()?;
//!     for conn in listener.incoming() {
//!         let (mut stream, _peer) = conn?;
//!         stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n")?;
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layout
//!
//! - [`primary`]: the primary. Its public face is the builder and
//!   [`Primary`] (`primary/mod.rs`), the handle, events and settings
//!   (`api.rs`, `sched.rs`), the figures ([`Stats`], `stats.rs`) and the
//!   policies ([`primary::policy`], with the `Dispatcher` that places
//!   connections). Inside: the event loop's driver (`event_loop.rs`), the
//!   acceptor (`acceptor.rs`, over `server.rs`'s listening sockets), the
//!   custody ledger of every connection, with no I/O (`custody.rs`), the
//!   supervisor of the workers' lives (`supervisor.rs`), a worker process
//!   with its phase (`process.rs`) and deadlines (`timers.rs`), the mio
//!   tokens (`source.rs`), the BPF steering of reuseport (`steer.rs`,
//!   `--steer rr`), the hot upgrade of the primary (`upgrade.rs`), the
//!   control socket of `distributor ctl` (`control.rs`), sticky sessions
//!   (`sticky.rs`: keys and the ring; `peek.rs`: connections waiting for
//!   a key in their first request), restarts'
//!   backoff (`backoff.rs`), Node's
//!   cluster protocol (`node/`), the metrics endpoint (`metrics.rs`,
//!   `exposition.rs`), the workers' notify socket, output relay, the
//!   guardian and privileges.
//! - [`worker`]: the worker side, [`WorkerListener`].
//! - `tokio` (the `tokio` feature): the worker side on a tokio runtime,
//!   `TokioWorkerListener`, for axum, hyper and other tokio servers.
//! - [`protocol`]: the versioned worker protocol (see `docs/PROTOCOL.md`).
//! - [`demo`]: the built-in HTTP demo worker.
//! - `logging`: [`init_logging`], the command's log subscriber, for
//!   programs that embed the primary (it logs through `tracing`).
//! - [`lab`]: `distributor compare`: each scheduling mode under a built-in
//!   load generator, with throughput, latency and fairness figures.
//! - `channel`: one end of a primary–worker `SOCK_SEQPACKET` channel.
//! - `sys`: every raw system call, and so every `unsafe` block.
//!
//! # Portability
//!
//! Linux only: it relies on `SOCK_SEQPACKET`, `MSG_CMSG_CLOEXEC` and
//! `PR_SET_PDEATHSIG`.

#![warn(missing_docs, missing_debug_implementations, unsafe_op_in_unsafe_fn)]

#[cfg(not(target_os = "linux"))]
compile_error!("distributor supports Linux only");

pub mod activation;
mod channel;
pub mod demo;
#[cfg(feature = "lab")]
pub mod lab;
mod logging;
pub mod primary;
pub mod protocol;
mod sys;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod worker;

#[cfg(feature = "tokio")]
pub use self::tokio::{TokioWorkerEvent, TokioWorkerListener};
#[cfg(feature = "logging")]
pub use logging::{LogFormat, init_logging};
pub use primary::{
    Backoff, Builder, Event, Events, EventsError, Handle, Primary, PrimaryError, Protocol, Ready,
    Replacement, Sched, SlotStats, Stats, Steer, Sticky, StickyCounts, WorkerCommand, WorkerState,
    WorkerStats,
};
pub use worker::{
    Drain, InFlight, Incoming, WorkerError, WorkerEvent, WorkerListener, is_primary, is_worker,
};

#[doc(hidden)]
pub mod __private {
    //! For the crate's own tests and benchmarks only: not a stable interface.
    pub use crate::primary::node::fuzz_line as node_fuzz_line;
    pub use crate::sys::{is_cloexec, recv_with_fds, send_with_fds, seqpacket_pair};
}
