//! The lines a child process writes to a pipe, collected by a thread.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::DEADLINE;

#[derive(Debug, Default)]
struct LinesState {
    lines: Vec<String>,
    closed: bool,
}

/// The lines a child process writes to one pipe, collected by a thread as
/// they come. Cloneable; waits on it are bounded.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    shared: Arc<(Mutex<LinesState>, Condvar)>,
}

impl Lines {
    /// Starts a thread that reads `reader` line by line until end of file.
    /// (End of file comes once every process holding the pipe is gone,
    /// workers included, since they inherit the primary's stdout/stderr.)
    pub fn collect(reader: impl Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let shared = Arc::clone(&lines.shared);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                        let (lock, cvar) = &*shared;
                        lock.lock().unwrap().lines.push(line);
                        cvar.notify_all();
                    }
                }
            }
            let (lock, cvar) = &*shared;
            lock.lock().unwrap().closed = true;
            cvar.notify_all();
        });
        lines
    }

    /// Every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().lines.clone()
    }

    /// Every line so far, joined, for failure messages.
    pub fn dump(&self) -> String {
        self.snapshot().join("\n")
    }

    /// Waits up to `timeout` for the end of the pipe (every writer gone);
    /// returns whether it came.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.shared;
        let mut state = lock.lock().unwrap();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
        true
    }

    /// How many lines so far.
    pub fn len(&self) -> usize {
        self.shared.0.lock().unwrap().lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a line so far contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.count(needle) > 0
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.count_where(|l| l.contains(needle))
    }

    pub fn count_where(&self, pred: impl Fn(&str) -> bool) -> usize {
        let state = self.shared.0.lock().unwrap();
        state.lines.iter().filter(|l| pred(l)).count()
    }

    /// The first line at index `from` or later that satisfies `pred`, and
    /// its index; waits up to `timeout` for it, panicking with `what` and
    /// every line seen when it does not come. `pred` runs with the lines
    /// locked: it must not call methods of this `Lines` (that deadlocks).
    pub fn wait_from(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        match self.try_wait_from(from, timeout, pred) {
            Some(found) => found,
            None => panic!(
                "timed out after {timeout:?} waiting for {what}; lines so far:\n{}",
                self.dump()
            ),
        }
    }

    /// As [`Lines::wait_from`], but `None` on timeout (or when the pipe
    /// closed without such a line).
    pub fn try_wait_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.shared;
        let mut state = lock.lock().unwrap();
        let mut next = from;
        loop {
            while next < state.lines.len() {
                if pred(&state.lines[next]) {
                    return Some((next, state.lines[next].clone()));
                }
                next += 1;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// The first line containing `needle`, waiting up to [`DEADLINE`].
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_from(0, &format!("a line containing {needle:?}"), DEADLINE, |l| {
            l.contains(needle)
        })
        .1
    }

    /// The first line at `from` or later containing `needle`, waiting up to
    /// [`DEADLINE`].
    pub fn wait_for_from(&self, from: usize, needle: &str) -> (usize, String) {
        self.wait_from(
            from,
            &format!("a line containing {needle:?} (from line {from})"),
            DEADLINE,
            |l| l.contains(needle),
        )
    }
}
