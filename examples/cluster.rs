//! One binary that is both primary and worker, like Node's
//!
//! ```js
//! if (cluster.isPrimary) {
//!   for (let i = 0; i < numCPUs; i++) cluster.fork();
//!   cluster.on('exit', (worker, code, signal) => console.log(`worker ${worker.process.pid} died`));
//! } else {
//!   http.createServer((req, res) => { res.writeHead(200); res.end('hello world\n'); }).listen(8000);
//! }
//! ```
//!
//! The primary re-executes this program for each worker (as Node's
//! `cluster.fork()` does); the worker knows itself by `distributor::is_worker`.
//! Messages go both ways: the primary greets each worker when it is ready
//! (`worker.send`), and each worker tells the primary about every connection
//! it takes (`process.send`).
//!
//! ```text
//! cargo run --example cluster -- --listen 127.0.0.1:8000 --workers 4
//! curl http://127.0.0.1:8000/     # Howdy from worker 2 (pid 12345)
//! ```
//!
//! With `--recycle-after N` each worker recycles itself after N connections
//! (as apps do against a leak): it asks the primary for its successor
//! (`WorkerListener::recycle`) and serves on until the primary, once the
//! successor is ready, sends it STOP; no capacity is lost meanwhile.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use distributor::{Drain, Event, Primary, WorkerEvent, WorkerListener};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if distributor::is_primary() {
        primary()
    } else {
        worker()
    }
}

fn primary() -> Result<(), Box<dyn std::error::Error>> {
    let mut listen: SocketAddr = "127.0.0.1:8000".parse()?;
    let mut workers = thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--listen" => listen = value.parse()?,
            "--workers" => workers = value.parse()?,
            // The workers read it (they run with the same arguments).
            "--recycle-after" => drop(value.parse::<u64>()?),
            _ => return Err(format!("unknown option {arg}").into()),
        }
    }
    let mut primary = Primary::builder().workers(workers).listen(listen).build()?;
    println!("listening on {}", primary.local_addr());
    let events = primary.events();
    let handle = primary.handle();
    thread::spawn(move || {
        for event in events {
            match event {
                Event::WorkerReady { id, .. } => {
                    let _ = handle.send(id, b"greeting=Howdy".to_vec());
                }
                Event::Message { id, data } => {
                    println!("worker {id} says: {}", String::from_utf8_lossy(&data));
                }
                Event::WorkerExited { id, pid, status } if !status.success() => {
                    println!("worker {id} (pid {pid}) died ({status})");
                }
                Event::WorkerExited { id, pid, .. } => println!("worker {id} (pid {pid}) exited"),
                _ => {} // a worker started, or an event of a later version
            }
        }
    });
    primary.run()?;
    Ok(())
}

/// What a worker's serving threads share.
#[derive(Default)]
struct Shared {
    greeting: Mutex<String>,
    /// Requests between their first byte and their response.
    in_flight: Drain,
    stopping: AtomicBool,
}

fn worker() -> Result<(), Box<dyn std::error::Error>> {
    let mut listener = WorkerListener::from_env()?;
    let id = listener.id();
    let shared = Arc::new(Shared::default());
    *shared.greeting.lock().unwrap() = "Hello".into();
    let args: Vec<String> = std::env::args().collect();
    let recycle_after = args
        .iter()
        .position(|a| a == "--recycle-after")
        .and_then(|i| args.get(i + 1)?.parse::<u64>().ok());
    let mut taken = 0;
    loop {
        match listener.next_event() {
            Ok(WorkerEvent::Connection(stream, peer)) => {
                taken += 1;
                if Some(taken) == recycle_after {
                    listener.recycle()?;
                }
                listener.send(format!("took a connection from {peer}").as_bytes())?;
                let shared = Arc::clone(&shared);
                thread::spawn(move || serve(stream, id, &shared));
            }
            Ok(WorkerEvent::Message(m)) => {
                if let Some(g) = String::from_utf8_lossy(&m).strip_prefix("greeting=") {
                    *shared.greeting.lock().unwrap() = g.to_string();
                }
            }
            Ok(WorkerEvent::Stop) => {
                // Drain: requests from now on get `Connection: close`; an idle
                // kept-alive client may still send one for a moment; then
                // wait (bounded) for the requests in flight.
                shared.stopping.store(true, Ordering::SeqCst);
                thread::sleep(Duration::from_secs(1));
                shared.in_flight.wait(Duration::from_secs(10));
                return Ok(());
            }
            Ok(_) => {} // an event of a later version
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A minimal HTTP/1.1 responder: keep-alive unless the client says close
/// or the worker is stopping.
fn serve(stream: TcpStream, id: u64, shared: &Shared) {
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request = shared.in_flight.track();
        let answered = answer(&mut reader, &mut writer, id, shared);
        drop(request);
        if !answered {
            // The FIN now, from this worker: the primary may still hold its
            // copy of the connection, and a drop alone would leave the FIN
            // (and the TCP teardown) to the primary's close of that copy.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            return;
        }
    }
}

/// Reads the rest of one request head and answers it; false to close.
fn answer(
    reader: &mut BufReader<&TcpStream>,
    writer: &mut &TcpStream,
    id: u64,
    shared: &Shared,
) -> bool {
    let mut close = false;
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return false,
            Ok(_) if header.trim().is_empty() => break,
            Ok(_) => close |= header.to_ascii_lowercase().starts_with("connection: close"),
        }
    }
    close |= shared.stopping.load(Ordering::SeqCst);
    let body = format!(
        "{} from worker {id} (pid {})\n",
        shared.greeting.lock().unwrap(),
        std::process::id()
    );
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
        body.len(),
        if close { "close" } else { "keep-alive" }
    );
    writer.write_all(response.as_bytes()).is_ok() && !close
}
