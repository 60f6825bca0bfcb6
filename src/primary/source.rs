//! The event loop's mio tokens: what each one stands for, both ways, in
//! one place.
//!
//! Small numbers are the loop's own sources, then one token per worker
//! process alive (by its index, reused); far above any number of
//! processes, the servers' listeners, then the metrics endpoint's
//! listener and clients, and the workers' notify socket near the top
//! (`usize::MAX` itself is mio's).

use mio::Token;

use super::ids::{ServerIdx, WorkerIdx};

/// The most servers (listening addresses) one primary serves.
pub(crate) const MAX_SERVERS: usize = 64;
/// The most clients the metrics endpoint serves at once.
pub(crate) const MAX_METRICS_CLIENTS: usize = 64;

const CHANNELS: usize = 0;
const WAKER: usize = 1;
const SIGNALS: usize = 2;
const FIRST_WORKER: usize = 3;
const FIRST_SERVER: usize = usize::MAX / 4;
const METRICS_LISTENER: usize = usize::MAX / 2;
/// Connections peeked at for a sticky key, above the servers.
const FIRST_PEEK: usize = FIRST_SERVER + 4096;
const NOTIFY: usize = usize::MAX - 1;
const UPGRADE: usize = usize::MAX - 2;

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The workers' channels' own poll, when watched.
    Channels,
    /// The handle's waker: control messages wait.
    Waker,
    /// Signals.
    Signals,
    /// The channel of the worker at this index.
    Worker(WorkerIdx),
    /// The listener of server `k`.
    Listener(ServerIdx),
    /// The metrics endpoint's listener.
    MetricsListener,
    /// The metrics endpoint's client `k`.
    MetricsClient(usize),
    /// The workers' notify socket.
    Notify,
    /// The channel to the other primary of an upgrade.
    Upgrade,
    /// Connection `j` of the set peeked at for a sticky key.
    Peek(usize),
    /// None of the above.
    Unknown,
}

impl Source {
    pub fn token(self) -> Token {
        Token(match self {
            Source::Channels => CHANNELS,
            Source::Waker => WAKER,
            Source::Signals => SIGNALS,
            Source::Worker(i) => FIRST_WORKER + i.0,
            Source::Listener(k) => FIRST_SERVER + k.0,
            Source::MetricsListener => METRICS_LISTENER,
            Source::MetricsClient(k) => METRICS_LISTENER + 1 + k,
            Source::Notify => NOTIFY,
            Source::Upgrade => UPGRADE,
            Source::Peek(j) => FIRST_PEEK + j,
            Source::Unknown => usize::MAX,
        })
    }

    pub fn of(token: Token) -> Source {
        match token.0 {
            CHANNELS => Source::Channels,
            WAKER => Source::Waker,
            SIGNALS => Source::Signals,
            NOTIFY => Source::Notify,
            UPGRADE => Source::Upgrade,
            METRICS_LISTENER => Source::MetricsListener,
            t if (METRICS_LISTENER + 1..=METRICS_LISTENER + MAX_METRICS_CLIENTS).contains(&t) => {
                Source::MetricsClient(t - METRICS_LISTENER - 1)
            }
            t if (FIRST_PEEK..FIRST_PEEK + super::peek::MAX_PEEKING).contains(&t) => {
                Source::Peek(t - FIRST_PEEK)
            }
            t if (FIRST_SERVER..FIRST_SERVER + MAX_SERVERS).contains(&t) => {
                Source::Listener(ServerIdx(t - FIRST_SERVER))
            }
            t if (FIRST_WORKER..FIRST_SERVER).contains(&t) => {
                Source::Worker(WorkerIdx(t - FIRST_WORKER))
            }
            _ => Source::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_round_trips_and_ranges_do_not_meet() {
        let all = [
            Source::Channels,
            Source::Waker,
            Source::Signals,
            Source::Worker(WorkerIdx(0)),
            Source::Worker(WorkerIdx(100_000)),
            Source::Listener(ServerIdx(0)),
            Source::Listener(ServerIdx(MAX_SERVERS - 1)),
            Source::MetricsListener,
            Source::MetricsClient(0),
            Source::MetricsClient(MAX_METRICS_CLIENTS - 1),
            Source::Notify,
            Source::Upgrade,
            Source::Peek(0),
            Source::Peek(super::super::peek::MAX_PEEKING - 1),
        ];
        for s in all {
            assert_eq!(Source::of(s.token()), s);
            assert_ne!(s.token(), Token(usize::MAX), "mio's own");
        }
        assert_eq!(
            Source::of(Token(FIRST_SERVER + MAX_SERVERS)),
            Source::Unknown
        );
        assert_eq!(
            Source::of(Token(METRICS_LISTENER + 1 + MAX_METRICS_CLIENTS)),
            Source::Unknown
        );
    }
}
