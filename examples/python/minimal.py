#!/usr/bin/env python3
"""The smallest complete distributor worker (round-robin mode), standard
library only: HELLO, then CONNECTION -> ACK -> serve on a thread, PING ->
PONG, STOP -> finish and exit 0, EOF -> exit. docs/PROTOCOL.md has the
rules; examples/python/hello.py adds keep-alive, the kernel modes and the
reports.

    distributor -w 4 -- python3 examples/python/minimal.py
"""
import os, socket, struct, sys, threading

chan = socket.socket(fileno=int(os.environ["DISTRIBUTOR_FD"]))
os.set_inheritable(chan.fileno(), False)
body = f"Hello from worker {os.environ['DISTRIBUTOR_WORKER_ID']} (pid {os.getpid()})\n"
busy = threading.BoundedSemaphore(1000)  # connections being served


def serve(sock):
    with busy, sock:
        sock.settimeout(10)
        try:
            sock.recv(65536)  # one request, its head in one read
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


chan.send(struct.pack(">BH", 0x80, 1))  # HELLO, protocol version 1
while True:
    data, fds, flags, _ = socket.recv_fds(chan, 65536, 64, socket.MSG_CMSG_CLOEXEC)
    if not data:  # EOF: the primary is gone
        sys.exit(0)
    if flags & socket.MSG_TRUNC:  # not a message of the protocol
        sys.exit(1)
    if data[0] == 0x01:  # CONNECTION: entries of 11 + 4 or 16 bytes, one per fd
        ids, at = [], 1
        while at < len(data):
            ids.append(data[at:at + 8])
            at += 15 if data[at + 8] == 4 else 27
        if flags & socket.MSG_CTRUNC:  # no room for the fds: RETURN them
            for fd in fds:
                os.close(fd)
            chan.send(b"\x87" + b"".join(ids))
            continue
        chan.send(b"\x81" + b"".join(ids))  # ACK, before any I/O
        for fd in fds:
            threading.Thread(target=serve, args=(socket.socket(fileno=fd),)).start()
    elif data[0] == 0x04:  # PING: PONG with the same number
        chan.send(b"\x84" + data[1:9])
    elif data[0] == 0x02:  # STOP: finish what is in flight, exit 0
        for _ in range(1000):
            busy.acquire()
        sys.exit(0)
    else:  # MESSAGE, or a type from a later version: ignored
        for fd in fds:
            os.close(fd)
