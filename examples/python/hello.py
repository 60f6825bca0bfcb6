#!/usr/bin/env python3
"""A distributor worker in plain Python (standard library only).

Run it under the primary, in any scheduling mode:

    distributor -- python3 examples/python/hello.py
    distributor --sched shared -- python3 examples/python/hello.py
    distributor --sched reuseport -- python3 examples/python/hello.py

Every HTTP/1.1 request is answered with ``200 OK`` and the body
``Hello from worker <ID> (pid <PID>)``.  Keep-alive is honoured.

The worker protocol is described in docs/PROTOCOL.md.  In short: read the
channel fd from DISTRIBUTOR_FD, send HELLO, then loop over messages from the
primary: CONNECTION -> ACK, then serve; PING -> PONG; STOP -> drain, exit 0;
EOF -> exit 0.

In the kernel balancing modes (``--sched shared|reuseport``) no CONNECTION
comes: the worker inherits a listening socket by socket activation (fd 3,
LISTEN_FDS=1, LISTEN_PID=<its pid>) and accepts on it itself, waiting on the
channel and the listener at once.  It tells the primary how many
connections it accepted with STATS messages, so that the primary's
per-worker figures hold in every mode.  The same script runs in every mode.
"""

import errno
import http.server
import os
import selectors
import socket
import struct
import sys
import threading
import time

PROG = "hello.py"

# Message types (protocol version 1).
CONNECTION = 0x01
STOP = 0x02
MESSAGE = 0x03
PING = 0x04
HELLO = 0x80
ACK = 0x81
STATS = 0x82
PONG = 0x84
DONE = 0x85

MAX_MESSAGE = 65536  # bytes per datagram
MAX_FDS = 64  # ancillary room, in fds
ENTRY_HEAD = struct.Struct(">QBH")  # connection id, family, peer port
DRAIN_TIMEOUT = 10.0  # seconds to wait for requests in flight after STOP
IDLE_GRACE = 1.0  # seconds an idle keep-alive connection may still send one request after STOP

# Kernel balancing modes.
LISTEN_FD = 3  # where socket activation puts the listening socket (SD_LISTEN_FDS_START)
REPORT_EVERY = 0.1  # seconds: at most one STATS message per 100 ms
ACCEPT_BATCH = 16  # accepts in a row before looking at the channel again

WORKER_ID = os.environ.get("DISTRIBUTOR_WORKER_ID", "?")


def die(code, message):
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


class InFlight:
    """Counts requests in flight so that STOP can wait for them."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self.stopping = False

    def enter(self):
        with self._cond:
            self._active += 1

    def leave(self):
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def begin_stop(self):
        with self._cond:
            self.stopping = True

    def stop_and_drain(self, timeout):
        """Mark stopping; wait until nothing is in flight. False on timeout."""
        with self._cond:
            self.stopping = True
            return self._cond.wait_for(lambda: self._active == 0, timeout)


inflight = InFlight()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    disable_nagle_algorithm = True  # headers and body are separate writes

    def handle_one_request(self):
        # Wait for the first byte of the next request while idle: an idle
        # keep-alive connection is not a request in flight.
        try:
            first = self.rfile.peek(1)
        except OSError:
            first = b""
        if not first:
            self.close_connection = True
            return
        inflight.enter()
        try:
            super().handle_one_request()
        finally:
            inflight.leave()

    def __getattr__(self, name):
        # Answer every method (GET, POST, ...) the same way.
        if name.startswith("do_"):
            return self.respond
        raise AttributeError(name)

    def respond(self):
        if not self.discard_request_body():
            return
        body = f"Hello from worker {WORKER_ID} (pid {os.getpid()})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if inflight.stopping or self.close_connection:
            self.send_header("Connection", "close")  # also sets close_connection
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def discard_request_body(self):
        """Read and drop the request body so the next request can be parsed."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.send_error(400, "Bad chunk size")
                    return False
                if size == 0:
                    break
                self.skip(size + 2)  # data and its CRLF
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            return True
        length = self.headers.get("Content-Length")
        if length is None:
            return True
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.send_error(400, "Bad Content-Length")
            return False
        self.skip(n)
        return True

    def skip(self, n):
        while n > 0:
            chunk = self.rfile.read(min(n, 65536))
            if not chunk:
                raise ConnectionResetError("request body cut short")
            n -= len(chunk)

    def log_message(self, format, *args):
        pass  # log nothing per request


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    chan = None  # the channel, for DONE reports
    _finished = 0
    _finished_lock = threading.Lock()

    def shutdown_request(self, request):
        """A connection is finished: report the running total (DONE), so
        that load-aware scheduling (--sched least-conn, p2c) sees it."""
        super().shutdown_request(request)
        with self._finished_lock:
            Server._finished += 1
            if self.chan is not None:
                send_msg(self.chan, struct.pack(">BQ", DONE, Server._finished))

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client went away; nothing to report
        super().handle_error(request, client_address)


