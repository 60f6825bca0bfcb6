//! The integration tests, in one binary (one build of `util`, one link):
//! each module starts the real `distributor` binary (or the library's
//! primary in this process) and real worker processes, and talks to them
//! with real TCP clients on 127.0.0.1, every wait bounded. Run one file's
//! tests with `cargo test --test all MODULE::`, e.g.
//! `cargo test --test all round_robin::`.

mod util;

mod apps;
mod attack;
mod backpressure;
mod burst;
mod chaos;
mod cli;
mod compare;
mod demo;
mod embedded;
mod first_hour;
mod haproxy;
mod hostile;
mod library;
mod lifecycle;
mod lossless;
mod metrics;
mod modes;
mod node;
mod output;
mod privileges;
mod python_modes;
mod python_worker;
mod reload;
mod round_robin;
mod sched;
mod shutdown;
mod soak;
mod steer;
mod sticky;
mod supervision;
mod systemd;
mod upgrade;
mod web_stacks;
mod worker_env;
