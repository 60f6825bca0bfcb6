//! The worker protocol, version 1: message layouts, encoding and decoding.
//!
//! Every message is one datagram on a `SOCK_SEQPACKET` socketpair (the
//! *channel*), at most [`MAX_MESSAGE`] bytes. Byte 0 is the message type; all
//! integers are big-endian. Connection fds ride on the same datagram as
//! `SCM_RIGHTS`. `docs/PROTOCOL.md` is the reference for implementers in other
//! languages; this module is the reference implementation.
//!
//! Decoding follows a cheap-check-then-parse shape: [`ToWorker::decode`] and
//! [`ToPrimary::decode`] look at the type byte and the length before they
//! build anything, and return a typed [`DecodeError`] for anything that does
//! not fit. Nothing here allocates except the payload of a user message.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// The largest datagram either side sends or accepts, in bytes.
pub const MAX_MESSAGE: usize = 65536;
/// The largest number of fds one CONNECTION message may carry.
pub const MAX_FDS: usize = 64;
/// The largest payload of a user message (`MAX_MESSAGE` less the type byte).
pub const MAX_PAYLOAD: usize = MAX_MESSAGE - 1;

/// Environment variable naming the worker's end of the channel.
pub const ENV_FD: &str = "DISTRIBUTOR_FD";
/// Environment variable with the protocol version.
pub const ENV_PROTOCOL: &str = "DISTRIBUTOR_PROTOCOL";
/// Environment variable with the worker's id (1, 2, 3, ...).
pub const ENV_WORKER_ID: &str = "DISTRIBUTOR_WORKER_ID";
/// Environment variable with the worker's slot (1, 2, ... up to the number
/// of workers): unlike the id, the same for every worker that takes the
/// slot's place (restarts, reloads, recycling). `NODE_APP_INSTANCE` holds
/// the same slot from 0, as PM2 sets it.
pub const ENV_SLOT: &str = "DISTRIBUTOR_SLOT";
/// Environment variable with the primary's worker timeout in milliseconds
/// (`0`: no hang detection): a worker that sends nothing this long is
/// taken for hung.
pub const ENV_WORKER_TIMEOUT: &str = "DISTRIBUTOR_WORKER_TIMEOUT_MS";
/// Environment variable with the primary's shutdown timeout in
/// milliseconds: after STOP a worker gets `SIGTERM` at half of it and
/// `SIGKILL` at the end.
pub const ENV_SHUTDOWN_TIMEOUT: &str = "DISTRIBUTOR_SHUTDOWN_TIMEOUT_MS";
/// Environment variable saying whether the primary reads DONE reports:
/// `0` in the kernel balancing modes, where no policy uses them (a worker
/// then sends none); `1` otherwise. Absent means `1`.
pub const ENV_REPORT_FINISHED: &str = "DISTRIBUTOR_REPORT_FINISHED";

/// Message types, primary to worker.
pub(crate) const T_CONNECTION: u8 = 0x01;
pub(crate) const T_STOP: u8 = 0x02;
pub(crate) const T_MESSAGE_TO_WORKER: u8 = 0x03;
pub(crate) const T_PING: u8 = 0x04;
/// Message types, worker to primary.
pub(crate) const T_HELLO: u8 = 0x80;
pub(crate) const T_ACK: u8 = 0x81;
pub(crate) const T_STATS: u8 = 0x82;
pub(crate) const T_MESSAGE_TO_PRIMARY: u8 = 0x83;
pub(crate) const T_PONG: u8 = 0x84;
pub(crate) const T_DONE: u8 = 0x85;
pub(crate) const T_RECYCLE: u8 = 0x86;
pub(crate) const T_RETURN: u8 = 0x87;

const ENTRY_V4: usize = 8 + 1 + 2 + 4;
const ENTRY_V6: usize = 8 + 1 + 2 + 16;