def parse_connection(body):
    """Parse the entries of a CONNECTION message: [(id, (host, port))]."""
    entries = []
    off = 0
    while off < len(body):
        if len(body) - off < ENTRY_HEAD.size:
            raise ValueError("truncated entry")
        conn_id, family, port = ENTRY_HEAD.unpack_from(body, off)
        off += ENTRY_HEAD.size
        if family == 4:
            af, size = socket.AF_INET, 4
        elif family == 6:
            af, size = socket.AF_INET6, 16
        else:
            raise ValueError(f"unknown address family {family}")
        if len(body) - off < size:
            raise ValueError("truncated address")
        host = socket.inet_ntop(af, body[off : off + size])
        off += size
        entries.append((conn_id, (host, port)))
    return entries


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_msg(chan, msg):
    """Send one message as one datagram; if the primary is gone, exit."""
    try:
        chan.send(msg)  # SOCK_SEQPACKET: all of it or an error, never part
    except OSError:
        exit_now(0)


def exit_now(code):
    # Handler threads may still be blocked reading idle keep-alive
    # connections; leave without waiting for them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class AcceptCount:
    """Kernel modes: the running total of connections this worker accepted
    itself, and the figure the primary was last told (STATS)."""

    def __init__(self):
        self.total = 0
        self.reported = 0
        self.last_report = float("-inf")  # time.monotonic() of the last STATS

    def due_in(self):
        """Seconds until a STATS message is due; None while nothing changed."""
        if self.total == self.reported:
            return None
        return max(0.0, self.last_report + REPORT_EVERY - time.monotonic())

    def report(self, chan):
        """Send STATS with the total if it changed since the last one."""
        if self.total != self.reported:
            send_msg(chan, struct.pack(">BQ", STATS, self.total))
            self.reported = self.total
            self.last_report = time.monotonic()


