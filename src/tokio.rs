//! The worker side on a tokio runtime (the `tokio` feature):
//! [`TokioWorkerListener`] accepts connections as `tokio::net::TcpStream`s,
//! so axum, hyper or any tokio server runs as a worker.
//!
//! ```no_run
//! use distributor::tokio::{TokioWorkerEvent, TokioWorkerListener};
//! use tokio::io::AsyncWriteExt;
//!
//! # async fn worker() -> Result<(), Box<dyn std::error::Error>> {
//! // Inside a tokio runtime, in a process started by a distributor primary.
//! let mut listener = TokioWorkerListener::from_env()?;
//! loop {
//!     match listener.next_event().await? {
//!         TokioWorkerEvent::Connection(mut stream, _peer) => {
//!             tokio::spawn(async move {
//!                 let _ = stream
//!                     .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi\n")
//!                     .await;
//!             });
//!         }
//!         TokioWorkerEvent::Message(m) => println!("the primary says {m:?}"),
//!         // Graceful stop: no more connections will come; finish and exit.
//!         TokioWorkerEvent::Stop => break,
//!         _ => {} // an event of a later version
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! With the `axum` feature the listener is an `axum::serve::Listener`, so
//! an axum app serves on it in one line, stopping gracefully on STOP:
//!
//! ```ignore
//! let listener = TokioWorkerListener::from_env()?;
//! let stopped = listener.stopped(Duration::from_secs(1));
//! axum::serve(listener, app).with_graceful_shutdown(stopped).await?;
//! ```
//!
//! (`examples/axum.rs`; `examples/hyper.rs` does the same with plain
//! hyper.)
//!
//! # Readiness
//!
//! The listener reads its channel to the primary, and in the kernel
//! balancing modes (`--sched shared|reuseport`) it also accepts on the
//! listening socket it inherited. Both fds are registered with the runtime
//! (each through a duplicate fd, close-on-exec, in its own
//! [`AsyncFd`]); an operation is tried, and readiness is cleared only for
//! the fds that were ready before an attempt that found nothing, so no
//! wake-up is lost. The same worker code serves in every mode.
//!
//! # Stopping
//!
//! On STOP, `next_event` gives [`TokioWorkerEvent::Stop`] and `accept`
//! fails with `ConnectionAborted`, once the connections handed over before
//! it have been taken; [`TokioWorkerListener::stopped`] resolves then.
//! hyper (and so axum) closes at once, on graceful shutdown, a connection
//! whose request it has not read yet: give `stopped` a grace (a second),
//! so a connection handed over just before STOP is still answered.
//!
//! # Liveness
//!
//! As with [`WorkerListener`], the primary's heartbeats are answered while
//! `accept` or `next_event` is being awaited: keep one of them awaited
//! (as a serving loop does), or the primary takes the worker for hung
//! after its worker timeout.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::task::{Context, Poll};

use ::tokio::io::Interest;
use ::tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use ::tokio::net::TcpStream;

use crate::sys;
use crate::worker::{ACCEPT_RETRY, WorkerError, WorkerEvent, WorkerListener};

/// Something the primary sent, as returned by
/// [`TokioWorkerListener::next_event`]: [`WorkerEvent`] with a tokio stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum TokioWorkerEvent {
    /// A connection, already acknowledged, with its peer's address.
    Connection(TcpStream, SocketAddr),
    /// An opaque message from the primary's application.
    Message(Vec<u8>),
    /// Graceful stop: no more connections will come; finish and exit.
    Stop,
}

/// A [`WorkerListener`] driven by the tokio runtime: `accept` and
/// `next_event` are `async` and give `tokio::net::TcpStream`s.
#[derive(Debug)]
pub struct TokioWorkerListener {
    inner: WorkerListener,
    /// Readiness of the channel, through a duplicate of its fd.
    channel: AsyncFd<OwnedFd>,
    /// Kernel modes: readiness of the inherited listening socket.
    listener: Option<AsyncFd<OwnedFd>>,
    /// Set once the primary has asked this worker to stop (or is gone).
    stop: ::tokio::sync::watch::Sender<bool>,
    /// Kernel modes, near the fd limit: when to try accepting again.
    retry: Option<std::pin::Pin<Box<::tokio::time::Sleep>>>,
    /// Kernel modes, idle with an unreported count: when to report it
    /// ([`WorkerListener::report_timeout`]).
    report: Option<std::pin::Pin<Box<::tokio::time::Sleep>>>,
}

