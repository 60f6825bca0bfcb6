//! What the embedding program and the event loop exchange: the events
//! out ([`Event`], [`Events`]), the commands in ([`Handle`], and the
//! loop's `Control`), and the settings they name ([`Sched`], [`Ready`]).

use std::fmt;
use std::io;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::sched::Sched;
use super::stats::Stats;

/// Events the primary reports to the embedding program (Node's
/// `cluster.on('online' | 'exit' | 'message')`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    WorkerStarted {
        /// The worker's id (1, 2, ...: new at every start).
        id: u64,
        /// Its process id.
        pid: u32,
    },
    /// A worker said hello and now gets connections.
    WorkerReady {
        /// The worker's id.
        id: u64,
        /// Its process id.
        pid: u32,
    },
    /// A worker process exited.
    WorkerExited {
        /// The worker's id.
        id: u64,
        /// Its process id.
        pid: u32,
        /// How it exited.
        status: ExitStatus,
    },
    /// A worker sent a message (`WorkerListener::send`, or Node's
    /// `process.send`). While connections arrive together, a Node worker's
    /// channel is read once per turn of the primary's loop rather than on
    /// each line, so its message may come up to a millisecond later than on
    /// an idle primary.
    Message {
        /// The worker's id.
        id: u64,
        /// The message, as the worker sent it.
        data: Vec<u8>,
    },
}

/// What makes the primary count a worker ready: give it connections, let
/// a rolling reload move on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Ready {
    /// Its protocol HELLO (the default). In the kernel modes a program that
    /// never says hello is taken as ready after the hello timeout.
    #[default]
    Hello,
    /// `READY=1` on its `NOTIFY_SOCKET`, as systemd's `Type=notify`: for
    /// apps that already speak the notify protocol.
    Notify,
    /// As soon as it is started, for apps that speak neither.
    Start,
}

impl std::str::FromStr for Ready {
    type Err = String;
    fn from_str(s: &str) -> Result<Ready, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "hello" => Ok(Ready::Hello),
            "notify" => Ok(Ready::Notify),
            "start" => Ok(Ready::Start),
            _ => Err(format!("unknown readiness `{s}` (hello, notify or start)")),
        }
    }
}

/// Where the event loop answers a command that is waited for: the
/// outcome, or why there is none.
pub(crate) type Reply<T> = Option<Sender<Result<T, String>>>;

/// Why a worker was not removed: it is the last one.
pub(crate) const LAST_WORKER: &str = "not removing the last worker";

/// A command from a [`Handle`] to the event loop.
#[derive(Debug)]
pub(crate) enum Control {
    Shutdown,
    Reload(Reply<()>),
    AddWorker(Reply<u64>),
    RemoveWorker(Reply<()>),
    Stats(Sender<Stats>),
    Send { id: Option<u64>, data: Vec<u8> },
    SetSched(Sched),
    Upgrade(Reply<u32>),
}

/// Sends commands to a running primary from any thread. Cloneable.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: Sender<Control>,
    waker: Arc<mio::Waker>,
}

impl Handle {
    /// A handle that posts to `tx` and wakes the loop with `waker`.
    pub(crate) fn new(tx: Sender<Control>, waker: Arc<mio::Waker>) -> Handle {
        Handle { tx, waker }
    }