def take_listener():
    """The listening socket of socket activation, or None (round-robin mode).

    As sd_listen_fds(3) does, the socket is ours only when LISTEN_PID is our
    own pid: the variables may have been inherited from a parent that was
    socket-activated itself.  The variables are then removed so that our own
    children do not take the socket for theirs.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "0")
    if count == "0":
        return None
    if count != "1":
        die(2, f"LISTEN_FDS={count!r}: expected one listening socket")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    try:
        os.set_inheritable(LISTEN_FD, False)  # our own children must not get it
        listener = socket.socket(fileno=LISTEN_FD)  # family and type detected
        listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        die(2, f"LISTEN_FDS=1 but fd {LISTEN_FD} is not usable: {e}")
    if listener.type != socket.SOCK_STREAM or not listening:
        die(2, f"fd {LISTEN_FD} is not a listening TCP socket")
    # Socket activation hands the socket over blocking.  Other workers race
    # for the same connections (shared mode), so an accept after the
    # selector said "readable" may find nothing: it must not block.  This
    # sets O_NONBLOCK on the file description that all workers (and the
    # primary) share, which is fine since every worker runs this program.
    listener.setblocking(False)
    return listener


def accept_ready(listener, srv, count):
    """Kernel modes: accept what the listener has queued and serve it."""
    for _ in range(ACCEPT_BATCH):  # then let the channel have its turn
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            return  # EAGAIN: queue empty, or another worker was quicker
        except ConnectionAbortedError:
            continue  # the client gave up while queued
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of fds or memory: the connection stays queued; pause
                # instead of spinning on a listener that stays readable.
                print(f"{PROG}: accept: {e}", file=sys.stderr)
                time.sleep(0.1)
                return
            continue  # other errors concern that one connection only
        count.total += 1
        sock.setblocking(True)  # the handler thread reads and writes blocking
        srv.process_request(sock, addr)  # serves it on a new thread


def stop(chan, sel, listener, count):
    """STOP: take no more connections, finish those in flight, exit 0."""
    if listener is not None:
        # Stop accepting and close our copy: connections still queued are
        # left to the other workers (or to this slot's next worker).
        sel.unregister(listener)
        listener.close()
        count.report(chan)  # the final figure
    # Requests from now on are answered with Connection: close; an idle
    # kept-alive connection may still bring one for a moment.
    inflight.begin_stop()
    time.sleep(IDLE_GRACE)
    if not inflight.stop_and_drain(DRAIN_TIMEOUT):
        print(f"{PROG}: requests still in flight after "
              f"{DRAIN_TIMEOUT:g}s, exiting anyway", file=sys.stderr)
    exit_now(0)


def handle_message(chan, sel, srv, listener, count):
    """Read one message from the primary and act on it."""
    try:
        data, fds, flags, _ = socket.recv_fds(
            chan, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC
        )
    except OSError as e:
        print(f"{PROG}: reading the channel: {e}", file=sys.stderr)
        exit_now(1)
    if not data:  # EOF: the primary is gone
        close_fds(fds)
        exit_now(0)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        print(f"{PROG}: truncated message from the primary", file=sys.stderr)
        exit_now(1)
    kind = data[0]

    if kind == CONNECTION:  # round-robin mode only
        try:
            entries = parse_connection(data[1:])
            if not entries or len(entries) != len(fds):
                raise ValueError(
                    f"{len(entries)} entries but {len(fds)} fds attached"
                )
        except ValueError as e:
            close_fds(fds)
            print(f"{PROG}: malformed CONNECTION: {e}", file=sys.stderr)
            exit_now(1)
        # Take ownership first, then serve.
        ack = bytes([ACK]) + b"".join(struct.pack(">Q", i) for i, _ in entries)
        send_msg(chan, ack)
        for (_, addr), conn_fd in zip(entries, fds):
            try:
                sock = socket.socket(fileno=conn_fd)
            except OSError:
                close_fds([conn_fd])
                continue
            srv.process_request(sock, addr)  # serves it on a new thread

    elif kind == PING and len(data) == 9 and not fds:
        count.report(chan)  # kernel modes: a changed total goes first
        send_msg(chan, bytes([PONG]) + data[1:])  # echo the number

    elif kind == STOP:
        close_fds(fds)
        stop(chan, sel, listener, count)

    else:  # MESSAGE (nothing to do here) or an unknown type: ignore
        close_fds(fds)


def main():
    fd_text = os.environ.get("DISTRIBUTOR_FD")
    if fd_text is None:
        die(2, "not started by distributor (DISTRIBUTOR_FD is unset)")
    version = os.environ.get("DISTRIBUTOR_PROTOCOL", "1")
    if version != "1":
        die(2, f"unsupported protocol version {version!r} (this worker speaks 1)")
    try:
        fd = int(fd_text)
        os.set_inheritable(fd, False)  # our own children must not get it
        chan = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        die(2, f"bad DISTRIBUTOR_FD {fd_text!r}: {e}")
    if chan.family != socket.AF_UNIX or chan.type != socket.SOCK_SEQPACKET:
        die(2, f"DISTRIBUTOR_FD {fd_text} is not a Unix SOCK_SEQPACKET socket")
    listener = take_listener()  # None in round-robin mode

    srv = Server(("", 0), Handler, bind_and_activate=False)
    srv.socket.close()  # its own socket is never used: we accept (or get) them

    # Wait for the channel and, in the kernel modes, the listener at once.
    # The channel stays blocking: once it is readable, one whole message
    # (or EOF) is there to read.
    sel = selectors.DefaultSelector()
    sel.register(chan, selectors.EVENT_READ)
    if listener is not None:
        sel.register(listener, selectors.EVENT_READ)
    count = AcceptCount()

    # DONE reports, unless the primary says it reads none (kernel modes).
    if os.environ.get("DISTRIBUTOR_REPORT_FINISHED", "1") != "0":
        srv.chan = chan
        send_msg(chan, struct.pack(">BQ", DONE, 0))  # it reports finished connections
    send_msg(chan, struct.pack(">BH", HELLO, 1))  # ready
    if listener is not None:
        send_msg(chan, struct.pack(">BQ", STATS, 0))  # it accepts on fd 3 itself

    while True:
        for key, _ in sel.select(timeout=count.due_in()):
            if key.fileobj is listener:
                accept_ready(listener, srv, count)
            else:
                handle_message(chan, sel, srv, listener, count)
        if count.due_in() == 0:
            count.report(chan)


if __name__ == "__main__":
    main()