/// Why a datagram is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The datagram is empty.
    Empty,
    /// The type byte is not one this side accepts.
    UnknownType(u8),
    /// The body is shorter or longer than its type requires.
    BadLength {
        /// The message type.
        kind: &'static str,
        /// The body's length.
        len: usize,
    },
    /// An address family other than 4 or 6.
    BadFamily(u8),
    /// The number of entries differs from the number of fds that came with them.
    FdCount {
        /// Entries in the message.
        entries: usize,
        /// Fds that came with it.
        fds: usize,
    },
    /// The datagram or its fds did not fit the receive buffers.
    Truncated,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty message"),
            DecodeError::UnknownType(t) => write!(f, "unknown message type {t:#04x}"),
            DecodeError::BadLength { kind, len } => write!(f, "{kind} message of bad length {len}"),
            DecodeError::BadFamily(x) => write!(f, "bad address family {x}"),
            DecodeError::FdCount { entries, fds } => {
                write!(f, "{entries} connection entries came with {fds} fds")
            }
            DecodeError::Truncated => write!(f, "message or fds truncated"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A message from a worker to the primary, decoded. Borrowed from the
/// receive buffer; [`ToPrimary::Ack`] iterates its ids without copying.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToPrimary<'a> {
    /// The worker is ready, speaking this protocol version.
    Hello {
        /// The protocol version the worker speaks.
        version: u16,
    },
    /// The worker owns these connections now.
    Ack(AckIds<'a>),
    /// An opaque message for the primary's application.
    Message(&'a [u8]),
    /// The answer to a heartbeat, echoing its number.
    Pong(u64),
    /// In the kernel balancing modes, the connections the worker has
    /// accepted by itself so far (a running total).
    Stats(u64),
    /// The connections the worker has finished (closed) so far, a running
    /// total: with the acknowledged ones, its connections in flight.
    Done(u64),
    /// The worker asks to be replaced (it recycles itself): the primary
    /// starts its successor, keeps giving this one connections until the
    /// successor is ready, then sends it STOP.
    Recycle,
    /// The worker did not take these connections (it is near its fd limit,
    /// or their fds did not arrive): the primary gives them to other
    /// workers and pauses this one's share.
    Return(AckIds<'a>),
}

/// The connection ids of an ACK message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckIds<'a>(&'a [u8]);

impl Iterator for AckIds<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*head))
    }
}

impl<'a> ToPrimary<'a> {
    /// Decodes one datagram a worker sent. `fds` is the number of fds that
    /// came with it: a worker never sends any, so any is an error.
    pub fn decode(buf: &'a [u8], fds: usize) -> Result<Self, DecodeError> {
        let (&kind, body) = buf.split_first().ok_or(DecodeError::Empty)?;
        if fds != 0 {
            return Err(DecodeError::FdCount { entries: 0, fds });
        }
        match kind {
            T_HELLO => {
                let v: [u8; 2] = body.try_into().map_err(|_| DecodeError::BadLength {
                    kind: "HELLO",
                    len: buf.len(),
                })?;
                Ok(ToPrimary::Hello {
                    version: u16::from_be_bytes(v),
                })
            }
            T_ACK | T_RETURN => {
                let kind_name = if kind == T_ACK { "ACK" } else { "RETURN" };
                if body.is_empty() || body.len() % 8 != 0 {
                    return Err(DecodeError::BadLength {
                        kind: kind_name,
                        len: buf.len(),
                    });
                }
                Ok(match kind {
                    T_ACK => ToPrimary::Ack(AckIds(body)),
                    _ => ToPrimary::Return(AckIds(body)),
                })
            }
            T_MESSAGE_TO_PRIMARY => Ok(ToPrimary::Message(body)),
            T_PONG => Ok(ToPrimary::Pong(u64_body("PONG", buf)?)),
            T_STATS => Ok(ToPrimary::Stats(u64_body("STATS", buf)?)),
            T_DONE => Ok(ToPrimary::Done(u64_body("DONE", buf)?)),
            T_RECYCLE if body.is_empty() => Ok(ToPrimary::Recycle),
            T_RECYCLE => Err(DecodeError::BadLength {
                kind: "RECYCLE",
                len: buf.len(),
            }),
            other => Err(DecodeError::UnknownType(other)),
        }
    }
}

