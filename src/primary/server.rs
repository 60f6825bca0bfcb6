//! One listening address the primary serves (a *server*) and the sockets
//! it binds: with the native protocol the address it was given; with
//! Node's, each one the app's `listen()` calls asked for (docs/NODE.md).
//! A worker gets connections only of the servers it holds (a bit each in
//! `WorkerProc::servers`, so at most [`MAX_SERVERS`]).

use std::io;
use std::net::{SocketAddr, TcpListener};

use super::node::wire;

pub(crate) use super::source::MAX_SERVERS;

/// One listening address and the connections accepted on it.
#[derive(Debug)]
pub(crate) struct Server {
    /// Node's key for it (empty with the native protocol).
    pub key: String,
    /// `key` as a JSON string, quotes included.
    pub key_json: String,
    pub addr: SocketAddr,
    /// `None` once closed (shutdown, or every Node worker closed it).
    pub listener: Option<TcpListener>,
    /// Reuseport: the socket of each slot after the first.
    pub slot_listeners: Vec<Option<TcpListener>>,
    /// Node: the `data` of the first worker that asked (a TLS server's
    /// ticket keys), raw JSON, echoed to every worker.
    pub data: String,
    /// Connections may wait in the backlog: set by the listener's
    /// (edge-triggered) readiness, cleared only by an accept that found
    /// none (`WouldBlock`). It stays set when accepting stopped for want of
    /// a worker with room, so room freed later (an acknowledgement, a
    /// worker ready) resumes accepting without a wasted `accept`.
    pub backlog_waiting: bool,
    /// The last accept loop that emptied the backlog took one connection
    /// at most (and none since found more waiting than there was room
    /// for): connections arrive one at a time, so the first of the next
    /// loop goes out at once, before the `accept` that ends the loop,
    /// rather than in a batch after it. The worker then starts on it while
    /// the primary makes that call.
    pub lone: bool,
    /// Reuseport with `--steer`: the BPF steering of its socket group.
    pub steering: Option<super::steer::Steering>,
}

impl Server {
    pub(crate) fn new(key: String, listener: TcpListener, addr: SocketAddr) -> Server {
        Server {
            key_json: wire::json_string(&key),
            key,
            addr,
            listener: Some(listener),
            slot_listeners: Vec::new(),
            data: "null".into(),
            backlog_waiting: true,
            lone: true,
            steering: None,
        }
    }
}

/// Binds a listening TCP socket with `SO_REUSEADDR` (and `SO_REUSEPORT`
/// if asked), close-on-exec.
pub(crate) fn bind(addr: SocketAddr, backlog: i32, reuseport: bool) -> io::Result<TcpListener> {
    let socket = bind_only(addr, reuseport)?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Binds a TCP socket as [`bind`] does and keeps it from listening: the
/// address is taken (a port in use is an error now; `SO_REUSEADDR` is
/// cleared once bound, so that no other socket can bind it while this one
/// does not listen), and connections to it are refused until it listens.
pub(crate) fn reserve(addr: SocketAddr, reuseport: bool) -> io::Result<socket2::Socket> {
    let socket = bind_only(addr, reuseport)?;
    socket.set_reuse_address(false)?;
    Ok(socket)
}

/// Binds a TCP socket with `SO_REUSEADDR` (and `SO_REUSEPORT` if asked),
/// close-on-exec, without listening.
fn bind_only(addr: SocketAddr, reuseport: bool) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}
