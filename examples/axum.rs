//! An axum app as distributor workers: one binary that is both primary and
//! worker (like `examples/cluster.rs`). The worker serves an axum `Router`
//! with `axum::serve` on the worker listener and stops gracefully when the
//! primary says STOP (on SIGTERM, a rolling reload, scaling down).
//!
//! ```text
//! cargo run --features tokio --example axum -- --listen 127.0.0.1:8000 --workers 4
//! curl http://127.0.0.1:8000/        # Hello from axum worker 2 (pid 12345)
//! curl http://127.0.0.1:8000/json    # {"worker":3,"pid":12346,"stack":"axum"}
//! curl http://127.0.0.1:8000/slow    # the same greeting, after 1 s
//! ```
//!
//! `--sched shared` or `--sched reuseport` lets the kernel balance instead
//! (the workers accept by themselves); the worker code is the same.

use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use distributor::{Event, Primary, Sched, TokioWorkerListener};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

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

    let (stop_tx, stop_rx) = oneshot::channel();
    let listener = AxumListener {
        listener,
        stop: Some(stop_tx),
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop_rx.await;
            // A connection handed over just before STOP may not have had its
            // request read yet, and hyper closes such an "idle" connection
            // at once: give those a moment, as examples/cluster.rs does.
            tokio::time::sleep(Duration::from_secs(1)).await;
        })
        .await?;
    Ok(())
}

/// The worker listener as an axum listener. Accepts until the primary says
/// STOP (or is gone), then tells `stop` and accepts nothing more.
struct AxumListener {
    listener: TokioWorkerListener,
    stop: Option<oneshot::Sender<()>>,
}

impl axum::serve::Listener for AxumListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(conn) => return conn,
                // STOP, or the primary gone: shut down gracefully.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    if let Some(stop) = self.stop.take() {
                        let _ = stop.send(());
                    }
                    pending::<()>().await;
                }
                Err(e) => {
                    eprintln!("axum worker {}: accept: {e}", self.listener.id());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        // The primary owns the listening address (used by axum only for
        // `Serve::local_addr`).
        Err(io::ErrorKind::Unsupported.into())
    }
}