/// A message from the primary to a worker, decoded.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToWorker<'a> {
    /// Connections, one entry per attached fd, in order.
    Connection(Entries<'a>),
    /// Finish what is in flight and exit.
    Stop,
    /// An opaque message from the primary's application.
    Message(&'a [u8]),
    /// A heartbeat: answer with PONG and the same number.
    Ping(u64),
    /// A type this version does not know: ignored, for forward compatibility.
    Unknown(u8),
}

/// The entries of a CONNECTION message: `(connection id, peer address)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entries<'a>(&'a [u8]);

impl Iterator for Entries<'_> {
    type Item = (u64, SocketAddr);
    fn next(&mut self) -> Option<(u64, SocketAddr)> {
        let (entry, len) = parse_entry(self.0).ok()??;
        self.0 = &self.0[len..];
        Some(entry)
    }
}

/// One parsed entry and its length in bytes.
type Parsed = ((u64, SocketAddr), usize);

/// Parses one entry at the start of `buf`: `Ok(None)` at the end.
fn parse_entry(buf: &[u8]) -> Result<Option<Parsed>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let short = || DecodeError::BadLength {
        kind: "CONNECTION",
        len: buf.len(),
    };
    let (head, rest) = buf.split_first_chunk::<11>().ok_or_else(short)?;
    let id = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
    let port = u16::from_be_bytes([head[9], head[10]]);
    match head[8] {
        4 => {
            let ip: [u8; 4] = *rest.first_chunk::<4>().ok_or_else(short)?;
            let addr = SocketAddrV4::new(Ipv4Addr::from(ip), port);
            Ok(Some(((id, addr.into()), ENTRY_V4)))
        }
        6 => {
            let ip: [u8; 16] = *rest.first_chunk::<16>().ok_or_else(short)?;
            let addr = SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0);
            Ok(Some(((id, addr.into()), ENTRY_V6)))
        }
        other => Err(DecodeError::BadFamily(other)),
    }
}

impl<'a> ToWorker<'a> {
    /// Decodes one datagram the primary sent, with the number of fds that
    /// came with it. A CONNECTION is checked whole here (every entry well
    /// formed, one per fd), so iterating its [`Entries`] cannot fail.
    pub fn decode(buf: &'a [u8], fds: usize) -> Result<Self, DecodeError> {
        let (&kind, body) = buf.split_first().ok_or(DecodeError::Empty)?;
        if matches!(kind, T_STOP | T_MESSAGE_TO_WORKER | T_PING) && fds != 0 {
            return Err(DecodeError::FdCount { entries: 0, fds });
        }
        match kind {
            T_CONNECTION => {
                let mut rest = body;
                let mut entries = 0;
                while let Some((_, len)) = parse_entry(rest)? {
                    rest = &rest[len..];
                    entries += 1;
                }
                if entries == 0 || entries != fds || entries > MAX_FDS {
                    return Err(DecodeError::FdCount { entries, fds });
                }
                Ok(ToWorker::Connection(Entries(body)))
            }
            T_STOP if body.is_empty() => Ok(ToWorker::Stop),
            T_STOP => Err(DecodeError::BadLength {
                kind: "STOP",
                len: buf.len(),
            }),
            T_MESSAGE_TO_WORKER => Ok(ToWorker::Message(body)),
            T_PING => Ok(ToWorker::Ping(u64_body("PING", buf)?)),
            other => Ok(ToWorker::Unknown(other)),
        }
    }
}