    fn post(&self, c: Control) -> io::Result<()> {
        self.tx
            .send(c)
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "the primary has stopped"))?;
        self.waker.wake()
    }

    /// Starts a graceful shutdown, as SIGTERM does.
    pub fn shutdown(&self) -> io::Result<()> {
        self.post(Control::Shutdown)
    }

    /// Starts a rolling reload, as SIGHUP does: each worker is replaced by
    /// a new one, one at a time, the old one stopping only once the new one
    /// is ready. [`Handle::reload_and_wait`] waits for it to complete.
    pub fn reload(&self) -> io::Result<()> {
        self.post(Control::Reload(None))
    }

    /// Adds a worker, as SIGTTIN does.
    pub fn add_worker(&self) -> io::Result<()> {
        self.post(Control::AddWorker(None))
    }

    /// Removes a worker gracefully, as SIGTTOU does; the last one stays.
    pub fn remove_worker(&self) -> io::Result<()> {
        self.post(Control::RemoveWorker(None))
    }

    /// A rolling reload, waited for: returns once every slot's new worker
    /// is ready (a reload asked for meanwhile, which starts it over, counts
    /// as the same).
    ///
    /// # Errors
    /// `TimedOut` after `timeout` (the reload goes on); `Interrupted` when
    /// the primary stops first; `NotConnected` when it has stopped.
    pub fn reload_and_wait(&self, timeout: Duration) -> io::Result<()> {
        self.wait(timeout, |tx| Control::Reload(Some(tx)))
    }

    /// Adds a worker and waits until it is ready; returns its id.
    ///
    /// # Errors
    /// As [`Handle::reload_and_wait`].
    pub fn add_worker_and_wait(&self, timeout: Duration) -> io::Result<u64> {
        self.wait(timeout, |tx| Control::AddWorker(Some(tx)))
    }

    /// Removes a worker and waits until it has exited (after its graceful
    /// stop).
    ///
    /// # Errors
    /// As [`Handle::reload_and_wait`], and `InvalidInput` when only one
    /// worker is left (the last one stays).
    pub fn remove_worker_and_wait(&self, timeout: Duration) -> io::Result<()> {
        self.wait(timeout, |tx| Control::RemoveWorker(Some(tx)))
    }

    /// Posts the command `make` builds around a reply channel and waits up
    /// to `timeout` for its outcome.
    fn wait<T>(
        &self,
        timeout: Duration,
        make: impl FnOnce(Sender<Result<T, String>>) -> Control,
    ) -> io::Result<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.post(make(tx))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(why)) if why == LAST_WORKER => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, why))
            }
            Ok(Err(why)) => Err(io::Error::new(io::ErrorKind::Interrupted, why)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("not done after {timeout:?}"),
            )),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the primary stopped first",
            )),
        }
    }

    /// Upgrades the primary itself, as SIGUSR2 does: starts the program
    /// at this process's path with its arguments, hands it every listening
    /// socket, and once its workers are ready stops this one's workers
    /// gracefully and returns (this primary's `run` then returns `Ok`).
    /// Returns the new primary's pid. No connection is refused or lost.
    ///
    /// # Errors
    /// `Interrupted` with the reason when the new primary exits first, is
    /// not ready within the upgrade timeout, or another upgrade is under
    /// way (this primary goes on serving); `TimedOut` after `timeout`.
    pub fn upgrade_and_wait(&self, timeout: Duration) -> io::Result<u32> {
        self.wait(timeout, |tx| Control::Upgrade(Some(tx)))
    }

    /// Switches the scheduling policy while running, between the
    /// primary-side modes (`rr`, `least-conn`, `p2c`), as `distributor
    /// ctl sched MODE` does. Connections already placed stay where
    /// they are; the next one is placed by the new policy. A switch to or
    /// from a kernel mode is refused (logged): who accepts cannot change.
    pub fn set_sched(&self, sched: Sched) -> io::Result<()> {
        self.post(Control::SetSched(sched))
    }

    /// The primary's current figures: per worker its state, connections
    /// taken, in flight and uptime; per slot its restarts; totals. The
    /// metrics endpoint ([`Builder::metrics`](crate::Builder::metrics)) serves the same figures.
    /// Waits at most a second for the event loop to answer.
    pub fn stats(&self) -> io::Result<Stats> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.post(Control::Stats(tx))?;
        rx.recv_timeout(Duration::from_secs(1))
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the primary did not answer"))
    }

    /// Sends an opaque message to worker `id` (Node's `worker.send`).
    /// A worker that is gone by then is skipped.
    pub fn send(&self, id: u64, data: Vec<u8>) -> io::Result<()> {
        self.check_size(&data)?;
        self.post(Control::Send { id: Some(id), data })
    }

    /// Sends an opaque message to every worker that is ready.
    pub fn broadcast(&self, data: Vec<u8>) -> io::Result<()> {
        self.check_size(&data)?;
        self.post(Control::Send { id: None, data })
    }

    fn check_size(&self, data: &[u8]) -> io::Result<()> {
        if data.len() > crate::protocol::MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                crate::protocol::PayloadTooLarge(data.len()),
            ));
        }
        Ok(())
    }
}

/// The [`Event`]s of one primary, from [`Primary::events`](crate::Primary::events): an iterator
/// (it ends once the primary has stopped), with bounded waits too.
#[derive(Debug)]
pub struct Events(pub(crate) Receiver<Event>);

/// Why no event came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventsError {
    /// None came in the time given.
    Timeout,
    /// The primary has stopped, and every event was taken.
    Stopped,
}

impl fmt::Display for EventsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventsError::Timeout => "no event in the time given",
            EventsError::Stopped => "the primary has stopped",
        })
    }
}

impl std::error::Error for EventsError {}

impl Events {
    /// The next event, waiting for it.
    ///
    /// # Errors
    /// [`EventsError::Stopped`] once the primary has stopped.
    pub fn recv(&self) -> Result<Event, EventsError> {
        self.0.recv().map_err(|_| EventsError::Stopped)
    }

    /// The next event, if one is waiting.
    ///
    /// # Errors
    /// [`EventsError::Timeout`] when none is, [`EventsError::Stopped`]
    /// once the primary has stopped.
    pub fn try_recv(&self) -> Result<Event, EventsError> {
        self.0.try_recv().map_err(|e| match e {
            crossbeam_channel::TryRecvError::Empty => EventsError::Timeout,
            crossbeam_channel::TryRecvError::Disconnected => EventsError::Stopped,
        })
    }

    /// The next event, waiting at most `timeout`.
    ///
    /// # Errors
    /// As [`Events::try_recv`].
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, EventsError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// The next event, waiting until `deadline` at most.
    ///
    /// # Errors
    /// As [`Events::try_recv`].
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Event, EventsError> {
        self.0.recv_deadline(deadline).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => EventsError::Timeout,
            crossbeam_channel::RecvTimeoutError::Disconnected => EventsError::Stopped,
        })
    }
}

impl Iterator for Events {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv().ok()
    }
}

impl Iterator for &Events {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv().ok()
    }
}