impl TokioWorkerListener {
    /// [`WorkerListener::from_env`], then [`TokioWorkerListener::new`].
    ///
    /// # Errors
    /// As [`WorkerListener::from_env`]; [`WorkerError::Io`] when the fds
    /// cannot be registered with the runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime with I/O enabled.
    pub fn from_env() -> Result<TokioWorkerListener, WorkerError> {
        TokioWorkerListener::new(WorkerListener::from_env()?).map_err(WorkerError::Io)
    }

    /// Takes `listener`, sets it non-blocking and registers its fds (the
    /// channel, and the inherited listening socket in a kernel mode) with
    /// the current runtime, for reading.
    ///
    /// # Errors
    /// When an fd cannot be duplicated or registered.
    ///
    /// # Panics
    /// Outside a tokio runtime with I/O enabled.
    pub fn new(mut listener: WorkerListener) -> io::Result<TokioWorkerListener> {
        listener.set_nonblocking(true);
        let channel = register(listener.as_fd().try_clone_to_owned()?)?;
        let accepting = match listener.listener_fd() {
            Some(fd) => Some(register(fd.try_clone_to_owned()?)?),
            None => None,
        };
        Ok(TokioWorkerListener {
            inner: listener,
            channel,
            listener: accepting,
            stop: ::tokio::sync::watch::Sender::new(false),
            retry: None,
            report: None,
        })
    }

    /// A future that resolves once the primary has asked this worker to
    /// stop (STOP, read by `accept` or `next_event`) or is gone, and then
    /// `grace` has passed: for a server's graceful shutdown
    /// (`axum::serve(...).with_graceful_shutdown(listener.stopped(...))`).
    /// Independent of the listener: take it before the listener moves.
    pub fn stopped(&self, grace: std::time::Duration) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.stop.subscribe();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
            ::tokio::time::sleep(grace).await;
        }
    }

    /// This worker's id (see [`WorkerListener::id`]).
    pub fn id(&self) -> u64 {
        self.inner.id()
    }

    /// Tells the primary this worker is ready; called by the first
    /// `accept` or `next_event` if not before (see
    /// [`WorkerListener::ready`]).
    pub fn ready(&mut self) -> io::Result<()> {
        self.inner.ready()
    }

    /// Whether the primary has asked this worker to stop.
    pub fn is_stopping(&self) -> bool {
        self.inner.is_stopping()
    }

    /// Whether the worker accepts by itself (a kernel balancing mode).
    pub fn accepts_itself(&self) -> bool {
        self.inner.accepts_itself()
    }

    /// Sends an opaque message to the primary's application (see
    /// [`WorkerListener::send`]). The send does not await: it blocks the
    /// thread only while the primary's receive buffer is full.
    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.inner.send(payload)
    }

    /// Asks the primary to replace this worker once its successor is
    /// ready (see [`WorkerListener::recycle`]); serve until STOP.
    pub fn recycle(&mut self) -> io::Result<()> {
        self.inner.recycle()
    }

    /// A user message that `accept` set aside, oldest first.
    pub fn take_message(&mut self) -> Option<Vec<u8>> {
        self.inner.take_message()
    }

    /// The listener this wraps, for what this type does not offer.
    pub fn get_ref(&self) -> &WorkerListener {
        &self.inner
    }

    /// The next thing the primary sent: a connection, a message or stop.
    /// Cancel safe: an event is either returned or kept for the next call.
    ///
    /// # Errors
    /// As [`WorkerListener::next_event`] (never `WouldBlock`):
    /// `UnexpectedEof` once the primary is gone; and when a stream cannot
    /// be registered with the runtime (that connection is closed).
    pub async fn next_event(&mut self) -> io::Result<TokioWorkerEvent> {
        let event = poll_fn(|cx| self.poll_op(cx, WorkerListener::next_event)).await?;
        Ok(match event {
            WorkerEvent::Connection(stream, peer) => {
                TokioWorkerEvent::Connection(into_tokio(stream)?, peer)
            }
            WorkerEvent::Message(m) => TokioWorkerEvent::Message(m),
            WorkerEvent::Stop => TokioWorkerEvent::Stop,
        })
    }

    /// Accepts the next connection, like `tokio::net::TcpListener::accept`.
    /// User messages that arrive meanwhile are kept for
    /// [`TokioWorkerListener::take_message`]. Cancel safe.
    ///
    /// # Errors
    /// As [`WorkerListener::accept`] (never `WouldBlock`):
    /// `ConnectionAborted` once the primary has asked this worker to stop,
    /// `UnexpectedEof` once it is gone.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = poll_fn(|cx| self.poll_op(cx, WorkerListener::accept)).await?;
        Ok((into_tokio(stream)?, peer))
    }

    /// Tries `op` on the non-blocking listener until it gives something
    /// other than `WouldBlock`, waiting for either fd to be readable.
    ///
    /// The readiness guards are taken before the attempt, and cleared only
    /// after the attempt found nothing (tokio ignores the clear if an
    /// event came in between); when neither fd is ready, the attempt is
    /// still made once (events may be queued already, a message may carry
    /// several connections) before waiting, with both wakers registered.
    fn poll_op<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(&mut WorkerListener) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            let mut channel = match poll_guard(&self.channel, cx) {
                Ok(guard) => guard,
                Err(e) => return Poll::Ready(Err(e)),
            };
            // After stop the listener accepts no more: do not wait on it.
            let mut listener = match &self.listener {
                Some(fd) if !self.inner.is_stopping() => match poll_guard(fd, cx) {
                    Ok(guard) => guard,
                    Err(e) => return Poll::Ready(Err(e)),
                },
                _ => None,
            };
            let result = op(&mut self.inner);
            if self.inner.is_stopping() {
                self.stop.send_replace(true);
            }
            match result {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Accepting paused near the fd limit: no readiness may
                    // come for what is queued, so look again in a while.
                    if self.inner.accept_paused() && fired(&mut self.retry, ACCEPT_RETRY, cx) {
                        continue;
                    }
                    // Idle with an unreported count: report it when due.
                    if let Err(e) = self.inner.flush_reports() {
                        return Poll::Ready(Err(e));
                    }
                    match self.inner.report_timeout() {
                        Some(due) if fired(&mut self.report, due, cx) => continue,
                        Some(_) => {}
                        None => self.report = None,
                    }
                    if channel.is_none() && listener.is_none() {
                        return Poll::Pending;
                    }
                    for guard in [&mut channel, &mut listener].into_iter().flatten() {
                        guard.clear_ready();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.stop.send_replace(true);
                    return Poll::Ready(Err(e));
                }
                result => return Poll::Ready(result),
            }
        }
    }
}