/// The entries of a CONNECTION message whose fds were cut on the way
/// (`MSG_CTRUNC`: the receiver had no room for them all): what to give
/// back. Checked whole, as by [`ToWorker::decode`], but with fewer fds than
/// entries (`fds`, those that came).
///
/// # Errors
/// For a datagram that is not such a CONNECTION.
pub fn cut_connection(buf: &[u8], fds: usize) -> Result<Entries<'_>, DecodeError> {
    let (&kind, body) = buf.split_first().ok_or(DecodeError::Empty)?;
    if kind != T_CONNECTION {
        return Err(DecodeError::FdCount { entries: 0, fds });
    }
    let mut rest = body;
    let mut entries = 0;
    while let Some((_, len)) = parse_entry(rest)? {
        rest = &rest[len..];
        entries += 1;
    }
    if entries == 0 || entries <= fds || entries > MAX_FDS {
        return Err(DecodeError::FdCount { entries, fds });
    }
    Ok(Entries(body))
}

/// The body of a message that is exactly one `u64` after the type byte.
fn u64_body(kind: &'static str, buf: &[u8]) -> Result<u64, DecodeError> {
    let body: [u8; 8] = buf[1..].try_into().map_err(|_| DecodeError::BadLength {
        kind,
        len: buf.len(),
    })?;
    Ok(u64::from_be_bytes(body))
}

/// A fixed-size buffer a message is written into without allocating.
#[derive(Debug)]
pub struct Encoder {
    buf: [u8; 1 + MAX_FDS * ENTRY_V6],
    len: usize,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            buf: [0; 1 + MAX_FDS * ENTRY_V6],
            len: 0,
        }
    }
}

impl Encoder {
    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn put(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Starts a CONNECTION message; add entries with [`Encoder::entry`].
    pub fn connection(&mut self) -> &mut Self {
        self.len = 0;
        self.put(&[T_CONNECTION]);
        self
    }

    /// Adds one connection entry. Panics past [`MAX_FDS`] entries, which is
    /// a bug in the caller, not an input error.
    pub fn entry(&mut self, id: u64, peer: SocketAddr) -> &mut Self {
        assert!(
            self.len + ENTRY_V6 <= self.buf.len(),
            "more than MAX_FDS entries"
        );
        self.put(&id.to_be_bytes());
        match peer {
            SocketAddr::V4(a) => {
                self.put(&[4]);
                self.put(&a.port().to_be_bytes());
                self.put(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                self.put(&[6]);
                self.put(&a.port().to_be_bytes());
                self.put(&a.ip().octets());
            }
        }
        self
    }

    /// An ACK for the given ids (at most [`MAX_FDS`]).
    pub fn ack(&mut self, ids: impl IntoIterator<Item = u64>) -> &mut Self {
        self.ids(T_ACK, ids)
    }

    /// A message of type `kind` whose body is connection ids.
    fn ids(&mut self, kind: u8, ids: impl IntoIterator<Item = u64>) -> &mut Self {
        self.len = 0;
        self.put(&[kind]);
        for id in ids {
            self.put(&id.to_be_bytes());
        }
        self
    }

    /// A RETURN of the given ids (at most [`MAX_FDS`]).
    pub fn returned(&mut self, ids: impl IntoIterator<Item = u64>) -> &mut Self {
        self.ids(T_RETURN, ids)
    }

    /// A HELLO for this crate's version.
    pub fn hello(&mut self) -> &mut Self {
        self.len = 0;
        self.put(&[T_HELLO]);
        self.put(&VERSION.to_be_bytes());
        self
    }

    /// A STOP.
    pub fn stop(&mut self) -> &mut Self {
        self.len = 0;
        self.put(&[T_STOP]);
        self
    }

    /// A PING (heartbeat) with its number.
    pub fn ping(&mut self, n: u64) -> &mut Self {
        self.len = 0;
        self.put(&[T_PING]);
        self.put(&n.to_be_bytes());
        self
    }

    /// A STATS report: `accepted` connections so far.
    pub fn stats(&mut self, accepted: u64) -> &mut Self {
        self.len = 0;
        self.put(&[T_STATS]);
        self.put(&accepted.to_be_bytes());
        self
    }

    /// A DONE report: `finished` connections so far.
    pub fn done(&mut self, finished: u64) -> &mut Self {
        self.len = 0;
        self.put(&[T_DONE]);
        self.put(&finished.to_be_bytes());
        self
    }

    /// A RECYCLE: "replace me".
    pub fn recycle(&mut self) -> &mut Self {
        self.len = 0;
        self.put(&[T_RECYCLE]);
        self
    }

    /// A PONG answering PING `n`.
    pub fn pong(&mut self, n: u64) -> &mut Self {
        self.len = 0;
        self.put(&[T_PONG]);
        self.put(&n.to_be_bytes());
        self
    }
}

/// Encodes a user message (either direction) into a new buffer.
/// `to_worker` picks the type byte. Fails if the payload is too large.
pub fn encode_message(to_worker: bool, payload: &[u8]) -> Result<Vec<u8>, PayloadTooLarge> {
    if payload.len() > MAX_PAYLOAD {
        return Err(PayloadTooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(1 + payload.len());
    out.push(if to_worker {
        T_MESSAGE_TO_WORKER
    } else {
        T_MESSAGE_TO_PRIMARY
    });
    out.extend_from_slice(payload);
    Ok(out)
}

/// A user message larger than [`MAX_PAYLOAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadTooLarge(pub usize);

impl fmt::Display for PayloadTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "message of {} bytes is larger than the protocol's {MAX_PAYLOAD}",
            self.0
        )
    }
}

impl std::error::Error for PayloadTooLarge {}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connection_round_trip_v4_and_v6() {
        let mut e = Encoder::default();
        e.connection()
            .entry(7, v4("127.0.0.1:4242"))
            .entry(u64::MAX, "[::1]:80".parse().unwrap());
        assert_eq!(e.as_bytes().len(), 1 + ENTRY_V4 + ENTRY_V6);
        let ToWorker::Connection(entries) = ToWorker::decode(e.as_bytes(), 2).unwrap() else {
            panic!("not a connection");
        };
        let got: Vec<_> = entries.collect();
        assert_eq!(
            got,
            vec![
                (7, v4("127.0.0.1:4242")),
                (u64::MAX, "[::1]:80".parse().unwrap())
            ]
        );
    }

