//! An axum app as distributor workers: one binary that is both primary and
//! worker (like `examples/cluster.rs`). The worker serves an axum `Router`
//! with `axum::serve` on the worker listener and stops gracefully when the
//! primary says STOP (on SIGTERM, a rolling reload, scaling down).
//!
//! The worker listener is an axum `Listener` (the `axum` feature), so
//! serving is `axum::serve(listener, app)`.
//!
//! ```text
//! cargo run --features axum --example axum -- --listen 127.0.0.1:8000 --workers 4
//! curl http://127.0.0.1:8000/        # Hello from axum worker 2 (pid 12345)
//! curl http://127.0.0.1:8000/json    # {"worker":3,"pid":12346,"stack":"axum"}
//! curl http://127.0.0.1:8000/slow    # the same greeting, after 1 s
//! ```
//!
//! `--sched shared` or `--sched reuseport` lets the kernel balance instead
//! (the workers accept by themselves); the worker code is the same.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use distributor::{Event, Primary, Sched, TokioWorkerListener};
use serde::Serialize;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if distributor::is_primary() {
        primary()
    } else {
        // The primary is plain threads; each worker runs a tokio runtime.
        tokio::runtime::Runtime::new()?.block_on(worker())
    }
}

/// `--listen ADDR --workers N --sched rr|shared|reuseport`
fn primary() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: SocketAddr = "127.0.0.1:8000".parse()?;
    let mut workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut sched = Sched::RoundRobin;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--listen" => listen = value.parse()?,
            "--workers" => workers = value.parse()?,
            "--sched" => sched = value.parse()?,
            _ => return Err(format!("unknown option {arg}").into()),
        }
    }
    let mut primary = Primary::builder()
        .workers(workers)
        .listen(listen)
        .sched(sched)
        .build()?;
    println!("listening on {} ({sched})", primary.local_addr());
    let events = primary.events();
    let printer = std::thread::spawn(move || {
        for event in events {
            match event {
                Event::WorkerReady { id, pid } => println!("worker {id} ready (pid {pid})"),
                Event::WorkerExited { id, pid, status } => {
                    println!("worker {id} (pid {pid}) exited: {status}")
                }
                _ => {}
            }
        }
    });
    primary.run()?; // until SIGTERM/SIGINT: the workers get STOP
    let _ = printer.join(); // the last events (the events end with `run`)
    Ok(())
}

#[derive(Serialize)]
struct Hello {
    worker: u64,
    pid: u32,
    stack: &'static str,
}

async fn worker() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TokioWorkerListener::from_env()?;
    let id = listener.id();
    let hello = move || format!("Hello from axum worker {id} (pid {})\n", std::process::id());
    let app = Router::new()
        .route("/", get(move || async move { hello() }))
        .route(
            "/json",
            get(move || async move {
                Json(Hello {
                    worker: id,
                    pid: std::process::id(),
                    stack: "axum",
                })
            }),
        )
        .route(
            "/slow",
            get(move || async move {
                println!("axum worker {id}: /slow in flight");
                tokio::time::sleep(Duration::from_secs(1)).await;
                hello()
            }),
        );

    // STOP (SIGTERM, a rolling reload, scaling down) ends the serving
    // gracefully; the grace lets a connection handed over just before STOP
    // have its request read, which hyper would otherwise close unread.
    let stopped = listener.stopped(Duration::from_secs(1));
    axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await?;
    Ok(())
}
