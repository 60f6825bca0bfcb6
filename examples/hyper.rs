//! Plain hyper as distributor workers: one binary that is both primary and
//! worker (like `examples/cluster.rs`). The worker serves each connection
//! it is handed with hyper's HTTP/1 `serve_connection` (keep-alive on), and
//! stops gracefully when the primary says STOP.
//!
//! ```text
//! cargo run --features tokio --example hyper -- --listen 127.0.0.1:8000 --workers 4
//! curl http://127.0.0.1:8000/        # Hello from hyper worker 2 (pid 12345)
//! curl http://127.0.0.1:8000/slow    # the same, after 1 s
//! ```

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use distributor::{Event, Primary, Sched, TokioWorkerEvent, TokioWorkerListener};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if distributor::is_primary() {
        primary()
    } else {
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
    primary.run()?;
    let _ = printer.join();
    Ok(())
}

async fn worker() -> Result<(), Box<dyn std::error::Error>> {
    let mut listener = TokioWorkerListener::from_env()?;
    let id = listener.id();
    let graceful = GracefulShutdown::new();
    loop {
        match listener.next_event().await {
            Ok(TokioWorkerEvent::Connection(stream, _peer)) => {
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(move |r| answer(r, id)));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        eprintln!("hyper worker {id}: {e}");
                    }
                });
            }
            Ok(TokioWorkerEvent::Stop) => break,
            Ok(_) => {} // a message, or an event of a later version
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break, // the primary is gone
            Err(e) => return Err(e.into()),
        }
    }
    // Drain. A connection handed over just before STOP may not have had its
    // request read yet, and hyper closes such an "idle" connection at once:
    // give those a moment, as examples/cluster.rs does. Then idle
    // connections close, and requests in flight finish (bounded).
    tokio::time::sleep(Duration::from_secs(1)).await;
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("hyper worker {id}: connections still open after 10 s, exiting");
    }
    Ok(())
}

async fn answer(req: Request<Incoming>, id: u64) -> Result<Response<Full<Bytes>>, Infallible> {
    let hello = format!(
        "Hello from hyper worker {id} (pid {})\n",
        std::process::id()
    );
    let (status, body) = match req.uri().path() {
        "/" => (StatusCode::OK, hello),
        "/slow" => {
            println!("hyper worker {id}: /slow in flight");
            tokio::time::sleep(Duration::from_secs(1)).await;
            (StatusCode::OK, hello)
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut response = Response::new(Full::from(body));
    *response.status_mut() = status;
    Ok(response)
}