    #[test]
    fn connection_layout_is_as_documented() {
        let mut e = Encoder::default();
        e.connection().entry(1, v4("10.0.0.2:8080"));
        assert_eq!(
            e.as_bytes(),
            &[1, 0, 0, 0, 0, 0, 0, 0, 1, 4, 0x1f, 0x90, 10, 0, 0, 2]
        );
    }

    #[test]
    fn connection_needs_one_fd_per_entry() {
        let mut e = Encoder::default();
        e.connection().entry(1, v4("127.0.0.1:1"));
        assert_eq!(
            ToWorker::decode(e.as_bytes(), 0),
            Err(DecodeError::FdCount { entries: 1, fds: 0 })
        );
        assert_eq!(
            ToWorker::decode(e.as_bytes(), 2),
            Err(DecodeError::FdCount { entries: 1, fds: 2 })
        );
        assert_eq!(
            ToWorker::decode(&[T_CONNECTION], 0),
            Err(DecodeError::FdCount { entries: 0, fds: 0 })
        );
    }

    #[test]
    fn truncated_and_bad_family_entries_are_rejected() {
        let mut e = Encoder::default();
        e.connection().entry(1, v4("127.0.0.1:1"));
        let bytes = e.as_bytes();
        for cut in 2..bytes.len() {
            assert!(
                matches!(
                    ToWorker::decode(&bytes[..cut], 1),
                    Err(DecodeError::BadLength { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut bad = bytes.to_vec();
        bad[9] = 5;
        assert_eq!(ToWorker::decode(&bad, 1), Err(DecodeError::BadFamily(5)));
    }

    #[test]
    fn hello_ack_message_decode() {
        let mut e = Encoder::default();
        assert_eq!(e.hello().as_bytes(), &[0x80, 0, 1]);
        assert_eq!(
            ToPrimary::decode(e.as_bytes(), 0),
            Ok(ToPrimary::Hello { version: 1 })
        );
        e.ack([3, 1 << 40]);
        let ToPrimary::Ack(ids) = ToPrimary::decode(e.as_bytes(), 0).unwrap() else {
            panic!("not an ack");
        };
        assert_eq!(ids.collect::<Vec<_>>(), vec![3, 1 << 40]);
        let m = encode_message(false, b"hi").unwrap();
        assert_eq!(ToPrimary::decode(&m, 0), Ok(ToPrimary::Message(b"hi")));
        let m = encode_message(true, b"").unwrap();
        assert_eq!(ToWorker::decode(&m, 0), Ok(ToWorker::Message(b"")));
    }

    #[test]
    fn worker_messages_reject_garbage() {
        assert_eq!(ToPrimary::decode(&[], 0), Err(DecodeError::Empty));
        assert_eq!(
            ToPrimary::decode(&[0x80, 0], 0),
            Err(DecodeError::BadLength {
                kind: "HELLO",
                len: 2
            })
        );
        assert!(ToPrimary::decode(&[0x81], 0).is_err());
        assert!(ToPrimary::decode(&[0x81, 1, 2, 3], 0).is_err());
        assert_eq!(
            ToPrimary::decode(&[0x7f], 0),
            Err(DecodeError::UnknownType(0x7f))
        );
        assert_eq!(
            ToPrimary::decode(&[0x83, 1], 1),
            Err(DecodeError::FdCount { entries: 0, fds: 1 })
        );
    }

    #[test]
    fn unknown_primary_messages_are_ignored_not_errors() {
        assert_eq!(
            ToWorker::decode(&[0x42, 9, 9], 0),
            Ok(ToWorker::Unknown(0x42))
        );
        assert_eq!(ToWorker::decode(&[T_STOP], 0), Ok(ToWorker::Stop));
        assert!(ToWorker::decode(&[T_STOP, 0], 0).is_err());
    }

    #[test]
    fn ping_pong_round_trip() {
        let mut e = Encoder::default();
        assert_eq!(e.ping(258).as_bytes(), &[0x04, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(ToWorker::decode(e.as_bytes(), 0), Ok(ToWorker::Ping(258)));
        e.pong(258);
        assert_eq!(ToPrimary::decode(e.as_bytes(), 0), Ok(ToPrimary::Pong(258)));
        assert!(ToPrimary::decode(&e.as_bytes()[..5], 0).is_err());
        assert!(ToWorker::decode(&[0x04, 1], 0).is_err());
        e.stats(1 << 33);
        assert_eq!(
            ToPrimary::decode(e.as_bytes(), 0),
            Ok(ToPrimary::Stats(1 << 33))
        );
        assert_eq!(e.as_bytes()[0], 0x82);
        assert_eq!(
            ToPrimary::decode(e.done(7).as_bytes(), 0),
            Ok(ToPrimary::Done(7))
        );
        assert!(ToPrimary::decode(&[0x85, 1], 0).is_err());
        e.returned([5, 6]);
        let ToPrimary::Return(ids) = ToPrimary::decode(e.as_bytes(), 0).unwrap() else {
            panic!("not a return");
        };
        assert_eq!(ids.collect::<Vec<_>>(), vec![5, 6]);
        assert!(ToPrimary::decode(&[0x87], 0).is_err());
        assert!(ToPrimary::decode(&[0x87, 1, 2], 0).is_err());
        assert_eq!(e.recycle().as_bytes(), &[0x86]);
        assert_eq!(ToPrimary::decode(e.as_bytes(), 0), Ok(ToPrimary::Recycle));
        assert!(ToPrimary::decode(&[0x86, 0], 0).is_err());
    }

    #[test]
    fn oversized_payload_is_refused() {
        assert!(encode_message(true, &vec![0; MAX_PAYLOAD]).is_ok());
        assert_eq!(
            encode_message(true, &vec![0; MAX_PAYLOAD + 1]),
            Err(PayloadTooLarge(MAX_PAYLOAD + 1))
        );
    }
}