/// Polls the timer in `slot`, started for `after` if there is none; true
/// (and the slot emptied) once it has fired, else it wakes `cx` then.
fn fired(
    slot: &mut Option<std::pin::Pin<Box<::tokio::time::Sleep>>>,
    after: std::time::Duration,
    cx: &mut Context<'_>,
) -> bool {
    let timer = slot.get_or_insert_with(|| Box::pin(::tokio::time::sleep(after)));
    if timer.as_mut().poll(cx).is_ready() {
        *slot = None;
        true
    } else {
        false
    }
}

/// `axum::serve(listener, app)` (the `axum` feature): connections until the
/// primary says STOP; then [`TokioWorkerListener::stopped`] resolves and
/// `accept` waits forever, for axum's graceful shutdown to end the serving.
#[cfg(feature = "axum")]
impl axum::serve::Listener for TokioWorkerListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match TokioWorkerListener::accept(self).await {
                Ok(conn) => return conn,
                // STOP, or the primary gone: `stopped` is resolving.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    std::future::pending::<()>().await;
                }
                // One connection that could not be registered: the next.
                Err(e) => {
                    tracing::warn!("worker {}: accept: {e}", self.id());
                    ::tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// The listening socket's address in a kernel mode; in the others the
    /// primary owns the listening address (`Unsupported`).
    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.inner.listener_fd() {
            Some(fd) => socket2::SockRef::from(&fd)
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::ErrorKind::Unsupported.into()),
            None => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    sys::async_fd(fd, Interest::READABLE)
}

/// The read-readiness guard of `fd` if it is ready now; `None` (the waker
/// registered) if not.
fn poll_guard<'a>(
    fd: &'a AsyncFd<OwnedFd>,
    cx: &mut Context<'_>,
) -> io::Result<Option<AsyncFdReadyGuard<'a, OwnedFd>>> {
    match fd.poll_read_ready(cx) {
        Poll::Ready(guard) => guard.map(Some),
        Poll::Pending => Ok(None),
    }
}

fn into_tokio(stream: std::net::TcpStream) -> io::Result<TcpStream> {
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}
