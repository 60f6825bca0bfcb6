//! Worker output: each line a worker writes to stdout or stderr comes out
//! on the primary's stdout or stderr prefixed with `[worker ID] `, whole.
//!
//! A relay thread owns the read ends of every worker's pipes, on its own
//! mio poll, so the primary's event loop never waits on a terminal or a
//! slow log pipe. It writes each line with one `write_all` of the whole
//! line, so lines from different workers (and the primary's own log lines)
//! never interleave within a line. A partial line is completed with a
//! newline when its worker's pipe closes; a line longer than
//! [`MAX_LINE`] is cut into pieces of that size, each prefixed.
//!
//! If the primary's own output blocks (a stopped terminal, a full pipe),
//! the relay waits there, and the workers' pipes fill until their writes
//! wait too: the same backpressure as a worker writing to that terminal
//! itself, and the primary's loop is not involved.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

/// The longest line written whole; longer ones are cut.
pub const MAX_LINE: usize = 64 * 1024;

const WAKER: Token = Token(usize::MAX);

/// Which of the primary's outputs a pipe goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

enum Command {
    Add {
        worker: u64,
        stream: Stream,
        pipe: OwnedFd,
    },
    /// No more pipes will come: finish those open (bounded), then stop.
    Finish,
}

struct Pipe {
    file: std::fs::File,
    stream: Stream,
    prefix: String,
    partial: Vec<u8>,
}

/// The handle the event loop keeps: sends pipes to the relay thread.
pub(crate) struct Relay {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

/// How long the relay keeps reading pipes after the primary is done.
const FINISH_GRACE: Duration = Duration::from_secs(2);

impl Relay {
    pub(crate) fn start() -> io::Result<Relay> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = thread::Builder::new()
            .name("distributor-output".into())
            .spawn(move || relay(poll, rx))?;
        Ok(Relay {
            tx,
            waker,
            thread: Some(thread),
        })
    }

    /// Hands a worker's stdout or stderr pipe to the relay.
    pub(crate) fn add(&self, worker: u64, stream: Stream, pipe: OwnedFd) {
        if self
            .tx
            .send(Command::Add {
                worker,
                stream,
                pipe,
            })
            .is_ok()
        {
            let _ = self.waker.wake();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Finish);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay(mut poll: Poll, rx: Receiver<Command>) {
    let mut pipes: HashMap<usize, Pipe> = HashMap::new();
    let mut next = 0usize;
    let mut finish_by: Option<Instant> = None;
    let mut events = Events::with_capacity(64);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if finish_by.is_some_and(|t| pipes.is_empty() || Instant::now() >= t) {
            for pipe in pipes.values_mut() {
                flush_partial(pipe);
            }
            return;
        }
        let timeout = finish_by.map(|t| t.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for event in events.iter() {
            let token = event.token();
            if token == WAKER {
                continue;
            }
            let Some(pipe) = pipes.get_mut(&token.0) else {
                continue;
            };
            if !drain(pipe, &mut chunk) {
                flush_partial(pipe);
                let _ = poll
                    .registry()
                    .deregister(&mut SourceFd(&pipe.file.as_raw_fd()));
                pipes.remove(&token.0);
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Command::Add {
                    worker,
                    stream,
                    pipe,
                } => {
                    let file = std::fs::File::from(pipe);
                    let token = Token(next);
                    next += 1;
                    if poll
                        .registry()
                        .register(&mut SourceFd(&file.as_raw_fd()), token, Interest::READABLE)
                        .is_ok()
                    {
                        pipes.insert(
                            token.0,
                            Pipe {
                                file,
                                stream,
                                prefix: format!("[worker {worker}] "),
                                partial: Vec::new(),
                            },
                        );
                    }
                }
                Command::Finish => finish_by = Some(Instant::now() + FINISH_GRACE),
            }
        }
    }
}

/// Reads what the pipe has and writes every complete line; false at EOF
/// or on an error.
fn drain(pipe: &mut Pipe, chunk: &mut [u8]) -> bool {
    loop {
        match pipe.file.read(chunk) {
            Ok(0) => return false,
            Ok(n) => {
                pipe.partial.extend_from_slice(&chunk[..n]);
                emit_lines(pipe);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn emit_lines(pipe: &mut Pipe) {
    let mut start = 0;
    while let Some(pos) = pipe.partial[start..].iter().position(|&b| b == b'\n') {
        let end = start + pos + 1;
        write_line(pipe.stream, &pipe.prefix, &pipe.partial[start..end]);
        start = end;
    }
    while pipe.partial.len() - start >= MAX_LINE {
        let end = start + MAX_LINE;
        let mut piece = pipe.partial[start..end].to_vec();
        piece.push(b'\n');
        write_line(pipe.stream, &pipe.prefix, &piece);
        start = end;
    }
    pipe.partial.drain(..start);
}

fn flush_partial(pipe: &mut Pipe) {
    if !pipe.partial.is_empty() {
        let mut line = std::mem::take(&mut pipe.partial);
        line.push(b'\n');
        write_line(pipe.stream, &pipe.prefix, &line);
    }
}

/// Writes `prefix` + `line` (which ends with a newline) in one call.
fn write_line(stream: Stream, prefix: &str, line: &[u8]) {
    let mut buf = Vec::with_capacity(prefix.len() + line.len());
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(line);
    let _ = match stream {
        Stream::Stdout => io::stdout().lock().write_all(&buf),
        Stream::Stderr => io::stderr().lock().write_all(&buf),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_lines_are_emitted_and_the_rest_kept() {
        let (r, _w) = std::io::pipe().expect("pipe");
        let mut pipe = Pipe {
            file: std::fs::File::from(OwnedFd::from(r)),
            stream: Stream::Stderr,
            prefix: "[worker 1] ".into(),
            partial: b"one\ntwo\nthr".to_vec(),
        };
        emit_lines(&mut pipe);
        assert_eq!(pipe.partial, b"thr");
        pipe.partial = vec![b'x'; MAX_LINE * 2 + 5];
        emit_lines(&mut pipe);
        assert_eq!(
            pipe.partial.len(),
            5,
            "long lines are cut into MAX_LINE pieces"
        );
    }
}
